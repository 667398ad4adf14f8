"""FedCT's SuperLink process: Flower's ``flower-superlink``, keeping messages in transit in memory.

    python -m fedct.server.superlink [flower-superlink's options]

``fedct server`` starts this in place of the ``flower-superlink`` executable; its options,
behaviour and exit codes are Flower's, with one difference. Given a SQLite ``--database``,
Flower 1.41 keeps both its link state (registered nodes, runs, message metadata) and every
object of every message (a model is ~15 objects of up to 5 MB) in that file, and writes,
reads and deletes 45 MB of blobs through SQLAlchemy for each model sent or received:
~0.2 s to store one and ~0.2 s to delete it on this 2-core machine. Here the link state stays
in the database (registrations and runs survive a restart, as before) and the objects go to
Flower's own in-memory object store, which Flower uses when there is no database at all.
Objects are only ever in transit: a message's objects are deleted once it is delivered, and
the messages of a run a restarted server did not finish are not resumed (``fedct server``
stops such runs and resumes from the FedCT checkpoint instead). As in Flower's own store, a
message that is never delivered (its site dropped out mid-round) keeps its objects until the run
ends: at most one model per round of a site's absence, shared by every message of the round,
since objects are stored by content hash. Before, the same objects stayed in the database file.

Flower offers no setting for this; the one name replaced is the factory function
``flwr.superlink.main`` calls, and ``tests/test_superlink.py`` fails if a Flower upgrade moves it.
"""

from __future__ import annotations

from typing import Any


def objects_in_memory(database: str, federation_manager: Any) -> tuple[Any, Any]:
    """Flower's object store and link state factories: the link state in ``database``, the
    objects in Flower's in-memory store."""
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.object_store import ObjectStoreFactory

    objects = ObjectStoreFactory()  # no database: Flower's InMemoryObjectStore
    return objects, LinkStateFactory(database, federation_manager, objects)


def keep_objects_in_memory() -> None:
    """Make ``flwr.superlink.main`` build its stores with :func:`objects_in_memory`."""
    from flwr.superlink import main as superlink_main

    if not callable(getattr(superlink_main, "get_objectstore_linkstate_factories", None)):
        raise RuntimeError("Flower's SuperLink no longer builds its stores where FedCT expects")
    superlink_main.get_objectstore_linkstate_factories = objects_in_memory


def main() -> None:
    from flwr.superlink.cli import flower_superlink

    keep_objects_in_memory()
    flower_superlink()


if __name__ == "__main__":
    main()
