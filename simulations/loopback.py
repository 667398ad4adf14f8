"""A real Flower deployment on this machine: `fedct server` (flower-superlink with TLS, SuperNode
authentication and a database) and one `fedct client` (flower-supernode) per hospital, each
started as its own process group on loopback. Used by the deployment tests and benchmark; every
process started here is stopped by :meth:`LoopbackFederation.stop`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from fedct.common.processes import free_port, start, stop_group
from fedct.server.certs import create


class LoopbackFederation:
    def __init__(
        self,
        root: Path,
        data: dict[str, Path],
        *,
        retry_wait_s: float = 2.0,
        python: str = sys.executable,
        cold: bool = False,
    ) -> None:
        self.root = root
        self.python = python  # whose FedCT runs: e.g. a wheel installed in another environment
        self.cold = cold  # hospitals run Flower's flwr-clientapp per task (`fedct client --cold`)
        self.data = data
        self.certs = root / "certs"
        self.state = root / "server"
        self.port = free_port()
        self.retry_wait_s = retry_wait_s
        self.children: list[subprocess.Popen[bytes]] = []
        self.clients: dict[str, subprocess.Popen[bytes]] = {}
        self.runtime_ports = {name: free_port() for name in data}
        create(self.certs, list(data), [])

    def _fedct(self, args: list[str], log_name: str) -> subprocess.Popen[bytes]:
        log = (self.root / f"{log_name}.log").open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        child = start([self.python, "-m", "fedct.common.cli", *args], log=log, env=env)
        log.close()  # the child has its own descriptor
        self.children.append(child)
        return child

    def server(self, *args: str) -> subprocess.Popen[bytes]:
        """Start `fedct server` on this federation's state folder; ``args`` are its options."""
        base = ["server", "--state", str(self.state), "--certs", str(self.certs)]
        where = ["--host", "127.0.0.1", "--port", str(self.port)]
        return self._fedct([*base, *where, *args], "server")

    def client(self, name: str, key: Path | None = None) -> subprocess.Popen[bytes]:
        """Start (or start again) hospital ``name``'s `fedct client` (with ``key``: another
        private key than the one `fedct certs` issued for it)."""
        if name not in self.runtime_ports:
            self.runtime_ports[name] = free_port()
        child = self._fedct(
            [
                "client",
                "--site",
                name,
                "--data",
                str(self.data[name]),
                "--state",
                str(self.site_state(name)),
                "--superlink",
                f"127.0.0.1:{self.port}",
                "--ca",
                str(self.certs / "ca.crt"),
                "--key",
                str(key or self.certs / "hospitals" / f"{name}.key"),
                "--runtime-port",
                str(self.runtime_ports[name]),
                "--retry-wait",
                str(self.retry_wait_s),
                *(["--cold"] if self.cold else []),
            ],
            f"client-{name}",
        )
        self.clients[name] = child
        return child

    def site_state(self, name: str) -> Path:
        return self.root / "sites" / name

    def metrics(self) -> list[dict[str, Any]]:
        return _jsonl(self.state / "run" / "metrics.jsonl")

    def runs(self) -> list[dict[str, Any]]:
        """The SuperLink's record of each finished run (status, bytes on the wire)."""
        return _jsonl(self.state / "run" / "runs.jsonl")

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(
            f"== {p.name}\n{p.read_text(errors='replace')[-tail:]}"
            for p in sorted(self.root.glob("*.log"))
        )

    def stop(self) -> None:
        for child in self.children:
            stop_group(child)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.open()] if path.exists() else []
