"""What ``fedct simulate`` writes for its users: summary.json and report.html (no federation)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from fedct.common.config import FederationConfig
from fedct.common.metrics import score_histograms
from fedct.server.checkpoints import append_metrics
from fedct.simulations.simulate import SimulationPaths, summarize


def _reject(constant: str) -> None:
    raise ValueError(f"non-standard JSON constant {constant}")


def _no_dp_run(tmp_path: Path) -> SimulationPaths:
    paths = SimulationPaths(tmp_path)
    hist = score_histograms([0.2, 0.7, 0.9, 0.4], [False, True, True, False]).tolist()
    train = {"num-examples": 40, "train-loss": 0.3, "epsilon": math.nan, "epsilon-budget": math.nan}
    evaluate = {"num-examples": 4, "auroc": 1.0, "series-auroc": math.nan, "patient-num": 2}
    pooled = {"num-examples": 4, "auroc": 1.0, "hist-neg": hist[0], "hist-pos": hist[1]}
    pooled |= {"series-auroc": 0.9, "patient-auroc": math.nan, "scores-tied": 0}
    record = {"round": 1, "train": {"a": train}, "evaluate": {"a": evaluate}, "pooled": pooled}
    append_metrics(paths.metrics, record)
    return paths


def test_summary_is_strict_json_with_series_and_patient_auroc(tmp_path: Path) -> None:
    paths = _no_dp_run(tmp_path)
    summarize(paths, FederationConfig(dp=False))
    summary = json.loads((tmp_path / "summary.json").read_text(), parse_constant=_reject)
    assert summary["pooled_auroc"] == 1.0
    assert summary["pooled_auroc_series"] == 0.9
    assert summary["pooled_auroc_patient"] is None  # NaN: no site reported patients
    assert summary["scores_tied"] == []
    assert summary["sites"]["a"]["epsilon"] is None
    assert summary["sites"]["a"]["auroc_series"] is None
    assert summary["sites"]["a"]["num_eval_patients"] == 2


def test_report_shows_levels_and_no_dp(tmp_path: Path) -> None:
    from fedct.server.checkpoints import read_metrics
    from fedct.simulations.report import write_report

    paths = _no_dp_run(tmp_path)
    fed = FederationConfig(dp=False)
    summary = summarize(paths, fed)
    page = write_report(tmp_path, summary, read_metrics(paths.metrics), fed).read_text()
    assert "Slices, series and patients" in page
    assert "<td>series</td>" in page
    assert "no DP" in page
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    assert "nan" not in text.lower()
    assert "<h2>ROC curves</h2><img" in page
