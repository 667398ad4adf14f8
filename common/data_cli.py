"""``fedct data inspect``: check a hospital folder before it joins a federation."""

from __future__ import annotations

import argparse
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("site", type=Path, help="the hospital's data folder")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the report as JSON")
    parser.add_argument(
        "--cache",
        type=Path,
        metavar="DIR",
        help="keep the decoded frames here, so training later reads no DICOM",
    )
    parser.add_argument(
        "--image-size", type=int, help="model grid size in px (default: the federation's)"
    )
    parser.add_argument(
        "--classes",
        default=None,
        help="the federation's classes, comma-separated (checks the labels)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from fedct.common import json_text
    from fedct.common.config import FederationConfig
    from fedct.common.preprocess import GridConfig
    from fedct.common.site import load_site
    from fedct.common.site_report import render_text, summarize

    size = args.image_size or FederationConfig().image_size
    site = load_site(args.site, grid=GridConfig(size), cache_dir=args.cache)
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    summary = summarize(site, classes)
    Console(highlight=False).print(render_text(summary), markup=False)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json_text.dumps(summary.to_json(), indent=2) + "\n")
    return 1 if summary.fatal else 0
