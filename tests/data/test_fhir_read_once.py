"""FHIR read as servers and exports write it: the same Observation twice, values that are
not numbers, byte order marks, and records dated only by the end of a period.

Each case is one a bug hunt found: search pages that overlap repeat entries, and an export
holding two versions of one Observation counted both (a mean of duplicates, a ``last`` won
by file-name order); a ``valueString`` feature was dropped with only a counter; a UTF-8 BOM
lost a whole ``.json`` file; an Observation dated by ``effectivePeriod.end`` was undated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from multimodal_fl.config import DataConfig, TaskSpec, load_task
from multimodal_fl.data.cohort import SiteCohort, build_cohort_from_resources
from multimodal_fl.data.errors import ErrorSink
from multimodal_fl.data.fhir_json import iter_file_resources
from tests.data import factory as f

HR = "8867-4"
SPO2 = "2708-6"


def _task(agg: str) -> TaskSpec:
    """The COVID-19 task with ``heart_rate`` aggregated by ``agg``."""
    spec = load_task("covid_oxygen_24h").model_dump()
    for obs in spec["features"]["observations"]:
        if obs["name"] == "heart_rate":
            obs["agg"] = agg
    return TaskSpec.model_validate(spec)


def _row(cohort: SiteCohort, pid: str) -> pd.Series:
    rows = cohort.table[cohort.table.patient_id == pid]
    assert len(rows) == 1, f"patient {pid!r} not in the cohort: {list(cohort.table.patient_id)}"
    return rows.iloc[0]


def _hr(oid: str, value: float, when: str = "2020-03-01T09:30:00Z", *,
        meta: dict[str, Any] | None = None) -> dict[str, Any]:
    obs = f.observation(oid, "p", HR, value, "/min", when)
    if meta is not None:
        obs["meta"] = meta
    return obs


def _build(files: list[tuple[list[dict[str, Any]], str]], task: TaskSpec,
           validation: str = "task") -> SiteCohort:
    return build_cohort_from_resources([(f.bundle(res), name) for res, name in files], task,
                                       data=DataConfig(validation=validation))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- one record per id


@pytest.mark.parametrize("validation", ["task", "all"])
def test_an_observation_on_two_search_pages_counts_once(validation: str) -> None:
    """Overlapping pages repeat an entry: it is the same record read twice, silently."""
    page1 = [*f.covid_patient("p"), _hr("hr2", 100.0)]
    page2 = [_hr("hr2", 100.0)]
    cohort = _build([(page1, "page1.json"), (page2, "page2.json")], _task("mean"), validation)
    assert _row(cohort, "p")["heart_rate"] == pytest.approx(90.0)  # (80 + 100) / 2
    assert cohort.skipped == []


@pytest.mark.parametrize("validation", ["task", "all"])
@pytest.mark.parametrize("newer_first", [True, False])
@pytest.mark.parametrize("meta", [
    ({"versionId": "1"}, {"versionId": "2"}),
    ({"versionId": "9"}, {"versionId": "10"}),  # numbers, not strings
    ({"lastUpdated": "2020-03-01T09:40:00Z"}, {"lastUpdated": "2020-03-02T08:00:00+01:00"}),
])
def test_a_later_version_replaces_the_earlier(validation: str, newer_first: bool,
                                              meta: tuple[dict[str, str], dict[str, str]]
                                              ) -> None:
    """Two versions of one Observation: the later one is the record, whatever the file order."""
    old, new = _hr("hr2", 100.0, meta=meta[0]), _hr("hr2", 60.0, meta=meta[1])
    files = [([new], "a.json"), ([old], "b.json")] if newer_first else \
        [([old], "a.json"), ([new], "b.json")]
    for agg, want in (("last", 60.0), ("mean", 70.0)):
        cohort = _build([(f.covid_patient("p"), "p.json"), *files], _task(agg), validation)
        assert _row(cohort, "p")["heart_rate"] == pytest.approx(want), agg
        assert cohort.skipped == []


@pytest.mark.parametrize("validation", ["task", "all"])
def test_a_later_version_outside_the_window_removes_the_earlier(validation: str) -> None:
    """Version 2 corrects the time to after the cut-off: version 1's value is not used."""
    v1 = _hr("hr", 70.0, "2020-03-01T09:30:00Z", meta={"versionId": "1"})
    v2 = _hr("hr", 70.0, "2020-03-05T09:30:00Z", meta={"versionId": "2"})
    res = [r for r in f.covid_patient("p") if r["id"] != "p-hr"]
    cohort = _build([(res, "p.json"), ([v1], "a.json"), ([v2], "b.json")], _task("last"),
                    validation)
    assert pd.isna(_row(cohort, "p")["heart_rate"])


@pytest.mark.parametrize("validation", ["task", "all"])
def test_two_contents_without_a_version_order_keep_the_first(validation: str) -> None:
    cohort = _build([(f.covid_patient("p"), "p.json"), ([_hr("hr2", 100.0)], "a.json"),
                     ([_hr("hr2", 60.0)], "b.json")], _task("mean"), validation)
    assert _row(cohort, "p")["heart_rate"] == pytest.approx(90.0)  # 80 and the first, 100
    assert [(s.file, s.resource_id, s.field, s.reason) for s in cohort.skipped] == [
        ("b.json", "hr2", "valueQuantity", "conflicting_observation")]
    assert "kept the first (a.json)" in cohort.skipped[0].detail


def test_observations_of_two_patients_may_share_an_id() -> None:
    """Ids are per patient here as for Encounters: two patients' ``o1`` are two records."""
    a = f.observation("o1", "a", HR, 70.0, "/min", "2020-03-01T09:30:00Z")
    b = f.observation("o1", "b", HR, 90.0, "/min", "2020-03-01T09:30:00Z")
    res = [r for pid in "ab" for r in f.covid_patient(pid) if r["id"] != f"{pid}-hr"]
    cohort = _build([(res, "p.json"), ([a, b], "o.json")], _task("last"))
    assert _row(cohort, "a")["heart_rate"] == 70.0 and _row(cohort, "b")["heart_rate"] == 90.0
    assert cohort.skipped == []


# --------------------------------------------------------------------------- values


def _spo2(change: dict[str, Any]) -> dict[str, Any]:
    obs = f.observation("sat", "p", SPO2, 95.0, "%", "2020-03-01T09:30:00Z")
    obs.pop("valueQuantity")
    return {**obs, **change}


@pytest.mark.parametrize("validation", ["task", "all"])
@pytest.mark.parametrize(("change", "field"), [
    ({"valueString": "83.36"}, "valueString"),
    ({"valueQuantity": {"value": "83.36", "unit": "%", "code": "%"}}, "valueQuantity.value"),
    ({"valueCodeableConcept": {"text": "83"}}, "valueCodeableConcept"),
])
def test_a_feature_value_that_is_not_a_quantity_is_reported(validation: str,
                                                           change: dict[str, Any],
                                                           field: str) -> None:
    """Not a number in a valueQuantity: reported with its field, never guessed from text."""
    cohort = _build([([*f.covid_patient("p"), _spo2(change)], "p.json")], _task("last"),
                    validation)
    assert pd.isna(_row(cohort, "p")["spo2"])
    assert [(s.resource_id, s.field, s.reason) for s in cohort.skipped] == [
        ("sat", field, "non_quantity_value")]
    assert "'spo2'" in cohort.skipped[0].detail


def test_a_feature_without_any_value_is_only_counted() -> None:
    obs = _spo2({"dataAbsentReason": {"text": "not measured"}})
    cohort = _build([([*f.covid_patient("p"), obs], "p.json")], _task("last"))
    assert cohort.skipped == []


# --------------------------------------------------------------------------- dates


@pytest.mark.parametrize("validation", ["task", "all"])
def test_an_observation_dated_by_its_period_end_is_used(validation: str) -> None:
    obs = f.observation("sat", "p", SPO2, 91.0, "%", "2020-03-01T09:30:00Z")
    obs.pop("effectiveDateTime")
    obs["effectivePeriod"] = {"end": "2020-03-01T09:30:00Z"}
    cohort = _build([([*f.covid_patient("p"), obs], "p.json")], _task("last"), validation)
    assert _row(cohort, "p")["spo2"] == 91.0
    assert cohort.skipped == []


# --------------------------------------------------------------------------- byte order marks


def _export(tmp_path: Path, name: str, data: bytes) -> list[str]:
    path = tmp_path / name
    path.write_bytes(data)
    sink = ErrorSink()
    ids = [res["id"] for res, _ in iter_file_resources(path, name, sink)]
    assert sink.skipped == [], [s.message() for s in sink.skipped]
    return ids


def test_a_utf8_bom_is_dropped(tmp_path: Path) -> None:
    """Windows tools write a UTF-8 BOM: the file (or its first NDJSON line) is still read."""
    resources = f.covid_patient("p")
    bom = b"\xef\xbb\xbf"
    assert _export(tmp_path, "p.json", bom + json.dumps(f.bundle(resources)).encode()) \
        == [r["id"] for r in resources]
    lines = b"\n".join(json.dumps(r).encode() for r in resources)
    assert _export(tmp_path, "p.ndjson", bom + lines) == [r["id"] for r in resources]


@pytest.mark.parametrize("name", ["p.json", "p.ndjson"])
def test_a_utf16_file_says_to_export_utf8(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text(json.dumps(f.patient("p")), encoding="utf-16")
    sink = ErrorSink()
    assert list(iter_file_resources(path, name, sink)) == []
    assert [(s.file, s.reason) for s in sink.skipped] == [(name, "invalid_json")]
    assert "UTF-16: export the file as UTF-8" in sink.skipped[0].detail


# --------------------------------------------------------------------------- undatable events


def _oxygen(change: dict[str, Any]) -> dict[str, Any]:
    proc = f.procedure("o2", "p", f.OXYGEN, "2020-03-01T12:00:00Z")
    proc.pop("performedPeriod")
    return {**proc, **change}


@pytest.mark.parametrize("validation", ["task", "all"])
@pytest.mark.parametrize("performed", [
    {"performedPeriod": {"end": "2020-03-01T12:00:00Z"}},
    {"performedAge": {"value": 21670, "unit": "days", "system": "http://unitsofmeasure.org",
                      "code": "d"}},  # 1960-05-01 + 21670 d = 2019-08-30: before the index
])
def test_a_procedure_dated_by_its_period_end_or_age_is_a_label_event(
        validation: str, performed: dict[str, Any]) -> None:
    cohort = _build([([*f.covid_patient("p"), _oxygen(performed)], "p.json")], _task("last"),
                    validation)
    assert cohort.skipped == []
    if "performedAge" in performed:  # a prior event: the patient is already on oxygen
        assert cohort.counts["excluded_by_reason"] == {"prior_event": 1}
    else:
        assert _row(cohort, "p")["label"] == 1


@pytest.mark.parametrize("validation", ["task", "all"])
@pytest.mark.parametrize(("performed", "field"), [
    ({"performedString": "the afternoon of admission"}, "performedString"),
    ({}, "performed[x]"),
])
def test_an_undatable_label_procedure_is_reported(validation: str, performed: dict[str, Any],
                                                  field: str) -> None:
    """Not silently a negative label: the skip names the record and its field."""
    cohort = _build([([*f.covid_patient("p"), _oxygen(performed)], "p.json")], _task("last"),
                    validation)
    assert [(s.resource_id, s.field, s.reason) for s in cohort.skipped] == [
        ("o2", field, "undated_event")]


@pytest.fixture(scope="module")
def ad_task() -> TaskSpec:
    return load_task("alzheimers")


def _ad_patient(cond: dict[str, Any], birth: str = "1940-06-15") -> list[dict[str, Any]]:
    return [f.patient("p", birth=birth), cond]


def _cond(code: str, **onset: Any) -> dict[str, Any]:
    c = f.condition("c", "p", code, "2019-01-01")
    c.pop("onsetDateTime")
    return {**c, **onset}


def _years(n: float) -> dict[str, Any]:
    return {"value": n, "unit": "a", "system": "http://unitsofmeasure.org", "code": "a"}


@pytest.mark.parametrize("validation", ["task", "all"])
@pytest.mark.parametrize(("onset", "label"), [
    ({"onsetAge": _years(75)}, 1),  # 2015: before the 2020-01-01 reference date
    ({"onsetAge": _years(80)}, 0),  # 2020-06-15: after it
    ({"onsetPeriod": {"end": "2018-05-01"}}, 1),
])
def test_a_label_condition_dated_by_age_or_period_end(ad_task: TaskSpec, validation: str,
                                                      onset: dict[str, Any], label: int
                                                      ) -> None:
    cohort = _build([(_ad_patient(_cond(f.ALZHEIMERS, **onset)), "p.json")], ad_task,
                    validation)
    assert cohort.skipped == []
    assert _row(cohort, "p")["label"] == label


@pytest.mark.parametrize("validation", ["task", "all"])
def test_an_undatable_condition_is_reported(ad_task: TaskSpec, validation: str) -> None:
    cohort = _build([(_ad_patient(_cond(f.ALZHEIMERS, onsetString="in her seventies")),
                      "p.json")], ad_task, validation)
    assert [(s.resource_id, s.field, s.reason) for s in cohort.skipped] == [
        ("c", "onsetString", "undated_event")]
    assert _row(cohort, "p")["label"] == 0


def test_an_onset_age_without_a_birth_date_is_reported(ad_task: TaskSpec) -> None:
    pat = f.patient("p")
    pat.pop("birthDate")
    cohort = _build([([pat, _cond(f.ALZHEIMERS, onsetAge=_years(75))], "p.json")], ad_task)
    assert [(s.resource_id, s.field, s.reason) for s in cohort.skipped] == [
        ("c", "onsetAge", "undated_event")]


@pytest.mark.parametrize("validation", ["task", "all"])
@pytest.mark.parametrize(("abatement", "flag"), [
    ({"abatementAge": _years(70)}, 0.0),  # 2010: resolved before the index
    ({"abatementAge": _years(85)}, 1.0),  # 2025: still present at the index
    ({}, 1.0),
])
def test_an_abatement_age_before_the_index_resolves_the_condition(
        ad_task: TaskSpec, validation: str, abatement: dict[str, Any], flag: float) -> None:
    hl = {**f.condition("hl", "p", "55822004", "2000-01-01"), **abatement}
    cohort = _build([(_ad_patient(hl), "p.json")], ad_task, validation)
    assert cohort.skipped == []
    assert _row(cohort, "p")["hyperlipidemia"] == flag


# --------------------------------------------------------------------------- no offset


@pytest.mark.parametrize("validation", ["task", "all"])
def test_a_datetime_without_an_offset_is_read_in_the_site_zone(validation: str) -> None:
    """``2020-03-01T10:30:00`` in Paris is 09:30 UTC, before a 10:00 UTC index: used, not
    refused by the R4B model (FHIR wants an offset with a time)."""
    obs = _hr("hr2", 100.0, "2020-03-01T10:30:00")
    res = [r for r in f.covid_patient("p") if r["id"] != "p-hr"]
    cohort = build_cohort_from_resources(
        [(f.bundle([*res, obs]), "p.json")], _task("last"),
        data=DataConfig(validation=validation, timezone="Europe/Paris"))  # type: ignore[arg-type]
    assert cohort.skipped == []
    assert _row(cohort, "p")["heart_rate"] == 100.0


@pytest.mark.parametrize("validation", ["task", "all"])
def test_a_death_without_an_offset_keeps_the_patient(validation: str) -> None:
    """A refused Patient took all its records with it; its death is read in the site zone."""
    res = f.covid_patient("p", deceased="2020-03-02T08:00:00")  # 07:00 UTC, in the window
    cohort = build_cohort_from_resources(
        [(f.bundle(res), "p.json")], _task("last"),
        data=DataConfig(validation=validation, timezone="Europe/Paris"))  # type: ignore[arg-type]
    assert cohort.skipped == []
    assert _row(cohort, "p")["label"] == 1  # death in the label window is positive


# --------------------------------------------------------------------------- index encounter


@pytest.mark.parametrize("validation", ["task", "all"])
def test_a_condition_without_encounter_takes_the_encounter_in_progress(validation: str) -> None:
    """Diagnosed two hours into an admission: the index is the admission, not the next
    visit a year later."""
    covid = f.condition("p-covid", "p", f.COVID, "2020-03-01T12:00:00Z")
    res = [f.patient("p"), covid,
           f.encounter("old", "p", "2019-01-01T08:00:00Z", "2019-01-01T09:00:00Z"),
           f.encounter("adm", "p", "2020-03-01T10:00:00Z", "2020-03-04T10:00:00Z"),
           f.encounter("next", "p", "2021-03-01T10:00:00Z", "2021-03-01T11:00:00Z"),
           f.observation("p-hr", "p", HR, 80.0, "/min", "2020-03-01T09:00:00Z")]
    cohort = _build([(res, "p.json")], _task("last"), validation)
    row = _row(cohort, "p")
    assert row["index_time"] == pd.Timestamp("2020-03-01T10:00:00Z")
    assert row["heart_rate"] == 80.0  # the index encounter's window, validated in time


@pytest.mark.parametrize("validation", ["task", "all"])
def test_without_an_encounter_in_progress_the_next_one_is_the_index(validation: str) -> None:
    covid = f.condition("p-covid", "p", f.COVID, "2020-03-01T12:00:00Z")
    res = [f.patient("p"), covid,
           f.encounter("ended", "p", "2020-03-01T08:00:00Z", "2020-03-01T09:00:00Z"),
           f.encounter("next", "p", "2020-03-02T10:00:00Z")]
    cohort = _build([(res, "p.json")], _task("last"), validation)
    assert _row(cohort, "p")["index_time"] == pd.Timestamp("2020-03-02T10:00:00Z")


def test_at_age_counts_on_the_site_calendar() -> None:
    from datetime import UTC, datetime
    from zoneinfo import ZoneInfo

    from multimodal_fl.data.fhir import at_age
    from multimodal_fl.data.fhir_json import parse_time

    paris = ZoneInfo("Europe/Paris")
    birth = parse_time("2000-02-29", tz=paris)  # 2000-02-28 23:00 UTC
    # the 75th birthday: 2075-02-28 (no 29th), local midnight; known until the 76th begins
    assert at_age(birth, _years(75), paris) == datetime(2075, 2, 27, 23, tzinfo=UTC)
    assert at_age(birth, _years(75), paris, end=True) == datetime(2076, 2, 28, 22, 59, 59,
                                                                  tzinfo=UTC)
    # months and days on the local calendar, across the switch to summer time
    assert at_age(birth, {"value": 3, "code": "mo"}, paris) == datetime(2000, 5, 28, 22,
                                                                        tzinfo=UTC)
    assert at_age(birth, {"value": 2, "unit": "days"}, paris) == datetime(2000, 3, 1, 23,
                                                                          tzinfo=UTC)
    assert at_age(birth, {"value": 75, "code": "kg"}, paris) is None
    assert at_age(birth, {"value": "75", "code": "a"}, paris) is None
    assert at_age(birth, _years(9000), paris) is None  # past year 9999
