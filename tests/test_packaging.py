"""FedCT as an installed wheel: one ``fedct`` namespace, installed with pip into a fresh
environment, run from a folder outside the source tree (the synthetic data, a tiny simulation,
and a loopback deployment of `fedct certs`, `fedct server` and two `fedct client`s)."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedct.simulations.loopback import LoopbackFederation
from tests.conftest import write_tiny_site
from tests.test_deployment_e2e import RUN_SETTINGS

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # built from a copy: setuptools builds in the tree (build/), and a stale build/ in the
    # checkout could smuggle deleted modules into a later wheel
    source = shutil.copytree(
        ROOT,
        tmp_path_factory.mktemp("source") / "fedct",
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            "build",
            "*.egg-info",
            "fedct-output",
            ".fedct-cache",
            "__pycache__",
            ".*_cache",
        ),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(out),
            str(source),
        ],
        check=True,
        timeout=300,
    )
    (found,) = out.glob("fedct-*.whl")
    return found


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with the wheel installed by pip; returns its bin folder.

    Its dependencies are the ones this test runs with, seen through a ``.pth`` line rather
    than installed again (Flower aside): a second copy of torch is several GB (a CUDA build),
    more than a CI disk may hold. Only that folder is added to the path (its own ``.pth``
    files, such as the source checkout's editable install, are not run), and ``pip check``
    proves the wheel's declared requirements are met by what the environment sees."""
    env_dir = tmp_path_factory.mktemp("venv") / "fedct"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True, timeout=300)
    python = str(env_dir / "bin" / "python")
    # Flower too, without its dependencies: FedCT runs Flower's executables from its own bin
    # folder, and pip writes those only for a package it installs
    flwr = f"flwr=={importlib.metadata.version('flwr')}"
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--no-deps", str(wheel), flwr],
        check=True,
        timeout=600,
    )
    own = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(own, "fedct-test-dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")
    # venv's own old setuptools would shadow the newer one torch declares
    subprocess.run(
        [python, "-m", "pip", "uninstall", "--quiet", "--yes", "setuptools"],
        check=True,
        timeout=300,
    )
    checked = subprocess.run(
        [python, "-m", "pip", "check"], capture_output=True, text=True, timeout=300
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    return env_dir / "bin"


@pytest.fixture
def elsewhere(tmp_path: Path) -> Path:
    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "common").mkdir()  # a folder named like a FedCT package must not shadow it
    (work / "server").mkdir()
    return work


def _run(cmd: list[str], cwd: Path, timeout: float = 600) -> str:
    # PATH without this test's environment: the installed FedCT finds Flower beside itself
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = "/usr/bin:/bin"
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, f"{cmd}: {done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_the_wheel_holds_one_fedct_namespace(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert tops - dist_info == {"fedct"}, tops
    for package in ("common", "client", "server", "simulations", "simulations/worlds"):
        assert f"fedct/{package}/__init__.py" in names
    assert not any(n.endswith("pyproject.toml") or "/tests/" in n for n in names)


def test_the_installed_wheel_synthesizes_and_simulates_outside_the_source(
    installed: Path, elsewhere: Path
) -> None:
    fedct = str(installed / "fedct")
    assert _run([fedct, "--version"], elsewhere).startswith("fedct ")
    where = _run(
        [str(installed / "python"), "-c", "import fedct.common.config as c; print(c.__file__)"],
        elsewhere,
    )
    assert where.startswith(str(installed.parent)), where
    site_packages = Path(where).parents[2]
    assert not {"common", "client", "server", "simulations"} & {
        p.name for p in site_packages.iterdir()
    }
    _run([fedct, "data", "synth", "--out", "sites", "--scale", "0.3", "--seed", "3"], elsewhere)
    _run(
        [
            fedct,
            "simulate",
            "--data",
            "sites",
            "--out",
            "sim",
            "--rounds",
            "1",
            "--image-size",
            "32",
        ],
        elsewhere,
    )
    assert (elsewhere / "sim" / "summary.json").is_file()
    assert (elsewhere / "sim" / "report.html").is_file()


@pytest.fixture
def wheel_federation(installed: Path, elsewhere: Path) -> Iterator[LoopbackFederation]:
    data = {
        name: write_tiny_site(elsewhere / "data" / name, index=i, seed=i, matrix=48)
        for i, name in enumerate(("alpha", "beta"))
    }
    fed = LoopbackFederation(elsewhere / "deploy", data, python=str(installed / "python"))
    try:
        yield fed
    finally:
        fed.stop()


def test_the_installed_wheel_runs_a_loopback_federation(
    installed: Path, elsewhere: Path, wheel_federation: LoopbackFederation
) -> None:
    _run([str(installed / "fedct"), "certs", "--out", "certs", "--hospital", "alpha"], elsewhere)
    assert (elsewhere / "certs" / "ca.crt").is_file()
    server = wheel_federation.server("--rounds", "1", *RUN_SETTINGS)
    for name in wheel_federation.data:
        wheel_federation.client(name)
    try:
        code = server.wait(timeout=500)
    except subprocess.TimeoutExpired:
        pytest.fail(f"timed out\n{wheel_federation.logs()}")
    assert code == 0, wheel_federation.logs()
    (record,) = wheel_federation.metrics()
    assert set(record["train"]) == {"alpha", "beta"}
    app = wheel_federation.state / "app"
    assert [p.name for p in app.iterdir()] == ["pyproject.toml"]  # the bundle carried no code
