"""``fedct client``: a hospital's Flower SuperNode, started only on a usable data folder.

The hospital's own settings (site name, data folder, state folder, privacy budget) go into the
SuperNode's node config, which the server can neither read nor change. The SuperNode runs in a
process of its own (client/supernode.py: Flower's ``flower-supernode`` with its transport waits
paced), so this module does not import Flower.

By default the SuperNode runs with ``--isolation process`` and FedCT's own SuperExec beside it
(client/site_executor.py): it checks each run's app bundle before anything of it executes and
forks each task from a process that has PyTorch and FedCT imported already.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fedct.client.privacy import MARKER_FILE, read_entries
from fedct.client.rounds import open_site
from fedct.common.config import FederationConfig, SiteConfig, app_defaults
from fedct.common.flower_tools import executable, flower_environment, write_toml
from fedct.common.processes import sigterm_raises, start, stop_group

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeSettings:
    site: SiteConfig
    superlink: str  # HOST:PORT
    ca_cert: Path | None  # None with key None: --insecure
    auth_key: Path | None
    runtime_port: int = 9094  # this SuperNode's local port for its ClientApp processes
    # FedCT's paced SuperNode and checking, warm executor; False: Flower's own flower-supernode
    # and a flwr-clientapp per task
    warm: bool = True

    @property
    def state_dir(self) -> Path:
        return Path(self.site.state_dir)


def check_site(settings: NodeSettings) -> str:
    """Refuse (with the reason) a data folder or ledger the site could not train with.

    Returns a one-line summary (counts only) of what the site will train on. Reading the
    folder also fills the site's frame cache, so the first round starts faster.
    """
    fed = FederationConfig.from_mapping(app_defaults())
    data = open_site(settings.site, fed)  # raises SiteDataError with the reason
    if (settings.state_dir / MARKER_FILE).exists():
        entries = read_entries(settings.state_dir)  # raises LedgerError if damaged or missing
        spent = entries[-1].epsilon if entries else 0.0
        budget = f", privacy budget spent so far ε {spent:.2f} of {settings.site.epsilon:g}"
    else:
        budget = f", privacy budget ε {settings.site.epsilon:g}" if settings.site.dp else ""
    train = data.counts().get("train", {})
    counts = ", ".join(f"{label} {n}" for label, n in train.items())
    skipped = len(data.skipped)
    return f"{len(data.slices)} usable slices (train: {counts}), {skipped} skipped{budget}"


def supernode_args(settings: NodeSettings) -> list[str]:
    node_config = write_toml(
        settings.state_dir / "node-config.toml",
        {
            "site-name": settings.site.site_name,
            "data-dir": str(Path(settings.site.data_dir).resolve()),
            "state-dir": str(settings.state_dir.resolve()),
            "epsilon": float(settings.site.epsilon),
            "delta": float(settings.site.delta),
            "dp": settings.site.dp,
        },
    )
    # FedCT's: Flower's flower-supernode, its waits paced; cold: Flower's own, unchanged
    supernode = (
        [sys.executable, "-m", "fedct.client.supernode"]
        if settings.warm
        else [executable("flower-supernode")]
    )
    args = [
        *supernode,
        "--superlink",
        settings.superlink,
        "--node-config",
        str(node_config),
        "--port",
        str(settings.runtime_port),
    ]
    if settings.warm:
        args += ["--isolation", "process"]  # tasks go to site_executor_args' process
    if settings.ca_cert is None or settings.auth_key is None:
        return [*args, "--insecure"]
    return [
        *args,
        "--root-certificates",
        str(settings.ca_cert.resolve()),
        "--auth-supernode-private-key",
        str(settings.auth_key.resolve()),
    ]


def site_executor_args(settings: NodeSettings) -> list[str]:
    """FedCT's SuperExec for this SuperNode (client/site_executor.py)."""
    return [
        sys.executable,
        "-m",
        "fedct.client.site_executor",
        "--runtime-api-address",
        f"127.0.0.1:{settings.runtime_port}",
        "--state",
        str(settings.state_dir.resolve()),
    ]


# flower-supernode exits with status 1 on any error and prints its own code; this one means it
# could not reach or activate at the SuperLink (server not up yet, this hospital's key not
# registered yet, network down, or its previous SuperNode, gone without deactivating, still
# counted online until its heartbeats lapse): worth trying again.
NO_SUPERLINK = b"Exit Code: 305"


def run_node(settings: NodeSettings, *, retry_wait_s: float = 15.0) -> int:
    """Run the SuperNode in the foreground until it exits, Ctrl-C or SIGTERM; its exit code.

    While the SuperLink cannot be reached (or has not registered this hospital yet) the
    SuperNode is started again every ``retry_wait_s`` seconds, so hospitals may start first.
    """
    # Flower unpacks each run's app under FLWR_HOME: keep that in the site's state folder
    env = flower_environment(FLWR_HOME=str(settings.state_dir.resolve() / "flwr-home"))
    # Flower's SuperExec asks for a new task once a second by default; on this host's loopback
    # a tenth of that costs nothing and takes most of the wait out of every message
    executor_env = {**env, "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}
    executor = start(site_executor_args(settings), env=executor_env) if settings.warm else None
    try:
        return _supervise(settings, env, retry_wait_s)
    finally:
        if executor is not None:
            stop_group(executor)


def _supervise(settings: NodeSettings, env: dict[str, str], retry_wait_s: float) -> int:
    with sigterm_raises():
        while True:
            child = start(supernode_args(settings), log=subprocess.PIPE, env=env)
            seen: list[bool] = []
            # a thread: the SuperNode's own children (SuperExec) may hold the pipe open after
            # it exits, until stop_group ends them
            relay = threading.Thread(target=_relay_output, args=(child, seen), daemon=True)
            relay.start()
            try:
                code = child.wait()
            except KeyboardInterrupt:
                return 130
            finally:
                stop_group(child)
                relay.join(timeout=5.0)
            unreachable = any(seen)
            if code == 0 or not unreachable:
                return code
            log.warning(
                "cannot connect to %s (server down, this hospital's key not registered yet, "
                "or, up to a minute after this client stopped abruptly, its earlier "
                "connection not yet timed out); trying again in %.0f s",
                settings.superlink,
                retry_wait_s,
            )
            time.sleep(retry_wait_s)


def _relay_output(child: subprocess.Popen[bytes], seen: list[bool]) -> None:
    """Copy the SuperNode's output to ours; note whether it could not reach the SuperLink."""
    assert child.stdout is not None
    for line in child.stdout:
        sys.stdout.buffer.write(line)
        sys.stdout.buffer.flush()
        if NO_SUPERLINK in line:
            seen.append(True)
