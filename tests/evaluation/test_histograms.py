"""Federated evaluation: site messages, bin coarsening, pooled figures vs exact pooled values."""

from __future__ import annotations

import itertools
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
from tests.smallcells import json_numbers

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
        # no individual score appears in the message: compare the numbers it carries
        numbers = set(json_numbers(json.loads(msg)))
        assert numbers and not numbers & {float(x) for x in s}
    # the check can fail: a message carrying one patient's score is caught
    planted = json.loads(json.dumps(sums[0].to_dict()))
    planted["overall"]["metrics"]["auc"]["value"] = float(s[3])
    assert set(json_numbers(planted)) & {float(x) for x in s}


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


# ------------------------------------------------------------------ pooled by secure sum


def _summed_parts(df, sensitive=("sex", "age_band")):
    """What a secure sum of every site's histogram_parts gives the server (its plain sum)."""
    from multimodal_fl.evaluation.histograms import histogram_parts

    total: dict[str, np.ndarray] = {}
    for _, d in df.groupby("site"):
        parts = histogram_parts(d.label, d.score, groups=d[list(sensitive)], n_bins=100,
                                min_cell=1)
        for k, v in parts.items():
            total[k] = total.get(k, 0) + v
    return total


def test_pooled_from_counts_gives_the_exact_auc_and_shows_no_small_bin() -> None:
    from multimodal_fl.evaluation.histograms import pooled_from_counts

    df = make_predictions(5, sites=SITES).assign(split="test")
    p = pooled_from_counts(_summed_parts(df), min_cell=10, n_boot=200, seed=1)
    o = p.overall
    exact = roc_auc_score(df.label, df.score)
    assert abs(o["auc"]["value"] - exact) <= 0.002
    assert o["auc"]["lower"] <= exact <= o["auc"]["upper"]
    assert o["auc"]["lo"] < o["auc"]["value"] < o["auc"]["hi"]
    assert o["n_pos"] == int(df.label.sum()) and o["n_neg"] == int((1 - df.label).sum())
    assert abs(o["ece"] - expected_calibration_error(df.label, df.score)) < 0.05
    cells = [o, *[c for lv in p.subgroups.values() for c in lv.values()]]
    for cell in cells:
        for row in cell.get("calibration", []):
            for k in (row["n_pos"], row["n"] - row["n_pos"]):
                assert k == 0 or k >= 10, row
    f = df[df.sex == "F"]
    assert abs(p.subgroups["sex"]["F"]["auc"]["value"] - roc_auc_score(f.label, f.score)) < 0.005


def test_pooled_subgroups_suppress_small_cells_and_their_complement() -> None:
    """One "unknown" patient: its pooled level (1 patient) is not named, and the next
    smallest cell is suppressed, so that overall minus the shown cells never gives a count
    below min_cell."""
    from multimodal_fl.evaluation.histograms import pooled_from_counts

    df = make_predictions(6, sites=SITES).assign(split="test")
    df.loc[df.index[0], "sex"] = "unknown"
    df.loc[df.index[0], "label"] = 1
    p = pooled_from_counts(_summed_parts(df, ("sex",)), min_cell=10)
    sex = p.subgroups["sex"]
    assert "unknown" not in sex
    shown = [g for g, c in sex.items() if "auc" in c]
    assert len(shown) == 1, sex  # the smaller of F and M went too
    hidden = next(g for g in sex if g not in shown)
    assert "derived by subtraction" in sex[hidden]["reason"]
    for key in ("n_pos", "n_neg"):
        rest = p.overall[key] - sum(sex[g][key] for g in shown)
        assert rest == 0 or rest >= 10


def test_joint_partition_keeps_every_histogram_safe() -> None:
    from multimodal_fl.evaluation.histograms import joint_partition

    rng = np.random.default_rng(0)
    for _ in range(30):
        hs = [(rng.poisson(2, 100) * (rng.random(100) < 0.5),
               rng.poisson(1, 100) * (rng.random(100) < 0.3)) for _ in range(3)]
        part = joint_partition(hs, 5)
        totals_ok = all(all(x.sum() == 0 or x.sum() >= 5 for x in h) for h in hs)
        assert (part is not None) == totals_ok
        if part is None:
            continue
        assert part[0][0] == 0 and part[-1][1] == 100
        assert all(a[1] == b[0] for a, b in itertools.pairwise(part))
        for a, b in part:
            for n, q in hs:
                for x in (n[a:b].sum(), q[a:b].sum()):
                    assert x == 0 or x >= 5


def _with_rare_level(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` patients, half "F" and half "M", the last one of sex "X" (held by one patient)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.5).astype(int)
    s = np.clip(rng.normal(0.35 + 0.3 * y, 0.15), 0.01, 0.99)
    sex = np.where(np.arange(n) % 2 == 0, "F", "M").astype(object)
    sex[-1] = "X"
    return y, s, sex


def test_summarise_site_names_no_level_held_by_fewer_than_min_cell() -> None:
    """On the code before, the subgroup cell of the one patient of sex "X" was named "X" (no
    figure, but its name said such a patient exists at the site); now it is "(other)"."""
    from multimodal_fl.evaluation.histograms import UNNAMED

    y, s, sex = _with_rare_level(81, 0)
    summary = summarise_site("a", y, s, groups={"sex": sex}, min_cell=10, n_boot=0)
    assert set(summary.subgroups["sex"]) == {"F", "M", UNNAMED}
    assert "X" not in json.dumps(summary.to_dict())
    assert summary.subgroups["sex"][UNNAMED].n is None  # its one patient: no count either
    assert summary.subgroups["sex"]["F"].n == 40
    # a level held by min_cell patients is named (non-vacuity)
    named = summarise_site("a", y, s, groups={"sex": sex}, min_cell=1, n_boot=0)
    assert "X" in named.subgroups["sex"]


def test_pooled_evaluation_names_no_level_no_site_holds_min_cell_of() -> None:
    """Summaries that name a rare level (made at ``min_cell`` 1, or by hand): the pooled
    figures name it only where a site shows ``min_cell`` patients of it; its patients are
    pooled under "(other)". On the code before, "X" was a pooled subgroup."""
    from multimodal_fl.evaluation.histograms import UNNAMED

    sums = []
    for site, seed in (("a", 1), ("b", 2), ("c", 3)):
        y, s, sex = _with_rare_level(121, seed)
        sums.append(summarise_site(site, y, s, groups={"sex": sex}, min_cell=1, n_boot=0))
    assert all("X" in x.subgroups["sex"] for x in sums)
    pooled = pooled_evaluation(sums, min_cell=10)
    assert set(pooled.subgroups["sex"]) == {"F", "M", UNNAMED}
    assert "X" not in json.dumps(pooled.to_dict())
    assert pooled.subgroups["sex"]["F"]["n_pos"] + pooled.subgroups["sex"]["F"]["n_neg"] == 180
    # at the summaries' own min_cell (1) the level is named: they hold it
    assert "X" in pooled_evaluation(sums).subgroups["sex"]
    # a hand-made summary whose small level hides its size is never named at its own min_cell
    hidden = summarise_site("d", *_with_rare_level(61, 4)[:2], min_cell=10, n_boot=0)
    cell = hidden.overall.__class__(n=None, n_pos=None, metrics={}, pos=None, neg=None,
                                    reason="fewer than 10 patients")
    by_hand = SiteEvaluation("d", "test", None, hidden.overall, {"sex": {"X": cell}},
                             hidden.settings)
    assert "X" not in pooled_evaluation([by_hand]).subgroups["sex"]
