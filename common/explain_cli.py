"""``fedct explain``: predictions and Grad-CAM overlays for a DICOM file or series folder."""

from __future__ import annotations

import argparse
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        type=Path,
        required=True,
        help="final_model.safetensors or a round-NNNN.safetensors checkpoint from a FedCT run",
    )
    parser.add_argument("input", type=Path, help="a DICOM file or a folder of DICOM files")
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON and PNGs")
    parser.add_argument("--method", choices=["gradcam", "gradcam++"], default="gradcam")
    parser.add_argument(
        "--layer",
        help="ResNet stage for the CAM: auto, layer1 .. layer4 (default: the model's cam-layer "
        "setting, normally auto: the deepest stage at least 8 cells across at its image size)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from fedct.common.explain import explain, score_text

    report = explain(args.model, args.input, args.out, method=args.method, layer=args.layer)
    positive = report["positive_class"]
    for s in report["slices"]:
        where = f"{s['file']} frame {s['frame']}"
        caveat = " (saturated: not a certainty)" if s["saturated"] else ""
        print(f"{where}: p({positive}) {score_text(s['score'])}{caveat} -> {s['prediction']}")
    for s in report["skipped"]:
        print(f"skipped {s['file']}: {s['reason']}")
    for warning in report["warnings"]:
        print(f"WARNING: {warning}")
    print(f"{len(report['slices'])} slices explained; overlays and predictions.json in {args.out}")
    return 0
