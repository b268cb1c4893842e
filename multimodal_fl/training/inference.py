"""Inference: predicted probabilities, metrics, and the per-patient predictions table.

:func:`predict` gives probabilities; :func:`evaluate` gives AUC, average precision, Brier and
ECE (via :mod:`multimodal_fl.evaluation.metrics`); :func:`predictions_frame` is one row per
patient of a site (split, label, score, sensitive attributes) and :func:`metrics_by_split`
the metrics of each split of such a table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import pandas as pd
import torch

from multimodal_fl.evaluation.disclosed import class_reason, split_suppression
from multimodal_fl.evaluation.metrics import (
    MetricValue,
    binary_metrics,
    bootstrap_seed,
)
from multimodal_fl.fusion import FusionModel
from multimodal_fl.training.dataset import CohortDataset, SiteData
from multimodal_fl.training.model import resolve_device
from multimodal_fl.training.splits import SPLITS

__all__ = ["EVAL_METRICS", "SENSITIVE_COLUMNS", "check_sensitive", "evaluate", "metrics_by_split",
           "predict", "predictions_frame"]

#: Metrics :func:`evaluate` reports.
EVAL_METRICS: tuple[str, ...] = ("auc", "average_precision", "brier", "ece")

#: The cohort columns a subgroup (``evaluation.sensitive``) may be: the categorical attributes
#: :func:`predictions_frame` carries (the cohort's ``META_COLUMNS`` less the identifiers and
#: ``age``).
SENSITIVE_COLUMNS: tuple[str, ...] = ("sex", "age_band")


def check_sensitive(sensitive: Sequence[str]) -> None:
    """Refuse, before any site data is read, an ``evaluation.sensitive`` no site can have.

    Every site's cohort has the same columns, and the predictions carry only
    :data:`SENSITIVE_COLUMNS` of them as attributes, so a name outside them (a typo such as
    ``sexx``, a feature) would give no subgroup anywhere, and ``age`` would make one level per
    patient, each labelled with that patient's age.

    Parameters
    ----------
    sensitive : sequence of str
        ``evaluation.sensitive``.

    Raises
    ------
    ValueError
        One line naming the column and what may be named instead.
    """
    for name in sensitive:
        if name in SENSITIVE_COLUMNS:
            continue
        if name == "age":
            raise ValueError("evaluation.sensitive: 'age' is continuous (one level per patient, "
                             "each level's label a patient's age); use 'age_band', the age in "
                             "the task's bands (task.age_bands)")
        raise ValueError(f"evaluation.sensitive: {name!r} is not a subgroup column of the "
                         f"cohort; it may name {', '.join(SENSITIVE_COLUMNS)}")


@torch.no_grad()
def predict(
    model: FusionModel,
    data: CohortDataset,
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Predicted probabilities, one per row of ``data``.

    Parameters
    ----------
    model : FusionModel
    data : CohortDataset
    batch_size : int, default 256
    device : str, torch.device or None
        Default: the model's device.

    Returns
    -------
    ndarray of float64, shape (len(data),)
    """
    dev = resolve_device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    model.to(dev)
    out: list[np.ndarray] = []
    try:
        for b in data.batches(batch_size):
            b = b.to(dev)
            logits = model(b.inputs, b.mask, patient_ids=b.patient_ids)
            out.append(torch.sigmoid(logits.double()).cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float64)


def evaluate(
    model: FusionModel,
    data: CohortDataset,
    *,
    metrics: Sequence[str] = EVAL_METRICS,
    n_boot: int = 0,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> dict[str, MetricValue]:
    """AUC, average precision, Brier score and ECE of the model on ``data``.

    An undefined metric (no patients, no positives or no negatives) is a
    :class:`~multimodal_fl.evaluation.metrics.MetricValue` with ``value=None`` and its
    ``reason``, never a number.

    Parameters
    ----------
    model : FusionModel
    data : CohortDataset
    metrics : sequence of str
        Subset of :data:`EVAL_METRICS` (threshold-free metrics).
    n_boot : int, default 0
        Bootstrap resamples for 95% intervals.
    seed : int, default 0
        Bootstrap seed.
    device : str, torch.device or None

    Returns
    -------
    dict of str to MetricValue
    """
    scores = predict(model, data, device=device)
    return binary_metrics(
        data.labels.numpy().astype(np.int64), scores, metrics=list(metrics), n_boot=n_boot,
        seed=seed,
    )


def predictions_frame(model: FusionModel, data: SiteData, *,
                      sensitive: tuple[str, ...] | list[str] = ()) -> pd.DataFrame:
    """One row per patient: ``patient_id, split, label, score`` and the sensitive attributes.

    Parameters
    ----------
    model : FusionModel
    data : SiteData
    sensitive : sequence of str
        Extra attribute columns to copy when present (``sex``, ``age_band`` and ``age`` are
        always copied when present).

    Returns
    -------
    DataFrame
    """
    ds = data.dataset
    scores = predict(model, ds)
    frame = pd.DataFrame({
        "patient_id": ds.patient_ids,
        "split": [data.splits[p] for p in ds.patient_ids],
        "label": ds.labels.int().numpy(),
        "score": scores,
    })
    for col in ("sex", "age_band", "age", *sensitive):
        if col in ds.meta.columns and col not in frame.columns:
            frame[col] = ds.meta[col].to_numpy()
    return frame


def metrics_by_split(frame: pd.DataFrame, *, n_boot: int = 0, seed: int = 0,
                     min_cell: int = 0) -> dict[str, dict[str, MetricValue]]:
    """AUC, AP, Brier and ECE per split of a :func:`predictions_frame` (undefined ones say why).

    Under the small-cell rule (``min_cell > 0``) a split of fewer than ``min_cell`` patients
    shows no figure and no count (every metric undefined, reason ``"fewer than <min_cell>
    patients"``); a larger split is shown, since its size leaves the site anyway (the training
    count with every ``fit``), and the site's total is withheld instead where the small splits
    would follow from it (:func:`~multimodal_fl.evaluation.disclosed.split_suppression`); AUC
    and average precision also
    need ``min_cell`` patients of each class
    (:func:`~multimodal_fl.evaluation.disclosed.class_reason`, the rule of the site's report
    document), so the console, ``metrics.json`` and the report hide the same cells.

    Parameters
    ----------
    frame : DataFrame
        With ``split``, ``label`` and ``score`` columns.
    n_boot : int, default 0
        Bootstrap resamples for 95% intervals.
    seed : int, default 0
        Base seed; a split's bootstrap is seeded by it and the split's scores
        (:func:`~multimodal_fl.evaluation.metrics.bootstrap_seed`), as the site's disclosed
        document and the report's cells are, so they show the same interval.
    min_cell : int, default 0
        The small-cell threshold in force (0: none).

    Returns
    -------
    dict
        ``{split: {metric: MetricValue}}`` for train, val, test.
    """
    parts = {s: frame[frame["split"] == s] for s in SPLITS}
    hidden = split_suppression(frame, min_cell=min_cell).hidden if min_cell > 0 else {}
    out: dict[str, dict[str, MetricValue]] = {}
    for s, part in parts.items():
        if s in hidden:
            out[s] = {m: MetricValue.undefined(hidden[s]) for m in EVAL_METRICS}
            continue
        y = part["label"].to_numpy(dtype=np.int64)
        scores = part["score"].to_numpy(dtype=np.float64)
        out[s] = binary_metrics(
            y, scores, metrics=list(EVAL_METRICS), n_boot=n_boot,
            seed=bootstrap_seed(seed, scores), min_cell=min_cell,
        )
        if min_cell > 0:  # the rule of the site's report document: a class metric needs
            n_pos = int(y.sum())  # min_cell patients of each class
            for metric in out[s]:
                why = class_reason(metric, n_pos, int(y.size) - n_pos, min_cell)
                if why is not None and out[s][metric].value is not None:
                    out[s][metric] = replace(out[s][metric], value=None, lo=None, hi=None,
                                             reason=why, n_boot=0, n_skipped=0)
    return out
