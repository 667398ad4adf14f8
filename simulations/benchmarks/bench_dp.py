"""DP-SGD cost benchmark: non-private vs private steps on the same model and data.

For ResNet-18 at several image sizes, normalisations and freeze policies, alternates (same
batch, one process) a non-private step, an Opacus hooks-mode DP step and a book-keeping DP step
(client/bookkeeping.py), and reports images/second and the DP/non-private step-time ratio.
Memory is measured apart, each kind of step in a fresh process: its peak resident memory
during the steps, above the non-private step's, against batch x trainable-parameter bytes
(what materialising every per-sample gradient costs).

    python -m fedct.simulations.benchmarks.bench_dp [--sizes 96 224] [--norm group folded]
        [--freeze none last1 head] [--batch 32] [--steps 4] [--json FILE]

``group`` is FedCT's model trained from scratch (GroupNorm + weight standardization, the
default), ``folded`` the structure a pretrained BatchNorm ResNet takes; ``--batch`` is the
physical batch (FedCT's default: 32).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from fedct.client.training import TrainConfig, make_private
from fedct.common.models import ModelConfig, build_model

MODES = ("plain", "hooks", "bookkeeping")


def _stepper(
    mode: str, model: nn.Module, batch: int
) -> tuple[Callable[[torch.Tensor, torch.Tensor], None], Callable[[], None]]:
    """``(step(x, y), close())`` for one kind of training step on ``model``."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.01)
    if mode == "plain":

        def plain(x: torch.Tensor, y: torch.Tensor) -> None:
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()

        return plain, lambda: None
    cfg = TrainConfig(batch_size=batch, physical_batch_size=batch, dp_clipping=mode)
    wrapped, dp_optimizer, backward = make_private(model, optimizer, cfg, noise_multiplier=1.0)

    def private(x: torch.Tensor, y: torch.Tensor) -> None:
        dp_optimizer.zero_grad(set_to_none=True)
        backward(nn.functional.cross_entropy(wrapped(x), y, reduction="none"))
        dp_optimizer.step()

    def close() -> None:
        wrapped.remove_hooks()
        wrapped.cleanup()

    return private, close


def _setup(
    size: int, norm: str, freeze: str, batch: int
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(ModelConfig(freeze=freeze, norm=norm)).train()
    return model, torch.randn(batch, 3, size, size), torch.randint(0, 2, (batch,))


def step_times(size: int, norm: str, freeze: str, batch: int, steps: int) -> dict[str, float]:
    """Median seconds per step of each mode, alternating modes on one batch."""
    model, x, y = _setup(size, norm, freeze, batch)
    models = {m: build_model(ModelConfig(freeze=freeze, norm=norm)).train() for m in MODES}
    for m in models.values():
        m.load_state_dict(model.state_dict())
    steppers = {mode: _stepper(mode, models[mode], batch) for mode in MODES}
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for i in range(steps + 1):  # the first round warms every mode up
        for mode, (step, _) in steppers.items():
            start = time.perf_counter()
            step(x, y)
            if i:
                times[mode].append(time.perf_counter() - start)
    for _, close in steppers.values():
        close()
    return {mode: statistics.median(t) for mode, t in times.items()}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _peak_growth(size: int, norm: str, freeze: str, batch: int, mode: str) -> int:
    """Bytes the peak resident memory rises above the resident memory at the start, during
    3 steps of ``mode`` (in a fresh process; Linux' VmHWM, reset first)."""
    model, x, y = _setup(size, norm, freeze, batch)
    step, close = _stepper(mode, model, batch)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the current size
    before = _status_kib("VmRSS")
    for _ in range(3):
        step(x, y)
    close()
    return (_status_kib("VmHWM") - before) * 1024


def peak_growth(size: int, norm: str, freeze: str, batch: int, mode: str) -> int:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_peak_growth, (size, norm, freeze, batch, mode))


def bench(size: int, norm: str, freeze: str, batch: int, steps: int) -> list[dict[str, object]]:
    seconds = step_times(size, norm, freeze, batch, steps)
    memory = {mode: peak_growth(size, norm, freeze, batch, mode) for mode in MODES}
    model = build_model(ModelConfig(freeze=freeze, norm=norm))
    trainable_bytes = sum(
        p.numel() * p.element_size() for p in model.parameters() if p.requires_grad
    )
    rows = []
    for mode in MODES[1:]:
        extra = max(0, memory[mode] - memory["plain"])
        rows.append(
            {
                "image_size": size,
                "norm": norm,
                "freeze": freeze,
                "clipping": mode,
                "batch": batch,
                "plain_images_per_s": round(batch / seconds["plain"], 1),
                "dp_images_per_s": round(batch / seconds[mode], 1),
                "dp_time_ratio": round(seconds[mode] / seconds["plain"], 2),
                "dp_extra_peak_mb": round(extra / 2**20, 1),
                "dp_extra_vs_batch_x_trainable": round(extra / (batch * trainable_bytes), 3),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 224])
    parser.add_argument(
        "--norm", nargs="+", default=["group", "folded"], choices=["group", "folded"]
    )
    parser.add_argument("--freeze", nargs="+", default=["none", "last1", "head"])
    parser.add_argument("--batch", type=int, default=32, help="physical batch per step")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    columns = (
        "image_size",
        "norm",
        "freeze",
        "clipping",
        "plain_images_per_s",
        "dp_images_per_s",
        "dp_time_ratio",
        "dp_extra_peak_mb",
        "dp_extra_vs_batch_x_trainable",
    )
    print(" | ".join(columns), flush=True)
    rows = []
    for size in args.sizes:
        for norm in args.norm:
            for freeze in args.freeze:
                for row in bench(size, norm, freeze, args.batch, args.steps):
                    rows.append(row)
                    print(" | ".join(str(row[c]) for c in columns), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
