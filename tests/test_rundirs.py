"""One run per run directory, the manifest, the end of a run (report, model card), predict."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from multimodal_fl.cli import app
from multimodal_fl.config import ConfigError, load_config
from multimodal_fl.engines import ENGINES, Engine, run
from multimodal_fl.rundir import (
    RunDirError,
    RunOutcome,
    check_resume,
    config_digest,
    prepare_run_dir,
    read_manifest,
    site_fingerprint,
)


def train(*args: str) -> str:
    """``mmfl train ... --quiet``; returns the output, asserting success."""
    result = CliRunner().invoke(app, ["train", *args, "--quiet"])
    assert result.exit_code == 0, result.output
    return result.output


def refused(*args: str) -> str:
    """``mmfl <args>`` that must fail with one line and no traceback; returns the output."""
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.output.startswith("error: ") and result.output.count("error: ") == 1
    return " ".join(result.output.split())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_sample: Path, tiny_bert: Path
         ) -> dict[str, Path]:
    """A local run (the report on, as by default) and a federated run with --no-report."""
    from tests.conftest import write_tiny_config

    root = tmp_path_factory.mktemp("rundirs")
    config = write_tiny_config(root, tiny_sample, tiny_bert)
    train(str(config), "--engine", "local", "--out", str(root / "local"))
    train(str(config), "--out", str(root / "fed"), "--no-report")
    return {"config": config, "local": root / "local", "fed": root / "fed", "root": root}


# ------------------------------------------------------------------------------ manifest


def test_manifest_says_what_the_run_is_and_how_it_ended(runs: dict[str, Path]) -> None:
    cfg = load_config(runs["config"])
    for name, engine in (("local", "local"), ("fed", "inprocess")):
        m = read_manifest(runs[name])
        assert m is not None and m.engine == engine and m.status == "completed"
        assert m.config_digest == config_digest(cfg) and m.seed == cfg.seed
        assert m.task == cfg.task.name and m.package_version
        assert m.started <= (m.ended or "") and m.error is None
        assert m.data == {s.name: site_fingerprint(s.path) for s in cfg.sites}
    assert read_manifest(runs["local"]).run_id != read_manifest(runs["fed"]).run_id  # type: ignore[union-attr]


def test_every_egress_line_names_its_run(runs: dict[str, Path]) -> None:
    """A hospital's egress log may hold the lines of many runs (a deployed site writes into one
    folder per experiment): each line says which run it belongs to."""
    for name in ("local", "fed"):
        logs = sorted((runs[name] / "sites").glob("*/egress.jsonl"))
        assert logs
        for log in logs:
            lines = [json.loads(x) for x in log.read_text().splitlines()]
            assert lines and all(x["run"] == {"dir": str(runs[name])} for x in lines), log


def test_manifest_is_written_first_running_then_stopped_then_completed(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    cfg = load_config(tiny_config())
    seen: list[str] = []

    def on_round(record: object) -> None:
        seen.append(read_manifest(tmp_path / "r").status)  # type: ignore[union-attr]

    run(cfg, "inprocess", out_dir=tmp_path / "r", stop_after_round=1, on_round=on_round)
    assert seen == ["running"]
    stopped = read_manifest(tmp_path / "r")
    assert stopped is not None and stopped.status == "stopped"
    assert stopped.stopped_after_round == 1 and stopped.ended is not None
    assert not (tmp_path / "r" / "model_card.json").exists()  # no final model yet
    run(cfg, "inprocess", out_dir=tmp_path / "r", resume=True, report=False)
    done = read_manifest(tmp_path / "r")
    assert done is not None and done.status == "completed" and len(done.resumed) == 1
    assert done.run_id == stopped.run_id and done.started == stopped.started
    assert (tmp_path / "r" / "model_card.json").is_file()


def test_a_failed_run_records_the_error(tiny_config: Callable[..., Path], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(cfg: object, options: object) -> RunOutcome:
        raise RuntimeError("site_b stopped\nanswering")

    monkeypatch.setitem(ENGINES, "local", Engine("local", "local-only", boom))
    with pytest.raises(RuntimeError, match="site_b stopped"):
        run(load_config(tiny_config()), "local", out_dir=tmp_path / "r")
    m = read_manifest(tmp_path / "r")
    assert m is not None and m.status == "failed" and m.ended is not None
    assert m.error == "RuntimeError: site_b stopped answering"  # one line


def test_a_failing_end_keeps_the_run_completed(tiny_config: Callable[..., Path], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import multimodal_fl.engines.registry as registry

    def trained(cfg: object, options: Any) -> RunOutcome:
        return RunOutcome(options.out_dir, {})

    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("no predictions")

    monkeypatch.setitem(ENGINES, "local", Engine("local", "local-only", trained))
    monkeypatch.setattr(registry, "finish_run", broken)
    with pytest.raises(RuntimeError, match=r"the run completed in .*, but its end failed \(no "
                       r"predictions\); mmfl report .* retries the report"):
        run(load_config(tiny_config()), "local", out_dir=tmp_path / "r")
    assert read_manifest(tmp_path / "r").status == "completed"  # type: ignore[union-attr]


def test_data_fingerprint_follows_content_not_timestamps_or_place(
    tiny_sample: Path, tmp_path: Path
) -> None:
    site = tiny_sample / "covid_oxygen" / "site_a"
    copy = tmp_path / "elsewhere"
    shutil.copytree(site, copy)
    first = sorted(p for p in copy.rglob("*") if p.is_file())[0]
    os.utime(first, (1, 1))  # another timestamp
    (copy / ".DS_Store").write_text("junk")  # hidden files do not count
    assert site_fingerprint(copy) == site_fingerprint(site)
    data = bytearray(first.read_bytes())
    data[-1] ^= 1  # one bit of content
    first.write_bytes(bytes(data))
    assert site_fingerprint(copy)["fingerprint"] != site_fingerprint(site)["fingerprint"]


def test_config_digest_leaves_out_what_may_change_on_resume(
    tiny_config: Callable[..., Path]
) -> None:
    base = load_config(tiny_config())
    same = load_config(tiny_config(), ["federated.rounds=9", "federated.timeout_s=30",
                                       "name=other", "federated.engine=local"])
    assert config_digest(same) == config_digest(base)
    for change in ("training.lr=0.01", "seed=1", "federated.algorithm=fedprox"):
        assert config_digest(load_config(tiny_config(), [change])) != config_digest(base)


# ------------------------------------------------------------------------ one run per dir


def test_centralized_onto_a_local_run_is_refused_and_leaves_it(runs: dict[str, Path]) -> None:
    local = runs["local"]
    before = (local / "metrics.json").read_bytes()
    out = refused("train", str(runs["config"]), "--engine", "centralized", "--out", str(local))
    assert f"--out {local}: a local run (completed) is already there" in out
    assert "--overwrite" in out
    assert (local / "metrics.json").read_bytes() == before


def test_a_bad_out_fails_at_once_without_reading_sites(
    runs: dict[str, Path], tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    cache = tmp_path / "fresh-cache"
    cfg = load_config(tiny_config(data={"cache_dir": str(cache)}))
    start = time.perf_counter()
    with pytest.raises(RunDirError, match="is already there"):
        run(cfg, "centralized", out_dir=runs["local"])
    assert time.perf_counter() - start < 1.0
    assert not cache.exists()  # no site was read, nothing was embedded
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="not a run directory"):
        run(cfg, "local", out_dir=stray, overwrite=True)
    assert (stray / "notes.txt").read_text() == "mine"  # never removed
    assert not cache.exists()
    # a folder that looks like a run (a config.yaml) but holds the user's files too
    (stray / "config.yaml").write_text("foo: 1\n")
    (stray / "data").mkdir()
    (stray / "data" / "precious.txt").write_text("mine")
    with pytest.raises(RunDirError, match=r"not removed: it also holds 'data', 'notes.txt'"):
        run(cfg, "local", out_dir=stray, overwrite=True)
    assert (stray / "data" / "precious.txt").read_text() == "mine"
    (stray / "notes.txt").unlink()
    shutil.rmtree(stray / "data")
    with pytest.raises(RunDirError, match=r"it has no run\.json, so it is not known to be a run"):
        run(cfg, "local", out_dir=stray, overwrite=True)
    assert (stray / "config.yaml").is_file()
    assert not cache.exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_a_missing_device_fails_before_reading_sites(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    cache = tmp_path / "cache-dev"
    cfg = load_config(tiny_config(data={"cache_dir": str(cache)}, training={"device": "cuda"}))
    with pytest.raises(ValueError, match="no CUDA device"):
        run(cfg, "local", out_dir=tmp_path / "r")
    assert not cache.exists() and not (tmp_path / "r").exists()


def test_overwrite_removes_the_run_first(runs: dict[str, Path], tmp_path: Path) -> None:
    target = tmp_path / "was-local"
    shutil.copytree(runs["local"], target)
    assert (target / "cross_site.json").is_file()
    train(str(runs["config"]), "--engine", "centralized", "--out", str(target), "--overwrite")
    assert read_manifest(target).engine == "centralized"  # type: ignore[union-attr]
    assert not list(target.glob("sites/*/model.safetensors"))
    assert not (target / "cross_site.json").exists()
    report = json.loads((target / "report" / "report.json").read_text())
    models = {c["model"] for c in report["cross_site"]["cells"]}
    assert models == {"centralized"}  # no local:* rows left behind


def test_overwrite_keeps_holding_the_run_lock(runs: dict[str, Path], tmp_path: Path) -> None:
    """--overwrite removed the whole folder, its own run.lock with it: a second process could
    then lock a new file and --resume or --overwrite the run in progress (a bug hunt)."""
    from filelock import FileLock, Timeout

    from multimodal_fl.rundir import RUN_LOCK

    target = tmp_path / "was-local"
    shutil.copytree(runs["local"], target)
    seen: list[str] = []

    def progress(event: object) -> None:
        if seen:
            return
        other = FileLock(target / RUN_LOCK)
        try:
            other.acquire(timeout=0)
            seen.append("a second process got the lock")
            other.release()
        except Timeout:
            seen.append("held")

    run(load_config(runs["config"]), "centralized", out_dir=target, overwrite=True,
        progress=progress, report=False)
    assert seen == ["held"]
    link = tmp_path / "link"
    link.symlink_to(target)
    out = refused("train", str(runs["config"]), "--engine", "centralized", "--out", str(link),
                  "--overwrite")
    assert "is a symbolic link" in out and read_manifest(target) is not None


def test_resume_of_a_local_run_is_refused(runs: dict[str, Path]) -> None:
    local = runs["local"]
    model = (local / "sites" / "site_a" / "model.safetensors").read_bytes()
    out = refused("train", str(runs["config"]), "--resume", str(local))
    assert "a local run; only an unfinished inprocess run can be resumed" in out
    assert (local / "sites" / "site_a" / "model.safetensors").read_bytes() == model


def test_resume_of_a_completed_run_is_refused(runs: dict[str, Path]) -> None:
    out = refused("train", "--resume", str(runs["fed"]))
    assert "the run completed at" in out


def test_resume_checks_the_config_digest(tiny_config: Callable[..., Path], tmp_path: Path) -> None:
    config = tiny_config()
    train(str(config), "--out", str(tmp_path / "r"), "--stop-after-round", "1")
    more_rounds = load_config(config, ["federated.rounds=5"])  # may change across a resume
    changed = tiny_config(training={"lr": 0.05})  # rewrites the config file
    out = refused("train", str(changed), "--resume", str(tmp_path / "r"))
    assert "the configuration differs from the run's (training.lr)" in out
    assert read_manifest(tmp_path / "r").status == "stopped"  # type: ignore[union-attr]
    assert check_resume(tmp_path / "r", more_rounds, engine="inprocess",
                        resumable=["inprocess"]).status == "stopped"


def test_prepare_run_dir_accepts_new_and_empty_folders(tmp_path: Path) -> None:
    assert prepare_run_dir(tmp_path / "new") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    prepare_run_dir(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="is a file"):
        prepare_run_dir(tmp_path / "file")


# ---------------------------------------------------------------------- end of a run


def test_a_run_ends_with_its_report_and_model_card(runs: dict[str, Path]) -> None:
    local, fed = runs["local"], runs["fed"]
    assert (local / "report" / "report.html").is_file()
    assert not (fed / "report").exists()  # --no-report
    for run_dir in (local, fed):
        card = json.loads((run_dir / "model_card.json").read_text())
        manifest = read_manifest(run_dir)
        assert card["data"] == manifest.data  # type: ignore[union-attr]
        assert card["task"]["name"] == "covid_oxygen_24h"
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert card["recalibration"] == metrics["recalibration"]  # what the run did
        assert set(card["performance"]["sites"]) == {"site_a", "site_b", "site_c"}
        assert (run_dir / "model_card.md").read_text().startswith("# Model card")
    local_card = json.loads((local / "model_card.json").read_text())
    assert set(local_card["models"]) == {"site_a", "site_b", "site_c"}
    assert local_card["performance"]["report"] == "report/report.html"
    assert local_card["performance"]["report_sites"]
    fed_card = json.loads((fed / "model_card.json").read_text())
    assert fed_card["models"] == {"global": "model.safetensors"}
    assert fed_card["performance"]["report_sites"] is None
    assert fed_card["training"]["federated"]["completed_rounds"] == 2


def _report_json(run_dir: Path, out: Path) -> dict[str, Any]:
    """``mmfl report RUN_DIR --out OUT``'s report.json (asserting success)."""
    result = CliRunner().invoke(app, ["report", str(run_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    doc: dict[str, Any] = json.loads((out / "report.json").read_text())
    for entry in doc["runs"]:
        entry.pop("path")
    return doc


def test_the_report_is_built_without_the_sites_folders(runs: dict[str, Path],
                                                       tmp_path: Path) -> None:
    # the server's side of an in-process run: the sites' patient-level folders removed
    for name in ("fed", "local"):
        server = tmp_path / name
        shutil.copytree(runs[name], server)
        shutil.rmtree(server / "sites")
        without = _report_json(server, tmp_path / f"{name}-report")
        assert without == _report_json(runs[name], tmp_path / f"{name}-with-sites")
        sites = {"site_a", "site_b", "site_c"}
        assert {e["engine"]: set(e["sites"]) for e in without["runs"]} == {
            "inprocess" if name == "fed" else "local": sites}
        label = without["runs"][0]["label"]
        cells = without["fairness"][label]["cells"]
        assert {c["site"] for c in cells if c["scope"] == "site"} == sites
        # tiny test splits: every site cell is suppressed and says why, with no count
        for c in cells:
            if c["scope"] == "site" and c["suppressed"]:
                assert c["reason"] and (c["n"] is None or c["n"] >= 10)
        page = (tmp_path / f"{name}-report" / "report.html").read_text()
        assert "suppressed (fewer than 10 patients)" in page


def test_a_run_made_before_disclosure_gets_one_line(runs: dict[str, Path],
                                                    tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(runs["fed"], old)
    shutil.rmtree(old / "disclosed")
    manifest = json.loads((old / "run.json").read_text())
    (old / "run.json").write_text(json.dumps(manifest | {"package_version": "0.0.9"}))
    out = refused("report", str(old))
    assert out.startswith(f"error: report: {old}: made by multimodal_fl 0.0.9, before sites "
                          "disclosed their report documents (disclosed/<site>.json)")
    assert "Train it again with this version (mmfl train CONFIG)" in out
    (old / "run.json").unlink()
    assert "made by a multimodal_fl without a run manifest (no run.json)" in refused(
        "report", str(old))


# ---------------------------------------------------------------------------- predict


def test_predict_scores_a_site_as_the_run_did(runs: dict[str, Path], tiny_sample: Path,
                                              tmp_path: Path) -> None:
    fed = runs["fed"]
    site = tiny_sample / "covid_oxygen" / "site_a"
    result = CliRunner().invoke(app, ["predict", str(fed), str(site), "--out",
                                      str(tmp_path / "p.csv")])
    assert result.exit_code == 0, result.output
    got = pd.read_csv(tmp_path / "p.csv")
    assert list(got.columns) == ["patient_id", "score", "score_raw", "label", "predicted"]
    threshold = json.loads((fed / "model_card.json").read_text())["threshold"]["global"]
    assert (got["predicted"] == (got["score"] >= threshold).astype(int)).all()
    # the same model on the same patients: the scores the run wrote at the site
    run_rows = pd.read_csv(fed / "sites" / "site_a" / "predictions.csv")
    both = got.merge(run_rows, on="patient_id", suffixes=("", "_run"))
    assert len(both) == len(run_rows) == len(got)
    assert (both["score"] - both["score_run"]).abs().max() < 1e-6
    assert (both["score_raw"] - both["score_raw_run"]).abs().max() < 1e-6
    assert (both["label"] == both["label_run"]).all()


def test_predict_with_a_local_run_needs_model_site(runs: dict[str, Path], tiny_sample: Path,
                                                  tmp_path: Path) -> None:
    local = runs["local"]
    site = tiny_sample / "covid_oxygen" / "site_b"
    out = refused("predict", str(local), str(site), "--out", str(tmp_path / "p.csv"))
    assert "one model per site (site_a, site_b, site_c); choose one with --model-site" in out
    result = CliRunner().invoke(app, ["predict", str(local), str(site), "--model-site", "site_b",
                                      "--out", str(tmp_path / "p.csv")])
    assert result.exit_code == 0, result.output
    assert "local model of site site_b" in " ".join(result.output.split())
    got = pd.read_csv(tmp_path / "p.csv")
    own = pd.read_csv(local / "sites" / "site_b" / "predictions.csv")
    both = got.merge(own, on="patient_id", suffixes=("", "_run"))
    assert len(both) == len(own) and (both["score"] - both["score_run"]).abs().max() < 1e-6
    out = refused("predict", str(runs["fed"]), str(site), "--model-site", "site_b", "--out",
                  str(tmp_path / "q.csv"))
    assert "one global model; leave --model-site out" in out


def test_predict_names_a_model_file_cut_short(runs: dict[str, Path], tiny_sample: Path,
                                              tmp_path: Path) -> None:
    cut = tmp_path / "cut"
    shutil.copytree(runs["fed"], cut)
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[:1000])
    out = refused("predict", str(cut), str(tiny_sample / "covid_oxygen" / "site_a"), "--out",
                  str(tmp_path / "p.csv"))
    assert "model.safetensors: not a readable model file" in out


def test_predict_refuses_an_unfinished_run(tiny_config: Callable[..., Path], tiny_sample: Path,
                                           tmp_path: Path) -> None:
    train(str(tiny_config()), "--out", str(tmp_path / "r"), "--stop-after-round", "1")
    out = refused("predict", str(tmp_path / "r"), str(tiny_sample / "covid_oxygen" / "site_a"),
                  "--out", str(tmp_path / "p.csv"))
    assert "the run is stopped" in out and not (tmp_path / "p.csv").exists()


# --------------------------------------------------------------------- config: baselines


def test_evaluation_baselines_is_refused_with_the_way_out(
    tiny_config: Callable[..., Path], runs: dict[str, Path]
) -> None:
    with pytest.raises(ConfigError, match=r"'evaluation.baselines' was removed: .*mmfl report"):
        load_config(tiny_config(evaluation={"baselines": ["local"]}))
    # a run written before the removal still loads (its saved config keeps the key)
    old = yaml.safe_load((runs["local"] / "config.yaml").read_text())
    old["evaluation"]["baselines"] = ["local", "centralized"]
    saved = runs["root"] / "old-config.yaml"
    saved.write_text(yaml.safe_dump(old))
    assert load_config(saved, saved=True).evaluation.n_boot == 20


def test_cli_refusals_found_by_a_bug_hunt(runs: dict[str, Path], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Each was a traceback, a silent no-op or a misleading line before."""
    config = str(runs["config"])
    out = refused("train", config, "--out", str(tmp_path / "x"), "--stop-after-round", "0")
    assert "--stop-after-round 0: give a round, 1 or more" in out
    out = refused("train", "--resume", str(runs["fed"]), "--out", str(tmp_path / "other"))
    assert "a resumed run is written into its own directory; drop --out" in out
    out = refused("config", "show", str(tmp_path))
    assert "a directory, not a config file" in out
    # a run that failed has a run.json and no metrics.json: the report says what it is
    failed = tmp_path / "failed"
    shutil.copytree(runs["fed"], failed)
    (failed / "metrics.json").unlink()
    manifest = json.loads((failed / "run.json").read_text())
    manifest.update(status="failed", error="KeyboardInterrupt:")
    (failed / "run.json").write_text(json.dumps(manifest))
    out = refused("report", str(failed))
    assert "the inprocess run there is failed (KeyboardInterrupt:) and has no results yet" in out
    assert f"mmfl train --resume {failed}" in out
    # the entry point turns a file-system error into one line naming the path
    from multimodal_fl import cli

    (tmp_path / "afile").write_text("x")
    monkeypatch.setattr("sys.argv", ["mmfl", "sample-data", str(tmp_path / "afile" / "sub"),
                                     "--profile", "tiny"])
    with pytest.raises(SystemExit) as ended:
        cli.main()
    assert ended.value.code == 2


def test_min_sites_above_the_sites_fails_before_reading_them(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    """It failed after the data were read, with 'at least 10 needed (no sites)'."""
    cache = tmp_path / "cache-ms"
    cfg = load_config(tiny_config(data={"cache_dir": str(cache)},
                                  federated={"min_sites": 10}))
    with pytest.raises(ValueError, match=r"federated.min_sites 10: the config lists \d site"):
        run(cfg, "inprocess", out_dir=tmp_path / "r")
    assert not cache.exists() and not (tmp_path / "r").exists()


def test_a_run_directory_another_process_writes_is_refused(runs: dict[str, Path],
                                                           tmp_path: Path) -> None:
    """Two `--resume`s of one run ran side by side and wrote the same files (a CLI bug hunt);
    the process writing a run directory now holds its run.lock."""
    from filelock import FileLock

    target = tmp_path / "busy"
    shutil.copytree(runs["fed"], target)
    with FileLock(target / "run.lock"):
        out = refused("train", "--resume", str(target))
    assert "another process is writing this run directory" in out
    empty = tmp_path / "only-a-lock"  # a lock file left behind is no run and no user file
    empty.mkdir()
    (empty / "run.lock").write_text("")
    train(str(runs["config"]), "--engine", "centralized", "--out", str(empty))
    assert read_manifest(empty).status == "completed"  # type: ignore[union-attr]


def test_flower_local_refuses_a_run_directory_before_starting_flower(
        runs: dict[str, Path]) -> None:
    """It started a deployment and failed about 50 s later in the ServerApp (a bug hunt)."""
    pytest.importorskip("flwr")
    start = time.perf_counter()
    out = refused("flower", "local", str(runs["config"]), "--out", str(runs["fed"]))
    assert "is already there; give another --out or --overwrite" in out  # as `mmfl train`
    assert out.startswith("error: --out ")  # the words, not the exception's class name
    assert time.perf_counter() - start < 10


def test_a_run_refused_before_writing_leaves_no_folder(tiny_config: Callable[..., Path],
                                                       tmp_path: Path) -> None:
    raw = yaml.safe_load(Path(tiny_config()).read_text())
    raw["sites"][0]["path"] = str(tmp_path / "no-such-site")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(Exception, match="no-such-site"):
        run(load_config(path), "inprocess", out_dir=tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_a_deployed_run_into_a_finished_run_is_refused_before_any_site_is_asked(
        tiny_config: Callable[..., Path], tmp_path: Path) -> None:
    """`mmfl flower run` into a folder holding a finished run: the ServerApp sent init and
    moments to every hospital (1.5 minutes) and rewrote config.yaml, then failed on the old
    checkpoint (a hospital's walk-through). Now nothing is asked and nothing written."""
    from multimodal_fl.config import load_config
    from multimodal_fl.engines.federated import run_federated_experiment
    from multimodal_fl.rundir import RunDirError

    asked: list[object] = []

    class Recorder:
        def sites(self) -> list[str]:
            asked.append("sites")
            return ["site_a"]

        def broadcast(self, requests: object, timeout: float | None = None) -> dict[str, object]:
            asked.append(requests)
            return {}

    old = tmp_path / "run"
    (old / "checkpoint").mkdir(parents=True)
    (old / "checkpoint" / "checkpoint.json").write_text("{}")
    (old / "config.yaml").write_text("old: run\n")
    cfg = load_config(tiny_config())
    with pytest.raises(RunDirError, match="another run is already there"):
        run_federated_experiment(cfg, old, federation=Recorder())  # type: ignore[arg-type]
    assert asked == [] and (old / "config.yaml").read_text() == "old: run\n"


def test_sigterm_ends_a_run_as_ctrl_c_does(tiny_config: Callable[..., Path],
                                           tmp_path: Path) -> None:
    """`kill`, `docker stop` or a scheduler's time limit left run.json 'running' for ever and
    the lock behind (a bug hunt): the run now records how it stopped and frees its folder."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "run"
    config = tiny_config(federated={"rounds": 50})
    proc = subprocess.Popen([sys.executable, "-m", "multimodal_fl", "train", str(config),
                             "--out", str(out), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while not (out / "checkpoint" / "checkpoint.json").is_file():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "no round was checkpointed in time"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output
    assert "interrupted" in output and "--resume" in output
    manifest = read_manifest(out)
    assert manifest is not None and manifest.status == "failed"
    assert "SIGTERM" in (manifest.error or "")
    assert not (out / "run.lock").exists()


def test_a_refused_resume_leaves_the_run_as_it_was(tiny_config: Callable[..., Path],
                                                  tmp_path: Path) -> None:
    """Resuming with fewer rounds than were done was accepted (the records then disagreed), and
    a resume refused on the checkpoint had already rewritten config.yaml, so that even a plain
    --resume failed afterwards (a bug hunt)."""
    out = tmp_path / "run"
    config = tiny_config(federated={"rounds": 4})
    train(str(config), "--out", str(out), "--stop-after-round", "2")
    saved = (out / "config.yaml").read_text()
    msg = refused("train", "--resume", str(out), "--set", "federated.rounds=1")
    assert "2 rounds are done already" in msg and "at least 2" in msg
    assert (out / "config.yaml").read_text() == saved
    train("--resume", str(out))
    assert read_manifest(out).status == "completed"  # type: ignore[union-attr]


def test_reporting_a_run_later_gives_its_model_card_the_reports_cells(
        runs: dict[str, Path], tmp_path: Path) -> None:
    """A run trained with --no-report (or interrupted before its end) never got the report's
    cells in its model card, and no command wrote them (a bug hunt)."""
    run = tmp_path / "fed"
    shutil.copytree(runs["fed"], run)
    assert json.loads((run / "model_card.json").read_text())["performance"]["report_sites"] is None
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert f"model card: {run / 'model_card.md'}" in result.output.replace("\n", "")
    card = json.loads((run / "model_card.json").read_text())
    assert card["performance"]["report_sites"]


def test_an_interrupt_after_the_run_completed_says_how_to_finish_it(
        runs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    import click

    from multimodal_fl.cli import _interrupted

    with pytest.raises(click.exceptions.Exit):
        _interrupted(runs["local"], True)
    err = " ".join(capsys.readouterr().err.split())
    assert "after the run in" in err and f"mmfl report {runs['local']}` writes both" in err
    assert "--resume" not in err


def test_the_model_card_of_a_dp_model_says_so(runs: dict[str, Path], tmp_path: Path) -> None:
    """A DP-trained model's card never mentioned DP (a bug hunt): it now carries metrics.json's
    privacy section, each site's epsilon included."""
    from multimodal_fl.engines.finish import write_model_card

    run = tmp_path / "fed"
    shutil.copytree(runs["fed"], run)
    cfg = load_config(run / "config.yaml", saved=True)
    manifest = read_manifest(run)
    assert manifest is not None
    _, md = write_model_card(run, cfg, manifest)
    assert "Differential privacy: none" in md.read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["privacy"] = {"dp": {
        "noise_multiplier": 1.1, "target_epsilon": None, "max_grad_norm": 1.0,
        "sites": {"site_a": {"epsilon": 2.99, "delta": 1e-5, "round": 3}},
        "covers": "one patient's records at that site"}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    card_json, md = write_model_card(run, cfg, manifest)
    assert json.loads(card_json.read_text())["privacy"]["dp"]["sites"]["site_a"]["epsilon"] == 2.99
    text = md.read_text()
    assert "## Differential privacy" in text and "noise multiplier 1.1" in text
    assert "| site_a | 2.99 | 1e-05 | 3 |" in text
    assert "| None |" not in text  # a withheld count is a dash, not Python's None


def test_the_model_card_says_why_a_sites_patients_are_withheld(runs: dict[str, Path],
                                                               tmp_path: Path) -> None:
    """A site whose total its split counts would give away shows a dash for its patients, and
    the card says what a dash means (it said nothing: a withheld total read as missing)."""
    from multimodal_fl.engines.finish import WITHHELD_COUNT, write_model_card

    run = tmp_path / "fed"
    shutil.copytree(runs["fed"], run)
    cfg = load_config(run / "config.yaml", saved=True)
    manifest = read_manifest(run)
    assert manifest is not None
    metrics = json.loads((run / "metrics.json").read_text())
    site = sorted(metrics["sites"])[0]
    metrics["sites"][site]["n_patients"] = None  # as predict_metrics withholds it
    (run / "metrics.json").write_text(json.dumps(metrics))
    card_json, md = write_model_card(run, cfg, manifest)
    assert json.loads(card_json.read_text())["performance"]["sites"][site]["n_patients"] is None
    text = md.read_text()
    performance = text.split("## Per-site performance")[1]
    row = next(line for line in performance.splitlines() if line.startswith(f"| {site} |"))
    assert row.split("|")[2].strip() == "—"
    assert WITHHELD_COUNT in text and "training count leaves with every fit" in text
