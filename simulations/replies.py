"""Flower train replies made on this machine, as if hospitals had sent them: for the server's
aggregation tests and benchmark, which exercise the strategy without a network."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedct.common.flower_records import ARRAYS, LAYOUT, put_model, put_update

SERVER_NODE = 0


def _identify_as_server() -> None:
    # Messages take their run and sender from the running task; here there is none.
    TaskIdentity.run_id = 1
    TaskIdentity.task_id = 1
    TaskIdentity.node_id = SERVER_NODE


def train_reply(
    site: str,
    node_id: int,
    weights: Mapping[str, np.ndarray] | tuple[ArrayRecord, ConfigRecord] | None,
    metrics: Mapping[str, int | float],
    *,
    sent: Mapping[str, np.ndarray] | None = None,
) -> Message:
    """Site ``site``'s reply (from node ``node_id``) to a train message, with ``weights`` as
    named arrays or as the records ``model_records`` made; with ``sent`` (the model the site
    was sent), as a site sends them: the float16 update ``weights - sent``."""
    _identify_as_server()
    request = Message(content=RecordDict(), dst_node_id=node_id, message_type="train")
    content = RecordDict(
        {
            "metrics": MetricRecord(dict(metrics)),
            "site": ConfigRecord({"name": site, "status": "ok"}),
        }
    )
    if isinstance(weights, tuple):  # already packed (model_records), e.g. shared by many
        content[ARRAYS], content[LAYOUT] = weights
    elif weights is not None and sent is not None:
        put_update(content, dict(weights), dict(sent))
    elif weights is not None:
        dtype = np.result_type(*weights.values()).name if weights else "float32"
        put_model(content, dict(weights), dtype)
    return Message(content=content, reply_to=request)
