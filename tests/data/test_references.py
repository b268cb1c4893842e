"""References: every form the reader accepts resolves for every type, per patient.

A reference may be ``Type/<id>``, a URL ending in it (a server's absolute reference), either
with ``/_history/<version>`` (a version-specific reference), ``urn:uuid:<id>``, or the
``fullUrl`` of a bundle entry. Patients, Encounters, Devices and Medications resolve the same
way in both validation modes. Encounter and Device ids are the patient's own: two patients
(two files) with an ``Encounter/e1`` each keep their own, and the same id read twice for
one patient with different content is reported, never picked silently.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import pytest

from multimodal_fl.config import DataConfig, TaskSpec, load_task
from multimodal_fl.data.cohort import SiteCohort, build_cohort_from_resources
from tests.data import factory as f

VALIDATION = ("task", "all")
BASE = "http://hosp.example/fhir"


@pytest.fixture(scope="module")
def covid_task() -> TaskSpec:
    return load_task("covid_oxygen_24h")


def _cohort(files: list[tuple[list[dict[str, Any]], str]], task: TaskSpec,
            validation: str = "task", *, urls: dict[str, str] | None = None) -> SiteCohort:
    """A cohort of bundles; ``urls`` gives some resources (by id) a ``fullUrl``."""
    items = []
    for resources, name in files:
        bundle = f.bundle(resources)
        for entry in bundle["entry"]:
            url = (urls or {}).get(entry["resource"]["id"])
            if url:
                entry["fullUrl"] = url
        items.append((bundle, name))
    return build_cohort_from_resources(
        items, task, data=DataConfig(validation=validation))  # type: ignore[arg-type]


def _row(cohort: SiteCohort, pid: str) -> pd.Series:
    rows = cohort.table[cohort.table.patient_id == pid]
    assert len(rows) == 1, f"patient {pid!r} not in the cohort: {list(cohort.table.patient_id)}"
    return rows.iloc[0]


def _two_encounters(pid: str, ref: str) -> list[dict[str, Any]]:
    """A COVID-19 patient whose Condition (onset 1 March) points, by ``ref``, to the later
    of two encounters: 10:00 on 4 March, not 10:00 on 2 March."""
    return [f.patient(pid),
            f.encounter(f"{pid}-e0", pid, "2020-03-02T10:00:00Z"),
            f.encounter(f"{pid}-e1", pid, "2020-03-04T10:00:00Z"),
            {**f.condition(f"{pid}-covid", pid, f.COVID, "2020-03-01T00:00:00Z"),
             "encounter": {"reference": ref.format(id=f"{pid}-e1")}}]


ENCOUNTER_REFS = ["Encounter/{id}", BASE + "/Encounter/{id}", "urn:uuid:{id}",
                  "Encounter/{id}/_history/3", BASE + "/Encounter/{id}/_history/3"]


@pytest.mark.parametrize("validation", VALIDATION)
@pytest.mark.parametrize("ref", ENCOUNTER_REFS)
def test_a_condition_finds_its_encounter_by_any_reference(covid_task: TaskSpec, ref: str,
                                                          validation: str) -> None:
    cohort = _cohort([(_two_encounters("p", ref), "p.json")], covid_task, validation)
    assert _row(cohort, "p")["index_time"] == pd.Timestamp("2020-03-04T10:00:00Z")
    assert cohort.skipped == []


@pytest.mark.parametrize("validation", VALIDATION)
def test_a_condition_finds_its_encounter_by_full_url(covid_task: TaskSpec,
                                                     validation: str) -> None:
    url = BASE + "/Encounter/visit-17"  # the entry's fullUrl, not its id
    cohort = _cohort([(_two_encounters("p", url), "p.json")], covid_task, validation,
                     urls={"p-e1": url})
    assert _row(cohort, "p")["index_time"] == pd.Timestamp("2020-03-04T10:00:00Z")


PATIENT_REFS = ["Patient/{id}/_history/2", BASE + "/Patient/{id}",
                BASE + "/Patient/{id}/_history/2", "urn:uuid:{id}"]


@pytest.mark.parametrize("validation", VALIDATION)
@pytest.mark.parametrize("ref", PATIENT_REFS)
def test_version_specific_and_absolute_patient_references(covid_task: TaskSpec, ref: str,
                                                          validation: str) -> None:
    res = f.covid_patient("p", oxygen_at="2020-03-01T12:00:00Z")
    for r in res[1:]:
        r["subject"] = {"reference": ref.format(id="p")}
    cohort = _cohort([(res, "p.json")], covid_task, validation)
    row = _row(cohort, "p")
    assert row["label"] == 1 and row["heart_rate"] == 80.0
    assert row["index_time"] == pd.Timestamp("2020-03-01T10:00:00Z") and cohort.skipped == []


DEVICE_REFS = ["Device/{id}", BASE + "/Device/{id}", "urn:uuid:{id}", "Device/{id}/_history/1",
               BASE + "/Device/{id}/_history/1"]


@pytest.mark.parametrize("validation", VALIDATION)
@pytest.mark.parametrize("ref", DEVICE_REFS)
def test_a_device_use_finds_its_device_by_any_reference(covid_task: TaskSpec, ref: str,
                                                        validation: str) -> None:
    use = f.device_use("u1", "p", "d1", "2020-03-01T15:00:00Z")
    use["device"] = {"reference": ref.format(id="d1")}
    res = [*f.covid_patient("p"), f.device("d1", "p", f.VENTILATOR), use]
    cohort = _cohort([(res, "p.json")], covid_task, validation)
    assert _row(cohort, "p")["label"] == 1 and cohort.skipped == []
    assert "devices_without_use_statement" not in cohort.counts


@pytest.mark.parametrize("ref", ["Medication/{id}/_history/3", BASE + "/Medication/{id}",
                                 BASE + "/Medication/{id}/_history/3"])
def test_version_specific_and_absolute_medication_references(covid_task: TaskSpec,
                                                             ref: str) -> None:
    data = covid_task.model_dump()
    data["features"]["medications"] = [{"name": "steroid", "codes": ["6902"]}]
    task = TaskSpec.model_validate(data)
    med = {"resourceType": "Medication", "id": "m1", "code": {"coding": [{"code": "6902"}]}}
    req = {"resourceType": "MedicationRequest", "id": "rx", "status": "active",
           "intent": "order", "subject": {"reference": "Patient/p"},
           "authoredOn": "2020-02-01T00:00:00Z",
           "medicationReference": {"reference": ref.format(id="m1")}}
    cohort = _cohort([([*f.covid_patient("p"), req], "p.json"), ([med], "z-meds.json")], task)
    assert _row(cohort, "p")["steroid"] == 1 and cohort.skipped == []


# ------------------------------------------------------------------ ids per patient


def _episode(pid: str, day: str, **ref: str) -> list[dict[str, Any]]:
    """A patient file: its own Encounter 'e1' at ``day`` 10:00, the Condition pointing to it."""
    res = f.covid_patient(pid, f"{day}T10:00:00Z")
    res[1]["id"] = "e1"
    res[2]["encounter"] = {"reference": ref.get("enc", "Encounter/e1")}
    res[3]["effectiveDateTime"] = f"{day}T09:00:00Z"
    return res


@pytest.mark.parametrize("validation", VALIDATION)
def test_two_patients_with_the_same_encounter_id_keep_their_own(covid_task: TaskSpec,
                                                                validation: str) -> None:
    files = [(_episode("pA", "2020-03-01"), "pA.json"), (_episode("pB", "2021-03-10"), "pB.json")]
    for order in (files, files[::-1]):
        cohort = _cohort(order, covid_task, validation)
        assert _row(cohort, "pA")["index_time"] == pd.Timestamp("2020-03-01T10:00:00Z")
        assert _row(cohort, "pB")["index_time"] == pd.Timestamp("2021-03-10T10:00:00Z")
        assert cohort.skipped == []


@pytest.mark.parametrize("validation", VALIDATION)
def test_same_encounter_id_behind_distinct_full_urls(covid_task: TaskSpec,
                                                     validation: str) -> None:
    """Synthea-like bundles: references are urn:uuid fullUrls, local ids repeat."""
    a = _episode("pA", "2020-03-01", enc="urn:uuid:aaaa-1")
    b = _episode("pB", "2021-03-10", enc="urn:uuid:bbbb-1")
    for res, key in ((a, "aaaa"), (b, "bbbb")):
        for r in res[1:]:
            r["subject"] = {"reference": f"urn:uuid:{key}-0"}
    urls = {"pA": "urn:uuid:aaaa-0", "pB": "urn:uuid:bbbb-0"}
    items = []
    for res, name, key in ((a, "pA.json", "aaaa"), (b, "pB.json", "bbbb")):
        bundle = f.bundle(res, kind="transaction")
        for entry in bundle["entry"]:
            rid = entry["resource"]["id"]
            entry["fullUrl"] = urls.get(rid) or (f"urn:uuid:{key}-1" if rid == "e1" else
                                                 f"urn:uuid:{key}-{rid}")
        items.append((bundle, name))
    cohort = build_cohort_from_resources(
        items, covid_task, data=DataConfig(validation=validation))  # type: ignore[arg-type]
    assert _row(cohort, "pA")["index_time"] == pd.Timestamp("2020-03-01T10:00:00Z")
    assert _row(cohort, "pB")["index_time"] == pd.Timestamp("2021-03-10T10:00:00Z")


@pytest.mark.parametrize("validation", VALIDATION)
def test_first_encounter_class_is_the_patients_own(covid_task: TaskSpec,
                                                   validation: str) -> None:
    data = covid_task.model_dump()
    data["index"] = {"kind": "first_encounter", "encounter_class": ["IMP"]}
    task = TaskSpec.model_validate(data)
    a, b = _episode("pA", "2020-03-01"), _episode("pB", "2021-03-10")
    b[1]["class"]["code"] = "IMP"  # pB's e1 is inpatient, pA's e1 ambulatory
    for order in ([(a, "pA.json"), (b, "pB.json")], [(b, "pB.json"), (a, "pA.json")]):
        cohort = _cohort(order, task, validation)
        assert list(cohort.table.patient_id) == ["pB"]
        assert cohort.counts["excluded_by_reason"] == {"no_index_encounter": 1}


@pytest.mark.parametrize("validation", VALIDATION)
def test_a_device_id_is_the_patients_own(covid_task: TaskSpec, validation: str) -> None:
    """pB's Device 'd1' is a glucometer; pA's 'd1' a ventilator: pB was never ventilated."""
    a = [*_episode("pA", "2020-03-01"), f.device("d1", "pA", f.VENTILATOR)]
    b = [*_episode("pB", "2021-03-10"), f.device("d1", "pB", "337414009"),
         f.device_use("u1", "pB", "d1", "2021-03-10T15:00:00Z")]
    for order in ([(a, "pA.json"), (b, "pB.json")], [(b, "pB.json"), (a, "pA.json")]):
        cohort = _cohort(order, covid_task, validation)
        assert _row(cohort, "pB")["label"] == 0 and _row(cohort, "pA")["label"] == 0


@pytest.mark.parametrize("validation", VALIDATION)
def test_one_patients_encounter_read_twice_differently_is_reported(
        covid_task: TaskSpec, validation: str) -> None:
    first = _episode("p", "2020-03-01")
    again = {**first[1], "period": {"start": "2020-03-05T10:00:00Z"}}
    same = dict(first[1])
    cohort = _cohort([(first, "a.json"), ([again, same], "b.json")], covid_task, validation)
    assert _row(cohort, "p")["index_time"] == pd.Timestamp("2020-03-01T10:00:00Z")
    assert [(s.reason, s.file, s.resource_id, s.field) for s in cohort.skipped] == [
        ("conflicting_encounter", "b.json", "e1", "period.start")]
    assert "a.json" in cohort.skipped[0].detail and "'p'" in cohort.skipped[0].detail


@pytest.mark.parametrize("validation", VALIDATION)
def test_one_patients_device_read_twice_differently_is_reported(
        covid_task: TaskSpec, validation: str) -> None:
    task = covid_task.model_dump()
    task["label"]["devices"].append({"name": "cpap", "codes": ["706172005"]})
    spec = TaskSpec.model_validate(task)
    res = [*f.covid_patient("p"), f.device("d1", "p", f.VENTILATOR),
           f.device_use("u1", "p", "d1", "2020-03-01T15:00:00Z")]
    cohort = _cohort([(res, "a.json"), ([f.device("d1", "p", "706172005")], "b.json")], spec,
                     validation)
    assert _row(cohort, "p")["label"] == 1
    assert [(s.reason, s.file, s.resource_id, s.field) for s in cohort.skipped] == [
        ("conflicting_device", "b.json", "d1", "type")]
