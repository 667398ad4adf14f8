"""The Grad-CAM study script on a made-up simulation output folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from fedct.common.config import FederationConfig
from fedct.common.model_file import save_model
from fedct.common.models import build_model
from fedct.common.weights import model_weights
from fedct.simulations.benchmarks.cam_study import main


def test_cam_study_reports_every_stage_and_the_occlusion_check(
    tiny_site: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    shutil.copytree(tiny_site, out / "data" / tiny_site.name)
    fed = FederationConfig(image_size=32)
    torch.manual_seed(0)
    model = build_model(fed.model_config)
    with torch.no_grad():  # score every slice positive, so every masked slice is scored
        model.fc.bias.copy_(torch.tensor([-20.0, 20.0]))
    save_model(out / "federation" / "final_model.safetensors", model_weights(model), fed)
    assert main([str(out), "--json", str(tmp_path / "cam.json")]) == 0
    result = json.loads((tmp_path / "cam.json").read_text())
    assert result["true_positives"] == result["positives_with_mask"] > 0
    assert set(result["stages"]) == {"layer2", "layer3", "layer4"}
    for stage in result["stages"].values():
        assert 0.0 <= stage["pointing_strict"] <= stage["pointing"] <= 1.0
    occlusion = result["occlusion"]
    # the bias decides alone: filling the lesion cannot lower the score
    assert occlusion["flipped_lesion_filled"] == 0.0
    assert occlusion["mean_p_lesion_filled"] > 0.99
