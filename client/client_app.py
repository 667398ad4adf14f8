"""The Flower ClientApp run at every hospital (deployment) or per simulated site.

A thin adapter: it turns Flower messages into calls of :mod:`client.rounds` and back. The site's
data folder, name, state folder and privacy budget come from the SuperNode's node config (in a
simulation, from the driver that stands in for the sites), never from the server.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedct.client.rounds import Metrics, evaluate_round, train_round
from fedct.common.config import FederationConfig, SiteConfig
from fedct.common.version import require_same_version
from fedct.common.weights import Weights

log = logging.getLogger(__name__)

app = ClientApp()


def run_settings(context: Context) -> FederationConfig:
    """The run's settings, refused (before anything is read or trained) when the server runs
    another FedCT version than the one installed at this hospital."""
    fed = FederationConfig.from_mapping(context.run_config)
    require_same_version(fed.fedct_version)
    return fed


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


def _weights(msg: Message) -> Weights:
    record = msg.content.array_records["arrays"]
    return {k: v.numpy() for k, v in record.items()}


def _reply(
    msg: Message, site: SiteConfig, metrics: Metrics, weights: Weights | None, status: str
) -> Message:
    content = RecordDict(
        {
            "metrics": MetricRecord(metrics),
            "site": ConfigRecord({"name": site.site_name, "status": status}),
        }
    )
    if weights is not None:
        content["arrays"] = ArrayRecord({k: Array(v) for k, v in weights.items()})
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    start = time.perf_counter()
    fed = run_settings(context)
    site = site_config(context, fed)
    server_round = int(str(msg.content.config_records["config"]["server-round"]))
    reply = train_round(site, fed, _weights(msg), server_round=server_round)
    # the whole local step (data from the cache, model, training, ledger), for the overhead
    # benchmark: what the round takes beyond this is the federation's cost
    metrics = {**reply.metrics, "handler-seconds": time.perf_counter() - start}
    return _reply(msg, site, metrics, reply.weights, reply.status)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    fed = run_settings(context)
    site = site_config(context, fed)
    config = msg.content.config_records.get("config", ConfigRecord())
    model_hu = config.get("train-hu-quantiles")  # the federation's, once a round has trained
    metrics = evaluate_round(
        site,
        fed,
        _weights(msg),
        model_hu=[float(v) for v in model_hu] if isinstance(model_hu, list) else None,
    )
    return _reply(msg, site, metrics, None, "ok")
