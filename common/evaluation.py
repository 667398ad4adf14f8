"""A model's loss, accuracy and class probabilities on a dataset (no gradients, no privacy
machinery: evaluation at a site, in the comparison runs and after public pretraining)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset


@dataclass(frozen=True)
class EvalResult:
    examples: int
    loss: float
    accuracy: float
    probabilities: np.ndarray  # (N, C) softmax scores; stay at the site
    targets: np.ndarray  # (N,)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset[tuple[torch.Tensor, int]],
    *,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
) -> EvalResult:
    """Loss, accuracy and per-example class probabilities of ``model`` on ``dataset``."""
    model.to(device).eval()
    probs, targets, total_loss = [], [], 0.0
    for images, labels in DataLoader(dataset, batch_size=batch_size):
        logits = model(images.to(device))
        labels = labels.to(device)
        total_loss += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        probs.append(torch.softmax(logits, dim=1).cpu())
        targets.append(labels.cpu())
    n = sum(len(t) for t in targets)
    if n == 0:
        return EvalResult(0, math.nan, math.nan, np.zeros((0, 0)), np.zeros(0, dtype=np.int64))
    p = torch.cat(probs).numpy()
    y = torch.cat(targets).numpy()
    return EvalResult(n, total_loss / n, float((p.argmax(1) == y).mean()), p, y)
