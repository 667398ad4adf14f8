"""A site's evaluation round, without Flower."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import fedct.client.rounds
from fedct.common.config import FederationConfig, SiteConfig
from fedct.common.models import build_model
from fedct.common.weights import model_weights


def test_evaluation_survives_a_failing_explanation(
    tiny_site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fed = FederationConfig(image_size=32, min_eval_cases=1, min_eval_patients=1)
    site = SiteConfig(site_name="a", data_dir=str(tiny_site), state_dir=str(tmp_path / "state"))
    weights = model_weights(build_model(fed.model_config))

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no gradient reached the target layer")

    monkeypatch.setattr(fedct.client.rounds, "cam_localization", broken)
    metrics = fedct.client.rounds.evaluate_round(site, fed, weights)
    assert metrics["reported"] == 1
    assert metrics["num-examples"] > 0
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert sum(metrics["hist-neg"]) + sum(metrics["hist-pos"]) == metrics["num-examples"]
    assert metrics["cam-slices"] == 0
    assert math.isnan(metrics["cam-pointing"])


def test_cam_localization_sends_only_averages(tiny_site: Path) -> None:
    import numpy as np

    from fedct.common.dataset import site_dataset
    from fedct.common.site import load_site

    fed = FederationConfig(image_size=32)
    data = load_site(tiny_site, grid=fed.preprocess.grid, progress=False)
    split = ["train", "val"]
    dataset = site_dataset(
        data, split, classes=fed.class_names, windows=fed.preprocess.windows, train=False
    )
    rows = data.indices(split)
    positive = np.asarray([data.slices[int(r)].label == "nodule" for r in rows])
    assert positive.any()
    model = build_model(fed.model_config).eval()
    metrics = fedct.client.rounds.cam_localization(
        model, data, dataset, rows, positive, 1, layer=fed.cam_layer
    )
    assert set(metrics) == {"cam-slices", "cam-pointing", "cam-pointing-strict", "cam-energy"}
    assert metrics["cam-slices"] == positive.sum()
    assert 0.0 <= metrics["cam-pointing-strict"] <= metrics["cam-pointing"] <= 1.0
    assert 0.0 <= metrics["cam-energy"] <= 1.0


def test_evaluation_sends_only_aggregates_of_slices_series_and_patients(
    tiny_site: Path, tmp_path: Path
) -> None:
    fed = FederationConfig(image_size=32, min_eval_cases=1, min_eval_patients=1)
    site = SiteConfig(site_name="a", data_dir=str(tiny_site), state_dir=str(tmp_path / "state"))
    metrics = fedct.client.rounds.evaluate_round(
        site, fed, model_weights(build_model(fed.model_config))
    )
    for key, value in metrics.items():
        assert isinstance(value, int | float | list), key  # no strings, no identifiers
        if isinstance(value, list):
            assert key.endswith(("hist-neg", "hist-pos")), key
            assert len(value) == fed.histogram_bins, key
            assert all(isinstance(v, int) for v in value), key
    for level in ("series", "patient"):
        assert metrics[f"{level}-reported"] == 1
        counted = sum(metrics[f"{level}-hist-neg"]) + sum(metrics[f"{level}-hist-pos"])
        assert counted == metrics[f"{level}-num"] > 0
        assert metrics[f"{level}-positives"] == sum(metrics[f"{level}-hist-pos"])
        assert {f"{level}-auroc", f"{level}-sensitivity", f"{level}-specificity"} <= set(metrics)
    # synthetic patients have one series each
    assert metrics["patient-num"] == metrics["series-num"] < metrics["num-examples"]


def test_small_cohorts_report_series_and_patients_as_counts_only() -> None:
    import numpy as np

    from fedct.common.metrics import PATIENT, SERIES

    scores = np.array([0.1, 0.8, 0.3, 0.6])
    positive = np.array([False, True, False, False])
    groups = {
        SERIES: [("p1", "a"), ("p1", "b"), ("p2", "c"), ("p2", "c")],
        PATIENT: ["p1"] * 2 + ["p2"] * 2,
    }
    counts = fedct.client.rounds.group_levels(groups, scores, positive, bins=10, min_patients=3)
    assert counts == {
        "series-num": 3,
        "series-reported": 0,
        "patient-num": 2,
        "patient-reported": 0,
    }
    full = fedct.client.rounds.group_levels(groups, scores, positive, bins=10, min_patients=2)
    assert full["series-reported"] == full["patient-reported"] == 1
    assert full["series-positives"] == 1
    assert full["patient-auroc"] == 1.0  # p1 (positive) 0.8 > p2 (negative) 0.6
    assert full["series-auroc"] == pytest.approx(1.0)  # 0.8 above 0.1 and 0.6
