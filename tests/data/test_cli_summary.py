"""``mmfl data summary``: tables and JSON naming every skipped file."""

from __future__ import annotations

import json
from pathlib import Path

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
