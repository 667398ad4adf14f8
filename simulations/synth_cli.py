"""``fedct data synth``: write synthetic hospitals as DICOM CT series."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="folder to write hospitals into")
    parser.add_argument("--sites", type=int, default=3, help="number of hospitals (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply every hospital's number of patients (default 1)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from simulations.synth import SynthSettings, write_hospitals

    sites = write_hospitals(args.out, SynthSettings(args.sites, args.seed, args.scale))
    log.info(
        "wrote %d synthetic hospitals under %s: %s",
        len(sites),
        args.out,
        ", ".join(s.name for s in sites),
    )
    return 0
