"""``fedct explain``: the global model's prediction and Grad-CAM for each slice of a DICOM file or
series folder, for a radiologist to look at. Runs where the images are; writes only there.

Output folder: ``predictions.json`` (one entry per slice: file relative to the input, frame,
instance number, position, score of the positive class, predicted class, overlay file; and every
skipped file with its reason) and one PNG per slice (lung window | Grad-CAM overlay).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from common import json_text
from common.augment import eval_transform
from common.dicom_io import CTFrame, UnusableFileError, read_ct_file
from common.errors import ConfigError
from common.gradcam import cam_maps, cam_stage_name
from common.model_file import load_model
from common.overlay import draw_slice
from common.preprocess import to_model_grid

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SliceResult:
    file: str
    frame: int
    instance_number: int | None
    position_mm: float | None
    score: float  # probability of the positive class (the last class of the federation)
    prediction: str
    overlay: str


def explain(
    model_path: Path,
    source: Path,
    out: Path,
    *,
    method: str = "gradcam",
    layer: str | None = None,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Predict and explain every CT slice in ``source``; write the results into ``out``.

    ``layer``: the ResNet stage the CAM is taken on (default: the model file's cam-layer).
    """
    model, fed = load_model(model_path)
    classes = list(fed.class_names)
    positive = len(classes) - 1
    transform = eval_transform(fed.preprocess.windows)
    grid = fed.preprocess.grid
    stage = cam_stage_name(model, grid.image_size, layer or fed.cam_layer)

    frames, skipped = _read(source)
    if not frames:
        raise ConfigError(
            f"no usable CT image in {source}"
            + (f" ({len(skipped)} files skipped, e.g. {skipped[0]['reason']})" if skipped else "")
        )
    out.mkdir(parents=True, exist_ok=True)
    results: list[SliceResult] = []
    for start in range(0, len(frames), batch_size):
        chunk = frames[start : start + batch_size]
        hu = [to_model_grid(f.hu, f.pixel_spacing, grid) for _, f in chunk]
        images = torch.stack([transform(torch.from_numpy(h)[None]) for h in hu])
        with torch.no_grad():
            probs = torch.softmax(model(images), 1).numpy()
        cams = cam_maps(model, images, target_class=positive, method=method, layer=stage)
        for (rel, frame), h, p, cam in zip(chunk, hu, probs, cams, strict=True):
            name = _png_name(rel, frame.frame)
            score, label = float(p[positive]), classes[int(np.argmax(p))]
            _save_overlay(out / name, h, cam, f"{rel} frame {frame.frame}: p={score:.2f}")
            results.append(
                SliceResult(
                    rel,
                    frame.frame,
                    frame.instance_number,
                    frame.position,
                    round(float(score), 4),
                    label,
                    name,
                )
            )
    report = {
        "model": model_path.name,
        "classes": classes,
        "positive_class": classes[positive],
        "method": method,
        "layer": stage,
        "slices": [vars(r) for r in results],
        "skipped": skipped,
    }
    (out / "predictions.json").write_text(json_text.dumps(report, indent=2) + "\n")
    return report


def _read(source: Path) -> tuple[list[tuple[str, CTFrame]], list[dict[str, str]]]:
    """Every frame under ``source`` ordered by series and position, and the skipped files."""
    if source.is_file():
        files, root = [source], source.parent
    elif source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and not p.name.startswith("."))
        root = source
    else:
        raise ConfigError(f"{source} does not exist")
    frames: list[tuple[str, CTFrame]] = []
    skipped = []
    for path in files:
        rel = path.relative_to(root).as_posix()
        try:
            frames += [(rel, f) for f in read_ct_file(path)]
        except UnusableFileError as err:
            skipped.append({"file": rel, "reason": err.reason})
    frames.sort(
        key=lambda item: (
            item[1].series_instance_uid,
            item[1].position if item[1].position is not None else float("inf"),
            item[1].instance_number or 0,
            item[0],
            item[1].frame,
        )
    )
    return frames, skipped


def _png_name(rel: str, frame: int) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", rel).strip("_")
    return f"{stem}-f{frame:03d}.png"


def _save_overlay(path: Path, hu: np.ndarray, cam: np.ndarray, title: str) -> None:
    fig = Figure(figsize=(6.4, 3.5))
    ct_ax, cam_ax = fig.subplots(1, 2)
    draw_slice(ct_ax, cam_ax, hu, cam, None)
    ct_ax.set_title("CT, lung window", fontsize=8)
    cam_ax.set_title("Grad-CAM", fontsize=8)
    fig.suptitle(title, fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
