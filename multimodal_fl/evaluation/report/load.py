"""Read run directories for the report: typed config, metrics and what the sites disclosed.

A run directory, as ``mmfl train`` writes it, and what the report reads of it::

    RUN_DIR/run.json                      the manifest (engine, data fingerprints, run id, ...)
    RUN_DIR/config.yaml                   resolved config (evaluation.sensitive, min_cell, ...)
    RUN_DIR/metrics.json                  "engine"; "rounds" (federated) or "history" (others);
                                          "pooled_from_histograms" (the all-sites figures)
    RUN_DIR/disclosed/<site>.json         each site's disclosed report document
                                          (:func:`~multimodal_fl.evaluation.disclosed.
                                          site_disclosure`): fairness cells, ROC and calibration
                                          summaries, per-split counts and metrics
    RUN_DIR/cross_site.json               optional: the cross-site matrix (``model``,
                                          ``test_site``, ``value``, ``lo``, ``hi``, ``n``,
                                          ``suppressed``, ``reason`` per cell)

Never ``RUN_DIR/sites/``: the patient-level predictions there are each site's own audit, at the
hospital in a deployment, so the report of a Flower deployment is built from the server's run
directory alone, and an in-process run gives the same report with its ``sites/`` removed. A run
directory made before the sites disclosed these documents is refused in one line naming the
version that made it (:class:`OldRunDirectory`).

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from multimodal_fl import __version__
from multimodal_fl.config import (
    ConfigError,
    EvaluationConfig,
    ExperimentConfig,
    FederatedConfig,
    drop_removed_keys,
)
from multimodal_fl.evaluation.disclosed import SiteDisclosure, read_disclosure
from multimodal_fl.evaluation.fairness import CrossSiteResult
from multimodal_fl.rundir import (
    DISCLOSED_DIR,
    RunManifest,
    describe_status,
    flatten,
    read_cross_site,
    read_manifest,
)

__all__ = [
    "CROSS_COLUMNS",
    "OldRunDirectory",
    "ReportConfig",
    "RunData",
    "RunIdentity",
    "load_run",
    "read_config_dict",
    "read_identity",
    "read_report_config",
]

CROSS_COLUMNS: tuple[str, ...] = ("model", "test_site", "value", "lo", "hi", "n", "suppressed",
                                  "reason")
"""Columns of every cell of ``cross_site.json``."""


class OldRunDirectory(ValueError):
    """A run directory made before the sites disclosed their report documents (one line)."""


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
    disclosed : dict of str to SiteDisclosure
        Each site's disclosed document, by site name (sorted).
    cross : CrossSiteResult or None
        ``cross_site.json`` (other models scored at each site), when the run has one.
    manifest : RunManifest or None
        ``run.json`` (``None`` for a run directory without one).
    """

    path: Path
    label: str
    engine: str
    config: ReportConfig | None
    metrics: dict[str, Any]
    disclosed: dict[str, SiteDisclosure] = field(default_factory=dict)
    cross: CrossSiteResult | None = None
    manifest: RunManifest | None = None

    @property
    def federated(self) -> bool:
        """Whether the run is a federated one."""
        return self.engine in ("inprocess", "flower", "federated")

    @property
    def sites(self) -> list[str]:
        """The sites that disclosed a document, sorted."""
        return sorted(self.disclosed)

    def model_of(self, site: str) -> str:
        """The model that scored ``site``'s patients: ``local:<site>`` for local-only runs."""
        return f"local:{site}" if self.engine == "local" else self.label


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


def _old_run_message(path: Path) -> str:
    """Why a run directory without ``disclosed/`` has no report, and what to do, in one line."""
    manifest = read_manifest(path)
    if manifest is not None and manifest.package_version == __version__:
        return (f"{path}: has no {DISCLOSED_DIR}/<site>.json, although multimodal_fl "
                f"{__version__}, which made it and builds this report, writes them at the end "
                "of every run: the folder was removed or not copied with the run. Copy the run "
                f"directory whole ({DISCLOSED_DIR}/ included), or train it again (mmfl train "
                "CONFIG)")
    made = (f"multimodal_fl {manifest.package_version}" if manifest is not None
            else "a multimodal_fl without a run manifest (no run.json)")
    return (f"{path}: made by {made}, before sites disclosed their report documents "
            f"({DISCLOSED_DIR}/<site>.json); multimodal_fl {__version__} builds the report from "
            "those alone, never from sites/<site>/predictions.csv. Train it again with this "
            "version (mmfl train CONFIG), or report on a predictions table of your own with "
            "write_frame_report")


def _read_disclosed(path: Path) -> dict[str, SiteDisclosure]:
    """Every ``disclosed/<site>.json``, read and checked, by site name."""
    folder = path / DISCLOSED_DIR
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not files:
        manifest = read_manifest(path)
        if manifest is not None and manifest.status != "completed":
            raise ValueError(f"{path}: the run is {describe_status(path, manifest)}; its sites "
                             "disclose their report documents at the end (mmfl train --resume "
                             "RUN_DIR)")
        if folder.is_dir() or (path / "metrics.json").is_file():
            raise OldRunDirectory(_old_run_message(path))
        raise ValueError(f"{path}: no {DISCLOSED_DIR}/<site>.json and no metrics.json; expected "
                         "a run directory from `mmfl train`")
    out: dict[str, SiteDisclosure] = {}
    for f in files:
        try:
            raw = json.loads(f.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{f}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
        doc = read_disclosure(raw, where=str(f))
        out[doc.site] = doc
    return dict(sorted(out.items()))


def _read_cross(path: Path) -> CrossSiteResult | None:
    """``cross_site.json`` as a :class:`CrossSiteResult` (``None`` when the run has none)."""
    return read_cross_site(path)


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
    """Read a run directory: its config, metrics and the sites' disclosed documents.

    Parameters
    ----------
    run_dir : path-like
        A directory written by ``mmfl train`` (the server's run directory of a deployment is
        enough: ``sites/`` is never read).
    label : str or None
        Display name; default the engine.

    Returns
    -------
    RunData

    Raises
    ------
    OldRunDirectory
        For a run made before the sites disclosed their documents (one line naming the
        version that made it).
    ValueError
        When a document is unreadable or of an unknown version
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
        disclosed=_read_disclosed(path),
        cross=_read_cross(path),
        manifest=read_manifest(path),
    )
