"""The sites' evaluation aggregates pooled into the federation's (plain Python, no Flower).

For each level (slice, series, patient) the sites' score histograms are summed into a pooled
ROC curve and AUROC, exact up to the bin width; sensitivity and specificity at 0.5 are the
sites' own weighted by their positives and negatives, which is exact. When most (positive,
negative) pairs share a bin the pooled AUROC cannot rank them and reads near chance whatever
the sites measured: that is flagged (``scores-tied``) rather than reported as chance silently.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from fedct.common.metrics import LEVELS, Level, auroc_from_histograms, scores_tied, tie_share

# per-site Grad-CAM averages (client/rounds.py), pooled weighted by each site's scored slices
CAM_AVERAGES = ("cam-pointing", "cam-pointing-strict", "cam-energy")
TIED_NOTE = (
    "scores tied in one bin: the pooled AUROC cannot rank them; the model's scores are "
    "near-constant"
)


def pool_evaluations(sites: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The pooled record of one round's evaluation replies (each a site's metrics)."""
    sites = list(sites)
    reported = [m for m in sites if int(m.get("reported", 0))]
    pooled: dict[str, Any] = {**_pool_cam(reported)}
    for level in LEVELS:
        pooled.update(pool_level(level, sites))
    total = sum(float(m["num-examples"]) for m in reported)
    if total > 0:
        pooled["loss"] = sum(float(m["loss"]) * float(m["num-examples"]) for m in reported) / total
        pooled["accuracy"] = (
            sum(float(m["accuracy"]) * float(m["num-examples"]) for m in reported) / total
        )
    return pooled


def pool_level(level: Level, sites: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """One level's pooled count, positives, AUROC, sensitivity, specificity, histograms and
    tie flag, over the sites that reported it (``<level>-reported``)."""
    key = level.key
    reporting = [m for m in sites if int(m.get(key("reported"), 0))]
    if not reporting:
        return {level.count_key: 0, key("reporting-sites"): 0}
    hist = sum(
        (np.asarray([m[key("hist-neg")], m[key("hist-pos")]], dtype=np.int64) for m in reporting),
        start=np.zeros((2, len(reporting[0][key("hist-neg")])), dtype=np.int64),
    )
    positives = [float(m[key("positives")]) for m in reporting]
    negatives = [float(m[level.count_key]) - p for m, p in zip(reporting, positives, strict=True)]
    share = tie_share(hist)
    return {
        level.count_key: int(hist.sum()),
        key("positives"): int(hist[1].sum()),
        key("reporting-sites"): len(reporting),
        key("auroc"): auroc_from_histograms(hist),
        key("sensitivity"): _weighted([m[key("sensitivity")] for m in reporting], positives),
        key("specificity"): _weighted([m[key("specificity")] for m in reporting], negatives),
        key("tie-share"): share,
        key("scores-tied"): int(scores_tied(hist)),
        key("hist-neg"): hist[0].tolist(),
        key("hist-pos"): hist[1].tolist(),
    }


def tied_levels(pooled: Mapping[str, Any]) -> list[str]:
    """The levels whose pooled scores were flagged as tied in one bin."""
    return [level.name for level in LEVELS if pooled.get(level.key("scores-tied"))]


def _weighted(values: list[Any], weights: list[float]) -> float:
    """The mean of the finite ``values`` weighted by ``weights`` (NaN when none weighs)."""
    pairs = [(float(v), w) for v, w in zip(values, weights, strict=True) if w > 0 and _finite(v)]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else math.nan


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _pool_cam(reported: list[Mapping[str, Any]]) -> dict[str, Any]:
    scored = [(m, float(m.get("cam-slices", 0))) for m in reported]
    scored = [(m, k) for m, k in scored if k > 0]
    slices = sum(k for _, k in scored)
    out: dict[str, Any] = {"cam-slices": int(slices)}
    if slices > 0:
        for key in CAM_AVERAGES:
            out[key] = sum(float(m.get(key, math.nan)) * k for m, k in scored) / slices
    return out
