"""The hospital's check of a run's app bundle before any of it executes (client/bundle_check.py),
and the one point in Flower's ClientApp runner it relies on."""

from __future__ import annotations

import hashlib
import inspect
import io
import zipfile
from pathlib import Path

import pytest
import tomli_w
from flwr.cli.build import build_fab_from_disk
from flwr.supernode.runtime import run_clientapp as runner

from fedct.client.bundle_check import APPROVED_BUNDLES, BundleRefusedError, check_bundle
from fedct.common.app_bundle import app_project, write_app
from fedct.common.version import FEDCT_VERSION


def _fedct_fab(tmp_path: Path) -> bytes:
    return build_fab_from_disk(write_app(tmp_path / "app"))


def _fab(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as fab:
        for name, data in files.items():
            fab.writestr(name, data)
    return buffer.getvalue()


def _project(**app: object) -> bytes:
    project = app_project()
    project["tool"]["flwr"]["app"].update(app)
    return tomli_w.dumps(project).encode()


def test_fedcts_own_bundle_is_accepted(tmp_path: Path) -> None:
    content = _fedct_fab(tmp_path)
    bundle = check_bundle(content, tmp_path)
    assert bundle.sha256 == hashlib.sha256(content).hexdigest()
    assert "pyproject.toml" in bundle.files
    assert bundle.fedct_version == FEDCT_VERSION


def test_a_bundle_that_carries_code_is_refused(tmp_path: Path) -> None:
    content = _fab(
        {
            "pyproject.toml": _project(),
            "fedct/client/client_app.py": b"open('/tmp/marker', 'w')",
            ".info/CONTENT": b"",
        }
    )
    with pytest.raises(BundleRefusedError, match=r"carries files.*client_app\.py"):
        check_bundle(content, tmp_path)


def test_another_clientapp_is_refused(tmp_path: Path) -> None:
    components = {"serverapp": "fedct.server.server_app:app", "clientapp": "os:system"}
    content = _fab({"pyproject.toml": _project(components=components)})
    with pytest.raises(BundleRefusedError, match="'os:system'"):
        check_bundle(content, tmp_path)


def test_another_fedct_version_is_refused(tmp_path: Path) -> None:
    project = app_project()
    project["tool"]["flwr"]["app"]["config"]["fedct-version"] = "0.0.1"
    content = _fab({"pyproject.toml": tomli_w.dumps(project).encode()})
    with pytest.raises(BundleRefusedError, match=f"FedCT 0.0.1.*FedCT {FEDCT_VERSION}"):
        check_bundle(content, tmp_path)


def test_what_is_not_a_bundle_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BundleRefusedError, match="not a readable app bundle"):
        check_bundle(b"MZ\x90\x00", tmp_path)
    with pytest.raises(BundleRefusedError, match="not a readable app bundle"):
        check_bundle(_fab({"README": b"no pyproject"}), tmp_path)


def test_a_hospital_may_pin_the_bundles_it_accepts(tmp_path: Path) -> None:
    content = _fedct_fab(tmp_path)
    digest = hashlib.sha256(content).hexdigest()
    pins = tmp_path / APPROVED_BUNDLES
    pins.write_text("# approved by the hospital's IT, 2026-12-01\n" + "0" * 64 + "\n")
    with pytest.raises(BundleRefusedError, match=rf"{digest}\) is not in"):
        check_bundle(content, tmp_path)
    pins.write_text(f"{digest.upper()}  # FedCT {FEDCT_VERSION}\n")
    assert check_bundle(content, tmp_path).sha256 == digest
    pins.write_text("not-a-hash\n")
    with pytest.raises(BundleRefusedError, match="not a SHA-256"):
        check_bundle(content, tmp_path)


def test_flowers_runner_unpacks_the_bundle_through_the_name_the_check_wraps() -> None:
    # client/site_executor.py wraps runner.install_from_fab; if Flower stops calling it from
    # run_clientapp before loading the ClientApp, the check would silently stop happening
    source = inspect.getsource(runner.run_clientapp)
    assert source.index("install_from_fab(fab.content") < source.index("load_client_app_fn(")
    assert callable(runner.install_from_fab)
