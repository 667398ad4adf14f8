from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from safetensors.numpy import save_file
from safetensors.torch import save_file as save_torch

from fedct.common.augment import eval_transform
from fedct.common.cli import main
from fedct.common.config import FederationConfig, app_defaults
from fedct.common.dicom_io import read_ct_file
from fedct.common.errors import ConfigError
from fedct.common.explain import explain
from fedct.common.model_file import load_model, read_model, save_model
from fedct.common.models import build_model, channel_affine_keys
from fedct.common.preprocess import to_model_grid
from fedct.common.training_stats import (
    NO_STATS_NOTE,
    SATURATED_NOTE,
    SHIFT_LIMIT_HU,
    TrainingStats,
    hu_quantiles,
)
from fedct.common.weights import model_weights


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


def test_a_folded_model_file_from_before_the_channel_affine_loads(tmp_path: Path) -> None:
    """Folded models written before they carried a per-channel affine (FiLM) still load, and
    compute what they computed: the missing affine is the identity."""
    torch.manual_seed(0)
    bn_file = tmp_path / "public.safetensors"
    save_torch(
        {
            k: v.contiguous()
            for k, v in torchvision.models.resnet18(num_classes=2).state_dict().items()
        },
        str(bn_file),
    )
    fed = FederationConfig.from_mapping(
        {**app_defaults(), "image-size": 32, "pretrained": str(bn_file)}
    )
    folded = build_model(fed.model_config).eval()
    old = {k: v for k, v in model_weights(folded).items() if k not in channel_affine_keys(folded)}
    assert len(old) < len(model_weights(folded))
    path = tmp_path / "old_model.safetensors"
    save_model(path, old, fed)
    model, _ = load_model(path)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), folded(x))


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
    # known answer: each slice's score is the model's own softmax on that file, recomputed here
    model, fed = load_model(model_file)
    transform = eval_transform(fed.preprocess.windows)
    for s in report["slices"]:
        (frame,) = (f for f in read_ct_file(series / s["file"]) if f.frame == s["frame"])
        hu = to_model_grid(frame.hu, frame.pixel_spacing, fed.preprocess.grid)
        with torch.no_grad():
            p = torch.softmax(model(transform(torch.from_numpy(hu)[None])[None]), 1)[0]
        assert s["score"] == pytest.approx(float(p[-1]), abs=1e-4)  # reported to 4 decimals
        assert s["prediction"] == fed.class_names[int(p.argmax())]
        assert (out / s["overlay"]).stat().st_size > 1000
    assert len({s["score"] for s in report["slices"]}) > 1  # the slices are told apart
    assert json.loads((out / "predictions.json").read_text()) == report
    # the fixture's file records no training statistics: said, not fatal
    assert report["model_hu_quantiles"] is None
    assert any(NO_STATS_NOTE in w for w in report["warnings"])
    assert report["series"][0]["hu_shift"] is None


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


def _series(tiny_site: Path) -> Path:
    return next(p for p in tiny_site.rglob("*.dcm")).parent


def _with_stats(path: Path, stats: TrainingStats, *, bias: float | None = None) -> Path:
    fed = FederationConfig.from_mapping({**app_defaults(), "image-size": 32})
    weights = model_weights(build_model(fed.model_config))
    if bias is not None:  # a saturated model: p(nodule) = 1.000 whatever the slice
        weights["fc.bias"] = np.asarray([-bias, bias], np.float32)
    save_model(path, weights, fed, stats=stats)
    return path


def _recorded(series: Path) -> TrainingStats:
    """Training statistics that match ``series`` exactly: its own quantiles on the grid."""
    frames = [f for path in sorted(series.glob("*.dcm")) for f in read_ct_file(path)]
    grid = FederationConfig.from_mapping({**app_defaults(), "image-size": 32}).preprocess.grid
    quantiles = hu_quantiles([to_model_grid(f.hu, f.pixel_spacing, grid) for f in frames])
    return TrainingStats(quantiles, "pooled pixels")


def test_explain_does_not_warn_on_data_like_the_training_data(
    model_file: Path, tiny_site: Path, tmp_path: Path
) -> None:
    series = _series(tiny_site)
    model = _with_stats(tmp_path / "m.safetensors", _recorded(series))
    report = explain(model, series, tmp_path / "out")
    assert report["warnings"] == []
    assert report["model_hu_quantiles"] is not None
    (check,) = report["series"]
    assert check["hu_shift"] == 0
    assert not check["intensity_outside"]
    assert not any(s["saturated"] for s in report["slices"])


def test_explain_warns_on_a_series_shifted_by_500_hu(
    model_file: Path, tiny_site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import pydicom

    series = _series(tiny_site)
    model = _with_stats(tmp_path / "m.safetensors", _recorded(series))
    for path in series.glob("*.dcm"):  # another scanner's calibration: every value +500 HU
        ds = pydicom.dcmread(path)
        ds.RescaleIntercept = float(ds.RescaleIntercept) + 500
        ds.save_as(path)
    out = tmp_path / "out"
    assert main(["explain", "--model", str(model), str(series), "--out", str(out)]) == 0
    report = json.loads((out / "predictions.json").read_text())
    (check,) = report["series"]
    assert check["intensity_outside"]
    assert check["hu_shift"] > SHIFT_LIMIT_HU
    (warning,) = report["warnings"]
    assert "HU from what the model was trained on" in warning
    assert f"WARNING: {warning}" in capsys.readouterr().out


def test_explain_warns_that_saturated_scores_are_not_certainty(
    tiny_site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    series = _series(tiny_site)
    model = _with_stats(tmp_path / "m.safetensors", TrainingStats(), bias=50.0)
    out = tmp_path / "out"
    assert main(["explain", "--model", str(model), str(series), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "predictions.json").read_text())
    assert all(s["score"] == 1.0 and s["saturated"] for s in report["slices"])
    assert report["series"][0]["scores_saturated"] == "high"
    assert any(w.startswith(SATURATED_NOTE) for w in report["warnings"])
    assert "do not read them as certainty" in printed
    assert "= 1.000" not in printed  # never printed as bare certainty
    assert "p(nodule) > 0.999 (saturated: not a certainty) -> nodule" in printed
