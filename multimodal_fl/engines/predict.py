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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from safetensors import SafetensorError
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file as load_torch

from multimodal_fl.config import ExperimentConfig, load_config
from multimodal_fl.data import build_cohort
from multimodal_fl.engines.finish import model_files, model_thresholds, read_model_card
from multimodal_fl.engines.recalibration import RECALIBRATION_FILE
from multimodal_fl.evaluation.recalibration import Recalibration, RecalibrationError
from multimodal_fl.pca.site import project_site_data
from multimodal_fl.rundir import RunDirError, read_manifest
from multimodal_fl.training import (
    SiteData,
    build_model,
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
    model : str
        Which weights, in words.
    site : str
    excluded : int
        Patients read but not scored (outside the task's cohort, or no usable modality).
    recalibration : str
        The recalibration applied to ``score`` (``score_raw`` is the model's own), in words.
    """

    frame: pd.DataFrame
    threshold: float
    threshold_source: str
    model: str
    site: str
    excluded: int
    recalibration: str = "none"


def _run_config(run: Path) -> tuple[ExperimentConfig, str]:
    """The run's configuration and engine; refuses a run that did not complete."""
    if not (run / "config.yaml").is_file():
        raise PredictError(f"{run}: not a run directory (no config.yaml); run `mmfl train` first")
    try:
        manifest = read_manifest(run)
    except RunDirError as exc:
        raise PredictError(str(exc)) from None
    if manifest is not None and manifest.status != "completed":
        raise PredictError(f"{run}: the run is {manifest.status}, it has no final model; "
                           "finish it (mmfl train --resume RUN_DIR) first")
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


def _threshold(run: Path, cfg: ExperimentConfig, engine: str,
               model_site: str | None) -> tuple[float, str]:
    """The run's threshold for the chosen model (the card's; chosen afresh without one)."""
    card = read_model_card(run)
    doc = card["threshold"] if card is not None else model_thresholds(
        run, engine, cfg.evaluation.threshold)
    values: dict[str, float] = doc["values"]
    if model_site is not None:
        return float(values[model_site]), str(doc["source"])
    if "global" in doc:  # the sites' common threshold, else their median
        return float(doc["global"]), str(doc["source"])
    distinct = sorted(set(values.values()))
    if len(distinct) != 1:
        raise PredictError(f"{run}: the run has one threshold per site ({values}); a global "
                           "model needs one")
    return float(distinct[0]), str(doc["source"])


def _recalibration(run: Path, engine: str, model_site: str | None) -> Recalibration | None:
    """The run's stored recalibration of the chosen model (``None``: it applied none)."""
    folder = run / "sites" / model_site if engine == "local" and model_site else run
    path = folder / RECALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        return Recalibration.from_dict(json.loads(path.read_text()), where=str(path))
    except (ValueError, RecalibrationError) as exc:
        raise PredictError(str(exc)) from None


def _site_data(run: Path, cfg: ExperimentConfig, site_dir: Path, name: str) -> tuple[SiteData, int]:
    """The site's cohort, prepared as the run's training data was; and how many were left out."""
    cohort = build_cohort(site_dir, cfg.task, data=cfg.data, site_name=name)
    if cohort.n_patients == 0:
        raise PredictError(f"site {name} ({site_dir}): no patient of task {cfg.task.name!r}; "
                           f"excluded: {cohort.counts.get('excluded_by_reason', {})}")
    data = prepare_site_data(cohort, cfg, cache=None, site=name, site_dir=site_dir)
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
    excluded = sum(cohort.counts.get("excluded_by_reason", {}).values()) + len(data.dropped)
    return data, excluded


def predict_site(run_dir: str | os.PathLike[str], site_dir: str | os.PathLike[str], *,
                 model_site: str | None = None, site_name: str | None = None) -> Prediction:
    """Score every patient of a site with a completed run's model, at the run's threshold.

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

    Returns
    -------
    Prediction

    Raises
    ------
    PredictError
        For a run that cannot be used as asked (the message says why and what to do).
    multimodal_fl.data.DataError
        For unreadable site data under ``data.on_error: fail``.
    """
    run, site = Path(run_dir), Path(site_dir)
    if not site.is_dir():
        raise PredictError(f"site directory {site} does not exist or is not a directory")
    cfg, engine = _run_config(run)
    weights_path, model = _weights(run, engine, model_site)
    threshold, source = _threshold(run, cfg, engine, model_site)
    name = site_name or site.resolve().name
    with torch_threads(cfg.training.num_threads):
        data, excluded = _site_data(run, cfg, site, name)
        net = build_model(cfg, data)
        try:
            weights = load_torch(str(weights_path))
        except (SafetensorError, OSError) as exc:
            raise PredictError(f"{weights_path}: not a readable model file ({exc}); was the "
                               "run stopped while writing it?") from None
        try:
            load_weights(net, weights)
        except ValueError as exc:
            raise PredictError(f"{weights_path}: {exc} (the site's data gives the model "
                               "other inputs than the run's)") from None
        raw = predict(net, data.dataset, device=cfg.training.device)
    recalibration = _recalibration(run, engine, model_site)
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
    return Prediction(frame, threshold, source, model, name, excluded, how)
