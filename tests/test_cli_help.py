"""Every command's help reads as prose: a docstring paragraph is reflowed to the terminal, not
broken where its source lines end (typer's "rich" markup mode kept those breaks: lines of two
words between full ones; its plain mode printed arguments' ``\\[required]``)."""

from __future__ import annotations

import click
import pytest
import typer
from typer.testing import CliRunner

from multimodal_fl.cli import app


def _commands() -> list[list[str]]:
    """Every command path, e.g. ["flower", "local"]."""
    root = typer.main.get_command(app)
    out: list[list[str]] = []

    def walk(cmd: click.Command, path: list[str]) -> None:
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                walk(sub, [*path, name])
        else:
            out.append(path)

    walk(root, [])
    return out


@pytest.mark.parametrize("path", _commands(), ids=" ".join)
def test_help_paragraphs_are_filled(path: list[str]) -> None:
    result = CliRunner().invoke(app, [*path, "--help"], terminal_width=80)
    assert result.exit_code == 0, result.output
    assert "\\[" not in result.output  # typer's plain mode escaped the argument's brackets
    paragraphs: list[list[str]] = [[]]
    for raw in result.output.splitlines():
        line = raw.strip()
        if line.startswith(("Arguments", "Options", "Commands", "╭")):
            break  # the description ends here
        if line:
            paragraphs[-1].append(line)
        elif paragraphs[-1]:
            paragraphs.append([])
    assert len(paragraphs) >= 2, result.output  # the usage line, then the description
    for lines in paragraphs[1:]:
        short = [line for line in lines[:-1] if len(line) < 45]
        assert not short, f"mmfl {' '.join(path)} --help breaks a paragraph early: {short}"


@pytest.mark.parametrize(("path", "shown"), [
    (["predict"], ["A completed run directory.", "The site directory to score.", "score_raw"]),
    (["site", "check"], ["The site directory."]),
    (["train"], ["Experiment YAML file."]),
])
def test_arguments_help_is_shown(path: list[str], shown: list[str]) -> None:
    """Found by a bug hunt: click 8.2+ reset typer's argument help to None, so no argument's
    help string showed (and predict's --out listed its columns without score_raw)."""
    result = CliRunner().invoke(app, [*path, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.replace("│", " ").split())
    for words in shown:
        assert words in text, f"mmfl {' '.join(path)} --help lacks {words!r}"
