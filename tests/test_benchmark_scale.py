"""``benchmarks/scale.py``: the cohort's CPU seconds, and ``--cohort-only`` runs that stop there."""

from __future__ import annotations

import math
from pathlib import Path
from types import ModuleType

import pytest

from tests.scripts import load_script

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scale() -> ModuleType:
    """``benchmarks/scale.py``, loaded as a module."""
    return load_script(REPO / "benchmarks" / "scale.py", "scale_bench")


def test_cohort_only_stops_after_the_cohorts_and_counts_their_cpu(
        scale: ModuleType, tmp_path: Path) -> None:
    """The run stops at the first site's preparation: the cohort's wall and CPU seconds are
    measured, nothing is embedded (the cache stays empty) and the later figures are NaN."""
    row = scale.one("2d", 40, 2, 1, tmp_path, cohort_only=True)
    assert row["patients"] == 40 and row["sites"] == 2
    assert row["cohort_s"] > 0 and row["cohort_cpu_s"] > 0
    assert math.isnan(row["embedding_s"]) and math.isnan(row["round_s"])
    assert math.isnan(row["total_s"])
    cache = tmp_path / "cache-2d-40-2"
    assert not cache.exists() or not any(p.is_file() for p in cache.rglob("*"))
    assert not (tmp_path / "run-2d-40-2").exists()
    text = scale.line({**row, "cohort_cpu_s": 0.5}, cohort_only=True)
    assert text.count("|") == scale.header(cohort_only=True).count("|")
    assert "| 0.5 | 12.50 |" in text  # 0.5 CPU s for 40 patients: 12.50 per 1,000


def test_full_rows_carry_the_cohort_cpu_column(scale: ModuleType) -> None:
    """A full run's row has the cohort's CPU seconds beside its wall seconds."""
    row = {"variant": "2d", "patients": 50000, "sites": 20, "generate_s": float("nan"),
           "cohort_s": 390.5, "cohort_cpu_s": 131.6, "embedding_s": 1687.8, "round_s": 0.73,
           "peak_cohort_mb": 1407.0, "peak_embedding_mb": 1515.0, "peak_mb": 1515.0,
           "load": (4.0, 3.0, 2.0)}
    text = scale.line(row)
    assert text.startswith("| 2d | 50,000 | 20 | - | 390.5 | 131.6 | 1687.8 | 0.73 |")
    assert text.count("|") == scale.header().count("|")
    assert "cohort CPU s" in scale.header()


def test_cpu_seconds_counts_exited_children(scale: ModuleType) -> None:
    """A child's CPU time counts once it has exited (the cohort pool's workers have)."""
    import subprocess
    import sys

    before = scale.cpu_seconds()
    subprocess.run([sys.executable, "-c", "sum(i * i for i in range(3_000_000))"], check=True)
    assert scale.cpu_seconds() - before > 0.05
