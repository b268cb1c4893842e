"""Real-world FHIR: source ids, unitless scores, demographics-only patients, per-patient index.

Each case is one that real cohorts showed (issue 14, "Real-world FHIR"): a research cohort's
own subject ids (``OAS1_0018_MR1``) outside FHIR's id pattern, dimensionless measures written
without a unit, patients with only age and sex, and ages that must be taken at the scan.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from multimodal_fl.config import DataConfig, TaskSpec, load_task
from multimodal_fl.data import build_cohort
from multimodal_fl.data.cohort import build_cohort_from_resources
from multimodal_fl.data.units import UnitError, accepts_unitless, convert
from tests.data import factory as f

OASIS_ID = "OAS1_0018_MR1"
LONG_ID = "subject-" + "x" * 70  # 78 characters: R4B's id is at most 64
SPACED_ID = "subj 7"


@pytest.fixture(scope="module")
def covid_task() -> TaskSpec:
    return load_task("covid_oxygen_24h")


def _site(tmp_path: Path, resources: list[dict[str, Any]], *, urn: bool = False,
          name: str = "site") -> Path:
    root = tmp_path / name
    f.write_json(root / "fhir" / "bundle.json", f.bundle(resources, urn=urn))
    return root


def _row(table: pd.DataFrame, pid: str) -> pd.Series:
    rows = table[table.patient_id == pid]
    assert len(rows) == 1, f"patient {pid!r} not in the cohort: {list(table.patient_id)}"
    return rows.iloc[0]


# --------------------------------------------------------------------------- ids


def _nonconforming_site(tmp_path: Path) -> Path:
    """Three patients with source ids outside R4B's id pattern, each referenced its own way."""
    oasis = f.covid_patient(OASIS_ID, oxygen_at="2020-03-01T20:00:00+00:00")  # Patient/<id>
    long = f.covid_patient(LONG_ID)
    spaced = f.covid_patient(SPACED_ID)
    for res in spaced[1:]:  # a REST reference percent-encodes the space
        for key in ("subject", "patient"):
            if key in res:
                res[key] = {"reference": "Patient/subj%207"}
    root = _site(tmp_path, [*oasis, *spaced])
    # the long id only through urn:uuid fullUrls, as Synthea's transaction bundles write them
    for res in long[1:]:
        if "subject" in res:
            res["subject"] = {"reference": f"urn:uuid:{LONG_ID}"}
    f.write_json(root / "fhir" / "long.json", f.bundle(long, urn=True))
    return root


def test_nonconforming_ids_are_kept_with_their_references(tmp_path: Path,
                                                          covid_task: TaskSpec) -> None:
    cohort = build_cohort(_nonconforming_site(tmp_path), covid_task)
    assert cohort.skipped == []
    assert sorted(cohort.table.patient_id) == sorted([OASIS_ID, LONG_ID, SPACED_ID])
    oasis = _row(cohort.table, OASIS_ID)
    # the label (Procedure), the index (Encounter OAS1_0018_MR1-enc, referenced by the
    # Condition) and the features (Observation) all reached the patient
    assert oasis["label"] == 1 and oasis["heart_rate"] == 80.0
    assert oasis["index_time"] == pd.Timestamp("2020-03-01T10:00:00Z")
    for pid in (LONG_ID, SPACED_ID):
        assert _row(cohort.table, pid)["heart_rate"] == 80.0
    # every kept resource with such an id is noted, not skipped: Patient, Encounter,
    # Condition, Observation (the CRP after the index is never validated) and Procedure
    noted = cohort.counts["noted_by_reason"]
    assert noted == {"nonconforming_id": 5 + 4 + 4}
    assert {n.resource_id for n in cohort.noted} >= {OASIS_ID, f"{OASIS_ID}-enc", LONG_ID,
                                                     SPACED_ID}
    note = next(n for n in cohort.noted if n.resource_id == OASIS_ID)
    assert note.field == "id" and "[A-Za-z0-9-.]{1,64}" in note.detail
    assert cohort.summary()["noted"][0]["reason"] == "nonconforming_id"


def test_nonconforming_ids_are_noted_under_fail_policy_too(tmp_path: Path,
                                                           covid_task: TaskSpec) -> None:
    cohort = build_cohort(_nonconforming_site(tmp_path), covid_task,
                          data=DataConfig(on_error="fail", validation="all"))
    assert len(cohort.table) == 3 and cohort.counts["noted_by_reason"]["nonconforming_id"] > 0


def test_strict_ids_refuse_them_as_r4b_does(tmp_path: Path, covid_task: TaskSpec) -> None:
    root = _nonconforming_site(tmp_path)
    cohort = build_cohort(root, covid_task, data=DataConfig(strict_ids=True))
    assert len(cohort.table) == 0 and cohort.noted == []
    refused = {s.resource_id: s for s in cohort.skipped if s.reason == "invalid_fhir"}
    assert {OASIS_ID, LONG_ID, SPACED_ID} <= set(refused)
    assert refused[OASIS_ID].field == "id"
    assert f"'{OASIS_ID}' is outside FHIR's id pattern" in refused[OASIS_ID].detail
    assert "strict_ids" in refused[OASIS_ID].detail


def test_a_contained_resource_with_a_source_id_is_kept(covid_task: TaskSpec) -> None:
    data = covid_task.model_dump()
    data["features"]["medications"] = [{"name": "steroid", "codes": ["6902"]}]
    task = TaskSpec.model_validate(data)
    request = {"resourceType": "MedicationRequest", "id": "rx_1", "status": "active",
               "intent": "order", "subject": {"reference": "Patient/p_1"},
               "authoredOn": "2020-02-01T00:00:00Z",
               "contained": [{"resourceType": "Medication", "id": "med_1",
                              "code": {"coding": [{"code": "6902"}]}}],
               "medicationReference": {"reference": "#med_1"}}
    bundle = f.bundle([*f.covid_patient("p_1"), request])
    cohort = build_cohort_from_resources([(bundle, "b.json")], task)
    assert cohort.skipped == [] and _row(cohort.table, "p_1")["steroid"] == 1.0


# --------------------------------------------------------------------------- units


def _score_task() -> TaskSpec:
    return TaskSpec.model_validate({
        "name": "scores", "image_modality": "mri",
        "index": {"kind": "reference_date", "reference_date": "2001-01-01"},
        "features": {"observations": [
            {"name": "mmse", "codes": ["72107-6"], "unit": "{score}"},
            {"name": "nwbv", "codes": ["nwbv"], "unit": "1"},
            {"name": "spo2", "codes": ["59408-5"], "unit": "%"},
            {"name": "glucose", "codes": ["2345-7"], "unit": "mg/dL"},
        ]},
        "label": {"kind": "labels_csv"},
    })


def _unitless(oid: str, pid: str, code: str, value: float) -> dict[str, Any]:
    obs = f.observation(oid, pid, code, value, "", "2000-06-01", ucum=False)
    obs["valueQuantity"] = {"value": value}
    return obs


def _yes_no(oid: str, pid: str, code: str, value: bool) -> dict[str, Any]:
    obs = f.observation(oid, pid, code, 0, "", "2000-06-01", ucum=False)
    del obs["valueQuantity"]
    obs["valueBoolean"] = value
    return obs


def test_value_boolean_is_read_as_one_or_zero_for_a_feature_in_unit_one(tmp_path: Path) -> None:
    """import-csv writes a boolean column as valueBoolean, which was never a feature (100 %
    missing, no reason shown): read as 1 / 0 for a feature in '1', refused by name otherwise."""
    task = TaskSpec.model_validate({
        "name": "flags", "image_modality": "mri",
        "index": {"kind": "reference_date", "reference_date": "2001-01-01"},
        "features": {"observations": [
            {"name": "insulin", "codes": ["on-insulin"], "unit": "1"},
            {"name": "smoker", "codes": ["smoker"], "unit": "%"}]},
        "label": {"kind": "labels_csv"}})
    root = _site(tmp_path, [
        f.patient("s1", birth="1930-01-01"), f.patient("s2", birth="1930-01-01"),
        _yes_no("ins-1", "s1", "on-insulin", True), _yes_no("ins-2", "s2", "on-insulin", False),
        _yes_no("smk-1", "s1", "smoker", True)])
    (root / "labels.csv").write_text("patient_id,label\ns1,1\ns2,0\n")
    cohort = build_cohort(root, task)
    assert (_row(cohort.table, "s1")["insulin"], _row(cohort.table, "s2")["insulin"]) == (1.0, 0.0)
    assert cohort.table["smoker"].isna().all()
    assert cohort.counts["skipped_by_reason"] == {"boolean_value": 1}
    (skip,) = cohort.skipped
    assert (skip.resource_id, skip.field) == ("smk-1", "valueBoolean")
    assert "feature 'smoker'" in skip.detail and "'%'" in skip.detail


def test_unitless_values_only_for_dimensionless_features(tmp_path: Path) -> None:
    root = _site(tmp_path, [
        f.patient("s1", birth="1930-01-01"),
        _unitless("mmse-1", "s1", "72107-6", 27),
        _unitless("nwbv-1", "s1", "nwbv", 0.74),
        _unitless("spo2-1", "s1", "59408-5", 0.95),  # a fraction or a percentage? refused
        _unitless("glu-1", "s1", "2345-7", 5.4),  # mmol/L or mg/dL? refused
    ])
    (root / "labels.csv").write_text("patient_id,label\ns1,1\n")
    cohort = build_cohort(root, _score_task())
    row = _row(cohort.table, "s1")
    assert (row["mmse"], row["nwbv"]) == (27.0, 0.74)
    assert pd.isna(row["spo2"]) and pd.isna(row["glucose"])
    assert cohort.counts["noted_by_reason"] == {"unitless_value": 2}
    assert cohort.counts["skipped_by_reason"] == {"unknown_unit": 2}
    refused = {s.resource_id: s.detail for s in cohort.skipped}
    assert "no unit" in refused["spo2-1"] and "'%'" in refused["spo2-1"]
    assert {n.resource_id for n in cohort.noted} == {"mmse-1", "nwbv-1"}


def test_dimensionless_units() -> None:
    assert accepts_unitless("1") and accepts_unitless("{score}") and accepts_unitless("{ratio}")
    assert not any(accepts_unitless(u) for u in ("%", "mg/dL", "10*3/uL", "{score}/min"))
    assert convert(2.0, "{ratio}", "{ratio}") == 2.0  # an annotation is a unit of its own
    for src, dst in (("{ratio}", "1"), ("{ratio}", "{score}"), ("{score}", "%")):
        with pytest.raises(UnitError):
            convert(1.0, src, dst)


# --------------------------------------------------------------------------- demographics


def test_demographics_alone_are_tabular_data(tmp_path: Path, covid_task: TaskSpec) -> None:
    no_obs = [r for r in f.covid_patient("demo") if r["resourceType"] != "Observation"]
    nothing = [r for r in f.covid_patient("bare") if r["resourceType"] != "Observation"]
    del nothing[0]["birthDate"]
    nothing[0]["gender"] = "unknown"
    cohort = build_cohort(_site(tmp_path, [*no_obs, *nothing, *f.covid_patient("obs")]),
                          covid_task)
    table = cohort.table.set_index("patient_id")
    assert table.loc["demo", "has_tabular"]  # age and sex, no Observation
    assert not table.loc["bare", "has_tabular"]  # no birth date, no sex, no Observation
    assert table.loc["obs", "has_tabular"]
    assert cohort.summary()["coverage"]["tabular"] == pytest.approx(2 / 3)


def test_a_tabular_only_model_keeps_a_demographics_only_patient(tmp_path: Path,
                                                               covid_task: TaskSpec) -> None:
    from multimodal_fl.config import ExperimentConfig, SiteConfig
    from multimodal_fl.training import prepare_site_data

    no_obs = [r for r in f.covid_patient("demo") if r["resourceType"] != "Observation"]
    root = _site(tmp_path, [*no_obs, *f.covid_patient("obs")])
    cfg = ExperimentConfig.model_validate({
        "task": covid_task, "sites": [SiteConfig(name="site", path=root)],
        "modalities": {"image": {"enabled": False}, "text": {"enabled": False}}})
    data = prepare_site_data(build_cohort(root, covid_task), cfg, cache=None, site="site")
    assert sorted(data.dataset.patient_ids) == ["demo", "obs"] and data.dropped == {}


def test_a_recorded_comorbidity_is_tabular_data(tmp_path: Path, covid_task: TaskSpec) -> None:
    res = [r for r in f.covid_patient("htn") if r["resourceType"] != "Observation"]
    del res[0]["birthDate"]
    res[0]["gender"] = "unknown"
    res.append(f.condition("htn-c", "htn", f.HYPERTENSION, "2015-01-01"))
    cohort = build_cohort(_site(tmp_path, res), covid_task)
    assert _row(cohort.table, "htn")["has_tabular"]


# --------------------------------------------------------------------------- index


def _mr_study(sid: str, pid: str, started: str, modality: str = "MR",
              *, in_series: bool = False) -> dict[str, Any]:
    coding = {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": modality}
    study: dict[str, Any] = {"resourceType": "ImagingStudy", "id": sid, "status": "available",
                             "subject": {"reference": f"Patient/{pid}"}, "started": started}
    if in_series:
        study["series"] = [{"uid": "1.2.3", "modality": coding}]
    else:
        study["modality"] = [coding]
    return study


def _scan_task(**index: Any) -> TaskSpec:
    base = load_task("alzheimers").model_dump()
    base["index"] = {"kind": "first_imaging_study", **index}
    base["features"]["observations"].append(
        {"name": "mmse", "codes": ["72107-6"], "unit": "{score}"})
    return TaskSpec.model_validate(base)


@pytest.mark.parametrize("validation", ["task", "all"])
def test_index_at_the_first_scan_of_the_task_modality(tmp_path: Path, validation: str) -> None:
    res = [
        # scanned at 70: a CT in 1999 is not the task's modality; the first MR is in 2000
        f.patient("old", birth="1930-05-01"),
        _mr_study("old-ct", "old", "1999-01-10", modality="CT"),
        _mr_study("old-mr2", "old", "2002-03-01T09:00:00Z"),
        _mr_study("old-mr1", "old", "2000-05-01", in_series=True),
        f.observation("old-mmse", "old", "72107-6", 24, "{score}", "2000-05-01"),
        f.observation("old-mmse-late", "old", "72107-6", 18, "{score}", "2002-03-01"),
        f.condition("old-ad", "old", f.ALZHEIMERS, "2000-04-01"),
        # scanned at 40: under the task's min_age 50 at the scan (a 2020 index made it 60)
        f.patient("young", birth="1960-05-01"),
        _mr_study("young-mr", "young", "2000-06-01T10:00:00Z"),
        # no MR study at all
        f.patient("unscanned", birth="1930-05-01"),
    ]
    cohort = build_cohort(_site(tmp_path, res), _scan_task(),
                          data=DataConfig(validation=validation))  # type: ignore[arg-type]
    row = _row(cohort.table, "old")
    # a date alone is known at the end of its day: the scan and that day's MMSE count
    assert row["index_time"] == pd.Timestamp("2000-05-01T23:59:59Z")
    assert row["age"] == pytest.approx(70.0, abs=0.01)
    assert row["mmse"] == 24.0 and row["label"] == 1
    assert cohort.counts["excluded_by_reason"] == {"no_index_study": 1, "under_min_age": 1}


def test_index_at_the_first_encounter_of_a_class(tmp_path: Path) -> None:
    task = load_task("covid_oxygen_24h").model_dump()
    task["index"] = {"kind": "first_encounter", "encounter_class": ["IMP"],
                     "allowance_hours": 0}
    spec = TaskSpec.model_validate(task)

    def enc(eid: str, start: str, klass: str) -> dict[str, Any]:
        e = f.encounter(eid, "p", start)
        e["class"]["code"] = klass
        return e

    res = [
        f.patient("p"),
        enc("amb", "2020-02-20T08:00:00Z", "AMB"),
        enc("imp2", "2020-05-01T08:00:00Z", "IMP"),
        enc("imp1", "2020-03-01T10:00:00Z", "IMP"),
        f.condition("covid", "p", f.COVID, "2020-02-28"),
        f.procedure("o2", "p", f.OXYGEN, "2020-03-01T20:00:00Z"),
        f.observation("hr", "p", "8867-4", 80.0, "/min", "2020-03-01T09:00:00Z"),
        f.patient("outpatient"),
        f.encounter("amb2", "outpatient", "2020-02-20T08:00:00Z"),  # class AMB
        f.condition("covid2", "outpatient", f.COVID, "2020-02-19"),
    ]
    for validation in ("task", "all"):
        cohort = build_cohort(_site(tmp_path, res, name=validation), spec,
                              data=DataConfig(validation=validation))  # type: ignore[arg-type]
        row = _row(cohort.table, "p")
        assert row["index_time"] == pd.Timestamp("2020-03-01T10:00:00Z")
        assert row["label"] == 1 and row["heart_rate"] == 80.0
        assert cohort.counts["excluded_by_reason"] == {"no_index_encounter": 1}


def test_first_encounter_needs_its_classes() -> None:
    with pytest.raises(ValueError, match="encounter_class"):
        TaskSpec.model_validate({**load_task("covid_oxygen_24h").model_dump(),
                                 "index": {"kind": "first_encounter"}})


# --------------------------------------------------------------------------- OASIS-1

OASIS = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "oasis1"


def test_oasis_subjects_written_as_fhir_with_their_own_ids(tmp_path: Path) -> None:
    """The shared OASIS-1 table's first 40 subjects with a CDR, as a user would write them.

    Patient.id is the study's subject id (``OAS1_0001_MR1``), the scan an MR ImagingStudy,
    MMSE ``{score}`` and nWBV ``1`` without a unit. The scan date is not in the table: one
    date stands in for it, and the birth date is taken back from the age at the scan.
    """
    table_path = OASIS / "oasis_cross-sectional.csv"
    if not table_path.is_file():
        pytest.skip(f"shared data not found: {table_path}")
    rows = pd.read_csv(table_path, na_values=["N/A", ""]).dropna(subset=["CDR"]).head(40)
    res: list[dict[str, Any]] = []
    scan = pd.Timestamp("2000-06-15")
    for r in rows.to_dict("records"):
        pid = str(r["ID"])
        birth = (scan - pd.DateOffset(years=int(r["Age"]), days=1)).date().isoformat()
        res.append(f.patient(pid, birth=birth, gender="female" if r["M/F"] == "F" else "male"))
        res.append(_mr_study(f"{pid}_scan", pid, scan.date().isoformat()))
        if not pd.isna(r["MMSE"]):
            res.append(_unitless(f"{pid}_mmse", pid, "72107-6", float(r["MMSE"])))
        res.append(_unitless(f"{pid}_nwbv", pid, "nwbv", float(r["nWBV"])))
    root = _site(tmp_path, res)
    labels = "\n".join(f"{r.ID},{int(r.CDR > 0)}" for r in rows.itertuples())
    (root / "labels.csv").write_text(f"patient_id,label\n{labels}\n")
    task = _scan_task().model_dump()
    task["features"]["observations"].append({"name": "nwbv", "codes": ["nwbv"], "unit": "1"})
    task["cohort"]["min_age"] = 0
    cohort = build_cohort(root, TaskSpec.model_validate(task))
    assert cohort.skipped == []
    assert sorted(cohort.table.patient_id) == sorted(rows.ID)
    assert cohort.table["has_tabular"].all() and cohort.table["nwbv"].notna().all()
    assert cohort.table.set_index("patient_id")["age"].round().to_dict() == \
        dict(zip(rows.ID, rows.Age.astype(float), strict=True))
    assert cohort.table["label"].tolist() == \
        [int(c > 0) for c in rows.set_index("ID").loc[sorted(rows.ID), "CDR"]]
    noted = cohort.counts["noted_by_reason"]
    assert noted["unitless_value"] == int(rows.MMSE.notna().sum()) + len(rows)
    assert noted["nonconforming_id"] >= 2 * len(rows)  # the Patient and its scan at least
