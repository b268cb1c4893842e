"""``mmfl predict``: what a bug hunt found (the run's own files overwritten, a missing
recalibration scored raw, a threshold without its reason, a site's data problems unsaid, the
slow part before the quick checks, no progress, a killed run called running)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from filelock import FileLock
from typer.testing import CliRunner

from multimodal_fl.cli import app
from multimodal_fl.evaluation.recalibration import Recalibration
from tests.test_rundirs import refused, train


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_sample: Path, tiny_bert: Path
         ) -> dict[str, Path]:
    """A federated run and a local-only run of the tiny covid cohort (no report: quicker)."""
    from tests.conftest import write_tiny_config

    root = tmp_path_factory.mktemp("predict")
    config = write_tiny_config(root, tiny_sample, tiny_bert)
    train(str(config), "--out", str(root / "fed"), "--no-report")
    train(str(config), "--engine", "local", "--out", str(root / "local"), "--no-report")
    return {"fed": root / "fed", "local": root / "local", "root": root}


def _site(tiny_sample: Path) -> Path:
    return tiny_sample / "covid_oxygen" / "site_a"


def _predict(*args: str) -> str:
    result = CliRunner().invoke(app, ["predict", *args])
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to, ignore=shutil.ignore_patterns("cache"))
    return to


# ------------------------------------------------------------------------------ --out


def test_out_never_writes_into_the_run_or_the_site_and_never_replaces_silently(
        runs: dict[str, Path], tiny_sample: Path, tmp_path: Path) -> None:
    fed, site = runs["fed"], _site(tiny_sample)
    model = (fed / "model.safetensors").read_bytes()
    own = (fed / "sites" / "site_a" / "predictions.csv").read_bytes()
    out = refused("predict", str(fed), str(site), "--out", str(fed / "model.safetensors"))
    assert f"--out {fed / 'model.safetensors'}: inside RUN_DIR {fed}" in out
    out = refused("predict", str(fed), str(site), "--out",
                  str(fed / "sites" / "site_a" / "predictions.csv"))
    assert "inside RUN_DIR" in out
    assert "inside SITE_DIR" in refused("predict", str(fed), str(site), "--out",
                                        str(site / "p.csv"))
    assert (fed / "model.safetensors").read_bytes() == model
    assert (fed / "sites" / "site_a" / "predictions.csv").read_bytes() == own
    assert not (site / "p.csv").exists()
    # an existing file: refused, untouched; replaced with --overwrite
    existing = tmp_path / "p.csv"
    existing.write_text("mine\n")
    out = refused("predict", str(fed), str(site), "--out", str(existing))
    assert "a file is already there; give another --out or --overwrite to replace it" in out
    assert existing.read_text() == "mine\n"
    _predict(str(fed), str(site), "--out", str(existing), "--overwrite", "--quiet")
    assert list(pd.read_csv(existing).columns)[:3] == ["patient_id", "score", "score_raw"]


def test_a_bad_out_or_a_cut_model_is_said_before_any_data_is_read(
        runs: dict[str, Path], tiny_sample: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import multimodal_fl.engines.predict as engine

    def no_reading(*args: object, **kwargs: object) -> None:
        raise AssertionError("the site's data was read")

    monkeypatch.setattr(engine, "build_cohort", no_reading)
    site = _site(tiny_sample)
    (tmp_path / "afile").write_text("x")
    out = refused("predict", str(runs["fed"]), str(site), "--out",
                  str(tmp_path / "afile" / "p.csv"))
    assert f"{tmp_path / 'afile'} is a file, not a folder" in out
    cut = _copy(runs["fed"], tmp_path / "cut")
    (cut / "model.safetensors").write_bytes((cut / "model.safetensors").read_bytes()[:1000])
    out = refused("predict", str(cut), str(site), "--out", str(tmp_path / "p.csv"))
    assert "model.safetensors: not a readable model file" in out


# ---------------------------------------------------------------------- recalibration


def _recalibrated(run: Path) -> Recalibration:
    """Make a copied run one whose recalibration was fitted and applied, as the run records it
    (the tiny cohort is too small for the secure sum the real one needs)."""
    fitted = Recalibration("platt", -0.4, 1.5, n=40, source="the pooled validation split")
    (run / "recalibration.json").write_text(json.dumps(fitted.to_dict()))
    for name in ("metrics.json", "model_card.json"):
        doc = json.loads((run / name).read_text())
        doc["recalibration"] = {**fitted.to_dict(), "applied": True}
        (run / name).write_text(json.dumps(doc))
    return fitted


def test_a_missing_recalibration_the_run_applied_is_refused(
        runs: dict[str, Path], tiny_sample: Path, tmp_path: Path) -> None:
    run = _copy(runs["fed"], tmp_path / "run")
    fitted = _recalibrated(run)
    site, out_csv = str(_site(tiny_sample)), str(tmp_path / "p.csv")
    _predict(str(run), site, "--out", out_csv, "--quiet")
    got = pd.read_csv(out_csv)
    assert (got["score"] - fitted.apply(got["score_raw"].to_numpy())).abs().max() < 1e-6
    (run / "recalibration.json").unlink()
    out = refused("predict", str(run), site, "--out", str(tmp_path / "q.csv"))
    assert f"{run / 'recalibration.json'}: missing, but the run recorded its recalibration " \
           "as applied (platt, a=-0.4, b=1.5, fitted on the pooled validation split)" in out
    assert not (tmp_path / "q.csv").exists()
    # a run that was never recalibrated (the tiny run itself) is scored raw, as before
    out = _predict(str(runs["fed"]), site, "--out", str(tmp_path / "q.csv"), "--quiet")
    assert "recalibration: none" in out
    got = pd.read_csv(tmp_path / "q.csv")
    assert (got["score"] == got["score_raw"]).all()


def test_a_local_models_missing_recalibration_is_refused_when_its_site_applied_one(
        runs: dict[str, Path], tiny_sample: Path, tmp_path: Path) -> None:
    run = _copy(runs["local"], tmp_path / "run")
    sites = json.loads((run / "metrics.json").read_text())["recalibration"]["sites"]
    site = sorted(sites)[0]
    for name in ("metrics.json", "model_card.json"):  # the record says it was applied
        doc = json.loads((run / name).read_text())
        doc["recalibration"]["sites"][site] = {"applied": True, "source": "its own validation"}
        (run / name).write_text(json.dumps(doc))
    (run / "sites" / site / "recalibration.json").unlink(missing_ok=True)
    out = refused("predict", str(run), str(_site(tiny_sample)), "--model-site", site,
                  "--out", str(tmp_path / "p.csv"))
    assert f"{run / 'sites' / site / 'recalibration.json'}: missing, but the run recorded " \
           "its recalibration as applied" in out


# -------------------------------------------------------------------------- threshold


def test_the_threshold_is_said_with_its_reason_and_a_training_site_may_use_its_own(
        runs: dict[str, Path], tiny_sample: Path, tmp_path: Path) -> None:
    run = _copy(runs["fed"], tmp_path / "run")
    card = json.loads((run / "model_card.json").read_text())
    card["threshold"]["values"]["site_a"] = 0.3  # site_a chose its own, unlike the others
    (run / "model_card.json").write_text(json.dumps(card))
    glob = card["threshold"]["global"]
    site, out_csv = str(_site(tiny_sample)), str(tmp_path / "p.csv")
    out = _predict(str(run), site, "--out", out_csv, "--quiet")
    note = "; ".join(card["threshold"]["notes"]) or "the sites' common threshold"
    assert f"at threshold {glob:.4g} ({note}" in out
    out = _predict(str(run), site, "--out", out_csv, "--overwrite", "--quiet", "--site-name",
                   "site_a", "--own-threshold")
    assert "at threshold 0.3 (site site_a's own, as its report applied it" in out
    got = pd.read_csv(out_csv)
    assert (got["predicted"] == (got["score"] >= 0.3).astype(int)).all()
    out = refused("predict", str(run), site, "--out", str(tmp_path / "q.csv"), "--site-name",
                  "elsewhere", "--own-threshold")
    assert "--own-threshold: 'elsewhere' is not a training site" in out


# ------------------------------------------------------------------- the site's data


def _damaged_site(tiny_sample: Path, to: Path) -> Path:
    """site_a with every WBC in an unknown unit, no images, and one patient's records gone."""
    site = shutil.copytree(_site(tiny_sample), to, ignore=shutil.ignore_patterns("images"))
    files = sorted((site / "fhir").glob("*.json"))
    for path in files:
        bundle = json.loads(path.read_text())
        for entry in bundle["entry"]:
            resource = entry["resource"]
            quantity = resource.get("valueQuantity")
            if quantity and resource["code"]["coding"][0]["code"] == "6690-2":  # WBC
                quantity["unit"] = quantity["code"] = "furlongs"
        if path == files[0]:  # only the Patient: outside the task's cohort
            bundle["entry"] = [e for e in bundle["entry"]
                               if e["resource"]["resourceType"] == "Patient"]
        path.write_text(json.dumps(bundle))
    return site


def test_what_the_sites_data_lacks_is_said(runs: dict[str, Path], tiny_sample: Path,
                                           tmp_path: Path) -> None:
    site = _damaged_site(tiny_sample, tmp_path / "site")
    out = _predict(str(runs["fed"]), str(site), "--out", str(tmp_path / "p.csv"), "--quiet")
    scored = len(pd.read_csv(tmp_path / "p.csv"))
    assert "records skipped: unknown_unit" in out
    assert f"image 0/{scored}" in out and "no patient has image" in out
    assert "no patient has a value of feature(s) 'wbc': the model sees them missing" in out
    assert "not scored: excluded: " in out


def test_a_site_of_another_task_is_refused_with_its_reasons(
        runs: dict[str, Path], tiny_sample: Path, tmp_path: Path) -> None:
    other = next(p for p in sorted((tiny_sample / "alzheimers").iterdir()) if p.is_dir())
    out = refused("predict", str(runs["fed"]), str(other), "--out", str(tmp_path / "p.csv"),
                  "--quiet")
    assert "has 0 patients" in out and "for the run's task 'covid_oxygen_24h'" in out


def test_progress_is_shown_unless_quiet(runs: dict[str, Path], tiny_sample: Path,
                                        tmp_path: Path) -> None:
    shown = CliRunner().invoke(app, ["predict", str(runs["fed"]), str(_site(tiny_sample)),
                                     "--out", str(tmp_path / "p.csv")])
    assert shown.exit_code == 0, shown.output
    assert "site_a records read:" in shown.stderr and "site_a text embedded:" in shown.stderr
    quiet = CliRunner().invoke(app, ["predict", str(runs["fed"]), str(_site(tiny_sample)),
                                     "--out", str(tmp_path / "q.csv"), "--quiet"])
    assert quiet.exit_code == 0 and "records read" not in quiet.stderr


# ----------------------------------------------------------------- a killed run, messages


def test_a_killed_run_is_not_called_running(runs: dict[str, Path], tiny_sample: Path,
                                            tmp_path: Path) -> None:
    run = _copy(runs["fed"], tmp_path / "run")
    (run / "metrics.json").unlink()
    manifest = json.loads((run / "run.json").read_text())
    manifest.update(status="running", ended=None)
    (run / "run.json").write_text(json.dumps(manifest))
    (run / "run.lock").touch()  # left behind by a process killed with kill -9
    site, out = str(_site(tiny_sample)), str(tmp_path / "p.csv")
    killed = "interrupted (its run.json says running, but no process holds its run.lock"
    assert killed in refused("predict", str(run), site, "--out", out)
    assert killed in refused("report", str(run))
    with FileLock(run / "run.lock"):  # a process still writes it
        said = refused("predict", str(run), site, "--out", out)
        assert "the run is running;" in said and "interrupted" not in said
        assert "interrupted" not in refused("report", str(run))


def test_report_on_a_run_of_this_version_without_disclosed_says_it_was_not_copied(
        runs: dict[str, Path], tmp_path: Path) -> None:
    run = _copy(runs["fed"], tmp_path / "run")
    shutil.rmtree(run / "disclosed")
    out = refused("report", str(run))
    assert "has no disclosed/<site>.json, although multimodal_fl" in out
    assert "the folder was removed or not copied with the run" in out
    assert "made by multimodal_fl" not in out


def test_a_run_or_a_cohort_root_given_as_the_site_is_named(
        runs: dict[str, Path], tiny_sample: Path, tmp_path: Path) -> None:
    out = refused("predict", str(runs["fed"]), str(runs["fed"]), "--out",
                  str(tmp_path / "p.csv"))
    assert "holds a run directory (run.json, config.yaml), not a site's data" in out
    out = refused("predict", str(runs["fed"]), str(tiny_sample / "covid_oxygen"), "--out",
                  str(tmp_path / "p.csv"))
    assert "not one site's data" in out and "site_a" in out and "is empty" not in out


def test_the_egress_log_records_the_cells_a_sites_report_document_suppressed(
        runs: dict[str, Path]) -> None:
    """Found by a bug hunt: the predict line said ``"suppressed": []`` while the site's
    disclosed document showed 6 cells without a figure."""
    checked = 0
    for disclosed in sorted((runs["fed"] / "disclosed").glob("*.json")):
        cells = json.loads(disclosed.read_text())["cells"]
        want = {("overall" if c["attribute"] is None else f"{c['attribute']}={c['group']}")
                for c in cells if c["suppressed"] and c["reason"]}
        log = runs["fed"] / "sites" / disclosed.stem / "egress.jsonl"
        lines = [json.loads(line) for line in log.read_text().splitlines()]
        predict = [e for e in lines if e["kind"] == "predict" and e["released"]]
        assert len(predict) == 1
        got = {s.split(": ")[0] for s in predict[0]["suppressed"]}
        assert got == want, disclosed.stem
        checked += bool(want)
    assert checked  # at least one site of the tiny cohort suppressed a cell
