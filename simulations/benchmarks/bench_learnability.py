"""Centralized, non-private baseline: how learnable is a set of hospitals when pooled?

Trains one ResNet-18 on the pooled training splits of every site under ``--data`` and reports
AUROC on the pooled validation splits and, with ``--test``, on every slice of a second set of
hospitals (different patients, e.g. another synthetic seed). ``--norm batch`` is torchvision's
stock ResNet-18 (BatchNorm, not usable under DP); ``--norm group`` is FedCT's DP-compatible
one (GroupNorm + weight standardization), ``group-no-ws`` the same without standardization.

    python -m fedct.simulations.benchmarks.bench_learnability --data synth/ \\
        --test synth-test/ [--norm batch]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torchvision
from sklearn.metrics import roc_auc_score
from torch import nn

from fedct.common.config import FederationConfig
from fedct.common.dataset import site_dataset
from fedct.common.models import build_model
from fedct.common.site import load_site


def _stack(
    root: Path, splits: list[str], fed: FederationConfig, cache: Path
) -> tuple[torch.Tensor, torch.Tensor]:
    images, targets = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        site = load_site(
            folder, grid=fed.preprocess.grid, cache_dir=cache / folder.name, progress=False
        )
        data = site_dataset(
            site, splits, classes=fed.class_names, windows=fed.preprocess.windows, train=False
        )
        for i in range(len(data)):
            x, y = data[i]
            images.append(x)
            targets.append(y)
    return torch.stack(images), torch.tensor(targets)


def _auroc(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        scores = torch.cat(
            [torch.softmax(model(x[i : i + 256]), 1)[:, -1] for i in range(0, len(x), 256)]
        )
    return float(roc_auc_score(y.numpy(), scores.numpy()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--test", type=Path)
    parser.add_argument(
        "--norm",
        choices=["batch", "group", "group-no-ws"],
        default="batch",
        help="stock BatchNorm ResNet; FedCT's GroupNorm + weight standardization; GroupNorm alone",
    )
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--crop", choices=["none", "body"], default="none")
    parser.add_argument("--windows", default="lung,mediastinum,bone")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=Path(".fedct-cache/bench-learnability"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    fed = FederationConfig(image_size=args.image_size, crop=args.crop, windows=args.windows)
    x, y = _stack(args.data, ["train"], fed, args.cache)
    xv, yv = _stack(args.data, ["val", "test"], fed, args.cache)
    test = _stack(args.test, ["train", "val", "test"], fed, args.cache) if args.test else None
    torch.manual_seed(args.seed)
    model = (
        torchvision.models.resnet18(num_classes=len(fed.class_names))
        if args.norm == "batch"
        else build_model(replace(fed.model_config, weight_standardization=args.norm == "group"))
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs)
    history = []
    for epoch in range(args.epochs):
        start = time.perf_counter()
        model.train()
        order = torch.randperm(len(x))
        total = 0.0
        for b in range(0, len(x), 32):
            idx = order[b : b + 32]
            batch = x[idx].flip(-1) if torch.rand(()) < 0.5 else x[idx]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(batch), y[idx])
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        schedule.step()
        row = {
            "epoch": epoch + 1,
            "train_loss": round(total / len(x), 4),
            "val_auroc": round(_auroc(model, xv, yv), 4),
            "seconds": round(time.perf_counter() - start, 1),
        }
        if test is not None and epoch == args.epochs - 1:
            row["test_auroc"] = round(_auroc(model, *test), 4)
        history.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"norm": args.norm, "history": history}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
