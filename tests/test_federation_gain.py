"""A tiny federation of the demo world's hospitals improves on its starting model, and would not
if the sites' updates were dropped (FedCT's local training and FedAvg, in one process)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from fedct.common.config import FederationConfig, app_defaults
from fedct.simulations.benchmarks import recipe_study
from fedct.simulations.benchmarks.recipe_study import run_variant
from fedct.simulations.synth import SynthSettings, write_hospitals

TINY = {
    "num-server-rounds": 3,
    "local-epochs": 2,
    "dp": False,
    "image-size": 32,
    "batch-size": 16,
    "physical-batch-size": 16,
    "learning-rate": 1e-3,
    "min-eval-cases": 1,
}


@pytest.fixture(scope="module")
def hospitals(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo-world")
    write_hospitals(root, SynthSettings(sites=3, seed=0, scale=0.3, matrix_cap=64), progress=False)
    return root


def _federate(root: Path, cache: Path) -> dict[str, object]:
    fed = FederationConfig.from_mapping({**app_defaults(), **TINY})
    return run_variant(fed, root, cache, label="tiny")


def test_a_tiny_federation_improves_on_its_starting_model(hospitals: Path, tmp_path: Path) -> None:
    result = _federate(hospitals, tmp_path)
    start, final = float(result["start_pooled_auroc"]), float(result["pooled_auroc"])  # type: ignore[arg-type]
    assert final >= start + 0.2, result


def test_without_the_sites_updates_nothing_is_learnt(
    hospitals: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # every site sends back the model it was given: what the server gets if updates are lost
    untrained = SimpleNamespace(sample_rate=0.0, steps=0, mean_loss=0.0)
    monkeypatch.setattr(recipe_study, "train_local", lambda *a, **k: untrained)
    result = _federate(hospitals, tmp_path)
    assert result["pooled_auroc"] == result["start_pooled_auroc"]
