"""``fedct server``: a Flower SuperLink (TLS, SuperNode authentication, persistent state) and
the FedCT run on it, followed round by round.

Everything goes through Flower's own executables (``flower-superlink``, here started as
``python -m fedct.server.superlink`` to keep messages in transit in memory, and the ``flwr``
CLI), so this module does not import Flower. The server's state folder holds:

    superlink.db        the SuperLink's database (registered hospitals, runs)
    superlink.log       its log, and the ServerApp's
    proxy/              nginx's configuration and logs (access.log: every hospital request)
    flwr-home/          the ``flwr`` CLI's configuration: how to reach this SuperLink
    run/                the run's output: checkpoints/, metrics.jsonl, final_model.safetensors

Started again with the same state folder, the run resumes after its newest checkpoint.

The SuperLink listens on loopback only; the hospitals reach its Fleet API through nginx on the
public address (server/fleet_proxy.py), so Flower's Control and Runtime APIs, which authenticate
nobody, are reachable from this host alone. ``proxy=False`` binds the SuperLink itself to the
public address instead.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from fedct.common import json_text
from fedct.common.app_bundle import write_app
from fedct.common.config import FederationConfig, app_defaults
from fedct.common.errors import FedCTError
from fedct.common.fileio import atomic_write, atomic_write_text
from fedct.common.flower_tools import executable, flower_environment, write_toml
from fedct.common.processes import free_port, sigterm_raises, start, stop_group, wait_for_port
from fedct.server.allow_list import write_allow_list
from fedct.server.certs import CertPaths
from fedct.server.checkpoints import read_metrics
from fedct.server.fleet_proxy import ProxyConfig, find_nginx, write_config
from fedct.server.progress import follow_rounds

log = logging.getLogger(__name__)

CONNECTION = "fedct"  # the name of this SuperLink in flwr-home/config.toml


class DeploymentError(FedCTError):
    """The SuperLink or the run failed; the message says where to look."""


@dataclass(frozen=True)
class ServerSettings:
    state_dir: Path
    certs: CertPaths | None  # None: --insecure
    host: str = "0.0.0.0"  # the hospitals' address of this server
    port: int = 8000
    run_config: dict[str, Any] = field(default_factory=dict)  # run-config overrides
    proxy: bool = True  # only the Fleet API on host:port, through nginx
    superlink_port: int = 0  # with the proxy: the SuperLink's port on 127.0.0.1 (0: any free)

    @property
    def run_dir(self) -> Path:
        return self.state_dir / "run"

    @property
    def flwr_home(self) -> Path:
        return self.state_dir / "flwr-home"

    @property
    def superexec_secret(self) -> Path:
        return self.state_dir / "superexec.secret"

    @property
    def superlink_host(self) -> str:
        return "127.0.0.1" if self.proxy else self.host

    @property
    def superlink_listen_port(self) -> int:
        return self.superlink_port if self.proxy else self.port

    @property
    def local_address(self) -> str:
        """Where this host reaches the SuperLink (the ``flwr`` CLI: Control API)."""
        if self.proxy:
            return f"127.0.0.1:{self.superlink_port}"
        host = reachable(self.host)
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


def reachable(host: str) -> str:
    """Where this host reaches a listener bound to ``host`` (a wildcard: loopback)."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    return "::1" if host.strip("[]") == "::" else host.strip("[]")


def flower_env(settings: ServerSettings | None = None) -> dict[str, str]:
    """Flower's environment: no telemetry, and this server's ``flwr`` CLI configuration."""
    extra = {"FLWR_HOME": str(settings.flwr_home)} if settings is not None else {}
    return flower_environment(**extra)


def superlink_args(settings: ServerSettings) -> list[str]:
    args = [
        sys.executable,
        "-m",
        "fedct.server.superlink",  # Flower's flower-superlink, objects in transit in memory
        "--host",
        settings.superlink_host,
        "--port",
        str(settings.superlink_listen_port),
        "--database",
        str(settings.state_dir / "superlink.db"),
        # hospitals and this server run a preinstalled FedCT: nothing is installed per run
        "--disable-runtime-dependency-installation",
        # the ServerApp is launched by our own flower-superexec (superexec_args), which alone
        # holds the secret that Runtime API task requests must be signed with
        "--isolation",
        "process",
        "--superexec-auth-secret-file",
        str(settings.superexec_secret),
    ]
    if settings.certs is None:
        return [*args, "--insecure"]
    c = settings.certs
    return [
        *args,
        "--ssl-ca-certfile",
        str(c.ca_cert),
        "--ssl-certfile",
        str(c.server_cert),
        "--ssl-keyfile",
        str(c.server_key),
        "--enable-supernode-auth",
    ]


def superexec_args(settings: ServerSettings) -> list[str]:
    """Flower's SuperExec for the ServerApp: takes the run's tasks from the SuperLink's Runtime
    API with the shared secret (nobody else can acquire one) and starts ``flwr-serverapp``."""
    args = [
        executable("flower-superexec"),
        "--runtime-api-address",
        settings.local_address,
        "--superexec-auth-secret-file",
        str(settings.superexec_secret),
        "--parent-pid",
        str(os.getpid()),
    ]
    if settings.certs is None:
        return [*args, "--insecure"]
    return [*args, "--root-certificates", str(settings.certs.ca_cert.resolve())]


def write_superexec_secret(settings: ServerSettings) -> Path:
    """A random secret shared by the SuperLink and its SuperExec, readable by this user only."""
    path = settings.superexec_secret
    if not path.exists():
        atomic_write(path, lambda tmp: tmp.write_bytes(secrets.token_bytes(32)), mode=0o600)
    return path


def write_flower_config(settings: ServerSettings) -> Path:
    """The ``flwr`` CLI's config file naming this SuperLink (how the run is submitted)."""
    lines = [
        "[superlink]",
        f'default = "{CONNECTION}"',
        "",
        f"[superlink.{CONNECTION}]",
        f'address = "{settings.local_address}"',
    ]
    if settings.certs is None:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {json.dumps(str(settings.certs.ca_cert.resolve()))}")
    settings.flwr_home.mkdir(parents=True, exist_ok=True)
    path = settings.flwr_home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def flwr(settings: ServerSettings, *args: str, timeout: float = 120.0) -> dict[str, Any]:
    """Run ``flwr ARGS --format json`` against this SuperLink; its JSON answer."""
    cmd = [executable("flwr"), *args, "--format", "json"]
    done = subprocess.run(
        cmd, capture_output=True, text=True, env=flower_env(settings), timeout=timeout
    )
    try:
        answer: dict[str, Any] = json.loads(done.stdout[done.stdout.index("{") :])
    except ValueError:
        answer = {"success": False, "error-message": (done.stderr or done.stdout).strip()}
    if not answer.get("success", done.returncode == 0):
        answer.setdefault("error-message", (done.stderr or done.stdout).strip())
    return answer


HOSPITAL_NODES = "hospital-nodes.json"  # STATE/: the node id Flower gave each hospital's key


def register_hospitals(settings: ServerSettings) -> list[str]:
    """Register every hospital public key in the certs folder; returns the names registered now.

    A key registered before (the database persists) is left as it is. The node id of each
    registration is kept in ``STATE/hospital-nodes.json``: the run's allow-list
    (server/allow_list.py) is made from it.
    """
    if settings.certs is None:
        return []
    nodes_file = settings.state_dir / HOSPITAL_NODES
    nodes: dict[str, str] = json.loads(nodes_file.read_text()) if nodes_file.exists() else {}
    registered = []
    for name in settings.certs.hospitals():
        key = settings.certs.hospital_public_key(name)
        answer = flwr(settings, "supernode", "register", str(key), CONNECTION, "--name", name)
        if answer.get("success"):
            registered.append(name)
            nodes[name] = str(answer["node-id"])
        elif "already in use" not in str(answer.get("error-message", "")):
            raise DeploymentError(f"could not register hospital {name}: {answer}")
        elif name not in nodes:
            raise DeploymentError(
                f"hospital {name}'s key is registered in {settings.state_dir / 'superlink.db'}"
                f", but {nodes_file} does not say under which node id, so the server cannot "
                "trust it: unregister it (`flwr supernode unregister`) or start from a new "
                "state folder"
            )
    atomic_write_text(nodes_file, json.dumps(nodes, indent=2, sort_keys=True))
    return registered


def submit_run(settings: ServerSettings) -> str:
    config = {**settings.run_config, "output-dir": str(settings.run_dir.resolve())}
    nodes_file = settings.state_dir / HOSPITAL_NODES
    if settings.certs is not None and nodes_file.exists():  # only these nodes take part
        write_allow_list(settings.run_dir, json.loads(nodes_file.read_text()))
    overrides = write_toml(settings.state_dir / "run-config.toml", config)
    app = write_app(settings.state_dir / "app")  # the installed FedCT; no code in the bundle
    answer = flwr(settings, "run", str(app), CONNECTION, "--run-config", str(overrides))
    if not answer.get("success") or "run-id" not in answer:
        raise DeploymentError(f"the SuperLink did not accept the FedCT run: {answer}")
    return str(answer["run-id"])


def stop_stale_runs(settings: ServerSettings) -> list[str]:
    """Stop runs a previous server process left unfinished in the database: their ServerApp is
    gone, and only one run may write the output folder (the new one resumes its checkpoint)."""
    stale = [
        str(r["run-id"])
        for r in flwr(settings, "ls", CONNECTION).get("runs", [])
        if not str(r.get("status", "")).startswith("finished")
    ]
    for run_id in stale:
        flwr(settings, "stop", run_id, CONNECTION)
    return stale


def run_status(settings: ServerSettings, run_id: str) -> dict[str, Any]:
    answer = flwr(settings, "ls", CONNECTION, "--run-id", run_id)
    runs = answer.get("runs") or [{}]
    return dict(runs[0])


def serve(settings: ServerSettings, console: Console, *, keep_running: bool = False) -> str:
    """Start the SuperLink, submit the FedCT run, show its rounds; returns the final status.

    The SuperLink is stopped when the run ends (unless ``keep_running``), on error and on
    Ctrl-C/SIGTERM.
    """
    fed = FederationConfig.from_mapping({**app_defaults(), **settings.run_config})
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    if settings.certs is not None:
        settings.certs.require_server_files()
    nginx = find_nginx() if settings.proxy else None  # before anything starts
    if settings.proxy and not settings.superlink_port:
        settings = replace(settings, superlink_port=free_port())
    log_path = settings.state_dir / "superlink.log"
    write_superexec_secret(settings)
    with log_path.open("ab") as log_file, sigterm_raises():
        child = start(superlink_args(settings), log=log_file, env=flower_env(settings))
        proxy: subprocess.Popen[bytes] | None = None
        superexec: subprocess.Popen[bytes] | None = None
        try:
            host, port = settings.local_address.rsplit(":", 1)
            wait_for_port(host.strip("[]"), int(port), child, timeout=60.0, what="flower-superlink")
            superexec = start(superexec_args(settings), log=log_file, env=flower_env(settings))
            if nginx is not None:
                proxy = _start_proxy(settings, nginx, log_file)
            write_flower_config(settings)
            for name in register_hospitals(settings):
                console.print(f"registered hospital [bold]{name}[/bold]")
            for stale in stop_stale_runs(settings):
                console.print(f"stopped run {stale}, left unfinished by a previous server")
            run_id = submit_run(settings)
            console.print(
                f"FedCT run {run_id} started ({fed.num_server_rounds} rounds); output in "
                f"{settings.run_dir}"
            )
            public = f"{settings.host}:{settings.port}"
            console.print(
                f"hospitals connect to {public} (Flower's Fleet API only, through nginx); "
                f"Control and Runtime APIs on {settings.local_address}, this host only"
                if proxy is not None
                else f"hospitals connect to {public}; Flower's Control and Runtime APIs are "
                "open on the same port (--no-proxy)"
            )
            helpers = {"flower-superexec": superexec, "nginx": proxy}
            watched = {"flower-superlink": child, **{k: v for k, v in helpers.items() if v}}
            status = _follow(settings, run_id, fed, console, watched)
            _save_run_record(settings, run_status(settings, run_id))
            if keep_running and status.endswith("completed"):
                console.print("run finished; the SuperLink keeps running (Ctrl-C stops it)")
                child.wait()
            return status
        finally:
            for process in (proxy, superexec):
                if process is not None:
                    stop_group(process)
            stop_group(child)


def _start_proxy(settings: ServerSettings, nginx: str, log_file: Any) -> subprocess.Popen[bytes]:
    c = settings.certs
    cfg = ProxyConfig(
        public_host=settings.host,
        public_port=settings.port,
        upstream_port=settings.superlink_port,
        folder=(settings.state_dir / "proxy").resolve(),
        server_cert=c.server_cert.resolve() if c else None,
        server_key=c.server_key.resolve() if c else None,
        ca_cert=c.ca_cert.resolve() if c else None,
    )
    write_config(cfg)
    proxy = start(cfg.command(nginx), log=log_file)
    try:
        wait_for_port(reachable(settings.host), settings.port, proxy, timeout=30.0, what="nginx")
    except Exception as err:
        stop_group(proxy)
        error_log = cfg.folder / "error.log"
        said = error_log.read_text(errors="replace")[-800:] if error_log.exists() else ""
        raise DeploymentError(
            f"nginx did not start on {settings.host}:{settings.port}: {err}\n{said}"
        ) from err
    return proxy


def _save_run_record(settings: ServerSettings, status: dict[str, Any]) -> None:
    """What the SuperLink says of the run (status, bytes on the wire, compute time), appended
    to ``run/runs.jsonl``: one line per `fedct server` run on this state folder."""
    keep = ("run-id", "status", "pending-at", "finished-at", "network-traffic", "compute-time")
    record = {k: status[k] for k in keep if k in status}
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    with (settings.run_dir / "runs.jsonl").open("a") as handle:
        handle.write(json_text.dumps(record) + "\n")


def _follow(
    settings: ServerSettings,
    run_id: str,
    fed: FederationConfig,
    console: Console,
    watched: dict[str, subprocess.Popen[bytes]],
) -> str:
    state = {"status": "", "checked": 0.0}

    def finished() -> bool:
        for name, process in watched.items():  # the run cannot go on without any of them
            if process.poll() is not None:
                raise DeploymentError(
                    f"{name} exited with code {process.returncode}; see "
                    f"{settings.state_dir / 'superlink.log'}"
                )
        if time.monotonic() - state["checked"] >= 5.0:  # type: ignore[operator]
            state["status"] = str(run_status(settings, run_id).get("status", ""))
            state["checked"] = time.monotonic()
        return str(state["status"]).startswith("finished")

    metrics = settings.run_dir / "metrics.jsonl"
    follow_rounds(metrics, fed.num_server_rounds, console, finished, len(read_metrics(metrics)))
    status = str(state["status"])
    if status != "finished:completed":
        raise DeploymentError(
            f"the FedCT run ended as '{status}'; see {settings.state_dir / 'superlink.log'}"
        )
    return status
