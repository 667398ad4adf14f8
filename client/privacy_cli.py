"""``fedct privacy report``: a site's privacy ledger as a table, and the budget left."""

from __future__ import annotations

import argparse
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("state_dir", type=Path, help="the site's state folder")
    parser.add_argument("--epsilon", type=float, help="the site's budget ε (to show what is left)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from fedct.client.privacy import read_entries

    entries = read_entries(args.state_dir)
    table = Table(title=f"Privacy ledger of {args.state_dir}")
    for column in (
        "round",
        "ε (cumulative)",
        "δ",
        "noise σ",
        "sample rate",
        "steps",
        "accountant",
        "time (UTC)",
        "model",
    ):
        table.add_column(column)
    for e in entries:
        table.add_row(
            str(e.round),
            f"{e.epsilon:.3f}",
            f"{e.delta:.2g}",
            f"{e.noise_multiplier:.3f}",
            f"{e.sample_rate:.4f}",
            str(e.steps),
            e.accountant,
            e.timestamp,
            e.model_version,
        )
    console = Console()
    console.print(table)
    spent = entries[-1].epsilon if entries else 0.0
    line = f"ε spent: {spent:.3f} over {len(entries)} round(s)"
    if args.epsilon is not None:
        line += f"; budget {args.epsilon:g}; remaining {max(args.epsilon - spent, 0):.3f}"
    console.print(line)
    return 0
