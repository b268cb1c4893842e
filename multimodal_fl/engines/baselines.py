"""The two non-federated baselines: local-only and centralized.

``run_local(cfg)`` is the local-only job, run as NVFlare's cross-site validation runs it, over a
:class:`~multimodal_fl.federated.server.Federation` (in process by default; on Flower with
:func:`~multimodal_fl.engines.flower_jobs.local_job`): every site trains its own model at home
and keeps it there, the server aggregates nothing, each local-only model its site's policy
shares is scored by the other sites on their own test splits (:mod:`.cross_site`), and every
site scores its own model at home (the usual predict reply). The server writes only what the
sites disclosed: ``metrics.json``, ``disclosed/<site>.json`` and ``cross_site.json``.

``run_centralized(cfg)`` pools every site's patients into one training set: it moves data
between hospitals and is only a research baseline (it says so when it runs); it exists only in
process. Both use the same per-site splits (:func:`~multimodal_fl.training.split_patients`) as
the federated engine, and write the run directory of :mod:`multimodal_fl.rundir`.

Both write each site's disclosed report document (``disclosed/<site>.json``) and the
histogram-pooled test figures in ``metrics.json`` (``pooled_from_histograms``), so the report
reads every engine's run the same way. A site whose test histograms are in the pooled figures
sends its document in the pooled form and no ``n_positive``, as a federated site that joins the
secure sum does (the local-only job's sites answer the federated ``predict`` request; the
centralized engine decides the same in process), so the pooled total minus the other sites'
released counts never gives a count one site hides.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from safetensors.numpy import save_file

from multimodal_fl.config import ExperimentConfig, SitePolicy, load_policy
from multimodal_fl.data.tasks import declared_levels
from multimodal_fl.engines.cross_site import cross_site_validation, local_training_stage
from multimodal_fl.engines.federated import inprocess_federation, predict_stage
from multimodal_fl.engines.recalibration import (
    RECALIBRATION_FILE,
    local_summary,
    predict_config,
    skipped,
)
from multimodal_fl.evaluation.disclosed import recalibration_summary, site_disclosure
from multimodal_fl.evaluation.histograms import pooled_in_process, pooled_sites_in_process
from multimodal_fl.evaluation.recalibration import (
    Recalibration,
    RecalibrationError,
    fit_on_scores,
    recalibrated_frame,
)
from multimodal_fl.federated.gather import StageFailed
from multimodal_fl.federated.protocol import Doc
from multimodal_fl.federated.server import Federation
from multimodal_fl.federated.site import predict_metrics
from multimodal_fl.fusion import FusionModel
from multimodal_fl.pca.site import projection_arrays
from multimodal_fl.pca.stage import apply_pca_stage, fit_pca_stage, run_pca_stage
from multimodal_fl.progress import ProgressCallback
from multimodal_fl.rundir import (
    CROSS_SITE_FILE,
    RunOutcome,
    RunWriter,
    default_run_dir,
    jsonable,
)
from multimodal_fl.training import (
    CohortDataset,
    SiteData,
    build_model,
    fit_tabular_standardizer,
    load_site_data,
    predict,
    predictions_frame,
    torch_threads,
    train_to_completion,
)

__all__ = ["CENTRALIZED_WARNING", "run_centralized", "run_local"]

logger = logging.getLogger("multimodal_fl.engines.baselines")

CENTRALIZED_WARNING = (
    "centralized engine: pools every site's patient data in one place. This moves data "
    "between hospitals and is only a research baseline for comparison, never a deployment."
)


def _site_policy(cfg: ExperimentConfig, site: str) -> SitePolicy:
    """The site's disclosure policy (``policy.yaml`` in its directory), as the federated site."""
    paths = {s.name: s.path for s in cfg.sites}
    return load_policy(paths[site]) if site in paths else SitePolicy()


def _disclose(writer: RunWriter, cfg: ExperimentConfig, site: str, frame: pd.DataFrame,
              recalibration: Mapping[str, Any], *, pooled: bool) -> dict[str, Any]:
    """Write the site's disclosed report document, as a federated site discloses it.

    ``pooled``: the site's test histograms are in the pooled total
    (:func:`_pooled_sites`), so it sends the pooled form, as a site that joins the secure sum.
    """
    ev = cfg.evaluation
    policy = _site_policy(cfg, site)
    doc = site_disclosure(frame, site=site, sensitive=ev.sensitive,
                          min_cell=policy.effective_min_cell(ev.min_cell), n_boot=ev.n_boot,
                          seed=cfg.seed, threshold_rule=ev.threshold, n_bins=ev.histogram_bins,
                          subgroup_summaries=policy.subgroup_summaries, pooled=pooled)
    doc["recalibration"] = recalibration_summary(frame, doc, **recalibration)
    writer.write_disclosed(site, doc)
    return doc


def _pooling(cfg: ExperimentConfig, frames: Mapping[str, pd.DataFrame]) -> dict[str, Any]:
    """What decides which sites' test histograms are pooled in process, and how: each site's
    test rows at its own policy's ``min_cell`` and subgroup summaries, and only a site whose
    policy answers ``secure_sum`` (one place, so the sites that send the pooled form are
    exactly those in the total; a site that refuses the secure sum on the federated engine
    stays out of it here too, and sends its document in full)."""
    ev = cfg.evaluation
    policies = {n: _site_policy(cfg, n) for n in frames}
    return {"tests": {name: frame[frame["split"] == "test"] for name, frame in frames.items()},
            "sensitive": ev.sensitive,
            "min_cell": {n: p.effective_min_cell(ev.min_cell) for n, p in policies.items()},
            "subgroups": {n: p.subgroup_summaries for n, p in policies.items()},
            "secure_sum": {n: p.answers_kind("secure_sum") for n, p in policies.items()},
            "n_bins": ev.histogram_bins,
            "declared": declared_levels(cfg.task, ev.sensitive)}


def _pooled_sites(cfg: ExperimentConfig, frames: Mapping[str, pd.DataFrame]) -> set[str]:
    """The sites whose test histograms the in-process pooled figures add (decided before any
    document is written, as a federated site decides at ``predict``)."""
    return set(pooled_sites_in_process(**_pooling(cfg, frames)))


def _pooled_from_histograms(cfg: ExperimentConfig, frames: Mapping[str, pd.DataFrame],
                            disclosed: Mapping[str, dict[str, Any]], writer_engine: str,
                            pooled_sites: set[str]) -> dict[str, Any]:
    """The histogram-pooled test figures the federated engine reports, here in process.

    The same parts, the same rule of what may be summed and the same coarsening as the
    federated engine's secure sum (:func:`~multimodal_fl.evaluation.histograms.
    pooled_in_process`), each site at its own policy's ``min_cell`` and subgroup summaries.
    Sensitivity and specificity are pooled at one model's one threshold: the centralized
    model's (the sites' median, as its model card says), a local-only run's only when every
    site's model uses the same.

    Raises
    ------
    RuntimeError
        When a site in the total did not send the pooled form (``pooled_sites``): never
        written, the total minus its counts would give another site's hidden ones.
    """
    if not frames:
        return {}
    thresholds = [d["threshold"] for d in disclosed.values()]
    common = statistics.median(thresholds) if writer_engine == "centralized" else (
        thresholds[0] if len(set(thresholds)) == 1 else None)
    out = pooled_in_process(**_pooling(cfg, frames), n_boot=cfg.evaluation.n_boot,
                            seed=cfg.seed, threshold=common,
                            sites=[_site_row(n, d) for n, d in sorted(disclosed.items())]
                            ).to_dict()
    summed = set(out["overall"].get("sites") or []).union(
        *(c.get("sites") or [] for lv in out["subgroups"].values() for c in lv.values()))
    if not summed <= pooled_sites:
        raise RuntimeError(f"pooled figures over {sorted(summed - pooled_sites)}, whose "
                           "documents are not in the pooled form: not written")
    return out


def _site_row(site: str, doc: Mapping[str, Any]) -> dict[str, Any]:
    """One site's test figures as it disclosed them (``metrics.json``'s pooled section)."""
    test = (doc.get("splits") or {}).get("test") or {}
    return {"site": site, "n": test.get("n"), "reason": test.get("reason"),
            "metrics": test.get("metrics") or {}}


def _finish(writer: RunWriter, cfg: ExperimentConfig, sites: Mapping[str, SiteData],
            models: Mapping[str, FusionModel], extra: dict[str, Any],
            recalibration: Recalibration | None = None) -> dict[str, Any]:
    """Write splits, predictions, disclosed documents and metrics; return the metrics document.

    Every site's scores go through ``recalibration`` (``extra["recalibration"]`` says what it
    is, or why there is none) before they are written and disclosed. What leaves a site is
    what a federated site's ``predict`` reply carries: a site whose test histograms are in the
    pooled figures sends the pooled form, and ``metrics.json``'s ``sites`` entry withholds
    what its document withholds (:func:`~multimodal_fl.federated.site.predict_metrics`). No
    figure of all sites' patients is computed from their predictions: the all-sites figures
    are ``pooled_from_histograms`` only, as in the federated engine.
    """
    doc_recal = extra.get("recalibration") or {}
    status = {"method": str(doc_recal.get("method", "none")),
              "applied": recalibration is not None,
              "source": None if recalibration is None else recalibration.source,
              "reason": None if recalibration is not None else doc_recal.get("reason")}
    frames: dict[str, pd.DataFrame] = {}
    for name, data in sites.items():
        if name not in models:
            continue
        writer.write_splits(name, data)
        frames[name] = recalibrated_frame(
            predictions_frame(models[name], data, sensitive=cfg.evaluation.sensitive),
            recalibration)
        writer.write_predictions(name, frames[name])
    pooled_sites = _pooled_sites(cfg, frames)
    per_site: dict[str, Any] = {}
    disclosed: dict[str, dict[str, Any]] = {}
    for name, frame in frames.items():
        disclosed[name] = _disclose(writer, cfg, name, frame, status,
                                    pooled=name in pooled_sites)
        # the site's own small-cell rule, as if its figures left it (the same suppression)
        per_site[name] = predict_metrics(frame, sites[name], disclosed[name],
                                         min_cell=int(disclosed[name]["min_cell"]),
                                         n_boot=cfg.evaluation.n_boot, seed=cfg.seed)[1]
    doc = {
        "seed": cfg.seed,
        "sites": per_site,
        "pooled_from_histograms": _pooled_from_histograms(cfg, frames, disclosed, writer.engine,
                                                          pooled_sites),
        **extra,
    }
    writer.write_metrics(doc)
    out: dict[str, Any] = jsonable({"engine": writer.engine, "config": cfg.name, **doc})
    return out


def _centralized_recalibration(cfg: ExperimentConfig, model: FusionModel,
                               pooled_val: CohortDataset
                               ) -> tuple[Recalibration | None, dict[str, Any]]:
    """The centralized model's recalibration, fitted in process on the pooled validation split.

    The same fit as the federated engine's (:func:`~multimodal_fl.evaluation.recalibration.
    fit_on_scores`: the fine histogram of the validation scores, each bin at its midpoint).
    """
    method = cfg.evaluation.recalibrate
    if method == "none":
        return None, skipped(method, "evaluation.recalibrate: none")
    y = pooled_val.labels.numpy().astype(np.int64)
    try:
        fitted = fit_on_scores(y, predict(model, pooled_val), method=method,
                               n_bins=cfg.evaluation.histogram_bins,
                               source="the pooled validation split of every site (in "
                                      "process)")
    except RecalibrationError as exc:
        return None, skipped(method, str(exc))
    return fitted, {**fitted.to_dict(), "applied": True}


def _writer(cfg: ExperimentConfig, out_dir: str | os.PathLike[str] | None,
            engine: str) -> RunWriter:
    """The run directory's writer, with ``config.yaml`` written."""
    writer = RunWriter(Path(out_dir) if out_dir is not None else default_run_dir(cfg), cfg,
                       engine)
    writer.write_config()
    return writer


def _prepared_sites(cfg: ExperimentConfig, writer: RunWriter,
                    cohorts: Mapping[str, Any] | None,
                    data: Mapping[str, SiteData] | None,
                    progress: ProgressCallback | None) -> dict[str, SiteData]:
    """Every site's prepared data, with the PCA stage's reduction applied when enabled."""
    sites = dict(data) if data is not None else load_site_data(cfg, writer.run_dir,
                                                               cohorts=cohorts,
                                                               progress=progress)
    return _apply_pca_stage(cfg, sites, writer.run_dir)


def _apply_pca_stage(cfg: ExperimentConfig, sites: dict[str, SiteData],
                     run_dir: Path) -> dict[str, SiteData]:
    """The federated PCA stage's reduction, fitted on the sites' training splits (same math).

    The projection is saved as ``pca.safetensors``, as the federated engine saves it: the
    model's inputs need it (``mmfl predict``).
    """
    if not cfg.federated.pca.enabled:
        return sites
    pca = fit_pca_stage(cfg, sites)
    modality = cfg.federated.pca.modality
    save_file(projection_arrays(pca), str(run_dir / "pca.safetensors"),
              metadata={"modality": modality})
    return apply_pca_stage(sites, pca, modality)


def _local_job(federation: Federation, cfg: ExperimentConfig, writer: RunWriter, *,
               transport: str) -> dict[str, Any]:
    """The local-only job's stages over ``federation``; returns the metrics document."""
    t0 = time.perf_counter()
    sites = sorted(federation.sites())
    if not sites:
        raise StageFailed("no sites in the federation")
    doc: dict[str, Any] = {"seed": cfg.seed, "transport": transport}
    if cfg.federated.pca.enabled:
        pca, doc["pca"] = run_pca_stage(federation, cfg, sites)
        save_file(projection_arrays(pca), str(writer.run_dir / "pca.safetensors"),
                  metadata={"modality": doc["pca"]["modality"]})
    trained, notes = local_training_stage(federation, sites, engine=writer.engine)
    t_train = time.perf_counter() - t0
    cross = cross_site_validation(federation, cfg, sites, trained)
    writer.write_cross_site(cross)
    training = {s: r.document(Doc.LOCAL_TRAINING) for s, r in trained.items()}
    doc.update({
        "training": training,
        "history": {s: t["history"] for s, t in training.items()},
        "notes": notes,
        "local_models": cross["models"],
        "cross_site": CROSS_SITE_FILE,
    })
    stage = predict_stage(federation, cfg, sorted(trained), None, 0, writer.engine,
                          predict_config(cfg, None, None, local=True))
    for site, disclosed in stage["disclosed"].items():  # the report's documents
        writer.write_disclosed(site, disclosed)
    doc["recalibration"] = local_summary(cfg, stage.pop("disclosed"))
    doc.update(stage)
    doc["timing_s"] = {"train": t_train, "total": time.perf_counter() - t0}
    return doc


def run_local(cfg: ExperimentConfig, out_dir: str | os.PathLike[str] | None = None, *,
              federation: Federation | None = None,
              cohorts: Mapping[str, Any] | None = None,
              data: Mapping[str, SiteData] | None = None,
              progress: ProgressCallback | None = None,
              transport: str = "inprocess") -> RunOutcome:
    """The local-only job: one model per site, trained, kept and scored at that site.

    Every site trains its own model to completion (the experiment's training settings, early
    stopping on its own validation split; :func:`~multimodal_fl.training.train_local_model`)
    and keeps it in ``sites/<site>/model.safetensors`` at home; the server aggregates nothing.
    Cross-site validation (:mod:`.cross_site`) sends every model its site shares to the other
    sites, which score it on their own test splits; the disclosed cells go to
    ``cross_site.json``. Each site then scores its own model on its own patients at home and
    sends the usual predict reply (``metrics.json``).

    Parameters
    ----------
    cfg : ExperimentConfig
    out_dir : path-like or None
        Run directory (default :func:`default_run_dir`).
    federation : Federation or None
        How the sites are reached (default: every site of ``cfg`` in this process). The
        Flower job (:func:`~multimodal_fl.engines.flower_jobs.local_job`) passes its own.
    cohorts : mapping of site name to SiteCohort or None
        Pre-built cohorts for the in-process sites (default: built from ``cfg.sites``).
    data : mapping of site name to SiteData or None
        Prepared site data for the in-process sites (skips cohort building and preparation).
    progress : callable or None
        Called with :mod:`~multimodal_fl.progress` events of the in-process sites: the data
        preparation, each site's training steps
        (:class:`~multimodal_fl.progress.StepEvent`), each site's answers.
    transport : str
        Recorded in ``metrics.json`` (``inprocess`` or ``flower``).

    Returns
    -------
    RunOutcome
    """
    t0 = time.perf_counter()
    writer = _writer(cfg, out_dir, "local")
    with torch_threads(cfg.training.num_threads):
        if federation is None:
            federation = inprocess_federation(cfg, writer.run_dir, cohorts=cohorts, data=data,
                                              progress=progress)
        t_prep = time.perf_counter() - t0
        doc = _local_job(federation, cfg, writer, transport=transport)
    doc["timing_s"] = {"prepare": t_prep, **doc["timing_s"],
                       "total": time.perf_counter() - t0}
    writer.write_metrics(doc)
    return RunOutcome(writer.run_dir, jsonable({"engine": writer.engine, "config": cfg.name,
                                                **doc}))


def run_centralized(cfg: ExperimentConfig, out_dir: str | os.PathLike[str] | None = None, *,
                    cohorts: Mapping[str, Any] | None = None,
                    data: Mapping[str, SiteData] | None = None,
                    progress: ProgressCallback | None = None,
                    warn: Callable[[str], None] | None = None) -> RunOutcome:
    """Centralized baseline: pool every site's training patients and train one model.

    It moves patient data between hospitals and is only a research baseline: it prints
    :data:`CENTRALIZED_WARNING` when it starts. Splits are the per-site splits (the same as
    every other engine); validation uses the pooled validation patients. What leaves each
    site for ``metrics.json`` and ``disclosed/`` is what a federated site's ``predict`` reply
    carries, in the pooled form where its test histograms are in the pooled figures; the
    all-sites figures are the histogram-pooled ones only.

    Parameters
    ----------
    cfg : ExperimentConfig
    out_dir : path-like or None
        Run directory (default :func:`default_run_dir`).
    cohorts : mapping of site name to SiteCohort or None
    data : mapping of site name to SiteData or None
    progress : callable or None
        Called with :mod:`~multimodal_fl.progress` events: the data preparation, then the
        pooled model's training steps.
    warn : callable or None
        Where the warning goes (default: printed to stderr in yellow).

    Returns
    -------
    RunOutcome
    """
    if warn is None:
        from rich.console import Console

        console = Console(stderr=True)

        def warn(msg: str) -> None:
            console.print(f"[bold yellow]WARNING[/]: {msg}")

    warn(CENTRALIZED_WARNING)
    t0 = time.perf_counter()
    writer = _writer(cfg, out_dir, "centralized")
    with torch_threads(cfg.training.num_threads):
        sites = _prepared_sites(cfg, writer, cohorts, data, progress)
        t_prep = time.perf_counter() - t0
        trains = [sd.train for sd in sites.values()]
        vals = [sd.val for sd in sites.values()]
        pooled_train = CohortDataset.concat(trains)
        pooled_val = CohortDataset.concat(vals)
        if len(pooled_train) == 0:
            raise ValueError("centralized engine: no training patients at any site")
        model = build_model(cfg, pooled_train)
        fit_tabular_standardizer(model, trains)
        result = train_to_completion(cfg, pooled_train, pooled_val, model,
                                     seed_key="centralized", progress=progress,
                                     label="centralized")
        writer.save_model(model)
        t_train = time.perf_counter() - t0 - t_prep
        fitted, recalibration = _centralized_recalibration(cfg, model, pooled_val)
        if fitted is not None:  # mmfl predict applies it
            (writer.run_dir / RECALIBRATION_FILE).write_text(json.dumps(fitted.to_dict(),
                                                                        indent=2))
        doc = _finish(writer, cfg, sites, dict.fromkeys(sites, model), {
            # no training-set total: minus the sites' released sizes it gives a hidden one
            "training": {"centralized": {k: v for k, v in result.to_dict().items()
                                         if k != "n_samples"}},
            "history": {"centralized": result.history},
            "warning": CENTRALIZED_WARNING,
            "recalibration": recalibration,
            "timing_s": {"prepare": t_prep, "train": t_train,
                         "total": time.perf_counter() - t0},
        }, fitted)
    return RunOutcome(writer.run_dir, doc)

