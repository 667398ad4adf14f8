"""The peer baseline: the plain Flower + Opacus recipe a user would write instead of FedCT.

It follows the shape of Flower's Opacus example, on FedCT's own site reading (same slices, same
patient split, same held-out patients) so that both are scored on the same cases:
- torchvision ResNet-18 (2 classes), BatchNorm replaced by GroupNorm with Opacus'
  ``ModuleValidator.fix``; the lung window (-600/1500 HU) replicated to 3 channels, 64 px;
- random horizontal flips as the only augmentation (what a plain user adds);
- AdamW (lr 1e-3), batch 32, 1 local epoch a round from the global model; FedAvg weighted by
  training examples (:func:`fedavg`: what Flower's FedAvg computes);
- a FRESH ``opacus.PrivacyEngine`` per site and round (``make_private``, Poisson sampling, noise
  multiplier 1.0, clipping 1.0), whose ``get_epsilon`` covers that round only. The engine uses
  the RDP accountant (Flower's example keeps Opacus' default, PRV) so the reported and the true
  ε differ by composition alone. The true ε composes every round's accountant history with
  FedCT's accountant (:func:`client.privacy.epsilon_of`) at the site's δ
  (:func:`client.privacy.default_delta`), as FedCT's ledger would.

No Flower import: the task code of such an app, run in one process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader
from torchvision.models import resnet18

from fedct.client.privacy import default_delta, epsilon_of
from fedct.common.augment import AUGMENTATIONS
from fedct.common.config import FederationConfig
from fedct.common.dataset import CTSlices, site_dataset
from fedct.common.evaluation import evaluate
from fedct.common.metrics import binary_metrics
from fedct.common.preprocess import WINDOW_PRESETS, GridConfig
from fedct.common.seeding import derive_seed
from fedct.common.site import load_site

log = logging.getLogger(__name__)

CLASSES = tuple(FederationConfig.classes.split(","))  # FedCT's default classes; positive last
WINDOWS = (WINDOW_PRESETS["lung"],) * 3  # the lung window, replicated to ResNet's 3 channels
AUGMENT = AUGMENTATIONS["flips"]  # random horizontal flip only
ACCOUNTANT = "rdp"

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class PeerRecipe:
    """The peer's hyper-parameters: the issue's values, in Flower's Opacus example's shape."""

    learning_rate: float = 1e-3  # AdamW
    batch_size: int = 32  # expected batch under Poisson sampling
    local_epochs: int = 1
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0


@dataclass(frozen=True)
class PeerSite:
    """One hospital as the peer recipe sees it."""

    name: str
    train: CTSlices
    held_out: CTSlices  # FedCT's evaluation split of the site (SiteData.eval_split)
    patients: int  # training patients: what δ is chosen from
    delta: float  # FedCT's default δ for this site


@dataclass(frozen=True)
class SiteOutcome:
    auroc: float  # on the site's held-out slices (NaN with one class)
    num_train_examples: int
    num_held_out: int
    steps: int  # optimizer steps on this site's data over all rounds
    delta: float
    reported_epsilon: tuple[float, ...]  # each round's fresh engine; () without DP
    true_epsilon: float | None  # all rounds composed at ``delta``; None without DP


@dataclass(frozen=True)
class PeerResult:
    method: str  # "peer" | "peer-centralized"
    seed: int
    dp: bool
    rounds: int  # federated rounds (centralized: epochs)
    pooled_auroc: float  # sklearn, on every site's held-out slices together
    sites: dict[str, SiteOutcome]
    wall_seconds: float  # training and evaluation, not data loading


def load_peer_data(
    data_root: str | Path, *, image_size: int = 64, seed: int, val_fraction: float = 0.2
) -> list[PeerSite]:
    """Every hospital under ``data_root`` (one sub-folder each), read and split by FedCT's
    ``load_site`` so the held-out patients are FedCT's; ``seed`` seeds the flips."""
    folders = sorted(p for p in Path(data_root).iterdir() if p.is_dir())
    if not folders:
        raise FileNotFoundError(f"no hospital folders in {data_root} (one sub-folder per site)")
    sites = []
    for folder in folders:
        grid = GridConfig(image_size)
        data = load_site(folder, grid=grid, val_fraction=val_fraction, progress=False)
        data.require_trainable(CLASSES)
        train = site_dataset(
            data, "train", classes=CLASSES, windows=WINDOWS, train=True, seed=seed, augment=AUGMENT
        )
        split = data.eval_split()
        held_out = site_dataset(data, split, classes=CLASSES, windows=WINDOWS, train=False)
        patients = data.num_patients("train")
        sites.append(PeerSite(data.name, train, held_out, patients, default_delta(patients)))
    return sites


def peer_model(seed: int) -> nn.Module:
    """ResNet-18 for 2 classes with GroupNorm, as ``ModuleValidator.fix`` makes it."""
    torch.manual_seed(derive_seed(seed, "peer model"))
    return ModuleValidator.fix(resnet18(num_classes=len(CLASSES)))


def fedavg(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[int]) -> State:
    """The mean of ``states`` weighted by ``weights`` (training examples), computed as Flower's
    FedAvg does: sum(w_i x_i) / sum(w_i), in float64, cast back to each tensor's dtype."""
    if not states or len(states) != len(weights):
        raise ValueError(f"need one weight per state dict; got {len(states)} and {len(weights)}")
    if any(w <= 0 for w in weights):
        raise ValueError(f"weights must be positive, got {list(weights)}")
    keys = set(states[0])
    if any(set(s) != keys for s in states):
        raise ValueError("the state dicts do not have the same keys")
    total = float(sum(weights))
    out: State = {}
    for key, first in states[0].items():
        stacked = torch.stack([s[key].double() * w for s, w in zip(states, weights, strict=True)])
        mean = stacked.sum(0) / total
        out[key] = (mean if first.is_floating_point() else mean.round()).to(first.dtype)
    return out


def _train(
    model: nn.Module,
    datasets: Sequence[CTSlices],
    recipe: PeerRecipe,
    *,
    epochs: int,
    first_epoch: int,
    engine: PrivacyEngine | None,
    device: str,
) -> int:
    """Train ``model`` in place on ``datasets`` together (DP-SGD through ``engine`` when
    given); returns the steps."""
    dataset: ConcatDataset[tuple[torch.Tensor, int]] = ConcatDataset(datasets)
    model.to(device).train()
    optimizer: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), recipe.learning_rate)
    loader: DataLoader[Any] = DataLoader(dataset, batch_size=recipe.batch_size, shuffle=True)
    net = model
    if engine is not None:
        net, optimizer, loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=recipe.noise_multiplier,
            max_grad_norm=recipe.max_grad_norm,
            poisson_sampling=True,
            # the default "hooks" mode fails on torchvision's in-place ReLU and residual add;
            # "ew" (expanded weights) takes the stock model: a plain user's one-argument fix
            grad_sample_mode="ew",
        )
    steps = 0
    for epoch in range(epochs):
        for part in datasets:
            part.set_epoch(first_epoch + epoch)
        for images, targets in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(images.to(device)), targets.to(device)).backward()
            optimizer.step()
            steps += 1
    return steps


Scores = tuple[np.ndarray, np.ndarray]  # positive-class scores, whether positive


def _scores(model: nn.Module, sites: Sequence[PeerSite], device: str) -> dict[str, Scores]:
    """Each site's held-out scores (positive class: the last)."""
    out = {}
    for site in sites:
        result = evaluate(model, site.held_out, device=device)
        out[site.name] = (result.probabilities[:, -1], result.targets == len(CLASSES) - 1)
    return out


def _auroc(*scores: Scores) -> float:
    """AUROC of the scores of one or more sites together (NaN with one class)."""
    values = np.concatenate([v for v, _ in scores])
    return binary_metrics(values, np.concatenate([p for _, p in scores])).auroc


def run_peer(
    sites: Sequence[PeerSite],
    *,
    rounds: int = 5,
    dp: bool = True,
    seed: int,
    recipe: PeerRecipe = PeerRecipe(),
    device: str = "cpu",
) -> PeerResult:
    """The peer's federation: ``rounds`` rounds of local training and FedAvg."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    start = time.perf_counter()
    global_model = peer_model(seed)
    state = {k: v.detach().clone() for k, v in global_model.state_dict().items()}
    steps = {s.name: 0 for s in sites}
    reported: dict[str, list[float]] = {s.name: [] for s in sites}
    history: dict[str, list[tuple[float, float, int]]] = {s.name: [] for s in sites}
    for server_round in range(1, rounds + 1):
        replies = []
        for site in sites:
            model = peer_model(seed)
            model.load_state_dict(state)
            engine = PrivacyEngine(accountant=ACCOUNTANT) if dp else None
            torch.manual_seed(derive_seed(seed, site.name, server_round))  # Poisson draws, noise
            steps[site.name] += _train(
                model,
                [site.train],
                recipe,
                epochs=recipe.local_epochs,
                first_epoch=(server_round - 1) * recipe.local_epochs,
                engine=engine,
                device=device,
            )
            if engine is not None:
                reported[site.name].append(float(engine.get_epsilon(delta=site.delta)))
                history[site.name].extend(engine.accountant.history)
            replies.append({k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
        state = fedavg(replies, [len(s.train) for s in sites])
        log.info("peer round %d/%d: %.0f s", server_round, rounds, time.perf_counter() - start)
    global_model.load_state_dict(state)
    scores = _scores(global_model, sites, device)
    outcomes = {
        s.name: SiteOutcome(
            auroc=_auroc(scores[s.name]),
            num_train_examples=len(s.train),
            num_held_out=len(s.held_out),
            steps=steps[s.name],
            delta=s.delta,
            reported_epsilon=tuple(reported[s.name]),
            true_epsilon=(
                epsilon_of(history[s.name], delta=s.delta, accountant=ACCOUNTANT) if dp else None
            ),
        )
        for s in sites
    }
    pooled = _auroc(*scores.values())
    return PeerResult("peer", seed, dp, rounds, pooled, outcomes, time.perf_counter() - start)


def run_peer_centralized(
    sites: Sequence[PeerSite],
    *,
    epochs: int = 5,
    seed: int,
    recipe: PeerRecipe = PeerRecipe(),
    device: str = "cpu",
) -> PeerResult:
    """The same recipe on every site's training slices pooled, without any privacy, for as
    many epochs as the federation has rounds. Every step draws on the pool, so each site's
    ``steps`` is the total."""
    start = time.perf_counter()
    model = peer_model(seed)
    torch.manual_seed(derive_seed(seed, "peer centralized"))
    pool = [s.train for s in sites]
    total = _train(model, pool, recipe, epochs=epochs, first_epoch=0, engine=None, device=device)
    scores = _scores(model, sites, device)
    outcomes = {
        s.name: SiteOutcome(
            _auroc(scores[s.name]), len(s.train), len(s.held_out), total, s.delta, (), None
        )
        for s in sites
    }
    pooled = _auroc(*scores.values())
    return PeerResult(
        "peer-centralized", seed, False, epochs, pooled, outcomes, time.perf_counter() - start
    )
