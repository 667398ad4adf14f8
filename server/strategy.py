"""Flower's strategies as FedCT's aggregation engines, and Flower messages as plain replies.

The ServerApp's own round loop (server/server_app.py) uses a Flower strategy (FedAvg, FedProx,
FedAdam, FedMedian, FedTrimmedAvg, Krum) for what Flower does well: choosing the nodes and
building the messages of a round (``configure_train`` / ``configure_evaluate``), and the
aggregation rules other than FedAvg's mean (``aggregate_train``). FedAvg's and FedProx's
weighted mean FedCT sums itself, from the validated updates' bytes (server/aggregate.py;
measured against Flower's in docs/benchmarks.md, Aggregation).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
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
from fedct.common.flower_records import (
    ARRAYS,
    HOLDS,
    LAYOUT,
    MODEL_NEEDED,
    MODEL_REF,
    has_model,
    is_update,
    model_of,
    model_records,
    packed_of,
    put_model_ref,
)
from fedct.common.training_stats import TrainingStats
from fedct.common.weights import Weights, applied, digest
from fedct.server.round_report import SiteReply

# Strategies whose aggregation is exactly FedAvg's weighted mean (FedProx differs only on the
# client): FedCT sums their updates itself, from the validated views.
STREAMED_MEAN = frozenset({"fedavg", "fedprox"})
# Server-side optimizer state that a resumed run must continue from (FedOpt's public fields).
OPTIMIZER_STATE = ("m_t", "v_t")

_BASES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
}


def make_strategy(fed: FederationConfig) -> Strategy:
    """Flower's strategy named by ``fed.strategy``, sampling every available site (at least
    ``min-sites``) for training (``fraction-train``) and all of them for evaluation."""
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
    return _BASES[fed.strategy](**kwargs)


def optimizer_state(strategy: Strategy) -> dict[str, Weights]:
    """The strategy's server-side optimizer moments (FedAdam), to checkpoint."""
    return {
        name: dict(value)
        for name in OPTIMIZER_STATE
        if (value := getattr(strategy, name, None)) is not None
    }


def restore_optimizer_state(strategy: Strategy, state: Mapping[str, Weights]) -> None:
    """Continue a resumed run's FedAdam from its checkpointed moments."""
    for name, arrays in state.items():
        if name not in OPTIMIZER_STATE or not hasattr(strategy, name):
            raise ValueError(f"checkpoint holds optimizer state {name!r} that the strategy lacks")
        setattr(strategy, name, {k: np.asarray(v) for k, v in arrays.items()})


def strategy_record(fed: FederationConfig, weights: Weights, *, train: bool) -> ArrayRecord:
    """The model as the strategy's ``configure_*`` gets it: named float32 arrays where the
    strategy keeps them (FedAdam's training step), else nothing to copy (what the sites receive
    is packed by :func:`for_transfer` in any case)."""
    if train and fed.strategy not in STREAMED_MEAN:
        return as_record(weights)
    return ArrayRecord()


def as_record(weights: Weights) -> ArrayRecord:
    """Named float32 arrays, as Flower's strategies read them."""
    return ArrayRecord(
        {k: Array(np.asarray(v).astype(np.float32, copy=False)) for k, v in weights.items()}
    )


def evaluation_config(stats: TrainingStats) -> ConfigRecord:
    """What every site is told with the model to evaluate: the federation's training intensity
    quantiles, once a round has trained, so a site can flag held-out data beyond them."""
    config = ConfigRecord()
    if stats.hu_quantiles is not None:
        config["train-hu-quantiles"] = list(stats.hu_quantiles)
    return config


@dataclass(frozen=True)
class KeptModel:
    """A model the server sent and the sites that said they keep it (client/model_cache.py):
    ``weights`` is the server's own object, so it names exactly that model, never a later one."""

    weights: Weights
    sha256: str
    nodes: frozenset[int]

    def named_for(self, weights: Weights) -> frozenset[int]:
        """The nodes to which ``weights`` can be named instead of sent."""
        return self.nodes if weights is self.weights else frozenset()


def for_transfer(
    messages: Iterable[Message], weights: Weights, dtype: str, *, kept: KeptModel | None = None
) -> list[Message]:
    """The messages with the model packed into one ``dtype`` array (one shared copy for all
    of them): what the sites receive, while the strategy keeps its named float32 record (a
    model float16 cannot hold goes as float32: ``model_records``). To the nodes that keep
    ``weights`` (``kept``), the model is named by its digest instead."""
    messages = list(messages)
    named, sha256 = (kept.named_for(weights), kept.sha256) if kept else (frozenset(), "")
    sent = []
    for message in messages:
        if message.metadata.dst_node_id in named:
            put_model_ref(message.content, sha256)
        else:
            sent.append(message)
    if sent:
        arrays, layout = model_records(weights, dtype)
        for message in sent:
            message.content[ARRAYS], message.content[LAYOUT] = arrays, layout
    return messages


def kept_model(weights: Weights, sent: list[Message], replies: Iterable[Message]) -> KeptModel:
    """Which nodes keep ``weights``, sent (packed, as :func:`for_transfer` did) in ``sent``: those
    whose reply names the digest of exactly what they were sent."""
    if not sent:
        return KeptModel(weights, "", frozenset())
    sha256 = digest(*packed_of(sent[0].content))  # what each site computes on arrival
    nodes = frozenset(m.metadata.src_node_id for m in replies if _said(m, HOLDS) == sha256)
    return KeptModel(weights, sha256, nodes)


def asks_for_model(reply: Message) -> bool:
    """Whether a site answered a named model with "not kept here" (it needs the model sent)."""
    return _said(reply, "status") == MODEL_NEEDED


def _said(reply: Message, key: str) -> object:
    """``key`` of the reply's ``"site"`` record (None for an error reply or a missing field)."""
    if reply.has_error():
        return None
    about = reply.content.config_records.get("site")
    return None if about is None else about.get(key)


def without_ref(message: Message) -> Message:
    """A new message like ``message``, to the same node, without the model's name (to carry
    the model itself)."""
    content = RecordDict({k: v for k, v in message.content.items() if k != MODEL_REF})
    return Message(
        content=content,
        dst_node_id=message.metadata.dst_node_id,
        message_type=message.metadata.message_type,
        group_id=message.metadata.group_id,
    )


def site_reply(msg: Message, sites: dict[int, str], *, with_update: bool) -> SiteReply:
    """A plain reply from a Flower message; learns which node is which site (``sites``)."""
    node = msg.metadata.src_node_id
    if msg.has_error():
        reason = msg.error.reason.splitlines()[0][:300] if msg.error.reason else "error"
        return SiteReply(sites.get(node, f"node-{node}"), error=reason, node=node)
    site = str(msg.content.config_records["site"]["name"])
    sites[node] = site
    metrics = dict(msg.content.metric_records["metrics"])
    if not with_update or not has_model(msg.content):
        return SiteReply(site, metrics, node=node)
    try:
        weights = model_of(msg.content)
    except ValueError as err:
        return SiteReply(site, metrics, unreadable=str(err), node=node)
    return SiteReply(site, metrics, weights, node=node, relative=is_update(msg.content))


def flower_aggregate(
    strategy: Strategy,
    server_round: int,
    accepted: list[SiteReply],
    replies: list[Message],
    sent: Weights,
) -> Weights | None:
    """Aggregate the accepted replies with the strategy's own rule (in float32, as Flower's
    strategies expect); None when it returns no model. ``sent``: the model the sites trained
    from, to which their updates are added (Flower's rules read trained weights)."""
    # each accepted update by the node that sent it (not by the site name it claims), in the
    # named float32 arrays the strategy's rules read, like the record it was configured with
    updates = {r.node: r for r in accepted if r.weights is not None}
    chosen = []
    for msg in replies:
        reply = updates.pop(msg.metadata.src_node_id, None)
        if reply is None or reply.weights is None or msg.has_error():
            continue
        trained = applied(reply.weights, sent) if reply.relative else reply.weights
        msg.content[ARRAYS] = as_record(trained)
        chosen.append(msg)
    arrays, _ = strategy.aggregate_train(server_round, chosen)
    if arrays is None:
        return None
    return {k: v.numpy().astype(np.float32, copy=False) for k, v in arrays.items()}
