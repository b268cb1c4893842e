"""Per-site and per-subgroup performance tables on fairlearn's ``MetricFrame``.

:func:`fairness_report` takes patient-level predictions (one row per patient: ``patient_id``,
``site``, ``split``, ``label``, ``score`` and sensitive-attribute columns) and returns a
:class:`FairnessReport`:

* ``cells`` -- one row per (scope, site, attribute, group, metric): the metric with its
  stratified bootstrap 95% interval, or the reason it is suppressed. Scopes: ``overall`` (all
  evaluated patients), ``site``, ``subgroup`` (all sites together, one attribute at a time) and
  ``site_subgroup`` (each site x each level of each attribute).
* ``summary`` -- worst and best value (and where), max-min gap (fairlearn's
  ``MetricFrame.difference``) and spread (population standard deviation) across sites, across the
  groups of each attribute, and across the groups of each attribute within each site.
* ``disparities`` -- fairlearn's ``equalized_odds_difference`` and
  ``demographic_parity_difference`` at the decision threshold, within each site and overall,
  per attribute.

Grouping is done by ``MetricFrame`` (``sensitive_features`` = site or attribute,
``control_features`` = site for the site x subgroup table); fairlearn's aggregations give the
worst value and the gap. Nothing here re-implements a group metric.

Small-cell rule: a cell with fewer than ``min_cell`` patients (default 10), or with no positives
or no negatives, is *suppressed*: its value, interval and counts are missing and ``reason`` says
why (``"fewer than 10 patients"``, ``"no positives"``, ``"no negatives"``). Suppressed cells
take no part in worst/gap/spread or in the disparity differences (a disparity needs at least two
unsuppressed groups).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd
from fairlearn.metrics import (
    MetricFrame,
    demographic_parity_difference,
    equalized_odds_difference,
)

from multimodal_fl.evaluation.metrics import (
    HIGHER_IS_BETTER,
    METRIC_NAMES,
    MetricValue,
    binary_metrics,
    bootstrap_seed,
    check_binary_inputs,
    choose_threshold,
    derive_seed,
    paired_bootstrap_difference,
    undefined_reason,
)

__all__ = [
    "CROSS_COLUMNS",
    "CrossSiteResult",
    "FairnessReport",
    "cell_reason",
    "cross_site_frame",
    "cross_site_matrix",
    "fairness_report",
    "local_vs_federated",
    "resolve_thresholds",
]

CELL_COLUMNS: tuple[str, ...] = (
    "scope",
    "site",
    "attribute",
    "group",
    "metric",
    "value",
    "lo",
    "hi",
    "n",
    "n_pos",
    "n_neg",
    "suppressed",
    "reason",
    "n_boot",
    "n_skipped",
)
SUMMARY_COLUMNS: tuple[str, ...] = (
    "scope",
    "site",
    "attribute",
    "metric",
    "worst",
    "worst_at",
    "best",
    "best_at",
    "gap",
    "spread",
    "n_cells",
    "n_suppressed",
    "reason",
)
DISPARITY_COLUMNS: tuple[str, ...] = (
    "site",
    "attribute",
    "equalized_odds_difference",
    "demographic_parity_difference",
    "groups_used",
    "groups_suppressed",
    "suppressed",
    "reason",
)
ALL_SITES = "(all sites)"


def cell_reason(y: npt.ArrayLike, min_cell: int) -> str | None:
    """The small-cell rule: why a cell is suppressed, or ``None`` when it may be shown.

    Parameters
    ----------
    y : array-like of 0/1
        Labels of the cell's patients.
    min_cell : int
        Minimum number of patients.

    Returns
    -------
    str or None
        ``"no patients"``, ``"fewer than {min_cell} patients"``, ``"no positives"``,
        ``"no negatives"`` or ``None``.
    """
    return undefined_reason(y, None, min_cell=min_cell)


@dataclass
class FairnessReport:
    """Result of :func:`fairness_report`.

    Attributes
    ----------
    cells : pandas.DataFrame
        Columns :data:`CELL_COLUMNS`; ``value``/``lo``/``hi``/``n``/``n_pos``/``n_neg`` are
        missing (NaN / <NA>) where ``suppressed`` is true, and ``reason`` says why.
    summary : pandas.DataFrame
        Columns :data:`SUMMARY_COLUMNS`; scopes ``across_sites``, ``across_groups`` (one row
        per attribute and metric) and ``across_groups_within_site``.
    disparities : pandas.DataFrame
        Columns :data:`DISPARITY_COLUMNS`; ``site`` is :data:`ALL_SITES` for the pooled row.
    thresholds : dict of str to float
        Decision threshold used at each site.
    threshold_source : str
        How the thresholds were obtained.
    settings : dict
        ``min_cell``, ``n_boot``, ``alpha``, ``seed``, ``ece_bins``, ``split``,
        ``sensitive``, ``metrics``.
    """

    cells: pd.DataFrame
    summary: pd.DataFrame
    disparities: pd.DataFrame
    thresholds: dict[str, float]
    threshold_source: str
    settings: dict[str, Any] = field(default_factory=dict)

    def table(
        self, metric: str = "auc", scope: str = "site", *, attribute: str | None = None
    ) -> pd.DataFrame:
        """A display table of one metric: ``value [lo, hi]`` or ``— (reason)`` strings.

        Parameters
        ----------
        metric : str
            A metric name.
        scope : str
            ``overall``, ``site``, ``subgroup`` or ``site_subgroup``.
        attribute : str or None
            Restrict to one sensitive attribute.

        Returns
        -------
        pandas.DataFrame
            Index ``site`` (and ``group``), columns ``value``, ``n``.
        """
        c = self.cells
        sel = c[(c["metric"] == metric) & (c["scope"] == scope)]
        if attribute is not None:
            sel = sel[sel["attribute"] == attribute]
        if sel.empty:
            raise ValueError(
                f"no cells for metric={metric!r}, scope={scope!r}, attribute={attribute!r}; "
                f"metrics: {sorted(c['metric'].unique())}, scopes: {sorted(c['scope'].unique())}"
            )
        text = [str(_row_value(r)) for r in sel.itertuples(index=False)]
        out = pd.DataFrame(
            {
                "site": sel["site"].to_numpy(),
                "attribute": sel["attribute"].to_numpy(),
                "group": sel["group"].to_numpy(),
                "value": text,
                "n": sel["n"].astype("Int64").array,
            }
        )
        return out.set_index(["site", "attribute", "group"])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary: lists of records, missing numbers as ``None`` (never NaN).

        Returns
        -------
        dict
        """
        return {
            "thresholds": dict(self.thresholds),
            "threshold_source": self.threshold_source,
            "settings": _jsonable(self.settings),
            "cells": _records(self.cells),
            "summary": _records(self.summary),
            "disparities": _records(self.disparities),
        }


def _row_value(r: Any) -> MetricValue:
    value = None if pd.isna(r.value) else float(r.value)
    lo = None if pd.isna(r.lo) else float(r.lo)
    hi = None if pd.isna(r.hi) else float(r.hi)
    return MetricValue(value, lo, hi, None if pd.isna(r.n) else int(r.n), r.reason)


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if x is pd.NA:
        return None
    return x


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    return [_jsonable(r) for r in df.astype(object).where(df.notna(), None).to_dict("records")]


# --------------------------------------------------------------------------------------------
# thresholds


def _per_site_thresholds(threshold: Mapping[Any, float]) -> dict[str, float]:
    """A ``{site: threshold}`` mapping keyed by ``str(site)``, as the site column is compared.

    Integer site ids (``{1: 0.5}``) then match a column of integers; two keys naming one
    site (``1`` and ``"1"``) with different thresholds are refused.
    """
    out: dict[str, float] = {}
    for key, value in threshold.items():
        site, t = str(key), float(value)
        if site in out and out[site] != t:
            raise ValueError(
                f"threshold mapping gives site {site!r} two thresholds ({out[site]:g} and "
                f"{t:g}): its keys {sorted(map(repr, threshold))} name sites as strings"
            )
        out[site] = t
    return out


def resolve_thresholds(
    df: pd.DataFrame,
    *,
    threshold: float | Mapping[Any, float] | None,
    rule: Literal["youden", "sensitivity", "specificity"] = "youden",
    split_col: str = "split",
    val_split: str = "val",
    site_col: str = "site",
    label_col: str = "label",
    score_col: str = "score",
    per_site: bool = False,
) -> tuple[dict[str, float], str]:
    """Decision threshold per site: given, or chosen on the validation split.

    Parameters
    ----------
    df : pandas.DataFrame
        All prediction rows (every split).
    threshold : float, mapping of site to float, or None
        Fixed threshold(s); ``None`` chooses on validation rows with ``rule``. A mapping's
        keys are compared with the site column as strings (``{1: 0.5}`` for site ``1``).
    rule : str
        See :func:`~multimodal_fl.evaluation.metrics.choose_threshold`.
    split_col, val_split, site_col, label_col, score_col : str
        Column names and the validation split's name.
    per_site : bool
        Choose one threshold per site on that site's validation rows (for local-only models)
        instead of one on all validation rows.

    Returns
    -------
    thresholds : dict of str to float
    source : str
        Human-readable provenance.

    Raises
    ------
    ValueError
        When no threshold is given and the validation rows cannot choose one.
    """
    sites = [str(s) for s in pd.unique(df[site_col])]
    if threshold is not None:
        if isinstance(threshold, Mapping):
            given = _per_site_thresholds(threshold)
            missing = [s for s in sites if s not in given]
            if missing:
                raise ValueError(
                    f"threshold mapping has no entry for site(s) {missing}; it has "
                    f"{sorted(given)}"
                )
            return {s: given[s] for s in sites}, "given per site"
        return {s: float(threshold) for s in sites}, f"given ({float(threshold):g})"
    if split_col not in df.columns:
        raise ValueError(
            f"no threshold given and no {split_col!r} column to find validation rows; pass "
            "threshold=... or include a split column with a "
            f"{val_split!r} split"
        )
    val = df[df[split_col] == val_split]
    if per_site:
        out: dict[str, float] = {}
        for s in sites:
            v = val[val[site_col].astype(str) == s]
            reason = undefined_reason(v[label_col].to_numpy())
            if reason is not None:
                raise ValueError(
                    f"site {s!r}: cannot choose a threshold on split {val_split!r}: {reason}; "
                    "pass threshold=... or per_site_threshold=False"
                )
            out[s] = choose_threshold(v[label_col].to_numpy(), v[score_col].to_numpy(), rule)
        return out, f"chosen per site on split {val_split!r} ({rule})"
    reason = undefined_reason(val[label_col].to_numpy())
    if reason is not None:
        raise ValueError(
            f"cannot choose a threshold on split {val_split!r}: {reason}; pass threshold=..."
        )
    t = choose_threshold(val[label_col].to_numpy(), val[score_col].to_numpy(), rule)
    return {s: t for s in sites}, f"chosen on split {val_split!r} of all sites ({rule}: {t:.4g})"


# --------------------------------------------------------------------------------------------
# metric functions handed to MetricFrame


def _cell_fn(
    y_true: npt.ArrayLike,
    y_pred: npt.ArrayLike,
    thr: npt.ArrayLike,
    *,
    metrics: Sequence[str],
    min_cell: int,
    n_boot: int,
    alpha: float,
    seed: int,
    ece_bins: int,
    cache: dict[bytes, dict[str, MetricValue]],
) -> dict[str, Any]:
    """Everything about one cell (counts, metrics with intervals), or its suppression reason."""
    y, s = check_binary_inputs(y_true, y_pred, where="fairness cell")
    reason = cell_reason(y, min_cell)
    if reason is not None:
        shown = reason != f"fewer than {min_cell} patients" and y.size > 0
        return {
            "reason": reason,
            "n": int(y.size) if shown else None,
            "n_pos": int(y.sum()) if shown else None,
            "metrics": {},
        }
    vals = binary_metrics(
        y, s, threshold=np.asarray(thr, dtype=np.float64), metrics=metrics, n_bins=ece_bins,
        n_boot=n_boot, alpha=alpha, seed=bootstrap_seed(seed, s),
    )
    cache[_cell_key(y, s, thr)] = vals
    return {"reason": None, "n": int(y.size), "n_pos": int(y.sum()), "metrics": vals}


def _cell_key(y: npt.ArrayLike, s: npt.ArrayLike, thr: npt.ArrayLike) -> bytes:
    """Identity of a cell's data, so the numeric MetricFrame reuses the computed values."""
    return b"|".join(
        np.ascontiguousarray(np.asarray(a, dtype=np.float64)).tobytes() for a in (y, s, thr)
    )


def _numeric_fn(
    y_true: npt.ArrayLike,
    y_pred: npt.ArrayLike,
    thr: npt.ArrayLike,
    *,
    metric: str,
    min_cell: int,
    ece_bins: int,
    cache: dict[bytes, dict[str, MetricValue]],
) -> float:
    """Point estimate of one metric for MetricFrame's aggregations; NaN when suppressed."""
    y, s = check_binary_inputs(y_true, y_pred, where="fairness cell")
    if cell_reason(y, min_cell) is not None:
        return math.nan
    hit = cache.get(_cell_key(y, s, thr))
    if hit is not None and metric in hit:
        v = hit[metric]
        return math.nan if v.value is None else float(v.value)
    v = binary_metrics(
        y, s, threshold=np.asarray(thr, dtype=np.float64), metrics=(metric,), n_bins=ece_bins
    )[metric]
    return math.nan if v.value is None else float(v.value)


def _frames(
    df: pd.DataFrame,
    *,
    sensitive: pd.Series,
    control: pd.Series | None,
    metrics: Sequence[str],
    min_cell: int,
    n_boot: int,
    alpha: float,
    seed: int,
    ece_bins: int,
) -> tuple[MetricFrame, MetricFrame]:
    """A MetricFrame of per-cell records and one of numeric point estimates."""
    y = df["__y"].to_numpy()
    s = df["__s"].to_numpy()
    thr = df["__t"].to_numpy()
    cache: dict[bytes, dict[str, MetricValue]] = {}
    cell = partial(
        _cell_fn, metrics=metrics, min_cell=min_cell, n_boot=n_boot, alpha=alpha, seed=seed,
        ece_bins=ece_bins, cache=cache,
    )
    records = MetricFrame(
        metrics={"cell": cell},
        y_true=y,
        y_pred=s,
        sensitive_features=sensitive,
        control_features=control,
        sample_params={"cell": {"thr": thr}},
    )
    numeric_fns: dict[str, Callable[..., float]] = {
        m: partial(_numeric_fn, metric=m, min_cell=min_cell, ece_bins=ece_bins, cache=cache)
        for m in metrics
    }
    numeric = MetricFrame(
        metrics=numeric_fns,
        y_true=y,
        y_pred=s,
        sensitive_features=sensitive,
        control_features=control,
        sample_params={m: {"thr": thr} for m in metrics},
    )
    return records, numeric


def _cell_rows(
    rec: Mapping[str, Any] | Any,
    *,
    scope: str,
    site: str,
    attribute: str | None,
    group: str | None,
    metrics: Sequence[str],
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    if not isinstance(rec, Mapping):  # MetricFrame gives NaN for a group with no rows
        rec = {"reason": "no patients", "n": None, "n_pos": None, "metrics": {}}
    n = rec["n"]
    n_pos = rec["n_pos"]
    for m in metrics:
        base = {
            "scope": scope,
            "site": site,
            "attribute": attribute,
            "group": group,
            "metric": m,
        }
        if rec["reason"] is not None:
            rows.append(
                base
                | {
                    "value": None, "lo": None, "hi": None,
                    "n": n, "n_pos": n_pos, "n_neg": None if n is None else n - n_pos,
                    "suppressed": True, "reason": rec["reason"], "n_boot": 0, "n_skipped": 0,
                }
            )
            continue
        v: MetricValue = rec["metrics"][m]
        rows.append(
            base
            | {
                "value": v.value, "lo": v.lo, "hi": v.hi,
                "n": n, "n_pos": n_pos, "n_neg": n - n_pos,
                "suppressed": v.value is None, "reason": v.reason,
                "n_boot": v.n_boot, "n_skipped": v.n_skipped,
            }
        )
    return rows


def _summary_rows(
    values: pd.Series,
    gap: float,
    *,
    scope: str,
    site: str | None,
    attribute: str | None,
    metric: str,
) -> dict[str, Any]:
    """Worst/best/gap/spread of one metric over a set of cells (``values`` indexed by cell)."""
    defined = values.dropna()
    n_cells = int(values.size)
    row: dict[str, Any] = {
        "scope": scope, "site": site, "attribute": attribute, "metric": metric,
        "worst": None, "worst_at": None, "best": None, "best_at": None,
        "gap": None, "spread": None,
        "n_cells": n_cells, "n_suppressed": int(n_cells - defined.size), "reason": None,
    }
    if defined.empty:
        row["reason"] = "every cell suppressed"
        return row
    hib = HIGHER_IS_BETTER[metric]
    worst_at = defined.idxmin() if hib else defined.idxmax()
    best_at = defined.idxmax() if hib else defined.idxmin()
    row |= {
        "worst": float(defined.min() if hib else defined.max()), "worst_at": str(worst_at),
        "best": float(defined.max() if hib else defined.min()), "best_at": str(best_at),
    }
    if defined.size < 2:
        row["reason"] = "fewer than 2 unsuppressed cells: no gap or spread"
        return row
    row["gap"] = float(gap)
    row["spread"] = float(defined.std(ddof=0))
    return row


def _disparity_row(
    d: pd.DataFrame, attribute: str, *, site: str, min_cell: int
) -> dict[str, Any]:
    groups = d[attribute].astype(str)
    eligible: list[str] = []
    suppressed: list[str] = []
    for g, sub in d.groupby(groups, sort=True, observed=True):
        (eligible if cell_reason(sub["__y"].to_numpy(), min_cell) is None else suppressed).append(
            str(g)
        )
    row: dict[str, Any] = {
        "site": site, "attribute": attribute,
        "equalized_odds_difference": None, "demographic_parity_difference": None,
        "groups_used": eligible, "groups_suppressed": suppressed,
        "suppressed": True, "reason": None,
    }
    if len(eligible) < 2:
        row["reason"] = (
            f"fewer than 2 groups of {attribute!r} with at least {min_cell} patients and both "
            "classes"
        )
        return row
    keep = groups.isin(eligible).to_numpy()
    y = d["__y"].to_numpy()[keep]
    pred = (d["__s"].to_numpy() >= d["__t"].to_numpy())[keep].astype(np.int64)
    sf = groups.to_numpy()[keep]
    row["equalized_odds_difference"] = float(
        equalized_odds_difference(y, pred, sensitive_features=sf)
    )
    row["demographic_parity_difference"] = float(
        demographic_parity_difference(y, pred, sensitive_features=sf)
    )
    row["suppressed"] = False
    return row


# --------------------------------------------------------------------------------------------
# the report


def _check_request(
    predictions: pd.DataFrame,
    *,
    metrics: Sequence[str] | None,
    min_cell: int,
    sensitive: list[str],
    columns: list[str],
    split_col: str | None,
) -> list[str]:
    """Check the metric names, ``min_cell`` and the columns; return the metric names.

    ``columns`` are the site, label and score columns; ``split_col`` is ``None`` when every
    row is evaluated (no split column needed).
    """
    names = list(METRIC_NAMES) if metrics is None else list(metrics)
    unknown = [m for m in names if m not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; accepted: {', '.join(METRIC_NAMES)}")
    if min_cell < 1:
        raise ValueError(f"min_cell must be at least 1, got {min_cell}")
    needed = [*columns, *sensitive]
    if split_col is not None:
        needed.append(split_col)
    missing = [c for c in dict.fromkeys(needed) if c not in predictions.columns]
    if missing:
        raise ValueError(
            f"predictions lack column(s) {missing}; present: {list(predictions.columns)}. "
            "Sensitive attributes come from `sensitive=`; name other columns with "
            "site_col/label_col/score_col/split_col"
        )
    return names


def _evaluated_rows(
    df: pd.DataFrame,
    thresholds: Mapping[str, float],
    *,
    split: str | None,
    split_col: str,
    site_col: str,
    label_col: str,
    score_col: str,
    sensitive: Sequence[str],
) -> pd.DataFrame:
    """The rows evaluated, with ``__y`` (label), ``__s`` (score) and ``__t`` (threshold) columns.

    Missing sensitive values become the group ``"(missing)"``.
    """
    if split is not None:
        all_splits = df[split_col]
        df = df[df[split_col] == split]
        if df.empty:
            raise ValueError(
                f"no rows with {split_col} == {split!r}; splits present: "
                f"{sorted(map(str, all_splits.unique()))}"
            )
    df = df.reset_index(drop=True)
    df["__y"] = df[label_col].astype(np.int64)
    df["__s"] = df[score_col].astype(np.float64)
    df["__t"] = df[site_col].map(thresholds).astype(np.float64)
    for a in sensitive:
        df[a] = df[a].astype(object).where(df[a].notna(), "(missing)").astype(str)
    return df


def _site_tables(
    df: pd.DataFrame, *, site_col: str, sites: Sequence[str], common: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Cells of all sites together and of each site, and the across-sites summary rows."""
    names = common["metrics"]
    rec, num = _frames(df, sensitive=df[site_col].rename("site"), control=None, **common)
    cells = _cell_rows(rec.overall["cell"], scope="overall", site=ALL_SITES, attribute=None,
                       group=None, metrics=names)
    by_site = rec.by_group["cell"]
    for s in sites:
        cells += _cell_rows(by_site.get(s), scope="site", site=s, attribute=None, group=None,
                            metrics=names)
    gaps = num.difference(errors="coerce")
    summary = [_summary_rows(num.by_group[m], gaps[m], scope="across_sites", site=None,
                             attribute=None, metric=m) for m in names]
    return cells, summary


def _attribute_tables(
    df: pd.DataFrame, a: str, *, site_col: str, sites: Sequence[str], common: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """One sensitive attribute: cells, summary rows and disparities, pooled and within sites."""
    names = common["metrics"]
    min_cell = common["min_cell"]
    cells: list[dict[str, Any]] = []
    summary: list[dict[str, Any]] = []
    disparities: list[dict[str, Any]] = []
    # pooled over sites, per level of the attribute
    rec, num = _frames(df, sensitive=df[a].rename(a), control=None, **common)
    gaps = num.difference(errors="coerce")
    for g, r in rec.by_group["cell"].items():
        cells += _cell_rows(r, scope="subgroup", site=ALL_SITES, attribute=a, group=str(g),
                            metrics=names)
    for m in names:
        summary.append(_summary_rows(num.by_group[m], gaps[m], scope="across_groups",
                                     site=None, attribute=a, metric=m))
    disparities.append(_disparity_row(df, a, site=ALL_SITES, min_cell=min_cell))
    # site x level: site is a control feature, aggregations stay within each site
    rec, num = _frames(df, sensitive=df[a].rename(a), control=df[site_col].rename("site"),
                       **common)
    gaps = num.difference(errors="coerce")
    for (s, g), r in rec.by_group["cell"].items():
        cells += _cell_rows(r, scope="site_subgroup", site=str(s), attribute=a,
                            group=str(g), metrics=names)
    for s in sites:
        for m in names:
            vals = num.by_group[m].xs(s, level="site")
            summary.append(_summary_rows(vals, gaps[m].loc[s],
                                         scope="across_groups_within_site", site=s,
                                         attribute=a, metric=m))
        disparities.append(_disparity_row(df[df[site_col] == s], a, site=s, min_cell=min_cell))
    return cells, summary, disparities


def _typed_tables(
    cells: list[dict[str, Any]], summary: list[dict[str, Any]], disparities: list[dict[str, Any]]
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The three tables as frames with their columns and dtypes (floats, nullable counts)."""
    cells_df = pd.DataFrame(cells, columns=list(CELL_COLUMNS))
    for c in ("value", "lo", "hi"):
        cells_df[c] = pd.to_numeric(cells_df[c], errors="coerce").astype(np.float64)
    for c in ("n", "n_pos", "n_neg"):
        cells_df[c] = pd.array(cells_df[c].tolist(), dtype="Int64")
    summary_df = pd.DataFrame(summary, columns=list(SUMMARY_COLUMNS))
    for c in ("worst", "best", "gap", "spread"):
        summary_df[c] = pd.to_numeric(summary_df[c], errors="coerce").astype(np.float64)
    disp_df = pd.DataFrame(disparities, columns=list(DISPARITY_COLUMNS))
    for c in ("equalized_odds_difference", "demographic_parity_difference"):
        disp_df[c] = pd.to_numeric(disp_df[c], errors="coerce").astype(np.float64)
    return cells_df, summary_df, disp_df


def fairness_report(
    predictions: pd.DataFrame,
    *,
    sensitive: Sequence[str] = ("sex", "age_band"),
    min_cell: int = 10,
    threshold: float | Mapping[Any, float] | None = None,
    threshold_rule: Literal["youden", "sensitivity", "specificity"] = "youden",
    per_site_threshold: bool = False,
    split: str | None = "test",
    val_split: str = "val",
    metrics: Sequence[str] | None = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    ece_bins: int = 10,
    seed: int = 0,
    site_col: str = "site",
    label_col: str = "label",
    score_col: str = "score",
    split_col: str = "split",
) -> FairnessReport:
    """Per-site, per-subgroup and site x subgroup performance with small-cell suppression.

    Parameters
    ----------
    predictions : pandas.DataFrame
        One row per patient and split: ``site``, ``label`` (0/1), ``score`` (probability),
        ``split`` (when ``split`` or validation thresholds are used) and the ``sensitive``
        columns. Other columns (``patient_id``, ...) are ignored.
    sensitive : sequence of str
        Sensitive-attribute columns (``sex``, ``age_band``, any cohort column). Missing values
        form their own group ``"(missing)"``.
    min_cell : int
        Cells with fewer patients, or without positives or negatives, are suppressed.
    threshold : float, mapping of site to float, or None
        Decision threshold(s) for sensitivity, specificity and the disparity differences; a
        mapping's keys are compared with the site column as strings (integer ids work).
        ``None`` chooses one on the ``val_split`` rows with ``threshold_rule``.
    threshold_rule : {"youden", "sensitivity", "specificity"}
        Rule for choosing the threshold on validation rows.
    per_site_threshold : bool
        Choose each site's threshold on its own validation rows (local-only models).
    split : str or None
        Rows evaluated (default the ``test`` split); ``None`` evaluates every row.
    val_split : str
        Name of the validation split.
    metrics : sequence of str or None
        Subset of :data:`~multimodal_fl.evaluation.metrics.METRIC_NAMES`; default all.
    n_boot : int
        Stratified bootstrap resamples per cell (0: no intervals).
    alpha : float
        Intervals are ``1 - alpha`` percentile intervals.
    ece_bins : int
        Equal-width bins of the expected calibration error.
    seed : int
        Base seed; each cell's bootstrap seed is derived from it and the cell's scores
        (:func:`~multimodal_fl.evaluation.metrics.bootstrap_seed`, the rule of every per-site
        interval).
    site_col, label_col, score_col, split_col : str
        Column names.

    Returns
    -------
    FairnessReport

    Raises
    ------
    ValueError
        On missing columns, invalid labels/scores, an empty evaluation split, or no way to
        obtain a threshold.
    """
    sensitive = list(sensitive)
    names = _check_request(predictions, metrics=metrics, min_cell=min_cell, sensitive=sensitive,
                           columns=[site_col, label_col, score_col],
                           split_col=split_col if split is not None else None)
    df = predictions.copy()
    df[site_col] = df[site_col].astype(str)
    check_binary_inputs(df[label_col].to_numpy(), df[score_col].to_numpy(), where="predictions")
    thresholds, source = resolve_thresholds(
        df, threshold=threshold, rule=threshold_rule, split_col=split_col, val_split=val_split,
        site_col=site_col, label_col=label_col, score_col=score_col, per_site=per_site_threshold,
    )
    df = _evaluated_rows(df, thresholds, split=split, split_col=split_col, site_col=site_col,
                         label_col=label_col, score_col=score_col, sensitive=sensitive)
    sites = sorted(df[site_col].unique())
    common: dict[str, Any] = {
        "metrics": names, "min_cell": min_cell, "n_boot": n_boot, "alpha": alpha,
        "seed": seed, "ece_bins": ece_bins,
    }
    cells, summary = _site_tables(df, site_col=site_col, sites=sites, common=common)
    disparities: list[dict[str, Any]] = []
    for a in sensitive:
        a_cells, a_summary, a_disparities = _attribute_tables(
            df, a, site_col=site_col, sites=sites, common=common
        )
        cells += a_cells
        summary += a_summary
        disparities += a_disparities
    settings = {
        **common, "split": split, "sensitive": sensitive, "threshold_rule": threshold_rule,
        "per_site_threshold": per_site_threshold,
        "interval": "stratified percentile bootstrap",
    }
    return FairnessReport(*_typed_tables(cells, summary, disparities), thresholds, source,
                          settings)


# --------------------------------------------------------------------------------------------
# generalisability: cross-site matrix and local -> federated change


@dataclass
class CrossSiteResult:
    """A model x test-site table of one metric (EXAM-style generalisability).

    Attributes
    ----------
    long : pandas.DataFrame
        One row per (model, test_site): ``value``, ``lo``, ``hi``, ``n``, ``suppressed``,
        ``reason``.
    metric : str
        The metric.
    """

    long: pd.DataFrame
    metric: str

    @property
    def matrix(self) -> pd.DataFrame:
        """Values as a model x test-site matrix (NaN where suppressed)."""
        return self.long.pivot(index="model", columns="test_site", values="value")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return {"metric": self.metric, "cells": _records(self.long)}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> CrossSiteResult:
        """The inverse of :meth:`to_dict` (e.g. a run's disclosed ``cross_site.json``).

        Parameters
        ----------
        doc : mapping
            ``metric`` and ``cells`` (each with ``model``, ``test_site``, ``value``, ``lo``,
            ``hi``, ``n``, ``suppressed``, ``reason``).

        Returns
        -------
        CrossSiteResult

        Raises
        ------
        ValueError
            When ``metric`` or ``cells`` is missing or a cell lacks a key (named).
        """
        missing = [k for k in ("metric", "cells") if k not in doc]
        if missing:
            raise ValueError(f"cross-site document lacks {missing}; expected 'metric' and "
                             "'cells'")
        for i, cell in enumerate(doc["cells"]):
            lacking = [c for c in CROSS_COLUMNS if c not in cell]
            if lacking:
                raise ValueError(f"cross-site cell {i} lacks {lacking}; a cell has "
                                 f"{list(CROSS_COLUMNS)}")
        return cls(cross_site_frame(list(doc["cells"])), str(doc["metric"]))


#: The columns of :attr:`CrossSiteResult.long`.
CROSS_COLUMNS = ("model", "test_site", "value", "lo", "hi", "n", "suppressed", "reason")


def cross_site_frame(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Cross-site cells as :attr:`CrossSiteResult.long` types them.

    Parameters
    ----------
    rows : sequence of mapping
        One per (model, test site), keys :data:`CROSS_COLUMNS`.

    Returns
    -------
    pandas.DataFrame
        ``value``, ``lo``, ``hi`` as float64 (NaN where absent), ``n`` as nullable Int64.
    """
    long = pd.DataFrame(list(rows), columns=list(CROSS_COLUMNS))
    for c in ("value", "lo", "hi"):
        long[c] = pd.to_numeric(long[c], errors="coerce").astype(np.float64)
    long["n"] = pd.array(long["n"].tolist(), dtype="Int64")
    long["suppressed"] = long["suppressed"].astype(bool)
    return long


def cross_site_matrix(
    predictions: pd.DataFrame,
    *,
    metric: str = "auc",
    model_col: str = "model",
    test_site_col: str = "site",
    label_col: str = "label",
    score_col: str = "score",
    split_col: str = "split",
    split: str | None = "test",
    threshold: float | None = None,
    min_cell: int = 10,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> CrossSiteResult:
    """Each model tested on each site's test set: the cross-site matrix with intervals.

    Parameters
    ----------
    predictions : pandas.DataFrame
        Long table: one row per (model, patient) with ``model`` (e.g. ``local:site_a``,
        ``federated``), ``site`` (the test site), ``label``, ``score`` and ``split``.
    metric : str
        A built-in metric name.
    model_col, test_site_col, label_col, score_col, split_col : str
        Column names.
    split : str or None
        Rows used (default ``test``; ``None`` for all).
    threshold : float or None
        For threshold metrics.
    min_cell : int
        Small-cell rule for each (model, test site) cell.
    n_boot, alpha, seed
        Stratified bootstrap settings; each cell's bootstrap is seeded by ``seed`` and its
        scores (:func:`~multimodal_fl.evaluation.metrics.bootstrap_seed`), as a site's
        ``cross_evaluate`` cell is.

    Returns
    -------
    CrossSiteResult
    """
    needed = [model_col, test_site_col, label_col, score_col] + ([split_col] if split else [])
    missing = [c for c in needed if c not in predictions.columns]
    if missing:
        raise ValueError(
            f"cross_site_matrix: predictions lack column(s) {missing}; present: "
            f"{list(predictions.columns)}"
        )
    df = predictions if split is None else predictions[predictions[split_col] == split]
    rows: list[dict[str, Any]] = []
    for (model, site), d in df.groupby([model_col, test_site_col], sort=True):
        y, s = check_binary_inputs(d[label_col].to_numpy(), d[score_col].to_numpy(),
                                   where=f"model {model!r} on site {site!r}")
        reason = cell_reason(y, min_cell)
        base = {"model": str(model), "test_site": str(site)}
        if reason is not None:
            hide = y.size < min_cell
            rows.append(base | {"value": None, "lo": None, "hi": None,
                                "n": None if hide else int(y.size), "suppressed": True,
                                "reason": reason})
            continue
        v = binary_metrics(y, s, metrics=(metric,), threshold=threshold, n_boot=n_boot,
                           alpha=alpha, seed=bootstrap_seed(seed, s))[metric]
        rows.append(base | {"value": v.value, "lo": v.lo, "hi": v.hi, "n": int(y.size),
                            "suppressed": v.value is None, "reason": v.reason})
    return CrossSiteResult(cross_site_frame(rows), metric)


def local_vs_federated(
    local: pd.DataFrame,
    federated: pd.DataFrame,
    *,
    metric: str = "auc",
    site_col: str = "site",
    id_col: str = "patient_id",
    label_col: str = "label",
    score_col: str = "score",
    split_col: str = "split",
    split: str | None = "test",
    threshold: float | None = None,
    min_cell: int = 10,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> pd.DataFrame:
    """Per-site change from the site's local-only model to the federated model.

    Both models are scored on the same patients (joined on site and patient id), and the
    interval of the change comes from a paired stratified bootstrap.

    Parameters
    ----------
    local : pandas.DataFrame
        Each site's own local-only model's predictions on its own patients.
    federated : pandas.DataFrame
        The federated (or any comparison) model's predictions on the same patients.
    metric : str
        A built-in metric name.
    site_col, id_col, label_col, score_col, split_col : str
        Column names.
    split : str or None
        Rows compared (default ``test``).
    threshold : float or None
        For threshold metrics.
    min_cell : int
        Small-cell rule per site.
    n_boot, alpha, seed
        Bootstrap settings.

    Returns
    -------
    pandas.DataFrame
        One row per site: ``local``, ``local_lo``, ``local_hi``, ``federated``,
        ``federated_lo``, ``federated_hi``, ``change``, ``change_lo``, ``change_hi``, ``n``,
        ``suppressed``, ``reason``.

    Raises
    ------
    ValueError
        On missing columns or labels that disagree between the two tables.
    """
    cols = [site_col, id_col, label_col, score_col] + ([split_col] if split else [])
    for name, d in (("local", local), ("federated", federated)):
        missing = [c for c in cols if c not in d.columns]
        if missing:
            raise ValueError(
                f"local_vs_federated: {name} predictions lack column(s) {missing}; present: "
                f"{list(d.columns)}"
            )
    a = local if split is None else local[local[split_col] == split]
    b = federated if split is None else federated[federated[split_col] == split]
    a = a[[site_col, id_col, label_col, score_col]].astype({site_col: str, id_col: str})
    b = b[[site_col, id_col, label_col, score_col]].astype({site_col: str, id_col: str})
    m = a.merge(b, on=[site_col, id_col], suffixes=("_local", "_fed"), validate="one_to_one")
    bad = m[label_col + "_local"] != m[label_col + "_fed"]
    if bad.any():
        ex = m.loc[bad, [site_col, id_col]].head(3).to_dict("records")
        raise ValueError(f"local_vs_federated: labels differ between the runs for {ex}")
    rows: list[dict[str, Any]] = []
    for site, d in m.groupby(site_col, sort=True):
        y = d[label_col + "_local"].to_numpy()
        sl = d[score_col + "_local"].to_numpy()
        sf = d[score_col + "_fed"].to_numpy()
        row: dict[str, Any] = {"site": str(site)}
        reason = cell_reason(y, min_cell)
        if reason is not None:
            rows.append(row | {"n": None if len(y) < min_cell else len(y), "suppressed": True,
                               "reason": reason})
            continue
        cell_seed = derive_seed(seed, site)
        vl = binary_metrics(y, sl, metrics=(metric,), threshold=threshold, n_boot=n_boot,
                            alpha=alpha, seed=cell_seed)[metric]
        vf = binary_metrics(y, sf, metrics=(metric,), threshold=threshold, n_boot=n_boot,
                            alpha=alpha, seed=cell_seed)[metric]
        dv = paired_bootstrap_difference(y, sl, sf, metric=metric, threshold=threshold,
                                         n_boot=n_boot, alpha=alpha, seed=cell_seed)
        rows.append(row | {
            "local": vl.value, "local_lo": vl.lo, "local_hi": vl.hi,
            "federated": vf.value, "federated_lo": vf.lo, "federated_hi": vf.hi,
            "change": dv.value, "change_lo": dv.lo, "change_hi": dv.hi,
            "n": len(y), "suppressed": False, "reason": None,
        })
    out = pd.DataFrame(rows, columns=[
        "site", "local", "local_lo", "local_hi", "federated", "federated_lo", "federated_hi",
        "change", "change_lo", "change_hi", "n", "suppressed", "reason"])
    for c in out.columns[1:10]:
        out[c] = pd.to_numeric(out[c], errors="coerce").astype(np.float64)
    out["n"] = pd.array(out["n"].tolist(), dtype="Int64")
    return out
