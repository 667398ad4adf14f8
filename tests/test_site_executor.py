"""FedCT's warm site executor without a federation: tasks forked from the warm server, a task
that crashes costs only itself, and a warm server that died is replaced at the next task (the
e2e tests in test_trust_e2e.py and test_deployment_e2e.py run it under a real SuperNode)."""

from __future__ import annotations

import os
import signal
import time
from multiprocessing import forkserver
from pathlib import Path

import pytest
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResultStatus

from fedct.client.site_executor import WarmExecutor


def write_pid(address: str, token: str, *_args: object) -> None:
    """A stand-in task: the runtime address is a file to write, the token its content."""
    Path(address).write_text(f"{token} {os.getpid()} {os.getppid()}")


def crash(*_args: object) -> None:
    os._exit(3)


def _spec(address: str, token: str, task_id: int = 1) -> ExecutionSpec:
    return ExecutionSpec(
        task_type=TaskType.CLIENT_APP,
        runtime_api_address=address,
        token=token,
        insecure=True,
        root_certificates_path=None,
        runtime_dependency_install=False,
        parent_pid=None,
        suppress_output=False,
        task_id=task_id,
    )


def _wait_reaped(executor: WarmExecutor, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while executor._running and time.monotonic() < deadline:
        time.sleep(0.05)
        executor.reconcile()
    assert not executor._running


def test_tasks_fork_from_the_warm_server_and_a_dead_server_is_replaced(tmp_path: Path) -> None:
    executor = WarmExecutor(tmp_path, preload=("json",), target=write_pid)
    try:
        out = tmp_path / "first"
        assert executor.launch(_spec(str(out), "tok-1")).status == LaunchResultStatus.ACCEPTED
        _wait_reaped(executor)
        token, pid, parent = out.read_text().split()
        server = forkserver._forkserver._forkserver_pid  # type: ignore[attr-defined]
        assert token == "tok-1"
        assert int(parent) == server != os.getpid()  # forked by the warm server, not by us
        assert int(pid) != server

        os.kill(server, signal.SIGKILL)  # the warm server dies ...
        while Path(f"/proc/{server}/stat").read_text().split()[2] != "Z":
            time.sleep(0.05)  # (left for the executor to notice and reap)
        out = tmp_path / "second"
        assert executor.launch(_spec(str(out), "tok-2", 2)).status == LaunchResultStatus.ACCEPTED
        _wait_reaped(executor)
        assert out.read_text().split()[0] == "tok-2"  # ... and the next task gets a fresh one
        assert forkserver._forkserver._forkserver_pid != server  # type: ignore[attr-defined]
    finally:
        executor.close()


def test_a_crashing_task_costs_only_itself(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    executor = WarmExecutor(tmp_path, preload=("json",), target=crash)
    try:
        executor.launch(_spec("unused", "tok"))
        with caplog.at_level("WARNING", logger="fedct.client.site_executor"):
            _wait_reaped(executor)
        assert "exited with code 3" in caplog.text
        executor._target = write_pid
        out = tmp_path / "after"
        executor.launch(_spec(str(out), "next", 2))
        _wait_reaped(executor)
        assert out.read_text().startswith("next ")
    finally:
        executor.close()
