"""A hospital's data folder as labelled, split, preprocessed CT slices.

``load_site`` is the one way in, for training, evaluation, ``fedct data inspect`` and the
synthetic round trip alike. Files that cannot be used are skipped with a one-line reason; the
site as a whole fails (``SiteDataError``) only when :meth:`SiteData.require_trainable` finds
nothing to train on.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from fedct.common.errors import SiteDataError
from fedct.common.frame_cache import FrameMeta, decode_site
from fedct.common.labels import MASKS_DIR, SPLITS, discover
from fedct.common.preprocess import GridConfig, to_model_grid
from fedct.common.split import patient_split

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Skipped:
    path: str  # relative to the site folder (shown only to the site's own staff)
    reason: str


@dataclass(frozen=True)
class Slice:
    """One usable, labelled frame of a site."""

    path: str
    meta: FrameMeta
    label: str
    label_level: Literal["slice", "series"]
    split: str
    patient_key: str  # PatientID, else StudyInstanceUID; never leaves the site


@dataclass
class SiteData:
    root: Path
    grid: GridConfig
    mode: Literal["folders", "csv"]
    slices: list[Slice]
    images: np.ndarray  # (N, S, S) float16 HU on the model grid, aligned with ``slices``
    skipped: list[Skipped] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def labels(self) -> list[str]:
        return sorted({s.label for s in self.slices})

    def indices(self, split: str | Sequence[str]) -> np.ndarray:
        wanted = {split} if isinstance(split, str) else set(split)
        return np.asarray(
            [i for i, s in enumerate(self.slices) if s.split in wanted], dtype=np.int64
        )

    def lesion_mask(self, index: int) -> np.ndarray | None:
        """The lesion mask of slice ``index`` on the model grid (bool), if the site has one in
        ``SITE/masks/<SOPInstanceUID>.png`` (``..._<frame>.png`` for multi-frame objects)."""
        meta = self.slices[index].meta
        folder = self.root / MASKS_DIR
        for name in (f"{meta.sop_instance_uid}_{meta.frame}.png", f"{meta.sop_instance_uid}.png"):
            path = folder / name
            if path.is_file():
                with Image.open(path) as image:
                    mask = np.asarray(image.convert("L")) > 0
                if mask.shape != (meta.rows, meta.cols):
                    raise SiteDataError(
                        f"{path} is {mask.shape[1]}x{mask.shape[0]}, but its "
                        f"slice is {meta.cols}x{meta.rows}"
                    )
                grid = to_model_grid(
                    mask.astype(np.float32),
                    meta.pixel_spacing,
                    self.grid,
                    fill=0.0,
                    box=meta.crop_box,
                )
                return grid > 0  # any coverage: small lesions must not vanish when shrunk
        return None

    def eval_split(self) -> str:
        """The held-out split used for evaluation: ``test`` when the site defines one."""
        return "test" if any(s.split == "test" for s in self.slices) else "val"

    def counts(self) -> dict[str, dict[str, int]]:
        """Slices per split and label (what a site may share: counts only)."""
        out: dict[str, Counter[str]] = {}
        for s in self.slices:
            out.setdefault(s.split, Counter())[s.label] += 1
        return {k: dict(sorted(v.items())) for k, v in sorted(out.items())}

    def num_patients(self, split: str) -> int:
        """Distinct patients in ``split`` (what a privacy guarantee is about)."""
        return len({self.slices[i].patient_key for i in self.indices(split)})

    def require_trainable(self, classes: Sequence[str] | None = None) -> None:
        """Raise :class:`SiteDataError` if this site cannot take part in training."""
        where = f"hospital folder {self.root}"
        if not self.slices:
            raise SiteDataError(
                f"no usable CT images in {where} ({len(self.skipped)} files skipped). "
                f"Run 'fedct data inspect {self.root}' to see why each file was skipped."
            )
        if classes is not None:
            unknown = sorted(set(self.labels) - set(classes))
            if unknown:
                raise SiteDataError(
                    f"{where} has labels {unknown} that the federation does not know "
                    f"(its classes are {list(classes)}); rename them or fix labels.csv."
                )
        train_labels = {s.label for s in self.slices if s.split == "train"}
        if len(train_labels) < 2:
            raise SiteDataError(
                f"{where} has a single class in its training split ({sorted(train_labels)}); "
                "a classifier needs examples of at least two classes. Add images of the other "
                "class or check the labels."
            )


def load_site(
    root: str | Path,
    *,
    grid: GridConfig,
    cache_dir: Path | None = None,
    val_fraction: float = 0.2,
    split_salt: str = "fedct",
    progress: bool = True,
) -> SiteData:
    """Read, label, split and preprocess every CT frame in the hospital folder ``root``."""
    root = Path(root).resolve()
    source = discover(root)
    decoded = decode_site(root, source.files, grid, cache_dir, progress=progress)

    skipped = [Skipped(p, "outside any class folder") for p in source.outside_classes]
    rows: list[int] = []
    pending: list[tuple[str, FrameMeta, str, Literal["slice", "series"], str | None]] = []
    for rel, entry in decoded.entries.items():
        if entry.skip is not None:
            skipped.append(Skipped(rel, entry.skip))
            continue
        unlabelled = 0
        for meta in entry.frames:
            label = source.label_for(rel, meta.sop_instance_uid, meta.series_instance_uid)
            if label is None:
                unlabelled += 1
                continue
            pending.append((rel, meta, label.name, label.level, label.split))
            rows.append(entry.row + meta.frame)
        if unlabelled:
            skipped.append(Skipped(rel, "not labelled in labels.csv"))

    splits = _assign_splits(pending, val_fraction, split_salt)
    slices = [
        Slice(rel, meta, label, level, split, _patient_key(meta, rel))
        for (rel, meta, label, level, _), split in zip(pending, splits, strict=True)
    ]
    order = sorted(range(len(slices)), key=lambda i: _slice_order(slices[i]))
    slices = [slices[i] for i in order]
    images = (
        decoded.images[np.asarray([rows[i] for i in order], dtype=np.int64)]
        if order
        else (np.zeros((0, grid.image_size, grid.image_size), dtype=np.float16))
    )
    site = SiteData(
        root,
        grid,
        source.mode,
        slices,
        images,
        sorted(skipped, key=lambda s: s.path),
        list(source.problems),
    )
    site.problems.extend(_leakage_warnings(slices))
    log.info(
        "site %s: %d slices usable, %d files skipped (%d decoded, rest cached)",
        site.name,
        len(slices),
        len(skipped),
        decoded.decoded,
    )
    return site


def _patient_key(meta: FrameMeta, rel: str) -> str:
    return meta.patient_id or meta.study_instance_uid or meta.series_instance_uid or rel


def _slice_order(s: Slice) -> tuple[str, float, int, int, str]:
    m = s.meta
    position = m.position if m.position is not None else float("inf")
    instance = m.instance_number if m.instance_number is not None else 0
    return (m.series_instance_uid, position, instance, m.frame, s.path)


def _assign_splits(
    pending: list[tuple[str, FrameMeta, str, Literal["slice", "series"], str | None]],
    val_fraction: float,
    salt: str,
) -> list[str]:
    """Explicit splits win; every other slice follows its patient (explicit, else by hash)."""
    explicit: dict[str, Counter[str]] = {}
    labels: dict[str, set[str]] = {}
    for rel, meta, label, _, split in pending:
        key = _patient_key(meta, rel)
        labels.setdefault(key, set()).add(label)
        if split is not None:
            explicit.setdefault(key, Counter())[split] += 1
    strata = {k: tuple(sorted(v)) for k, v in labels.items() if k not in explicit}
    by_patient = patient_split(strata, val_fraction=val_fraction, salt=salt)
    by_patient.update({k: c.most_common(1)[0][0] for k, c in explicit.items()})
    return [split or by_patient[_patient_key(meta, rel)] for rel, meta, _, _, split in pending]


def _leakage_warnings(slices: list[Slice]) -> list[str]:
    seen: dict[str, set[str]] = {}
    for s in slices:
        seen.setdefault(s.patient_key, set()).add(s.split)
    leaking = sum(1 for splits in seen.values() if len(splits) > 1)
    if not leaking:
        return []
    return [
        f"labels.csv puts {leaking} patient(s) in more than one of {'/'.join(SPLITS)}: "
        "their slices are not independent, so validation scores will be optimistic"
    ]
