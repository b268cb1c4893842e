"""The run directory: its layout, the writer, and what the server side of a run may hold.

Every engine writes the same layout, so runs compare directly::

    RUN_DIR/                      default runs/<config-name>-<YYYYmmdd-HHMMSS>
      config.yaml                 the resolved configuration
      metrics.json                engine, per-site metrics per split, training history
      model.safetensors           the model (centralized, federated)
      cache/<site>/...            embedding cache (unless data.cache_dir or $MMFL_CACHE is set)
      sites/<site>/
        splits.json               patient -> train/val/test, with counts
        predictions.csv           patient_id, split, label, score, sex, age_band, age, ...
        model.safetensors         the site's own model (local engine)

Patient-level rows (splits, predictions) are written only under ``sites/<site>/``: in a
deployment that folder is at the hospital. The server side holds weights, counts, metrics and
aggregate summaries.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from multimodal_fl.config import ExperimentConfig
from multimodal_fl.evaluation.metrics import MetricValue
from multimodal_fl.training import SPLITS, SiteData

__all__ = [
    "RunOutcome",
    "RunWriter",
    "default_run_dir",
    "jsonable",
    "save_model",
    "site_summary",
]


def default_run_dir(cfg: ExperimentConfig, root: str | os.PathLike[str] = "runs",
                    *, now: datetime | None = None) -> Path:
    """``<root>/<config-name>-<YYYYmmdd-HHMMSS>`` (UTC); a numeric suffix avoids collisions.

    Parameters
    ----------
    cfg : ExperimentConfig
        Its ``name`` (the config file stem by default) names the run.
    root : path-like, default "runs"
    now : datetime or None
        Timestamp (default: now, UTC).

    Returns
    -------
    Path
        A directory that does not exist yet.
    """
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{cfg.name or 'run'}-{stamp}"
    path, k = base, 1
    while path.exists():
        k += 1
        path = base.with_name(f"{base.name}-{k}")
    return path


def _contiguous_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def save_model(model: nn.Module, path: str | os.PathLike[str],
               metadata: Mapping[str, str] | None = None) -> Path:
    """Write the model's ``state_dict`` (buffers included) to a safetensors file.

    Parameters
    ----------
    model : nn.Module
    path : path-like
    metadata : mapping of str to str or None
        Stored in the file header as one JSON string under the key ``multimodal_fl``
        (one key, sorted: safetensors writes several keys in a random order, which would
        make equal weights give different files). Keep timestamps out of it.

    Returns
    -------
    Path
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    header = {"multimodal_fl": json.dumps(dict(metadata or {}), sort_keys=True)}
    save_file(_contiguous_state(model), str(p), metadata=header)
    return p


class RunWriter:
    """Writes one run directory (see the module docstring for the layout).

    Parameters
    ----------
    run_dir : path-like
        Created if needed.
    cfg : ExperimentConfig
        The resolved configuration.
    engine : str
        ``local``, ``centralized``, ``inprocess`` or ``flower``.
    """

    def __init__(self, run_dir: str | os.PathLike[str], cfg: ExperimentConfig, engine: str) -> None:
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.engine = engine
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def site_dir(self, site: str) -> Path:
        """``RUN_DIR/sites/<site>`` (created)."""
        d = self.run_dir / "sites" / site
        d.mkdir(parents=True, exist_ok=True)
        return d

    def write_config(self) -> Path:
        """Write ``config.yaml`` (the resolved configuration, engine included)."""
        data = self.cfg.resolved_dict()
        data.setdefault("federated", {})["engine"] = self.engine
        path = self.run_dir / "config.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def save_model(self, model: nn.Module, site: str | None = None) -> Path:
        """Write ``model.safetensors`` (``sites/<site>/model.safetensors`` for a site's model)."""
        folder = self.site_dir(site) if site is not None else self.run_dir
        meta = {"engine": self.engine, "config": self.cfg.name or ""}
        if site is not None:
            meta["site"] = site
        return save_model(model, folder / "model.safetensors", meta)

    def write_splits(self, site: str, data: SiteData) -> Path:
        """Write ``sites/<site>/splits.json``: seed, fractions, counts and the assignment."""
        labels = dict(zip(data.dataset.patient_ids, data.dataset.labels.int().tolist(),
                          strict=True))
        counts = {
            s: {
                "n": sum(1 for v in data.splits.values() if v == s),
                "n_pos": sum(labels[p] for p, v in data.splits.items() if v == s),
            }
            for s in SPLITS
        }
        doc = {
            "site": site,
            "seed": self.cfg.seed,
            "fractions": self.cfg.training.split.model_dump(),
            "rule": "sha256(seed, site, patient_id), stratified by label (training.split_patients)",
            "counts": counts,
            "dropped": data.dropped,
            "image_unreadable": data.image_errors,
            "notes": data.notes,
            "splits": dict(sorted(data.splits.items())),
        }
        path = self.site_dir(site) / "splits.json"
        path.write_text(json.dumps(doc, indent=2))
        return path

    def write_predictions(self, site: str, frame: pd.DataFrame) -> Path:
        """Write ``sites/<site>/predictions.csv``."""
        path = self.site_dir(site) / "predictions.csv"
        frame.to_csv(path, index=False)
        return path

    def write_metrics(self, metrics: Mapping[str, Any]) -> Path:
        """Write ``metrics.json`` (``engine`` and ``config`` added)."""
        doc = {"engine": self.engine, "config": self.cfg.name, **metrics}
        path = self.run_dir / "metrics.json"
        path.write_text(json.dumps(jsonable(doc), indent=2))
        return path


def jsonable(obj: Any) -> Any:
    """A document made JSON-safe: metric values as dicts, numpy scalars as Python numbers,
    non-finite floats as ``None``, keys as strings.

    Parameters
    ----------
    obj : Any

    Returns
    -------
    Any
    """
    if isinstance(obj, MetricValue):
        return obj.to_dict()
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    return obj


@dataclass
class RunOutcome:
    """Result of an engine run.

    Attributes
    ----------
    run_dir : Path
        The run directory written.
    metrics : dict
        What ``metrics.json`` holds.
    """

    run_dir: Path
    metrics: dict[str, Any]


def site_summary(data: SiteData) -> dict[str, Any]:
    """A site's cohort in counts (what ``metrics.json`` shows per site).

    Parameters
    ----------
    data : SiteData

    Returns
    -------
    dict
        ``n_patients``, ``n_positive``, ``modality_counts``, ``dropped``, ``image_errors``.
    """
    return {
        "n_patients": len(data.dataset),
        "n_positive": int(data.dataset.labels.sum()),
        "modality_counts": data.dataset.modality_counts(),
        "dropped": len(data.dropped),
        "image_errors": len(data.image_errors),
    }

