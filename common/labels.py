"""Where a hospital's labels come from: class sub-folders or a ``labels.csv``.

Folder layout (as Keras' ``flow_from_directory``)::

    SITE/<class-name>/**/<any file name>

or a ``SITE/labels.csv`` with a ``label`` column and, per row, one of ``path`` (relative to
SITE), ``sop_instance_uid`` or ``series_instance_uid``; an optional ``split`` column
(train/val/test) overrides the default patient split. A series label applies to all its slices.

Hidden files and folders, ``SITE/masks/`` (lesion masks) and ``labels.csv`` itself are never
taken for images.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fedct.common.errors import SiteDataError

LABELS_FILE = "labels.csv"
MASKS_DIR = "masks"
SPLITS = ("train", "val", "test")

_COLUMN_ALIASES = {
    "path": ("path", "file", "filename", "file_path"),
    "sop": ("sop_instance_uid", "sopinstanceuid", "sop_uid"),
    "series": ("series_instance_uid", "seriesinstanceuid", "series_uid"),
    "label": ("label", "class", "diagnosis"),
    "split": ("split", "subset"),
}


@dataclass(frozen=True)
class Label:
    name: str
    split: str | None  # explicit split from labels.csv, else None
    level: Literal["slice", "series"]


@dataclass
class LabelSource:
    """The candidate files of a site and the rules that label them."""

    mode: Literal["folders", "csv"]
    files: list[str]  # posix paths relative to SITE
    by_path: dict[str, Label] = field(default_factory=dict)
    by_sop: dict[str, Label] = field(default_factory=dict)
    by_series: dict[str, Label] = field(default_factory=dict)
    outside_classes: list[str] = field(default_factory=list)  # folders mode: top-level files
    problems: list[str] = field(default_factory=list)  # non-fatal, for the site report

    def label_for(self, relpath: str, sop_uid: str, series_uid: str) -> Label | None:
        if self.mode == "folders":
            return Label(relpath.split("/", 1)[0], None, "slice")
        return (
            self.by_path.get(relpath) or self.by_sop.get(sop_uid) or self.by_series.get(series_uid)
        )


def discover(site: Path) -> LabelSource:
    """Find the candidate image files of ``site`` and how they are labelled."""
    if not site.is_dir():
        raise SiteDataError(f"hospital data folder {site} does not exist or is not a folder")
    files = sorted(_walk(site))
    if (site / LABELS_FILE).is_file():
        return _from_csv(site, files)
    inside = [f for f in files if "/" in f]
    outside = [f for f in files if "/" not in f]
    return LabelSource("folders", inside, outside_classes=outside)


def _walk(site: Path) -> Iterator[str]:
    for root, dirs, names in os.walk(site):
        rel_root = Path(root).relative_to(site)
        dirs[:] = sorted(
            d
            for d in dirs
            if not d.startswith(".") and not (rel_root == Path(".") and d == MASKS_DIR)
        )
        for name in names:
            if name.startswith(".") or (rel_root == Path(".") and name == LABELS_FILE):
                continue
            yield (rel_root / name).as_posix()


def _from_csv(site: Path, files: list[str]) -> LabelSource:
    path = site / LABELS_FILE
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [h.strip().lower() for h in (reader.fieldnames or [])]
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise SiteDataError(f"cannot read {path}: {err}. Save it as UTF-8 CSV.") from err
    columns = {key: _find_column(header, aliases) for key, aliases in _COLUMN_ALIASES.items()}
    if columns["label"] is None:
        raise SiteDataError(
            f"{path} has no 'label' column (found: {', '.join(header) or 'nothing'}). "
            "Add a 'label' column naming each image's class."
        )
    if not any(columns[k] for k in ("path", "sop", "series")):
        raise SiteDataError(
            f"{path} names no image: add a 'path' (relative to the site folder), "
            "'sop_instance_uid' or 'series_instance_uid' column."
        )
    source = LabelSource("csv", files)
    known = set(files)
    for line, raw in enumerate(rows, start=2):
        row = {k.strip().lower(): (v or "").strip() for k, v in raw.items() if k is not None}
        label = row.get(columns["label"] or "", "")
        split = row.get(columns["split"] or "", "").lower() or None
        if not label:
            source.problems.append(f"labels.csv line {line}: empty label, row ignored")
            continue
        if split is not None and split not in SPLITS:
            raise SiteDataError(
                f"{path} line {line}: split {split!r} is not one of {', '.join(SPLITS)}"
            )
        ref_path = row.get(columns["path"] or "", "").replace("\\", "/").removeprefix("./")
        sop = row.get(columns["sop"] or "", "")
        series = row.get(columns["series"] or "", "")
        if ref_path:
            if ref_path not in known:
                source.problems.append(f"labels.csv line {line}: no file {ref_path!r}")
            source.by_path[ref_path] = Label(label, split, "slice")
        elif sop:
            source.by_sop[sop] = Label(label, split, "slice")
        elif series:
            source.by_series[series] = Label(label, split, "series")
        else:
            source.problems.append(f"labels.csv line {line}: names no file or UID, row ignored")
    if not (source.by_path or source.by_sop or source.by_series):
        raise SiteDataError(f"{path} labels no image: every row is empty or incomplete")
    return source


def _find_column(header: list[str], aliases: tuple[str, ...]) -> str | None:
    return next((alias for alias in aliases if alias in header), None)
