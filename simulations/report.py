"""``report.html``: one self-contained page (figures embedded) about a simulated federation.

A box at the top names a collapsed final model and what to do (server/health.py). Learning
curves (pooled and per-site AUROC, per-site training loss), ε spent per round per site
against each budget, the final pooled ROC curves of slices, series and patients (from the sites'
score histograms) with a table per level, and a Grad-CAM
gallery of true and false positives with the lesion outline where known. In a simulation all
sites' data are on this machine, so the gallery is drawn here; in a real federation overlays stay
on each site's disk (``fedct explain``).

It is this long because it builds the whole page: each section is a short function here, so the
page's order and its HTML stay in one place.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedct.common.config import FederationConfig
from fedct.common.dataset import site_dataset
from fedct.common.gradcam import POINTING_TOLERANCE, cam_maps, cam_stage_name
from fedct.common.metrics import LEVELS, SLICE, roc_from_histograms
from fedct.common.model_file import load_model
from fedct.common.overlay import draw_slice
from fedct.common.site import load_site
from fedct.server.checkpoints import read_start
from fedct.server.evaluation import TIED_NOTE, tied_levels
from fedct.server.health import Collapse
from fedct.simulations.compare import Row, should_federate, versus_text
from fedct.simulations.simulate import gains

MISSING = {
    "Grad-CAM gallery": "No held-out slice was predicted positive (score >= 0.5) by the final "
    "model, so there is no true or false positive to explain.",
}


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def learning_curves(history: list[dict[str, Any]]) -> str:
    fig = Figure(figsize=(11, 3.8))
    ax_auc, ax_loss = fig.subplots(1, 2)
    rounds = [r["round"] for r in history]
    for level, style in zip(LEVELS, ("k-o", "k--s", "k:^"), strict=True):
        ax_auc.plot(
            rounds,
            [r.get("pooled", {}).get(level.key("auroc"), math.nan) for r in history],
            style,
            lw=2.5 if level is SLICE else 1.5,
            label="pooled" if level is SLICE else f"pooled, {level.plural}",
        )
    sites = sorted({s for r in history for s in r.get("evaluate", {})})
    for site in sites:
        ax_auc.plot(
            rounds,
            [r.get("evaluate", {}).get(site, {}).get("auroc", math.nan) for r in history],
            "--.",
            label=site,
        )
        ax_loss.plot(
            rounds,
            [r.get("train", {}).get(site, {}).get("train-loss", math.nan) for r in history],
            "-.",
            label=site,
        )
    ax_auc.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax_auc.set(
        xlabel="round (0: the starting model)",
        ylabel="AUROC (held-out patients)",
        ylim=(0, 1),
        title="Global model AUROC",
    )
    ax_loss.set(xlabel="round", ylabel="local training loss", title="Training loss per site")
    for ax in (ax_auc, ax_loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return _png(fig)


def privacy_spend(history: list[dict[str, Any]]) -> str:
    fig = Figure(figsize=(6.5, 3.8))
    ax = fig.subplots()
    sites = sorted({s for r in history for s in r.get("train", {})})
    for i, site in enumerate(sites):
        color = f"C{i}"
        points = [
            (r["round"], r["train"][site].get("epsilon", math.nan))
            for r in history
            if site in r.get("train", {})
        ]
        if points:
            ax.plot(*zip(*points, strict=True), "-o", color=color, label=site)
        budgets = [
            r["train"][site].get("epsilon-budget") for r in history if site in r.get("train", {})
        ]
        if budgets and budgets[-1] is not None and not math.isnan(budgets[-1]):
            ax.axhline(budgets[-1], color=color, ls=":", lw=1)
    ax.set(xlabel="round", ylabel="cumulative ε (dotted: budget)", title="Privacy spent per site")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def roc_curve(history: list[dict[str, Any]]) -> str | None:
    """The final model's pooled ROC curves, one per level the sites reported."""
    pooled = history[-1].get("pooled", {}) if history else {}
    levels = [level for level in LEVELS if level.key("hist-neg") in pooled]
    if not levels:
        return None
    fig = Figure(figsize=(4.2, 4.2))
    ax = fig.subplots()
    for level, style in zip(levels, ("k-", "C0--", "C3:"), strict=False):
        hist = np.asarray([pooled[level.key("hist-neg")], pooled[level.key("hist-pos")]])
        fpr, tpr = roc_from_histograms(hist)
        auroc = _num(pooled.get(level.key("auroc")))
        ax.plot(fpr, tpr, style, lw=2, label=f"{level.plural}, AUROC {auroc}")
    ax.plot([0, 1], [0, 1], color="grey", ls=":")
    ax.set(
        xlabel="1 - specificity",
        ylabel="sensitivity",
        title=f"Pooled ROC, final model (round {history[-1]['round']})",
    )
    ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


def levels_table(pooled: dict[str, Any]) -> str:
    """The final model per level: what was pooled, AUROC, sensitivity and specificity, and a
    note where the scores are tied in one bin."""
    body = "".join(
        f"<tr><td>{level.name}</td><td>{_num(pooled.get(level.count_key), 0)}</td>"
        f"<td>{_num(pooled.get(level.key('positives')), 0)}</td>"
        f"<td>{_num(pooled.get(level.key('reporting-sites')), 0)}</td>"
        f"<td><b>{_num(pooled.get(level.key('auroc')))}</b></td>"
        f"<td>{_num(pooled.get(level.key('sensitivity')))}</td>"
        f"<td>{_num(pooled.get(level.key('specificity')))}</td>"
        f"<td>{TIED_NOTE if pooled.get(level.key('scores-tied')) else ''}</td></tr>"
        for level in LEVELS
    )
    return (
        "<h2>Slices, series and patients</h2><p>A series' or a patient's score is its highest "
        "held-out slice score, and it is positive when any of its slices is. Each site sends "
        "only counts and score histograms per level; a site with fewer held-out patients than "
        "min-eval-patients sends series and patient counts only. Sensitivity and specificity at "
        "a score of 0.5.</p><table><tr><th>level</th><th>pooled</th><th>positive</th>"
        "<th>sites</th><th>AUROC</th><th>sensitivity</th><th>specificity</th><th>note</th></tr>"
        f"{body}</table>"
    )


def collapse_box(record: dict[str, Any]) -> str:
    """A red box naming the collapse a round's model shows and what to do (empty without)."""
    collapse = Collapse.from_record(record.get("collapse"))
    if collapse is None:
        return ""
    return (
        "<div class='collapse' style='border:2px solid #b00;background:#fee;padding:0.6em 1em;"
        f"margin:1em 0'><b>⚠ Collapsed model</b> (round {record.get('round')}): "
        f"{html.escape(collapse.message)}.<br><b>What to do:</b> {html.escape(collapse.advice)}."
        "<br>Its AUROC and scores do not describe a working model.</div>"
    )


def gradcam_gallery(fed: FederationConfig, model_path: Path, per_kind: int = 4) -> str | None:
    """True and false positives from the sites' held-out patients, with CAM and lesion outline."""
    model, _ = load_model(model_path)
    stage = cam_stage_name(model, fed.preprocess.grid.image_size, fed.cam_layer)
    positive = len(fed.class_names) - 1
    chosen: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray | None, str]]] = {
        "true positive": [],
        "false positive": [],
    }
    for folder in sorted(p for p in Path(fed.data_root).iterdir() if p.is_dir()):
        site = load_site(
            folder,
            grid=fed.preprocess.grid,
            progress=False,
            cache_dir=Path(fed.output_dir) / "sites" / folder.name / "frame-cache",
        )
        split = site.eval_split()
        rows = site.indices(split)
        data = site_dataset(
            site, split, classes=fed.class_names, windows=fed.preprocess.windows, train=False
        )
        if not len(data):
            continue
        images = torch.stack([data[i][0] for i in range(len(data))])
        with torch.no_grad():
            scores = torch.softmax(model(images), 1)[:, positive].numpy()
        for kind, wanted in (("true positive", True), ("false positive", False)):
            picks = [
                i
                for i in np.argsort(-scores)
                if scores[i] >= 0.5 and (data.targets[i] == positive) == wanted
            ][:per_kind]
            if not picks or len(chosen[kind]) >= per_kind:
                continue
            cams = cam_maps(model, images[picks], target_class=positive, layer=stage)
            for i, cam in zip(picks, cams, strict=True):
                hu = site.images[rows[i]].astype(np.float32)
                chosen[kind].append(
                    (hu, cam, site.lesion_mask(int(rows[i])), f"{folder.name} p={scores[i]:.2f}")
                )
    cells = [(k, item) for k, items in chosen.items() for item in items[:per_kind]]
    if not cells:
        return None
    fig = Figure(figsize=(2.2 * len(cells), 4.6))
    axes = fig.subplots(2, len(cells), squeeze=False)
    for col, (kind, (hu, cam, mask, label)) in enumerate(cells):
        draw_slice(axes[0, col], axes[1, col], hu, cam, mask)
        axes[0, col].set_title(f"{kind}\n{label}", fontsize=7)
    fig.suptitle("CT (lung window) and Grad-CAM; green: lesion outline", fontsize=9)
    return _png(fig)


def write_report(
    out: Path, summary: dict[str, Any], history: list[dict[str, Any]], fed: FederationConfig
) -> Path:
    start = read_start(Path(summary["metrics"]).parent)
    figures = [
        ("Learning curves", learning_curves(([start] if start else []) + history)),
        ("Privacy", privacy_spend(history) if fed.dp else None),
        ("ROC curves", roc_curve(history)),
    ]
    model_path = Path(summary["final_model"])
    if model_path.is_file():
        figures.append(("Grad-CAM gallery", gradcam_gallery(fed, model_path)))
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{_num(s.get('num_train_examples'), 0)}</td>"
        f"<td>{_num(s.get('num_eval_examples'), 0)}</td>"
        f"<td>{_num(s.get('num_eval_patients'), 0)}</td><td>{_num(s.get('auroc'))}</td>"
        f"<td>{_num(s.get('auroc_series'))}</td><td>{_num(s.get('auroc_patient'))}</td>"
        f"<td>{_epsilon(s.get('epsilon'), fed.dp)}</td>"
        f"<td>{_epsilon(s.get('epsilon_budget'), fed.dp)}</td></tr>"
        for name, s in summary["sites"].items()
    )
    pooled = history[-1].get("pooled", {}) if history else {}
    tied = tied_levels(pooled)
    tied_note = f"<p><b>Note:</b> {TIED_NOTE} ({', '.join(tied)}).</p>" if tied else ""
    warning = collapse_box(history[-1]) if history else ""
    cam = (
        f"Grad-CAM pointing game on true-positive slices with a lesion mask: hit rate "
        f"{_num(pooled.get('cam-pointing'))} (peak within {POINTING_TOLERANCE:.1%} of the image "
        f"side of the lesion), {_num(pooled.get('cam-pointing-strict'))} strictly inside it; "
        f"{_num(pooled.get('cam-energy'))} of CAM energy inside the lesion "
        f"({pooled.get('cam-slices', 0)} slices)"
    )
    sections = (
        levels_table(pooled)
        + compare_table(summary)
        + "".join(
            f"<h2>{title}</h2><img src='{src}' alt='{title}'>"
            if src
            else f"<h2>{title}</h2><p>{MISSING[title]}</p>"
            for title, src in figures
            if src or title in MISSING
        )
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>FedCT report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}
td:first-child{{text-align:left}}img{{max-width:100%}}</style></head><body>
<h1>FedCT federated simulation</h1>{warning}{gain_table(summary, fed)}
<p><b>Pooled AUROC {_num(summary.get("pooled_auroc"))}</b> on all sites' held-out slices
(series {_num(summary.get("pooled_auroc_series"))}, patients
{_num(summary.get("pooled_auroc_patient"))}) after {summary["rounds"]} rounds &middot; strategy
{html.escape(fed.strategy)} &middot; model {html.escape(fed.model)} at {fed.image_size} px
&middot; {_start(fed)} &middot;
{"DP-SGD, per-site budget ε=" + _num(fed.epsilon, 1) if fed.dp else "no differential privacy"}</p>
{tied_note}<h2>Sites</h2><table><tr><th>site</th><th>training slices</th><th>held-out slices</th>
<th>held-out patients</th><th>AUROC</th><th>series AUROC</th><th>patient AUROC</th>
<th>ε spent</th><th>ε budget</th></tr>{rows}</table>
<p>{cam}</p>{sections}
<p style="color:#666;font-size:small">Pooled AUROC is computed from score histograms summed
over sites ({fed.histogram_bins} bins, equal in log-odds); no per-patient score left any site.</p>
</body></html>"""
    path = out / "report.html"
    path.write_text(page)
    return path


def _start(fed: FederationConfig) -> str:
    if not fed.pretrained:
        return "trained from scratch"
    trained = "head only" if fed.freeze == "head" else f"freeze {fed.freeze}"
    return f"from pretrained {html.escape(Path(fed.pretrained).name)} ({trained})"


def gain_table(summary: dict[str, Any], fed: FederationConfig) -> str:
    """The answer a clinical researcher asks first: how much each hospital gained by joining
    (its held-out AUROC under the starting model and under the federated one), at what ε."""
    rows = gains(summary)
    if not rows:
        return ""
    body = "".join(
        f"<tr><td>{'<b>pooled</b>' if g.site == 'pooled' else html.escape(g.site)}</td>"
        f"<td>{_num(g.start)}</td><td>{_num(g.final)}</td>"
        f"<td><b>{g.gain_text}</b></td>"
        f"<td>{_epsilon(g.epsilon, fed.dp)}</td></tr>"
        for g in rows
    )
    start = "the pretrained model" if fed.pretrained else "the initial model"
    return (
        "<h2>What each hospital gained by joining</h2><p>AUROC on each hospital's own held-out "
        f"patients under {start} (evaluated at the sites before round 1, exactly as every "
        f"round's model) and under the federated model after {summary['rounds']} rounds; ε is "
        "what the federation spent of each site's budget (pooled: the largest).</p>"
        "<table><tr><th>site</th><th>before joining</th><th>federated</th><th>gain</th>"
        f"<th>ε spent</th></tr>{body}</table>"
    )


def compare_table(summary: dict[str, Any]) -> str:
    """The --compare table: per-site and pooled AUROC of each model (empty without it)."""
    rows = summary.get("compare")
    if not rows:
        return ""
    sites = sorted({name for r in rows for name in r["sites"]})
    answers = "".join(
        f"<li>{html.escape(line)}</li>"
        for line in should_federate(
            [Row(**{**r, "vs_federated_ci": _pair(r.get("vs_federated_ci"))}) for r in rows]
        )
    )
    head = "".join(f"<th>{html.escape(s)}</th>" for s in sites)
    body = "".join(
        f"<tr><td>{html.escape(r['model'])}</td><td>{'yes' if r['dp'] else 'no'}</td>"
        + "".join(f"<td>{_num(r['sites'].get(s))}</td>" for s in sites)
        + f"<td><b>{_num(r['pooled'])}</b></td>"
        + f"<td>{versus_text(r.get('vs_federated'), r.get('vs_federated_ci'))}</td></tr>"
        for r in rows
    )
    return (
        "<h2>Comparison</h2><p>AUROC on each hospital's held-out patients; every model had the "
        "same number of passes over its training data (rounds x local epochs). The last column "
        "is each model's pooled AUROC minus the federated model's, with a 95% interval from "
        "resampling the held-out patients (both models scored on the same draws): an interval "
        "that contains 0 means these patients cannot tell the two models apart. Here every "
        "model is scored on the pooled slices; the headline pooled AUROC comes from the sites' "
        "score histograms, the same up to ties within a bin.</p>"
        f"<table><tr><th>model</th><th>DP</th>{head}<th>pooled</th>"
        f"<th>pooled vs federated (95% interval)</th></tr>{body}</table>"
        f"<h3>Should we federate?</h3><ul>{answers}</ul>"
    )


def _pair(value: Any) -> tuple[float, float] | None:
    return None if value is None else (float(value[0]), float(value[1]))


def _epsilon(value: Any, dp: bool) -> str:
    return _num(value, 2) if dp else "no DP"


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else html.escape(str(value))
