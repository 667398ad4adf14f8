"""Grad-CAM study on a simulation's output: where the CAM points on each ResNet stage, and
whether the model needs the lesion at all.

    python -m fedct.simulations.benchmarks.cam_study OUT [--split train,val] \\
        [--method gradcam] [--json F]

OUT is a ``fedct simulate`` output folder (its ``data/`` sites with lesion masks and its
``federation/final_model.safetensors``). For every positive slice with a mask it reports, per
stage, the pointing-game hit rate on true positives (within the usual tolerance and strictly
inside) and the share of all-zero maps; and an occlusion check: the positive probability once
the lesion is filled with the surrounding lung's median HU, against the same patch filled
elsewhere in the image. A model whose true positives collapse when only the lesion is filled
decides on the lesion, whatever its CAM shows. A study on the simulation's own data, with its
masks: it runs where the data is, like everything that reads slices.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from fedct.common.augment import eval_transform
from fedct.common.gradcam import METHODS, POINTING_TOLERANCE, cam_maps, localization
from fedct.common.model_file import load_model
from fedct.common.models import RESNET_STAGES
from fedct.common.site import load_site


def _grow(mask: np.ndarray, pixels: int) -> np.ndarray:
    return cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=pixels) > 0


def _fill(hu: np.ndarray, region: np.ndarray, ring: np.ndarray) -> np.ndarray:
    out = hu.copy()
    out[region] = np.median(hu[ring])
    return out


def study(out: Path, splits: list[str], method: str, seed: int = 0) -> dict[str, Any]:
    model, fed = load_model(out / "federation" / "final_model.safetensors")
    transform = eval_transform(fed.preprocess.windows)
    rng = np.random.default_rng(seed)
    masks: list[np.ndarray] = []
    originals: list[torch.Tensor] = []
    filled: list[torch.Tensor] = []
    moved: list[torch.Tensor] = []
    for site_dir in sorted(p for p in (out / "data").iterdir() if p.is_dir()):
        site = load_site(site_dir, grid=fed.preprocess.grid, progress=False)
        for row in site.indices(splits):
            mask = site.lesion_mask(int(row))
            if mask is None:
                continue
            hu = site.images[row].astype(np.float32)
            region = _grow(mask, 1)
            ring = _grow(region, 2) & ~region
            shift = (int(rng.integers(-20, 21)), int(rng.integers(-20, 21)))
            elsewhere = np.roll(region, shift, axis=(0, 1)) & ~region
            for target, hu_image in (
                (originals, hu),
                (filled, _fill(hu, region, ring)),
                (moved, _fill(hu, elsewhere, ring)),
            ):
                target.append(transform(torch.from_numpy(hu_image)[None]))
            masks.append(mask)
    if not masks:
        raise SystemExit(f"no positive slice with a lesion mask in {out / 'data'} ({splits})")
    positive = len(fed.class_names) - 1
    with torch.no_grad():
        p = {
            name: torch.softmax(model(torch.stack(batch)), 1)[:, positive].numpy()
            for name, batch in (("original", originals), ("filled", filled), ("moved", moved))
        }
    true_pos = p["original"] >= 0.5
    images = torch.stack(originals)[true_pos]
    tp_masks = np.stack(masks)[true_pos]
    stages: dict[str, dict[str, float]] = {}
    for stage in RESNET_STAGES[1:]:
        chunks = [
            cam_maps(model, images[i : i + 32], target_class=positive, method=method, layer=stage)
            for i in range(0, len(images), 32)
        ]
        maps = np.concatenate(chunks) if chunks else np.zeros((0, *tp_masks.shape[1:]))
        found = localization(maps, tp_masks)
        stages[stage] = {
            "pointing": found.pointing_hit_rate,
            "pointing_strict": found.strict_hit_rate,
            "energy_inside": found.mean_energy_inside,
            "all_zero_maps": float(np.mean([m.max() <= 0 for m in maps])) if len(maps) else 0.0,
        }
    return {
        "positives_with_mask": len(masks),
        "true_positives": int(true_pos.sum()),
        "tolerance_px": POINTING_TOLERANCE * fed.preprocess.grid.image_size,
        "method": method,
        "stages": stages,
        "occlusion": {
            "mean_p_true_positives": float(p["original"][true_pos].mean()),
            "mean_p_lesion_filled": float(p["filled"][true_pos].mean()),
            "mean_p_patch_filled_elsewhere": float(p["moved"][true_pos].mean()),
            "flipped_lesion_filled": float((p["filled"][true_pos] < 0.5).mean()),
            "flipped_patch_filled_elsewhere": float((p["moved"][true_pos] < 0.5).mean()),
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="a `fedct simulate --out` folder")
    parser.add_argument("--split", default="train,val", help="comma-separated splits to use")
    parser.add_argument("--method", choices=sorted(METHODS), default="gradcam")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    result = study(args.out, args.split.split(","), args.method)
    print(
        f"{result['positives_with_mask']} positive slices with a mask, "
        f"{result['true_positives']} true positives; tolerance {result['tolerance_px']:.1f} px"
    )
    for stage, r in result["stages"].items():
        print(
            f"  {stage}: pointing {r['pointing']:.2f} (strict {r['pointing_strict']:.2f}), "
            f"energy inside {r['energy_inside']:.3f}, all-zero maps {r['all_zero_maps']:.2f}"
        )
    o = result["occlusion"]
    print(
        f"  occlusion: p {o['mean_p_true_positives']:.3f} -> {o['mean_p_lesion_filled']:.3f} "
        f"with the lesion filled ({o['flipped_lesion_filled']:.0%} below 0.5), "
        f"{o['mean_p_patch_filled_elsewhere']:.3f} with the same patch filled elsewhere "
        f"({o['flipped_patch_filled_elsewhere']:.0%})"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
