"""FedCT's SuperLink process (server/superlink.py): the link state stays in the database, the
objects of messages in transit are kept in memory; and guards that Flower still builds its
stores where FedCT replaces the factory."""

from __future__ import annotations

import inspect
from pathlib import Path

from fedct.server import superlink


def test_flower_still_builds_its_stores_through_the_replaced_factory() -> None:
    from flwr.superlink import config_loader
    from flwr.superlink import main as superlink_main

    assert "get_objectstore_linkstate_factories(" in inspect.getsource(superlink_main.create_app)
    # what FedCT's factory does differently from Flower's own: objects without the database
    own = inspect.getsource(config_loader.get_objectstore_linkstate_factories)
    assert "ObjectStoreFactory(database)" in own
    assert "LinkStateFactory(database, federation_manager, objectstore_factory)" in own


def test_objects_in_memory_and_link_state_in_the_database(tmp_path: Path) -> None:
    from flwr.superlink import main as superlink_main
    from flwr.superlink.federation import NoOpFederationManager

    database = tmp_path / "superlink.db"
    objects, links = superlink.objects_in_memory(str(database), NoOpFederationManager())
    assert type(objects.store()).__name__ == "InMemoryObjectStore"
    state = links.state()
    assert type(state).__name__ == "SqlLinkState"
    assert links.objectstore_factory is objects  # the link state deletes what it delivered
    assert database.exists()

    original = superlink_main.get_objectstore_linkstate_factories
    try:
        superlink.keep_objects_in_memory()
        assert superlink_main.get_objectstore_linkstate_factories is superlink.objects_in_memory
    finally:
        superlink_main.get_objectstore_linkstate_factories = original
