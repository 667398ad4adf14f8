"""How FedCT draws a CT slice and its Grad-CAM for people: lung window in grey, the CAM in a
jet colour map on top, the lesion outline in green where a mask is known (report and explain)."""

from __future__ import annotations

import numpy as np
from matplotlib.axes import Axes

from fedct.common.preprocess import WINDOW_PRESETS


def lung_view(hu: np.ndarray) -> np.ndarray:
    """HU in the lung window, scaled to [0, 1] for display."""
    window = WINDOW_PRESETS["lung"]
    low = window.center - window.width / 2
    return np.clip((hu.astype(np.float32) - low) / window.width, 0.0, 1.0)


def draw_slice(
    ct_ax: Axes, cam_ax: Axes, hu: np.ndarray, cam: np.ndarray, mask: np.ndarray | None
) -> None:
    """The slice on ``ct_ax`` and the slice with its CAM on ``cam_ax``."""
    view = lung_view(hu)
    ct_ax.imshow(view, cmap="gray")
    cam_ax.imshow(view, cmap="gray")
    cam_ax.imshow(cam, cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
    if mask is not None and mask.any():
        for ax in (ct_ax, cam_ax):
            ax.contour(mask, levels=[0.5], colors="lime", linewidths=0.8)
    for ax in (ct_ax, cam_ax):
        ax.axis("off")
