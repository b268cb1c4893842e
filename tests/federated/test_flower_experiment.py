"""The real fusion experiment on a Flower loopback deployment equals the in-process engine.

One SuperLink and three SuperNodes (one per site of the tiny generated COVID-19 cohort) start on
free loopback ports (telemetry and runtime dependency installation off, via
:func:`multimodal_fl.federated.flower.run_loopback`, which is what ``mmfl train --engine flower``
runs). ``flwr run`` submits the experiment's app (``flower_jobs.experiment_job`` /
``experiment_site``, site workers on) for two rounds; the run directory it writes must hold the
same ``model.safetensors`` as ``run_federated_experiment`` in this process with the same seed,
bit for bit, and the same round history, per-site predictions and pooled test figures (a
secure sum of the sites' histograms over the deployment). The SuperNodes write their
patient-level files into a folder of their own (the hospitals'), so the server's run directory
holds no ``sites/``, and the report built from it alone equals the in-process run's.

The same deployment is the egress audit's Flower half (:mod:`tests.egress`; the in-process half,
with the PCA stage and the local-only job, is ``tests/test_egress_audit.py``): the server job
records every reply it gets over the Grid (``tests.egress:recording_experiment_job``), and
those replies, like the in-process run's, pass every content check; each SuperNode's
``egress.jsonl`` says message by message what the server got, its released entries name only
fields declared for their kind, and it logs the same messages as the in-process sites' logs.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("flwr")
pytest.importorskip("torch")

from safetensors.numpy import load_file

from multimodal_fl.config import ExperimentConfig, load_config
from multimodal_fl.data.cohort import build_cohorts
from multimodal_fl.engines.federated import inprocess_federation, run_federated_experiment
from multimodal_fl.engines.flower_jobs import experiment_run_config
from multimodal_fl.evaluation.report import build_report
from multimodal_fl.federated.flower import FlowerRunError, run_loopback
from multimodal_fl.training import SiteData, build_model, load_site_data
from tests.egress import (
    RECORDING_FILE,
    Crossing,
    Known,
    Recorder,
    audit,
    cohort_secrets,
    egress_findings,
    load_crossings,
    log_name_findings,
    model_shapes,
    patient_values,
    read_egress,
    split_classes,
)

REPO = Path(__file__).resolve().parents[2]
#: Round fields that depend on the clock or on the process, not on the computation.
TIMING_FIELDS = ("seconds", "server_seconds")
#: Egress-log fields that depend on the clock or on random masks, not on what was released.
LOG_VOLATILE = ("time", "bytes")


def _rounds(run_dir: Path) -> list[dict[str, Any]]:
    doc = json.loads((run_dir / "metrics.json").read_text())
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in doc["rounds"]]


@pytest.mark.flower
@pytest.mark.slow
@pytest.mark.timeout(660)
def test_fusion_experiment_on_loopback_flower_equals_in_process(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    """SuperLink + 3 SuperNodes, 2 rounds of the real experiment: the in-process model, exactly."""
    # 40 % of each site's patients in test and 30 % in validation, so both secure sums (the
    # pooled test figures, the recalibration's validation histograms) have sites to sum
    cfg = load_config(tiny_config("covid_oxygen", evaluation={"min_cell": 5},
                                  training={"split": {"train": 0.3, "val": 0.3, "test": 0.4}}))
    assert len(cfg.sites) == 3, "the tiny COVID-19 cohort should have three sites"
    assert cfg.federated.rounds == 2
    assert cfg.training.num_threads == 1  # run_federated_experiment and torch-threads use it

    started = time.monotonic()
    cohorts = build_cohorts(cfg)
    data = load_site_data(cfg, tmp_path / "inprocess", cohorts=cohorts)
    recorded = Recorder(inprocess_federation(cfg, tmp_path / "inprocess", data=data))
    reference = run_federated_experiment(cfg, tmp_path / "inprocess",
                                         federation=recorded).run_dir  # type: ignore[arg-type]
    in_process_s = time.monotonic() - started

    run_dir = tmp_path / "flower"
    hospitals = tmp_path / "hospitals"  # the SuperNodes' own files, apart from the server's
    run_config = experiment_run_config(cfg, run_dir=run_dir, site_out=hospitals,
                                       site_worker=True)
    assert run_config["site-worker"] is True and run_config["torch-threads"] == 1
    # the experiment's server job, recording what crosses to the server (the egress audit)
    run_config["server-factory"] = "tests.egress:recording_experiment_job"
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    sites = {s.name: Path(s.path) for s in cfg.sites}
    started = time.monotonic()
    try:  # starts and stops every process (process groups killed on the way out)
        # 560 s: the predict stage's secure sum adds four messages per site, each a ClientApp
        # process start (287 s in all on a 2-core machine at load 7), and recalibration five
        # more (calibrate, the validation secure sum): 456 s at load 9
        run_loopback(sites, run_config, tmp_path / "flower_work", timeout=560,
                     env={"PYTHONPATH": pythonpath})
    except FlowerRunError as exc:
        pytest.fail(str(exc))
    flower_s = time.monotonic() - started
    print(f"in-process run {in_process_s:.1f} s; Flower loopback run (start, 2 rounds, predict, "
          f"stop) {flower_s:.1f} s")

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["engine"] == "flower"
    assert metrics["completed_rounds"] == 2
    assert sorted(metrics["sites"]) == sorted(sites)
    assert all(sorted(r["replied"]) == sorted(sites) for r in metrics["rounds"])

    a = load_file(str(reference / "model.safetensors"))
    b = load_file(str(run_dir / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for key, value in a.items():
        got = b[key]
        assert got.dtype == value.dtype and got.shape == value.shape, key
        assert np.asarray(got).tobytes() == np.asarray(value).tobytes(), (
            f"{key} differs from the in-process engine's"
        )
    assert _rounds(run_dir) == _rounds(reference)
    for name in sites:
        flower_rows = (hospitals / "sites" / name / "predictions.csv").read_text()
        assert flower_rows == (reference / "sites" / name / "predictions.csv").read_text(), name
    # the pooled test figures: the secure sum over the deployment equals the in-process one
    ref_pooled = json.loads((reference / "metrics.json").read_text())["pooled_from_histograms"]
    assert ref_pooled["overall"]["auc"]["value"] is not None
    assert metrics["pooled_from_histograms"] == ref_pooled
    # the recalibration: the same decision and map over the deployment as in process. On this
    # cohort site_c's validation split has no positive, so its class counts are released and
    # it does not join the validation secure sum; with two sites left the sum is refused on
    # both engines, and the fit falls back to the disclosed histograms (or none), said so
    ref_recal = json.loads((reference / "metrics.json").read_text())["recalibration"]
    recal = metrics["recalibration"]
    assert {k: v for k, v in recal.items() if k not in ("a", "b")} == {
        k: v for k, v in ref_recal.items() if k not in ("a", "b")}
    if ref_recal.get("applied"):
        assert (recal["a"], recal["b"]) == pytest.approx((ref_recal["a"], ref_recal["b"]),
                                                         abs=1e-9)
    assert "secure sum" in json.dumps(ref_recal)  # the sum was tried, its outcome named
    kinds = [json.loads(line)["kind"] for line in
             (hospitals / "sites" / "site_a" / "egress.jsonl").read_text().splitlines()]
    ref_kinds = [json.loads(line)["kind"] for line in
                 (reference / "sites" / "site_a" / "egress.jsonl").read_text().splitlines()]
    assert kinds.count("calibrate") == ref_kinds.count("calibrate") == 1
    assert kinds.count("secure_sum") == ref_kinds.count("secure_sum") >= 4
    # the egress audit, before the in-process run's sites/ is removed below
    _audit_both_engines(cfg, data, cohorts, {
        "in-process": (recorded.crossings, reference),
        "Flower": (load_crossings(tmp_path / RECORDING_FILE), hospitals)})
    _report_from_the_server_dir_equals_in_process(run_dir, reference, sorted(sites))


def _audit_both_engines(cfg: ExperimentConfig, data: dict[str, SiteData], cohorts: Any,
                        runs: dict[str, tuple[list[Crossing], Path]]) -> None:
    """Every reply of both engines passes every content check; each site's egress log says
    what the server got, names only declared fields, and logs what the in-process site logs."""
    ev = cfg.evaluation
    scores = [pd.read_csv(folder / "sites" / s / "predictions.csv")["score"].tolist()
              for _, folder in runs.values() for s in data]
    shapes, statistics = model_shapes(build_model(cfg, data[sorted(data)[0]]))
    known = Known(cohort_secrets(cohorts), patient_values(data, scores), shapes, statistics,
                  split_classes(data))
    logs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for engine, (crossings, folder) in runs.items():
        assert {c.site for c in crossings} == set(data), engine
        found = audit(crossings, known, cfg_min_cell=ev.min_cell, n_bins=ev.histogram_bins)
        assert found == {k: [] for k in found}, (engine, found)
        logs[engine] = {s: read_egress(folder / "sites" / s / "egress.jsonl") for s in data}
        for site, log in logs[engine].items():
            mine = [c for c in crossings if c.site == site]
            assert egress_findings(mine, log) == [], (engine, site)
            assert log_name_findings(log) == [], (engine, site)
    for site in data:
        flower, inprocess = ([{k: v for k, v in e.items() if k not in LOG_VOLATILE}
                              for e in logs[engine][site]] for engine in ("Flower", "in-process"))
        assert {e["kind"] for e in flower} == {e["kind"] for e in inprocess}, site
        assert flower == inprocess, site


def _numbers(doc: dict[str, Any], label: str) -> dict[str, Any]:
    """What a one-run report says, its label and folder left out."""
    runs = [{k: v for k, v in r.items() if k not in ("label", "engine", "path", "notes")}
            | {"notes": [n.replace(label, "<run>") for n in r["notes"]]} for r in doc["runs"]]
    cross = [{k: v for k, v in c.items() if k != "model"} for c in doc["cross_site"]["cells"]]
    return {"settings": doc["settings"], "runs": runs, "fairness": doc["fairness"][label],
            "federated_evaluation": doc["federated_evaluation"][label], "cross_site": cross,
            "training": doc["training"][label]}


def _report_from_the_server_dir_equals_in_process(server: Path, reference: Path,
                                                  sites: list[str]) -> None:
    """The Flower server's run directory alone gives the in-process run's report."""
    assert not (server / "sites").exists()  # no patient-level file on the server's side
    assert sorted(p.stem for p in (server / "disclosed").glob("*.json")) == sites
    shutil.rmtree(reference / "sites")  # the in-process run's report needs no sites/ either
    flower_doc, _, _ = build_report([server])
    inprocess_doc, _, _ = build_report([reference])
    assert [r["label"] for r in flower_doc["runs"]] == ["federated (Flower)"]
    got = _numbers(flower_doc, "federated (Flower)")
    assert got == _numbers(inprocess_doc, "federated (in-process)")
    assert {c["site"] for c in got["fairness"]["cells"] if c["scope"] == "site"} == set(sites)
