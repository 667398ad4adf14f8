from __future__ import annotations

import json
import math
import multiprocessing
from pathlib import Path

import pytest

from fedct.common.audit import AUDIT_FILE, AuditError, append, config_digest, verify
from fedct.common.cli import main


def _log(tmp_path: Path) -> Path:
    append(tmp_path, {"kind": "run", "run-id": 7, "status": "refused", "reason": "version"})
    for r in (1, 2):
        append(tmp_path, {"kind": "train", "run-id": 8, "round": r, "epsilon": 2.0 * r})
    append(tmp_path, {"kind": "evaluate", "run-id": 8, "round": 2, "loss": math.nan})
    return tmp_path


def test_an_intact_log_verifies_and_summarizes(tmp_path: Path) -> None:
    summary = verify(_log(tmp_path))
    assert summary.records == 4
    assert summary.runs == {"7", "8"}
    assert summary.kinds == {"run": 1, "train": 2, "evaluate": 1}
    assert summary.refused == ["run 7: version"]
    assert summary.last_epsilon == 4.0
    lines = (tmp_path / AUDIT_FILE).read_text().splitlines()
    assert json.loads(lines[-1])["loss"] is None  # strict JSON
    assert main(["audit", "verify", str(tmp_path)]) == 0


def _rewrite(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines))


def test_an_edited_record_is_detected(tmp_path: Path) -> None:
    path = _log(tmp_path) / AUDIT_FILE
    lines = path.read_text().splitlines()
    record = json.loads(lines[1])
    record["epsilon"] = 0.5  # someone lowers the privacy spent
    lines[1] = json.dumps(record, sort_keys=True)
    _rewrite(path, lines)
    with pytest.raises(AuditError, match="record 2 was changed"):
        verify(tmp_path)
    assert main(["audit", "verify", str(tmp_path)]) == 1


def test_a_removed_record_and_a_cut_off_end_are_detected(tmp_path: Path) -> None:
    path = _log(tmp_path) / AUDIT_FILE
    lines = path.read_text().splitlines()
    _rewrite(path, [lines[0], *lines[2:]])
    with pytest.raises(AuditError, match="chain breaks"):
        verify(tmp_path)
    _rewrite(path, lines[:-1])
    with pytest.raises(AuditError, match="cut off"):
        verify(tmp_path)


def test_the_next_record_continues_the_chain(tmp_path: Path) -> None:
    _log(tmp_path)
    record = append(tmp_path, {"kind": "train", "run-id": 9, "round": 1})
    assert record["seq"] == 5
    assert verify(tmp_path).records == 5


def test_the_config_digest_names_the_settings_not_their_order() -> None:
    assert config_digest({"a": 1, "b": "x"}) == config_digest({"b": "x", "a": 1})
    assert config_digest({"a": 1}) != config_digest({"a": 2})


def _append_many(state: str, worker: int) -> None:
    for i in range(25):
        append(Path(state), {"kind": "train", "run-id": worker, "round": i})


def test_processes_appending_at_once_keep_one_chain(tmp_path: Path) -> None:
    # a site's task processes (e.g. two runs' messages) may write their records together
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_append_many, args=(str(tmp_path), w)) for w in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
        assert w.exitcode == 0
    summary = verify(tmp_path)
    assert summary.records == 100
    assert summary.kinds == {"train": 100}
