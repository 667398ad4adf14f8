"""A FedCT model file: safetensors weights (never unpickled) that carry the federation settings
needed to use them (architecture, classes, grid, windows) as safetensors metadata, and what the
model was trained and evaluated on (intensity and score statistics, common/training_stats.py)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from fedct.common.config import FederationConfig
from fedct.common.errors import ConfigError
from fedct.common.fileio import atomic_write
from fedct.common.models import build_model, channel_affine_keys
from fedct.common.training_stats import STATS_KEY, TrainingStats, stats_from_metadata
from fedct.common.weights import Weights, load_weights

if TYPE_CHECKING:
    from torchvision.models import ResNet

CONFIG_KEY = "fedct-config"
# where the run wrote and read on the server: not needed to use the model, and not shared
_LOCAL_KEYS = ("output-dir", "data-root")


def save_model(
    path: Path,
    weights: Weights,
    fed: FederationConfig | None = None,
    *,
    stats: TrainingStats | None = None,
) -> None:
    """Write ``weights`` with the settings of ``fed`` and the training statistics ``stats``."""
    contiguous = {k: np.ascontiguousarray(v) for k, v in weights.items()}
    metadata: dict[str, str] = {}
    if fed is not None:
        settings = {k: v for k, v in fed.to_mapping().items() if k not in _LOCAL_KEYS}
        metadata[CONFIG_KEY] = json.dumps(settings)
    if stats is not None:
        metadata[STATS_KEY] = stats.to_json()
    atomic_write(
        path, lambda tmp: save_file(contiguous, str(tmp), metadata=metadata or None), mode=0o644
    )


def read_training_stats(path: Path) -> TrainingStats | None:
    """What the model in ``path`` was trained on, or ``None`` for a file written before FedCT
    recorded it (it still loads; the caller says what cannot be checked, see NO_STATS_NOTE)."""
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata: dict[str, str] = handle.metadata() or {}
    except (OSError, SafetensorError) as err:
        raise ConfigError(f"{path} is not a readable safetensors model file: {err}") from err
    try:
        stats = stats_from_metadata(metadata)
    except (ValueError, TypeError) as err:
        raise ConfigError(
            f"{path}: its training statistics ({STATS_KEY}) are unreadable ({err}); the file "
            "was changed after FedCT wrote it, use the original"
        ) from err
    return stats


def read_model(path: Path) -> tuple[Weights, FederationConfig]:
    """The weights and settings of a model file FedCT wrote (final model or checkpoint)."""
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata: dict[str, Any] = handle.metadata() or {}
            weights = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    except (OSError, SafetensorError) as err:
        raise ConfigError(f"{path} is not a readable safetensors model file: {err}") from err
    if CONFIG_KEY not in metadata:
        raise ConfigError(
            f"{path} has no FedCT settings; use final_model.safetensors or a round-NNNN "
            "checkpoint written by a FedCT server"
        )
    fed = FederationConfig.from_mapping(json.loads(metadata[CONFIG_KEY]))
    return weights, fed


def load_model(path: Path) -> tuple[ResNet, FederationConfig]:
    """The model in a FedCT model file, built from its own settings, in eval mode."""
    weights, fed = read_model(path)
    model = build_model(replace(fed.model_config, pretrained=None))
    # a folded model written before folded models had a per-channel affine: the identity
    state = model.state_dict()
    identity = {k: state[k].numpy() for k in channel_affine_keys(model) - weights.keys()}
    load_weights(model, {**identity, **weights})
    return model.eval(), fed
