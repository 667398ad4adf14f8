"""``fedct simulate``: a multi-hospital federation on one machine, from data to report.

The federation runs in a child process in its own session (Flower's simulation engine starts
Ray workers); whatever happens here, success, error or Ctrl-C, that whole process group is
stopped before this returns, so nothing is left running. Meanwhile the parent follows
``metrics.jsonl`` and shows the rounds as they complete.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from common.config import FederationConfig, app_defaults
from common.errors import FedCTError
from server.checkpoints import read_metrics
from simulations.synth import SynthSettings, write_hospitals

log = logging.getLogger(__name__)


class SimulationError(FedCTError):
    """The federation process failed; its log says why."""


@dataclass(frozen=True)
class SimulationPaths:
    out: Path

    @property
    def data(self) -> Path:
        return self.out / "data"

    @property
    def federation(self) -> Path:
        return self.out / "federation"

    @property
    def metrics(self) -> Path:
        return self.federation / "metrics.jsonl"

    @property
    def log(self) -> Path:
        return self.out / "simulation.log"


def prepare_data(data: Path | None, paths: SimulationPaths, *, sites: int, seed: int) -> Path:
    """The folder of hospitals to use: ``data`` as given, else synthetic ones (made once)."""
    if data is not None:
        if not data.is_dir() or not any(p.is_dir() for p in data.iterdir()):
            raise FedCTError(f"{data} must be a folder with one sub-folder per hospital")
        return data
    if not paths.data.is_dir() or not any(paths.data.iterdir()):
        log.info("writing %d synthetic hospitals to %s", sites, paths.data)
        write_hospitals(paths.data, SynthSettings(sites=sites, seed=seed))
    return paths.data


def run_config(overrides: dict[str, Any], *, data: Path, paths: SimulationPaths) -> dict[str, Any]:
    config = {
        **app_defaults(),
        **overrides,
        "data-root": str(data.resolve()),
        "output-dir": str(paths.federation.resolve()),
    }
    FederationConfig.from_mapping(config)  # fail here, with a clear message, not in a worker
    return config


def run_federation(
    config: dict[str, Any], *, num_sites: int, paths: SimulationPaths, console: Console
) -> None:
    """Run the Flower simulation in a child process group and follow its rounds."""
    paths.out.mkdir(parents=True, exist_ok=True)
    rounds = int(config["num-server-rounds"])
    cpus = max(1, os.cpu_count() or 1)
    args = [
        sys.executable,
        "-m",
        "simulations.flower_sim_main",
        "--sites",
        str(num_sites),
        "--cpus",
        str(cpus),
        "--config",
        json.dumps(config),
    ]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}
    done_before = len(read_metrics(paths.metrics))
    with paths.log.open("a") as log_file:
        child = subprocess.Popen(
            args,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
        # SIGTERM (a CI time limit, a service manager) must also stop the group: turn it into
        # an exception so the ``finally`` below runs.
        previous = signal.signal(signal.SIGTERM, _raise_exit)
        try:
            _follow(child, paths, rounds, done_before, console)
        finally:
            _stop_group(child)
            signal.signal(signal.SIGTERM, previous)
    if child.returncode != 0:
        raise SimulationError(
            f"the federation stopped with exit code {child.returncode}; see {paths.log}"
        )


def _follow(
    child: subprocess.Popen[bytes],
    paths: SimulationPaths,
    rounds: int,
    done_before: int,
    console: Console,
) -> None:
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
            finished = child.poll() is not None
            history = read_metrics(paths.metrics)
            for record in history[shown:]:
                progress.console.print(round_line(record), highlight=False)
                progress.update(
                    task,
                    completed=min(int(record["round"]), rounds),
                    description=f"pooled AUROC {_fmt(record, 'auroc')}",
                )
            shown = len(history)
            if finished:
                return
            time.sleep(1.0)


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


def _raise_exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _stop_group(child: subprocess.Popen[bytes]) -> None:
    """Stop the child's whole process group (the federation and its Ray workers)."""
    for sig, wait in ((signal.SIGINT, 10.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
        try:
            child.wait(timeout=wait)
            # the leader is gone; give the rest of the group a moment, then check again
            time.sleep(0.2)
        except subprocess.TimeoutExpired:
            continue


def summarize(paths: SimulationPaths, fed: FederationConfig) -> dict[str, Any]:
    """``summary.json``: the final round's pooled AUROC and each site's AUROC, ε and size."""
    history = read_metrics(paths.metrics)
    if not history:
        raise SimulationError(f"the federation wrote no rounds; see {paths.log}")
    last = history[-1]
    sites: dict[str, dict[str, Any]] = {}
    for record in history:
        for site, m in record.get("train", {}).items():
            entry = sites.setdefault(site, {})
            entry["num_train_examples"] = m.get("num-examples")
            entry["epsilon"] = m.get("epsilon")
            entry["epsilon_budget"] = m.get("epsilon-budget")
        for site, m in record.get("evaluate", {}).items():
            sites.setdefault(site, {})["auroc"] = m.get("auroc")
            sites[site]["num_eval_examples"] = m.get("num-examples")
    summary = {
        "pooled_auroc": last.get("pooled", {}).get("auroc"),
        "rounds": int(last["round"]),
        "sites": dict(sorted(sites.items())),
        "dp": fed.dp,
        "strategy": fed.strategy,
        "model": fed.model,
        "image_size": fed.image_size,
        "final_model": str(paths.federation / "final_model.safetensors"),
        "metrics": str(paths.metrics),
    }
    (paths.out / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=True) + "\n")
    return summary
