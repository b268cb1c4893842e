"""The report's matplotlib figures themselves: axis limits, legends, colours, no overprinting.

Every figure is built with matplotlib warnings turned into errors, drawn, and its text
checked for overlaps with the renderer's own bounding boxes.
"""

from __future__ import annotations

import itertools
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import matplotlib.colors as mcolors
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.legend import Legend
from matplotlib.text import Text

from multimodal_fl.evaluation.report import (
    build_report,
    calibration_figure,
    change_figure,
    cross_site_figure,
    forest_figure,
    roc_figure,
    training_figure,
    write_report,
)

from .conftest import redisclose, write_run_dir

ENGINES = ("inprocess", "local", "centralized")
#: Sites small enough that per-site panels are suppressed (about 30% of each is test).
SMALL_SITES = (("a", 30, 1.6), ("b", 25, 1.4), ("c", 12, 1.2))


@pytest.fixture(autouse=True)
def _warnings_are_errors() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], list[Any], dict]:
    root = tmp_path_factory.mktemp("fig-runs")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return build_report([write_run_dir(root, e) for e in ENGINES])


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], list[Any], dict]:
    root = tmp_path_factory.mktemp("fig-small")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return build_report([write_run_dir(root, e, sites=SMALL_SITES, n_boot=20)
                             for e in ENGINES])


def _undrawn_ticks(fig: Figure) -> set[int]:
    """Tick labels outside their axis's view limits: matplotlib keeps but never draws them."""
    ids: set[int] = set()
    for ax in fig.axes:
        for axis, lim in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            lo, hi = sorted(lim)
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                if not lo - 1e-9 <= tick.get_loc() <= hi + 1e-9:
                    ids |= {id(tick.label1), id(tick.label2)}
    return ids


def _texts(fig: Figure) -> list[Text]:
    """Every drawn, non-empty text of a figure (tick labels, labels, legends, notes)."""
    hidden = _undrawn_ticks(fig)
    return [t for t in fig.findobj(Text)
            if t.get_visible() and t.get_text().strip() and id(t) not in hidden]


def _overlaps(fig: Figure) -> list[tuple[str, str]]:
    """Pairs of texts whose drawn boxes overlap, texts over a legend or across a panel's frame."""
    canvas = FigureCanvasAgg(fig)  # the report's figures are made without pyplot
    canvas.draw()
    r = canvas.get_renderer()
    boxes = [(t.get_text(), t.get_window_extent(r)) for t in _texts(fig)]
    found = [(a, b) for (a, ba), (b, bb) in itertools.combinations(boxes, 2) if ba.overlaps(bb)]
    for leg in fig.findobj(Legend):
        inside = {id(t) for t in leg.findobj(Text)}
        frame = leg.get_window_extent(r)
        found += [(t.get_text(), "legend") for t in _texts(fig)
                  if id(t) not in inside and t.get_window_extent(r).overlaps(frame)]
    for ax in fig.axes:  # a note written in a panel stays inside it, clear of the frame
        box = ax.get_window_extent(r)
        for t in ax.texts:
            e = t.get_window_extent(r)
            if not (box.x0 < e.x0 and e.x1 < box.x1 and box.y0 < e.y0 and e.y1 < box.y1):
                found.append((t.get_text(), "panel frame"))
    return found


def _draw_ok(fig: Figure, tmp_path: Path) -> None:
    """No overlapping text, and the figure saves as the report saves it."""
    assert _overlaps(fig) == []
    fig.savefig(tmp_path / "fig.png", dpi=90, bbox_inches="tight")


def _legend_texts(ax: Any) -> list[str]:
    leg = ax.get_legend()
    return [] if leg is None else [t.get_text().replace("\n", " ") for t in leg.get_texts()]


def _panel_notes(ax: Any) -> list[str]:
    return [t.get_text().replace("\n", " ") for t in ax.texts]


def test_every_figure_of_both_reports_is_warning_free_and_unprinted_over(
        built: tuple, small: tuple, tmp_path: Path) -> None:
    for doc, runs, sec in (built, small):
        mc = sec["settings"]["min_cell"]
        figs = [roc_figure(runs, mc), calibration_figure(runs, mc),
                cross_site_figure(sec["cross"]), change_figure(sec["changes"]),
                training_figure(doc["training"])]
        figs += [forest_figure(pr["fairness"], "auc", lab) for lab, pr in sec["per_run"].items()]
        for fig in figs:
            assert fig is not None
            _draw_ok(fig, tmp_path)


def test_write_report_raises_no_matplotlib_warning(tmp_path: Path) -> None:
    # before: empty calibration panels called legend() with nothing to show (UserWarning)
    runs = [write_run_dir(tmp_path, e, sites=SMALL_SITES, n_boot=10) for e in ENGINES]
    write_report(runs, tmp_path / "report")


def test_forest_axis_shows_every_interval_whole(built: tuple, tmp_path: Path) -> None:
    _, _, sec = built
    fr = sec["per_run"]["federated (in-process)"]["fairness"]
    fig = forest_figure(fr, "auc", "t")
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    shown = fr.cells[(fr.cells["metric"] == "auc") & fr.cells["value"].notna()]
    assert shown["hi"].max() == pytest.approx(1.0)  # an interval that reaches the range's end
    # the whole of [0, 1] and every interval, marker and cap inside the axis, not on its edge
    assert lo < min(0.0, shown["lo"].min()) and hi > max(1.0, shown["hi"].max())
    n = len(fr.cells[fr.cells["metric"] == "auc"])
    y0, y1 = ax.get_ylim()
    assert y0 < 0 and y1 > n - 1  # first and last rows clear of the frame
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "all sites", "site", "subgroup (all sites)", "subgroup within a site"]
    _draw_ok(fig, tmp_path)


def test_an_empty_calibration_panel_says_why(built: tuple, small: tuple) -> None:
    _, runs, sec = small
    fig = calibration_figure(runs, sec["settings"]["min_cell"])
    by_title = {ax.get_title(): ax for ax in fig.axes}
    for site in "abc":  # every site below the small-cell rule: no points, and the reason
        ax = by_title[site]
        assert len(ax.lines) == 1  # the diagonal only
        assert _legend_texts(ax) == []
        assert any(re.fullmatch(r"nothing to show: fewer than 10 (patients|positives)", t)
                   for t in _panel_notes(ax)), _panel_notes(ax)
    # a site with enough patients but fewer than 10 positives discloses no bins, and says why
    _, runs, sec = built
    fig = calibration_figure(runs, sec["settings"]["min_cell"])
    ax = {a.get_title(): a for a in fig.axes}["c"]
    assert any("nothing to show: fewer than 10 positives" in t for t in _panel_notes(ax))
    drawn = {a.get_title(): a for a in fig.axes}["(all sites)"]
    assert _legend_texts(drawn) == ["federated (in-process)", "local-only", "centralized"]


def test_roc_runs_keep_one_colour_and_suppressed_panels_say_why(built: tuple,
                                                                small: tuple) -> None:
    _, runs, sec = built
    fig = roc_figure(runs, sec["settings"]["min_cell"])
    colours: dict[str, set[str]] = {}
    for ax in fig.axes:
        for line in ax.lines[1:]:
            colours.setdefault(str(line.get_label()), set()).add(
                mcolors.to_hex(line.get_color()))
    assert all(len(c) == 1 for c in colours.values())
    assert len({c.pop() for c in colours.values()}) == len(runs)
    # the small cohort: no site and no pooled histogram may show a curve; each panel says why
    _, runs, sec = small
    fig = roc_figure(runs, sec["settings"]["min_cell"])
    for ax in fig.axes:
        assert len(ax.lines) == 1, ax.get_title()
        assert any("nothing to show" in t for t in _panel_notes(ax)), ax.get_title()


def test_cross_site_colour_scale_runs_from_0_to_1_with_chance_marked(built: tuple) -> None:
    _, _, sec = built
    fig = cross_site_figure(sec["cross"])
    ax, bar = fig.axes
    assert ax.images[0].get_clim() == (0.0, 1.0)
    assert bar.get_ylim() == (0.0, 1.0)
    assert "0.5 chance" in [t.get_text() for t in bar.get_yticklabels()]
    assert any(list(line.get_ydata()) == [0.5, 0.5] for line in bar.lines)


def test_change_axis_holds_zero_and_every_interval(built: tuple, small: tuple) -> None:
    for _, _, sec in (built, small):
        fig = change_figure(sec["changes"])
        ax = fig.axes[0]
        lo, hi = ax.get_xlim()
        ends = [v for df in sec["changes"].values() for c in ("change_lo", "change_hi")
                for v in df[c].dropna()]
        assert lo < min([0.0, *ends]) and hi > max([0.0, *ends])


def test_each_training_curve_has_its_own_colour() -> None:
    sites = [f"site_{i}" for i in range(5)]  # 5 series: the old cycle reused the loss's red
    doc = {"federated (in-process)": {"federated": {
        "x_label": "round", "x": [1, 2, 3], "train_loss": [0.7, 0.6, 0.5],
        "eval": {f"{s} val_auc": [0.2 + 0.1 * i, 0.6, 1.0] for i, s in enumerate(sites)}}}}
    fig = training_figure(doc)
    assert fig is not None
    ax, ax2 = fig.axes
    lines = ax.lines + ax2.lines
    assert len(lines) == 6
    assert len({mcolors.to_hex(line.get_color()) for line in lines}) == 6
    assert _legend_texts(ax) == ["train loss", *(f"{s} val_auc" for s in sites)]
    lo, hi = ax2.get_ylim()
    assert lo < 0.2 and hi > 1.0  # a validation AUC of 0.2 or 1.0 is drawn, not cut off
    assert all(float(t).is_integer() for t in ax.get_xticks() if 1 <= t <= 3)


def test_a_series_never_defined_is_named_in_the_legend() -> None:
    doc = {"local-only": {"c": {"x_label": "step", "x": [3, 6], "train_loss": [1.2, 1.1],
                                 "eval": {"val_auc": [None, None]}}}}
    fig = training_figure(doc)
    assert fig is not None
    assert _legend_texts(fig.axes[0]) == ["train loss", "val_auc: undefined at every step"]
    assert training_figure({"local-only": {}}) is None


def test_a_run_without_a_curve_beside_others_is_named_in_the_legend(tmp_path: Path) -> None:
    runs = [write_run_dir(tmp_path, e) for e in ("inprocess", "centralized")]
    d = pd.read_csv(runs[1] / "sites" / "b" / "predictions.csv")
    redisclose(runs[1], "b", d[d["split"] != "test"])  # no test patients at b for this run
    _, loaded, sec = build_report(runs)
    fig = roc_figure(loaded, sec["settings"]["min_cell"])
    ax = {a.get_title(): a for a in fig.axes}["b"]
    assert _legend_texts(ax) == ["federated (in-process)", "centralized: no curve (no patients)"]
    assert _panel_notes(ax) == []
    _draw_ok(fig, tmp_path)
