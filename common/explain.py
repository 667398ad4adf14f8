"""``fedct explain``: the global model's prediction and Grad-CAM for each slice of a DICOM file or
series folder, for a radiologist to look at. Runs where the images are; writes only there.

Output folder: ``predictions.json`` (one entry per slice: file relative to the input, frame,
instance number, position, score of the positive class, predicted class, overlay file, whether
its series' scores are saturated; every skipped file with its reason; per series its HU
quantiles and their shift from the model's training data; and the warnings) and one PNG per
slice (lung window | Grad-CAM overlay).

Each series is checked against what the model file records of its training data
(common/training_stats.py): a series whose intensities lie more than SHIFT_LIMIT_HU from them
(another scanner's calibration, a rescale fault) and a series whose scores are saturated (at
least 90 % of its slices above 0.99 or below 0.01) are named in the warnings: such scores say
more about the model than about the patient and must not be read as certainty.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from fedct.common import json_text
from fedct.common.augment import eval_transform
from fedct.common.devices import resolve_device
from fedct.common.dicom_io import CTFrame, UnusableFileError, read_ct_file
from fedct.common.errors import ConfigError
from fedct.common.gradcam import cam_maps, cam_stage_name
from fedct.common.model_file import load_model, read_training_stats
from fedct.common.overlay import draw_slice
from fedct.common.preprocess import to_model_grid
from fedct.common.training_stats import (
    NO_STATS_NOTE,
    SATURATED_NOTE,
    SHIFT_LIMIT_HU,
    TrainingStats,
    hu_quantiles,
    intensity_shift,
    outside_range,
    saturated_side,
)

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
    saturated: bool = False  # its series' scores are saturated: not a certainty


@dataclass(frozen=True)
class SeriesCheck:
    """One series against the model's training data."""

    first_file: str
    slices: int
    hu_quantiles: list[float] | None  # at HU_PERCENT, inside the body on the model grid
    hu_shift: float | None  # median over the quantiles of the series' minus the model's
    intensity_outside: bool
    scores_saturated: str | None  # high | low | None


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
    device = resolve_device(fed.device)
    model.to(device)
    stats = read_training_stats(model_path)
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
    series: dict[str, list[tuple[int, np.ndarray]]] = {}  # result index and grid image
    for start in range(0, len(frames), batch_size):
        chunk = frames[start : start + batch_size]
        hu = [to_model_grid(f.hu, f.pixel_spacing, grid) for _, f in chunk]
        images = torch.stack([transform(torch.from_numpy(h)[None]) for h in hu])
        with torch.no_grad():
            probs = torch.softmax(model(images.to(device)), 1).cpu().numpy()
        cams = cam_maps(model, images, target_class=positive, method=method, layer=stage)
        for (rel, frame), h, p, cam in zip(chunk, hu, probs, cams, strict=True):
            name = _png_name(rel, frame.frame)
            score, label = float(p[positive]), classes[int(np.argmax(p))]
            title = f"{rel} frame {frame.frame}: p {score_text(score, digits=2)}"
            _save_overlay(out / name, h, cam, title)
            key = frame.series_instance_uid or rel
            series.setdefault(key, []).append((len(results), h.astype(np.float16)))
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
    checks = [_check_series(results, members, stats) for members in series.values()]
    for check, members in zip(checks, series.values(), strict=True):
        if check.scores_saturated:
            for i, _ in members:
                results[i] = replace(results[i], saturated=True)
    warnings = _warnings(checks, stats, model_path)
    report = {
        "model": model_path.name,
        "classes": classes,
        "positive_class": classes[positive],
        "method": method,
        "layer": stage,
        "model_hu_quantiles": list(stats.hu_quantiles) if stats and stats.hu_quantiles else None,
        "warnings": warnings,
        "series": [vars(c) for c in checks],
        "slices": [vars(r) for r in results],
        "skipped": skipped,
    }
    (out / "predictions.json").write_text(json_text.dumps(report, indent=2) + "\n")
    return report


def score_text(score: float, *, digits: int = 3) -> str:
    """``= 0.734``, or ``> 0.999`` / ``< 0.001`` where the rounded score would read as
    certainty (1.000 or 0.000)."""
    limit = 10.0**-digits
    if score > 1 - limit:
        return f"> {1 - limit:.{digits}f}"
    if score < limit:
        return f"< {limit:.{digits}f}"
    return f"= {score:.{digits}f}"


def _check_series(
    results: list[SliceResult],
    members: list[tuple[int, np.ndarray]],
    stats: TrainingStats | None,
) -> SeriesCheck:
    quantiles = hu_quantiles([image for _, image in members])
    shift = None
    if quantiles is not None and stats is not None and stats.hu_quantiles is not None:
        shift = round(intensity_shift(quantiles, stats.hu_quantiles), 1)
    scores = np.asarray([results[i].score for i, _ in members])
    return SeriesCheck(
        results[members[0][0]].file,
        len(members),
        list(quantiles) if quantiles else None,
        shift,
        shift is not None and outside_range(shift),
        saturated_side(scores),
    )


def _warnings(checks: list[SeriesCheck], stats: TrainingStats | None, model: Path) -> list[str]:
    """What the reader must know before reading the scores."""
    warnings = []
    if stats is None or stats.hu_quantiles is None:
        warnings.append(
            f"{NO_STATS_NOTE} in {model.name}: whether these series lie within what the model "
            "was trained on cannot be checked"
        )
    for number, check in enumerate(checks, 1):
        where = f"series {number} of {len(checks)}"
        if check.intensity_outside:
            warnings.append(
                f"{where} ({check.first_file}, {check.slices} slices): its intensities lie "
                f"{check.hu_shift:+.0f} HU from what the model was trained on (limit "
                f"±{SHIFT_LIMIT_HU:.0f} HU): another scanner's calibration or a rescale fault; "
                "check the files' RescaleIntercept/RescaleSlope before trusting the scores"
            )
        if check.scores_saturated:
            side = "above 0.99" if check.scores_saturated == "high" else "below 0.01"
            warnings.append(
                f"{SATURATED_NOTE} ({where}: {check.first_file}, {check.slices} slices, "
                f"nearly all {side})"
            )
    return warnings


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
