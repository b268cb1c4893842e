"""``mmfl data summary``: tables and JSON naming every skipped file."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from multimodal_fl.cli import app
from tests.data import factory as f


def _config(tmp_path: Path) -> Path:
    for name, n in (("site_a", 3), ("site_b", 2)):
        res = [r for i in range(n) for r in f.covid_patient(
            f"{name.replace('_', '-')}-{i}", oxygen_at="2020-03-01T12:00:00Z" if i == 0 else None)]
        f.write_json(tmp_path / name / "fhir" / "b.json", f.bundle(res))
    (tmp_path / "site_b" / "fhir" / "broken.json").write_text("{oops")
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("task: covid_oxygen_24h\nsites:\n  - {name: site_a, path: site_a}\n"
                   "  - {name: site_b, path: site_b}\n")
    return cfg


def test_summary_json(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["data", "summary", str(_config(tmp_path)), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    sites = {s["site"]: s for s in out["sites"]}
    assert (sites["site_a"]["patients"], sites["site_a"]["positives"]) == (3, 1)
    assert sites["site_b"]["counts"]["skipped_by_reason"] == {"invalid_json": 1}
    assert sites["site_b"]["skipped"][0]["file"] == "fhir/broken.json"
    assert sites["site_a"]["counts"]["resources_validated"] > 0


def test_summary_tables_and_fail_policy(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    result = CliRunner().invoke(app, ["data", "summary", str(cfg)])
    assert result.exit_code == 0, result.output
    assert "site_a" in result.stdout and "invalid_json" in result.stdout
    failed = CliRunner().invoke(app, ["data", "summary", str(cfg), "--set",
                                      "data.on_error=fail"])
    assert failed.exit_code == 2
    assert "fhir/broken.json" in failed.output and "Traceback" not in failed.output


def _own_task_config(tmp_path: Path) -> Path:
    """The two sites, site_a with another task's labels.csv, under a task of the user's own
    (no label.labels_csv) with an observation and a comorbidity whose codes match nothing."""
    cfg = _config(tmp_path)
    (tmp_path / "site_b" / "fhir" / "broken.json").unlink()
    (tmp_path / "site_a" / "labels.csv").write_text("patient_id,label\nsite-a-1,1\nsite-a-2,1\n")
    task = yaml.safe_load((Path(__file__).parents[2] / "multimodal_fl" / "tasks"
                           / "covid_oxygen_24h.yaml").read_text())
    del task["label"]["labels_csv"]
    task["features"]["observations"].append({"name": "lactate", "codes": ["NO-SUCH-1"],
                                             "unit": "mg/dL"})
    task["features"]["conditions"].append({"name": "ckd", "codes": ["NO-SUCH-2"]})
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(task))
    cfg.write_text(cfg.read_text().replace("covid_oxygen_24h", "mine.yaml"))
    return cfg


def test_summary_says_where_labels_came_from_and_an_unread_labels_csv(tmp_path: Path) -> None:
    """Another task's labels.csv silently replaced a new task's rule labels; the summary
    now counts the labels by source and says when a labels.csv goes unread."""
    cfg = _own_task_config(tmp_path)
    out = json.loads(CliRunner().invoke(app, ["data", "summary", str(cfg), "--json"]).stdout)
    sites = {s["site"]: s for s in out["sites"]}
    assert sites["site_a"]["positives"] == 1  # the rule's: site-a-0 only, not labels.csv's
    assert sites["site_a"]["counts"]["labels_from"] == {"labels_csv": 0, "rule": 3}
    assert "labels.csv is present but not read" in sites["site_a"]["counts"]["labels_csv_unused"]
    assert "labels_csv_unused" not in sites["site_b"]["counts"]
    task = yaml.safe_load((tmp_path / "mine.yaml").read_text())
    task["label"]["labels_csv"] = "prefer"
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(task))
    result = CliRunner().invoke(app, ["data", "summary", str(cfg)])
    assert result.exit_code == 0, result.output
    assert "csv/rule" in result.stdout and "2/1" in result.stdout
    assert "not read" not in result.output
    (tmp_path / "mine.yaml").write_text((tmp_path / "mine.yaml").read_text().replace(
        "labels_csv: prefer", "labels_csv: ignore"))
    plain = CliRunner().invoke(app, ["data", "summary", str(cfg)])
    assert "site_a: labels.csv is present but not read" in " ".join(plain.output.split())


def test_summary_warns_of_a_feature_without_value(tmp_path: Path) -> None:
    """A feature whose codes match nothing at a site trained silently: the summary names
    the config, the task, the site and the features."""
    cfg = _own_task_config(tmp_path)
    result = CliRunner().invoke(app, ["data", "summary", str(cfg)])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    for site in ("site_a", "site_b"):
        assert (f"{cfg} (task 'covid_oxygen_24h'): site '{site}': no patient has a value of "
                "feature(s) 'spo2',") in said  # the factory's patients have heart rates only
    out = json.loads(CliRunner().invoke(app, ["data", "summary", str(cfg), "--json"]).stdout)
    for site in out["sites"]:
        empty = site["counts"]["features_without_value"]
        assert {"lactate", "ckd"} <= set(empty) and "heart_rate" not in empty
        assert empty[-1] == "ckd" and empty.index("lactate") < empty.index("hypertension")


def test_summary_table_is_never_cut_in_a_log(tmp_path: Path) -> None:
    """The csv/rule column pushed the table past 80 characters, and in a log or a pipe rich cut
    every cell ("site…", "1…" for 194 patients). Outside a terminal the table now takes the
    width it needs; the label sources show only where some site reads labels.csv."""
    cfg = _own_task_config(tmp_path)
    plain = CliRunner().invoke(app, ["data", "summary", str(cfg)])
    assert plain.exit_code == 0, plain.output
    assert "csv/rule" not in plain.stdout  # no site reads labels.csv under this task
    task = yaml.safe_load((tmp_path / "mine.yaml").read_text())
    task["label"]["labels_csv"] = "prefer"
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(task))
    result = CliRunner().invoke(app, ["data", "summary", str(cfg)])
    table = result.stdout.split("feature missingness")[0]
    header = next(line for line in table.splitlines() if "site" in line and "csv/rule" in line)
    assert "…" not in table and all(col in header for col in ("valid/read", "skip", "excl"))
    assert any(line.lstrip("│ ").startswith("site_a") for line in table.splitlines())
