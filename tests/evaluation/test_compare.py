"""Which runs one report may compare: refused with the differing keys, or labelled by them."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from multimodal_fl.cli import app
from multimodal_fl.evaluation.report import IncomparableRuns, build_report
from multimodal_fl.rundir import RunManifest

from .conftest import write_run_dir


def make_run(root: Path, engine: str, *, seed: int = 0, fingerprint: str = "sha256:aa",
             status: str = "completed", **config: dict[str, Any]) -> Path:
    """A hand-made run directory with a manifest; ``config`` updates config.yaml sections."""
    run = write_run_dir(root, engine, seed=seed)
    doc = yaml.safe_load((run / "config.yaml").read_text())
    doc["task"] = {"name": "covid_oxygen_24h", "label": {"window_hours": 24}}
    doc["training"] = {"split": {"train": 0.6, "val": 0.2, "test": 0.2}}
    for section, values in config.items():
        doc.setdefault(section, {}).update(values)
    (run / "config.yaml").write_text(yaml.safe_dump(doc))
    manifest = RunManifest(engine=engine, config_name="cfg", config_digest="sha256:x",
                           task="covid_oxygen_24h", seed=seed,
                           data={s: {"fingerprint": fingerprint} for s in "abc"})
    manifest.finish(status)
    manifest.write(run)
    return run


def refusal(runs: list[Path]) -> str:
    with pytest.raises(IncomparableRuns) as info:
        build_report(runs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_runs_of_different_seeds_are_refused_naming_the_key(tmp_path: Path) -> None:
    a = make_run(tmp_path / "a", "inprocess", seed=0)
    b = make_run(tmp_path / "b", "local", seed=1)
    message = refusal([a, b])
    assert f"{a} and {b} cannot be compared, they differ in seed (0 vs 1)" in message


def test_runs_of_different_tasks_data_or_evaluation_are_refused(tmp_path: Path) -> None:
    a = make_run(tmp_path / "a", "inprocess")
    other_task = make_run(tmp_path / "t", "local", task={"label": {"window_hours": 72}})
    assert "task.label.window_hours (24 vs 72)" in refusal([a, other_task])
    other_data = make_run(tmp_path / "d", "local", fingerprint="sha256:bb")
    message = refusal([a, other_data])
    assert "fingerprint.a (sha256:aa vs sha256:bb)" in message and "fingerprint.c" in message
    other_eval = make_run(tmp_path / "e", "local", evaluation={"min_cell": 5})
    assert "evaluation.min_cell (10 vs 5)" in refusal([a, other_eval])
    other_split = make_run(tmp_path / "s", "local",
                           training={"split": {"train": 0.5, "val": 0.25, "test": 0.25}})
    assert "training.split.test (0.2 vs 0.25)" in refusal([a, other_split])


def test_the_same_run_twice_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = make_run(tmp_path / "a", "inprocess")
    assert "are the same run" in refusal([a, a])
    copy = tmp_path / "copy"
    shutil.copytree(a, copy)  # a copy keeps the run id
    assert f"{a} and {copy} are the same run" in refusal([a, copy])
    bare = write_run_dir(tmp_path / "bare", "local")  # no run.json: its folder identifies it
    monkeypatch.chdir(tmp_path)
    assert "are the same run" in refusal([bare, Path("bare/cfg-local")])


def test_an_unfinished_run_is_refused(tmp_path: Path) -> None:
    a = make_run(tmp_path / "a", "inprocess", status="stopped")
    assert "the run is stopped" in refusal([a])


def test_the_cli_refuses_in_one_line(tmp_path: Path) -> None:
    a = make_run(tmp_path / "a", "inprocess", seed=0)
    b = make_run(tmp_path / "b", "local", seed=3)
    result = CliRunner().invoke(app, ["report", str(a), str(b)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "differ in seed (0 vs 3)" in " ".join(result.output.split())
    assert not (a / "report").exists()


def test_fedavg_and_fedprox_are_compared_and_labelled_by_the_key(tmp_path: Path) -> None:
    fedavg = make_run(tmp_path / "avg", "inprocess",
                      federated={"algorithm": "fedavg", "rounds": 20})
    fedprox = make_run(tmp_path / "prox", "inprocess",
                       federated={"algorithm": "fedprox", "rounds": 30})
    local = make_run(tmp_path / "loc", "local")
    doc, _, _ = build_report([fedavg, fedprox, local])
    labels = [r["label"] for r in doc["runs"]]
    assert labels == ["federated (in-process) (algorithm=fedavg, rounds=20)",
                      "federated (in-process) (algorithm=fedprox, rounds=30)", "local-only"]
    assert set(doc["change_from_local"]) == set(labels[:2])
    assert {c["model"] for c in doc["cross_site"]["cells"]} >= set(labels[:2])


def test_runs_without_config_differences_are_told_apart_by_folder(tmp_path: Path) -> None:
    one = make_run(tmp_path / "one", "inprocess")
    two = make_run(tmp_path / "two", "inprocess")
    doc, _, _ = build_report([one, two])
    assert [r["label"] for r in doc["runs"]] == ["federated (in-process) (cfg-inprocess) #1",
                                                "federated (in-process) (cfg-inprocess) #2"]
