"""One registry of engines, and :func:`run`: the one entry point that trains an experiment.

The CLI (``mmfl train``) dispatches through :data:`ENGINES` like any Python caller::

    from multimodal_fl.config import load_config
    from multimodal_fl.engines import run

    outcome = run(load_config("configs/covid_oxygen.yaml"), engine="local", out_dir="runs/x")
    outcome.run_dir, outcome.metrics["sites"]

Every engine either honours ``resume`` / ``stop_after_round`` or refuses them with a one-line
:class:`EngineOptionError`: only the in-process federated engine checkpoints its rounds.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from multimodal_fl.config import ExperimentConfig
from multimodal_fl.engines.baselines import run_centralized, run_local
from multimodal_fl.engines.federated import run_federated_experiment
from multimodal_fl.engines.flower_jobs import run_flower_loopback
from multimodal_fl.evaluation.report import RUN_LABELS
from multimodal_fl.federated.server import RoundRecord
from multimodal_fl.rundir import RunOutcome, default_run_dir

__all__ = ["ENGINES", "Engine", "EngineOptionError", "RunOptions", "run"]


class EngineOptionError(ValueError):
    """An option the chosen engine cannot honour (one line, naming the engines that can)."""


@dataclass(frozen=True)
class RunOptions:
    """How one run is carried out (the options every engine is handed).

    Parameters
    ----------
    out_dir : Path
        The run directory.
    resume : bool
        Continue the run in ``out_dir`` from its checkpoint.
    stop_after_round : int or None
        Stop after this round, checkpointed and resumable.
    on_round : callable or None
        Called with each completed round's record (federated engines).
    progress : bool
        Show progress bars (baselines).
    """

    out_dir: Path
    resume: bool = False
    stop_after_round: int | None = None
    on_round: Callable[[RoundRecord], None] | None = None
    progress: bool = True


@dataclass(frozen=True)
class Engine:
    """One way to run an experiment.

    Parameters
    ----------
    name : str
        The ``--engine`` / ``federated.engine`` value.
    label : str
        What the run is, in words (for tables and reports): the report's
        :data:`~multimodal_fl.evaluation.report.RUN_LABELS` entry, the one table of them.
    runner : callable
        ``runner(cfg, options) -> RunOutcome``.
    resumable : bool
        Honours ``resume`` and ``stop_after_round``.
    """

    name: str
    label: str
    runner: Callable[[ExperimentConfig, RunOptions], RunOutcome]
    resumable: bool = False


def _inprocess(cfg: ExperimentConfig, options: RunOptions) -> RunOutcome:
    return run_federated_experiment(
        cfg, options.out_dir, engine="inprocess", resume=options.resume,
        stop_after_round=options.stop_after_round, on_round=options.on_round,
    )


def _flower(cfg: ExperimentConfig, options: RunOptions) -> RunOutcome:
    return run_flower_loopback(cfg, options.out_dir)


def _local(cfg: ExperimentConfig, options: RunOptions) -> RunOutcome:
    return run_local(cfg, options.out_dir, progress=options.progress)


def _centralized(cfg: ExperimentConfig, options: RunOptions) -> RunOutcome:
    return run_centralized(cfg, options.out_dir, progress=options.progress)


#: Every engine, by name.
ENGINES: dict[str, Engine] = {
    e.name: e for e in (
        Engine("inprocess", RUN_LABELS["inprocess"], _inprocess, resumable=True),
        Engine("flower", RUN_LABELS["flower"], _flower),
        Engine("local", RUN_LABELS["local"], _local),
        Engine("centralized", RUN_LABELS["centralized"], _centralized),
    )
}


def run(
    cfg: ExperimentConfig,
    engine: str | None = None,
    *,
    out_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    stop_after_round: int | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
    progress: bool = True,
) -> RunOutcome:
    """Train one experiment with one engine and write its run directory.

    Parameters
    ----------
    cfg : ExperimentConfig
        The experiment (e.g. from :func:`multimodal_fl.config.load_config`).
    engine : str or None
        A key of :data:`ENGINES` (default: ``cfg.federated.engine``).
    out_dir : path-like or None
        The run directory (default ``runs/<config-name>-<timestamp>``; with ``resume``, the
        run to continue).
    resume : bool
        Continue the run in ``out_dir`` from its last checkpoint (in-process federated only).
    stop_after_round : int or None
        Stop after this round, checkpointed (in-process federated only).
    on_round : callable or None
        Called with each completed round's record.
    progress : bool
        Show progress bars.

    Returns
    -------
    RunOutcome
        The run directory and what ``metrics.json`` holds.

    Raises
    ------
    EngineOptionError
        For an unknown engine, or an option the engine cannot honour; nothing has run.
    """
    name = engine or cfg.federated.engine
    spec = ENGINES.get(name)
    if spec is None:
        raise EngineOptionError(f"engine {name!r}: expected one of {', '.join(ENGINES)}")
    able = ", ".join(e.name for e in ENGINES.values() if e.resumable)
    if resume and not spec.resumable:
        raise EngineOptionError(f"--resume: the {name} engine cannot resume a run (only {able} "
                                "checkpoints its rounds)")
    if stop_after_round is not None and not spec.resumable:
        raise EngineOptionError(f"--stop-after-round: the {name} engine cannot stop and resume "
                                f"(only {able} checkpoints its rounds)")
    if resume and out_dir is None:
        raise EngineOptionError("--resume needs the run directory to continue")
    target = Path(out_dir) if out_dir is not None else default_run_dir(cfg)
    options = RunOptions(target, resume, stop_after_round, on_round, progress)
    return spec.runner(cfg, options)
