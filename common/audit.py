"""An append-only, hash-chained audit log (JSON lines), for a hospital's and the server's state
folder, and its check (``fedct audit verify STATE``).

Each record carries its sequence number, the time, the previous record's hash and its own hash
(SHA-256 over the canonical JSON of everything else), so editing, inserting or removing a
record breaks the chain. A cut at the end leaves a valid chain, so the newest sequence number
and hash are also kept in a small head file beside the log, written after every record: a log
shorter than its head is detected as truncated. This is tamper-evidence against accidents and
casual edits on the machine, not against someone who rewrites both files; for that, copy the
head elsewhere (e.g. into the hospital's ticket system) from time to time.

Hand-written because no maintained library does this for plain files (the hash and JSON come
from the standard library). Records hold what a security officer asks about a run: which run
and settings, what was accepted or refused and why, what left the site (message kinds, byte
counts, metric names - never a value that identifies a patient) and the privacy spent.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedct.common.errors import FedCTError
from fedct.common.fileio import atomic_write_text

AUDIT_FILE = "audit.jsonl"
HEAD_FILE = "audit.head"
LOCK_FILE = "audit.lock"
GENESIS = "0" * 64


class AuditError(FedCTError):
    """The audit log's chain is broken: a record was edited, inserted, removed or cut off."""


def _digest(record: Mapping[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "hash"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def config_digest(config: Mapping[str, Any]) -> str:
    """A short digest naming a run's settings (the same settings give the same digest)."""
    canonical = json.dumps(dict(config), sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def append(state_dir: Path, event: Mapping[str, Any]) -> dict[str, Any]:
    """Append ``event`` to the state folder's log; returns the record written."""
    state_dir.mkdir(parents=True, exist_ok=True)
    # several task processes of a site may append at once (two runs): one at a time, or two
    # records would both follow the same head and fork the chain
    with _locked(state_dir / LOCK_FILE):
        return _append(state_dir, event)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _append(state_dir: Path, event: Mapping[str, Any]) -> dict[str, Any]:
    path = state_dir / AUDIT_FILE
    seq, prev = _head(state_dir)
    record: dict[str, Any] = {
        "seq": seq + 1,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "prev": prev,
        **{k: _finite(v) for k, v in event.items()},
    }
    record["hash"] = _digest(record)
    line = json.dumps(record, sort_keys=True, allow_nan=False) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    atomic_write_text(
        state_dir / HEAD_FILE, json.dumps({"seq": record["seq"], "hash": record["hash"]})
    )
    return record


def _finite(value: Any) -> Any:
    if isinstance(value, float) and value != value:  # NaN: strict JSON has no such number
        return None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _head(state_dir: Path) -> tuple[int, str]:
    head = state_dir / HEAD_FILE
    if not head.exists():
        if (state_dir / AUDIT_FILE).exists() and (state_dir / AUDIT_FILE).stat().st_size:
            raise AuditError(f"{state_dir / AUDIT_FILE} has records but no {HEAD_FILE}")
        return 0, GENESIS
    data = json.loads(head.read_text())
    return int(data["seq"]), str(data["hash"])


@dataclass
class AuditSummary:
    records: int = 0
    runs: set[str] = field(default_factory=set)
    kinds: dict[str, int] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)  # "run R: reason"
    last_epsilon: float | None = None
    first_time: str = ""
    last_time: str = ""


def verify(state_dir: Path) -> AuditSummary:
    """Check the whole chain and its head; raises :class:`AuditError` naming the first break."""
    path = state_dir / AUDIT_FILE
    if not path.exists():
        raise AuditError(f"no audit log in {state_dir} (expected {AUDIT_FILE})")
    summary = AuditSummary()
    prev, seq = GENESIS, 0
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise AuditError(f"{path}:{number}: not a JSON record ({err.msg})") from None
        if record.get("seq") != seq + 1 or record.get("prev") != prev:
            raise AuditError(
                f"{path}:{number}: the chain breaks here (expected record {seq + 1} after "
                f"hash {prev[:12]}...): a record before it was removed, inserted or reordered"
            )
        if _digest(record) != record.get("hash"):
            raise AuditError(f"{path}:{number}: record {record['seq']} was changed after writing")
        seq, prev = record["seq"], record["hash"]
        summary.records += 1
        summary.first_time = summary.first_time or str(record.get("time", ""))
        summary.last_time = str(record.get("time", ""))
        kind = str(record.get("kind", "?"))
        summary.kinds[kind] = summary.kinds.get(kind, 0) + 1
        if record.get("run-id") is not None:
            summary.runs.add(str(record["run-id"]))
        if record.get("status") == "refused":
            summary.refused.append(f"run {record.get('run-id')}: {record.get('reason', '?')}")
        if isinstance(record.get("epsilon"), int | float):
            summary.last_epsilon = float(record["epsilon"])
    head_seq, head_hash = _head(state_dir)
    if (head_seq, head_hash) != (seq, prev):
        raise AuditError(
            f"{path} ends at record {seq}, but {HEAD_FILE} says record {head_seq} was written: "
            "the log was cut off (or the head file replaced)"
        )
    return summary
