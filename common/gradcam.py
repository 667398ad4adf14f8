"""Grad-CAM explanations of the global model and how well they localise lesions.

Built on the ``grad-cam`` package (pytorch-grad-cam): Grad-CAM or Grad-CAM++ on a residual stage,
always used as a context manager so its hooks are released. Localisation is scored where lesion
masks exist (pointing game: is the CAM maximum on the lesion, within the usual tolerance, and
strictly inside it; energy: the share of CAM mass inside it); without masks, faithfulness is the
library's confidence drop when the highlighted region is kept versus the image
(``DropInConfidence``).

Which stage: the library upsamples a stage's map bilinearly, so a CAM's maximum always sits on
the centre of one of the map's cells. The last stage of a ResNet has 32-pixel cells: 3x3 of them
on a 96 px slice, whose centres are 32 px apart, so the maximum can land on a 4-30 mm nodule
only by chance. ``auto`` takes the deepest stage whose map has at least ``MIN_CAM_CELLS`` cells
across (the last stage from 256 px, ``layer3`` from 128 px, ``layer2`` below): cells no wider than
twice the pointing tolerance, so every point of the image is within reach of a cell centre.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
from pytorch_grad_cam.metrics.cam_mult_image import DropInConfidence
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from fedct.common.errors import ConfigError
from fedct.common.models import RESNET_STAGES, resnet_stage, stage_shapes

METHODS = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus}

# The pointing game's usual tolerance: 15 px on 224 px images (Zhang et al., "Top-down neural
# attention by excitation backprop", IJCV 2018; TorchRay's benchmark), as a share of the side.
POINTING_TOLERANCE = 15 / 224
MIN_CAM_CELLS = 8  # 1 / (2 x POINTING_TOLERANCE) = 7.5, rounded up


def cam_stage_name(model: nn.Module, image_size: int, layer: str = "auto") -> str:
    """``layer``, or for ``auto`` the deepest stage with >= ``MIN_CAM_CELLS`` cells across."""
    if layer != "auto":
        resnet_stage(model, layer)  # validates the name
        return layer
    shapes = stage_shapes(model, image_size)
    fine_enough = [name for name in RESNET_STAGES if shapes[name][-1] >= MIN_CAM_CELLS]
    return fine_enough[-1] if fine_enough else RESNET_STAGES[0]


def cam_maps(
    model: nn.Module,
    images: torch.Tensor,
    *,
    target_class: int,
    method: str = "gradcam",
    layer: str = "auto",
) -> np.ndarray:
    """``(N, H, W)`` class-activation maps in [0, 1] for ``target_class`` on stage ``layer``."""
    if method not in METHODS:
        raise ConfigError(f"unknown CAM method {method!r}; choose one of {sorted(METHODS)}")
    stage = resnet_stage(model, cam_stage_name(model, int(images.shape[-1]), layer))
    was_training = model.training
    # A frozen backbone (freeze = "head") builds no graph up to the target layer unless the
    # input itself asks for gradients; without one the library finds no gradient to weight.
    images = images.detach().clone().requires_grad_(True)
    try:
        with METHODS[method](model=model, target_layers=[stage]) as cam:
            maps = cam(
                input_tensor=images, targets=[ClassifierOutputTarget(target_class)] * len(images)
            )
    finally:
        model.train(was_training)
    return np.asarray(maps, dtype=np.float32)


def cam_peak(cam: np.ndarray) -> tuple[int, int] | None:
    """The (row, column) a CAM points at, or None for an all-zero CAM (no evidence anywhere).

    The library upsamples the stage's few cells bilinearly, clamping at the border: a winning
    border cell becomes a flat maximum from the image edge to the cell's centre, and ``argmax``
    would return its first pixel, the image corner. The point taken is the maximum's innermost
    pixel (farthest from the border), which is the winning cell's centre.
    """
    peak = float(cam.max())
    if peak <= 0:
        return None
    rows, cols = np.nonzero(cam >= peak * (1 - 1e-3))
    height, width = cam.shape
    inner = np.minimum(np.minimum(rows, height - 1 - rows), np.minimum(cols, width - 1 - cols))
    best = int(np.argmax(inner))
    return int(rows[best]), int(cols[best])


def pointing_hit(cam: np.ndarray, mask: np.ndarray, tolerance: float = 0.0) -> bool:
    """Whether the CAM's peak is within ``tolerance`` pixels of the lesion mask (0: inside it).

    An all-zero CAM points nowhere: a miss.
    """
    if not mask.any():
        raise ValueError("the lesion mask is empty")
    point = cam_peak(cam)
    if point is None:
        return False
    rows, cols = np.nonzero(mask)
    nearest_sq = np.min((rows - point[0]) ** 2 + (cols - point[1]) ** 2)
    return bool(nearest_sq <= tolerance**2)


def energy_inside(cam: np.ndarray, mask: np.ndarray) -> float:
    """The share of the CAM's mass inside the lesion mask (0 when the CAM is all zero)."""
    total = float(cam.sum())
    return float(cam[mask].sum()) / total if total > 0 else 0.0


@dataclass(frozen=True)
class Localization:
    slices: int  # true-positive slices with a mask that were scored
    pointing_hit_rate: float  # peak within POINTING_TOLERANCE of the image side of the lesion
    strict_hit_rate: float  # peak inside the lesion
    mean_energy_inside: float


def localization(cams: np.ndarray, masks: np.ndarray) -> Localization:
    """Pointing-game hit rates and mean energy inside the mask over slices with a lesion."""
    scored = [(c, m) for c, m in zip(cams, masks, strict=True) if m.any()]
    if not scored:
        return Localization(0, float("nan"), float("nan"), float("nan"))
    tolerance = POINTING_TOLERANCE * max(cams.shape[-2:])
    hits = [pointing_hit(c, m, tolerance) for c, m in scored]
    strict = [pointing_hit(c, m) for c, m in scored]
    energy = [energy_inside(c, m) for c, m in scored]
    return Localization(
        len(scored), float(np.mean(hits)), float(np.mean(strict)), float(np.mean(energy))
    )


def confidence_drop(
    model: nn.Module, images: torch.Tensor, cams: np.ndarray, *, target_class: int
) -> float:
    """Mean drop in the target's probability when only the CAM-weighted image is shown (lower
    is more faithful: the highlighted region carries the decision)."""
    metric = DropInConfidence()
    targets = [ClassifierOutputTarget(target_class)] * len(images)
    with torch.no_grad():
        scores = metric(images, cams, targets, model)
    return float(np.mean(scores))
