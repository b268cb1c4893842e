"""Time of knowledge: a feature counts only when its record was known by the cut-off.

Each test builds a small site around a COVID-19 index at 2020-03-01 10:00 UTC (or the
Alzheimer's reference date) and checks one rule of ``docs/data-contract.md`` ("Times"):
``issued`` over ``effective[x]``, ``recordedDate`` over onset, a partial date is the end of
its period in the site's time zone, a record known exactly at the index counts, DICOM times
are read, Alzheimer's notes written on or after the diagnosis are not used, and the label
rules keep clinical time.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pandas as pd
import pytest

from multimodal_fl.config import DataConfig, TaskSpec, load_task
from multimodal_fl.data import DataError, SiteCohort, build_cohort
from multimodal_fl.data.fhir_json import parse_time
from multimodal_fl.data.imaging import dicom_known_time
from tests.data import factory as f

INDEX = pd.Timestamp("2020-03-01T10:00:00Z")


@pytest.fixture(scope="module")
def covid_task() -> TaskSpec:
    return load_task("covid_oxygen_24h")


def _site(tmp_path: Path, resources: list[dict]) -> Path:
    root = tmp_path / "site"
    f.write_json(root / "fhir" / "bundle.json", f.bundle(resources))
    return root


def _row(cohort: SiteCohort, pid: str) -> pd.Series:
    rows = cohort.table[cohort.table.patient_id == pid]
    assert len(rows) == 1, f"patient {pid} not in cohort"
    return rows.iloc[0]


def _crp(oid: str, pid: str, when: str, *, issued: str | None = None) -> dict:
    return f.observation(oid, pid, "1988-5", 80.0, "mg/L", when, issued=issued)


def test_same_day_date_only_lab_is_not_a_feature(tmp_path: Path, covid_task: TaskSpec) -> None:
    """A CRP dated 2020-03-01 may have been drawn after the 10:00 index: not used."""
    res = [*f.covid_patient("p1", extra=[_crp("crp-day", "p1", "2020-03-01")]),
           *f.covid_patient("p2", extra=[_crp("crp-eve", "p2", "2020-02-29")])]
    cohort = build_cohort(_site(tmp_path, res), covid_task)
    assert cohort.skipped == []
    p1, p2 = _row(cohort, "p1"), _row(cohort, "p2")
    assert math.isnan(p1["crp"]) and p1["missing_crp"] == 1.0
    assert p1["max_feature_time"] == pd.Timestamp("2020-03-01T09:00:00Z")  # the heart rate
    assert p2["crp"] == 80.0  # the day before is over by the index


def test_same_day_date_only_notes_are_not_features(tmp_path: Path,
                                                    covid_task: TaskSpec) -> None:
    """Notes dated only by the index day (DocumentReference.context.period, a report's
    effectiveDateTime, notes.csv) may have been written after the 10:00 index."""
    res = f.covid_patient("p1", extra=[
        f.document("n-day", "p1", "intubated after desaturation; on ventilator", None,
                   period_start="2020-03-01"),
        f.report("r-day", "p1", "bilateral opacities, worse", None, effective="2020-03-01"),
        f.document("n-before", "p1", "cough for three days", None, period_start="2020-02-29"),
    ])
    root = _site(tmp_path, res)
    (root / "notes.csv").write_text("patient_id,text,date\np1,on high-flow oxygen,2020-03-01\n"
                                    "p1,febrile at home,2020-02-28\n")
    cohort = build_cohort(root, covid_task)
    assert cohort.skipped == []
    row = _row(cohort, "p1")
    assert sorted(row["notes"]) == ["cough for three days", "febrile at home"]
    assert cohort.counts["notes_after_cutoff"] == 3
    assert row["max_feature_time"] == pd.Timestamp("2020-03-01T09:00:00Z")


def test_dicom_study_time_is_read(tmp_path: Path, covid_task: TaskSpec) -> None:
    """StudyDate = the index day: 18:00 is after the 10:00 index, 08:00 before it."""
    res = [*f.covid_patient("evening"), *f.covid_patient("morning"),
           *f.covid_patient("date-only"), *f.covid_patient("brisbane")]
    root = _site(tmp_path, res)
    f.dicom(root / "images" / "e.dcm", "evening", study_date="20200301", study_time="180000")
    f.dicom(root / "images" / "m.dcm", "morning", study_date="20200301", study_time="080000")
    f.dicom(root / "images" / "d.dcm", "date-only", study_date="20200301")
    # 18:00 at UTC+10 is 08:00 UTC
    f.dicom(root / "images" / "b.dcm", "brisbane", study_date="20200301", study_time="1800",
            tz_offset="+1000")
    cohort = build_cohort(root, covid_task)
    assert cohort.skipped == []
    paths = dict(zip(cohort.table.patient_id, cohort.table.image_path, strict=True))
    assert paths["evening"] is None and paths["date-only"] is None
    assert paths["morning"] == str(root / "images" / "m.dcm")
    assert paths["brisbane"] == str(root / "images" / "b.dcm")
    assert cohort.counts["images_after_cutoff"] == 2


def test_an_unreadable_or_unnamed_dicom_is_reported_not_ignored(
        tmp_path: Path, covid_task: TaskSpec) -> None:
    """Both were dropped silently, under on_error: fail as well (a CLI bug hunt)."""
    root = _site(tmp_path, [*f.covid_patient("morning")])
    f.dicom(root / "images" / "m.dcm", "morning", study_date="20200301", study_time="080000")
    (root / "images" / "garbage.dcm").write_text("garbage")
    f.dicom(root / "images" / "anon.dcm", "", study_date="20200301", study_time="080000")
    cohort = build_cohort(root, covid_task)
    assert sorted((s.file, s.reason) for s in cohort.skipped) == [
        ("images/anon.dcm", "missing_patient"), ("images/garbage.dcm", "unreadable_image")]
    assert cohort.table.set_index("patient_id").loc["morning", "image_path"] == str(
        root / "images" / "m.dcm")
    with pytest.raises(DataError, match=r"garbage\.dcm.*not a readable DICOM|anon\.dcm.*no "
                                        "PatientID"):
        build_cohort(root, covid_task, data=DataConfig(on_error="fail"))


def test_dicom_known_time_tags() -> None:
    day = {"StudyDate": "20200301"}
    assert dicom_known_time(day) == datetime(2020, 3, 1, 23, 59, 59, tzinfo=UTC)
    assert dicom_known_time({**day, "StudyTime": "080000.25"}) == datetime(
        2020, 3, 1, 8, tzinfo=UTC)
    assert dicom_known_time({**day, "StudyTime": "08"}) == datetime(
        2020, 3, 1, 8, 59, 59, tzinfo=UTC)  # a partial time is the end of its hour
    assert dicom_known_time({**day, "StudyTime": "08:15"}) == datetime(
        2020, 3, 1, 8, 15, 59, tzinfo=UTC)
    # an AcquisitionDate without its time takes the StudyTime of the same day
    assert dicom_known_time({**day, "StudyTime": "0800", "AcquisitionDate": "20200301"}) \
        == datetime(2020, 3, 1, 8, 0, 59, tzinfo=UTC)
    # the latest tag wins: content created the next day
    assert dicom_known_time({**day, "StudyTime": "0800", "ContentDate": "20200302",
                             "ContentTime": "0100"}) == datetime(2020, 3, 2, 1, 0, 59,
                                                                 tzinfo=UTC)
    assert dicom_known_time({**day, "StudyTime": "180000"}, ZoneInfo("Australia/Brisbane")) \
        == datetime(2020, 3, 1, 8, tzinfo=UTC)
    assert dicom_known_time({"StudyDate": "2020-03-01"}) is None  # not a DICOM DA


def test_issued_after_the_index_is_not_known(tmp_path: Path, covid_task: TaskSpec) -> None:
    """Drawn at 08:00, resulted at 14:00: the value was not known at the 10:00 index."""
    res = [*f.covid_patient("late", extra=[_crp("c1", "late", "2020-03-01T08:00:00Z",
                                                issued="2020-03-01T14:00:00Z")]),
           *f.covid_patient("early", extra=[_crp("c2", "early", "2020-03-01T08:00:00Z",
                                                 issued="2020-03-01T09:30:00Z")])]
    cohort = build_cohort(_site(tmp_path, res), covid_task)
    assert cohort.skipped == []
    late, early = _row(cohort, "late"), _row(cohort, "early")
    assert math.isnan(late["crp"]) and late["missing_crp"] == 1.0
    assert early["crp"] == 80.0
    assert early["max_feature_time"] == pd.Timestamp("2020-03-01T09:30:00Z")


def test_condition_recorded_after_the_index_is_not_known(tmp_path: Path,
                                                         covid_task: TaskSpec) -> None:
    """Coded during the admission with a back-dated onset: not known before the index."""
    res = [*f.covid_patient("late", extra=[f.condition(
               "h1", "late", f.HYPERTENSION, "2015-01-01", recorded="2020-03-02T08:00:00Z")]),
           *f.covid_patient("early", extra=[f.condition(
               "h2", "early", f.HYPERTENSION, "2015-01-01", recorded="2019-05-01")])]
    cohort = build_cohort(_site(tmp_path, res), covid_task)
    assert cohort.skipped == []
    assert _row(cohort, "late")["hypertension"] == 0.0
    assert _row(cohort, "early")["hypertension"] == 1.0
    assert _row(cohort, "early")["max_feature_time"] == pd.Timestamp("2020-03-01T09:00:00Z")


def _no_observations(pid: str, extra: list[dict]) -> list[dict]:
    """A COVID-19 patient (index 2020-03-01 10:00 UTC) without the factory's heart rate."""
    return [r for r in f.covid_patient(pid) if r["resourceType"] != "Observation"] + extra


def test_partial_dates_are_the_end_of_their_period(tmp_path: Path,
                                                   covid_task: TaskSpec) -> None:
    res = [*_no_observations("march", [f.condition("o1", "march", "162864005", "2020-03")]),
           *_no_observations("feb", [f.condition("o2", "feb", "162864005", "2020-02"),
                                     _crp("c", "feb", "2020-02")])]
    cohort = build_cohort(_site(tmp_path, res), covid_task)
    assert cohort.skipped == []
    assert _row(cohort, "march")["obesity"] == 0.0  # March 2020 is not over at the index
    feb = _row(cohort, "feb")
    assert feb["obesity"] == 1.0 and feb["crp"] == 80.0
    # both known at the last second of February 2020 (a leap year)
    assert feb["max_feature_time"] == pd.Timestamp("2020-02-29T23:59:59Z")


def test_parse_time_start_and_end_of_periods() -> None:
    def end(value: str, tz: str = "UTC") -> datetime:
        return parse_time(value, tz=ZoneInfo(tz), end=True)

    assert end("2020") == datetime(2020, 12, 31, 23, 59, 59, tzinfo=UTC)
    assert end("2019-12") == datetime(2019, 12, 31, 23, 59, 59, tzinfo=UTC)
    assert end("2021-02") == datetime(2021, 2, 28, 23, 59, 59, tzinfo=UTC)
    assert end("2020-03-01") == datetime(2020, 3, 1, 23, 59, 59, tzinfo=UTC)
    assert end("2020-03-01", "Australia/Brisbane") == datetime(2020, 3, 1, 13, 59, 59,
                                                                tzinfo=UTC)
    # a full dateTime is itself, to the whole second
    assert end("2020-03-01T10:00:00.869+02:00") == datetime(2020, 3, 1, 8, tzinfo=UTC)
    # clinical time: the first instant of the period, in the site's zone
    assert parse_time("2020-03") == datetime(2020, 3, 1, tzinfo=UTC)
    assert parse_time("2020-03-01", tz=ZoneInfo("Australia/Brisbane")) == datetime(
        2020, 2, 29, 14, tzinfo=UTC)
    assert parse_time("2020-03-01T10:00:00", tz=ZoneInfo("Australia/Brisbane")) == datetime(
        2020, 3, 1, 0, tzinfo=UTC)  # a time without an offset is the site's local time
    with pytest.raises(ValueError, match="not a FHIR date"):
        parse_time("2020-02-30", end=True)


@pytest.mark.parametrize("value, tz, end", [
    ("0001-01-01", "Asia/Tokyo", False),  # midnight in Tokyo is year 0 in UTC
    ("0001-01-01T05:00:00", "Asia/Tokyo", False),
    ("0001-01-01T00:00:00+01:00", "UTC", True),
    ("9999-12-31T23:00:00-05:00", "UTC", False),  # 04:00 UTC of year 10000
    ("9999-12-31T23:00:00", "America/New_York", True),
])
def test_parse_time_outside_the_datetime_range_is_a_bad_value(value: str, tz: str,
                                                              end: bool) -> None:
    with pytest.raises(ValueError, match=f"'{re.escape(value)}' .*outside"):
        parse_time(value, tz=ZoneInfo(tz), end=end)
    # at the edge of the range, inside it, a value is read
    assert parse_time("0001-01-01", tz=UTC) == datetime(1, 1, 1, tzinfo=UTC)
    assert parse_time("9999-12-31", tz=ZoneInfo("Asia/Tokyo")).year == 9999


@pytest.mark.parametrize("validation", ["task", "all"])
def test_an_index_at_the_edge_of_the_datetime_range_builds(tmp_path: Path, covid_task: TaskSpec,
                                                           validation: str) -> None:
    """Windows around an index in year 1 or 9999 stop at the range: no OverflowError."""
    early = f.covid_patient("early", "0001-01-02T00:00:00Z", birth="0001-01-01")
    late = f.covid_patient("late", "9999-12-31T12:00:00Z",
                           oxygen_at="9999-12-31T20:00:00Z")
    late[3]["effectiveDateTime"] = "9999-12-31T11:00:00Z"  # the heart rate before the index
    cohort = build_cohort(_site(tmp_path, [*early, *late]), covid_task,
                          data=DataConfig(validation=validation))  # type: ignore[arg-type]
    assert cohort.skipped == []
    assert _row(cohort, "early")["index_time"] == pd.Timestamp("0001-01-02T00:00:00Z")
    row = _row(cohort, "late")
    assert row["label"] == 1 and row["heart_rate"] == 80.0
    # DICOM times past the range are the end of their day, held at the range's end
    assert dicom_known_time({"StudyDate": "99991231", "StudyTime": "230000",
                             "TimezoneOffsetFromUTC": "-0500"}) == datetime.max.replace(
        tzinfo=UTC)
    assert dicom_known_time({"StudyDate": "00010101", "StudyTime": "010000",
                             "TimezoneOffsetFromUTC": "+0900"}) == datetime(
        1, 1, 1, 14, 59, 59, tzinfo=UTC)


def test_known_exactly_at_the_index_counts(tmp_path: Path, covid_task: TaskSpec) -> None:
    res = [*f.covid_patient("at", extra=[_crp("c1", "at", "2020-03-01T09:00:00Z",
                                              issued="2020-03-01T10:00:00Z")]),
           # Synthea: issued = effective + milliseconds, effective = the encounter start
           *f.covid_patient("synthea", extra=[_crp("c2", "synthea", "2020-03-01T12:00:00+02:00",
                                                   issued="2020-03-01T12:00:00.869+02:00")]),
           *f.covid_patient("after", extra=[_crp("c3", "after", "2020-03-01T09:00:00Z",
                                                 issued="2020-03-01T10:00:01Z")])]
    cohort = build_cohort(_site(tmp_path, res), covid_task)
    assert cohort.skipped == []
    at, synthea, after = (_row(cohort, p) for p in ("at", "synthea", "after"))
    assert at["crp"] == 80.0 and at["max_feature_time"] == at["index_time"] == INDEX
    assert synthea["crp"] == 80.0 and synthea["max_feature_time"] == INDEX
    assert math.isnan(after["crp"])


def test_site_time_zone_places_date_only_records(tmp_path: Path,
                                                 covid_task: TaskSpec) -> None:
    """Index 20:00 UTC = 06:00 the next day in Brisbane (UTC+10, no daylight saving)."""
    res = f.covid_patient("p1", "2020-03-01T20:00:00+00:00",
                          extra=[_crp("c", "p1", "2020-03-01")])
    site = _site(tmp_path, res)
    utc = _row(build_cohort(site, covid_task), "p1")
    assert math.isnan(utc["crp"])  # 1 March UTC is not over at 20:00 UTC
    brisbane = _row(build_cohort(site, covid_task,
                                 data=DataConfig(timezone="Australia/Brisbane")), "p1")
    assert brisbane["crp"] == 80.0  # 1 March in Brisbane ended at 13:59:59 UTC
    assert brisbane["max_feature_time"] == pd.Timestamp("2020-03-01T13:59:59Z")
    # the hospital's policy.yaml names its zone: it holds over the config's data.timezone
    (site / "policy.yaml").write_text("timezone: Australia/Brisbane\n")
    for data in (None, DataConfig(timezone="UTC")):
        own = _row(build_cohort(site, covid_task, data=data), "p1")
        assert own["crp"] == 80.0
        assert own["max_feature_time"] == brisbane["max_feature_time"]


def test_alzheimers_notes_after_the_diagnosis_are_not_used(tmp_path: Path) -> None:
    task = load_task("alzheimers")  # reference date 2020-01-01
    res = [f.patient("ad", birth="1940-01-01"),
           f.condition("c-ad", "ad", f.ALZHEIMERS, "2019-06-01"),
           f.document("n1", "ad", "reviewed in memory clinic", "2019-05-31T12:00:00Z"),
           # on the day of a date-only onset: on or after the diagnosis
           f.document("n2", "ad", "diagnosed with Alzheimer's disease", "2019-06-01T09:00:00Z"),
           f.document("n3", "ad", "Alzheimer's disease, on donepezil", None,
                      period_start="2019-09-01"),
           f.patient("neg", birth="1940-01-01"),
           f.document("n4", "neg", "well, walks daily", "2019-09-01T10:00:00Z")]
    cohort = build_cohort(_site(tmp_path, res), task)
    assert cohort.skipped == []
    assert _row(cohort, "ad")["notes"] == ["reviewed in memory clinic"]
    assert _row(cohort, "neg")["notes"] == ["well, walks daily"]
    assert cohort.counts["notes_after_label_condition"] == 2
    assert _row(cohort, "ad")["max_feature_time"] == pd.Timestamp("2019-05-31T12:00:00Z")


def test_labels_keep_clinical_time(tmp_path: Path, covid_task: TaskSpec) -> None:
    """Labels use onset / performed times (a partial date's first instant), not known times."""
    ad_task = load_task("alzheimers")  # reference date 2020-01-01 00:00 UTC
    ad = [f.patient("recorded-late", birth="1940-01-01"),
          f.condition("c1", "recorded-late", f.ALZHEIMERS, "2019-06-01",
                      recorded="2020-06-01"),
          f.patient("onset-on-the-day", birth="1940-01-01"),
          f.condition("c2", "onset-on-the-day", f.ALZHEIMERS, "2020-01-01")]
    labels = build_cohort(_site(tmp_path / "ad", ad), ad_task).table.set_index(
        "patient_id")["label"].to_dict()
    assert labels == {"recorded-late": 1, "onset-on-the-day": 1}
    # a ventilator use dated 2020-03-02 (date only) is inside (10:00, +24 h] by its start
    covid = f.covid_patient("p1", extra=[f.device("d1", "p1", f.VENTILATOR),
                                         f.device_use("u1", "p1", "d1", "2020-03-02")])
    assert _row(build_cohort(_site(tmp_path / "covid", covid), covid_task), "p1")["label"] == 1
