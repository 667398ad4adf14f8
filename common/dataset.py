"""Torch datasets over a site's cached frames, with per-site, per-epoch, per-sample seeded
augmentation: the same run seed gives the same augmented images whatever the worker count."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from fedct.common.augment import AugmentConfig, Transform, eval_transform, train_transform
from fedct.common.errors import SiteDataError
from fedct.common.preprocess import Window
from fedct.common.seeding import derive_seed
from fedct.common.site import SiteData


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
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, self.epoch, index))
            image = self.transform(self.hu(index))
        return image, int(self.targets[index])

    def hu(self, index: int) -> torch.Tensor:
        """Slice ``index`` as a (1, S, S) float32 HU tensor, before any transform."""
        return torch.from_numpy(np.asarray(self.images[index], dtype=np.float32)).unsqueeze(0)


class LesionSlices(Dataset[tuple[torch.Tensor, int, torch.Tensor, bool]]):
    """``(image, class index, lesion mask, mask known)``: slices with where their lesion is, for
    lesion-supervised (public) pretraining.

    ``masks[i]`` is slice i's lesion mask on the grid: all false for a slice known to hold no
    lesion, ``None`` where the place is unknown (a positive slice without a mask); such a slice
    gets an all-zero mask and ``known = False``, and teaches nothing about place. The mask takes
    the very augmentation its image gets (one seeded draw: flips and affine moves on both), and
    the image is the one ``slices[i]`` gives.
    """

    def __init__(self, slices: CTSlices, masks: Sequence[np.ndarray | None]) -> None:
        if len(masks) != len(slices):
            raise ValueError(f"{len(masks)} masks but {len(slices)} slices")
        self.slices = slices
        self.masks = list(masks)

    @property
    def known(self) -> int:
        """How many slices outline a lesion (a non-empty mask): what teaches the lesion loss."""
        return sum(m is not None and bool(m.any()) for m in self.masks)

    def set_epoch(self, epoch: int) -> None:
        self.slices.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, torch.Tensor, bool]:
        mask = self.masks[index]
        if mask is None:
            image, target = self.slices[index]
            return image, target, torch.zeros((1, *image.shape[-2:])), False
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.slices.seed, self.slices.epoch, index))
            image, moved = self.slices.transform(  # type: ignore[call-arg]
                self.slices.hu(index), tv_tensors.Mask(torch.from_numpy(mask)[None].byte())
            )
        target = int(self.slices.targets[index])
        return image, target, moved.as_subclass(torch.Tensor).float(), True


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


def site_lesion_dataset(
    site: SiteData,
    split: str | Sequence[str],
    *,
    classes: Sequence[str],
    windows: Sequence[Window],
    seed: int = 0,
    augment: AugmentConfig | None = None,
    outlines: bool = True,
) -> LesionSlices:
    """The training slices of ``split`` with their lesion masks (``SITE/masks/``): slices of the
    first class (``normal``) are known to hold none; others without a mask are unknown. With
    ``outlines=False`` no mask is read and every place is unknown."""
    plain = site_dataset(
        site, split, classes=classes, windows=windows, train=True, seed=seed, augment=augment
    )
    if not outlines:
        return LesionSlices(plain, [None] * len(plain))
    masks: list[np.ndarray | None] = []
    for row, target in zip(site.indices(split), plain.targets, strict=True):
        mask = site.lesion_mask(int(row))
        if mask is None and target == 0:
            mask = np.zeros(site.images.shape[1:], dtype=bool)
        masks.append(mask)
    return LesionSlices(plain, masks)
