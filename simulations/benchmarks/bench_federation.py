"""Federation benchmark: a real loopback deployment, and aggregation on its own.

1. ``deployment``: `fedct server` + one `fedct client` per synthetic hospital (TLS, SuperNode
   authentication), ResNet-18 at the default settings, once per transfer dtype (float32, then
   float16, same data and seed), with FedCT's warm site executor and with Flower's cold
   ``flwr-clientapp`` per task (``fedct client --cold``), with and without the sites' model
   cache (``--model-cache on off``), side by side. Per round: the
   training phase's wall time (model sent -> every reply in), the slowest site's local step
   (its ClientApp handler: data from the cache, model, DP training, ledger) and local training
   alone, and the difference (the federation's overhead: ClientApp process start,
   serialization, transfer, hashing), the evaluation phase and the whole round. Per run: bytes
   on the wire as the SuperLink counts them, and the final pooled AUROC.
2. ``aggregation``: FedCT's FedAvg (update validation, then the weighted mean summed from the
   validated views, server/aggregate.py) over 10, 100 and 1000 ResNet-18-sized updates:
   seconds, GB/s of updates, and the server's peak memory growth during aggregation; and, side
   by side on the same replies, Flower's own ``aggregate_arrayrecords`` without any validation.
   The replies share one payload so that 1000 of them fit in memory: the aggregation still
   decodes, validates and sums each one as if it were distinct.

    python -m fedct.simulations.benchmarks.bench_federation \\
        [--part deployment|aggregation|all] [--json F]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedct.common.models import ModelConfig, build_model
from fedct.common.weights import Weights, model_weights
from fedct.simulations.loopback import LoopbackFederation
from fedct.simulations.synth import SynthSettings, write_hospitals


def deployment(
    rounds: int,
    scale: float,
    dtypes: list[str],
    executors: list[str],
    sites_n: int = 3,
    keep_logs: Path | None = None,
    model_cache: list[str] | None = None,
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    variants = [(e, d, c) for e in executors for d in dtypes for c in model_cache or ["on"]]
    with tempfile.TemporaryDirectory(prefix="fedct-bench-") as tmp:
        sites = write_hospitals(
            Path(tmp) / "data", SynthSettings(sites=sites_n, scale=scale), progress=False
        )
        for executor, dtype, cache in variants:
            label = f"{executor}-{dtype}-cache-{cache}"
            root = Path(tmp) / label
            root.mkdir()
            fed = LoopbackFederation(root, {s.name: s for s in sites}, cold=executor == "cold")
            try:
                settings = ["--set", f"transfer-dtype={dtype}"]
                settings += ["--set", f"model-cache={'true' if cache == 'on' else 'false'}"]
                if sites_n < 2:  # FedCT waits for 2 hospitals by default
                    settings += ["--set", f"min-sites={sites_n}"]
                server = fed.server("--rounds", str(rounds), *settings)
                for name in fed.data:
                    fed.client(name)
                code = server.wait(timeout=3600)
                if code != 0:
                    raise RuntimeError(f"the {label} run failed:\n{fed.logs()}")
                results[label] = _summarize(fed.metrics(), fed.runs()[-1])
            finally:
                fed.stop()
                if keep_logs is not None:
                    for log in root.rglob("*.log"):
                        target = keep_logs / label / log.relative_to(root)
                        target.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copyfile(log, target)
    return results


def _summarize(history: list[dict[str, Any]], run: dict[str, Any]) -> dict[str, Any]:
    per_round = []
    for record in history:
        train = record["train"].values()
        phase = float(record["train-phase-seconds"])
        handler = max(float(m["handler-seconds"]) for m in train)
        local = max(float(m["train-seconds"]) for m in train)
        per_round.append(
            {
                "round": record["round"],
                "round_s": record["seconds"],
                "evaluate_phase_s": record.get("evaluate-phase-seconds"),
                "sites_training_from_kept_model": record.get("model-kept-by"),
                "train_phase_s": round(phase, 2),
                "slowest_site_step_s": round(handler, 2),
                "slowest_site_training_s": round(local, 2),
                "overhead_s": round(phase - handler, 2),
                "overhead_per_site_s": round((phase - handler) / len(record["train"]), 2),
                "overhead_share": round((phase - handler) / phase, 3),
            }
        )
    traffic = run.get("network-traffic", {})
    return {
        "rounds": per_round,
        "median_overhead_share": statistics.median(r["overhead_share"] for r in per_round),
        "bytes_total": traffic.get("total-bytes"),
        "bytes_to_sites": traffic.get("outbound-bytes"),
        "bytes_from_sites": traffic.get("inbound-bytes"),
        "final_pooled_auroc": history[-1].get("pooled", {}).get("auroc"),
    }


def aggregation(counts: list[int]) -> dict[str, Any]:
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from fedct.common.flower_records import model_records
    from fedct.server.round_report import weighted_mean
    from fedct.simulations.replies import train_reply

    weights = model_weights(build_model(ModelConfig("resnet18", num_classes=2)))
    update = {k: v + np.float32(1e-3) for k, v in weights.items()}
    payload = model_records(update)
    nbytes = sum(v.nbytes for v in update.values())
    results = {}
    for n in counts:
        messages = [
            train_reply(f"site-{i}", i + 1, payload, {"num-examples": 10 + i % 7}) for i in range(n)
        ]
        seconds, peak, report = _validated(messages, weights, weighted_mean)
        if len(report.accepted) != n:
            raise RuntimeError(f"only {len(report.accepted)} of {n} updates accepted")

        # the alternative FedCT would use: the same validation, then Flower's FedAvg mean
        def flower_mean(
            _weights: Weights, _accepted: list[Any], replies: list[Any] = messages
        ) -> object:
            return aggregate_arrayrecords([m.content for m in replies], "num-examples")

        flower_seconds, flower_peak, _ = _validated(messages, weights, flower_mean)
        start = time.perf_counter()
        aggregate_arrayrecords([m.content for m in messages], "num-examples")
        alone = time.perf_counter() - start
        results[str(n)] = {
            "seconds": round(seconds, 2),
            "gb_per_s": round(n * nbytes / seconds / 1e9, 2),
            "peak_memory_growth_models": round(peak / nbytes, 2),
            "validated_flower_mean_seconds": round(flower_seconds, 2),
            "validated_flower_mean_peak_models": round(flower_peak / nbytes, 2),
            "speedup_vs_validated_flower_mean": round(flower_seconds / seconds, 2),
            "flower_fedavg_alone_seconds": round(alone, 2),
            "flower_fedavg_alone_gb_per_s": round(n * nbytes / alone / 1e9, 2),
        }
    return {"model_bytes": nbytes, "updates": results}


def _validated(
    messages: list[Any], weights: Weights, mean: Callable[[Weights, list[Any]], object]
) -> tuple[float, int, Any]:
    """Seconds and peak memory of what the ServerApp does with a round's replies (read-only
    views, validation) followed by ``mean``; and the round report."""
    from fedct.server.round_report import RoundReport
    from fedct.server.strategy import site_reply

    tracemalloc.start()
    start = time.perf_counter()
    report = RoundReport(1, set())
    report.sort_train(
        [site_reply(m, {}, with_update=True) for m in messages],
        global_weights=weights,
        max_update_norm=1e4,
    )
    mean(weights, report.accepted)
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return seconds, peak, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["deployment", "aggregation", "all"], default="all")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="synthetic patients scale")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float16"])
    parser.add_argument(
        "--executors",
        nargs="+",
        choices=["warm", "cold"],
        default=["warm", "cold"],
        help="warm: FedCT's paced SuperNode and warm site executor (the default); cold: Flower's "
        "own flower-supernode and flwr-clientapp per task",
    )
    parser.add_argument(
        "--model-cache",
        nargs="+",
        choices=["on", "off"],
        default=["on"],
        help="on: sites train from the model they kept from evaluating it (the default); off: "
        "the server sends it again to train (the release before)",
    )
    parser.add_argument("--sites", type=int, default=3, help="synthetic hospitals")
    parser.add_argument("--keep-logs", type=Path, help="copy the deployment's logs here")
    parser.add_argument("--counts", nargs="+", type=int, default=[10, 100, 1000])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    out: dict[str, Any] = {}
    if args.part in ("aggregation", "all"):
        out["aggregation"] = aggregation(args.counts)
        print(f"aggregation of ResNet-18 updates ({out['aggregation']['model_bytes']} bytes):")
        for n, r in out["aggregation"]["updates"].items():
            print(
                f"  {n:>5} updates: {r['seconds']:>7} s  {r['gb_per_s']:>5} GB/s  "
                f"peak memory growth {r['peak_memory_growth_models']} models; the same "
                f"validation + Flower's mean {r['validated_flower_mean_seconds']} s, "
                f"{r['validated_flower_mean_peak_models']} models "
                f"(FedCT x{r['speedup_vs_validated_flower_mean']}); Flower's mean alone "
                f"{r['flower_fedavg_alone_gb_per_s']} GB/s"
            )
    if args.part in ("deployment", "all"):
        out["deployment"] = deployment(
            args.rounds,
            args.scale,
            args.dtypes,
            args.executors,
            args.sites,
            args.keep_logs,
            args.model_cache,
        )
        for dtype, r in out["deployment"].items():
            print(
                f"{dtype}: {r['bytes_total'] / 1e6:.1f} MB on the wire "
                f"({r['bytes_to_sites'] / 1e6:.1f} to sites, {r['bytes_from_sites'] / 1e6:.1f} "
                f"from sites), final pooled AUROC {r['final_pooled_auroc']}"
            )
            for row in r["rounds"]:
                print("   ", row)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
