"""Recalibration on every engine: fitted on the pooled validation split, applied before predict.

Tiny runs of the generated COVID-19 cohort (three sites), with a validation split large enough
(40 %) that every site holds at least ``min_cell`` validation patients and the secure sum of
their histograms goes ahead.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from multimodal_fl.cli import app
from multimodal_fl.config import load_config
from multimodal_fl.engines import run
from multimodal_fl.engines.predict import predict_site
from multimodal_fl.evaluation.disclosed import read_disclosure
from multimodal_fl.evaluation.histograms import fine_counts
from multimodal_fl.evaluation.recalibration import Recalibration, fit_recalibration
from multimodal_fl.evaluation.report import build_report
from multimodal_fl.federated.disclosure import SiteRefused
from multimodal_fl.federated.protocol import Kind, Request

SPLIT = {"train": 0.3, "val": 0.4, "test": 0.3}


def _config(tiny_config: Callable[..., Path], task: str = "covid_oxygen", **evaluation: Any
            ) -> Any:
    return load_config(tiny_config(task, evaluation={"min_cell": 5, **evaluation},
                                   training={"split": SPLIT}))


def _rows(run_dir: Path) -> pd.DataFrame:
    return pd.concat([pd.read_csv(p).assign(site=p.parent.name)
                      for p in sorted(run_dir.glob("sites/*/predictions.csv"))],
                     ignore_index=True)


def test_a_site_that_releases_its_validation_counts_does_not_join_the_sum(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    """The COVID-19 tiny cohort's site_c has no validation positive and 7 negatives: both
    counts may leave (at evaluate and predict), so its histogram must not be in the sum (the
    total minus it would be the other two sites'); two sites are too few, and it says so."""
    from multimodal_fl.federated.secure_sum import step_request
    from multimodal_fl.federated.site import POOLED_VALIDATION, fusion_sites

    cfg = _config(tiny_config)
    sites = fusion_sites(cfg, tmp_path / "run")
    weights = sites["site_c"].handle(Request(Kind.INIT, 0)).weights
    for name, site in sites.items():
        site.handle(Request(Kind.CALIBRATE, 1, weights=weights))
        if name == "site_c":
            with pytest.raises(SiteRefused, match="validation class counts are released"):
                site.handle(step_request("advertise", POOLED_VALIDATION, 1))
        else:
            assert site.handle(step_request("advertise", POOLED_VALIDATION, 1)).arrays
    out = run(cfg, "inprocess", out_dir=tmp_path / "fed", report=False)
    assert "refused: a secure sum needs at least 3 sites" in json.dumps(
        out.metrics["recalibration"])


def test_a_federated_run_recalibrates_on_the_secure_sum_of_validation_histograms(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    # the Alzheimer's tiny cohort: each site's validation split (8 patients, 2-3 positive)
    # hides its class counts, so all three join the sum (a site that releases them does not)
    # the intercept (one parameter) is pinned: the tiny cohort's slope is anyone's guess
    cfg = _config(tiny_config, task="alzheimers", recalibrate="intercept")
    out = run(cfg, "inprocess", out_dir=tmp_path / "fed", report=False)
    doc = out.metrics["recalibration"]
    assert doc["applied"] and doc["method"] == "intercept" == cfg.evaluation.recalibrate
    assert doc["source"].startswith("the secure sum of the validation histograms of 3 sites")
    assert "counts" not in json.dumps(doc)  # the histogram stays with the server
    fitted = Recalibration.from_dict(doc)
    rows = _rows(out.run_dir)
    # the server's fit is the fit on the sites' validation scores pooled: the same counts
    val = rows[rows["split"] == "val"]
    counts = fine_counts(val["label"], val["score_raw"], cfg.evaluation.histogram_bins)
    half = counts.size // 2
    direct = fit_recalibration(counts[:half], counts[half:], method="intercept")
    assert (fitted.a, fitted.b) == pytest.approx((direct.a, direct.b), abs=1e-9)
    assert fitted.n == len(val)
    # every site wrote both scores, the recalibrated one by the server's map
    assert list(rows.columns[:5]) == ["patient_id", "split", "label", "score", "score_raw"]
    assert rows["score"].to_numpy() == pytest.approx(fitted.apply(rows["score_raw"]), abs=1e-12)
    assert not np.allclose(rows["score"], rows["score_raw"])
    # each site's document: before and after on its test split
    for site in ("site_a", "site_b", "site_c"):
        disclosed = read_disclosure(json.loads(
            (out.run_dir / "disclosed" / f"{site}.json").read_text()))
        rc = disclosed.recalibration
        assert rc is not None and rc.applied and rc.source == fitted.source
        test = rows[(rows["site"] == site) & (rows["split"] == "test")]
        if rc.after.n is not None:
            assert rc.after.mean_score == pytest.approx(test["score"].mean())
            assert rc.before.mean_score == pytest.approx(test["score_raw"].mean())
    # the run keeps it for mmfl predict, which scores as the run did
    assert json.loads((out.run_dir / "recalibration.json").read_text())["b"] == fitted.b
    site_a = cfg.sites[0]
    scored = predict_site(out.run_dir, site_a.path, site_name=site_a.name)
    mine = rows[rows["site"] == site_a.name].set_index("patient_id")
    got = scored.frame.set_index("patient_id").loc[mine.index]
    assert got["score"].to_numpy() == pytest.approx(mine["score"].to_numpy(), abs=1e-9)
    assert got["score_raw"].to_numpy() == pytest.approx(mine["score_raw"].to_numpy(), abs=1e-9)
    assert scored.recalibration.startswith("intercept")
    # the report shows before and after
    report, _, _ = build_report([out.run_dir])
    section = report["recalibration"]["federated (in-process)"]
    assert section["run"]["applied"] and {r["site"] for r in section["sites"]} == {
        "site_a", "site_b", "site_c"}


def test_the_closed_test_runs_end_to_end_with_the_map_it_chose(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    """``recalibrate: closed_test``: the server's choice is the closed test on the pooled
    validation counts, every site applies it, and ``mmfl predict`` scores as the run did."""
    cfg = _config(tiny_config, task="alzheimers", recalibrate="closed_test")
    out = run(cfg, "inprocess", out_dir=tmp_path / "fed", report=False)
    doc = out.metrics["recalibration"]
    assert doc["applied"] and doc["method"] in ("original", "intercept", "platt")
    assert "closed test at 0.05" in doc["source"]
    rows = _rows(out.run_dir)
    val = rows[rows["split"] == "val"]
    counts = fine_counts(val["label"], val["score_raw"], cfg.evaluation.histogram_bins)
    half = counts.size // 2
    direct = fit_recalibration(counts[:half], counts[half:], method="closed_test")
    fitted = Recalibration.from_dict(doc)
    assert fitted.method == direct.method
    assert (fitted.a, fitted.b) == pytest.approx((direct.a, direct.b), abs=1e-9)
    assert rows["score"].to_numpy() == pytest.approx(fitted.apply(rows["score_raw"]), abs=1e-12)
    site_a = cfg.sites[0]
    scored = predict_site(out.run_dir, site_a.path, site_name=site_a.name)
    mine = rows[rows["site"] == site_a.name].set_index("patient_id")
    got = scored.frame.set_index("patient_id").loc[mine.index]
    assert got["score"].to_numpy() == pytest.approx(mine["score"].to_numpy(), abs=1e-9)


def test_recalibrate_none_leaves_the_scores_and_says_so(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    out = run(_config(tiny_config, recalibrate="none"), "inprocess", out_dir=tmp_path / "f",
              report=False)
    assert out.metrics["recalibration"] == {"method": "none", "applied": False,
                                            "reason": "evaluation.recalibrate: none"}
    rows = _rows(out.run_dir)
    assert rows["score"].tolist() == rows["score_raw"].tolist()
    assert not (out.run_dir / "recalibration.json").exists()
    doc = json.loads((out.run_dir / "disclosed" / "site_a.json").read_text())
    assert doc["recalibration"]["applied"] is False


def test_with_two_sites_the_disclosed_validation_histograms_stand_in(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    """No secure sum with two sites: the selected round's disclosed histograms, or nothing."""
    cfg = _config(tiny_config)
    cfg = cfg.model_copy(update={"sites": cfg.sites[:2]})
    out = run(cfg, "inprocess", out_dir=tmp_path / "two", report=False)
    doc = out.metrics["recalibration"]
    why = "refused: a secure sum needs at least 3 sites"
    if doc["applied"]:
        assert doc["source"].startswith("the counts-only validation histograms of round")
        assert why in doc["source"]
    else:
        assert why in doc["reason"]


def test_the_baselines_recalibrate_on_their_own_validation_splits(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    # the model this check was written for: with the tabular linear path (the default since
    # the tabular_linear benchmark) the tiny cohort's 23 validation patients give a negative
    # slope, and the fit falls back to an intercept (b = 1), which the check must not accept
    cfg = load_config(tiny_config("covid_oxygen", evaluation={"min_cell": 5},
                                  training={"split": SPLIT},
                                  modalities={"tabular": {"hidden": [8], "embed_dim": 8,
                                                          "linear_path": False}}))
    cfg = cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(
        update={"recalibrate": "platt"})})
    central = run(cfg, "centralized", out_dir=tmp_path / "c", report=False)
    doc = central.metrics["recalibration"]
    assert doc["applied"] and doc["source"].startswith("the pooled validation split")
    assert doc["method"] == "platt" and doc["b"] != 1.0
    rows = _rows(central.run_dir)
    fitted = Recalibration.from_dict(doc)
    assert rows["score"].to_numpy() == pytest.approx(fitted.apply(rows["score_raw"]), abs=1e-12)
    local = run(cfg, "local", out_dir=tmp_path / "l", report=False)
    per_site = local.metrics["recalibration"]["sites"]
    assert set(per_site) == {"site_a", "site_b", "site_c"}
    for site, entry in per_site.items():
        home = local.run_dir / "sites" / site / "recalibration.json"
        assert home.is_file() == bool(entry["applied"])
        if not entry["applied"]:
            assert "fewer than 5 patients of a class" in entry["reason"]
        disclosed = json.loads((local.run_dir / "disclosed" / f"{site}.json").read_text())
        assert disclosed["recalibration"]["applied"] == entry["applied"]
        assert "a" not in disclosed["recalibration"]  # the site's parameters stay home


def test_mmfl_train_says_what_was_fitted_on_what(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    config = tiny_config("covid_oxygen", evaluation={"min_cell": 5, "recalibrate": "intercept"},
                         training={"split": SPLIT})
    result = CliRunner().invoke(app, ["train", str(config), "--engine", "centralized", "--out",
                                      str(tmp_path / "c"), "--quiet", "--no-report"])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("recalibration:"))
    assert line.startswith("recalibration: intercept, score' = expit(")
    assert "fitted on the pooled validation split" in " ".join(result.output.split())


def test_the_console_shows_a_coarsened_pooled_auc_with_its_bounds() -> None:
    """A pooled AUC from coarsened counts has no interval; its binned value alone can sit far
    from the patient-level AUC (OASIS-1, one 47-patient site: 0.959 printed, 0.920 exact), so
    the console shows the bounds the exact AUC is guaranteed to lie in."""
    from multimodal_fl.cli import _auc_text

    coarse = {"value": 0.9591854960795866, "lower": 0.5, "upper": 1.0}
    text = _auc_text(coarse)
    assert text.startswith("0.959") and "between 0.500 and 1.000" in text
    assert _auc_text({"value": 0.7, "lower": 0.699, "upper": 0.704}) == "0.700"
    assert _auc_text({"value": 0.7, "lo": 0.6, "hi": 0.8, "lower": 0.5, "upper": 0.9}) == (
        "0.700 [0.600, 0.800]")


@pytest.mark.parametrize("kept", [False, True])
def test_a_rerun_on_another_grid_over_fewer_sites_is_refused_with_a_state_dir(
    tiny_config: Callable[..., Path], tmp_path: Path, kept: bool
) -> None:
    """The rebinning attack on real sites: four Alzheimer's sites (the tiny cohort's three
    and a copy of one under a fourth name) hold their validation histograms of one model on
    100 bins and the server sums them over all four; a rerun with
    ``evaluation.histogram_bins: 50`` (the same weights) is summed over three. Without a
    ``state_dir`` the server merges the first total onto 50 bins and subtracts the second:
    the fourth site's histogram exactly. With one in every site's policy the three refuse,
    naming the grid."""
    import shutil

    import yaml

    from multimodal_fl.federated.inprocess import InProcessFederation
    from multimodal_fl.federated.pooling import secure_total
    from multimodal_fl.federated.site import POOLED_VALIDATION, fusion_sites
    from multimodal_fl.training import predict

    raw = yaml.safe_load(Path(tiny_config("alzheimers", evaluation={"min_cell": 5},
                                          training={"split": SPLIT})).read_text())
    for entry in raw["sites"]:
        shutil.copytree(entry["path"], tmp_path / "sites" / entry["name"])
        entry["path"] = str(tmp_path / "sites" / entry["name"])
    first = raw["sites"][0]
    shutil.copytree(first["path"], tmp_path / "sites" / "site_d")
    raw["sites"].append({"name": "site_d", "path": str(tmp_path / "sites" / "site_d")})
    for entry in raw["sites"]:
        if kept:
            (Path(entry["path"]) / "policy.yaml").write_text(
                yaml.safe_dump({"state_dir": "state"}))

    def held(n_bins: int, out: str) -> InProcessFederation:
        raw["evaluation"]["histogram_bins"] = n_bins
        path = tmp_path / f"bins{n_bins}.yaml"
        path.write_text(yaml.safe_dump(raw))
        sites = fusion_sites(load_config(path), tmp_path / out)
        for site in sites.values():
            site.handle(Request(Kind.CALIBRATE, 1, weights=weights))
        return InProcessFederation(sites)

    weights = fusion_sites(load_config(tiny_config("alzheimers")), tmp_path / "w")[
        "site_a"].handle(Request(Kind.INIT, 0)).weights
    names = [e["name"] for e in raw["sites"]]
    everyone = secure_total(held(100, "run1"), names, POOLED_VALIDATION)
    assert everyone.refused is None
    fewer = secure_total(held(50, "run2"), names[1:], POOLED_VALIDATION)
    if not kept:  # the leak: site_a's histogram on 50 bins, exactly
        total = everyone.parts["overall"].reshape(2, 50, 2).sum(axis=2).ravel()
        site_a = fusion_sites(load_config(tmp_path / "bins50.yaml"), tmp_path / "x")["site_a"]
        val = site_a.data.val
        site_a.handle(Request(Kind.CALIBRATE, 1, weights=weights))
        own = fine_counts(val.labels.numpy().astype(np.int64), predict(site_a.model, val), 50)
        np.testing.assert_array_equal(total - fewer.parts["overall"], own)
        return
    assert fewer.refused is not None and fewer.parts == {}
    assert all("histograms on 100 bins were summed before with 4 sites" in fewer.excluded[s]
               for s in names[1:]), fewer.excluded
