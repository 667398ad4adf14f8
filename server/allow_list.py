"""The server's allow-list: which Flower nodes are the federation's hospitals (no Flower).

Flower's open-source Control API registers any key it is given, so a node being connected does
not make it a hospital. ``fedct server`` registers the keys ``fedct certs`` issued and writes
the node id Flower gave each into ``RUN/allowed-nodes.json``; the ServerApp then selects, and
counts towards ``min-sites``, only those nodes, and names every other node in its log. Without
the file (a simulation, or ``--insecure``) every node takes part.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

from fedct.common.errors import FedCTError
from fedct.common.fileio import atomic_write_text

log = logging.getLogger(__name__)

ALLOWED_NODES = "allowed-nodes.json"


def write_allow_list(run_dir: Path, hospitals: dict[str, str]) -> Path:
    """``{hospital name: node id}`` as the run's allow-list."""
    path = run_dir / ALLOWED_NODES
    atomic_write_text(path, json.dumps(hospitals, indent=2, sort_keys=True))
    return path


def read_allow_list(run_dir: Path) -> dict[int, str] | None:
    """``{node id: hospital name}``, or None when the run has no allow-list."""
    path = run_dir / ALLOWED_NODES
    if not path.exists():
        return None
    try:
        return {int(node): name for name, node in json.loads(path.read_text()).items()}
    except (ValueError, AttributeError) as err:
        raise FedCTError(f"{path} is not a {{hospital: node id}} table ({err})") from None


def keep_allowed(
    node_ids: Iterable[int], allowed: dict[int, str] | None
) -> tuple[set[int], list[int]]:
    """The nodes among ``node_ids`` that may take part, and the others (sorted)."""
    nodes = set(node_ids)
    if allowed is None:
        return nodes, []
    return nodes & allowed.keys(), sorted(nodes - allowed.keys())


def warn_strangers(strangers: Iterable[int], *, server_round: int) -> None:
    """Name the connected nodes a round ignored (the round record and audit log keep them)."""
    if strangers:
        log.warning(
            "round %d: ignoring node(s) %s: connected, but not the node of a hospital whose key "
            "`fedct certs` issued (registered some other way?)",
            server_round,
            ", ".join(map(str, sorted(strangers))),
        )
