"""What a model file records of its training data (common/training_stats.py), and the checks
that compare new data with it."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fedct.common.config import FederationConfig
from fedct.common.metrics import score_histograms
from fedct.common.model_file import read_model, read_training_stats, save_model
from fedct.common.training_stats import (
    BODY_FLOOR_HU,
    HU_PERCENT,
    ScoreStats,
    TrainingStats,
    combine_hu_quantiles,
    histogram_score_stats,
    hu_quantiles,
    intensity_shift,
    outside_range,
    saturated_histogram,
    saturated_side,
    score_stats,
)

REFERENCE = {"fc.weight": np.zeros((2, 3), np.float32), "fc.bias": np.zeros(2, np.float32)}


def test_hu_quantiles_count_only_pixels_inside_the_body() -> None:
    images = np.full((2, 16, 16), -1024.0, np.float32)  # air, the grid's fill
    images[:, 4:12, 4:12] = np.linspace(-900, 900, 64).reshape(8, 8)
    quantiles = hu_quantiles(images)
    assert quantiles is not None
    assert len(quantiles) == len(HU_PERCENT)
    assert quantiles[0] > BODY_FLOOR_HU
    assert quantiles[2] == pytest.approx(0, abs=15)
    assert hu_quantiles(np.full((1, 8, 8), -1000.0)) is None
    # several stacks pool their pixels
    assert hu_quantiles([images[:1], images[1:].astype(np.float16)]) == quantiles


def test_combined_quantiles_are_the_slice_weighted_mean() -> None:
    a, b = (-900.0, -850.0, -200.0, 100.0, 400.0), (-940.0, -890.0, -100.0, 140.0, 500.0)
    combined = combine_hu_quantiles([(a, 30), (b, 10)])
    assert combined == tuple(round(0.75 * x + 0.25 * y) for x, y in zip(a, b, strict=True))
    assert combine_hu_quantiles([]) is None
    assert combine_hu_quantiles([((1.0, 2.0), 5)]) is None  # other percentiles: left out
    assert combine_hu_quantiles([(a, 30), ((math.nan,) * 5, 10)]) == a  # a site without body


def test_a_shift_of_every_value_is_outside_but_one_moved_quantile_is_not() -> None:
    model = (-940.0, -890.0, -190.0, 145.0, 450.0)
    assert intensity_shift([q + 500 for q in model], model) == 500
    assert outside_range(intensity_shift([q + 500 for q in model], model))
    more_lung = list(model)
    more_lung[2] -= 400  # anatomy moves the median, not the whole distribution
    assert not outside_range(intensity_shift(more_lung, model))
    assert not outside_range(intensity_shift([q + 30 for q in model], model))


def test_score_stats_from_scores_and_from_histograms_agree() -> None:
    rng = np.random.default_rng(1)
    scores = 1 / (1 + np.exp(-rng.normal(0, 4, 500)))
    exact = score_stats(scores)
    binned = histogram_score_stats(score_histograms(scores, rng.random(500) < 0.3))
    assert binned.slices == exact.slices == 500
    assert binned.below == pytest.approx(exact.below, abs=0.02)
    assert binned.above == pytest.approx(exact.above, abs=0.02)
    assert binned.median == pytest.approx(exact.median, abs=0.05)
    assert math.isnan(histogram_score_stats(np.zeros((2, 10))).median)


def test_saturation_of_a_series_and_of_labelled_scores() -> None:
    assert saturated_side(np.full(9, 0.9999)) == "high"
    assert saturated_side(np.full(9, 0.001)) == "low"
    assert saturated_side(np.asarray([0.9999] * 8 + [0.5])) is None  # 8 of 9 < 90 %
    assert saturated_side(np.linspace(0.1, 0.9, 9)) is None
    positive = np.arange(20) < 10
    assert saturated_histogram(score_histograms(np.ones(20), positive)) == "high"
    right = np.where(positive, 0.9999, 0.0001)
    assert saturated_histogram(score_histograms(right, positive)) is None
    assert saturated_histogram(score_histograms(np.ones(20), np.ones(20, bool))) is None


def test_model_file_round_trip_of_the_training_statistics(tmp_path: Path) -> None:
    stats = TrainingStats(
        (-940.0, -890.0, -190.0, 145.0, 450.0),
        "mean of 3 sites' quantiles weighted by training slices",
        ScoreStats(120, 0.05, 0.123456789, 0.31),
    )
    path = tmp_path / "m.safetensors"
    fed = FederationConfig(image_size=32)
    save_model(path, REFERENCE, fed, stats=stats)
    back = read_training_stats(path)
    assert back is not None
    assert back.hu_quantiles == stats.hu_quantiles
    assert back.hu_from == stats.hu_from
    assert back.scores == ScoreStats(120, 0.05, 0.1235, 0.31)  # four decimals are kept
    weights, read_fed = read_model(path)  # the settings are still read as before
    assert read_fed.image_size == 32
    np.testing.assert_array_equal(weights["fc.bias"], REFERENCE["fc.bias"])
    empty = tmp_path / "e.safetensors"
    save_model(empty, REFERENCE, fed, stats=TrainingStats())
    assert read_training_stats(empty) == TrainingStats()


def test_an_old_model_file_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "old.safetensors"
    save_model(path, REFERENCE, FederationConfig())  # as before: no statistics
    assert read_training_stats(path) is None  # explain says so (tests/test_explain.py)
    assert read_model(path)[1] == FederationConfig()


def test_altered_statistics_are_refused_clearly(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    from fedct.common.errors import ConfigError
    from fedct.common.training_stats import STATS_KEY

    path = tmp_path / "bad.safetensors"
    save_file(REFERENCE, str(path), metadata={STATS_KEY: "{not json"})
    with pytest.raises(ConfigError, match="training statistics"):
        read_training_stats(path)


def test_checkpoints_record_the_statistics(tmp_path: Path) -> None:
    from fedct.server.checkpoints import CheckpointStore, ServerState

    stats = TrainingStats((-900.0, -850.0, -200.0, 100.0, 400.0), "pooled pixels")
    path = CheckpointStore(tmp_path, FederationConfig()).save(
        REFERENCE, ServerState(1, "fedavg"), stats=stats
    )
    assert read_training_stats(path) == stats


def test_the_server_combines_the_sites_quantiles_and_sends_them_to_evaluation() -> None:
    from fedct.server.health import RunSoFar
    from fedct.server.round_report import RoundReport
    from fedct.server.strategy import evaluation_config, site_reply
    from fedct.simulations.replies import train_reply
    from tests.test_server import REFERENCE as SERVER_REFERENCE
    from tests.test_server import _site_metrics, _sorted

    a, b = [-900.0, -850.0, -200.0, 100.0, 400.0], [-940.0, -890.0, -100.0, 140.0, 500.0]
    replies = [
        train_reply(
            site,
            i + 1,
            {k: v + 0.01 for k, v in SERVER_REFERENCE.items()},
            {"num-examples": n, "train-loss": 0.5, "train-hu-quantiles": q},
        )
        for i, (site, n, q) in enumerate([("a", 30, a), ("b", 10, b)])
    ]
    report = _sorted(replies)
    stats = report.training_stats(TrainingStats())
    expected = combine_hu_quantiles([(a, 30), (b, 10)])
    assert stats.hu_quantiles == expected
    assert "2 sites" in stats.hu_from
    sent = evaluation_config(stats)["train-hu-quantiles"]
    assert tuple(sent) == expected  # type: ignore[arg-type]
    assert "train-hu-quantiles" not in evaluation_config(TrainingStats())
    labels = [i % 2 == 0 for i in range(12)]
    spread = [0.1 + 0.07 * i for i in range(12)]
    evaluated = RoundReport(1, set())
    stats = evaluated.pool_evaluation(
        [
            site_reply(m, {}, with_update=False)
            for m in [train_reply("a", 1, None, _site_metrics(spread, labels))]
        ],
        num_classes=2,
        before=RunSoFar(),
        stats=stats,
    )
    scores = stats.scores
    assert scores is not None
    assert scores.slices == 12
    assert scores.above == scores.below == 0
    assert stats.hu_quantiles == expected  # kept


def test_a_site_sends_its_training_quantiles_and_flags_shifted_held_out_data(
    tiny_site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedct.client.rounds
    import fedct.client.training
    from fedct.common.config import SiteConfig
    from fedct.common.models import build_model
    from fedct.common.site import load_site
    from fedct.common.weights import model_weights

    fed = FederationConfig(image_size=32, min_eval_cases=1, dp=False)
    site = SiteConfig(
        site_name="a", data_dir=str(tiny_site), state_dir=str(tmp_path / "state"), dp=False
    )
    weights = model_weights(build_model(fed.model_config))

    def no_training(model: object, dataset: object, *args: object, **kwargs: object) -> object:
        return fedct.client.training.TrainResult(1, 1, 0.5, 0.0, None, 1.0)

    monkeypatch.setattr(fedct.client.training, "train_local", no_training)
    monkeypatch.setattr(
        fedct.client.rounds, "cam_localization", lambda *a, **k: fedct.client.rounds.NO_CAM
    )
    reply = fedct.client.rounds.train_round(site, fed, weights, server_round=1)
    data = load_site(tiny_site, grid=fed.preprocess.grid, progress=False)
    train_q = hu_quantiles(data.images[data.indices("train")])
    assert reply.metrics["train-hu-quantiles"] == list(train_q or ())
    held_out = hu_quantiles(data.images[data.indices(data.eval_split())])
    assert held_out is not None
    same = fedct.client.rounds.evaluate_round(site, fed, weights, model_hu=held_out)
    assert same["intensity-outside"] == 0
    assert same["scores-saturated"] == 0
    below = [q - 500 for q in held_out]  # the model saw values 500 HU lower
    shifted = fedct.client.rounds.evaluate_round(site, fed, weights, model_hu=below)
    assert shifted["intensity-outside"] == 1
    assert shifted["num-examples"] == same["num-examples"] > 0
