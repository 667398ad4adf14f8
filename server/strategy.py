"""FedCT's strategies: Flower's own (FedAvg, FedProx, FedAdam, FedMedian, FedTrimmedAvg, Krum)
extended through their hooks by one mixin, never by copying their loop.

The mixin adds what a hospital federation needs around Flower's aggregation:
- sites out of privacy budget are recorded, shown and no longer selected for training;
- every update is validated (keys, shapes, dtypes, finite values, update norm) and excluded from
  the round with a logged reason when it fails; fewer than ``min-sites`` good updates keep the
  previous model;
- float16 transfers are aggregated in float32;
- FedAvg/FedProx's weighted mean is summed straight from the validated updates' bytes
  (server/aggregate.py), keeping Flower's reply checks and metrics hook;
- evaluation pools the sites' score histograms into exact pooled AUROCs (up to bin width) of
  slices, series and patients (server/evaluation.py), and names a collapsed model (saturated or
  tied scores, exploding losses; server/health.py) in the round record and the log;
- the sites' training intensity quantiles and the pooled held-out scores are recorded in every
  model file (common/training_stats.py), and the quantiles are sent with each evaluation so a
  site can flag held-out data outside them;
- ``end_of_round`` (Flower's evaluate_fn hook) checkpoints the model and server state and
  appends the round to ``metrics.jsonl``; a resumed run continues its round numbering.
"""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    Strategy,
)

from fedct.common.config import FederationConfig
from fedct.common.metrics import is_histogram_key
from fedct.common.training_stats import TrainingStats, combine_hu_quantiles, histogram_score_stats
from fedct.common.weights import Weights, weight_problem
from fedct.server.aggregate import WeightedMean
from fedct.server.checkpoints import CheckpointStore, ServerState, append_metrics, read_metrics
from fedct.server.evaluation import TIED_NOTE, pool_evaluations, tied_levels
from fedct.server.health import RunSoFar, detect_collapse

log = logging.getLogger(__name__)

# Strategies whose aggregation is exactly FedAvg's weighted mean (FedProx differs only on the
# client): FedCT sums their updates itself, from the validated views (server/aggregate.py).
STREAMED_MEAN = frozenset({"fedavg", "fedprox"})


class FedCTMixin:
    """Hospital-federation behaviour around any Flower message-based strategy."""

    def setup(
        self, fed: FederationConfig, out: Path, *, first_round: int, state: ServerState | None
    ) -> None:
        self.fed = fed
        self.offset = first_round - 1
        self.store = CheckpointStore(out / "checkpoints", fed)
        self.metrics_path = out / "metrics.jsonl"
        self.exhausted: set[str] = set(state.exhausted_sites) if state else set()
        self.node_sites: dict[int, str] = {}
        self.global_weights: Weights = {}
        self.round_log: dict[str, Any] = {}
        self.round_start = time.time()
        self.run_so_far = RunSoFar()
        # what the model files record of the training data (common/training_stats.py)
        self.training_stats = TrainingStats()
        if state is not None:
            for name, arrays in state.optimizer_state.items():
                setattr(self, name, {k: np.asarray(v) for k, v in arrays.items()})
            done = [r for r in read_metrics(self.metrics_path) if r.get("round", 0) <= state.round]
            self.run_so_far = RunSoFar.from_history(done)

    # -- training -----------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.round_start = time.time()
        actual = server_round + self.offset
        self.round_log = {
            "round": actual,
            "train": {},
            "excluded": {},
            "failed": {},
            "exhausted": sorted(self.exhausted),
        }
        self.global_weights = {k: v.numpy() for k, v in arrays.items()}
        messages = self._in_transfer_dtype(
            super().configure_train(actual, arrays, config, grid)  # type: ignore[misc]
        )
        keep = [
            m for m in messages if self.node_sites.get(m.metadata.dst_node_id) not in self.exhausted
        ]
        if len(keep) < len(messages):
            log.info(
                "round %d: not selecting %d site(s) out of privacy budget",
                actual,
                len(messages) - len(keep),
            )
        return keep

    def _in_transfer_dtype(self, messages: Iterable[Message]) -> list[Message]:
        """The messages with the model cast to ``transfer-dtype`` (the strategy's own state
        stays float32)."""
        messages = list(messages)
        if self.fed.transfer_dtype == "float32" or not messages:
            return messages
        arrays = messages[0].content.array_records["arrays"]
        outgoing = ArrayRecord(
            {k: Array(v.numpy().astype(self.fed.transfer_dtype)) for k, v in arrays.items()}
        )
        for message in messages:
            message.content["arrays"] = outgoing
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.training_stats.hu_quantiles is not None:  # a site flags held-out data beyond
            config["train-hu-quantiles"] = list(self.training_stats.hu_quantiles)
        return self._in_transfer_dtype(
            super().configure_evaluate(server_round, arrays, config, grid)  # type: ignore[misc]
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        actual = server_round + self.offset
        # wall time from sending the model to having every reply: local training plus the
        # federation's overhead (process start, serialization, transfer), before aggregation
        self.round_log["train-phase-seconds"] = round(time.time() - self.round_start, 3)
        usable: list[tuple[Message, Weights]] = []
        for msg in replies:
            if msg.has_error():
                reason = msg.error.reason.splitlines()[0][:300] if msg.error.reason else "error"
                site = self.node_sites.get(
                    msg.metadata.src_node_id, f"node-{msg.metadata.src_node_id}"
                )
                self.round_log["failed"][site] = reason
                log.warning("round %d: %s failed: %s", actual, site, reason)
                continue
            site = self._site_of(msg)
            metrics: dict[str, Any] = dict(msg.content.metric_records["metrics"])
            if int(metrics.get("budget-exhausted", 0)):
                self.exhausted.add(site)
                self.round_log["exhausted"] = sorted(self.exhausted)
                log.warning(
                    "round %d: %s has exhausted its privacy budget (ε=%.3g) and will "
                    "not be selected again",
                    actual,
                    site,
                    metrics.get("epsilon", 0),
                )
                continue
            problem, update = self._check_update(msg, metrics)
            if problem is not None:
                self.round_log["excluded"][site] = problem
                log.warning("round %d: update from %s excluded: %s", actual, site, problem)
                continue
            self.round_log["train"][site] = metrics
            usable.append((msg, update))
        self._record_intensities()
        if len(usable) < self.fed.min_sites:
            log.warning(
                "round %d: only %d usable update(s), %d required; keeping the previous model",
                actual,
                len(usable),
                self.fed.min_sites,
            )
            return None, None
        if self.fed.strategy in STREAMED_MEAN:
            return self._weighted_mean(usable)
        for msg, update in usable:  # Flower's strategies aggregate in the dtype they are given
            record = msg.content.array_records["arrays"]
            for key, value in update.items():
                if value.dtype != np.float32:
                    record[key] = Array(value.astype(np.float32))
        return super().aggregate_train(actual, [m for m, _ in usable])  # type: ignore[misc]

    def _record_intensities(self) -> None:
        """The federation's training intensity quantiles, from this round's sites (the last
        known ones when none sent them)."""
        parts = [
            (m["train-hu-quantiles"], float(m["num-examples"]))
            for m in self.round_log["train"].values()
            if isinstance(m.get("train-hu-quantiles"), list)
        ]
        quantiles = combine_hu_quantiles(parts)
        if quantiles is not None:
            self.training_stats = replace(
                self.training_stats,
                hu_quantiles=quantiles,
                hu_from=f"mean of {len(parts)} sites' quantiles weighted by training slices "
                "(an approximation of the pooled quantiles)",
            )

    def _weighted_mean(
        self, usable: list[tuple[Message, Weights]]
    ) -> tuple[ArrayRecord, MetricRecord]:
        """FedAvg's aggregation (Flower's reply checks, weighted mean, metrics hook), with the
        mean summed from the validated views (:mod:`server.aggregate`)."""
        messages = [m for m, _ in usable]
        self._check_and_log_replies(messages, is_train=True)  # type: ignore[attr-defined]
        key = self.weighted_by_key  # type: ignore[attr-defined]
        weights = [float(cast(float, m.content.metric_records["metrics"][key])) for m in messages]
        mean = WeightedMean(self.global_weights, sum(weights))
        for (_, update), weight in zip(usable, weights, strict=True):
            mean.add(update, weight)
        arrays = ArrayRecord({k: Array(v) for k, v in mean.result().items()})
        metrics = self.train_metrics_aggr_fn(  # type: ignore[attr-defined]
            [m.content for m in messages], key
        )
        return arrays, metrics

    def _site_of(self, msg: Message) -> str:
        name = str(msg.content.config_records["site"]["name"])
        self.node_sites[msg.metadata.src_node_id] = name
        return name

    def _check_update(self, msg: Message, metrics: dict[str, Any]) -> tuple[str | None, Weights]:
        """Why the reply's update cannot be aggregated (or None), and read-only views of it."""
        examples = metrics.get("num-examples")
        if (
            not isinstance(examples, int | float)
            or isinstance(examples, bool)
            or not (math.isfinite(examples) and examples > 0)
        ):
            return f"num-examples must be a positive number, got {examples!r}", {}
        records = msg.content.array_records
        if "arrays" not in records:
            return "no model update in the reply", {}
        try:
            weights = {k: _view(v) for k, v in records["arrays"].items()}
        except ValueError as err:
            return f"unreadable array ({err})", {}
        problem = weight_problem(
            weights, self.global_weights, max_distance=self.fed.max_update_norm
        )
        return problem, weights

    # -- evaluation ---------------------------------------------------------------------
    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        actual = server_round + self.offset
        replied: dict[str, dict[str, Any]] = {}
        for msg in replies:
            if msg.has_error():
                site = self.node_sites.get(
                    msg.metadata.src_node_id, f"node-{msg.metadata.src_node_id}"
                )
                self.round_log.setdefault("failed", {})[site] = "evaluation failed"
                continue
            replied[self._site_of(msg)] = dict(msg.content.metric_records["metrics"])
        pooled = pool_evaluations(replied.values())
        self.round_log["evaluate"] = {
            site: {k: v for k, v in m.items() if not is_histogram_key(k)}
            for site, m in replied.items()
        }
        self.round_log["pooled"] = pooled
        collapse = detect_collapse(
            pooled,
            train=self.round_log.get("train", {}),
            before=self.run_so_far,
            num_classes=len(self.fed.class_names),
        )
        self.round_log["collapse"] = collapse.as_record() if collapse else None
        if collapse is not None:
            log.warning("round %d: %s", actual, collapse.line)
        hist = (
            np.asarray([pooled["hist-neg"], pooled["hist-pos"]]) if "hist-neg" in pooled else None
        )
        self.training_stats = replace(
            self.training_stats, scores=histogram_score_stats(hist) if hist is not None else None
        )
        log.info(
            "round %d: pooled AUROC %.3f (series %.3f, patient %.3f) over %d held-out slices "
            "(%d sites)%s",
            actual,
            pooled.get("auroc", math.nan),
            pooled.get("series-auroc", math.nan),
            pooled.get("patient-auroc", math.nan),
            pooled["num-examples"],
            len(replied),
            f"; {TIED_NOTE} ({', '.join(tied)})" if (tied := tied_levels(pooled)) else "",
        )
        return MetricRecord({k: v for k, v in pooled.items() if not is_histogram_key(k)})

    # -- end of round: checkpoint and history (Flower's evaluate_fn hook) --------------
    def end_of_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None  # called once before the first round: nothing to save yet
        actual = server_round + self.offset
        weights = {k: v.numpy().astype(np.float32) for k, v in arrays.items()}
        optimizer = {
            name: getattr(self, name)
            for name in ("m_t", "v_t")
            if getattr(self, name, None) is not None
        }
        self.store.save(
            weights,
            ServerState(actual, self.fed.strategy, sorted(self.exhausted), optimizer),
            stats=self.training_stats,
        )
        self.round_log["seconds"] = round(time.time() - self.round_start, 3)
        append_metrics(self.metrics_path, self.round_log)
        self.run_so_far = self.run_so_far.after(self.round_log)
        return None


def _view(array: Array) -> np.ndarray:
    """A read-only view of an Array's values, without the copy ``Array.numpy()`` makes.

    Hand-written (numpy reads .npy only from files or by copying): validating every update
    through views instead of copies saves one full memory pass per update on the server.
    """
    data = array.data
    if array.stype != "numpy.ndarray":
        return array.numpy()  # let Flower say what it cannot read
    stream = io.BytesIO(data)
    major, _ = np.lib.format.read_magic(stream)
    read_header = (
        np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    )
    shape, fortran, dtype = read_header(stream)
    if dtype.hasobject:
        raise ValueError("object arrays are not model weights")
    flat = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=stream.tell())
    return flat.reshape(shape, order="F" if fortran else "C")


_BASES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
}


def make_strategy(
    fed: FederationConfig, out: Path, *, first_round: int, state: ServerState | None
) -> FedCTMixin:
    """Flower's strategy named by ``fed.strategy``, with FedCT's mixin in front."""
    base = _BASES[fed.strategy]
    cls = type(f"FedCT{base.__name__}", (FedCTMixin, base), {})
    kwargs: dict[str, Any] = {
        "fraction_train": fed.fraction_train,
        "fraction_evaluate": 1.0,
        "min_train_nodes": fed.min_sites,
        "min_evaluate_nodes": fed.min_sites,
        "min_available_nodes": fed.min_sites,
    }
    if fed.strategy == "fedprox":
        kwargs["proximal_mu"] = fed.proximal_mu
    elif fed.strategy == "fedadam":
        kwargs["eta"] = fed.server_learning_rate
    elif fed.strategy == "fedtrimmedavg":
        kwargs["beta"] = fed.trimmed_fraction
    strategy: FedCTMixin = cls(**kwargs)
    strategy.setup(fed, out, first_round=first_round, state=state)
    return strategy
