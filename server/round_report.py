"""One federated round's report, and the rules that sort the sites' replies into it (no Flower).

The ServerApp's loop (server/server_app.py) turns each Flower reply into a :class:`SiteReply`
and hands them here:

- a site whose ClientApp failed is ``failed``, with the first line of its error;
- a site out of privacy budget is ``exhausted`` (and not selected again);
- an update that cannot be aggregated (keys, shapes, dtypes, non-finite values, an update norm
  beyond ``max-update-norm``, a bad example count) is ``excluded`` with the reason;
- everything else is accepted (``train``), and FedAvg's weighted mean is summed from the
  accepted updates' read-only views (server/aggregate.py).

Evaluation replies are pooled through their score histograms into exact pooled AUROCs of
slices, series and patients (server/evaluation.py), and a collapsed model is named
(server/health.py). :meth:`RoundReport.record` is the round's line in ``metrics.jsonl``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from fedct.common.metrics import is_histogram_key
from fedct.common.training_stats import TrainingStats, combine_hu_quantiles, histogram_score_stats
from fedct.common.weights import Weights, weight_problem
from fedct.server.aggregate import WeightedMean
from fedct.server.evaluation import TIED_NOTE, pool_evaluations, tied_levels
from fedct.server.health import RunSoFar, detect_collapse

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteReply:
    """What the server knows of one site's reply."""

    site: str
    metrics: dict[str, Any] = field(default_factory=dict)
    weights: Weights | None = None  # read-only views of the model or update (train replies)
    relative: bool = False  # weights is an update, trained - sent (common/flower_records.py)
    error: str | None = None  # the site's ClientApp failed: the first line of its error
    unreadable: str | None = None  # the update's arrays could not be read: why
    node: int | None = None  # the Flower node that sent it


@dataclass
class RoundReport:
    round: int
    exhausted: set[str]  # sites out of privacy budget, this round's included
    train: dict[str, dict[str, Any]] = field(default_factory=dict)  # accepted: site -> metrics
    excluded: dict[str, str] = field(default_factory=dict)  # site -> reason
    failed: dict[str, str] = field(default_factory=dict)  # site -> error
    accepted: list[SiteReply] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)  # timings, evaluation, collapse

    def sort_train(
        self, replies: Iterable[SiteReply], *, global_weights: Weights, max_update_norm: float
    ) -> None:
        """Sort the train replies into failed, out of budget, excluded and accepted."""
        for reply in replies:
            if reply.error is not None:
                self.failed[reply.site] = reply.error
                log.warning("round %d: %s failed: %s", self.round, reply.site, reply.error)
                continue
            if int(reply.metrics.get("budget-exhausted", 0)):
                self.exhausted.add(reply.site)
                log.warning(
                    "round %d: %s has exhausted its privacy budget (ε=%.3g) and will "
                    "not be selected again",
                    self.round,
                    reply.site,
                    reply.metrics.get("epsilon", 0),
                )
                continue
            problem = update_problem(reply, global_weights, max_update_norm)
            if problem is not None:
                self.excluded[reply.site] = problem
                log.warning(
                    "round %d: update from %s excluded: %s", self.round, reply.site, problem
                )
                continue
            self.train[reply.site] = reply.metrics
            self.accepted.append(reply)

    def training_stats(self, before: TrainingStats) -> TrainingStats:
        """The federation's training intensity quantiles from this round's accepted sites (the
        last known ones when none sent them)."""
        parts = [
            (m["train-hu-quantiles"], float(m["num-examples"]))
            for m in self.train.values()
            if isinstance(m.get("train-hu-quantiles"), list)
        ]
        quantiles = combine_hu_quantiles(parts)
        if quantiles is None:
            return before
        return replace(
            before,
            hu_quantiles=quantiles,
            hu_from=f"mean of {len(parts)} sites' quantiles weighted by training slices "
            "(an approximation of the pooled quantiles)",
        )

    def pool_evaluation(
        self,
        replies: Iterable[SiteReply],
        *,
        num_classes: int,
        before: RunSoFar,
        stats: TrainingStats,
    ) -> TrainingStats:
        """Pool the evaluation replies into the report; returns the model's training
        statistics with the pooled held-out score statistics."""
        replied: dict[str, dict[str, Any]] = {}
        for reply in replies:
            if reply.error is not None:
                self.failed.setdefault(reply.site, "evaluation failed")
                continue
            replied[reply.site] = reply.metrics
        pooled = pool_evaluations(replied.values())
        self.details["evaluate"] = {
            site: {k: v for k, v in m.items() if not is_histogram_key(k)}
            for site, m in replied.items()
        }
        self.details["pooled"] = pooled
        collapse = detect_collapse(pooled, train=self.train, before=before, num_classes=num_classes)
        self.details["collapse"] = collapse.as_record() if collapse else None
        if collapse is not None:
            log.warning("round %d: %s", self.round, collapse.line)
        log.info(
            "round %d: pooled AUROC %.3f (series %.3f, patient %.3f) over %d held-out slices "
            "(%d sites)%s",
            self.round,
            pooled.get("auroc", math.nan),
            pooled.get("series-auroc", math.nan),
            pooled.get("patient-auroc", math.nan),
            pooled["num-examples"],
            len(replied),
            f"; {TIED_NOTE} ({', '.join(tied)})" if (tied := tied_levels(pooled)) else "",
        )
        hist = (
            np.asarray([pooled["hist-neg"], pooled["hist-pos"]]) if "hist-neg" in pooled else None
        )
        return replace(stats, scores=histogram_score_stats(hist) if hist is not None else None)

    def record(self) -> dict[str, Any]:
        """The round's line in ``metrics.jsonl``."""
        return {
            "round": self.round,
            "train": self.train,
            "excluded": self.excluded,
            "failed": self.failed,
            "exhausted": sorted(self.exhausted),
            **self.details,
        }


def update_problem(reply: SiteReply, global_weights: Weights, max_update_norm: float) -> str | None:
    """Why ``reply``'s update cannot be aggregated, or None."""
    examples = reply.metrics.get("num-examples")
    if (
        not isinstance(examples, int | float)
        or isinstance(examples, bool)
        or not (math.isfinite(examples) and examples > 0)
    ):
        return f"num-examples must be a positive number, got {examples!r}"
    if reply.unreadable is not None:
        return f"unreadable array ({reply.unreadable})"
    if reply.weights is None:
        return "no model update in the reply"
    return weight_problem(
        reply.weights, global_weights, max_distance=max_update_norm, relative=reply.relative
    )


def weighted_mean(global_weights: Weights, accepted: list[SiteReply]) -> Weights:
    """FedAvg's example-weighted mean of the accepted updates, summed straight from their
    read-only views (float16 transfers are summed in float32). A site's update relative to
    ``global_weights`` counts as ``global_weights + update``: the relative ones are summed as
    they are, and ``global_weights`` is added once with their share of the weight."""
    updates = [
        (r.weights, float(r.metrics["num-examples"]), r.relative) for r in accepted if r.weights
    ]
    if len(updates) != len(accepted):
        raise ValueError("an accepted reply without an update: sort the replies first")
    mean = WeightedMean(global_weights, sum(size for _, size, _ in updates))
    for update, size, _ in updates:
        mean.add(update, size)
    relative = sum(size for _, size, is_relative in updates if is_relative)
    if relative:
        mean.add(global_weights, relative)
    return mean.result()
