"""Bad input: each case is skipped and counted (naming file, resource id and field) without
losing the good data, or stops the run with a DataError under ``on_error: fail``."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest

from multimodal_fl.config import DataConfig, load_task
from multimodal_fl.data import DataError, build_cohort
from multimodal_fl.data.fhir_json import MAX_BUNDLE_DEPTH
from tests.data import factory as f

Writer = Callable[[Path], None]


def _good(root: Path) -> None:
    f.write_json(root / "fhir" / "good.json",
                 f.bundle(f.covid_patient("good", oxygen_at="2020-03-01T12:00:00Z")))


def _invalid_json(root: Path) -> None:
    (root / "fhir" / "bad.json").write_text('{"resourceType": "Bundle", "entry": [')


def _not_fhir(root: Path) -> None:
    f.write_json(root / "fhir" / "bad.json", {"hello": "world"})


def _unknown_type(root: Path) -> None:
    f.write_json(root / "fhir" / "bad.json", f.bundle([{"resourceType": "Spaceship",
                                                         "id": "ufo1"}]))


def _no_subject(root: Path) -> None:
    obs = f.observation("obs-nosubj", "good", "8867-4", 70.0, "/min", "2020-03-01T09:00:00Z")
    del obs["subject"]
    f.write_json(root / "fhir" / "bad.json", obs)


def _missing_patient(root: Path) -> None:
    f.write_json(root / "fhir" / "bad.json", f.condition("c-ghost", "ghost", f.COVID,
                                                          "2020-03-01"))


def _unknown_unit(root: Path) -> None:
    f.write_json(root / "fhir" / "bad.json", f.observation(
        "obs-unit", "good", "8867-4", 70.0, "furlongs/fortnight", "2020-03-01T09:00:00Z"))


def _unconvertible_unit(root: Path) -> None:
    f.write_json(root / "fhir" / "bad.json", f.observation(
        "obs-glu", "good", "2345-7", 5.5, "mmol/L", "2020-03-01T09:00:00Z"))


def _bad_date(root: Path) -> None:
    f.write_json(root / "fhir" / "bad.json", f.observation(
        "obs-date", "good", "8867-4", 70.0, "/min", "yesterday at noon"))


def _date_out_of_range(root: Path) -> None:
    f.write_json(root / "fhir" / "bad.json", f.observation(
        "obs-9999", "good", "8867-4", 70.0, "/min", "9999-12-31T23:00:00-05:00"))


def _hl7v2_gender(root: Path) -> None:
    f.write_json(root / "fhir" / "bad.json", f.patient("hl7", gender="F"))


def _value_with_comparator(root: Path) -> None:
    obs = f.observation("obs-lt", "good", "9279-1", 8.0, "/min", "2020-03-01T09:00:00Z")
    obs["valueQuantity"]["comparator"] = "<"
    f.write_json(root / "fhir" / "bad.json", obs)


def _ndjson_bad_line(root: Path) -> None:
    good = f.observation("obs-ok", "good", "9279-1", 20.0, "/min", "2020-03-01T09:00:00Z")
    (root / "fhir" / "bad.ndjson").write_text(json.dumps(good) + "\n{not json\n")


def _bundle_too_deep(root: Path) -> None:
    """A Bundle inside Bundle entries one level beyond MAX_BUNDLE_DEPTH: its entries unread."""
    inner = f.bundle([f.observation("obs-deep", "good", "9279-1", 20.0, "/min",
                                    "2020-03-01T09:00:00Z")])
    for _ in range(MAX_BUNDLE_DEPTH):
        inner = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": inner}]}
    f.write_json(root / "fhir" / "bad.json", inner)


DEEP_ENTRY = ".".join(["entry[0].resource"] * (MAX_BUNDLE_DEPTH - 1)) + ".entry[0]"


def _unknown_charset(root: Path) -> None:
    doc = f.document("n-klingon", "good", "tlhIngan Hol", "2020-03-01T09:00:00Z")
    doc["content"][0]["attachment"]["contentType"] = "text/plain; charset=klingon"
    f.write_json(root / "fhir" / "bad.json", doc)


def _compressed_export(root: Path) -> None:
    """A Bulk Data export left compressed was skipped without a word (a bug hunt); a hidden
    file (.DS_Store) is no one's data and is not reported."""
    import gzip

    good = f.observation("obs-gz", "good", "9279-1", 20.0, "/min", "2020-03-01T09:00:00Z")
    (root / "fhir" / "more.ndjson.gz").write_bytes(gzip.compress(json.dumps(good).encode()))
    (root / "fhir" / ".DS_Store").write_bytes(b"\0")


def _conflicting_patient(root: Path) -> None:
    f.write_json(root / "fhir" / "zz-dup.json", f.patient("good", birth="1999-01-01"))


def _unreadable_image(root: Path) -> None:
    (root / "images").mkdir()
    (root / "images" / "good.png").write_bytes(b"\x89PNG broken")
    (root / "images.csv").write_text("patient_id,path\ngood,images/good.png\n")


# case -> (writer, reason, file, resource id, field)
CASES: dict[str, tuple[Writer, str, str, str, str]] = {
    "invalid_json": (_invalid_json, "invalid_json", "fhir/bad.json", "", "<json>"),
    "not_fhir": (_not_fhir, "not_fhir", "fhir/bad.json", "", "resourceType"),
    "unknown_resource_type": (_unknown_type, "unknown_resource_type", "fhir/bad.json", "ufo1",
                              "resourceType"),
    "no_subject": (_no_subject, "no_subject", "fhir/bad.json", "obs-nosubj", "subject"),
    "missing_patient": (_missing_patient, "missing_patient", "fhir/bad.json", "c-ghost",
                        "subject"),
    "unknown_unit": (_unknown_unit, "unknown_unit", "fhir/bad.json", "obs-unit",
                     "valueQuantity.code"),
    "unconvertible_unit": (_unconvertible_unit, "unknown_unit", "fhir/bad.json", "obs-glu",
                           "valueQuantity.code"),
    "unparseable_date": (_bad_date, "bad_date", "fhir/bad.json", "obs-date",
                         "effectiveDateTime"),
    "date_out_of_range": (_date_out_of_range, "bad_date", "fhir/bad.json", "obs-9999",
                          "effectiveDateTime"),
    "unknown_gender": (_hl7v2_gender, "unknown_gender", "fhir/bad.json", "hl7", "gender"),
    "value_with_comparator": (_value_with_comparator, "value_with_comparator", "fhir/bad.json",
                              "obs-lt", "valueQuantity.comparator"),
    "ndjson_bad_line": (_ndjson_bad_line, "invalid_json", "fhir/bad.ndjson", "line 2",
                        "<json>"),
    "bundle_too_deep": (_bundle_too_deep, "bundle_too_deep", "fhir/bad.json", DEEP_ENTRY,
                        "entry.resource"),
    "unknown_charset": (_unknown_charset, "unknown_charset", "fhir/bad.json", "n-klingon",
                        "content[0].attachment.contentType"),
    "compressed_export": (_compressed_export, "unread_file", "fhir/more.ndjson.gz", "", "<file>"),
    "conflicting_patient": (_conflicting_patient, "conflicting_patient", "fhir/zz-dup.json",
                            "good", "birthDate"),
    "unreadable_image": (_unreadable_image, "unreadable_image", "images/good.png", "good",
                         "images.csv:path"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_skipped_and_counted(tmp_path: Path, case: str) -> None:
    writer, reason, file, rid, field = CASES[case]
    root = tmp_path / "site"
    _good(root)
    writer(root)
    cohort = build_cohort(root, load_task("covid_oxygen_24h"), data=DataConfig(on_error="skip"))
    assert [s.reason for s in cohort.skipped] == [reason]
    skip = cohort.skipped[0]
    assert skip.file.endswith(file) and skip.resource_id == rid and skip.field == field
    assert cohort.counts["skipped_by_reason"] == {reason: 1}
    # the good data is still there
    good = cohort.table[cohort.table.patient_id == "good"]
    assert len(good) == 1 and good.iloc[0]["label"] == 1 and good.iloc[0]["heart_rate"] == 80.0
    if case == "conflicting_patient":
        assert good.iloc[0]["age"] > 50  # the first Patient (born 1960) was kept


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_fails_with_location(tmp_path: Path, case: str) -> None:
    writer, reason, file, rid, field = CASES[case]
    root = tmp_path / "site"
    _good(root)
    writer(root)
    with pytest.raises(DataError) as info:
        build_cohort(root, load_task("covid_oxygen_24h"), data=DataConfig(on_error="fail"))
    msg = str(info.value)
    assert file in msg and f"field '{field}'" in msg and (rid in msg)
    assert info.value.skip is not None and info.value.skip.reason == reason


def test_bad_date_without_validation_is_reported_by_parser(tmp_path: Path) -> None:
    """Dates are also checked by our own parser (e.g. Condition.onsetDateTime)."""
    from multimodal_fl.data.errors import ErrorSink
    from multimodal_fl.data.fhir import FHIRReader

    sink = ErrorSink()
    reader = FHIRReader(load_task("covid_oxygen_24h"), sink)
    reader._validate = lambda *a: True  # type: ignore[method-assign]
    reader.add_resource(f.patient("p"), "x.json")
    reader.add_resource(f.condition("c", "p", f.COVID, "March 2020"), "x.json")
    assert [(s.reason, s.resource_id, s.field) for s in sink.skipped] == [
        ("bad_date", "c", "onsetDateTime")]


@pytest.mark.parametrize("on_error", ["skip", "fail"])
def test_a_birth_date_before_year_1_in_utc_is_a_bad_date(tmp_path: Path, on_error: str) -> None:
    """0001-01-01 at a site in Tokyo starts in year 0 UTC: reported, never an OverflowError."""
    root = tmp_path / "site"
    _good(root)
    (root / "policy.yaml").write_text("timezone: Asia/Tokyo\n")
    f.write_json(root / "fhir" / "bad.json", f.patient("year1", birth="0001-01-01"))
    data = DataConfig(on_error=on_error)  # type: ignore[arg-type]
    if on_error == "fail":
        with pytest.raises(DataError, match=r"fhir/bad.json: resource 'year1', field "
                                            r"'birthDate': '0001-01-01' .*outside"):
            build_cohort(root, load_task("covid_oxygen_24h"), data=data)
        return
    cohort = build_cohort(root, load_task("covid_oxygen_24h"), data=data)
    assert [(s.file, s.resource_id, s.field, s.reason) for s in cohort.skipped] == [
        ("fhir/bad.json", "year1", "birthDate", "bad_date")]
    assert list(cohort.table.patient_id) == ["good"]


def test_a_gender_outside_administrative_gender_is_reported_not_guessed(tmp_path: Path) -> None:
    """HL7 v2 'F' / 'M' are not FHIR codes: each is named, and sex stays unknown."""
    root = tmp_path / "site"
    res = [*f.covid_patient("v2", gender="F"), *f.covid_patient("fhir", gender="female"),
           *f.covid_patient("other", gender="other"), *f.covid_patient("unk", gender="unknown")]
    f.write_json(root / "fhir" / "b.json", f.bundle(res))
    cohort = build_cohort(root, load_task("covid_oxygen_24h"))
    assert [(s.file, s.resource_id, s.field, s.reason) for s in cohort.skipped] == [
        ("fhir/b.json", "v2", "gender", "unknown_gender")]
    assert "'F'" in cohort.skipped[0].detail and "administrative-gender" in cohort.skipped[0].detail
    table = cohort.table.set_index("patient_id")
    assert table.loc["v2", "sex"] == "unknown" and math.isnan(table.loc["v2", "sex_female"])
    assert table.loc["v2", "heart_rate"] == 80.0  # the rest of the patient is kept
    assert table.loc["fhir", "sex_female"] == 1.0 and table.loc["other", "sex"] == "other"


@pytest.mark.parametrize("comparator", ["<", "<=", ">=", ">"])
def test_a_value_with_a_comparator_is_a_bound_not_a_value(tmp_path: Path,
                                                           comparator: str) -> None:
    """'<5 mg/L' is not 5 mg/L: the value is not used, and counted."""
    root = tmp_path / "site"
    crp = f.observation("crp-lt", "p", "1988-5", 5.0, "mg/L", "2020-03-01T08:00:00Z")
    crp["valueQuantity"]["comparator"] = comparator
    bp = f.bp_panel("bp", "p", 120.0, 80.0, "2020-03-01T08:00:00Z")
    bp["component"][1]["valueQuantity"]["comparator"] = comparator
    f.write_json(root / "fhir" / "b.json", f.bundle(f.covid_patient("p", extra=[crp, bp])))
    cohort = build_cohort(root, load_task("covid_oxygen_24h"))
    row = cohort.table.iloc[0]
    assert math.isnan(row["crp"]) and row["missing_crp"] == 1.0
    assert row["systolic_bp"] == 120.0 and math.isnan(row["diastolic_bp"])
    assert [(s.resource_id, s.field, s.reason) for s in cohort.skipped] == [
        ("crp-lt", "valueQuantity.comparator", "value_with_comparator"),
        ("bp", "component[1].valueQuantity.comparator", "value_with_comparator")]
    assert f"'{comparator}'" in cohort.skipped[0].detail
    assert cohort.counts["skipped_by_reason"] == {"value_with_comparator": 2}


def test_a_site_with_only_a_compressed_export_says_why_it_is_empty(tmp_path: Path) -> None:
    from multimodal_fl.data.sites import discover_site

    (tmp_path / "site" / "fhir").mkdir(parents=True)
    (tmp_path / "site" / "fhir" / "Patient.ndjson.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(DataError, match=r"fhir/Patient\.ndjson\.gz: only \.json and \.ndjson "
                                        r"files are read; decompress or convert them"):
        discover_site(tmp_path / "site")
