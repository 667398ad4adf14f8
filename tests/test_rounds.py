"""A site's evaluation round, without Flower."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import client.rounds
from common.config import FederationConfig, SiteConfig
from common.models import build_model
from common.weights import model_weights


def test_evaluation_survives_a_failing_explanation(
    tiny_site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fed = FederationConfig(image_size=32, min_eval_cases=1)
    site = SiteConfig(site_name="a", data_dir=str(tiny_site), state_dir=str(tmp_path / "state"))
    weights = model_weights(build_model(fed.model_config))

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no gradient reached the target layer")

    monkeypatch.setattr(client.rounds, "cam_localization", broken)
    metrics = client.rounds.evaluate_round(site, fed, weights)
    assert metrics["reported"] == 1
    assert metrics["num-examples"] > 0
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert sum(metrics["hist-neg"]) + sum(metrics["hist-pos"]) == metrics["num-examples"]
    assert metrics["cam-slices"] == 0
    assert math.isnan(metrics["cam-pointing"])


def test_cam_localization_sends_only_averages(tiny_site: Path) -> None:
    import numpy as np

    from common.dataset import site_dataset
    from common.site import load_site

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
    metrics = client.rounds.cam_localization(
        model, data, dataset, rows, positive, 1, layer=fed.cam_layer
    )
    assert set(metrics) == {"cam-slices", "cam-pointing", "cam-pointing-strict", "cam-energy"}
    assert metrics["cam-slices"] == positive.sum()
    assert 0.0 <= metrics["cam-pointing-strict"] <= metrics["cam-pointing"] <= 1.0
    assert 0.0 <= metrics["cam-energy"] <= 1.0
