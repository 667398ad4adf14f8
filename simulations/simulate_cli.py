"""``fedct simulate``: train a federation of hospitals on this machine and write a report."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        type=Path,
        help="one sub-folder per hospital (default: synthetic hospitals written to OUT/data)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("fedct-output"),
        help="output folder (default: fedct-output)",
    )
    parser.add_argument("--sites", type=int, default=3, help="synthetic hospitals (default 3)")
    parser.add_argument("--rounds", type=int, help="federated rounds")
    parser.add_argument("--epsilon", type=float, help="privacy budget per site (ε)")
    parser.add_argument("--no-dp", action="store_true", help="train without differential privacy")
    parser.add_argument("--model", choices=["resnet18", "resnet34", "resnet50"])
    parser.add_argument("--image-size", type=int, help="model grid in pixels")
    parser.add_argument("--strategy", help="fedavg, fedprox, fedadam, fedmedian, ...")
    parser.add_argument("--seed", type=int, default=0, help="run seed (default 0)")
    parser.add_argument(
        "--pretrain",
        metavar="public|none|FILE",
        help="starting weights: 'public' pretrains on a synthetic public data set (the default "
        "with built-in synthetic hospitals), 'none' trains from scratch (the default with "
        "--data), or a torchvision state dict file",
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="also train centralized (with and without DP) and local-only models, same budget",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any run-config key (README: Configuration reference), e.g. --set local-epochs=2",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from fedct.common.config import FederationConfig, parse_overrides
    from fedct.server.checkpoints import read_metrics
    from fedct.server.evaluation import TIED_NOTE
    from fedct.server.health import Collapse
    from fedct.server.progress import auroc_text, epsilon_text, num_text
    from fedct.simulations.report import write_report
    from fedct.simulations.simulate import (
        SimulationPaths,
        add_comparison,
        gains,
        prepare_data,
        prepare_pretrained,
        run_config,
        run_federation,
        summarize,
    )

    overrides = parse_overrides(args.set)
    named = {
        "num-server-rounds": args.rounds,
        "epsilon": args.epsilon,
        "model": args.model,
        "image-size": args.image_size,
        "strategy": args.strategy,
        "seed": args.seed,
    }
    overrides.update({k: v for k, v in named.items() if v is not None})
    if args.no_dp:
        overrides["dp"] = False
    paths = SimulationPaths(args.out)
    data = prepare_data(args.data, paths, sites=args.sites, seed=args.seed)
    console = Console(stderr=True)
    choice = args.pretrain or ("none" if args.data or "pretrained" in overrides else "public")
    overrides = prepare_pretrained(choice, paths, overrides, seed=args.seed, console=console)
    config = run_config(overrides, data=data, paths=paths)
    sites = sorted(p for p in data.iterdir() if p.is_dir())
    console.print(
        f"FedCT simulation: {len(sites)} hospitals ({', '.join(s.name for s in sites)})"
        f", {config['num-server-rounds']} rounds, "
        + (f"DP ε={config['epsilon']} per site" if config["dp"] else "no DP")
        + (f", from {Path(config['pretrained']).name}" if config["pretrained"] else "")
    )
    run_federation(config, num_sites=len(sites), paths=paths, console=console)
    fed = FederationConfig.from_mapping(config)
    summary = summarize(paths, fed)
    if args.compare:
        summary = add_comparison(paths, fed, summary, console)
    history = read_metrics(paths.metrics)
    report = write_report(paths.out, summary, history, fed)
    pooled = history[-1].get("pooled", {})
    console.print(
        f"pooled {auroc_text(pooled)} after {summary['rounds']} rounds"
        if "auroc" in pooled
        else "no pooled AUROC (too few held-out cases)"
    )
    rows = gains(summary)
    if rows:
        console.print("what each hospital gained by joining (held-out AUROC):")
        for g in rows:
            console.print(
                f"  {g.site:<14} before {num_text(g.start)} -> federated {num_text(g.final)}  "
                f"gain {g.gain_text}  {epsilon_text(g.epsilon)}"
            )
    if summary["scores_tied"]:
        console.print(f"{TIED_NOTE} ({', '.join(summary['scores_tied'])})")
    collapse = Collapse.from_record(history[-1].get("collapse"))
    if collapse is not None:
        console.print(collapse.line, style="bold red", highlight=False)
    console.print(f"summary: {paths.out / 'summary.json'}")
    console.print(f"report:  {report}")
    return 0
