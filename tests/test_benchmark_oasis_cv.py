"""benchmarks/oasis_cv.py: without the OASIS-1 data it says why and exits 0; its fold plan."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("oasis_cv", REPO / "benchmarks" / "oasis_cv.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["oasis_cv"] = module
    spec.loader.exec_module(module)
    return module


def test_skips_cleanly_without_the_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _load().main(["--data", str(tmp_path / "absent")]) == 0
    err = capsys.readouterr().err
    assert "skipped: no OASIS-1 data" in err and "absent" in err


def test_folds_are_stratified_and_the_inner_split_stays_in_the_training_folds() -> None:
    y = np.array([0, 1] * 25)
    plan = _load().fold_plan(y, 5, 2, 0)
    assert len(plan) == 10
    for repeat in (0, 1):
        tests = np.concatenate([f.test for f in plan if f.repeat == repeat])
        assert sorted(tests) == list(range(50))  # every subject tested once per repeat
    for f in plan:
        inner = np.concatenate([f.train, f.val])
        assert not set(inner) & set(f.test) and len(inner) + len(f.test) == 50
        assert y[f.test].sum() == 5 and y[f.val].sum() == 4  # stratified
