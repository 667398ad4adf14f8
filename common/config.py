"""FedCT's settings, parsed once into frozen, validated dataclasses.

``FederationConfig`` holds the federation-wide settings and is their one source of defaults
(kebab-case keys; the Flower app's config table is written from it, common/app_bundle.py),
overridable per run (``--run-config`` or ``fedct simulate --set key=value``). ``SiteConfig``
holds what only a hospital decides (its data folder, state folder and privacy budget); it
arrives as the SuperNode's node config and never from the server.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pydantic

from fedct.common.augment import AUGMENTATIONS, AugmentConfig
from fedct.common.devices import check_device
from fedct.common.errors import ConfigError
from fedct.common.models import CAM_LAYERS, NORMS, ModelConfig
from fedct.common.preprocess import GridConfig, PreprocessConfig, parse_windows
from fedct.common.version import FEDCT_VERSION

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg", "krum")
TRANSFER_DTYPES = ("float32", "float16")
DP_CLIPPING = ("bookkeeping", "hooks")  # client/bookkeeping.py | Opacus' per-sample gradients
LR_SCHEDULES = ("constant", "cosine")  # the learning rate over the federated rounds
OPTIMIZERS = ("adamw", "sgd")  # the sites' local optimizer (under DP: DP-AdamW or DP-SGD)


@dataclass(frozen=True)
class FederationConfig:
    num_server_rounds: int = 3
    local_epochs: int = 1
    optimizer: str = "adamw"  # adamw | sgd (momentum)
    learning_rate: float = 0.001
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"  # constant | cosine (over the planned rounds)
    batch_size: int = 32
    physical_batch_size: int = 32
    max_grad_norm: float = 1.0
    dp_clipping: str = "bookkeeping"  # bookkeeping | hooks (client/bookkeeping.py)
    model: str = "resnet18"
    width: int = 64  # channels of the ResNet's first stage (torchvision: 64)
    weight_standardization: bool = True  # norm = group: standardize every convolution's filters
    stem: str = "imagenet"  # imagenet | compact (no max-pool after the first convolution)
    pool: str = "avg"  # avg | max: the global pool before the classifier
    image_size: int = 96
    target_spacing_mm: float = 0.0  # 0: fit the whole field of view
    crop: str = "body"  # none | body: cut each frame to the patient's body before resampling
    windows: str = "lung,mediastinum,bone"
    classes: str = "normal,nodule"
    freeze: str = "none"
    augmentation: str = "flips"  # full | flips | none (common/augment.py)
    pretrained: str = ""  # server-side path to a torchvision state dict for the first model
    norm: str = "auto"  # auto: folded with pretrained weights, else group
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    server_learning_rate: float = 0.01  # FedAdam
    trimmed_fraction: float = 0.2  # FedTrimmedAvg
    min_sites: int = 2
    fraction_train: float = 1.0
    round_timeout: float = 3600.0
    # the model sent to train (evaluation is always float32) and the sites' updates (trained less
    # received weights) sent back; the server keeps its model in float32 and adds the updates
    transfer_dtype: str = "float16"
    update_dtype: str = "float16"
    # sites keep the model they evaluated (client/model_cache.py) and the server names it by its
    # digest instead of sending it again to train from (then float32, whatever transfer-dtype)
    model_cache: bool = True
    max_update_norm: float = 1.0e4
    min_eval_cases: int = 10
    min_eval_patients: int = 5  # sites holding out fewer send no series- or patient-level scores
    histogram_bins: int = 100
    cam_layer: str = "auto"  # Grad-CAM's stage: auto (by image size) | layer1..layer4
    planned_rounds: int = 0  # privacy calibration horizon; 0: num-server-rounds
    dp: bool = True
    epsilon: float = 8.0  # default per-site budget when a site does not set its own
    delta: float = 0.0  # 0: below 1/N for the site's N training patients
    accountant: str = "rdp"
    val_fraction: float = 0.2
    seed: int = 0
    output_dir: str = "fedct-output"
    resume: bool = True
    data_root: str = ""  # simulation only: one sub-folder per hospital
    device: str = "auto"  # auto | cpu | cuda | cuda:N (common/devices.py); auto: a GPU if present
    fedct_version: str = FEDCT_VERSION  # of the server that made the run; hospitals must match

    def __post_init__(self) -> None:
        positive = (
            "num_server_rounds",
            "local_epochs",
            "batch_size",
            "physical_batch_size",
            "min_sites",
            "histogram_bins",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{_key(name)} must be at least 1, got {getattr(self, name)}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(
                f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}"
            )
        if self.transfer_dtype not in TRANSFER_DTYPES:
            raise ConfigError(f"transfer-dtype must be one of {', '.join(TRANSFER_DTYPES)}")
        if self.update_dtype not in TRANSFER_DTYPES:
            raise ConfigError(f"update-dtype must be one of {', '.join(TRANSFER_DTYPES)}")
        if not 0 < self.fraction_train <= 1:
            raise ConfigError(f"fraction-train must be in (0, 1], got {self.fraction_train}")
        if len(self.class_names) < 2 or len(set(self.class_names)) != len(self.class_names):
            raise ConfigError(f"classes must name at least two distinct classes: {self.classes!r}")
        if self.dp and not self.epsilon > 0:
            raise ConfigError("epsilon must be positive (or set dp = false)")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}"
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(
                f"lr-schedule must be one of {', '.join(LR_SCHEDULES)}; got {self.lr_schedule!r}"
            )
        if self.weight_decay < 0:
            raise ConfigError(f"weight-decay must not be negative, got {self.weight_decay}")
        if self.dp_clipping not in DP_CLIPPING:
            raise ConfigError(
                f"dp-clipping must be one of {', '.join(DP_CLIPPING)}; got {self.dp_clipping!r}"
            )
        if self.augmentation not in AUGMENTATIONS:
            raise ConfigError(
                f"augmentation must be one of {', '.join(AUGMENTATIONS)}; got {self.augmentation!r}"
            )
        if self.cam_layer not in CAM_LAYERS:
            raise ConfigError(
                f"cam-layer must be one of {', '.join(CAM_LAYERS)}; got {self.cam_layer!r}"
            )
        if self.norm not in ("auto", *NORMS):
            raise ConfigError(f"norm must be one of auto, {', '.join(NORMS)}; got {self.norm!r}")
        if self.resolved_norm == "folded" and not self.pretrained:
            raise ConfigError(
                'norm = "folded" needs pretrained BatchNorm weights (set pretrained = PATH, '
                'e.g. from `fedct pretrain`), or use norm = "group" to train from scratch'
            )
        check_device(self.device)
        self.model_config  # noqa: B018 - validates the model, freeze policy, windows, grid

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(c.strip() for c in self.classes.split(",") if c.strip())

    @property
    def preprocess(self) -> PreprocessConfig:
        spacing = self.target_spacing_mm if self.target_spacing_mm > 0 else None
        return PreprocessConfig(
            GridConfig(self.image_size, spacing, self.crop), parse_windows(self.windows)
        )

    @property
    def augment(self) -> AugmentConfig:
        return AUGMENTATIONS[self.augmentation]

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig(
            architecture=self.model,
            num_classes=len(self.class_names),
            in_channels=self.preprocess.channels,
            pretrained=Path(self.pretrained) if self.pretrained else None,
            freeze=self.freeze,
            norm=self.resolved_norm,
            width=self.width,
            weight_standardization=self.weight_standardization,
            stem=self.stem,
            pool=self.pool,
        )

    @property
    def resolved_norm(self) -> str:
        """The model's normalisation: ``auto`` folds pretrained BatchNorm, else GroupNorm."""
        if self.norm == "auto":
            return "folded" if self.pretrained else "group"
        return self.norm

    def round_learning_rate(self, server_round: int) -> float:
        """The sites' learning rate in ``server_round`` (1-based): constant, or a half cosine
        from ``learning-rate`` in round 1 over the planned rounds (every round keeps a step of
        at least 5% of it; a resumed or extended run keeps that floor)."""
        if self.lr_schedule == "constant":
            return self.learning_rate
        progress = min(max(server_round - 1, 0) / max(self.privacy_horizon, 1), 1.0)
        return self.learning_rate * max(0.5 * (1 + math.cos(math.pi * progress)), 0.05)

    @property
    def privacy_horizon(self) -> int:
        return self.planned_rounds or self.num_server_rounds

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> FederationConfig:
        """From kebab-case run-config keys; unknown keys are an error naming the known ones."""
        return _from_mapping(cls, values, "run config")

    def to_mapping(self) -> dict[str, Any]:
        return {_key(k): v for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class SiteConfig:
    """A hospital's own settings (the SuperNode's node config)."""

    site_name: str
    data_dir: str
    state_dir: str
    epsilon: float = 8.0  # this site's privacy budget over the whole federation
    delta: float = 0.0  # 0: below 1/N for the site's N training patients
    dp: bool = True

    def __post_init__(self) -> None:
        if not self.site_name or not self.data_dir or not self.state_dir:
            raise ConfigError("a site needs site-name, data-dir and state-dir in its node config")
        if self.dp and not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise ConfigError(f"site epsilon must be a positive number, got {self.epsilon}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> SiteConfig:
        return _from_mapping(cls, values, "node config")


def app_defaults() -> dict[str, Any]:
    """FedCT's default run config (kebab-case keys): the one source of defaults is
    :class:`FederationConfig`; the Flower app's config table is written from it."""
    return FederationConfig().to_mapping()


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``key=value`` strings (TOML values; bare words are strings) into a mapping."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"expected KEY=VALUE, got {item!r}")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        out[key.strip()] = value
    return out


def _key(name: str) -> str:
    return name.replace("_", "-")


def _from_mapping(cls: Any, values: Mapping[str, Any], what: str) -> Any:
    known = {_key(f.name): f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown {what} key(s) {unknown}; known keys: {sorted(known)}")
    missing = sorted(
        _key(f.name)
        for f in fields(cls)
        if f.default is dataclasses.MISSING and _key(f.name) not in values
    )
    if missing:
        raise ConfigError(f"{what} lacks required key(s) {missing}")
    types = typing.get_type_hints(cls)
    kwargs = {
        known[key].name: _coerce(key, value, types[known[key].name])
        for key, value in values.items()
    }
    return cls(**kwargs)


@functools.cache
def _adapter(kind: type) -> pydantic.TypeAdapter[Any]:
    # pydantic's lax mode: "3" -> 3, "false"/"no"/"0" -> False, 3.0 -> 3 (not 3.5), numbers -> str
    return pydantic.TypeAdapter(kind, config=pydantic.ConfigDict(coerce_numbers_to_str=True))


def _coerce(key: str, value: Any, kind: type) -> Any:
    """``value`` as the field's type (settings arrive as TOML values or command-line strings)."""
    try:
        return _adapter(kind).validate_python(value)
    except pydantic.ValidationError as err:
        reason = err.errors()[0]["msg"]
        raise ConfigError(f"{key} = {value!r} is not a valid {kind.__name__} ({reason})") from None
