"""Has the federation's model collapsed? Plain functions over a round's record (no Flower).

A collapsed model no longer tells patients apart, and its scores look like certainty (an example
in docs/evaluation.md, Collapse detection). A round's model is named collapsed when any of these
signs shows (:func:`detect_collapse`):

- ``saturated``: at least 90 % of the held-out negatives *and* of the positives score beyond the
  same extreme (above 0.99, or below 0.01) in the pooled slice histogram: the model says the same
  whatever the patient (common/training_stats.py);
- ``tied``: the pooled slice scores are tied in one bin (server/evaluation.py) after an earlier
  round's were clearly spread (tie share below RANKED_TIE_SHARE). A fresh network's scores are
  near-constant too (their tie share sits around the limit at initialisation; measured in
  docs/evaluation.md), so ties before the model ever ranked mean "not learnt yet", not
  "collapsed";
- ``held-out-loss``: the pooled held-out cross-entropy exceeds 10 x chance, ln(classes) (the
  loss of a model that gives every class the same probability): at 10 x ln 2 = 6.9 the true
  class gets on average a probability of 0.001, confidently wrong;
- ``train-loss``: a site's training loss exceeds 10 x its reference, its first round's loss but
  at most ln(classes). The first round is what the site measured on its own data from the
  starting model, so the rule holds from scratch (0.69 -> 6.9) and from pretrained weights
  (0.2 -> 2.0: the true class at 0.14 on average, which no sound fine-tuning reaches); the cap
  keeps a first round that already diverged from raising the bar to 10 x a diverged loss.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from fedct.common.metrics import SLICE
from fedct.common.training_stats import SATURATED, SATURATED_SHARE, saturated_histogram
from fedct.server.evaluation import TIED_NOTE, tied_levels

LOSS_FACTOR = 10.0
# An earlier round ranked when its pooled tie share was below this, half the tie limit
# (common/metrics.py): scores spread over a few dozen bins share one in a few per cent of pairs.
RANKED_TIE_SHARE = 0.25

_SATURATION_ADVICE = (
    "the model saturates on this data: lower learning-rate, start from scratch (pretrained = "
    '"") or from other pretrained weights, or check windows and intensities (a foreign '
    "scanner's values may lie outside what the model saw)"
)
ADVICE = {
    "saturated": _SATURATION_ADVICE,
    "held-out-loss": _SATURATION_ADVICE,
    "tied": (
        "the model gives every slice nearly the same score: lower learning-rate, train more "
        "layers (freeze), or start from other weights; under DP a larger epsilon or more "
        "patients per site lower the noise"
    ),
    "train-loss": (
        "local training diverged: lower learning-rate, train fewer layers (freeze), or "
        "check the site's windows and intensities"
    ),
}


@dataclass(frozen=True)
class Collapse:
    """A collapsed model: the first sign found (``kind``), every sign, and what to do."""

    kind: str  # saturated | tied | held-out-loss | train-loss
    message: str
    advice: str

    def as_record(self) -> dict[str, str]:
        """The collapse as ``metrics.jsonl`` keeps it."""
        return {"kind": self.kind, "message": self.message, "advice": self.advice}

    @classmethod
    def from_record(cls, record: Any) -> Collapse | None:
        """The collapse in a round's ``collapse`` entry (``None`` when there is none)."""
        if not isinstance(record, Mapping):
            return None
        return cls(str(record["kind"]), str(record["message"]), str(record["advice"]))

    @property
    def line(self) -> str:
        """``⚠ collapsed: <signs>; <advice>``, for round lines and logs."""
        return f"⚠ collapsed: {self.message}; {self.advice}"


@dataclass(frozen=True)
class RunSoFar:
    """What the collapse signs need from earlier rounds."""

    first_losses: Mapping[str, float] = field(default_factory=dict)  # each site's first round
    ranked: bool = False  # an earlier round's pooled slice scores were clearly spread

    def after(self, record: Mapping[str, Any]) -> RunSoFar:
        """This state once ``record`` (a round of ``metrics.jsonl``) is done."""
        first = dict(self.first_losses)
        for site, m in record.get("train", {}).items():
            loss = _number(m.get("train-loss"))
            if site not in first and loss is not None:
                first[site] = loss
        pooled = record.get("pooled", {})
        share = _number(pooled.get("tie-share"))
        spread = share is not None and share < RANKED_TIE_SHARE
        return replace(self, first_losses=first, ranked=self.ranked or spread)

    @classmethod
    def from_history(cls, history: Iterable[Mapping[str, Any]]) -> RunSoFar:
        state = cls()
        for record in history:
            state = state.after(record)
        return state


def detect_collapse(
    pooled: Mapping[str, Any],
    *,
    train: Mapping[str, Mapping[str, Any]],
    before: RunSoFar,
    num_classes: int,
) -> Collapse | None:
    """The collapse a round shows, from its pooled evaluation, its sites' training metrics
    and the rounds ``before`` it (module docstring); ``None`` for a healthy model."""
    chance = math.log(num_classes)
    signs: list[tuple[str, str]] = []
    if SLICE.key("hist-neg") in pooled:
        hist = np.asarray([pooled["hist-neg"], pooled["hist-pos"]])
        side = saturated_histogram(hist)
        if side is not None:
            where = f"above {1 - SATURATED:g}" if side == "high" else f"below {SATURATED:g}"
            signs.append(
                (
                    "saturated",
                    f"held-out scores saturated: at least {SATURATED_SHARE:.0%} of the "
                    f"negatives and of the positives score {where}",
                )
            )
    tied = tied_levels(pooled)
    if before.ranked and SLICE.name in tied:
        signs.append(("tied", f"{TIED_NOTE} ({', '.join(tied)}), after an earlier round ranked"))
    loss = _number(pooled.get("loss"))
    if loss is not None and loss > LOSS_FACTOR * chance:
        signs.append(
            (
                "held-out-loss",
                f"held-out loss {loss:.2f} is more than {LOSS_FACTOR:g}x chance "
                f"(ln {num_classes} = {chance:.2f})",
            )
        )
    for site, m in sorted(train.items()):
        loss = _number(m.get("train-loss"))
        first = before.first_losses.get(site)
        if loss is None or first is None:
            continue
        reference = min(first, chance)
        if loss > LOSS_FACTOR * reference:
            signs.append(
                (
                    "train-loss",
                    f"{site}'s training loss {loss:.2f} is more than {LOSS_FACTOR:g}x its "
                    f"first round's ({first:.3f}"
                    + (f", taken as ln {num_classes})" if first > chance else ")"),
                )
            )
    if not signs:
        return None
    kind = signs[0][0]
    return Collapse(kind, "; ".join(text for _, text in signs), ADVICE[kind])


def _number(value: Any) -> float | None:
    """``value`` as a float when it is a finite number (metrics.jsonl reads null as NaN)."""
    finite = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if finite else None
