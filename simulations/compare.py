"""``fedct simulate --compare``: what the federation is worth against the alternatives.

Trained in the same run, on the same sites, patients, splits, model, optimiser and number of
passes over each site's training data as the federation (rounds x local epochs):
- centralized, non-private: one model on the pooled training data (what pooling would give if
  privacy law allowed it);
- centralized with DP-SGD at the federation's ε (δ below 1/N for all N training patients), when
  the federation uses DP;
- local-only: each hospital alone, with the federation's privacy setting;
- with pretrained weights, the starting model itself, untrained on any hospital (what the
  federation adds on top of public pretraining).
Every model is evaluated on every hospital's held-out patients; the table gives per-site and
pooled AUROC. This is a what-if on one machine: it pools data, which a deployment never does.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.privacy import PrivacyBudget, calibrate_noise, default_delta
from client.rounds import train_config
from client.training import sample_rate, steps_per_epoch, train_local
from common.config import FederationConfig
from common.dataset import CTSlices, site_dataset
from common.evaluation import evaluate
from common.metrics import DivergedModelError, binary_metrics
from common.models import build_model
from common.seeding import derive_seed
from common.site import SiteData, load_site

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Row:
    # "federated", "pretrained only", "centralized", "centralized + DP", "local-only: NAME"
    model: str
    dp: bool
    sites: dict[str, float]  # AUROC on each site's held-out patients
    pooled: float  # AUROC on all held-out patients together


def compare(fed: FederationConfig, sites_root: Path, cache_root: Path) -> list[Row]:
    """Train and evaluate the centralized and local-only baselines of ``fed``."""
    sites = {
        folder.name: load_site(
            folder,
            grid=fed.preprocess.grid,
            cache_dir=cache_root / folder.name / "frame-cache",
            val_fraction=fed.val_fraction,
            progress=False,
        )
        for folder in sorted(p for p in sites_root.iterdir() if p.is_dir())
    }
    held_out = {
        name: site_dataset(
            site,
            site.eval_split(),
            classes=fed.class_names,
            windows=fed.preprocess.windows,
            train=False,
        )
        for name, site in sites.items()
    }
    rows = []
    if fed.pretrained:
        rows.append(_evaluate("pretrained only", False, build_model(fed.model_config), held_out))
    for dp in (False, True) if fed.dp else (False,):
        label = "centralized + DP" if dp else "centralized"
        rows.append(_baseline(label, dp, fed, list(sites.values()), held_out))
    for name, site in sites.items():
        rows.append(_baseline(f"local-only: {name}", fed.dp, fed, [site], held_out))
    return rows


def federated_row(fed: FederationConfig, last_round: dict[str, Any]) -> Row:
    """The federation's own line of the table, from its last round's evaluation."""
    sites = {
        name: float(m.get("auroc", np.nan)) for name, m in last_round.get("evaluate", {}).items()
    }
    pooled = float(last_round.get("pooled", {}).get("auroc", np.nan))
    return Row("federated", fed.dp, sites, pooled)


def _baseline(
    label: str,
    dp: bool,
    fed: FederationConfig,
    train_sites: list[SiteData],
    held_out: dict[str, CTSlices],
) -> Row:
    seed = derive_seed(fed.seed, label)
    parts = [
        site_dataset(
            s,
            "train",
            classes=fed.class_names,
            windows=fed.preprocess.windows,
            train=True,
            augment=fed.augment,
            seed=seed,
        )
        for s in train_sites
    ]
    data = CTSlices(
        np.concatenate([p.images for p in parts]),
        np.concatenate([p.targets for p in parts]).tolist(),
        parts[0].transform,
        seed=seed,
    )
    cfg = replace(train_config(fed), epochs=fed.num_server_rounds * fed.local_epochs)
    sigma = None
    if dp:
        patients = sum(s.num_patients("train") for s in train_sites)
        budget = PrivacyBudget(fed.epsilon, fed.delta or default_delta(patients), fed.accountant)
        n = len(data)
        sigma = calibrate_noise(
            budget,
            sample_rate=sample_rate(n, cfg.batch_size),
            steps=cfg.epochs * steps_per_epoch(n, cfg.batch_size),
        )
    torch.manual_seed(seed % 2**31)
    model = build_model(fed.model_config)
    log.info(
        "training %s (%d slices, %d epochs%s)",
        label,
        len(data),
        cfg.epochs,
        f", σ={sigma:.2f}" if sigma else "",
    )
    train_local(model, data, cfg, noise_multiplier=sigma, seed=seed, description=label)
    return _evaluate(label, dp, model, held_out)


def _evaluate(label: str, dp: bool, model: torch.nn.Module, held_out: dict[str, CTSlices]) -> Row:
    scores, truths, per_site = [], [], {}
    try:
        for name, data in held_out.items():
            result = evaluate(model, data)
            positive = result.targets == result.probabilities.shape[1] - 1
            score = result.probabilities[:, -1]
            per_site[name] = binary_metrics(score, positive).auroc
            scores.append(score)
            truths.append(positive)
        pooled = binary_metrics(np.concatenate(scores), np.concatenate(truths)).auroc
    except DivergedModelError as err:  # one diverged baseline must not cost the others
        log.warning("%s: %s; its row is left empty", label, err)
        return Row(label, dp, {name: math.nan for name in held_out}, math.nan)
    return Row(label, dp, per_site, pooled)
