"""One quantity, one number: a site's test AUC has one 95% interval wherever it is shown.

The console and ``metrics.json`` (``metrics_by_split``), the site's disclosed document (its
splits and its fairness cells), ``report.json`` and the model card each compute or copy a
site's test-split interval, and a local-only model's cross-site cell on its own site scores
the same patients; every bootstrap of a set of patients is seeded by one rule
(:func:`~multimodal_fl.evaluation.metrics.bootstrap_seed`), so they agree. A small ``n_boot``
(20) makes any difference of seeds visible: two draws of 20 resamples give other percentiles.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from multimodal_fl.engines import run
from multimodal_fl.engines.finish import CARD_JSON, REPORT_DIR
from multimodal_fl.evaluation.disclosed import coarse_rank
from tests.test_cross_site import _balanced_labels, _cfg

#: Different paths compute the same interval from the same scores: equal up to float noise.
TOL = 1e-12


def _close(a: float | None, b: float | None) -> bool:
    return (a is None) == (b is None) and (a is None or b is None or abs(a - b) <= TOL)


def _site_cells(report: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """``report.json``'s per-site test cells (scope ``site``) of the run, by site and metric."""
    section = next(iter(report["fairness"].values()))
    return {(c["site"], c["metric"]): c for c in section["cells"] if c["scope"] == "site"}


def test_a_sites_test_interval_is_one_number_everywhere(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    # balanced labels, no validation split, half the patients in test: site_a's test AUC is
    # shown (min_cell 5 of each class), every site's Brier score and ECE
    cfg = _balanced_labels(_cfg(tiny_config, {"train": 0.5, "val": 0.0, "test": 0.5}),
                           tmp_path)
    assert cfg.evaluation.n_boot == 20
    out = run(cfg, engine="inprocess", out_dir=tmp_path / "run").run_dir
    metrics = json.loads((out / "metrics.json").read_text())
    report = json.loads((out / REPORT_DIR / "report.json").read_text())
    card = json.loads((out / CARD_JSON).read_text())["performance"]
    cells = _site_cells(report)
    shown: list[tuple[str, str]] = []
    for site in sorted(metrics["sites"]):
        disclosed = json.loads((out / "disclosed" / f"{site}.json").read_text())
        own_cells = {c["metric"]: c for c in disclosed["cells"] if c["scope"] == "site"}
        # what the console prints is metrics.json's figure
        for metric, console in metrics["sites"][site]["metrics"]["test"].items():
            if console["value"] is None:
                continue
            shown.append((site, metric))
            assert console["lo"] is not None and console["n_boot"] == 20, (site, console)
            views = {"disclosed split": disclosed["splits"]["test"]["metrics"][metric],
                     "disclosed cell": own_cells[metric], "report.json": cells[site, metric],
                     "model card": card["sites"][site][metric],
                     "model card (report)": card["report_sites"][site][metric]}
            for where, got in views.items():
                for part in ("value", "lo", "hi"):
                    assert _close(got[part], console[part]), (site, metric, where, part, got,
                                                              console)
    assert ("site_a", "auc") in shown and len({s for s, _ in shown}) >= 2, shown
    # the pooled figures are the secure sum's: one interval in metrics.json and report.json
    pooled = metrics["pooled_from_histograms"]["overall"]["auc"]
    overall = next(c for c in next(iter(report["fairness"].values()))["cells"]
                   if c["scope"] == "overall" and c["metric"] == "auc")
    assert pooled["value"] is not None and pooled["lo"] is not None
    for part in ("value", "lo", "hi"):
        assert _close(overall[part], pooled[part]), (part, overall, pooled)


def test_a_local_models_own_cross_site_cell_is_its_sites_test_interval(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    # no validation split: no recalibration, so the cross-site cell of a site's own model
    # scores the same patients with the same scores as its predict reply
    cfg = _balanced_labels(_cfg(tiny_config, {"train": 0.5, "val": 0.0, "test": 0.5}),
                           tmp_path)
    out = run(cfg, engine="local", out_dir=tmp_path / "run", report=False).run_dir
    metrics = json.loads((out / "metrics.json").read_text())
    assert not any(s["applied"] for s in metrics["recalibration"]["sites"].values())
    cross = {(c["model"], c["test_site"]): c
             for c in json.loads((out / "cross_site.json").read_text())["cells"]}
    shown = 0
    for site, doc in sorted(metrics["sites"].items()):
        console = doc["metrics"]["test"]["auc"]
        if console["value"] is None:
            continue
        shown += 1
        cell = cross[f"local:{site}", site]
        for part in ("value", "lo", "hi"):  # the cell at its two decimals (coarse_rank)
            assert _close(cell[part], coarse_rank(console[part])), (site, part, cell, console)
    assert shown >= 1


def test_the_in_process_summary_gives_a_sites_interval_as_a_run_does() -> None:
    """``summarise_site`` (the in-process helper) seeded its bootstrap by the site's name, so
    the same scores got another interval than the run's ``metrics_by_split`` (a review)."""
    import numpy as np
    import pandas as pd

    from multimodal_fl.evaluation.histograms import summarise_site
    from multimodal_fl.training.inference import metrics_by_split

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 80)
    s = np.clip(0.3 * y + rng.uniform(0, 0.7, 80), 0, 1)
    frame = pd.DataFrame({"label": y, "score": s, "split": "test"})
    run_auc = metrics_by_split(frame, n_boot=20, seed=0, min_cell=5)["test"]["auc"]
    summary = summarise_site("site_a", y, s, n_boot=20, seed=0, min_cell=5)
    helper_auc = summary.overall.metrics["auc"]
    assert _close(run_auc.lo, helper_auc.lo) and _close(run_auc.hi, helper_auc.hi)
