"""The fenced blocks of the documentation and how ``tests/test_docs.py`` checks each one.

Every fenced block in ``docs/*.md`` and ``README.md`` names its language (```` ```text ````
for output, trees and diagrams). A shell block (``bash``, ``sh``, ``shell``, ``console``)
carries a marker on the line above it, one of::

    <!-- docs-test: run -->
    <!-- docs-test: parse (another machine) -->
    <!-- docs-test: skip (more than 60 s) -->

``run``: its ``mmfl`` commands run on the tiny generated cohort, with the shipped configs
replaced by tiny ones and rounds and steps capped. ``parse``: its ``mmfl`` commands are
checked by the command line's own parser (every option and argument, nothing run), its
``pytest`` commands' paths and markers must exist, and any other program must be installed.
``skip``: not checked at all. ``parse`` and ``skip`` need a reason from :data:`REASONS`.
A ``python`` block always runs (no marker); the blocks of one page share a namespace.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from markdown_it import MarkdownIt

REPO = Path(__file__).resolve().parents[1]
SHELL = frozenset({"bash", "sh", "shell", "console"})
MODES = ("run", "parse", "skip")
#: Why a shell block is parsed or skipped instead of run: the only accepted reasons.
REASONS = frozenset({"another machine", "network", "more than 60 s"})
MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<mode>[a-z-]+)\s*(?:\((?P<reason>[^)]*)\))?"
                    r"\s*-->\s*$")
MARKER_LIKE = re.compile(r"docs-test", re.I)
OPERATORS = frozenset({"&&", "||", ";", "|", "&"})
HEREDOC = re.compile(r"<<-?\s*['\"]?(?P<tag>\w+)['\"]?")


@dataclass(frozen=True)
class Block:
    """One fenced block: where it is, its language, its text and its marker."""

    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    mode: str | None = None
    reason: str | None = None

    @property
    def where(self) -> str:
        """``page.md:line`` for messages."""
        return f"{relative(self.page)}:{self.line}"


def relative(page: Path) -> str:
    """A page's path from the repository root (its name when outside the repository)."""
    return str(page.relative_to(REPO)) if page.is_relative_to(REPO) else page.name


def pages() -> list[Path]:
    """The documentation pages: ``docs/*.md`` and ``README.md``."""
    return [*sorted((REPO / "docs").glob("*.md")), REPO / "README.md"]


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of one page, in order, with the marker above each (if any)."""
    text = page.read_text(encoding="utf-8")
    lines = text.splitlines()
    out = []
    for token in MarkdownIt("commonmark").parse(text):
        if token.type != "fence" or token.map is None:
            continue
        start = token.map[0]
        above = next((lines[i] for i in range(start - 1, -1, -1) if lines[i].strip()), "")
        match = MARKER.match(above)
        lang = token.info.split()[0] if token.info.strip() else ""
        out.append(Block(page, start + 1, lang, token.content,
                         match["mode"] if match else None,
                         (match["reason"] or "").strip() or None if match else None))
    return out


def all_blocks() -> list[Block]:
    """Every fenced block of every page."""
    return [b for page in pages() for b in blocks(page)]


def problems(block: Block) -> list[str]:
    """Why a block is not classified as the module docstring says (empty: it is)."""
    if not block.lang:
        return [f"{block.where}: a fenced block without a language; use ```bash (commands), "
                "```python, or ```text (output, trees, diagrams)"]
    if block.lang not in SHELL:
        if block.mode is not None:
            return [f"{block.where}: a docs-test marker above a ```{block.lang} block; markers "
                    f"classify shell blocks ({', '.join(sorted(SHELL))}); python blocks always run"]
        return []
    if block.mode is None:
        return [f"{block.where}: a shell block without a class; put <!-- docs-test: run -->, "
                "<!-- docs-test: parse (REASON) --> or <!-- docs-test: skip (REASON) --> on the "
                f"line above it (REASON: {', '.join(sorted(REASONS))})"]
    if block.mode not in MODES:
        return [f"{block.where}: docs-test mode {block.mode!r}; expected one of {MODES}"]
    if block.mode == "run" and block.reason:
        return [f"{block.where}: a run block takes no reason ({block.reason!r})"]
    if block.mode != "run" and block.reason not in REASONS:
        return [f"{block.where}: docs-test: {block.mode} ({block.reason}): the reason must be "
                f"one of {sorted(REASONS)}"]
    try:
        cmds = commands(block)
    except ValueError as exc:
        return [f"{block.where}: {exc}"]
    if block.mode == "run":
        return [f"{block.where}: a run block runs only mmfl commands, not {c[0]!r}; mark it "
                "parse or skip with a reason" for c in cmds if program(c) != "mmfl"]
    if block.mode == "parse" and not any(program(c) in ("mmfl", "pytest") for c in cmds):
        return [f"{block.where}: a parse block without an mmfl or pytest command: mark it skip"]
    return []


def stray_markers(page: Path) -> list[str]:
    """Lines that mention ``docs-test`` but are not a marker directly above a shell block."""
    used = {b.line for b in blocks(page) if b.mode is not None}
    lines = page.read_text(encoding="utf-8").splitlines()
    out = []
    for i, line in enumerate(lines):
        if not MARKER_LIKE.search(line) or line.lstrip().startswith("`"):
            continue
        nxt = next((j for j in range(i + 1, len(lines)) if lines[j].strip()), None)
        if not MARKER.match(line) or nxt is None or nxt + 1 not in used:
            out.append(f"{relative(page)}:{i + 1}: a docs-test marker must be "
                       f"<!-- docs-test: MODE (REASON) --> right above a shell block: {line!r}")
    return out


def _logical_lines(block: Block) -> list[str]:
    """The block's command lines: ``$ `` prompts for console blocks, heredoc bodies dropped,
    backslash continuations joined."""
    raw = block.code.splitlines()
    if block.lang == "console":
        picked, cont = [], False
        for line in raw:
            if line.startswith("$ ") or cont:
                picked.append(line[2:] if line.startswith("$ ") else line)
                cont = line.rstrip().endswith("\\")
        raw = picked
    out: list[str] = []
    heredoc: str | None = None
    pending = ""
    for line in raw:
        if heredoc is not None:
            heredoc = None if line.strip() == heredoc else heredoc
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = pending + line
        pending = ""
        if full.strip():
            out.append(full)
            match = HEREDOC.search(full)
            heredoc = match["tag"] if match else None
    return out


def commands(block: Block) -> list[list[str]]:
    """The block's commands as argument lists (comments dropped, split at ``&&``, ``|``, ...).

    Raises
    ------
    ValueError
        If a line cannot be split as a shell command (an unclosed quote), named.
    """
    out = []
    for line in _logical_lines(block):
        try:
            tokens = shlex.split(HEREDOC.sub("", line), comments=True)
        except ValueError as exc:
            raise ValueError(f"cannot split {line!r} as a shell command ({exc})") from None
        current: list[str] = []
        for tok in [*tokens, ";"]:
            if tok in OPERATORS:
                if current:
                    out.append(current)
                current = []
            else:
                current.append(tok)
    return out


def strip_env(cmd: list[str]) -> tuple[dict[str, str], list[str]]:
    """Split leading ``NAME=value`` assignments off a command."""
    env: dict[str, str] = {}
    i = 0
    while i < len(cmd) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", cmd[i]):
        key, _, value = cmd[i].partition("=")
        env[key] = value
        i += 1
    return env, cmd[i:]


def program(cmd: list[str]) -> str:
    """The program a command runs: ``mmfl`` (also ``.venv/bin/mmfl``, ``python -m
    multimodal_fl``), ``pytest`` (also ``python -m pytest``), else the executable's name."""
    _, args = strip_env(cmd)
    if not args:
        return ""
    name = Path(args[0]).name
    if name.startswith("python") and args[1:3] in (["-m", "multimodal_fl"], ["-m", "pytest"]):
        return "mmfl" if args[2] == "multimodal_fl" else "pytest"
    return name


def arguments(cmd: list[str]) -> list[str]:
    """The arguments after the program (see :func:`program`)."""
    _, args = strip_env(cmd)
    skip = 3 if Path(args[0]).name.startswith("python") and args[1:2] == ["-m"] else 1
    return args[skip:]
