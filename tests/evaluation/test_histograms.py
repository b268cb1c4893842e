"""Federated evaluation: site messages, bin coarsening, pooled figures vs exact pooled values."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from multimodal_fl.evaluation.histograms import (
    BinnedCounts,
    SiteEvaluation,
    coarsen_counts,
    histogram_auc,
    histogram_threshold,
    pool_histograms,
    pooled_evaluation,
    summarise_site,
    summarise_sites,
)
from multimodal_fl.evaluation.metrics import expected_calibration_error

from .conftest import make_predictions

SITES = (("a", 600, 1.6), ("b", 300, 1.2), ("c", 80, 1.0))


def _sites(seed: int, min_cell: int, sites=SITES):
    """Realistic three-site data, all rows as test; returns (pooled y, s, site summaries)."""
    df = make_predictions(seed, sites=sites).assign(split="test")
    sums = summarise_sites(df, min_cell=min_cell, n_boot=0, threshold=0.4)
    return df.label.to_numpy(), df.score.to_numpy(), sums


def test_coarsening_every_bin_zero_or_at_least_min_cell() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        c = rng.poisson(rng.uniform(0.0, 4.0), size=100) * (rng.random(100) < 0.6)
        sums = c * 0.5
        h = coarsen_counts(c, sums, min_cell=10)
        if c.sum() < 10:
            assert isinstance(h, str)
            continue
        assert isinstance(h, BinnedCounts)
        assert all(k >= 10 for k in h.count)
        assert h.total == c.sum()
        assert sum(h.score_sum) == pytest.approx(sums.sum())
        # intervals are disjoint, increasing, and cover every non-empty fine bin
        covered = np.zeros(100, bool)
        prev = 0
        for a, b in zip(h.start, h.stop, strict=True):
            assert prev <= a < b
            covered[a:b] = True
            prev = b
        assert covered[c > 0].all()
        # each interval's count equals the fine counts it covers (nothing moved across bins)
        for a, b, k in zip(h.start, h.stop, h.count, strict=True):
            assert c[a:b].sum() == k


def test_coarsening_with_min_cell_one_keeps_the_fine_grid() -> None:
    c = np.array([0, 3, 0, 1, 5])
    h = coarsen_counts(c, c * 1.0, min_cell=1)
    assert isinstance(h, BinnedCounts)
    assert h.start == [1, 3, 4] and h.stop == [2, 4, 5] and h.count == [3, 1, 5]


def test_message_has_no_patient_level_data_and_suppresses_small_bins() -> None:
    _, s, sums = _sites(0, 10)
    for se in sums:
        msg = json.dumps(se.to_dict())
        back = SiteEvaluation.from_dict(json.loads(msg))
        assert back == se
        for g in [se.overall, *[v for lv in se.subgroups.values() for v in lv.values()]]:
            for h in (g.pos, g.neg):
                if h is not None:
                    assert all(k >= 10 for k in h.count)
        # no individual score appears in the message
        assert not any(f"{x!r}" in msg for x in s[:50])


def test_small_site_and_small_label_histograms_are_withheld() -> None:
    sites = (("a", 600, 1.5), ("tiny", 8, 1.5), ("fewpos", 40, 1.5))
    df = make_predictions(1, sites=sites, prevalence=0.3).assign(split="test")
    df.loc[df.index[(df.site == "fewpos") & (df.label == 1)][5:], "label"] = 0  # 5 positives
    sums = {s.site: s for s in summarise_sites(df, min_cell=10, n_boot=0)}
    tiny = sums["tiny"].overall
    assert tiny.reason == "fewer than 10 patients" and tiny.n is None and tiny.pos is None
    assert tiny.metrics == {}
    few = sums["fewpos"].overall
    assert few.reason is None and few.metrics["auc"].value is not None  # the cell is shown
    assert few.pos is None and few.histogram_reason == "positives: fewer than 10 patients"
    pooled = pooled_evaluation(list(sums.values())).overall
    assert pooled["sites"] == ["a"]
    assert set(pooled["excluded"]) == {"tiny", "fewpos"}


def test_pooled_auc_close_to_exact_and_bounds_hold() -> None:
    """Stated bound: |histogram AUC - exact pooled AUC| <= 0.002 with 100 bins and no merging,
    <= 0.01 with bins merged to >= 10 patients; the exact AUC always lies in the bounds."""
    for seed in range(8):
        for min_cell, tol in ((1, 0.002), (10, 0.01)):
            y, s, sums = _sites(seed, min_cell)
            exact = roc_auc_score(y, s)
            auc, lo, hi = histogram_auc(pool_histograms([(x.site, x.overall) for x in sums]))
            assert abs(auc - exact) <= tol, (seed, min_cell, auc, exact)
            assert lo <= exact <= hi


def test_pooled_auc_exact_when_scores_sit_on_the_grid() -> None:
    rng = np.random.default_rng(4)
    y = (rng.random(2000) < 0.3).astype(int)
    s = np.clip(np.round(rng.beta(2 + 2 * y, 3), 2) + 0.001, 0, 0.999)  # one value per bin
    half = y.size // 2
    sums = [summarise_site("a", y[:half], s[:half], min_cell=1, n_boot=0),
            summarise_site("b", y[half:], s[half:], min_cell=1, n_boot=0)]
    auc, lo, hi = histogram_auc(pool_histograms([(x.site, x.overall) for x in sums]))
    assert auc == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert lo <= auc <= hi  # ties within a bin = 1/2


def test_pooled_ece_and_sens_spec() -> None:
    y, s, sums = _sites(2, 1)
    p = pooled_evaluation(sums).overall
    # unmerged 100-bin histograms with score sums give the exact 10-bin ECE
    assert p["ece"] == pytest.approx(expected_calibration_error(y, s), abs=1e-9)
    # threshold 0.4 is a bin edge: exact
    assert p["sensitivity"]["value"] == pytest.approx(np.mean(s[y == 1] >= 0.4), abs=1e-9)
    assert p["specificity"]["value"] == pytest.approx(np.mean(s[y == 0] < 0.4), abs=1e-9)
    y, s, sums = _sites(2, 10)
    p = pooled_evaluation(sums).overall
    assert abs(p["ece"] - expected_calibration_error(y, s)) < 0.02
    for name, exact in (("sensitivity", np.mean(s[y == 1] >= 0.4)),
                        ("specificity", np.mean(s[y == 0] < 0.4))):
        assert p[name]["lower"] <= exact <= p[name]["upper"]
        assert abs(p[name]["value"] - exact) < 0.02
    cal = p["calibration"]
    assert len(cal) == 10 and sum(r["n"] for r in cal) == pytest.approx(len(y))


def test_pooled_subgroups_and_threshold_from_validation() -> None:
    df = make_predictions(3, sites=SITES)
    val = summarise_sites(df, split="val", min_cell=1, n_boot=0)
    h = pool_histograms([(x.site, x.overall) for x in val])
    t = histogram_threshold(h)
    v = df[df.split == "val"]
    yv, sv = v.label.to_numpy(), v.score.to_numpy()

    def j(th: float) -> float:
        return float(np.mean(sv[yv == 1] >= th) + np.mean(sv[yv == 0] < th) - 1)

    assert all(j(t) >= j(k / 100) - 1e-12 for k in range(101))
    test = summarise_sites(df, sensitive=["sex"], min_cell=10, n_boot=50, threshold=t)
    p = pooled_evaluation(test)
    assert p.settings["threshold"] == t
    d = df[(df.split == "test") & (df.sex == "F")]
    assert abs(p.subgroups["sex"]["F"]["auc"]["value"] - roc_auc_score(d.label, d.score)) < 0.02
    # the site-computed metrics travel with their intervals
    a = next(r for r in p.sites if r["site"] == "a")["metrics"]["auc"]
    assert a["lo"] <= a["value"] <= a["hi"]
    assert "NaN" not in json.dumps(p.to_dict())


def test_grids_must_match() -> None:
    y = np.array([0, 1] * 20)
    s = np.linspace(0, 1, 40)
    a = summarise_site("a", y, s, n_bins=100, min_cell=1, n_boot=0)
    b = summarise_site("b", y, s, n_bins=50, min_cell=1, n_boot=0)
    with pytest.raises(ValueError, match="different histogram grids"):
        pooled_evaluation([a, b])
    with pytest.raises(ValueError, match="multiple of ece_bins"):
        summarise_site("c", y, s, n_bins=55, n_boot=0)


def test_bounds_hold_with_scores_on_bin_edges_and_heavy_ties() -> None:
    from multimodal_fl.evaluation.histograms import histogram_sens_spec

    for seed in range(10):
        rng = np.random.default_rng(seed)
        y = (rng.random(800) < 0.35).astype(int)
        s = rng.integers(0, 101, 800) / 100.0  # exactly on edges, including 0 and 1
        s = np.where(y == 1, np.maximum(s, rng.integers(0, 101, 800) / 100.0), s)
        sums = [summarise_site(n, y[i::3], s[i::3], min_cell=10, n_boot=0)
                for i, n in enumerate("abc")]
        h = pool_histograms([(x.site, x.overall) for x in sums])
        exact = roc_auc_score(y, s)
        auc, lo, hi = histogram_auc(h)
        assert lo <= exact <= hi and lo <= auc <= hi
        for t in (0.0, 0.3, 0.505, 1.0):
            ss = histogram_sens_spec(h, t)
            sens, spec = np.mean(s[y == 1] >= t), np.mean(s[y == 0] < t)
            assert ss["sensitivity"][1] - 1e-12 <= sens <= ss["sensitivity"][2] + 1e-12, t
            assert ss["specificity"][1] - 1e-12 <= spec <= ss["specificity"][2] + 1e-12, t


@pytest.mark.parametrize("seed", range(5))
def test_pooled_values_stay_within_their_bounds_and_the_metric_range(seed: int) -> None:
    # at threshold 0 every patient is positive: sensitivity 1 and specificity 0 exactly; the
    # float sums once gave 1.0000000000000002 and -4.4e-16 (shown as "-0.000")
    rng = np.random.default_rng(seed)
    sums = []
    for site, n in (("a", 101), ("b", 38), ("c", 59)):
        y = (rng.random(n) < 0.3).astype(int)
        sums.append(summarise_site(site, y, rng.random(n), threshold=0.0, min_cell=5, n_boot=0))
    o = pooled_evaluation(sums).overall
    assert o["sensitivity"]["value"] == 1.0 and o["specificity"]["value"] == 0.0
    for name in ("auc", "sensitivity", "specificity"):
        m = o[name]
        assert 0.0 <= m["lower"] <= m["value"] <= m["upper"] <= 1.0, (name, m)
    assert 0.0 <= o["ece"] <= 1.0
