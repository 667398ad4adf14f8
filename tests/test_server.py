from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.weights import weight_problem
from server.checkpoints import (
    CheckpointError,
    CheckpointStore,
    ServerState,
    append_metrics,
    read_metrics,
)

REFERENCE = {"conv.weight": np.zeros((2, 3), np.float32), "fc.bias": np.zeros(2, np.float32)}


def test_valid_update_passes() -> None:
    update = {k: v + 0.1 for k, v in REFERENCE.items()}
    assert weight_problem(update, REFERENCE, max_distance=10.0) is None
    half = {k: v.astype(np.float16) for k, v in update.items()}
    assert weight_problem(half, REFERENCE, max_distance=10.0) is None


@pytest.mark.parametrize(
    ("update", "reason"),
    [
        ({"conv.weight": np.zeros((2, 3), np.float32)}, "wrong keys"),
        ({**REFERENCE, "extra": np.zeros(1, np.float32)}, "wrong keys"),
        ({**REFERENCE, "fc.bias": np.zeros(3, np.float32)}, "shape"),
        ({**REFERENCE, "fc.bias": np.zeros(2, np.int64)}, "dtype"),
        ({**REFERENCE, "fc.bias": np.array([np.nan, 0], np.float32)}, "non-finite"),
        ({**REFERENCE, "fc.bias": np.array([1e6, 0], np.float32)}, "update norm"),
    ],
)
def test_bad_updates_are_explained(update: dict[str, np.ndarray], reason: str) -> None:
    problem = weight_problem(update, REFERENCE, max_distance=100.0)
    assert problem is not None
    assert reason in problem


def test_checkpoint_save_and_resume(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "ckpt")
    assert store.latest() is None
    w1 = {k: v + 1 for k, v in REFERENCE.items()}
    store.save(w1, ServerState(1, "fedavg"))
    w2 = {k: v + 2 for k, v in REFERENCE.items()}
    m_t = {"conv.weight": np.ones((2, 3), np.float32)}
    store.save(w2, ServerState(2, "fedadam", ["hospital-b"], {"m_t": m_t}))
    latest = store.latest()
    assert latest is not None
    weights, state = latest
    np.testing.assert_array_equal(weights["fc.bias"], w2["fc.bias"])
    assert state.round == 2
    assert state.exhausted_sites == ["hospital-b"]
    np.testing.assert_array_equal(state.optimizer_state["m_t"]["conv.weight"], m_t["conv.weight"])
    (tmp_path / "ckpt" / "round-0002.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot resume"):
        store.latest()


def test_metrics_history_appends(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    append_metrics(path, {"round": 1, "pooled": {"auroc": np.float64(0.7)}})
    append_metrics(path, {"round": 2, "pooled": {"auroc": float("nan")}})
    history = read_metrics(path)
    assert [r["round"] for r in history] == [1, 2]
    assert history[0]["pooled"]["auroc"] == pytest.approx(0.7)
