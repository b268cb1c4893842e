"""A site that connects after the run's setup, and one that gives no predictions (a Flower bug
hunt): the late site trained every round but got no moments, calibrate or predict request, and
neither metrics.json nor the report mentioned it; its fit replies escaped the sample-count cap
(it declared no size). Now the run's sites are fixed after the setup and every site the run
met without predictions is in ``missing_sites`` with its reason."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from multimodal_fl.config import load_config
from multimodal_fl.federated.protocol import Kind, Reply, Request, SiteFailure


class LateAndBroken:
    """The tiny cohort's federation where ``late`` connects only once the first fit requests
    are sent (its SuperNode started late), and ``broken`` fails its predict request."""

    def __init__(self, inner: Any, late: str, broken: str) -> None:
        self.inner, self.late, self.broken = inner, late, broken
        self.connected = False
        self.asked: list[tuple[str, str]] = []

    def sites(self) -> list[str]:
        return [s for s in self.inner.sites() if self.connected or s != self.late]

    def broadcast(self, requests: Mapping[str, Request], timeout: float | None = None
                  ) -> dict[str, Reply | SiteFailure]:
        self.asked += [(s, r.kind) for s, r in requests.items()]
        self.connected |= any(r.kind == Kind.FIT for r in requests.values())
        answers = self.inner.broadcast(requests, timeout)
        request = requests.get(self.broken)
        if request is not None and request.kind == Kind.PREDICT:
            answers[self.broken] = SiteFailure(self.broken, "SiteError: the disk is full")
        return answers


def test_a_late_site_is_left_out_and_every_site_without_predictions_is_named(
        tiny_config: Callable[..., Path], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    from multimodal_fl.engines.federated import inprocess_federation, run_federated_experiment
    from multimodal_fl.evaluation.report import build_report

    cfg = load_config(tiny_config(federated={"rounds": 2, "min_sites": 1}))
    names = sorted(s.name for s in cfg.sites)
    late, broken = names[-1], names[0]
    federation = LateAndBroken(inprocess_federation(cfg, tmp_path / "run"), late, broken)
    with caplog.at_level(logging.WARNING):
        outcome = run_federated_experiment(cfg, tmp_path / "run",
                                           federation=federation)  # type: ignore[arg-type]
    assert not [k for s, k in federation.asked if s == late]  # never asked anything
    metrics = json.loads((outcome.run_dir / "metrics.json").read_text())
    assert all(late not in r["selected"] for r in metrics["rounds"])
    assert metrics["missing_sites"] == sorted([late, broken])
    assert metrics["missing_reasons"] == {
        late: "joined after the run's setup: left out of this run",
        broken: "no predictions: SiteError: the disk is full"}
    joined = [r for r in caplog.records if "joined after the run's setup" in r.getMessage()]
    assert len(joined) == 1 and late in joined[0].getMessage()
    doc = build_report([outcome.run_dir])[0]
    notes = " ".join(n for run in doc["runs"] for n in run["notes"])
    assert late in notes and "joined after the run's setup" in notes and broken in notes
