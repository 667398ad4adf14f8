from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from common.cli import main
from common.config import FederationConfig, app_defaults
from common.errors import ConfigError
from common.explain import explain
from common.model_file import read_model, save_model
from common.models import build_model
from common.weights import model_weights


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    fed = FederationConfig.from_mapping({**app_defaults(), "image-size": 32})
    path = tmp_path / "final_model.safetensors"
    save_model(path, model_weights(build_model(fed.model_config)), fed)
    return path


def test_model_file_carries_its_settings(model_file: Path) -> None:
    weights, fed = read_model(model_file)
    assert fed.image_size == 32
    assert fed.output_dir == FederationConfig.output_dir  # server paths are not stored
    assert all(v.dtype == np.float32 for v in weights.values())


def test_a_bare_weights_file_is_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "bare.safetensors"
    save_file({"w": np.zeros(2, np.float32)}, str(path))
    with pytest.raises(ConfigError, match="no FedCT settings"):
        read_model(path)


def test_explain_a_series_folder(model_file: Path, tiny_site: Path, tmp_path: Path) -> None:
    series = next(p for p in tiny_site.rglob("*.dcm")).parent
    (series / "notes.txt").write_text("not an image")
    out = tmp_path / "explained"
    report = explain(model_file, series, out)
    files = sorted(p.name for p in series.glob("*.dcm"))
    assert sorted(s["file"] for s in report["slices"]) == files
    assert [s["file"] for s in report["skipped"]] == ["notes.txt"]
    positions = [s["position_mm"] for s in report["slices"]]
    assert positions == sorted(positions)  # in anatomical order
    for s in report["slices"]:
        assert 0.0 <= s["score"] <= 1.0
        assert s["prediction"] in report["classes"]
        assert (out / s["overlay"]).stat().st_size > 1000
    assert json.loads((out / "predictions.json").read_text()) == report


def test_explain_cli_on_one_file(
    model_file: Path, tiny_site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    one = next(tiny_site.rglob("*.dcm"))
    out = tmp_path / "o"
    assert main(["explain", "--model", str(model_file), str(one), "--out", str(out)]) == 0
    assert "1 slices explained" in capsys.readouterr().out


def test_explain_without_images_says_so(model_file: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("x")
    with pytest.raises(ConfigError, match="no usable CT image"):
        explain(model_file, empty, tmp_path / "out")
