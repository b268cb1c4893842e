"""The report: report.json content, self-contained HTML, and rendering in headless Chromium."""

from __future__ import annotations

import html
import html.parser
import json
import os
import re
from pathlib import Path

import pandas as pd
import pytest

from multimodal_fl.evaluation.fairness import cross_site_matrix
from multimodal_fl.evaluation.report import SECTIONS, build_report, load_run, write_report
from tests.browser import find_chromium, render_in_chromium, screenshot

from .conftest import write_run_dir

FED = "federated (in-process)"


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[Path]]:
    root = tmp_path_factory.mktemp("runs")
    runs = [write_run_dir(root, e) for e in ("inprocess", "local", "centralized")]
    j, h = write_report(runs, root / "report", n_boot=50)
    return j, h, runs


def test_report_json(report: tuple[Path, Path, list[Path]]) -> None:
    j, _, _ = report
    text = j.read_text()
    assert "NaN" not in text and "Infinity" not in text
    doc = json.loads(text)
    assert [r["engine"] for r in doc["runs"]] == ["inprocess", "local", "centralized"]
    # runs are named by what they are, not by the engine's option value
    assert [r["label"] for r in doc["runs"]] == [FED, "local-only", "centralized"]
    assert doc["settings"]["n_boot"] == 50 and doc["settings"]["min_cell"] == 10
    # local-only runs choose a threshold per site, the others one on pooled validation
    assert doc["runs"][1]["threshold_source"].startswith("chosen per site")
    cells = doc["fairness"][FED]["cells"]
    small = [c for c in cells if c["site"] == "c" and c["scope"] == "site_subgroup"]
    assert any(c["suppressed"] for c in small)  # site c has ~17 test patients
    for c in small:
        if c["suppressed"]:
            assert c["value"] is None and c["lo"] is None and c["reason"]
        else:
            assert c["n"] >= 10 and c["n_pos"] > 0 and c["n_neg"] > 0
    # the cross-site matrix holds local models only on their own site, others everywhere
    cs = {(c["model"], c["test_site"]) for c in doc["cross_site"]["cells"]}
    assert ("local:a", "a") in cs and ("local:a", "b") not in cs
    assert {(FED, s) for s in "abc"} <= cs
    ch = doc["change_from_local"][FED]
    assert [r["site"] for r in ch] == ["a", "b", "c"]
    for r in ch:
        if r["change"] is not None:
            assert r["change"] == pytest.approx(r["federated"] - r["local"])
            assert r["change_lo"] <= r["change_hi"]
    fed = doc["federated_evaluation"][FED]["overall"]
    assert fed["auc"]["lower"] <= fed["auc"]["value"] <= fed["auc"]["upper"]
    assert doc["training"][FED]["federated"]["x"] == list(range(1, 11))
    assert set(doc["training"]["local-only"]) == {"a", "b", "c"}


def test_labels_do_not_move_the_cross_site_intervals(tmp_path: Path) -> None:
    # the cross-site bootstrap is seeded by model name: the report keeps the engine's name
    # as the model key and shows the label, so relabelling changes no number
    run = write_run_dir(tmp_path, "inprocess")
    doc, _, _ = build_report([run], n_boot=50)
    ref = cross_site_matrix(load_run(run).predictions, n_boot=50, seed=0, min_cell=10)
    assert set(ref.long["model"]) == {"inprocess"}
    got = {c["test_site"]: (c["model"], c["lo"], c["hi"]) for c in doc["cross_site"]["cells"]}
    for r in ref.long.itertuples():
        assert got[r.test_site] == (FED, pytest.approx(r.lo), pytest.approx(r.hi))


def test_two_runs_of_one_engine_are_told_apart(tmp_path: Path) -> None:
    a = write_run_dir(tmp_path / "x", "inprocess")
    b = write_run_dir(tmp_path / "y", "inprocess", noise=0.3)
    c = write_run_dir(tmp_path, "local")
    _, runs, _ = build_report([a, c], n_boot=0)
    assert [r.label for r in runs] == [FED, "local-only"]
    # same engine, no setting differs: the folder tells them apart; same folder name too: #n
    doc, runs, _ = build_report([a, b], n_boot=0)
    assert [r.label for r in runs] == [f"{FED} (cfg-inprocess) #1", f"{FED} (cfg-inprocess) #2"]
    assert list(doc["fairness"]) == [r.label for r in runs]
    b2 = b.rename(b.parent / "second")
    _, runs, _ = build_report([a, b2], n_boot=0)
    assert [r.label for r in runs] == [f"{FED} (cfg-inprocess)", f"{FED} (second)"]


def test_disclosed_cross_site_cells_fill_the_matrix(tmp_path: Path) -> None:
    """The local engine's cross_site.json: cells the sites disclosed, taken as they are."""
    run = write_run_dir(tmp_path, "local")
    cell = {"n": 120, "suppressed": False, "reason": None}
    cells = [
        {"model": "local:b", "test_site": "a", "value": 0.71, "lo": 0.6, "hi": 0.8, **cell},
        {"model": "local:c", "test_site": "a", "value": None, "lo": None, "hi": None,
         "n": None, "suppressed": True, "reason": "withheld by policy"},
        {"model": "local:b", "test_site": "c", "value": 0.9, "lo": 0.8, "hi": 1.0,
         **cell, "n": 7},  # below the report's min_cell (10): shown suppressed
    ]
    (run / "cross_site.json").write_text(json.dumps({"metric": "auc", "cells": cells}))
    _, _, sec = build_report([run], n_boot=0)
    long = sec["cross"].long.set_index(["model", "test_site"])
    assert long.loc[("local:b", "a"), "value"] == pytest.approx(0.71)
    assert long.loc[("local:c", "a"), "reason"] == "withheld by policy"
    assert pd.isna(long.loc[("local:b", "c"), "value"])
    assert long.loc[("local:b", "c"), "reason"] == "fewer than 10 patients"
    # the diagonal still comes from each site's own predictions
    assert not pd.isna(long.loc[("local:a", "a"), "value"])
    (run / "cross_site.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"cross_site.json: not a cross-site matrix"):
        build_report([run], n_boot=0)


def test_load_run_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a directory"):
        load_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no sites/<site>/predictions.csv"):
        load_run(tmp_path / "empty")
    bad = tmp_path / "bad" / "sites" / "a"
    bad.mkdir(parents=True)
    (bad / "predictions.csv").write_text("patient_id,label\n1,0\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['split', 'score'\]"):
        load_run(tmp_path / "bad")


class _Collect(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "section" and a.get("id"):
            self.sections.append(str(a["id"]))
        for k in ("src", "href"):
            v = a.get(k)
            if v and not (v.startswith("data:") or v.startswith("#")):
                self.external.append(v)


def test_html_is_self_contained_with_every_section(report: tuple[Path, Path, list[Path]]) -> None:
    _, h, _ = report
    p = _Collect()
    p.feed(h.read_text())
    assert p.sections == [s for s, _ in SECTIONS]
    assert p.external == []  # no external resources: one file to send to a review board
    text = h.read_text()
    assert text.count("data:image/png;base64,") >= 6
    # missing values read as "—", never as None / nan
    assert not re.search(r">\s*(None|nan|NaN|<NA>)\s*<", text)


def _section_html(text: str, sid: str) -> str:
    start = text.index(f"<section id='{sid}'>")
    return text[start:text.index("</section>", start)]


def test_pooled_section_shows_bounds_within_the_metric_range(
        report: tuple[Path, Path, list[Path]]) -> None:
    _, h, _ = report
    sec = _section_html(h.read_text(), "federated-evaluation")
    figures = re.sub(r"<p class='note'>.*?</p>", "", sec)
    bounds = [(float(a), float(b))
              for a, b in re.findall(r"\[(-?[\d.]+), (-?[\d.]+)\]", figures)]
    # AUC, sensitivity and specificity of each run; local-only has a threshold per site, so
    # no pooled sensitivity or specificity
    assert len(bounds) == 3 + 1 + 3
    assert all(0.0 <= a <= b <= 1.0 for a, b in bounds)
    assert "-0.000" not in sec and "guaranteed bounds, not confidence intervals" in sec


def _notes(text: str) -> list[str]:
    """The text of every ``class='note'`` paragraph, as a browser shows it."""
    found = re.findall(r"<p class=['\"]note['\"]>(.*?)</p>", text, flags=re.S)
    return [" ".join(html.unescape(re.sub(r"<[^>]+>", "", n)).split()) for n in found]


@pytest.mark.browser
def test_html_renders_in_headless_chromium(report: tuple[Path, Path, list[Path]],
                                          tmp_path: Path) -> None:
    if find_chromium() is None:
        msg = "Debian's chromium is not installed (apt-get install chromium); .ci/run installs it"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"under CI the browser test must run: {msg}")
        pytest.skip(msg)
    _, h, _ = report
    status = render_in_chromium(h)
    assert status.get("ready") == "1", "the page's load handler did not run"
    assert status.get("errors") == "", f"JavaScript/image errors: {status.get('errors')}"
    assert status["sections"].split(",") == [s for s, _ in SECTIONS]
    assert int(status["images"]) >= 6
    # every note is laid out on the page with its text (none hidden, none empty)
    notes = _notes(h.read_text())
    assert len(notes) >= 7 and int(status["notes"]) == len(notes)
    assert status["shownnotes"].split(" | ") == notes
    shot = screenshot(h, tmp_path / "shot.png", height=1500)
    assert shot.stat().st_size > 10_000


def test_broken_page_is_caught_by_the_browser_check(tmp_path: Path) -> None:
    if find_chromium() is None:
        pytest.skip("chromium not installed")
    from multimodal_fl.evaluation.report import STATUS_SCRIPT as _JS

    page = tmp_path / "bad.html"
    page.write_text(
        f"<html><head><script>{_JS}</script></head><body><div id='report-status' hidden></div>"
        "<section id='x'></section><img src='data:image/png;base64,AAAA'>"
        "<script>undefinedFunction()</script></body></html>"
    )
    status = render_in_chromium(page)
    assert "undefinedFunction" in status["errors"]
    assert "image(s) failed to load" in status["errors"]


def test_threshold_falls_back_when_a_site_cannot_choose(tmp_path: Path) -> None:
    import pandas as pd

    run = write_run_dir(tmp_path, "local")
    f = run / "sites" / "c" / "predictions.csv"
    d = pd.read_csv(f)
    d.loc[d.split == "val", "label"] = 0  # site c's validation split has no positives
    d.to_csv(f, index=False)
    doc, _, _ = build_report([run], n_boot=0)
    notes = doc["runs"][0]["notes"]
    assert any("site 'c'" in n and "no positives" in n for n in notes)
    assert doc["runs"][0]["threshold_source"].startswith("chosen on split 'val' of all sites")


def test_frame_report_from_a_users_own_predictions(tmp_path: Path) -> None:
    from multimodal_fl.evaluation.report import write_frame_report

    from .conftest import make_predictions

    pred = make_predictions()
    test_only = pred[pred["split"] == "test"].drop(columns=["split", "patient_id"])
    j, h = write_frame_report(test_only, tmp_path / "r", sensitive=["sex"], threshold=0.4,
                              n_boot=20)
    doc = json.loads(j.read_text())
    assert [r["label"] for r in doc["runs"]] == ["predictions (DataFrame)"]
    assert doc["runs"][0]["threshold_source"] == "given (0.4)"
    assert doc["settings"]["threshold"] == "0.4" and doc["settings"]["sensitive"] == ["sex"]
    n = sum(c["n"] or 0 for c in doc["fairness"]["predictions (DataFrame)"]["cells"]
            if c["scope"] == "overall" and c["metric"] == "auc")
    assert n == len(test_only)  # without a split column every row is a test row
    text = h.read_text()
    assert "Training curves: nothing to plot: no run records" in text
    # with validation rows and no threshold, Youden's J on them, as for a run
    j2, _ = write_frame_report(pred.drop(columns=["site"]), tmp_path / "r2", n_boot=0,
                               label="my model")
    doc2 = json.loads(j2.read_text())
    assert doc2["runs"][0]["label"] == "my model"
    assert doc2["runs"][0]["threshold_source"].startswith("chosen on split 'val'")
    assert {c["test_site"] for c in doc2["cross_site"]["cells"]} == {"site"}
    with pytest.raises(ValueError, match=r"^predictions DataFrame: missing column\(s\) "
                       r"\['score', 'race'\]; present: .*; expected label \(0/1\)") as e:
        write_frame_report(pred.drop(columns=["score"]), tmp_path / "r3", sensitive=["race"])
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="expected a pandas DataFrame, got dict"):
        write_frame_report({"label": [0]}, tmp_path / "r4")  # type: ignore[arg-type]
