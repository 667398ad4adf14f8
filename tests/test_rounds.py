"""A site's evaluation round, without Flower."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import fedct.client.rounds
from fedct.common.config import FederationConfig, SiteConfig
from fedct.common.models import build_model
from fedct.common.site import load_site
from fedct.common.weights import model_weights


def test_evaluation_survives_a_failing_explanation(
    tiny_site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fed = FederationConfig(image_size=32, min_eval_cases=1, min_eval_patients=1)
    site = SiteConfig(site_name="a", data_dir=str(tiny_site), state_dir=str(tmp_path / "state"))
    model = build_model(fed.model_config)
    with torch.no_grad():  # p(nodule) = sigmoid(2) on every slice, whatever it shows
        model.fc.weight.zero_()
        model.fc.bias.copy_(torch.tensor([-1.0, 1.0]))
    weights = model_weights(model)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no gradient reached the target layer")

    monkeypatch.setattr(fedct.client.rounds, "cam_localization", broken)
    metrics = fedct.client.rounds.evaluate_round(site, fed, weights)
    assert metrics["reported"] == 1
    # known answer: a model calling every slice a nodule is right on exactly the nodule slices
    data = load_site(
        tiny_site, grid=fed.preprocess.grid, val_fraction=fed.val_fraction, progress=False
    )
    labels = [data.slices[int(r)].label for r in data.indices(data.eval_split())]
    assert 0 < labels.count("nodule") < len(labels)  # both classes held out
    assert metrics["num-examples"] == len(labels)
    assert metrics["accuracy"] == pytest.approx(labels.count("nodule") / len(labels))
    assert sum(metrics["hist-neg"]) + sum(metrics["hist-pos"]) == metrics["num-examples"]
    assert metrics["cam-slices"] == 0
    assert math.isnan(metrics["cam-pointing"])


def test_cam_localization_sends_only_averages(
    tiny_site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Known answers: one-pixel lesion masks the test places around each slice's own Grad-CAM
    peak give hit rates fixed by construction."""
    from fedct.common.dataset import site_dataset
    from fedct.common.gradcam import POINTING_TOLERANCE, cam_maps, cam_peak

    fed = FederationConfig(image_size=32)
    data = load_site(tiny_site, grid=fed.preprocess.grid, progress=False)
    split = ["train", "val"]
    dataset = site_dataset(
        data, split, classes=fed.class_names, windows=fed.preprocess.windows, train=False
    )
    rows = data.indices(split)
    positive = np.asarray([data.slices[int(r)].label == "nodule" for r in rows])
    torch.manual_seed(0)
    model = build_model(fed.model_config).eval()
    # Each positive slice in turn gets a mask: on its CAM peak (a strict hit), 2 px from it
    # (a hit within the tolerance only), 4 px from it (a miss), or none (not scored).
    assert 2 < POINTING_TOLERANCE * 32 < 4
    kinds = {int(i): k % 4 for k, i in enumerate(np.flatnonzero(positive))}
    assert len(kinds) >= 8
    masked = [i for i, kind in kinds.items() if kind != 3]
    images = torch.stack([dataset[i][0] for i in masked])
    cams = cam_maps(model, images, target_class=1, layer=fed.cam_layer)  # the same batch
    masks: dict[int, np.ndarray] = {}
    energies = []
    for i, cam in zip(masked, cams, strict=True):
        peak = cam_peak(cam)
        assert peak is not None  # this seed's CAMs point somewhere
        row, col = peak
        offset = (0, 2, 4)[kinds[i]]
        mask = np.zeros(cam.shape, dtype=bool)
        mask[row + offset if row < 16 else row - offset, col] = True
        masks[int(rows[i])] = mask
        energies.append(cam[mask].sum() / cam.sum())
    monkeypatch.setattr(data, "lesion_mask", lambda row: masks.get(row))

    metrics = fedct.client.rounds.cam_localization(
        model, data, dataset, rows, positive, 1, layer=fed.cam_layer
    )
    assert set(metrics) == {"cam-slices", "cam-pointing", "cam-pointing-strict", "cam-energy"}
    kind_counts = np.bincount([kinds[i] for i in masked], minlength=3)
    assert metrics["cam-slices"] == len(masked)
    assert metrics["cam-pointing"] == pytest.approx(kind_counts[:2].sum() / len(masked))
    assert metrics["cam-pointing-strict"] == pytest.approx(kind_counts[0] / len(masked))
    assert metrics["cam-energy"] == pytest.approx(np.mean(energies))


def test_evaluation_sends_only_aggregates_of_slices_series_and_patients(
    tiny_site: Path, tmp_path: Path
) -> None:
    fed = FederationConfig(image_size=32, min_eval_cases=1, min_eval_patients=1)
    site = SiteConfig(site_name="a", data_dir=str(tiny_site), state_dir=str(tmp_path / "state"))
    metrics = fedct.client.rounds.evaluate_round(
        site, fed, model_weights(build_model(fed.model_config))
    )
    for key, value in metrics.items():
        assert isinstance(value, int | float | list), key  # no strings, no identifiers
        if isinstance(value, list):
            assert key.endswith(("hist-neg", "hist-pos")), key
            assert len(value) == fed.histogram_bins, key
            assert all(isinstance(v, int) for v in value), key
    for level in ("series", "patient"):
        assert metrics[f"{level}-reported"] == 1
        counted = sum(metrics[f"{level}-hist-neg"]) + sum(metrics[f"{level}-hist-pos"])
        assert counted == metrics[f"{level}-num"] > 0
        assert metrics[f"{level}-positives"] == sum(metrics[f"{level}-hist-pos"])
        assert {f"{level}-auroc", f"{level}-sensitivity", f"{level}-specificity"} <= set(metrics)
    # synthetic patients have one series each
    assert metrics["patient-num"] == metrics["series-num"] < metrics["num-examples"]


def test_small_cohorts_report_series_and_patients_as_counts_only() -> None:
    from fedct.common.metrics import PATIENT, SERIES

    scores = np.array([0.1, 0.8, 0.3, 0.6])
    positive = np.array([False, True, False, False])
    groups = {
        SERIES: [("p1", "a"), ("p1", "b"), ("p2", "c"), ("p2", "c")],
        PATIENT: ["p1"] * 2 + ["p2"] * 2,
    }
    counts = fedct.client.rounds.group_levels(groups, scores, positive, bins=10, min_patients=3)
    assert counts == {
        "series-num": 3,
        "series-reported": 0,
        "patient-num": 2,
        "patient-reported": 0,
    }
    full = fedct.client.rounds.group_levels(groups, scores, positive, bins=10, min_patients=2)
    assert full["series-reported"] == full["patient-reported"] == 1
    assert full["series-positives"] == 1
    assert full["patient-auroc"] == 1.0  # p1 (positive) 0.8 > p2 (negative) 0.6
    assert full["series-auroc"] == pytest.approx(1.0)  # 0.8 above 0.1 and 0.6
