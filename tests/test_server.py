from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message

from fedct.common.config import FederationConfig, app_defaults
from fedct.common.weights import Weights, weight_problem
from fedct.server.checkpoints import (
    CheckpointError,
    CheckpointStore,
    ServerState,
    append_metrics,
    fit_to_model,
    read_metrics,
)
from fedct.server.round_report import RoundReport
from fedct.server.server_app import _aggregate
from fedct.server.strategy import for_transfer, make_strategy, site_reply
from fedct.simulations.replies import train_reply

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


def test_a_checkpoint_from_before_the_channel_affine_resumes_at_identity() -> None:
    fresh = {**REFERENCE, "bn1.weight": np.ones(2, np.float32), "bn1.bias": np.zeros(2, np.float32)}
    moments = {"m_t": {k: np.ones_like(v) for k, v in REFERENCE.items()}}
    old = ({k: v + 1 for k, v in REFERENCE.items()}, ServerState(3, "fedadam", [], moments))
    weights, state = fit_to_model(old, fresh, {"bn1.weight", "bn1.bias"})
    assert set(weights) == set(fresh)
    np.testing.assert_array_equal(weights["bn1.weight"], 1.0)
    np.testing.assert_array_equal(weights["fc.bias"], 1.0)  # the checkpoint's own values
    np.testing.assert_array_equal(state.optimizer_state["m_t"]["bn1.bias"], 0.0)
    assert state.round == 3
    with pytest.raises(CheckpointError, match="other model settings"):
        fit_to_model(({"other": np.zeros(1, np.float32)}, state), fresh, set())


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


def _fed(**settings: object) -> FederationConfig:
    return FederationConfig.from_mapping({**app_defaults(), "min-sites": 1, **settings})


def _sorted(
    replies: list[Message], reference: Weights = REFERENCE, **settings: object
) -> RoundReport:
    """The round report the ServerApp's loop makes of these train replies."""
    report = RoundReport(1, set())
    report.sort_train(
        [site_reply(m, {}, with_update=True) for m in replies],
        global_weights=reference,
        max_update_norm=_fed(**settings).max_update_norm,
    )
    return report


def _update(value: float, dtype: type = np.float32) -> dict[str, np.ndarray]:
    return {k: np.full(v.shape, value, dtype) for k, v in REFERENCE.items()}


def test_fedavg_is_the_example_weighted_mean_of_the_valid_updates() -> None:
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
    report = _sorted(replies)
    new = _aggregate(make_strategy(_fed()), _fed(), report, REFERENCE, replies)
    for key, aggregated in new.items():
        assert aggregated.dtype == np.float32
        np.testing.assert_allclose(aggregated, (10 * 1.0 + 30 * 4.0) / 40)  # = 3.25
        assert aggregated.shape == REFERENCE[key].shape
    assert set(report.train) == {"a", "b"}
    assert "non-finite" in report.excluded["c"]
    assert "num-examples" in report.excluded["e"]
    assert "num-examples" in report.excluded["f"]
    assert report.exhausted == {"d"}
    assert report.record()["exhausted"] == ["d"]


@pytest.mark.parametrize(("strategy", "expected"), [("fedavg", 13.25), ("fedmedian", 12.5)])
def test_updates_relative_to_the_sent_model_count_as_the_trained_model(
    strategy: str, expected: float
) -> None:
    """What sites send (the float16 update, trained - sent) aggregates like the trained
    weights, beside a reply of trained weights; the norm limit applies to the update itself."""
    sent = _update(10.0)
    replies = [
        train_reply("a", 1, _update(11.0), {"num-examples": 10}, sent=sent),
        train_reply("b", 2, _update(14.0), {"num-examples": 30}),  # trained weights, float32
        train_reply("c", 3, _update(70.0), {"num-examples": 10}, sent=sent),  # update norm 170
    ]
    settings = {"strategy": strategy, "max-update-norm": 100.0}
    report = _sorted(replies, sent, **settings)
    assert set(report.train) == {"a", "b"}  # a: weights at norm 31, update at 2.8
    assert "update norm 170" in report.excluded["c"]
    fed = _fed(**settings)
    new = _aggregate(make_strategy(fed), fed, report, sent, replies)
    for key, value in new.items():
        assert value.dtype == np.float32
        np.testing.assert_allclose(value, np.full(sent[key].shape, expected), rtol=1e-6)


def test_too_few_valid_updates_keep_the_previous_model() -> None:
    settings = {"min-sites": 2, "max-update-norm": 1.0}
    replies = [
        train_reply("a", 1, _update(0.1), {"num-examples": 10}),
        train_reply("b", 2, _update(100.0), {"num-examples": 10}),  # absurd norm
    ]
    report = _sorted(replies, **settings)
    fed = _fed(**settings)
    assert _aggregate(make_strategy(fed), fed, report, REFERENCE, replies) is REFERENCE
    assert "exceeds the limit" in report.excluded["b"]


def test_float16_transfer_casts_what_goes_to_the_sites() -> None:
    from flwr.app import RecordDict

    from fedct.common.flower_records import model_of

    train_reply("a", 1, None, {})  # sets the task identity messages need
    outgoing = for_transfer(
        [Message(RecordDict(), dst_node_id=n, message_type="evaluate") for n in (1, 2)],
        REFERENCE,
        "float16",
    )
    # one packed array for every site, shared (not one copy per message)
    first, second = (m.content.array_records["arrays"] for m in outgoing)
    assert first is second
    for message in outgoing:
        assert list(message.content.array_records["arrays"].keys()) == ["model"]
        received = model_of(message.content)
        assert list(received) == list(REFERENCE)
        for key, value in received.items():
            assert value.dtype == np.float16
            np.testing.assert_array_equal(value, REFERENCE[key].astype(np.float16))
    assert all(v.dtype == np.float32 for v in REFERENCE.values())  # the original is kept


def test_a_model_beyond_float16s_range_is_sent_as_float32(caplog: pytest.LogCaptureFixture) -> None:
    from flwr.app import RecordDict

    from fedct.common.flower_records import model_of

    train_reply("a", 1, None, {})  # sets the task identity messages need
    large = {**REFERENCE, "fc.bias": np.array([7e4, 1.0], np.float32)}  # float16 ends at 65504
    (message,) = for_transfer(
        [Message(RecordDict(), dst_node_id=1, message_type="train")], large, "float16"
    )
    received = model_of(message.content)
    assert received["fc.bias"].dtype == np.float32
    np.testing.assert_array_equal(received["fc.bias"], large["fc.bias"])
    assert "sending it as float32" in caplog.text


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
def test_aggregation_matches_flowers_fedavg(strategy_name: str) -> None:
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

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
    eta = 0.05  # FedAdam's server learning rate (not the default, so it must be passed on)
    settings = {"strategy": strategy_name, "server-learning-rate": eta}
    fed = _fed(**settings)
    strategy = make_strategy(fed)
    strategy.current_arrays = dict(reference)  # type: ignore[attr-defined]  # FedAdam's, set by configure_train
    replies = [
        train_reply(f"s{i}", i + 1, u, {"num-examples": n, "train-loss": float(i)})
        for i, (u, n) in enumerate(zip(updates, sizes, strict=True))
    ]
    report = _sorted(replies, reference, **settings)
    arrays = _aggregate(strategy, fed, report, reference, replies)
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
    if strategy_name == "fedadam":
        # Known answer: FedAdam's first server step (Reddi et al. 2021, Algorithm 2, Flower's
        # defaults b1 = 0.9, b2 = 0.99, tau = 1e-3) from zero moments, written out by hand:
        # delta = mean - x, m = (1 - b1) delta, v = (1 - b2) delta^2, and with Adam's bias
        # correction at round 1 (Flower's t + 1 = 2) x' = x + eta_t m / (sqrt(v) + tau).
        b1, b2, tau = 0.9, 0.99, 1e-3
        eta_t = eta * math.sqrt(1 - b2**2) / (1 - b1**2)
        assert set(arrays.keys()) == set(reference)
        for key, x in reference.items():
            delta = expected[key].numpy().astype(np.float64) - x
            m, v = (1 - b1) * delta, (1 - b2) * delta**2
            step = eta_t * m / (np.sqrt(v) + tau)
            got = arrays[key]
            assert got.dtype == np.float32  # Flower's FedAdam computes in float64
            np.testing.assert_allclose(got, x + step, rtol=1e-5, atol=1e-6)
            assert not np.allclose(got, expected[key].numpy(), atol=1e-3)  # not the mean
    else:
        for key in reference:
            got = arrays[key]
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, expected[key].numpy(), rtol=1e-6, atol=1e-6)


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


def _pooled(replies: list[Message], report: RoundReport | None = None) -> RoundReport:
    """The round report after pooling these evaluation replies."""
    from fedct.common.training_stats import TrainingStats
    from fedct.server.health import RunSoFar

    report = report or RoundReport(1, set())
    report.pool_evaluation(
        [site_reply(m, {}, with_update=False) for m in replies],
        num_classes=2,
        before=RunSoFar(),
        stats=TrainingStats(),
    )
    return report


def test_round_record_pools_levels_and_flags_tied_scores() -> None:
    from fedct.server.progress import round_line

    near_constant = [0.3 + 1e-5 * i for i in range(12)]  # per-site AUROC 1, all in one bin
    labels = [i >= 6 for i in range(12)]
    small = {"num-examples": 3, "reported": 0, "series-num": 1, "patient-num": 1}
    replies = [
        train_reply("a", 1, None, _site_metrics(near_constant, labels)),
        train_reply("b", 2, None, _site_metrics(near_constant, labels)),
        train_reply("c", 3, None, small),
    ]
    report = _pooled(replies)
    pooled = report.details["pooled"]
    assert pooled["scores-tied"] == pooled["series-scores-tied"] == 1
    assert pooled["auroc"] == pooled["series-auroc"] == pytest.approx(0.5)
    assert not any("hist" in k for m in report.details["evaluate"].values() for k in m)
    assert report.details["evaluate"]["a"]["series-auroc"] == 1.0
    line = round_line(report.record())
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


@pytest.mark.parametrize("strategy_name", ["fedmedian", "fedtrimmedavg", "krum"])
def test_robust_strategies_aggregate_only_the_accepted_updates(strategy_name: str) -> None:
    values = [1.0, 2.0, 4.0, 3.0]
    excluded = _update(1e6)  # beyond max-update-norm: excluded, so no rule may see it
    replies = [
        train_reply(f"s{i}", i + 1, _update(v), {"num-examples": 10}) for i, v in enumerate(values)
    ] + [train_reply("bad", 9, excluded, {"num-examples": 10})]
    settings = {"strategy": strategy_name, "max-update-norm": 1e5}
    report = _sorted(replies, **settings)
    assert "exceeds the limit" in report.excluded["bad"]
    fed = _fed(**settings)
    new = _aggregate(make_strategy(fed), fed, report, REFERENCE, replies)
    assert list(new) == list(REFERENCE)
    for key, value in new.items():
        assert value.dtype == np.float32
        assert value.shape == REFERENCE[key].shape
        assert 1.0 <= float(value.min()) <= float(value.max()) <= 4.0  # never the outlier
    if strategy_name == "fedmedian":
        np.testing.assert_allclose(new["fc.bias"], np.median(values))


def test_a_reply_claiming_an_accepted_sites_name_is_not_aggregated() -> None:
    from fedct.common.flower_records import LAYOUT

    impostor = train_reply("s0", 3, _update(2.0), {"num-examples": 10})
    impostor.content[LAYOUT]["dims"] = [1]  # a model that cannot be read
    replies = [
        train_reply("s0", 1, _update(1.0), {"num-examples": 10}),
        train_reply("s1", 2, _update(3.0), {"num-examples": 10}),
        impostor,
    ]
    fed = _fed(strategy="fedmedian")
    report = _sorted(replies, strategy="fedmedian")
    new = _aggregate(make_strategy(fed), fed, report, REFERENCE, replies)  # no crash
    np.testing.assert_allclose(new["fc.bias"], 2.0)  # the median of the two real updates
