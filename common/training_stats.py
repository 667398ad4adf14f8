"""What a model file records of the data it was trained and evaluated on, and the checks that
compare new data with it: a series whose intensities lie outside what the model saw, and
scores saturated at 0 or 1, which a reader would otherwise take for certainty.

The record is aggregates only, stored as JSON under the model file's ``fedct-training-stats``
metadata key (:data:`STATS_KEY`)::

    hu-percent      [1, 5, 50, 95, 99]: the percentiles below
    hu-quantiles    HU at those percentiles of all training pixels inside the body (above
                    BODY_FLOOR_HU) on the model grid, before windowing and augmentation
    hu-from         how they were obtained: "pooled pixels" (pretraining) or "mean of N
                    sites' quantiles weighted by training slices" (federated; an approximation
                    of the pooled quantiles, which no site can compute)
    scored-slices   held-out slices the scores below were measured on
    scores-below    share of those scores below SATURATED (0.01)
    scores-above    share above 1 - SATURATED (0.99)
    score-median    their median

From histograms (the federation's pooled held-out scores) the shares and the median are exact
up to a histogram bin (common/metrics.py); any entry may be null where it was not measured.
No value concerns a single patient: a quantile of a site's hundreds of thousands of training
pixels moves by far less than a HU when one patient is added or removed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedct.common.metrics import bin_edges

STATS_KEY = "fedct-training-stats"
HU_PERCENT = (1.0, 5.0, 50.0, 95.0, 99.0)
# Pixels above this are counted as inside the body: between air (-1000 HU, around the patient
# and in the airways; the grid's border is filled with -1024) and aerated lung, whose densest
# healthy values lie above -950 HU (the usual emphysema threshold).
BODY_FLOOR_HU = -950.0
# A series lies outside the training range when the median, over HU_PERCENT, of its quantiles
# minus the model's exceeds this. The median ignores one or two quantiles moved by anatomy (a
# series of apical slices has more lung, one low in the chest more soft tissue) but not a
# calibration fault, which moves all of them: a missed RescaleIntercept moves every value by
# 1024 HU. The limit sits well above what other scanners' series read and well below what a
# shifted series reads (measured in docs/evaluation.md, Training statistics in model files).
SHIFT_LIMIT_HU = 150.0
# Scores below SATURATED or above 1 - SATURATED are saturated: a softmax that far out says more
# about the size of the logits than about the patient. A set of scores is saturated when at
# least SATURATED_SHARE of them (of each class, where classes are known) lie on the same side.
SATURATED = 0.01
SATURATED_SHARE = 0.9
SATURATED_NOTE = (
    "scores saturated: the model is not calibrated for this series; do not read them as certainty"
)
NO_STATS_NOTE = "no training statistics recorded"
# pixels read for the quantiles, at most: a deterministic stride keeps them cheap on any site
MAX_PIXELS = 2_000_000


@dataclass(frozen=True)
class ScoreStats:
    """Held-out scores of the positive class, summarised."""

    slices: int
    below: float  # share of scores < SATURATED
    above: float  # share of scores > 1 - SATURATED
    median: float


@dataclass(frozen=True)
class TrainingStats:
    """What a model was trained on (intensities) and how it scored held-out data."""

    hu_quantiles: tuple[float, ...] | None = None  # at HU_PERCENT
    hu_from: str = ""
    scores: ScoreStats | None = None

    def to_json(self) -> str:
        s = self.scores
        record = {
            "hu-percent": list(HU_PERCENT),
            "hu-quantiles": list(self.hu_quantiles) if self.hu_quantiles else None,
            "hu-from": self.hu_from or None,
            "scored-slices": s.slices if s else None,
            "scores-below": _rounded(s.below) if s else None,
            "scores-above": _rounded(s.above) if s else None,
            "score-median": _rounded(s.median) if s else None,
        }
        return json.dumps(record)

    @classmethod
    def from_json(cls, text: str) -> TrainingStats:
        """The record written by :meth:`to_json`; unknown or null entries are left out."""
        record: dict[str, Any] = json.loads(text)
        quantiles = record.get("hu-quantiles")
        if quantiles is not None and list(record.get("hu-percent", [])) != list(HU_PERCENT):
            quantiles = None  # other percentiles than this version compares: not comparable
        scores = None
        if record.get("scored-slices") is not None:
            scores = ScoreStats(
                int(record["scored-slices"]),
                _number(record.get("scores-below")),
                _number(record.get("scores-above")),
                _number(record.get("score-median")),
            )
        return cls(
            tuple(float(q) for q in quantiles) if quantiles else None,
            str(record.get("hu-from") or ""),
            scores,
        )


def hu_quantiles(images: np.ndarray | Sequence[np.ndarray]) -> tuple[float, ...] | None:
    """HU at :data:`HU_PERCENT` of the pixels inside the body of ``images`` (frames on the
    model grid; several stacks are pooled), rounded to whole HU; ``None`` when no pixel is
    inside. At most MAX_PIXELS pixels are read, every k-th."""
    stacks = [np.asarray(images)] if isinstance(images, np.ndarray) else list(images)
    flat = [np.asarray(stack).reshape(-1) for stack in stacks]
    step = max(1, math.ceil(sum(f.size for f in flat) / MAX_PIXELS))
    sample = np.concatenate(
        [f[::step].astype(np.float32) for f in flat] or [np.zeros(0, np.float32)]
    )
    inside = sample[sample > BODY_FLOOR_HU]
    if not inside.size:
        return None
    return tuple(float(round(q)) for q in np.percentile(inside, HU_PERCENT))


def combine_hu_quantiles(
    parts: Sequence[tuple[Sequence[float], float]],
) -> tuple[float, ...] | None:
    """The mean of sites' quantiles, each ``(quantiles, training slices)``, weighted by slices.

    An approximation of the quantiles of all sites' pixels together, which needs every pixel;
    its error is measured in docs/evaluation.md."""
    usable = [
        (q, w) for q, w in parts if len(q) == len(HU_PERCENT) and np.isfinite(q).all() and w > 0
    ]
    if not usable:
        return None
    quantiles = np.asarray([q for q, _ in usable], dtype=np.float64)
    mean = np.average(quantiles, axis=0, weights=[w for _, w in usable])
    return tuple(float(round(v)) for v in mean)


def intensity_shift(series: Sequence[float], model: Sequence[float]) -> float:
    """The median over :data:`HU_PERCENT` of ``series`` quantiles minus the ``model``'s (HU)."""
    return float(np.median(np.asarray(series, dtype=np.float64) - np.asarray(model)))


def outside_range(shift_hu: float) -> bool:
    """Whether a series ``shift_hu`` from the model's intensities lies outside its range."""
    return abs(shift_hu) > SHIFT_LIMIT_HU


def score_stats(scores: np.ndarray) -> ScoreStats:
    """:class:`ScoreStats` of positive-class ``scores`` (exact)."""
    scores = np.asarray(scores, dtype=np.float64)
    if not scores.size:
        return ScoreStats(0, math.nan, math.nan, math.nan)
    return ScoreStats(
        int(scores.size),
        float((scores < SATURATED).mean()),
        float((scores > 1 - SATURATED).mean()),
        float(np.median(scores)),
    )


def histogram_score_stats(hist: np.ndarray) -> ScoreStats:
    """:class:`ScoreStats` of the scores counted in a ``(2, bins)`` score histogram, exact up
    to a bin: a bin counts as below SATURATED when its upper edge is (with 100 bins, scores
    below 0.008), above 1 - SATURATED when its lower edge is (above 0.992); the median is the
    centre of the bin holding it."""
    counts = np.asarray(hist, dtype=np.float64).sum(axis=0)
    total = counts.sum()
    if not total:
        return ScoreStats(0, math.nan, math.nan, math.nan)
    low, high = _extreme_bins(len(counts))
    edges = bin_edges(len(counts))
    middle = int(np.searchsorted(np.cumsum(counts), total / 2))
    return ScoreStats(
        int(total),
        float(counts[low].sum() / total),
        float(counts[high].sum() / total),
        float((edges[middle] + edges[middle + 1]) / 2),
    )


def saturated_side(scores: np.ndarray) -> str | None:
    """``"high"`` or ``"low"`` when at least SATURATED_SHARE of ``scores`` lie above
    1 - SATURATED or below SATURATED (a series' scores, whose classes are not known)."""
    stats = score_stats(scores)
    if stats.slices == 0:
        return None
    if stats.above >= SATURATED_SHARE:
        return "high"
    if stats.below >= SATURATED_SHARE:
        return "low"
    return None


def saturated_histogram(hist: np.ndarray) -> str | None:
    """``"high"`` or ``"low"`` when at least SATURATED_SHARE of the negatives *and* of the
    positives in a ``(2, bins)`` histogram lie on the same saturated side: the model says the
    same extreme whatever the truth. A model that is confidently right (negatives low,
    positives high) is not saturated; with one class only, nothing can tell it apart."""
    hist = np.asarray(hist, dtype=np.float64)
    if hist[0].sum() == 0 or hist[1].sum() == 0:
        return None
    low, high = _extreme_bins(hist.shape[1])
    for side, bins in (("high", high), ("low", low)):
        shares = hist[:, bins].sum(axis=1) / hist.sum(axis=1)
        if (shares >= SATURATED_SHARE).all():
            return side
    return None


def _extreme_bins(bins: int) -> tuple[np.ndarray, np.ndarray]:
    edges = bin_edges(bins)
    return edges[1:] <= SATURATED, edges[:-1] >= 1 - SATURATED


def stats_from_metadata(metadata: Mapping[str, str]) -> TrainingStats | None:
    """The training statistics in a model file's metadata, or ``None`` where none were
    recorded (files written before FedCT recorded them)."""
    text = metadata.get(STATS_KEY)
    return TrainingStats.from_json(text) if text else None


def _rounded(value: float) -> float | None:
    return round(value, 4) if math.isfinite(value) else None


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else math.nan
