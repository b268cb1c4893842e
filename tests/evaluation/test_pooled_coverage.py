"""Pooled figures outside the secure sum (centralized, local-only, a predictions table): the
same parts and the same rule as the secure sum, so no "(all sites)" cell lacks a site, no
pooled cell minus a site's disclosed figures gives what that site hid, and the pooled ECE is
the 10-bin ECE of the patients' scores."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from multimodal_fl.evaluation.fairness import ALL_SITES
from multimodal_fl.evaluation.histograms import (
    histogram_parts,
    pooled_from_counts,
    pooled_in_process,
)
from multimodal_fl.evaluation.metrics import expected_calibration_error
from multimodal_fl.evaluation.report.compute import report_from_runs, run_from_frame
from tests.smallcells import small_figures


def _site(n_female: tuple[int, int], n_male: tuple[int, int], seed: int) -> pd.DataFrame:
    """Test rows: (patients, positives) of each sex."""
    rng = np.random.default_rng(seed)
    rows = []
    for sex, (n, p) in (("female", n_female), ("male", n_male)):
        y = np.array([1] * p + [0] * (n - p))
        s = np.clip(rng.normal(0.3 + 0.3 * y, 0.15), 0.01, 0.99)
        rows.append(pd.DataFrame({"label": y, "score": s, "sex": sex}))
    return pd.concat(rows, ignore_index=True).assign(split="test")


def _hunt() -> dict[str, pd.DataFrame]:
    """The bug hunt's shape at min_cell 5: site_004 hides its 4 male positives, and with them
    (complementary suppression) its female class counts; the other sites have fewer than 5
    female positives, so they sent no female histogram to the old per-site pooling."""
    return {"site_001": _site((16, 3), (23, 5), 1), "site_002": _site((20, 4), (20, 7), 2),
            "site_003": _site((20, 2), (19, 4), 3), "site_004": _site((26, 10), (14, 4), 4)}


def _frame_run(sites: dict[str, pd.DataFrame], min_cell: int = 5):
    frame = pd.concat([d.assign(site=s) for s, d in sites.items()], ignore_index=True)
    return run_from_frame(frame, sensitive=["sex"], min_cell=min_cell, n_boot=0,
                          threshold=0.5)


def test_a_pooled_subgroup_cell_minus_a_sites_total_gives_no_hidden_count() -> None:
    sites = _hunt()
    run = _frame_run(sites)
    doc = run.disclosed["site_004"]
    female = doc.cell("auc", "sex", "female")
    assert female.n_pos is None  # hidden at the site
    # site_004 is in the pooled figures: its document is in the pooled form, no test class
    # count at all; the attack below grants the attacker the total its full document shows
    assert doc.pooled and doc.cell("auc").n_pos is None
    total = 14
    pooled = run.metrics["pooled_from_histograms"]
    hidden_male = 4
    for level, cell in pooled["subgroups"]["sex"].items():
        if cell.get("n_pos") is None:
            continue
        # the cell covers every site the overall cell covers, never site_004 alone
        assert sorted(cell["sites"]) == sorted(pooled["overall"]["sites"]) == sorted(sites)
        # the attack of the bug hunt: site_004's total minus the pooled cell (10 on the old
        # code, from site_004 alone) gives its hidden male positives
        assert total - cell["n_pos"] != hidden_male, level
    assert pooled["subgroups"]["sex"]["female"]["n_pos"] == 3 + 4 + 2 + 10


def test_no_pooled_row_that_lacks_a_site_is_labelled_all_sites() -> None:
    sites = _hunt()
    sites["site_005"] = _site((2, 1), (2, 0), 5)  # 4 test patients: not pooled
    run = _frame_run(sites)
    pooled = run.metrics["pooled_from_histograms"]
    assert "site_005" in pooled["overall"]["excluded"]
    doc, _, _ = report_from_runs([run], sensitive=["sex"])
    cells = next(iter(doc["fairness"].values()))["cells"]
    pooled_rows = [c for c in cells if c["scope"] in ("overall", "subgroup")]
    assert pooled_rows and ALL_SITES not in {c["site"] for c in pooled_rows}
    assert {c["site"] for c in pooled_rows} == {"(pooled: site_001, site_002, site_003, site_004)"}
    # with every site pooled, the rows are the run's all-sites rows
    full, _, _ = report_from_runs([_frame_run(_hunt())], sensitive=["sex"])
    cells = next(iter(full["fairness"].values()))["cells"]
    assert {c["site"] for c in cells if c["scope"] == "overall"} == {ALL_SITES}


def test_a_level_cell_without_every_site_is_labelled_by_its_own_sites() -> None:
    """A docs audit: a level only three of four sites hold was pooled over those three yet
    labelled "(all sites)" with the overall cell."""
    sites = {}
    for i, name in enumerate(("site_001", "site_002", "site_003", "site_004"), 1):
        d = _site((30, 12), (30, 12), i)
        if name != "site_004":  # 10 patients of each of the first three sites: unknown sex
            d.loc[d.index < 10, "sex"] = "unknown"
        sites[name] = d
    run = _frame_run(sites)
    unknown = run.metrics["pooled_from_histograms"]["subgroups"]["sex"]["unknown"]
    assert sorted(unknown["sites"]) == ["site_001", "site_002", "site_003"]
    doc, _, _ = report_from_runs([run], sensitive=["sex"])
    cells = next(iter(doc["fairness"].values()))["cells"]
    labels = {(c["scope"], c["group"]): c["site"] for c in cells
              if c["scope"] in ("overall", "subgroup")}
    assert labels[("overall", None)] == ALL_SITES
    assert labels[("subgroup", "unknown")] == "(pooled: site_001, site_002, site_003)"
    assert labels[("subgroup", "male")] == ALL_SITES


def test_a_site_without_positives_stays_in_the_pooled_overall_cell() -> None:
    sites = _hunt()
    sites["site_003"] = _site((20, 0), (19, 0), 3)
    pooled = _frame_run(sites).metrics["pooled_from_histograms"]
    assert "site_003" in pooled["overall"]["sites"]
    assert pooled["overall"]["n_pos"] + pooled["overall"]["n_neg"] == sum(map(len, sites.values()))


def test_an_old_run_whose_subgroup_cell_lacks_a_site_shows_no_figure() -> None:
    run = _frame_run(_hunt())
    pooled = run.metrics["pooled_from_histograms"]
    female = pooled["subgroups"]["sex"]["female"]
    # as the old per-site pooling wrote it: one site's histogram, the others excluded
    female.update(sites=["site_004"], excluded={s: "positives: fewer than 5 patients"
                                               for s in ("site_001", "site_002", "site_003")})
    doc, _, _ = report_from_runs([run], sensitive=["sex"])
    cells = next(iter(doc["fairness"].values()))["cells"]
    shown = [c for c in cells if c["scope"] == "subgroup" and c["group"] == "female"]
    assert shown and all(c["value"] is None and "site_001" in c["reason"] for c in shown)


def test_the_pooled_ece_is_the_10_bin_ece_of_the_patients_scores() -> None:
    rng = np.random.default_rng(7)
    ys, ss, total = [], [], {}
    for n in (600, 300, 80):
        y = (rng.random(n) < 0.3).astype(int)
        s = 1 / (1 + np.exp(-rng.normal(-1 + 1.6 * y, 1.0)))
        ys.append(y)
        ss.append(s)
        for k, v in histogram_parts(y, s, n_bins=100, min_cell=10).items():
            total[k] = total.get(k, 0) + v
    y, s = np.concatenate(ys), np.concatenate(ss)
    exact = expected_calibration_error(y, s)
    overall = pooled_from_counts(total, min_cell=10).overall
    lower, upper = overall["ece_bounds"]
    assert lower <= exact <= upper
    assert abs(overall["ece"] - exact) <= 0.5 / 100  # each patient within half a fine bin
    assert overall["ece_bins"] == "10 equal-width bins"
    # a grid that does not refine the 10 bins: the ECE is on the calibration bins, and says so
    coarse = {k: v for k, v in histogram_parts(y, s, n_bins=25, min_cell=10).items()}
    assert pooled_from_counts(coarse, min_cell=10).overall["ece_bins"] == \
        "the calibration bins shown"


def test_in_process_pooling_needs_three_sites() -> None:
    sites = {k: v for k, v in _hunt().items() if k in ("site_001", "site_002")}
    pooled = pooled_in_process(sites, sensitive=["sex"], min_cell=dict.fromkeys(sites, 5))
    assert pooled.overall["reason"].startswith("refused") and "auc" not in pooled.overall
    assert json.dumps(pooled.to_dict())  # JSON-ready


def test_a_site_whose_policy_refuses_the_secure_sum_is_not_pooled_in_process() -> None:
    """A site whose policy's ``answers`` leaves out ``secure_sum`` joins no secure sum on the
    federated engine; on the code before, the in-process total added it all the same."""
    from multimodal_fl.config import SitePolicy
    from multimodal_fl.evaluation.histograms import pooled_sites_in_process

    sites = _hunt()
    tests = dict(sites)
    refuses = {"site_001": True, "site_002": True, "site_003": True, "site_004": False}
    kwargs = {"sensitive": ["sex"], "min_cell": dict.fromkeys(tests, 5)}
    everyone = pooled_in_process(tests, **kwargs)
    assert sorted(everyone.overall["sites"]) == sorted(sites)  # non-vacuity
    out = pooled_in_process(tests, secure_sum=refuses, **kwargs)
    assert sorted(out.overall["sites"]) == ["site_001", "site_002", "site_003"]
    assert out.overall["excluded"]["site_004"] == SitePolicy.refusal("secure_sum")
    assert out.overall["n_pos"] == 3 + 5 + 4 + 7 + 2 + 4
    assert pooled_sites_in_process(tests, secure_sum=refuses, **kwargs) == [
        "site_001", "site_002", "site_003"]


def _banded(counts: dict[str, tuple[int, int]], seed: int) -> pd.DataFrame:
    """Test rows: (patients, positives) of each age band."""
    rng = np.random.default_rng(seed)
    rows = []
    for band, (n, p) in counts.items():
        y = np.array([1] * p + [0] * (n - p))
        s = np.clip(rng.normal(0.3 + 0.3 * y, 0.15), 0.01, 0.99)
        rows.append(pd.DataFrame({"label": y, "score": s, "age_band": band}))
    return pd.concat(rows, ignore_index=True).assign(split="test")


def test_a_small_band_of_one_site_joins_the_pooled_band_under_its_own_name() -> None:
    """The Mexico cohort's shape: one institution holds 3 test patients aged 75+ (under its
    min_cell 10), the others 20 each. Named by data, that site's 75+ was "(other)", the 75+
    part was held by 2 sites, and the whole age_band attribute left the pooled report. The
    task fixes the bands, so every site lays each one out and the pooled 75+ cell holds all
    43 patients; the 3 are never shown as a cell of their own."""
    from multimodal_fl.config import load_task
    from multimodal_fl.data.tasks import declared_levels

    big = {"0-39": (40, 12), "40-59": (40, 12), "60-74": (30, 10), "75+": (20, 10)}
    tests = {"a": _banded(big, 1), "b": _banded(big, 2),
             "c": _banded({**big, "75+": (3, 1)}, 3)}
    kwargs = {"sensitive": ["age_band"], "min_cell": dict.fromkeys(tests, 10)}
    by_data = pooled_in_process(tests, **kwargs)  # the rule before: levels named by data
    assert "auc" not in by_data.subgroups["age_band"]["75+"]
    assert "'age_band' left out" in by_data.subgroups["age_band"]["0-39"]["reason"]
    declared = declared_levels(load_task("covid_oxygen_24h"), ["age_band"])
    pooled = pooled_in_process(tests, declared=declared, **kwargs)
    bands = pooled.subgroups["age_band"]
    assert sorted(bands) == ["0-39", "40-59", "60-74", "75+"]  # no empty or "(other)" level
    assert bands["75+"]["n_pos"] + bands["75+"]["n_neg"] == 43
    assert sorted(bands["75+"]["sites"]) == ["a", "b", "c"]
    assert all("auc" in c for c in bands.values())
    assert small_figures(pooled.to_dict(), 10) == []
