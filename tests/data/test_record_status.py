"""Records that did not happen, or were entered in error, are not used.

FHIR R4 says so in a status: a Procedure ``not-done``, a Condition whose
``verificationStatus`` is ``refuted``, an Observation ``cancelled``, any record
``entered-in-error``. Each such record is skipped as ``not_done_or_in_error`` (file,
resource id, field), in both validation modes; every other status, and a missing one, is
read as before (a Condition's ``clinicalStatus`` is not a reason to drop it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from multimodal_fl.config import DataConfig, TaskSpec, load_task
from multimodal_fl.data import DataError, build_cohort
from multimodal_fl.data.cohort import SiteCohort, build_cohort_from_resources
from tests.data import factory as f

VOID = "not_done_or_in_error"
VER_STATUS = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
CLIN_STATUS = "http://terminology.hl7.org/CodeSystem/condition-clinical"
VALIDATION = ("task", "all")


@pytest.fixture(scope="module")
def covid_task() -> TaskSpec:
    return load_task("covid_oxygen_24h")


@pytest.fixture(scope="module")
def med_task(covid_task: TaskSpec) -> TaskSpec:
    data = covid_task.model_dump()
    data["features"]["medications"] = [{"name": "steroid", "codes": ["6902"]}]
    return TaskSpec.model_validate(data)


def _cohort(resources: list[dict[str, Any]], task: TaskSpec, validation: str = "task",
            on_error: str = "skip") -> SiteCohort:
    return build_cohort_from_resources(
        [(f.bundle(resources), "b.json")], task,
        data=DataConfig(validation=validation, on_error=on_error))  # type: ignore[arg-type]


def _row(cohort: SiteCohort, pid: str) -> pd.Series:
    rows = cohort.table[cohort.table.patient_id == pid]
    assert len(rows) == 1, f"patient {pid!r} not in the cohort: {list(cohort.table.patient_id)}"
    return rows.iloc[0]


def _voided(cohort: SiteCohort) -> list[tuple[str, str, str]]:
    return [(s.file, s.resource_id, s.field) for s in cohort.skipped if s.reason == VOID]


def _with(res: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {**res, **fields}


def _ver(code: str) -> dict[str, Any]:
    return {"coding": [{"system": VER_STATUS, "code": code}]}


# ------------------------------------------------------------------ labels


@pytest.mark.parametrize("validation", VALIDATION)
@pytest.mark.parametrize("status", ["not-done", "preparation", "entered-in-error"])
def test_a_procedure_not_done_is_no_label(covid_task: TaskSpec, status: str,
                                          validation: str) -> None:
    oxygen = _with(f.procedure("o2", "p", f.OXYGEN, "2020-03-01T12:00:00Z"), status=status)
    cohort = _cohort([*f.covid_patient("p"), oxygen], covid_task, validation)
    assert _row(cohort, "p")["label"] == 0
    assert _voided(cohort) == [("b.json", "o2", "status")]
    assert cohort.counts["skipped_by_reason"] == {VOID: 1}
    assert status in cohort.skipped[0].detail


@pytest.mark.parametrize("status", ["completed", "in-progress", "stopped", "unknown"])
def test_other_procedure_statuses_still_label(covid_task: TaskSpec, status: str) -> None:
    oxygen = _with(f.procedure("o2", "p", f.OXYGEN, "2020-03-01T12:00:00Z"), status=status)
    cohort = _cohort([*f.covid_patient("p"), oxygen], covid_task)
    assert _row(cohort, "p")["label"] == 1 and cohort.skipped == []


@pytest.mark.parametrize("validation", VALIDATION)
@pytest.mark.parametrize(("where", "status"), [("Device", "entered-in-error"),
                                              ("DeviceUseStatement", "entered-in-error"),
                                              ("DeviceUseStatement", "intended")])
def test_a_device_use_in_error_is_no_label(covid_task: TaskSpec, where: str, status: str,
                                           validation: str) -> None:
    dev = f.device("d1", "p", f.VENTILATOR)
    use = f.device_use("u1", "p", "d1", "2020-03-01T15:00:00Z")
    if where == "Device":
        dev["status"] = "entered-in-error"
    else:
        use["status"] = status
    cohort = _cohort([*f.covid_patient("p"), dev, use], covid_task, validation)
    assert _row(cohort, "p")["label"] == 0
    assert _voided(cohort) == [("b.json", "d1" if where == "Device" else "u1", "status")]
    good = _cohort([*f.covid_patient("p"), f.device("d1", "p", f.VENTILATOR), use | {
        "status": "completed"}], covid_task, validation)
    assert _row(good, "p")["label"] == 1 and good.skipped == []


# ------------------------------------------------------------------ cohort


@pytest.mark.parametrize("validation", VALIDATION)
@pytest.mark.parametrize("code", ["refuted", "entered-in-error"])
def test_a_refuted_condition_puts_no_one_in_the_cohort(covid_task: TaskSpec, code: str,
                                                       validation: str) -> None:
    res = f.covid_patient("p")
    res[2]["verificationStatus"] = _ver(code)
    cohort = _cohort(res, covid_task, validation)
    assert len(cohort.table) == 0
    assert cohort.counts["excluded_by_reason"] == {"not_in_cohort": 1}
    assert _voided(cohort) == [("b.json", "p-covid", "verificationStatus")]


@pytest.mark.parametrize("ver", [None, "confirmed", "provisional", "unconfirmed",
                                 "differential"])
def test_other_verification_and_any_clinical_status_keep_the_condition(
        covid_task: TaskSpec, ver: str | None) -> None:
    res = f.covid_patient("p")
    res[2]["clinicalStatus"] = {"coding": [{"system": CLIN_STATUS, "code": "resolved"}]}
    if ver is not None:
        res[2]["verificationStatus"] = _ver(ver)
    cohort = _cohort(res, covid_task)
    assert len(cohort.table) == 1 and cohort.skipped == []


def test_a_refuted_comorbidity_is_not_a_feature(covid_task: TaskSpec) -> None:
    htn = f.condition("htn", "p", f.HYPERTENSION, "2019-01-01")
    refuted = _with(htn, verificationStatus=_ver("refuted"))
    assert _row(_cohort([*f.covid_patient("p"), htn], covid_task), "p")["hypertension"] == 1
    cohort = _cohort([*f.covid_patient("p"), refuted], covid_task)
    assert _row(cohort, "p")["hypertension"] == 0 and _voided(cohort) == [
        ("b.json", "htn", "verificationStatus")]


# ------------------------------------------------------------------ index


@pytest.mark.parametrize("validation", VALIDATION)
@pytest.mark.parametrize("status", ["planned", "cancelled", "entered-in-error"])
def test_a_cancelled_encounter_is_not_the_index(covid_task: TaskSpec, status: str,
                                                validation: str) -> None:
    res = f.covid_patient("p")
    res[2]["onsetDateTime"] = "2020-03-01T08:00:00Z"  # the Condition points to p-enc (10:00)
    res[1]["status"] = status
    later = f.encounter("e-later", "p", "2020-03-01T14:00:00Z")
    cohort = _cohort([*res, later], covid_task, validation)
    assert _row(cohort, "p")["index_time"] == pd.Timestamp("2020-03-01T14:00:00Z")
    assert _voided(cohort) == [("b.json", "p-enc", "status")]
    res[1]["status"] = "finished"
    used = _cohort([*res, later], covid_task, validation)
    assert _row(used, "p")["index_time"] == pd.Timestamp("2020-03-01T10:00:00Z")


def test_a_cancelled_encounter_is_no_first_encounter(covid_task: TaskSpec) -> None:
    task = covid_task.model_dump()
    task["index"] = {"kind": "first_encounter", "encounter_class": ["AMB"]}
    spec = TaskSpec.model_validate(task)
    cancelled = _with(f.encounter("e1", "p", "2020-03-01T10:00:00Z"), status="cancelled")
    res = [*f.covid_patient("p")[:1], f.condition("covid", "p", f.COVID, "2020-02-28"),
           cancelled, f.encounter("e2", "p", "2020-03-03T10:00:00Z")]
    for validation in VALIDATION:
        cohort = _cohort(res, spec, validation)
        assert _row(cohort, "p")["index_time"] == pd.Timestamp("2020-03-03T10:00:00Z")
        assert _voided(cohort) == [("b.json", "e1", "status")]


# ------------------------------------------------------------------ features


@pytest.mark.parametrize("validation", VALIDATION)
@pytest.mark.parametrize("status", ["cancelled", "entered-in-error"])
def test_an_observation_in_error_gives_no_value(covid_task: TaskSpec, status: str,
                                                validation: str) -> None:
    res = f.covid_patient("p")
    res[3]["status"] = status  # p-hr: 80 /min before the index
    cohort = _cohort(res, covid_task, validation)
    assert np.isnan(_row(cohort, "p")["heart_rate"])
    assert _voided(cohort) == [("b.json", "p-hr", "status")]


@pytest.mark.parametrize("status", ["preliminary", "amended", "corrected", "unknown"])
def test_other_observation_statuses_give_the_value(covid_task: TaskSpec, status: str) -> None:
    res = f.covid_patient("p")
    res[3]["status"] = status
    cohort = _cohort(res, covid_task)
    assert _row(cohort, "p")["heart_rate"] == 80.0 and cohort.skipped == []


def _request(rid: str, status: str, **extra: Any) -> dict[str, Any]:
    req = {"resourceType": "MedicationRequest", "id": rid, "status": status,
           "intent": "order", "subject": {"reference": "Patient/p"},
           "authoredOn": "2020-02-01T00:00:00Z", **extra}
    if "medicationReference" not in extra:
        req["medicationCodeableConcept"] = {"coding": [{"code": "6902"}]}
    return req


@pytest.mark.parametrize("validation", VALIDATION)
@pytest.mark.parametrize("status", ["cancelled", "draft", "entered-in-error"])
def test_a_cancelled_medication_request_is_no_feature(med_task: TaskSpec, status: str,
                                                      validation: str) -> None:
    cohort = _cohort([*f.covid_patient("p"), _request("rx", status)], med_task, validation)
    assert _row(cohort, "p")["steroid"] == 0
    assert _voided(cohort) == [("b.json", "rx", "status")]
    for kept in ("active", "completed", "stopped", "on-hold"):
        cohort = _cohort([*f.covid_patient("p"), _request("rx", kept)], med_task, validation)
        assert _row(cohort, "p")["steroid"] == 1 and cohort.skipped == []


def test_a_medication_in_error_names_no_drug(med_task: TaskSpec) -> None:
    med = {"resourceType": "Medication", "id": "m1", "status": "entered-in-error",
           "code": {"coding": [{"code": "6902"}]}}
    req = _request("rx", "active", medicationReference={"reference": "Medication/m1"})
    cohort = _cohort([*f.covid_patient("p"), med, req], med_task)
    assert _row(cohort, "p")["steroid"] == 0
    assert _voided(cohort) == [("b.json", "m1", "status")]
    unresolved = [s for s in cohort.skipped if s.reason == "unresolved_reference"]
    assert [s.resource_id for s in unresolved] == ["rx"]
    assert "entered-in-error" in unresolved[0].detail


@pytest.mark.parametrize("validation", VALIDATION)
def test_a_contained_medication_in_error_names_no_drug(med_task: TaskSpec,
                                                       validation: str) -> None:
    """A contained Medication (``medicationReference: #id``) is voided as a top-level one."""
    other = {"resourceType": "Medication", "id": "other", "code": {"coding": [{"code": "1"}]}}
    med = {"resourceType": "Medication", "id": "m1", "status": "entered-in-error",
           "code": {"coding": [{"code": "6902"}]}}
    req = _request("rx", "active", contained=[other, med],
                   medicationReference={"reference": "#m1"})
    cohort = _cohort([*f.covid_patient("p"), req], med_task, validation)
    assert _row(cohort, "p")["steroid"] == 0
    assert _voided(cohort) == [("b.json", "rx", "contained[1].status")]
    assert "contained Medication '#m1'" in cohort.skipped[0].detail
    assert "'entered-in-error'" in cohort.skipped[0].detail
    assert cohort.counts["skipped_by_reason"] == {VOID: 1}
    for kept in ("active", "inactive"):  # any other status names the drug
        med["status"] = kept
        cohort = _cohort([*f.covid_patient("p"), req], med_task, validation)
        assert _row(cohort, "p")["steroid"] == 1 and cohort.skipped == []


# ------------------------------------------------------------------ notes and images


@pytest.mark.parametrize("field, value", [("status", "entered-in-error"),
                                          ("docStatus", "entered-in-error")])
def test_a_document_in_error_is_no_note(covid_task: TaskSpec, field: str, value: str) -> None:
    doc = f.document("n1", "p", "cough", "2020-03-01T09:00:00Z")
    kept = _cohort([*f.covid_patient("p"), doc], covid_task)
    assert _row(kept, "p")["notes"] == ["cough"]
    cohort = _cohort([*f.covid_patient("p"), {**doc, field: value}], covid_task)
    assert _row(cohort, "p")["notes"] == [] and _voided(cohort) == [("b.json", "n1", field)]


@pytest.mark.parametrize("status", ["cancelled", "entered-in-error"])
def test_a_cancelled_report_is_no_note(covid_task: TaskSpec, status: str) -> None:
    rep = _with(f.report("r1", "p", "opacities", "2020-03-01T09:00:00Z"), status=status)
    cohort = _cohort([*f.covid_patient("p"), rep], covid_task)
    assert _row(cohort, "p")["notes"] == [] and _voided(cohort) == [("b.json", "r1", "status")]


def _voided_study(root: Path, image: str, status: str, task: TaskSpec) -> SiteCohort:
    """The patient's image is linked by an ImagingStudy; then the study is voided: the cohort."""
    study = f.imaging_study("is1", "p", image, "2020-03-01T09:00:00Z")
    f.write_json(root / "fhir" / "b.json", f.bundle([*f.covid_patient("p"), study]))
    assert _row(build_cohort(root, task), "p")["has_image"]
    f.write_json(root / "fhir" / "b.json",
                 f.bundle([*f.covid_patient("p"), {**study, "status": status}]))
    cohort = build_cohort(root, task)
    assert not _row(cohort, "p")["has_image"]
    return cohort


@pytest.mark.parametrize("status", ["cancelled", "entered-in-error"])
def test_a_cancelled_imaging_study_links_no_image(tmp_path: Path, covid_task: TaskSpec,
                                                  status: str) -> None:
    root = tmp_path / "site"
    (root / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(root / "images" / "p.png")
    cohort = _voided_study(root, "images/p.png", status, covid_task)
    assert [(s.resource_id, s.field) for s in cohort.skipped if s.reason == VOID] == [
        ("is1", "status")]


@pytest.mark.parametrize("status", ["cancelled", "entered-in-error"])
def test_a_voided_studys_dicom_is_not_linked_by_its_patient_id_either(
        tmp_path: Path, covid_task: TaskSpec, status: str) -> None:
    """The file a voided ImagingStudy names carries the patient's DICOM PatientID: the third
    linking rule (by header) must not bring it back."""
    root = tmp_path / "site"
    f.dicom(root / "images" / "p.dcm", "p", study_date="20200301", study_time="090000")
    cohort = _voided_study(root, "images/p.dcm", status, covid_task)
    assert sorted((s.file, s.resource_id) for s in cohort.skipped if s.reason == VOID) == [
        ("fhir/b.json", "is1"), ("images/p.dcm", "")]
    # no ImagingStudy at all: the header links it
    f.write_json(root / "fhir" / "b.json", f.bundle(f.covid_patient("p")))
    assert _row(build_cohort(root, covid_task), "p")["has_image"]


# ------------------------------------------------------------------ policy


def test_under_fail_a_record_in_error_stops_the_run(covid_task: TaskSpec) -> None:
    res = f.covid_patient("p")
    res[3]["status"] = "entered-in-error"
    with pytest.raises(DataError) as info:
        _cohort(res, covid_task, on_error="fail")
    assert "b.json" in str(info.value) and "'p-hr'" in str(info.value)
    assert "field 'status'" in str(info.value)
    assert info.value.skip is not None and info.value.skip.reason == VOID


def test_a_record_the_task_does_not_use_is_not_reported(covid_task: TaskSpec) -> None:
    other = _with(f.procedure("appendix", "p", "80146002", "2020-03-01T12:00:00Z"),
                  status="entered-in-error")
    cohort = _cohort([*f.covid_patient("p"), other], covid_task)
    assert cohort.skipped == []
