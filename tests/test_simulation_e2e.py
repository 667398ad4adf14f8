"""A real Flower simulation of FedCT's own ServerApp and ClientApp on two tiny hospitals."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest

from fedct.common.cli import main
from tests.conftest import write_tiny_site

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def _ray_processes() -> list[str]:  # -ww: whole command lines, whatever COLUMNS says
    out = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "raylet" in line or "gcs_server" in line]


def _binned_auroc(negatives: list[int], positives: list[int]) -> float:
    """scikit-learn's AUROC of scores known only by their bin: bin numbers weighted by counts."""
    from sklearn.metrics import roc_auc_score

    bins = np.arange(len(negatives))
    return float(
        roc_auc_score(
            np.r_[np.zeros(len(bins)), np.ones(len(bins))],
            np.r_[bins, bins],
            sample_weight=np.r_[negatives, positives],
        )
    )


def test_simulation_runs_checkpoints_and_resumes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for i in range(2):
        write_tiny_site(data / f"site-{i}", index=i, patients=8, slices=4, matrix=48)
    out = tmp_path / "out"
    before = _ray_processes()
    args = [
        "simulate",
        "--data",
        str(data),
        "--out",
        str(out),
        "--image-size",
        "32",
        "--set",
        "min-eval-cases=1",
        "--set",
        "batch-size=8",
        "--set",
        "planned-rounds=3",
    ]
    assert main([*args, "--rounds", "2"]) == 0
    history = [json.loads(line) for line in (out / "federation" / "metrics.jsonl").open()]
    assert [r["round"] for r in history] == [1, 2]
    assert set(history[-1]["train"]) == {"site-0", "site-1"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2
    # known answer: the last round's pooled AUROC, recomputed with scikit-learn from the pooled
    # score histograms that round recorded (a score known only by its bin: ties within a bin)
    pooled = history[-1]["pooled"]
    assert sum(pooled["hist-neg"]) + sum(pooled["hist-pos"]) == pooled["num-examples"]
    assert summary["pooled_auroc"] == pytest.approx(
        _binned_auroc(pooled["hist-neg"], pooled["hist-pos"])
    )
    for name in ("site-0", "site-1"):
        site = summary["sites"][name]
        assert site["num_train_examples"] > 0
        assert 0 < site["epsilon"] <= 8.0
    checkpoints = out / "federation" / "checkpoints"
    assert (checkpoints / "round-0002.safetensors").is_file()
    assert (out / "federation" / "final_model.safetensors").is_file()
    report = (out / "report.html").read_text()
    for section in ("Sites", "Learning curves", "Privacy", "ROC curves"):
        assert f"<h2>{section}</h2>" in report
    # the starting model was evaluated at the sites before round 1, like every round's
    start = json.loads((out / "federation" / "start.json").read_text())
    assert start["round"] == 0
    assert set(start["evaluate"]) == {"site-0", "site-1"}
    assert summary["start_pooled_auroc"] == pytest.approx(start["pooled"]["auroc"])
    assert "What each hospital gained by joining" in report
    assert "data:image/png;base64," in report
    # each round trained from the model the sites kept when they evaluated it (not sent again)
    assert [r["model-kept-by"] for r in history] == [2, 2]
    kept = list((out / "federation" / "sites" / "site-0" / "model-cache").iterdir())
    assert len(kept) == 2  # the newest two: the model of round 2 and of round 1

    # A restarted run continues at round 3, and every site's ledger continues its budget.
    ledger = out / "federation" / "sites" / "site-0" / "privacy-ledger.json"
    spent_before = json.loads(ledger.read_text())["entries"][-1]["epsilon"]
    assert main([*args, "--rounds", "3"]) == 0
    history = [json.loads(line) for line in (out / "federation" / "metrics.jsonl").open()]
    assert [r["round"] for r in history] == [1, 2, 3]
    assert history[-1]["model-kept-by"] == 0  # resumed: no evaluation told which sites keep it
    entries = json.loads(ledger.read_text())["entries"]
    assert [e["round"] for e in entries] == [1, 2, 3]
    assert spent_before < entries[-1]["epsilon"] <= 8.0 + 1e-9
    assert not math.isnan(json.loads((out / "summary.json").read_text())["pooled_auroc"])
    assert _ray_processes() == before  # nothing left running


def test_simulation_fine_tunes_only_the_head_of_pretrained_weights(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    from fedct.common.config import FederationConfig
    from fedct.common.models import build_model
    from fedct.server.pretrain import pretrain

    data = tmp_path / "data"
    for i in range(2):
        write_tiny_site(data / f"site-{i}", index=i, patients=8, slices=4, matrix=48)
    public = write_tiny_site(tmp_path / "public" / "lidc-like", seed=5, index=2, matrix=48)
    weights = tmp_path / "public.safetensors"
    pretrain([public], FederationConfig(image_size=32), weights, epochs=1, cache_root=tmp_path)
    out = tmp_path / "out"
    args = ["simulate", "--data", str(data), "--out", str(out), "--image-size", "32"]
    args += ["--pretrain", str(weights), "--rounds", "1", "--set", "min-eval-cases=1"]
    args += ["--set", "batch-size=8"]
    assert main(args) == 0

    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 1
    assert all(0 < s["epsilon"] <= 8.0 for s in summary["sites"].values())
    started = FederationConfig(image_size=32, pretrained=str(weights), freeze="head")
    start = {k: v.numpy() for k, v in build_model(started.model_config).state_dict().items()}
    final = load_file(str(out / "federation" / "final_model.safetensors"))
    assert set(final) == set(start)  # the folded structure went through Flower unchanged
    for key, value in start.items():
        if key.startswith("fc."):
            assert not (final[key] == value).all(), f"{key} was not trained"
        else:
            assert (final[key] == value).all(), f"frozen {key} changed"
    assert "from pretrained public.safetensors (head only)" in (out / "report.html").read_text()
