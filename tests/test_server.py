from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from fedct.common.weights import weight_problem
from fedct.server.checkpoints import (
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
    assert math.isnan(history[1]["pooled"]["auroc"])  # written as null, read back as NaN
    for line in path.read_text().splitlines():
        json.loads(line, parse_constant=_reject)  # strict JSON: no NaN literal


def _reject(constant: str) -> None:
    raise ValueError(f"non-standard JSON constant {constant}")


def _strategy(tmp_path: Path, **settings: object):  # type: ignore[no-untyped-def]
    from fedct.common.config import FederationConfig, app_defaults
    from fedct.server.strategy import make_strategy

    fed = FederationConfig.from_mapping({**app_defaults(), "min-sites": 1, **settings})
    strategy = make_strategy(fed, tmp_path, first_round=1, state=None)
    strategy.global_weights = REFERENCE
    strategy.round_log = {"train": {}, "excluded": {}, "failed": {}, "exhausted": []}
    return strategy


def _update(value: float, dtype: type = np.float32) -> dict[str, np.ndarray]:
    return {k: np.full(v.shape, value, dtype) for k, v in REFERENCE.items()}


def test_fedavg_is_the_example_weighted_mean_of_the_valid_updates(tmp_path: Path) -> None:
    from fedct.simulations.replies import train_reply

    strategy = _strategy(tmp_path)
    bad = _update(1.0)
    bad["fc.bias"][0] = np.nan
    replies = [
        train_reply("a", 1, _update(1.0), {"num-examples": 10}),
        train_reply("b", 2, _update(4.0, np.float16), {"num-examples": 30}),  # float16 wire
        train_reply("c", 3, bad, {"num-examples": 1000}),
        train_reply("d", 4, None, {"num-examples": 0, "epsilon": 8.0, "budget-exhausted": 1}),
        train_reply("e", 5, _update(1.0), {"num-examples": -3}),
        train_reply("f", 6, _update(1.0), {"num-examples": float("nan")}),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    for key, value in arrays.items():
        aggregated = value.numpy()
        assert aggregated.dtype == np.float32
        np.testing.assert_allclose(aggregated, (10 * 1.0 + 30 * 4.0) / 40)  # = 3.25
        assert aggregated.shape == REFERENCE[key].shape
    assert set(strategy.round_log["train"]) == {"a", "b"}
    assert "non-finite" in strategy.round_log["excluded"]["c"]
    assert "num-examples" in strategy.round_log["excluded"]["e"]
    assert "num-examples" in strategy.round_log["excluded"]["f"]
    assert strategy.exhausted == {"d"}


def test_too_few_valid_updates_keep_the_previous_model(tmp_path: Path) -> None:
    from fedct.simulations.replies import train_reply

    strategy = _strategy(tmp_path, **{"min-sites": 2, "max-update-norm": 1.0})
    replies = [
        train_reply("a", 1, _update(0.1), {"num-examples": 10}),
        train_reply("b", 2, _update(100.0), {"num-examples": 10}),  # absurd norm
    ]
    assert strategy.aggregate_train(1, replies) == (None, None)
    assert "exceeds the limit" in strategy.round_log["excluded"]["b"]


def test_float16_transfer_casts_what_goes_to_the_sites(tmp_path: Path) -> None:
    from flwr.app import Array, ArrayRecord, Message, RecordDict

    from fedct.simulations.replies import train_reply

    strategy = _strategy(tmp_path, **{"transfer-dtype": "float16"})
    train_reply("a", 1, None, {})  # sets the task identity messages need
    model = ArrayRecord({k: Array(v) for k, v in REFERENCE.items()})
    outgoing = strategy._in_transfer_dtype(
        [
            Message(RecordDict({"arrays": model}), dst_node_id=n, message_type="evaluate")
            for n in (1, 2)
        ]
    )
    for message in outgoing:
        for value in message.content.array_records["arrays"].values():
            assert value.numpy().dtype == np.float16
    assert all(v.numpy().dtype == np.float32 for v in model.values())  # the original is kept


def test_update_distance_spans_blocks_exactly() -> None:
    from fedct.common.weights import _BLOCK

    rng = np.random.default_rng(0)
    ref = {"w": rng.normal(size=(3, _BLOCK // 2 + 7)).astype(np.float32)}
    update = {"w": ref["w"] + np.float32(0.01)}
    expected = float(np.linalg.norm((update["w"] - ref["w"]).astype(np.float64)))
    assert weight_problem(update, ref, max_distance=expected * 1.001) is None
    problem = weight_problem(update, ref, max_distance=expected * 0.999)
    assert problem is not None
    assert "exceeds" in problem
    update["w"][2, -1] = np.inf  # in the last, partial block
    assert "non-finite" in str(weight_problem(update, ref))


@pytest.mark.parametrize("strategy_name", ["fedavg", "fedprox", "fedadam"])
def test_aggregation_matches_flowers_fedavg(tmp_path: Path, strategy_name: str) -> None:
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from fedct.simulations.replies import train_reply

    rng = np.random.default_rng(1)
    reference = {
        "a.weight": rng.normal(size=(64, 3, 7, 7)).astype(np.float32),
        "b.bias": rng.normal(size=5).astype(np.float32),
    }
    updates = [
        {k: v + rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in reference.items()}
        for _ in range(3)
    ]
    updates[1] = {k: v.astype(np.float16) for k, v in updates[1].items()}  # a float16 site
    sizes = [12, 40, 7]
    strategy = _strategy(tmp_path, strategy=strategy_name)
    strategy.global_weights = reference
    strategy.current_arrays = dict(reference)  # what FedAdam's configure_train keeps
    replies = [
        train_reply(f"s{i}", i + 1, u, {"num-examples": n, "train-loss": float(i)})
        for i, (u, n) in enumerate(zip(updates, sizes, strict=True))
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None
    assert metrics is not None
    expected = aggregate_arrayrecords(
        [
            RecordDict(
                {
                    "arrays": ArrayRecord({k: Array(v.astype(np.float32)) for k, v in u.items()}),
                    "metrics": MetricRecord({"num-examples": n}),
                }
            )
            for u, n in zip(updates, sizes, strict=True)
        ],
        "num-examples",
    )
    if strategy_name == "fedadam":  # Flower's FedAdam steps from the mean: only check it ran
        assert set(arrays.keys()) == set(reference)
    else:
        for key in reference:
            got = arrays[key].numpy()
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, expected[key].numpy(), rtol=1e-6, atol=1e-6)
    assert metrics["train-loss"] == pytest.approx((0 * 12 + 1 * 40 + 2 * 7) / 59)


def _site_metrics(
    series_scores: list[float], series_positive: list[bool], *, bins: int = 100
) -> dict[str, object]:
    """A site's evaluation metrics with one slice per series and one series per patient."""
    from fedct.client.rounds import group_levels, level_aggregates
    from fedct.common.metrics import PATIENT, SERIES, SLICE

    scores, positive = np.asarray(series_scores), np.asarray(series_positive)
    patients = [f"p{i}" for i in range(len(scores))]
    groups = {SERIES: [(p, "s") for p in patients], PATIENT: list(patients)}
    return {
        "num-examples": len(scores),
        "reported": 1,
        "loss": 0.5,
        "accuracy": 0.5,
        **level_aggregates(SLICE, scores, positive, bins=bins),
        **group_levels(groups, scores, positive, bins=bins, min_patients=1),
    }


def test_pooled_series_auroc_equals_sklearns_on_all_series() -> None:
    from sklearn.metrics import roc_auc_score

    from fedct.server.evaluation import pool_evaluations

    # log-odds at least 0.5 apart (a bin is 0.24 wide): no two series share a bin
    logits = np.arange(-6.0, 6.0, 0.5)
    rng = np.random.default_rng(4)
    scores = 1 / (1 + np.exp(-rng.permutation(logits)))
    positive = rng.random(len(scores)) < 0.5 + 0.2 * (scores > 0.5)
    a = _site_metrics(list(scores[:10]), list(positive[:10]))
    b = _site_metrics(list(scores[10:]), list(positive[10:]))
    pooled = pool_evaluations([a, b])
    assert pooled["series-auroc"] == pytest.approx(roc_auc_score(positive, scores), abs=1e-12)
    assert pooled["patient-auroc"] == pooled["series-auroc"]
    assert pooled["series-num"] == len(scores)
    assert pooled["series-positives"] == positive.sum()
    assert pooled["series-reporting-sites"] == 2
    assert pooled["series-sensitivity"] == pytest.approx((scores[positive] >= 0.5).mean())
    assert pooled["series-specificity"] == pytest.approx((scores[~positive] < 0.5).mean())
    assert pooled["series-scores-tied"] == 0


def test_round_record_pools_levels_and_flags_tied_scores(tmp_path: Path) -> None:
    from fedct.server.progress import round_line
    from fedct.simulations.replies import train_reply

    strategy = _strategy(tmp_path)
    near_constant = [0.3 + 1e-5 * i for i in range(12)]  # per-site AUROC 1, all in one bin
    labels = [i >= 6 for i in range(12)]
    small = {"num-examples": 3, "reported": 0, "series-num": 1, "patient-num": 1}
    replies = [
        train_reply("a", 1, None, _site_metrics(near_constant, labels)),
        train_reply("b", 2, None, _site_metrics(near_constant, labels)),
        train_reply("c", 3, None, small),
    ]
    record = strategy.aggregate_evaluate(1, replies)
    assert record is not None
    assert not any("hist" in k for k in record)
    pooled = strategy.round_log["pooled"]
    assert pooled["scores-tied"] == pooled["series-scores-tied"] == 1
    assert pooled["auroc"] == pooled["series-auroc"] == pytest.approx(0.5)
    assert not any("hist" in k for m in strategy.round_log["evaluate"].values() for k in m)
    assert strategy.round_log["evaluate"]["a"]["series-auroc"] == 1.0
    line = round_line({"round": 1, **strategy.round_log})
    assert "AUROC slice 0.500 · series 0.500 · patient 0.500" in line
    assert "scores tied in one bin" in line
    assert "(slice, series, patient)" in line


def test_round_line_says_no_dp_without_privacy() -> None:
    from fedct.server.progress import round_line

    train = {"num-examples": 40, "train-loss": 0.31, "epsilon": math.nan}
    record = {
        "round": 2,
        "train": {"a": train, "b": {**train, "epsilon": 1.234}},
        "evaluate": {"a": {"auroc": 0.8}},
        "pooled": {
            "auroc": 0.91,
            "reporting-sites": 3,
            "series-auroc": 0.95,
            "series-reporting-sites": 3,
            "patient-auroc": 0.96,
            "patient-reporting-sites": 1,
        },
    }
    line = round_line(record)
    assert "a: loss 0.310 AUROC 0.800 no DP" in line
    assert "b: loss 0.310 AUROC n/a ε 1.23" in line
    assert "nan" not in line
    assert "AUROC slice 0.910 · series 0.950 · patient 0.960 (1 of 3 sites)" in line
    assert "tied" not in line
