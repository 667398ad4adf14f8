"""Shared fixtures. Nothing here touches the network: sites are written into temp folders."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from fedct.simulations.phantom import LesionMix
from fedct.simulations.synth import PROFILES, write_hospital


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    # A SIGTERM (CI's time limit) ends the session like Ctrl-C, so fixture teardowns still stop
    # the Flower processes the end-to-end tests started.
    signal.signal(signal.SIGTERM, _interrupt)


def write_tiny_site(
    site: Path,
    *,
    seed: int = 0,
    index: int = 0,
    patients: int = 8,
    slices: int = 4,
    matrix: int = 32,
    prevalence: float = 0.5,
    lesions: LesionMix | None = None,
) -> Path:
    """A small hospital of real DICOM files (labels.csv, masks) in ``site``; by default with
    the generator's general lesion mix (4-30 mm, a quarter ground glass, no granulomas), not
    the demo hospital's own, so that a few patients show enough nodules."""
    profile = replace(
        PROFILES[index % len(PROFILES)],
        matrix=matrix,
        patients=patients,
        slices=slices,
        prevalence=prevalence,
        lesions=lesions or LesionMix(),
    )
    write_hospital(site, profile, seed=seed, site_index=index, progress=False)
    return site


@pytest.fixture(scope="session")
def tiny_site_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_site(tmp_path_factory.mktemp("template") / "hospital-a")


@pytest.fixture
def tiny_site(tiny_site_template: Path, tmp_path: Path) -> Path:
    """A fresh copy of a tiny synthetic DICOM site that the test may change."""
    return Path(shutil.copytree(tiny_site_template, tmp_path / "hospital-a"))


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never reach beyond loopback."""
    real_connect = socket.socket.connect

    def guarded(self: socket.socket, address: object) -> object:
        host = address[0] if isinstance(address, tuple) else address
        if (
            isinstance(host, str)
            and host not in ("127.0.0.1", "localhost", "::1")
            and not host.startswith("127.")
            and self.family != socket.AF_UNIX
        ):
            raise RuntimeError(f"test tried to reach the network ({host})")
        return real_connect(self, address)  # type: ignore[arg-type]

    monkeypatch.setattr(socket.socket, "connect", guarded)


def process_groups_under(pids: set[int]) -> set[int]:
    """The process groups of ``pids`` and of all their descendants (a `fedct client` runs its
    SuperNode in a group of its own)."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,pgid="], capture_output=True, text=True)
    rows = [tuple(int(v) for v in line.split()) for line in out.stdout.splitlines()]
    found, groups = set(pids), set(pids)
    grew = True
    while grew:
        grew = False
        for pid, ppid, pgid in rows:
            if ppid in found and pid not in found:
                found.add(pid)
                groups.add(pgid)
                grew = True
    return groups


def groups_alive(pgids: set[int]) -> list[str]:
    """The ``ps`` lines of the live (not zombie) processes in the process groups ``pgids``."""
    out = subprocess.run(["ps", "-ww", "-eo", "pgid=,stat=,args="], capture_output=True, text=True)
    alive = []
    for line in out.stdout.splitlines():
        pgid, stat, *_ = line.split(None, 2)
        if int(pgid) in pgids and not stat.startswith("Z"):
            alive.append(line)
    return alive
