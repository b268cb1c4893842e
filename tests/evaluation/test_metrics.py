"""Metrics: agreement with scikit-learn, undefined values, bootstrap intervals, thresholds."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

from multimodal_fl.evaluation.metrics import (
    METRIC_NAMES,
    MetricValue,
    _batched_metrics,
    _stratified_indices,
    binary_metrics,
    bootstrap_ci,
    bootstrap_metrics,
    choose_threshold,
    expected_calibration_error,
    paired_bootstrap_difference,
    repeated_cv_auc,
    roc_auc,
)


def _data(n: int = 500, seed: int = 0, round_to: int | None = None):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    s = 1.0 / (1.0 + np.exp(-rng.normal(-1.0 + 1.5 * y, 1.0)))
    if round_to is not None:
        s = np.round(s, round_to)  # many ties
    return y, s


def test_point_estimates_match_sklearn() -> None:
    y, s = _data()
    m = binary_metrics(y, s, threshold=0.4)
    assert m["auc"].value == pytest.approx(roc_auc_score(y, s))
    assert m["average_precision"].value == pytest.approx(average_precision_score(y, s))
    assert m["brier"].value == pytest.approx(brier_score_loss(y, s))
    assert m["sensitivity"].value == pytest.approx(np.mean(s[y == 1] >= 0.4))
    assert m["specificity"].value == pytest.approx(np.mean(s[y == 0] < 0.4))
    assert all(v.n == len(y) and v.reason is None for v in m.values())


def test_ece_by_hand() -> None:
    y = np.array([0, 1, 1, 0, 1])
    s = np.array([0.05, 0.15, 0.95, 0.99, 1.0])
    # bins: [0,.1): {0.05 y0}; [.1,.2): {0.15 y1}; [.9,1]: {0.95,0.99,1.0 / y 1,0,1}
    expected = (abs(0 - 0.05) + abs(1 - 0.15) + abs(2 - (0.95 + 0.99 + 1.0))) / 5
    assert expected_calibration_error(y, s) == pytest.approx(expected)
    assert expected_calibration_error(y, s, n_bins=1) == pytest.approx(abs(3 - s.sum()) / 5)


@pytest.mark.parametrize("round_to", [None, 1])
def test_batched_bootstrap_metrics_equal_sklearn_on_each_resample(round_to: int | None) -> None:
    y, s = _data(200, seed=3, round_to=round_to)
    rng = np.random.default_rng(0)
    idx = _stratified_indices(y, 20, rng)
    vals = _batched_metrics(list(METRIC_NAMES), y[idx], s[idx], 0.4, 10)
    for i in range(20):
        yi, si = y[idx[i]], s[idx[i]]
        assert vals["auc"][i] == pytest.approx(roc_auc_score(yi, si), abs=1e-12)
        assert vals["average_precision"][i] == pytest.approx(
            average_precision_score(yi, si), abs=1e-12
        )
        assert vals["brier"][i] == pytest.approx(brier_score_loss(yi, si), abs=1e-12)
        assert vals["ece"][i] == pytest.approx(expected_calibration_error(yi, si), abs=1e-12)
        # stratified: class counts preserved on every resample
        assert yi.sum() == y.sum()


@pytest.mark.parametrize(
    ("y", "reason"),
    [([0, 0, 0, 0], "no positives"), ([1, 1, 1], "no negatives"), ([], "no patients")],
)
def test_undefined_auc_has_reason_not_number(y: list[int], reason: str) -> None:
    s = np.linspace(0.1, 0.9, len(y))
    v = roc_auc(y, s)
    assert v.value is None and v.reason == reason
    assert not v.defined and np.isnan(float(v))
    assert "—" in str(v) and reason in str(v)
    m = binary_metrics(y, s, threshold=0.5, n_boot=50) if y else None
    if m is not None:
        assert m["auc"].value is None and m["auc"].lo is None
        # brier is defined with one class
        assert m["brier"].value is not None


def test_no_positives_keeps_specificity_and_hides_sensitivity() -> None:
    m = binary_metrics([0, 0, 0, 0, 0], [0.1, 0.2, 0.6, 0.3, 0.9], threshold=0.5)
    assert m["sensitivity"].reason == "no positives"
    assert m["specificity"].value == pytest.approx(3 / 5)


def test_min_cell_suppresses_and_hides_count() -> None:
    m = binary_metrics([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8], min_cell=10)
    assert all(v.value is None and v.n is None for v in m.values())
    assert m["auc"].reason == "fewer than 10 patients"


def test_bootstrap_interval_contains_point_and_is_reproducible() -> None:
    y, s = _data()
    a = binary_metrics(y, s, threshold=0.4, n_boot=300, seed=7)
    b = binary_metrics(y, s, threshold=0.4, n_boot=300, seed=7)
    c = binary_metrics(y, s, threshold=0.4, n_boot=300, seed=8)
    for k, v in a.items():
        assert v.lo is not None and v.hi is not None and v.value is not None
        assert v.lo <= v.value <= v.hi, k
        assert v == b[k]
        assert v.n_boot == 300 and v.n_skipped == 0
    assert a["auc"].lo != c["auc"].lo


def test_bootstrap_width_shrinks_with_more_patients() -> None:
    small = bootstrap_ci("auc", *_data(100, seed=1), n_boot=500)
    large = bootstrap_ci("auc", *_data(2000, seed=1), n_boot=500)
    assert small.hi - small.lo > 2 * (large.hi - large.lo)  # type: ignore[operator]


def test_bootstrap_auc_coverage_of_true_value() -> None:
    # true AUC of two normals with unit sd and mean gap d is Phi(d / sqrt(2))
    from scipy.stats import norm

    d = 1.0
    true = norm.cdf(d / np.sqrt(2))
    hits = 0
    for seed in range(60):
        rng = np.random.default_rng(100 + seed)
        y = (rng.random(200) < 0.4).astype(int)
        s = 1 / (1 + np.exp(-rng.normal(d * y, 1.0)))  # monotone transform keeps the AUC
        v = bootstrap_ci("auc", y, s, n_boot=300, seed=seed)
        assert v.lo is not None and v.hi is not None
        hits += v.lo <= true <= v.hi
    assert 0.85 * 60 <= hits  # nominal 95%: at least 51 of 60


def test_unstratified_bootstrap_counts_degenerate_resamples() -> None:
    y = np.array([1] + [0] * 9)
    s = np.linspace(0.05, 0.95, 10)
    out = bootstrap_metrics(y, s, metrics=["auc"], n_boot=400, stratified=False, seed=0)
    # P(resample misses the single positive) = 0.9**10 ~ 0.35
    assert 80 < out["auc"].n_skipped < 200


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")
def test_callable_metric_skips_degenerate_resamples() -> None:
    y = np.array([1, 0, 0, 0, 0, 0])
    s = np.array([0.9, 0.1, 0.2, 0.3, 0.4, 0.5])
    v = bootstrap_ci(roc_auc_score, y, s, n_boot=200, stratified=False, seed=1)
    assert v.value == pytest.approx(1.0)
    assert v.n_skipped > 0  # resamples without the positive: sklearn gives NaN (or raises)


def test_bootstrap_is_fast() -> None:
    y, s = _data(500)
    t = time.perf_counter()
    bootstrap_ci("auc", y, s, n_boot=1000)
    assert time.perf_counter() - t < 1.0


def test_choose_threshold_youden_is_optimal_on_validation() -> None:
    y, s = _data(300, seed=5)
    t = choose_threshold(y, s)

    def j(th: float) -> float:
        return float(np.mean(s[y == 1] >= th) + np.mean(s[y == 0] < th) - 1)

    assert all(j(t) >= j(c) - 1e-12 for c in np.unique(s))
    ts = choose_threshold(y, s, "sensitivity", target=0.9)
    assert np.mean(s[y == 1] >= ts) >= 0.9
    with pytest.raises(ValueError, match="no positives"):
        choose_threshold([0, 0, 0], [0.1, 0.2, 0.3])


def test_per_patient_thresholds() -> None:
    y = np.array([1, 1, 0, 0])
    s = np.array([0.6, 0.3, 0.4, 0.1])
    m = binary_metrics(y, s, threshold=np.array([0.5, 0.2, 0.5, 0.05]))
    assert m["sensitivity"].value == 1.0 and m["specificity"].value == 0.5


def test_paired_difference() -> None:
    y, s = _data(400, seed=2)
    rng = np.random.default_rng(0)
    worse = np.clip(s + rng.normal(0, 0.3, s.size), 0, 1)
    d = paired_bootstrap_difference(y, worse, s, n_boot=300)
    assert d.value == pytest.approx(roc_auc_score(y, s) - roc_auc_score(y, worse))
    assert d.lo is not None and d.lo > 0  # clearly better
    z = paired_bootstrap_difference(y, s, s, n_boot=100)
    assert z.value == 0 and z.lo == 0 and z.hi == 0


def test_repeated_cv_auc_one_repeat_is_the_bootstrap_ci() -> None:
    y, s = _data(300, seed=4)
    m = repeated_cv_auc(y, s[None, :], n_boot=200, seed=3)
    ref = bootstrap_ci("auc", y, s, n_boot=200, seed=3)
    assert m.value == pytest.approx(roc_auc_score(y, s))
    assert (m.lo, m.hi) == pytest.approx((ref.lo, ref.hi))


def test_repeated_cv_auc_means_the_repeats_and_pairs_the_resamples() -> None:
    y, s = _data(300, seed=5)
    rng = np.random.default_rng(1)
    noisy = np.clip(s + rng.normal(0, 0.3, (3, s.size)), 0, 1)
    m = repeated_cv_auc(y, noisy, n_boot=200)
    assert m.value == pytest.approx(np.mean([roc_auc_score(y, row) for row in noisy]))
    assert m.lo is not None and m.hi is not None and m.lo < m.value < m.hi
    exact = np.tile(s, (3, 1))
    d = repeated_cv_auc(y, exact, baseline=noisy, n_boot=200)
    assert d.value == pytest.approx(roc_auc_score(y, s) - m.value)
    assert d.lo is not None and d.lo > 0  # paired: the exact scores are clearly better
    r = repeated_cv_auc(y, noisy, baseline=noisy, compare="ratio", n_boot=50)
    assert (r.value, r.lo, r.hi) == (1.0, 1.0, 1.0)


def test_repeated_cv_auc_bad_input_says_what_is_wrong() -> None:
    y, s = _data(50)
    with pytest.raises(ValueError, match=r"shape \[repeats, 50\]"):
        repeated_cv_auc(y, s[:40])
    with pytest.raises(ValueError, match="out-of-fold score"):
        repeated_cv_auc(y, np.where(np.arange(50) == 3, np.nan, s))
    with pytest.raises(ValueError, match="baseline has shape"):
        repeated_cv_auc(y, np.tile(s, (2, 1)), baseline=s)
    assert repeated_cv_auc(np.zeros(50, int), s).reason == "no positives"


@pytest.mark.parametrize(
    ("y", "s", "match"),
    [
        ([0, 2], [0.1, 0.2], "labels must be 0 or 1"),
        ([0, 1], [0.1, 1.2], r"in \[0, 1\]"),
        ([0, 1], [0.1, np.nan], "finite"),
        ([0, 1, 1], [0.1, 0.2], "3 labels but 2 scores"),
    ],
)
def test_bad_inputs_say_what_is_wrong(y: list[int], s: list[float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        binary_metrics(y, s)


def test_metric_value_json_round_trip() -> None:
    v = binary_metrics(*_data(100), n_boot=50)["auc"]
    u = MetricValue.undefined("no positives", n=12)
    for x in (v, u):
        assert MetricValue.from_dict(json.loads(json.dumps(x.to_dict()))) == x
    assert "NaN" not in json.dumps(u.to_dict())


def test_suppress_cells_small_cells_and_their_complement() -> None:
    from multimodal_fl.evaluation.metrics import disclosed_count, suppress_cells

    # 61 patients: 30 female, 30 male, 1 unknown -> unknown and the smaller other go
    out = suppress_cells({"F": (30,), "M": (29,), "unknown": (1,)}, 10, total=(60,))
    assert out["unknown"] == "fewer than 10 patients"
    assert "derived by subtraction" in out["M"] and "F" not in out
    # a cell with few positives is small too; the rest of the whole must be safe
    out = suppress_cells({"a": (3, 40), "b": (20, 30)}, 10, names=("positives", "negatives"))
    assert out["a"] == "fewer than 10 positives" and "b" in out
    assert suppress_cells({"a": (0, 40), "b": (20, 30)}, 10,
                          names=("positives", "negatives")) == {}
    assert disclosed_count(3, 5) is None and disclosed_count(0, 5) == 0
    assert disclosed_count(58, 5, of=61) is None and disclosed_count(56, 5, of=61) == 56


def test_metric_value_text_gives_the_interval_the_value_or_the_reason() -> None:
    """One formatting for every table that prints an AUC with its CI."""
    from multimodal_fl.evaluation.metrics import MetricValue

    assert MetricValue(0.87123, 0.8421, 0.8994).text() == "0.871 [0.842, 0.899]"
    assert MetricValue(0.87123, 0.8421, 0.8994).text(2) == "0.87 [0.84, 0.90]"
    assert MetricValue(0.5).text() == "0.500"
    assert MetricValue(None, reason="one class").text() == "- (one class)"
