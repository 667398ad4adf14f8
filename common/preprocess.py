"""From a HU frame of any matrix and pixel spacing to the model's square grid, and from HU to
windowed network input.

Two stages, split where the cache sits: :func:`to_model_grid` (geometry; its output is cached per
site) and :func:`apply_windows` (intensity; cheap, applied on every load so window jitter can be
a real augmentation).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import cv2
import numpy as np

from fedct.common.dicom_io import HU_AIR
from fedct.common.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where windows are applied: cache-building workers skip it
    import torch

# Bump when to_model_grid's output changes for the same inputs: it invalidates every site cache.
GRID_VERSION = 2


@dataclass(frozen=True)
class Window:
    """A CT display window: HU in [center - width/2, center + width/2] maps to [0, 1]."""

    center: float
    width: float

    def __post_init__(self) -> None:
        if self.width <= 0:
            raise ConfigError(f"window width must be positive, got {self.width}")


WINDOW_PRESETS: dict[str, Window] = {
    "lung": Window(-600.0, 1500.0),
    "mediastinum": Window(40.0, 400.0),
    "bone": Window(400.0, 1800.0),
}


def parse_windows(spec: str | Sequence[str]) -> tuple[Window, ...]:
    """Windows from names and/or ``center/width`` pairs, e.g. ``"lung,mediastinum,bone"`` or
    ``"lung,-160/240"``."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not items:
        raise ConfigError("no CT window given; use e.g. 'lung' or 'lung,mediastinum,bone'")
    windows = []
    for item in items:
        if item in WINDOW_PRESETS:
            windows.append(WINDOW_PRESETS[item])
            continue
        try:
            center, width = (float(v) for v in item.split("/"))
        except ValueError:
            raise ConfigError(
                f"unknown CT window {item!r}: use one of {sorted(WINDOW_PRESETS)} "
                "or CENTER/WIDTH in HU, e.g. -600/1500"
            ) from None
        windows.append(Window(center, width))
    return tuple(windows)


CROPS = ("none", "body")
# Tissue denser than this is body (fat is about -100 HU, lung -900 to -500, air -1000).
BODY_HU = -400.0
BODY_MARGIN = 0.04  # of the body's larger side, kept around it
MIN_BODY_SHARE = 0.4  # a body spans at least this share of the reconstructed field of view


@dataclass(frozen=True)
class GridConfig:
    """How frames are put on the model's square grid (the cached part of preprocessing).

    ``target_spacing_mm`` resamples every scan to that pixel size (then crops/pads to the grid),
    so a nodule has the same size in pixels at every hospital; ``None`` fits the whole field of
    view into the grid, keeping the aspect ratio.
    """

    image_size: int = 64
    target_spacing_mm: float | None = None
    crop: str = "none"  # none | body: cut the frame to the patient's body before resampling

    def __post_init__(self) -> None:
        if self.crop not in CROPS:
            raise ConfigError(f"crop must be one of {', '.join(CROPS)}; got {self.crop!r}")
        if not 16 <= self.image_size <= 1024:
            raise ConfigError(f"image size must be between 16 and 1024 px, got {self.image_size}")
        if self.target_spacing_mm is not None and not 0.05 <= self.target_spacing_mm <= 20:
            raise ConfigError(
                f"target pixel spacing must be between 0.05 and 20 mm, got {self.target_spacing_mm}"
            )

    def key(self) -> str:
        """A short stable key naming the cache of frames preprocessed with these settings."""
        payload = json.dumps({"v": GRID_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.blake2b(payload.encode(), digest_size=8).hexdigest()


@dataclass(frozen=True)
class PreprocessConfig:
    grid: GridConfig = field(default_factory=GridConfig)
    windows: tuple[Window, ...] = (
        WINDOW_PRESETS["lung"],
        WINDOW_PRESETS["mediastinum"],
        WINDOW_PRESETS["bone"],
    )

    @property
    def channels(self) -> int:
        return len(self.windows)


Box = tuple[int, int, int, int]  # top, left, height, width in source pixels


def body_box(hu: np.ndarray, pixel_spacing: tuple[float, float] | None) -> Box | None:
    """The square (in mm) box around the patient's body in a HU frame, with a small margin; it
    may reach beyond the frame (that part is air). ``None`` when no body is found.

    The body is the largest connected region denser than ``BODY_HU`` after an opening that
    cuts thin structures (the table, cables, the gantry's edge) off it. Chest CT reconstructs
    a field of view larger than the patient, and scanners differ in how much larger: cropping
    makes a nodule the same size on the grid at every hospital, and larger on it.
    """
    size = max(3, round(min(hu.shape) / 100) | 1)  # ~1% of the frame: 5 px at 512
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
    dense = cv2.morphologyEx((hu > BODY_HU).astype(np.uint8), cv2.MORPH_OPEN, kernel)
    count, _, stats, _ = cv2.connectedComponentsWithStats(dense, connectivity=8)
    if count < 2:
        return None
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    left, top, width, height, _ = (int(v) for v in stats[largest])
    row_mm, col_mm = pixel_spacing if pixel_spacing else (1.0, 1.0)
    side_mm = max(height * row_mm, width * col_mm) * (1 + 2 * BODY_MARGIN)
    if side_mm < MIN_BODY_SHARE * max(hu.shape[0] * row_mm, hu.shape[1] * col_mm):
        return None  # a fragment (the body's ring broke), not a body: keep the whole frame
    rows, cols = round(side_mm / row_mm), round(side_mm / col_mm)
    return (top + height // 2 - rows // 2, left + width // 2 - cols // 2, rows, cols)


def crop_to_box(image: np.ndarray, box: Box, fill: float) -> np.ndarray:
    """``image[top:top+height, left:left+width]``, filled with ``fill`` outside the frame."""
    top, left, height, width = box
    out = np.full((height, width), fill, dtype=np.float32)
    r0, c0 = max(top, 0), max(left, 0)
    r1, c1 = min(top + height, image.shape[0]), min(left + width, image.shape[1])
    if r1 > r0 and c1 > c0:
        out[r0 - top : r1 - top, c0 - left : c1 - left] = image[r0:r1, c0:c1]
    return out


def to_model_grid(
    hu: np.ndarray,
    pixel_spacing: tuple[float, float] | None,
    grid: GridConfig,
    *,
    fill: float = HU_AIR,
    interpolation: int = cv2.INTER_AREA,
    box: Box | None = None,
) -> np.ndarray:
    """Resample a 2-D HU frame onto the ``image_size`` square grid; returns float32.

    With ``grid.crop == "body"`` the frame is first cut to ``box`` (its :func:`body_box` when
    not given; a mask passes its image's box so it is cut the same way).

    Physical aspect ratio is kept (non-square pixels included); the border is ``fill`` (air).
    Masks go through the same function with ``fill=0`` and nearest-neighbour interpolation.
    """
    if grid.crop == "body":
        box = box or body_box(hu, pixel_spacing)
        if box is not None:
            hu = crop_to_box(hu, box, fill)
    rows, cols = hu.shape
    row_mm, col_mm = pixel_spacing if pixel_spacing else (1.0, 1.0)
    size = grid.image_size
    if grid.target_spacing_mm is not None and pixel_spacing:
        px_per_mm = 1.0 / grid.target_spacing_mm
    else:  # fit the whole field of view
        px_per_mm = size / max(rows * row_mm, cols * col_mm)
    out_rows = max(1, round(rows * row_mm * px_per_mm))
    out_cols = max(1, round(cols * col_mm * px_per_mm))
    if (out_rows, out_cols) != (rows, cols):
        # cv2's INTER_AREA is the standard anti-aliased downsampler and much faster than
        # torch's antialiased interpolate on the CPU (docs/benchmarks.md, Ingestion);
        # upsampling uses bilinear.
        image = hu.astype(np.float32, copy=False)
        method = interpolation
        if interpolation == cv2.INTER_AREA and (out_rows > rows or out_cols > cols):
            method = cv2.INTER_LINEAR
        elif interpolation == cv2.INTER_AREA:
            image = _integer_area_reduce(image, out_rows, out_cols)
        resized = cv2.resize(image, (out_cols, out_rows), interpolation=method)
    else:
        resized = hu.astype(np.float32, copy=False)
    return _center_on_grid(resized, size, fill)


def _integer_area_reduce(image: np.ndarray, out_rows: int, out_cols: int) -> np.ndarray:
    """Shrink ``image`` by the largest power-of-two factor that divides its size and stays at or
    above ``(out_rows, out_cols)``, by block averaging.

    cv2's INTER_AREA averages whole blocks much faster than it resamples by a fractional factor
    (measured in docs/benchmarks.md, Ingestion), so the fractional remainder is left to a second
    INTER_AREA on the smaller image. Both stages are box filters, so the result stays
    anti-aliased. Even blocks cancel the finest (one-pixel) pattern exactly; an odd block
    would leave a ripple of 1/factor of it, more than one fractional pass leaves.
    """
    rows, cols = image.shape
    factor = 1
    while rows // (factor * 2) >= out_rows and cols // (factor * 2) >= out_cols:
        if rows % (factor * 2) or cols % (factor * 2):
            break
        factor *= 2
    if factor < 2:
        return image
    return cv2.resize(image, (cols // factor, rows // factor), interpolation=cv2.INTER_AREA)


def _center_on_grid(image: np.ndarray, size: int, fill: float) -> np.ndarray:
    out = np.full((size, size), fill, dtype=np.float32)
    rows, cols = image.shape
    src_r, dst_r = _overlap(rows, size)
    src_c, dst_c = _overlap(cols, size)
    out[dst_r, dst_c] = image[src_r, src_c]
    return out


def _overlap(n: int, size: int) -> tuple[slice, slice]:
    """Centered source/destination slices for placing length ``n`` into length ``size``."""
    if n >= size:
        start = (n - size) // 2
        return slice(start, start + size), slice(0, size)
    start = (size - n) // 2
    return slice(0, n), slice(start, start + n)


def apply_windows(hu: torch.Tensor, windows: Sequence[Window]) -> torch.Tensor:
    """Map HU (``(..., 1, H, W)`` or ``(..., H, W)``) to one [0, 1] channel per window."""
    import torch

    if hu.dim() >= 3 and hu.shape[-3] == 1:
        hu = hu.squeeze(-3)
    lows = torch.tensor([w.center - w.width / 2 for w in windows], dtype=torch.float32)
    widths = torch.tensor([w.width for w in windows], dtype=torch.float32)
    shape = (-1, 1, 1)
    x = (hu.float().unsqueeze(-3) - lows.view(shape)) / widths.view(shape)
    return x.clamp_(0.0, 1.0)


# ImageNet statistics, so windowed CT meets a pretrained ResNet's first layer on the scale it
# was trained for; one-channel input uses their mean.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalization(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    mean, std = sum(IMAGENET_MEAN) / 3, sum(IMAGENET_STD) / 3
    return (mean,) * channels, (std,) * channels
