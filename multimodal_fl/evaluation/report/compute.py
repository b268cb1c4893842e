"""Compute the report from what the runs hold: the ``report.json`` document and its parts.

Every number comes from what the sites disclosed (:class:`~multimodal_fl.evaluation.disclosed.
SiteDisclosure`, ``RUN_DIR/disclosed/<site>.json``), ``metrics.json`` (the training curves and
the histogram-pooled all-sites figures, ``pooled_from_histograms``) and the cross-site matrix
(``cross_site.json``); never from a patient row. :func:`build_report` loads the runs and
:func:`report_from_runs` assembles, per run, the fairness tables (the sites' cells, and the
all-sites rows from the pooled histograms), the worst / gap / spread of the released values,
the disparities; across runs, the cross-site matrix and the per-site change from local-only
training; and the training curves. :func:`run_from_frame` makes a user's own predictions
DataFrame into a run through the same site-side builder
(:func:`~multimodal_fl.evaluation.disclosed.site_disclosure`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from multimodal_fl.evaluation.disclosed import SiteDisclosure, read_disclosure, site_disclosure
from multimodal_fl.evaluation.fairness import (
    ALL_SITES,
    CELL_COLUMNS,
    DISPARITY_COLUMNS,
    SUMMARY_COLUMNS,
    CrossSiteResult,
    FairnessReport,
)
from multimodal_fl.evaluation.histograms import pooled_in_process, pooled_sites_in_process
from multimodal_fl.evaluation.metrics import HIGHER_IS_BETTER, METRIC_NAMES, check_binary_inputs
from multimodal_fl.evaluation.report.compare import load_runs
from multimodal_fl.evaluation.report.load import CROSS_COLUMNS, ReportConfig, RunData

__all__ = [
    "CENTRALIZED_NOTE",
    "FRAME_LABEL",
    "RUN_LABELS",
    "SPLIT",
    "build_report",
    "global_threshold",
    "json_ready",
    "pooled_label",
    "privacy_section",
    "recalibration_section",
    "report_from_runs",
    "run_from_frame",
    "run_label",
    "run_thresholds",
]

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

#: What the report says of a centralized run.
CENTRALIZED_NOTE = ("centralized: every site's patient data pooled in one place, an in-process "
                    "research baseline; it cannot exist across hospitals")


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


def _display_labels(runs: Sequence[RunData]) -> list[RunData]:
    """The runs named by :func:`run_label`, keeping what tells runs of one engine apart.

    :func:`~multimodal_fl.evaluation.report.compare.load_runs` labels a run by its engine and,
    where several runs share an engine, by the settings (or folders) that differ, e.g.
    ``inprocess (algorithm=fedprox)``; here the engine name becomes its words:
    ``federated (in-process) (algorithm=fedprox)``.
    """
    out = []
    for r in runs:
        shown = r.label
        if r.engine in RUN_LABELS and r.label.startswith(r.engine):
            shown = run_label(r.engine) + r.label[len(r.engine):]
        elif r.engine in RUN_LABELS and r.label == r.path.name:  # a run loaded on its own
            shown = run_label(r.engine)
        out.append(dataclasses.replace(r, label=shown))
    return out


def _eval_settings(runs: Sequence[RunData], **overrides: Any) -> dict[str, Any]:
    """The first run's ``evaluation`` settings and seed; ``min_cell`` and ``n_boot`` as applied.

    The sites applied their own small-cell threshold (never below the config's) and the
    config's bootstrap: ``min_cell`` is the largest any site applied. ``overrides`` (those not
    ``None``) replace the config's values.
    """
    cfg = runs[0].config or ReportConfig()
    ev = cfg.evaluation
    docs = [d for r in runs for d in r.disclosed.values()]
    settings = {
        "sensitive": list(ev.sensitive),
        "min_cell": max([ev.min_cell if runs[0].config is not None or not docs else 1,
                         *(d.min_cell for d in docs)]),
        "n_boot": max(d.n_boot for d in docs) if docs else ev.n_boot,
        "histogram_bins": ev.histogram_bins,
        "threshold": ev.threshold,
        "seed": cfg.seed,
    }
    settings.update({k: v for k, v in overrides.items() if v is not None})
    if overrides.get("sensitive") is not None:
        settings["sensitive"] = list(overrides["sensitive"])
    return settings


def run_thresholds(disclosed: dict[str, SiteDisclosure], *, global_model: bool
                   ) -> tuple[dict[str, float], str, list[str]]:
    """The decision thresholds of a run, as the sites disclosed them (the model card's too).

    Each site applied one threshold: the request's (a fixed ``evaluation.threshold``), or one
    it chose on its own validation split (``youden``, on the grid edges), or 0.5 when that split
    could not choose. A global model's one threshold (``mmfl predict`` on a new site) is the
    sites' common value, else their median, said so in the notes.

    Parameters
    ----------
    disclosed : dict of str to SiteDisclosure
        The run's documents by site.
    global_model : bool
        One model for every site (not a local-only run).

    Returns
    -------
    thresholds : dict of str to float
        Per site.
    source : str
        How they were obtained.
    notes : list of str
        The global value's rule when the sites differ.
    """
    thresholds = {s: d.threshold for s, d in disclosed.items()}
    sources = {s: d.threshold_source for s, d in disclosed.items()}
    distinct = sorted(set(sources.values()))
    source = distinct[0] if len(distinct) == 1 else "per site: " + "; ".join(
        f"{s}: {src}" for s, src in sources.items())
    notes = []
    if global_model and len(set(thresholds.values())) > 1:
        notes.append(f"the sites chose different thresholds; the global model's is their median "
                     f"({statistics.median(thresholds.values()):.4g})")
    return thresholds, source, notes


def global_threshold(thresholds: dict[str, float]) -> float:
    """The one threshold of a global model: the sites' common value, else their median.

    Parameters
    ----------
    thresholds : dict of str to float

    Returns
    -------
    float
    """
    return float(statistics.median(thresholds.values())) if thresholds else 0.5


# --------------------------------------------------------------------------------------------
# fairness tables from the disclosed documents


def _pooled(run: RunData) -> dict[str, Any]:
    """``metrics.json``'s histogram-pooled figures (empty when the run has none)."""
    pooled = run.metrics.get("pooled_from_histograms")
    return pooled if isinstance(pooled, dict) else {}


#: The metrics the histogram-pooled figures give, as ``report.json`` cells.
POOLED_METRICS = ("auc", "ece", "sensitivity", "specificity")


def pooled_label(run_sites: Sequence[str], overall: dict[str, Any]) -> str:
    """The ``site`` of a run's pooled rows: :data:`ALL_SITES` only when the pooled overall cell
    holds every site of the run, else the sites it holds (``"(pooled: a, b, c)"``).

    Parameters
    ----------
    run_sites : sequence of str
        The run's sites (those that disclosed a document).
    overall : dict
        ``pooled_from_histograms["overall"]``.

    Returns
    -------
    str
    """
    pooled = sorted(overall.get("sites") or [])
    if pooled and set(run_sites) <= set(pooled):
        return ALL_SITES
    return f"(pooled: {', '.join(pooled) or 'no site'})"


def _short_of(figures: dict[str, Any], overall: dict[str, Any]) -> str | None:
    """Why a pooled subgroup cell lacks a site of the pooled overall cell, or ``None``.

    A cell pooled from per-site histograms that some site did not send (``excluded``, as in
    run directories made before the in-process engines pooled as the secure sum does) is not
    of the sites the overall cell covers: its figures would be mislabelled, and its counts
    minus a site's disclosed ones would give what that site hid.
    """
    if figures.get("reason") is not None:
        return None
    missing = sorted(set(figures.get("excluded") or {}) & set(overall.get("sites") or []))
    if not missing:
        return None
    return (f"not pooled over every site of the overall cell: {', '.join(missing)} sent no "
            "histogram of it")


def _pooled_rows(figures: dict[str, Any], *, scope: str, attribute: str | None,
                 group: str | None, site: str = ALL_SITES) -> list[dict[str, Any]]:
    """One pooled cell (all sites, or one subgroup over sites) as report cells."""
    rows = []
    n = None
    if figures.get("n_pos") is not None and figures.get("n_neg") is not None:
        n = round(float(figures["n_pos"]) + float(figures["n_neg"]))
    for metric in POOLED_METRICS:
        m = figures.get(metric)
        if m is None:
            if metric in ("sensitivity", "specificity") and figures.get("reason") is None:
                continue  # no common threshold: nothing pooled at one
            value, lo, hi = None, None, None
        elif isinstance(m, dict):
            value, lo, hi = m.get("value"), m.get("lo"), m.get("hi")
        else:
            value, lo, hi = float(m), None, None
        why = (m.get("reason") if isinstance(m, dict) else None) or figures.get("reason") \
            or "not pooled"
        rows.append({"scope": scope, "site": site, "attribute": attribute, "group": group,
                     "metric": metric, "value": value, "lo": lo, "hi": hi, "n": n,
                     "n_pos": None, "n_neg": None, "suppressed": value is None,
                     "reason": None if value is not None else why, "n_boot": 0,
                     "n_skipped": 0})
    return rows


def _cells(run: RunData, sensitive: Sequence[str]) -> pd.DataFrame:
    """The run's cells: all sites and subgroups (pooled), each site and site x subgroup."""
    pooled = _pooled(run)
    rows: list[dict[str, Any]] = []
    overall = pooled.get("overall") or {}
    label = pooled_label(list(run.disclosed), overall)
    if overall:
        rows += _pooled_rows(overall, scope="overall", attribute=None, group=None, site=label)
    for a in sensitive:
        for g, figures in sorted((pooled.get("subgroups") or {}).get(a, {}).items()):
            short = _short_of(figures, overall)
            shown = figures if short is None else {"reason": short}
            # a level's cell holds the sites with patients of that level: labelled by them
            own = label if short is not None or not figures.get("sites") \
                else pooled_label(list(run.disclosed), figures)
            rows += _pooled_rows(shown, scope="subgroup", attribute=a, group=str(g),
                                 site=own)
    frames = [pd.DataFrame(rows, columns=list(CELL_COLUMNS))] if rows else []
    for doc in run.disclosed.values():
        c = doc.cells_frame()
        frames.append(c[c["attribute"].isna() | c["attribute"].isin(list(sensitive))])
    cells = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=list(CELL_COLUMNS))
    for col in ("value", "lo", "hi"):
        cells[col] = pd.to_numeric(cells[col], errors="coerce").astype(np.float64)
    for col in ("n", "n_pos", "n_neg"):
        cells[col] = pd.array(cells[col].tolist(), dtype="Int64")
    cells["suppressed"] = cells["suppressed"].astype(bool)
    return cells


def _summary_row(values: pd.Series, *, scope: str, site: str | None, attribute: str | None,
                 metric: str) -> dict[str, Any]:
    """Worst / best / gap (max - min) / spread (population std) of released values."""
    defined = values.dropna()
    n_cells = int(values.size)
    row: dict[str, Any] = {
        "scope": scope, "site": site, "attribute": attribute, "metric": metric,
        "worst": None, "worst_at": None, "best": None, "best_at": None, "gap": None,
        "spread": None, "n_cells": n_cells, "n_suppressed": int(n_cells - defined.size),
        "reason": None,
    }
    if defined.empty:
        return row | {"reason": "every cell suppressed"}
    hib = HIGHER_IS_BETTER[metric]
    row |= {"worst": float(defined.min() if hib else defined.max()),
            "worst_at": str(defined.idxmin() if hib else defined.idxmax()),
            "best": float(defined.max() if hib else defined.min()),
            "best_at": str(defined.idxmax() if hib else defined.idxmin())}
    if defined.size < 2:
        return row | {"reason": "fewer than 2 unsuppressed cells: no gap or spread"}
    return row | {"gap": float(defined.max() - defined.min()),
                  "spread": float(defined.std(ddof=0))}


def _summary(cells: pd.DataFrame, sensitive: Sequence[str]) -> pd.DataFrame:
    """Worst / gap / spread across sites, across pooled groups and across groups within sites."""
    rows = []
    metrics = [m for m in METRIC_NAMES if m in set(cells["metric"])]
    sites = sorted(cells.loc[cells["scope"] == "site", "site"].unique())
    for m in metrics:
        c = cells[(cells["scope"] == "site") & (cells["metric"] == m)]
        rows.append(_summary_row(c.set_index("site")["value"], scope="across_sites", site=None,
                                 attribute=None, metric=m))
    for a in sensitive:
        for m in metrics:
            c = cells[(cells["scope"] == "subgroup") & (cells["attribute"] == a)
                      & (cells["metric"] == m)]
            if not c.empty:
                rows.append(_summary_row(c.set_index("group")["value"], scope="across_groups",
                                         site=None, attribute=a, metric=m))
        for s in sites:
            for m in metrics:
                c = cells[(cells["scope"] == "site_subgroup") & (cells["site"] == s)
                          & (cells["attribute"] == a) & (cells["metric"] == m)]
                if not c.empty:
                    rows.append(_summary_row(c.set_index("group")["value"],
                                             scope="across_groups_within_site", site=s,
                                             attribute=a, metric=m))
    out = pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))
    for col in ("worst", "best", "gap", "spread"):
        out[col] = pd.to_numeric(out[col], errors="coerce").astype(np.float64)
    return out


def _pooled_disparity(levels: dict[str, Any], attribute: str,
                      site: str = ALL_SITES) -> dict[str, Any]:
    """fairlearn's two differences over the pooled groups of one attribute.

    Equalised-odds difference: the larger of the between-group ranges of the true-positive
    rate (sensitivity) and of the false-positive rate (1 - specificity); demographic-parity
    difference: the range of the fraction predicted positive. From the pooled sensitivity,
    specificity and class counts of each group (histogram estimates).
    """
    used, rates = [], []
    for g, f in sorted(levels.items()):
        sens, spec = f.get("sensitivity"), f.get("specificity")
        if f.get("reason") is None and isinstance(sens, dict) and isinstance(spec, dict) \
                and sens.get("value") is not None and spec.get("value") is not None:
            tpr, fpr = float(sens["value"]), 1.0 - float(spec["value"])
            n_pos, n_neg = float(f["n_pos"]), float(f["n_neg"])
            rates.append((tpr, fpr, (tpr * n_pos + fpr * n_neg) / (n_pos + n_neg)))
            used.append(str(g))
    row: dict[str, Any] = {"site": site, "attribute": attribute,
                           "equalized_odds_difference": None,
                           "demographic_parity_difference": None, "groups_used": used,
                           "groups_suppressed": sorted(str(g) for g in levels if g not in used),
                           "suppressed": True, "reason": None}
    if len(used) < 2:
        return row | {"reason": f"fewer than 2 pooled groups of {attribute!r} with "
                                "sensitivity and specificity"}
    table = np.array(rates, dtype=np.float64)  # columns: tpr, fpr, selection rate
    gaps = np.ptp(table, axis=0)
    return row | {"suppressed": False, "demographic_parity_difference": float(gaps[2]),
                  "equalized_odds_difference": float(max(gaps[0], gaps[1]))}


def _disparities(run: RunData, sensitive: Sequence[str]) -> pd.DataFrame:
    """The sites' disparities and, from the pooled histograms, the all-sites rows."""
    rows = []
    subgroups = _pooled(run).get("subgroups") or {}
    overall = _pooled(run).get("overall") or {}
    label = pooled_label(list(run.disclosed), overall)
    for a in sensitive:
        if a in subgroups:
            levels = {g: f if _short_of(f, overall) is None else {"reason": "short"}
                      for g, f in subgroups[a].items()}
            rows.append(_pooled_disparity(levels, a, label))
    for site, doc in run.disclosed.items():
        rows += [{"site": site, **d.model_dump()} for d in doc.disparities
                 if d.attribute in sensitive]
    out = pd.DataFrame(rows, columns=list(DISPARITY_COLUMNS))
    for col in ("equalized_odds_difference", "demographic_parity_difference"):
        out[col] = pd.to_numeric(out[col], errors="coerce").astype(np.float64)
    return out


def _fairness(run: RunData, st: dict[str, Any]) -> FairnessReport:
    """The run's fairness tables, from its disclosed documents and pooled figures."""
    thresholds, source, _ = run_thresholds(run.disclosed, global_model=run.engine != "local")
    cells = _cells(run, st["sensitive"])
    settings = {"min_cell": st["min_cell"], "n_boot": st["n_boot"], "seed": st["seed"],
                "split": SPLIT, "sensitive": list(st["sensitive"]), "metrics": list(METRIC_NAMES),
                "interval": "stratified percentile bootstrap, at each site",
                "source": "disclosed documents; all-sites rows from pooled histograms"}
    return FairnessReport(cells, _summary(cells, st["sensitive"]),
                          _disparities(run, st["sensitive"]), thresholds, source, settings)


def _withheld_note(run: RunData, overall: Mapping[str, Any]) -> list[str]:
    """Sites that withheld their test counts for a secure sum that left them out (it was
    refused, or they dropped out of it): their notes say they are in the pooled figures, which
    they are not, so the reader is told where those counts went: nowhere."""
    summed = set(overall.get("sites") or [])
    missing = sorted(s for s, d in run.disclosed.items() if d.pooled and s not in summed)
    if not missing:
        return []
    why = overall.get("reason") or (f"it summed {', '.join(sorted(summed))} only" if summed
                                    else "it did not complete")
    return [f"{run.label}: {', '.join(missing)} withheld their test class counts for the "
            f"secure sum of the pooled figures, which does not hold them ({why}): those counts "
            "are in no figure of this report"]


def _missing_sites_note(run: RunData) -> list[str]:
    """The sites of the run in no figure of this report (``metrics.json``'s ``missing_sites``:
    no predictions, or joined after the setup), with the reason where the run recorded one."""
    missing = run.metrics.get("missing_sites") or []
    if not missing:
        return []
    reasons = run.metrics.get("missing_reasons") or {}
    listed = "; ".join(f"{s} ({reasons[s]})" if s in reasons else s for s in missing)
    return [f"{run.label}: site(s) in no figure of this report: {listed}"]


def _run_notes(run: RunData, st: dict[str, Any]) -> list[str]:
    """What the reader should know about one run's figures."""
    notes = []
    for site, doc in run.disclosed.items():
        notes += [f"{site}: {n}" for n in doc.notes]
        notes += [f"{site}: sensitive attribute {a!r} not disclosed: no cells"
                  for a in st["sensitive"] if a not in doc.sensitive and doc.subgroup_summaries
                  and not any(a in n for n in doc.notes)]
    notes += run_thresholds(run.disclosed, global_model=run.engine != "local")[2]
    overall = _pooled(run).get("overall") or {}
    if not overall:
        notes.append(f"{run.label}: no histogram-pooled figures in metrics.json: no all-sites "
                     "rows")
    elif overall.get("excluded"):
        left = "; ".join(f"{k} ({v})" for k, v in overall["excluded"].items())
        notes.append(f"{run.label}: the all-sites rows are pooled from the histograms of "
                     f"{', '.join(overall.get('sites') or []) or 'no site'} only; left out: {left}")
    notes += _withheld_note(run, overall)
    notes += _missing_sites_note(run)
    if run.engine == "local":
        notes.append(f"{run.label}: each site has its own model and threshold; pooled figures "
                     "mix models")
    if run.engine == "centralized":
        notes.append(CENTRALIZED_NOTE)
    return notes


def _run_section(run: RunData, st: dict[str, Any]) -> dict[str, Any]:
    """One run's fairness tables, federated evaluation and notes."""
    return {
        "label": run.label,
        "engine": run.engine,
        "path": str(run.path),
        "sensitive": list(st["sensitive"]),
        "fairness": _fairness(run, st),
        "federated_evaluation": _pooled(run),
        "notes": _run_notes(run, st),
    }


# --------------------------------------------------------------------------------------------
# generalisability


def _own_cells(run: RunData) -> list[dict[str, Any]]:
    """The run's own model(s) on each site's test split: the sites' disclosed AUC cells."""
    rows = []
    for site, doc in run.disclosed.items():
        c = doc.cell("auc")
        base: dict[str, Any] = {"model": run.model_of(site), "test_site": site}
        if c is None:
            rows.append(base | {"value": None, "lo": None, "hi": None, "n": None,
                                "suppressed": True, "reason": "not disclosed"})
            continue
        rows.append(base | {"value": c.value, "lo": c.lo, "hi": c.hi, "n": c.n,
                            "suppressed": c.suppressed, "reason": c.reason})
    return rows


def _cross_site(runs: Sequence[RunData]) -> CrossSiteResult:
    """Every model on every test site it was scored on: own cells, then ``cross_site.json``."""
    rows = [r for run in runs for r in _own_cells(run)]
    seen = {(r["model"], r["test_site"]) for r in rows}
    for run in runs:
        if run.cross is None:
            continue
        for rec in _frame_records(run.cross.long):
            if (rec["model"], rec["test_site"]) not in seen:
                rows.append(rec)
                seen.add((rec["model"], rec["test_site"]))
    long = pd.DataFrame(rows, columns=list(CROSS_COLUMNS))
    long = long.sort_values(["model", "test_site"], kind="stable").reset_index(drop=True)
    for c in ("value", "lo", "hi"):
        long[c] = pd.to_numeric(long[c], errors="coerce").astype(np.float64)
    long["n"] = pd.array(long["n"].tolist(), dtype="Int64")
    long["suppressed"] = long["suppressed"].astype(bool)
    return CrossSiteResult(long, "auc")


CHANGE_COLUMNS: tuple[str, ...] = (
    "site", "local", "local_lo", "local_hi", "federated", "federated_lo", "federated_hi",
    "change", "change_lo", "change_hi", "n", "suppressed", "reason")
"""Columns of a change-from-local-only table."""


def _mover(change: float, a: Any, b: Any) -> tuple[float | None, float | None]:
    """The MOVER interval of ``b - a`` from the two intervals (Zou & Donner 2008).

    ``a`` and ``b`` are disclosed cells (value, lo, hi); the two runs are treated as
    independent, which widens the interval when both models are scored on the same patients.
    """
    if None in (a.lo, a.hi, b.lo, b.hi):
        return None, None
    lo = change - math.hypot(b.value - b.lo, a.hi - a.value)
    hi = change + math.hypot(b.hi - b.value, a.value - a.lo)
    return lo, hi


def _change(local: RunData, other: RunData) -> pd.DataFrame:
    """Per site: the site's local-only test AUC, the other run's, and the change."""
    rows = []
    for site in sorted(set(local.disclosed) & set(other.disclosed)):
        a, b = local.disclosed[site].cell("auc"), other.disclosed[site].cell("auc")
        row: dict[str, Any] = {"site": site}
        missing = [c for c in (a, b) if c is None or c.value is None]
        if a is None or b is None or a.value is None or b.value is None:
            reason = next((c.reason for c in missing if c is not None), None) or "not disclosed"
            rows.append(row | {"n": None if b is None else b.n, "suppressed": True,
                               "reason": reason})
            continue
        change = b.value - a.value
        lo, hi = _mover(change, a, b)
        rows.append(row | {"local": a.value, "local_lo": a.lo, "local_hi": a.hi,
                           "federated": b.value, "federated_lo": b.lo, "federated_hi": b.hi,
                           "change": change, "change_lo": lo, "change_hi": hi, "n": b.n,
                           "suppressed": False, "reason": None})
    out = pd.DataFrame(rows, columns=list(CHANGE_COLUMNS))
    for c in CHANGE_COLUMNS[1:10]:
        out[c] = pd.to_numeric(out[c], errors="coerce").astype(np.float64)
    out["n"] = pd.array(out["n"].tolist(), dtype="Int64")
    return out


def _changes(runs: Sequence[RunData]) -> dict[str, pd.DataFrame]:
    """Per-site change from the first local-only run to every other run (none without one)."""
    local = [r for r in runs if r.engine == "local"]
    if not local:
        return {}
    return {r.label: _change(local[0], r) for r in runs if r.engine != "local"}


def _run_entry(run: RunData, section: dict[str, Any]) -> dict[str, Any]:
    """A run's entry in ``report.json``'s ``runs`` list."""
    return {
        "label": run.label, "engine": run.engine, "path": str(run.path),
        "config": run.config.name if run.config else None,
        "thresholds": section["fairness"].thresholds,
        "threshold_source": section["fairness"].threshold_source,
        "sites": run.sites,
        "notes": section["notes"],
    }


def build_report(
    run_dirs: Sequence[str | os.PathLike[str]],
    *,
    sensitive: Sequence[str] | None = None,
) -> tuple[dict[str, Any], list[RunData], dict[str, Any]]:
    """Compute everything the report shows, from what the runs' sites disclosed.

    Parameters
    ----------
    run_dirs : sequence of path-like
        One run, or runs of the same config with different engines.
    sensitive : sequence of str or None
        Show these of the disclosed attributes (default: the first run's
        ``evaluation.sensitive``).

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
    return report_from_runs(load_runs(run_dirs), sensitive=sensitive)


def report_from_runs(
    runs: Sequence[RunData],
    *,
    sensitive: Sequence[str] | None = None,
    **settings: Any,
) -> tuple[dict[str, Any], list[RunData], dict[str, Any]]:
    """Compute everything the report shows from runs already loaded.

    Parameters
    ----------
    runs : sequence of RunData
        From :func:`~multimodal_fl.evaluation.report.load_runs` or :func:`run_from_frame`.
    sensitive : sequence of str or None
        Show these of the disclosed attributes (default: the first run's config).
    **settings
        ``seed``, ``threshold``, ``histogram_bins`` as shown in the report's settings, for
        runs without a config (:func:`run_from_frame`).

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
    runs = _display_labels(runs)
    st = _eval_settings(runs, sensitive=sensitive, **settings)
    per_run = {r.label: _run_section(r, st) for r in runs}
    cross = _cross_site(runs)
    changes = _changes(runs)
    doc: dict[str, Any] = {
        "settings": {**st, "split": SPLIT},
        "runs": [_run_entry(r, per_run[r.label]) for r in runs],
        "fairness": {k: v["fairness"].to_dict() for k, v in per_run.items()},
        "federated_evaluation": {k: v["federated_evaluation"] for k, v in per_run.items()},
        "cross_site": cross.to_dict(),
        "change_from_local": {k: _frame_records(v) for k, v in changes.items()},
        "training": {r.label: _training_curves(r) for r in runs},
        "recalibration": {r.label: recalibration_section(r) for r in runs},
        "privacy": {r.label: sec for r in runs if (sec := privacy_section(r))},
    }
    sections = {"per_run": per_run, "cross": cross, "changes": changes, "settings": st}
    return doc, runs, sections


def run_from_frame(frame: pd.DataFrame, *, label: str = FRAME_LABEL,
                   sensitive: Sequence[str] = (), min_cell: int = 10, n_boot: int = 1000,
                   seed: int = 0, threshold: float | None = None,
                   histogram_bins: int = 100) -> RunData:
    """A user's own predictions as a run the report can take (no run directory needed).

    Each site of the frame is summarised as a site of a run discloses itself
    (:func:`~multimodal_fl.evaluation.disclosed.site_disclosure`), and the all-sites figures
    are pooled from histograms, so the report takes one path for both. A site whose test
    histograms are in the pooled figures is summarised in the pooled form
    (:func:`~multimodal_fl.evaluation.histograms.pooled_sites_in_process`), as in a run.

    Parameters
    ----------
    frame : pandas.DataFrame
        One row per patient: ``label`` (0/1) and ``score`` (predicted probability), the
        ``sensitive`` columns, and optionally ``site`` (default: one site, ``site``),
        ``split`` (default: every row is a ``test`` row; ``val`` rows choose the threshold)
        and ``patient_id`` (ignored).
    label : str
        The run's name in the report.
    sensitive : sequence of str
        Columns the frame must hold.
    min_cell : int
        The small-cell threshold.
    n_boot : int
        Bootstrap resamples of the intervals.
    seed : int
        Bootstrap seed.
    threshold : float or None
        A fixed decision threshold; ``None`` chooses on each site's ``val`` rows (0.5 when they
        cannot, said so).
    histogram_bins : int
        Fine grid of the score steps and the pooled histograms.

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
    pred["site"] = pred["site"].astype(str) if "site" in pred.columns else "site"
    if "split" not in pred.columns:
        pred["split"] = SPLIT
    check_binary_inputs(pred["label"].to_numpy(), pred["score"].to_numpy(), where="predictions")
    rule: str | float = "youden" if threshold is None else float(threshold)
    tests = {str(site): d[d["split"] == SPLIT] for site, d in pred.groupby("site", sort=True)}
    # a site whose test histograms are in the pooled figures sends the pooled form, as in a run
    summed = set(pooled_sites_in_process(tests, sensitive=list(sensitive),
                                         min_cell=dict.fromkeys(tests, min_cell),
                                         n_bins=histogram_bins))
    disclosed = {
        str(site): read_disclosure(site_disclosure(
            d, site=str(site), sensitive=list(sensitive), min_cell=min_cell, n_boot=n_boot,
            seed=seed, threshold_rule=rule, n_bins=histogram_bins, pooled=str(site) in summed))
        for site, d in pred.groupby("site", sort=True)}
    pooled = pooled_in_process(
        tests, sensitive=list(sensitive), min_cell=dict.fromkeys(tests, min_cell),
        n_bins=histogram_bins, n_boot=n_boot, seed=seed,
        threshold=global_threshold({s: d.threshold for s, d in disclosed.items()}),
        sites=[{"site": s, "n": d.splits[SPLIT].n if SPLIT in d.splits else None}
               for s, d in disclosed.items()])
    metrics = {"pooled_from_histograms": pooled.to_dict()} if tests else {}
    return RunData(path=Path("(DataFrame)"), label=label, engine="frame", config=None,
                   metrics=metrics, disclosed=disclosed)


def recalibration_section(run: RunData) -> dict[str, Any]:
    """What a run's recalibration was and each site's test calibration before and after it.

    From ``metrics.json`` (the server's fit, or why there is none) and each site's disclosed
    ``recalibration`` entry (:func:`~multimodal_fl.evaluation.disclosed.recalibration_summary`);
    a site whose document predates recalibration has no row.

    Parameters
    ----------
    run : RunData

    Returns
    -------
    dict
        ``run`` (``metrics.json``'s ``recalibration`` entry, or ``None``) and ``sites``: one
        row per site with ``applied``, ``source`` or ``reason``, and per figure (``ece``,
        ``mean_score``, ``observed``, ``intercept``, ``slope``) its value before and after.
    """
    rows = []
    for site, doc in sorted(run.disclosed.items()):
        rc = doc.recalibration
        if rc is None:
            continue
        row: dict[str, Any] = {"site": site, "method": rc.method, "applied": rc.applied,
                               "source": rc.source, "reason": rc.reason, "n": rc.after.n}
        for figure in ("ece", "mean_score", "observed", "intercept", "slope"):
            row[f"{figure}_before"] = getattr(rc.before, figure)
            row[f"{figure}_after"] = getattr(rc.after, figure)
        row["figures_reason"] = rc.after.reason
        rows.append(row)
    return {"run": run.metrics.get("recalibration"), "sites": rows}


def privacy_section(run: RunData) -> dict[str, Any]:
    """A run's differential privacy as ``metrics.json`` records it (empty: none).

    Parameters
    ----------
    run : RunData

    Returns
    -------
    dict
        ``dp``: ``sites`` (one row per site: ``site``, ``epsilon``, ``delta``, ``round`` of its
        last fit reply), the settings and ``covers`` (what epsilon covers, in words);
        ``site_level``: settings, ``rounds``, ``epsilon`` and ``covers``; only the parts the
        run has.
    """
    privacy = run.metrics.get("privacy")
    if not isinstance(privacy, dict):
        return {}
    out: dict[str, Any] = {}
    dp = privacy.get("dp")
    if isinstance(dp, dict):
        rows = [{"site": site, **{k: v.get(k) for k in ("epsilon", "delta", "round")}}
                for site, v in sorted((dp.get("sites") or {}).items())]
        settings = {k: dp.get(k) for k in ("noise_multiplier", "target_epsilon",
                                           "max_grad_norm", "delta", "accountant")}
        out["dp"] = {"sites": rows, "settings": settings, "covers": dp.get("covers")}
    site_level = privacy.get("site_level")
    if isinstance(site_level, dict):
        out["site_level"] = dict(site_level)
    return out


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
