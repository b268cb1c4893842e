"""Render the report: figures as base64 PNG, a self-contained ``report.html``, ``report.json``.

:func:`write_report` computes the report (:func:`.compute.build_report`) and writes
``report.json`` (every number, suppressed cells as ``null`` with a reason) and
``report.html`` (plots as base64 PNG, no external resources): per-site ROC and calibration
curves, fairness charts with 95% intervals, disparity tables, the cross-site matrix heatmap,
the per-site change from local-only to federated, training curves, and the federated
(histogram-pooled) figures. The small-cell rule applies to plots too: suppressed sites get no
curve, and calibration points with fewer than ``min_cell`` patients are not drawn.

The page's script (:data:`STATUS_SCRIPT`) records on load the section ids, the number of
images and any JavaScript or image error in ``#report-status``, for a headless-browser check.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from multimodal_fl.evaluation.fairness import (
    ALL_SITES,
    CrossSiteResult,
    FairnessReport,
    cell_reason,
)
from multimodal_fl.evaluation.metrics import calibration_bins
from multimodal_fl.evaluation.report.compute import SPLIT, build_report, json_ready
from multimodal_fl.evaluation.report.load import RunData

__all__ = ["SECTIONS", "STATUS_SCRIPT", "write_report"]

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


def _fig_roc(runs: Sequence[RunData], min_cell: int) -> str:
    """Test-split ROC curves: one panel per site and one for all sites, one curve per run."""
    sites = sorted({s for r in runs for s in r.predictions["site"].astype(str).unique()})
    fig, axes = _grid(len(sites) + 1)
    for ax, site in zip(axes, [*sites, ALL_SITES], strict=True):
        ax.plot([0, 1], [0, 1], ls=":", c="grey", lw=0.8)
        ax.set_title(site)
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("sensitivity")
        drawn = False
        for r in runs:
            d = r.predictions[r.predictions["split"] == SPLIT]
            if site != ALL_SITES:
                d = d[d["site"].astype(str) == site]
            reason = cell_reason(d["label"].to_numpy(), min_cell)
            if reason is not None:
                ax.text(0.5, 0.12 + 0.1 * runs.index(r), f"{r.label}: suppressed ({reason})",
                        ha="center", fontsize=7, transform=ax.transAxes)
                continue
            fpr, tpr, _ = roc_curve(d["label"], d["score"])
            ax.plot(fpr, tpr, lw=1.4, label=r.label)
            drawn = True
        if drawn:
            ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def _fig_calibration(runs: Sequence[RunData], min_cell: int, n_bins: int = 10) -> str:
    """Calibration curves per site; bins with fewer than ``min_cell`` patients are not drawn."""
    sites = sorted({s for r in runs for s in r.predictions["site"].astype(str).unique()})
    fig, axes = _grid(len(sites) + 1)
    for ax, site in zip(axes, [*sites, ALL_SITES], strict=True):
        ax.plot([0, 1], [0, 1], ls=":", c="grey", lw=0.8)
        ax.set_title(site)
        ax.set_xlabel("mean predicted risk")
        ax.set_ylabel("observed fraction positive")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        for r in runs:
            d = r.predictions[r.predictions["split"] == SPLIT]
            if site != ALL_SITES:
                d = d[d["site"].astype(str) == site]
            if cell_reason(d["label"].to_numpy(), min_cell) is not None:
                continue
            b = calibration_bins(d["score"].to_numpy(), n_bins)
            g = pd.DataFrame({"b": b, "y": d["label"].to_numpy(), "s": d["score"].to_numpy()})
            agg = g.groupby("b").agg(n=("y", "size"), y=("y", "mean"), s=("s", "mean"))
            agg = agg[agg["n"] >= min_cell]  # small-cell rule for plotted bins
            ax.plot(agg["s"], agg["y"], marker="o", ms=3, lw=1.2, label=r.label)
        ax.legend(fontsize=7, loc="upper left")
    return _png(fig)


def _fig_forest(fr: FairnessReport, metric: str, title: str) -> str:
    """One metric with its intervals for all sites, each site, subgroup and site x subgroup."""
    c = fr.cells[fr.cells["metric"] == metric]
    order = {"overall": 0, "site": 1, "subgroup": 2, "site_subgroup": 3}
    c = c.assign(_o=c["scope"].map(order)).sort_values(["_o", "attribute", "site", "group"],
                                                        na_position="first")
    labels = []
    for r in _rows(c):
        if r.scope == "overall":
            labels.append("all sites")
        elif r.scope == "site":
            labels.append(f"site {r.site}")
        elif r.scope == "subgroup":
            labels.append(f"{r.attribute}={r.group}")
        else:
            labels.append(f"{r.site}: {r.attribute}={r.group}")
    n = len(labels)
    fig = Figure(figsize=(7.5, 0.26 * n + 1.0))
    ax = fig.add_subplot(1, 1, 1)
    ypos = np.arange(n)[::-1]
    colors = {"overall": "black", "site": "tab:blue", "subgroup": "tab:green",
              "site_subgroup": "tab:orange"}
    for y, r in zip(ypos, _rows(c), strict=True):
        if r.suppressed or pd.isna(r.value):
            ax.text(0.5, y, f"suppressed: {r.reason}", va="center", fontsize=7, color="grey",
                    transform=ax.get_yaxis_transform())
            continue
        lo = r.value if pd.isna(r.lo) else r.lo
        hi = r.value if pd.isna(r.hi) else r.hi
        ax.errorbar(r.value, y, xerr=[[r.value - lo], [hi - r.value]], fmt="o", ms=4,
                    color=colors[r.scope], capsize=2, lw=1)
    ax.set_yticks(ypos)
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"{metric} (95% bootstrap interval)")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def _fig_cross(cross: CrossSiteResult) -> str:
    """The cross-site matrix as a heatmap with its values written in."""
    mat = cross.matrix
    fig = Figure(figsize=(1.3 * mat.shape[1] + 2.5, 0.55 * mat.shape[0] + 1.5))
    ax = fig.add_subplot(1, 1, 1)
    vals = mat.to_numpy(dtype=np.float64)
    im = ax.imshow(np.ma.masked_invalid(vals), cmap="viridis", vmin=0.5, vmax=1.0,
                   aspect="auto")
    ax.set_xticks(range(mat.shape[1]))
    ax.set_xticklabels(mat.columns, fontsize=8)
    ax.set_yticks(range(mat.shape[0]))
    ax.set_yticklabels(mat.index, fontsize=8)
    ax.set_xlabel("test site")
    ax.set_ylabel("model")
    for i in range(mat.shape[0]):
        for j in range(mat.shape[1]):
            v = vals[i, j]
            ax.text(j, i, "—" if np.isnan(v) else f"{v:.2f}", ha="center", va="center",
                    fontsize=8, color="white" if not np.isnan(v) and v < 0.75 else "black")
    fig.colorbar(im, ax=ax, label=cross.metric)
    return _png(fig)


def _fig_change(changes: dict[str, pd.DataFrame]) -> str:
    """Per site, the change in test AUC from local-only training, with its interval."""
    fig = Figure(figsize=(7, 0.5 + 0.45 * sum(len(v) for v in changes.values()) + 0.5))
    ax = fig.add_subplot(1, 1, 1)
    labels = []
    y = 0
    for name, df in changes.items():
        for r in _rows(df):
            labels.append(f"{r.site}: local → {name}")
            if r.suppressed or pd.isna(r.change):
                ax.text(0.02, y, f"suppressed: {r.reason}", va="center", fontsize=7,
                        color="grey", transform=ax.get_yaxis_transform())
            else:
                ax.errorbar(r.change, y, xerr=[[r.change - r.change_lo], [r.change_hi - r.change]],
                            fmt="o", ms=4, capsize=2, lw=1)
            y += 1
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("change in test AUC (paired bootstrap 95% interval)")
    return _png(fig)


def _fig_training(doc_training: dict[str, Any]) -> str | None:
    """Train loss and validation AUC per round or step; ``None`` when no run has curves."""
    panels = [(run, name, c) for run, curves in doc_training.items() for name, c in curves.items()]
    if not panels:
        return None
    fig, axes = _grid(len(panels), width=4.0)
    for ax, (run, name, c) in zip(axes, panels, strict=True):
        x = c["x"]
        loss = [np.nan if v is None else v for v in c["train_loss"]]
        ax.plot(x, loss, color="tab:red", lw=1.2, label="train loss")
        ax.set_xlabel(c["x_label"])
        ax.set_ylabel("train loss", color="tab:red")
        ax.set_title(f"{run}: {name}", fontsize=9)
        if c["eval"]:
            ax2 = ax.twinx()
            for k, v in c["eval"].items():
                ax2.plot(x, [np.nan if u is None else u for u in v], lw=1, marker=".", label=k)
            ax2.set_ylabel("validation AUC")
            ax2.set_ylim(0.4, 1.0)
            ax2.legend(fontsize=6, loc="lower right")
    return _png(fig)


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
  var st = document.getElementById('report-status');
  st.setAttribute('data-sections', ids.join(','));
  st.setAttribute('data-images', String(imgs.length));
  st.setAttribute('data-errors', window.__reportErrors.join(' | '));
  st.setAttribute('data-ready', '1');
});
"""
"""The page's script: on load, ``#report-status`` gets ``data-sections``, ``data-images``,
``data-errors`` (JavaScript errors and broken images) and ``data-ready="1"``."""


def _esc(x: Any) -> str:
    """HTML-escaped text of any value."""
    return html.escape(str(x))


def _img(b64: str | None, alt: str) -> str:
    """An inline PNG, or a note when there is nothing to plot."""
    if b64 is None:
        return f'<p class="note">{_esc(alt)}: nothing to plot.</p>'
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
    """``value [lo, hi]``, the value alone, or an em dash with the suppression reason."""
    if v is None or pd.isna(v):
        return f"— ({reason})" if reason else "—"
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
            "columns: the site whose test patients were scored. Cells without predictions are "
            "absent; suppressed cells are shown as —.</p>")


def _change_body(sec: dict[str, Any], figs: dict[str, Any]) -> str:
    """The change from local-only training: figure and one table per compared run."""
    if not sec["changes"]:
        return "<p class='note'>No local-only run among the runs given: nothing to compare.</p>"
    body = _img(figs["change"], "Change from local-only")
    for name, df in sec["changes"].items():
        body += f"<h3>local → {_esc(name)}</h3>" + _table(df)
    return body


def _pooled_paragraph(lab: str, fe: dict[str, Any]) -> str:
    """One run's histogram-pooled figures, the sites pooled and those left out."""
    o = fe["overall"]
    auc = o.get("auc")
    body = f"<h3>{_esc(lab)}</h3><p>Pooled AUC from {o['n_bins']}-bin histograms: "
    if auc:
        body += (f"{auc['value']:.3f} (the exact pooled AUC is guaranteed to lie in "
                 f"[{auc['lower']:.3f}, {auc['upper']:.3f}]); pooled ECE {o['ece']:.3f}")
        if "sensitivity" in o:
            body += (f"; at threshold {o['threshold']:.3f}: sensitivity "
                     f"{o['sensitivity']['value']:.3f}, specificity "
                     f"{o['specificity']['value']:.3f}")
    else:
        body += f"— ({_esc(o.get('reason'))})"
    body += (f". Sites pooled: {_esc(', '.join(o['sites']) or 'none')} "
             f"({o['n_pos']} positives, {o['n_neg']} negatives)")
    if o["excluded"]:
        body += "; left out: " + _esc("; ".join(f"{k} ({v})" for k, v in o["excluded"].items()))
        body += (". <b>Sites were left out: these pooled figures cover only the sites "
                 "listed and are not comparable with the all-sites row above</b>")
    return body + ".</p>"


def _federated_evaluation_body(doc: dict[str, Any], st: dict[str, Any]) -> str:
    """Every run's pooled paragraph, then what crosses a site boundary."""
    body = "".join(_pooled_paragraph(lab, fe) for lab, fe in doc["federated_evaluation"].items())
    body += ("<p class='note'>What crosses a site boundary: counts, metrics with intervals and "
             "score histograms per label whose bins are merged until each holds at least "
             f"{st['min_cell']} patients; never patient-level scores.</p>")
    return body


def _method_body(st: dict[str, Any]) -> str:
    """Split, thresholds, small-cell rule, intervals and fairness definitions."""
    return (
        f"<ul><li>Evaluated split: <b>{SPLIT}</b>; thresholds chosen on the validation split "
        f"(rule: {_esc(st['threshold'])}) unless fixed.</li>"
        f"<li>Small-cell rule: a cell with fewer than {st['min_cell']} patients, or with no "
        "positives or no negatives, is suppressed and shows its reason instead of a number "
        "(its counts are hidden when it is too small).</li>"
        f"<li>Intervals: stratified percentile bootstrap, {st['n_boot']} resamples; the change "
        "from local-only uses a paired bootstrap on the same patients.</li>"
        "<li>Fairness tables are computed with fairlearn's MetricFrame; worst value is the "
        "minimum for AUC, AP, sensitivity, specificity and the maximum for Brier and ECE.</li>"
        "</ul>"
    )


def _section_bodies(doc: dict[str, Any], sec: dict[str, Any], figs: dict[str, Any]
                    ) -> dict[str, str]:
    """The HTML body of every section, by section id."""
    st = sec["settings"]
    return {
        "summary": _summary_body(doc, sec),
        "roc": _img(figs["roc"], "ROC curves") +
        "<p class='note'>Test split. Sites below the small-cell rule get no curve.</p>",
        "calibration": _img(figs["calibration"], "Calibration curves") +
        f"<p class='note'>10 equal-width bins; bins with fewer than {st['min_cell']} "
        "patients are not drawn.</p>",
        "fairness": _fairness_body(sec, figs),
        "disparities": _disparities_body(sec),
        "generalisability": _generalisability_body(sec, figs),
        "federation-gain": _change_body(sec, figs),
        "federated-evaluation": _federated_evaluation_body(doc, st),
        "training": _img(figs["training"], "Training curves"),
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
    return {
        "roc": _fig_roc(runs, mc),
        "calibration": _fig_calibration(runs, mc),
        "forest": {lab: _fig_forest(pr["fairness"], "auc", f"{lab}: test AUC")
                   for lab, pr in sec["per_run"].items()},
        "cross": _fig_cross(sec["cross"]),
        "change": _fig_change(sec["changes"]) if sec["changes"] else None,
        "training": _fig_training(doc["training"]),
    }


def write_report(
    run_dirs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    sensitive: Sequence[str] | None = None,
    min_cell: int | None = None,
    n_boot: int | None = None,
    seed: int | None = None,
) -> tuple[Path, Path]:
    """Write ``report.json`` and a self-contained ``report.html`` for one or more runs.

    Parameters
    ----------
    run_dirs : sequence of path-like
        Run directories (e.g. federated, local and centralized runs of one config).
    out_dir : path-like
        Created if needed.
    sensitive, min_cell, n_boot, seed
        Override the first run's ``evaluation`` settings.

    Returns
    -------
    json_path, html_path : Path
    """
    doc, runs, sec = build_report(run_dirs, sensitive=sensitive, min_cell=min_cell,
                                  n_boot=n_boot, seed=seed)
    figs = _figures(doc, runs, sec)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "report.json"
    json_path.write_text(json.dumps(json_ready(doc), indent=2, allow_nan=False))
    html_path = out / "report.html"
    html_path.write_text(_html(doc, sec, figs), encoding="utf-8")
    return json_path, html_path
