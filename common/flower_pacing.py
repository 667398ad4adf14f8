"""Shorter waits inside Flower's message transport, for FedCT's own Flower processes.

Flower 1.41 moves a message as many objects (one per array, plus chunks) and, wherever one
side waits for the other, it sleeps for fixed times meant for idle fleets of phones, not for a
handful of hospitals with one message in flight each:

- the SuperNode asks the SuperLink for a message, and when there is none sleeps 3 s
  (``time.sleep(3)`` in ``flwr.supernode.start_client_internal.start_client_internal``); with
  FedCT's rounds a site's next message is almost always there a second after its last reply,
  so this alone added ~3 s to each round of each site;
- while a task runs, the SuperNode looks for its reply, and for each reply object, every 0.5 s
  (``_push_messages``);
- a process that pulls a message whose objects are still arriving (the ClientApp's task while
  its SuperNode is still downloading the model; the ServerApp while a reply is still being
  uploaded) backs off 1 s, then 2 s, 4 s ... up to 10 s (``pull_objects``' ``initial_backoff``
  and ``backoff_cap``); a 45 MB model arrives within a second, so the doubling alone wasted up
  to half of that after it had arrived.

Flower exposes none of these as settings, so FedCT sets them on Flower's own module globals and
function defaults, in its own processes only, and ``tests/test_flower_pacing.py`` fails when a
Flower upgrade moves them. Nothing here changes what is sent or to whom.

The SuperNode's idle poll is adaptive rather than simply shorter: right after it replied, a
site asks every 0.1 s, and the interval then grows with the time it has been idle
(``IDLE_POLL_SHARE`` of it, up to Flower's own 3 s), so the wait adds at most ~5% to any gap
and an idle site between runs polls as rarely as with stock Flower.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

# the SuperNode's poll for its next message: this share of the time idle, within these bounds
IDLE_POLL_SHARE = 0.05
IDLE_POLL_MIN_S = 0.1
IDLE_POLL_MAX_S = 3.0  # Flower's own interval
# waits on this process's own or its loopback peer's state (a reply, an object being stored)
LOCAL_WAIT_S = 0.02
# the first retry of an object that is not there yet, and the longest wait between retries
# (Flower: 1 s, doubling up to 10 s); they last only while an object is in transit
PULL_INITIAL_BACKOFF_S = 0.05
PULL_BACKOFF_CAP_S = 0.2

# the constants Flower 1.41 hard-codes at the places named above
FLOWER_IDLE_SLEEP_S = 3
FLOWER_LOCAL_SLEEP_S = 0.5


class _PacedTime:
    """Stands in for the ``time`` module inside Flower's SuperNode loop: the same module, with
    ``sleep`` paced as described above; every other attribute is the real ``time``'s."""

    def __init__(self, last_active: Callable[[], float]) -> None:
        self._last_active = last_active

    def sleep(self, seconds: float) -> None:
        if seconds == FLOWER_IDLE_SLEEP_S:
            idle = time.monotonic() - self._last_active()
            time.sleep(min(IDLE_POLL_MAX_S, max(IDLE_POLL_MIN_S, IDLE_POLL_SHARE * idle)))
        elif seconds == FLOWER_LOCAL_SLEEP_S:
            time.sleep(LOCAL_WAIT_S)
        else:
            time.sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def pace_supernode(module: ModuleType | None = None) -> None:
    """Pace the SuperNode loop of ``flwr.supernode.start_client_internal`` (call before
    Flower's ``flower_supernode`` starts it, in the SuperNode's own process)."""
    if module is None:
        from flwr.supernode import start_client_internal

        module = start_client_internal
    state = {"active": time.monotonic()}
    push = module._push_messages

    @functools.wraps(push)
    def pushed(*args: Any, **kwargs: Any) -> Any:
        try:
            return push(*args, **kwargs)
        finally:
            state["active"] = time.monotonic()

    module._push_messages = pushed  # type: ignore[attr-defined]
    module.time = _PacedTime(lambda: state["active"])  # type: ignore[attr-defined]


def pace_object_pulls() -> None:
    """Retry an object that is still arriving after 0.05 s, doubling up to 0.2 s (not 1 s up to
    10 s), in every pull this process makes (a SuperNode, a ClientApp task, the ServerApp).

    Flower also gives up on an object after 500 tries, which its own backoff spreads over ~80
    minutes but 0.2 s retries over ~100 s: a slow hospital link would fail a transfer that is
    merely slow. So the number of tries is left unbounded and Flower's own time limit
    (``max_time``, 2 hours) alone ends a pull."""
    from flwr.supercore.inflatable import inflatable_utils

    for fn in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        defaults = fn.__kwdefaults__
        paced = {"initial_backoff", "backoff_cap", "max_tries_per_object", "max_time"}
        if not defaults or not paced <= defaults.keys() or defaults["max_time"] is None:
            raise RuntimeError(f"Flower's {fn.__name__} has no backoff defaults any more")
        defaults["initial_backoff"] = PULL_INITIAL_BACKOFF_S
        defaults["backoff_cap"] = PULL_BACKOFF_CAP_S
        defaults["max_tries_per_object"] = None  # Flower's max_time still bounds the pull
