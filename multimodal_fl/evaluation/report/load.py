"""Read run directories for the report: typed config, metrics and the sites' predictions.

A run directory, as ``mmfl train`` writes it::

    RUN_DIR/run.json                      the manifest (engine, data fingerprints, run id, ...)
    RUN_DIR/config.yaml                   resolved config (evaluation.sensitive, min_cell, ...)
    RUN_DIR/metrics.json                  "engine"; "rounds" (federated) or "history" (others)
    RUN_DIR/sites/<site>/predictions.csv  patient_id, split, label, score, sex, age_band, ...
                                          optional "model" column (default: the run's model,
                                          or "local:<site>" for the local engine)
    RUN_DIR/cross_site.json               optional (local engine): the cross-site matrix
                                          cells the sites disclosed (model, test_site,
                                          value, lo, hi, n, suppressed, reason)

The report reads four keys of ``config.yaml`` (``name``, ``seed``, ``federated``,
``evaluation``) into :class:`ReportConfig`, whose fields are
:class:`~multimodal_fl.config.ExperimentConfig`'s own: the same types, validators and defaults.
The task and the sites are not read: the site directories need not exist where the report is
built (a copied run directory), and a hand-made run directory may leave them out. The whole
file, flattened (:attr:`RunData.settings`), and the manifest are what
:mod:`.compare` checks before runs are compared.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from multimodal_fl.config import (
    ConfigError,
    EvaluationConfig,
    ExperimentConfig,
    FederatedConfig,
    drop_removed_keys,
)
from multimodal_fl.rundir import RunManifest, flatten, read_cross_site, read_manifest

__all__ = [
    "ReportConfig",
    "RunData",
    "RunIdentity",
    "load_run",
    "read_config_dict",
    "read_identity",
    "read_report_config",
]

PREDICTION_COLUMNS: tuple[str, ...] = ("patient_id", "split", "label", "score")
"""Columns every ``predictions.csv`` must have."""


def _experiment_field(name: str) -> Any:
    """:class:`ExperimentConfig`'s definition of one field (type checks, default, description)."""
    return ExperimentConfig.model_fields[name]


class ReportConfig(BaseModel):
    """The part of a run's ``config.yaml`` that the report reads.

    Each field is :class:`~multimodal_fl.config.ExperimentConfig`'s field of that name, so
    validation and defaults are the config module's; other keys (``task``, ``sites``, ...) are
    ignored.

    Attributes
    ----------
    name : str or None
        The experiment's name.
    seed : int
        The experiment's seed (the report's bootstrap seed unless overridden).
    federated : FederatedConfig
        Its ``engine`` names the run when ``metrics.json`` does not.
    evaluation : EvaluationConfig
        Sensitive attributes, small-cell rule, bootstrap, histogram bins, threshold rule.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str | None = _experiment_field("name")
    seed: int = _experiment_field("seed")
    federated: FederatedConfig = _experiment_field("federated")
    evaluation: EvaluationConfig = _experiment_field("evaluation")


@dataclass
class RunData:
    """One run directory, loaded.

    Attributes
    ----------
    path : Path
    label : str
        Display name (the engine, made unique across runs).
    engine : str
        ``local``, ``centralized``, ``inprocess``, ``flower`` (or ``unknown``).
    config : ReportConfig or None
        ``config.yaml``; ``None`` when the run has none.
    metrics : dict
        ``metrics.json``.
    predictions : pandas.DataFrame
        All sites' rows with ``site`` and ``model`` columns added.
    cross : pandas.DataFrame
        The cross-site cells the sites disclosed (``cross_site.json``, columns of
        :attr:`~multimodal_fl.evaluation.fairness.CrossSiteResult.long`; possibly empty).
    manifest : RunManifest or None
        ``run.json`` (``None`` for a run directory without one).
    """

    path: Path
    label: str
    engine: str
    config: ReportConfig | None
    metrics: dict[str, Any]
    predictions: pd.DataFrame
    cross: pd.DataFrame = field(default_factory=pd.DataFrame)
    manifest: RunManifest | None = None

    @property
    def federated(self) -> bool:
        """Whether the run is a federated one."""
        return self.engine in ("inprocess", "flower", "federated")


def read_config_dict(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``RUN_DIR/config.yaml`` as a mapping, keys the schema no longer has dropped.

    Parameters
    ----------
    path : path-like
        A run directory.

    Returns
    -------
    dict or None
        ``None`` when the run has no ``config.yaml``.

    Raises
    ------
    ConfigError
        When the file is not YAML or not a mapping.
    """
    file = Path(path) / "config.yaml"
    if not file.is_file():
        return None
    try:
        raw = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: expected a mapping at the top level")
    return drop_removed_keys(raw)


def read_report_config(path: str | os.PathLike[str]) -> ReportConfig | None:
    """Read ``RUN_DIR/config.yaml`` into a :class:`ReportConfig`.

    Parameters
    ----------
    path : path-like
        A run directory.

    Returns
    -------
    ReportConfig or None
        ``None`` when the run has no ``config.yaml``.

    Raises
    ------
    ConfigError
        When the file is not YAML or a key the report reads is invalid.
    """
    raw = read_config_dict(path)
    if raw is None:
        return None
    file = Path(path) / "config.yaml"
    try:
        return ReportConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{file}: invalid configuration: {exc}") from None


def _read_csv(file: Path, required: Sequence[str]) -> pd.DataFrame:
    """One site's CSV with the ``site`` column added; fails when a required column is missing."""
    d = pd.read_csv(file)
    missing = [c for c in required if c not in d.columns]
    if missing:
        raise ValueError(f"{file}: missing column(s) {missing}; present: {list(d.columns)}")
    d["site"] = file.parent.name
    return d


def _read_predictions(path: Path, engine: str, model: str) -> pd.DataFrame:
    """All sites' ``predictions.csv`` rows, with ``site`` and ``model`` columns."""
    files = sorted((path / "sites").glob("*/predictions.csv"))
    if not files:
        raise ValueError(
            f"{path}: no sites/<site>/predictions.csv; a run directory holds one per site "
            "(patient_id, split, label, score, sensitive attributes)"
        )
    frames = []
    for f in files:
        d = _read_csv(f, PREDICTION_COLUMNS)
        if "model" not in d.columns:
            site = f.parent.name
            d["model"] = f"local:{site}" if engine == "local" else model
        frames.append(d)
    return pd.concat(frames, ignore_index=True)


def _read_cross(path: Path) -> pd.DataFrame:
    """The disclosed cross-site cells (``cross_site.json``; an empty frame when there is none)."""
    result = read_cross_site(path)
    return result.long if result is not None else pd.DataFrame()


def _run_path(run_dir: str | os.PathLike[str]) -> Path:
    path = Path(run_dir)
    if not path.is_dir():
        raise ValueError(f"{path}: not a directory; expected a run directory from `mmfl train`")
    return path


def _read_metrics(path: Path) -> dict[str, Any]:
    """``metrics.json`` (empty when there is none)."""
    if (path / "metrics.json").is_file():
        doc: dict[str, Any] = json.loads((path / "metrics.json").read_text())
        return doc
    return {}


@dataclass(frozen=True)
class RunIdentity:
    """What a run is, read without its predictions: enough to decide whether runs compare.

    Attributes
    ----------
    path : Path
    engine : str
    settings : dict
        ``config.yaml`` flattened (``{"federated.algorithm": "fedprox", ...}``); empty when
        the run has none.
    manifest : RunManifest or None
        ``run.json``.
    """

    path: Path
    engine: str
    settings: dict[str, Any]
    manifest: RunManifest | None

    @property
    def run_id(self) -> str:
        """The manifest's run id (kept by a copy of the directory), else the resolved path."""
        return self.manifest.run_id if self.manifest is not None else str(self.path.resolve())


def read_identity(run_dir: str | os.PathLike[str]) -> RunIdentity:
    """Read a run directory's manifest, config and engine (not its predictions).

    Parameters
    ----------
    run_dir : path-like

    Returns
    -------
    RunIdentity

    Raises
    ------
    ValueError
        When the path is not a directory, or ``config.yaml`` / ``run.json`` is unreadable.
    """
    path = _run_path(run_dir)
    raw = read_config_dict(path) or {}
    manifest = read_manifest(path)
    fed = raw.get("federated")
    engine = str(_read_metrics(path).get("engine")
                 or (manifest.engine if manifest is not None else None)
                 or (fed.get("engine") if isinstance(fed, dict) else None) or "unknown")
    return RunIdentity(path=path, engine=engine, settings=flatten(raw), manifest=manifest)


def load_run(run_dir: str | os.PathLike[str], label: str | None = None) -> RunData:
    """Read a run directory.

    Parameters
    ----------
    run_dir : path-like
        A directory written by ``mmfl train``.
    label : str or None
        Display name; default the engine.

    Returns
    -------
    RunData

    Raises
    ------
    ValueError
        When the directory has no ``sites/<site>/predictions.csv`` or a file lacks a column
        (:class:`~multimodal_fl.config.ConfigError`, a ``ValueError``, for an invalid
        ``config.yaml``).
    """
    path = _run_path(run_dir)
    metrics = _read_metrics(path)
    config = read_report_config(path)
    engine = str(metrics.get("engine") or (config.federated.engine if config else None)
                 or "unknown")
    return RunData(
        path=path,
        label=label or engine,
        engine=engine,
        config=config,
        metrics=metrics,
        predictions=_read_predictions(path, engine, label or engine),
        cross=_read_cross(path),
        manifest=read_manifest(path),
    )


