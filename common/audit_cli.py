"""``fedct audit verify STATE``: check a state folder's hash-chained audit log and summarize it."""

from __future__ import annotations

import argparse
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "state_dir", type=Path, help="a hospital's or the server's state folder (audit.jsonl)"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from fedct.common.audit import AuditError, verify

    console = Console()
    try:
        summary = verify(args.state_dir)
    except AuditError as err:
        console.print(f"[bold red]audit log check FAILED[/bold red]: {err}")
        return 1
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(summary.kinds.items()))
    console.print(
        f"audit log intact: {summary.records} records ({kinds}) from {summary.first_time} to "
        f"{summary.last_time}, {len(summary.runs)} run(s)"
    )
    for refusal in summary.refused:
        console.print(f"  refused: {refusal}")
    if summary.last_epsilon is not None:
        console.print(f"  ε spent (last recorded): {summary.last_epsilon:.3f}")
    return 0
