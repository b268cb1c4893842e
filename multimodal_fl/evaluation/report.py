"""The fairness and generalisability report: ``report.json`` and one self-contained ``report.html``.

:func:`write_report` reads one or more run directories (a federated run and its local-only and
centralized baselines, or one run alone)::

    RUN_DIR/config.yaml                   resolved config (evaluation.sensitive, min_cell, ...)
    RUN_DIR/metrics.json                  "engine"; "rounds" (federated) or "history" (others)
    RUN_DIR/sites/<site>/predictions.csv  patient_id, split, label, score, sex, age_band, ...
                                          optional "model" column (default: the run's model,
                                          or "local:<site>" for the local engine)
    RUN_DIR/sites/<site>/cross_predictions.csv   optional: other models scored on this site
                                          (model, patient_id, split, label, score)

and writes ``report.json`` (every number, suppressed cells as ``null`` with a reason) and
``report.html`` (plots as base64 PNG, no external resources): per-site ROC and calibration
curves, fairness charts with 95% intervals, disparity tables, the cross-site matrix heatmap,
the per-site change from local-only to federated, training curves, and the federated
(histogram-pooled) figures. The small-cell rule applies to plots too: suppressed sites get no
curve, and calibration points with fewer than ``min_cell`` patients are not drawn.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from multimodal_fl.evaluation.fairness import (
    ALL_SITES,
    FairnessReport,
    cell_reason,
    cross_site_matrix,
    fairness_report,
    local_vs_federated,
)
from multimodal_fl.evaluation.histograms import pooled_evaluation, summarise_sites
from multimodal_fl.evaluation.metrics import calibration_bins

__all__ = [
    "SECTIONS",
    "RunData",
    "build_report",
    "find_chromium",
    "load_run",
    "render_in_chromium",
    "screenshot",
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
    ("method", "Method and settings"),
)
"""Section ids and titles of ``report.html``, in order."""

_SPLIT = "test"


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
    config : dict
        ``config.yaml``.
    metrics : dict
        ``metrics.json``.
    predictions : pandas.DataFrame
        All sites' rows with ``site`` and ``model`` columns added.
    cross : pandas.DataFrame
        Rows of ``cross_predictions.csv`` files (possibly empty).
    """

    path: Path
    label: str
    engine: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    predictions: pd.DataFrame
    cross: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def federated(self) -> bool:
        """Whether the run is a federated one."""
        return self.engine in ("inprocess", "flower", "federated")


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
        When the directory has no ``sites/<site>/predictions.csv`` or a file lacks a column.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise ValueError(f"{path}: not a directory; expected a run directory from `mmfl train`")
    metrics: dict[str, Any] = {}
    if (path / "metrics.json").is_file():
        metrics = json.loads((path / "metrics.json").read_text())
    config: dict[str, Any] = {}
    if (path / "config.yaml").is_file():
        config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    engine = str(metrics.get("engine") or config.get("federated", {}).get("engine") or "unknown")
    files = sorted((path / "sites").glob("*/predictions.csv"))
    if not files:
        raise ValueError(
            f"{path}: no sites/<site>/predictions.csv; a run directory holds one per site "
            "(patient_id, split, label, score, sensitive attributes)"
        )
    frames = []
    for f in files:
        d = pd.read_csv(f)
        missing = [c for c in ("patient_id", "split", "label", "score") if c not in d.columns]
        if missing:
            raise ValueError(f"{f}: missing column(s) {missing}; present: {list(d.columns)}")
        site = f.parent.name
        d["site"] = site
        if "model" not in d.columns:
            d["model"] = f"local:{site}" if engine == "local" else (label or engine)
        frames.append(d)
    cross_frames = []
    for f in sorted((path / "sites").glob("*/cross_predictions.csv")):
        d = pd.read_csv(f)
        missing = [c for c in ("model", "split", "label", "score") if c not in d.columns]
        if missing:
            raise ValueError(f"{f}: missing column(s) {missing}; present: {list(d.columns)}")
        d["site"] = f.parent.name
        cross_frames.append(d)
    return RunData(
        path=path,
        label=label or engine,
        engine=engine,
        config=config,
        metrics=metrics,
        predictions=pd.concat(frames, ignore_index=True),
        cross=pd.concat(cross_frames, ignore_index=True) if cross_frames else pd.DataFrame(),
    )


def _labels(paths: Sequence[Path], engines: Sequence[str]) -> list[str]:
    out = []
    for p, e in zip(paths, engines, strict=True):
        out.append(e if engines.count(e) == 1 else f"{e} ({p.name})")
    return out


# --------------------------------------------------------------------------------------------
# computation


def _eval_settings(runs: Sequence[RunData], **overrides: Any) -> dict[str, Any]:
    ev = dict(runs[0].config.get("evaluation") or {})
    settings = {
        "sensitive": ev.get("sensitive", ["sex", "age_band"]),
        "min_cell": int(ev.get("min_cell", 10)),
        "n_boot": int(ev.get("n_boot", 1000)),
        "histogram_bins": int(ev.get("histogram_bins", 100)),
        "threshold": ev.get("threshold", "youden"),
        "seed": int(runs[0].config.get("seed", 0) or 0),
    }
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return settings


def _fixed_threshold(rule: Any) -> float | None:
    if isinstance(rule, int | float) and not isinstance(rule, bool):
        return float(rule)
    if isinstance(rule, str) and rule != "youden":
        try:
            return float(rule)
        except ValueError as exc:
            raise ValueError(
                f"evaluation.threshold {rule!r}: expected 'youden' or a number in [0, 1]"
            ) from exc
    return None


def _run_section(run: RunData, st: dict[str, Any]) -> dict[str, Any]:
    pred = run.predictions
    sensitive = [c for c in st["sensitive"] if c in pred.columns]
    fixed = _fixed_threshold(st["threshold"])
    notes = [f"sensitive attribute {c!r} not in predictions: skipped"
             for c in st["sensitive"] if c not in pred.columns]
    kwargs: dict[str, Any] = {"sensitive": sensitive, "min_cell": st["min_cell"],
                              "n_boot": st["n_boot"], "seed": st["seed"]}
    per_site = run.engine == "local" and fixed is None
    try:
        fr = fairness_report(pred, threshold=fixed, per_site_threshold=per_site, **kwargs)
    except ValueError as exc:
        if fixed is not None or "threshold" not in str(exc):
            raise
        # a validation split that cannot choose a threshold: fall back, and say so
        notes.append(f"threshold: {exc}")
        try:
            fr = fairness_report(pred, threshold=None, per_site_threshold=False, **kwargs)
            notes.append("threshold chosen on all sites' validation rows instead")
        except ValueError:
            fr = fairness_report(pred, threshold=0.5, **kwargs)
            fr.threshold_source = "0.5 (no validation rows with both classes)"
            notes.append("threshold fixed at 0.5: no validation rows with both classes")
    thresholds = set(fr.thresholds.values())
    common_t = thresholds.pop() if len(thresholds) == 1 else None
    n_bins = st["histogram_bins"]
    ece_bins = 10 if n_bins % 10 == 0 else 1
    summaries = summarise_sites(
        pred, sensitive=sensitive, split=_SPLIT, threshold=common_t, n_bins=n_bins,
        min_cell=st["min_cell"], n_boot=0, ece_bins=ece_bins, seed=st["seed"],
    )
    pooled = pooled_evaluation(summaries)
    if run.engine == "local":
        notes.append("local engine: each site has its own model and threshold; pooled figures "
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
    sections : dict
        Per-run computed objects (``FairnessReport``...) keyed by run label, for plotting.
    """
    if not run_dirs:
        raise ValueError("build_report: give at least one run directory")
    loaded = [load_run(p) for p in run_dirs]
    labels = _labels([r.path for r in loaded], [r.engine for r in loaded])
    runs = []
    for r, lab in zip(loaded, labels, strict=True):
        if lab != r.label:
            r = load_run(r.path, label=lab)
        runs.append(r)
    st = _eval_settings(runs, sensitive=list(sensitive) if sensitive is not None else None,
                        min_cell=min_cell, n_boot=n_boot, seed=seed)
    per_run = {r.label: _run_section(r, st) for r in runs}

    # cross-site matrix: every model on every test site it was scored on
    long = pd.concat([r.predictions for r in runs] + [r.cross for r in runs if not r.cross.empty],
                     ignore_index=True)
    cross = cross_site_matrix(long, min_cell=st["min_cell"], n_boot=st["n_boot"],
                              seed=st["seed"])

    # per-site change local -> every other run
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

    doc: dict[str, Any] = {
        "settings": {**st, "split": _SPLIT},
        "runs": [
            {
                "label": r.label, "engine": r.engine, "path": str(r.path),
                "config": r.config.get("name"),
                "thresholds": per_run[r.label]["fairness"].thresholds,
                "threshold_source": per_run[r.label]["fairness"].threshold_source,
                "notes": per_run[r.label]["notes"],
            }
            for r in runs
        ],
        "fairness": {k: v["fairness"].to_dict() for k, v in per_run.items()},
        "federated_evaluation": {k: v["federated_evaluation"] for k, v in per_run.items()},
        "cross_site": cross.to_dict(),
        "change_from_local": {k: _frame_records(v) for k, v in changes.items()},
        "training": {r.label: _training_curves(r) for r in runs},
    }
    sections = {"per_run": per_run, "cross": cross, "changes": changes, "settings": st}
    return doc, runs, sections


def _frame_records(df: pd.DataFrame) -> list[dict[str, Any]]:
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


# --------------------------------------------------------------------------------------------
# figures


def _rows(df: pd.DataFrame) -> list[Any]:
    """Rows as named tuples (typed ``Any``: columns hold numbers, strings and NA)."""
    return list(df.itertuples(index=False))


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _grid(n: int, width: float = 3.6) -> tuple[Figure, list[Any]]:
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols, width * rows), layout="constrained")
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n)]
    return fig, axes


def _fig_roc(runs: Sequence[RunData], min_cell: int) -> str:
    sites = sorted({s for r in runs for s in r.predictions["site"].astype(str).unique()})
    fig, axes = _grid(len(sites) + 1)
    for ax, site in zip(axes, [*sites, ALL_SITES], strict=True):
        ax.plot([0, 1], [0, 1], ls=":", c="grey", lw=0.8)
        ax.set_title(site)
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("sensitivity")
        drawn = False
        for r in runs:
            d = r.predictions[r.predictions["split"] == _SPLIT]
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
            d = r.predictions[r.predictions["split"] == _SPLIT]
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


def _fig_cross(cross: Any) -> str:
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

_JS = """
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


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _img(b64: str | None, alt: str) -> str:
    if b64 is None:
        return f'<p class="note">{_esc(alt)}: nothing to plot.</p>'
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{b64}">'


def _table(df: pd.DataFrame) -> str:
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
    if v is None or pd.isna(v):
        return f"— ({reason})" if reason else "—"
    if lo is None or pd.isna(lo):
        return f"{v:.3f}"
    return f"{v:.3f} [{lo:.3f}, {hi:.3f}]"


def _site_table(fr: FairnessReport) -> pd.DataFrame:
    c = fr.cells[fr.cells["scope"].isin(["overall", "site"])]
    rows = []
    for site, g in c.groupby("site", sort=False):
        row: dict[str, Any] = {"site": site}
        for r in _rows(g):
            row[r.metric] = _ci_text(r.value, r.lo, r.hi, r.reason)
            row["n"] = "—" if pd.isna(r.n) else int(r.n)
        rows.append(row)
    return pd.DataFrame(rows)


def _html(doc: dict[str, Any], runs: Sequence[RunData], sec: dict[str, Any],
          figs: dict[str, Any]) -> str:
    st = sec["settings"]
    parts: list[str] = []
    add = parts.append
    add("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>")
    add("<title>Fairness and generalisability report</title>")
    add(f"<style>{_CSS}</style><script>{_JS}</script></head><body>")
    add("<div id='report-status' hidden></div>")
    add("<h1>Fairness and generalisability report</h1>")
    add("<nav>" + "".join(f"<a href='#{i}'>{_esc(t)}</a>" for i, t in SECTIONS) + "</nav>")

    def section(sid: str, body: str) -> None:
        title = dict(SECTIONS)[sid]
        add(f"<section id='{sid}'><h2>{_esc(title)}</h2>{body}</section>")

    runs_df = pd.DataFrame([
        {"run": r["label"], "engine": r["engine"], "config": r["config"],
         "threshold": r["threshold_source"], "path": r["path"]} for r in doc["runs"]])
    body = _table(runs_df)
    for lab, pr in sec["per_run"].items():
        body += f"<h3>{_esc(lab)}: test-split metrics per site (95% intervals)</h3>"
        body += _table(_site_table(pr["fairness"]))
        for note in pr["notes"]:
            body += f"<p class='note'>{_esc(note)}</p>"
    section("summary", body)
    section("roc", _img(figs["roc"], "ROC curves") +
            "<p class='note'>Test split. Sites below the small-cell rule get no curve.</p>")
    section("calibration", _img(figs["calibration"], "Calibration curves") +
            f"<p class='note'>10 equal-width bins; bins with fewer than {st['min_cell']} "
            "patients are not drawn.</p>")
    body = ""
    for lab, pr in sec["per_run"].items():
        fr: FairnessReport = pr["fairness"]
        body += f"<h3>{_esc(lab)}</h3>" + _img(figs["forest"][lab], f"AUC by site and group, {lab}")
        s = fr.summary[fr.summary["metric"].isin(["auc", "sensitivity", "specificity"])]
        body += "<p>Worst value, gap (max − min) and spread (std) across sites and groups:</p>"
        body += _table(s.drop(columns=["n_cells"]))
    section("fairness", body)
    body = ""
    for lab, pr in sec["per_run"].items():
        body += f"<h3>{_esc(lab)}</h3>" + _table(pr["fairness"].disparities)
    body += ("<p class='note'>Equalised-odds difference: largest between-group gap in true- or "
             "false-positive rate; demographic-parity difference: largest gap in the fraction "
             "predicted positive (fairlearn), at the decision threshold, among groups that pass "
             "the small-cell rule.</p>")
    section("disparities", body)
    section("generalisability", _img(figs["cross"], "Cross-site AUC matrix") +
            _table(sec["cross"].long) +
            "<p class='note'>Rows: models (local:&lt;site&gt; is that site's local-only model); "
            "columns: the site whose test patients were scored. Cells without predictions are "
            "absent; suppressed cells are shown as —.</p>")
    if sec["changes"]:
        body = _img(figs["change"], "Change from local-only")
        for name, df in sec["changes"].items():
            body += f"<h3>local → {_esc(name)}</h3>" + _table(df)
    else:
        body = "<p class='note'>No local-only run among the runs given: nothing to compare.</p>"
    section("federation-gain", body)
    body = ""
    for lab, fe in doc["federated_evaluation"].items():
        o = fe["overall"]
        auc = o.get("auc")
        body += f"<h3>{_esc(lab)}</h3><p>Pooled AUC from {o['n_bins']}-bin histograms: "
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
        body += ".</p>"
    body += ("<p class='note'>What crosses a site boundary: counts, metrics with intervals and "
             "score histograms per label whose bins are merged until each holds at least "
             f"{st['min_cell']} patients; never patient-level scores.</p>")
    section("federated-evaluation", body)
    section("training", _img(figs["training"], "Training curves"))
    body = (
        f"<ul><li>Evaluated split: <b>{_SPLIT}</b>; thresholds chosen on the validation split "
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
    section("method", body)
    add("</body></html>")
    return "\n".join(parts)


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
    mc = sec["settings"]["min_cell"]
    figs: dict[str, Any] = {
        "roc": _fig_roc(runs, mc),
        "calibration": _fig_calibration(runs, mc),
        "forest": {lab: _fig_forest(pr["fairness"], "auc", f"{lab}: test AUC")
                   for lab, pr in sec["per_run"].items()},
        "cross": _fig_cross(sec["cross"]),
        "change": _fig_change(sec["changes"]) if sec["changes"] else None,
        "training": _fig_training(doc["training"]),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "report.json"
    json_path.write_text(json.dumps(_clean(doc), indent=2, allow_nan=False))
    html_path = out / "report.html"
    html_path.write_text(_html(doc, runs, sec, figs), encoding="utf-8")
    return json_path, html_path


def _clean(o: Any) -> Any:
    """JSON-ready copy: numpy scalars to Python, non-finite floats and NA to ``None``."""
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_clean(v) for v in o]
    if isinstance(o, np.generic):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if o is pd.NA:
        return None
    if isinstance(o, Path):
        return str(o)
    return o


# --------------------------------------------------------------------------------------------
# headless Chromium: the browser check and the docs screenshot


def find_chromium() -> str | None:
    """Path of Debian's ``chromium`` (or ``chromium-browser``), or ``None``.

    Returns
    -------
    str or None
    """
    import shutil

    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _chromium_args(exe: str, profile: Path) -> list[str]:
    return [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--hide-scrollbars", f"--user-data-dir={profile}", "--virtual-time-budget=10000"]


def render_in_chromium(html_path: str | os.PathLike[str], *, timeout: float = 120.0
                       ) -> dict[str, str]:
    """Load a report in headless Chromium and read the status its load handler records.

    Parameters
    ----------
    html_path : path-like
        A ``report.html``.
    timeout : float
        Seconds before giving up.

    Returns
    -------
    dict
        ``ready`` ("1" once loaded), ``errors`` (JavaScript errors and broken images, ``""``
        when none), ``sections`` (comma-separated section ids), ``images`` (count).

    Raises
    ------
    RuntimeError
        When Chromium is missing or fails.
    """
    import re
    import subprocess
    import tempfile

    exe = find_chromium()
    if exe is None:
        raise RuntimeError("Chromium not found: install Debian's `chromium` package")
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [*_chromium_args(exe, Path(tmp)), "--dump-dom", Path(html_path).resolve().as_uri()],
            capture_output=True, text=True, timeout=timeout, check=False,
        )
    if out.returncode != 0:
        raise RuntimeError(f"chromium exited with {out.returncode}: {out.stderr[-2000:]}")
    m = re.search(r'<div id="report-status"[^>]*>', out.stdout)
    if m is None:
        raise RuntimeError("the rendered page has no report-status element: not a report.html?")
    return dict(re.findall(r'data-([a-z]+)="([^"]*)"', m.group(0)))


def screenshot(html_path: str | os.PathLike[str], png_path: str | os.PathLike[str], *,
               width: int = 1200, height: int = 2400, timeout: float = 120.0) -> Path:
    """Save a PNG screenshot of a report (the top ``height`` pixels) with headless Chromium.

    Parameters
    ----------
    html_path : path-like
        A ``report.html``.
    png_path : path-like
        Where to write the PNG.
    width, height : int
        Window size in pixels.
    timeout : float
        Seconds before giving up.

    Returns
    -------
    Path
        ``png_path``.

    Raises
    ------
    RuntimeError
        When Chromium is missing or writes no file.
    """
    import subprocess
    import tempfile

    exe = find_chromium()
    if exe is None:
        raise RuntimeError("Chromium not found: install Debian's `chromium` package")
    png = Path(png_path).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [*_chromium_args(exe, Path(tmp)), f"--window-size={width},{height}",
             f"--screenshot={png}", Path(html_path).resolve().as_uri()],
            capture_output=True, text=True, timeout=timeout, check=False,
        )
    if not png.is_file():
        raise RuntimeError(f"chromium wrote no screenshot: {out.stderr[-2000:]}")
    return png
