"""The Flower app FedCT submits, written from the installed package: a ``pyproject.toml`` and
nothing else.

A Flower app bundle (FAB) normally carries the app's Python code, and Flower runs whatever a
bundle carries. FedCT's bundle carries none: its components name the *installed*
``fedct.server.server_app`` and ``fedct.client.client_app`` modules, and its config table is
FedCT's defaults (:class:`FederationConfig`, the one source), including the FedCT version that
made it, which every hospital checks against its own. Nothing is read from a source checkout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tomli_w

from fedct.common.config import FederationConfig
from fedct.common.errors import FedCTError
from fedct.common.fileio import atomic_write_text
from fedct.common.version import FEDCT_VERSION

SERVER_APP = "fedct.server.server_app:app"
CLIENT_APP = "fedct.client.client_app:app"


def app_project() -> dict[str, Any]:
    """The app's pyproject as a mapping (Flower's FAB format 0)."""
    return {
        "project": {
            "name": "fedct",
            "version": FEDCT_VERSION,
            "description": "FedCT's federation: code from the installed fedct package",
            "dependencies": [f"fedct=={FEDCT_VERSION}"],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "fedct",
                    "components": {"serverapp": SERVER_APP, "clientapp": CLIENT_APP},
                    "config": FederationConfig().to_mapping(),
                }
            }
        },
    }


def write_app(folder: Path) -> Path:
    """Write the app into ``folder`` (made if needed) and return the folder. Flower packs every
    file of the folder into the bundle, so it must hold nothing else."""
    folder.mkdir(parents=True, exist_ok=True)
    stray = sorted(p.name for p in folder.iterdir() if p.name != "pyproject.toml")
    if stray:
        raise FedCTError(
            f"{folder} holds {stray[:3]}: FedCT's app folder may hold only its pyproject.toml "
            "(Flower would ship anything else to the hospitals); remove those files"
        )
    atomic_write_text(folder / "pyproject.toml", tomli_w.dumps(app_project()), mode=0o644)
    return folder
