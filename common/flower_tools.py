"""Running Flower's own executables (``flower-superlink``, ``flower-supernode``, ``flwr``) from
FedCT's entry points, without importing Flower, and the flat TOML files they read."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import tomli_w

from fedct.common.errors import FedCTError


def executable(name: str) -> str:
    """A Flower executable from this environment (beside this Python), else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FedCTError(f"'{name}' is not installed; install FedCT with its dependencies")
    return found


def flower_environment(**extra: str) -> dict[str, str]:
    """This process's environment for a Flower executable: telemetry off, this environment's
    executables first on PATH (Flower's processes start each other by name, e.g.
    ``flower-superexec``, ``flwr-clientapp``, also when FedCT's venv is not activated), plus
    ``extra``."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PATH": path, **extra}


def write_toml(path: Path, values: dict[str, Any]) -> Path:
    """A flat TOML file of ``values`` (Flower takes run and node configs as such files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(values))
    return path
