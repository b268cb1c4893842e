"""``mmfl train`` shows progress on stderr, `--quiet` hides the bars only, and a run stopped
with ``--stop-after-round`` prints the command that resumes it instead of an empty table."""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from multimodal_fl import cli
from multimodal_fl.cli import app
from multimodal_fl.config import load_config

BAR = "━"  # rich's bar character


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's stderr console behaves as a terminal (bars drawn) inside CliRunner."""
    monkeypatch.setattr(cli, "err_console", Console(stderr=True, force_terminal=True, width=200))


@pytest.mark.usefixtures("terminal")
def test_stop_after_round_shows_replies_and_the_resume_command_then_quiet_resume(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    config = tiny_config()
    sites = sorted(s.name for s in load_config(config).sites)
    run_dir = tmp_path / "run"
    runner = CliRunner()
    stopped = runner.invoke(app, ["train", str(config), "--out", str(run_dir),
                                  "--stop-after-round", "1"])
    assert stopped.exit_code == 0, stopped.output
    assert BAR in stopped.stderr  # the bars (the results table uses the same line on stdout)
    assert f"{sites[0]} image read" in stopped.output
    assert f"round 1: {len(sites)}/{len(sites)} sites replied" in stopped.output
    resume = shlex.join(["mmfl", "train", "--resume", str(run_dir)])
    assert f"stopped after round 1; resume with: {resume}" in stopped.output
    assert "test AUC" not in stopped.output  # no empty results table
    assert "Traceback" not in stopped.output

    args = shlex.split(resume)[1:]
    resumed = runner.invoke(app, [*args, "--quiet"])
    assert resumed.exit_code == 0, resumed.output
    assert BAR not in resumed.stderr and "sites replied" not in resumed.output
    assert "test AUC per site" in resumed.output
    for site in sites:
        assert site in resumed.output
    assert "stopped after" not in resumed.output


def test_progress_lines_in_a_log(tiny_config: Callable[..., Path], tmp_path: Path) -> None:
    """Off a terminal (CliRunner's default): plain lines, no bars, and the results table."""
    config = tiny_config(federated={"rounds": 1})
    sites = sorted(s.name for s in load_config(config).sites)
    n = len(sites)
    result = CliRunner().invoke(app, ["train", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert BAR not in result.stderr
    for site in sites:
        assert re.search(rf"^{site} text embedded: \d+ patients$", result.output, re.M)
    assert f"round 1: 1/{n} sites replied, ETA ~" in result.output
    assert f"round 1: {n}/{n} sites replied" in result.output
    assert f"predict: {n}/{n} sites replied" in result.output
    assert "test AUC per site" in result.output


def test_the_summary_row_names_how_the_pooled_figures_were_pooled(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    """A centralized run pools its histograms in process: its row does not claim a secure sum."""
    config = tiny_config(federated={"rounds": 1})
    result = CliRunner().invoke(app, ["train", str(config), "--engine", "centralized",
                                      "--out", str(tmp_path / "run"), "--quiet", "--no-report"])
    assert result.exit_code == 0, result.output
    assert "test AUC per site" in result.output
    assert "secure sum" not in result.output
    assert re.search(r"pooled \((\d+ sites?, )?in process\)", result.output)
