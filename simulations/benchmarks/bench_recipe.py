"""FedCT against the peer baseline: the plain Flower + Opacus recipe a user would write instead.

For each seed, on the same hospitals (``--data``, or one world written once with ``--world``):
1. FedCT's defaults exactly as a user runs them: ``fedct simulate --data DIR --rounds R
   --epsilon E --seed S`` (plus any ``--set KEY=VALUE``), timed as a subprocess; pooled AUROC
   and each site's ε from its ``summary.json``, optimizer steps from its ``metrics.jsonl``;
2. the peer recipe (simulations/peer_recipe.py), same seed and rounds, on FedCT's patient
   split: its true ε per site composes every round, whatever its fresh engines reported;
3. with ``--peer-centralized``, the peer recipe trained on the pooled slices without privacy.

Prints one row per method and seed (pooled AUROC, true ε per site min-max, wall time, steps per
site min-max); ``--json`` writes the rows with each method's details.

    python -m fedct.simulations.benchmarks.bench_recipe --data DIR [--rounds 5] [--epsilon 8]
        [--seeds 0 1 2] [--no-dp] [--set KEY=VALUE ...] [--peer-centralized] [--json FILE]
    python -m fedct.simulations.benchmarks.bench_recipe --world meadow --seed 0 ...
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedct.common.config import FederationConfig, parse_overrides
from fedct.common.errors import FedCTError
from fedct.server.checkpoints import read_metrics
from fedct.simulations.peer_recipe import PeerRecipe, load_peer_data, run_peer, run_peer_centralized

log = logging.getLogger(__name__)


class BenchmarkError(FedCTError):
    """A benchmarked run failed; the message says where its output is."""


@dataclass(frozen=True)
class Row:
    method: str  # "fedct" | "peer" | "peer-centralized"
    seed: int
    pooled_auroc: float | None
    wall_seconds: float  # the whole run, data reading included
    epsilon: dict[str, float | None]  # true cumulative ε per site; None without DP
    steps: dict[str, int]  # optimizer steps per site over all rounds
    detail: dict[str, Any]  # the method's own summary


def run_fedct(
    data: Path, out: Path, *, seed: int, rounds: int, epsilon: float, dp: bool, settings: list[str]
) -> Row:
    """``fedct simulate`` as a user types it, with the venv's ``fedct`` executable."""
    command = [str(Path(sys.executable).parent / "fedct"), "simulate", "--data", str(data)]
    command += ["--rounds", str(rounds), "--seed", str(seed), "--out", str(out)]
    command += ["--epsilon", str(epsilon)] if dp else ["--no-dp"]
    for item in settings:
        command += ["--set", item]
    if out.exists() and any(out.iterdir()):
        # fedct simulate would resume the run found there instead of training anew
        raise BenchmarkError(f"{out} is not empty; give --out a fresh folder")
    out.mkdir(parents=True)
    output = out / "bench-fedct-output.txt"
    log.info("running %s", " ".join(command))
    start = time.perf_counter()
    with output.open("w") as sink:
        code = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - start
    if code.returncode != 0:
        tail = "\n".join(output.read_text().splitlines()[-20:])
        raise BenchmarkError(
            f"fedct simulate failed (exit {code.returncode}); its output is in {output}:\n{tail}"
        )
    summary = json.loads((out / "summary.json").read_text())
    steps: dict[str, int] = {}
    for record in read_metrics(Path(summary["metrics"])):
        for site, metrics in record.get("train", {}).items():
            steps[site] = steps.get(site, 0) + int(metrics.get("steps", 0))
    sites = summary["sites"]
    return Row(
        method="fedct",
        seed=seed,
        pooled_auroc=summary["pooled_auroc"],
        wall_seconds=wall,
        epsilon={name: site.get("epsilon") if dp else None for name, site in sites.items()},
        steps=dict(sorted(steps.items())),
        detail=summary,
    )


def run_peer_row(
    data: Path,
    *,
    seed: int,
    rounds: int,
    dp: bool,
    val_fraction: float,
    recipe: PeerRecipe,
    centralized: bool = False,
) -> Row:
    """The peer recipe (or its centralized, non-private form), timed from reading the data."""
    start = time.perf_counter()
    sites = load_peer_data(data, seed=seed, val_fraction=val_fraction)
    if centralized:
        result = run_peer_centralized(sites, epochs=rounds, seed=seed, recipe=recipe)
    else:
        result = run_peer(sites, rounds=rounds, dp=dp, seed=seed, recipe=recipe)
    return Row(
        method=result.method,
        seed=seed,
        pooled_auroc=result.pooled_auroc,
        wall_seconds=time.perf_counter() - start,
        epsilon={name: s.true_epsilon for name, s in result.sites.items()},
        steps={name: s.steps for name, s in result.sites.items()},
        detail=asdict(result),
    )


def world_data(name: str, out: Path, *, seed: int, scale: float) -> Path:
    """Write world ``name`` (simulations/worlds) under ``out``; returns the hospitals' folder."""
    from fedct.simulations.worlds import write_world

    folders = write_world(name, out, seed=seed, scale=scale)
    if not folders or any(f.parent.resolve() != out.resolve() for f in folders):
        raise BenchmarkError(f"world {name!r} did not write its hospitals directly under {out}")
    return out


def _span(values: Sequence[float | int | None], fmt: str) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "-"
    low, high = format(min(known), fmt), format(max(known), fmt)
    return low if low == high else f"{low}-{high}"


def table(rows: Sequence[Row]) -> str:
    """The rows as a fixed-width text table."""
    lines = [
        f"{'method':<17} {'seed':>4} {'pooled AUROC':>12} {'true ε per site':>15} "
        f"{'wall s':>7} {'steps per site':>14}"
    ]
    for r in rows:
        auroc = "-" if r.pooled_auroc is None else f"{r.pooled_auroc:.3f}"
        lines.append(
            f"{r.method:<17} {r.seed:>4} {auroc:>12} {_span(list(r.epsilon.values()), '.2f'):>15} "
            f"{r.wall_seconds:>7.0f} {_span(list(r.steps.values()), 'd'):>14}"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="one sub-folder per hospital")
    source.add_argument("--world", help="a world from simulations/worlds, written once")
    parser.add_argument("--seed", type=int, default=0, help="the world's seed (default 0)")
    parser.add_argument("--scale", type=float, default=1.0, help="the world's patient scale")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="run seeds")
    parser.add_argument("--rounds", type=int, default=5, help="federated rounds (default 5)")
    parser.add_argument("--epsilon", type=float, default=8.0, help="FedCT's budget per site")
    parser.add_argument("--no-dp", action="store_true", help="both methods without DP")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a FedCT setting passed to fedct simulate (repeatable)",
    )
    parser.add_argument("--peer-noise", type=float, default=1.0, help="peer's noise multiplier")
    parser.add_argument("--skip-fedct", action="store_true")
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument(
        "--peer-centralized", action="store_true", help="also the peer recipe, pooled, no DP"
    )
    parser.add_argument("--out", type=Path, help="keep FedCT's outputs here (default: temporary)")
    parser.add_argument("--json", type=Path, help="write the rows to this file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    overrides = parse_overrides(args.set)  # validates the settings before anything runs
    # the peer must hold out FedCT's patients
    val_fraction = float(overrides.get("val-fraction", FederationConfig.val_fraction))
    recipe = PeerRecipe(noise_multiplier=args.peer_noise)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="fedct-bench-recipe-") as tmp:
        work = args.out or Path(tmp)
        data = args.data or world_data(args.world, work / "world", seed=args.seed, scale=args.scale)
        for seed in args.seeds:
            if not args.skip_fedct:
                rows.append(
                    run_fedct(
                        data,
                        work / f"fedct-seed{seed}",
                        seed=seed,
                        rounds=args.rounds,
                        epsilon=args.epsilon,
                        dp=not args.no_dp,
                        settings=args.set,
                    )
                )
            kinds = ([False] if not args.skip_peer else []) + (
                [True] if args.peer_centralized else []
            )
            for centralized in kinds:
                rows.append(
                    run_peer_row(
                        data,
                        seed=seed,
                        rounds=args.rounds,
                        dp=not args.no_dp,
                        val_fraction=val_fraction,
                        recipe=recipe,
                        centralized=centralized,
                    )
                )
            log.info("seed %d done:\n%s", seed, table(rows))
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
