from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from fedct.common.augment import AugmentConfig, eval_transform, train_transform
from fedct.common.errors import ConfigError
from fedct.common.preprocess import (
    WINDOW_PRESETS,
    GridConfig,
    Window,
    apply_windows,
    body_box,
    parse_windows,
    to_model_grid,
)


def test_fit_keeps_aspect_ratio_and_pads_with_air() -> None:
    hu = np.zeros((100, 200), dtype=np.float32)  # wide image of water
    out = to_model_grid(hu, (1.0, 1.0), GridConfig(64))
    assert out.shape == (64, 64)
    assert np.all(out[:16] == -1024)
    assert np.all(out[-16:] == -1024)
    assert np.allclose(out[17:47], 0.0)


def test_non_square_pixels_use_physical_size() -> None:
    hu = np.zeros((100, 100), dtype=np.float32)
    out = to_model_grid(hu, (2.0, 1.0), GridConfig(50))  # 200 mm tall, 100 mm wide
    water_cols = np.where(np.isclose(out[25], 0.0))[0]
    assert 24 <= len(water_cols) <= 26


@pytest.mark.parametrize("matrix", [512, 384, 500, 200])
def test_downsampling_is_anti_aliased_and_keeps_the_mean(matrix: int) -> None:
    # One-pixel stripes alias into bold bands under plain interpolation; an area (box) filter,
    # in one fractional pass or a whole-factor pass then a fractional one, averages them out
    # (as well as OpenCV's single fractional INTER_AREA pass does).
    hu = np.zeros((matrix, matrix), dtype=np.float32)
    hu[:, ::2] = 1000.0
    out = to_model_grid(hu, (0.7, 0.7), GridConfig(96))
    assert out.shape == (96, 96)
    one_pass = cv2.resize(hu, (96, 96), interpolation=cv2.INTER_AREA)
    aliased = cv2.resize(hu, (96, 96), interpolation=cv2.INTER_NEAREST)
    assert np.abs(aliased - 500.0).max() == 500.0
    assert np.abs(out - 500.0).max() <= np.abs(one_pass - 500.0).max() + 5.0
    assert abs(float(out.mean()) - 500.0) < 5.0
    ramp = np.tile(np.linspace(-1000, 1000, matrix, dtype=np.float32), (matrix, 1))
    smooth = to_model_grid(ramp, (0.7, 0.7), GridConfig(96))
    assert np.allclose(smooth[48], np.linspace(-1000, 1000, 96), atol=25.0)


def test_target_spacing_resamples_and_crops() -> None:
    hu = np.full((400, 400), -1000.0, dtype=np.float32)
    hu[190:210, 190:210] = 50.0  # a 20 px = 10 mm square at 0.5 mm spacing
    out = to_model_grid(hu, (0.5, 0.5), GridConfig(64, target_spacing_mm=1.0))
    assert out.shape == (64, 64)
    assert 90 <= int((out > 0).sum()) <= 110  # 10 mm at 1 mm/px: about 10x10 px


def test_windows_map_hu_to_unit_range() -> None:
    hu = torch.tensor([[-2000.0, -600.0, 40.0, 3000.0]]).reshape(1, 1, 4)
    out = apply_windows(hu, [WINDOW_PRESETS["lung"], WINDOW_PRESETS["mediastinum"]])
    assert out.shape == (2, 1, 4)
    assert out[0, 0, 1] == pytest.approx(0.5)  # lung center
    assert out[1, 0, 2] == pytest.approx(0.5)  # mediastinum center
    assert out.min() == 0
    assert out.max() == 1


def test_parse_windows() -> None:
    assert parse_windows("lung,40/400") == (WINDOW_PRESETS["lung"], Window(40, 400))
    with pytest.raises(ConfigError, match="unknown CT window"):
        parse_windows("brain")
    with pytest.raises(ConfigError):
        parse_windows("40/-5")


def test_grid_key_changes_with_settings() -> None:
    assert GridConfig(64).key() == GridConfig(64).key()
    assert GridConfig(64).key() != GridConfig(96).key()
    assert GridConfig(64).key() != GridConfig(64, target_spacing_mm=1.0).key()
    with pytest.raises(ConfigError):
        GridConfig(8)


def test_eval_transform_is_deterministic() -> None:
    hu = torch.randn(1, 32, 32) * 500
    t = eval_transform(tuple(WINDOW_PRESETS.values()))
    torch.testing.assert_close(t(hu), t(hu))
    assert t(hu).shape == (3, 32, 32)


def test_train_transform_is_random_but_seeded() -> None:
    hu = torch.randn(1, 32, 32) * 500
    t = train_transform(tuple(WINDOW_PRESETS.values()), AugmentConfig())
    torch.manual_seed(1)
    a = t(hu)
    torch.manual_seed(1)
    b = t(hu)
    c = t(hu)
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)


def test_augment_config_validates() -> None:
    with pytest.raises(ConfigError):
        AugmentConfig(hflip=2.0)


def test_flips_augmentation_keeps_every_pixel_as_scanned() -> None:
    from fedct.common.augment import AUGMENTATIONS
    from fedct.common.config import FederationConfig, app_defaults

    windows = tuple(WINDOW_PRESETS.values())
    hu = torch.randn(1, 32, 32) * 500
    plain = eval_transform(windows)(hu)
    flips = train_transform(windows, AUGMENTATIONS["flips"])
    for seed in range(6):
        torch.manual_seed(seed)
        out = flips(hu)
        assert torch.equal(out, plain) or torch.equal(out, plain.flip(-1))
    torch.manual_seed(0)
    torch.testing.assert_close(train_transform(windows, AUGMENTATIONS["none"])(hu), plain)
    fed = FederationConfig.from_mapping({**app_defaults(), "augmentation": "flips"})
    assert fed.augment == AUGMENTATIONS["flips"]
    with pytest.raises(ConfigError, match="augmentation must be one of full, flips, none"):
        FederationConfig.from_mapping({**app_defaults(), "augmentation": "heavy"})


def _chest(rows: int = 200, cols: int = 240) -> np.ndarray:
    """Air, an elliptical 'body' of water off-centre, and a thin table below it."""
    hu = np.full((rows, cols), -1000.0, dtype=np.float32)
    yy, xx = np.mgrid[:rows, :cols]
    hu[((yy - 80) / 40) ** 2 + ((xx - 100) / 60) ** 2 <= 1] = 20.0
    hu[150:152, 10:230] = 200.0  # table: two pixels thick, cut off by the opening
    return hu


def test_body_box_is_the_square_around_the_body_not_the_table() -> None:
    top, left, height, width = body_box(_chest(), (1.0, 1.0)) or (0, 0, 0, 0)
    assert height == width  # square in mm (square pixels here)
    assert 121 * (1 + 2 * 0.04) - 2 <= width <= 121 * (1 + 2 * 0.04) + 2  # the body is 121 wide
    assert abs((top + height / 2) - 80) <= 1.5
    assert abs((left + width / 2) - 100) <= 1.5
    assert body_box(np.full((64, 64), -1000.0, dtype=np.float32), (1.0, 1.0)) is None


def test_body_crop_fills_the_grid_and_masks_follow_their_image() -> None:
    hu = _chest()
    hu[70:76, 130:136] = 60.0  # a 'nodule' inside the body
    mask = np.zeros_like(hu)
    mask[70:76, 130:136] = 1.0
    whole = to_model_grid(hu, (1.0, 1.0), GridConfig(64))
    grid = GridConfig(64, crop="body")
    box = body_box(hu, (1.0, 1.0))
    cropped = to_model_grid(hu, (1.0, 1.0), grid, box=box)
    assert np.array_equal(cropped, to_model_grid(hu, (1.0, 1.0), grid))  # box found the same
    body_cols = lambda image: int((image[32] > -500).sum())  # noqa: E731
    assert body_cols(cropped) >= 0.9 * 64 > 1.5 * body_cols(whole)
    moved = to_model_grid(mask, (1.0, 1.0), grid, fill=0.0, box=box) > 0
    assert moved.any()
    assert cropped[moved].mean() > 35.0  # the mask lies on the nodule


def test_crop_setting_is_validated_and_keys_the_cache() -> None:
    with pytest.raises(ConfigError, match="none, body"):
        GridConfig(64, crop="lungs")
    assert GridConfig(64, crop="body").key() != GridConfig(64).key()
