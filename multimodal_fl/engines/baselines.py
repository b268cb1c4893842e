"""The two non-federated baselines: local-only and centralized.

``run_local(cfg)`` trains one model per site on its own data. ``run_centralized(cfg)`` pools
every site's patients into one training set: it moves data between hospitals and is only a
research baseline (it says so when it runs). Both use the same per-site splits
(:func:`~multimodal_fl.training.split_patients`) as the federated engine, and write the run
directory of :mod:`multimodal_fl.rundir`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.numpy import save_file

from multimodal_fl.config import ExperimentConfig, SitePolicy, load_policy
from multimodal_fl.evaluation.metrics import derive_seed
from multimodal_fl.fusion import FusionModel
from multimodal_fl.pca.site import projection_arrays
from multimodal_fl.pca.stage import apply_pca_stage, fit_pca_stage
from multimodal_fl.progress import ProgressCallback, StepEvent
from multimodal_fl.rundir import RunOutcome, RunWriter, default_run_dir, jsonable, site_summary
from multimodal_fl.training import (
    CohortDataset,
    SiteData,
    TrainResult,
    batch_augmenter,
    build_model,
    fit_tabular_standardizer,
    load_site_data,
    metrics_by_split,
    predictions_frame,
    torch_threads,
    train,
)

__all__ = ["CENTRALIZED_WARNING", "run_centralized", "run_local"]

logger = logging.getLogger("multimodal_fl.engines.baselines")

CENTRALIZED_WARNING = (
    "centralized engine: pools every site's patient data in one place. This moves data "
    "between hospitals and is only a research baseline for comparison, never a deployment."
)


def _train_one(cfg: ExperimentConfig, data_train: CohortDataset, data_val: CohortDataset,
               model: Any, *, seed_key: str, progress: ProgressCallback | None,
               label: str) -> TrainResult:
    events: list[StepEvent] = []

    def tick(step: int, loss: float) -> None:
        events[:] = [StepEvent(label, step, cfg.training.steps, loss)]
        if progress is not None:
            progress(events[0])

    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "train", seed_key))
    result = train(model, data_train, data_val, cfg.training, generator=gen,
                   augment=batch_augmenter(cfg, model), progress=tick)
    if progress is not None and events and result.steps < cfg.training.steps:
        # early stopping: the model is done all the same
        progress(StepEvent(label, result.steps, result.steps, events[0].loss))
    return result


def _finish(writer: RunWriter, cfg: ExperimentConfig, sites: Mapping[str, SiteData],
            models: Mapping[str, FusionModel], extra: dict[str, Any]) -> dict[str, Any]:
    """Write splits, predictions and metrics for every site; return the metrics document."""
    per_site: dict[str, Any] = {}
    frames = []
    paths = {s.name: s.path for s in cfg.sites}
    for name, data in sites.items():
        if name not in models:
            continue
        writer.write_splits(name, data)
        frame = predictions_frame(models[name], data, sensitive=cfg.evaluation.sensitive)
        writer.write_predictions(name, frame)
        frames.append(frame.assign(site=name))
        # the site's own small-cell rule, as if its figures left it (the same suppression)
        policy = load_policy(paths[name]) if name in paths else SitePolicy()
        min_cell = policy.effective_min_cell(cfg.evaluation.min_cell)
        per_site[name] = {
            **site_summary(data, min_cell=min_cell),
            "metrics": metrics_by_split(frame, n_boot=cfg.evaluation.n_boot, seed=cfg.seed,
                                        where=name, min_cell=min_cell),
        }
    pooled = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["split", "label", "score"])
    doc = {
        "seed": cfg.seed,
        "sites": per_site,
        "pooled": metrics_by_split(pooled, n_boot=cfg.evaluation.n_boot, seed=cfg.seed,
                                   where="pooled",
                                   min_cell=SitePolicy().effective_min_cell(
                                       cfg.evaluation.min_cell)),
        **extra,
    }
    writer.write_metrics(doc)
    out: dict[str, Any] = jsonable({"engine": writer.engine, "config": cfg.name, **doc})
    return out


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


def _write_cross_predictions(writer: RunWriter, cfg: ExperimentConfig,
                             sites: Mapping[str, SiteData],
                             models: Mapping[str, FusionModel]) -> None:
    """Score every site's local model on every other site's test patients (EXAM's matrix).

    Written as ``sites/<test site>/cross_predictions.csv`` (``model`` = ``local:<site>``): the
    model travels to the test site, the patient-level scores stay in that site's folder.
    """
    for test_site, data in sites.items():
        frames = []
        for model_site, model in models.items():
            if model_site == test_site:
                continue
            frame = predictions_frame(model, data, sensitive=cfg.evaluation.sensitive)
            frame = frame[frame["split"] == "test"]
            frames.append(frame.assign(model=f"local:{model_site}"))
        if frames:
            path = writer.site_dir(test_site) / "cross_predictions.csv"
            pd.concat(frames, ignore_index=True).to_csv(path, index=False)


def run_local(cfg: ExperimentConfig, out_dir: str | os.PathLike[str] | None = None, *,
              cohorts: Mapping[str, Any] | None = None,
              data: Mapping[str, SiteData] | None = None,
              progress: ProgressCallback | None = None) -> RunOutcome:
    """Local-only baseline: one model per site, trained and evaluated on that site's data.

    Each site's model starts from the same seeded initial weights, uses the site's own
    tabular standardisation (its training split) and a generator seeded from (seed, site).

    Parameters
    ----------
    cfg : ExperimentConfig
    out_dir : path-like or None
        Run directory (default :func:`default_run_dir`).
    cohorts : mapping of site name to SiteCohort or None
        Pre-built cohorts (default: built from ``cfg.sites``).
    data : mapping of site name to SiteData or None
        Prepared site data (skips cohort building and preparation).
    progress : callable or None
        Called with :mod:`~multimodal_fl.progress` events: the data preparation, then each
        site's training steps (:class:`~multimodal_fl.progress.StepEvent`).

    Returns
    -------
    RunOutcome
    """
    t0 = time.perf_counter()
    writer = _writer(cfg, out_dir, "local")
    with torch_threads(cfg.training.num_threads):
        sites = _prepared_sites(cfg, writer, cohorts, data, progress)
        t_prep = time.perf_counter() - t0
        models: dict[str, FusionModel] = {}
        results: dict[str, Any] = {}
        notes: dict[str, str] = {}
        for name, sd in sites.items():
            train_part, val_part = sd.train, sd.val
            if len(train_part) == 0:
                notes[name] = "no training patients: no local model"
                logger.warning("site %s: no training patients; skipped", name)
                continue
            model = build_model(cfg, sd)
            fit_tabular_standardizer(model, [train_part])
            results[name] = _train_one(cfg, train_part, val_part, model, seed_key=name,
                                       progress=progress, label=f"local {name}").to_dict()
            models[name] = model
            writer.save_model(model, site=name)
        _write_cross_predictions(writer, cfg, sites, models)
        t_train = time.perf_counter() - t0 - t_prep
        doc = _finish(writer, cfg, sites, models, {
            "training": results,
            "history": {k: v["history"] for k, v in results.items()},
            "notes": notes,
            "timing_s": {"prepare": t_prep, "train": t_train,
                         "total": time.perf_counter() - t0},
        })
    return RunOutcome(writer.run_dir, doc)


def run_centralized(cfg: ExperimentConfig, out_dir: str | os.PathLike[str] | None = None, *,
                    cohorts: Mapping[str, Any] | None = None,
                    data: Mapping[str, SiteData] | None = None,
                    progress: ProgressCallback | None = None,
                    warn: Callable[[str], None] | None = None) -> RunOutcome:
    """Centralized baseline: pool every site's training patients and train one model.

    It moves patient data between hospitals and is only a research baseline: it prints
    :data:`CENTRALIZED_WARNING` when it starts. Splits are the per-site splits (the same as
    every other engine); validation uses the pooled validation patients; metrics are
    reported per site and pooled.

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
        result = _train_one(cfg, pooled_train, pooled_val, model, seed_key="centralized",
                            progress=progress, label="centralized")
        writer.save_model(model)
        t_train = time.perf_counter() - t0 - t_prep
        doc = _finish(writer, cfg, sites, dict.fromkeys(sites, model), {
            "training": {"centralized": result.to_dict()},
            "history": {"centralized": result.history},
            "warning": CENTRALIZED_WARNING,
            "timing_s": {"prepare": t_prep, "train": t_train,
                         "total": time.perf_counter() - t0},
        })
    return RunOutcome(writer.run_dir, doc)

