"""Cohort building at scale: the paused collector, the process pool over sites."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from multimodal_fl.config import ExperimentConfig, TaskSpec, load_task
from multimodal_fl.data import DataError, build_cohort, build_cohorts
from multimodal_fl.data import cohort as cohort_module
from multimodal_fl.data.cohort import cohort_workers
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


def _experiment(tmp_path: Path, workers: int, on_error: str = "skip") -> ExperimentConfig:
    sites = []
    for k, name in enumerate(("site_a", "site_b", "site_c")):
        root = _site(tmp_path / name, 6 + 3 * k, tag=f"{name[-1]}")
        sites.append({"name": name, "path": str(root)})
    bad = tmp_path / "site_b" / "fhir" / "extra.json"  # a skip and a note, kept in order
    f.write_json(bad, f.bundle([{**f.patient("odd_id"), "birthDate": "05/01/1960"},
                                f.observation("o1", "b0", "8310-5", 37.0, "", "2020-03-01")]))
    return ExperimentConfig.model_validate({
        "task": load_task("covid_oxygen_24h"), "sites": sites,
        "data": {"workers": workers, "on_error": on_error},
        "modalities": {"image": {"enabled": False}, "text": {"enabled": False}}})


def test_pool_builds_the_cohorts_a_serial_build_gives(tmp_path: Path) -> None:
    serial = build_cohorts(_experiment(tmp_path, workers=1))
    ticks: list[tuple[str, int, int]] = []
    pooled = build_cohorts(_experiment(tmp_path, workers=2),
                           progress=lambda *t: ticks.append(t))
    assert list(pooled) == list(serial) == ["site_a", "site_b", "site_c"]
    for name, cohort in serial.items():
        other = pooled[name]
        pd.testing.assert_frame_equal(other.table, cohort.table)
        assert other.feature_names == cohort.feature_names
        assert other.skipped == cohort.skipped
        assert other.noted == cohort.noted
        assert other.counts == cohort.counts
    assert serial["site_b"].skipped and serial["site_b"].counts["files_read"] == 2
    assert ticks == [("site_a", 1, 1), ("site_b", 2, 2), ("site_c", 1, 1)]


def test_pool_raises_the_first_failing_site_whole(tmp_path: Path) -> None:
    cfg = _experiment(tmp_path, workers=2, on_error="fail")
    f.write_json(tmp_path / "site_c" / "fhir" / "later.json",
                 f.bundle([{**f.patient("c-bad"), "gender": 3}]))
    with pytest.raises(DataError) as serial:
        build_cohorts(cfg.model_copy(update={"data": cfg.data.model_copy(
            update={"workers": 1})}))
    with pytest.raises(DataError) as pooled:
        build_cohorts(cfg)
    assert str(pooled.value) == str(serial.value) and "extra.json" in str(pooled.value)
    assert pooled.value.skip == serial.value.skip is not None


def test_automatic_workers_only_for_large_data(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _experiment(tmp_path, workers=0)
    monkeypatch.setattr(cohort_module, "available_cores", lambda: 8)
    assert cohort_workers(cfg) == 1  # a few kB of FHIR: read in this process
    monkeypatch.setattr(cohort_module, "POOL_MIN_BYTES", 1000)
    assert cohort_workers(cfg) == 3  # one process per site, at most one per core
    monkeypatch.setattr(cohort_module, "available_cores", lambda: 2)
    assert cohort_workers(cfg) == 2
    explicit = cfg.model_copy(update={"data": cfg.data.model_copy(update={"workers": 16})})
    assert cohort_workers(explicit) == 3
    single = cfg.model_copy(update={"sites": cfg.sites[:1]})
    assert cohort_workers(single) == 1


def _refusals(tmp_path: Path, task: TaskSpec, extra: list[dict[str, Any]]) -> dict[str, str]:
    res = [*f.covid_patient("p1"), *extra]
    site = tmp_path / "site"
    f.write_json(site / "fhir" / "b.json", f.bundle(res))
    cohort = build_cohort(site, task)
    return {s.resource_id: f"{s.field}: {s.message}" for s in cohort.skipped
            if s.reason == "invalid_fhir"}


def _model_error(resource: dict[str, Any]) -> str:
    """What validating the resource as written with its R4B model reports first."""
    from fhir.resources.R4B import get_fhir_model_class
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as exc:
        get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    return ".".join(str(p) for p in exc.value.errors()[0]["loc"])


def test_elements_seen_before_do_not_excuse_the_resource(tmp_path: Path,
                                                         covid_task: TaskSpec) -> None:
    """Validation that checks each distinct element once refuses what the model refuses."""
    when = "2020-03-01T09:00:00+00:00"
    good = f.observation("spo2-a", "p1", "59408-5", 93, "%", when)
    no_status = {k: v for k, v in f.observation("spo2-b", "p1", "59408-5", 94, "%",
                                                  when).items() if k != "status"}
    two_values = {**f.observation("spo2-c", "p1", "59408-5", 95, "%", when),
                  "valueString": "95"}
    bad_code = f.observation("spo2-d", "p1", "59408-5", 96, "%", when)
    bad_code["code"]["coding"].append({"system": 5, "code": "x"})
    refused = _refusals(tmp_path, covid_task, [good, no_status, two_values, bad_code])
    assert set(refused) == {"spo2-b", "spo2-c", "spo2-d"}
    assert refused["spo2-b"].startswith("status:")
    assert refused["spo2-d"].startswith(f"{_model_error(bad_code)}:")  # code.coding.1.system
    assert _model_error(bad_code) == "code.coding.1.system"
