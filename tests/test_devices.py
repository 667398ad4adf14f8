from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import fedct.client.rounds as rounds
import fedct.client.training
from fedct.client.training import TrainResult
from fedct.common.config import FederationConfig, SiteConfig
from fedct.common.devices import resolve_device
from fedct.common.errors import ConfigError
from fedct.common.evaluation import EvalResult
from fedct.common.models import build_model
from fedct.common.weights import model_weights
from fedct.simulations.flower_sim_main import gpu_share


def _gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_auto_takes_the_gpu_when_torch_sees_one(monkeypatch: pytest.MonkeyPatch) -> None:
    _gpus(monkeypatch, 0)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        resolve_device("cuda")
    _gpus(monkeypatch, 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="only 2 CUDA GPU"):
        resolve_device("cuda:2")


def test_a_bad_device_setting_names_the_choices() -> None:
    with pytest.raises(ConfigError, match="auto, cpu, cuda or cuda:N"):
        FederationConfig(device="gpu")


def test_simulated_sites_share_the_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    _gpus(monkeypatch, 0)
    assert gpu_share("auto", 3) == 0.0
    _gpus(monkeypatch, 1)
    assert gpu_share("auto", 4) == pytest.approx(0.25)
    assert gpu_share("cpu", 4) == 0.0
    _gpus(monkeypatch, 8)
    assert gpu_share("auto", 3) == 1.0


def test_site_training_and_evaluation_run_on_the_resolved_device(
    tiny_site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fed = FederationConfig(image_size=32, min_eval_cases=1, dp=False, device="auto")
    site = SiteConfig(
        site_name="a", data_dir=str(tiny_site), state_dir=str(tmp_path / "s"), dp=False
    )
    weights = model_weights(build_model(fed.model_config))
    used: list[Any] = []

    def train(model: object, dataset: Any, cfg: object, **kwargs: Any) -> TrainResult:
        used.append(kwargs["device"])
        return TrainResult(len(dataset), 1, 0.5, 0.0, None, 1.0)

    def evaluate(model: object, dataset: Any, **kwargs: Any) -> EvalResult:
        used.append(kwargs["device"])
        n = len(dataset)
        probs = np.tile([0.5, 0.5], (n, 1))
        return EvalResult(n, 0.7, 0.5, probs, np.arange(n) % 2)

    monkeypatch.setattr(fedct.client.training, "train_local", train)  # imported at call time
    monkeypatch.setattr(rounds, "evaluate", evaluate)
    monkeypatch.setattr(rounds, "cam_localization", lambda *a, **k: rounds.NO_CAM)
    _gpus(monkeypatch, 1)  # the training and evaluation above are stand-ins: nothing runs on it
    rounds.train_round(site, fed, weights, server_round=1)
    rounds.evaluate_round(site, fed, weights)
    assert used == [torch.device("cuda"), torch.device("cuda")]


def test_the_cuda_check_runs_its_cpu_half(tiny_site: Path, tmp_path: Path) -> None:
    from fedct.simulations.benchmarks.bench_cuda import run_on

    row = run_on("cpu", FederationConfig(image_size=32), tiny_site, tmp_path / "cache")
    assert row["steps"] >= 1
    assert row["cams_finite"]
    assert np.isfinite(row["train_loss"])
