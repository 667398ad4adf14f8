"""FedCT's pacing of Flower's transport waits (common/flower_pacing.py) and guards that the
Flower code it paces is still where it was."""

from __future__ import annotations

import inspect
import time
import types

import pytest

from fedct.common import flower_pacing


def test_flower_still_waits_where_fedct_paces() -> None:
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supernode import start_client_internal as sci

    loop = inspect.getsource(sci.start_client_internal)
    assert "time.sleep(3)" in loop
    assert "_push_messages(" in loop
    assert "time.sleep(0.5)" in inspect.getsource(sci._push_messages)
    for fn in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        defaults = fn.__kwdefaults__ or {}
        assert {"initial_backoff", "backoff_cap", "max_tries_per_object"} <= defaults.keys()
        assert defaults["max_time"] >= 3600  # what bounds a pull once tries are unbounded


def _fake_supernode() -> types.ModuleType:
    module = types.ModuleType("fake_sci")
    module.time = time  # type: ignore[attr-defined]
    module.pushed = 0  # type: ignore[attr-defined]

    def _push_messages() -> None:
        module.pushed += 1  # type: ignore[attr-defined]

    module._push_messages = _push_messages  # type: ignore[attr-defined]
    return module


def test_idle_poll_grows_with_idle_time(monkeypatch: pytest.MonkeyPatch) -> None:
    module = _fake_supernode()
    clock = {"now": 1000.0}
    slept: list[float] = []
    monkeypatch.setattr(flower_pacing.time, "monotonic", lambda: clock["now"])
    monkeypatch.setattr(flower_pacing.time, "sleep", slept.append)
    flower_pacing.pace_supernode(module)

    module._push_messages()  # a reply went out: the site is active now
    assert module.pushed == 1
    module.time.sleep(3)  # Flower's idle poll, right after the reply
    clock["now"] += 20.0
    module.time.sleep(3)  # 20 s idle: 5% of it
    clock["now"] += 600.0
    module.time.sleep(3)  # idle for long: Flower's own 3 s
    module.time.sleep(0.5)  # waiting on the task's reply, local
    module.time.sleep(7)  # any other wait is Flower's
    assert slept == [pytest.approx(0.1), pytest.approx(1.0), 3.0, 0.02, 7]
    assert module.time.monotonic is flower_pacing.time.monotonic  # the rest is `time`


def test_pulls_retry_soon(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

    for fn in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        monkeypatch.setattr(fn, "__kwdefaults__", dict(fn.__kwdefaults__ or {}))
    flower_pacing.pace_object_pulls()
    tries = {"n": 0}

    def pull(object_id: str) -> bytes:  # there on the sixth try
        tries["n"] += 1
        if tries["n"] < 6:
            raise ObjectUnavailableError(object_id)
        return b"content"

    start = time.monotonic()
    assert inflatable_utils.pull_objects(["a"], pull) == {"a": b"content"}
    assert inflatable_utils.pull_objects.__kwdefaults__["max_tries_per_object"] is None
    # 0.05 + 0.1 + 0.2 + 0.2 + 0.2 s (with Flower's own backoff: 1 + 2 + 4 + 8 + 10 s)
    assert time.monotonic() - start < 1.2
