"""Fairness tables: fairlearn agreement, small-cell suppression, thresholds, generalisability."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import (
    MetricFrame,
    demographic_parity_difference,
    equalized_odds_difference,
)
from sklearn.metrics import roc_auc_score

from multimodal_fl.evaluation import (
    cross_site_matrix,
    fairness_report,
    local_vs_federated,
)
from multimodal_fl.evaluation.fairness import ALL_SITES
from multimodal_fl.evaluation.metrics import choose_threshold

from .conftest import make_predictions


def _cell(
    rep: Any, scope: str, metric: str = "auc", site: str = ALL_SITES,
    attribute: str | None = None, group: str | None = None,
) -> Any:
    c = rep.cells
    sel = c[(c.scope == scope) & (c.metric == metric) & (c.site == site)]
    sel = sel[sel.attribute.isna()] if attribute is None else sel[sel.attribute == attribute]
    sel = sel[sel.group.isna()] if group is None else sel[sel.group == group]
    assert len(sel) == 1, (scope, site, attribute, group)
    return sel.iloc[0]


def test_values_match_direct_computation(predictions: pd.DataFrame) -> None:
    rep = fairness_report(predictions, n_boot=200, threshold=0.35)
    test = predictions[predictions.split == "test"]
    for site, d in test.groupby("site"):
        row = _cell(rep, "site", site=str(site))
        if not row.suppressed:
            assert row.value == pytest.approx(roc_auc_score(d.label, d.score))
            assert row.lo <= row.value <= row.hi
            assert row.n == len(d) and row.n_pos == d.label.sum()
    for g, d in test.groupby("sex"):
        row = _cell(rep, "subgroup", attribute="sex", group=str(g))
        assert row.value == pytest.approx(roc_auc_score(d.label, d.score))
    row = _cell(rep, "site_subgroup", site="a", attribute="age_band", group="50-70")
    d = test[(test.site == "a") & (test.age_band == "50-70")]
    assert row.value == pytest.approx(roc_auc_score(d.label, d.score))
    sens = _cell(rep, "overall", metric="sensitivity")
    assert sens.value == pytest.approx(np.mean(test.score[test.label == 1] >= 0.35))


def test_worst_and_gap_agree_with_fairlearn(predictions: pd.DataFrame) -> None:
    rep = fairness_report(predictions, n_boot=0, threshold=0.35)
    test = predictions[predictions.split == "test"]
    mf = MetricFrame(metrics=roc_auc_score, y_true=test.label, y_pred=test.score,
                     sensitive_features=test.sex)
    s = rep.summary
    row = s[(s.scope == "across_groups") & (s.attribute == "sex") & (s.metric == "auc")].iloc[0]
    assert row.worst == pytest.approx(mf.group_min())
    assert row.best == pytest.approx(mf.group_max())
    assert row.gap == pytest.approx(mf.difference())
    assert row.spread == pytest.approx(np.std(mf.by_group.to_numpy()))
    # lower-is-better metric: worst is the max
    rowb = s[(s.scope == "across_sites") & (s.metric == "brier")].iloc[0]
    site_brier = rep.cells[(rep.cells.scope == "site") & (rep.cells.metric == "brier")]
    assert rowb.worst == pytest.approx(site_brier.value.max())


def test_disparities_agree_with_fairlearn(predictions: pd.DataFrame) -> None:
    rep = fairness_report(predictions, n_boot=0, threshold=0.35)
    test = predictions[predictions.split == "test"]
    d = test[test.site == "a"]
    pred = (d.score >= 0.35).astype(int)
    row = rep.disparities[(rep.disparities.site == "a") & (rep.disparities.attribute == "sex")]
    assert row.equalized_odds_difference.iloc[0] == pytest.approx(
        equalized_odds_difference(d.label, pred, sensitive_features=d.sex)
    )
    assert row.demographic_parity_difference.iloc[0] == pytest.approx(
        demographic_parity_difference(d.label, pred, sensitive_features=d.sex)
    )


def test_small_cells_are_suppressed_with_reason_never_a_number() -> None:
    df = make_predictions(sites=(("big", 500, 1.5), ("tiny", 25, 1.5)))
    # a group with only negatives at the big site
    df.loc[(df.site == "big") & (df.sex == "M") & (df.age_band == "70+"), "label"] = 0
    df["ward"] = np.where(df.age_band == "70+", "geri", "gen")
    rep = fairness_report(df, sensitive=["sex", "ward"], n_boot=100, threshold=0.4)
    c = rep.cells
    tiny = c[(c.scope == "site") & (c.site == "tiny")]
    assert tiny.suppressed.all() and tiny.value.isna().all() and tiny.lo.isna().all()
    assert (tiny.reason == "fewer than 10 patients").all()
    assert tiny.n.isna().all() and tiny.n_pos.isna().all()  # the small count is hidden too
    # every suppressed row carries a reason and no number
    sup = c[c.suppressed]
    assert len(sup) > 0 and sup.reason.notna().all() and sup.value.isna().all()
    # every shown cell has >= min_cell patients and both classes
    shown = c[~c.suppressed]
    assert (shown.n >= 10).all() and (shown.n_pos > 0).all() and (shown.n_neg > 0).all()
    # JSON never carries NaN; suppressed cells have value None and a reason
    js = rep.to_dict()
    text = json.dumps(js)
    assert "NaN" not in text
    for r in js["cells"]:
        assert (r["value"] is None) == r["suppressed"]
        if r["suppressed"]:
            assert r["reason"]
    # suppressed sites do not count as "worst"
    s = rep.summary
    row = s[(s.scope == "across_sites") & (s.metric == "auc")].iloc[0]
    assert row.worst_at == "big" and row.n_suppressed == 1
    assert row.reason == "fewer than 2 unsuppressed cells: no gap or spread"
    dis = rep.disparities[rep.disparities.site == "tiny"]
    assert dis.suppressed.all() and dis.equalized_odds_difference.isna().all()


def test_no_negatives_group_is_suppressed() -> None:
    df = make_predictions(sites=(("a", 600, 1.5),))
    df.loc[df.sex == "F", "label"] = 1
    rep = fairness_report(df, sensitive=["sex"], n_boot=0, threshold=0.5)
    f = _cell(rep, "subgroup", attribute="sex", group="F")
    assert f.suppressed and f.reason == "no negatives" and np.isnan(f.value)
    assert f.n > 0  # not a size suppression: the count may be shown
    dis = rep.disparities.iloc[0]
    assert dis.suppressed and "fewer than 2 groups" in dis.reason


def test_threshold_chosen_on_validation_split(predictions: pd.DataFrame) -> None:
    rep = fairness_report(predictions, n_boot=0)
    val = predictions[predictions.split == "val"]
    t = choose_threshold(val.label, val.score)
    assert set(rep.thresholds.values()) == {t}
    assert "val" in rep.threshold_source
    per = fairness_report(predictions, n_boot=0, per_site_threshold=True)
    for site, d in val.groupby("site"):
        assert per.thresholds[str(site)] == choose_threshold(d.label, d.score)


def test_per_site_thresholds_for_integer_site_ids() -> None:
    """{1: 0.5, 2: 0.4} names sites 1 and 2 of an integer site column (compared as str)."""
    rng = np.random.default_rng(0)
    n = 200
    df = pd.DataFrame({"site": rng.choice([1, 2], n), "label": rng.integers(0, 2, n),
                       "score": rng.random(n), "sex": rng.choice(["F", "M"], n)})
    rep = fairness_report(df, sensitive=["sex"], split=None, threshold={1: 0.5, 2: 0.4},
                          n_boot=0)
    assert rep.thresholds == {"1": 0.5, "2": 0.4}
    as_str = fairness_report(df, sensitive=["sex"], split=None,
                             threshold={"1": 0.5, "2": 0.4}, n_boot=0)
    pd.testing.assert_frame_equal(rep.cells, as_str.cells)
    with pytest.raises(ValueError, match=r"no entry for site\(s\) \['2'\]; it has \['1'\]"):
        fairness_report(df, sensitive=["sex"], split=None, threshold={1: 0.5}, n_boot=0)
    with pytest.raises(ValueError, match="site '1' two thresholds"):
        fairness_report(df, sensitive=["sex"], split=None, threshold={1: 0.5, "1": 0.3, 2: 0.4},
                        n_boot=0)


def test_missing_column_and_empty_split_errors(predictions: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match=r"lack column\(s\) \['ethnicity'\]"):
        fairness_report(predictions, sensitive=["ethnicity"], n_boot=0, threshold=0.5)
    with pytest.raises(ValueError, match="no rows with split == 'holdout'"):
        fairness_report(predictions, split="holdout", n_boot=0, threshold=0.5)
    with pytest.raises(ValueError, match="cannot choose a threshold"):
        fairness_report(predictions.assign(split="test"), n_boot=0)


def test_table_strings(predictions: pd.DataFrame) -> None:
    rep = fairness_report(predictions, n_boot=100, threshold=0.4)
    t = rep.table("auc", "site_subgroup", attribute="sex")
    texts = t["value"].tolist()
    assert any(x.startswith("—") for x in texts)  # site c cells are suppressed
    assert any("[" in x for x in texts)


def test_cross_site_matrix_and_local_vs_federated() -> None:
    base = make_predictions(sites=(("a", 500, 1.5), ("b", 400, 1.5), ("s", 8, 1.5)))
    base = base[base.split == "test"]
    rng = np.random.default_rng(0)
    rows = []
    for model in ("local:a", "local:b", "federated"):
        noise = 0.05 if model == "federated" else 0.25
        sc = np.clip(base.score + rng.normal(0, noise, len(base)), 0, 1)
        rows.append(base.assign(model=model, score=sc))
    long = pd.concat(rows, ignore_index=True)
    res = cross_site_matrix(long, n_boot=100)
    m = res.matrix
    assert m.shape == (3, 3)
    d = long[(long.model == "local:a") & (long.site == "b")]
    assert m.loc["local:a", "b"] == pytest.approx(roc_auc_score(d.label, d.score))
    assert bool(m.isna().loc["federated"].loc["s"])  # 8 patients: suppressed
    assert "NaN" not in json.dumps(res.to_dict())
    local = pd.concat([long[(long.model == f"local:{s}") & (long.site == s)] for s in "ab"])
    fed = long[long.model == "federated"]
    ch = local_vs_federated(local, fed, n_boot=200)
    assert list(ch.site) == ["a", "b"]
    for r in ch.to_dict("records"):
        assert r["change"] == pytest.approx(r["federated"] - r["local"])
        assert r["change_lo"] <= r["change"] <= r["change_hi"]
        assert r["change_lo"] > 0  # federated scores are far less noisy here
