"""Local training and evaluation at a hospital: plain PyTorch + Opacus, no Flower.

Reads as torchvision's reference scripts do: :func:`train_local` (one round: a few epochs, with
DP-SGD when a noise multiplier is given) and :func:`evaluate`. The privacy budget itself lives in
:mod:`client.privacy`; this module only runs the steps it is told to and reports what it did.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from fedct.client import grad_samplers  # noqa: F401  (registers Opacus grad samplers)
from fedct.client.bookkeeping import BookkeepingModule
from fedct.common.config import DP_CLIPPING, OPTIMIZERS
from fedct.common.errors import ConfigError
from fedct.common.seeding import derive_seed

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]
Backward = Callable[[torch.Tensor], None]  # per-sample losses -> parameters' .grad


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1
    optimizer: str = "sgd"  # adamw | sgd
    learning_rate: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 32  # logical batch (expected batch size under Poisson sampling)
    physical_batch_size: int = 32  # largest batch held in memory at once (DP only)
    max_grad_norm: float = 1.0  # per-sample clipping bound (DP only)
    proximal_mu: float = 0.0  # FedProx: weight of ||w - w_global||^2 / 2
    dp_clipping: str = "bookkeeping"  # bookkeeping (one backward pass) | hooks (Opacus')

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"local epochs must be at least 1, got {self.epochs}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning rate must be positive, got {self.learning_rate}")
        if self.batch_size < 1 or self.physical_batch_size < 1:
            raise ConfigError("batch sizes must be at least 1")
        if not self.max_grad_norm > 0:
            raise ConfigError(f"clipping bound must be positive, got {self.max_grad_norm}")
        if self.proximal_mu < 0:
            raise ConfigError(f"proximal mu must not be negative, got {self.proximal_mu}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}"
            )
        if self.dp_clipping not in DP_CLIPPING:
            raise ConfigError(
                f"dp-clipping must be one of {', '.join(DP_CLIPPING)}; got {self.dp_clipping!r}"
            )


@dataclass(frozen=True)
class TrainResult:
    examples: int
    steps: int
    mean_loss: float
    seconds: float
    noise_multiplier: float | None  # None: trained without DP
    sample_rate: float


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Steps of one epoch: as many as the plain loader has batches (Opacus' DPDataLoader keeps
    that number of Poisson-sampled batches)."""
    return max(1, math.ceil(num_examples / batch_size))


def sample_rate(num_examples: int, batch_size: int) -> float:
    """The Poisson sampling rate exactly as ``DPDataLoader.from_data_loader`` sets it
    (``1 / len(loader)``), so calibration, ledger and training agree on q and the steps."""
    return 1.0 / steps_per_epoch(num_examples, batch_size)


def train_local(
    model: nn.Module,
    dataset: Dataset[tuple[torch.Tensor, int]],
    cfg: TrainConfig,
    *,
    noise_multiplier: float | None,
    seed: int,
    device: torch.device | str = "cpu",
    progress: bool = False,
    description: str = "training",
    epsilon_after: Callable[[int], float] | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``cfg.epochs`` epochs; DP-SGD when ``noise_multiplier`` is set.

    ``epsilon_after(steps)`` (the site's cumulative ε after this many steps of the round) is
    shown in the progress bar. DP-SGD uses Poisson sampling, per-sample clipping to
    ``cfg.max_grad_norm`` and Gaussian noise of ``noise_multiplier * max_grad_norm``;
    physical batches are capped by Opacus' BatchMemoryManager so memory does not grow with
    the logical batch.
    """
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ConfigError("no training examples")
    device = torch.device(device)
    model.to(device).train()
    global_params = _snapshot(model) if cfg.proximal_mu > 0 else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = local_optimizer(trainable, cfg)
    generator = torch.Generator().manual_seed(derive_seed(seed, "loader") % 2**63)
    loader: DataLoader[tuple[torch.Tensor, int]] = DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=True, generator=generator
    )
    q = sample_rate(n, cfg.batch_size)
    losses: list[float] = []
    steps = 0
    start = time.perf_counter()
    with (
        _private(model, optimizer, loader, noise_multiplier, cfg, seed, global_params) as (
            net,
            opt,
            batches,
            backward,
        ),
        warnings.catch_warnings(),
    ):
        # Opacus' hooks on the first layer fire although images need no gradient: harmless
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for epoch in range(cfg.epochs):
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(derive_seed(seed, epoch) % 2**31)
            bar = tqdm(
                batches(),
                desc=f"{description} epoch {epoch + 1}/{cfg.epochs}",
                unit="batch",
                disable=not progress or None,
                leave=False,
            )
            for images, targets in bar:
                if len(targets) == 0:
                    # Poisson sampling drew nobody (probability below e^(-batch/2)): no update,
                    # but the step is still charged, as the accountant assumes every step ran.
                    steps += 1
                    continue
                images, targets = images.to(device), targets.to(device)
                opt.zero_grad(set_to_none=True)
                per_sample = nn.functional.cross_entropy(net(images), targets, reduction="none")
                backward(per_sample)
                opt.step()
                # With virtual steps (BatchMemoryManager) only real optimizer steps count.
                if not isinstance(opt, DPOptimizer) or not opt._is_last_step_skipped:
                    steps += 1
                    if global_params is not None and isinstance(opt, DPOptimizer):
                        _proximal_step(model, global_params, cfg.proximal_mu * cfg.learning_rate)
                losses.append(float(per_sample.detach().mean()))
                postfix = {"loss": f"{np.mean(losses[-20:]):.3f}"}
                if epsilon_after is not None and progress:
                    postfix["ε"] = f"{epsilon_after(steps):.2f}"
                bar.set_postfix(postfix)
    return TrainResult(
        examples=n,
        steps=steps,
        mean_loss=float(np.mean(losses)) if losses else math.nan,
        seconds=time.perf_counter() - start,
        noise_multiplier=noise_multiplier,
        sample_rate=q,
    )


def local_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The round's optimizer; a fresh one every round (its state is local and not shared).
    Under DP, Opacus' optimizer wraps it and hands it the clipped, noised gradient, so DP-AdamW
    is AdamW on privatized gradients: post-processing, no extra privacy cost."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        params, lr=cfg.learning_rate, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )


@contextmanager
def _private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader[tuple[torch.Tensor, int]],
    noise_multiplier: float | None,
    cfg: TrainConfig,
    seed: int,
    global_params: Mapping[str, torch.Tensor] | None = None,
) -> Iterator[tuple[nn.Module, torch.optim.Optimizer, Callable[[], Iterator[Batch]], Backward]]:
    """Yield ``(model, optimizer, batches, backward)``: wrapped for DP-SGD when
    ``noise_multiplier`` is set.

    Opacus' pieces are used directly (not ``PrivacyEngine``): the accountant is the site's
    ledger, across rounds and restarts, so a per-round engine would only duplicate it. The
    per-sample clipping is :mod:`client.bookkeeping`'s (one backward pass, norms without
    per-sample gradients) or, with ``dp_clipping = "hooks"``, Opacus' per-sample gradients.
    """
    if noise_multiplier is None:

        def plain_backward(per_sample: torch.Tensor) -> None:
            loss = per_sample.mean()
            if global_params is not None:
                loss = loss + _proximal_term(model, global_params, cfg.proximal_mu)
            loss.backward()

        yield model, optimizer, lambda: iter(loader), plain_backward
        return
    noise = torch.Generator().manual_seed(derive_seed(seed, "noise") % 2**63)
    dp_model, dp_optimizer, backward = make_private(
        model, optimizer, cfg, noise_multiplier=noise_multiplier, generator=noise
    )
    generator = torch.Generator().manual_seed(derive_seed(seed, "poisson") % 2**63)
    dp_loader = DPDataLoader.from_data_loader(loader, generator=generator)

    def batches() -> Iterator[Batch]:
        with BatchMemoryManager(
            data_loader=dp_loader,
            max_physical_batch_size=cfg.physical_batch_size,
            optimizer=dp_optimizer,
        ) as memory_safe:
            yield from memory_safe

    try:
        yield dp_model, dp_optimizer, batches, backward
    finally:
        dp_model.remove_hooks()  # the model outlives this round: leave no hooks or
        dp_model.cleanup()  # per-sample gradients on it


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    *,
    noise_multiplier: float,
    generator: torch.Generator | None = None,
) -> tuple[GradSampleModule | BookkeepingModule, DPOptimizer, Backward]:
    """``(wrapped model, DP optimizer, backward)`` for DP-SGD steps with ``cfg.dp_clipping``:
    ``backward(per-sample losses)`` leaves what the optimizer's ``step`` clips (hooks) or has
    clipped (bookkeeping), noises and applies. The caller removes the wrapper's hooks."""
    dp_model: GradSampleModule | BookkeepingModule
    optimizer_type: type[DPOptimizer]
    if cfg.dp_clipping == "bookkeeping":
        dp_model = BookkeepingModule(model, max_grad_norm=cfg.max_grad_norm)
        optimizer_type = DPOptimizerFastGradientClipping
        backward: Backward = dp_model.backward
    else:
        dp_model = GradSampleModule(
            model, batch_first=True, loss_reduction="mean", strict=True, force_functorch=False
        )
        optimizer_type = DPOptimizer

        def hooks_backward(per_sample: torch.Tensor) -> None:
            per_sample.mean().backward()  # the hooks keep each sample's gradient

        backward = hooks_backward
    dp_optimizer = optimizer_type(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=cfg.max_grad_norm,
        expected_batch_size=cfg.batch_size,
        loss_reduction="mean",
        generator=generator,
    )
    return dp_model, dp_optimizer, backward


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _proximal_step(model: nn.Module, anchor: Mapping[str, torch.Tensor], rate: float) -> None:
    """FedProx under DP: the proximal pull ``w -= lr mu (w - w_global)`` as its own step after
    the private one. It depends on no data, so it is post-processing and costs no privacy (in
    the loss it would be clipped and noised with the data's gradient)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in anchor:
                p.sub_(p - anchor[n], alpha=rate)


def _proximal_term(model: nn.Module, anchor: Mapping[str, torch.Tensor], mu: float) -> torch.Tensor:
    terms = [((p - anchor[n]) ** 2).sum() for n, p in model.named_parameters() if n in anchor]
    return 0.5 * mu * torch.stack(terms).sum()
