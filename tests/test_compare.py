from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fedct.common.config import FederationConfig, app_defaults
from fedct.common.model_file import save_model
from fedct.common.models import build_model
from fedct.common.weights import model_weights
from fedct.simulations.compare import compare, paired_auroc_difference
from fedct.simulations.report import compare_table
from tests.conftest import write_tiny_site


def test_baselines_cover_centralized_dp_and_each_site(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for i in range(2):
        write_tiny_site(data / f"site-{i}", index=i, seed=i, patients=10, matrix=32)
    fed = FederationConfig.from_mapping(
        {
            **app_defaults(),
            "image-size": 32,
            "num-server-rounds": 1,
            "batch-size": 8,
            "physical-batch-size": 8,
            "freeze": "head",  # the plumbing is under test, not learning: keep it quick
            "data-root": str(data),
        }
    )
    federated = tmp_path / "final_model.safetensors"
    save_model(federated, model_weights(build_model(fed.model_config)), fed)
    rows = compare(fed, data, tmp_path / "cache", federated=federated)
    assert [r.model for r in rows] == [
        "federated",
        "centralized",
        "centralized + DP",
        "local-only: site-0",
        "local-only: site-1",
    ]
    assert [r.dp for r in rows] == [True, False, True, True, True]
    for r in rows:
        assert set(r.sites) == {"site-0", "site-1"}
        for value in [*r.sites.values(), r.pooled]:
            assert math.isnan(value) or 0.0 <= value <= 1.0
        assert not math.isnan(r.pooled)  # both classes are among the pooled held-out slices
    assert rows[0].vs_federated is None
    for r in rows[1:]:
        assert r.vs_federated == pytest.approx(r.pooled - rows[0].pooled)
        assert r.vs_federated_ci is not None
        low, high = r.vs_federated_ci
        assert -1.0 <= low <= high <= 1.0
    table = compare_table({"compare": [vars(r) for r in rows]})
    assert "<h2>Comparison</h2>" in table
    assert table.count("<tr>") == 1 + len(rows)
    assert f"{rows[0].pooled:.3f}" in table
    assert f"{rows[1].vs_federated:+.3f} [" in table
    # without the federation's model file: the baselines alone, no differences
    alone = compare(fed, data, tmp_path / "cache")
    assert [r.model for r in alone] == [r.model for r in rows[1:]]
    assert all(r.vs_federated is None for r in alone)


def _patients(n: int, slices_each: int) -> np.ndarray:
    return np.repeat(np.arange(n), slices_each)


def test_paired_difference_of_a_model_with_itself_is_exactly_zero() -> None:
    rng = np.random.default_rng(0)
    truth = rng.random(200) < 0.3
    scores = rng.random(200) + truth
    delta, interval = paired_auroc_difference(scores, scores, truth, _patients(40, 5))
    assert delta == 0.0
    assert interval == (0.0, 0.0)


def test_paired_difference_separates_a_better_model_and_not_noise() -> None:
    rng = np.random.default_rng(1)
    truth = rng.random(400) < 0.3
    good = truth + rng.normal(0, 0.5, 400)
    weak = truth + rng.normal(0, 2.0, 400)
    delta, (low, high) = paired_auroc_difference(good, weak, truth, _patients(100, 4))
    assert 0 < low < delta < high  # clearly better: the interval excludes 0
    # two models equally good (same noise level, different draws): a 95% interval covers 0 in
    # about 19 of 20 replicates
    covered = 0
    for _ in range(10):
        a, b = truth + rng.normal(0, 0.5, 400), truth + rng.normal(0, 0.5, 400)
        _, (low, high) = paired_auroc_difference(a, b, truth, _patients(100, 4), resamples=300)
        covered += low < 0 < high
    assert covered >= 7


def test_paired_difference_resamples_whole_patients() -> None:
    """Ten copies of each patient's slice are one observation, not ten: the interval must be
    as wide as with one slice per patient (a slice-level bootstrap would shrink it ~3x)."""
    rng = np.random.default_rng(2)
    truth = rng.random(60) < 0.4
    a, b = truth + rng.normal(0, 1, 60), truth + rng.normal(0, 1, 60)
    _, (low1, high1) = paired_auroc_difference(a, b, truth, _patients(60, 1))
    _, (low10, high10) = paired_auroc_difference(
        np.repeat(a, 10), np.repeat(b, 10), np.repeat(truth, 10), _patients(60, 10)
    )
    assert high10 - low10 == pytest.approx(high1 - low1, rel=0.25)


def test_paired_difference_on_one_class_is_undefined() -> None:
    truth = np.zeros(10, dtype=bool)
    delta, interval = paired_auroc_difference(
        np.arange(10.0), np.arange(10.0), truth, _patients(5, 2)
    )
    assert math.isnan(delta)
    assert interval is None


def test_a_diverged_baseline_gets_an_empty_row_not_a_crash() -> None:
    import numpy as np
    import torch

    from fedct.common.augment import eval_transform
    from fedct.common.dataset import CTSlices
    from fedct.common.preprocess import WINDOW_PRESETS
    from fedct.simulations.compare import HeldOut, _evaluate

    class Diverged(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.full((len(x), 2), float("nan"))

    held_out = HeldOut(
        {
            "site-0": CTSlices(
                np.zeros((4, 8, 8), np.float16),
                [0, 1, 0, 1],
                eval_transform([WINDOW_PRESETS["lung"]]),
            )
        },
        np.arange(4),
    )
    row, scores = _evaluate("centralized", False, Diverged(), held_out)
    assert scores is None
    assert math.isnan(row.pooled)
    assert math.isnan(row.sites["site-0"])
