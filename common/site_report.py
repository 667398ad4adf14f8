"""What ``fedct data inspect`` tells a hospital about its folder before it joins a federation.

The report is for the hospital's own staff: it names skipped files by their path relative to the
site folder, but it never contains patient names, IDs or UIDs (series are counted, not listed).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from fedct.common.errors import SiteDataError
from fedct.common.site import SiteData


@dataclass(frozen=True)
class Range:
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.low:g}" if self.low == self.high else f"{self.low:g} to {self.high:g}"


@dataclass
class SiteSummary:
    site: str
    layout: str  # "class folders" or "labels.csv"
    files: int
    usable_files: int
    series: int
    patients: int
    slices: int
    modalities: list[str]
    manufacturers: dict[str, int]  # "Manufacturer Model" -> slices
    matrix_sizes: dict[str, int]
    pixel_spacing_mm: Range | None
    slice_thickness_mm: Range | None
    hu_range: Range | None
    labels_per_split: dict[str, dict[str, int]]
    skipped: list[dict[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # warnings worth reading
    fatal: str | None = None  # why the site cannot train, if it cannot

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def summarize(site: SiteData, classes: list[str] | None = None) -> SiteSummary:
    slices = site.slices
    files = {s.path for s in slices}
    spacing = [s.meta.pixel_spacing[0] for s in slices if s.meta.pixel_spacing]
    thickness = [s.meta.slice_thickness for s in slices if s.meta.slice_thickness]
    vendors = Counter(
        " ".join(filter(None, (s.meta.manufacturer, s.meta.model))) or "unknown" for s in slices
    )
    matrices = Counter(f"{s.meta.rows}x{s.meta.cols}" for s in slices)
    try:
        site.require_trainable(classes)
        fatal = None
    except SiteDataError as err:
        fatal = str(err)
    return SiteSummary(
        site=site.name,
        layout="class folders" if site.mode == "folders" else "labels.csv",
        files=len(files) + len({s.path for s in site.skipped}),
        usable_files=len(files),
        series=len({s.meta.series_instance_uid for s in slices}),
        patients=len({s.patient_key for s in slices}),
        slices=len(slices),
        modalities=["CT"] if slices else [],
        manufacturers=dict(vendors.most_common()),
        matrix_sizes=dict(matrices.most_common()),
        pixel_spacing_mm=_range(spacing),
        slice_thickness_mm=_range(thickness),
        hu_range=Range(min(s.meta.hu_min for s in slices), max(s.meta.hu_max for s in slices))
        if slices
        else None,
        labels_per_split=site.counts(),
        skipped=[{"path": s.path, "reason": s.reason} for s in site.skipped],
        problems=list(site.problems),
        fatal=fatal,
    )


def _range(values: list[float]) -> Range | None:
    return Range(round(min(values), 3), round(max(values), 3)) if values else None


def render_text(summary: SiteSummary) -> str:
    """The report as plain text lines (the CLI prints it, with rich where it can)."""
    s = summary
    lines = [
        f"Site {s.site} ({s.layout})",
        f"  files: {s.files} found, {s.usable_files} usable, {len(s.skipped)} skipped",
        f"  patients: {s.patients}   series: {s.series}   slices: {s.slices}",
        f"  modality: {', '.join(s.modalities) or 'none usable'}",
        f"  scanners: {_counts(s.manufacturers)}",
        f"  matrix: {_counts(s.matrix_sizes)}",
        f"  pixel spacing (mm): {s.pixel_spacing_mm or 'unknown'}",
        f"  slice thickness (mm): {s.slice_thickness_mm or 'unknown'}",
        f"  HU range: {s.hu_range or 'n/a'}",
        "  labels per split:",
    ]
    for split, counts in s.labels_per_split.items():
        lines.append(f"    {split:<5} " + ", ".join(f"{k}: {v}" for k, v in counts.items()))
    if s.skipped:
        lines.append(f"  skipped files ({len(s.skipped)}):")
        lines += [f"    {item['path']}: {item['reason']}" for item in s.skipped]
    if s.problems:
        lines.append("  warnings:")
        lines += [f"    {p}" for p in s.problems]
    lines.append(f"  NOT READY: {s.fatal}" if s.fatal else "  ready to join a federation")
    return "\n".join(lines)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} ({v})" for k, v in counts.items()) or "none"
