"""Pretraining on *public* CT data, before any hospital takes part.

DP-SGD from scratch cannot train an 11M-parameter ResNet on the few hundred slices a hospital
holds: the noise that protects its patients is far larger than the gradient signal. The standard
remedy (and the classic transfer-learning recipe) is a backbone trained without privacy on data
that needs none, e.g. ImageNet or a public annotated CT collection such as LIDC-IDRI, then DP
fine-tuning of a few layers at the hospitals. This module trains that backbone: torchvision's
stock BatchNorm ResNet (it learns small CT data much better than GroupNorm does; see the
learnability study in docs/known-limits.md) on one or more public folders in FedCT's hospital
layout, and writes a torchvision-format state dict that the ``pretrained`` setting reads. With
``norm = "folded"`` the federation's DP model computes exactly this network (each BatchNorm
folded into its convolution).

Where the public folders outline their lesions (``SITE/masks/``, as LIDC-IDRI's nodule
contours do), pretraining also learns *where* the lesion is: a 1x1 convolution on the stage
Grad-CAM reads (``cam-layer``) predicts, cell by cell, whether the lesion covers it, and its loss
is added to the classification loss (multi-task training, as in attention-supervised CNNs). The
head is dropped afterwards; what stays is a backbone whose features at that stage mark the
lesion's place. Without it, what a backbone keeps of the lesion's place varied by draw
(docs/known-limits.md, Grad-CAM localisation).

The weights file also records what the backbone was trained on (common/training_stats.py):
HU quantiles of all public training pixels inside the body, and the final held-out scores.

Nothing here may ever see a participating hospital's data: it trains without privacy.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader
from tqdm import tqdm

from fedct.common.augment import AUGMENTATIONS
from fedct.common.config import FederationConfig
from fedct.common.dataset import CTSlices, site_dataset, site_lesion_dataset
from fedct.common.devices import resolve_device
from fedct.common.errors import ConfigError
from fedct.common.evaluation import evaluate
from fedct.common.fileio import atomic_write
from fedct.common.gradcam import cam_stage_name
from fedct.common.metrics import binary_metrics
from fedct.common.models import resnet_stage, stage_shapes
from fedct.common.seeding import derive_seed
from fedct.common.site import load_site
from fedct.common.training_stats import STATS_KEY, TrainingStats, hu_quantiles, score_stats

log = logging.getLogger(__name__)

METADATA_KEY = "fedct-pretraining"
# Horizontal flips only: a few hundred slices and a few epochs cannot afford to learn the
# invariances the full augmentation asks for (measured in docs/models.md).
PRETRAIN_AUGMENTATION = AUGMENTATIONS["flips"]
# The lesion loss: its weight beside the classification loss, and the weight of a lesion cell
# against a lesion-free one (a 4-30 mm nodule covers 1-4 of a slice's 144 cells at 96 px, and
# most slices have none); the values measured in docs/models.md.
LESION_WEIGHT = 1.0
LESION_CELL_WEIGHT = 20.0


@dataclass(frozen=True)
class PretrainResult:
    path: Path
    train_slices: int
    held_out_slices: int
    epochs: int
    held_out_auroc: float  # on the public folders' own held-out patients
    seconds: float
    lesion_slices: int = 0  # training slices with a lesion mask (0: no lesion loss)
    lesion_stage: str | None = None  # the stage the lesion loss taught
    lesion_weight: float = 0.0
    stats: TrainingStats | None = None  # training intensities and held-out scores

    @property
    def lesions(self) -> str:
        """What the lesion loss did, for the command line."""
        if not self.lesion_stage:
            return "no lesion loss"
        return f"lesion loss on {self.lesion_stage} from {self.lesion_slices} outlined slices"


def stock_resnet(fed: FederationConfig) -> torchvision.models.ResNet:
    """torchvision's BatchNorm ResNet with the federation's classes and input channels."""
    builder = getattr(torchvision.models, fed.model)
    model: torchvision.models.ResNet = builder(num_classes=len(fed.class_names))
    if fed.preprocess.channels == 1:
        old = model.conv1
        model.conv1 = nn.Conv2d(1, old.out_channels, 7, 2, 3, bias=False)
    return model


def pretrain(
    public_sites: list[Path],
    fed: FederationConfig,
    out: Path,
    *,
    epochs: int = 10,
    learning_rate: float = 1e-3,
    lesion_weight: float = LESION_WEIGHT,
    cache_root: Path,
    seed: int = 0,
    progress: bool = True,
) -> PretrainResult:
    """Train a BatchNorm ResNet on the public folders and write its state dict to ``out``.

    Adam with cosine decay and horizontal flips; the split, grid and windows are the
    federation's, so the weights fit its model and preprocessing. With ``lesion_weight`` > 0 and
    lesion masks in the folders, the lesion loss (module docstring) is added.
    """
    if not public_sites:
        raise ConfigError("pretraining needs at least one public data folder")
    if epochs < 1:
        raise ConfigError(f"pretraining epochs must be at least 1, got {epochs}")
    if not (math.isfinite(lesion_weight) and lesion_weight >= 0):
        raise ConfigError(f"the lesion loss weight must be >= 0 (0: off), got {lesion_weight}")
    start = time.perf_counter()
    train_parts, held_out = [], []
    for folder in public_sites:
        site = load_site(
            folder,
            grid=fed.preprocess.grid,
            cache_dir=cache_root / folder.name,
            val_fraction=fed.val_fraction,
            progress=progress,
        )
        classes, windows = fed.class_names, fed.preprocess.windows
        train_parts.append(
            site_lesion_dataset(
                site,
                "train",
                classes=classes,
                windows=windows,
                seed=seed,
                augment=PRETRAIN_AUGMENTATION,
                outlines=lesion_weight > 0,
            )
        )
        held_out.append(
            site_dataset(site, site.eval_split(), classes=classes, windows=windows, train=False)
        )
    train: ConcatDataset[tuple[torch.Tensor, int, torch.Tensor, bool]] = ConcatDataset(train_parts)
    torch.manual_seed(derive_seed(seed, "pretrain") % 2**31)
    device = resolve_device(fed.device)
    model = stock_resnet(fed).to(device)
    lesion_slices = sum(part.known for part in train_parts) if lesion_weight > 0 else 0
    lesions = _LesionHead(model, fed).to(device) if lesion_slices else None
    if lesions is None:
        log.info("pretraining without the lesion loss (no lesion masks, or its weight is 0)")
    params = list(model.parameters()) + (list(lesions.parameters()) if lesions else [])
    optimizer = torch.optim.Adam(params, lr=learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    generator = torch.Generator().manual_seed(derive_seed(seed, "pretrain-loader") % 2**63)
    if len(train) < 2:
        raise ConfigError(
            f"the public folders hold {len(train)} training slices; pretraining needs many more"
        )
    # drop_last: a last batch of one slice would break BatchNorm's batch statistics
    loader = DataLoader(
        train, batch_size=min(32, len(train)), shuffle=True, drop_last=True, generator=generator
    )
    auroc, scores = math.nan, np.zeros(0)
    for epoch in range(epochs):
        for part in train_parts:
            part.set_epoch(epoch)
        model.train()
        losses = []
        # disable=None: no bar when stderr is not a terminal (a log file keeps one line an epoch)
        bar = tqdm(
            loader, desc=f"pretraining epoch {epoch + 1}/{epochs}", disable=not progress or None
        )
        for batch in bar:
            images, targets, masks, known = (t.to(device) for t in batch)
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(images), targets)
            if lesions is not None:
                loss = loss + lesion_weight * lesions.loss(masks, known)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        schedule.step()
        scores, positive = _held_out_scores(model, held_out, device)
        auroc = binary_metrics(scores, positive).auroc if len(scores) else math.nan
        log.info(
            "pretraining epoch %d/%d: train loss %.3f, held-out AUROC %.3f",
            epoch + 1,
            epochs,
            float(np.mean(losses)),
            auroc,
        )
    model.eval()
    if lesions is not None:
        lesions.close()
    result = PretrainResult(
        out,
        len(train),
        sum(len(h) for h in held_out),
        epochs,
        auroc,
        time.perf_counter() - start,
        lesion_slices,
        lesions.stage if lesions else None,
        lesion_weight if lesions else 0.0,
        TrainingStats(
            hu_quantiles([part.slices.images for part in train_parts]),
            "pooled pixels",
            score_stats(scores) if len(scores) else None,
        ),
    )
    _save(model, fed, result)
    return result


class _LesionHead(nn.Module):
    """Predicts from the CAM stage's features which of its cells the lesion covers."""

    def __init__(self, model: nn.Module, fed: FederationConfig) -> None:
        super().__init__()
        self.stage = cam_stage_name(model, fed.image_size, fed.cam_layer)
        channels = stage_shapes(model, fed.image_size)[self.stage][0]
        self.cells = nn.Conv2d(channels, 1, kernel_size=1)
        self._features: torch.Tensor | None = None
        self._hook = resnet_stage(model, self.stage).register_forward_hook(self._keep)

    def _keep(self, _module: nn.Module, _inputs: object, out: torch.Tensor) -> None:
        self._features = out

    def loss(self, masks: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        """Cell-wise binary cross-entropy on the last forward pass's slices whose lesion place
        is known (a cell is a lesion cell if the mask touches it)."""
        if self._features is None or not bool(known.any()):
            return torch.zeros((), device=masks.device)
        features = self._features[known]
        target = nn.functional.adaptive_max_pool2d(masks[known], features.shape[-2:])
        return nn.functional.binary_cross_entropy_with_logits(
            self.cells(features),
            target,
            pos_weight=torch.tensor(LESION_CELL_WEIGHT, device=features.device),
        )

    def close(self) -> None:
        self._hook.remove()
        self._features = None


def _held_out_scores(
    model: nn.Module, held_out: list[CTSlices], device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """Positive-class scores of the held-out slices, and whether each is positive."""
    results = [evaluate(model, data, device=device) for data in held_out if len(data)]
    if not results:
        return np.zeros(0), np.zeros(0, dtype=bool)
    scores = np.concatenate([r.probabilities[:, -1] for r in results])
    positive = np.concatenate([r.targets == r.probabilities.shape[1] - 1 for r in results])
    return scores, positive


def _save(model: nn.Module, fed: FederationConfig, result: PretrainResult) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    about = {
        "architecture": fed.model,
        "classes": fed.classes,
        "windows": fed.windows,
        "image-size": fed.image_size,
        "epochs": result.epochs,
        "train-slices": result.train_slices,
        "held-out-auroc": round(result.held_out_auroc, 4),
        "lesion-supervision": (
            {
                "stage": result.lesion_stage,
                "weight": result.lesion_weight,
                "slices-with-masks": result.lesion_slices,
            }
            if result.lesion_stage
            else None
        ),
    }
    metadata = {METADATA_KEY: json.dumps(about)}
    if result.stats is not None:
        metadata[STATS_KEY] = result.stats.to_json()
    result.path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(result.path, lambda tmp: save_file(state, str(tmp), metadata=metadata), mode=0o644)
