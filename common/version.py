"""FedCT's installed version, and the check that both ends of a run use the same one."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from fedct.common.errors import FedCTError

try:
    FEDCT_VERSION = version("fedct")
except PackageNotFoundError as err:  # imported from a folder that was never installed
    raise ImportError("FedCT is not installed: run `pip install .` (or `make install`)") from err


class VersionMismatchError(FedCTError):
    """The run was made by another FedCT version than the one installed here."""


def require_same_version(run_version: str, *, where: str = "this hospital") -> None:
    """Refuse a run made by another FedCT version: model files, settings and the privacy
    ledger's meaning may differ between versions, so both ends must run the same release."""
    if run_version != FEDCT_VERSION:
        raise VersionMismatchError(
            f"the run was made by FedCT {run_version or '(unknown)'}, but {where} has FedCT "
            f"{FEDCT_VERSION} installed: install the same version at the server and every "
            f"hospital (pip install fedct=={run_version or FEDCT_VERSION}), then start again"
        )
