"""The CUDA path end to end, for a machine with a GPU: one synthetic hospital's DP training
round (book-keeping clipping), its evaluation and Grad-CAM, on the CPU and then on CUDA, with
the same data, seed and settings; prints seconds for each and the speed-up (JSON with --json).

    python -m fedct.simulations.benchmarks.bench_cuda [--image-size 96] [--epochs 2] [--json F]

Exits with status 2 and says so where PyTorch sees no GPU. Tests never need one; this script
is what checks the CUDA path where a GPU is lent.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedct.client.rounds import train_config
from fedct.client.training import train_local
from fedct.common.config import FederationConfig
from fedct.common.dataset import site_dataset
from fedct.common.evaluation import evaluate
from fedct.common.gradcam import cam_maps
from fedct.common.metrics import binary_metrics
from fedct.common.models import build_model
from fedct.common.site import load_site
from fedct.simulations.synth import SynthSettings, write_hospitals


def run_on(device: str, fed: FederationConfig, folder: Path, cache: Path) -> dict[str, Any]:
    site = load_site(folder, grid=fed.preprocess.grid, cache_dir=cache, progress=False)
    train = site_dataset(
        site,
        "train",
        classes=fed.class_names,
        windows=fed.preprocess.windows,
        train=True,
        augment=fed.augment,
        seed=0,
    )
    held = site_dataset(
        site,
        site.eval_split(),
        classes=fed.class_names,
        windows=fed.preprocess.windows,
        train=False,
    )
    torch.manual_seed(0)
    model = build_model(fed.model_config)
    start = time.perf_counter()
    result = train_local(
        model, train, train_config(fed, 1), noise_multiplier=1.0, seed=0, device=device
    )
    trained = time.perf_counter() - start
    start = time.perf_counter()
    scores = evaluate(model, held, device=device)
    evaluated = time.perf_counter() - start
    images = torch.stack([held[i][0] for i in range(min(16, len(held)))]).to(device)
    start = time.perf_counter()
    cams = cam_maps(model, images, target_class=1)
    cam_seconds = time.perf_counter() - start
    positive = scores.targets == 1
    return {
        "device": device,
        "train_seconds": round(trained, 2),
        "steps": result.steps,
        "eval_seconds": round(evaluated, 2),
        "gradcam_seconds": round(cam_seconds, 2),
        "train_loss": round(result.mean_loss, 4),
        "auroc": binary_metrics(scores.probabilities[:, 1], positive).auroc,
        "cams_finite": bool(np.isfinite(cams).all()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU visible to PyTorch: this check needs one", file=sys.stderr)
        return 2
    fed = FederationConfig(image_size=args.image_size, local_epochs=args.epochs)
    with tempfile.TemporaryDirectory(prefix="fedct-cuda-") as tmp:
        (folder,) = write_hospitals(Path(tmp) / "data", SynthSettings(sites=1), progress=False)
        rows = [run_on(d, fed, folder, Path(tmp) / "cache") for d in ("cpu", "cuda")]
    cpu, cuda = rows
    summary = {
        "gpu": torch.cuda.get_device_name(0),
        "rows": rows,
        "train_speedup": round(cpu["train_seconds"] / max(cuda["train_seconds"], 1e-9), 2),
        "eval_speedup": round(cpu["eval_seconds"] / max(cuda["eval_seconds"], 1e-9), 2),
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
