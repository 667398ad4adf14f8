"""Lesion-supervised public pretraining: masks follow their images through augmentation, and
the lesion loss teaches the backbone up to the Grad-CAM stage and nothing after it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from fedct.common.augment import AugmentConfig, train_transform
from fedct.common.config import FederationConfig
from fedct.common.dataset import CTSlices, LesionSlices, site_lesion_dataset
from fedct.common.errors import ConfigError
from fedct.common.gradcam import cam_stage_name
from fedct.common.preprocess import Window
from fedct.common.site import load_site
from fedct.server.pretrain import METADATA_KEY, PretrainResult, _LesionHead, pretrain, stock_resnet

WINDOWS = (Window(-600.0, 1500.0), Window(40.0, 400.0))


def test_a_lesion_mask_takes_its_images_augmentation() -> None:
    hu = np.full((3, 48, 48), -850.0, dtype=np.float32)
    hu[:, 6:12, 30:36] = 60.0  # a bright "nodule" near the top-right corner
    mask = np.zeros((48, 48), dtype=bool)
    mask[6:12, 30:36] = True
    full = AugmentConfig(hflip=0.5, rotation_deg=15.0, translate=0.15, noise_hu=5.0)
    slices = CTSlices(hu, [1, 1, 0], train_transform(WINDOWS, full), seed=5)
    data = LesionSlices(slices, [mask, None, np.zeros_like(mask)])
    assert data.known == 1
    moved_somewhere = False
    for epoch in range(6):
        data.set_epoch(epoch)
        image, target, lesion, known = data[0]
        assert target == 1
        assert known
        assert torch.equal(image, slices[0][0])  # the very image the plain dataset gives
        assert set(lesion.unique().tolist()) <= {0.0, 1.0}
        assert lesion.sum() > 0
        inside = image[1][lesion[0] > 0].mean()
        outside = image[1][lesion[0] == 0].mean()
        assert inside > outside + 1.0  # the mask still covers the bright pixels
        moved_somewhere |= not bool(lesion[0, 6:12, 30:36].all())
    assert moved_somewhere  # the augmentation did move the lesion, and its mask with it
    _, target, lesion, known = data[1]  # a positive slice without a mask: place unknown
    assert (target, known, float(lesion.sum())) == (1, False, 0.0)
    _, target, lesion, known = data[2]  # a normal slice: known to hold no lesion
    assert (target, known, float(lesion.sum())) == (0, True, 0.0)
    with pytest.raises(ValueError, match="2 masks but 3 slices"):
        LesionSlices(slices, [mask, None])


def test_site_lesion_dataset_reads_the_sites_masks(tiny_site: Path) -> None:
    site = load_site(tiny_site, grid=FederationConfig(image_size=32).preprocess.grid)
    data = site_lesion_dataset(site, "train", classes=("normal", "nodule"), windows=WINDOWS)
    rows = site.indices("train")
    outlined = sum(site.lesion_mask(int(r)) is not None for r in rows)
    assert outlined > 0
    assert data.known == outlined
    for i in range(len(data)):
        _, target, lesion, known = data[i]
        assert known == (target == 0 or lesion.sum() > 0)


def test_the_lesion_loss_teaches_the_backbone_up_to_the_cam_stage_only() -> None:
    fed = FederationConfig(image_size=64)
    model = stock_resnet(fed).train()
    head = _LesionHead(model, fed)
    assert head.stage == cam_stage_name(model, 64) == "layer2"  # 8 cells across at 64 px
    assert model.training  # the probe pass leaves the mode as it was
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    images = torch.randn(4, 3, 64, 64)
    masks = torch.zeros(4, 1, 64, 64)
    masks[0, 0, 10:14, 40:44] = 1.0
    known = torch.tensor([True, True, False, True])
    model(images)
    loss = head.loss(masks, known)
    assert loss > 0
    loss.backward()
    torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=0.1).step()
    changed = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    for stage in ("conv1.", "layer1.", "layer2."):
        assert any(k.startswith(stage) and k.endswith("weight") for k in changed), stage
    assert not any(k.startswith(("layer3.", "layer4.", "fc.")) for k in changed)
    assert head.loss(masks, torch.zeros(4, dtype=torch.bool)) == 0  # nothing known: no loss
    head.close()
    model(images)
    assert head._features is None  # the hook is gone


def _lesion_metadata(path: Path) -> object:
    with safe_open(str(path), framework="pt") as handle:
        return json.loads(handle.metadata()[METADATA_KEY])["lesion-supervision"]


def test_pretraining_learns_lesions_only_where_they_are_outlined(
    tmp_path: Path, tiny_site: Path
) -> None:
    fed = FederationConfig(image_size=32)

    def run(name: str, weight: float = 1.0) -> PretrainResult:
        out = tmp_path / name
        cache = tmp_path / "cache"
        return pretrain(
            [tiny_site], fed, out, epochs=1, cache_root=cache, progress=False, lesion_weight=weight
        )

    taught = run("a.safetensors")
    assert taught.lesion_stage == "layer1"  # 8 cells across at 32 px
    assert taught.lesion_slices > 0
    about = _lesion_metadata(taught.path)
    assert about == {"stage": "layer1", "weight": 1.0, "slices-with-masks": taught.lesion_slices}
    with safe_open(str(taught.path), framework="pt") as handle:
        keys = set(handle.keys())
    assert keys == set(stock_resnet(fed).state_dict())  # the lesion head is not kept

    off = run("b.safetensors", weight=0.0)
    assert (off.lesion_stage, off.lesion_slices, _lesion_metadata(off.path)) == (None, 0, None)
    shutil.rmtree(tiny_site / "masks")
    assert run("c.safetensors").lesion_stage is None  # nothing outlined: nothing to learn
    for bad in (-1.0, float("nan")):
        with pytest.raises(ConfigError, match="lesion loss weight"):
            run("d.safetensors", weight=bad)
