"""Crash-safe file writes: write beside the target, then rename over it (atomic on POSIX), so a
crash never leaves a half-written ledger, cache or checkpoint behind."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(
    target: Path, write: Callable[[Path], object], *, mode: int = 0o600, fsync: bool = True
) -> None:
    """Call ``write(tmp_path)`` and move the result onto ``target`` (permissions ``mode``).
    Without ``fsync`` a crash may leave ``target`` torn (a cache that checks what it reads)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    try:
        write(Path(tmp))
        if fsync:
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(target: Path, text: str, *, mode: int = 0o600) -> None:
    atomic_write(target, lambda tmp: tmp.write_text(text), mode=mode)
