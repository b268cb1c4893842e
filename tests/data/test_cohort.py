"""Cohort building on small hand-made sites: index, windows, labels, units, modalities."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from multimodal_fl.config import DataConfig, TaskSpec, load_task
from multimodal_fl.data import build_cohort, feature_names
from tests.data import factory as f


@pytest.fixture(scope="module")
def covid_task() -> TaskSpec:
    return load_task("covid_oxygen_24h")


def _site(tmp_path: Path, resources: list[dict], name: str = "site") -> Path:
    root = tmp_path / name
    f.write_json(root / "fhir" / "bundle.json", f.bundle(resources))
    return root


def _row(cohort, pid: str) -> pd.Series:
    rows = cohort.table[cohort.table.patient_id == pid]
    assert len(rows) == 1, f"patient {pid} not in cohort"
    return rows.iloc[0]


def test_labels_windows_and_exclusions(tmp_path: Path, covid_task: TaskSpec) -> None:
    res = [
        *f.covid_patient("pos", oxygen_at="2020-03-01T20:00:00+00:00"),
        *f.covid_patient("late", oxygen_at="2020-03-03T10:00:01+00:00"),  # after 24 h
        *f.covid_patient("prior", oxygen_at="2020-02-28T10:00:00+00:00"),  # before index
        *f.covid_patient("died", deceased="2020-03-01T22:00:00+00:00"),
        *f.covid_patient("neg"),
        f.patient("nocovid"),
    ]
    cohort = build_cohort(_site(tmp_path, res), covid_task)
    labels = dict(zip(cohort.table.patient_id, cohort.table.label, strict=True))
    assert labels == {"pos": 1, "late": 0, "died": 1, "neg": 0}
    assert cohort.counts["excluded_by_reason"] == {"not_in_cohort": 1, "prior_event": 1}


def test_features_only_up_to_cutoff(tmp_path: Path, covid_task: TaskSpec) -> None:
    res = f.covid_patient("p1", extra=[
        f.observation("t-f", "p1", "8310-5", 100.4, "[degF]", "2020-03-01T08:00:00+00:00"),
        f.observation("crp-dl", "p1", "1988-5", 1.5, "mg/dL", "2020-03-01T10:00:00+00:00"),
        f.bp_panel("bp", "p1", 131, 85, "2020-03-01T09:30:00+00:00"),
        f.observation("hr-old", "p1", "8867-4", 60.0, "/min", "2018-01-01T00:00:00+00:00"),
        f.condition("htn", "p1", f.HYPERTENSION, "2015-01-01"),
        f.condition("ob-late", "p1", "162864005", "2020-03-05"),
    ])
    cohort = build_cohort(_site(tmp_path, res), covid_task)
    row = _row(cohort, "p1")
    assert row["heart_rate"] == 80.0  # the 2018 value is outside the 365-day lookback
    assert row["temperature"] == pytest.approx(38.0)  # 100.4 °F
    assert row["crp"] == pytest.approx(15.0)  # 1.5 mg/dL at exactly the index (inclusive)
    assert (row["systolic_bp"], row["diastolic_bp"]) == (131.0, 85.0)
    assert row["hypertension"] == 1.0 and row["obesity"] == 0.0
    assert row["missing_crp"] == 0.0 and row["missing_ldh"] == 1.0 and math.isnan(row["ldh"])
    assert row["age"] == pytest.approx(59.83, abs=0.01) and row["age_band"] == "40-59"
    assert row["sex_female"] == 1.0 and row["sex"] == "female"
    assert row["max_feature_time"] <= row["index_time"]
    assert cohort.feature_names == feature_names(covid_task)
    assert list(cohort.table[cohort.feature_names].dtypes.unique()) == [np.dtype(float)]


def test_allowance_moves_the_cutoff(tmp_path: Path, covid_task: TaskSpec) -> None:
    res = f.covid_patient("p1", oxygen_at="2020-03-01T20:00:00+00:00")
    site = _site(tmp_path, res)
    task48 = covid_task.model_copy(
        update={"index": covid_task.index.model_copy(update={"allowance_hours": 48.0})})
    base = _row(build_cohort(site, covid_task), "p1")
    assert math.isnan(base["crp"]) and base["label"] == 1
    # with 48 h the CRP of day 2 becomes a feature and the oxygen is a prior event
    cohort48 = build_cohort(site, task48)
    assert cohort48.counts["excluded_by_reason"] == {"prior_event": 1}
    task48_keep = task48.model_copy(update={"label": task48.label.model_copy(
        update={"exclude_prior_events": False})})
    row = _row(build_cohort(site, task48_keep), "p1")
    assert row["crp"] == 50.0
    assert row["max_feature_time"] <= row["index_time"] + pd.Timedelta(hours=48)


def test_index_falls_back_to_first_encounter_after_onset(tmp_path: Path,
                                                         covid_task: TaskSpec) -> None:
    res = [f.patient("p1"),
           f.encounter("e-before", "p1", "2020-02-01T10:00:00+00:00"),
           f.encounter("e-after", "p1", "2020-03-04T08:00:00+00:00"),
           f.encounter("e-later", "p1", "2020-03-09T08:00:00+00:00"),
           f.condition("c", "p1", f.COVID, "2020-03-03T12:00:00+00:00")]
    row = _row(build_cohort(_site(tmp_path, res), covid_task), "p1")
    assert row["index_time"] == pd.Timestamp("2020-03-04T08:00:00Z")


def test_urn_uuid_ndjson_and_single_resources(tmp_path: Path, covid_task: TaskSpec) -> None:
    root = tmp_path / "site"
    res = f.covid_patient("aaaa-1", oxygen_at="2020-03-01T12:00:00+00:00")
    for r in res[1:]:  # references as urn:uuid (Synthea)
        if "subject" in r:
            r["subject"]["reference"] = "urn:uuid:aaaa-1"
    res[2]["encounter"]["reference"] = "urn:uuid:aaaa-1-enc"
    f.write_json(root / "fhir" / "a.json", f.bundle(res, kind="transaction", urn=True))
    ndjson = [*f.covid_patient("b1"), *f.covid_patient("b2")]
    (root / "fhir" / "b.ndjson").write_text("\n".join(json.dumps(r) for r in ndjson) + "\n")
    for r in f.covid_patient("c1"):
        f.write_json(root / "fhir" / f"c1-{r['id']}.json", r)
    cohort = build_cohort(root, covid_task)
    assert sorted(cohort.table.patient_id) == ["aaaa-1", "b1", "b2", "c1"]
    assert _row(cohort, "aaaa-1")["label"] == 1
    assert _row(cohort, "aaaa-1")["index_time"] == pd.Timestamp("2020-03-01T10:00:00Z")
    assert cohort.skipped == []


def test_task_validation_equals_full_validation(tmp_path: Path, covid_task: TaskSpec) -> None:
    noise = [{"resourceType": "Claim", "id": f"claim{i}", "status": "active"} for i in range(5)]
    two_episodes = [f.patient("p3"), f.encounter("e1", "p3", "2020-03-04T08:00:00Z"),
                    f.encounter("e2", "p3", "2020-03-10T08:00:00Z"),
                    f.condition("c-early", "p3", f.COVID, "2020-03-03T12:00:00Z"),
                    f.condition("c-late", "p3", f.COVID, "2020-03-10T08:00:00Z",
                                encounter_id="e2")]
    res = [*f.covid_patient("p1", oxygen_at="2020-03-01T12:00:00+00:00"),
           *f.covid_patient("p2"), *two_episodes, *noise]
    site = _site(tmp_path, res)
    fast = build_cohort(site, covid_task, data=DataConfig(validation="task"))
    full = build_cohort(site, covid_task, data=DataConfig(validation="all"))
    pd.testing.assert_frame_equal(fast.table, full.table)
    assert _row(fast, "p3")["index_time"] == pd.Timestamp("2020-03-04T08:00:00Z")
    assert full.counts["resources_validated"] == full.counts["resources_read"] == len(res)
    assert fast.counts["resources_validated"] < full.counts["resources_validated"]
    # the invalid Claims are reported only when everything is validated
    assert full.counts["skipped_by_reason"] == {"invalid_fhir": 5}
    assert fast.skipped == []


def test_devices_dated_by_use_statement(tmp_path: Path, covid_task: TaskSpec) -> None:
    res = [*f.covid_patient("p1"), f.device("d1", "p1", f.VENTILATOR),
           f.device_use("u1", "p1", "d1", "2020-03-01T15:00:00+00:00"),
           *f.covid_patient("p2"), f.device("d2", "p2", f.VENTILATOR)]  # no use: undated
    cohort = build_cohort(_site(tmp_path, res), covid_task)
    assert _row(cohort, "p1")["label"] == 1 and _row(cohort, "p2")["label"] == 0
    assert cohort.counts["devices_without_use_statement"] == 1


def test_notes_dated_before_cutoff_only(tmp_path: Path, covid_task: TaskSpec) -> None:
    res = f.covid_patient("p1", extra=[
        f.document("n-before", "p1", "cough for three days", "2020-03-01T09:00:00+00:00"),
        f.document("n-after", "p1", "intubated on day two", "2020-03-02T09:00:00+00:00"),
        f.document("n-url", "p1", None, "2020-03-01T09:30:00+00:00", url="notes/p1.txt"),
        f.document("n-escape", "p1", None, "2020-03-01T09:30:00+00:00", url="../secret.txt"),
        f.document("n-undated", "p1", "undated text", None),
        f.report("r1", "p1", "bilateral opacities", "2020-03-01T09:45:00+00:00"),
    ])
    root = _site(tmp_path, res)
    (root / "notes").mkdir()
    (root / "notes" / "p1.txt").write_text("short of breath")
    (tmp_path / "secret.txt").write_text("must never be read")
    cohort = build_cohort(root, covid_task)
    row = _row(cohort, "p1")
    assert sorted(row["notes"]) == ["bilateral opacities", "cough for three days",
                                    "short of breath"]
    assert row["has_text"]
    reasons = cohort.counts["skipped_by_reason"]
    assert reasons == {"path_outside_site": 1, "undated_note": 1}
    assert cohort.counts["notes_after_cutoff"] == 1
    escaped = next(s for s in cohort.skipped if s.reason == "path_outside_site")
    assert escaped.resource_id == "n-escape" and "../secret.txt" in escaped.detail


def test_notes_csv_with_and_without_dates(tmp_path: Path, covid_task: TaskSpec) -> None:
    root = _site(tmp_path, [*f.covid_patient("p1"), *f.covid_patient("p2")])
    (root / "notes.csv").write_text(
        "patient_id,text,date\np1,early note,2020-02-29\np1,late note,2020-03-05\n"
        "p2,no date,\nghost,who is this,2020-01-01\n")
    cohort = build_cohort(root, covid_task)
    assert _row(cohort, "p1")["notes"] == ["early note"]
    assert _row(cohort, "p2")["notes"] == []
    assert cohort.counts["skipped_by_reason"] == {"missing_patient": 1, "undated_note": 1}
    (root / "notes.csv").write_text("patient_id,text\np2,site vouches it is pre-index\n")
    assert _row(build_cohort(root, covid_task), "p2")["notes"] == ["site vouches it is "
                                                                   "pre-index"]


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(path)
    return path


def test_image_linking_rules(tmp_path: Path, covid_task: TaskSpec) -> None:
    res = [*f.covid_patient("csv"), *f.covid_patient("study"), *f.covid_patient("dicom"),
           *f.covid_patient("late"), *f.covid_patient("none"), *f.covid_patient("broken"),
           f.imaging_study("is1", "study", "images/study/x.png", "2020-03-01T09:00:00Z"),
           f.imaging_study("is2", "late", "images/late.png", "2020-03-04T09:00:00Z")]
    root = _site(tmp_path, res)
    _png(root / "images" / "a.png")
    _png(root / "images" / "study" / "x.png")
    _png(root / "images" / "late.png")
    # a DICOM dated only by the index day may be from after the 10:00 index: not used
    f.dicom(root / "images" / "d" / "1.dcm", "dicom", study_date="20200301")
    f.dicom(root / "images" / "d" / "0.dcm", "dicom", study_date="20200229")
    (root / "images" / "broken.png").write_bytes(b"not a png")
    (root / "images.csv").write_text("patient_id,path\ncsv,images/a.png\n"
                                     "broken,images/broken.png\ncsv,/etc/passwd\n")
    cohort = build_cohort(root, covid_task)
    paths = dict(zip(cohort.table.patient_id, cohort.table.image_path, strict=True))
    assert paths["csv"] == str(root / "images" / "a.png")
    assert paths["study"] == str(root / "images" / "study" / "x.png")
    assert paths["dicom"] == str(root / "images" / "d" / "0.dcm")
    assert paths["late"] is None and paths["none"] is None and paths["broken"] is None
    assert cohort.counts["images_after_cutoff"] == 2
    assert cohort.counts["skipped_by_reason"] == {"path_outside_site": 1,
                                                  "unreadable_image": 1}
    assert int(cohort.table.has_image.sum()) == 3


def test_symlink_escaping_site_is_refused(tmp_path: Path, covid_task: TaskSpec) -> None:
    root = _site(tmp_path, f.covid_patient("p1"))
    outside = _png(tmp_path / "outside.png")
    (root / "images").mkdir()
    (root / "images" / "link.png").symlink_to(outside)
    (root / "images.csv").write_text("patient_id,path\np1,images/link.png\n")
    cohort = build_cohort(root, covid_task)
    assert _row(cohort, "p1")["image_path"] is None
    assert [s.reason for s in cohort.skipped] == ["path_outside_site"]


def test_labels_csv_prefer_fallback_ignore(tmp_path: Path, covid_task: TaskSpec) -> None:
    root = _site(tmp_path, [*f.covid_patient("p1"), *f.covid_patient("p2")])
    (root / "labels.csv").write_text("patient_id,label\np1,1\n")
    labels = {}
    for mode in ("prefer", "fallback", "ignore"):
        task = covid_task.model_copy(update={"label": covid_task.label.model_copy(
            update={"labels_csv": mode})})
        t = build_cohort(root, task).table
        labels[mode] = dict(zip(t.patient_id, t.label, strict=True))
    assert labels["prefer"] == {"p1": 1, "p2": 0}
    assert labels["fallback"] == labels["ignore"] == {"p1": 0, "p2": 0}


def test_a_rule_label_ignores_labels_csv_unless_the_task_says_so(tmp_path: Path) -> None:
    """A new task on a folder holding another task's labels.csv trained on those labels:
    a rule's label reads labels.csv only with prefer / fallback, and the counts say each
    label's source and that the file went unread."""
    spec = yaml.safe_load((Path(__file__).parents[2] / "multimodal_fl" / "tasks"
                           / "covid_oxygen_24h.yaml").read_text())
    del spec["label"]["labels_csv"]
    task = load_task(spec)
    assert task.label.labels_csv == "ignore"
    root = _site(tmp_path, [*f.covid_patient("p1"), *f.covid_patient("p2")])
    (root / "labels.csv").write_text("patient_id,label\np1,1\np9,1\n")
    cohort = build_cohort(root, task)
    assert dict(zip(cohort.table.patient_id, cohort.table.label, strict=True)) == {
        "p1": 0, "p2": 0}
    assert cohort.counts["labels_from"] == {"labels_csv": 0, "rule": 2}
    assert "labels.csv is present but not read" in cohort.counts["labels_csv_unused"]
    assert cohort.skipped == []  # the unread file's unknown patient p9 is not reported
    mixed = build_cohort(root, task.model_copy(update={"label": task.label.model_copy(
        update={"labels_csv": "prefer"})}))
    assert dict(zip(mixed.table.patient_id, mixed.table.label, strict=True)) == {
        "p1": 1, "p2": 0}
    assert mixed.counts["labels_from"] == {"labels_csv": 1, "rule": 1}
    assert "labels_csv_unused" not in mixed.counts
    assert [s.reason for s in mixed.skipped] == ["missing_patient"]


def test_reference_date_task(tmp_path: Path) -> None:
    task = load_task("alzheimers")  # reference date 2020-01-01, min age 50
    res = [f.patient("ad", birth="1940-01-01"),
           f.condition("c-ad", "ad", f.ALZHEIMERS, "2015-06-01"),
           f.patient("later", birth="1940-01-01"),
           f.condition("c-later", "later", f.ALZHEIMERS, "2021-06-01"),  # after: not a label
           f.observation("bmi", "later", "39156-5", 24.0, "kg/m2", "2019-05-01"),
           f.observation("bmi2", "later", "39156-5", 30.0, "kg/m2", "2020-06-01"),
           f.patient("young", birth="1990-01-01"),
           f.patient("dead", birth="1930-01-01", deceased="2019-01-01T00:00:00Z")]
    cohort = build_cohort(_site(tmp_path, res), task)
    labels = dict(zip(cohort.table.patient_id, cohort.table.label, strict=True))
    assert labels == {"ad": 1, "later": 0}
    assert _row(cohort, "later")["bmi"] == 24.0
    assert cohort.counts["excluded_by_reason"] == {"died_before_index": 1, "under_min_age": 1}
    assert (cohort.table.max_feature_time.dropna() <= cohort.table.index_time.iloc[0]).all()


def test_summary_is_json_ready(tmp_path: Path, covid_task: TaskSpec) -> None:
    cohort = build_cohort(_site(tmp_path, [*f.covid_patient("p1", oxygen_at=
                                          "2020-03-01T12:00:00Z"), *f.covid_patient("p2")]),
                          covid_task)
    s = json.loads(json.dumps(cohort.summary()))
    assert (s["patients"], s["positives"], s["prevalence"]) == (2, 1, 0.5)
    assert s["missingness"]["heart_rate"] == 0.0 and s["missingness"]["crp"] == 1.0
    assert s["coverage"] == {"image": 0.0, "text": 0.0, "tabular": 1.0}


def test_inline_task_with_medications_and_aggregations(tmp_path: Path) -> None:
    task = load_task({
        "name": "custom",
        "cohort": {"conditions": [{"name": "covid", "codes": [f.COVID]}]},
        "index": {"kind": "condition_encounter"},
        "features": {
            "demographics": ["age"],
            "observations": [
                {"name": "hr_mean", "codes": ["8867-4"], "unit": "/min", "agg": "mean"},
                {"name": "hr_min_week", "codes": ["8867-4"], "unit": "/min", "agg": "min",
                 "lookback_days": 7},
            ],
            "medications": [{"name": "statin", "codes": ["316672"]}],
            "missing_indicators": False,
        },
        "label": {"kind": "events_after_index", "window_hours": 24,
                  "procedures": [{"name": "o2", "codes": [f.OXYGEN]}]},
    })
    med = {"resourceType": "MedicationRequest", "id": "m1", "status": "active",
           "intent": "order", "subject": {"reference": "Patient/p1"},
           "authoredOn": "2019-01-01",
           "medicationCodeableConcept": {"coding": [{"code": "316672"}]}}
    late_med = {**med, "id": "m2", "subject": {"reference": "Patient/p2"},
                "authoredOn": "2020-03-05"}
    res = [*f.covid_patient("p1", extra=[
        med, f.observation("hr2", "p1", "8867-4", 100.0, "/min", "2020-02-01T00:00:00Z")]),
        *f.covid_patient("p2", extra=[late_med])]
    cohort = build_cohort(_site(tmp_path, res), task)
    assert cohort.feature_names == ["age", "hr_mean", "hr_min_week", "statin"]
    p1, p2 = _row(cohort, "p1"), _row(cohort, "p2")
    assert p1["hr_mean"] == 90.0 and p1["hr_min_week"] == 80.0 and p1["statin"] == 1.0
    assert p2["statin"] == 0.0  # authored after the index


def test_medication_reference_is_followed_contained_by_id_and_by_full_url(
    tmp_path: Path,
) -> None:
    """EHR exports often name the drug in a Medication resource, not in the request."""
    task = load_task({
        "name": "custom_meds",
        "cohort": {"conditions": [{"name": "covid", "codes": [f.COVID]}]},
        "index": {"kind": "condition_encounter"},
        "features": {"demographics": ["age"],
                     "medications": [{"name": "statin", "codes": ["316672"]}],
                     "missing_indicators": False},
        "label": {"kind": "events_after_index", "window_hours": 24,
                  "procedures": [{"name": "o2", "codes": [f.OXYGEN]}]},
    })

    def request(rid: str, pid: str, ref: str, **extra: object) -> dict:
        return {"resourceType": "MedicationRequest", "id": rid, "status": "active",
                "intent": "order", "subject": {"reference": f"Patient/{pid}"},
                "authoredOn": "2019-01-01", "medicationReference": {"reference": ref}, **extra}

    def medication(mid: str, code: str) -> dict:
        return {"resourceType": "Medication", "id": mid, "code": {"coding": [{"code": code}]}}

    root = tmp_path / "site"
    resources = [
        *f.covid_patient("by-id", extra=[request("r1", "by-id", "Medication/statin-1")]),
        *f.covid_patient("by-url", extra=[request("r2", "by-url", "urn:uuid:statin-2")]),
        *f.covid_patient("contained", extra=[request(
            "r3", "contained", "#m", contained=[medication("m", "316672")])]),
        *f.covid_patient("other-drug", extra=[request("r4", "other-drug", "Medication/aspirin")]),
        *f.covid_patient("dangling", extra=[request("r5", "dangling", "Medication/ghost")]),
        *f.covid_patient("no-meds"),
    ]
    f.write_json(root / "fhir" / "patients.json", f.bundle(resources))
    # the Medications live in another file, one of them as a urn:uuid bundle entry
    f.write_json(root / "fhir" / "zz-medications.json", f.bundle(
        [medication("statin-2", "316672")], urn=True))
    f.write_json(root / "fhir" / "zz-more.json", f.bundle(
        [medication("statin-1", "316672"), medication("aspirin", "1191")]))
    cohort = build_cohort(root, task, data=DataConfig(on_error="skip"))
    statin = {pid: _row(cohort, pid)["statin"] for pid in
              ("by-id", "by-url", "contained", "other-drug", "dangling", "no-meds")}
    assert statin == {"by-id": 1.0, "by-url": 1.0, "contained": 1.0, "other-drug": 0.0,
                      "dangling": 0.0, "no-meds": 0.0}
    assert [(s.reason, s.resource_id, s.field) for s in cohort.skipped] == [
        ("unresolved_reference", "r5", "medicationReference")]
    assert "Medication/ghost" in cohort.skipped[0].message()
    assert cohort.skipped[0].file.endswith("patients.json")
    # a dangling contained reference is reported the same way; the task without medication
    # features keeps no Medication at all
    bad = tmp_path / "bad"
    f.write_json(bad / "fhir" / "b.json", f.bundle(
        f.covid_patient("p", extra=[request("r6", "p", "#nope")])))
    bad_cohort = build_cohort(bad, task, data=DataConfig(on_error="skip"))
    assert [(s.reason, s.field) for s in bad_cohort.skipped] == [
        ("unresolved_reference", "medicationReference")]
    plain = build_cohort(root, load_task("covid_oxygen_24h"))
    assert plain.counts.get("used_Medication", 0) == 0
    assert plain.counts.get("used_MedicationRequest", 0) == 0
