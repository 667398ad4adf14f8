"""``fedct data synth``: write synthetic hospitals as DICOM CT series.

Without ``--world`` it writes FedCT's built-in hospitals (``simulations/synth.py``); with
``--world NAME`` one of the independent evaluation worlds (``simulations/worlds``, described in
docs/worlds.md), which share no code with the built-in generator.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="folder to write hospitals into")
    parser.add_argument(
        "--sites",
        type=int,
        default=None,
        help="number of hospitals (default 3; with --world: all of the world's, at most 3)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply every hospital's number of patients (default 1)",
    )
    parser.add_argument(
        "--public",
        action="store_true",
        help="write the synthetic public collection (other scanners and lesion mix than the "
        "hospitals; what `fedct simulate` pretrains on) instead of hospitals",
    )
    parser.add_argument(
        "--world",
        metavar="NAME",
        default=None,
        help="write an independent evaluation world instead of the built-in hospitals: "
        "meadow (tuning), ward or harbor (held out); see docs/worlds.md",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.world is not None:
        return _run_world(args)
    from fedct.simulations.synth import SynthSettings, write_hospitals

    sites = args.sites if args.sites is not None else 3
    population = "public" if args.public else "hospitals"
    written = write_hospitals(
        args.out, SynthSettings(sites, args.seed, args.scale, population=population)
    )
    log.info(
        "wrote %d synthetic %s under %s: %s",
        len(written),
        "public collections" if args.public else "hospitals",
        args.out,
        ", ".join(s.name for s in written),
    )
    return 0


def _run_world(args: argparse.Namespace) -> int:
    from fedct.simulations.worlds import WorldOptions, build_world, world_spec

    spec = world_spec(args.world)
    records = build_world(
        spec.name, args.out, WorldOptions(seed=args.seed, scale=args.scale, sites=args.sites)
    )
    log.info(
        "wrote world %r (%s) under %s: %s",
        spec.name,
        spec.role,
        args.out,
        ", ".join(r.path.name for r in records),
    )
    return 0
