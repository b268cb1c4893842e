"""Use a trained model: score a site's patients with a completed run's model (``mmfl predict``).

:func:`predict_site` reads the run's saved ``config.yaml`` (the task, the modalities), builds
the site's cohort for that task, prepares it as training did (frozen embeddings, the run's
PCA projection when it had one), loads the run's weights and scores every patient; the
predicted class is ``score >= threshold`` at the run's threshold (its model card's, chosen
as its report chooses it). Nothing is written into the run directory.

Which model: a federated or centralized run has one global model. A local-only run has one
model per site; ``model_site`` names the one to use (and its own threshold), and without it
the run is refused. A FedBN run is refused: its normalisation layers stayed at the training
sites, so the global weights have none trained for a new site.

Recalibration: the run's own (``RUN_DIR/recalibration.json``, fitted on the training sites'
pooled validation split; a local-only model's ``RUN_DIR/sites/<site>/recalibration.json``,
fitted at its site) is applied, as the run applied it before its predictions and thresholds;
``score_raw`` keeps the model's own score. It is not refitted for the new site.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from safetensors import SafetensorError
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file as load_torch

from multimodal_fl.config import ExperimentConfig, load_config
from multimodal_fl.data import build_cohort
from multimodal_fl.data.cohort import empty_site_message
from multimodal_fl.data.sites import discover_site
from multimodal_fl.engines.finish import model_files, model_thresholds, read_model_card
from multimodal_fl.engines.recalibration import RECALIBRATION_FILE
from multimodal_fl.evaluation.recalibration import Recalibration, RecalibrationError
from multimodal_fl.pca.site import project_site_data
from multimodal_fl.progress import PrepareEvent, ProgressCallback
from multimodal_fl.rundir import RunDirError, describe_status, read_manifest
from multimodal_fl.training import (
    SiteData,
    build_model,
    enabled_modalities,
    load_weights,
    predict,
    prepare_site_data,
    torch_threads,
)

__all__ = ["PREDICTION_COLUMNS", "PredictError", "Prediction", "predict_site"]

#: Columns of the file ``mmfl predict`` writes.
PREDICTION_COLUMNS: tuple[str, ...] = ("patient_id", "score", "score_raw", "label", "predicted")


class PredictError(ValueError):
    """A run or site that cannot be scored as asked (one line naming it and the way out)."""


@dataclass(frozen=True)
class Prediction:
    """One site scored with a run's model.

    Attributes
    ----------
    frame : pandas.DataFrame
        :data:`PREDICTION_COLUMNS`, one row per patient: ``label`` is the task's label as the
        site's records give it, ``predicted`` is ``score >= threshold``.
    threshold : float
    threshold_source : str
        Where the threshold comes from and why it is the one applied, in words (the model
        card's note for a global model: the sites' common value, or their median).
    model : str
        Which weights, in words.
    site : str
    excluded : int
        Patients read but not scored (outside the task's cohort, or no usable modality).
    recalibration : str
        The recalibration applied to ``score`` (``score_raw`` is the model's own), in words.
    skipped : dict of str to int
        Records skipped while the site was read, by reason.
    not_scored : dict of str to int
        The patients not scored, by reason (they add up to ``excluded``).
    modalities : dict of str to int
        Per modality of the model, the scored patients that have it.
    dropped : dict of str to str
        The patients read into the cohort but not scored (no usable modality), with the reason.
    features_without_value : list of str
        The task's tabular features (when the model has the tabular modality) that no patient
        of the site has a value of: the model sees each as missing for everyone.
    """

    frame: pd.DataFrame
    threshold: float
    threshold_source: str
    model: str
    site: str
    excluded: int
    recalibration: str = "none"
    skipped: dict[str, int] = field(default_factory=dict)
    not_scored: dict[str, int] = field(default_factory=dict)
    modalities: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    features_without_value: list[str] = field(default_factory=list)


def _run_config(run: Path) -> tuple[ExperimentConfig, str]:
    """The run's configuration and engine; refuses a run that did not complete."""
    if not (run / "config.yaml").is_file():
        raise PredictError(f"{run}: not a run directory (no config.yaml); run `mmfl train` first")
    try:
        manifest = read_manifest(run)
    except RunDirError as exc:
        raise PredictError(str(exc)) from None
    if manifest is not None and manifest.status != "completed":
        raise PredictError(f"{run}: the run is {describe_status(run, manifest)}; it has no "
                           "final model: finish it (mmfl train --resume RUN_DIR) first")
    cfg = load_config(run / "config.yaml", saved=True)
    engine = manifest.engine if manifest is not None else cfg.federated.engine
    if cfg.federated.fedbn and engine in ("inprocess", "flower"):
        raise PredictError(f"{run}: a FedBN run keeps its normalisation layers at the training "
                           "sites, so its global model has none for a new site; train without "
                           "federated.fedbn to get a model to use elsewhere")
    return cfg, engine


def _weights(run: Path, engine: str, model_site: str | None) -> tuple[Path, str]:
    """The weights file and how to name it; the local engine needs ``model_site``."""
    files = model_files(run, engine)
    if engine == "local":
        sites = ", ".join(sorted(files)) or "none saved"
        if model_site is None:
            raise PredictError(f"{run}: a local-only run has one model per site ({sites}); "
                               "choose one with --model-site SITE")
        if model_site not in files:
            raise PredictError(f"--model-site {model_site!r}: {run} has models of {sites}")
        return run / files[model_site], f"the local model of site {model_site}"
    if model_site is not None:
        raise PredictError(f"--model-site: {run} is a {engine} run with one global model; "
                           "leave --model-site out")
    if "global" not in files:
        raise PredictError(f"{run}: no model.safetensors; the run did not save a model")
    return run / files["global"], f"the global model of the {engine} run"


def _read_weights(path: Path) -> dict[str, Any]:
    """The model file's tensors (read before any data: a file cut short is named at once)."""
    try:
        return load_torch(str(path))
    except (SafetensorError, OSError) as exc:
        raise PredictError(f"{path}: not a readable model file ({exc}); was the run stopped "
                           "while writing it?") from None


def _site_part(source: str, site: str) -> str:
    """A site's own clause of a per-site threshold source (``per site: a: ...; b: ...``)."""
    for part in source.removeprefix("per site: ").split("; "):
        if part.startswith(f"{site}: "):
            return part.removeprefix(f"{site}: ")
    return source


def _threshold(run: Path, cfg: ExperimentConfig, engine: str, model_site: str | None,
               own: str | None = None) -> tuple[float, str]:
    """The run's threshold for the chosen model (the card's; chosen afresh without one), and
    where it comes from in words (the card's note on a global model's: common value or median).

    ``own`` names a training site whose own threshold (the one its report applied) is used
    instead of a global model's.
    """
    card = read_model_card(run)
    doc = card["threshold"] if card is not None else model_thresholds(
        run, engine, cfg.evaluation.threshold)
    values: dict[str, float] = doc["values"]
    source = str(doc["source"])
    if model_site is not None:
        return float(values[model_site]), f"site {model_site}'s: " + _site_part(
            source, model_site)
    if own is not None:
        if own not in values:
            raise PredictError(f"--own-threshold: {own!r} is not a training site of {run} "
                               f"(its sites: {', '.join(sorted(values))}); give --site-name "
                               "SITE of one of them, or leave --own-threshold out")
        return float(values[own]), (f"site {own}'s own, as its report applied it: "
                                    + _site_part(source, own))
    notes = "; ".join(doc.get("notes") or [])
    if "global" in doc:  # the sites' common threshold, else their median
        return float(doc["global"]), notes or f"the sites' common threshold ({source})"
    distinct = sorted(set(values.values()))
    if len(distinct) != 1:
        raise PredictError(f"{run}: the run has one threshold per site ({values}); a global "
                           "model needs one")
    return float(distinct[0]), notes or f"the sites' common threshold ({source})"


def _recorded(run: Path, engine: str, model_site: str | None) -> dict[str, Any] | None:
    """What the run recorded of its recalibration (``metrics.json``, else the model card)."""
    doc: dict[str, Any] | None = None
    for name in ("metrics.json", "model_card.json"):
        path = run / name
        if path.is_file():
            try:
                doc = json.loads(path.read_text()).get("recalibration")
            except (ValueError, AttributeError):
                doc = None
            if doc is not None:
                break
    if not isinstance(doc, dict):
        return None
    if engine == "local":
        site = (doc.get("sites") or {}).get(model_site or "")
        return {"method": doc.get("method"), **site} if isinstance(site, dict) else None
    return doc


def _recalibration(run: Path, engine: str, model_site: str | None) -> Recalibration | None:
    """The run's stored recalibration of the chosen model (``None``: it applied none).

    A run that recorded its recalibration as applied but whose file is missing is refused:
    scoring it raw would apply a threshold chosen on recalibrated scores to raw ones.
    """
    folder = run / "sites" / model_site if engine == "local" and model_site else run
    path = folder / RECALIBRATION_FILE
    if not path.is_file():
        record = _recorded(run, engine, model_site)
        if record is not None and record.get("applied"):
            fitted = ", ".join(f"{k}={record[k]:.4g}" for k in ("a", "b")
                               if isinstance(record.get(k), float))
            raise PredictError(
                f"{path}: missing, but the run recorded its recalibration as applied "
                f"({record.get('method', 'recalibration')}{', ' + fitted if fitted else ''}, "
                f"fitted on {record.get('source')}): its threshold is one of recalibrated "
                "scores; restore the file from the run's original directory (copy a run "
                "whole)")
        return None
    try:
        return Recalibration.from_dict(json.loads(path.read_text()), where=str(path))
    except (ValueError, RecalibrationError) as exc:
        raise PredictError(str(exc)) from None


@dataclass(frozen=True)
class _Prepared:
    """The site's data prepared for the model, and what reading it left out."""

    data: SiteData
    skipped: dict[str, int]
    not_scored: dict[str, int]
    unvalued: list[str]


def _cohort(cfg: ExperimentConfig, site_dir: Path, name: str,
            progress: ProgressCallback | None) -> Any:
    """The site's cohort for the run's task (refused when it has no patient of the task)."""
    def files_read(site: str, done: int, total: int) -> None:
        if progress is not None:
            progress(PrepareEvent(site, "records", "read", done, total))

    cohort = build_cohort(site_dir, cfg.task, data=cfg.data, site_name=name,
                          progress=files_read)
    if cohort.n_patients == 0:
        raise PredictError(empty_site_message(name, cohort.counts)
                           + f" for the run's task {cfg.task.name!r} ({site_dir}): is it a "
                           "site of this task?")
    return cohort


def _site_data(run: Path, cfg: ExperimentConfig, site_dir: Path, name: str,
               progress: ProgressCallback | None = None) -> _Prepared:
    """The site's cohort, prepared as the run's training data was; and what was left out."""
    cohort = _cohort(cfg, site_dir, name, progress)
    data = prepare_site_data(cohort, cfg, cache=None, site=name, site_dir=site_dir,
                             progress=progress)
    if len(data.dataset) == 0:
        raise PredictError(f"site {name} ({site_dir}): none of its {cohort.n_patients} "
                           f"patient(s) of task {cfg.task.name!r} has any of the model's "
                           f"modalities ({', '.join(enabled_modalities(cfg))})")
    if cfg.federated.pca.enabled:
        projection = run / "pca.safetensors"
        if not projection.is_file():
            raise PredictError(f"{run}: federated.pca is enabled but the run has no "
                               "pca.safetensors (the projection its model's inputs need)")
        try:
            stored = load_numpy(str(projection))
        except (SafetensorError, OSError) as exc:
            raise PredictError(f"{projection}: not a readable projection ({exc})") from None
        data = project_site_data(data, cfg.federated.pca.modality, stored)
    not_scored = {f"excluded: {k}": int(v)
                  for k, v in cohort.counts.get("excluded_by_reason", {}).items() if v}
    for reason in data.dropped.values():
        not_scored[reason] = not_scored.get(reason, 0) + 1
    skipped = {k: int(v) for k, v in cohort.counts.get("skipped_by_reason", {}).items() if v}
    unvalued = (list(cohort.counts.get("features_without_value", []))
                if "tabular" in enabled_modalities(cfg) else [])
    return _Prepared(data, skipped, not_scored, unvalued)


def predict_site(run_dir: str | os.PathLike[str], site_dir: str | os.PathLike[str], *,
                 model_site: str | None = None, site_name: str | None = None,
                 own_threshold: bool = False,
                 progress: ProgressCallback | None = None) -> Prediction:
    """Score every patient of a site with a completed run's model, at the run's threshold.

    The run, its model file, its threshold and its recalibration are checked before the
    site's data is read (reading and preparing it is the long part).

    Parameters
    ----------
    run_dir : path-like
        A completed run (federated, centralized, or local-only with ``model_site``).
    site_dir : path-like
        A site directory (the data contract of ``docs/data-contract.md``).
    model_site : str or None
        For a local-only run: whose model to use.
    site_name : str or None
        The site's name in the output (default: the folder's name).
    own_threshold : bool
        A global model's score at the threshold the training site ``site_name`` chose for
        itself (the one its own report applied) instead of the run's global one.
    progress : callable or None
        Called with :class:`~multimodal_fl.progress.PrepareEvent` as the site's FHIR files
        are read and its modalities prepared (as ``mmfl train`` shows them).

    Returns
    -------
    Prediction

    Raises
    ------
    PredictError
        For a run that cannot be used as asked (the message says why and what to do).
    multimodal_fl.data.DataError
        For a folder that is not a site directory (a run, a folder of sites, an empty one),
        and for unreadable site data under ``data.on_error: fail``.
    """
    run, site = Path(run_dir), Path(site_dir)
    if not site.is_dir():
        raise PredictError(f"site directory {site} does not exist or is not a directory")
    discover_site(site)  # a run directory or a cohort's root is no site: said at once
    cfg, engine = _run_config(run)
    weights_path, model = _weights(run, engine, model_site)
    name = site_name or site.resolve().name
    if own_threshold and engine == "local":
        raise PredictError("--own-threshold: a local-only model is scored at its own site's "
                           "threshold already; leave --own-threshold out")
    threshold, source = _threshold(run, cfg, engine, model_site,
                                   own=name if own_threshold else None)
    recalibration = _recalibration(run, engine, model_site)
    weights = _read_weights(weights_path)
    with torch_threads(cfg.training.num_threads):
        prepared = _site_data(run, cfg, site, name, progress)
        data = prepared.data
        net = build_model(cfg, data)
        try:
            load_weights(net, weights)
        except ValueError as exc:
            raise PredictError(f"{weights_path}: {exc} (the site's data gives the model "
                               "other inputs than the run's)") from None
        raw = predict(net, data.dataset, device=cfg.training.device)
    scores = raw if recalibration is None else recalibration.apply(raw)
    frame = pd.DataFrame({
        "patient_id": data.dataset.patient_ids,
        "score": scores,
        "score_raw": raw,
        "label": data.dataset.labels.int().numpy(),
        "predicted": (scores >= threshold).astype(np.int64),
    })
    how = "none" if recalibration is None else (
        f"{recalibration.method} (a={recalibration.a:.4g}, b={recalibration.b:.4g})")
    return Prediction(frame, threshold, source, model, name,
                      sum(prepared.not_scored.values()), how, skipped=prepared.skipped,
                      not_scored=prepared.not_scored,
                      modalities=data.dataset.modality_counts(),
                      dropped=dict(data.dropped),
                      features_without_value=prepared.unvalued)
