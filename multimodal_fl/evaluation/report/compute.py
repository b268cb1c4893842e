"""Compute the report from what the runs hold: the ``report.json`` document and its parts.

:func:`build_report` loads the runs and :func:`report_from_runs` computes, per run, the
fairness tables (:func:`~multimodal_fl.evaluation.fairness.fairness_report`) and the federated
(histogram-pooled) evaluation; across runs, the cross-site matrix and the per-site change from
local-only training; and the training curves from each run's ``metrics.json``.
:func:`run_from_frame` makes a user's own predictions DataFrame into a run the report can take.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from multimodal_fl.evaluation.fairness import (
    CrossSiteResult,
    FairnessReport,
    cross_site_matrix,
    fairness_report,
    local_vs_federated,
    resolve_thresholds,
)
from multimodal_fl.evaluation.histograms import pooled_evaluation, summarise_sites
from multimodal_fl.evaluation.report.compare import load_runs
from multimodal_fl.evaluation.report.load import ReportConfig, RunData

__all__ = ["FRAME_LABEL", "RUN_LABELS", "SPLIT", "build_report", "json_ready",
           "report_from_runs", "run_from_frame", "run_label", "run_thresholds"]

SPLIT = "test"
"""The split every figure and table of the report evaluates."""

FRAME_LABEL = "predictions (DataFrame)"
"""The run label of predictions given as a DataFrame (:func:`run_from_frame`)."""

RUN_LABELS: dict[str, str] = {
    "inprocess": "federated (in-process)",
    "flower": "federated (Flower)",
    "local": "local-only",
    "centralized": "centralized",
}
"""What a run is, in words, keyed by the engine name ``metrics.json`` records.

The one table of run labels: the report names runs by it, and the engine registry
(:data:`multimodal_fl.engines.ENGINES`) takes each ``Engine.label`` from it."""


def run_label(engine: str) -> str:
    """What a run of ``engine`` is, in words: its :data:`RUN_LABELS` entry, else the name.

    Parameters
    ----------
    engine : str
        The engine name ``metrics.json`` records (``inprocess``, ``flower``, ...).

    Returns
    -------
    str
    """
    return RUN_LABELS.get(engine, engine)


def _display_labels(runs: Sequence[RunData]) -> tuple[list[RunData], dict[str, str]]:
    """The runs named by :func:`run_label`, keeping what tells runs of one engine apart.

    :func:`~multimodal_fl.evaluation.report.compare.load_runs` labels a run by its engine and,
    where several runs share an engine, by the settings (or folders) that differ, e.g.
    ``inprocess (algorithm=fedprox)``; here the engine name becomes its words:
    ``federated (in-process) (algorithm=fedprox)``. Returns the relabelled runs and
    ``{loaded label: shown label}``. A run keeps its loaded label as the model name in its
    predictions, so the cross-site bootstrap seeds, keyed by model name, do not depend on the
    words shown.
    """
    out, names = [], {}
    for r in runs:
        shown = r.label
        if r.engine in RUN_LABELS and r.label.startswith(r.engine):
            shown = run_label(r.engine) + r.label[len(r.engine):]
        elif r.engine in RUN_LABELS and r.label == r.path.name:  # a run loaded on its own
            shown = run_label(r.engine)
        names[r.label] = shown
        out.append(dataclasses.replace(r, label=shown))
    return out, names


def _rename_models(cross: CrossSiteResult, runs: Sequence[RunData],
                   names: dict[str, str]) -> CrossSiteResult:
    """The cross-site result with each run's own model named by the run's shown label."""
    own = {m: names[r.label] for r in runs if r.engine != "local"
           for m in r.predictions["model"].unique() if m == r.label}
    long = cross.long.assign(model=cross.long["model"].map(lambda m: own.get(m, m)))
    return CrossSiteResult(long, cross.metric)


def _cross_site(runs: Sequence[RunData], st: dict[str, Any]) -> CrossSiteResult:
    """Every model on every test site it was scored on.

    The cells the sites disclosed (a local run's ``cross_site.json``: local-only models scored
    by the other sites, rows withheld by policy) are taken as they are, suppressed where they
    are on fewer than the report's ``min_cell`` patients; every other cell (each run's own
    model on each site) is computed from the run's predictions.
    """
    computed = cross_site_matrix(pd.concat([r.predictions for r in runs], ignore_index=True),
                                 min_cell=st["min_cell"], n_boot=st["n_boot"], seed=st["seed"])
    disclosed = [r.cross for r in runs if not r.cross.empty]
    if not disclosed:
        return computed
    cells = pd.concat(disclosed, ignore_index=True)
    small = cells["n"].notna() & (cells["n"].fillna(0) < st["min_cell"])
    cells.loc[small, ["value", "lo", "hi"]] = np.nan
    cells.loc[small, "n"] = pd.NA
    cells.loc[small, "suppressed"] = True
    cells.loc[small, "reason"] = f"fewer than {st['min_cell']} patients"
    given = set(zip(cells["model"], cells["test_site"], strict=True))
    own = computed.long[[(m, t) not in given for m, t in
                         zip(computed.long["model"], computed.long["test_site"], strict=True)]]
    long = pd.concat([own, cells], ignore_index=True).sort_values(
        ["model", "test_site"], kind="stable").reset_index(drop=True)
    return CrossSiteResult(long, computed.metric)


def _eval_settings(runs: Sequence[RunData], **overrides: Any) -> dict[str, Any]:
    """The first run's ``evaluation`` settings and seed, with the caller's overrides."""
    cfg = runs[0].config or ReportConfig()
    ev = cfg.evaluation
    settings = {
        "sensitive": list(ev.sensitive),
        "min_cell": ev.min_cell,
        "n_boot": ev.n_boot,
        "histogram_bins": ev.histogram_bins,
        "threshold": ev.threshold,
        "seed": cfg.seed,
    }
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return settings


def _fixed_threshold(rule: str) -> float | None:
    """The fixed threshold that ``evaluation.threshold`` names, or ``None`` for ``youden``."""
    return None if rule == "youden" else float(rule)


def run_thresholds(pred: pd.DataFrame, rule: str, *, per_site: bool
                   ) -> tuple[dict[str, float], str, list[str]]:
    """The decision threshold(s) of a run, as the report and the model card use them.

    ``evaluation.threshold`` fixed (``"0.5"``) is used as given. ``youden`` chooses on the
    validation split: per site for local-only models (``per_site``), else one on all sites'
    validation rows. When that split cannot choose (no positives or no negatives), the
    fallbacks are one threshold on all sites' validation rows, then 0.5, each with a note.

    Parameters
    ----------
    pred : pandas.DataFrame
        The run's predictions (``site``, ``split``, ``label``, ``score``).
    rule : str
        ``evaluation.threshold``: ``"youden"`` or a fixed value such as ``"0.5"``.
    per_site : bool
        Choose one threshold per site (local-only runs).

    Returns
    -------
    thresholds : dict of str to float
        Per site.
    source : str
        How they were obtained.
    notes : list of str
        Fallbacks taken.
    """
    fixed = _fixed_threshold(rule)
    if fixed is not None:
        thresholds, source = resolve_thresholds(pred, threshold=fixed)
        return thresholds, source, []
    notes: list[str] = []
    try:
        thresholds, source = resolve_thresholds(pred, threshold=None, per_site=per_site)
        return thresholds, source, notes
    except ValueError as exc:
        # a validation split that cannot choose a threshold: fall back, and say so
        notes.append(f"threshold: {exc}")
    try:
        thresholds, source = resolve_thresholds(pred, threshold=None, per_site=False)
        notes.append("threshold chosen on all sites' validation rows instead")
    except ValueError:
        thresholds = {str(s): 0.5 for s in pd.unique(pred["site"])}
        source = "0.5 (no validation rows with both classes)"
        notes.append("threshold fixed at 0.5: no validation rows with both classes")
    return thresholds, source, notes


def _fairness(pred: pd.DataFrame, kwargs: dict[str, Any], *, rule: str, per_site: bool,
              notes: list[str]) -> FairnessReport:
    """The fairness tables at the run's thresholds (:func:`run_thresholds`; notes added)."""
    thresholds, source, more = run_thresholds(pred, rule, per_site=per_site)
    notes.extend(more)
    fr = fairness_report(pred, threshold=thresholds, **kwargs)
    fr.threshold_source = source
    return fr


def _run_section(run: RunData, st: dict[str, Any]) -> dict[str, Any]:
    """One run's fairness tables, federated evaluation and notes."""
    pred = run.predictions
    sensitive = [c for c in st["sensitive"] if c in pred.columns]
    notes = [f"sensitive attribute {c!r} not in predictions: skipped"
             for c in st["sensitive"] if c not in pred.columns]
    kwargs: dict[str, Any] = {"sensitive": sensitive, "min_cell": st["min_cell"],
                              "n_boot": st["n_boot"], "seed": st["seed"]}
    fr = _fairness(pred, kwargs, rule=st["threshold"], per_site=run.engine == "local",
                   notes=notes)
    thresholds = set(fr.thresholds.values())
    common_t = thresholds.pop() if len(thresholds) == 1 else None
    n_bins = st["histogram_bins"]
    ece_bins = 10 if n_bins % 10 == 0 else 1
    summaries = summarise_sites(
        pred, sensitive=sensitive, split=SPLIT, threshold=common_t, n_bins=n_bins,
        min_cell=st["min_cell"], n_boot=0, ece_bins=ece_bins, seed=st["seed"],
    )
    pooled = pooled_evaluation(summaries)
    if run.engine == "local":
        notes.append(f"{run.label}: each site has its own model and threshold; pooled figures "
                     "mix models")
    return {
        "label": run.label,
        "engine": run.engine,
        "path": str(run.path),
        "sensitive": sensitive,
        "fairness": fr,
        "federated_evaluation": pooled.to_dict(),
        "notes": notes,
    }


def _changes(runs: Sequence[RunData], st: dict[str, Any]) -> dict[str, pd.DataFrame]:
    """Per-site change from the first local-only run to every other run (none without one)."""
    changes: dict[str, pd.DataFrame] = {}
    local = [r for r in runs if r.engine == "local"]
    if local:
        base = local[0].predictions
        base = base[base["model"] == "local:" + base["site"].astype(str)]
        for r in runs:
            if r.engine == "local":
                continue
            changes[r.label] = local_vs_federated(
                base, r.predictions, min_cell=st["min_cell"], n_boot=st["n_boot"],
                seed=st["seed"],
            )
    return changes


def _run_entry(run: RunData, section: dict[str, Any]) -> dict[str, Any]:
    """A run's entry in ``report.json``'s ``runs`` list."""
    return {
        "label": run.label, "engine": run.engine, "path": str(run.path),
        "config": run.config.name if run.config else None,
        "thresholds": section["fairness"].thresholds,
        "threshold_source": section["fairness"].threshold_source,
        "notes": section["notes"],
    }


def build_report(
    run_dirs: Sequence[str | os.PathLike[str]],
    *,
    sensitive: Sequence[str] | None = None,
    min_cell: int | None = None,
    n_boot: int | None = None,
    seed: int | None = None,
) -> tuple[dict[str, Any], list[RunData], dict[str, Any]]:
    """Compute everything the report shows.

    Parameters
    ----------
    run_dirs : sequence of path-like
        One run, or runs of the same config with different engines.
    sensitive, min_cell, n_boot, seed
        Override the first run's ``evaluation`` config.

    Returns
    -------
    doc : dict
        The ``report.json`` document.
    runs : list of RunData
        The runs, labelled by what they are (:func:`run_label`).
    sections : dict
        Per-run computed objects (``FairnessReport``...) keyed by run label, for plotting.
    """
    if not run_dirs:
        raise ValueError("build_report: give at least one run directory")
    return report_from_runs(load_runs(run_dirs), sensitive=sensitive, min_cell=min_cell,
                            n_boot=n_boot, seed=seed)


def report_from_runs(
    runs: Sequence[RunData],
    *,
    sensitive: Sequence[str] | None = None,
    min_cell: int | None = None,
    n_boot: int | None = None,
    seed: int | None = None,
    threshold: float | None = None,
) -> tuple[dict[str, Any], list[RunData], dict[str, Any]]:
    """Compute everything the report shows from runs already loaded.

    Parameters
    ----------
    runs : sequence of RunData
        From :func:`~multimodal_fl.evaluation.report.load_runs` or :func:`run_from_frame`.
    sensitive, min_cell, n_boot, seed
        Override the first run's ``evaluation`` config (defaults where it has none).
    threshold : float or None
        A fixed decision threshold instead of the config's rule.

    Returns
    -------
    doc : dict
        The ``report.json`` document.
    runs : list of RunData
        The runs, labelled by what they are (:func:`run_label`; other labels kept).
    sections : dict
        Per-run computed objects (``FairnessReport``...) keyed by run label, for plotting.
    """
    if not runs:
        raise ValueError("report_from_runs: give at least one run")
    loaded = list(runs)
    runs, names = _display_labels(loaded)
    st = _eval_settings(runs, sensitive=list(sensitive) if sensitive is not None else None,
                        min_cell=min_cell, n_boot=n_boot, seed=seed,
                        threshold=None if threshold is None else str(float(threshold)))
    per_run = {r.label: _run_section(r, st) for r in runs}

    cross = _rename_models(_cross_site(runs, st), loaded, names)
    changes = _changes(runs, st)
    doc: dict[str, Any] = {
        "settings": {**st, "split": SPLIT},
        "runs": [_run_entry(r, per_run[r.label]) for r in runs],
        "fairness": {k: v["fairness"].to_dict() for k, v in per_run.items()},
        "federated_evaluation": {k: v["federated_evaluation"] for k, v in per_run.items()},
        "cross_site": cross.to_dict(),
        "change_from_local": {k: _frame_records(v) for k, v in changes.items()},
        "training": {r.label: _training_curves(r) for r in runs},
    }
    sections = {"per_run": per_run, "cross": cross, "changes": changes, "settings": st}
    return doc, runs, sections


def run_from_frame(frame: pd.DataFrame, *, label: str = FRAME_LABEL,
                   sensitive: Sequence[str] = ()) -> RunData:
    """A user's own predictions as a run the report can take (no run directory needed).

    Parameters
    ----------
    frame : pandas.DataFrame
        One row per patient: ``label`` (0/1) and ``score`` (predicted probability), the
        ``sensitive`` columns, and optionally ``site`` (default: one site, ``site``),
        ``split`` (default: every row is a ``test`` row; ``val`` rows choose the threshold)
        and ``patient_id`` (default: the row number).
    label : str
        The run's name in the report.
    sensitive : sequence of str
        Columns the frame must hold.

    Returns
    -------
    RunData
        Engine ``frame``, no config, no training history.

    Raises
    ------
    ValueError
        When ``frame`` is not a DataFrame or lacks a column (one line naming it).
    """
    if not isinstance(frame, pd.DataFrame):
        raise ValueError(f"predictions: expected a pandas DataFrame, got {type(frame).__name__}")
    missing = [c for c in ("label", "score", *sensitive) if c not in frame.columns]
    if missing:
        raise ValueError(
            f"predictions DataFrame: missing column(s) {missing}; present: {list(frame.columns)}"
            "; expected label (0/1), score (probability), the sensitive columns, and optionally "
            "site, split, patient_id")
    pred = frame.copy()
    if "site" not in pred.columns:
        pred["site"] = "site"
    if "split" not in pred.columns:
        pred["split"] = SPLIT
    if "patient_id" not in pred.columns:
        pred["patient_id"] = np.arange(len(pred))
    pred["site"] = pred["site"].astype(str)
    pred["model"] = label
    return RunData(path=Path("(DataFrame)"), label=label, engine="frame", config=None,
                   metrics={}, predictions=pred)


def _frame_records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as dicts, missing and non-finite values as ``None``."""
    out = []
    for rec in df.astype(object).where(df.notna(), None).to_dict("records"):
        out.append({str(k): (None if isinstance(v, float) and not math.isfinite(v) else v)
                    for k, v in rec.items()})
    return out


def _training_curves(run: RunData) -> dict[str, Any]:
    """Per-round (federated) or per-validation-step (others) series from ``metrics.json``."""
    m = run.metrics
    out: dict[str, Any] = {}
    rounds = m.get("rounds") or m.get("history_rounds")
    if isinstance(rounds, list) and rounds:
        x = [r.get("round", i + 1) for i, r in enumerate(rounds)]
        out["federated"] = {
            "x_label": "round",
            "x": x,
            "train_loss": [r.get("train_loss") for r in rounds],
            "eval": _eval_series(rounds),
        }
    history = m.get("history")
    if isinstance(history, dict):
        for name, rows in history.items():
            if isinstance(rows, list) and rows:
                out[str(name)] = {
                    "x_label": "step",
                    "x": [r.get("step", i) for i, r in enumerate(rows)],
                    "train_loss": [r.get("train_loss") for r in rows],
                    "eval": {"val_auc": [r.get("val_auc") for r in rows]},
                }
    elif isinstance(history, list) and history and "round" in history[0] and "federated" not in out:
        out["federated"] = {
            "x_label": "round",
            "x": [r.get("round") for r in history],
            "train_loss": [r.get("train_loss") for r in history],
            "eval": _eval_series(history),
        }
    return out


def _eval_series(rounds: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """``{"<site> <metric>": [value per round]}`` for numeric evaluation metrics."""
    keys: set[tuple[str, str]] = set()
    for r in rounds:
        for site, mets in (r.get("eval_metrics") or {}).items():
            for k, v in (mets or {}).items():
                if isinstance(v, int | float) and "auc" in k:
                    keys.add((str(site), str(k)))
    series: dict[str, list[Any]] = {}
    for site, k in sorted(keys):
        series[f"{site} {k}"] = [
            ((r.get("eval_metrics") or {}).get(site) or {}).get(k) for r in rounds
        ]
    return series


def json_ready(o: Any) -> Any:
    """JSON-ready copy: numpy scalars to Python, non-finite floats and NA to ``None``.

    Parameters
    ----------
    o : Any
        A document of dicts, lists, tuples and scalars (the one :func:`build_report` returns).

    Returns
    -------
    Any
        The same structure with dict keys as strings, paths as strings.
    """
    if isinstance(o, dict):
        return {str(k): json_ready(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [json_ready(v) for v in o]
    if isinstance(o, np.generic):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if o is pd.NA:
        return None
    if isinstance(o, Path):
        return str(o)
    return o
