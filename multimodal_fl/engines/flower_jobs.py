"""The package's experiment as a Flower App: the server job and the site factory for an experiment.

:mod:`multimodal_fl.federated.flower` runs any server job and any site; this module supplies
the two for an experiment YAML, so that ``mmfl flower run CONFIG`` / ``mmfl flower local CONFIG``
train exactly what ``mmfl train CONFIG`` trains in process:

* :func:`experiment_job` (``server-factory``) runs
  :func:`multimodal_fl.engines.federated.run_federated_experiment` (init, federated
  standardisation, PCA, the rounds, the final predict stage) over the
  :class:`~multimodal_fl.federated.flower.FlowerFederation`, writing the run directory
  ``run-dir`` on the SuperLink's machine (weights, counts, metrics only).
* :func:`local_job` (``server-factory``, :data:`LOCAL_SERVER_FACTORY`) runs the local-only
  job instead (:func:`multimodal_fl.engines.baselines.run_local`): every SuperNode trains its
  own model at home, the server aggregates nothing, and cross-site validation scores every
  shared local-only model on the other sites' test splits (``cross_site.json``).
* :func:`experiment_site` (``site-factory``) builds the
  :class:`~multimodal_fl.federated.site.FusionSite` of one SuperNode from its ``site-dir`` and
  the experiment; patient-level files (splits, predictions) and the embedding cache stay on the
  SuperNode's machine, under ``site-out``.

The experiment travels in the run config as JSON (``experiment``), so every SuperNode trains
the same model without a copy of the server's files; its ``sites`` list is ignored there (each
SuperNode is its own site).

The federated PCA analysis (``mmfl pca``) has its own pair, :func:`pca_analysis_job` and
:func:`pca_analysis_site` (run config from :func:`pca_analysis_run_config`): the server writes
``pca.json`` and the PNGs into ``run-dir``; each SuperNode prepares only the analysed features.

This is an engine, not transport: it imports the experiment's orchestration (``engine``,
``runs``, ``pca_analysis``, ``config``); :mod:`multimodal_fl.federated.flower` imports none of
it and names these factories only as strings (:data:`SERVER_FACTORY`, ...; the old names
``multimodal_fl.federated.flower_app:experiment_job`` etc. still resolve through
:data:`multimodal_fl.federated.flower.LEGACY_FACTORIES`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from multimodal_fl.config import ExperimentConfig, SiteConfig
from multimodal_fl.engines.baselines import run_local
from multimodal_fl.engines.federated import run_federated_experiment
from multimodal_fl.federated.checkpoint import CHECKPOINT_JSON
from multimodal_fl.federated.disclosure import EGRESS_LOG, site_policy
from multimodal_fl.federated.flower import (
    FLOWER_RUN_ID,
    NODE_CONFIG_PREFIX,
    FlowerRunError,
    ServerJob,
    run_loopback,
)
from multimodal_fl.federated.pca import SVD_SOLVERS
from multimodal_fl.federated.protocol import ConfigValue, Request
from multimodal_fl.federated.server import Federation, RoundRecord, Site
from multimodal_fl.federated.site import FusionSite
from multimodal_fl.pca.analysis import FEATURES, analysis_config, run_pca_analysis
from multimodal_fl.progress import EventTail, ProgressCallback
from multimodal_fl.rundir import RunOutcome
from multimodal_fl.training import load_site_data

__all__ = [
    "JOBS",
    "LOCAL_SERVER_FACTORY",
    "LOOPBACK_KEYS",
    "PCA_SERVER_FACTORY",
    "PCA_SITE_FACTORY",
    "SERVER_FACTORY",
    "SITE_FACTORY",
    "LoopbackOptions",
    "experiment_job",
    "experiment_run_config",
    "experiment_site",
    "local_job",
    "node_config_of",
    "pca_analysis_job",
    "pca_analysis_run_config",
    "pca_analysis_site",
    "run_flower_loopback",
    "site_output_dir",
]

#: The ``server-factory`` of an experiment (:func:`experiment_job`).
SERVER_FACTORY = "multimodal_fl.engines.flower_jobs:experiment_job"
#: The ``site-factory`` of an experiment (:func:`experiment_site`).
SITE_FACTORY = "multimodal_fl.engines.flower_jobs:experiment_site"
#: The ``server-factory`` of the local-only job (:func:`local_job`; same sites).
LOCAL_SERVER_FACTORY = "multimodal_fl.engines.flower_jobs:local_job"
#: The server factory of each job an experiment runs on Flower.
JOBS = {"federated": SERVER_FACTORY, "local": LOCAL_SERVER_FACTORY}


def experiment_run_config(
    cfg: ExperimentConfig,
    *,
    run_dir: str | os.PathLike[str],
    site_out: str | os.PathLike[str] | None = None,
    site_worker: bool = True,
    job: str = "federated",
) -> dict[str, ConfigValue]:
    """The run config that trains ``cfg`` on Flower (for ``flower.write_app_dir``).

    Parameters
    ----------
    cfg : ExperimentConfig
        The experiment.
    run_dir : path-like
        The run directory, on the SuperLink's machine.
    site_out : path-like or None
        Where every SuperNode writes its own files (None: each decides, see
        :func:`site_output_dir`). Only meaningful when all SuperNodes share a file system
        (loopback runs).
    site_worker : bool
        Keep each site in one process per run (``site-worker``; builds its data and model once).
    job : {"federated", "local"}
        The server job (:data:`JOBS`): federated training, or the local-only job with
        cross-site validation.

    Returns
    -------
    dict[str, int | float | str | bool]
        ``server-factory``, ``site-factory``, ``experiment``, ``run-dir``, ``site-out``,
        ``min-nodes`` (``federated.min_sites``), ``torch-threads`` (``training.num_threads``)
        and ``site-worker``.

    Raises
    ------
    ValueError
        For a job not in :data:`JOBS`.
    """
    if job not in JOBS:
        raise ValueError(f"job {job!r}: expected one of {', '.join(JOBS)}")
    return {
        "server-factory": JOBS[job],
        "site-factory": SITE_FACTORY,
        "experiment": json.dumps(cfg.resolved_dict(), sort_keys=True),
        "run-dir": str(Path(run_dir).resolve()),
        "site-out": "" if site_out is None else str(Path(site_out).resolve()),
        "min-nodes": int(cfg.federated.min_sites),
        "torch-threads": int(cfg.training.num_threads or 0),
        "site-worker": bool(site_worker),
    }


def _experiment(run_config: Mapping[str, Any]) -> ExperimentConfig:
    raw = run_config.get("experiment")
    if not raw:
        raise ValueError(
            "run config has no 'experiment' (the experiment as JSON); write the app with "
            "multimodal_fl.engines.flower_jobs.experiment_run_config(cfg, ...)"
        )
    return ExperimentConfig.model_validate(json.loads(str(raw)))


def experiment_job(run_config: Mapping[str, Any]) -> ServerJob:
    """``server-factory``: run the experiment's stages and rounds over the Flower federation.

    Parameters
    ----------
    run_config : Mapping[str, Any]
        With ``experiment`` and ``run-dir`` (see :func:`experiment_run_config`).

    Returns
    -------
    ServerJob
        A job whose ``main`` calls :func:`multimodal_fl.engines.federated.run_federated_experiment`.
    """
    cfg = _experiment(run_config)
    run_dir = Path(str(run_config.get("run-dir") or Path("runs") / f"{cfg.name or 'flower'}"))

    def main(federation: Federation) -> None:
        # one message exchange per round: each costs a ClientApp process per site
        run_federated_experiment(cfg, run_dir, federation=federation, engine="flower",
                                 carry_evaluation=True)

    return ServerJob(main=main)


def local_job(run_config: Mapping[str, Any]) -> ServerJob:
    """``server-factory`` of the local-only job: every site trains alone, then cross-site
    validation (:func:`multimodal_fl.engines.baselines.run_local` over the Flower federation).

    Parameters
    ----------
    run_config : Mapping[str, Any]
        With ``experiment`` and ``run-dir`` (see :func:`experiment_run_config`, ``job="local"``).

    Returns
    -------
    ServerJob
        A job whose ``main`` writes the local engine's run directory into ``run-dir``: the
        sites' disclosed documents (``metrics.json``, ``cross_site.json``) only.
    """
    cfg = _experiment(run_config)
    run_dir = Path(str(run_config.get("run-dir") or Path("runs") / f"{cfg.name or 'local'}"))

    def main(federation: Federation) -> None:
        run_local(cfg, run_dir, federation=federation, transport="flower")

    return ServerJob(main=main)


def site_output_dir(cfg: ExperimentConfig, run_config: Mapping[str, Any]) -> Path:
    """Where a SuperNode writes its files: ``site-out``, else ``$MMFL_SITE_OUT``, else home.

    Parameters
    ----------
    cfg : ExperimentConfig
        The experiment (its name names the default folder).
    run_config : Mapping[str, Any]
        The run config.

    Returns
    -------
    Path
        ``site-out`` from the run config if set; else ``$MMFL_SITE_OUT/<experiment>``; else
        ``~/.mmfl/runs/<experiment>``. The site writes ``sites/<site>/`` (splits,
        predictions, its egress log) and, unless ``data.cache_dir`` or ``$MMFL_CACHE`` say
        otherwise, its embedding cache in ``sites/<site>/cache/``.
    """
    explicit = str(run_config.get("site-out") or "")
    if explicit:
        return Path(explicit)
    name = cfg.name or "experiment"
    env = os.environ.get("MMFL_SITE_OUT")
    return Path(env).expanduser() / name if env else Path.home() / ".mmfl" / "runs" / name


def experiment_site(name: str, site_dir: Path, run_config: Mapping[str, Any]) -> Site:
    """``site-factory``: the experiment's ``FusionSite`` for one SuperNode.

    Parameters
    ----------
    name : str
        The site's name (``--node-config site-name``).
    site_dir : Path
        The site's data directory (``--node-config site-dir``).
    run_config : Mapping[str, Any]
        With ``experiment`` (see :func:`experiment_run_config`).

    Returns
    -------
    Site
        The site, its cohort read from ``site_dir`` and prepared as in process; its
        disclosure policy is ``site_dir/policy.yaml`` and the SuperNode's node config
        (``min-cell``, ``subgroup-summaries``, ``share-local-model``, ``answers``,
        ``policy-file``), the stricter of each.
    """
    return _fusion_site(_experiment(run_config), name, site_dir, run_config)


def _record_failure(name: str, site_dir: Path, run_config: Mapping[str, Any],
                    request: Request, failed: str) -> None:
    """Append one egress-log line for a request that failed before the site's gate saw it (the
    site could not be built, its worker died): as the gate's lines, ``released`` false and
    ``failed`` what happened (an exception's type, never its message)."""
    cfg = _experiment(run_config)
    path = site_output_dir(cfg, run_config) / "sites" / name / EGRESS_LOG
    run = {"dir": str(run_config.get("run-dir") or site_output_dir(cfg, run_config)),
           **({"flower_run_id": run_config[FLOWER_RUN_ID]} if FLOWER_RUN_ID in run_config
              else {})}
    entry = {"time": time.time(), "site": name, "kind": str(request.kind), "round": request.round,
             "run": run, "released": False, "refused": None, "failed": failed}
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps(entry) + "\n")


# the ClientApp writes a failure no gate saw through it (client.RECORD_FAILURE)
setattr(experiment_site, "record_failure", _record_failure)  # noqa: B010


def node_config_of(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The SuperNode's node config, as the ClientApp hands it to the site factory.

    Parameters
    ----------
    run_config : Mapping[str, Any]
        The run config a site factory receives (node keys under ``node.``).

    Returns
    -------
    dict
    """
    return {k[len(NODE_CONFIG_PREFIX):]: v for k, v in run_config.items()
            if str(k).startswith(NODE_CONFIG_PREFIX)}


def _fusion_site(
    cfg: ExperimentConfig, name: str, site_dir: Path, run_config: Mapping[str, Any]
) -> Site:
    """The SuperNode's site: its policy is ``policy.yaml`` and its node config, the stricter."""
    policy, _ = site_policy(site_dir, node_config_of(run_config))
    cfg = cfg.model_copy(update={"sites": [SiteConfig(name=name, path=Path(site_dir))]})
    cfg = cfg.in_zone_of(policy)  # also a SuperNode's policy-file zone, not only policy.yaml's
    out = site_output_dir(cfg, run_config)
    data = load_site_data(cfg, out)[name]
    run = {"dir": str(run_config.get("run-dir") or out),
           **({"flower_run_id": run_config[FLOWER_RUN_ID]} if FLOWER_RUN_ID in run_config else {})}
    site: Site = FusionSite(name, cfg, data, run_dir=out, policy=policy, run=run)
    return site


# --------------------------------------------------------------------------- mmfl pca on Flower

#: The ``server-factory`` of the PCA analysis (:func:`pca_analysis_job`).
PCA_SERVER_FACTORY = "multimodal_fl.engines.flower_jobs:pca_analysis_job"
#: The ``site-factory`` of the PCA analysis (:func:`pca_analysis_site`).
PCA_SITE_FACTORY = "multimodal_fl.engines.flower_jobs:pca_analysis_site"


def pca_analysis_run_config(
    cfg: ExperimentConfig,
    features: str,
    *,
    out_dir: str | os.PathLike[str],
    n_components: int | None = None,
    site_rank: int | None = None,
    svd_solver: str = "auto",
    site_out: str | os.PathLike[str] | None = None,
    site_worker: bool = True,
) -> dict[str, ConfigValue]:
    """The run config that runs ``mmfl pca`` (the federated PCA analysis) on Flower.

    Parameters
    ----------
    cfg : ExperimentConfig
        The experiment (sites' task, encoders, ``evaluation.min_cell``).
    features : str
        ``image``, ``tabular`` or ``text``.
    out_dir : path-like
        Where the server writes ``pca.json`` and the PNGs (the SuperLink's machine).
    n_components, site_rank : int or None
        As :func:`multimodal_fl.pca.analysis.run_pca_analysis` (0 on the wire means None).
    svd_solver : {"auto", "full", "covariance_eigh"}
        As :func:`multimodal_fl.pca.analysis.run_pca_analysis`.
    site_out : path-like or None
        See :func:`experiment_run_config`.
    site_worker : bool
        See :func:`experiment_run_config`.

    Returns
    -------
    dict[str, int | float | str | bool]
        :func:`experiment_run_config`'s entries with the PCA factories and ``pca-features``,
        ``pca-n-components``, ``pca-site-rank``, ``pca-svd-solver``.

    Raises
    ------
    ValueError
        For unknown features or solver, or a non-positive ``n_components`` / ``site_rank``.
    """
    entries = experiment_run_config(
        cfg, run_dir=out_dir, site_out=site_out, site_worker=site_worker
    )
    entries.update({
        "server-factory": PCA_SERVER_FACTORY,
        "site-factory": PCA_SITE_FACTORY,
        "pca-features": features,
        "pca-n-components": int(n_components or 0),
        "pca-site-rank": int(site_rank or 0),
        "pca-svd-solver": svd_solver,
    })
    _pca_options(entries)  # refuse bad values here, not on the SuperLink
    if any(v is not None and v < 1 for v in (n_components, site_rank)):
        raise ValueError(
            f"n_components={n_components}, site_rank={site_rank}: positive integers or None"
        )
    return entries


def _pca_options(run_config: Mapping[str, Any]) -> tuple[str, int | None, int | None, str]:
    features = str(run_config.get("pca-features") or "")
    if features not in FEATURES:
        raise ValueError(
            f"run config pca-features={features!r}; expected one of {', '.join(FEATURES)}"
        )
    solver = str(run_config.get("pca-svd-solver") or "auto")
    if solver not in SVD_SOLVERS:
        raise ValueError(
            f"run config pca-svd-solver={solver!r}; expected one of {', '.join(SVD_SOLVERS)}"
        )
    k = int(run_config.get("pca-n-components") or 0)
    rank = int(run_config.get("pca-site-rank") or 0)
    return features, (k if k > 0 else None), (rank if rank > 0 else None), solver


def pca_analysis_job(run_config: Mapping[str, Any]) -> ServerJob:
    """``server-factory``: the federated PCA analysis over the Flower federation.

    Parameters
    ----------
    run_config : Mapping[str, Any]
        From :func:`pca_analysis_run_config`.

    Returns
    -------
    ServerJob
        A job whose ``main`` calls :func:`multimodal_fl.pca.analysis.run_pca_analysis` and
        writes ``pca.json``, ``pca_sites.png`` and ``pca_variance.png`` into ``run-dir``.
    """
    cfg = _experiment(run_config)
    features, k, rank, solver = _pca_options(run_config)
    run_dir = Path(str(run_config.get("run-dir") or Path("runs") / f"{cfg.name or 'pca'}-pca"))

    def main(federation: Federation) -> None:
        try:
            run_pca_analysis(cfg, features, run_dir, n_components=k, site_rank=rank,
                             svd_solver=solver, federation=federation)
        except ValueError as exc:  # say it in the run config's words, not mmfl pca's options
            words = str(exc).replace("--n-components", "run config pca-n-components")
            raise ValueError(words.replace("--site-rank", "run config pca-site-rank")) from None

    return ServerJob(main=main)


def pca_analysis_site(name: str, site_dir: Path, run_config: Mapping[str, Any]) -> Site:
    """``site-factory`` of the analysis: the site with only the analysed features prepared.

    Parameters
    ----------
    name : str
        The site's name.
    site_dir : Path
        The site's data directory.
    run_config : Mapping[str, Any]
        From :func:`pca_analysis_run_config`.

    Returns
    -------
    Site
        As :func:`multimodal_fl.pca.analysis.analysis_config` prepares it in process.
    """
    features = _pca_options(run_config)[0]
    return _fusion_site(
        analysis_config(_experiment(run_config), features), name, site_dir, run_config
    )


#: The run-config keys a loopback run of an experiment may override (``mmfl flower local CONFIG
#: -c key=value``): how the deployment behaves, not what it trains.
LOOPBACK_KEYS = ("node-wait", "poll-interval", "describe-timeout", "torch-threads", "site-worker",
                 "site-worker-idle", "site-worker-start")


@dataclass(frozen=True)
class LoopbackOptions:
    """How the loopback deployment of ``--engine flower`` runs (``mmfl flower local CONFIG``).

    Parameters
    ----------
    timeout : float
        Seconds before the deployment is stopped.
    run_config : Mapping[str, int | float | str | bool]
        Run-config entries over the experiment's, keys of :data:`LOOPBACK_KEYS` only.

    Raises
    ------
    ValueError
        For another key, or a timeout that is not a positive number of seconds.
    """

    timeout: float = 3600.0
    run_config: Mapping[str, ConfigValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.timeout > 0:
            raise ValueError(f"timeout {self.timeout!r}: expected seconds > 0")
        other = sorted(set(self.run_config) - set(LOOPBACK_KEYS))
        if other:
            raise ValueError(
                f"run config {', '.join(other)}: with an experiment config only the "
                f"deployment's own keys may be set ({', '.join(LOOPBACK_KEYS)}); the "
                "experiment's settings come from CONFIG (--set a.b=c)")


class _RoundWatch:
    """What the ServerApp reports while it runs: its progress events (``progress-file``) and
    each round, from the history its checkpoint holds (``RUN_DIR/checkpoint``)."""

    def __init__(self, out: Path, events: Path, on_round: Callable[[RoundRecord], None] | None,
                 progress: ProgressCallback | None) -> None:
        self.checkpoint = out / "checkpoint" / CHECKPOINT_JSON
        self.tail = EventTail(events)
        self.on_round, self.progress = on_round, progress
        self.seen = 0
        self.stamp: tuple[int, int] | None = None

    def __call__(self) -> None:
        """Pass on what is new (called while the deployment runs)."""
        if self.progress is not None:
            for event in self.tail.read():
                self.progress(event)
        if self.on_round is None:
            return
        try:
            stat = self.checkpoint.stat()
            if (stat.st_mtime_ns, stat.st_size) == self.stamp:
                return
            history = json.loads(self.checkpoint.read_text())["meta"]["history"]
            self.stamp = (stat.st_mtime_ns, stat.st_size)
        except (OSError, ValueError, KeyError, TypeError):
            return  # not there yet (or being replaced): the next call reads it
        self.rounds(history)

    def rounds(self, history: list[dict[str, Any]]) -> None:
        """Report the rounds of ``history`` not reported yet."""
        if self.on_round is None:
            return
        for row in history[self.seen:]:
            self.on_round(RoundRecord(**row))
        self.seen = max(self.seen, len(history))


def run_flower_loopback(
    cfg: ExperimentConfig, out_dir: str | os.PathLike[str], *, timeout: float = 3600.0,
    job: str = "federated", on_round: Callable[[RoundRecord], None] | None = None,
    progress: ProgressCallback | None = None, run_config: Mapping[str, ConfigValue] | None = None,
) -> RunOutcome:
    """Train ``cfg`` on a Flower deployment on this machine (``--engine flower``).

    A SuperLink and one SuperNode per site on 127.0.0.1 run the package's ServerApp and
    ClientApp with :func:`experiment_job` (or :func:`local_job`) / :func:`experiment_site`:
    the same weights as the in-process engine and the same run directory; Flower's own files go
    to ``OUT/flower``. Across hospitals, start the SuperLink and SuperNodes yourself
    (``mmfl flower ...``, ``docs/deployment.md``).

    Parameters
    ----------
    cfg : ExperimentConfig
    out_dir : path-like
        The run directory.
    timeout : float
        Seconds before the deployment is stopped.
    job : {"federated", "local"}
        Federated training, or the local-only job with cross-site validation (:data:`JOBS`).
    on_round : callable or None
        Called with each completed round's record as the ServerApp checkpoints it.
    progress : callable or None
        Called with the ServerApp federation's :class:`~multimodal_fl.progress.ReplyEvent`
        events as they come (read from ``OUT/flower/progress.jsonl``); the sites' data
        preparation happens in the SuperNodes and is not reported.
    run_config : Mapping or None
        Run-config entries over the experiment's (:class:`LoopbackOptions`: keys of
        :data:`LOOPBACK_KEYS`).

    Returns
    -------
    RunOutcome

    Raises
    ------
    FlowerRunError
        When the deployment fails or times out (the message names the logs).
    """
    out = Path(out_dir).resolve()
    options = LoopbackOptions(timeout, dict(run_config or {}))
    sites = {s.name: Path(s.path) for s in cfg.sites}
    for name, path in sites.items():
        if not path.is_dir():
            raise FlowerRunError(f"site {name}: directory {path} does not exist or is not a "
                                 "directory")
    entries = experiment_run_config(cfg, run_dir=out, site_out=out, job=job)
    entries.update(options.run_config)
    work = out / "flower"
    entries["out-dir"] = str(work / "out")
    entries["min-nodes"] = len(sites)
    events = work / "progress.jsonl"
    if progress is not None:
        events.unlink(missing_ok=True)
        entries["progress-file"] = str(events)
    watch = _RoundWatch(out, events, on_round, progress)
    run_loopback(sites, entries, work, timeout=options.timeout,
                 on_wait=watch if on_round is not None or progress is not None else None)
    metrics = json.loads((out / "metrics.json").read_text())
    watch.rounds(metrics.get("rounds", []))  # any round the last look missed
    return RunOutcome(out, metrics)
