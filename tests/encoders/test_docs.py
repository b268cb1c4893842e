"""Run every ```python block of docs/encoders.md, in order, in one namespace, offline."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "encoders.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_doc_has_examples() -> None:
    assert len(_blocks()) >= 6


def test_docs_examples_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MMFL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    for i, code in enumerate(_blocks()):
        namespace: dict[str, object] = {"__name__": f"encoders_md_block_{i}"}
        exec(compile(code, f"{DOC.name}[block {i}]", "exec"), namespace)
    printed = capsys.readouterr().out
    # the printed shapes agree with the comments in the document
    assert "torch.Size([4, 64])" in printed and "torch.Size([2, 32])" in printed
    assert "[True, True, False]" in printed
    assert "head.1.weight: (8, 128) != (16, 128)" in printed
    assert not list(Path(os.getcwd()).glob("sample_data"))
