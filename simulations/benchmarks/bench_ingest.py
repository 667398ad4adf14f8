"""Ingestion benchmark: slices/second for (a) raw ``pydicom.dcmread(...).pixel_array``, (b) FedCT's
full preprocessing (decode, HU, padding, resample to the model grid), (c) loading from FedCT's
frame cache, on the same files in one run. Rounds alternate a, b, c so machine noise hits all
three alike; the median round is reported. FedCT's preprocessing is timed as it runs (one worker
process per CPU once a site has enough files to repay starting them) and in one process.

    python -m fedct.simulations.benchmarks.bench_ingest [--data SITE] [--image-size 96] [--rounds 5]
        [--patients 8] [--slices N] [--json F]

Without ``--data`` it writes one synthetic site per transfer syntax (uncompressed 512x512,
JPEG 2000 384x384, RLE 256x256) into a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom

from fedct.common.frame_cache import decode_site
from fedct.common.labels import discover
from fedct.common.preprocess import GridConfig
from fedct.simulations.synth import PROFILES, HospitalProfile, write_hospital


def _time(fn: Callable[[], int]) -> float:
    start = time.perf_counter()
    n = fn()
    return n / (time.perf_counter() - start)


def bench_site(site: Path, grid: GridConfig, rounds: int, cache: Path) -> dict[str, float]:
    files = [site / f for f in discover(site).files if f.endswith(".dcm")]
    rel = [f.relative_to(site).as_posix() for f in files]

    def raw() -> int:
        for f in files:
            _ = pydicom.dcmread(f).pixel_array
        return len(files)

    def full() -> int:
        return len(decode_site(site, rel, grid, None, progress=False).images)

    def serial() -> int:
        return len(decode_site(site, rel, grid, None, progress=False, workers=1).images)

    decode_site(site, rel, grid, cache, progress=False)  # warm the cache

    def cached() -> int:
        images = decode_site(site, rel, grid, cache, progress=False).images
        return len(np.array(images, dtype=np.float32))  # really read every row

    results: dict[str, list[float]] = {"raw": [], "full": [], "serial": [], "cache": []}
    for _ in range(rounds):
        results["raw"].append(_time(raw))
        results["full"].append(_time(full))
        results["serial"].append(_time(serial))
        results["cache"].append(_time(cached))
    med = {k: statistics.median(v) for k, v in results.items()}
    return {
        "slices": len(files),
        "raw_slices_per_s": round(med["raw"], 1),
        "fedct_slices_per_s": round(med["full"], 1),
        "fedct_one_process_slices_per_s": round(med["serial"], 1),
        "cache_slices_per_s": round(med["cache"], 1),
        "fedct_vs_raw": round(med["full"] / med["raw"], 2),
        "fedct_one_process_vs_raw": round(med["serial"] / med["raw"], 2),
        "cache_vs_raw": round(med["cache"] / med["raw"], 1),
    }


def _sized(profile: HospitalProfile, patients: int, slices: int | None) -> HospitalProfile:
    """``profile`` with ``patients`` patients and ``slices`` slices each over the same length of
    chest (denser slices, as a clinical scan has, rather than a longer body)."""
    if not slices:
        return replace(profile, patients=patients)
    spacing = profile.spacing_mm * (profile.slices - 1) / max(1, slices - 1)
    return replace(profile, patients=patients, slices=slices, spacing_mm=spacing)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, action="append", help="site folder(s) to read")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--patients", type=int, default=8, help="per synthetic site")
    parser.add_argument(
        "--slices", type=int, help="slices per synthetic patient (default: each profile's own)"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    grid = GridConfig(args.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        sites = args.data
        if not sites:
            sites = []
            for i, profile in enumerate(PROFILES):
                site = Path(tmp) / f"bench-{i}"
                write_hospital(
                    site,
                    _sized(profile, args.patients, args.slices),
                    seed=0,
                    site_index=i,
                    progress=False,
                )
                sites.append(site)
        table = {}
        for site in sites:
            ts = pydicom.dcmread(next(site.rglob("*.dcm"))).file_meta.TransferSyntaxUID
            row = bench_site(site, grid, args.rounds, Path(tmp) / "cache" / site.name)
            table[f"{site.name} ({ts.name})"] = row
    print(
        f"{'site':<58} {'slices':>6} {'raw/s':>8} {'fedct/s':>8} {'1proc/s':>8} {'cache/s':>9} "
        f"{'fedct/raw':>9} {'1proc/raw':>9} {'cache/raw':>9}"
    )
    for name, r in table.items():
        print(
            f"{name:<58} {r['slices']:>6} {r['raw_slices_per_s']:>8} "
            f"{r['fedct_slices_per_s']:>8} {r['fedct_one_process_slices_per_s']:>8} "
            f"{r['cache_slices_per_s']:>9} {r['fedct_vs_raw']:>9} "
            f"{r['fedct_one_process_vs_raw']:>9} {r['cache_vs_raw']:>9}"
        )
    if args.json:
        args.json.write_text(json.dumps(table, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
