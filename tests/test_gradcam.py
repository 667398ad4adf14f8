from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedct.common.errors import ConfigError
from fedct.common.gradcam import (
    POINTING_TOLERANCE,
    cam_maps,
    cam_peak,
    cam_stage_name,
    energy_inside,
    localization,
    pointing_hit,
)
from fedct.common.models import ModelConfig, build_model
from fedct.common.preprocess import GridConfig
from fedct.common.site import load_site


def test_pointing_game_and_energy_on_hand_made_maps() -> None:
    mask = np.zeros((8, 8), dtype=bool)
    mask[2:4, 2:4] = True
    inside = np.zeros((8, 8), dtype=np.float32)
    inside[3, 3] = 1.0
    inside[6, 6] = 0.5
    assert pointing_hit(inside, mask)
    assert energy_inside(inside, mask) == pytest.approx(1.0 / 1.5)
    outside = np.zeros((8, 8), dtype=np.float32)
    outside[7, 7] = 1.0
    assert not pointing_hit(outside, mask)
    assert energy_inside(outside, mask) == 0.0
    result = localization(
        np.stack([inside, outside, inside]), np.stack([mask, mask, np.zeros_like(mask)])
    )
    assert result.slices == 2
    assert result.pointing_hit_rate == pytest.approx(0.5)
    assert result.mean_energy_inside == pytest.approx((1 / 1.5 + 0) / 2)
    assert math.isnan(localization(inside[None], np.zeros((1, 8, 8), bool)).pointing_hit_rate)


def test_pointing_takes_the_middle_of_a_flat_maximum_and_zero_maps_miss() -> None:
    import cv2

    cells = np.zeros((3, 3), dtype=np.float32)
    cells[0, 0] = 1.0  # the top-left cell of a 3x3 last stage wins
    cam = cv2.resize(cells, (96, 96), interpolation=cv2.INTER_LINEAR)
    corner = np.zeros((96, 96), dtype=bool)
    corner[:3, :3] = True
    middle = np.zeros((96, 96), dtype=bool)
    middle[10:22, 10:22] = True  # around the cell's centre (16, 16)
    assert not pointing_hit(cam, corner)
    assert pointing_hit(cam, middle)
    assert not pointing_hit(np.zeros((96, 96), np.float32), middle)


def test_cam_releases_hooks_and_keeps_mode() -> None:
    model = build_model(ModelConfig())
    model.train()
    maps = cam_maps(model, torch.randn(2, 3, 64, 64), target_class=1)
    assert maps.shape == (2, 64, 64)
    assert maps.min() >= 0.0
    assert maps.max() <= 1.0
    assert model.training
    hooks = sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())
    assert hooks == 0


def test_lesion_masks_come_onto_the_grid(tiny_site: Path) -> None:
    site = load_site(tiny_site, grid=GridConfig(32), progress=False)
    positives = [i for i, s in enumerate(site.slices) if s.label == "nodule"]
    negatives = [i for i, s in enumerate(site.slices) if s.label == "normal"]
    assert positives
    masks = [site.lesion_mask(i) for i in positives]
    assert all(m is not None and m.shape == (32, 32) and m.any() for m in masks)
    assert all(site.lesion_mask(i) is None for i in negatives)


@pytest.mark.parametrize("norm", ["group", "folded"])
def test_cam_works_on_a_model_with_a_frozen_backbone(norm: str) -> None:
    torch.manual_seed(0)  # a random network's CAM can be all zero for some draws
    model = build_model(ModelConfig(freeze="head", norm=norm)).eval()
    images = torch.randn(2, 3, 64, 64)
    maps = cam_maps(model, images, target_class=1)
    assert maps.shape == (2, 64, 64)
    assert np.isfinite(maps).all()
    if norm == "group":  # a random norm-free network may rightly give an all-zero map
        assert maps.max() > 0
    assert not images.requires_grad  # the caller's tensor is untouched


def test_pointing_tolerance_is_a_distance_to_the_lesion() -> None:
    mask = np.zeros((96, 96), dtype=bool)
    mask[40:44, 40:44] = True  # a 4-pixel nodule
    cam = np.zeros((96, 96), dtype=np.float32)
    cam[42, 49] = 1.0  # 6 px right of the lesion's edge (column 43)
    assert not pointing_hit(cam, mask)
    assert not pointing_hit(cam, mask, tolerance=5.9)
    assert pointing_hit(cam, mask, tolerance=6.0)
    found = localization(np.stack([cam, cam]), np.stack([mask, mask]))
    # the usual tolerance, 15 px at 224 px, is 6.4 px on a 96 px slice
    assert pytest.approx(6.43, abs=0.01) == POINTING_TOLERANCE * 96
    assert found.pointing_hit_rate == 1.0
    assert found.strict_hit_rate == 0.0
    far = np.zeros_like(cam)
    far[42, 51] = 1.0  # 8 px away
    assert localization(far[None], mask[None]).pointing_hit_rate == 0.0


@pytest.mark.parametrize(
    ("size", "stage"),
    [(32, "layer1"), (64, "layer2"), (96, "layer2"), (128, "layer3"), (224, "layer3"),
     (256, "layer4"), (512, "layer4")],
)  # fmt: skip
def test_auto_cam_stage_has_at_least_eight_cells_across(size: int, stage: str) -> None:
    model = build_model(ModelConfig()).train()
    assert cam_stage_name(model, size) == stage
    assert model.training  # the probe pass leaves the model's mode alone
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0
    assert cam_stage_name(model, size, "layer4") == "layer4"
    with pytest.raises(ConfigError, match="unknown ResNet stage"):
        cam_stage_name(model, size, "layer5")


def test_cam_on_a_finer_stage_can_point_between_last_stage_cells() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig()).eval()
    images = torch.randn(4, 3, 96, 96)
    # the last stage's 3x3 cells put every peak on a cell centre (15.5, 47.5 or 79.5 px)
    coarse = [cam_peak(c) for c in cam_maps(model, images, target_class=1, layer="layer4")]
    assert all(p is None or set(p) <= {15, 16, 47, 48, 79, 80} for p in coarse)
    fine = [cam_peak(c) for c in cam_maps(model, images, target_class=1)]  # auto: layer2
    assert any(p is not None and not set(p) <= {15, 16, 47, 48, 79, 80} for p in fine)
