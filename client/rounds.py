"""What a hospital does in one federated round, as plain functions (no Flower import).

:func:`train_round` checks the received model, checks the site's privacy budget, trains and
records the spend; :func:`evaluate_round` scores the global model on the site's held-out
patients and returns only aggregates (counts, metrics, score histograms) for slices, series and
patients (a series or patient scores its highest slice score and is positive when any slice is;
common/metrics.py). Scores and identifiers of single slices, series or patients never leave.

Training also reports five HU quantiles of all the site's training pixels inside the body
(``train-hu-quantiles``, whole HU; common/training_stats.py), which the server records in its
model files so that ``fedct explain`` can tell a series outside them. They are the same every
round, describe hundreds of thousands of pixels at once, and are not covered by the DP
accounting. Evaluation flags (0/1 only) held-out data whose quantiles lie outside the
federation's (``intensity-outside``) and scores saturated at one extreme whatever the truth
(``scores-saturated``); the shift itself is logged at the site only.

It is this long because it holds a site's whole round, training and every aggregate evaluation
reports, so what leaves a hospital can be read in one file.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torchvision.models.resnet import ResNet

from fedct.common.config import FederationConfig, SiteConfig
from fedct.common.dataset import CTSlices, site_dataset
from fedct.common.devices import resolve_device
from fedct.common.errors import FedCTError
from fedct.common.evaluation import evaluate
from fedct.common.metrics import (
    PATIENT,
    SERIES,
    SLICE,
    Level,
    binary_metrics,
    max_by_group,
    score_histograms,
)
from fedct.common.models import build_model
from fedct.common.seeding import derive_seed
from fedct.common.site import SiteData, load_site
from fedct.common.training_stats import (
    HU_PERCENT,
    SHIFT_LIMIT_HU,
    hu_quantiles,
    intensity_shift,
    outside_range,
    saturated_histogram,
)
from fedct.common.weights import Weights, load_weights, model_weights, weight_problem

if TYPE_CHECKING:
    from fedct.client.privacy import Ledger
    from fedct.client.training import TrainConfig

log = logging.getLogger(__name__)

# Training imports Opacus, evaluation imports the Grad-CAM package: each is imported by the one
# function that needs it. Flower starts a fresh ClientApp process for every message, so a
# training message does not pay for Grad-CAM nor an evaluation message for Opacus.

Metrics = dict[str, int | float | list[int] | list[float]]


class ModelRejectedError(FedCTError):
    """The model the server sent does not fit the federation's model; the site will not use it."""


@dataclass(frozen=True)
class TrainReply:
    weights: Weights | None  # None when the site did not train
    metrics: Metrics
    status: str  # "ok" or "budget-exhausted"


def open_site(site: SiteConfig, fed: FederationConfig) -> SiteData:
    """The site's data, from its frame cache in the state folder after the first read."""
    data = load_site(
        site.data_dir,
        grid=fed.preprocess.grid,
        cache_dir=Path(site.state_dir) / "frame-cache",
        val_fraction=fed.val_fraction,
        progress=False,
    )
    data.require_trainable(fed.class_names)
    return data


def model_version(weights: Weights) -> str:
    digest = hashlib.sha256()
    for key in sorted(weights):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(weights[key]).tobytes())
    return digest.hexdigest()[:12]


def _global_model(fed: FederationConfig, weights: Weights) -> ResNet:
    model = build_model(replace(fed.model_config, pretrained=None))
    problem = weight_problem(weights, model_weights(model))
    if problem is not None:
        raise ModelRejectedError(f"the received model does not fit this federation: {problem}")
    load_weights(model, weights)
    return model


def train_config(fed: FederationConfig, server_round: int = 1) -> TrainConfig:
    """Round ``server_round``'s local training settings, from the federation's."""
    from fedct.client.training import TrainConfig

    return TrainConfig(
        epochs=fed.local_epochs,
        optimizer=fed.optimizer,
        learning_rate=fed.round_learning_rate(server_round),
        momentum=fed.momentum,
        weight_decay=fed.weight_decay,
        batch_size=fed.batch_size,
        physical_batch_size=fed.physical_batch_size,
        max_grad_norm=fed.max_grad_norm,
        dp_clipping=fed.dp_clipping,
        proximal_mu=fed.proximal_mu if fed.strategy == "fedprox" else 0.0,
    )


def train_round(
    site: SiteConfig,
    fed: FederationConfig,
    weights: Weights,
    *,
    server_round: int,
    progress: bool = False,
) -> TrainReply:
    from fedct.client.privacy import BudgetExhaustedError, Ledger, PrivacyBudget, default_delta
    from fedct.client.training import sample_rate, steps_per_epoch, train_local

    data = open_site(site, fed)
    dataset = site_dataset(
        data,
        "train",
        classes=fed.class_names,
        windows=fed.preprocess.windows,
        train=True,
        augment=fed.augment,
        seed=derive_seed(fed.seed, server_round),
    )
    model = _global_model(fed, weights)
    cfg = train_config(fed, server_round)
    n = len(dataset)
    version = model_version(weights)
    sigma = None
    ledger = None
    if site.dp:
        patients = data.num_patients("train")
        budget = PrivacyBudget(
            epsilon=site.epsilon,
            delta=site.delta or default_delta(patients),
            accountant=fed.accountant,
        )
        ledger = Ledger.open(Path(site.state_dir), budget)
        q, steps = sample_rate(n, cfg.batch_size), cfg.epochs * steps_per_epoch(n, cfg.batch_size)
        sigma = ledger.calibrate(
            sample_rate=q, steps_per_round=steps, planned_rounds=fed.privacy_horizon
        )
        try:
            ledger.check(sigma, q, steps)
        except BudgetExhaustedError as err:
            log.warning("%s: %s", site.site_name, err)
            return TrainReply(
                None,
                {"num-examples": 0, "epsilon": ledger.spent_epsilon, "budget-exhausted": 1},
                "budget-exhausted",
            )
    epsilon_after = None
    if ledger is not None and sigma is not None:
        q = sample_rate(n, cfg.batch_size)
        epsilon_after = functools.partial(_epsilon_after, ledger, sigma, q)

    result = train_local(
        model,
        dataset,
        cfg,
        noise_multiplier=sigma,
        seed=derive_seed(fed.seed, site.site_name, server_round),
        progress=progress,
        description=site.site_name,
        epsilon_after=epsilon_after,
        device=resolve_device(fed.device),
    )
    epsilon = math.nan
    if ledger is not None and sigma is not None:
        entry = ledger.record(
            round=server_round,
            noise_multiplier=sigma,
            sample_rate=result.sample_rate,
            steps=result.steps,
            model_version=version,
        )
        epsilon = entry.epsilon
    metrics: Metrics = {
        "num-examples": n,
        "train-loss": result.mean_loss,
        "steps": result.steps,
        "train-seconds": result.seconds,
        "epsilon": epsilon,
        "epsilon-budget": site.epsilon if site.dp else math.nan,
        "noise-multiplier": sigma if sigma is not None else 0.0,
        "budget-exhausted": 0,
    }
    # always sent (NaN when no pixel is inside the body): Flower aggregates only replies
    # whose metrics have the same keys
    quantiles = hu_quantiles(dataset.images) or (math.nan,) * len(HU_PERCENT)
    metrics["train-hu-quantiles"] = list(quantiles)
    return TrainReply(model_weights(model), metrics, "ok")


def _epsilon_after(ledger: Ledger, sigma: float, q: float, steps: int) -> float:
    return ledger.epsilon_after(sigma, q, max(steps, 1))


def evaluate_round(
    site: SiteConfig,
    fed: FederationConfig,
    weights: Weights,
    *,
    model_hu: Sequence[float] | None = None,
) -> Metrics:
    """Aggregate metrics of the global model on the site's held-out patients; with the
    federation's training intensity quantiles ``model_hu``, whether the held-out data lie
    outside them (``intensity-outside``)."""
    data = open_site(site, fed)
    split = data.eval_split()
    dataset = site_dataset(
        data, split, classes=fed.class_names, windows=fed.preprocess.windows, train=False
    )
    n = len(dataset)
    rows = data.indices(split)
    groups = eval_groups(data, rows)
    if n < fed.min_eval_cases:
        # Too few cases to report anything but a count without disclosing a tiny cohort.
        return {"num-examples": n, "reported": 0, **level_counts(groups)}
    model = _global_model(fed, weights)
    result = evaluate(model, dataset, device=resolve_device(fed.device))
    positive_class = len(fed.class_names) - 1
    positive = result.targets == positive_class
    scores = result.probabilities[:, -1]
    metrics: Metrics = {
        "num-examples": n,
        "reported": 1,
        "loss": result.loss,
        "accuracy": result.accuracy,
        **level_aggregates(SLICE, scores, positive, bins=fed.histogram_bins),
        **group_levels(
            groups, scores, positive, bins=fed.histogram_bins, min_patients=fed.min_eval_patients
        ),
        **data_flags(site, dataset, scores, positive, model_hu=model_hu, bins=fed.histogram_bins),
    }
    true_positive = positive & (scores >= 0.5)
    try:
        metrics.update(
            cam_localization(
                model, data, dataset, rows, true_positive, positive_class, layer=fed.cam_layer
            )
        )
    except Exception as err:  # an explanation must never cost the round its evaluation
        log.warning("Grad-CAM localisation failed (%s); reporting the evaluation without it", err)
        metrics.update(NO_CAM)
    return metrics


def data_flags(
    site: SiteConfig,
    dataset: CTSlices,
    scores: np.ndarray,
    positive: np.ndarray,
    *,
    model_hu: Sequence[float] | None,
    bins: int,
) -> Metrics:
    """``scores-saturated`` (most negatives and positives beyond the same extreme) and, given
    the model's training quantiles, ``intensity-outside``: 0/1 flags, the shift logged here."""
    hist = score_histograms(scores, positive, bins=bins)
    flags: Metrics = {"scores-saturated": int(saturated_histogram(hist) is not None)}
    held_out = hu_quantiles(dataset.images) if model_hu is not None else None
    if model_hu is not None and held_out is not None and len(model_hu) == len(held_out):
        shift = intensity_shift(held_out, model_hu)
        flags["intensity-outside"] = int(outside_range(shift))
        if flags["intensity-outside"]:
            log.warning(
                "%s: the held-out slices' intensities lie %+.0f HU from what the model was "
                "trained on (limit ±%.0f HU): check the scanner's rescale and the windows",
                site.site_name,
                shift,
                SHIFT_LIMIT_HU,
            )
    return flags


def level_aggregates(
    level: Level, scores: np.ndarray, positive: np.ndarray, *, bins: int
) -> Metrics:
    """What a site reports of one level: positives, sensitivity and specificity at 0.5, AUROC
    and the two score histograms (the level's count is added by the caller)."""
    m = binary_metrics(scores, positive)
    hist = score_histograms(scores, positive, bins=bins)
    return {
        level.key("positives"): m.positives,
        level.key("sensitivity"): m.sensitivity,
        level.key("specificity"): m.specificity,
        level.key("auroc"): m.auroc,
        level.key("hist-neg"): hist[0].tolist(),
        level.key("hist-pos"): hist[1].tolist(),
    }


def eval_groups(data: SiteData, rows: np.ndarray) -> dict[Level, list[Hashable]]:
    """Each held-out slice's (``rows`` of ``data``) series and patient. A series is keyed with
    its patient, and by its file when it has no SeriesInstanceUID, so slices of different
    patients never merge. The keys stay in this process."""
    series: list[Hashable] = []
    patients: list[Hashable] = []
    for row in rows:
        s = data.slices[int(row)]
        series.append((s.patient_key, s.meta.series_instance_uid or s.path))
        patients.append(s.patient_key)
    return {SERIES: series, PATIENT: patients}


def level_counts(groups: dict[Level, list[Hashable]]) -> Metrics:
    """The series and patient levels as counts only (a cohort too small to report scores)."""
    out: Metrics = {}
    for level, keys in groups.items():
        out[level.count_key] = len(set(keys))
        out[level.key("reported")] = 0
    return out


def group_levels(
    groups: dict[Level, list[Hashable]],
    scores: np.ndarray,
    positive: np.ndarray,
    *,
    bins: int,
    min_patients: int,
) -> Metrics:
    """Series and patient aggregates of slice ``scores``: reported when at least
    ``min_patients`` patients are held out (``min-eval-patients``), else as counts only."""
    out = level_counts(groups)
    if len(set(groups[PATIENT])) < min_patients:
        return out
    for level, keys in groups.items():
        grouped = max_by_group(scores, positive, keys)
        out[level.key("reported")] = 1
        out.update(level_aggregates(level, grouped.scores, grouped.positive, bins=bins))
    return out


NO_CAM: Metrics = {
    "cam-slices": 0,
    "cam-pointing": math.nan,
    "cam-pointing-strict": math.nan,
    "cam-energy": math.nan,
}


def cam_localization(
    model: ResNet,
    data: SiteData,
    dataset: CTSlices,
    rows: np.ndarray,
    true_positive: np.ndarray,
    positive_class: int,
    *,
    layer: str = "auto",
    limit: int = 64,
) -> Metrics:
    """Grad-CAM pointing-game hit rates (within tolerance, strictly inside) and energy inside
    the lesion on true-positive slices that have a mask (at most ``limit``); only these averages
    and a count leave the site."""
    from fedct.common.gradcam import cam_maps, localization

    chosen: list[tuple[int, np.ndarray]] = []
    for i in np.flatnonzero(true_positive):
        mask = data.lesion_mask(int(rows[i]))
        if mask is not None:
            chosen.append((int(i), mask))
        if len(chosen) == limit:
            break
    if not chosen:
        return dict(NO_CAM)
    images = torch.stack([dataset[i][0] for i, _ in chosen])
    masks = np.stack([mask for _, mask in chosen])
    found = localization(cam_maps(model, images, target_class=positive_class, layer=layer), masks)
    return {
        "cam-slices": found.slices,
        "cam-pointing": found.pointing_hit_rate,
        "cam-pointing-strict": found.strict_hit_rate,
        "cam-energy": found.mean_energy_inside,
    }
