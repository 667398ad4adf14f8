"""The Flower ServerApp: FedCT's round loop on Flower's deployment or simulation engine.

Each round: select the sites (only the hospitals' nodes of the allow-list, server/allow_list.py:
Flower's strategies sample from a view of the grid that lists no other node; and not those out of
privacy budget), send them the model, sort their
replies into the round's report (accepted / excluded with a reason / failed / out of budget,
server/round_report.py), aggregate the accepted updates, let every site evaluate the new model
and pool the results, then checkpoint and append the round to ``metrics.jsonl``. A run resumes
at the round after its newest checkpoint.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, cast

from flwr.app import ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fedct.common import audit, json_text
from fedct.common.config import FederationConfig
from fedct.common.fileio import atomic_write_text
from fedct.common.flower_pacing import pace_object_pulls
from fedct.common.flower_records import model_ref
from fedct.common.model_file import save_model
from fedct.common.models import build_model, channel_affine_keys
from fedct.common.training_stats import TrainingStats
from fedct.common.weights import Weights, model_weights
from fedct.server.allow_list import keep_allowed, read_allow_list, warn_strangers
from fedct.server.checkpoints import (
    START_FILE,
    CheckpointStore,
    ServerState,
    append_metrics,
    fit_to_model,
    read_metrics,
)
from fedct.server.health import RunSoFar
from fedct.server.round_report import RoundReport, weighted_mean
from fedct.server.strategy import (
    STREAMED_MEAN,
    KeptModel,
    asks_for_model,
    evaluation_config,
    flower_aggregate,
    for_transfer,
    kept_model,
    make_strategy,
    optimizer_state,
    restore_optimizer_state,
    site_reply,
    strategy_record,
    without_ref,
)

log = logging.getLogger(__name__)

app = ServerApp()


# Flower's Grid.send_and_receive sleeps 3 s between polls for replies, which adds up to 3 s to
# every phase of every round; FedCT's loop polls through the same Grid API more often (a call
# on the server host's loopback).
REPLY_POLL_S = 0.2


def send_and_receive(
    grid: Grid,
    messages: Iterable[Message],
    *,
    timeout: float,
    follow_up: Callable[[Message], Message | None] | None = None,
) -> list[Message]:
    """Send ``messages``; their replies, as they come, until all are in or ``timeout`` passed.
    ``follow_up``: for a reply that asks for something, the message answering it, sent at once
    (while time is left), whose reply is awaited in that reply's place; None keeps the reply."""
    messages = list(messages)
    if not messages:
        return []
    pending = set(grid.push_messages(messages))
    deadline = time.time() + timeout
    replies: list[Message] = []
    while pending:
        got = list(grid.pull_messages(pending))
        pending -= {m.metadata.reply_to_message_id for m in got}
        answers = []
        for reply in got:
            answer = follow_up(reply) if follow_up is not None else None
            if answer is None:
                replies.append(reply)
            else:
                answers.append(answer)
        if answers and time.time() < deadline:
            pending |= set(grid.push_messages(answers))
        if not pending or time.time() >= deadline:
            break
        time.sleep(REPLY_POLL_S)
    return replies


class HospitalsOnly:
    """``grid`` as the strategy sees it: ``get_node_ids`` lists only the allow-list's nodes, so
    Flower's strategies sample, and wait for ``min-sites``, among the hospitals alone; a
    stranger can never take a hospital's place. Every other call goes to ``grid``."""

    def __init__(self, grid: Grid, allowed: dict[int, str] | None) -> None:
        self._grid = grid
        self._allowed = allowed
        self.strangers: set[int] = set()  # seen since the last reset

    def get_node_ids(self) -> Iterable[int]:
        kept, strangers = keep_allowed(self._grid.get_node_ids(), self._allowed)
        self.strangers.update(strangers)
        return kept

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


@app.main()
def main(grid: Grid, context: Context) -> None:
    pace_object_pulls()  # replies still being uploaded are fetched 0.05 s later, not 1 s
    fed = FederationConfig.from_mapping(context.run_config)
    out = Path(fed.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    store = CheckpointStore(out / "checkpoints", fed)
    metrics_path = out / "metrics.jsonl"
    strategy = make_strategy(fed)
    model = build_model(fed.model_config)
    weights: Weights = model_weights(model)
    exhausted: set[str] = set()
    history = RunSoFar()
    first = 1
    resumed = store.latest() if fed.resume else None
    if resumed is not None:
        weights, state = fit_to_model(resumed, weights, channel_affine_keys(model))
        first, exhausted = state.round + 1, set(state.exhausted_sites)
        restore_optimizer_state(strategy, state.optimizer_state)
        history = RunSoFar.from_history(
            r for r in read_metrics(metrics_path) if r.get("round", 0) <= state.round
        )
        log.info("resuming after the checkpoint of round %d", state.round)
    if first > fed.num_server_rounds:
        log.info("all %d rounds are already done (see %s)", fed.num_server_rounds, out)
        return
    stats = TrainingStats()  # what the model files record of the training data
    sites: dict[int, str] = {}  # node id -> site name, learnt from the replies
    allowed = read_allow_list(out)  # the hospitals' nodes; None: every node (simulation)
    hospitals_only = HospitalsOnly(grid, allowed)
    view = cast(Grid, hospitals_only)

    kept: KeptModel | None = None  # which sites keep the model last evaluated
    if first == 1:
        kept = _evaluate_start(grid, strategy, fed, weights, view, sites, out / START_FILE)

    for server_round in range(first, fed.num_server_rounds + 1):
        began = time.time()
        report = RoundReport(server_round, exhausted)
        hospitals_only.strangers.clear()
        offered = strategy.configure_train(
            server_round,
            strategy_record(fed, weights, train=True),
            ConfigRecord({"local-epochs": fed.local_epochs}),
            view,
        )
        train_messages = [m for m in offered if sites.get(m.metadata.dst_node_id) not in exhausted]
        replies = _train_phase(grid, fed, train_messages, weights, kept, report)
        # wall time from sending the model to having every reply: local training plus the
        # federation's overhead (process start, serialization, transfer), before aggregation
        report.details["train-phase-seconds"] = round(time.time() - began, 3)
        report.sort_train(
            [site_reply(m, sites, with_update=True) for m in replies],
            global_weights=weights,
            max_update_norm=fed.max_update_norm,
        )
        stats = report.training_stats(stats)
        weights = _aggregate(strategy, fed, report, weights, replies)

        evaluated = time.time()
        evaluations, kept = _evaluate(grid, strategy, fed, server_round, weights, stats, view)
        report.details["evaluate-phase-seconds"] = round(time.time() - evaluated, 3)
        stats = report.pool_evaluation(
            [site_reply(m, sites, with_update=False) for m in evaluations],
            num_classes=len(fed.class_names),
            before=history,
            stats=stats,
        )

        warn_strangers(hospitals_only.strangers, server_round=server_round)
        if hospitals_only.strangers:
            report.details["ignored-nodes"] = [str(n) for n in sorted(hospitals_only.strangers)]
        state = ServerState(
            server_round, fed.strategy, sorted(exhausted), optimizer_state(strategy)
        )
        store.save(weights, state, stats=stats)
        report.details["seconds"] = round(time.time() - began, 3)
        record = report.record()
        append_metrics(metrics_path, record)
        audit.append(
            out,
            {
                "kind": "round",
                "run-id": context.run_id,
                "round": server_round,
                "fedct-version": fed.fedct_version,
                "config-digest": audit.config_digest(context.run_config),
                "accepted": sorted(report.train),
                "excluded": report.excluded,
                "failed": report.failed,
                "exhausted": sorted(report.exhausted),
                "ignored-nodes": report.details.get("ignored-nodes", []),
            },
        )
        history = history.after(record)

    save_model(out / "final_model.safetensors", weights, fed, stats=stats)
    log.info("final global model: %s", out / "final_model.safetensors")


def _train_phase(
    grid: Grid,
    fed: FederationConfig,
    messages: list[Message],
    weights: Weights,
    kept: KeptModel | None,
    report: RoundReport,
) -> list[Message]:
    """Send ``weights`` to train (named by its digest to the sites that keep it); the replies.
    A named site that no longer keeps it says so, and is sent the model at once."""
    outgoing = for_transfer(messages, weights, fed.transfer_dtype, kept=kept)
    named = {m.metadata.dst_node_id: m for m in outgoing if model_ref(m.content) is not None}
    resent: set[int] = set()

    def send_model(reply: Message) -> Message | None:
        node = reply.metadata.src_node_id
        if node not in named or node in resent or not asks_for_model(reply):
            return None
        resent.add(node)
        log.warning("round %d: node %d no longer keeps the model; sending it", report.round, node)
        (again,) = for_transfer([without_ref(named[node])], weights, fed.transfer_dtype)
        return again

    replies = send_and_receive(grid, outgoing, timeout=fed.round_timeout, follow_up=send_model)
    report.details["model-kept-by"] = sum(  # trained from their own copy
        1 for r in replies if not r.has_error() and r.metadata.src_node_id in named.keys() - resent
    )
    return replies


def _evaluate(
    grid: Grid,
    strategy: Strategy,
    fed: FederationConfig,
    server_round: int,
    weights: Weights,
    stats: TrainingStats,
    view: Grid,
) -> tuple[list[Message], KeptModel | None]:
    """One evaluation phase: ``weights`` to the sites the strategy picks; their replies, and
    which of them keep ``weights`` for the next round's training (``model-cache``)."""
    messages = strategy.configure_evaluate(
        server_round, strategy_record(fed, weights, train=False), evaluation_config(stats), view
    )
    # float32 whatever transfer-dtype says: the metrics are those of the model the server keeps
    sent = for_transfer(messages, weights, "float32")
    replies = send_and_receive(grid, sent, timeout=fed.round_timeout)
    return replies, kept_model(weights, sent, replies) if fed.model_cache else None


def _evaluate_start(
    grid: Grid,
    strategy: Strategy,
    fed: FederationConfig,
    weights: Weights,
    view: Grid,
    sites: dict[int, str],
    path: Path,
) -> KeptModel | None:
    """Evaluate the starting model at the sites exactly like every round's model ("round 0"),
    so that what the federation added can be read against it; its record goes to ``path``
    (``start.json``), not to ``metrics.jsonl``. Which sites keep the starting model."""
    evaluations, kept = _evaluate(grid, strategy, fed, 0, weights, TrainingStats(), view)
    report = RoundReport(0, set())
    report.pool_evaluation(
        [site_reply(m, sites, with_update=False) for m in evaluations],
        num_classes=len(fed.class_names),
        before=RunSoFar(),
        stats=TrainingStats(),
    )
    atomic_write_text(path, json_text.dumps(report.record(), indent=2) + "\n")
    return kept


def _aggregate(
    strategy: Strategy,
    fed: FederationConfig,
    report: RoundReport,
    weights: Weights,
    replies: list[Message],
) -> Weights:
    """The round's new model; the previous one with fewer than ``min-sites`` accepted."""
    if len(report.accepted) < fed.min_sites:
        log.warning(
            "round %d: only %d usable update(s), %d required; keeping the previous model",
            report.round,
            len(report.accepted),
            fed.min_sites,
        )
        return weights
    if fed.strategy in STREAMED_MEAN:
        return weighted_mean(weights, report.accepted)
    aggregated = flower_aggregate(strategy, report.round, report.accepted, replies, weights)
    return weights if aggregated is None else aggregated
