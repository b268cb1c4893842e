"""The documentation cannot drift: every fenced block of ``docs/*.md`` and ``README.md`` is checked.

Shell blocks are classified by a marker (``tests/docblocks.py`` says how): ``run`` blocks run
their ``mmfl`` commands on the tiny generated cohort, ``parse`` blocks have their commands
checked by the command line's parser, ``skip`` blocks give a reason; a shell block without a
class fails. Every ``python`` block runs, the blocks of a page in one namespace, in a
temporary folder, offline, with the same substitutions: ``configs/covid_oxygen.yaml`` and
``configs/alzheimers.yaml`` become tiny configs (``tests/conftest.write_tiny_config``),
``sample_data/...`` the tiny cohort, absolute paths folders of the sandbox, and ``--set``
values of :data:`CAPS` are capped. ``mkdocs build --strict`` (``make docs``) checks links.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from multimodal_fl.cli import app as mmfl_app
from tests import docblocks as d
from tests.conftest import write_tiny_config

#: A block slower than this on the tiny cohort is reported (a warning in the test summary).
SLOW_BLOCK_S = 60
#: ``--set`` keys capped in run blocks, and their largest value.
CAPS = {"federated.rounds": 2, "federated.local_steps": 3, "training.steps": 6}
#: Placeholders in run blocks for the run directories of the page's earlier ``mmfl train``.
RUN_PLACEHOLDERS = {"runs/<fed>": "inprocess", "runs/<local>": "local",
                    "runs/<central>": "centralized"}
#: A run directory a page may name as already made (``make demo``'s): trained on first use.
DEMO_RUN = re.compile(r"runs/demo/(covid_oxygen|alzheimers)-inprocess")
#: Builtins and shell utilities a parse block may use besides installed programs.
SHELL_WORDS = frozenset({"export", "cd", ".", "source", "wait", "kill", "set", "trap", "exit"})
#: What the pages' python blocks print (checked after the page ran).
EXPECTED_OUTPUT = {
    "encoders.md": ["torch.Size([4, 64])", "torch.Size([2, 32])", "[True, True, False]",
                    "head.1.weight: (8, 128) != (16, 128)"],
}
#: What a page's blocks must not leave in their working folder (the cache refuses sample_data).
MUST_NOT_EXIST = {"encoders.md": ["sample_data"]}
PYTEST_VALUE_OPTIONS = frozenset({"-m", "-k", "-p", "--timeout", "--durations", "-c"})


def parse_mmfl(args: list[str]) -> click.Context:
    """Parse ``mmfl ARGS`` with the real command line (sub-commands, options, types); run nothing.

    Raises
    ------
    click.ClickException
        A usage error naming what is wrong.
    """
    command, name, rest = typer.main.get_command(mmfl_app), "mmfl", list(args)
    ctx: click.Context | None = None
    while isinstance(command, click.Group):
        ctx = click.Context(command, info_name=name, parent=ctx)
        if not rest or rest[0].startswith("-"):
            raise click.UsageError(f"'{name}' needs a command", ctx)
        sub = command.get_command(ctx, rest[0])
        if sub is None:
            raise click.UsageError(f"no command '{rest[0]}' in '{name}'", ctx)
        command, name, rest = sub, rest[0], rest[1:]
    return command.make_context(name, rest, parent=ctx, resilient_parsing=False)


def registered_markers() -> set[str]:
    """The pytest markers pyproject.toml registers."""
    import tomllib

    config = tomllib.loads((d.REPO / "pyproject.toml").read_text())
    return {m.split(":")[0].strip() for m in config["tool"]["pytest"]["ini_options"]["markers"]}


def parse_pytest(args: list[str]) -> list[str]:
    """Problems with a pytest command's arguments: test paths that do not exist, unknown markers."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg in PYTEST_VALUE_OPTIONS:
            if arg == "-m":
                words = set(re.findall(r"[A-Za-z_]\w*", args[i + 1])) - {"and", "or", "not"}
                out += [f"pytest -m: marker {w!r} is not registered in pyproject.toml"
                        for w in sorted(words - registered_markers())]
            i += 2
            continue
        if not arg.startswith("-") and not (d.REPO / arg.split("::")[0]).exists():
            out.append(f"pytest: {arg} does not exist")
        i += 1
    return out


def parse_problems(block: d.Block) -> list[str]:
    """Check a parse block: mmfl commands parsed, pytest commands' paths and markers exist,
    other programs installed."""
    out = []
    bin_dir = str(Path(sys.executable).parent)
    for cmd in d.commands(block):
        prog, args = d.program(cmd), d.arguments(cmd)
        if prog == "mmfl":
            try:
                parse_mmfl(args)
            except click.ClickException as exc:
                out.append(f"{block.where}: mmfl {' '.join(args)}: {exc.format_message()}")
        elif prog == "pytest":
            out += [f"{block.where}: {p}" for p in parse_pytest(args)]
        elif prog not in SHELL_WORDS and not shutil.which(
                prog, path=os.pathsep.join([bin_dir, os.environ.get("PATH", "")])):
            out.append(f"{block.where}: {prog!r} is not installed (PATH and {bin_dir})")
    return out


# --------------------------------------------------------------------------- classification


def test_every_block_is_classified() -> None:
    """No untagged fence, no unclassified shell block, no unknown reason, no stray marker."""
    found = [p for b in d.all_blocks() for p in d.problems(b)]
    found += [p for page in d.pages() for p in d.stray_markers(page)]
    assert not found, "\n".join(found)


def test_the_docs_have_blocks_of_every_class() -> None:
    modes = {b.mode for b in d.all_blocks() if b.lang in d.SHELL}
    assert modes == {"run", "parse", "skip"}
    assert sum(b.lang == "python" for b in d.all_blocks()) >= 15


def _write(tmp_path: Path, text: str) -> Path:
    page = tmp_path / "page.md"
    page.write_text(text)
    return page


def test_classification_rejects_what_it_should(tmp_path: Path) -> None:
    """The checker could fail: an unmarked block, an unknown reason, a bare fence, a stray
    marker, a run block with another program."""
    page = _write(tmp_path, "\n".join([
        "```bash", "mmfl config schema", "```", "",
        "<!-- docs-test: skip (too boring) -->", "```bash", "make demo", "```", "",
        "```", "plain", "```", "",
        "<!-- docs-test: run -->", "```bash", "make demo", "```", "",
        "<!-- docs-test: skip (network) -->", "", "Some text.", "",
        "<!-- docs-test: parse (network) -->", "```python", "print(1)", "```", ""]))
    found = [p for b in d.blocks(page) for p in d.problems(b)]
    assert [re.sub(r"^.*?:\d+: ", "", p)[:30] for p in found] == [
        "a shell block without a class;", "docs-test: skip (too boring): ",
        "a fenced block without a langu", "a run block runs only mmfl com",
        "a docs-test marker above a ```"]
    assert len(d.stray_markers(page)) == 1


def test_commands_are_split_like_a_shell(tmp_path: Path) -> None:
    page = _write(tmp_path, "\n".join([
        "```console", "$ mmfl train a.yaml \\", "    --set x=1   # trailing comment",
        "output line", "$ FOO=1 .venv/bin/python -m multimodal_fl report r && echo ok", "```",
        "```bash", "cat > f <<'EOF'", "mmfl not a command", "EOF", "mmfl config schema &", "```"]))
    console, bash = d.blocks(page)
    assert d.commands(console) == [["mmfl", "train", "a.yaml", "--set", "x=1"],
                                   ["FOO=1", ".venv/bin/python", "-m", "multimodal_fl",
                                    "report", "r"], ["echo", "ok"]]
    assert [d.program(c) for c in d.commands(console)] == ["mmfl", "mmfl", "echo"]
    assert d.arguments(d.commands(console)[1]) == ["report", "r"]
    assert d.commands(bash) == [["cat", ">", "f"], ["mmfl", "config", "schema"]]


def test_parse_checks_the_real_arguments() -> None:
    """``--help`` would pass anything; parsing the real arguments catches a wrong option,
    a missing argument, an unknown command and a bad value."""
    assert parse_mmfl(["train", "c.yaml", "--engine", "local", "--set", "a=b"]).params[
        "engine"] == "local"
    for bad in (["train", "c.yaml", "--engin", "local"], ["pca", "c.yaml"],
                ["trian", "c.yaml"], ["flower", "supernode", "s", "--port", "x"]):
        with pytest.raises(click.UsageError):
            parse_mmfl(bad)
    assert parse_pytest(["-m", "flower and not slow", "tests/test_docs.py"]) == []
    assert parse_pytest(["-m", "flowr", "tests/nope.py::t"]) == [
        "pytest -m: marker 'flowr' is not registered in pyproject.toml",
        "pytest: tests/nope.py::t does not exist"]


PARSE_BLOCKS = [b for b in d.all_blocks() if b.lang in d.SHELL and b.mode == "parse"]


@pytest.mark.parametrize("block", PARSE_BLOCKS, ids=[b.where for b in PARSE_BLOCKS])
def test_parse_block(block: d.Block) -> None:
    """The commands of a block that needs another machine, the network or minutes parse."""
    found = parse_problems(block)
    assert not found, "\n".join(found)


def test_readme_links_resolve() -> None:
    """README.md is read on GitHub, outside the site: its relative links must point at files."""
    text = (d.REPO / "README.md").read_text()
    targets = re.findall(r"\]\((?!https?://|#)([^)#\s]+)", text)
    assert targets and not [t for t in targets if not (d.REPO / t).exists()]


# --------------------------------------------------------------------------- running


@dataclass
class Sandbox:
    """Where a page's blocks run and what their paths become."""

    cwd: Path
    tiny: Path
    configs: dict[str, Path]
    demo_runs: dict[str, Path]
    runs: dict[str, Path] = field(default_factory=dict)
    timings: list[tuple[str, float]] = field(default_factory=list)

    def path(self, arg: str) -> str:
        """One command-line argument with the sandbox's paths."""
        for placeholder, engine in RUN_PLACEHOLDERS.items():
            if placeholder in arg:
                assert engine in self.runs, f"{placeholder}: no earlier `mmfl train` ({engine})"
                arg = arg.replace(placeholder, str(self.runs[engine]))
        if arg.startswith("/") and not arg.startswith(str(self.cwd)):
            arg = str(self.cwd / arg.lstrip("/"))
        return self.text(arg)

    def text(self, text: str) -> str:
        """Substitute configs, sample data and the demo's run directories in a text."""
        for name, path in self.configs.items():
            text = text.replace(name, str(path))
        text = re.sub(r"(?<![\w/.-])sample_data/", str(self.tiny) + "/", text)
        return DEMO_RUN.sub(lambda m: str(self.demo_run(m[1])), text)

    def demo_run(self, task: str) -> Path:
        """A federated run of ``task``'s tiny config, made on first use (stands for make demo's)."""
        if task not in self.demo_runs:
            from multimodal_fl.config import load_config
            from multimodal_fl.engines import run

            out = self.cwd.parent / f"demo-{task}-inprocess"
            run(load_config(self.configs[f"configs/{task}.yaml"]), "inprocess", out_dir=out)
            self.demo_runs[task] = out
        return self.demo_runs[task]

    def mmfl_args(self, args: list[str]) -> list[str]:
        """The arguments of a run-block command with paths substituted and values capped."""
        out = [self.path(a) for a in args]
        for i, arg in enumerate(out[:-1]):
            key, _, value = out[i + 1].partition("=")
            if arg == "--set" and key in CAPS and value.isdigit():
                out[i + 1] = f"{key}={min(int(value), CAPS[key])}"
        if out[:1] == ["sample-data"] and "--profile" not in out:
            out += ["--profile", "tiny"]
        return out


def _starts_flower(args: list[str]) -> bool:
    """Flower commands start a SuperLink and a SuperNode process per site: more than 60 s on
    the tiny cohort (143 s measured, docs/deployment.md), so in a run block they are parsed.
    ``mmfl flower certs`` and ``mmfl flower keys`` only write files: they run."""
    engine = args[args.index("--engine") + 1] if "--engine" in args[:-1] else None
    writes_files = args[1:2] in (["certs"], ["keys"])
    return (args[:1] == ["flower"] and not writes_files) or engine == "flower"


def run_shell_block(block: d.Block, box: Sandbox) -> None:
    """Run a run block's mmfl commands in this process; record each run directory."""
    runner = CliRunner()
    for cmd in d.commands(block):
        env, _ = d.strip_env(cmd)
        args = d.arguments(cmd)
        if _starts_flower(args):
            parse_mmfl(args)
            continue
        args = box.mmfl_args(args)
        parse_mmfl(args)
        result = runner.invoke(mmfl_app, args, env=env)
        if result.exit_code != 0:
            trace = "" if result.exc_info is None or isinstance(result.exception, SystemExit) \
                else "".join(traceback.format_exception(*result.exc_info))[-3000:]
            pytest.fail(f"{block.where}: mmfl {' '.join(args)} exited {result.exit_code}:\n"
                        f"{result.output[-3000:]}{trace}", pytrace=False)
        found = re.search(r"run directory: (\S+)", result.output)
        if args[:1] == ["train"] and found:
            engine = args[args.index("--engine") + 1] if "--engine" in args else "inprocess"
            box.runs[engine] = Path(found[1])


def run_python_block(block: d.Block, box: Sandbox, namespace: dict[str, object]) -> None:
    """Run a python block (paths substituted) in the page's namespace."""
    exec(compile(box.text(block.code), block.where, "exec"), namespace)


RUN_PAGES = sorted({b.page for b in d.all_blocks()
                    if b.lang == "python" or (b.lang in d.SHELL and b.mode == "run")})


@pytest.fixture(scope="module")
def tiny_configs(
    tiny_sample: Path, tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """The shipped configs' tiny stand-ins, sharing one embedding cache."""
    folder = tmp_path_factory.mktemp("docs_configs")
    return {f"configs/{task}.yaml": write_tiny_config(folder, tiny_sample, tiny_bert, task)
            for task in ("covid_oxygen", "alzheimers")}


@pytest.fixture(scope="module")
def demo_runs() -> dict[str, Path]:
    """Tiny stand-ins for make demo's run directories, shared by the pages."""
    return {}


@pytest.fixture
def sandbox(
    tmp_path: Path, tiny_sample: Path, tiny_configs: dict[str, Path], demo_runs: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Sandbox]:
    """A page's working folder (cwd, tempfile's folder, the embedding cache)."""
    cwd = tmp_path / "work"
    (cwd / "tmp").mkdir(parents=True)
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(tempfile, "tempdir", str(cwd / "tmp"))
    monkeypatch.setenv("MMFL_CACHE", str(tmp_path / "cache"))
    yield Sandbox(cwd, tiny_sample, tiny_configs, demo_runs)
    import matplotlib.pyplot as plt

    plt.close("all")


@pytest.mark.parametrize("page", RUN_PAGES, ids=[p.name for p in RUN_PAGES])
def test_page_runs(
    page: Path, sandbox: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    """A page's run blocks and python blocks, in order, on the tiny cohort."""
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem}"}
    steps: dict[str, Callable[[d.Block], None]] = {
        "python": lambda b: run_python_block(b, sandbox, namespace),
        "run": lambda b: run_shell_block(b, sandbox),
    }
    for block in d.blocks(page):
        kind = "python" if block.lang == "python" else block.mode if block.lang in d.SHELL else None
        if kind not in steps:
            continue
        started = time.perf_counter()
        steps[kind](block)
        sandbox.timings.append((block.where, time.perf_counter() - started))
    printed = capsys.readouterr().out
    missing = [s for s in EXPECTED_OUTPUT.get(page.name, []) if s not in printed]
    assert not missing, f"{page.name}: the blocks did not print {missing}"
    left = [p for p in MUST_NOT_EXIST.get(page.name, []) if (sandbox.cwd / p).exists()]
    assert not left, f"{page.name}: the blocks wrote {left}"
    for where, seconds in sandbox.timings:
        if seconds > SLOW_BLOCK_S:
            warnings.warn(f"{where} took {seconds:.0f} s on the tiny cohort; keep a block under "
                          f"{SLOW_BLOCK_S} s (or mark it parse/skip: more than 60 s)", stacklevel=1)


def test_run_blocks_substitute_and_cap(sandbox: Sandbox) -> None:
    """Shipped configs become tiny ones, absolute paths stay in the sandbox, caps apply."""
    args = sandbox.mmfl_args(["train", "configs/covid_oxygen.yaml", "--set", "federated.rounds=50",
                              "--set", "federated.rounds=1", "--out", "/srv/runs/x"])
    assert args == ["train", str(sandbox.configs["configs/covid_oxygen.yaml"]), "--set",
                    "federated.rounds=2", "--set", "federated.rounds=1", "--out",
                    str(sandbox.cwd / "srv/runs/x")]
    assert sandbox.mmfl_args(["sample-data", "out"]) == ["sample-data", "out", "--profile", "tiny"]
    literal = 'Path("sample_data/covid_oxygen")'
    assert sandbox.text(literal) == f'Path("{sandbox.tiny}/covid_oxygen")'
    assert sandbox.text("runs/sample_data/x") == "runs/sample_data/x"


def test_a_failing_run_block_fails(sandbox: Sandbox, tmp_path: Path) -> None:
    """A run block whose command exits non-zero fails the page, naming the block."""
    page = _write(tmp_path, "<!-- docs-test: run -->\n```bash\n"
                  "mmfl config show configs/covid_oxygen.yaml --set fusion.knd=concat\n```\n")
    with pytest.raises(pytest.fail.Exception, match=r"page.md:2: mmfl config show .* exited 2"):
        run_shell_block(d.blocks(page)[0], sandbox)
