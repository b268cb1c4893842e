"""The COVID-19 severity task on Mexico's open data: a task from YAML alone.

A tiny synthetic CSV in the open data's shape (its header, its codes; the rows are made up
here) goes through ``mmfl data import-csv`` with the shipped mapping, and the cohort is built
with the shipped task files (``configs/tasks/covid_severity*.yaml``) through the shipped
experiment config: labels, features and the time-of-knowledge rule are checked per patient.
A second test does the same on a slice of the real file when ``../shared/data`` has it.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from multimodal_fl.cli import app
from multimodal_fl.config import load_config, load_task
from multimodal_fl.data import build_cohort, build_cohorts

ROOT = Path(__file__).resolve().parents[2]
MAPPING = ROOT / "configs" / "mappings" / "mexico_covid.yaml"
CONFIG = ROOT / "configs" / "mexico_covid_severity.yaml"
TASKS = ROOT / "configs" / "tasks"
SHARED_CSV = ROOT / ".." / "shared" / "data" / "mexico_covid" / "covid19_mexico_bc_2021.csv"
SITES = ("IMSS", "SSA", "ISSSTE", "other")
COMORBIDITIES = ["diabetes", "copd", "asthma", "immunosuppression", "hypertension",
                 "cardiovascular", "obesity", "chronic_kidney_disease", "smoker",
                 "other_comorbidity", "pregnancy"]

HEADER = ("FECHA_ACTUALIZACION,ID_REGISTRO,ORIGEN,SECTOR,ENTIDAD_UM,SEXO,ENTIDAD_NAC,"
          "ENTIDAD_RES,MUNICIPIO_RES,TIPO_PACIENTE,FECHA_INGRESO,FECHA_SINTOMAS,FECHA_DEF,"
          "INTUBADO,NEUMONIA,EDAD,NACIONALIDAD,EMBARAZO,HABLA_LENGUA_INDIG,INDIGENA,DIABETES,"
          "EPOC,ASMA,INMUSUPR,HIPERTENSION,OTRA_COM,CARDIOVASCULAR,OBESIDAD,RENAL_CRONICA,"
          "TABAQUISMO,OTRO_CASO,TOMA_MUESTRA_LAB,RESULTADO_LAB,TOMA_MUESTRA_ANTIGENO,"
          "RESULTADO_ANTIGENO,CLASIFICACION_FINAL,MIGRANTE,PAIS_NACIONALIDAD,PAIS_ORIGEN,UCI")
NO = {c: "2" for c in ("DIABETES", "EPOC", "ASMA", "INMUSUPR", "HIPERTENSION", "OTRA_COM",
                       "CARDIOVASCULAR", "OBESIDAD", "RENAL_CRONICA", "TABAQUISMO")}
ALIVE = "9999-99-99"


def _row(pid: str, sector: str, sex: str, age: int, kind: str, admitted: str, *,
         died: str = ALIVE, icu: str = "97", intubated: str = "97", pneumonia: str = "2",
         pregnant: str = "97", final: str = "3", **comorbid: str) -> dict[str, str]:
    """One row of the open data: 1 yes / 2 no / 97 not applicable / 98, 99 unknown."""
    row = dict.fromkeys(HEADER.split(","), "99")
    row.update(NO)
    row.update({"FECHA_ACTUALIZACION": "2022-07-14", "ID_REGISTRO": pid, "SECTOR": sector,
                "SEXO": sex, "EDAD": str(age), "TIPO_PACIENTE": kind,
                "FECHA_INGRESO": admitted, "FECHA_SINTOMAS": admitted, "FECHA_DEF": died,
                "UCI": icu, "INTUBADO": intubated, "NEUMONIA": pneumonia,
                "EMBARAZO": pregnant, "CLASIFICACION_FINAL": final, **comorbid})
    return row


#: SECTOR 4 IMSS, 12 SSA, 6 ISSSTE; 3 (estatal) and 9 (privada) are pooled into 'other'.
ROWS = [
    # hospitalised, ICU, intubated, pneumonia, died 10 days after admission
    _row("a1", "4", "1", 70, "2", "2021-07-05", died="2021-07-15", icu="1", intubated="1",
         pneumonia="1", pregnant="2", DIABETES="1", HIPERTENSION="1"),
    # outpatient: ICU and intubation 97 (not applicable) mean no; 97 pregnancy (a man) no
    _row("a2", "4", "2", 30, "1", "2021-07-06"),
    # outpatient, survivor in the other spelling; asthma 98 (unknown) is absent
    _row("a3", "4", "1", 40, "1", "2021-07-07", died="-001-11-30", pregnant="2", ASMA="98"),
    # hospitalised, intubated, died 40 days after admission: not a death within 30 days
    _row("b1", "12", "1", 50, "2", "2021-08-01", died="2021-09-10", icu="2", intubated="1",
         pregnant="2", OBESIDAD="1"),
    # died on the admission day (a date: some time that day, admitted alive): kept, a death
    _row("b2", "12", "2", 60, "2", "2021-08-02", died="2021-08-02", icu="2", intubated="2"),
    # pregnant outpatient
    _row("c1", "6", "1", 25, "1", "2021-07-20", pregnant="1"),
    # hospitalised, ICU, not intubated, survivor
    _row("c2", "6", "2", 80, "2", "2021-07-21", icu="1", intubated="2", CARDIOVASCULAR="1",
         RENAL_CRONICA="1"),
    # hospitalised, ICU unknown (99): no ICU label, every other label
    _row("d1", "3", "2", 45, "2", "2021-09-01", icu="99", intubated="2"),
    # outpatient smoker with COPD at a small institution
    _row("d2", "9", "1", 35, "1", "2021-09-02", pregnant="2", TABAQUISMO="1", EPOC="1"),
    # a negative test (CLASIFICACION_FINAL 7): not a confirmed case, not imported
    _row("x1", "9", "2", 33, "2", "2021-09-03", final="7"),
]


def _write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8-sig") as fh:
        w = csv.DictWriter(fh, fieldnames=HEADER.split(","), quoting=csv.QUOTE_NONNUMERIC)
        w.writeheader()
        w.writerows(rows)
    return path


def _import(csv_path: Path, out: Path, min_site_size: int) -> dict[str, Any]:
    result = CliRunner().invoke(app, [
        "data", "import-csv", str(csv_path), "--mapping", str(MAPPING), "--out", str(out),
        "--split-by", "SECTOR", "--min-site-size", str(min_site_size), "--json"])
    assert result.exit_code == 0, result.output
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def _ndjson(fhir: Path, kind: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (fhir / f"{kind}.ndjson").read_text().splitlines()]


def _sets(out: Path, task: str | None = None) -> list[str]:
    """``--set`` overrides of the shipped config: the sites under ``out``, maybe a variant."""
    sets = [f"sites.{i}.path={out / name}" for i, name in enumerate(SITES)]
    if task is not None:
        sets.append(f"task=tasks/{task}.yaml")
    return sets


def _cli_sets(out: Path) -> list[str]:
    return [arg for s in _sets(out) for arg in ("--set", s)]


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("mexico")
    doc = _import(_write_csv(tmp / "mexico.csv", ROWS), tmp / "sites", 2)
    sizes = {s["site"]: s["patients"] for s in doc["sites"]}
    assert sizes == {"IMSS": 3, "SSA": 2, "ISSSTE": 2, "other": 2}
    assert doc["counts"] == {"images_not_found": 0, "rows_imported": 9, "rows_not_kept": 1,
                             "rows_read": 10}
    return tmp / "sites"


def _cohort(sites: Path, task: str) -> tuple[pd.DataFrame, list[str]]:
    """The pooled cohort table of every site by the shipped config, and the model inputs."""
    cohorts = build_cohorts(load_config(CONFIG, _sets(sites, task)))
    names = {tuple(c.feature_names) for c in cohorts.values()}
    assert len(names) == 1
    table = pd.concat([c.table for c in cohorts.values()]).set_index("patient_id")
    return table, list(names.pop())


def _table(sites: Path, task: str) -> pd.DataFrame:
    return _cohort(sites, task)[0]


def test_the_shipped_tasks_are_yaml_only_and_share_cohort_index_features() -> None:
    base = load_task(TASKS / "covid_severity.yaml")
    assert base.label.kind == "labels_csv" and base.label.labels_csv_column == "label"
    assert [c.name for c in base.features.conditions] == COMORBIDITIES
    assert base.features.observations == [] and base.features.demographics == ["age", "sex"]
    variants = {p.stem: load_task(p) for p in TASKS.glob("covid_severity_*.yaml")}
    assert sorted(variants) == ["covid_severity_death", "covid_severity_icu",
                                "covid_severity_intubation", "covid_severity_pneumonia"]
    for name, task in variants.items():
        assert task.name == name
        assert (task.cohort, task.index) == (base.cohort, base.index)
        extra = [c.name for c in task.features.conditions if c not in base.features.conditions]
        assert extra == (["pneumonia"] if name.endswith("pneumonia") else []), name
    assert variants["covid_severity_icu"].label.labels_csv_column == "icu"
    assert variants["covid_severity_intubation"].label.labels_csv_column == "intubated"
    death = variants["covid_severity_death"].label
    assert (death.kind, death.window_hours, death.labels_csv) == (
        "events_after_index", 720, "ignore")
    # the experiment config points at the task file by path, the sites at import-csv's output
    raw = yaml.safe_load(CONFIG.read_text())
    assert raw["task"] == "tasks/covid_severity.yaml"
    assert [s["name"] for s in raw["sites"]] == list(SITES)
    assert load_config(CONFIG).task == base


@pytest.mark.parametrize(("task", "labels"), [
    ("covid_severity", {"a1": 1, "a2": 0, "a3": 0, "b1": 1, "b2": 1, "c1": 0, "c2": 1,
                        "d1": 1, "d2": 0}),
    ("covid_severity_icu", {"a1": 1, "a2": 0, "a3": 0, "b1": 0, "b2": 0, "c1": 0, "c2": 1,
                            "d2": 0}),
    ("covid_severity_intubation", {"a1": 1, "a2": 0, "a3": 0, "b1": 1, "b2": 0, "c1": 0,
                                   "c2": 0, "d1": 0, "d2": 0}),
    # b2's death on the admission day is within 30 days (on the code before: excluded)
    ("covid_severity_death", {"a1": 1, "a2": 0, "a3": 0, "b1": 0, "b2": 1, "c1": 0, "c2": 0,
                              "d1": 0, "d2": 0}),
    ("covid_severity_pneumonia", {"a1": 1, "a2": 0, "a3": 0, "b1": 1, "b2": 1, "c1": 0,
                                  "c2": 1, "d1": 1, "d2": 0}),
])
def test_labels_of_each_variant(imported: Path, task: str, labels: dict[str, int]) -> None:
    t = _table(imported, task)
    # b2 died on the admission day (a date: after the index); d1's ICU is unknown (99); x1
    # was never imported (not a confirmed case)
    assert t["label"].to_dict() == labels


def test_features_are_known_at_presentation(imported: Path) -> None:
    t, names = _cohort(imported, "covid_severity")
    assert names == ["age", "sex_female", *COMORBIDITIES]
    assert t.loc["a1", ["diabetes", "hypertension", "obesity"]].tolist() == [1.0, 1.0, 0.0]
    assert t.loc["b1", "obesity"] == 1.0 and t.loc["c1", "pregnancy"] == 1.0
    assert t.loc["c2", ["cardiovascular", "chronic_kidney_disease"]].tolist() == [1.0, 1.0]
    assert t.loc["d2", ["smoker", "copd"]].tolist() == [1.0, 1.0]
    assert t.loc["a3", "asthma"] == 0.0  # 98, unknown: no Condition
    assert t.loc["a2", "pregnancy"] == 0.0  # 97 for a man
    assert t["sex_female"].to_dict() == {"a1": 1.0, "a2": 0.0, "a3": 1.0, "b1": 1.0,
                                         "b2": 0.0, "c1": 1.0, "c2": 0.0, "d1": 0.0,
                                         "d2": 1.0}
    assert t.loc["a1", "age"] == pytest.approx(70.5, abs=0.01)
    # the index is the admission (00:00 UTC); every feature was known by then
    assert t.loc["a1", "index_time"] == pd.Timestamp("2021-07-05", tz="UTC")
    # (comorbidities are recorded at the admission: known exactly then; none has no time)
    with_any = t[t[COMORBIDITIES].sum(axis=1) > 0]
    assert sorted(with_any.index) == ["a1", "b1", "c1", "c2", "d2"]
    assert (with_any["max_feature_time"] == with_any["index_time"]).all()
    assert t.drop(with_any.index)["max_feature_time"].isna().all()
    for site in SITES:
        fhir = imported / site / "fhir"
        starts = {f"Encounter/{e['id']}": e["period"]["start"] for e in _ndjson(fhir, "Encounter")}
        for cond in _ndjson(fhir, "Condition"):
            assert cond["recordedDate"] == starts[cond["encounter"]["reference"]]
    # the stay's outcomes never become features, in any variant
    for task in ("covid_severity_icu", "covid_severity_intubation", "covid_severity_death"):
        assert _cohort(imported, task)[1] == names
    pneumonia, with_pneumonia = _cohort(imported, "covid_severity_pneumonia")
    assert with_pneumonia == [*names, "pneumonia"]
    assert pneumonia["pneumonia"].to_dict()["a1"] == 1.0 and pneumonia["pneumonia"].sum() == 1


def test_every_site_is_read_by_the_shipped_config_and_summarised(imported: Path) -> None:
    result = CliRunner().invoke(app, ["data", "summary", str(CONFIG), "--json",
                                      *_cli_sets(imported)])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["task"] == "covid_severity"
    by_site = {s["site"]: s for s in doc["sites"]}
    assert {n: (s["patients"], s["positives"]) for n, s in by_site.items()} == {
        "IMSS": (3, 1), "SSA": (2, 2), "ISSSTE": (2, 1), "other": (2, 1)}
    # b2, who died on the admission day, is kept (a date-only death is the whole day)
    assert by_site["SSA"]["counts"]["excluded_by_reason"] == {}
    assert all(s["counts"]["skipped_by_reason"] == {} for s in doc["sites"])


@pytest.mark.shared_data
def test_a_slice_of_the_real_data(tmp_path: Path) -> None:
    """Every 20th row of the open data: import, the shipped config and task, data summary."""
    if not SHARED_CSV.is_file():
        pytest.skip(f"shared data not found: {SHARED_CSV}")
    with SHARED_CSV.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        rows = [r for i, r in enumerate(reader) if i % 20 == 0]
    doc = _import(_write_csv(tmp_path / "slice.csv", rows), tmp_path / "sites", 10)
    sizes = {s["site"]: s["patients"] for s in doc["sites"]}
    assert sizes == {"IMSS": 563, "SSA": 336, "ISSSTE": 13, "other": 13}
    result = CliRunner().invoke(app, ["data", "summary", str(CONFIG), "--json",
                                      *_cli_sets(tmp_path / "sites")])
    assert result.exit_code == 0, result.output
    summary = {s["site"]: s for s in json.loads(result.stdout)["sites"]}
    n = sum(s["patients"] for s in summary.values())
    pos = sum(s["positives"] for s in summary.values())
    assert n >= 900 and 0.07 < pos / n < 0.15
    assert all(s["counts"]["skipped_by_reason"] == {} for s in summary.values())
    icu = build_cohort(tmp_path / "sites" / "SSA", load_task(TASKS / "covid_severity_icu.yaml"))
    assert 0 < icu.table["label"].sum() < icu.n_patients
