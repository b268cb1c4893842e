"""One registry of engines, and :func:`run`: the one entry point that trains an experiment.

The CLI (``mmfl train``) dispatches through :data:`ENGINES` like any Python caller::

    from multimodal_fl.config import load_config
    from multimodal_fl.engines import run

    outcome = run(load_config("configs/covid_oxygen.yaml"), engine="local", out_dir="runs/x")
    outcome.run_dir, outcome.metrics["sites"]

Every engine either honours ``resume`` / ``stop_after_round`` or refuses them with a one-line
:class:`EngineOptionError`: only the in-process federated engine checkpoints its rounds.

:func:`run` keeps one run per run directory. Before any site data is read it checks the
options, the device, the PCA stage and the run directory (:func:`~multimodal_fl.rundir.
prepare_run_dir`: an existing run is refused unless ``overwrite``; :func:`~multimodal_fl.rundir.
check_resume`: only an unfinished run of the same engine and configuration is resumed). It
then fingerprints each site's data, writes ``run.json`` (status ``running``), runs the engine,
records ``completed``, ``stopped`` or ``failed``, and ends a completed run with its report and
model card (:func:`~multimodal_fl.engines.finish.finish_run`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from multimodal_fl.config import ExperimentConfig
from multimodal_fl.engines.baselines import run_centralized, run_local
from multimodal_fl.engines.federated import run_federated_experiment
from multimodal_fl.engines.finish import finish_run
from multimodal_fl.engines.flower_jobs import LoopbackOptions, run_flower_loopback
from multimodal_fl.evaluation.report import RUN_LABELS
from multimodal_fl.federated.secure_sum import MIN_SITES
from multimodal_fl.federated.server import RoundRecord
from multimodal_fl.pca.stage import check_pca_stage
from multimodal_fl.progress import ProgressCallback
from multimodal_fl.rundir import (
    RUN_LOCK,
    RunDirError,
    RunManifest,
    RunOutcome,
    check_resume,
    default_run_dir,
    prepare_run_dir,
    site_fingerprint,
)
from multimodal_fl.training import check_sensitive, resolve_device
from multimodal_fl.training.privacy import require_opacus

__all__ = ["ENGINES", "Engine", "EngineOptionError", "RunOptions", "preflight", "run"]


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
    progress : callable or None
        Called with :mod:`~multimodal_fl.progress` events (data preparation, site replies,
        training steps); the Flower engine reports its sites' replies only (their data
        preparation happens in the SuperNodes).
    loopback : LoopbackOptions or None
        The Flower engine's deployment: its timeout and transport settings (default ones).
    """

    out_dir: Path
    resume: bool = False
    stop_after_round: int | None = None
    on_round: Callable[[RoundRecord], None] | None = None
    progress: ProgressCallback | None = None
    loopback: LoopbackOptions | None = None


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
        progress=options.progress,
    )


def _flower(cfg: ExperimentConfig, options: RunOptions) -> RunOutcome:
    loopback = options.loopback or LoopbackOptions()
    return run_flower_loopback(cfg, options.out_dir, timeout=loopback.timeout,
                               run_config=loopback.run_config, on_round=options.on_round,
                               progress=options.progress)


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


def _engine_for(cfg: ExperimentConfig, engine: str | None, *, resume: bool, overwrite: bool,
                stop_after_round: int | None, out_dir: object) -> Engine:
    """The engine asked for, after checking that it can honour the options."""
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
    if resume and overwrite:
        raise EngineOptionError("--resume continues a run and --overwrite removes it: give one")
    private = [k for k in ("dp", "site_level") if getattr(cfg.privacy, k) is not None]
    if private and name in ("local", "centralized"):
        raise EngineOptionError(f"privacy.{private[0]}: the {name} engine trains without "
                                "differential privacy; run it from a config without a privacy "
                                "section (DP runs on the inprocess and flower engines)")
    return spec


def preflight(cfg: ExperimentConfig, engine: str | None = None) -> None:
    """The checks that need no site data, run before any is read.

    Parameters
    ----------
    cfg : ExperimentConfig
    engine : str or None
        The engine that will run (default ``federated.engine``).

    Raises
    ------
    ValueError
        ``training.device`` names a device this machine lacks, ``federated.pca`` cannot
        run as a stage, secure aggregation is asked of fewer than three sites, the in-process
        federation's ``min_sites`` exceeds its sites, or a
        ``privacy`` section needs Opacus and it is not installed, or
        ``evaluation.sensitive`` names a column no site's predictions carry, or ``age``
        (continuous: use ``age_band``).
    """
    resolve_device(cfg.training.device)
    check_sensitive(cfg.evaluation.sensitive)
    if cfg.federated.pca.enabled:
        check_pca_stage(cfg)
    rounds = (engine or cfg.federated.engine) in ("inprocess", "flower")
    if rounds and cfg.federated.secure_aggregation and len(cfg.sites) < MIN_SITES:
        raise ValueError(
            f"federated.secure_aggregation: true needs at least {MIN_SITES} sites, the config "
            f"lists {len(cfg.sites)}: with two, each site would learn the other's update from "
            "the sum; add sites or turn secure aggregation off")
    if (engine or cfg.federated.engine) == "inprocess" \
            and cfg.federated.min_sites > len(cfg.sites):
        raise ValueError(
            f"federated.min_sites {cfg.federated.min_sites}: the config lists "
            f"{len(cfg.sites)} site(s), so no round could reach it; lower min_sites or add "
            "sites")
    if cfg.privacy.dp is not None or cfg.privacy.site_level is not None:
        try:
            require_opacus()
        except ImportError as exc:
            raise EngineOptionError(str(exc)) from None


def _fingerprints(cfg: ExperimentConfig) -> dict[str, dict[str, object]]:
    """Every site's data fingerprint (a missing site directory is named)."""
    out: dict[str, dict[str, object]] = {}
    for site in cfg.sites:
        try:
            out[site.name] = site_fingerprint(site.path)
        except RunDirError as exc:
            raise RunDirError(f"site {site.name}: {exc}") from None
    return out


def _open_run(cfg: ExperimentConfig, spec: Engine, target: Path, *, resume: bool,
              overwrite: bool) -> RunManifest:
    """Check the run directory, fingerprint the data and write ``run.json`` (``running``)."""
    if resume:
        manifest = check_resume(target, cfg, engine=spec.name,
                                resumable=[e.name for e in ENGINES.values() if e.resumable])
    else:
        prepare_run_dir(target, overwrite=overwrite)
    data = _fingerprints(cfg)
    if resume:
        changed = sorted(s for s in set(data) | set(manifest.data)
                         if data.get(s, {}).get("fingerprint")
                         != manifest.data.get(s, {}).get("fingerprint"))
        if changed:
            raise RunDirError(f"--resume {target}: the data of site(s) {', '.join(changed)} "
                              "changed since the run started (data fingerprint in run.json); "
                              "start a new run")
        manifest.resume()
    else:
        manifest = RunManifest.start(cfg, spec.name, data)
    manifest.write(target)
    return manifest


def _run_recorded(spec: Engine, cfg: ExperimentConfig, options: RunOptions,
                  manifest: RunManifest) -> RunOutcome:
    """Run the engine; record how it ended in ``run.json``."""
    try:
        outcome = spec.runner(cfg, options)
    except BaseException as exc:
        line = " ".join(f"{type(exc).__name__}: {exc}".split())
        manifest.finish("failed", error=line)
        manifest.write(options.out_dir)
        raise
    stopped = outcome.metrics.get("stopped_after_round")
    if stopped is not None:
        manifest.finish("stopped", stopped_after_round=int(stopped))
    else:
        manifest.finish("completed")
    manifest.write(options.out_dir)
    return outcome


def run(
    cfg: ExperimentConfig,
    engine: str | None = None,
    *,
    out_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    stop_after_round: int | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
    progress: ProgressCallback | None = None,
    report: bool = True,
    loopback: LoopbackOptions | None = None,
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
        run to continue). It must be new or empty unless ``overwrite``.
    resume : bool
        Continue the unfinished run in ``out_dir`` from its last checkpoint (in-process
        federated only; the same configuration and data).
    overwrite : bool
        Remove the run in ``out_dir`` first.
    stop_after_round : int or None
        Stop after this round, checkpointed (in-process federated only).
    on_round : callable or None
        Called with each completed round's record.
    progress : callable or None
        Called with :mod:`~multimodal_fl.progress` events; nothing in the library prints
        (the CLI renders them as bars).
    report : bool
        End a completed run with ``RUN_DIR/report/`` (the model card is written either way).
    loopback : LoopbackOptions or None
        The ``flower`` engine's deployment on this machine: timeout and transport settings
        (``mmfl flower local CONFIG --timeout ... -c ...``); refused for another engine.

    Returns
    -------
    RunOutcome
        The run directory, what ``metrics.json`` holds, and what the end of the run wrote.

    Raises
    ------
    EngineOptionError
        For an unknown engine, or an option the engine cannot honour; nothing has run.
    RunDirError
        For a run directory that cannot be used as asked; nothing has run.
    """
    if progress is not None and not callable(progress):
        raise EngineOptionError(f"progress={progress!r}: expected a callable taking progress "
                                "events, or None (the library itself never prints)")
    spec = _engine_for(cfg, engine, resume=resume, overwrite=overwrite,
                       stop_after_round=stop_after_round, out_dir=out_dir)
    if loopback is not None and spec.name != "flower":
        raise EngineOptionError(f"loopback options are the flower engine's; the {spec.name} "
                                "engine has no deployment")
    preflight(cfg, spec.name)
    target = Path(out_dir) if out_dir is not None else default_run_dir(cfg)
    with _held(target):
        manifest = _open_run(cfg, spec, target, resume=resume, overwrite=overwrite)
        options = RunOptions(target, resume, stop_after_round, on_round, progress, loopback)
        outcome = _run_recorded(spec, cfg, options, manifest)
        if manifest.status == "completed":
            try:
                outcome.finished = finish_run(target, cfg, manifest, report=report)
            except (ValueError, KeyError, OSError) as exc:
                raise RuntimeError(f"the run completed in {target}, but its end failed "
                                   f"({exc}); mmfl report {target} retries the report") from exc
    return outcome


@contextmanager
def _held(target: Path) -> Iterator[None]:
    """Hold ``target/run.lock`` while the run is written: a second process that would write the
    same run directory (``--resume`` of a run in progress) is refused at once."""
    if target.exists() and not target.is_dir():
        yield  # _open_run says what is wrong with it
        return
    created = not target.exists()
    target.mkdir(parents=True, exist_ok=True)
    lock = FileLock(target / RUN_LOCK)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RunDirError(f"{target}: another process is writing this run directory (its "
                          f"{RUN_LOCK} is held); wait for it to end, or stop it first") from None
    try:
        yield
    finally:
        lock.release()
        (target / RUN_LOCK).unlink(missing_ok=True)  # a finished run leaves no lock file
        if created and target.is_dir() and not any(target.iterdir()):
            target.rmdir()  # refused before it wrote anything: no empty folder left behind
