"""Render the report: figures as base64 PNG, a self-contained ``report.html``, ``report.json``.

:func:`write_report` computes the report (:func:`.compute.build_report`) and writes
``report.json`` (every number, suppressed cells as ``null`` with a reason) and
``report.html`` (plots as base64 PNG, no external resources): per-site ROC and calibration
curves, fairness charts with 95% intervals, disparity tables, the cross-site matrix heatmap,
the per-site change from local-only to federated, training curves, and the federated
(histogram-pooled) figures. Every figure is drawn from what the sites disclosed: a site's ROC
curve from its disclosed ROC points, its calibration curve from its disclosed calibration bins
(each of at least ``min_cell`` patients), the all-sites panels from the pooled histograms in
``metrics.json``; a panel or figure with nothing to show says why.
:func:`write_frame_report` does the same for a predictions DataFrame of the user's own.

Each figure is built by a public function returning the matplotlib ``Figure``
(:func:`roc_figure`, :func:`calibration_figure`, :func:`forest_figure`,
:func:`cross_site_figure`, :func:`change_figure`, :func:`training_figure`), so it can be
inspected or saved on its own.

The page's script (:data:`STATUS_SCRIPT`) records on load the section ids, the number of
images, the notes shown and any JavaScript or image error in ``#report-status``, for a
headless-browser check.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from multimodal_fl.evaluation.fairness import (
    ALL_SITES,
    CrossSiteResult,
    FairnessReport,
)
from multimodal_fl.evaluation.report.compute import (
    FRAME_LABEL,
    SPLIT,
    build_report,
    json_ready,
    report_from_runs,
    run_from_frame,
)
from multimodal_fl.evaluation.report.load import RunData

__all__ = [
    "FOREST_SCOPES",
    "SECTIONS",
    "STATUS_SCRIPT",
    "calibration_figure",
    "change_figure",
    "cross_site_figure",
    "forest_figure",
    "palette",
    "roc_figure",
    "training_figure",
    "write_frame_report",
    "write_report",
]

SECTIONS: tuple[tuple[str, str], ...] = (
    ("summary", "Summary"),
    ("roc", "ROC curves per site"),
    ("calibration", "Calibration per site"),
    ("fairness", "Fairness: sites and subgroups"),
    ("disparities", "Disparities within sites"),
    ("generalisability", "Generalisability: cross-site matrix"),
    ("federation-gain", "Change from local-only training"),
    ("federated-evaluation", "Federated evaluation (histogram-pooled)"),
    ("training", "Training curves"),
    ("privacy", "Differential privacy"),
    ("method", "Method and settings"),
)
"""Section ids and titles of ``report.html``, in order."""


# --------------------------------------------------------------------------------------------
# figures


def _rows(df: pd.DataFrame) -> list[Any]:
    """Rows as named tuples (typed ``Any``: columns hold numbers, strings and NA)."""
    return list(df.itertuples(index=False))


def _png(fig: Figure) -> str:
    """A figure as base64 PNG (90 dpi, tight bounding box)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _grid(n: int, width: float = 3.6) -> tuple[Figure, list[Any]]:
    """A figure of ``n`` square panels, at most four per row."""
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols, width * rows), layout="constrained")
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n)]
    return fig, axes


def palette(n: int) -> list[Any]:
    """``n`` distinct colours: tab10 up to 10, tab20 up to 20, then evenly spaced viridis.

    Parameters
    ----------
    n : int

    Returns
    -------
    list
        RGBA tuples, one per series.
    """
    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    return [colormaps["viridis"](x) for x in np.linspace(0.0, 1.0, n)]


def _run_colours(runs: Sequence[RunData]) -> dict[str, Any]:
    """One colour per run, the same in every panel and figure."""
    return dict(zip([r.label for r in runs], palette(len(runs)), strict=True))


def _pooled_curve(run: RunData) -> tuple[pd.DataFrame | None, str | None]:
    """The run's pooled calibration records (``metrics.json``), or why there are none."""
    pooled = run.metrics.get("pooled_from_histograms") or {}
    overall = pooled.get("overall") or {}
    if not overall:
        return None, "no histogram-pooled figures"
    if overall.get("reason"):
        return None, str(overall["reason"])
    cal = pd.DataFrame(overall.get("calibration") or [])
    if cal.empty:
        return None, "no pooled calibration"
    return cal, None


def _no_data_text(ax: Any, text: str) -> None:
    """Write why a panel is empty in its middle, over a white box."""
    ax.text(0.5, 0.5, textwrap.fill(text, 28), ha="center", va="center", fontsize=8,
            color="dimgrey", transform=ax.transAxes,
            bbox={"facecolor": "white", "edgecolor": "lightgrey", "boxstyle": "round"})


def _finish_panel(ax: Any, drawn: bool, missing: list[tuple[str, str]], what: str,
                  loc: str) -> None:
    """Legend of the drawn runs plus why the others have no curve; or why the panel is empty.

    ``missing`` holds ``(run label, reason)``; a panel with no curve at all says why in its
    middle instead of showing an empty legend.
    """
    if not drawn:
        reasons = {r for _, r in missing}
        text = (f"nothing to show: {reasons.pop()}" if len(reasons) == 1 else
                "nothing to show: " + "; ".join(f"{lab}: {r}" for lab, r in missing))
        _no_data_text(ax, text)
        return
    handles, labels = ax.get_legend_handles_labels()
    for lab, reason in missing:
        handles.append(Line2D([], [], ls="none"))
        labels.append(textwrap.fill(f"{lab}: no {what} ({reason})", 34))
    ax.legend(handles, labels, fontsize=7, loc=loc)


def _site_panels(runs: Sequence[RunData], axis_labels: tuple[str, str],
                 draw: Callable[[Any, RunData, str, Any], str | None], what: str,
                 loc: str) -> Figure:
    """One unit-square panel per site and one for all sites, each run drawn by ``draw``.

    ``draw(ax, run, site, colour)`` draws one run's curve in one panel (``site`` is
    :data:`ALL_SITES` for the pooled panel) or returns why it cannot; a run with a reason is
    listed in the panel's legend with it (:func:`_finish_panel`).
    """
    sites = sorted({s for r in runs for s in r.sites})
    colours = _run_colours(runs)
    fig, axes = _grid(len(sites) + 1)
    for ax, site in zip(axes, [*sites, ALL_SITES], strict=True):
        ax.plot([0, 1], [0, 1], ls=":", c="grey", lw=0.8)
        ax.set(title=site, xlabel=axis_labels[0], ylabel=axis_labels[1],
               xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
        missing: list[tuple[str, str]] = []
        for r in runs:
            if site != ALL_SITES and site not in r.disclosed:
                reason: str | None = "not disclosed"
            else:
                reason = draw(ax, r, site, colours[r.label])
            if reason is not None:
                missing.append((r.label, reason))
        _finish_panel(ax, len(missing) < len(runs), missing, what, loc)
    return fig


def _pooled_roc(cal: pd.DataFrame) -> tuple[list[float], list[float]]:
    """ROC points at the pooled calibration-bin edges (counts from ``n`` and ``observed``)."""
    cal = cal[cal["n"] > 0]
    pos = (cal["n"] * cal["observed"]).to_numpy(dtype=np.float64)[::-1]
    neg = (cal["n"] * (1.0 - cal["observed"])).to_numpy(dtype=np.float64)[::-1]
    tpr = np.concatenate([[0.0], np.cumsum(pos) / pos.sum()])
    fpr = np.concatenate([[0.0], np.cumsum(neg) / neg.sum()])
    return fpr.tolist(), tpr.tolist()


def roc_figure(runs: Sequence[RunData], min_cell: int) -> Figure:
    """Test-split ROC curves: one panel per site and one for all sites, one curve per run.

    A site's curve joins its disclosed ROC points (thresholds whose steps hold 0 or at least
    ``min_cell`` of each class); the all-sites curve joins the points at the pooled
    calibration-bin edges (``metrics.json``'s histogram-pooled figures).

    Parameters
    ----------
    runs : sequence of RunData
    min_cell : int
        The report's small-cell threshold (the sites applied theirs before disclosing).

    Returns
    -------
    matplotlib.figure.Figure
        A panel without a curve says why (the site withheld its ROC summary, and the reason).
    """
    def draw(ax: Any, r: RunData, site: str, colour: Any) -> str | None:
        if site == ALL_SITES:
            cal, why = _pooled_curve(r)
            if cal is None:
                return why
            fpr, tpr = _pooled_roc(cal)
        else:
            roc = r.disclosed[site].roc
            if roc.reason is not None:
                return roc.reason
            fpr, tpr = [*roc.fpr, 0.0], [*roc.tpr, 0.0]
        ax.plot(fpr, tpr, lw=1.4, marker=".", ms=4, label=r.label, color=colour)
        return None

    return _site_panels(runs, ("1 - specificity", "sensitivity"), draw, "curve",
                        "lower right")


def calibration_figure(runs: Sequence[RunData], min_cell: int) -> Figure:
    """Calibration curves per site from the disclosed bins, and all sites from pooled bins.

    Parameters
    ----------
    runs : sequence of RunData
    min_cell : int
        Pooled calibration bins with fewer patients are not drawn (each site's disclosed
        bins hold at least its own ``min_cell``).

    Returns
    -------
    matplotlib.figure.Figure
        A panel with nothing to show says why (the site withheld its calibration summary, or
        every pooled bin holds fewer than ``min_cell`` patients).
    """
    def draw(ax: Any, r: RunData, site: str, colour: Any) -> str | None:
        if site == ALL_SITES:
            cal, why = _pooled_curve(r)
            if cal is None:
                return why
            cal = cal[cal["n"] >= min_cell]  # small-cell rule for plotted bins
            if cal.empty:
                return f"every bin holds fewer than {min_cell} patients"
            x, y = cal["mean_score"].tolist(), cal["observed"].tolist()
        else:
            c = r.disclosed[site].calibration
            if c.reason is not None or not c.bins:
                return c.reason or "no calibration bins"
            x, y = [b.mean_score for b in c.bins], [b.observed for b in c.bins]
        ax.plot(x, y, marker="o", ms=3, lw=1.2, label=r.label, color=colour)
        return None

    return _site_panels(runs, ("mean predicted risk", "observed fraction positive"), draw,
                        "points", "upper left")


def _forest_label(r: Any) -> str:
    """A forest-plot row's name."""
    if r.scope == "overall":
        return "all sites"
    if r.scope == "site":
        return f"site {r.site}"
    if r.scope == "subgroup":
        return f"{r.attribute}={r.group}"
    return f"{r.site}: {r.attribute}={r.group}"


#: Forest-plot colours by cell scope, and the legend's words for them.
FOREST_SCOPES: dict[str, tuple[str, str]] = {
    "overall": ("black", "all sites"),
    "site": ("tab:blue", "site"),
    "subgroup": ("tab:green", "subgroup (all sites)"),
    "site_subgroup": ("tab:orange", "subgroup within a site"),
}


def _x_range(values: Sequence[float], base: tuple[float, float]) -> tuple[float, float]:
    """An axis range holding ``base`` and every value, with a 4% margin each side."""
    lo, hi = min([base[0], *values]), max([base[1], *values])
    pad = 0.04 * (hi - lo)
    return lo - pad, hi + pad


def forest_figure(fr: FairnessReport, metric: str, title: str) -> Figure:
    """One metric with its intervals for all sites, each site, subgroup and site x subgroup.

    Parameters
    ----------
    fr : FairnessReport
    metric : str
        A metric of ``fr.cells`` (``auc``, ...).
    title : str

    Returns
    -------
    matplotlib.figure.Figure
        The x axis holds [0, 1] and every interval whole; suppressed cells show their reason.
    """
    c = fr.cells[fr.cells["metric"] == metric]
    order = {s: i for i, s in enumerate(FOREST_SCOPES)}
    c = c.assign(_o=c["scope"].map(order)).sort_values(["_o", "attribute", "site", "group"],
                                                        na_position="first")
    rows = _rows(c)
    n = len(rows)
    fig = Figure(figsize=(7.5, 0.26 * n + 1.4), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    ypos = np.arange(n)[::-1]
    ends: list[float] = []
    for y, r in zip(ypos, rows, strict=True):
        if r.suppressed or pd.isna(r.value):
            ax.text(0.5, y, f"suppressed ({r.reason})", ha="center", va="center", fontsize=7,
                    color="grey", transform=ax.get_yaxis_transform())
            continue
        lo = r.value if pd.isna(r.lo) else r.lo
        hi = r.value if pd.isna(r.hi) else r.hi
        ends += [lo, hi]
        ax.errorbar(r.value, y, xerr=[[r.value - lo], [hi - r.value]], fmt="o", ms=4,
                    color=FOREST_SCOPES[r.scope][0], capsize=2, lw=1)
    ax.set_yticks(ypos)
    ax.set_yticklabels([_forest_label(r) for r in rows], fontsize=7)
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_xlim(*_x_range(ends, (0.0, 1.0)))
    ax.set_xlabel(f"{metric} (95% bootstrap interval)")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    shown = [s for s in FOREST_SCOPES if s in set(c["scope"])]
    fig.legend([Line2D([], [], marker="o", ls="none", color=FOREST_SCOPES[s][0]) for s in shown],
               [FOREST_SCOPES[s][1] for s in shown], loc="outside lower center",
               ncols=len(shown), fontsize=7, frameon=False)
    return fig


def _text_colour(cmap: Any, value: float) -> str:
    """Black or white, whichever reads on the colour ``value`` takes in ``cmap``."""
    r, g, b, _ = cmap(value)
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


def cross_site_figure(cross: CrossSiteResult) -> Figure:
    """The cross-site matrix as a heatmap with its values written in.

    Parameters
    ----------
    cross : CrossSiteResult

    Returns
    -------
    matplotlib.figure.Figure
        The colour scale runs from 0 to 1 with 0.5 (chance) marked on the colour bar.
    """
    mat = cross.matrix
    fig = Figure(figsize=(1.3 * mat.shape[1] + 3.0, 0.55 * mat.shape[0] + 1.5),
                 layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    vals = mat.to_numpy(dtype=np.float64)
    cmap = colormaps["viridis"]
    im = ax.imshow(np.ma.masked_invalid(vals), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(mat.shape[1]), [str(v) for v in mat.columns], fontsize=8)
    ax.set_yticks(range(mat.shape[0]), [str(v) for v in mat.index], fontsize=8)
    ax.set_xlabel("test site")
    ax.set_ylabel("model")
    for i in range(mat.shape[0]):
        for j in range(mat.shape[1]):
            v = vals[i, j]
            ax.text(j, i, "—" if np.isnan(v) else f"{v:.2f}", ha="center", va="center",
                    fontsize=8, color="black" if np.isnan(v) else _text_colour(cmap, v))
    bar = fig.colorbar(im, ax=ax, label=cross.metric)
    bar.set_ticks([0.0, 0.25, 0.5, 0.75, 1.0], labels=["0", "0.25", "0.5 chance", "0.75", "1"])
    bar.ax.axhline(0.5, color="white", lw=2.5)
    bar.ax.axhline(0.5, color="black", lw=1.0)
    return fig


def change_figure(changes: dict[str, pd.DataFrame], colours: dict[str, Any] | None = None
                  ) -> Figure:
    """Per site, the change in test AUC from local-only training, with its interval.

    Parameters
    ----------
    changes : dict of str to DataFrame
        :func:`~multimodal_fl.evaluation.fairness.local_vs_federated` tables by compared run.
    colours : dict or None
        A colour per compared run (default :func:`palette`).

    Returns
    -------
    matplotlib.figure.Figure
    """
    colours = colours or dict(zip(changes, palette(len(changes)), strict=True))
    n = sum(len(v) for v in changes.values())
    fig = Figure(figsize=(7.5, 0.45 * n + 1.2), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    labels: list[str] = []
    ends = [0.0]
    for name, df in changes.items():
        for r in _rows(df):
            y = len(labels)
            labels.append(f"{r.site}: local-only → {name}")
            if r.suppressed or pd.isna(r.change):
                ax.text(0.5, y, f"suppressed ({r.reason})", ha="center", va="center", fontsize=7,
                        color="grey", transform=ax.get_yaxis_transform(),
                        bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
                continue
            lo = r.change if pd.isna(r.change_lo) else r.change_lo
            hi = r.change if pd.isna(r.change_hi) else r.change_hi
            ends += [lo, hi]
            ax.errorbar(r.change, y, xerr=[[r.change - lo], [hi - r.change]], fmt="o", ms=4,
                        capsize=2, lw=1, color=colours[name])
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.set_ylim(n - 0.3, -0.7)
    ax.set_xlim(*_x_range(ends, (-0.05, 0.05)))
    ax.set_xlabel("change in test AUC (MOVER 95% interval, conservative)")
    return fig


def _training_panel(ax: Any, title: str, c: dict[str, Any]) -> None:
    """One training panel: loss (black, left axis), each validation series its own colour."""
    x = c["x"]
    ax.plot(x, [np.nan if v is None else v for v in c["train_loss"]], color="black", lw=1.2,
            ls="--", label="train loss")
    ax.set(xlabel=c["x_label"], ylabel="train loss")
    ax.set_title(title, fontsize=9)
    handles, labels = ax.get_legend_handles_labels()
    if c["eval"]:
        ax2 = ax.twinx()
        for (k, v), colour in zip(c["eval"].items(), palette(len(c["eval"])), strict=True):
            ys = [np.nan if u is None else u for u in v]
            if all(np.isnan(ys)):
                handles.append(Line2D([], [], ls="none"))
                labels.append(f"{k}: undefined at every {c['x_label']}")
                continue
            handles += ax2.plot(x, ys, lw=1, marker=".", color=colour)
            labels.append(k)
        ax2.set_ylabel("validation AUC")
        ax2.set_ylim(-0.02, 1.02)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(handles, labels, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2),
              ncols=2, frameon=False)


def training_figure(doc_training: dict[str, Any]) -> Figure | None:
    """Train loss and validation AUC per round or step.

    Parameters
    ----------
    doc_training : dict
        ``report.json``'s ``training`` part: per run, per model, the series.

    Returns
    -------
    matplotlib.figure.Figure or None
        ``None`` when no run has curves. Every series of a panel has its own colour.
    """
    panels = [(run, name, c) for run, curves in doc_training.items() for name, c in curves.items()]
    if not panels:
        return None
    fig, axes = _grid(len(panels), width=4.2)
    for ax, (run, name, c) in zip(axes, panels, strict=True):
        _training_panel(ax, f"{run}: {name}", c)
    return fig


# --------------------------------------------------------------------------------------------
# HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1200px;
padding:0 1.5em 3em;color:#222;line-height:1.45}
h1{margin-top:1em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:right}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #eee}.note{color:#666;font-size:.9em}
nav a{margin-right:1em}.suppressed{color:#999}
"""

STATUS_SCRIPT = """
window.__reportErrors = [];
window.addEventListener('error', function (e) {
  window.__reportErrors.push(String(e.message || e.type));
}, true);
window.addEventListener('load', function () {
  var imgs = document.images, bad = 0;
  for (var i = 0; i < imgs.length; i++) {
    if (!imgs[i].complete || imgs[i].naturalWidth === 0) { bad++; }
  }
  if (bad) { window.__reportErrors.push(bad + ' image(s) failed to load'); }
  var ids = [];
  document.querySelectorAll('section[id]').forEach(function (s) { ids.push(s.id); });
  var notes = document.querySelectorAll('.note'), shown = [];
  notes.forEach(function (n) {
    if (n.getClientRects().length > 0 && n.innerText.trim()) { shown.push(n.innerText.trim()); }
  });
  var st = document.getElementById('report-status');
  st.setAttribute('data-sections', ids.join(','));
  st.setAttribute('data-images', String(imgs.length));
  st.setAttribute('data-notes', String(notes.length));
  st.setAttribute('data-shownnotes', shown.join(' | '));
  st.setAttribute('data-errors', window.__reportErrors.join(' | '));
  st.setAttribute('data-ready', '1');
});
"""
"""The page's script: on load, ``#report-status`` gets ``data-sections``, ``data-images``,
``data-notes`` (the number of ``.note`` paragraphs), ``data-shownnotes`` (the text of those
laid out on the page, joined by `` | ``), ``data-errors`` (JavaScript errors and broken
images) and ``data-ready="1"``."""


def _esc(x: Any) -> str:
    """HTML-escaped text of any value."""
    return html.escape(str(x))


def _img(b64: str | None, alt: str, why: str = "") -> str:
    """An inline PNG, or a note saying why there is nothing to plot."""
    if b64 is None:
        return f'<p class="note">{_esc(alt)}: nothing to plot{_esc(why and ": " + why)}.</p>'
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{b64}">'


def _table(df: pd.DataFrame) -> str:
    """A frame as an HTML table: floats to 3 decimals, missing values as an em dash."""
    def fmt(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
            return "—"
        if isinstance(v, float):
            return f"{v:.3f}"
        if isinstance(v, list):
            return ", ".join(map(str, v))
        return str(v)

    shown = pd.DataFrame({c: [fmt(v) for v in df[c].astype(object).tolist()] for c in df.columns})
    return shown.to_html(index=False, escape=True, border=0)


def _ci_text(v: Any, lo: Any, hi: Any, reason: Any = None) -> str:
    """``value [lo, hi]``, the value alone, or ``suppressed (reason)``."""
    if v is None or pd.isna(v):
        return f"suppressed ({reason})" if reason else "—"
    if lo is None or pd.isna(lo):
        return f"{v:.3f}"
    return f"{v:.3f} [{lo:.3f}, {hi:.3f}]"


def _site_table(fr: FairnessReport) -> pd.DataFrame:
    """Per site (and all sites), each metric as interval text, and the patient count."""
    c = fr.cells[fr.cells["scope"].isin(["overall", "site"])]
    rows = []
    for site, g in c.groupby("site", sort=False):
        row: dict[str, Any] = {"site": site}
        for r in _rows(g):
            row[r.metric] = _ci_text(r.value, r.lo, r.hi, r.reason)
            row["n"] = "—" if pd.isna(r.n) else int(r.n)
        rows.append(row)
    return pd.DataFrame(rows)

def _section(sid: str, body: str) -> str:
    """One ``<section>`` with its id and the title :data:`SECTIONS` gives it."""
    title = dict(SECTIONS)[sid]
    return f"<section id='{sid}'><h2>{_esc(title)}</h2>{body}</section>"


def _summary_body(doc: dict[str, Any], sec: dict[str, Any]) -> str:
    """The runs, and each run's test-split metrics per site with its notes."""
    runs_df = pd.DataFrame([
        {"run": r["label"], "engine": r["engine"], "config": r["config"],
         "threshold": r["threshold_source"], "path": r["path"]} for r in doc["runs"]])
    body = _table(runs_df)
    for lab, pr in sec["per_run"].items():
        body += f"<h3>{_esc(lab)}: test-split metrics per site (95% intervals)</h3>"
        body += _table(_site_table(pr["fairness"]))
        for note in pr["notes"]:
            body += f"<p class='note'>{_esc(note)}</p>"
    return body


def _fairness_body(sec: dict[str, Any], figs: dict[str, Any]) -> str:
    """Per run: the AUC forest plot and the worst/gap/spread table."""
    body = ""
    for lab, pr in sec["per_run"].items():
        fr: FairnessReport = pr["fairness"]
        body += f"<h3>{_esc(lab)}</h3>" + _img(figs["forest"][lab], f"AUC by site and group, {lab}")
        s = fr.summary[fr.summary["metric"].isin(["auc", "sensitivity", "specificity"])]
        body += "<p>Worst value, gap (max − min) and spread (std) across sites and groups:</p>"
        body += _table(s.drop(columns=["n_cells"]))
    return body


def _disparities_body(sec: dict[str, Any]) -> str:
    """Per run: the disparity table, then what its two differences mean."""
    body = ""
    for lab, pr in sec["per_run"].items():
        body += f"<h3>{_esc(lab)}</h3>" + _table(pr["fairness"].disparities)
    body += ("<p class='note'>Equalised-odds difference: largest between-group gap in true- or "
             "false-positive rate; demographic-parity difference: largest gap in the fraction "
             "predicted positive (fairlearn), at the decision threshold, among groups that pass "
             "the small-cell rule.</p>")
    return body


def _generalisability_body(sec: dict[str, Any], figs: dict[str, Any]) -> str:
    """The cross-site heatmap and its table."""
    return (_img(figs["cross"], "Cross-site AUC matrix") + _table(sec["cross"].long) +
            "<p class='note'>Rows: models (local:&lt;site&gt; is that site's local-only model); "
            "columns: the site whose test patients were scored, and which disclosed the AUC. "
            "Cells never scored are absent; suppressed cells are shown as —. The colour scale "
            "runs from 0 to 1; 0.5, a model no better than chance, is marked on the colour "
            "bar.</p>")


def _change_body(sec: dict[str, Any], figs: dict[str, Any]) -> str:
    """The change from local-only training: figure and one table per compared run."""
    if not sec["changes"]:
        return "<p class='note'>No local-only run among the runs given: nothing to compare.</p>"
    body = _img(figs["change"], "Change from local-only")
    for name, df in sec["changes"].items():
        body += f"<h3>local-only → {_esc(name)}</h3>" + _table(df)
    return body


def _pooled_paragraph(lab: str, fe: dict[str, Any]) -> str:
    """One run's histogram-pooled figures, the sites pooled and those left out."""
    o = fe.get("overall") or {}
    if not o:
        return (f"<h3>{_esc(lab)}</h3><p>— (no histogram-pooled figures in its metrics.json)"
                "</p>")
    auc = o.get("auc")
    bins = f"{o['n_bins']}-bin histograms" if o.get("n_bins") else "histograms"
    body = f"<h3>{_esc(lab)}</h3><p>Pooled AUC from {bins}: "
    if auc:
        body += (f"{_bounded_text(auc)} (the exact pooled AUC is guaranteed to lie within "
                 f"the bounds); pooled ECE {_ece_text(o)}")
        if (o.get("sensitivity") or {}).get("value") is None and "sensitivity" in o:
            body += (f"; at threshold {o['threshold']:.3f}: no sensitivity or specificity "
                     f"({_esc(o['sensitivity'].get('reason'))})")
        elif "sensitivity" in o:
            body += (f"; at threshold {o['threshold']:.3f}: sensitivity "
                     f"{_bounded_text(o['sensitivity'])}, specificity "
                     f"{_bounded_text(o['specificity'])}")
    else:
        body += f"— ({_esc(o.get('reason'))})"
    body += f". Sites pooled: {_esc(', '.join(o.get('sites') or []) or 'none')}"
    if o.get("n_pos") is not None and o.get("n_neg") is not None:
        body += f" ({o['n_pos']} positives, {o['n_neg']} negatives)"
    if o.get("excluded"):
        body += "; left out: " + _esc("; ".join(f"{k} ({v})" for k, v in o["excluded"].items()))
        body += (". <b>Sites were left out: these pooled figures cover only the sites "
                 "listed and are not comparable with the all-sites row above</b>")
    return body + ".</p>"


def _ece_text(o: dict[str, Any]) -> str:
    """The pooled ECE, the bins it is on and its guaranteed bounds (when the run has them)."""
    text = f"{o['ece']:.3f}"
    if o.get("ece_bounds"):
        lo, hi = o["ece_bounds"]
        text += f" [{lo:.3f}, {hi:.3f}]"
    if o.get("ece_bins"):
        text += f" on {_esc(o['ece_bins'])}"
    return text


def _bounded_text(m: dict[str, Any]) -> str:
    """``value [lower, upper]`` of a pooled metric with guaranteed bounds."""
    return f"{m['value']:.3f} [{m['lower']:.3f}, {m['upper']:.3f}]"


def _federated_evaluation_body(doc: dict[str, Any], st: dict[str, Any]) -> str:
    """Every run's pooled paragraph, then what the bounds mean and what crosses a boundary."""
    body = "".join(_pooled_paragraph(lab, fe) for lab, fe in doc["federated_evaluation"].items())
    body += ("<p class='note'>Brackets here are guaranteed bounds, not confidence intervals: "
             "the value the patient-level scores would give lies within them, and they lie "
             "within the metric's range [0, 1]; merged histogram bins widen them.</p>")
    body += ("<p class='note'>What this report is built from: each site's disclosed document "
             "(disclosed/&lt;site&gt;.json: counts of 0 or at least "
             f"{st['min_cell']} patients, metrics with intervals computed at the site, fairness "
             "cells with complementary suppression, ROC points and calibration bins on steps of "
             "0 or at least that many of each class), metrics.json (training curves and these "
             "histogram-pooled figures) and the cross-site matrix; never patient-level scores "
             "or the sites' own folders.</p>")
    return body


def _recalibration_body(doc: dict[str, Any]) -> str:
    """Each run's recalibration and each site's test calibration before and after it."""
    parts = ["<h3>Recalibration</h3>"]
    for label, sec in (doc.get("recalibration") or {}).items():
        fit = sec.get("run") or {}
        if fit.get("applied"):
            how = (f"{fit.get('method')}: score' = expit({fit['a']:.3f} + {fit['b']:.3f} "
                   f"logit(score)), fitted on {fit.get('source')}")
        elif fit.get("sites"):
            how = f"{fit.get('method')}: each local-only model on its own site's validation split"
        else:
            how = f"not applied ({fit.get('reason') or 'the run records none'})"
        parts.append(f"<p><b>{_esc(label)}</b>: {_esc(how)}</p>")
        rows = [{"site": r["site"], "applied": "yes" if r["applied"] else f"no ({r['reason']})",
                 "n": r["n"], **{f"{name} before": r[f"{key}_before"] for key, name in _RECAL},
                 **{f"{name} after": r[f"{key}_after"] for key, name in _RECAL}}
                for r in sec.get("sites") or []]
        if rows:
            parts.append(_table(pd.DataFrame(rows)))
    parts.append("<p class='note'>Test split of each site, as the site disclosed it: before = "
                 "the model's own scores, after = recalibrated. ECE on 10 bins; "
                 "calibration-in-the-large = the logistic intercept with the slope fixed at 1 "
                 "(0 when calibrated), slope = the logistic slope on logit(score) (1 when "
                 "calibrated); a figure the small-cell rules withhold is a dash.</p>")
    return "".join(parts)


#: The recalibration table's figures: (key, column name).
_RECAL: tuple[tuple[str, str], ...] = (
    ("ece", "ECE"), ("mean_score", "mean risk"), ("intercept", "in the large"),
    ("slope", "slope"))
def _privacy_body(doc: dict[str, Any]) -> str:
    """Per run: each site's epsilon and what it covers; the site-level epsilon."""
    if not doc.get("privacy"):
        return ("<p class='note'>No run was trained with differential privacy (no privacy "
                "section in its configuration).</p>")
    body = ""
    for lab, p in doc["privacy"].items():
        body += f"<h3>{_esc(lab)}</h3>"
        dp = p.get("dp")
        if dp:
            st = dp["settings"]
            noise = (f"noise multiplier {st['noise_multiplier']:g}"
                     if st.get("noise_multiplier") else
                     f"target epsilon {st.get('target_epsilon')} by the last round")
            body += (f"<p>DP-SGD at each site (Opacus, {_esc(st.get('accountant'))} "
                     f"accountant): per-patient gradients clipped to {st['max_grad_norm']:g}, "
                     f"{_esc(noise)}, Poisson-sampled batches.</p>")
            body += _table(pd.DataFrame(dp["sites"], columns=["site", "epsilon", "delta",
                                                              "round"]))
            body += f"<p class='note'>{_esc(dp.get('covers'))}</p>"
        sl = p.get("site_level")
        if sl:
            where = (" by the site itself, before secure aggregation"
                     if sl.get("clipped_at") == "site" else "")
            body += (f"<p>Site-level DP of the aggregate: each site's update clipped to "
                     f"{sl['clip_norm']:g}{where}, Gaussian noise of {sl['noise_multiplier']:g} "
                     f"times that on their sum; epsilon {sl['epsilon']:.3g} at delta "
                     f"{sl['delta']:g} "
                     f"after {sl['rounds']} rounds.</p>"
                     f"<p class='note'>{_esc(sl.get('covers'))}</p>")
    return body


def _method_body(st: dict[str, Any]) -> str:
    """Split, thresholds, small-cell rule, intervals and fairness definitions."""
    mc = st["min_cell"]
    return (
        f"<ul><li>Evaluated split: <b>{SPLIT}</b>. Each site chose its threshold on its own "
        f"validation split (rule: {_esc(st['threshold'])}; a grid edge, never a patient's "
        f"score, and only from at least {mc} positives and {mc} negatives, else 0.5) unless "
        "the threshold was fixed.</li>"
        f"<li>Small-cell rule, applied by each site before anything left it: a cell on fewer "
        f"than {mc} patients shows \"suppressed (fewer than {mc} patients)\" and no count; "
        f"class counts are shown only when each is 0 or at least {mc}; AUC, average "
        f"precision, sensitivity and specificity only with at least {mc} of each class. "
        "Complementary suppression: within each attribute no released cell, the site's own "
        "row included, lets a suppressed one be derived by subtraction.</li>"
        f"<li>Intervals: stratified percentile bootstrap at each site, {st['n_boot']} "
        "resamples; the change from local-only is the MOVER interval from the two runs' "
        "intervals (conservative: both models scored the same patients). The all-sites rows "
        "come from the histogram-pooled figures (no interval unless the pooled figures give "
        "one).</li>"
        "<li>Fairness tables are computed with fairlearn's MetricFrame at each site; worst "
        "value is the minimum for AUC, AP, sensitivity, specificity and the maximum for Brier "
        "and ECE, over the released cells.</li>"
        "<li>Runs are named by what they are: federated (in-process), federated (Flower), "
        "local-only (each site trains alone) and centralized (every site's data pooled in "
        "one place: an in-process research baseline that cannot exist across hospitals).</li>"
        "</ul>"
    )


def _section_bodies(doc: dict[str, Any], sec: dict[str, Any], figs: dict[str, Any]
                    ) -> dict[str, str]:
    """The HTML body of every section, by section id."""
    st = sec["settings"]
    return {
        "summary": _summary_body(doc, sec),
        "roc": _img(figs["roc"], "ROC curves") +
        "<p class='note'>Test split. A site's curve joins the ROC points it disclosed, at "
        "thresholds whose steps hold 0 or at least the small-cell number of each class; a site "
        "with fewer positives or negatives than that gets no curve. All sites: the points at "
        "the pooled calibration-bin edges.</p>",
        "calibration": _img(figs["calibration"], "Calibration curves") +
        "<p class='note'>A site's points are the calibration bins it disclosed (the same steps "
        "as its ROC points, each of at least the small-cell number of patients); all sites: "
        f"the pooled fine bins merged until each holds 0 or at least {st['min_cell']} of each "
        "class.</p>" + _recalibration_body(doc),
        "fairness": _fairness_body(sec, figs),
        "disparities": _disparities_body(sec),
        "generalisability": _generalisability_body(sec, figs),
        "federation-gain": _change_body(sec, figs),
        "federated-evaluation": _federated_evaluation_body(doc, st),
        "training": _img(figs["training"], "Training curves",
                         "no run records a per-round or per-step history (metrics.json)"),
        "privacy": _privacy_body(doc),
        "method": _method_body(st),
    }


def _html(doc: dict[str, Any], sec: dict[str, Any], figs: dict[str, Any]) -> str:
    """The whole page: head (style and status script), title, navigation, sections."""
    bodies = _section_bodies(doc, sec, figs)
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>Fairness and generalisability report</title>",
        f"<style>{_CSS}</style><script>{STATUS_SCRIPT}</script></head><body>",
        "<div id='report-status' hidden></div>",
        "<h1>Fairness and generalisability report</h1>",
        "<nav>" + "".join(f"<a href='#{i}'>{_esc(t)}</a>" for i, t in SECTIONS) + "</nav>",
        *(_section(sid, bodies[sid]) for sid, _ in SECTIONS),
        "</body></html>",
    ]
    return "\n".join(parts)


def _figures(doc: dict[str, Any], runs: Sequence[RunData], sec: dict[str, Any]
             ) -> dict[str, Any]:
    """Every figure of the page as base64 PNG (``None`` where there is nothing to plot)."""
    mc = sec["settings"]["min_cell"]
    colours = _run_colours(runs)
    training = training_figure(doc["training"])
    return {
        "roc": _png(roc_figure(runs, mc)),
        "calibration": _png(calibration_figure(runs, mc)),
        "forest": {lab: _png(forest_figure(pr["fairness"], "auc", f"{lab}: test AUC"))
                   for lab, pr in sec["per_run"].items()},
        "cross": _png(cross_site_figure(sec["cross"])),
        "change": (_png(change_figure(sec["changes"], colours)) if sec["changes"] else None),
        "training": None if training is None else _png(training),
    }


def write_report(
    run_dirs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    sensitive: Sequence[str] | None = None,
) -> tuple[Path, Path]:
    """Write ``report.json`` and a self-contained ``report.html`` for one or more runs.

    Built from each run's ``disclosed/``, ``metrics.json`` and ``cross_site.json`` only, so the
    server's run directory of a deployment is enough.

    Parameters
    ----------
    run_dirs : sequence of path-like
        Run directories (e.g. federated, local and centralized runs of one config).
    out_dir : path-like
        Created if needed.
    sensitive : sequence of str or None
        Show these of the disclosed attributes (default: the first run's config).

    Returns
    -------
    json_path, html_path : Path
    """
    doc, runs, sec = build_report(run_dirs, sensitive=sensitive)
    return _write(doc, runs, sec, out_dir)


def write_frame_report(
    frame: pd.DataFrame,
    out_dir: str | os.PathLike[str],
    *,
    sensitive: Sequence[str] = (),
    threshold: float | None = None,
    min_cell: int = 10,
    n_boot: int = 1000,
    seed: int = 0,
    label: str = FRAME_LABEL,
) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.html`` for a predictions DataFrame of your own.

    The same report as :func:`write_report` (ROC and calibration per site, fairness forest
    plot and tables, disparities, cross-site matrix, histogram-pooled figures), for
    predictions made by any model, with no run directory: each site of the frame is
    summarised as a site of a run discloses itself (the same small-cell rules).

    Parameters
    ----------
    frame : pandas.DataFrame
        One row per patient: ``label`` (0/1), ``score`` (predicted probability), the
        ``sensitive`` columns; optionally ``site`` (default: one site, ``site``), ``split``
        (default: every row is a test row; only ``test`` rows are evaluated, ``val`` rows
        choose each site's threshold when ``threshold`` is ``None``) and ``patient_id``.
    out_dir : path-like
        Created if needed.
    sensitive : sequence of str
        Sensitive-attribute columns (``sex``, ``age_band``, ...).
    threshold : float or None
        The decision threshold for sensitivity, specificity and the disparities. ``None``
        chooses Youden's J on each site's ``val`` rows (on the grid edges); a site without
        enough of them falls back to 0.5 and the report says so.
    min_cell : int
        Small-cell rule (see :mod:`multimodal_fl.evaluation.disclosed`).
    n_boot : int
        Bootstrap resamples per interval.
    seed : int
        Bootstrap seed.
    label : str
        The name of these predictions in the report.

    Returns
    -------
    json_path, html_path : Path

    Raises
    ------
    ValueError
        When the frame lacks a column or holds invalid labels or scores (one line).
    """
    run = run_from_frame(frame, label=label, sensitive=sensitive, min_cell=min_cell,
                         n_boot=n_boot, seed=seed, threshold=threshold)
    doc, runs, sec = report_from_runs(
        [run], sensitive=list(sensitive), seed=seed,
        threshold=None if threshold is None else str(float(threshold)))
    return _write(doc, runs, sec, out_dir)


def _write(doc: dict[str, Any], runs: Sequence[RunData], sec: dict[str, Any],
           out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Draw the figures and write ``report.json`` and ``report.html`` into ``out_dir``."""
    figs = _figures(doc, runs, sec)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "report.json"
    json_path.write_text(json.dumps(json_ready(doc), indent=2, allow_nan=False))
    html_path = out / "report.html"
    html_path.write_text(_html(doc, sec, figs), encoding="utf-8")
    return json_path, html_path
