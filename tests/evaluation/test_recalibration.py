"""Recalibration: the fit on a known histogram, its application, and the site's before/after."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit, logit

from multimodal_fl.engines.recalibration import disclosed_validation_counts, recalibration_line
from multimodal_fl.evaluation.disclosed import (
    read_disclosure,
    recalibration_summary,
    site_disclosure,
)
from multimodal_fl.evaluation.metrics import roc_auc
from multimodal_fl.evaluation.recalibration import (
    RAW_SCORE,
    Recalibration,
    RecalibrationError,
    fit_on_scores,
    fit_recalibration,
    recalibrated_frame,
)

N_BINS = 100
MID = (np.arange(N_BINS) + 0.5) / N_BINS


def _histogram(a: float, b: float, per_bin: float = 2000.0) -> tuple[np.ndarray, np.ndarray]:
    """Negatives' and positives' counts when the true risk at score s is expit(a + b logit s)."""
    n = np.full(N_BINS, per_bin)
    pos = np.round(n * expit(a + b * logit(MID)))
    return n - pos, pos


@pytest.mark.parametrize(("a", "b"), [(-1.2, 0.7), (0.4, 1.6), (-2.0, 1.0)])
def test_platt_recovers_the_map_that_made_the_histogram(a: float, b: float) -> None:
    neg, pos = _histogram(a, b)
    fit = fit_recalibration(neg, pos, method="platt", source="known")
    assert fit.a == pytest.approx(a, abs=0.01) and fit.b == pytest.approx(b, abs=0.01)
    assert fit.n == int(neg.sum() + pos.sum()) and fit.source == "known"


def test_temperature_fits_a_slope_alone() -> None:
    neg, pos = _histogram(0.0, 0.5)
    fit = fit_recalibration(neg, pos, method="temperature")
    assert fit.a == 0.0 and fit.b == pytest.approx(0.5, abs=0.01)
    # a shifted model: a temperature cannot move the mean, Platt can
    neg, pos = _histogram(-1.5, 1.0)
    observed = pos.sum() / (pos.sum() + neg.sum())
    scores = np.repeat(MID, (neg + pos).astype(int))
    platt = fit_recalibration(neg, pos, method="platt").apply(scores).mean()
    assert abs(platt - observed) < 0.005


@pytest.mark.parametrize(("a", "b", "per_bin", "chosen"), [
    (0.0, 1.0, 20.0, "original"),  # calibrated: nothing to update
    (-1.5, 1.0, 20.0, "intercept"),  # a class weight's shift, the slope right
    (-1.0, 0.4, 20.0, "platt"),  # shifted and over-confident
    (-1.0, 0.7, 0.6, "intercept"),  # a slope 0.7 that 60 patients cannot show
])
def test_the_closed_test_updates_only_what_the_validation_split_shows(
        a: float, b: float, per_bin: float, chosen: str) -> None:
    """Vergouwe et al.'s closed test: the map chosen is the fit of that name, and the source
    gives both likelihood-ratio statistics."""
    risk = expit(a + b * logit(MID))  # expected counts (fractional, as disclosed ones are)
    neg, pos = per_bin * (1.0 - risk), per_bin * risk
    fit = fit_recalibration(neg, pos, method="closed_test", source="known")
    assert fit.method == chosen, fit.source
    same = fit_recalibration(neg, pos, method=chosen)
    assert (fit.a, fit.b) == (same.a, same.b)
    assert fit.source.startswith("known; closed test at 0.05: Platt against the original")
    assert f"{chosen} chosen" in fit.source
    # the map travels by its own name and is refitted by it (benchmarks/calibration.py)
    assert Recalibration.from_config(fit.to_config()) == Recalibration(
        chosen, fit.a, fit.b, source="the request")


def test_the_closed_test_keeps_a_backwards_models_ranking() -> None:
    risk = expit(0.5 - logit(MID))  # ranks backwards: Platt's slope is not positive
    neg, pos = 5.0 * (1.0 - risk), 5.0 * risk
    fit = fit_recalibration(neg, pos, method="closed_test")
    assert fit.b == 1.0 and fit.method in ("original", "intercept")


def test_the_intercept_alone_undoes_a_shift_and_keeps_the_slope() -> None:
    neg, pos = _histogram(-1.5, 1.0)  # a class weight's shift, the slope right
    fit = fit_recalibration(neg, pos, method="intercept", source="known")
    assert fit.method == "intercept" and fit.b == 1.0
    assert fit.a == pytest.approx(-1.5, abs=0.01)
    scores = np.repeat(MID, (neg + pos).astype(int))
    assert fit.apply(scores).mean() == pytest.approx(pos.sum() / (neg + pos).sum(), abs=1e-3)
    neg, pos = _histogram(-1.0, 2.0)  # a slope it leaves alone
    assert fit_recalibration(neg, pos, method="intercept").b == 1.0


def test_a_backwards_model_keeps_its_ranking_with_the_intercept_alone() -> None:
    neg, pos = _histogram(-1.0, -0.8)  # higher scores, fewer positives
    fit = fit_recalibration(neg, pos, method="platt")
    assert fit.b == 1.0 and "intercept only" in fit.source
    scores = np.repeat(MID, (neg + pos).astype(int))
    assert fit.apply(scores).mean() == pytest.approx(pos.sum() / (neg + pos).sum(), abs=1e-6)
    with pytest.raises(RecalibrationError, match="inverse temperature"):
        fit_recalibration(neg, pos, method="temperature")


@pytest.mark.parametrize(("neg", "pos", "match"), [
    ([3, 2], [0, 0], "both classes"),
    ([3, 2, 1], [1, 1], "same number"),
    ([3, -2], [1, 1], "negative counts"),
])
def test_a_histogram_that_cannot_be_fitted_says_why(neg: list[int], pos: list[int],
                                                     match: str) -> None:
    with pytest.raises(RecalibrationError, match=match):
        fit_recalibration(neg, pos)
    with pytest.raises(RecalibrationError, match="method 'isotonic'"):
        fit_recalibration([1, 2], [2, 1], method="isotonic")


def test_the_map_is_monotone_and_travels_as_config_and_json() -> None:
    rng = np.random.default_rng(0)
    s = rng.uniform(0, 1, 500)
    y = rng.binomial(1, s ** 2)
    fit = fit_on_scores(y, s, n_bins=N_BINS)
    out = fit.apply(s)
    assert np.all(np.diff(out[np.argsort(s)]) >= 0)
    assert roc_auc(y, out).value == pytest.approx(roc_auc(y, s).value, abs=1e-12)
    assert abs(out.mean() - y.mean()) < abs(s.mean() - y.mean())
    back = Recalibration.from_config(fit.to_config())
    assert back is not None and (back.a, back.b, back.method) == (fit.a, fit.b, fit.method)
    assert Recalibration.from_config({"recalibrate": "platt"}) is None
    assert Recalibration.from_dict(fit.to_dict()) == fit
    with pytest.raises(RecalibrationError, match=r"recalibration\.json: .*b > 0"):
        Recalibration.from_dict({"method": "platt", "a": 0.0, "b": -1.0},
                                where="recalibration.json")
    with pytest.raises(RecalibrationError, match="expected fields method, a, b"):
        Recalibration.from_dict({"method": "platt"}, where="recalibration.json")


def test_the_frame_keeps_the_raw_score_beside_the_recalibrated_one() -> None:
    frame = pd.DataFrame({"patient_id": ["p1", "p2"], "split": ["test", "val"],
                          "label": [0, 1], "score": [0.2, 0.9], "sex": ["f", "m"]})
    fit = Recalibration("platt", -1.0, 2.0)
    out = recalibrated_frame(frame, fit)
    assert list(out.columns) == ["patient_id", "split", "label", "score", RAW_SCORE, "sex"]
    assert out[RAW_SCORE].tolist() == [0.2, 0.9]
    assert out["score"].to_numpy() == pytest.approx(expit(-1.0 + 2.0 * logit([0.2, 0.9])))
    same = recalibrated_frame(frame, None)
    assert same["score"].tolist() == same[RAW_SCORE].tolist() == [0.2, 0.9]
    assert "score_raw" not in frame.columns  # a copy


def _site_frame(n: int = 120, seed: int = 0) -> pd.DataFrame:
    """A site whose model scores risk r as expit(logit(r) + 1.5): too high everywhere."""
    rng = np.random.default_rng(seed)
    risk = rng.uniform(0.05, 0.6, n)
    y = rng.binomial(1, risk)
    return pd.DataFrame({"split": np.resize(["train", "val", "test"], n), "label": y,
                         "score": expit(logit(risk) + 1.5),
                         "sex": np.resize(["female", "male"], n)})


def test_the_site_document_carries_calibration_before_and_after() -> None:
    frame = _site_frame(600)
    val = frame[frame["split"] == "val"]
    fit = fit_on_scores(val["label"], val["score"], n_bins=N_BINS, source="its validation")
    recal = recalibrated_frame(frame, fit)
    doc = site_disclosure(recal, site="s", min_cell=5, n_boot=0)
    doc["recalibration"] = recalibration_summary(recal, doc, method="platt", applied=True,
                                                 source=fit.source)
    typed = read_disclosure(doc)  # the report's reader takes the new entry
    rc = typed.recalibration
    assert rc is not None and rc.applied and rc.source == "its validation"
    assert rc.before.n == rc.after.n == typed.splits["test"].n == 200
    assert rc.before.ece is not None and rc.after.ece is not None
    assert rc.after.ece < rc.before.ece
    observed = rc.after.observed
    assert observed is not None and rc.after.mean_score is not None
    assert rc.before.mean_score - observed > 0.15 > abs(rc.after.mean_score - observed)
    assert rc.before.intercept is not None and rc.after.intercept is not None
    assert rc.before.intercept < -1.0 and abs(rc.after.intercept) < 0.4
    assert typed.splits["test"].metrics["ece"].value == pytest.approx(rc.after.ece)


def test_no_before_or_after_figure_on_a_withheld_test_split() -> None:
    frame = recalibrated_frame(_site_frame(12), Recalibration("platt", -1.0, 1.0))
    doc = site_disclosure(frame, site="s", min_cell=5, n_boot=0)
    assert doc["splits"]["test"]["n"] is None  # 4 test patients: suppressed
    rc = recalibration_summary(frame, doc, method="platt", applied=True, source="x")
    for when in ("before", "after"):
        figures = rc[when]
        assert figures["reason"] == doc["splits"]["test"]["reason"]
        assert all(figures[k] is None for k in ("n", "ece", "mean_score", "observed",
                                                "intercept", "slope"))
    with pytest.raises(ValueError, match="site s: predictions lack column 'score_raw'"):
        recalibration_summary(frame.drop(columns="score_raw"), doc, method="platt",
                              applied=False)


def test_disclosed_validation_histograms_pool_on_the_fine_grid() -> None:
    docs = {"a": {"n_bins": 10, "pos": {"start": [0, 6], "stop": [6, 10], "count": [6, 8]},
                  "neg": {"start": [0], "stop": [10], "count": [20]}},
            "b": {"n_bins": 10, "pos": {"start": [], "stop": [], "count": []},
                  "neg": {"start": [2], "stop": [4], "count": [10]}}}
    counts = disclosed_validation_counts(docs)
    assert counts is not None
    neg, pos = counts
    assert pos.tolist() == [1.0] * 6 + [2.0] * 4
    assert neg.tolist() == [2.0, 2.0, 7.0, 7.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]
    assert disclosed_validation_counts({**docs, "c": {**docs["b"], "n_bins": 20}}) is None


def test_the_console_line_says_what_was_fitted_or_why_not() -> None:
    applied = {"recalibration": {"method": "platt", "applied": True, "a": -1.2, "b": 0.8,
                                 "source": "the secure sum of 3 sites"}}
    assert recalibration_line(applied) == ("recalibration: platt, score' = expit(-1.200 + "
                                           "0.800 logit(score)), fitted on the secure sum of "
                                           "3 sites")
    assert recalibration_line({"recalibration": {"method": "platt", "applied": False,
                                                 "reason": "too few"}}) == \
        "recalibration: not applied (too few)"
    local = {"recalibration": {"method": "platt", "sites": {
        "a": {"applied": True}, "b": {"applied": False, "reason": "few"}}}}
    assert recalibration_line(local) == ("recalibration: platt at a (each on its own "
                                         "validation split); not at b (few)")
    assert recalibration_line({}) is None
