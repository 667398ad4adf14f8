"""FedCT as an installed wheel: one ``fedct`` namespace, and it runs outside any source tree."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # built from a copy: setuptools builds in the tree (build/), and a stale build/ in the
    # checkout could smuggle deleted modules into a later wheel
    source = Path(
        shutil.copytree(
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


@pytest.mark.slow
def test_the_wheel_installs_one_fedct_namespace(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"fedct", next(t for t in tops if t.endswith(".dist-info"))}, tops
    for package in ("common", "client", "server", "simulations", "simulations/worlds"):
        assert f"fedct/{package}/__init__.py" in names
    assert not any(n.startswith("fedct/tests") or n.endswith("pyproject.toml") for n in names)


@pytest.mark.slow
def test_the_installed_wheel_runs_outside_the_source_tree(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    with zipfile.ZipFile(wheel) as whl:
        whl.extractall(site)  # what pip does with a pure-Python wheel, without fetching deps
    # FedCT's dependencies from this environment; a path named in a .pth file is not itself a
    # site directory, so the editable install of the source tree there stays out of sight
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "common").mkdir()  # a folder named like a FedCT package must not shadow it
    run = [str(python), "-c", "import sys; from fedct.common.cli import main; sys.exit(main())"]
    version = subprocess.run(
        [*run, "--version"], cwd=work, check=True, capture_output=True, text=True
    )
    assert version.stdout.startswith("fedct ")
    where = subprocess.run(
        [str(python), "-c", "import fedct.common.config as c; print(c.__file__)"],
        cwd=work,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert where.startswith(str(site)), where
    synth = subprocess.run(
        [*run, "data", "synth", "--world", "ward", "--out", "sites", "--scale", "0.1"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert synth.returncode == 0, synth.stderr[-2000:]
    assert sorted(p.name for p in (work / "sites").iterdir())
