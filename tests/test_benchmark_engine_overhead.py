"""``benchmarks/engine_overhead.py``'s per-message breakdown, on made-up timing lines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.scripts import load_script

REPO = Path(__file__).resolve().parents[1]


def _module() -> Any:
    return load_script(REPO / "benchmarks" / "engine_overhead.py")


def _line(site: str, rnd: int, kind: str = "fit", *, start: float, end: float,
          import_cpu: float, handoff_cpu: float) -> dict[str, Any]:
    part = {"wall": 0.1, "cpu": 0.01}
    return {"site": site, "kind": kind, "round": rnd, "process_start": start, "handler_end": end,
            "flower_start": {"wall": 1.0, "cpu": 1.0}, "import": {"wall": 0.1, "cpu": import_cpu},
            "handler_wait": part, "handoff": {"wall": 0.2, "cpu": handoff_cpu},
            "site_work": {"wall": 2.0, "cpu": 1.5, "in_worker": True}}


def test_message_breakdown_takes_the_package_share_and_what_flower_leaves() -> None:
    breakdown = _module().message_breakdown
    lines = [
        _line("a", 1, start=0.0, end=4.0, import_cpu=0.01, handoff_cpu=0.01),
        _line("b", 1, start=0.0, end=6.0, import_cpu=0.02, handoff_cpu=0.02),
        _line("a", 2, start=10.0, end=13.0, import_cpu=0.03, handoff_cpu=0.03),
        _line("b", 2, start=10.0, end=12.0, import_cpu=0.5, handoff_cpu=0.5),
        _line("a", 2, "evaluate", start=20.0, end=21.0, import_cpu=9.0, handoff_cpu=9.0),
    ]
    rounds = [{"round": 1.0, "record": 10.0, "server": 1.0},
              {"round": 2.0, "record": 8.0, "server": 0.5}]
    rows, summary = breakdown(lines, rounds)
    # fit messages only: CPU of import + hand-off, 0.02, 0.04, 0.06, 1.0 -> median 0.05
    assert summary["package_cpu"] == pytest.approx(0.05)
    # round 1: 10 - 1 - 6 (slowest ClientApp) = 3; round 2: 8 - 0.5 - 3 = 4.5 -> median 3.75
    assert summary["rest"] == pytest.approx(3.75)
    assert summary["messages"] == 4
    assert summary["exchanges"] == pytest.approx(5 / 2 / 2)
    assert any("**0.050** (target ≤ 0.3: PASS)" in row for row in rows)
