"""Per-round checkpoints and the metrics history, written next to each other.

``OUT/checkpoints/round-NNNN.safetensors`` holds the global model (safetensors: loading it can
never execute code), ``round-NNNN.json`` the server state needed to continue (round, strategy
and its optimizer state, sites out of budget), and ``latest.json`` names the newest complete
checkpoint; it is written last, so a crash mid-save leaves the previous one in force.
``OUT/metrics.jsonl`` gets one strict JSON line per round (per site and pooled; ``null`` for NaN).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from fedct.common import json_text
from fedct.common.config import FederationConfig
from fedct.common.errors import FedCTError
from fedct.common.fileio import atomic_write, atomic_write_text
from fedct.common.model_file import save_model
from fedct.common.training_stats import TrainingStats
from fedct.common.weights import Weights

log = logging.getLogger(__name__)


class CheckpointError(FedCTError):
    """A checkpoint exists but cannot be used to resume."""


@dataclass
class ServerState:
    round: int
    strategy: str
    exhausted_sites: list[str] = field(default_factory=list)
    optimizer_state: dict[str, Weights] = field(default_factory=dict)  # e.g. FedAdam m_t, v_t


class CheckpointStore:
    def __init__(self, folder: Path, fed: FederationConfig | None = None) -> None:
        self.folder = folder
        self.fed = fed  # stored in each model file, so a checkpoint can be used on its own

    def save(
        self, weights: Weights, state: ServerState, *, stats: TrainingStats | None = None
    ) -> Path:
        """Write the round's model (with the training statistics ``stats``) and state."""
        self.folder.mkdir(parents=True, exist_ok=True)
        stem = f"round-{state.round:04d}"
        model_path = self.folder / f"{stem}.safetensors"
        weights = {k: np.asarray(v) for k, v in weights.items()}
        save_model(model_path, weights, self.fed, stats=stats)
        for name, arrays in state.optimizer_state.items():
            _save_weights(self.folder / f"{stem}.{name}.safetensors", arrays)
        meta = {
            "round": state.round,
            "strategy": state.strategy,
            "exhausted_sites": sorted(state.exhausted_sites),
            "optimizer_state": sorted(state.optimizer_state),
            "model": model_path.name,
        }
        atomic_write_text(self.folder / f"{stem}.json", json.dumps(meta))
        atomic_write_text(self.folder / "latest.json", json.dumps({"checkpoint": f"{stem}.json"}))
        return model_path

    def latest(self) -> tuple[Weights, ServerState] | None:
        pointer = self.folder / "latest.json"
        if not pointer.is_file():
            return None
        try:
            meta_path = self.folder / json.loads(pointer.read_text())["checkpoint"]
            meta = json.loads(meta_path.read_text())
            weights = load_file(str(self.folder / meta["model"]))
            stem = meta_path.stem
            optimizer = {
                name: load_file(str(self.folder / f"{stem}.{name}.safetensors"))
                for name in meta.get("optimizer_state", [])
            }
            state = ServerState(
                int(meta["round"]),
                str(meta["strategy"]),
                list(meta.get("exhausted_sites", [])),
                optimizer,
            )
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
            raise CheckpointError(
                f"cannot resume from {pointer}: {err}. Move the checkpoints folder away to "
                "start a new run, or restore it from backup."
            ) from err
        return weights, state


def fit_to_model(
    resumed: tuple[Weights, ServerState], fresh: Weights, identity: set[str]
) -> tuple[Weights, ServerState]:
    """A checkpoint's model and state for the model ``fresh`` describes: the ``identity``
    parameters (a folded model's per-channel affine, added after earlier releases wrote their
    checkpoints) start as ``fresh`` has them (and at zero in optimizer moments) where the
    checkpoint lacks them; any other difference is a CheckpointError saying what to do."""
    weights, state = resumed
    missing = set(fresh) - set(weights)
    if missing and missing <= identity:
        log.info("the checkpoint predates the per-channel affine: resuming with it at identity")
        weights = {**{k: fresh[k] for k in missing}, **weights}
        moments = {
            name: {**{k: np.zeros_like(fresh[k]) for k in missing}, **arrays}
            for name, arrays in state.optimizer_state.items()
        }
        state = ServerState(state.round, state.strategy, state.exhausted_sites, moments)
    if set(weights) != set(fresh):
        differ = sorted(set(weights) ^ set(fresh))
        raise CheckpointError(
            f"the checkpoint's model does not match this run's ({len(differ)} weights differ, "
            f"e.g. {differ[0]!r}): it was written with other model settings. Resume with "
            "those settings, or move the checkpoints folder away to start a new run."
        )
    return weights, state


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` as one strict JSON line (``null`` where a value is NaN)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(json_text.dumps(record) + "\n")


# The starting model evaluated at the sites before round 1 ("round 0"), in the run's output
# folder beside metrics.jsonl (which holds trained rounds only).
START_FILE = "start.json"


def read_start(out: Path) -> dict[str, Any] | None:
    """The starting model's evaluation record of the run in ``out`` (None: not evaluated)."""
    path = out / START_FILE
    return _nulls_as_nan(json.loads(path.read_text())) if path.is_file() else None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rounds in ``path``, with ``null`` read back as NaN: every metric stays a number."""
    if not path.is_file():
        return []
    return [
        _nulls_as_nan(json.loads(line)) for line in path.read_text().splitlines() if line.strip()
    ]


def _nulls_as_nan(value: Any) -> Any:
    if value is None:
        return math.nan
    if isinstance(value, dict):
        return {k: _nulls_as_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nulls_as_nan(v) for v in value]
    return value


def _save_weights(path: Path, weights: Weights) -> None:
    contiguous = {k: np.ascontiguousarray(v) for k, v in weights.items()}
    atomic_write(path, lambda tmp: save_file(contiguous, str(tmp)))
