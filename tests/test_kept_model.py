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

from fedct.common.audit import AUDIT_FILE
from fedct.common.config import FederationConfig, app_defaults
from fedct.common.flower_records import (
    ARRAYS,
    HOLDS,
    MODEL_NEEDED,
    MODEL_REF,
    is_update,
    model_of,
    model_ref,
    packed_of,
    put_model,
    put_model_ref,
)
from fedct.common.models import build_model
from fedct.common.weights import digest, model_weights
from fedct.server import server_app
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
    """Flower's Grid as send_and_receive uses it: each message is answered by ``answer``; the
    replies of the nodes in ``slow`` come only after that many pulls. ``log`` records what was
    pushed to and pulled from which node, in order."""

    def __init__(self, answer: Callable[[Message], Message], slow: dict[int, int] | None = None):
        self.answer = answer
        self.slow = dict(slow or {})
        self.sent: list[Message] = []
        self.log: list[tuple[str, int]] = []
        self._replies: dict[str, Message] = {}

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id  # as Flower does
            self.sent.append(message)
            self.log.append(("push", message.metadata.dst_node_id))
            self._replies[message.object_id] = self.answer(message)
            ids.append(message.object_id)
        return ids

    def pull_messages(self, ids: Iterable[str]) -> list[Message]:
        got = []
        for i in list(ids):
            reply = self._replies.get(i)
            if reply is None:
                continue
            node = reply.metadata.src_node_id
            if self.slow.get(node, 0) > 0:
                self.slow[node] -= 1
                continue
            got.append(self._replies.pop(i))
            self.log.append(("pull", node))
        return got


def _lost_by(*nodes: int) -> Callable[[Message], Message]:
    """Sites that answer a named model with "not kept here" (any other message: trained)."""

    def answer(message: Message) -> Message:
        named = model_ref(message.content) is not None
        lost = named and message.metadata.dst_node_id in nodes
        return _reply(message, MODEL_NEEDED if lost else "ok")

    return answer


def _fed(**settings: object) -> FederationConfig:
    return FederationConfig.from_mapping({**app_defaults(), **settings})


@pytest.fixture(autouse=True)
def _no_poll_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_app, "REPLY_POLL_S", 0.0)


def test_a_site_that_no_longer_keeps_the_model_is_sent_it_at_once() -> None:
    kept = _evaluated([1, 2], keeping={1, 2})
    grid = _Grid(_lost_by(2), slow={1: 3})  # site 1 trains longer than the miss takes
    report = RoundReport(1, set())
    fed = _fed(**{"transfer-dtype": "float32"})
    replies = _train_phase(grid, fed, _messages(1, 2), MODEL, kept, report)  # type: ignore[arg-type]
    assert sorted(str(r.content.config_records["site"]["status"]) for r in replies) == ["ok", "ok"]
    # the model went to site 2 as soon as it asked, not after site 1's reply
    assert grid.log == [
        ("push", 1),
        ("push", 2),
        ("pull", 2),
        ("push", 2),
        ("pull", 2),
        ("pull", 1),
    ]
    resent = grid.sent[2].content
    assert model_ref(resent) is None  # the second time, the model itself
    np.testing.assert_array_equal(model_of(resent)["conv.weight"], MODEL["conv.weight"])
    assert resent.config_records["config"]["server-round"] == 1
    assert report.details["model-kept-by"] == 1


def test_no_model_is_sent_when_the_round_has_no_time_left() -> None:
    kept = _evaluated([1, 2], keeping={1, 2})
    grid = _Grid(_lost_by(2))
    fed = _fed(**{"round-timeout": 1e-9})
    replies = _train_phase(grid, fed, _messages(1, 2), MODEL, kept, RoundReport(1, set()))  # type: ignore[arg-type]
    assert [m.metadata.dst_node_id for m in grid.sent] == [1, 2]  # it would train unheard
    assert [r.metadata.src_node_id for r in replies] == [1]


def test_only_a_site_that_was_named_the_model_is_sent_it_again() -> None:
    kept = _evaluated([1, 2], keeping={1})  # site 2 was sent the model in any case
    grid = _Grid(_reply_needed_always)
    report = RoundReport(1, set())
    replies = _train_phase(grid, _fed(), _messages(1, 2), MODEL, kept, report)  # type: ignore[arg-type]
    assert [m.metadata.dst_node_id for m in grid.sent] == [1, 2, 1]
    assert {r.metadata.src_node_id for r in replies} == {1, 2}
    assert report.details["model-kept-by"] == 0


def _reply_needed_always(message: Message) -> Message:
    """A site (or a stranger) that answers everything with "not kept here"."""
    return _reply(message, MODEL_NEEDED)


def test_with_the_model_cache_off_nothing_is_named_or_kept(tiny_site: Path, tmp_path: Path) -> None:
    from fedct.client import client_app

    context = _site_context(tiny_site, tmp_path / "state", **{"model-cache": False})
    reply = client_app.evaluate(_evaluate_message(context), context)
    assert HOLDS not in reply.content.config_records["site"]
    assert not (tmp_path / "state" / "model-cache").exists()
    # and the ServerApp, which then keeps no KeptModel (_evaluate), names nothing
    grid = _Grid(_lost_by())
    off = _fed(**{"model-cache": False})
    _train_phase(grid, off, _messages(1, 2), MODEL, None, RoundReport(1, set()))  # type: ignore[arg-type]
    assert [model_ref(m.content) for m in grid.sent] == [None, None]


def _site_context(data: Path, state: Path, **settings: object) -> Context:
    fast = {"image-size": 32, "min-eval-cases": 1, "min-eval-patients": 1, "batch-size": 8}
    return Context(
        run_id=7,
        node_id=1,
        node_config={"site-name": "a", "data-dir": str(data), "state-dir": str(state)},
        state=RecordDict(),
        run_config={**app_defaults(), "planned-rounds": 1, **fast, **settings},
    )


def _start_model(context: Context) -> dict[str, np.ndarray]:
    fed = FederationConfig.from_mapping(context.run_config)
    return model_weights(build_model(fed.model_config))


def _evaluate_message(context: Context) -> Message:
    (message,) = _messages(1, kind="evaluate")
    message.content["config"] = ConfigRecord({"server-round": 0})
    put_model(message.content, _start_model(context), "float32")
    return message


def _named(sha256: str) -> Message:
    (message,) = _messages(1)
    put_model_ref(message.content, sha256)
    return message


def _audit_records(state: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (state / AUDIT_FILE).open()]


def test_a_site_trains_from_the_model_it_kept_when_it_evaluated_it(
    tiny_site: Path, tmp_path: Path
) -> None:
    """The ClientApp: evaluating keeps the model and says so; a training message that names
    it trains from that copy, and the update is relative to exactly that (float32) model."""
    from fedct.client import client_app

    state = tmp_path / "state"
    context = _site_context(tiny_site, state)
    evaluation = _evaluate_message(context)
    sent = digest(*packed_of(evaluation.content))
    reply = client_app.evaluate(evaluation, context)
    assert reply.content.config_records["site"][HOLDS] == sent

    trained = client_app.train(_named(sent), context)
    assert trained.content.config_records["site"]["status"] == "ok"
    assert is_update(trained.content)
    update = model_of(trained.content)
    start = _start_model(context)
    assert set(update) == set(start)
    assert any(np.abs(update[k]).max() > 0 for k in update)  # it trained
    records = _audit_records(state)
    assert [r["kind"] for r in records] == ["evaluate", "train"]
    assert records[0]["model"] == {"source": "received", "sha256": sent}
    assert records[1]["model"] == {"source": "kept", "sha256": sent}


def test_a_site_never_trains_from_a_model_it_does_not_keep_intact(
    tiny_site: Path, tmp_path: Path
) -> None:
    """A named model that is not kept, or whose copy is damaged, is asked for (and audited),
    never trained from: no privacy budget is spent."""
    from fedct.client import client_app

    state = tmp_path / "state"
    context = _site_context(tiny_site, state)
    reply = client_app.train(_named("ab" * 32), context)
    assert reply.content.config_records["site"]["status"] == MODEL_NEEDED
    assert ARRAYS not in reply.content.array_records
    sent = digest(*packed_of(_evaluate_message(context).content))
    client_app.evaluate(_evaluate_message(context), context)
    (copy,) = (state / "model-cache").glob("*.safetensors")
    data = bytearray(copy.read_bytes())
    data[-5] ^= 0x40
    copy.write_bytes(bytes(data))
    reply = client_app.train(_named(sent), context)
    assert reply.content.config_records["site"]["status"] == MODEL_NEEDED
    assert not (state / "privacy-ledger.json").exists()
    trained = [r for r in _audit_records(state) if r["kind"] == "train"]
    assert [r["model"] for r in trained] == [
        {"source": "missing", "sha256": "ab" * 32},
        {"source": "missing", "sha256": sent},
    ]
    assert {r["status"] for r in trained} == {MODEL_NEEDED}


def test_a_model_that_cannot_be_kept_still_gets_evaluated(
    tiny_site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors import SafetensorError

    from fedct.client import client_app, model_cache

    def full_disk(*args: object, **kwargs: object) -> None:
        raise SafetensorError("No space left on device (os error 28)")

    monkeypatch.setattr(model_cache, "save_file", full_disk)
    context = _site_context(tiny_site, tmp_path / "state")
    reply = client_app.evaluate(_evaluate_message(context), context)
    assert reply.content.config_records["site"]["status"] == "ok"
    assert reply.content.metric_records["metrics"]["num-examples"] > 0
    assert HOLDS not in reply.content.config_records["site"]  # the server will send it


@pytest.mark.parametrize("bad", [1, None, "ab" * 31, "../" * 22])
def test_a_reference_without_a_digest_is_refused(bad: object) -> None:
    content = RecordDict({MODEL_REF: ConfigRecord({} if bad is None else {"sha256": bad})})
    with pytest.raises(ValueError, match="without a digest"):
        model_ref(content)
