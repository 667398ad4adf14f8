"""Preview pictures of the evaluation worlds and the numbers of docs/worlds.md's size table.

``python -m fedct.simulations.worlds.preview OUT_DIR [--worlds meadow ward] [--seed 0]`` writes each
world at scale 1 under ``OUT_DIR/<world>/``, then ``OUT_DIR/world-<world>.png`` (the pictures
in docs/img/): one typical nodule slice per hospital (its lesion the median size there) with the
lesion outlined in red, and one normal slice, as FedCT's reader returns them at the native
matrix. It prints one markdown row per world: positive slices, lesion size in px of a 96 px image
of the field of view (min-max, median), the share <= 3 px, the writing time and disk use.
"""

from __future__ import annotations

import argparse
import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from fedct.common.dicom_io import read_ct_file
from fedct.common.labels import MASKS_DIR
from fedct.common.preprocess import GridConfig
from fedct.common.site import SiteData, load_site
from fedct.simulations.worlds import WORLDS, SiteRecord, WorldOptions, build_world

log = logging.getLogger(__name__)

GRID_PX = 96  # FedCT's default image-size: the sizes are stated on this grid
_SYNTAX = {
    "1.2.840.10008.1.2": "implicit VR",
    "1.2.840.10008.1.2.1": "explicit VR",
    "1.2.840.10008.1.2.5": "RLE",
    "1.2.840.10008.1.2.4.90": "JPEG 2000",
}


@dataclass(frozen=True)
class Lesion:
    site: int
    slice: int
    px: float  # equivalent diameter of the cross-section on the 96 px grid


def native_mask(data: SiteData, index: int) -> np.ndarray | None:
    """The lesion mask of slice ``index`` at the slice's own matrix, if it has one."""
    path = data.root / MASKS_DIR / f"{data.slices[index].meta.sop_instance_uid}.png"
    if not path.is_file():
        return None
    with Image.open(path) as image:
        return np.asarray(image) > 0


def lesions(record: SiteRecord, data: SiteData, *, site: int) -> list[Lesion]:
    """Every lesion cross-section of the site's labelled slices, measured from the masks."""
    found = []
    for i in range(len(data.slices)):
        mask = native_mask(data, i)
        if mask is None:
            continue
        count, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8))
        pixel_mm = record.fov_mm / record.matrix
        for area in stats[1:count, cv2.CC_STAT_AREA]:
            mm = 2 * np.sqrt(area * pixel_mm**2 / np.pi)
            found.append(Lesion(site, i, float(mm * GRID_PX / record.fov_mm)))
    return found


def render(name: str, records: list[SiteRecord], sites: list[SiteData], out: Path) -> None:
    """Three typical nodule slices (one a hospital) and a normal slice, lesions outlined."""
    picks: list[tuple[int, int]] = []
    for k, (record, data) in enumerate(zip(records, sites, strict=True)):
        found = sorted(lesions(record, data, site=k), key=lambda lesion: lesion.px)
        if found:
            picks.append((k, found[len(found) // 2].slice))
    normal = [i for i, s in enumerate(sites[0].slices) if s.label == "normal"]
    picks.append((0, normal[len(normal) // 2]))
    fig = Figure(figsize=(2 * len(picks), 2.5))  # Agg canvas, no pyplot state
    axes = fig.subplots(1, len(picks), squeeze=False)[0]
    for ax, (k, i) in zip(axes, picks, strict=True):
        s = sites[k].slices[i]
        hu = read_ct_file(sites[k].root / s.path)[0].hu
        ax.imshow(np.clip((hu + 1350.0) / 1500.0, 0, 1), cmap="gray", interpolation="nearest")
        mask = native_mask(sites[k], i)
        if mask is not None:
            ax.contour(mask.astype(np.float32), levels=[0.5], colors="red", linewidths=0.6)
        syntax = _SYNTAX.get(records[k].transfer_syntax, records[k].transfer_syntax)
        ax.set_title(f"{records[k].path.name} {s.label}\n{hu.shape[1]} px, {syntax}", fontsize=7)
        ax.axis("off")
    fig.tight_layout(pad=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    with Image.open(buffer) as image:  # a 64-colour palette keeps the picture small
        image.convert("RGB").quantize(colors=64, method=Image.Quantize.FASTOCTREE).save(
            out / f"world-{name}.png", optimize=True
        )


def preview(name: str, out: Path, *, seed: int) -> str:
    """Write world ``name`` under ``out``, render its picture, return its table row."""
    started = time.perf_counter()
    records = build_world(name, out / name, WorldOptions(seed=seed))
    seconds = time.perf_counter() - started
    grid = GridConfig(image_size=GRID_PX)
    sites = [load_site(r.path, grid=grid, progress=False) for r in records]
    render(name, records, sites, out)
    px = np.array([x.px for k, r in enumerate(records) for x in lesions(r, sites[k], site=k)])
    slices = sum(r.slices for r in records)
    positives = sum(r.positive_slices for r in records)
    shares = " / ".join(f"{100 * r.positive_fraction:.1f}" for r in records)
    disk = sum(p.stat().st_size for p in (out / name).rglob("*") if p.is_file()) / 1e6
    masks = sum(1 for r in records for _ in (r.path / MASKS_DIR).glob("*.png"))
    log.info("%s: %d masks, %d lesion cross-sections", name, masks, len(px))
    return (
        f"| {name} | {len(records)} | {' / '.join(str(r.patients) for r in records)} | {slices} | "
        f"{positives} ({100 * positives / slices:.1f} %): {shares} % | "
        f"{px.min():.2f}-{px.max():.2f}, {np.median(px):.2f} | {100 * (px <= 3).mean():.0f} % | "
        f"{seconds:.0f} s | {disk:.0f} MB |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="an empty or new folder")
    parser.add_argument("--worlds", nargs="+", choices=sorted(WORLDS), default=sorted(WORLDS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # decoders chat at INFO
    logging.getLogger("fedct.simulations").setLevel(logging.INFO)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [preview(name, args.out, seed=args.seed) for name in args.worlds]
    print("\n".join(rows))  # the entry point's output
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
