"""``fedct simulate``: a multi-hospital federation on one machine, from data to report.

The federation runs in a child process in its own session (Flower's simulation engine starts
Ray workers); whatever happens here, success, error or Ctrl-C, that whole process group is
stopped before this returns, so nothing is left running. Meanwhile the parent follows
``metrics.jsonl`` and shows the rounds as they complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from fedct.common import json_text
from fedct.common.config import FederationConfig, app_defaults
from fedct.common.errors import FedCTError
from fedct.common.flower_tools import flower_environment
from fedct.common.processes import sigterm_raises, start, stop_group
from fedct.server.checkpoints import read_metrics, read_start
from fedct.server.evaluation import tied_levels
from fedct.server.health import Collapse
from fedct.server.progress import follow_rounds
from fedct.simulations.synth import SynthSettings, write_hospitals

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

    @property
    def public(self) -> Path:
        return self.out / f"public-collection-x{PUBLIC_SCALE:g}"


# The public data set stands in for a public annotated CT collection (LIDC-IDRI in practice):
# other patients, drawn with another seed, never any participating hospital's, from other
# scanners and with another lesion mix (simulations/synth.py, PUBLIC_PROFILES). Twice the
# hospitals' number of patients: with as many as one federation holds, the pretrained network
# memorised them and its quality was a matter of the draw; twice as many made it stable across
# seeds for a little more pretraining time (measured in docs/known-limits.md, The demo).
PUBLIC_SEED_OFFSET = 1000
PUBLIC_SCALE = 2.0
# DP fine-tuning of a pretrained model: only the classifier head (1,026 parameters for
# ResNet-18) takes noisy steps, and small ones: every per-sample gradient is clipped, so each
# step moves the logits by about learning-rate x clipping bound x feature norm (tens for a
# folded ResNet), whatever the loss. Larger steps drive all scores to the majority class
# (docs/models.md, Why head-only fine-tuning takes small steps).
# Augmented like the public pretraining (flips only): the full set's noise, window jitter and
# affine moves give the flips-pretrained network inputs it scores with huge confident logits
# (training loss far above the held-out loss; measured in docs/known-limits.md, The demo), so
# the head was fitted to slices unlike any it is evaluated on.
PRETRAINED_FINE_TUNING = {
    "freeze": "head",
    "optimizer": "sgd",
    "learning-rate": 5e-4,
    "lr-schedule": "constant",
    "augmentation": "flips",
}


def prepare_pretrained(
    choice: str, paths: SimulationPaths, overrides: dict[str, Any], *, seed: int, console: Console
) -> dict[str, Any]:
    """Settings for the federation's starting weights: ``none`` (from scratch), a weights file,
    or ``public``: pretrain on a synthetic public data set written to OUT/public-collection-x2 (made
    once per setting and reused). With pretrained weights, the head-only fine-tuning defaults
    apply unless ``overrides`` sets them."""
    if choice == "none":
        return overrides
    if choice == "public":
        fed = FederationConfig.from_mapping({**app_defaults(), **overrides, "pretrained": ""})
        weights = paths.out / f"public-pretrained-{_pretraining_key(fed)}.safetensors"
        if not weights.is_file():
            from fedct.server.pretrain import pretrain

            if not paths.public.is_dir() or not any(paths.public.iterdir()):
                console.print("writing the public (pretraining) data set ...")
                write_hospitals(
                    paths.public,
                    SynthSettings(
                        sites=3,
                        seed=seed + PUBLIC_SEED_OFFSET,
                        scale=PUBLIC_SCALE,
                        population="public",
                    ),
                )
            console.print("pretraining on the public data set (no hospital data) ...")
            result = pretrain(
                sorted(p for p in paths.public.iterdir() if p.is_dir()),
                fed,
                weights,
                cache_root=paths.out / "public-cache",
                seed=seed,
            )
            console.print(
                f"pretrained: held-out AUROC {result.held_out_auroc:.3f} on the public set, "
                f"{result.lesions} ({result.seconds:.0f} s)"
            )
        path = weights
    else:
        path = Path(choice)
        if not path.is_file():
            raise FedCTError(
                f"--pretrain {choice}: no such weights file (give a torchvision state dict, "
                "'public' to pretrain on synthetic public data, or 'none')"
            )
    return {**PRETRAINED_FINE_TUNING, **overrides, "pretrained": str(path.resolve())}


def _pretraining_key(fed: FederationConfig) -> str:
    from fedct.server.pretrain import LESION_WEIGHT

    about = (
        f"{fed.model}|{fed.image_size}|{fed.windows}|{fed.classes}|{fed.target_spacing_mm}"
        f"|crop {fed.crop}"
        f"|public collection x{PUBLIC_SCALE:g}|lesion {LESION_WEIGHT:g}@{fed.cam_layer}"
    )
    return f"{fed.model}-{fed.image_size}px-{hashlib.sha256(about.encode()).hexdigest()[:8]}"


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
        "fedct.simulations.flower_sim_main",
        "--sites",
        str(num_sites),
        "--cpus",
        str(cpus),
        "--config",
        json.dumps(config),
    ]
    env = flower_environment(RAY_DEDUP_LOGS="0")
    done_before = len(read_metrics(paths.metrics))
    with paths.log.open("a") as log_file, sigterm_raises():
        child = start(args, log=log_file, env=env, cwd=paths.out)
        try:
            follow_rounds(
                paths.metrics, rounds, console, lambda: child.poll() is not None, done_before
            )
        finally:
            stop_group(child)
    if child.returncode != 0:
        raise SimulationError(
            f"the federation stopped with exit code {child.returncode}; see {paths.log}"
        )


def summarize(paths: SimulationPaths, fed: FederationConfig) -> dict[str, Any]:
    """``summary.json``: the final round's pooled AUROC of slices, series and patients and the
    starting model's (``start_*``), whether its model collapsed (``collapse``: null or what
    shows it, server/health.py), and each site's AUROC (final and at the start), ε and size
    (strict JSON: ``null`` where there is no value)."""
    history = read_metrics(paths.metrics)
    if not history:
        raise SimulationError(f"the federation wrote no rounds; see {paths.log}")
    last = history[-1]
    pooled = last.get("pooled", {})
    collapse = Collapse.from_record(last.get("collapse"))
    sites: dict[str, dict[str, Any]] = {}
    for record in history:
        for site, m in record.get("train", {}).items():
            entry = sites.setdefault(site, {})
            entry["num_train_examples"] = m.get("num-examples")
            entry["epsilon"] = m.get("epsilon")
            entry["epsilon_budget"] = m.get("epsilon-budget")
        for site, m in record.get("evaluate", {}).items():
            entry = sites.setdefault(site, {})
            entry["auroc"] = m.get("auroc")
            entry["auroc_series"] = m.get("series-auroc")
            entry["auroc_patient"] = m.get("patient-auroc")
            entry["num_eval_examples"] = m.get("num-examples")
            entry["num_eval_patients"] = m.get("patient-num")
    start = read_start(paths.federation) or {}
    begin = start.get("pooled", {})
    for site, m in start.get("evaluate", {}).items():
        sites.setdefault(site, {})["start_auroc"] = m.get("auroc")
    summary = {
        "pooled_auroc": pooled.get("auroc"),
        # the starting model (pretrained or initial weights), evaluated at the sites before
        # round 1 exactly as every round's model is
        "start_pooled_auroc": begin.get("auroc"),
        "start_pooled_auroc_patient": begin.get("patient-auroc"),
        "pooled_auroc_series": pooled.get("series-auroc"),
        "pooled_auroc_patient": pooled.get("patient-auroc"),
        "scores_tied": tied_levels(pooled),
        "collapse": collapse.message if collapse else None,
        "rounds": int(last["round"]),
        "sites": dict(sorted(sites.items())),
        "dp": fed.dp,
        "strategy": fed.strategy,
        "model": fed.model,
        "image_size": fed.image_size,
        "final_model": str(paths.federation / "final_model.safetensors"),
        "metrics": str(paths.metrics),
    }
    write_summary(paths, summary)
    return summary


@dataclass(frozen=True)
class Gain:
    """What one hospital (or, ``site="pooled"``, all of them) gained by joining: the starting
    model's AUROC on its held-out patients, the federated model's, and the ε it spent."""

    site: str
    start: float | None
    final: float | None
    epsilon: float | None

    @property
    def gain(self) -> float | None:
        if self.start is None or self.final is None:
            return None
        if math.isnan(self.start) or math.isnan(self.final):
            return None
        return self.final - self.start

    @property
    def gain_text(self) -> str:
        return "n/a" if self.gain is None else f"{self.gain:+.3f}"


def gains(summary: dict[str, Any]) -> list[Gain]:
    """Each site's and the pooled gain over the starting model (empty if it was not
    evaluated)."""
    if summary.get("start_pooled_auroc") is None:
        return []
    rows = [
        Gain(name, s.get("start_auroc"), s.get("auroc"), s.get("epsilon"))
        for name, s in summary["sites"].items()
    ]
    spent = [g.epsilon for g in rows if g.epsilon is not None]
    pooled = Gain(
        "pooled", summary["start_pooled_auroc"], summary["pooled_auroc"], max(spent, default=None)
    )
    return [*rows, pooled]


def write_summary(paths: SimulationPaths, summary: dict[str, Any]) -> None:
    (paths.out / "summary.json").write_text(json_text.dumps(summary, indent=2) + "\n")


def add_comparison(
    paths: SimulationPaths, fed: FederationConfig, summary: dict[str, Any], console: Console
) -> dict[str, Any]:
    """Train the centralized and local-only baselines; add the table to ``summary.json``."""
    from dataclasses import asdict

    from fedct.simulations.compare import compare, should_federate, versus_text

    console.print("training the comparison models (centralized, local-only) ...")
    rows = compare(
        fed,
        Path(fed.data_root),
        paths.federation / "sites",
        federated=paths.federation / "final_model.safetensors",
    )
    summary = {**summary, "compare": [asdict(r) for r in rows]}
    write_summary(paths, summary)
    console.print(f"{'model':<26} {'pooled AUROC':>12}  vs federated [95% interval]")
    for r in rows:
        versus = versus_text(r.vs_federated, r.vs_federated_ci)
        console.print(f"{r.model:<26} {r.pooled:>12.3f}  {versus}")
    console.print("should we federate? (pooled AUROC, federated minus the alternative):")
    for line in should_federate(rows):
        console.print(f"  {line}", highlight=False)
    return summary
