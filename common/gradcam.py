"""Grad-CAM explanations of the global model and how well they localise lesions.

Built on the ``grad-cam`` package (pytorch-grad-cam): Grad-CAM or Grad-CAM++ on the last
residual stage, always used as a context manager so its hooks are released. Localisation is
scored where lesion masks exist (pointing game: is the CAM maximum inside the lesion; energy:
the share of CAM mass inside it); without masks, faithfulness is the library's confidence drop
when the highlighted region is kept versus the image (``DropInConfidence``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
from pytorch_grad_cam.metrics.cam_mult_image import DropInConfidence
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from common.errors import ConfigError
from common.models import last_conv_stage

METHODS = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus}


def cam_maps(
    model: nn.Module, images: torch.Tensor, *, target_class: int, method: str = "gradcam"
) -> np.ndarray:
    """``(N, H, W)`` class-activation maps in [0, 1] for ``target_class``."""
    if method not in METHODS:
        raise ConfigError(f"unknown CAM method {method!r}; choose one of {sorted(METHODS)}")
    was_training = model.training
    # A frozen backbone (freeze = "head") builds no graph up to the target layer unless the
    # input itself asks for gradients; without one the library finds no gradient to weight.
    images = images.detach().clone().requires_grad_(True)
    try:
        with METHODS[method](model=model, target_layers=[last_conv_stage(model)]) as cam:
            maps = cam(
                input_tensor=images, targets=[ClassifierOutputTarget(target_class)] * len(images)
            )
    finally:
        model.train(was_training)
    return np.asarray(maps, dtype=np.float32)


def pointing_hit(cam: np.ndarray, mask: np.ndarray) -> bool:
    """Whether the CAM's maximum falls inside the lesion mask.

    The library upsamples the last stage's few cells (3x3 at 96 px) bilinearly, clamping at
    the border: a winning border cell becomes a flat maximum from the image edge to the cell's
    centre, and ``argmax`` would return its first pixel, the image corner. The point taken is
    the maximum's innermost pixel (farthest from the border), which is the winning cell's
    centre. An all-zero CAM (no evidence for the class anywhere) points nowhere: a miss.
    """
    if not mask.any():
        raise ValueError("the lesion mask is empty")
    peak = float(cam.max())
    if peak <= 0:
        return False
    rows, cols = np.nonzero(cam >= peak * (1 - 1e-3))
    height, width = cam.shape
    inner = np.minimum(np.minimum(rows, height - 1 - rows), np.minimum(cols, width - 1 - cols))
    best = int(np.argmax(inner))
    return bool(mask[rows[best], cols[best]])


def energy_inside(cam: np.ndarray, mask: np.ndarray) -> float:
    """The share of the CAM's mass inside the lesion mask (0 when the CAM is all zero)."""
    total = float(cam.sum())
    return float(cam[mask].sum()) / total if total > 0 else 0.0


@dataclass(frozen=True)
class Localization:
    slices: int  # true-positive slices with a mask that were scored
    pointing_hit_rate: float
    mean_energy_inside: float


def localization(cams: np.ndarray, masks: np.ndarray) -> Localization:
    """Pointing-game hit rate and mean energy inside the mask over slices with a lesion."""
    scored = [(c, m) for c, m in zip(cams, masks, strict=True) if m.any()]
    if not scored:
        return Localization(0, float("nan"), float("nan"))
    hits = [pointing_hit(c, m) for c, m in scored]
    energy = [energy_inside(c, m) for c, m in scored]
    return Localization(len(scored), float(np.mean(hits)), float(np.mean(energy)))


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
