"""`mmfl flower run`: how a deployed run ended is asked of the SuperLink, not guessed from the
files this machine sees (a hospital's walk-through: a second run into the same --out printed the
first run's table and exited 0; a run that completed on another machine exited 2)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("flwr")

from typer.testing import CliRunner

from multimodal_fl.cli import app
from multimodal_fl.federated import flower as flower_module
from multimodal_fl.federated.flower.deploy import run_status, submit_run


@pytest.fixture
def connection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    home = tmp_path / "flwr_home"
    home.mkdir()
    (home / "config.toml").write_text('[superlink]\ndefault = "hospitals"\n'
                                      '[superlink.hospitals]\naddress = "127.0.0.1:1"\n'
                                      'insecure = true\n')
    monkeypatch.setenv("FLWR_HOME", str(home))
    return "hospitals"


def _fake(monkeypatch: pytest.MonkeyPatch, status: tuple[str, str] | None) -> list[str]:
    calls: list[str] = []

    def submit(command: list[str], env: Any = None) -> tuple[int, int | None]:
        calls.append("submit")
        return 0, 42

    monkeypatch.setattr(flower_module, "submit_run", submit)
    monkeypatch.setattr(flower_module, "run_status", lambda run_id, connection=None: status)
    return calls


def _run(cfg: Path, out: Path, connection: str) -> Any:
    return CliRunner().invoke(app, ["flower", "run", str(cfg), "--connection", connection,
                                    "--out", str(out)])


def test_a_failed_run_fails_with_its_log_command(
        tiny_config: Callable[..., Path], tmp_path: Path, connection: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    _fake(monkeypatch, ("finished:failed", "ServerApp raised"))
    res = _run(tiny_config(), tmp_path / "run", connection)
    assert res.exit_code == 2
    assert "Flower run 42 ended finished:failed (ServerApp raised)" in res.output
    assert "flwr log 42 hospitals" in res.output


def test_a_stale_result_is_not_read_and_a_remote_run_that_completed_exits_0(
        tiny_config: Callable[..., Path], tmp_path: Path, connection: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    stale = out / "flower" / "result.json"
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"completed_rounds": 2, "history": []}))
    _fake(monkeypatch, ("finished:completed", ""))
    res = _run(tiny_config(), out, connection)
    assert res.exit_code == 0, res.output
    assert "Flower run 42 completed" in res.output and "SuperLink's machine" in res.output
    assert not stale.exists()


def test_a_finished_run_in_out_is_refused_before_submitting(
        tiny_config: Callable[..., Path], tmp_path: Path, connection: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("task: x\n")
    (out / "metrics.json").write_text("{}")
    calls = _fake(monkeypatch, ("finished:completed", ""))
    res = _run(tiny_config(), out, connection)
    assert res.exit_code == 2 and "is already there; give another --out" in res.output
    assert "--overwrite" not in res.output and calls == []


def test_submit_run_echoes_and_finds_the_run_id(capsys: pytest.CaptureFixture[str]) -> None:
    code, run_id = submit_run([sys.executable, "-c",
                               "print('Loading project'); print('Successfully started run 1234');"
                               "print('INFO round 1')"])
    assert (code, run_id) == (0, 1234)
    assert "INFO round 1" in capsys.readouterr().out
    assert submit_run([sys.executable, "-c", "import sys; sys.exit(3)"]) == (3, None)


def test_run_status_reads_flwr_ls_json(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from multimodal_fl.federated.flower import deploy

    fake = tmp_path / "flwr"
    fake.write_text("#!/bin/sh\necho '" + json.dumps({"success": True, "runs": [
        {"run-id": "7", "status": "finished:failed", "status-details": "boom"}]}) + "'\n")
    fake.chmod(0o755)
    monkeypatch.setattr(deploy, "flower_exe", lambda name: str(fake))
    assert run_status(7, "hospitals") == ("finished:failed", "boom")
    assert run_status(8, "hospitals") is None
    fake.write_text("#!/bin/sh\necho 'not json'\n")
    assert run_status(7) is None
