"""DP-SGD cost benchmark: non-private vs Opacus DP-SGD steps on the same model and data.

For ResNet-18 at several image sizes and freeze policies, alternates one non-private and one
private step (same batch) and reports images/second, the DP/non-private step-time ratio, and
DP's extra memory: the per-sample gradients Opacus holds, against batch x trainable-parameter
bytes (the unavoidable minimum of per-sample clipping).

    python -m simulations.bench_dp [--sizes 96 128 224] [--freeze none last1 head]
        [--norm group folded] [--steps 4]

``--norm folded`` is the structure a pretrained BatchNorm ResNet takes in FedCT (BatchNorm folded
into biased convolutions); with ``--freeze head`` it is FedCT's recommended DP fine-tuning.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

import client.grad_samplers  # noqa: F401  (registers the weight-standardized conv sampler)
from common.models import ModelConfig, build_model


def _step_time(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> float:
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    return time.perf_counter() - start


def bench(
    size: int, freeze: str, norm: str, batch: int, steps: int
) -> dict[str, float | int | str]:
    torch.manual_seed(0)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 2, (batch,))
    plain = build_model(ModelConfig(freeze=freeze, norm=norm))
    private = build_model(ModelConfig(freeze=freeze, norm=norm))
    private.load_state_dict(plain.state_dict())
    plain_opt = torch.optim.SGD([p for p in plain.parameters() if p.requires_grad], lr=0.01)
    gsm = GradSampleModule(private)
    dp_opt = DPOptimizer(
        torch.optim.SGD([p for p in private.parameters() if p.requires_grad], lr=0.01),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=batch,
    )
    trainable = [p for p in private.parameters() if p.requires_grad]
    plain.train()
    gsm.train()
    _step_time(plain, plain_opt, x, y)  # warm-up both
    _step_time(gsm, dp_opt, x, y)
    t_plain, t_dp = [], []
    grad_sample_bytes = 0
    for _ in range(steps):
        t_plain.append(_step_time(plain, plain_opt, x, y))
        dp_opt.zero_grad(set_to_none=True)
        start = time.perf_counter()
        nn.functional.cross_entropy(gsm(x), y).backward()
        grad_sample_bytes = sum(
            p.grad_sample.nelement() * p.grad_sample.element_size()
            for p in trainable
            if p.grad_sample is not None
        )
        dp_opt.step()
        t_dp.append(time.perf_counter() - start)
    gsm.remove_hooks()
    floor = batch * sum(p.numel() * p.element_size() for p in trainable)
    plain_s, dp_s = statistics.median(t_plain), statistics.median(t_dp)
    return {
        "image_size": size,
        "freeze": freeze,
        "norm": norm,
        "batch": batch,
        "trainable_params": sum(p.numel() for p in trainable),
        "plain_images_per_s": round(batch / plain_s, 1),
        "dp_images_per_s": round(batch / dp_s, 1),
        "dp_time_ratio": round(dp_s / plain_s, 2),
        "dp_extra_memory_mb": round(grad_sample_bytes / 2**20, 1),
        "dp_extra_vs_batch_x_trainable": round(grad_sample_bytes / floor, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 128, 224])
    parser.add_argument("--freeze", nargs="+", default=["none", "last1", "head"])
    parser.add_argument("--norm", nargs="+", default=["group"], choices=["group", "folded"])
    parser.add_argument("--batch", type=int, default=16, help="physical batch per step")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = [
        bench(s, f, n, args.batch, args.steps)
        for s in args.sizes
        for n in args.norm
        for f in args.freeze
    ]
    header = (
        "size",
        "norm",
        "freeze",
        "plain img/s",
        "DP img/s",
        "DP/plain time",
        "DP extra MB",
        "extra/(B x trainable)",
    )
    print(" | ".join(header))
    for r in rows:
        print(
            " | ".join(
                str(v)
                for v in (
                    r["image_size"],
                    r["norm"],
                    r["freeze"],
                    r["plain_images_per_s"],
                    r["dp_images_per_s"],
                    r["dp_time_ratio"],
                    r["dp_extra_memory_mb"],
                    r["dp_extra_vs_batch_x_trainable"],
                )
            )
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
