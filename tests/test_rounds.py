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
