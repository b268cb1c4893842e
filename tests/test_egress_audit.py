"""The egress audit: everything that crosses a site's boundary in a full run, checked.

One tiny in-process run of each job goes through a :class:`~tests.egress.Recorder` that keeps
every request and every answer: the federated experiment with the federated PCA stage (``pca``,
``pca_apply``, ``init``, ``moments``, ``info``, two rounds of ``fit`` and ``evaluate``,
``predict``, the ``secure_sum`` of the pooled test figures), the same experiment with secure
aggregation (``fit`` replies without weights, each round's updates summed by ``secure_sum``
steps) and the local-only job with cross-site validation (``pca``, ``local_train``,
``cross_evaluate``, ``predict``, ``secure_sum``). Every reply is checked (:mod:`tests.egress`):

* it carries only the fields :data:`~multimodal_fl.federated.disclosure.DECLARED` for its kind
  (``check_declared``: an undeclared metric, array or document fails);
* its ``weights`` have the keys, shapes and dtypes of the model's ``state_dict()`` (a group
  counted 0 and FedBN's local keys may be absent), and the counts of patients the weights
  carry (the tabular standardiser's per-feature ``count``) are 0 or at least ``min_cell``;
* no patient id and no note text is in any name, document or failure reason;
* the backstop: no released number (metrics, documents, arrays but the secure sum's masked
  ones, the standardiser's mean and scale in the weights) lies within 1e-4 of a patient's
  score or non-integer tabular value unless an entry of :data:`~tests.egress.ALLOW_LIST`
  covers it, each with its condition checked number by number;
* each site's ``egress.jsonl`` has one entry per message, ``released`` exactly when the
  server got a reply, naming what the reply carried; every kind the run used is there.

The data are the tiny sample cohort with two changes that give the checks something to find:
labels alternate within each split (the tiny sites have 1-2 positives per split, so every
figure would be suppressed and nothing would be audited), and one training patient of
``site_a`` is the only one with a value of the first tabular feature (:data:`PLANTED`), the
single-patient feature the ``moments`` rule exists for. Each check has a negative control
below: a planted breach in a real recorded reply that the check must report.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load_file

from multimodal_fl.config import ExperimentConfig, load_config
from multimodal_fl.data.cohort import build_cohorts
from multimodal_fl.engines.baselines import run_local
from multimodal_fl.engines.federated import inprocess_federation, run_federated_experiment
from multimodal_fl.federated.protocol import Kind, Reply, Request, SiteFailure, pack_document
from multimodal_fl.federated.site import POOLED_VALIDATION, FusionSite
from multimodal_fl.pca.stage import apply_pca_stage, fit_pca_stage
from multimodal_fl.training import (
    SiteData,
    build_model,
    load_site_data,
    load_weights,
    predictions_frame,
)
from tests.conftest import write_tiny_config
from tests.egress import (
    Crossing,
    Known,
    Recorder,
    Released,
    Secrets,
    audit,
    backstop_findings,
    class_figure_findings,
    cohort_secrets,
    crossing_texts,
    declared_findings,
    egress_findings,
    log_name_findings,
    model_shapes,
    patient_values,
    read_egress,
    released_numbers,
    split_classes,
    statistic_count_findings,
    text_findings,
    weight_findings,
)

#: The only value of the first tabular feature at ``site_a``: one training patient's.
PLANTED = 0.7318497
#: Half of each site's patients in test: with alternating labels, test cells of 9-10 patients
#: with 4-5 of each class, so figures leave (predict, cross-site, pooled) and are audited.
SPLIT = {"train": 0.3, "val": 0.2, "test": 0.5}
JOBS = ("federated", "local", "secure")
#: The kinds each job must have used (else the audit would miss a stage).
KINDS = {
    "federated": {"pca", "pca_apply", "init", "moments", "info", "fit", "evaluate", "calibrate",
                  "predict", "secure_sum"},
    "local": {"pca", "pca_apply", "local_train", "cross_evaluate", "predict", "secure_sum"},
    "secure": {"pca", "pca_apply", "init", "moments", "info", "fit", "evaluate", "predict",
               "secure_sum"},
}


@dataclass
class Audited:
    """The two recorded runs and what the auditor knows."""

    cfg: ExperimentConfig
    runs: dict[str, tuple[Path, Recorder]]
    known: Known
    data: dict[str, SiteData]

    def crossings(self, job: str | None = None) -> list[Crossing]:
        return [c for name, (_, rec) in self.runs.items() if job in (None, name)
                for c in rec.crossings]

    def first(self, kind: str) -> Crossing:
        return next(c for c in self.crossings() if c.request.kind == kind
                    and isinstance(c.answer, Reply))

    def findings(self, crossings: list[Crossing]) -> dict[str, list[str]]:
        ev = self.cfg.evaluation
        return audit(crossings, self.known, cfg_min_cell=ev.min_cell, n_bins=ev.histogram_bins)


def _audited_data(data: Mapping[str, SiteData]) -> dict[str, SiteData]:
    """Labels alternating within each split; :data:`PLANTED` at one patient of ``site_a``."""
    out = {}
    for name, sd in data.items():
        ds = sd.dataset.subset(list(range(len(sd.dataset))))
        for split in ("train", "val", "test"):
            rows = [i for i, p in enumerate(ds.patient_ids) if sd.splits[p] == split]
            for k, i in enumerate(rows):
                ds.labels[i] = float(k % 2)
        if name == "site_a":
            first = next(i for i, p in enumerate(ds.patient_ids) if sd.splits[p] == "train")
            ds.inputs["tabular"][:, 0] = float("nan")
            ds.inputs["tabular"][first, 0] = PLANTED
        out[name] = dataclasses.replace(sd, dataset=ds, _parts={})
    return out


def _scores(cfg: ExperimentConfig, data: Mapping[str, SiteData],
            runs: Mapping[str, tuple[Path, Recorder]]) -> list[list[float]]:
    """Every patient's score under every model that scored them: each run's predictions at
    home, and every local-only model on every site (the cross-site cells' patients)."""
    scores = [pd.read_csv(run / "sites" / name / "predictions.csv")["score"].tolist()
              for run, _ in runs.values() for name in data]
    projected = apply_pca_stage(data, fit_pca_stage(cfg, data), cfg.federated.pca.modality)
    local = runs["local"][0]
    for owner in data:
        model = build_model(cfg, projected[owner])
        load_weights(model, load_file(str(local / "sites" / owner / "model.safetensors")))
        scores += [predictions_frame(model, sd)["score"].tolist() for sd in projected.values()]
    return scores


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory, tiny_sample: Path, tiny_bert: Path
            ) -> Audited:
    """Both jobs on the same prepared sites, every crossing recorded."""
    root = tmp_path_factory.mktemp("egress_audit")
    cfg = load_config(write_tiny_config(
        root, tiny_sample, tiny_bert, "covid_oxygen",
        training={"steps": 6, "batch_size": 8, "eval_every": 3, "num_threads": 1,
                  "split": SPLIT},
        federated={"rounds": 2, "local_steps": 3, "min_sites": 1,
                   "pca": {"enabled": True, "modality": "text", "n_components": 4}},
        evaluation={"n_boot": 20, "min_cell": 5}))
    cohorts = build_cohorts(cfg)
    data = _audited_data(load_site_data(cfg, root / "prep", cohorts=cohorts))
    runs = {}
    # the federated experiment again with its updates summed securely (the server sees none)
    secure = cfg.model_copy(update={"federated": cfg.federated.model_copy(
        update={"secure_aggregation": True, "min_sites": 3})})
    runners = {"federated": (run_federated_experiment, cfg), "local": (run_local, cfg),
               "secure": (run_federated_experiment, secure)}
    for job in JOBS:
        runner, job_cfg = runners[job]
        recorder = Recorder(inprocess_federation(job_cfg, root / job, data=data))
        runner(job_cfg, root / job, federation=recorder)  # type: ignore[operator]
        runs[job] = (root / job, recorder)
    projected = apply_pca_stage(data, fit_pca_stage(cfg, data), cfg.federated.pca.modality)
    shapes, statistics = model_shapes(build_model(cfg, projected["site_a"]))
    known = Known(cohort_secrets(cohorts), patient_values(data, _scores(cfg, data, runs)),
                  shapes, statistics, split_classes(data))
    assert np.isclose(known.values, PLANTED, rtol=0, atol=1e-7).any()
    return Audited(cfg, runs, known, data)


# --------------------------------------------------------------------------- the audit


def _small_validation(c: Crossing) -> bool:
    """The one refusal this cohort must give: a site of fewer than ``min_cell`` validation
    patients (20 % of about 20) takes no part in the secure sum of the recalibration's
    validation histograms, and says so at ``advertise`` (the protocol's way to decline)."""
    return (c.request.kind == Kind.SECURE_SUM and isinstance(c.answer, SiteFailure)
            and c.request.config.get("vector") == POOLED_VALIDATION
            and c.request.config.get("step") == "advertise"
            and "fewer than 5 validation patients" in c.answer.reason)


@pytest.mark.parametrize("job", JOBS)
def test_the_audit_sees_every_stage_and_what_it_released(audited: Audited, job: str) -> None:
    crossings = audited.crossings(job)
    assert {str(c.request.kind) for c in crossings} >= KINDS[job]
    failed = [(c.site, c.request.kind, c.answer.reason) for c in crossings
              if isinstance(c.answer, SiteFailure) and not _small_validation(c)]
    assert not failed
    ev = audited.cfg.evaluation
    numbers = [n for c in crossings for n in released_numbers(
        c, min_cell=ev.min_cell, n_bins=ev.histogram_bins,
        statistic_keys=audited.known.statistics)]
    released = {(n.kind, n.part) for n in numbers}
    want = {("predict", "metrics"), ("predict", "documents"), ("pca", "arrays")} | {
        "federated": {("moments", "arrays"), ("fit", "weights"), ("fit", "metrics")},
        "local": {("local_train", "weights"), ("cross_evaluate", "metrics")},
        "secure": {("moments", "arrays"), ("secure_sum", "documents")}}[job]
    assert released >= want, f"nothing released to audit in {sorted(want - released)}"
    if job == "secure":  # the update stays at the site: no weight, no loss, no group count
        assert not released & {("fit", "weights"), ("fit", "metrics")}
        fits = [c.answer for c in crossings if c.request.kind == "fit"]
        assert fits and all(isinstance(r, Reply) and not r.group_counts for r in fits)
        steps = {(c.request.config["vector"], c.request.config["step"]) for c in crossings
                 if c.request.kind == "secure_sum"}
        assert {("fit_update", s) for s in ("advertise", "share", "masked", "unmask")} <= steps


@pytest.mark.parametrize("job", JOBS)
def test_every_reply_passes_every_check(audited: Audited, job: str) -> None:
    """Declared fields, the model's weights, counts, no id or note, the backstop."""
    found = audited.findings(audited.crossings(job))
    assert found == {k: [] for k in found}, "\n".join(
        f"{check}: {line}" for check, lines in found.items() for line in lines[:10])


@pytest.mark.parametrize("job", JOBS)
def test_each_sites_egress_log_says_what_the_server_got(audited: Audited, job: str) -> None:
    run, recorder = audited.runs[job]
    for site in sorted(recorder.sites()):
        log = read_egress(run / "sites" / site / "egress.jsonl")
        mine = [c for c in recorder.crossings if c.site == site]
        assert egress_findings(mine, log) == [], site
        assert log_name_findings(log) == [], site
        assert {e["kind"] for e in log} == {str(c.request.kind) for c in mine}


def _resplit(sd: SiteData, sizes: Mapping[str, int]) -> SiteData:
    """``sd`` with new splits of these sizes (sorted ids; the rest test), labels alternating
    within each split."""
    ids = sorted(sd.dataset.patient_ids)
    bounds = np.cumsum([sizes["train"], sizes["val"]])
    splits = {p: "train" if i < bounds[0] else "val" if i < bounds[1] else "test"
              for i, p in enumerate(ids)}
    ds = sd.dataset.subset(list(range(len(sd.dataset))))
    for split in ("train", "val", "test"):
        rows = [i for i, p in enumerate(ds.patient_ids) if splits[p] == split]
        for k, i in enumerate(rows):
            ds.labels[i] = float(k % 2)
    return dataclasses.replace(sd, dataset=ds, splits=splits, _parts={})


def test_no_class_metric_leaves_on_a_small_class(audited: Audited, tmp_path: Path) -> None:
    """A validation split of min_cell patients but fewer of a class: the local-only model's
    validation AUCs stay at the site (as ``evaluate`` keeps them), and so do the predict
    reply's class metrics of a test split with 4 positives (the audit's run has two)."""
    small = _resplit(audited.data["site_a"], {"train": 8, "val": 6})
    classes = split_classes({"site_a": small})
    assert len(small.val) >= 5 and min(classes["site_a"]["val"]) < 5
    site = FusionSite("site_a", audited.cfg, small, run_dir=tmp_path)
    request = Request(Kind.LOCAL_TRAIN, 0, config={"engine": "local"})
    crossing = Crossing("site_a", request, site.handle(request))
    numbers = released_numbers(crossing, min_cell=5, n_bins=100)
    assert any(n.path.endswith("train_loss") for n in numbers)  # the document did leave
    assert class_figure_findings(numbers, classes, 5) == []
    predict = [c for c in audited.crossings() if c.request.kind == "predict"]
    assert any(min(audited.known.classes[c.site]["test"]) < 5 for c in predict)
    for c in predict:
        assert class_figure_findings(released_numbers(c, min_cell=5, n_bins=100),
                                     audited.known.classes, 5) == [], c.site


def test_an_evaluate_reply_with_figures_passes_the_audit(audited: Audited, tmp_path: Path
                                                          ) -> None:
    """The runs' validation splits are all below min_cell, so their evaluate replies carry
    nothing: here a site of 10 validation patients (5 of each class) releases its metrics and
    its counts-only histograms, and the reply passes every check."""
    sd = _resplit(audited.data["site_a"], {"train": 6, "val": 10})
    assert split_classes({"site_a": sd})["site_a"]["val"] == (5, 5)
    site = FusionSite("site_a", audited.cfg, sd, run_dir=tmp_path)
    weights = {k: v.detach().numpy() for k, v in build_model(audited.cfg, sd).state_dict().items()}
    request = Request(Kind.EVALUATE, 1, weights=weights)
    crossing = Crossing("site_a", request, site.handle(request))
    reply = crossing.answer
    assert isinstance(reply, Reply) and reply.n_samples == 10
    assert {"val_auc", "val_brier"} <= set(reply.metrics) and "validation" in reply.documents
    known = dataclasses.replace(audited.known, classes=split_classes({"site_a": sd}))
    shapes, statistics = model_shapes(build_model(audited.cfg, sd))
    known = dataclasses.replace(known, shapes=shapes, statistics=statistics)
    found = audit([crossing], known, cfg_min_cell=5, n_bins=audited.cfg.evaluation.histogram_bins)
    assert found == {k: [] for k in found}


# --------------------------------------------------------------------------- negative controls


def test_an_undeclared_field_is_found(audited: Audited) -> None:
    fit = audited.first("fit")
    reply = fit.answer
    assert isinstance(reply, Reply)
    assert declared_findings(fit, 5) == []
    planted = replace(fit, answer=replace(reply, metrics={**reply.metrics, "val_auc": 0.7}))
    assert "undeclared metrics ['val_auc']" in " ".join(declared_findings(planted, 5))
    pred = audited.first("predict")
    assert isinstance(pred.answer, Reply)
    planted = replace(pred, answer=replace(pred.answer, documents={
        **pred.answer.documents, "scores": pack_document({"x": 1})}))
    assert "undeclared documents ['scores']" in " ".join(declared_findings(planted, 5))


def test_weights_unlike_the_models_and_small_counts_are_found(audited: Audited) -> None:
    fit = audited.first("fit")
    reply = fit.answer
    assert isinstance(reply, Reply)
    shapes = audited.known.shapes
    assert weight_findings(fit, shapes) == []
    key = next(k for k in reply.weights if k.endswith("weight"))
    weights = {k: v for k, v in reply.weights.items() if k != key}
    missing = replace(fit, answer=replace(reply, weights=weights))
    assert f"weights lack {key!r}" in " ".join(weight_findings(missing, shapes))
    extra = replace(fit, answer=replace(reply, weights={**reply.weights, "scores": np.ones(3)}))
    assert "weights carry 'scores'" in " ".join(weight_findings(extra, shapes))
    wide = replace(fit, answer=replace(reply, weights={
        **reply.weights, key: np.zeros((1, *reply.weights[key].shape), np.float32)}))
    assert f"weights[{key!r}] is" in " ".join(weight_findings(wide, shapes))
    count = audited.known.counts[0]
    assert statistic_count_findings(fit, [count], 5) == []
    small = reply.weights[count].copy()
    small[3] = 1
    one = replace(fit, answer=replace(reply, weights={**reply.weights, count: small}))
    assert "fewer than 5 patients at features [3]" in " ".join(
        statistic_count_findings(one, [count], 5))


def test_a_patient_id_or_note_text_is_found(audited: Audited) -> None:
    secrets: Secrets = audited.known.secrets
    pid = sorted(secrets.ids)[0]
    note = secrets.notes[0]
    pred = audited.first("predict")
    assert isinstance(pred.answer, Reply)
    for planted, want in ((pid, "patient id"), (f"... {note} ...", "note text")):
        doc = replace(pred, answer=replace(pred.answer, documents={
            **pred.answer.documents, "disclosed": pack_document({"reason": planted})}))
        assert want in " ".join(text_findings(crossing_texts(doc), secrets))
    failure = replace(pred, answer=SiteFailure("site_a", f"KeyError: {pid!r}"))
    assert "failure: patient id" in " ".join(text_findings(crossing_texts(failure), secrets))


def test_a_released_patient_value_is_found(audited: Audited) -> None:
    """A patient's score in a field no entry covers; a figure, a moment or a PCA summary on
    fewer than min_cell patients; a grid-like number where no grid is: each is found."""
    values = audited.known.values
    score = float(values[0])
    kw = {"min_cell": 5, "n_bins": audited.cfg.evaluation.histogram_bins}
    pred = audited.first("predict")
    assert isinstance(pred.answer, Reply)
    assert backstop_findings(released_numbers(pred, **kw), values, min_cell=5) == []
    doc = replace(pred, answer=replace(pred.answer, documents={
        **pred.answer.documents, "disclosed": pack_document({"first": score + 1e-6})}))
    found = backstop_findings(released_numbers(doc, **kw), values, min_cell=5)
    assert "disclosed/first" in " ".join(found) and "no allow-list entry" in " ".join(found)
    small = replace(pred, answer=replace(pred.answer, documents={
        **pred.answer.documents,
        "disclosed": pack_document({"cells": [{"n": 2, "value": score}]})}))
    assert "a 'figure' on 2 patients" in " ".join(
        backstop_findings(released_numbers(small, **kw), values, min_cell=5))
    step = 1 / kw["n_bins"]  # a patient's value on the grid: a constant only where a grid is
    on_grid = next(round(v / step) * step for v in values
                   if step / 2 < v < 1 and abs(v / step - round(v / step)) < 1e-5)
    for path, flagged in (({"first": on_grid}, True), ({"roc": {"threshold": [on_grid]}}, False)):
        grid = replace(pred, answer=replace(pred.answer, documents={
            **pred.answer.documents, "disclosed": pack_document(path)}))
        assert bool(backstop_findings(released_numbers(grid, **kw), values, min_cell=5)) is flagged
    moments = audited.first("moments")
    reply = moments.answer
    assert isinstance(reply, Reply)
    n, s = reply.arrays["n"].copy(), reply.arrays["sum"].copy()
    n[0], s[0] = 1, PLANTED  # what the moments rule exists to stop
    one = replace(moments, answer=replace(reply, arrays={**reply.arrays, "n": n, "sum": s}))
    assert "a 'moment' on 1 patients" in " ".join(
        backstop_findings(released_numbers(one, **kw), values, min_cell=5))
    pca = audited.first("pca")
    assert isinstance(pca.answer, Reply)
    rows = pca.answer.arrays["block"]
    tall = replace(pca, answer=replace(pca.answer, arrays={
        **pca.answer.arrays, "block": np.vstack([rows, np.full_like(rows[:1], score)])}))
    found = " ".join(backstop_findings(released_numbers(tall, **kw), values, min_cell=5))
    assert "pca arrays block" in found and "a 'pca' whose condition does not hold" in found


def test_the_backstop_compares_relative_to_the_patients_value() -> None:
    """A copy of a tiny patient value is found; a released constant beside a saturated score
    is not (a zero weight next to a score of 7.6e-24 revealed nothing of it, yet an absolute
    1e-4 called it a match); integer patient values (a score saturated to 0.0) are left out."""
    values = np.array([7.6e-24, 1.0e-5, 0.0, 1.0, 0.4321987, 123.456])

    def released(value: float) -> list[Released]:
        return [Released("fit", "weights", "w", value, "site_a")]

    def found(value: float) -> list[str]:
        return backstop_findings(released(value), values, min_cell=5)

    assert found(0.0) == [] and found(1.0) == []  # constants, never a patient's copy
    assert found(2e-24) == []  # a different tiny number, not a copy
    assert found(float(np.float32(7.6e-24)))  # the score itself, through float32
    assert found(float(np.float32(1.0e-5)))
    assert found(float(np.float32(0.4321987))) and found(0.4321987 * (1 + 5e-5))
    assert found(0.4321987 * (1 + 2e-4)) == []
    assert found(float(np.float32(123.456)))
    assert "within a relative 0.0001 of a patient's value 7.6e-24" in " ".join(
        found(float(np.float32(7.6e-24))))


def test_an_egress_log_unlike_what_the_server_got_is_found(audited: Audited) -> None:
    run, recorder = audited.runs["federated"]
    mine = [c for c in recorder.crossings if c.site == "site_a"]
    log = read_egress(run / "sites" / "site_a" / "egress.jsonl")
    assert egress_findings(mine, log) == []
    i = next(i for i, e in enumerate(log) if e["kind"] == "predict")
    flipped = [dict(e) for e in log]
    flipped[i]["released"] = False
    assert "logged released=False, the server got a reply" in " ".join(
        egress_findings(mine, flipped))
    renamed = [dict(e) for e in log]
    renamed[i]["metrics"] = []
    assert "the log differs from the reply" in " ".join(egress_findings(mine, renamed))
    without = [e for e in log if e["kind"] != "evaluate"]
    found = " ".join(egress_findings(mine, without))
    assert "kind 'evaluate' crossed but is not in the egress log" in found
    undeclared: list[dict[str, Any]] = [dict(log[i], metrics=["test/auc", "scores"])]
    assert "undeclared metrics ['scores']" in " ".join(log_name_findings(undeclared))
