"""FedCT's SuperExec for a hospital: the warm, checking executor of its ClientApp tasks.

`fedct client` starts ``flower-supernode --isolation process``, which leaves running each task
(one train or evaluate message) to an external SuperExec, and this module as that SuperExec.
Flower's own loop (:func:`flwr.supercore.superexec.run_superexec.run_superexec`: acquire a task
token from the SuperNode's local Runtime API, launch it) runs unchanged, with one executor of
ours in place of Flower's subprocess executor. Each task then runs Flower's own ClientApp
runner (:func:`flwr.supernode.runtime.run_clientapp.run_clientapp`, what ``flwr-clientapp``
runs) with two differences:

- **Warm.** The task's process is forked from a server process that imported PyTorch,
  torchvision, Opacus, Flower and FedCT's ClientApp once, at start (the standard library's
  ``multiprocessing`` forkserver with preloaded modules), instead of a fresh interpreter that
  imports them again for every message. Each task still gets a process of its own, so a task
  that crashes costs its own reply only, and nothing of one task's memory reaches the next.
- **Checked.** Before Flower unpacks the run's app bundle, the bundle is checked
  (:func:`client.bundle_check.check_bundle`: no code, FedCT's ClientApp, the same version,
  optionally a pinned hash). A refused bundle never runs: the refusal goes to the site's audit
  log and, through Flower's own error path, back to the server as the task's error reply.

The check wraps the name ``install_from_fab`` inside Flower's runner module: Flower 1.41 offers
no hook between pulling a task's bundle and loading its code, and that call is exactly that
point. ``tests/test_site_executor.py`` fails if a Flower upgrade moves it.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import multiprocessing.context
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedct.client.bundle_check import BUNDLE_HASH_ENV, BundleRefusedError, check_bundle
from fedct.common import audit

log = logging.getLogger(__name__)

# imported once by the warm server; every task's process is forked from it
PRELOAD = (
    "torch",
    "torchvision",
    "opacus",
    "fedct.client.client_app",
    "fedct.common.gradcam",  # pytorch-grad-cam imports matplotlib: ~0.65 s per evaluation
    "flwr.supernode.runtime.run_clientapp",
)


def _refuse(state_dir: Path, err: BundleRefusedError, run_id: int | None) -> None:
    log.error("refused the run's app bundle: %s", err)
    audit.append(
        state_dir,
        {
            "kind": "run",
            "run-id": run_id,
            "status": "refused",
            "bundle-sha256": err.sha256,
            "reason": str(err),
        },
    )


def run_task(
    runtime_api_address: str,
    token: str,
    insecure: bool,
    root_certificates_path: str | None,
    parent_pid: int | None,
    state_dir: str,
) -> None:
    """One ClientApp task, in a process of its own: Flower's runner with the bundle check."""
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime import run_clientapp as runner

    from fedct.common.flower_pacing import pace_object_pulls

    pace_object_pulls()  # the model may still be arriving at the SuperNode
    unpack = runner.install_from_fab

    def checked_unpack(content: bytes, *args: Any, **kwargs: Any) -> Any:
        try:
            bundle = check_bundle(content, Path(state_dir))
        except BundleRefusedError as err:
            _refuse(Path(state_dir), err, TaskIdentity.run_id)
            raise
        # this task's process only: the ClientApp's audit record names the bundle it ran
        os.environ[BUNDLE_HASH_ENV] = bundle.sha256
        return unpack(content, *args, **kwargs)

    runner.install_from_fab = checked_unpack  # type: ignore[assignment]
    runner.run_clientapp(
        runtime_api_address=runtime_api_address,
        token=token,
        insecure=insecure,
        certificates=validate_and_resolve_root_certificates(root_certificates_path, insecure),
        parent_pid=parent_pid,
        runtime_dependency_install=False,  # a hospital installs nothing a run asks for
    )


def _warm_up() -> None:
    """Nothing: starting it makes the forkserver import ``PRELOAD`` now, not at the first task."""


class WarmExecutor:
    """Flower's executor protocol (``flwr.supercore.superexec.executor.types.Executor``):
    ClientApp tasks are forked from the warm server; any other task type goes to Flower's
    subprocess executor."""

    def __init__(
        self,
        state_dir: Path,
        *,
        preload: tuple[str, ...] = PRELOAD,
        target: Callable[..., None] = run_task,  # tests: a module-level stand-in
    ) -> None:
        from flwr.supercore.superexec.executor import SubprocessExecutor

        self.state_dir = state_dir
        self._target = target
        self._fallback = SubprocessExecutor()
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(list(preload))
        self._running: list[multiprocessing.process.BaseProcess] = []
        warm = self._context.Process(target=_warm_up, daemon=False)
        warm.start()
        warm.join()

    def get_eligible_capacity(
        self, supported_task_types: set[Any], **kwargs: Any
    ) -> tuple[set[Any], set[str]]:
        return self._fallback.get_eligible_capacity(supported_task_types, **kwargs)

    def wait_for_capacity(self, task_type: Any = None, **kwargs: Any) -> None:
        self._fallback.wait_for_capacity(task_type, **kwargs)

    def launch(self, spec: Any) -> Any:
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP:
            return self._fallback.launch(spec)
        process = self._context.Process(
            target=self._target,
            args=(
                spec.runtime_api_address,
                spec.token,
                spec.insecure,
                spec.root_certificates_path,
                spec.parent_pid,
                str(self.state_dir),
            ),
            name=f"fedct-task-{spec.task_id}",
        )
        try:
            process.start()  # a dead warm server is started again here, imports and all
        except OSError as err:
            return LaunchResult.failed(f"could not fork the task's process: {err}")
        self._running.append(process)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap the tasks that ended (a crashed one ended its own reply only)."""
        for process in [p for p in self._running if not p.is_alive()]:
            process.join()
            if process.exitcode not in (0, None):
                log.warning("task process %s exited with code %s", process.name, process.exitcode)
            self._running.remove(process)

    def close(self) -> None:
        for process in self._running:
            if process.is_alive():
                process.terminate()
        for process in self._running:
            process.join(timeout=5.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--state", type=Path, required=True, help="the site's state folder")
    parser.add_argument("--parent-pid", type=int)
    args = parser.parse_args(argv)

    from flwr.supercore.superexec import run_superexec as superexec

    executor = WarmExecutor(args.state.resolve())
    # Flower's loop, our executor: its factory is the one name to replace
    superexec.get_executor = lambda *_a, **_k: executor
    superexec.run_superexec(
        runtime_api_address=args.runtime_api_address,
        insecure=True,  # the SuperNode's Runtime API listens on this host's loopback only
        parent_pid=args.parent_pid or os.getppid(),
        runtime_dependency_install=False,
    )


if __name__ == "__main__":
    main()
