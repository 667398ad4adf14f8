"""The Flower ClientApp run at every hospital (deployment) or per simulated site.

A thin adapter: it turns Flower messages into calls of :mod:`client.rounds` and back. The site's
data folder, name, state folder and privacy budget come from the SuperNode's node config (in a
simulation, from the driver that stands in for the sites), never from the server.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from safetensors import SafetensorError

from fedct.client import model_cache
from fedct.client.bundle_check import BUNDLE_HASH_ENV
from fedct.client.rounds import Metrics, evaluate_round, train_round
from fedct.common import audit
from fedct.common.config import FederationConfig, SiteConfig
from fedct.common.flower_records import (
    ARRAYS,
    HOLDS,
    MODEL_NEEDED,
    model_ref,
    packed_of,
    put_update,
)
from fedct.common.version import FEDCT_VERSION, VersionMismatchError, require_same_version
from fedct.common.weights import Weights, unpack

log = logging.getLogger(__name__)

app = ClientApp()


def run_settings(context: Context) -> FederationConfig:
    """The run's settings, refused (before anything is read or trained) when the server runs
    another FedCT version than the one installed at this hospital; the refusal is audited."""
    fed = FederationConfig.from_mapping(context.run_config)
    try:
        require_same_version(fed.fedct_version)
    except VersionMismatchError as err:
        node = dict(context.node_config)
        if {"site-name", "data-dir", "state-dir"} <= node.keys():  # a hospital's SuperNode
            site = SiteConfig.from_mapping(node)
            audit.append(
                Path(site.state_dir),
                {
                    "kind": "run",
                    "run-id": context.run_id,
                    "status": "refused",
                    "reason": str(err),
                    "config-digest": audit.config_digest(context.run_config),
                },
            )
        raise
    return fed


def _audit(
    site: SiteConfig,
    context: Context,
    kind: str,
    server_round: int,
    reply: Message,
    model: dict[str, str | None],
) -> None:
    """One audit record per message: what the run asked, which model the site used (``model``:
    received or kept, and its digest), and what left the site (byte counts and metric names,
    never values)."""
    content = reply.content
    metrics = content.metric_records["metrics"]
    arrays = content.array_records.get(ARRAYS)
    audit.append(
        Path(site.state_dir),
        {
            "kind": kind,
            "run-id": context.run_id,
            "round": server_round,
            "fedct-version": FEDCT_VERSION,
            "config-digest": audit.config_digest(context.run_config),
            # set by FedCT's site executor once it checked the bundle (absent with --cold)
            "bundle-sha256": os.environ.get(BUNDLE_HASH_ENV),
            "status": str(content.config_records["site"]["status"]),
            "sent": {
                "arrays-bytes": sum(len(a.data) for a in arrays.values()) if arrays else 0,
                "metrics": sorted(metrics),
            },
            "epsilon": metrics.get("epsilon"),
            "model": model,
        },
    )


def site_config(context: Context, fed: FederationConfig) -> SiteConfig:
    node = dict(context.node_config)
    if "partition-id" in node:  # a simulated site: the driver laid the sites out by index
        sites = sorted(p for p in Path(fed.data_root).iterdir() if p.is_dir())
        site = sites[int(node["partition-id"])]
        return SiteConfig(
            site_name=site.name,
            data_dir=str(site),
            state_dir=str(Path(fed.output_dir) / "sites" / site.name),
            epsilon=fed.epsilon,
            delta=fed.delta,
            dp=fed.dp,
        )
    return SiteConfig.from_mapping(node)


@dataclass(frozen=True)
class ServerModel:
    """The global model a message brought, and where this site took it from."""

    weights: Weights
    source: str  # "received": in the message | "kept": the site's copy the server named
    sha256: str | None = None  # the kept model's digest (for an evaluation: as kept now)

    def audited(self) -> dict[str, str | None]:
        return {"source": self.source, "sha256": self.sha256}


def _received(msg: Message) -> ServerModel:
    try:
        flat, layout = packed_of(msg.content)
    except ValueError as err:
        raise ValueError(f"the server's model cannot be read: {err}") from err
    return ServerModel(unpack(flat, layout), "received")


def _kept(site: SiteConfig, context: Context, sha256: str) -> ServerModel:
    """The model the server named by ``sha256``, from this site's cache (ModelNotKeptError)."""
    flat, layout = model_cache.load(Path(site.state_dir), sha256, run_id=context.run_id)
    return ServerModel(unpack(flat, layout), "kept", sha256)


def _keep(site: SiteConfig, context: Context, msg: Message) -> str | None:
    """Keep the model a message carries for the next round's training; its digest, or None
    when it could not be kept (the server then sends that model again)."""
    try:
        flat, layout = packed_of(msg.content)
        return model_cache.keep(Path(site.state_dir), flat, layout, run_id=context.run_id)
    except (OSError, ValueError, SafetensorError) as err:  # a full disk: safetensors' error
        log.warning("could not keep the evaluated model for the next round: %s", err)
        return None


def _reply(
    msg: Message,
    site: SiteConfig,
    metrics: Metrics,
    status: str,
    update: tuple[Weights, Weights] | None = None,
    dtype: str = "float16",
    holds: str | None = None,
) -> Message:
    about = ConfigRecord({"name": site.site_name, "status": status})
    if holds is not None:  # the model this site keeps: next round it need not be sent again
        about[HOLDS] = holds
    content = RecordDict({"metrics": MetricRecord(metrics), "site": about})
    if update is not None:  # (trained, received): sent as the update, in ``dtype``
        put_update(content, *update, dtype)
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    fed = run_settings(context)
    site = site_config(context, fed)
    server_round = int(str(msg.content.config_records["config"]["server-round"]))
    sha256 = model_ref(msg.content)
    try:
        model = _received(msg) if sha256 is None else _kept(site, context, sha256)
    except model_cache.ModelNotKeptError as err:
        log.warning("round %d: %s; asking the server for the model", server_round, err)
        out = _reply(msg, site, {}, MODEL_NEEDED)
        _audit(site, context, "train", server_round, out, {"source": "missing", "sha256": sha256})
        return out
    # the whole local step (data from the cache, the model built, training, ledger), for the
    # overhead benchmark: what the round takes beyond this (getting the model included, from
    # the message or from the site's cache) is the federation's cost
    start = time.perf_counter()
    reply = train_round(site, fed, model.weights, server_round=server_round)
    metrics = {**reply.metrics, "handler-seconds": time.perf_counter() - start}
    update = None if reply.weights is None else (reply.weights, model.weights)
    out = _reply(msg, site, metrics, reply.status, update, fed.update_dtype)
    _audit(site, context, "train", server_round, out, model.audited())
    return out


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    fed = run_settings(context)
    site = site_config(context, fed)
    config = msg.content.config_records.get("config", ConfigRecord())
    model_hu = config.get("train-hu-quantiles")  # the federation's, once a round has trained
    model = _received(msg)
    with ThreadPoolExecutor(max_workers=1) as pool:
        # kept while the site evaluates (hashing and the file write overlap it): the ~0.1 s a
        # 45 MB model takes to keep is mostly off the evaluation phase's path
        keeping = pool.submit(_keep, site, context, msg) if fed.model_cache else None
        metrics = evaluate_round(
            site,
            fed,
            model.weights,
            model_hu=[float(v) for v in model_hu] if isinstance(model_hu, list) else None,
        )
    holds = keeping.result() if keeping is not None else None
    out = _reply(msg, site, metrics, "ok", holds=holds)
    server_round = int(str(config.get("server-round", 0)))
    _audit(site, context, "evaluate", server_round, out, replace(model, sha256=holds).audited())
    return out
