"""End-to-end tests of the federated engine on the tiny generated cohort."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from multimodal_fl.cli import app
from multimodal_fl.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def model_bytes(run_dir: Path) -> bytes:
    return (run_dir / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, tiny_sample: Path, tiny_bert: Path,
                  ) -> tuple[Path, Path]:
    """One uninterrupted 3-round run (the reference every interrupted run must equal)."""
    from tests.conftest import write_tiny_config

    root = tmp_path_factory.mktemp("engine")
    config = write_tiny_config(root, tiny_sample, tiny_bert, "covid_oxygen",
                               federated={"rounds": 3})
    result = CliRunner().invoke(app, ["train", str(config), "--out", str(root / "full"),
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    return config, root / "full"


def test_federated_run_writes_the_run_directory(uninterrupted: tuple[Path, Path]) -> None:
    config, run = uninterrupted
    cfg = load_config(config)
    for name in ("config.yaml", "metrics.json", "model.safetensors"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["engine"] == "inprocess" and metrics["completed_rounds"] == 3
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3]
    assert 1 <= metrics["selected_round"] <= 3
    assert set(metrics["sites"]) == {s.name for s in cfg.sites}
    server_text = (run / "metrics.json").read_text()
    for site in cfg.sites:
        folder = run / "sites" / site.name
        pred = pd.read_csv(folder / "predictions.csv")
        assert {"patient_id", "split", "label", "score", "sex", "age_band"} <= set(pred.columns)
        assert pred["score"].between(0, 1).all()
        splits = json.loads((folder / "splits.json").read_text())["splits"]
        assert set(pred["patient_id"].astype(str)) == set(splits)
        # no patient id reaches the server-side documents
        assert not any(f'"{pid}"' in server_text for pid in splits)
    assert metrics["standardisation"]["sites"] == sorted(s.name for s in cfg.sites)


def test_best_validation_round_is_selected(uninterrupted: tuple[Path, Path]) -> None:
    from safetensors.numpy import load_file

    from multimodal_fl.engines.federated import validation_score
    from multimodal_fl.federated.server import RoundRecord

    _, run = uninterrupted
    metrics = json.loads((run / "metrics.json").read_text())
    scores = {
        r["round"]: validation_score(RoundRecord(round=r["round"], eval_metrics=r["eval_metrics"]))
        for r in metrics["rounds"]
    }
    defined = {k: v for k, v in scores.items() if v is not None}
    assert defined, "no round had a validation AUC"
    best = max(defined, key=lambda k: (defined[k], -k))
    assert metrics["selected_round"] == best
    kept = load_file(str(run / "checkpoint" / "best.safetensors"))
    final = load_file(str(run / "model.safetensors"))
    assert kept.keys() == final.keys()
    assert all((kept[k] == final[k]).all() and kept[k].shape == final[k].shape for k in kept)


def test_stop_after_round_then_resume_equals_uninterrupted(
    uninterrupted: tuple[Path, Path], tmp_path: Path
) -> None:
    config, full = uninterrupted
    runner = CliRunner()
    staged = tmp_path / "staged"
    r2 = runner.invoke(
        app, ["train", str(config), "--out", str(staged), "--stop-after-round", "1", "--quiet"]
    )
    assert r2.exit_code == 0, r2.output
    assert json.loads((staged / "metrics.json").read_text())["stopped_after_round"] == 1
    r3 = runner.invoke(app, ["train", "--resume", str(staged), "--quiet"])
    assert r3.exit_code == 0, r3.output
    assert model_bytes(full) == model_bytes(staged)


def test_sigkill_mid_round_then_resume_equals_uninterrupted(
    uninterrupted: tuple[Path, Path], tmp_path: Path
) -> None:
    """A separate process, killed mid-round and resumed, ends with the same bytes."""
    config, full = uninterrupted
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "multimodal_fl", "train", str(config), "--quiet"]
    proc = subprocess.Popen([*cmd, "--out", str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = killed / "checkpoint" / "round_00001.safetensors"
    deadline = time.monotonic() + 240
    try:
        while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert first.exists(), "round 1 checkpoint never appeared"
        # round 2 starts as soon as round 1's checkpoint is written: kill now, mid-round
        if proc.poll() is not None:
            pytest.skip("the run finished before it could be killed mid-round")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert not (killed / "model.safetensors").exists()
    resumed = subprocess.run([*cmd[:3], "train", "--resume", str(killed), "--quiet"],
                             env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert model_bytes(full) == model_bytes(killed)


def test_run_config_from_the_typed_experiment_config(tiny_config: Callable[..., Path]) -> None:
    from multimodal_fl.config import FederatedConfig
    from multimodal_fl.engines.federated import ENGINE_FIELDS, LOOP_FIELDS, run_config

    cfg = load_config(tiny_config(federated={"algorithm": "fedprox", "mu": 0.3, "local_steps": 7,
                                             "timeout_s": 9.0}, seed=5))
    config = run_config(cfg)
    assert config.optimizer.name == "fedprox" and config.proximal_mu == 0.3
    assert config.fit_config == {"local_steps": 7, "lr": cfg.training.lr}
    assert config.timeout == 9.0 and config.seed == 5
    assert config.min_sites == cfg.federated.min_sites and config.rounds == cfg.federated.rounds
    adam = run_config(cfg.model_copy(update={"federated": cfg.federated.model_copy(
        update={"algorithm": "fedadam", "server_lr": 0.1})}))
    assert adam.proximal_mu == 0.0 and adam.optimizer.eta == 0.1
    # a new federated field must be mapped onto the loop or named as the engine's own
    assert set(FederatedConfig.model_fields) == LOOP_FIELDS | ENGINE_FIELDS
