"""Diagnostic metrics a site computes on its own held-out patients, and their privacy-safe
aggregate: fixed-bin histograms of the positive-class score per true class.

Summing histograms across sites gives the pooled ROC curve and AUROC exactly up to the bin
width (scores in one bin count as ties), with no per-patient score ever leaving a site. The bins
are equally wide in log-odds (logit) over [-LOGIT_RANGE, LOGIT_RANGE], not in probability: a
confident model (or a site with a shifted score scale) puts most scores below 0.01 or above
0.99, where probability bins would lump them into one tie and the pooled AUROC would collapse
towards 0.5. Any monotone binning keeps the AUROC formula exact up to ties.
scikit-learn computes the per-site metrics; the histogram AUROC is written here because no
library computes AUROC from binned counts.

Each site scores three levels (:data:`LEVELS`): slices, series and patients. A series' or a
patient's score is the highest score of its held-out slices and its label is positive when any
of its slices is positive (:func:`max_by_group`): one slice showing a nodule makes the series
and the patient positive, so the most suspicious slice is what a reader would rank them by.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from fedct.common.errors import FedCTError

DEFAULT_BINS = 100
LOGIT_RANGE = 12.0  # sigmoid(12) = 1 - 6e-6: beyond this, scores share the end bins
# Above this share of (positive, negative) pairs in one bin, the histogram AUROC is mostly ties
# (each counted half a win) and stays within 0.25 of chance whatever the model ranks.
TIE_LIMIT = 0.5


@dataclass(frozen=True)
class Level:
    """An evaluation level and the names of its metrics: slice metrics have bare names
    (``auroc``, ``hist-neg``), series and patient metrics a prefix (``series-auroc``)."""

    name: str  # slice | series | patient

    def key(self, metric: str) -> str:
        return metric if self.name == "slice" else f"{self.name}-{metric}"

    @property
    def plural(self) -> str:
        return self.name if self.name.endswith("s") else f"{self.name}s"

    @property
    def count_key(self) -> str:
        """The metric counting the level's units (slices, series or patients)."""
        return "num-examples" if self.name == "slice" else f"{self.name}-num"


SLICE, SERIES, PATIENT = Level("slice"), Level("series"), Level("patient")
LEVELS = (SLICE, SERIES, PATIENT)
HISTOGRAM_METRICS = ("hist-neg", "hist-pos")


def is_histogram_key(key: str) -> bool:
    """Whether ``key`` names a score histogram (of any level)."""
    return key.endswith(HISTOGRAM_METRICS)


@dataclass(frozen=True)
class BinaryMetrics:
    examples: int
    positives: int
    accuracy: float
    sensitivity: float  # true-positive rate at the threshold
    specificity: float  # true-negative rate at the threshold
    auroc: float  # NaN when only one class is present


class DivergedModelError(FedCTError):
    """The model's scores are NaN or infinite: its training diverged."""


def binary_metrics(
    scores: np.ndarray, positive: np.ndarray, *, threshold: float = 0.5
) -> BinaryMetrics:
    """Metrics of positive-class ``scores`` against boolean ``positive`` labels."""
    # imported here: scikit-learn is slow to import (docs/benchmarks.md, Federation), which the
    # server (histograms only) and every training message's fresh ClientApp process would
    # otherwise pay for nothing
    from sklearn.metrics import confusion_matrix, roc_auc_score

    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    if not np.isfinite(scores).all():
        raise DivergedModelError(
            f"{int((~np.isfinite(scores)).sum())} of {len(scores)} scores are NaN or infinite: "
            "the model's training diverged (lower learning-rate, or train fewer layers with "
            "freeze)"
        )
    predicted = scores >= threshold
    tn, fp, fn, tp = confusion_matrix(positive, predicted, labels=[False, True]).ravel()
    both = positive.any() and (~positive).any()
    return BinaryMetrics(
        examples=len(scores),
        positives=int(positive.sum()),
        accuracy=float((tp + tn) / max(len(scores), 1)),
        sensitivity=float(tp / (tp + fn)) if tp + fn else math.nan,
        specificity=float(tn / (tn + fp)) if tn + fp else math.nan,
        auroc=float(roc_auc_score(positive, scores)) if both else math.nan,
    )


def score_histograms(
    scores: np.ndarray, positive: np.ndarray, *, bins: int = DEFAULT_BINS
) -> np.ndarray:
    """``(2, bins)`` counts of scores in [0, 1]: row 0 for negatives, row 1 for positives.

    Bin ``i`` holds the scores whose log-odds fall in the ``i``-th of ``bins`` equal steps of
    [-LOGIT_RANGE, LOGIT_RANGE] (see :func:`bin_edges`)."""
    scores = np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)
    positive = np.asarray(positive, dtype=bool)
    with np.errstate(divide="ignore"):
        logits = np.log(scores) - np.log1p(-scores)  # +-inf at exactly 0 or 1: the end bins
    step = 2 * LOGIT_RANGE / bins
    index = np.clip(np.floor((logits + LOGIT_RANGE) / step), 0, bins - 1).astype(np.int64)
    hist = np.zeros((2, bins), dtype=np.int64)
    np.add.at(hist, (positive.astype(np.int64), index), 1)
    return hist


def bin_edges(bins: int = DEFAULT_BINS) -> np.ndarray:
    """The ``bins + 1`` score thresholds between histogram bins (0 and 1 at the ends)."""
    inner = np.linspace(-LOGIT_RANGE, LOGIT_RANGE, bins + 1)[1:-1]
    return np.concatenate([[0.0], 1.0 / (1.0 + np.exp(-inner)), [1.0]])


def auroc_from_histograms(hist: np.ndarray) -> float:
    """AUROC from ``(2, bins)`` counts: P(pos > neg) + P(same bin) / 2 (ties within a bin)."""
    neg, pos = np.asarray(hist[0], dtype=np.float64), np.asarray(hist[1], dtype=np.float64)
    n_neg, n_pos = neg.sum(), pos.sum()
    if n_neg == 0 or n_pos == 0:
        return math.nan
    neg_below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])
    return float((pos * (neg_below + 0.5 * neg)).sum() / (n_pos * n_neg))


def roc_from_histograms(hist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rates, true-positive rates) at every bin edge, from high to low."""
    neg, pos = np.asarray(hist[0], dtype=np.float64), np.asarray(hist[1], dtype=np.float64)
    tpr = np.concatenate([[0.0], np.cumsum(pos[::-1])]) / max(pos.sum(), 1)
    fpr = np.concatenate([[0.0], np.cumsum(neg[::-1])]) / max(neg.sum(), 1)
    return fpr, tpr


@dataclass(frozen=True)
class GroupScores:
    scores: np.ndarray  # one per group, in order of first appearance: its slices' highest score
    positive: np.ndarray  # one per group: whether any of its slices is positive


def max_by_group(
    scores: np.ndarray, positive: np.ndarray, groups: Sequence[Hashable]
) -> GroupScores:
    """Per-group scores (the max of the group's slice ``scores``) and labels (any positive)."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    if not len(scores) == len(positive) == len(groups):
        raise ValueError(
            f"{len(scores)} scores, {len(positive)} labels and {len(groups)} groups: give one "
            "label and one group per score"
        )
    ids: dict[Hashable, int] = {}
    index = np.asarray([ids.setdefault(g, len(ids)) for g in groups], dtype=np.int64)
    best = np.full(len(ids), -np.inf)
    np.maximum.at(best, index, scores)
    any_positive = np.zeros(len(ids), dtype=bool)
    np.logical_or.at(any_positive, index, positive)
    return GroupScores(best, any_positive)


def tie_share(hist: np.ndarray) -> float:
    """P(a random positive and a random negative share a bin): the share of pairs that
    :func:`auroc_from_histograms` can only count as ties. NaN with one class."""
    neg, pos = np.asarray(hist[0], dtype=np.float64), np.asarray(hist[1], dtype=np.float64)
    pairs = neg.sum() * pos.sum()
    return float((neg * pos).sum() / pairs) if pairs else math.nan


def scores_tied(hist: np.ndarray) -> bool:
    """Whether most (positive, negative) pairs share a bin, so the histogram AUROC says little
    about the ranking: the model's scores are near-constant (within about one bin's width)."""
    return tie_share(hist) > TIE_LIMIT
