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

from multimodal_fl.evaluation.histograms import UNNAMED
from multimodal_fl.evaluation.report import SECTIONS, build_report, load_run, write_report
from tests.browser import find_chromium, render_in_chromium, screenshot

from .conftest import redisclose, write_run_dir

FED = "federated (in-process)"


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[Path]]:
    root = tmp_path_factory.mktemp("runs")
    runs = [write_run_dir(root, e) for e in ("inprocess", "local", "centralized")]
    j, h = write_report(runs, root / "report")
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
    # every site chose its threshold on its own validation split, a grid edge; site c's is too
    # small to choose on and falls back to 0.5, said so
    for r in doc["runs"]:
        assert set(r["thresholds"]) == {"a", "b", "c"}
        assert all(round(t * 100, 9).is_integer() for t in r["thresholds"].values())
        assert r["thresholds"]["c"] == 0.5 and "c: 0.5: the site's validation split" in (
            r["threshold_source"])
    cells = doc["fairness"][FED]["cells"]
    small = [c for c in cells if c["site"] == "c" and c["scope"] == "site_subgroup"]
    # site c has ~17 test patients: its levels of fewer than 10 are not named, and the named
    # ones are suppressed
    assert small and all(c["suppressed"] for c in small if c["group"] != UNNAMED)
    assert all(c["n"] is None or c["n"] >= 10 for c in small)
    for c in cells:
        if c["suppressed"]:
            assert c["value"] is None and c["lo"] is None and c["reason"]
        if c["scope"] in ("site", "site_subgroup"):  # released counts: 0 or at least 10
            assert all(c[k] is None or c[k] == 0 or c[k] >= 10 for k in ("n", "n_pos", "n_neg"))
            if not c["suppressed"] and c["metric"] == "auc":
                assert c["n_pos"] >= 10 and c["n_neg"] >= 10
    # the all-sites rows come from the pooled histograms of metrics.json
    overall = [c for c in cells if c["scope"] == "overall" and c["metric"] == "auc"]
    assert overall[0]["value"] == doc["federated_evaluation"][FED]["overall"]["auc"]["value"]
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


def test_cross_site_cells_are_the_sites_disclosed_auc(tmp_path: Path) -> None:
    # a run's own model on each site: the AUC cell that site disclosed, whatever the label
    run = write_run_dir(tmp_path, "inprocess")
    doc, _, _ = build_report([run])
    disclosed = load_run(run).disclosed
    got = {c["test_site"]: c for c in doc["cross_site"]["cells"]}
    assert set(got) == {"a", "b", "c"}
    for site, d in disclosed.items():
        cell = d.cell("auc")
        assert cell is not None
        assert got[site]["model"] == FED
        assert (got[site]["value"], got[site]["lo"], got[site]["hi"]) == (
            cell.value, cell.lo, cell.hi)


def test_two_runs_of_one_engine_are_told_apart(tmp_path: Path) -> None:
    a = write_run_dir(tmp_path / "x", "inprocess")
    b = write_run_dir(tmp_path / "y", "inprocess", noise=0.3)
    c = write_run_dir(tmp_path, "local")
    _, runs, _ = build_report([a, c])
    assert [r.label for r in runs] == [FED, "local-only"]
    # same engine, no setting differs: the folder tells them apart; same folder name too: #n
    doc, runs, _ = build_report([a, b])
    assert [r.label for r in runs] == [f"{FED} (cfg-inprocess) #1", f"{FED} (cfg-inprocess) #2"]
    assert list(doc["fairness"]) == [r.label for r in runs]
    b2 = b.rename(b.parent / "second")
    _, runs, _ = build_report([a, b2])
    assert [r.label for r in runs] == [f"{FED} (cfg-inprocess)", f"{FED} (second)"]


def test_the_cross_site_file_fills_the_matrix(tmp_path: Path) -> None:
    run = write_run_dir(tmp_path, "local")
    cells = [{"model": "local:b", "test_site": "a", "value": 0.71, "lo": 0.6, "hi": 0.8,
              "n": 122, "suppressed": False, "reason": None},
             {"model": "local:c", "test_site": "a", "value": None, "lo": None, "hi": None,
              "n": None, "suppressed": True, "reason": "withheld by policy"},
             {"model": "local:a", "test_site": "a", "value": 0.01, "lo": None, "hi": None,
              "n": 122, "suppressed": False, "reason": None}]
    (run / "cross_site.json").write_text(json.dumps({"metric": "auc", "cells": cells}))
    _, _, sec = build_report([run])
    m = sec["cross"].matrix
    assert m.loc["local:b", "a"] == pytest.approx(0.71)
    assert m.isna().loc["local:c", "a"]
    # a site's own model on its own test split is what that site disclosed, not the file
    own = load_run(run).disclosed["a"].cell("auc")
    assert own is not None and m.loc["local:a", "a"] == pytest.approx(own.value)
    bad = write_run_dir(tmp_path / "bad", "local")
    (bad / "cross_site.json").write_text(json.dumps({"cells": [{"model": "x"}]}))
    with pytest.raises(ValueError, match=r"cross_site.json: not a cross-site matrix"):
        build_report([bad])


def test_load_run_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a directory"):
        load_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no disclosed/<site>.json and no metrics.json"):
        load_run(tmp_path / "empty")
    run = write_run_dir(tmp_path, "inprocess")
    doc = json.loads((run / "disclosed" / "a.json").read_text())
    (run / "disclosed" / "a.json").write_text(json.dumps(doc | {"version": 99}))
    with pytest.raises(ValueError, match=r"a.json: disclosed-document version 99 .* is not one "
                       r"multimodal_fl .* reads \(version 1\)") as info:
        load_run(run)
    assert "\n" not in str(info.value)
    (run / "disclosed" / "a.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"a.json: not valid JSON"):
        load_run(run)


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
    # AUC of each run; sensitivity and specificity only where one model has one threshold:
    # the centralized model (the federated sites send no threshold with their histograms,
    # local-only has a model and threshold per site)
    assert len(bounds) == 1 + 1 + 3
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

    run = write_run_dir(tmp_path, "local")
    d = pd.read_csv(run / "sites" / "b" / "predictions.csv")
    d.loc[d.split == "val", "label"] = 0  # site b's validation split has no positives
    redisclose(run, "b", d)
    doc, _, _ = build_report([run])
    entry = doc["runs"][0]
    assert entry["thresholds"]["b"] == 0.5
    assert ("b: 0.5: the site's validation split has fewer than 10 positives or negatives"
            in entry["threshold_source"])
    assert "a: chosen on the site's validation split (youden" in entry["threshold_source"]


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
            if c["scope"] == "site" and c["metric"] == "auc")
    assert n == len(test_only)  # without a split column every row is a test row
    text = h.read_text()
    assert "Training curves: nothing to plot: no run records" in text
    # with validation rows and no threshold, Youden's J on them, as for a run
    j2, _ = write_frame_report(pred.drop(columns=["site"]), tmp_path / "r2", n_boot=0,
                               label="my model")
    doc2 = json.loads(j2.read_text())
    assert doc2["runs"][0]["label"] == "my model"
    assert doc2["runs"][0]["threshold_source"].startswith(
        "chosen on the site's validation split (youden")
    assert {c["test_site"] for c in doc2["cross_site"]["cells"]} == {"site"}
    with pytest.raises(ValueError, match=r"^predictions DataFrame: missing column\(s\) "
                       r"\['score', 'race'\]; present: .*; expected label \(0/1\)") as e:
        write_frame_report(pred.drop(columns=["score"]), tmp_path / "r3", sensitive=["race"])
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="expected a pandas DataFrame, got dict"):
        write_frame_report({"label": [0]}, tmp_path / "r4")  # type: ignore[arg-type]


def test_counts_withheld_for_a_secure_sum_that_left_the_site_out_are_said_to_be_nowhere() -> None:
    """A site in pooled form whose secure sum was refused said 'in the pooled figures' while the
    report said the pooled rows held no site (a hospital's walk-through): now a note says so."""
    from types import SimpleNamespace

    from multimodal_fl.evaluation.report.compute import _withheld_note

    run = SimpleNamespace(label="federated", disclosed={
        "a": SimpleNamespace(pooled=True), "b": SimpleNamespace(pooled=True),
        "c": SimpleNamespace(pooled=False)})
    refused = {"reason": "refused: a secure sum needs at least 3 sites, 2 took part",
               "sites": []}
    [note] = _withheld_note(run, refused)  # type: ignore[arg-type]
    assert note.startswith("federated: a, b withheld their test class counts")
    assert "2 took part" in note and "in no figure of this report" in note
    [note] = _withheld_note(run, {"sites": ["b", "c", "d"]})  # type: ignore[arg-type]
    assert note.startswith("federated: a withheld") and "it summed b, c, d only" in note
    assert _withheld_note(run, {"sites": ["a", "b", "c"]}) == []  # type: ignore[arg-type]
