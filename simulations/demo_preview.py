"""``world-demo.png`` of docs/worlds.md: a typical nodule slice of each source of `fedct
simulate`'s own world, the synthetic public collection first, then the hospitals.

    python -m fedct.simulations.demo_preview OUT_DIR [--seed 0]

Drawn like the evaluation worlds' pictures (simulations/worlds/preview.py), which must not
import FedCT's own generator; this module does.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from fedct.common.preprocess import GridConfig
from fedct.common.site import load_site
from fedct.simulations.synth import SynthSettings, hospital_profiles, write_hospitals
from fedct.simulations.worlds import SiteRecord
from fedct.simulations.worlds.preview import GRID_PX, render


def preview_demo(out: Path, *, seed: int) -> None:
    """``world-demo.png``: a typical nodule slice of each source of `fedct simulate`'s own
    world, the synthetic public collection first, then the hospitals (written at 0.3x)."""
    records, sites = [], []
    grid = GridConfig(image_size=GRID_PX)
    for population in ("public", "hospitals"):
        settings = SynthSettings(sites=3, seed=seed, scale=0.3, population=population)
        folders = write_hospitals(out / "demo" / population, settings, progress=False)
        for folder, (_, profile) in zip(folders, hospital_profiles(settings), strict=True):
            data = load_site(folder, grid=grid, progress=False)
            records.append(
                SiteRecord(
                    folder,
                    "csv",
                    profile.matrix,
                    profile.fov_mm,
                    profile.spacing_mm,
                    profile.scanner.transfer_syntax,
                    profile.patients,
                    0,
                    len(data.slices),
                    sum(1 for x in data.slices if x.label == "nodule"),
                )
            )
            sites.append(data)
    render("demo", records, sites, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="an empty or new folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    preview_demo(args.out, seed=args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
