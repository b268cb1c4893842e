"""The real fusion experiment on the session's secure deployment equals the in-process engine.

The session's one loopback deployment (``secure_deployment`` in ``conftest.py``: TLS from
``mmfl flower certs``, SuperNode authentication, the tiny generated COVID-19 cohort's three
sites registered with their own folders, one unregistered SuperNode refused) runs the
experiment's app (``flower_jobs.experiment_job`` / ``experiment_site``, site workers on) for
two rounds with secure aggregation of the model updates (``federated.secure_aggregation``):
the run directory it writes must hold the same ``model.safetensors`` as
``run_federated_experiment`` in this process with the same seed and secure aggregation on, bit
for bit (both engines sum the same quantised integer vectors), and the same round history,
per-site predictions and pooled test figures (a secure sum of the sites' histograms over the
deployment). The SuperNodes write their patient-level files into a folder of their own (the
hospitals'), so the server's run directory holds no ``sites/``, and the report built from it
alone equals the in-process run's.

The same run is the egress audit's Flower half (:mod:`tests.egress`; the in-process half,
with the PCA stage and the local-only job, is ``tests/test_egress_audit.py``): the server job
records every reply it gets over the Grid (``tests.egress:recording_experiment_job``), and
those replies, like the in-process run's, pass every content check; each SuperNode's
``egress.jsonl`` says message by message what the server got, its released entries name only
fields declared for their kind, its fit entries are secured ones (no weights), and it logs the
same messages as the in-process sites' logs. No array the server received in a secured round
equals or correlates with a site's plain update (each site's fit answered again in the clear
in this process gives it).
"""

from __future__ import annotations

import json
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
from multimodal_fl.federated.protocol import Kind
from multimodal_fl.federated.secure_update import SecureAggregation, decode_update, summed_keys
from multimodal_fl.federated.site import fusion_sites
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
    plain_update,
    read_egress,
    secured_update_findings,
    split_classes,
)
from tests.federated.conftest import REGISTERED, SecureDeployment

#: Round fields that depend on the clock or on the process, not on the computation.
TIMING_FIELDS = ("seconds", "server_seconds")
#: Egress-log fields that depend on the clock or on random masks, not on what was released.
#: differ between two runs of one experiment (``run``: its directory, Flower's run id)
LOG_VOLATILE = ("time", "bytes", "run")


def _rounds(run_dir: Path) -> list[dict[str, Any]]:
    doc = json.loads((run_dir / "metrics.json").read_text())
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in doc["rounds"]]


@pytest.mark.flower
@pytest.mark.slow
@pytest.mark.timeout(660)
def test_fusion_experiment_on_the_secure_deployment_equals_in_process(
    tiny_config: Callable[..., Path], tmp_path: Path, secure_deployment: SecureDeployment
) -> None:
    """TLS, registered SuperNodes, 2 secured rounds of the real experiment: the in-process
    model, exactly, and nothing of a site's plain update reaches the server."""
    # 40 % of each site's patients in test and 30 % in validation, so both secure sums (the
    # pooled test figures, the recalibration's validation histograms) have sites to sum
    cfg = load_config(tiny_config("covid_oxygen", evaluation={"min_cell": 5},
                                  training={"split": {"train": 0.3, "val": 0.3, "test": 0.4}},
                                  federated={"min_sites": 3, "secure_aggregation": True}))
    sites = {s.name: Path(s.path) for s in cfg.sites}
    assert tuple(sites) == REGISTERED, "the tiny COVID-19 cohort should have three sites"
    assert sites == secure_deployment.sites  # the registered SuperNodes serve these folders
    assert cfg.federated.rounds == 2 and cfg.federated.secure_aggregation
    assert cfg.training.num_threads == 1  # run_federated_experiment and torch-threads use it

    started = time.monotonic()
    cohorts = build_cohorts(cfg)
    data = load_site_data(cfg, tmp_path / "inprocess", cohorts=cohorts)
    recorded = Recorder(inprocess_federation(cfg, tmp_path / "inprocess", data=data))
    reference = run_federated_experiment(cfg, tmp_path / "inprocess",
                                         federation=recorded).run_dir  # type: ignore[arg-type]
    in_process_s = time.monotonic() - started

    # the server's run directory, and the SuperNodes' own files (the hospitals') apart from it
    run_dir, hospitals = tmp_path / "flower", tmp_path / "hospitals"
    flower_s = _run_on_the_deployment(cfg, secure_deployment, run_dir, hospitals)
    print(f"in-process run {in_process_s:.1f} s; Flower run on the secure deployment "
          f"(2 secured rounds, predict) {flower_s:.1f} s")

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["engine"] == "flower"
    assert metrics["completed_rounds"] == 2
    assert sorted(metrics["sites"]) == sorted(sites)
    assert all(sorted(r["replied"]) == sorted(sites) for r in metrics["rounds"])
    # every round's FedAvg was read from the secure sum of all three sites' updates
    assert [(r["secure"]["sites"], r["secure"]["excluded"]) for r in metrics["rounds"]] == [
        (list(REGISTERED), {})] * 2

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
    _same_recalibration(metrics, reference, hospitals)
    # the egress audit, before the in-process run's sites/ is removed below
    runs = {"in-process": (recorded.crossings, reference),
            "Flower": (load_crossings(tmp_path / RECORDING_FILE), hospitals)}
    _audit_both_engines(cfg, data, cohorts, runs)
    _secured_rounds_send_no_update(cfg, data, tmp_path / "plain", runs)
    _report_from_the_server_dir_equals_in_process(run_dir, reference, sorted(sites))


def _run_on_the_deployment(cfg: ExperimentConfig, secure: SecureDeployment, run_dir: Path,
                           hospitals: Path) -> float:
    """Submit the experiment to the session's deployment, recording what crosses to the
    server; the run directory into ``run_dir``, the SuperNodes' own files (the hospitals')
    into ``hospitals``. Returns the seconds ``flwr run`` took."""
    run_config = experiment_run_config(cfg, run_dir=run_dir, site_out=hospitals,
                                       site_worker=True)
    assert run_config["site-worker"] is True and run_config["torch-threads"] == 1
    assert run_config["min-nodes"] == len(REGISTERED)
    # the experiment's server job, recording what crosses to the server (the egress audit)
    run_config["server-factory"] = "tests.egress:recording_experiment_job"
    # 560 s: the predict stage's secure sum adds four messages per site, each a ClientApp
    # process start (287 s in all on a 2-core machine at load 7), and recalibration five
    # more (calibrate, the validation secure sum): 456 s at load 9; the secured rounds four
    # more per round (the secure sum of the updates): 219 s at load 6
    try:
        result, seconds = secure.submit("experiment", run_config, timeout=560)
    finally:  # the run's site workers hold a model each; the deployment serves on
        left = secure.stop_workers()
    assert left == [], f"site workers still running: {left}"
    assert result.site_nodes == secure.registered  # the registered nodes, only
    return float(seconds)


def _same_recalibration(metrics: dict[str, Any], reference: Path, hospitals: Path) -> None:
    """The recalibration: the same decision and map over the deployment as in process.

    On this cohort site_c's validation split has no positive, so its class counts are
    released and it does not join the validation secure sum; with two sites left the sum is
    refused on both engines, and the fit falls back to the disclosed histograms (or none),
    said so."""
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
        flower_runs = {json.dumps(e["run"], sort_keys=True) for e in logs["Flower"][site]}
        assert len(flower_runs) == 1 and "flower_run_id" in json.loads(flower_runs.pop()), site
        assert {e["run"]["dir"] for e in logs["in-process"][site]} == {
            str(runs["in-process"][1])}, site


def _secured_rounds_send_no_update(cfg: ExperimentConfig, data: dict[str, SiteData], root: Path,
                                   runs: dict[str, tuple[list[Crossing], Path]]) -> None:
    """Every fit of both engines was secured: each site's egress log shows fit replies
    without weights, arrays or metrics, and nothing the server received in a round's fit or
    its secure sum equals or correlates with a site's plain update."""
    for engine, (_, folder) in runs.items():
        for site in data:
            logged = [e for e in read_egress(folder / "sites" / site / "egress.jsonl")
                      if e["kind"] == "fit"]
            assert [(e["round"], e["released"], e["weights"], e["arrays"], e["metrics"])
                    for e in logged] == [(r, True, 0, [], []) for r in (1, 2)], (engine, site)
    # each site's plain update: its in-process fit requests answered again in the clear
    fits = [c for c in runs["in-process"][0] if c.request.kind == Kind.FIT]
    assert sorted((c.request.round, c.site) for c in fits) == [
        (r, s) for r in (1, 2) for s in sorted(data)]
    replay = fusion_sites(cfg, root, data=data)
    updates: dict[int, dict[str, tuple[np.ndarray, dict[str, np.ndarray]]]] = {}
    for c in fits:
        updates.setdefault(c.request.round, {})[c.site] = plain_update(replay[c.site], c.request)
    # the replay gives what the sites summed: round 1's parts, summed and decoded as the
    # server decodes them, are round 2's start bit for bit
    settings = SecureAggregation(clip=cfg.federated.secure_clip)
    weights = {c.request.round: c.request.weights for c in fits if c.site == REGISTERED[0]}
    start, following = weights[1], weights[2]
    held = [parts for _, parts in updates[1].values()]
    total = {k: np.sum([np.asarray(p[k], dtype=np.int64) for p in held], axis=0)
             for k in held[0]}
    n = sum(int(np.asarray(p["n"])[0]) for p in held)
    decoded = decode_update(total, start, settings, max_count=n)
    assert decoded.averaged and decoded.n_samples == n
    for key in summed_keys(start):  # a key no site trained keeps its value (server_step)
        value = decoded.averaged.get(key, start[key])
        assert np.asarray(value).tobytes() == np.asarray(following[key]).tobytes(), key
    for engine, (crossings, _) in runs.items():
        assert secured_update_findings(crossings, updates) == [], engine


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
