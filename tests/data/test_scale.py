"""Cohort building at scale: the paused collector, the process pool over sites."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import pytest

from multimodal_fl.config import TaskSpec, load_task
from multimodal_fl.data import build_cohort
from multimodal_fl.data.fhir import FHIRReader
from multimodal_fl.data.fhir_json import paused_gc
from tests.data import factory as f


@pytest.fixture(scope="module")
def covid_task() -> TaskSpec:
    return load_task("covid_oxygen_24h")


def _site(root: Path, n: int, tag: str = "p") -> Path:
    res = [r for i in range(n) for r in f.covid_patient(
        f"{tag}{i}", oxygen_at="2020-03-01T12:00:00Z" if i % 3 == 0 else None)]
    f.write_json(root / "fhir" / "bundle.json", f.bundle(res))
    return root


def test_reading_pauses_the_cyclic_collector(tmp_path: Path, covid_task: TaskSpec,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A collection per allocation outside; none while files are read, and it is back on after."""
    site = _site(tmp_path / "site", 20)
    reading = [False]
    started: list[int] = []

    def count(phase: str, info: dict[str, Any]) -> None:
        if phase == "start" and reading[0]:
            started.append(info["generation"])

    read_file = FHIRReader.read_file

    def flagged(self: FHIRReader, path: Path, label: str) -> None:
        reading[0] = True
        try:
            read_file(self, path, label)
        finally:
            reading[0] = False

    monkeypatch.setattr(FHIRReader, "read_file", flagged)

    threshold = gc.get_threshold()
    gc.set_threshold(1)
    gc.callbacks.append(count)
    try:
        cohort = build_cohort(site, covid_task)
    finally:
        gc.callbacks.remove(count)
        gc.set_threshold(*threshold)
    assert len(cohort.table) == 20
    assert started == []
    assert gc.isenabled()


def test_paused_gc_keeps_a_disabled_collector_disabled() -> None:
    gc.disable()
    try:
        with paused_gc():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()
    with paused_gc():
        assert not gc.isenabled()
    assert gc.isenabled()
