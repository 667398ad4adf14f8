"""Rounds shown as they complete, read from the server's ``metrics.jsonl`` (the simulation and
``fedct server`` both follow a federation this way, from outside its process)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from server.checkpoints import read_metrics


def follow_rounds(
    metrics: Path,
    rounds: int,
    console: Console,
    finished: Callable[[], bool],
    done_before: int = 0,
    *,
    poll_s: float = 1.0,
) -> None:
    """Print a line per new round in ``metrics`` until ``finished()`` (checked before a final
    read, so the last rounds are always shown)."""
    columns = (
        TextColumn("[bold]federated rounds"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
    )
    shown = done_before
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("", total=rounds, completed=min(done_before, rounds))
        while True:
            done = finished()
            history = read_metrics(metrics)
            for record in history[shown:]:
                progress.console.print(round_line(record), highlight=False)
                progress.update(
                    task,
                    completed=min(int(record["round"]), rounds),
                    description=f"pooled AUROC {_fmt(record, 'auroc')}",
                )
            shown = max(shown, len(history))
            if done:
                return
            time.sleep(poll_s)


def round_line(record: dict[str, Any]) -> str:
    """One line per round: pooled AUROC, then each site's loss, AUROC and ε."""
    parts = [f"round {record['round']:>3}  pooled AUROC {_fmt(record, 'auroc')}"]
    for site, m in sorted(record.get("train", {}).items()):
        ev = record.get("evaluate", {}).get(site, {})
        eps = m.get("epsilon", math.nan)
        parts.append(
            f"{site}: loss {m.get('train-loss', math.nan):.3f} "
            f"AUROC {ev.get('auroc', math.nan):.3f} ε {eps:.2f}"
        )
    for site, why in sorted(record.get("excluded", {}).items()):
        parts.append(f"{site}: EXCLUDED ({why})")
    for site, why in sorted(record.get("failed", {}).items()):
        parts.append(f"{site}: FAILED ({why})")
    for site in record.get("exhausted", []):
        parts.append(f"{site}: privacy budget exhausted")
    return "  |  ".join(parts)


def _fmt(record: dict[str, Any], key: str) -> str:
    value = record.get("pooled", {}).get(key)
    return f"{value:.3f}" if isinstance(value, (int, float)) else "n/a"
