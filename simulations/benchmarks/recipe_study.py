"""Recipe study: FedAvg rounds of FedCT's own local training, in one process, for comparing
training settings quickly (no Flower processes; same data, splits, model factory, DP-SGD,
noise calibration, wire precision - the model to train in float32 as the sites keep it from
evaluation (``model-cache``, else in ``transfer-dtype``), the updates in ``update-dtype`` - and
pooled evaluation as a federation).

Each ``--variant`` is a list of ``KEY=VALUE`` run-config settings applied over the defaults;
every variant runs on the same sites and seed, one after the other, and the script prints one
JSON line per round and a final table (pooled AUROC on every site's held-out patients, wall
time, optimizer steps per site, ε per site).

    python -m fedct.simulations.benchmarks.recipe_study --data DIR --rounds 5 \\
        --variant "" --variant "optimizer=sgd learning-rate=0.05"
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from fedct.client.privacy import PrivacyBudget, calibrate_noise, default_delta, epsilon_of
from fedct.client.rounds import train_config
from fedct.client.training import sample_rate, steps_per_epoch, train_local
from fedct.common.config import FederationConfig, app_defaults, parse_overrides
from fedct.common.dataset import site_dataset
from fedct.common.evaluation import evaluate
from fedct.common.models import build_model
from fedct.common.seeding import derive_seed
from fedct.common.site import SiteData, load_site
from fedct.common.weights import load_weights, model_weights
from fedct.server.aggregate import WeightedMean


def load_sites(root: Path, fed: FederationConfig, cache: Path) -> dict[str, SiteData]:
    return {
        folder.name: load_site(
            folder,
            grid=fed.preprocess.grid,
            cache_dir=cache / folder.name,
            val_fraction=fed.val_fraction,
            progress=False,
        )
        for folder in sorted(p for p in root.iterdir() if p.is_dir())
    }


def _pooled_auroc(
    model: torch.nn.Module, fed: FederationConfig, sites: dict[str, SiteData]
) -> float:
    scores, truth = [], []
    for data in sites.values():
        held = site_dataset(
            data,
            data.eval_split(),
            classes=fed.class_names,
            windows=fed.preprocess.windows,
            train=False,
        )
        result = evaluate(model, held)
        scores.append(result.probabilities[:, -1])
        truth.append(result.targets == len(fed.class_names) - 1)
    y, s = np.concatenate(truth), np.concatenate(scores)
    if not np.isfinite(s).all():
        return math.nan
    return float(roc_auc_score(y, s))


def run_variant(fed: FederationConfig, root: Path, cache: Path, *, label: str) -> dict[str, Any]:
    sites = load_sites(root, fed, cache / fed.preprocess.grid.key())
    torch.manual_seed(derive_seed(fed.seed, "init") % 2**63)
    model = build_model(replace(fed.model_config, pretrained=fed.model_config.pretrained))
    start = time.perf_counter()
    spent: dict[str, list[tuple[float, float, int]]] = {name: [] for name in sites}
    steps_total = {name: 0 for name in sites}
    rows = []
    start_auroc = _pooled_auroc(model, fed, sites)  # the starting model, before round 1
    print(json.dumps({"variant": label, "round": 0, "pooled_auroc": round(start_auroc, 4)}))
    for rnd in range(1, fed.num_server_rounds + 1):
        updates, sizes, losses = [], [], []
        global_state = model_weights(model)
        # what the sites train from: the float32 model they kept from evaluating it, or what
        # crosses the wire in transfer-dtype; each update comes back in update-dtype
        dtype = "float32" if fed.model_cache else fed.transfer_dtype
        sent = {k: v.astype(dtype) for k, v in global_state.items()}
        cfg = train_config(fed, rnd)
        for name, data in sites.items():
            dataset = site_dataset(
                data,
                "train",
                classes=fed.class_names,
                windows=fed.preprocess.windows,
                train=True,
                augment=fed.augment,
                seed=derive_seed(fed.seed, rnd),
            )
            local = build_model(replace(fed.model_config, pretrained=None))
            load_weights(local, sent)
            n = len(dataset)
            sigma = None
            if fed.dp:
                q = sample_rate(n, cfg.batch_size)
                steps = cfg.epochs * steps_per_epoch(n, cfg.batch_size)
                budget = PrivacyBudget(
                    epsilon=fed.epsilon,
                    delta=fed.delta or default_delta(data.num_patients("train")),
                    accountant=fed.accountant,
                )
                sigma = calibrate_noise(budget, sample_rate=q, steps=steps * fed.privacy_horizon)
            result = train_local(
                local,
                dataset,
                cfg,
                noise_multiplier=sigma,
                seed=derive_seed(fed.seed, name, rnd),
            )
            if sigma is not None:
                spent[name].append((sigma, result.sample_rate, result.steps))
            steps_total[name] += result.steps
            trained = model_weights(local)
            updates.append(
                {k: np.subtract(v, sent[k]).astype(fed.update_dtype) for k, v in trained.items()}
            )
            sizes.append(n)
            losses.append(result.mean_loss)
        mean = WeightedMean(global_state, sum(sizes))
        for update, size in zip(updates, sizes, strict=True):
            mean.add(update, size)
        mean.add(global_state, sum(sizes))  # the server adds the mean update to its model
        load_weights(model, mean.result())
        auroc = _pooled_auroc(model, fed, sites)
        row = {
            "variant": label,
            "round": rnd,
            "pooled_auroc": round(auroc, 4),
            "train_loss": [round(x, 3) for x in losses],
            "seconds": round(time.perf_counter() - start, 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    eps = {}
    for name, data in sites.items():
        if spent[name]:
            delta = fed.delta or default_delta(data.num_patients("train"))
            eps[name] = round(epsilon_of(spent[name], delta=delta, accountant=fed.accountant), 3)
    return {
        "variant": label,
        "pooled_auroc": rows[-1]["pooled_auroc"],
        "start_pooled_auroc": round(start_auroc, 4),
        "curve": [r["pooled_auroc"] for r in rows],
        "seconds": rows[-1]["seconds"],
        "steps_per_site": steps_total,
        "epsilon": eps,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--no-dp", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", action="append", default=None)
    parser.add_argument("--cache", type=Path, default=Path(".fedct-cache/recipe-study"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    results = []
    for spec in args.variant or [""]:
        overrides = parse_overrides(spec.split())
        config = {
            **app_defaults(),
            "num-server-rounds": args.rounds,
            "epsilon": args.epsilon,
            "dp": not args.no_dp,
            "seed": args.seed,
            **overrides,
        }
        fed = FederationConfig.from_mapping(config)
        results.append(run_variant(fed, args.data, args.cache, label=spec or "defaults"))
    print(f"{'variant':<60} {'start':>6} {'AUROC':>6} {'s':>6}  curve")
    for r in results:
        print(
            f"{r['variant']:<60} {r['start_pooled_auroc']:>6.3f} {r['pooled_auroc']:>6.3f} "
            f"{r['seconds']:>6.0f}  {r['curve']}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
