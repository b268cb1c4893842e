"""The examples of docs/fairness.md run as written and print what the page says they print.

A fenced block right after ``<!-- test: run -->`` is run (all such blocks in order, in one
namespace, in a fresh working directory); a block after ``<!-- test: output -->`` must equal
what the blocks run since the previous output block printed.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "fairness.md"
BLOCK = re.compile(r"<!-- test: (run|output) -->\n```[a-z]*\n(.*?)```", re.S)


def marked_blocks(text: str) -> list[tuple[str, str]]:
    """``(kind, code)`` of every marked block, in page order."""
    return BLOCK.findall(text)


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.strip("\n").splitlines()]


def test_the_page_marks_its_examples() -> None:
    kinds = [k for k, _ in marked_blocks(DOC.read_text())]
    assert kinds.count("run") >= 2 and kinds.count("output") >= 2
    assert kinds[0] == "run"


def test_fairness_examples_run_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "docs_example"}
    printed = io.StringIO()
    for i, (kind, code) in enumerate(marked_blocks(DOC.read_text())):
        if kind == "run":
            with contextlib.redirect_stdout(printed):
                exec(compile(code, f"{DOC.name}:block{i}", "exec"), namespace)
        else:
            assert _lines(printed.getvalue()) == _lines(code), f"block {i} of {DOC.name}"
            printed = io.StringIO()
    # the report example wrote a whole report from the DataFrame
    doc = json.loads((tmp_path / "my-report" / "report.json").read_text())
    assert [r["label"] for r in doc["runs"]] == ["predictions (DataFrame)"]
    assert doc["runs"][0]["threshold_source"] == "given (0.5)"
    assert (tmp_path / "my-report" / "report.html").stat().st_size > 10_000
