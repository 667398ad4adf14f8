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

from fedct.common.metrics import LEVELS, SLICE
from fedct.server.checkpoints import read_metrics
from fedct.server.evaluation import TIED_NOTE, tied_levels
from fedct.server.health import Collapse


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
    """One line per round: pooled AUROC per level, then each site's loss, AUROC and ε, and
    what went wrong (exclusions, failures, a collapsed model with what to do)."""
    pooled = record.get("pooled", {})
    parts = [f"round {record['round']:>3}  pooled {auroc_text(pooled)}"]
    for site, m in sorted(record.get("train", {}).items()):
        ev = record.get("evaluate", {}).get(site, {})
        parts.append(
            f"{site}: loss {num_text(m.get('train-loss'))} "
            f"AUROC {num_text(ev.get('auroc'))} {epsilon_text(m.get('epsilon'))}{site_flags(ev)}"
        )
    for site, why in sorted(record.get("excluded", {}).items()):
        parts.append(f"{site}: EXCLUDED ({why})")
    for site, why in sorted(record.get("failed", {}).items()):
        parts.append(f"{site}: FAILED ({why})")
    for site in record.get("exhausted", []):
        parts.append(f"{site}: privacy budget exhausted")
    tied = tied_levels(pooled)
    collapse = Collapse.from_record(record.get("collapse"))
    if tied and not (collapse and TIED_NOTE in collapse.message):  # not named twice
        parts.append(f"{TIED_NOTE} ({', '.join(tied)})")
    if collapse is not None:
        parts.append(collapse.line)
    return "  |  ".join(parts)


def site_flags(evaluation: dict[str, Any]) -> str:
    """A site's warnings about its held-out data: intensities outside the model's training
    range, scores saturated (client/rounds.py)."""
    flags = []
    if evaluation.get("intensity-outside") == 1:
        flags.append("held-out HU outside the training range")
    if evaluation.get("scores-saturated") == 1:
        flags.append("scores saturated")
    return f" ⚠ {', '.join(flags)}" if flags else ""


def auroc_text(pooled: dict[str, Any]) -> str:
    """``AUROC slice 0.910 · series 0.950 · patient 0.960``, with how many sites a level pooled
    when fewer than the slices (a site with few patients reports their counts only)."""
    sites = pooled.get("reporting-sites")
    parts = []
    for level in LEVELS:
        text = f"{level.name} {num_text(pooled.get(level.key('auroc')))}"
        pooled_sites = pooled.get(level.key("reporting-sites"))
        if level is not SLICE and isinstance(sites, int) and pooled_sites not in (None, sites):
            text += f" ({pooled_sites} of {sites} sites)"
        parts.append(text)
    return "AUROC " + " · ".join(parts)


def epsilon_text(epsilon: Any) -> str:
    """``ε 1.23``, or ``no DP`` for a site that trains without differential privacy (its ε is
    NaN)."""
    return f"ε {epsilon:.2f}" if _finite(epsilon) else "no DP"


def num_text(value: Any, digits: int = 3) -> str:
    """``0.912``, or ``n/a`` for a missing or non-finite value."""
    return f"{value:.{digits}f}" if _finite(value) else "n/a"


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _fmt(record: dict[str, Any], key: str) -> str:
    return num_text(record.get("pooled", {}).get(key))
