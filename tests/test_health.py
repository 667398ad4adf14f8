"""Collapse detection (server/health.py): it names a saturated, tied or diverging model and stays
quiet on a healthy one; the round line, the log, the summary and the report show it."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedct.common.metrics import score_histograms
from fedct.server.evaluation import pool_evaluations
from fedct.server.health import Collapse, RunSoFar, detect_collapse

LN2 = math.log(2)


def _pooled(scores: np.ndarray, positive: np.ndarray, *, loss: float = 0.4) -> dict[str, Any]:
    """A pooled record of one site's slice scores (no series or patient levels)."""
    hist = score_histograms(scores, positive)
    site = {
        "num-examples": len(scores),
        "reported": 1,
        "loss": loss,
        "accuracy": 0.5,
        "positives": int(positive.sum()),
        "sensitivity": 0.5,
        "specificity": 0.5,
        "auroc": 0.5,
        "hist-neg": hist[0].tolist(),
        "hist-pos": hist[1].tolist(),
    }
    return pool_evaluations([site])


def _healthy() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    positive = rng.random(200) < 0.4
    logits = rng.normal(np.where(positive, 2.0, -2.0), 1.5)
    return _pooled(1 / (1 + np.exp(-logits)), positive)


def _detect(pooled: dict[str, Any], **kwargs: Any) -> Collapse | None:
    return detect_collapse(
        pooled,
        train=kwargs.get("train", {}),
        before=kwargs.get("before", RunSoFar()),
        num_classes=2,
    )


def test_a_healthy_model_is_not_collapsed() -> None:
    pooled = _healthy()
    train = {"a": {"train-loss": 0.45}, "b": {"train-loss": 0.60}}
    before = RunSoFar({"a": 0.62, "b": 0.70}, ranked=True)
    assert _detect(pooled, train=train, before=before) is None


def test_confidently_right_scores_are_not_saturation() -> None:
    positive = np.arange(100) < 50
    scores = np.where(positive, 0.9999, 0.0001)  # every score extreme, but on the right side
    assert _detect(_pooled(scores, positive)) is None


@pytest.mark.parametrize("score", [1.0, 0.9995, 1e-6])
def test_scores_at_one_extreme_for_both_classes_are_saturated(score: float) -> None:
    positive = np.arange(90) % 3 == 0
    collapse = _detect(_pooled(np.full(90, score), positive))
    assert collapse is not None
    assert collapse.kind == "saturated"
    assert ("above 0.99" if score > 0.5 else "below 0.01") in collapse.message
    assert "lower learning-rate" in collapse.advice
    assert "foreign scanner" in collapse.advice


def test_ties_are_a_collapse_only_after_the_model_ranked() -> None:
    positive = np.arange(60) % 2 == 0
    near_constant = _pooled(0.3 + 1e-5 * np.arange(60), positive)  # a fresh network looks so
    assert near_constant["scores-tied"] == 1
    assert _detect(near_constant) is None
    ranked = RunSoFar().after({"pooled": _healthy()})
    assert ranked.ranked
    collapse = _detect(near_constant, before=ranked)
    assert collapse is not None
    assert collapse.kind == "tied"
    assert "scores tied in one bin" in collapse.message


def test_a_round_at_the_tie_limit_has_not_ranked_yet() -> None:
    assert not RunSoFar().after({"pooled": {"tie-share": 0.5, "scores-tied": 0}}).ranked
    assert not RunSoFar().after({"pooled": {"tie-share": math.nan}}).ranked


def test_held_out_loss_above_ten_times_chance_is_a_collapse() -> None:
    pooled = {**_healthy(), "loss": 10 * LN2 + 0.1}
    collapse = _detect(pooled)
    assert collapse is not None
    assert collapse.kind == "held-out-loss"
    assert _detect({**_healthy(), "loss": 10 * LN2 - 0.1}) is None


@pytest.mark.parametrize(
    ("first", "now", "collapsed"),
    [
        (0.69, 6.0, False),  # from scratch: 10 x 0.69 not reached
        (0.69, 7.5, True),
        (0.20, 1.9, False),  # from pretrained weights: 10 x its own start
        (0.20, 2.1, True),
        (3.00, 7.5, True),  # a start above chance counts as chance (ln 2)
        (3.00, 6.5, False),
    ],
)
def test_training_loss_above_ten_times_its_first_round(
    first: float, now: float, collapsed: bool
) -> None:
    history = [{"round": 1, "train": {"a": {"train-loss": first}}}]
    before = RunSoFar.from_history(history)
    assert before.first_losses == {"a": first}
    collapse = _detect(_healthy(), train={"a": {"train-loss": now}}, before=before)
    assert (collapse is not None) == collapsed
    if collapse is not None:
        assert collapse.kind == "train-loss"
        assert "a's training loss" in collapse.message


def test_the_first_round_is_its_own_reference() -> None:
    assert _detect(_healthy(), train={"a": {"train-loss": 50.0}}) is None
    later = RunSoFar({"a": 0.5}).after({"train": {"a": {"train-loss": 9.0}}})
    assert later.first_losses == {"a": 0.5}


def test_every_sign_is_named_and_the_first_gives_the_advice() -> None:
    positive = np.arange(40) % 2 == 0
    pooled = _pooled(np.ones(40), positive, loss=12.0)
    collapse = _detect(pooled, train={"a": {"train-loss": 9.0}}, before=RunSoFar({"a": 0.3}))
    assert collapse is not None
    assert collapse.kind == "saturated"
    assert "held-out loss 12.00" in collapse.message
    assert "a's training loss 9.00" in collapse.message
    assert collapse.line.startswith("⚠ collapsed: ")
    assert Collapse.from_record(json.loads(json.dumps(collapse.as_record()))) == collapse
    assert Collapse.from_record(math.nan) is None  # metrics.jsonl's null, read back


def test_a_real_model_with_a_huge_bias_is_detected_by_the_site_and_the_server(
    tiny_site: Path, tmp_path: Path
) -> None:
    import fedct.client.rounds
    from fedct.common.config import FederationConfig, SiteConfig
    from fedct.common.models import build_model
    from fedct.common.weights import model_weights

    fed = FederationConfig(image_size=32, min_eval_cases=1)
    site = SiteConfig(site_name="a", data_dir=str(tiny_site), state_dir=str(tmp_path / "state"))
    model = build_model(fed.model_config)
    healthy = fedct.client.rounds.evaluate_round(site, fed, model_weights(model))
    assert healthy["scores-saturated"] == 0
    assert _detect(pool_evaluations([healthy])) is None
    weights = model_weights(model)
    weights["fc.bias"] = np.asarray([-50.0, 50.0], np.float32)  # p(nodule) = 1.000 everywhere
    metrics = fedct.client.rounds.evaluate_round(site, fed, weights)
    assert metrics["scores-saturated"] == 1
    collapse = _detect(pool_evaluations([metrics]))
    assert collapse is not None
    assert collapse.kind == "saturated"


def test_the_round_report_logs_and_records_a_collapse(caplog: pytest.LogCaptureFixture) -> None:
    from fedct.server.progress import round_line
    from fedct.server.round_report import RoundReport
    from fedct.simulations.replies import train_reply
    from tests.test_server import _pooled, _site_metrics

    labels = [i % 2 == 0 for i in range(12)]
    with caplog.at_level(logging.WARNING, logger="fedct.server.round_report"):
        report = _pooled([train_reply("a", 1, None, _site_metrics([1.0] * 12, labels))])
    record = report.details["collapse"]
    assert record["kind"] == "saturated"
    assert any("collapsed" in r.message and r.levelno == logging.WARNING for r in caplog.records)
    line = round_line(report.record())
    assert "⚠ collapsed: held-out scores saturated" in line
    assert "lower learning-rate" in line
    healthy = _pooled(
        [train_reply("a", 1, None, _site_metrics([0.2, 0.8] * 6, labels))], RoundReport(2, set())
    )
    assert healthy.details["collapse"] is None
    assert "collapsed" not in round_line(healthy.record())


def _run_with(tmp_path: Path, collapse: Collapse | None) -> Any:
    from fedct.server.checkpoints import append_metrics
    from fedct.simulations.simulate import SimulationPaths

    paths = SimulationPaths(tmp_path)
    hist = score_histograms([0.2, 0.7, 0.9, 0.4], [False, True, True, False]).tolist()
    record = {
        "round": 1,
        "train": {"a": {"num-examples": 40, "train-loss": 0.3}},
        "evaluate": {"a": {"num-examples": 4, "auroc": 1.0}},
        "pooled": {"num-examples": 4, "auroc": 1.0, "hist-neg": hist[0], "hist-pos": hist[1]},
        "collapse": collapse.as_record() if collapse else None,
    }
    append_metrics(paths.metrics, record)
    return paths


def test_summary_and_report_name_the_collapse(tmp_path: Path) -> None:
    from fedct.common.config import FederationConfig
    from fedct.server.checkpoints import read_metrics
    from fedct.server.health import ADVICE
    from fedct.simulations.report import write_report
    from fedct.simulations.simulate import summarize

    fed = FederationConfig(dp=False)
    collapse = Collapse("saturated", "held-out scores saturated", ADVICE["saturated"])
    paths = _run_with(tmp_path / "bad", collapse)
    summary = summarize(paths, fed)
    assert json.loads((paths.out / "summary.json").read_text())["collapse"] == collapse.message
    page = write_report(paths.out, summary, read_metrics(paths.metrics), fed).read_text()
    assert "⚠ Collapsed model" in page
    assert "lower learning-rate" in page
    paths = _run_with(tmp_path / "good", None)
    summary = summarize(paths, fed)
    assert summary["collapse"] is None
    page = write_report(paths.out, summary, read_metrics(paths.metrics), fed).read_text()
    assert "Collapsed" not in page
