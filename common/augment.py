"""Train and evaluation transforms on HU tensors (torchvision.transforms.v2 plus CT-specific
ones). Geometry and noise act in HU, before windowing, so padding is air and noise has scanner
units; the window itself is jittered, as radiologists' and scanners' windows differ.

Input: ``(1, S, S)`` float32 HU (one cached frame). Output: ``(C, S, S)`` normalized, one
channel per window. A lesion mask passed beside the frame as a ``tv_tensors.Mask`` takes the same
flips and affine moves (nearest-neighbour, filled with 0) and no CT-specific step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from fedct.common.dicom_io import HU_AIR
from fedct.common.errors import ConfigError
from fedct.common.preprocess import Window, apply_windows, normalization

Transform = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class AugmentConfig:
    rotation_deg: float = 10.0
    translate: float = 0.06  # fraction of the image size
    scale: tuple[float, float] = (0.9, 1.1)
    hflip: float = 0.5  # probability
    noise_hu: float = 12.0  # largest extra noise standard deviation, in HU
    window_jitter: float = 0.08  # window center shift and width change, as a fraction of width

    def __post_init__(self) -> None:
        if not 0 <= self.hflip <= 1:
            raise ConfigError(f"flip probability must be in [0, 1], got {self.hflip}")
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ConfigError(f"scale range must be 0 < low <= high, got {self.scale}")
        if self.noise_hu < 0 or self.window_jitter < 0 or self.translate < 0:
            raise ConfigError("noise, window jitter and translation must not be negative")


class Windowing(v2.Transform):
    """HU to one [0, 1] channel per window; with ``jitter`` > 0 each call moves every window's
    center by up to ``jitter * width`` and scales its width by up to ``1 +/- jitter``."""

    def __init__(self, windows: Sequence[Window], jitter: float = 0.0) -> None:
        super().__init__()
        self.windows = tuple(windows)
        self.jitter = jitter

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        if self.jitter <= 0:
            return {"windows": self.windows}
        u = torch.rand(len(self.windows), 2) * 2 - 1
        return {
            "windows": tuple(
                Window(
                    w.center + float(a) * self.jitter * w.width,
                    w.width * (1 + float(b) * self.jitter),
                )
                for w, (a, b) in zip(self.windows, u.tolist(), strict=True)
            )
        }

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):
            return inpt
        return apply_windows(inpt, params["windows"])


class HUNoise(v2.Transform):
    """Add Gaussian noise with a random standard deviation in [0, ``max_hu``] Hounsfield units
    (a quieter or noisier scanner)."""

    def __init__(self, max_hu: float) -> None:
        super().__init__()
        self.max_hu = max_hu

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"sigma": float(torch.rand(())) * self.max_hu}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if params["sigma"] == 0 or isinstance(inpt, tv_tensors.Mask):
            return inpt
        return inpt + torch.randn_like(inpt) * params["sigma"]


# Named augmentation strengths (the ``augmentation`` setting). "full" is the general-purpose
# default; "flips" keeps every pixel as scanned (interpolation in rotations and rescaling blurs
# a 1-2 px nodule on a small grid, and added noise can hide it); public pretraining uses it.
_FLIPS_ONLY = AugmentConfig(
    rotation_deg=0.0, translate=0.0, scale=(1.0, 1.0), noise_hu=0.0, window_jitter=0.0
)
AUGMENTATIONS: dict[str, AugmentConfig] = {
    "full": AugmentConfig(),
    "flips": _FLIPS_ONLY,
    "none": replace(_FLIPS_ONLY, hflip=0.0),
}


def train_transform(windows: Sequence[Window], cfg: AugmentConfig | None = None) -> Transform:
    cfg = cfg or AugmentConfig()
    mean, std = normalization(len(windows))
    steps: list[Any] = []
    if cfg.rotation_deg or cfg.translate or cfg.scale != (1.0, 1.0):
        steps.append(
            v2.RandomAffine(
                degrees=cfg.rotation_deg,
                translate=(cfg.translate, cfg.translate),
                scale=cfg.scale,
                interpolation=v2.InterpolationMode.BILINEAR,
                fill={tv_tensors.Mask: 0, "others": HU_AIR},
            )
        )
    if cfg.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(cfg.hflip))
    if cfg.noise_hu > 0:
        steps.append(HUNoise(cfg.noise_hu))
    steps += [Windowing(windows, cfg.window_jitter), v2.Normalize(mean, std)]
    return v2.Compose(steps)


def eval_transform(windows: Sequence[Window]) -> Transform:
    """Deterministic: windowing and normalization only."""
    mean, std = normalization(len(windows))
    return v2.Compose([Windowing(windows), v2.Normalize(mean, std)])
