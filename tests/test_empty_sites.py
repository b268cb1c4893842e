"""A site left with no patients: named with its top skip reasons, left out while min_sites holds.

Before, such a site went through: ``mmfl data summary`` exited 0 with n = 0, and ``mmfl train``
ended with "declared an implausible size 0 ... RoundFailed", never naming the cause.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from multimodal_fl.cli import app
from multimodal_fl.config import ExperimentConfig, SiteConfig, load_task
from multimodal_fl.data import build_cohort
from multimodal_fl.data.cohort import EmptySiteError
from multimodal_fl.training import load_site_data
from tests.data import factory as f


def broken_site(root: Path) -> Path:
    """A site whose every Patient is invalid FHIR (a birth date R4B refuses)."""
    res = [r for i in range(3) for r in f.covid_patient(f"bad-{i}")]
    for r in res:
        if r["resourceType"] == "Patient":
            r["birthDate"] = "05/01/1960"
    f.write_json(root / "fhir" / "b.json", f.bundle(res))
    return root


def good_site(root: Path, n: int = 12) -> Path:
    """A site of ``n`` COVID-19 patients, every third one put on oxygen."""
    res = [r for i in range(n) for r in f.covid_patient(
        f"{root.name}-{i}", oxygen_at="2020-03-01T12:00:00Z" if i % 3 == 0 else None)]
    f.write_json(root / "fhir" / "b.json", f.bundle(res))
    return root


def test_data_summary_names_an_empty_site_and_exits_non_zero(tmp_path: Path) -> None:
    good_site(tmp_path / "site_a")
    broken_site(tmp_path / "site_b")
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("task: covid_oxygen_24h\nsites:\n  - {name: site_a, path: site_a}\n"
                   "  - {name: site_b, path: site_b}\n")
    for extra in ([], ["--json"]):
        result = CliRunner().invoke(app, ["data", "summary", str(cfg), *extra])
        assert result.exit_code == 2, result.output
        assert "site_a" in result.stdout  # the summary is still printed
        err = " ".join(result.stderr.split())
        assert "site 'site_b' has 0 patients" in err and "skipped invalid_fhir 3" in err
        assert "site_a' has" not in err and "Traceback" not in result.output


def _cfg(root: Path, names: list[str], min_sites: int) -> ExperimentConfig:
    return ExperimentConfig.model_validate({
        "task": load_task("covid_oxygen_24h"),
        "sites": [SiteConfig(name=n, path=root / n) for n in names],
        "modalities": {"image": {"enabled": False}, "text": {"enabled": False},
                       "tabular": {"hidden": [4], "embed_dim": 4}},
        "federated": {"min_sites": min_sites},
    })


@pytest.fixture
def three_sites(tmp_path: Path) -> dict[str, Any]:
    good_site(tmp_path / "site_a")
    good_site(tmp_path / "site_b")
    broken_site(tmp_path / "site_c")
    task = load_task("covid_oxygen_24h")
    return {n: build_cohort(tmp_path / n, task, site_name=n)
            for n in ("site_a", "site_b", "site_c")}


def test_training_leaves_an_empty_site_out_while_min_sites_holds(
        tmp_path: Path, three_sites: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    cfg = _cfg(tmp_path, list(three_sites), min_sites=2)
    with caplog.at_level(logging.WARNING):
        data = load_site_data(cfg, tmp_path / "run", cohorts=three_sites)
    assert list(data) == ["site_a", "site_b"]
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "site 'site_c' has 0 patients" in warned and "invalid_fhir" in warned
    assert "leaves the site out" in warned


def test_training_fails_in_one_line_when_min_sites_does_not_hold(
        tmp_path: Path, three_sites: dict[str, Any]) -> None:
    cfg = _cfg(tmp_path, list(three_sites), min_sites=3)
    with pytest.raises(EmptySiteError) as info:
        load_site_data(cfg, tmp_path / "run", cohorts=three_sites)
    msg = str(info.value)
    assert "\n" not in msg and "site 'site_c' has 0 patients" in msg
    assert "skipped invalid_fhir 3" in msg and "2 of 3 site(s) left" in msg
    assert "federated.min_sites = 3" in msg


def test_a_site_without_a_usable_modality_is_left_out_too(
        tmp_path: Path, three_sites: dict[str, Any]) -> None:
    cohorts = {n: c for n, c in three_sites.items() if n != "site_c"}
    cohorts["site_b"].table["has_tabular"] = False  # as if no patient had tabular data
    cfg = _cfg(tmp_path, list(cohorts), min_sites=1)
    assert list(load_site_data(cfg, tmp_path / "run", cohorts=cohorts)) == ["site_a"]
    with pytest.raises(EmptySiteError, match=r"site 'site_b' has 0 patients with a usable "
                                             r"modality of \['tabular'\]"):
        load_site_data(cfg.model_copy(update={"federated": cfg.federated.model_copy(
            update={"min_sites": 2})}), tmp_path / "run", cohorts=cohorts)


def test_train_cli_leaves_the_empty_site_out(
        tiny_config: Callable[..., Path], tmp_path: Path) -> None:
    cfg_path = tiny_config(federated={"rounds": 1, "local_steps": 2, "min_sites": 2})
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["sites"].append({"name": "site_z", "path": str(broken_site(tmp_path / "site_z"))})
    cfg_path.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(app, ["train", str(cfg_path), "--out", str(tmp_path / "run"),
                                      "--quiet", "--no-report"])
    assert result.exit_code == 0, result.output
    metrics = yaml.safe_load((tmp_path / "run" / "metrics.json").read_text())
    assert "site_z" not in metrics["sites"] and len(metrics["sites"]) >= 2
    too_few = CliRunner().invoke(app, ["train", str(cfg_path), "--out", str(tmp_path / "r2"),
                                       "--quiet", "--set",
                                       f"federated.min_sites={len(cfg['sites'])}"])
    assert too_few.exit_code == 2
    err = " ".join(too_few.stderr.split())
    assert err.startswith("error: site 'site_z' has 0 patients")
    assert "invalid_fhir" in err and "min_sites" in err
    assert "implausible" not in too_few.output and "Traceback" not in too_few.output
