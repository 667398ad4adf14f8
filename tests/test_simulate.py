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


def test_summary_and_report_show_each_sites_gain_over_the_start(tmp_path: Path) -> None:
    from fedct.common import json_text
    from fedct.server.checkpoints import START_FILE, read_metrics
    from fedct.simulations.report import write_report
    from fedct.simulations.simulate import gains

    paths = _no_dp_run(tmp_path)
    start = {"round": 0, "evaluate": {"a": {"auroc": 0.625}}, "pooled": {"auroc": 0.75}}
    (paths.federation / START_FILE).write_text(json_text.dumps(start))
    fed = FederationConfig(dp=False)
    summary = summarize(paths, fed)
    assert summary["start_pooled_auroc"] == 0.75
    assert summary["sites"]["a"]["start_auroc"] == 0.625
    rows = {g.site: g for g in gains(summary)}
    assert rows["a"].gain == 0.375
    assert rows["pooled"].gain == 0.25
    page = write_report(tmp_path, summary, read_metrics(paths.metrics), fed).read_text()
    gained = page.index("What each hospital gained by joining")
    assert gained < page.index("<h2>Sites</h2>")  # the report leads with it
    assert "<b>+0.375</b>" in page
    assert "<b>+0.250</b>" in page


def test_no_gain_table_without_a_start_evaluation(tmp_path: Path) -> None:
    from fedct.simulations.simulate import gains

    summary = summarize(_no_dp_run(tmp_path), FederationConfig(dp=False))
    assert summary["start_pooled_auroc"] is None
    assert gains(summary) == []
