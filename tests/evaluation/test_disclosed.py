"""A site's disclosed report document: small cells, complementary suppression, steps, reader."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import pytest

from multimodal_fl.evaluation.disclosed import (
    DISCLOSURE_VERSION,
    Suppression,
    complementary_suppression,
    read_disclosure,
    score_steps,
    site_disclosure,
    split_suppression,
)
from multimodal_fl.evaluation.fairness import fairness_report
from multimodal_fl.evaluation.histograms import UNNAMED

from .conftest import make_predictions

MIN_CELL = 10


def _site(n_test: int = 61, seed: int = 0) -> pd.DataFrame:
    """One site: 61 test patients (30 female, 30 male, 1 of sex "unknown": positive, 0.93)."""
    rng = np.random.default_rng(seed)
    n = 200
    y = (rng.random(n) < 0.35).astype(int)
    s = 1.0 / (1.0 + np.exp(-rng.normal(-1.0 + 1.8 * y, 1.0)))
    split = np.array(["train"] * 100 + ["val"] * (n - 100 - n_test) + ["test"] * n_test)
    sex = rng.choice(["female", "male"], n)
    frame = pd.DataFrame({"patient_id": [f"p{i}" for i in range(n)], "split": split,
                          "label": y, "score": s, "sex": sex,
                          "age_band": rng.choice(["<50", "50-70", "70+"], n, p=[.3, .6, .1])})
    test = np.flatnonzero(split == "test")
    frame.loc[test[:30], "sex"] = "female"
    frame.loc[test[30:60], "sex"] = "male"
    frame.loc[test[60], ["sex", "label", "score"]] = ["unknown", 1, 0.93]
    return frame


def _numbers(doc: Any) -> Iterator[float]:
    if isinstance(doc, dict):
        for v in doc.values():
            yield from _numbers(v)
    elif isinstance(doc, list):
        for v in doc:
            yield from _numbers(v)
    elif isinstance(doc, float):
        yield doc


def _keys(doc: Any) -> Iterator[str]:
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield k
            yield from _keys(v)
    elif isinstance(doc, list):
        for v in doc:
            yield from _keys(v)


def _derivable(total: int | None, parts: list[int | None]) -> int | None:
    """What subtracting the released parts from the released total reveals (None: nothing)."""
    if total is None or all(p is not None for p in parts):
        return None
    return total - sum(p for p in parts if p is not None)


def _assert_nothing_derivable(doc: dict[str, Any], min_cell: int,
                              totals: Suppression | None = None) -> None:
    """No released count is small, and no total minus released parts gives a small count.

    ``totals``: what the site withholds of its total over the run (:func:`split_suppression`);
    a single hidden split is derivable unless the total of that count is withheld.
    """
    cells = [c for c in doc["cells"] if c["metric"] == "auc"]
    site = next(c for c in cells if c["scope"] == "site")
    for c in cells:
        for k in ("n", "n_pos", "n_neg"):
            assert c[k] is None or c[k] == 0 or c[k] >= min_cell, c
    for a in doc["sensitive"]:
        groups = [c for c in cells if c["attribute"] == a]
        for k in ("n", "n_pos", "n_neg"):
            left = _derivable(site[k], [g[k] for g in groups])
            assert left is None or left == 0 or left >= min_cell, (a, k, left)
            hidden = [g for g in groups if g[k] is None]
            assert len(hidden) != 1 or site[k] is None, (a, k)  # one hidden cell: derivable
    splits = doc["splits"]
    for k in ("n", "n_pos"):
        parts = [s[k] for s in splits.values()]
        hidden = [p for p in parts if p is None]
        withheld = totals is not None and (totals.total if k == "n" else totals.total_classes)
        assert len(hidden) != 1 or withheld, (k, parts)


def test_overall_minus_the_released_groups_reveals_no_suppressed_patient() -> None:
    # the attack: 61 test patients, one of sex "unknown" (positive, score 0.93);
    # overall - female - male would give that patient's count, label and score
    frame = _site()
    doc = site_disclosure(frame, site="s", sensitive=["sex", "age_band"], min_cell=MIN_CELL,
                          n_boot=50, seed=0)
    sex = {c["group"]: c for c in doc["cells"]
           if c["attribute"] == "sex" and c["metric"] == "auc"}
    # the level held by one patient is not named: the patient is in the unnamed group
    assert "unknown" not in sex and "unknown" not in json.dumps(doc)
    assert sex[UNNAMED]["suppressed"] and sex[UNNAMED]["n"] is None
    assert sex[UNNAMED]["reason"] == "fewer than 10 patients"
    # its complement is suppressed too: the hidden cells hold 31 patients, not 1
    assert sum(1 for c in sex.values() if c["n"] is None) == 2
    assert any(c["reason"].startswith("complementary suppression") for c in sex.values()
               if c["reason"])
    _assert_nothing_derivable(doc, MIN_CELL)
    assert "score_sum" not in set(_keys(doc))  # no score sums anywhere
    assert not any(abs(x - 0.93) < 1e-6 for x in _numbers(doc))  # its score is nowhere
    json.dumps(doc, allow_nan=False)  # plain JSON, no NaN


@pytest.mark.parametrize("seed", range(6))
def test_no_seed_leaves_a_small_cell_derivable(seed: int) -> None:
    pred = make_predictions(seed, sites=(("a", 300, 1.4), ("b", 90, 1.0)))
    for site, frame in pred.groupby("site"):
        for mc in (5, 10):
            doc = site_disclosure(frame, site=str(site), min_cell=mc, n_boot=0, seed=seed)
            # every split's size and class counts leave in the run (the training count with
            # every fit): the site's total is what it withholds (split_suppression)
            _assert_nothing_derivable(doc, mc, split_suppression(frame, min_cell=mc))


def test_complementary_suppression_rules() -> None:
    # one small group: the next smallest joins it
    sup = complementary_suppression({"f": (30, 10), "m": (30, 12), "u": (1, 1)}, min_cell=10)
    assert set(sup.hidden) == {"u", "f"} and sup.hidden["u"] == "fewer than 10 patients"
    # two small groups that together hold 10: enough
    sup = complementary_suppression({"x": (40, 20), "y": (6, 2), "z": (4, 1)}, min_cell=10)
    assert set(sup.hidden) == {"y", "z"}
    # class counts: a group with 3 positives hides its class counts, and so does the next
    sup = complementary_suppression({"x": (40, 20), "y": (20, 3), "z": (25, 12)}, min_cell=10)
    assert sup.hidden == {} and set(sup.classes_hidden) == {"y", "z"}
    # the total's class counts withheld: nothing to subtract from
    sup = complementary_suppression({"x": (40, 20), "y": (20, 3)}, min_cell=10,
                                    classes_released=False)
    assert set(sup.classes_hidden) == {"y"}


def test_a_public_part_is_never_hidden_for_another_the_total_is() -> None:
    """The finding: 4 validation and 4 test patients under min_cell 10. Hiding the training
    count protected nothing (every fit sends it); the total is withheld instead."""
    parts = {"train": (24, 12), "val": (4, 1), "test": (4, 2)}
    sup = complementary_suppression(parts, min_cell=10, what="split")
    assert set(sup.hidden) == {"train", "val", "test"} and sup.total is None  # one document
    sup = complementary_suppression(parts, min_cell=10, what="split", public=list(parts))
    assert set(sup.hidden) == {"val", "test"} and "train" not in sup.classes_hidden
    assert sup.total is not None and sup.total_classes is not None
    # large splits: the total leaves; a split whose class counts are small withholds the
    # total's positives, not another split's class counts
    parts = {"train": (100, 30), "val": (30, 3), "test": (30, 10)}
    sup = complementary_suppression(parts, min_cell=10, what="split", public=list(parts))
    assert sup.hidden == {} and set(sup.classes_hidden) == {"val"}
    assert sup.total is None and sup.total_classes is not None
    frame = pd.DataFrame({"split": [s for s, (n, _) in parts.items() for _ in range(n)],
                          "label": [int(i < p) for _, (n, p) in parts.items() for i in range(n)],
                          "score": 0.5})
    assert split_suppression(frame, min_cell=10) == sup


def test_class_counts_and_class_metrics_need_min_cell_of_each_class() -> None:
    rng = np.random.default_rng(3)
    n = 40
    frame = pd.DataFrame({"split": "test", "label": [1, 1, 1] + [0] * (n - 3),
                          "score": rng.random(n)})
    doc = read_disclosure(site_disclosure(frame, site="s", sensitive=[], min_cell=10, n_boot=0))
    assert doc.splits["test"].n == n and doc.splits["test"].n_pos is None
    for m in ("auc", "average_precision", "sensitivity"):
        c = doc.cell(m)
        assert c is not None and c.value is None and c.reason == "fewer than 10 positives"
    brier = doc.cell("brier")
    assert brier is not None and brier.value is not None and brier.n == n
    assert brier.n_pos is None and brier.n_neg is None
    assert doc.roc.reason == "fewer than 10 positives" and doc.calibration.bins == []


def test_released_cells_are_fairlearns_at_the_site() -> None:
    frame = make_predictions(1, sites=(("a", 600, 1.5),)).drop(columns=["site"])
    doc = read_disclosure(site_disclosure(frame, site="a", min_cell=10, n_boot=30, seed=4))
    ref = fairness_report(frame.assign(site="a"), min_cell=10, n_boot=30, seed=4,
                          threshold=doc.threshold).cells
    shown = [c for c in doc.cells if not c.suppressed]
    assert len(shown) > 12
    for c in shown:
        scope = "site" if c.attribute is None else "site_subgroup"
        r = ref[(ref["scope"] == scope) & (ref["metric"] == c.metric)
                & (ref["attribute"].isna() if c.attribute is None else
                   (ref["attribute"] == c.attribute) & (ref["group"] == c.group))].iloc[0]
        assert (c.value, c.lo, c.hi) == (r["value"], r["lo"], r["hi"])


@pytest.mark.parametrize("seed", range(20))
def test_score_steps_hold_zero_or_min_cell_of_each_class(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 400))
    y = (rng.random(n) < rng.uniform(0.1, 0.6)).astype(int)
    s = 1.0 / (1.0 + np.exp(-rng.normal(-1.0 + 2.0 * y, 1.0)))
    mc = int(rng.integers(2, 15))
    steps = score_steps(y, s, min_cell=mc, n_bins=100)
    if isinstance(steps, str):
        assert 0 < y.sum() < mc or 0 < n - y.sum() < mc
        return
    assert steps[0][0] == 0 and steps[-1][1] == 100
    assert all(a[1] == b[0] for a, b in itertools.pairwise(steps))
    for _, _, p, q in steps:
        assert p + q > 0 and (p == 0 or p >= mc) and (q == 0 or q >= mc)
    assert sum(p for *_, p, _ in steps) == y.sum()
    # the ROC points of a site are these steps' cumulative class fractions
    frame = pd.DataFrame({"split": "test", "label": y, "score": s})
    doc = read_disclosure(site_disclosure(frame, site="s", sensitive=[], min_cell=mc,
                                          n_boot=0))
    assert doc.roc.threshold == [a / 100 for a, *_ in steps]
    for t, tpr, fpr in zip(doc.roc.threshold, doc.roc.tpr, doc.roc.fpr, strict=True):
        assert tpr == pytest.approx(np.mean(s[y == 1] >= t) if y.sum() else math.nan)
        assert fpr == pytest.approx(np.mean(s[y == 0] >= t))
    assert sum(b.n for b in doc.calibration.bins) == n


def test_the_site_threshold_is_a_grid_edge_chosen_on_validation() -> None:
    frame = make_predictions(2, sites=(("a", 600, 1.5),)).drop(columns=["site"])
    doc = read_disclosure(site_disclosure(frame, site="a", n_boot=0))
    assert doc.threshold_source.startswith("chosen on the site's validation split (youden")
    assert round(doc.threshold * 100, 9).is_integer()
    assert not np.isclose(frame["score"].to_numpy(), doc.threshold, atol=1e-9).any()
    small = frame[frame["split"] != "val"]
    doc = read_disclosure(site_disclosure(
        pd.concat([small, frame[frame["split"] == "val"].head(12)]), site="a", n_boot=0))
    assert doc.threshold == 0.5 and doc.threshold_source.startswith("0.5: the site's")
    fixed = read_disclosure(site_disclosure(frame, site="a", n_boot=0, threshold_rule="0.3"))
    assert (fixed.threshold, fixed.threshold_source) == (0.3, "given (0.3)")


def test_a_policy_without_subgroup_summaries_sends_only_the_sites_cells() -> None:
    frame = make_predictions(0, sites=(("a", 400, 1.5),)).drop(columns=["site"])
    doc = read_disclosure(site_disclosure(frame, site="a", n_boot=0, subgroup_summaries=False))
    assert {c.scope for c in doc.cells} == {"site"} and doc.disparities == []
    assert doc.sensitive == [] and "withheld by the site's policy" in doc.notes[0]


def test_read_disclosure_refuses_an_unknown_version_in_one_line() -> None:
    frame = make_predictions(0, sites=(("a", 200, 1.5),)).drop(columns=["site"])
    doc = site_disclosure(frame, site="a", n_boot=0)
    assert read_disclosure(json.loads(json.dumps(doc))).model_dump(mode="json") == doc
    for bad in (doc | {"version": DISCLOSURE_VERSION + 1}, {"site": "a"}):
        with pytest.raises(ValueError, match=r"^x.json: disclosed-document version .* is not "
                           r"one multimodal_fl .* reads \(version 1\); build the report") as e:
            read_disclosure(bad, where="x.json")
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"^x.json: field 'threshold'"):
        read_disclosure(doc | {"threshold": "high"}, where="x.json")
