from __future__ import annotations

import math
from pathlib import Path

from common.config import FederationConfig, app_defaults
from simulations.compare import compare, federated_row
from simulations.report import compare_table
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
    rows = compare(fed, data, tmp_path / "cache")
    assert [r.model for r in rows] == [
        "centralized",
        "centralized + DP",
        "local-only: site-0",
        "local-only: site-1",
    ]
    assert [r.dp for r in rows] == [False, True, True, True]
    for r in rows:
        assert set(r.sites) == {"site-0", "site-1"}
        for value in [*r.sites.values(), r.pooled]:
            assert math.isnan(value) or 0.0 <= value <= 1.0
        assert not math.isnan(r.pooled)  # both classes are among the pooled held-out slices
    last = {"evaluate": {"site-0": {"auroc": 0.7}}, "pooled": {"auroc": 0.6}}
    rows.insert(0, federated_row(fed, last))
    table = compare_table({"compare": [vars(r) for r in rows]})
    assert "<h2>Comparison</h2>" in table
    assert table.count("<tr>") == 1 + len(rows)
    assert "0.600" in table


def test_a_diverged_baseline_gets_an_empty_row_not_a_crash() -> None:
    import numpy as np
    import torch

    from common.augment import eval_transform
    from common.dataset import CTSlices
    from common.preprocess import WINDOW_PRESETS
    from simulations.compare import _evaluate

    class Diverged(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.full((len(x), 2), float("nan"))

    held_out = {
        "site-0": CTSlices(
            np.zeros((4, 8, 8), np.float16), [0, 1, 0, 1], eval_transform([WINDOW_PRESETS["lung"]])
        )
    }
    row = _evaluate("centralized", False, Diverged(), held_out)
    assert math.isnan(row.pooled)
    assert math.isnan(row.sites["site-0"])
