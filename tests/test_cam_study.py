"""The Grad-CAM study script on a made-up simulation output folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import fedct.simulations.benchmarks.cam_study as cam_study
from fedct.common.augment import eval_transform
from fedct.common.config import FederationConfig
from fedct.common.gradcam import POINTING_TOLERANCE, cam_maps
from fedct.common.model_file import save_model
from fedct.common.models import build_model
from fedct.common.site import load_site
from fedct.common.weights import model_weights
from fedct.simulations.benchmarks.cam_study import main


def test_cam_study_reports_every_stage_and_the_occlusion_check(
    tiny_site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    shutil.copytree(tiny_site, out / "data" / tiny_site.name)
    fed = FederationConfig(image_size=32)
    torch.manual_seed(0)
    model = build_model(fed.model_config)
    with torch.no_grad():  # score every slice positive, so every masked slice is scored
        model.fc.bias.copy_(torch.tensor([-20.0, 20.0]))
    save_model(out / "federation" / "final_model.safetensors", model_weights(model), fed)

    # Known answers per stage: Grad-CAM runs on every stage, but the study is handed maps built
    # from each slice's own lesion mask (found by the image it is asked about): on layer2 the
    # mask itself (a strict hit, all energy inside), on layer3 one pixel 2 px above the lesion
    # (within the 2.1 px tolerance, not inside, no energy inside), on layer4 nothing at all.
    site = load_site(out / "data" / tiny_site.name, grid=fed.preprocess.grid, progress=False)
    transform = eval_transform(fed.preprocess.windows)
    lesions: dict[bytes, np.ndarray] = {}
    for row in site.indices(["train", "val"]):
        mask = site.lesion_mask(int(row))
        if mask is not None:
            image = transform(torch.from_numpy(site.images[row].astype(np.float32))[None])
            lesions[image.numpy().tobytes()] = mask

    def constructed(
        model: torch.nn.Module, images: torch.Tensor, *, target_class: int, method: str, layer: str
    ) -> np.ndarray:
        real = cam_maps(model, images, target_class=target_class, method=method, layer=layer)
        maps = np.zeros_like(real)
        for cam, image in zip(maps, images, strict=True):
            mask = lesions[image.numpy().tobytes()]
            if layer == "layer2":
                cam[mask] = 1.0
            elif layer == "layer3":
                rows, cols = np.nonzero(mask)
                top = int(rows.argmin())
                assert rows[top] >= 2
                cam[rows[top] - 2, cols[top]] = 1.0
        return maps

    monkeypatch.setattr(cam_study, "cam_maps", constructed)
    assert main([str(out), "--json", str(tmp_path / "cam.json")]) == 0
    result = json.loads((tmp_path / "cam.json").read_text())
    assert result["true_positives"] == result["positives_with_mask"] == len(lesions) > 0
    assert result["tolerance_px"] == pytest.approx(POINTING_TOLERANCE * 32)
    keys = ("pointing", "pointing_strict", "energy_inside", "all_zero_maps")
    assert result["stages"] == {
        "layer2": dict(zip(keys, (1.0, 1.0, 1.0, 0.0), strict=True)),
        "layer3": dict(zip(keys, (1.0, 0.0, 0.0, 0.0), strict=True)),
        "layer4": dict(zip(keys, (0.0, 0.0, 0.0, 1.0), strict=True)),
    }
    occlusion = result["occlusion"]
    # the bias decides alone: filling the lesion cannot lower the score
    assert occlusion["flipped_lesion_filled"] == 0.0
    assert occlusion["mean_p_lesion_filled"] > 0.99
