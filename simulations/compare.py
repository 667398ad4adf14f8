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
Every model, the federation's final one included, is evaluated on every hospital's held-out
patients; the table gives per-site and pooled AUROC, and each baseline's pooled AUROC minus the
federation's with a 95% interval from resampling the held-out patients (both models scored on
the same resampled patients). This is a what-if on one machine: it pools data, which a
deployment never does.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from fedct.client.privacy import PrivacyBudget, calibrate_noise, default_delta
from fedct.client.rounds import train_config
from fedct.client.training import sample_rate, steps_per_epoch, train_local
from fedct.common.config import FederationConfig
from fedct.common.dataset import CTSlices, site_dataset
from fedct.common.devices import resolve_device
from fedct.common.evaluation import evaluate
from fedct.common.metrics import DivergedModelError, binary_metrics
from fedct.common.model_file import load_model
from fedct.common.models import build_model
from fedct.common.seeding import derive_seed
from fedct.common.site import SiteData, load_site

log = logging.getLogger(__name__)


BOOTSTRAP_RESAMPLES = 1000


@dataclass(frozen=True)
class Row:
    # "federated", "pretrained only", "centralized", "centralized + DP", "local-only: NAME"
    model: str
    dp: bool
    sites: dict[str, float]  # AUROC on each site's held-out patients
    pooled: float  # AUROC on all held-out patients together
    # pooled AUROC minus the federated model's, and its 95% interval (patients resampled)
    vs_federated: float | None = None
    vs_federated_ci: tuple[float, float] | None = None


@dataclass(frozen=True)
class HeldOut:
    """Every site's held-out slices, and which patient each pooled slice belongs to (only to
    resample whole patients: slices of one patient are not independent)."""

    sites: dict[str, CTSlices]
    patients: np.ndarray  # one integer per pooled slice, in the sites' order


def compare(
    fed: FederationConfig, sites_root: Path, cache_root: Path, federated: Path | None = None
) -> list[Row]:
    """Train and evaluate the centralized and local-only baselines of ``fed``; with the
    federation's ``federated`` model file, its row comes first and every other row gets its
    paired difference to it."""
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
    held_out = _held_out(fed, sites)
    scored: list[tuple[Row, np.ndarray | None]] = []
    if federated is not None:
        model, _ = load_model(federated)
        scored.append(_evaluate("federated", fed.dp, model, held_out))
    if fed.pretrained:
        scored.append(_evaluate("pretrained only", False, build_model(fed.model_config), held_out))
    for dp in (False, True) if fed.dp else (False,):
        label = "centralized + DP" if dp else "centralized"
        scored.append(_baseline(label, dp, fed, list(sites.values()), held_out))
    for name, site in sites.items():
        scored.append(_baseline(f"local-only: {name}", fed.dp, fed, [site], held_out))
    if federated is None:
        return [row for row, _ in scored]
    reference = scored[0][1]
    targets = np.concatenate([data.targets for data in held_out.sites.values()])
    truth = targets == len(fed.class_names) - 1  # the positive class is the last
    rows = [scored[0][0]]
    for i, (row, scores) in enumerate(scored[1:]):
        if scores is None or reference is None:
            rows.append(row)
            continue
        delta, interval = paired_auroc_difference(
            scores, reference, truth, held_out.patients, seed=derive_seed(fed.seed, f"ci {i}")
        )
        rows.append(replace(row, vs_federated=delta, vs_federated_ci=interval))
    return rows


def paired_auroc_difference(
    scores: np.ndarray,
    reference: np.ndarray,
    positive: np.ndarray,
    patients: np.ndarray,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> tuple[float, tuple[float, float] | None]:
    """AUROC of ``scores`` minus AUROC of ``reference`` on the same slices, and a 95% percentile
    interval from a paired bootstrap over ``patients`` (whole patients drawn with replacement,
    both models scored on each draw). The interval is None where fewer than half the draws
    hold both classes; the difference is NaN where the slices hold one class. Written by hand:
    scipy's ``bootstrap`` resamples observations, and a patient's slices are not independent
    observations; a cluster bootstrap needs the groups."""
    if positive.all() or not positive.any():
        return math.nan, None
    delta = float(roc_auc_score(positive, scores) - roc_auc_score(positive, reference))
    _, group = np.unique(patients, return_inverse=True)
    members = [np.flatnonzero(group == g) for g in range(group.max() + 1)]
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        rows = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        truth = positive[rows]
        if truth.all() or not truth.any():
            continue
        draws.append(roc_auc_score(truth, scores[rows]) - roc_auc_score(truth, reference[rows]))
    if len(draws) < resamples / 2:
        return delta, None
    low, high = np.percentile(draws, [2.5, 97.5])
    return delta, (float(low), float(high))


def versus_text(delta: float | None, interval: Sequence[float] | None) -> str:
    """``+0.004 [-0.012, +0.020]``: a row's difference to the federated model (or "")."""
    if delta is None:
        return ""
    text = f"{delta:+.3f}"
    return f"{text} [{interval[0]:+.3f}, {interval[1]:+.3f}]" if interval else text


def should_federate(rows: Sequence[Row]) -> list[str]:
    """The table read out as the answers to "should we federate?": the federated model against
    each hospital alone, the starting model and pooling the data, each with whether these
    held-out patients can tell the two apart (the paired interval excludes 0)."""
    lines = []
    for row in rows[1:]:
        if row.vs_federated is None or math.isnan(row.vs_federated):
            continue
        better = -row.vs_federated  # the federated model's advantage
        interval = row.vs_federated_ci
        if interval is None:
            verdict = "too few held-out patients to tell"
        elif interval[1] < 0:
            verdict = "the federated model is better"
        elif interval[0] > 0:
            verdict = "the federated model is worse"
        else:
            verdict = "these patients cannot tell the two apart"
        ci = f" [{-interval[1]:+.3f}, {-interval[0]:+.3f}]" if interval else ""
        if row.model.startswith("local-only: "):
            who = f"{row.model.removeprefix('local-only: ')} alone"
        else:
            who = {
                "pretrained only": "the starting (pretrained) model",
                "centralized": "pooling the data without DP",
                "centralized + DP": "pooling the data under the same ε",
            }.get(row.model, row.model)
        lines.append(f"federated vs {who}: {better:+.3f}{ci}: {verdict}")
    return lines


def _held_out(fed: FederationConfig, sites: dict[str, SiteData]) -> HeldOut:
    data: dict[str, CTSlices] = {}
    patients: list[int] = []
    keys: dict[tuple[str, str], int] = {}
    for name, site in sites.items():
        split = site.eval_split()
        data[name] = site_dataset(
            site, split, classes=fed.class_names, windows=fed.preprocess.windows, train=False
        )
        for row in site.indices(split):
            key = (name, site.slices[int(row)].patient_key)  # stays in memory, on this machine
            patients.append(keys.setdefault(key, len(keys)))
    return HeldOut(data, np.asarray(patients, dtype=np.int64))


def _baseline(
    label: str,
    dp: bool,
    fed: FederationConfig,
    train_sites: list[SiteData],
    held_out: HeldOut,
) -> tuple[Row, np.ndarray | None]:
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
    device = resolve_device(fed.device)
    train_local(
        model, data, cfg, noise_multiplier=sigma, seed=seed, description=label, device=device
    )
    return _evaluate(label, dp, model, held_out)


def _evaluate(
    label: str, dp: bool, model: torch.nn.Module, held_out: HeldOut
) -> tuple[Row, np.ndarray | None]:
    """The model's row, and its scores on every pooled held-out slice (None if it diverged)."""
    scores, truths, per_site = [], [], {}
    try:
        for name, data in held_out.sites.items():
            result = evaluate(model, data, device=_device_of(model))
            positive = result.targets == result.probabilities.shape[1] - 1
            score = result.probabilities[:, -1]
            per_site[name] = binary_metrics(score, positive).auroc
            scores.append(score)
            truths.append(positive)
        pooled = binary_metrics(np.concatenate(scores), np.concatenate(truths)).auroc
    except DivergedModelError as err:  # one diverged baseline must not cost the others
        log.warning("%s: %s; its row is left empty", label, err)
        return Row(label, dp, {name: math.nan for name in held_out.sites}, math.nan), None
    return Row(label, dp, per_site, pooled), np.concatenate(scores)


def _device_of(model: torch.nn.Module) -> torch.device:
    """Where ``model`` lives (the CPU for a model without parameters)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))
