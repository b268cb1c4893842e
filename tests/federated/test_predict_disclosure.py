"""What leaves a site at predict: no figure on a small cell, no histogram in the clear, and the
pooled test figures from a secure sum. Includes the differencing attack of issue 12."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from multimodal_fl.cli import app
from multimodal_fl.config import load_config
from multimodal_fl.engines.federated import predict_stage
from multimodal_fl.evaluation.histograms import UNNAMED
from multimodal_fl.federated import site as site_module
from multimodal_fl.federated.disclosure import EGRESS_LOG
from multimodal_fl.federated.gather import gather
from multimodal_fl.federated.inprocess import InProcessFederation
from multimodal_fl.federated.pooling import REFUSED
from multimodal_fl.federated.protocol import Doc, Kind, Reply, Request, unpack_document
from multimodal_fl.federated.site import FusionSite, fusion_sites
from tests.smallcells import json_numbers, small_figures

#: The one patient of sex "unknown" at site_a: positive, with this score.
UNKNOWN_SCORE = 0.93171


class Recorder:
    """A site as the server sees it: every request it got and every reply that left it.

    With ``fresh``, the site is rebuilt from its exported state for every message, as a Flower
    ClientApp without a site worker rebuilds it.
    """

    def __init__(self, site: FusionSite, *, fresh: bool = False) -> None:
        self.site = site
        self.fresh = fresh
        self.requests: list[Request] = []
        self.replies: list[Reply] = []

    def handle(self, request: Request) -> Reply:
        self.requests.append(request)
        if self.fresh:
            old = self.site
            self.site = FusionSite(old.name, old.cfg, old.data, run_dir=old.run_dir)
            self.site.restore_state(old.export_state())
        reply = self.site.handle(request)
        self.replies.append(reply)
        return reply


def _frame(n: int, seed: int, *, unknown: bool = False) -> pd.DataFrame:
    """A predictions table: ``n`` test patients (half female, half male), 40 train, 20 val."""
    rng = np.random.default_rng(seed)
    total = n + 60
    y = (rng.random(total) < 0.5).astype(int)
    score = np.clip(rng.normal(0.35 + 0.3 * y, 0.15), 0.01, 0.99)
    sex = np.where(np.arange(total) % 2 == 0, "female", "male").astype(object)
    split = np.array(["test"] * n + ["train"] * 40 + ["val"] * 20)
    if unknown:  # the differencing target: one positive patient of sex "unknown"
        sex[n - 1], y[n - 1], score[n - 1] = "unknown", 1, UNKNOWN_SCORE
    return pd.DataFrame({
        "patient_id": [f"p{seed}-{i}" for i in range(total)], "split": split, "label": y,
        "score": score, "sex": sex, "age_band": np.where(rng.random(total) < 0.5, "40-59", "60+"),
    })


@pytest.fixture(scope="module")
def tiny_sites(tmp_path_factory: pytest.TempPathFactory, tiny_sample: Path, tiny_bert: Path
               ) -> tuple[Any, Path, dict[str, FusionSite]]:
    """The tiny cohort's three sites, built once (their predictions are replaced per test)."""
    from tests.conftest import write_tiny_config

    root = tmp_path_factory.mktemp("predict_disclosure")
    cfg = load_config(write_tiny_config(root, tiny_sample, tiny_bert, "covid_oxygen"))
    return cfg, root, fusion_sites(cfg, root / "prepared")


def _run_predict(cfg: Any, run_dir: Path, sites: dict[str, FusionSite],
                 frames: dict[str, pd.DataFrame], monkeypatch: pytest.MonkeyPatch,
                 fresh: tuple[str, ...] = ()) -> tuple[dict[str, Recorder], dict[str, Any]]:
    """The engine's predict stage over these sites, each scoring ``frames[site]``."""
    by_data = {id(s.data): frames[n] for n, s in sites.items()}
    monkeypatch.setattr(site_module, "predictions_frame",
                        lambda model, data, sensitive=(): by_data[id(data)].copy())
    own = {n: FusionSite(n, cfg, s.data, run_dir=run_dir) for n, s in sites.items()}
    recorders = {n: Recorder(s, fresh=n in fresh) for n, s in own.items()}
    federation = InProcessFederation(recorders)
    first = sorted(own)[0]
    weights = gather(federation, {first: Request(Kind.INIT, 0)}, None, stage="init",
                     minimum=1)[first].weights
    stage = predict_stage(federation, cfg, sorted(own), weights, 1, "inprocess")
    return recorders, stage["pooled_from_histograms"]


def _differences(doc: Any) -> list[float]:
    """The attack: wherever a document has an overall cell and subgroup cells of ``sex``,
    subtract the shown subgroups from the overall, number by number (lists elementwise)."""
    out: list[float] = []
    if isinstance(doc, dict):
        overall, sex = doc.get("overall"), (doc.get("subgroups") or {}).get("sex")
        if isinstance(overall, dict) and isinstance(sex, dict):
            shown = [c for c in sex.values() if isinstance(c, dict)]

            def leaves(cell: Any, path: tuple[Any, ...] = ()) -> dict[tuple[Any, ...], float]:
                if isinstance(cell, dict):
                    return {k: v for key, sub in cell.items()
                            for k, v in leaves(sub, (*path, key)).items()}
                if isinstance(cell, list):  # each element, and the list's total
                    out = {k: v for i, sub in enumerate(cell)
                           for k, v in leaves(sub, (*path, i)).items()}
                    numbers = [v for k, v in out.items() if len(k) == len(path) + 1]
                    return {**out, (*path, "total"): sum(numbers)} if numbers else out
                ok = isinstance(cell, int | float) and not isinstance(cell, bool)
                return {path: float(cell)} if ok else {}

            parts = [leaves(c) for c in shown]
            for path, value in leaves(overall).items():
                if any(path in p for p in parts):
                    out.append(value - sum(p.get(path, 0.0) for p in parts))
        for value in doc.values():
            out += _differences(value)
    elif isinstance(doc, list):
        for value in doc:
            out += _differences(value)
    return out


def test_differencing_a_61_patient_site_recovers_nothing_of_its_one_unknown_patient(
    tiny_sites: tuple[Any, Path, dict[str, FusionSite]], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg, _, sites = tiny_sites
    frames = {"site_a": _frame(61, 1, unknown=True), "site_b": _frame(40, 2),
              "site_c": _frame(36, 3)}
    recorders, pooled = _run_predict(cfg, tmp_path, sites, frames, monkeypatch,
                                     fresh=("site_c",))
    released = recorders["site_a"].replies
    kinds = [r.kind for r in released]
    assert kinds.count(Kind.PREDICT) == 1 and kinds.count(Kind.SECURE_SUM) == 4
    docs = [unpack_document(t) for r in released for t in r.documents.values()]
    numbers = [*json_numbers(docs), *(v for r in released for v in r.metrics.values())]
    # no released number is (or is within 1e-4 of) the patient's score
    assert not [x for x in numbers if abs(x - UNKNOWN_SCORE) < 1e-4]
    # overall minus female minus male, in every released document: no count, no label, no score
    # (on the code before, the "evaluation" document gave n 1, n_pos 1 and score_sum 0.93171)
    for diff in _differences(docs):
        assert diff != 1.0 and abs(diff - UNKNOWN_SCORE) > 1e-4, diff
    # no histogram in the clear: the predict reply carries the site's metrics and its report
    # document only (both under the differencing check above)
    predict = next(r for r in released if r.kind == Kind.PREDICT)
    assert sorted(predict.documents) == [Doc.DISCLOSED, Doc.SITE_METRICS] and not predict.arrays
    assert "score_sum" not in json.dumps(docs)
    # what went to the secure sum is masked: the vector never leaves in the clear
    y = next(r.arrays["y"] for r in released if "y" in r.arrays)
    assert y.max() > 2**30
    # the pooled figures: the unknown cell is not shown, nor is anything that gives it away
    sex = pooled["subgroups"]["sex"]
    assert "unknown" not in sex and "unknown" not in json.dumps(pooled)  # not named
    # sex's levels are the task's: the patient is in the "unknown" part of every site's layout,
    # a pooled level of 1 patient that is not shown (nor an unnamed cell in its place)
    assert UNNAMED not in sex
    shown = [c for c in sex.values() if "auc" in c]
    for key in ("n_pos", "n_neg"):
        rest = pooled["overall"][key] - sum(c[key] for c in shown)
        assert rest == 0 or rest >= 10, (key, rest)
    assert pooled["overall"]["auc"]["lo"] is not None
    assert small_figures(pooled, 10) == []
    # the site's egress log has every released message: predict and the four steps
    log = [json.loads(line) for line in
           (tmp_path / "sites" / "site_a" / EGRESS_LOG).read_text().splitlines()]
    assert [e["kind"] for e in log if e["released"]].count("secure_sum") == 4
    assert next(e for e in log if e["kind"] == "predict")["documents"] == ["disclosed",
                                                                            "site_metrics"]
    assert str(UNKNOWN_SCORE) not in json.dumps(log)
    # a site rebuilt for every message (Flower without a worker) took part the same
    assert "site_c" in pooled["overall"]["sites"]


def test_a_secure_sum_of_two_sites_is_refused_and_no_vector_is_sent(
    tiny_sites: tuple[Any, Path, dict[str, FusionSite]], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg, _, sites = tiny_sites
    two = {n: s for n, s in sites.items() if n in ("site_a", "site_b")}
    frames = {"site_a": _frame(61, 1), "site_b": _frame(40, 2)}
    recorders, pooled = _run_predict(cfg, tmp_path, two, frames, monkeypatch)
    assert pooled["overall"]["reason"].startswith(REFUSED)
    assert "auc" not in pooled["overall"] and pooled["subgroups"] == {}
    for recorder in recorders.values():
        assert not [r for r in recorder.requests if r.kind == Kind.SECURE_SUM]


def test_a_site_with_too_few_test_patients_does_not_take_part_and_says_so(
    tiny_sites: tuple[Any, Path, dict[str, FusionSite]], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg, _, sites = tiny_sites
    frames = {"site_a": _frame(61, 1), "site_b": _frame(40, 2), "site_c": _frame(6, 3)}
    recorders, pooled = _run_predict(cfg, tmp_path, sites, frames, monkeypatch)
    assert "fewer than 10 test patients" in pooled["overall"]["excluded"]["site_c"]
    assert pooled["overall"]["reason"].startswith(REFUSED)
    assert not [r for r in recorders["site_c"].replies if r.kind == Kind.SECURE_SUM]
    # its small test split shows no figure either
    doc = next(r for r in recorders["site_c"].replies if r.kind == Kind.PREDICT)
    test = doc.document(Doc.SITE_METRICS)["metrics"]["test"]
    assert all(m["value"] is None and m["n"] is None and m["reason"] == "fewer than 10 patients"
               for m in test.values())
    assert not any(k.startswith("test/") for k in doc.metrics)


# ------------------------------------------------------------------ mmfl train, end to end


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_sample: Path, tiny_bert: Path
            ) -> tuple[str, Path]:
    """``mmfl train`` on the tiny COVID-19 cohort, half of each site's patients in test."""
    from tests.conftest import write_tiny_config

    root = tmp_path_factory.mktemp("trained")
    config = write_tiny_config(root, tiny_sample, tiny_bert, "covid_oxygen",
                               training={"split": {"train": 0.3, "val": 0.2, "test": 0.5}},
                               evaluation={"min_cell": 5})
    result = CliRunner().invoke(app, ["train", str(config), "--out", str(root / "run"),
                                      "--quiet", "--no-report"])
    assert result.exit_code == 0, result.output
    return result.output, root / "run"


def test_no_console_line_or_metrics_entry_shows_a_figure_on_fewer_than_min_cell(
    trained: tuple[str, Path],
) -> None:
    output, run = trained
    metrics = json.loads((run / "metrics.json").read_text())
    assert small_figures(metrics["sites"], 5) == []
    assert small_figures(metrics["pooled_from_histograms"], 5) == []
    hidden = 0
    for site, doc in metrics["sites"].items():
        for split, values in doc["metrics"].items():
            auc = values["auc"]
            if auc["reason"] == "fewer than 5 patients" or "subtraction" in str(auc["reason"]):
                hidden += 1
                assert auc["value"] is None and auc["n"] is None, (site, split)
        test = doc["metrics"]["test"]["auc"]
        row = next(line for line in output.splitlines() if f" {site} " in line)
        if test["value"] is None:
            assert "not shown" in row and test["reason"] in row
        else:
            assert test["n"] >= 5 and f"{test['value']:.3f}" in row
    assert hidden >= 3  # every tiny site's validation split (4 patients) is suppressed


def test_the_pooled_test_auc_with_its_interval_and_the_qualifying_cells_are_shown(
    trained: tuple[str, Path],
) -> None:
    output, run = trained
    pooled = json.loads((run / "metrics.json").read_text())["pooled_from_histograms"]
    overall = pooled["overall"]
    assert overall["reason"] is None and len(overall["sites"]) == 3
    auc = overall["auc"]
    assert auc["lower"] <= auc["value"] <= auc["upper"] and auc["lo"] <= auc["hi"]
    assert pooled["settings"]["source"] == "secure sum" and pooled["settings"]["min_cell"] == 5
    # the summary's pooled row (not the round table's auc:pooled column or the selection line)
    row = next(line for line in output.splitlines() if "pooled" in line and "[" in line)
    assert f"{auc['value']:.3f} [{auc['lo']:.3f}, {auc['hi']:.3f}]" in row
    assert set(pooled["subgroups"]) == {"sex", "age_band"}
    for attribute, cells in pooled["subgroups"].items():
        for level, cell in cells.items():
            if "auc" in cell:  # shown: a qualifying cell
                assert cell["n_pos"] >= 5 and cell["n_neg"] >= 5, (attribute, level)
            else:
                assert cell["reason"], (attribute, level)


def test_the_gate_withholds_a_predict_reply_that_shows_a_small_cell(tmp_path: Path) -> None:
    """The backstop: a handler that forgot the rule does not get its reply out."""
    from multimodal_fl.config import SitePolicy
    from multimodal_fl.federated.disclosure import DisclosureGate, SiteRefused
    from multimodal_fl.federated.protocol import pack_document

    log = tmp_path / EGRESS_LOG
    gate = DisclosureGate("a", SitePolicy(), config_min_cell=10, egress_log=log)
    good = {"n_patients": 61, "n_positive": None,
            "metrics": {"val": {"auc": {"value": None, "n": None,
                                        "reason": "fewer than 10 patients"}},
                        "test": {"auc": {"value": 0.8, "n": 31, "reason": None}}}}

    def answer(doc: dict[str, Any], metrics: dict[str, float]) -> Reply:
        return gate.release(Request(Kind.PREDICT, 1), lambda r: Reply(
            "a", Kind.PREDICT, 1, metrics=metrics,
            documents={Doc.SITE_METRICS: pack_document(doc)}))

    assert answer(good, {"test/auc": 0.8}).metrics == {"test/auc": 0.8}
    bad_count = {**good, "n_positive": 3}
    bad_split = {**good, "metrics": {"val": {"auc": {"value": 1.0, "n": 2, "reason": None}}}}
    for doc, metrics in ((bad_count, {}), (bad_split, {}), (good, {"val/auc": 1.0})):
        with pytest.raises(SiteRefused, match="withheld: a figure on fewer than 10 patients"):
            answer(doc, metrics)
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["released"] for e in entries] == [True, False, False, False]
    assert "n_positive" in entries[1]["refused"] and "3" not in entries[1]["refused"]


# ------------------------------------------------- the pooled total against the sites' own figures


def _split_frame(n_test: int, n_pos: int, seed: int) -> pd.DataFrame:
    """A predictions table with exactly ``n_pos`` positives among ``n_test`` test patients."""
    frame = _frame(n_test, seed)
    test = (frame["split"] == "test").to_numpy()
    y = frame["label"].to_numpy().copy()
    y[np.flatnonzero(test)] = (np.arange(n_test) < n_pos).astype(int)
    return frame.assign(label=y)


def _capture_totals(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every secure-sum total the server learns (what an honest-but-curious server keeps)."""
    from multimodal_fl.engines import federated as engine

    seen: list[Any] = []
    real = engine.secure_total

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(engine, "secure_total", spy)
    return seen


def _test_positives(site_metrics: dict[str, Any], disclosed: dict[str, Any]) -> list[int]:
    """Every way a site's released figures give its test positives."""
    out = []
    splits = disclosed["splits"]
    if splits["test"]["n_pos"] is not None:
        out.append(splits["test"]["n_pos"])
    if site_metrics["n_positive"] is not None and None not in (splits["train"]["n_pos"],
                                                               splits["val"]["n_pos"]):
        out.append(site_metrics["n_positive"] - splits["train"]["n_pos"]
                   - splits["val"]["n_pos"])
    for cell in disclosed["cells"]:
        if cell["scope"] == "site" and cell["n_pos"] is not None:
            out.append(cell["n_pos"])
    by_attribute: dict[str, list[Any]] = {}
    for cell in disclosed["cells"]:
        if cell["scope"] == "site_subgroup" and cell["metric"] == "auc":
            by_attribute.setdefault(cell["attribute"], []).append(cell["n_pos"])
    out += [sum(v) for v in by_attribute.values() if None not in v]
    for cell in disclosed["cells"]:  # sensitivity = TP / P on the site's test positives
        if cell["scope"] == "site" and cell["metric"] == "sensitivity" and cell["value"]:
            out.append(-1)  # a threshold count on the test positives was released
    return out


def test_the_pooled_total_minus_the_sites_released_counts_gives_no_hidden_count(
    tiny_sites: tuple[Any, Path, dict[str, FusionSite]], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """site_a hides its 4 test positives (min_cell 10); site_b and site_c have 25 and 20. On
    the code before, both released theirs, and the pooled total minus 45 gave site_a's 4."""
    cfg, _, sites = tiny_sites
    frames = {"site_a": _split_frame(40, 4, 1), "site_b": _split_frame(60, 25, 2),
              "site_c": _split_frame(50, 20, 3)}
    totals = _capture_totals(monkeypatch)
    recorders, pooled = _run_predict(cfg, tmp_path, sites, frames, monkeypatch)
    (total,) = totals
    learned = int(total.parts["overall"][len(total.parts["overall"]) // 2:].sum())
    assert learned == 49 and sorted(total.sites) == ["site_a", "site_b", "site_c"]
    for name in ("site_b", "site_c"):
        reply = next(r for r in recorders[name].replies if r.kind == Kind.PREDICT)
        disclosed = reply.document(Doc.DISCLOSED)
        assert disclosed["pooled"] is True
        # the attacker has no released count of this site's test positives to subtract
        assert _test_positives(reply.document(Doc.SITE_METRICS), disclosed) == [], name
        assert not any(k.startswith("test/sensitivity") or k.startswith("test/specificity")
                       for k in reply.metrics)
        assert disclosed["roc"]["tpr"] == [] and disclosed["calibration"]["bins"] == []
        # what is not a count stays: the site's test AUC with its interval
        assert disclosed["splits"]["test"]["metrics"]["auc"]["value"] is not None
    # and the pooled figures show the class counts, from the sum only
    assert pooled["overall"]["n_pos"] == 49


def test_without_pooling_a_site_keeps_its_counts_and_never_joins_a_secure_sum(
    tiny_sites: tuple[Any, Path, dict[str, FusionSite]], tmp_path: Path,
) -> None:
    """The site, not the server, keeps the two apart: counts released => no secure sum."""
    cfg, _, sites = tiny_sites
    site = FusionSite("site_b", cfg, sites["site_b"].data, run_dir=tmp_path)
    first = site.handle(Request(Kind.INIT, 0))
    reply = site.handle(Request(Kind.PREDICT, 1, weights=first.weights,
                                config={"engine": "inprocess"}))
    assert reply.document(Doc.DISCLOSED)["pooled"] is False
    from multimodal_fl.federated.secure_sum import step_request
    from multimodal_fl.federated.site import POOLED_TEST

    with pytest.raises(Exception, match="released its test class counts"):
        site.handle(step_request("advertise", POOLED_TEST, 1))


def test_an_attribute_a_site_keeps_home_is_not_summed_so_no_site_histogram_is_the_rest(
    tiny_sites: tuple[Any, Path, dict[str, FusionSite]], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """site_c's policy keeps subgroup summaries home: it sums its overall histogram only. On
    the code before, the server summed the others' sex levels too, and the overall total minus
    them was site_c's whole fine test histogram."""
    from multimodal_fl.config import SitePolicy

    cfg, _, sites = tiny_sites
    four = {**sites, "site_d": copy.copy(sites["site_a"])}  # three sites sum the levels
    four["site_d"].data = copy.copy(sites["site_a"].data)
    frames = {"site_a": _frame(61, 1), "site_b": _frame(40, 2), "site_c": _frame(36, 3),
              "site_d": _frame(45, 4)}
    real_init = FusionSite.__init__

    def init(self: FusionSite, name: str, *args: Any, **kwargs: Any) -> None:
        if name == "site_c":
            kwargs["policy"] = SitePolicy(subgroup_summaries=False)
        real_init(self, name, *args, **kwargs)

    monkeypatch.setattr(FusionSite, "__init__", init)
    totals = _capture_totals(monkeypatch)
    _, pooled = _run_predict(cfg, tmp_path, four, frames, monkeypatch)
    (total,) = totals
    assert "overall" in total.parts and "site_c" in total.contributors["overall"]
    assert not [p for p in total.parts if "=" in p]  # no level of any attribute summed
    assert "send no 'sex' levels" in total.left_out["sex=female"]
    assert pooled["overall"]["auc"]["value"] is not None


SEX_LAYOUT = ["sex=(missing)", "sex=(other)", "sex=female", "sex=male", "sex=other",
              "sex=unknown"]


def _without_sex_layout(replies: list[Reply], text: str) -> str:
    """``text`` less the secure sum's ``sex`` part names, once every advertised layout is
    shown to name all of the task's sex levels (the same at every site, so the names say
    nothing of a site's patients; a partial layout keeps its names in the text)."""
    for reply in replies:
        if Doc.SECURE_SUM in reply.documents:
            parts = [str(p) for p in reply.document(Doc.SECURE_SUM).get("parts") or []]
            sex = sorted(p for p in parts if p.startswith("sex="))
            if sex and sex != SEX_LAYOUT:
                return text
    return text.replace("sex=unknown", "")


def test_every_attribute_summed_adds_up_to_the_whole(
    tiny_sites: tuple[Any, Path, dict[str, FusionSite]], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the server learns of the parts leaves nothing by subtraction: for each attribute
    it sums, its levels add up to the overall total. Both attributes' levels are the task's,
    laid out in full at every site, so site_a's one "unknown" patient is summed under its own
    level (a pooled level of 1, not shown: ``pooled_from_counts``) instead of taking ``sex``
    out of the sum as a level held by one site did."""
    cfg, _, sites = tiny_sites
    frames = {"site_a": _frame(61, 1, unknown=True), "site_b": _frame(40, 2),
              "site_c": _frame(36, 3)}
    totals = _capture_totals(monkeypatch)
    _run_predict(cfg, tmp_path, sites, frames, monkeypatch)
    (total,) = totals
    attributes = {p.split("=", 1)[0] for p in total.parts if "=" in p}
    assert attributes == {"age_band", "sex"}
    assert sorted(p for p in total.parts if p.startswith("sex=")) == SEX_LAYOUT
    assert sorted(total.contributors["sex=unknown"]) == sorted(frames)
    for a in attributes:
        rest = total.parts["overall"] - sum(v for p, v in total.parts.items()
                                            if p.startswith(a + "="))
        assert not rest.any(), a


def test_no_level_held_by_fewer_than_min_cell_patients_is_named_off_the_site(
    tiny_sites: tuple[Any, Path, dict[str, FusionSite]], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The attack: ``evaluation.sensitive: [age]`` made one cell per test patient, labelled with
    that patient's exact age, in the disclosed documents, the disparities' groups, the secure
    sum's part names, the pooled subgroups and the report. Now a level leaves only when the
    site's test split holds ``min_cell`` patients with it; the rest form one unnamed group."""
    from multimodal_fl.evaluation.report import write_frame_report

    cfg, _, sites = tiny_sites
    cfg = cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(
        update={"sensitive": ["sex", "age"]})})  # past the config check, as a site sees it
    rng = np.random.default_rng(0)
    frames = {name: _frame(n, seed, unknown=name == "site_a").assign(
        age=lambda d: rng.normal(60.0, 12.0, len(d)))
        for name, n, seed in (("site_a", 61, 1), ("site_b", 40, 2), ("site_c", 36, 3))}
    recorders, pooled = _run_predict(cfg, tmp_path, sites, frames, monkeypatch)
    left: list[str] = [json.dumps(pooled)]
    for recorder in recorders.values():
        for reply in recorder.replies:
            left += [*reply.documents.values(), *reply.metrics, *reply.arrays, *reply.local_keys]
    left += [p.read_text() for p in (tmp_path / "sites").glob("*/egress.jsonl")]
    report = pd.concat([f.assign(site=s) for s, f in frames.items()], ignore_index=True)
    json_path, html_path = write_frame_report(report, tmp_path / "report", sensitive=["sex", "age"],
                                              min_cell=10, n_boot=0, threshold=0.5)
    left += [json_path.read_text(), html_path.read_text()]
    text = _without_sex_layout([r for rec in recorders.values() for r in rec.replies],
                               "\n".join(left))
    ages = [a for f in frames.values() for a in f["age"]]
    assert not [a for a in ages if str(a) in text or f"{a:.4f}" in text]
    assert "unknown" not in text.replace("unknown version", "")  # one patient of sex unknown
    # every level that left is held by at least min_cell of the site's test patients
    for name, recorder in recorders.items():
        test = frames[name][frames[name]["split"] == "test"]
        doc = next(r for r in recorder.replies if r.kind == Kind.PREDICT).document(Doc.DISCLOSED)
        for c in doc["cells"]:
            if c["attribute"] is not None and c["group"] != UNNAMED:
                assert (test[c["attribute"]].astype(str) == c["group"]).sum() >= 10, c
        assert any("level(s) held by fewer than 10" in n for n in doc["notes"])
    for a, levels in pooled["subgroups"].items():
        assert set(levels) <= {UNNAMED, *{str(v) for f in frames.values() for v in f[a]}}
        assert a != "age" or set(levels) <= {UNNAMED}


# ------------------------------------------------- level names: the gate's backstop


def _gate_reply(gate: Any, kind: Kind, documents: dict[str, Any]) -> Reply:
    from multimodal_fl.federated.protocol import pack_document

    return gate.release(Request(kind, 1), lambda r: Reply(
        "a", kind, 1, documents={k: pack_document(v) for k, v in documents.items()}))


def test_the_gate_withholds_a_level_named_without_min_cell_patients(tmp_path: Path) -> None:
    """The backstop, on replies built by hand: a level held by one test patient ("unknown")
    does not leave in a cell, a disparity's groups or a secure sum's part name, with or without
    a count beside it; "(other)" and a level the site holds 30 of do (non-vacuity)."""
    from multimodal_fl.config import SitePolicy
    from multimodal_fl.federated.disclosure import DisclosureGate, SiteRefused

    log = tmp_path / EGRESS_LOG
    census = {"sex": {"female": 30, "male": 29, "unknown": 1}}
    gate = DisclosureGate("a", SitePolicy(), config_min_cell=10, egress_log=log,
                          census=lambda: census)

    def cell(group: str, n: int | None) -> dict[str, Any]:
        return {"scope": "site_subgroup", "attribute": "sex", "group": group, "n": n}

    def disparity(*groups: str) -> dict[str, Any]:
        return {"attribute": "sex", "groups_used": ["female", "male"],
                "groups_suppressed": list(groups)}

    ok = {Doc.DISCLOSED: {"cells": [cell("female", None), cell(UNNAMED, None)],
                          "disparities": [disparity(UNNAMED)]}}
    assert _gate_reply(gate, Kind.PREDICT, ok).documents  # the pooled form: no n, census backs
    parts = {Doc.SECURE_SUM: {"parts": ["overall", "sex=female", f"sex={UNNAMED}",
                                        "d/head.weight", "w/head"], "widths": [1] * 5}}
    assert _gate_reply(gate, Kind.SECURE_SUM, parts).documents
    evaluation = {Doc.EVALUATION: {"subgroups": {"sex": {"female": {"n": 30}}}}}
    assert _gate_reply(gate, Kind.PREDICT, evaluation).documents
    bad = [
        (Kind.PREDICT, {Doc.DISCLOSED: {"cells": [cell("unknown", None)]}}),
        # a count beside the name does not back it where the site's own count says otherwise
        (Kind.PREDICT, {Doc.DISCLOSED: {"cells": [cell("unknown", 12)]}}),
        (Kind.PREDICT, {Doc.DISCLOSED: {"disparities": [disparity("unknown")]}}),
        (Kind.PREDICT, {Doc.EVALUATION: {"subgroups": {"sex": {"unknown": {"n": None}}}}}),
        (Kind.SECURE_SUM, {Doc.SECURE_SUM: {"parts": ["overall", "sex=unknown"],
                                            "widths": [1, 1]}}),
        # a level the site has no patient of at all
        (Kind.PREDICT, {Doc.DISCLOSED: {"cells": [cell("other-sex", 40)]}}),
    ]
    for kind, docs in bad:
        with pytest.raises(SiteRefused, match="a level named without 10 test patients") as err:
            _gate_reply(gate, kind, docs)
        assert "unknown" not in str(err.value) and "other-sex" not in str(err.value)
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["released"] for e in entries] == [True] * 3 + [False] * len(bad)
    assert "unknown" not in log.read_text()
    # without a census (an attribute the site does not count), the count beside the name backs
    bare = DisclosureGate("a", SitePolicy(), config_min_cell=10)
    assert _gate_reply(bare, Kind.PREDICT, {Doc.DISCLOSED: {"cells": [cell("x", 12)]}})
    with pytest.raises(SiteRefused, match="a level named without"):
        _gate_reply(bare, Kind.PREDICT, {Doc.DISCLOSED: {"cells": [cell("x", None)]}})


def test_the_gate_lets_a_declared_attribute_into_a_secure_sum_only_laid_out_in_full(
        tmp_path: Path) -> None:
    """``sex``'s levels are the task's: a secure sum's layout may name them all, the one
    patient of sex "unknown" included, because every site names them all; a layout naming
    only the levels the site holds (which tells that it holds one "unknown" patient) is
    withheld, and outside the secure sum the census still rules (non-vacuity)."""
    from multimodal_fl.config import SitePolicy
    from multimodal_fl.federated.disclosure import DisclosureGate, SiteRefused

    census = {"sex": {"female": 30, "male": 29, "unknown": 1}}
    gate = DisclosureGate("a", SitePolicy(), config_min_cell=10, egress_log=tmp_path / "log",
                          census=lambda: census,
                          declared={"sex": ("female", "male", "other", "unknown")})

    def advert(parts: list[str]) -> dict[str, Any]:
        return {Doc.SECURE_SUM: {"parts": parts, "widths": [1] * len(parts)}}

    assert _gate_reply(gate, Kind.SECURE_SUM, advert(["overall", *SEX_LAYOUT])).documents
    for partial in (["overall", "sex=female", "sex=male", "sex=unknown"],
                    ["overall", *SEX_LAYOUT[:-1]]):
        with pytest.raises(SiteRefused, match="not its whole layout"):
            _gate_reply(gate, Kind.SECURE_SUM, advert(partial))
    cell = {"scope": "site_subgroup", "attribute": "sex", "group": "unknown", "n": None}
    with pytest.raises(SiteRefused, match="a level named without 10 test patients"):
        _gate_reply(gate, Kind.PREDICT, {Doc.DISCLOSED: {"cells": [cell]}})


def test_a_builder_that_forgets_the_naming_rule_gets_no_level_past_the_gate(
    tiny_sites: tuple[Any, Path, dict[str, FusionSite]], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The attack: the document builders and the secure sum's parts skip the naming rule, so
    site_a's one patient of sex "unknown" is named in its cells, its disparity's groups and its
    secure-sum part "sex=unknown". The gate withholds site_a's predict reply and its advertise
    reply; the other sites, and site_a on the untouched code (non-vacuity, its census carried
    through a site rebuilt per message as on Flower), still release."""
    from multimodal_fl.evaluation import disclosed as disclosed_module
    from multimodal_fl.evaluation import histograms as histograms_module
    from multimodal_fl.federated.disclosure import SiteRefused
    from multimodal_fl.federated.secure_sum import step_request
    from multimodal_fl.federated.site import POOLED_TEST

    cfg, _, sites = tiny_sites
    frames = {"site_a": _frame(61, 1, unknown=True), "site_b": _frame(40, 2),
              "site_c": _frame(36, 3)}
    # non-vacuity: the rule kept, the pooled form's subgroup names leave without a count
    recorders, pooled = _run_predict(cfg, tmp_path / "kept", sites, frames, monkeypatch,
                                     fresh=("site_a",))
    assert all(any(r.kind == Kind.PREDICT for r in rec.replies) for rec in recorders.values())
    assert sorted(pooled["overall"]["sites"]) == sorted(frames)  # site_a advertised its parts
    doc = next(r for r in recorders["site_a"].replies if r.kind == Kind.PREDICT)
    assert doc.document(Doc.DISCLOSED)["pooled"] is True
    assert any(c["group"] == UNNAMED for c in doc.document(Doc.DISCLOSED)["cells"])

    def unnamed(values: Any, *, min_cell: int) -> tuple[Any, int]:
        col = pd.Series(np.asarray(values, dtype=object))
        return col.where(col.notna(), "(missing)").astype(str).to_numpy(dtype=str), 0

    monkeypatch.setattr(disclosed_module, "name_test_levels",
                        lambda frame, attributes, *, min_cell: (frame, []))
    monkeypatch.setattr(histograms_module, "named_levels", unnamed)
    # and the secure sum's builder forgets that sex's levels are laid out in full at every site
    monkeypatch.setattr(site_module, "declared_levels", lambda task, attributes: {})
    recorders, _ = _run_predict(cfg, tmp_path / "forgot", sites, frames, monkeypatch)
    assert not [r for r in recorders["site_a"].replies if r.kind == Kind.PREDICT]
    assert [r for r in recorders["site_b"].replies if r.kind == Kind.PREDICT]
    site_a = recorders["site_a"].site
    assert "sex=unknown" in site_a.secure.held[POOLED_TEST].parts  # the builder's slip
    with pytest.raises(SiteRefused, match="a level named without 10 test patients"):
        site_a.handle(step_request("advertise", POOLED_TEST, 1))
    replies = [r for rec in recorders.values() for r in rec.replies]
    left = [d for r in replies for d in r.documents.values()]
    left += [p.read_text() for p in (tmp_path / "forgot" / "sites").glob("*/egress.jsonl")]
    text = _without_sex_layout(replies, "\n".join(left))
    assert "unknown" not in text.replace("unknown version", "")
