from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from fedct.common.metrics import (
    auroc_from_histograms,
    bin_edges,
    binary_metrics,
    roc_from_histograms,
    score_histograms,
)


def test_histogram_auroc_equals_sklearn_on_binned_scores() -> None:
    rng = np.random.default_rng(0)
    y = rng.random(500) < 0.3
    s = np.clip(rng.normal(0.4 + 0.3 * y, 0.2), 0, 1)
    bins = 50
    binned = np.digitize(s, bin_edges(bins)[1:-1])  # ties within a bin, as pooled
    assert auroc_from_histograms(score_histograms(s, y, bins=bins)) == pytest.approx(
        roc_auc_score(y, binned), abs=1e-12
    )


def test_pooled_histograms_match_pooled_scores_up_to_bin_width() -> None:
    rng = np.random.default_rng(1)
    sites = []
    for prevalence, shift in [(0.2, 0.0), (0.5, 0.1), (0.7, -0.05)]:
        y = rng.random(300) < prevalence
        s = 1 / (1 + np.exp(-(rng.normal(0, 1, 300) + 1.5 * y + shift)))
        sites.append((s, y))
    pooled_hist = sum(score_histograms(s, y, bins=100) for s, y in sites)
    all_s = np.concatenate([s for s, _ in sites])
    all_y = np.concatenate([y for _, y in sites])
    exact = roc_auc_score(all_y, all_s)
    assert auroc_from_histograms(pooled_hist) == pytest.approx(exact, abs=0.01)
    fpr, tpr = roc_from_histograms(pooled_hist)
    assert fpr[0] == 0
    assert tpr[-1] == pytest.approx(1.0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(auroc_from_histograms(pooled_hist))


def test_confident_scores_keep_their_ranking() -> None:
    # A confident model: nearly every score below 0.01 or above 0.99. Probability-wide bins
    # would make almost all of them ties; log-odds bins keep the pooled AUROC.
    rng = np.random.default_rng(2)
    y = rng.random(1000) < 0.3
    s = 1 / (1 + np.exp(-(rng.normal(-8, 1.5, 1000) + 1.5 * y)))
    assert (s < 0.01).mean() > 0.9
    exact = roc_auc_score(y, s)
    assert auroc_from_histograms(score_histograms(s, y, bins=100)) == pytest.approx(exact, abs=0.01)


def test_bin_edges_are_increasing_probabilities() -> None:
    edges = bin_edges(100)
    assert edges[0] == 0
    assert edges[-1] == 1
    assert len(edges) == 101
    assert np.all(np.diff(edges) > 0)
    assert edges[50] == pytest.approx(0.5)


def test_one_class_gives_nan() -> None:
    assert math.isnan(auroc_from_histograms(score_histograms(np.array([0.2]), np.array([True]))))


def test_binary_metrics() -> None:
    m = binary_metrics(
        np.array([0.9, 0.8, 0.3, 0.1, 0.6]), np.array([True, True, True, False, False])
    )
    assert m.sensitivity == pytest.approx(2 / 3)
    assert m.specificity == pytest.approx(1 / 2)
    assert m.accuracy == pytest.approx(3 / 5)
    assert m.auroc == pytest.approx(roc_auc_score([1, 1, 1, 0, 0], [0.9, 0.8, 0.3, 0.1, 0.6]))


def test_non_finite_scores_say_the_model_diverged() -> None:
    from fedct.common.metrics import DivergedModelError

    with pytest.raises(DivergedModelError, match="2 of 3 scores are NaN or infinite"):
        binary_metrics(np.array([0.2, np.nan, np.inf]), np.array([False, True, True]))


def test_series_and_patient_scores_are_the_max_of_their_slices() -> None:
    from fedct.common.metrics import max_by_group

    # 2 patients x 2 series x 3 slices; a series (patient) is positive if any slice is
    scores = np.array([0.1, 0.7, 0.2, 0.3, 0.2, 0.1, 0.9, 0.4, 0.8, 0.6, 0.5, 0.05])
    positive = np.array([0, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0], dtype=bool)
    patient = ["p1"] * 6 + ["p2"] * 6
    series = list(zip(patient, "aaabbbcccddd", strict=True))
    by_series = max_by_group(scores, positive, series)
    np.testing.assert_allclose(by_series.scores, [0.7, 0.3, 0.9, 0.6])
    np.testing.assert_array_equal(by_series.positive, [True, False, True, False])
    # positives 0.7, 0.9 against negatives 0.3, 0.6: every pair ranked right
    assert binary_metrics(by_series.scores, by_series.positive).auroc == 1.0
    by_patient = max_by_group(scores, positive, patient)
    np.testing.assert_allclose(by_patient.scores, [0.7, 0.9])
    np.testing.assert_array_equal(by_patient.positive, [True, True])
    with pytest.raises(ValueError, match="one label and one group per score"):
        max_by_group(scores, positive, patient[:-1])


def test_tie_detector_fires_on_constant_scores_only() -> None:
    from fedct.common.metrics import scores_tied, tie_share

    rng = np.random.default_rng(3)
    y = rng.random(400) < 0.4
    constant = np.full(400, 0.3) + rng.normal(0, 1e-4, 400)  # near-constant: one bin
    hist = score_histograms(constant, y)
    assert tie_share(hist) == pytest.approx(1.0)
    assert scores_tied(hist)
    assert auroc_from_histograms(hist) == pytest.approx(0.5)
    spread = 1 / (1 + np.exp(-rng.normal(0, 2, 400) - y))
    assert tie_share(score_histograms(spread, y)) < 0.1
    assert not scores_tied(score_histograms(spread, y))
    assert not scores_tied(score_histograms(constant, np.ones(400, bool)))  # one class: no AUROC


def test_json_for_users_is_strict() -> None:
    import json

    from fedct.common.json_text import dumps

    def reject(constant: str) -> None:
        raise ValueError(f"non-standard JSON constant {constant}")

    value = {
        "a": math.nan,
        "b": [1.0, math.inf, {"c": -math.inf}],
        "d": np.float32(0.25),
        "e": np.array([1, 2]),
        "f": (np.nan, "text"),
        "g": None,
    }
    parsed = json.loads(dumps(value, indent=2), parse_constant=reject)
    assert parsed == {
        "a": None,
        "b": [1.0, None, {"c": None}],
        "d": 0.25,
        "e": [1, 2],
        "f": [None, "text"],
        "g": None,
    }
    with pytest.raises(ValueError, match="NaN"):
        json.loads('{"a": NaN}', parse_constant=reject)  # what json.dumps writes by default
