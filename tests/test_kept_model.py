"""The model a site kept from evaluating it: named instead of sent to train, and sent after
all when the site no longer keeps it (server/strategy.py, server/server_app.py,
client/client_app.py)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedct.common.config import FederationConfig, app_defaults
from fedct.common.flower_records import (
    ARRAYS,
    HOLDS,
    MODEL_NEEDED,
    MODEL_REF,
    model_of,
    model_ref,
    packed_of,
)
from fedct.common.weights import digest
from fedct.server.round_report import RoundReport
from fedct.server.server_app import _train_phase
from fedct.server.strategy import KeptModel, for_transfer, kept_model
from fedct.simulations.replies import _identify_as_server

MODEL = {"conv.weight": np.full((2, 3), 0.25, np.float32), "fc.bias": np.ones(2, np.float32)}


def _messages(*nodes: int, kind: str = "train") -> list[Message]:
    _identify_as_server()
    return [
        Message(
            RecordDict({"config": ConfigRecord({"server-round": 1}), ARRAYS: ArrayRecord()}),
            dst_node_id=n,
            message_type=kind,
        )
        for n in nodes
    ]


def _reply(request: Message, status: str = "ok", **site: str) -> Message:
    content = RecordDict(
        {
            "metrics": MetricRecord({"num-examples": 4}),
            "site": ConfigRecord(
                {"name": f"site-{request.metadata.dst_node_id}", "status": status, **site}
            ),
        }
    )
    return Message(content=content, reply_to=request)


def _evaluated(nodes: Iterable[int], keeping: set[int]) -> KeptModel:
    """Send MODEL to evaluate; the nodes in ``keeping`` answer with the digest they kept."""
    sent = for_transfer(_messages(*nodes, kind="evaluate"), MODEL, "float32")
    replies = []
    for message in sent:
        held = digest(*packed_of(message.content))
        keeps = message.metadata.dst_node_id in keeping
        replies.append(_reply(message, **({HOLDS: held} if keeps else {})))
    return kept_model(MODEL, sent, replies)


def test_a_model_is_named_only_to_the_sites_that_said_they_keep_it() -> None:
    kept = _evaluated([1, 2, 3], keeping={1, 3})
    assert kept.nodes == {1, 3}
    outgoing = for_transfer(_messages(1, 2, 3), MODEL, "float16", kept=kept)
    by_node = {m.metadata.dst_node_id: m.content for m in outgoing}
    for node in (1, 3):  # named: no arrays at all, not even the strategy's own record
        assert model_ref(by_node[node]) == kept.sha256
        assert ARRAYS not in by_node[node].array_records
    assert MODEL_REF not in by_node[2].config_records
    np.testing.assert_array_equal(model_of(by_node[2])["fc.bias"], MODEL["fc.bias"])
    assert model_of(by_node[2])["fc.bias"].dtype == np.float16  # transfer-dtype applies


def test_a_wrong_digest_or_another_model_is_never_named() -> None:
    sent = for_transfer(_messages(1, 2, kind="evaluate"), MODEL, "float32")
    replies = [_reply(sent[0], **{HOLDS: "0" * 64}), _reply(sent[1])]
    assert kept_model(MODEL, sent, replies).nodes == frozenset()
    kept = _evaluated([1], keeping={1})
    later = {k: v + 1 for k, v in MODEL.items()}  # the next round's model: not the kept one
    (message,) = for_transfer(_messages(1), later, "float32", kept=kept)
    assert model_ref(message.content) is None
    np.testing.assert_array_equal(model_of(message.content)["fc.bias"], later["fc.bias"])


class _Grid:
    """Flower's Grid as send_and_receive uses it: every message is answered at once."""

    def __init__(self, answer: Callable[[Message], Message]) -> None:
        self.answer = answer
        self.sent: list[Message] = []
        self._replies: dict[str, Message] = {}

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id  # as Flower does
            self.sent.append(message)
            self._replies[message.object_id] = self.answer(message)
            ids.append(message.object_id)
        return ids

    def pull_messages(self, ids: Iterable[str]) -> list[Message]:
        return [self._replies.pop(i) for i in list(ids) if i in self._replies]


def test_a_site_that_no_longer_keeps_the_model_is_sent_it_within_the_round() -> None:
    kept = _evaluated([1, 2], keeping={1, 2})

    def answer(message: Message) -> Message:
        lost = message.metadata.dst_node_id == 2 and model_ref(message.content) is not None
        return _reply(message, MODEL_NEEDED if lost else "ok")

    grid = _Grid(answer)
    fed = FederationConfig.from_mapping({**app_defaults(), "transfer-dtype": "float32"})
    report = RoundReport(1, set())
    replies = _train_phase(grid, fed, _messages(1, 2), MODEL, kept, report)  # type: ignore[arg-type]
    assert sorted(str(r.content.config_records["site"]["status"]) for r in replies) == ["ok", "ok"]
    assert [m.metadata.dst_node_id for m in grid.sent] == [1, 2, 2]
    assert model_ref(grid.sent[2].content) is None  # the second time, the model itself
    np.testing.assert_array_equal(
        model_of(grid.sent[2].content)["conv.weight"], MODEL["conv.weight"]
    )
    assert grid.sent[2].content.config_records["config"]["server-round"] == 1
    assert report.details["model-kept-by"] == 1
    # with model-cache off, everything is sent and nothing named
    grid = _Grid(answer)
    off = FederationConfig.from_mapping({**app_defaults(), "model-cache": False})
    _train_phase(grid, off, _messages(1, 2), MODEL, kept, RoundReport(1, set()))  # type: ignore[arg-type]
    assert [model_ref(m.content) for m in grid.sent] == [None, None]


def test_a_site_trains_only_from_a_kept_model_that_is_intact(
    tiny_site: Path, tmp_path: Path
) -> None:
    """The ClientApp: a named model it does not keep is asked for (and audited), never trained
    from; no privacy budget is spent."""
    from fedct.client import client_app

    state = tmp_path / "state"
    context = Context(
        run_id=7,
        node_id=1,
        node_config={"site-name": "a", "data-dir": str(tiny_site), "state-dir": str(state)},
        state=RecordDict(),
        run_config=app_defaults(),
    )
    (message,) = _messages(1)
    message.content.pop(ARRAYS)
    message.content[MODEL_REF] = ConfigRecord({"sha256": "ab" * 32})
    reply = client_app.train(message, context)
    assert reply.content.config_records["site"]["status"] == MODEL_NEEDED
    assert ARRAYS not in reply.content.array_records
    assert not (state / "privacy-ledger.json").exists()
    (record,) = [json.loads(line) for line in (state / "audit.jsonl").open()]
    assert record["model"] == {"source": "missing", "sha256": "ab" * 32}
    assert record["status"] == MODEL_NEEDED


@pytest.mark.parametrize("bad", [1, None])
def test_a_reference_without_a_digest_is_refused(bad: object) -> None:
    content = RecordDict({MODEL_REF: ConfigRecord({} if bad is None else {"sha256": bad})})
    with pytest.raises(ValueError, match="without a digest"):
        model_ref(content)
