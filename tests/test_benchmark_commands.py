"""The one-command benchmarks print their tables: ``make demo``'s timing table, and the docs
helper ``benchmarks/report_screenshot.py`` answers ``--help`` like every benchmark script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.scripts import load_script

REPO = Path(__file__).resolve().parents[1]




def test_demo_prints_its_timing_table() -> None:
    """``scripts/demo.py`` ends with one Markdown row per step and the whole demo last."""
    demo = load_script(REPO / "scripts" / "demo.py")
    steps = [("data summary: configs/covid_oxygen.yaml", 4.64),
             ("train covid_oxygen (inprocess)", 108.04)]
    table = demo.timing_table(steps, 371.4)
    assert table.splitlines() == [
        "| step | wall s |",
        "| --- | ---: |",
        "| data summary: configs/covid_oxygen.yaml | 4.6 |",
        "| train covid_oxygen (inprocess) | 108.0 |",
        "| whole demo | 371 |",
    ]


def test_report_screenshot_answers_help() -> None:
    """``--help`` prints the usage and exits 0 instead of being taken for the report's path."""
    script = REPO / "benchmarks" / "report_screenshot.py"
    out = subprocess.run([sys.executable, str(script), "--help"],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage:") and "html" in out.stdout and "out" in out.stdout


def test_dp_benchmark_counts_clipped_sites_on_both_paths() -> None:
    """A plain round names its clipped sites; a secured round records only their number."""
    dp = load_script(REPO / "benchmarks" / "dp.py")
    assert dp.clipped_sites({"clipped": ["site_a", "site_c"], "noise_std": 0.1}) == 2
    assert dp.clipped_sites({"clipped_count": 3, "clipped_at": "site"}) == 3
    assert dp.clipped_sites({}) == 0


def test_mexico_fairness_cells_say_when_counts_were_not_released() -> None:
    """A pooled-form cell has an AUC but no counts: the table says so instead of "None pos"."""
    module = load_script(REPO / "benchmarks" / "mexico_covid.py")
    cell = {"value": 0.6, "lo": 0.5, "hi": 0.7}
    assert module._cell_text({**cell, "n": 2363, "n_pos": None}) == "0.600 [0.500, 0.700] (n 2363)"
    assert "None" not in module._cell_text({**cell, "n": None, "n_pos": None})
    assert module._cell_text({**cell, "n": 10, "n_pos": 3}).endswith("(n 10, 3 pos)")


def test_calibration_benchmark_fits_on_the_runs_own_validation_inputs() -> None:
    """Sites in the secure sum give their fine validation histogram; a site that disclosed its
    (coarsened) histogram at the named round gives that one instead, spread over its bins."""

    import numpy as np
    import pandas as pd

    bench = load_script(REPO / "benchmarks" / "calibration.py")
    rows = pd.DataFrame({
        "site": ["a", "a", "a", "b", "b", "b"],
        "split": ["val", "val", "test", "val", "val", "val"],
        "label": [0, 1, 1, 0, 1, 1],
        "score_raw": [0.05, 0.95, 0.5, 0.15, 0.55, 0.65],
    })
    disclosed = {"n_bins": 10, "pos": {"start": [4], "stop": [8], "count": [2]},
                 "neg": {"start": [0], "stop": [2], "count": [1]}}
    metrics = {"recalibration": {"source": "the secure sum of the validation histograms of 1 "
                                           "sites (a) and the validation histograms of round 2 "
                                           "disclosed by b"},
               "rounds": [{"round": 1}, {"round": 2, "eval_documents": {"b": {"validation":
                                                                              disclosed}}}]}
    neg, pos = bench.validation_inputs(rows, metrics, 10)
    assert neg.tolist() == [1.5, 0.5, 0, 0, 0, 0, 0, 0, 0, 0]  # a's 0.05 + b's cell over 2 bins
    assert pos.tolist() == [0, 0, 0, 0, 0.5, 0.5, 0.5, 0.5, 0, 1]  # b's cell over 4 bins + a's 0.95
    every_row = {"recalibration": {"source": "the pooled validation rows"}, "rounds": []}
    neg, pos = bench.validation_inputs(rows, every_row, 10)
    assert neg.sum() == 2 and pos.sum() == 3 and np.all(neg >= 0)


def test_calibration_benchmark_yardsticks_fit_on_the_rows_they_name() -> None:
    """The "test rows" yardstick is Platt fitted in sample (its mean predicted risk is the
    observed fraction); the "every validation row" one is fitted on the validation rows only
    (a validation split with another prevalence moves it, the test rows do not)."""

    import numpy as np
    import pandas as pd

    bench = load_script(REPO / "benchmarks" / "calibration.py")
    rng = np.random.default_rng(0)
    score = rng.uniform(0.05, 0.95, 800)
    split = np.where(np.arange(800) < 400, "val", "test")
    risk = np.where(split == "val", 0.9 * score, 0.3 * score)  # validation prevalence 3x test's
    label = rng.binomial(1, risk)
    rows = pd.DataFrame({"site": "a", "split": split, "label": label, "score_raw": score,
                         "score": score})
    metrics = {"recalibration": {"method": "none", "applied": False,
                                 "source": "the pooled validation rows"}, "rounds": []}
    result = bench.measure(rows, metrics, ["platt"], n_bins=100, n_sim=20, seed=0)
    in_sample = result.yardsticks["the test rows"]
    on_val = result.yardsticks["every validation row"]
    assert set(result.yardsticks) == set(bench.YARDSTICKS)
    assert in_sample.citl < 0.01
    assert on_val.citl > 0.15  # fitted where the prevalence is three times the test's
    assert abs(on_val.auc - in_sample.auc) < 1e-9  # both monotone maps of the same scores
