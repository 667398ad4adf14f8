"""Probe study: how far could any classifier head on the pretrained network's features go?

A logistic regression fitted centrally, without privacy, on every hospital's training slices
pooled (scikit-learn, features standardised, L2 strength ``C``), scored on every hospital's
held-out patients pooled. A DP federation that trains only the head cannot do better than the
best of these, so the table bounds what head-only fine-tuning can add; pooled max-activations of
earlier stages (``layerN-max``) ask whether features the head does not see would help. Reading
the best row is optimistic on purpose: ``C`` is not chosen on separate data. Two classes only.

    python -m fedct.simulations.benchmarks.probe_study --data DIR --pretrained FILE [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from fedct.common.config import FederationConfig, app_defaults
from fedct.common.dataset import site_dataset
from fedct.common.models import RESNET_STAGES, build_model, resnet_stage
from fedct.simulations.benchmarks.recipe_study import load_sites

FEATURE_SETS = (
    ("head",),
    ("head", "layer1-max"),
    ("head", "layer2-max"),
    ("head", *(f"{s}-max" for s in RESNET_STAGES)),
)
STRENGTHS = (0.01, 0.1, 1.0)
Part = tuple[dict[str, np.ndarray], np.ndarray]  # one site's features by name, and its labels


def features(model: torch.nn.Module, dataset: Any) -> Part:
    """Per slice: the head's input (layer4 averaged), each stage's channel maxima, the logit."""
    kept: dict[str, torch.Tensor] = {}
    hooks = [
        resnet_stage(model, name).register_forward_hook(
            lambda _m, _i, out, name=name: kept.__setitem__(name, out.detach())
        )
        for name in RESNET_STAGES
    ]
    parts: dict[str, list[np.ndarray]] = {}
    labels = []
    try:
        with torch.no_grad():
            for x, y in torch.utils.data.DataLoader(dataset, batch_size=64):
                logits = model(x)
                row = {"logit": (logits[:, -1] - logits[:, 0])[:, None]}
                row["head"] = kept["layer4"].mean(dim=(2, 3))
                row |= {f"{n}-max": kept[n].amax(dim=(2, 3)) for n in RESNET_STAGES}
                for key, value in row.items():
                    parts.setdefault(key, []).append(value.numpy())
                labels.append(y.numpy())
    finally:
        for hook in hooks:
            hook.remove()
    return {k: np.concatenate(v) for k, v in parts.items()}, np.concatenate(labels)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="one folder per hospital")
    parser.add_argument("--pretrained", type=Path, required=True)
    parser.add_argument("--cache", type=Path, default=Path(".fedct-cache/probe-study"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    fed = FederationConfig.from_mapping({**app_defaults(), "pretrained": str(args.pretrained)})
    if len(fed.class_names) != 2:
        parser.error(f"the probes score two classes; the settings name {len(fed.class_names)}")
    model = build_model(fed.model_config).eval()
    train: list[Part] = []
    held: list[Part] = []
    for data in load_sites(args.data, fed, args.cache / fed.preprocess.grid.key()).values():
        for split, into in (("train", train), (data.eval_split(), held)):
            dataset = site_dataset(
                data, split, classes=fed.class_names, windows=fed.preprocess.windows, train=False
            )
            into.append(features(model, dataset))

    def stacked(parts: list[Part], keys: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        x = np.concatenate([np.concatenate([p[0][k] for k in keys], axis=1) for p in parts])
        return x, np.concatenate([p[1] for p in parts])

    x_held, y_held = stacked(held, ("logit",))
    start = float(roc_auc_score(y_held, x_held[:, 0]))
    rows: list[dict[str, Any]] = []
    for keys in FEATURE_SETS:
        x, y = stacked(train, keys)
        x_test, _ = stacked(held, keys)
        scaler = StandardScaler().fit(x)
        for strength in STRENGTHS:
            probe = LogisticRegression(C=strength, max_iter=3000).fit(scaler.transform(x), y)
            fitted = probe.decision_function(scaler.transform(x))
            scored = probe.decision_function(scaler.transform(x_test))
            rows.append(
                {
                    "features": "+".join(keys),
                    "dims": x.shape[1],
                    "C": strength,
                    "train_auroc": round(float(roc_auc_score(y, fitted)), 3),
                    "held_out_pooled_auroc": round(float(roc_auc_score(y_held, scored)), 3),
                }
            )
    print(f"pretrained only: held-out pooled AUROC {start:.3f}")
    print(f"{'features':<48} {'dims':>5} {'C':>5} {'train':>6} {'held-out':>8}")
    for r in rows:
        print(
            f"{r['features']:<48} {r['dims']:>5} {r['C']:>5g} {r['train_auroc']:>6.3f} "
            f"{r['held_out_pooled_auroc']:>8.3f}"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"start": round(start, 4), "probes": rows}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
