from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import fedct.simulations.compare
from fedct.client.training import train_local
from fedct.common.config import FederationConfig, app_defaults
from fedct.common.dataset import CTSlices, site_dataset
from fedct.common.evaluation import evaluate
from fedct.common.model_file import load_model, save_model
from fedct.common.models import build_model
from fedct.common.seeding import derive_seed
from fedct.common.site import load_site
from fedct.common.weights import model_weights
from fedct.simulations.compare import compare, paired_auroc_difference
from fedct.simulations.report import compare_table
from tests.conftest import write_tiny_site


def test_baselines_cover_centralized_dp_and_each_site(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
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
    constant = build_model(fed.model_config)
    with torch.no_grad():  # a zero head: p(nodule) = 0.5 on every slice, an AUROC of exactly 0.5
        constant.fc.weight.zero_()
        constant.fc.bias.zero_()
    save_model(federated, model_weights(constant), fed)
    trained: dict[str, torch.nn.Module] = {}  # each baseline's model, to score it here

    def train_and_keep(model: torch.nn.Module, *args: Any, description: str, **kwargs: Any) -> Any:
        trained[description] = model
        return train_local(model, *args, description=description, **kwargs)

    monkeypatch.setattr(fedct.simulations.compare, "train_local", train_and_keep)
    rows = compare(fed, data, tmp_path / "cache", federated=federated)
    assert [r.model for r in rows] == [
        "federated",
        "centralized",
        "centralized + DP",
        "local-only: site-0",
        "local-only: site-1",
    ]
    assert [r.dp for r in rows] == [True, False, True, True, True]
    assert rows[0].vs_federated is None

    # Known answers: each row's AUROCs recomputed here with scikit-learn from its model's
    # probabilities on every site's held-out patients, and its interval as the paired bootstrap
    # of its scores against the federated model's over the same whole patients.
    held_out, patients = _held_out_with_patients(data, fed)
    models = {"federated": load_model(federated)[0], **trained}
    reference = np.zeros(0)
    for i, r in enumerate(rows):
        scored = {name: _scores(models[r.model], part) for name, part in held_out.items()}
        assert set(r.sites) == {"site-0", "site-1"}
        expected = {name: _auroc(truth, scores) for name, (scores, truth) in scored.items()}
        assert r.sites == pytest.approx(expected, nan_ok=True)
        scores = np.concatenate([scores for scores, _ in scored.values()])
        truth = np.concatenate([truth for _, truth in scored.values()])
        assert 0 < truth.sum() < len(truth)  # both classes among the pooled held-out slices
        assert r.pooled == pytest.approx(_auroc(truth, scores))
        if r.model == "federated":
            assert (scores == 0.5).all()
            assert r.pooled == 0.5
            reference = scores
            continue
        assert r.vs_federated == pytest.approx(r.pooled - 0.5)
        _, interval = paired_auroc_difference(
            scores, reference, truth, patients, seed=derive_seed(fed.seed, f"ci {i - 1}")
        )
        assert interval is not None
        assert r.vs_federated_ci == pytest.approx(interval)

    table = compare_table({"compare": [vars(r) for r in rows]})
    assert "<h2>Comparison</h2>" in table
    assert table.count("<tr>") == 1 + len(rows)
    assert f"{rows[0].pooled:.3f}" in table
    assert f"{rows[1].vs_federated:+.3f} [" in table
    # without the federation's model file: the baselines alone, no differences
    alone = compare(fed, data, tmp_path / "cache")
    assert [r.model for r in alone] == [r.model for r in rows[1:]]
    assert all(r.vs_federated is None for r in alone)


def _held_out_with_patients(
    data: Path, fed: FederationConfig
) -> tuple[dict[str, CTSlices], np.ndarray]:
    """Every site's held-out slices, and one number per slice for its patient (numbered in
    order of appearance across the sites, as compare numbers them for the bootstrap)."""
    held_out, numbers = {}, {}
    patients = []
    for folder in sorted(data.iterdir()):
        site = load_site(
            folder, grid=fed.preprocess.grid, val_fraction=fed.val_fraction, progress=False
        )
        split = site.eval_split()
        held_out[folder.name] = site_dataset(
            site, split, classes=fed.class_names, windows=fed.preprocess.windows, train=False
        )
        for row in site.indices(split):
            key = (folder.name, site.slices[int(row)].patient_key)
            patients.append(numbers.setdefault(key, len(numbers)))
    return held_out, np.asarray(patients)


def _scores(model: torch.nn.Module, data: CTSlices) -> tuple[np.ndarray, np.ndarray]:
    """The positive-class (last) probability of every slice, and whether it is positive."""
    result = evaluate(model, data, device=next(model.parameters()).device)
    return result.probabilities[:, -1], result.targets == result.probabilities.shape[1] - 1


def _auroc(truth: np.ndarray, scores: np.ndarray) -> float:
    return float(roc_auc_score(truth, scores)) if 0 < truth.sum() < len(truth) else math.nan


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
    from fedct.common.augment import eval_transform
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


def test_should_federate_reads_the_intervals() -> None:
    from fedct.simulations.compare import Row, should_federate

    rows = [
        Row("federated", True, {}, 0.80),
        Row("pretrained only", False, {}, 0.70, -0.10, (-0.15, -0.05)),
        Row("centralized + DP", True, {}, 0.81, 0.01, (-0.02, 0.04)),
        Row("local-only: a", True, {}, 0.90, 0.10, (0.02, 0.18)),
        Row("local-only: b", True, {}, 0.60, -0.20, None),
        Row("local-only: c", True, {}, math.nan, math.nan, None),  # diverged: no line
    ]
    lines = should_federate(rows)
    assert lines == [
        "federated vs the starting (pretrained) model: +0.100 [+0.050, +0.150]: "
        "the federated model is better",
        "federated vs pooling the data under the same ε: -0.010 [-0.040, +0.020]: "
        "these patients cannot tell the two apart",
        "federated vs a alone: -0.100 [-0.180, -0.020]: the federated model is worse",
        "federated vs b alone: +0.200: too few held-out patients to tell",
    ]
