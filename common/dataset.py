"""Torch datasets over a site's cached frames, with per-site, per-epoch, per-sample seeded
augmentation: the same run seed gives the same augmented images whatever the worker count."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from common.augment import AugmentConfig, Transform, eval_transform, train_transform
from common.errors import SiteDataError
from common.preprocess import Window
from common.seeding import derive_seed
from common.site import SiteData


class CTSlices(Dataset[tuple[torch.Tensor, int]]):
    """``(image, class index)`` pairs; ``images`` are HU frames ``(N, S, S)`` on the grid."""

    def __init__(
        self, images: np.ndarray, targets: Sequence[int], transform: Transform, *, seed: int = 0
    ) -> None:
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.images = images
        self.targets = np.asarray(targets, dtype=np.int64)
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        hu = torch.from_numpy(np.asarray(self.images[index], dtype=np.float32)).unsqueeze(0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, self.epoch, index))
            image = self.transform(hu)
        return image, int(self.targets[index])


def site_dataset(
    site: SiteData,
    split: str | Sequence[str],
    *,
    classes: Sequence[str],
    windows: Sequence[Window],
    train: bool,
    seed: int = 0,
    augment: AugmentConfig | None = None,
) -> CTSlices:
    """The slices of ``split`` with targets indexed by the federation's ``classes``."""
    index = {name: i for i, name in enumerate(classes)}
    rows = site.indices(split)
    unknown = sorted({site.slices[i].label for i in rows} - set(index))
    if unknown:
        raise SiteDataError(
            f"site {site.name} has labels {unknown} outside the federation's classes "
            f"{list(classes)}"
        )
    targets = [index[site.slices[i].label] for i in rows]
    transform = train_transform(windows, augment) if train else eval_transform(windows)
    return CTSlices(site.images[rows], targets, transform, seed=derive_seed(seed, site.name))
