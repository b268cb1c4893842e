"""The engine registry: one entry point, every engine reachable, options honoured or refused."""

from __future__ import annotations

import typing
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from multimodal_fl.cli import app
from multimodal_fl.config import FederatedConfig, load_config
from multimodal_fl.engines import ENGINES, EngineOptionError, run
from multimodal_fl.evaluation.report import RUN_LABELS


def test_every_engine_the_cli_offers_is_registered() -> None:
    assert set(ENGINES) == {"inprocess", "flower", "local", "centralized"}
    assert [e.name for e in ENGINES.values() if e.resumable] == ["inprocess"]
    assert ENGINES["local"].label == "local-only"


def test_engine_labels_are_the_reports_run_labels() -> None:
    # one table of run labels: the registry and the report (keyed by metrics.json's engine)
    assert {name: e.label for name, e in ENGINES.items()} == RUN_LABELS
    assert RUN_LABELS["inprocess"] == "federated (in-process)"
    assert RUN_LABELS["flower"] == "federated (Flower)"
    engines = typing.get_args(FederatedConfig.model_fields["engine"].annotation)
    assert set(engines) == set(RUN_LABELS)  # every engine a config can name has a label


@pytest.mark.parametrize("engine", ["local", "centralized", "flower"])
@pytest.mark.parametrize("option", ["resume", "stop_after_round"])
def test_an_engine_refuses_what_it_cannot_honour_before_running(
    engine: str, option: str, tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    cfg = load_config(tiny_config())
    kwargs: dict[str, object] = {"resume": True} if option == "resume" else {"stop_after_round": 1}
    with pytest.raises(EngineOptionError, match=f"the {engine} engine cannot"):
        run(cfg, engine, out_dir=tmp_path / "run", **kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "run").exists()  # refused before anything ran


def test_unknown_engine_is_one_line(tiny_config: Callable[..., Path]) -> None:
    with pytest.raises(EngineOptionError, match="expected one of inprocess, flower, local"):
        run(load_config(tiny_config()), "grid")


def test_cli_dispatches_through_the_registry_and_refuses_in_one_line(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    runner = CliRunner()
    config = tiny_config()
    refused = runner.invoke(app, ["train", str(config), "--engine", "local",
                                  "--stop-after-round", "1", "--out", str(tmp_path / "r")])
    assert refused.exit_code != 0
    assert "the local engine cannot stop and resume" in refused.output
    assert "Traceback" not in refused.output
    done = runner.invoke(app, ["train", str(config), "--engine", "local", "--quiet",
                               "--out", str(tmp_path / "ok")])
    assert done.exit_code == 0, done.output
    assert "local-only" in done.output and (tmp_path / "ok" / "metrics.json").is_file()


def test_python_entry_point_trains_like_the_cli(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    outcome = run(load_config(tiny_config()), "inprocess", out_dir=tmp_path / "fed")
    assert outcome.run_dir == tmp_path / "fed"
    assert outcome.metrics["engine"] == "inprocess" and outcome.metrics["sites"]


def test_progress_must_be_a_callable(tiny_config: Callable[..., Path]) -> None:
    with pytest.raises(EngineOptionError, match="expected a callable"):
        run(load_config(tiny_config()), "local", progress=False)  # type: ignore[arg-type]
