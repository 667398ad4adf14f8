"""Child processes FedCT starts (Flower's SuperLink, SuperNodes, the simulation engine).

Each runs in a process group of its own, and whoever starts one stops the whole group by that
group's id when done, on failure, on Ctrl-C and on SIGTERM: a process left behind would hold a
port, a GPU or CI's output open.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (the OS's choice)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class ChildExitedError(RuntimeError):
    """A child process stopped before it was ready."""


def start(
    args: Sequence[str],
    *,
    log: IO[Any] | int | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``args`` in a new session (its own process group); output to ``log`` if given."""
    return subprocess.Popen(
        list(args),
        stdout=log,
        stderr=subprocess.STDOUT if log is not None else None,
        env=env,
        cwd=cwd,
        start_new_session=True,
    )


def stop_group(child: subprocess.Popen[bytes]) -> None:
    """Stop the child's whole process group: SIGINT, then SIGTERM, then SIGKILL."""
    for sig, wait in ((signal.SIGINT, 10.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            break
        try:
            child.wait(timeout=wait)
            # the leader is gone; give the rest of the group a moment, then check again
            time.sleep(0.2)
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.wait(timeout=1.0)  # reap the leader


def interruptible() -> None:
    """Make SIGINT interrupt this process (``KeyboardInterrupt``) even if it was started with
    SIGINT ignored.

    A shell starts a script's background job (``fedct client ... &``) with SIGINT ignored, and
    Python then installs no handler for it: the command would ignore Ctrl-C and the SIGINT that
    :func:`stop_group` sends first, and stop only on the SIGTERM 10 s later. FedCT's commands
    stop cleanly on SIGINT, as Flower's processes do, so they take it back. Children they start
    inherit a handled signal as the default one."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM (a CI time limit, a service manager) into ``SystemExit`` while inside, so
    the caller's ``finally`` blocks run and stop its children."""

    def _raise(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def wait_for_port(
    host: str, port: int, child: subprocess.Popen[bytes], *, timeout: float, what: str
) -> None:
    """Wait until something accepts TCP connections on ``host:port``, or fail clearly."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise ChildExitedError(f"{what} exited with code {child.returncode} while starting")
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.settimeout(1.0)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.25)
    raise ChildExitedError(f"{what} did not listen on {host}:{port} within {timeout:.0f} s")
