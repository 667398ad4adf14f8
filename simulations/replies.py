"""Flower train replies made on this machine, as if hospitals had sent them: for the server's
aggregation tests and benchmark, which exercise the strategy without a network."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

SERVER_NODE = 0


def _identify_as_server() -> None:
    # Messages take their run and sender from the running task; here there is none.
    TaskIdentity.run_id = 1
    TaskIdentity.task_id = 1
    TaskIdentity.node_id = SERVER_NODE


def train_reply(
    site: str,
    node_id: int,
    arrays: ArrayRecord | Mapping[str, np.ndarray] | None,
    metrics: Mapping[str, int | float],
) -> Message:
    """Site ``site``'s reply (from node ``node_id``) to a train message."""
    _identify_as_server()
    request = Message(content=RecordDict(), dst_node_id=node_id, message_type="train")
    if arrays is not None and not isinstance(arrays, ArrayRecord):
        arrays = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
    content = RecordDict(
        {
            "metrics": MetricRecord(dict(metrics)),
            "site": ConfigRecord({"name": site, "status": "ok"}),
        }
    )
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=content, reply_to=request)
