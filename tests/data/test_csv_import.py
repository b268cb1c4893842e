"""``mmfl data import-csv``: a flat CSV into the site contract, read back by build_cohort.

Small CSVs are written in each test; the mapping is a YAML string. Malformed CSVs (wrong
field counts, broken quoting, bad bytes, empty files), bad values under both error
policies, missing columns, unknown mapping keys, splitting with pooling, the known-time
fields and the id scheme each have a test.
"""

from __future__ import annotations

import csv
import json
import math
import re
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class
from PIL import Image
from typer.testing import CliRunner

from multimodal_fl.cli import app
from multimodal_fl.config import DataConfig, TaskSpec
from multimodal_fl.data import DataError, build_cohort
from multimodal_fl.data.csv_import import POOL_SITE, fhir_id, import_csv
from multimodal_fl.data.csv_mapping import CsvMapping, MappingError, load_mapping

MAPPING = """\
name: test_map
patient_id: pid
index: {column: admitted}
codes: {present: ["1"], absent: ["2"], unknown: ["98", "99"], not_applicable: ["97"]}
site_names:
  sector: {"4": IMSS, "12": SSA}
patient:
  sex: {column: sex, female: ["1"], male: ["2"], unknown: ["99"]}
  age: age
encounter:
  class: {column: kind, codes: {"1": AMB, "2": IMP}, unknown: ["99"]}
conditions:
  - {name: covid19, column: covid, code: "840539006", onset: symptoms}
  - {name: diabetes, column: diab, code: "44054006"}
  - {name: pregnancy, column: preg, code: "77386006", not_applicable_means: absent}
observations:
  - {name: crp, column: crp, code: "1988-5", unit: mg/L, unknown: ["98", "99"]}
  - {name: cigs_per_day, column: cigs, system: local, code: cigs, unit: "/d",
     unknown: ["98", "99"], not_applicable: ["97"], not_applicable_means: 0}
  - {name: icu, column: icu, system: local, code: icu, type: boolean,
     not_applicable_means: absent, known: updated}
label: {column: kind, positive: ["2"], negative: ["1"], unknown: ["99"]}
"""
HEADER = "pid,admitted,symptoms,sex,age,kind,covid,diab,preg,crp,cigs,icu,updated,sector"
ROWS = [
    "p1,2021-07-01,2021-06-28,1,40,2,1,1,2,12.5,5,1,2021-08-01,4",
    "p2,2021-07-02,2021-06-30,2,65,1,1,2,97,,97,97,2021-08-01,4",
    "p3,2021-07-03,,99,30,1,1,98,1,98,98,99,2021-08-01,12",
]
TASK = TaskSpec.model_validate({
    "name": "t",
    "cohort": {"conditions": [{"name": "covid19", "codes": ["840539006"]}]},
    "index": {"kind": "condition_encounter"},
    "features": {
        "demographics": ["age", "sex"],
        "observations": [{"name": "crp", "codes": ["1988-5"], "unit": "mg/L"}],
        "conditions": [{"name": "diabetes", "codes": ["44054006"]},
                       {"name": "pregnancy", "codes": ["77386006"]}]},
    "label": {"kind": "labels_csv"},
})


def _csv(tmp_path: Path, rows: list[str], header: str = HEADER, name: str = "data.csv") -> Path:
    path = tmp_path / name
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def _mapping(tmp_path: Path, text: str = MAPPING) -> Path:
    path = tmp_path / "map.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _ndjson(site: Path, kind: str) -> list[dict[str, Any]]:
    path = site / "fhir" / f"{kind}.ndjson"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def _by_name(site: Path, kind: str) -> dict[str, dict[str, Any]]:
    """Resources keyed by '<patient id>.<entry name>' (the id without the '.e<n>' part)."""
    return {re.sub(r"\.e\d+\.", ".", r["id"]): r for r in _ndjson(site, kind)}


# --------------------------------------------------------------------------- round trip


def test_good_csv_round_trips_into_a_cohort(tmp_path: Path) -> None:
    out = tmp_path / "site"
    result = import_csv(_csv(tmp_path, ROWS), _mapping(tmp_path), out)
    assert result.counts["rows_imported"] == 3 and not result.skipped
    cohort = build_cohort(out, TASK)
    t = cohort.table.set_index("patient_id")
    assert sorted(t.index) == ["p1", "p2", "p3"]
    assert t["sex"].to_dict() == {"p1": "female", "p2": "male", "p3": "unknown"}
    # whole years are completed years: the age at the index is the middle of that year
    for pid, years in (("p1", 40), ("p2", 65), ("p3", 30)):
        assert math.floor(t.loc[pid, "age"]) == years
        assert abs(t.loc[pid, "age"] - (years + 0.5)) < 0.01
    assert t["index_time"].dt.strftime("%Y-%m-%dT%H:%M").to_dict() == {
        "p1": "2021-07-01T00:00", "p2": "2021-07-02T00:00", "p3": "2021-07-03T00:00"}
    assert t["diabetes"].to_dict() == {"p1": 1.0, "p2": 0.0, "p3": 0.0}
    assert t["pregnancy"].to_dict() == {"p1": 0.0, "p2": 0.0, "p3": 1.0}
    assert t.loc["p1", "crp"] == 12.5 and math.isnan(t.loc["p3", "crp"])
    assert t["label"].to_dict() == {"p1": 1, "p2": 0, "p3": 0}
    assert cohort.counts["skipped_by_reason"] == {}
    codes = {r["code"]["coding"][0]["code"] for r in _ndjson(out, "Condition")}
    assert codes == {"840539006", "44054006", "77386006"}
    classes = {r["subject"]["reference"]: r["class"]["code"] for r in _ndjson(out, "Encounter")}
    assert classes == {"Patient/p1": "IMP", "Patient/p2": "AMB", "Patient/p3": "AMB"}


def test_every_resource_validates_with_r4b(tmp_path: Path) -> None:
    out = tmp_path / "site"
    import_csv(_csv(tmp_path, ROWS), _mapping(tmp_path), out)
    n = 0
    for path in (out / "fhir").glob("*.ndjson"):
        for line in path.read_text().splitlines():
            res = json.loads(line)
            get_fhir_model_class(res["resourceType"]).model_validate(res)
            n += 1
    # patients, encounters, conditions (3 COVID-19, 1 diabetes, 1 pregnancy), observations
    # (p1: crp, cigs, icu; p2: cigs 0, icu no; p3: all unknown)
    assert n == 3 + 3 + 5 + 5


# --------------------------------------------------------------------------- coded values


def test_unknown_and_not_applicable_codes_per_column(tmp_path: Path) -> None:
    out = tmp_path / "site"
    import_csv(_csv(tmp_path, ROWS), _mapping(tmp_path), out)
    cond = _by_name(out, "Condition")
    obs = _by_name(out, "Observation")
    # 98 (unknown) is an absent value: no diabetes Condition, no crp / cigs Observation
    assert "p3.diabetes" not in cond and "p3.crp" not in obs and "p3.cigs-per-day" not in obs
    # 97 (not applicable) means what the column says: pregnancy absent, ICU no, 0 cigarettes
    assert "p2.pregnancy" not in cond
    assert obs["p2.icu"]["valueBoolean"] is False
    assert obs["p2.cigs-per-day"]["valueQuantity"]["value"] == 0
    # ... and an empty value is missing; 99 in icu is unknown (no Observation)
    assert "p2.crp" not in obs and "p3.icu" not in obs
    assert obs["p1.icu"]["valueBoolean"] is True
    assert obs["p1.crp"]["valueQuantity"] == {"value": 12.5, "unit": "mg/L",
                                              "system": "http://unitsofmeasure.org",
                                              "code": "mg/L"}
    # sex 99 is unknown: no gender; class 99 would be UNK
    patients = {p["id"]: p for p in _ndjson(out, "Patient")}
    assert "gender" not in patients["p3"]


def test_not_applicable_default_is_unknown(tmp_path: Path) -> None:
    """Without not_applicable_means, 97 is an absent value, never 'no'."""
    text = MAPPING.replace(", type: boolean,\n     not_applicable_means: absent,",
                           ", type: boolean,")
    out = tmp_path / "site"
    import_csv(_csv(tmp_path, ROWS), _mapping(tmp_path, text), out)
    assert "p2.icu" not in _by_name(out, "Observation")


# --------------------------------------------------------------------------- bad rows


BAD_AGE = [*ROWS[:2], "p9,2021-07-04,,1,abc,1,1,2,2,1,1,2,2021-08-01,4", ROWS[2]]


def test_no_row_imported_is_an_error_naming_the_column_and_nothing_is_written(
        tmp_path: Path) -> None:
    """A forgotten source.date_format skipped every row ("400 read, 400 skipped, 0 imported")
    and import-csv exited 0 with an empty site."""
    day_first = [re.sub(r"2021-(\d\d)-(\d\d)", r"\2/\1/2021", r) for r in ROWS]
    csv_file, mapping = _csv(tmp_path, day_first), _mapping(tmp_path)
    out = tmp_path / "site"
    with pytest.raises(DataError, match=r"data\.csv: 0 of 3 rows imported \(3 skipped, 0 not "
                       r"kept by keep_rows\); nothing written: most often column 'admitted' "
                       r"\(bad_date, 3 row\(s\)\), e.g. line 2: "):
        import_csv(csv_file, mapping, out)
    assert not out.exists()
    result = CliRunner().invoke(app, ["data", "import-csv", str(csv_file), "--mapping",
                                      str(mapping), "--out", str(out)])
    assert result.exit_code != 0 and "most often column 'admitted'" in result.output
    assert not out.exists()
    filtered = MAPPING.replace("index:", 'keep_rows: [{column: sector, values: ["7"]}]\nindex:')
    with pytest.raises(DataError, match="no row passes the mapping's keep_rows filters"):
        import_csv(_csv(tmp_path, ROWS), _mapping(tmp_path, filtered), out)


def test_a_site_names_entry_matching_no_value_is_warned_with_the_nearest(tmp_path: Path
                                                                          ) -> None:
    """An entry that matched no value of the split column was ignored silently (the site
    got the generated name)."""
    text = MAPPING.replace('{"4": IMSS, ', '{"04": IMSS, ')
    csv_file, mapping, out = _csv(tmp_path, ROWS), _mapping(tmp_path, text), tmp_path / "s"
    result = import_csv(csv_file, mapping, out, split_by="sector")
    expected = ('site_names.sector: "04" (-> IMSS) matches no value of column \'sector\' in the '
                'imported rows, so it names no site; nearest unnamed value: "4"')
    assert [w[:len(expected)] for w in result.warnings] == [expected]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["SSA", "sector-4"]
    assert json.loads((out / "import_report.json").read_text())["warnings"] == result.warnings
    cli = CliRunner().invoke(app, ["data", "import-csv", str(csv_file), "--mapping",
                                   str(mapping), "--out", str(tmp_path / "s2"),
                                   "--split-by", "sector"])
    assert cli.exit_code == 0 and expected in " ".join(cli.output.split())
    assert import_csv(csv_file, _mapping(tmp_path), tmp_path / "s3", split_by="sector"
                      ).warnings == []
    # a code list wider than the extract (a national list imported for one region): every
    # value is named, so an entry matching nothing is no misspelling and is not warned of
    wider = MAPPING.replace('"12": SSA}', '"12": SSA, "13": universitario}')
    assert import_csv(csv_file, _mapping(tmp_path, wider), tmp_path / "s4", split_by="sector"
                      ).warnings == []


def test_bad_value_skipped_with_line_and_column(tmp_path: Path) -> None:
    out = tmp_path / "site"
    result = import_csv(_csv(tmp_path, BAD_AGE), _mapping(tmp_path), out)
    assert result.counts["rows_skipped"] == 1 and result.counts["rows_imported"] == 3
    (skip,) = result.skipped
    assert (skip.file, skip.resource_id, skip.field, skip.reason) == (
        "data.csv", "line 4", "age", "bad_number")
    assert "'abc'" in skip.message() and "0 to 150" in skip.message()
    assert len(build_cohort(out, TASK).table) == 3
    report = json.loads((out / "import_report.json").read_text())
    assert report["skipped"][0]["resource_id"] == "line 4"


def test_bad_value_stops_under_fail(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        import_csv(_csv(tmp_path, BAD_AGE), _mapping(tmp_path), tmp_path / "site",
                   on_error="fail")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("data.csv: resource 'line 4', field 'age': 'abc'")
    assert not (tmp_path / "site").exists()  # nothing written before the first bad row


def test_every_bad_value_of_a_row_is_reported(tmp_path: Path) -> None:
    rows = [ROWS[0], "p4,2021-07-04,2021-13-01,7,40,5,1,3,2,1.2.3,1,1,2021-08-01,4"]
    result = import_csv(_csv(tmp_path, rows), _mapping(tmp_path), tmp_path / "site")
    got = {(s.field, s.reason) for s in result.skipped}
    assert got == {("sex", "bad_value"), ("kind", "bad_value"), ("diab", "bad_value"),
                   ("crp", "bad_number"), ("symptoms", "bad_date")}
    assert {s.resource_id for s in result.skipped} == {"line 3"}
    assert result.counts["rows_skipped"] == 1
    diab = next(s for s in result.skipped if s.field == "diab")
    assert "'3' is not a code of this column (present: '1'; absent: '2'" in diab.detail


@pytest.mark.parametrize(("rows", "line", "reason"), [
    ([ROWS[0], "p4,2021-07-04,1", ROWS[2]], 3, "bad_row"),                # too few fields
    ([ROWS[0], ROWS[1] + ",extra", ROWS[2]], 3, "bad_row"),                # too many
    ([ROWS[0], 'p4,"2021-07-04"x,,1,40,1,1,2,2,1,1,2,2021-08-01,4', ROWS[2]], 3, "bad_row"),
    ([ROWS[0], "", "", "p4,2021-07-04,1", ROWS[2]], 5, "bad_row"),         # after blank lines
    ([ROWS[0], "p4,not-a-date,,1,40,1,1,2,2,1,1,2,2021-08-01,4", ROWS[2]], 3, "bad_date"),
    ([ROWS[0], ",2021-07-04,,1,40,1,1,2,2,1,1,2,2021-08-01,4", ROWS[2]], 3, "missing_value"),
    ([ROWS[0], "p4,,,1,40,1,1,2,2,1,1,2,2021-08-01,4", ROWS[2]], 3, "missing_value"),
    ([ROWS[0], "p5,2021-07-04,,1,200,1,1,2,2,1,1,2,2021-08-01,4", ROWS[2]], 3, "bad_number"),
    ([ROWS[0], "p5,2021-07-04,,1,inf,1,1,2,2,1,1,2,2021-08-01,4", ROWS[2]], 3, "bad_number"),
    ([ROWS[0], "p6,2021-07-04,,1,40,1,1,2,2,nan,1,2,2021-08-01,4", ROWS[2]], 3, "bad_number"),
    ([ROWS[0], "p7,2021-07-04,,1,40,1,1,2,2,1,1,1,,4", ROWS[2]], 3, "missing_value"),
    ([ROWS[0], ROWS[1], ROWS[0].replace("2021-07-01", "2021-07-09")], 4, "duplicate_patient"),
    ([ROWS[0], ROWS[1], 'p4,"2021-07-04,,1,40,1,1,2,2,1,1,2,2021-08-01,4'], 4, "bad_row"),
])
def test_malformed_rows(tmp_path: Path, rows: list[str], line: int, reason: str) -> None:
    result = import_csv(_csv(tmp_path, rows), _mapping(tmp_path), tmp_path / "site")
    assert [(s.resource_id, s.reason) for s in result.skipped] == [(f"line {line}", reason)]
    assert result.counts["rows_imported"] == 2
    with pytest.raises(DataError, match=rf"^data\.csv: resource 'line {line}', field "):
        import_csv(_csv(tmp_path, rows), _mapping(tmp_path), tmp_path / "fail",
                   on_error="fail")


def test_nul_byte_and_crlf(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    text = "\r\n".join([HEADER, ROWS[0], ROWS[1].replace("p2", "p\x002"), ROWS[2]]) + "\r\n"
    path.write_text(text, encoding="utf-8")
    result = import_csv(path, _mapping(tmp_path), tmp_path / "site")
    assert [(s.resource_id, s.reason) for s in result.skipped] == [("line 3", "bad_row")]
    assert result.counts["rows_imported"] == 2


@pytest.mark.parametrize(("content", "expected"), [
    (b"", "data.csv: the file is empty"),
    ((HEADER + "\n" + ROWS[0] + "\n" + ROWS[1].replace("p2", "p\xe92") + "\n").encode("latin-1"),
     "data.csv: line 3: not valid utf-8-sig text"),
    ((HEADER + ",sex\n" + ROWS[0] + ",1\n").encode(), "column(s) ['sex'] appear twice"),
])
def test_unreadable_files_stop_whatever_the_policy(tmp_path: Path, content: bytes,
                                                   expected: str) -> None:
    path = tmp_path / "data.csv"
    path.write_bytes(content)
    with pytest.raises(DataError, match=re.escape(expected)):
        import_csv(path, _mapping(tmp_path), tmp_path / "site", on_error="skip")


def test_bom_and_other_delimiters_and_encodings(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    text = "\n".join([HEADER, *ROWS]).replace(",", ";") + "\n"
    path.write_bytes("\ufeff".encode() + text.replace("p1", "pé").encode("latin-1"))
    text_map = MAPPING.replace("name: test_map\n",
                               "name: test_map\nsource: {delimiter: ';', encoding: latin-1}\n")
    with pytest.raises(DataError, match="column 'pid'"):  # latin-1 keeps the BOM bytes
        import_csv(path, _mapping(tmp_path, text_map), tmp_path / "a")
    path.write_bytes(text.replace("p1", "pé").encode("utf-8-sig"))
    result = import_csv(path, _mapping(tmp_path, MAPPING.replace(
        "name: test_map\n", "name: test_map\nsource: {delimiter: ';'}\n")), tmp_path / "b")
    assert result.counts["rows_imported"] == 3
    ids = {p["identifier"][0]["value"]: p["id"] for p in _ndjson(tmp_path / "b", "Patient")}
    assert set(ids) == {"pé", "p2", "p3"} and ids["pé"] == fhir_id("pé", 48) != "pé"


# --------------------------------------------------------------------------- the mapping


def test_missing_mapped_column(tmp_path: Path) -> None:
    header = HEADER.replace(",crp,", ",CRP,")
    with pytest.raises(DataError) as err:
        import_csv(_csv(tmp_path, ROWS, header), _mapping(tmp_path), tmp_path / "site")
    msg = str(err.value)
    assert msg.startswith("data.csv: column 'crp' (mapping 'test_map': observations[0].column) "
                          "is not in the header; did you mean 'CRP'?")
    assert "\n" not in msg
    with pytest.raises(DataError, match=r"column 'SECTOR' \(mapping 'test_map': --split-by\)"):
        import_csv(_csv(tmp_path, ROWS), _mapping(tmp_path), tmp_path / "s2", split_by="SECTOR")


@pytest.mark.parametrize(("old", "new", "expected"), [
    ("observations:", "observation:", "unknown key 'observation'; did you mean 'observations'?"),
    ("  sex: {column: sex,", "  sexx: {column: sex,", "unknown key 'patient.sexx'; did you "
     "mean 'sex'?"),
    ("code: \"44054006\"}", "code: \"44054006\", knwon: at_index}",
     "unknown key 'conditions.1.knwon'; did you mean 'known'?"),
    ("  class: {column: kind,", "  klass: {column: kind,",
     "unknown key 'encounter.klass'; did you mean 'class'?"),
    ("codes: {present:", "codes: {yes:",
     "key 'codes.True' is a YAML boolean (unquoted yes/no/on/off/true/false): quote it, or "
     "use present/absent for codes"),
    # a YAML boolean as a value was only 'Input should be a valid string (got True)'
    ('codes: {present: ["1"]', "codes: {present: [yes]",
     "'codes.present.0': Input should be a valid string (got the YAML boolean True: unquoted "
     'yes/no/on/off/true/false are booleans in YAML; quote the value: "yes", "no")'),
    ('{"4": IMSS, ', '{"4": off, ', "'site_names.sector.4': Input should be a valid string (got "
     "the YAML boolean False"),
    # values FHIR or strptime would refuse only when the site is written (a bug hunt): at load
    ('code: "1988-5"', 'code: "1988  5"', "is not a FHIR code"),
    ("unit: mg/L,", "unit: 'mg  L',", "is not a FHIR code"),
    ("system: local, code: cigs", "system: locl, code: cigs", "did you mean 'local'?"),
    ("name: test_map\n", "name: test_map\nsource: {date_format: '%Q'}\n",
     "not a strptime format"),
    ('{"4": IMSS, ', '{"4": import_report.json, ', "the import's report file"),
    ("index: {column: admitted}", "index: {date: 2021-02-30}", "not valid YAML"),
])
def test_a_bad_mapping_key_or_value_fails_when_it_loads(tmp_path: Path, old: str, new: str,
                                                        expected: str) -> None:
    assert old in MAPPING
    with pytest.raises(MappingError, match=re.escape(expected)):
        load_mapping(_mapping(tmp_path, MAPPING.replace(old, new, 1)))


def test_mapping_refuses_a_label_that_is_also_a_feature(tmp_path: Path) -> None:
    text = MAPPING.replace("label: {column: kind,", "label: {column: crp,").replace(
        'positive: ["2"], negative: ["1"], unknown: ["99"]}', "above: 0}")
    with pytest.raises(MappingError, match="label column 'crp' is also a condition or "
                                           "observation: a label must never become a feature"):
        load_mapping(_mapping(tmp_path, text))


def test_mapping_errors_name_file_and_key(tmp_path: Path) -> None:
    with pytest.raises(MappingError, match="mapping file not found"):
        load_mapping(tmp_path / "nope.yaml")
    with pytest.raises(MappingError,
                       match=r"'index': Value error, give exactly one of 'column' or 'date'"):
        load_mapping(_mapping(tmp_path, MAPPING.replace(
            "index: {column: admitted}", "index: {column: admitted, date: 2020-01-01}")))
    with pytest.raises(MappingError, match="observation 'crp' is a quantity and needs a 'unit'"):
        load_mapping(_mapping(tmp_path, MAPPING.replace(", unit: mg/L,", ",")))


def test_shipped_mappings_load() -> None:
    root = Path(__file__).resolve().parents[2] / "configs" / "mappings"
    mexico = load_mapping(root / "mexico_covid.yaml")
    oasis = load_mapping(root / "oasis1.yaml")
    assert mexico.label is not None and mexico.label.column == "TIPO_PACIENTE"
    assert mexico.encounter.class_.column == "TIPO_PACIENTE"
    assert oasis.label is not None and oasis.label.column == "CDR"
    feature_columns = {c.column for c in (*oasis.conditions, *oasis.observations)}
    assert "CDR" not in feature_columns and "MMSE" in feature_columns
    assert oasis.index.date is not None and str(oasis.index.date) == "2020-01-01"


# --------------------------------------------------------------------------- sites


def test_split_by_pools_small_sites(tmp_path: Path) -> None:
    rows = [f"s4-{i},2021-07-01,,1,40,1,1,2,2,1,1,2,2021-08-01,4" for i in range(3)]
    rows += [f"s12-{i},2021-07-01,,2,50,2,1,2,2,1,1,2,2021-08-01,12" for i in range(2)]
    rows += ["s6-0,2021-07-01,,1,60,2,1,2,2,1,1,2,2021-08-01,6",
             "s9-0,2021-07-01,,1,60,1,1,2,2,1,1,2,2021-08-01,9"]
    out = tmp_path / "sites"
    result = import_csv(_csv(tmp_path, rows), _mapping(tmp_path), out, split_by="sector",
                        min_site_size=2)
    sizes = {s.name: (s.patients, s.split_values) for s in result.sites}
    assert sizes == {"IMSS": (3, ["4"]), "SSA": (2, ["12"]), POOL_SITE: (2, ["6", "9"])}
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["IMSS", "SSA", "other"]
    assert len(build_cohort(out / POOL_SITE, TASK).table) == 2
    assert build_cohort(out / "SSA", TASK).table["label"].tolist() == [1, 1]
    # without names a site is <column>-<value>; without pooling every value is a site
    result = import_csv(_csv(tmp_path, rows), _mapping(tmp_path), tmp_path / "all",
                        split_by="sex")
    assert {s.name: s.patients for s in result.sites} == {"sex-1": 5, "sex-2": 2}


def test_output_directory_must_be_new_or_empty(tmp_path: Path) -> None:
    out = tmp_path / "site"
    out.mkdir()
    (out / "old.txt").write_text("x")
    with pytest.raises(DataError, match="exists and is not empty"):
        import_csv(_csv(tmp_path, ROWS), _mapping(tmp_path), out)


def test_keep_rows_filters(tmp_path: Path) -> None:
    text = MAPPING.replace("index:", 'keep_rows:\n  - {column: sector, values: ["4"]}\n'
                                     '  - {column: pid, matches: "p[0-9]"}\nindex:')
    rows = [*ROWS, "q4,2021-07-04,,1,40,1,1,2,2,1,1,2,2021-08-01,4"]
    result = import_csv(_csv(tmp_path, rows), _mapping(tmp_path, text), tmp_path / "site")
    assert result.counts["rows_not_kept"] == 2 and result.counts["rows_imported"] == 2


def test_per_event_rows(tmp_path: Path) -> None:
    rows = [ROWS[0].replace("2021-07-01", "2021-07-20").replace(",2,1,1,2,", ",1,1,1,2,"),
            ROWS[0], ROWS[1]]
    with_events = MAPPING.replace("patient_id: pid\n", "patient_id: pid\nrows: per_event\n")
    out = tmp_path / "site"
    result = import_csv(_csv(tmp_path, rows), _mapping(tmp_path, with_events), out)
    assert not result.skipped
    assert [s.patients for s in result.sites] == [2] and [s.rows for s in result.sites] == [3]
    encounters = {e["id"]: e for e in _ndjson(out, "Encounter")}
    assert encounters["p1.e1"]["period"]["start"] == "2021-07-01T00:00:00Z"  # by index time
    assert encounters["p1.e2"]["period"]["start"] == "2021-07-20T00:00:00Z"
    assert len(_ndjson(out, "Patient")) == 2
    labels = dict(csv.reader((out / "labels.csv").open()))
    assert labels["p1"] == "1"  # the earliest admission's label


# --------------------------------------------------------------------------- times


def test_known_time_and_clinical_time_fields(tmp_path: Path) -> None:
    rows = [ROWS[0].replace("2021-07-01,", "2021-07-01T10:30:00+02:00,", 1), ROWS[2]]
    out = tmp_path / "site"
    import_csv(_csv(tmp_path, rows), _mapping(tmp_path), out)
    cond = _by_name(out, "Condition")
    obs = _by_name(out, "Observation")
    index = "2021-07-01T08:30:00Z"
    # at_index: clinical time and known time are both the index
    assert (cond["p1.diabetes"]["onsetDateTime"], cond["p1.diabetes"]["recordedDate"]) == (
        index, index)
    assert (obs["p1.crp"]["effectiveDateTime"], obs["p1.crp"]["issued"]) == (index, index)
    # onset from its own column, known at the index
    assert cond["p1.covid19"]["onsetDateTime"] == "2021-06-28T00:00:00Z"
    assert cond["p1.covid19"]["recordedDate"] == index
    # an empty onset falls back to the known time
    assert cond["p3.covid19"]["onsetDateTime"] == "2021-07-03T00:00:00Z"
    # known from a date column: at the end of that day; clinical at its start
    assert obs["p1.icu"]["issued"] == "2021-08-01T23:59:59Z"
    assert obs["p1.icu"]["effectiveDateTime"] == "2021-08-01T00:00:00Z"
    (enc,) = [e for e in _ndjson(out, "Encounter") if e["subject"]["reference"] == "Patient/p1"]
    assert enc["period"]["start"] == index


def test_a_value_known_after_the_index_is_not_a_feature(tmp_path: Path) -> None:
    at_index = tmp_path / "at_index"
    import_csv(_csv(tmp_path, ROWS), _mapping(tmp_path), at_index)
    assert build_cohort(at_index, TASK).table.set_index("patient_id").loc["p1", "diabetes"] == 1
    later = MAPPING.replace('code: "44054006"}', 'code: "44054006", known: updated}')
    known_later = tmp_path / "later"
    import_csv(_csv(tmp_path, ROWS), _mapping(tmp_path, later), known_later)
    (diabetes,) = [c for c in _ndjson(known_later, "Condition") if c["id"] == "p1.e1.diabetes"]
    assert diabetes["recordedDate"] == "2021-08-01T23:59:59Z"
    assert build_cohort(known_later, TASK).table.set_index("patient_id").loc[
        "p1", "diabetes"] == 0


def test_fixed_index_date_with_age_at_that_date(tmp_path: Path) -> None:
    text = MAPPING.replace("index: {column: admitted}", "index: {date: 2020-01-01}").replace(
        "onset: symptoms", "onset: at_index")
    out = tmp_path / "site"
    import_csv(_csv(tmp_path, ROWS), _mapping(tmp_path, text), out)
    task = TASK.model_copy(update={"index": TASK.index.model_copy(update={
        "kind": "reference_date", "reference_date": date(2020, 1, 1)})})
    t = build_cohort(out, task).table.set_index("patient_id")
    assert (t["index_time"].dt.strftime("%Y-%m-%d") == "2020-01-01").all()
    assert {pid: math.floor(a) for pid, a in t["age"].items()} == {"p1": 40, "p2": 65, "p3": 30}
    patients = {p["id"]: p["birthDate"] for p in _ndjson(out, "Patient")}
    assert patients["p1"] == "1979-07-02"  # 2020-01-01 minus 40.5 years


# --------------------------------------------------------------------------- ids


def test_fhir_id_scheme() -> None:
    assert fhir_id("ok-1.2") == "ok-1.2"
    a, b = fhir_id("x_y"), fhir_id("x-y")
    assert b == "x-y" and a != b and a.startswith("x-y-")
    long = fhir_id("k" * 100)
    assert len(long) <= 64 and long != fhir_id("k" * 101)
    assert fhir_id("k" * 50, 48) != "k" * 50 and len(fhir_id("k" * 50, 48)) <= 48
    assert fhir_id("///").startswith("k-")
    for key in ("a b/c", "é", "x" * 300, "OAS1_0001_MR1"):
        assert re.fullmatch(r"[A-Za-z0-9\-.]{1,64}", fhir_id(key))


def test_ids_sanitised_consistently_across_resources(tmp_path: Path) -> None:
    keys = ["a b/c", "ok-1", "x_y", "x-y"]
    images = tmp_path / "imgs"
    images.mkdir()
    header = HEADER + ",img"
    rows = []
    for i, key in enumerate(keys):
        Image.new("L", (8, 8), color=40 * i).save(images / f"img{i}.png")
        rows.append(f'"{key}",2021-07-0{i + 1},,1,40,2,1,1,2,1,1,1,2021-08-01,4,img{i}')
    text = MAPPING + "images:\n  dir: imgs\n  files:\n    - {path: '{img}.png', view: ap}\n"
    out = tmp_path / "site"
    import_csv(_csv(tmp_path, rows, header), _mapping(tmp_path, text), out)
    patients = {p["identifier"][0]["value"]: p["id"] for p in _ndjson(out, "Patient")}
    assert sorted(patients) == sorted(keys) and len(set(patients.values())) == 4
    assert patients["ok-1"] == "ok-1" and patients["x-y"] == "x-y"
    assert patients["a b/c"] == fhir_id("a b/c", 48) != "a b/c"
    ids = set(patients.values())
    encounters = {e["id"] for e in _ndjson(out, "Encounter")}
    for kind in ("Encounter", "Condition", "Observation"):
        for res in _ndjson(out, kind):
            assert re.fullmatch(r"[A-Za-z0-9\-.]{1,64}", res["id"])
            assert res["subject"]["reference"].removeprefix("Patient/") in ids
            if kind != "Encounter":
                assert res["encounter"]["reference"].removeprefix("Encounter/") in encounters
                assert res["id"].startswith(res["encounter"]["reference"].split("/")[1] + ".")
    label_ids = [r["patient_id"] for r in csv.DictReader((out / "labels.csv").open())]
    image_rows = list(csv.DictReader((out / "images.csv").open()))
    assert sorted(label_ids) == sorted(ids) == sorted(r["patient_id"] for r in image_rows)
    assert image_rows[0]["acquired"] == "2021-07-01T00:00:00Z" and image_rows[0]["view"] == "ap"
    t = build_cohort(out, TASK).table.set_index("patient_id")
    assert sorted(t.index) == sorted(ids)
    assert t["has_image"].all() and (t["label"] == 1).all()
    assert Path(t.loc[patients["a b/c"], "image_path"]).name == "img0.png"


def test_image_path_outside_the_image_folder_is_a_bad_value(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "secret.png")
    rows = [f"{ROWS[0]},../secret", f"{ROWS[1]},missing"]
    text = MAPPING + "images:\n  dir: imgs\n  files:\n    - {path: '{img}.png'}\n"
    result = import_csv(_csv(tmp_path, rows, HEADER + ",img"), _mapping(tmp_path, text),
                        tmp_path / "site")
    assert [(s.resource_id, s.field, s.reason) for s in result.skipped] == [
        ("line 2", "img", "bad_value")]
    assert result.counts["images_not_found"] == 1 and result.sites[0].images == 0


# --------------------------------------------------------------------------- outcomes


# icu and crp become outcomes: they are no longer features
OUTCOMES = MAPPING.replace("""  - {name: icu, column: icu, system: local, code: icu, type: boolean,
     not_applicable_means: absent, known: updated}
""", "").replace("""  - {name: crp, column: crp, code: "1988-5", unit: mg/L, unknown: ["98", "99"]}
""", "") + """outcomes:
  - {name: icu, column: icu, positive: ["1"], negative: ["2", "97"], unknown: ["98", "99"]}
  - {name: high_crp, column: crp, above: 10, unknown: ["98"]}
"""


def test_outcomes_are_labels_csv_columns_a_task_can_pick(tmp_path: Path) -> None:
    """Undated outcomes (ICU) go to labels.csv beside the label; a task names its column."""
    task = TaskSpec.model_validate({**TASK.model_dump(), "features": {
        "demographics": ["age", "sex"], "conditions": TASK.model_dump()["features"][
            "conditions"]}})
    out = tmp_path / "site"
    result = import_csv(_csv(tmp_path, ROWS), _mapping(tmp_path, OUTCOMES), out)
    with (out / "labels.csv").open() as fh:
        rows = list(csv.reader(fh))
    # icu: 97 (p2, an outpatient) is no, 99 (p3) unknown; crp: empty (p2) and 98 (p3) unknown
    assert rows[0] == ["patient_id", "label", "icu", "high_crp"]
    assert rows[1:] == [["p1", "1", "1", "1"], ["p2", "0", "0", ""], ["p3", "0", "", ""]]
    assert [s.to_dict()["outcomes"] for s in result.sites] == [
        {"icu": {"labelled": 2, "positives": 1}, "high_crp": {"labelled": 1, "positives": 1}}]
    # no ICU Observation: an outcome is never written as a feature
    assert not any("icu" in r["id"] for r in _ndjson(out, "Observation"))
    labels = {}
    for column in ("label", "icu", "high_crp"):
        picked = task.model_copy(update={"label": task.label.model_copy(
            update={"labels_csv_column": column})})
        cohort = build_cohort(out, picked)
        labels[column] = dict(zip(cohort.table.patient_id, cohort.table.label, strict=True))
        # an empty cell is no label: the patient is excluded, nothing is skipped as bad
        assert cohort.counts["skipped_by_reason"] == {}
    assert labels == {"label": {"p1": 1, "p2": 0, "p3": 0}, "icu": {"p1": 1, "p2": 0},
                      "high_crp": {"p1": 1}}


def test_a_task_naming_an_absent_labels_column_says_so(tmp_path: Path) -> None:
    out = tmp_path / "site"
    import_csv(_csv(tmp_path, ROWS), _mapping(tmp_path), out)
    task = TaskSpec.model_validate({**TASK.model_dump(), "label": {
        "kind": "labels_csv", "labels_csv_column": "icu"}})
    cohort = build_cohort(out, task)
    assert cohort.n_patients == 0
    (skip,) = cohort.skipped
    assert skip.reason == "bad_csv_header" and "missing column(s) ['icu']" in skip.message()
    with pytest.raises(DataError, match=r"labels.csv.*missing column\(s\) \['icu'\]"):
        build_cohort(out, task, data=DataConfig(on_error="fail"))


@pytest.mark.parametrize(("old", "new", "expected"), [
    ("- {name: high_crp, column: crp,", "- {name: label, column: crp,",
     "outcome name 'label' is taken"),
    ("- {name: high_crp, column: crp,", "- {name: icu, column: crp,",
     "outcome name 'icu' is taken"),
    ("- {name: high_crp, column: crp, above: 10, unknown: [\"98\"]}",
     "- {name: diabetic, column: diab, positive: ['1'], negative: ['2']}",
     "outcome column 'diab' (outcome 'diabetic') is also a condition or observation"),
    ("- {name: high_crp, column: crp,", "- {name: 1crp, column: crp,",
     "must start with a letter"),
])
def test_mapping_refuses_bad_outcomes(tmp_path: Path, old: str, new: str,
                                      expected: str) -> None:
    assert old in OUTCOMES
    with pytest.raises(MappingError, match=re.escape(expected)):
        load_mapping(_mapping(tmp_path, OUTCOMES.replace(old, new)))


def test_outcome_column_missing_from_the_header(tmp_path: Path) -> None:
    text = OUTCOMES.replace("column: icu, positive", "column: uci, positive")
    with pytest.raises(DataError, match=r"column 'uci' \(mapping 'test_map': "
                                        r"outcomes\[0\].column\) is not in the header"):
        import_csv(_csv(tmp_path, ROWS), _mapping(tmp_path, text), tmp_path / "s")


# --------------------------------------------------------------------------- cli


def test_cli_prints_site_sizes_and_fails_in_one_line(tmp_path: Path) -> None:
    rows = [*ROWS, "p4,2021-07-04,,1,40,1,1,2,2,1,1,2,2021-08-01,6"]
    args = ["data", "import-csv", str(_csv(tmp_path, rows)), "--mapping",
            str(_mapping(tmp_path))]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "s"), "--split-by",
                                      "sector", "--min-site-size", "2"])
    assert result.exit_code == 0, result.output
    assert re.search(r"IMSS\s*│\s*2\s*│", result.stdout)
    assert re.search(r"other\s*│\s*2\s*│", result.stdout) and "12,6" in result.stdout
    assert "4 read, 0 not kept by keep_rows, 0 skipped, 4 imported" in result.stdout
    bad = [*ROWS, "p4,2021-07-04,,1,abc,1,1,2,2,1,1,2,2021-08-01,6"]
    failed = CliRunner().invoke(app, ["data", "import-csv", str(_csv(tmp_path, bad,
                                                                      name="bad.csv")),
                                      "--mapping", str(_mapping(tmp_path)), "--out",
                                      str(tmp_path / "f"), "--on-error", "fail"])
    assert failed.exit_code == 2
    assert "bad.csv: resource 'line 5', field 'age'" in failed.output
    assert "Traceback" not in failed.output
    as_json = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "j"), "--json"])
    assert json.loads(as_json.stdout)["counts"]["rows_imported"] == 4


def test_mapping_model_is_importable_from_python() -> None:
    m = CsvMapping.model_validate({"name": "m", "patient_id": "id",
                                   "index": {"date": "2020-01-01"}})
    assert m.encounter.class_.fixed == "AMB" and m.missing == [""]


# --------------------------------------------------------------------------- real data

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
MAPPINGS = Path(__file__).resolve().parents[2] / "configs" / "mappings"


def _shared(rel: str) -> Path:
    path = SHARED / rel
    if not path.is_file():
        pytest.skip(f"shared data not found: {path}")
    return path


@pytest.mark.shared_data
@pytest.mark.slow
def test_mexico_open_data_import(tmp_path: Path) -> None:
    """The shipped mapping: confirmed cases by institution, 10.8 % hospitalised."""
    src = _shared("mexico_covid/covid19_mexico_bc_2021.csv")
    out = tmp_path / "mexico"
    result = import_csv(src, MAPPINGS / "mexico_covid.yaml", out, split_by="SECTOR",
                        min_site_size=300)
    assert result.counts["rows_read"] == 58964 and result.counts["rows_imported"] == 18605
    assert not result.skipped
    sites = {s.name: s for s in result.sites}
    assert {n: s.patients for n, s in sites.items()} == {
        "IMSS": 11053, "SSA": 6800, "other": 396, "ISSSTE": 356}
    assert sites["other"].split_values == ["1", "10", "11", "3", "5", "9"]
    positives = sum(s.positives for s in result.sites)
    labelled = sum(s.labelled for s in result.sites)
    assert labelled == 18605 and abs(positives / labelled - 0.108) < 0.001
    # the label is also the Encounter class of the admission
    inpatient = sum(e["class"]["code"] == "IMP" for n in sites
                    for e in _ndjson(out / n, "Encounter"))
    assert inpatient == positives
    task = TaskSpec.model_validate({
        **TASK.model_dump(), "features": {
            "demographics": ["age", "sex"],
            "conditions": [{"name": "diabetes", "codes": ["73211009"]}]}})
    cohort = build_cohort(out / "ISSSTE", task)
    t = cohort.table
    # patients who died on the admission day are dead at the index (00:00) and excluded
    assert len(t) + cohort.counts["excluded_by_reason"].get("died_before_index", 0) == 356
    assert 0.1 < t["diabetes"].mean() < 0.3 and t["age"].between(0, 106).all()


@pytest.mark.shared_data
def test_oasis1_import(tmp_path: Path) -> None:
    """First sessions, images linked, CDR only in labels.csv."""
    src = _shared("oasis1/oasis_cross-sectional.csv")
    out = tmp_path / "oasis1"
    result = import_csv(src, MAPPINGS / "oasis1.yaml", out)
    (site,) = result.sites
    assert (site.patients, site.labelled, site.images) == (416, 235, 588)
    assert result.counts["rows_not_kept"] == 20 and not result.skipped
    codes = {o["code"]["coding"][0]["code"] for o in _ndjson(out, "Observation")}
    assert "72106-8" in codes and not any("cdr" in c.lower() for c in codes)
    task = TaskSpec.model_validate({
        "name": "oasis", "cohort": {"min_age": 60},
        "index": {"kind": "reference_date", "reference_date": "2020-01-01"},
        "features": {"observations": [{"name": "mmse", "codes": ["72106-8"],
                                       "unit": "{score}"}]},
        "label": {"kind": "labels_csv"}, "image_modality": "mri"})
    t = build_cohort(out, task).table
    assert len(t) > 150 and t["has_image"].mean() > 0.8 and t["mmse"].notna().all()


# --------------------------------------------------------------------------- adversarial input
# (each of these failed before: a traceback, a partial site, a file outside the site, a value
# lost or a date read at the wrong time)


def test_an_image_path_through_dotdot_is_copied_inside_the_site(tmp_path: Path) -> None:
    imgs = tmp_path / "a" / "b" / "imgs"
    imgs.mkdir(parents=True)
    Image.new("L", (8, 8)).save(imgs / "f.png")
    rows = [f"{ROWS[0]},f", f"{ROWS[1]},../../../a/b/imgs/f"]  # resolves inside imgs/
    text = MAPPING + "images:\n  dir: a/b/imgs\n  files:\n    - {path: '{img}.png', " \
        "acquired: at_index}\n"
    out = tmp_path / "o1" / "o2" / "site"
    result = import_csv(_csv(tmp_path, rows, HEADER + ",img"), _mapping(tmp_path, text), out)
    assert not result.skipped and result.sites[0].images == 2
    copies = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("f.png"))
    assert copies == [Path("a/b/imgs/f.png"), Path("o1/o2/site/images/f.png")]
    listed = [r[1] for r in csv.reader((out / "images.csv").open())][1:]
    assert all(".." not in p for p in listed)


def test_a_stray_quote_names_the_lines_it_swallowed(tmp_path: Path) -> None:
    bad = ROWS[1].replace(",65,", ',"65,')
    result = import_csv(_csv(tmp_path, [ROWS[0], bad, ROWS[2], ROWS[2].replace("p3", "p4")]),
                        _mapping(tmp_path), tmp_path / "site")
    (skip,) = result.skipped
    assert skip.resource_id == "line 3" and "lines 3-5 are lost" in skip.message()


def test_a_header_without_rows_stops_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no data rows"):
        import_csv(_csv(tmp_path, []), _mapping(tmp_path), tmp_path / "site")
    assert not (tmp_path / "site").exists()


def test_a_number_column_keeps_98_unless_its_own_lists_say_unknown(tmp_path: Path) -> None:
    """The mapping's default codes are yes/no codes; a CRP of 98 mg/L is a value."""
    text = MAPPING.replace('unit: mg/L, unknown: ["98", "99"]}', "unit: mg/L}")
    out = tmp_path / "site"
    import_csv(_csv(tmp_path, ROWS), _mapping(tmp_path, text), out)
    assert build_cohort(out, TASK).table.set_index("patient_id").loc["p3", "crp"] == 98.0


def test_a_basic_iso_date_is_known_at_the_end_of_its_day(tmp_path: Path) -> None:
    rows = [ROWS[0].replace(",2021-08-01,", ",20210801,")]
    out = tmp_path / "site"
    import_csv(_csv(tmp_path, rows), _mapping(tmp_path), out)
    assert _by_name(out, "Observation")["p1.icu"]["issued"] == "2021-08-01T23:59:59Z"


def test_a_date_of_death_is_a_date_whatever_the_date_format(tmp_path: Path) -> None:
    text = MAPPING.replace("  age: age\n", "  age: age\n  deceased: {column: died}\n").replace(
        "name: test_map\n", "name: test_map\nsource: {date_format: '%d/%m/%Y'}\n")
    rows = ["p1,01/07/2021,28/06/2021,1,40,2,1,1,2,12.5,5,1,01/08/2021,4,01/07/2021",
            "p2,01/07/2021,28/06/2021,1,40,2,1,1,2,12.5,5,1,01/08/2021,4,30/06/1950"]
    out = tmp_path / "site"
    result = import_csv(_csv(tmp_path, rows, HEADER + ",died"), _mapping(tmp_path, text), out)
    patients = {p["id"]: p for p in _ndjson(out, "Patient")}
    assert patients["p1"]["deceasedDateTime"] == "2021-07-01"
    # a death before the birth the age gives is a bad date, not a patient
    assert [(s.resource_id, s.field, s.reason) for s in result.skipped] == [
        ("line 3", "died", "bad_date")]


@pytest.mark.parametrize(("row", "field", "reason"), [
    (ROWS[0].replace("2021-07-01,", "0001-01-01,", 1), "age", "bad_date"),
    (ROWS[0].replace(",2021-08-01,", ",9999-12-31T23:00:00-05:00,"), "updated", "bad_date"),
    (ROWS[0].replace(",12.5,", ",1e400,"), "crp", "bad_number"),
    (ROWS[0].replace(",12.5,", ",1_000,"), "crp", "bad_number"),
    (ROWS[0].replace(",40,", ",4_0,"), "age", "bad_number"),
    (ROWS[0].replace("p1,", "N/A,", 1), "pid", "missing_value"),
])
def test_out_of_range_and_odd_values_are_bad_values(tmp_path: Path, row: str, field: str,
                                                      reason: str) -> None:
    text = MAPPING.replace("patient_id: pid\n", "patient_id: pid\nmissing: ['', 'N/A']\n")
    result = import_csv(_csv(tmp_path, [row, ROWS[1]]), _mapping(tmp_path, text),
                        tmp_path / "site")
    assert [(s.resource_id, s.field, s.reason) for s in result.skipped] == [
        ("line 2", field, reason)]
    assert result.counts["rows_imported"] == 1


def test_per_event_rows_under_two_split_values_keep_the_patient_at_one_site(
        tmp_path: Path) -> None:
    with_events = MAPPING.replace("patient_id: pid\n", "patient_id: pid\nrows: per_event\n")
    later = ROWS[0].replace("2021-07-01", "2021-07-20").replace(",4", ",12")
    result = import_csv(_csv(tmp_path, [later, ROWS[0], ROWS[2]]),
                        _mapping(tmp_path, with_events), tmp_path / "out", split_by="sector")
    assert result.counts["patients_kept_in_one_site"] == 1
    where = {s.name: sorted(p["id"] for p in _ndjson(s.path, "Patient")) for s in result.sites}
    assert where == {"IMSS": ["p1"], "SSA": ["p3"]}  # p1's earliest row is at sector 4


def test_mapping_files_that_are_no_text_are_mapping_errors(tmp_path: Path) -> None:
    with pytest.raises(MappingError, match="a directory, not a mapping file"):
        load_mapping(tmp_path)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(MAPPING.replace("test_map", "t\xe9st").encode("latin-1"))
    with pytest.raises(MappingError, match="not UTF-8 text"):
        load_mapping(latin)


def test_an_output_path_that_cannot_be_made_stops_before_reading(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    data, mapping = _csv(tmp_path, ROWS), _mapping(tmp_path)
    with pytest.raises(DataError, match="afile is a file, not a directory"):
        import_csv(data, mapping, tmp_path / "afile" / "sub")
    with pytest.raises(DataError, match="a file, not a directory; give a new or empty"):
        import_csv(data, mapping, tmp_path / "afile")
    with pytest.raises(DataError, match="--min-site-size 5 pools the sites of --split-by"):
        import_csv(data, mapping, tmp_path / "s", min_site_size=5)


def test_a_bom_or_another_delimiter_is_named(tmp_path: Path) -> None:
    utf8 = MAPPING.replace("name: test_map\n", "name: test_map\nsource: {encoding: utf-8}\n")
    bom = tmp_path / "bom.csv"
    bom.write_text("\ufeff" + "\n".join([HEADER, *ROWS]) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"byte-order mark.*utf-8-sig"):
        import_csv(bom, _mapping(tmp_path, utf8), tmp_path / "a")
    semi = _csv(tmp_path, [r.replace(",", ";") for r in ROWS], HEADER.replace(",", ";"))
    with pytest.raises(DataError, match="is the delimiter ';'"):
        import_csv(semi, _mapping(tmp_path), tmp_path / "b")


def test_split_values_whose_folder_names_collide_stay_apart(tmp_path: Path) -> None:
    rows = [ROWS[0].replace(",4", ",a/b"), ROWS[1].replace(",4", ",a b"),
            ROWS[2].replace(",12", ",a/b")]
    text = MAPPING.replace('  sector: {"4": IMSS, "12": SSA}\n', "  sector: {}\n")
    result = import_csv(_csv(tmp_path, rows), _mapping(tmp_path, text), tmp_path / "out",
                        split_by="sector")
    held = {s.name: s.split_values for s in result.sites}
    assert len(held) == 2 and sorted(v for vs in held.values() for v in vs) == ["a b", "a/b"]
    assert all(name.startswith("sector-a-b") for name in held)


def test_a_header_with_an_empty_name_and_a_pool_still_too_small_are_named(
        tmp_path: Path) -> None:
    with pytest.raises(DataError, match=re.escape("column 15 of the header has no name (a "
                                                  "delimiter at the end of the header line")):
        import_csv(_csv(tmp_path, ROWS, HEADER + ","), _mapping(tmp_path), tmp_path / "a")
    result = import_csv(_csv(tmp_path, ROWS), _mapping(tmp_path), tmp_path / "b",
                        split_by="sector", min_site_size=10)
    assert [s.name for s in result.sites] == [POOL_SITE]
    assert result.counts["pooled_site_patients_below_minimum"] == 3
