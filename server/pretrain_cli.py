"""``fedct pretrain``: train the federation's starting weights on public CT data."""

from __future__ import annotations

import argparse
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "public",
        type=Path,
        nargs="+",
        metavar="PUBLIC_DIR",
        help="public data folder(s) in the hospital layout (class sub-folders or labels.csv); "
        "never a participating hospital's data: pretraining is not private",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="weights file to write (.safetensors)"
    )
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--cache", type=Path, help="frame cache folder (default: next to --out)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--lesion-weight",
        type=float,
        default=None,
        help="weight of the lesion loss, learnt where the folders have lesion masks "
        "(SITE/masks/); 0 turns it off (default: 1.0, measured in docs/models.md)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="federation settings the weights must fit (model, image-size, windows, classes)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from fedct.common.config import FederationConfig, parse_overrides
    from fedct.common.errors import ConfigError
    from fedct.server.pretrain import LESION_WEIGHT, pretrain

    if args.out.suffix != ".safetensors":
        raise ConfigError(f"--out must name a .safetensors file, got {args.out}")
    for folder in args.public:
        if not folder.is_dir():
            raise ConfigError(f"public data folder {folder} does not exist")
    fed = FederationConfig.from_mapping(parse_overrides(args.set))
    result = pretrain(
        args.public,
        fed,
        args.out,
        epochs=args.epochs,
        cache_root=args.cache or args.out.parent / ".fedct-pretrain-cache",
        seed=args.seed,
        lesion_weight=LESION_WEIGHT if args.lesion_weight is None else args.lesion_weight,
    )
    print(
        f"wrote {result.path}: {result.train_slices} training slices, {result.epochs} epochs, "
        f"held-out AUROC {result.held_out_auroc:.3f}, {result.lesions} ({result.seconds:.0f} s)\n"
        f"Start a federation from it with: --set pretrained={result.path.resolve()}"
    )
    return 0
