"""What a hospital agrees to execute: the check of a run's app bundle before any of its code runs.

A Flower app bundle (FAB) is a zip file that normally carries the app's Python code, and a
SuperNode imports whatever the bundle names. A hospital running FedCT executes only its own
installed FedCT ClientApp, so a bundle is accepted only when

- it holds FedCT's ``pyproject.toml`` and Flower's ``.info/`` manifest, and no other file (no
  code, no data);
- its ``clientapp`` component is the installed ``fedct.client.client_app:app``;
- it was made by the same FedCT version as the one installed here;
- and, where the hospital pins bundles (``STATE/approved-bundles.txt``: one SHA-256 a line, as
  the audit log and `fedct client` print them; ``#`` starts a comment), its hash is listed.

No Flower here: :mod:`client.site_executor` calls :func:`check_bundle` before Flower unpacks
the bundle, and turns a refusal into the task's error reply.
"""

from __future__ import annotations

import hashlib
import io
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

from fedct.common.app_bundle import CLIENT_APP
from fedct.common.errors import FedCTError
from fedct.common.version import FEDCT_VERSION

APPROVED_BUNDLES = "approved-bundles.txt"  # in the site's state folder; optional
BUNDLE_HASH_ENV = "FEDCT_BUNDLE_SHA256"  # set in a task's process once its bundle passed
ALLOWED_FILES = ("pyproject.toml",)
MANIFEST_FOLDER = ".info/"  # Flower's own CONTENT manifest


class BundleRefusedError(FedCTError):
    """This hospital does not execute the run's app bundle; the message says why."""

    def __init__(self, message: str, sha256: str = "") -> None:
        super().__init__(message)
        self.sha256 = sha256


@dataclass(frozen=True)
class Bundle:
    sha256: str
    files: tuple[str, ...]
    clientapp: str
    fedct_version: str


def read_bundle(content: bytes) -> Bundle:
    """The parts of a FAB the check looks at; refuses what is not a readable FAB."""
    digest = hashlib.sha256(content).hexdigest()
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as fab:
            files = tuple(sorted(fab.namelist()))
            project = tomllib.loads(fab.read("pyproject.toml").decode())
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise BundleRefusedError(
            f"bundle {digest[:12]} is not a readable app bundle: {err}", digest
        ) from None
    app = project.get("tool", {}).get("flwr", {}).get("app", {})
    return Bundle(
        sha256=digest,
        files=files,
        clientapp=str(app.get("components", {}).get("clientapp", "")),
        fedct_version=str(app.get("config", {}).get("fedct-version", "")),
    )


def approved_hashes(state_dir: Path) -> set[str] | None:
    """The bundle hashes this hospital pins, or None when it pins none."""
    path = state_dir / APPROVED_BUNDLES
    if not path.exists():
        return None
    lines = (line.split("#", 1)[0].strip().lower() for line in path.read_text().splitlines())
    hashes = {line for line in lines if line}
    bad = sorted(h for h in hashes if len(h) != 64 or not set(h) <= set("0123456789abcdef"))
    if bad:
        raise BundleRefusedError(
            f"{path} lists {bad[0]!r}, which is not a SHA-256 hex digest; fix the file (one "
            "64-character hash a line) - until then this hospital executes no bundle"
        )
    return hashes


def check_bundle(content: bytes, state_dir: Path) -> Bundle:
    """The bundle, if this hospital executes it; else :class:`BundleRefusedError` with why."""
    bundle = read_bundle(content)
    name = f"bundle {bundle.sha256[:12]}"
    extra = [
        f for f in bundle.files if f not in ALLOWED_FILES and not f.startswith(MANIFEST_FOLDER)
    ]
    if extra:
        shown = ", ".join(extra[:5]) + (" ..." if len(extra) > 5 else "")
        raise BundleRefusedError(
            f"{name} carries files besides FedCT's pyproject.toml ({shown}): this hospital "
            "executes only its installed FedCT, never code shipped with a run",
            bundle.sha256,
        )
    if bundle.clientapp != CLIENT_APP:
        raise BundleRefusedError(
            f"{name} asks to run clientapp {bundle.clientapp!r}; this hospital runs only the "
            f"installed FedCT ClientApp ({CLIENT_APP})",
            bundle.sha256,
        )
    if bundle.fedct_version != FEDCT_VERSION:
        raise BundleRefusedError(
            f"{name} was made by FedCT {bundle.fedct_version or '(unknown)'}; this hospital has "
            f"FedCT {FEDCT_VERSION}: both sides must run the same version",
            bundle.sha256,
        )
    try:
        pinned = approved_hashes(state_dir)
    except BundleRefusedError as err:
        raise BundleRefusedError(str(err), bundle.sha256) from None
    if pinned is not None and bundle.sha256 not in pinned:
        raise BundleRefusedError(
            f"{name} ({bundle.sha256}) is not in {state_dir / APPROVED_BUNDLES}; add its hash "
            "there to accept it",
            bundle.sha256,
        )
    return bundle
