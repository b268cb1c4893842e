"""The site's disclosure gate (multimodal_fl.federated.disclosure): its rules, and the attacks
they stop, on a site of the tiny generated cohort."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from multimodal_fl.config import ExperimentConfig, SitePolicy, load_config
from multimodal_fl.federated.aggregation import aggregate, check_fit_reply
from multimodal_fl.federated.disclosure import (
    DisclosureGate,
    SiteError,
    SiteRefused,
    pca_rank_cap,
)
from multimodal_fl.federated.inprocess import InProcessFederation
from multimodal_fl.federated.protocol import (
    Doc,
    Kind,
    Reply,
    Request,
    SiteFailure,
    carry_evaluation,
    detach_evaluation,
)
from multimodal_fl.federated.site import FusionSite
from multimodal_fl.training import SiteData, load_site_data
from tests.conftest import write_tiny_config

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, tiny_sample: Path, tiny_bert: Path
         ) -> tuple[ExperimentConfig, dict[str, SiteData]]:
    """The tiny COVID-19 config (evaluation.min_cell 10) and its prepared sites, made once."""
    root = tmp_path_factory.mktemp("disclosure")
    cfg = load_config(write_tiny_config(root, tiny_sample, tiny_bert))
    return cfg, load_site_data(cfg, root / "prep")


def _site(tiny: tuple[ExperimentConfig, dict[str, SiteData]], tmp_path: Path, *,
          data: SiteData | None = None, name: str = "site_a", min_cell: int | None = None,
          policy: SitePolicy | None = None) -> FusionSite:
    cfg, sites = tiny
    if min_cell is not None:
        cfg = cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(
            update={"min_cell": min_cell})})
    return FusionSite(name, cfg, data if data is not None else sites[name], run_dir=tmp_path,
                      policy=policy)


def _egress(tmp_path: Path, site: str = "site_a") -> list[dict[str, Any]]:
    path = tmp_path / "sites" / site / "egress.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _fit(weights: dict[str, np.ndarray] | None = None) -> Request:
    return Request(Kind.FIT, 1, weights=dict(weights or {}),
                   config={"seed": 0, "local_steps": 1, "lr": 1e-3})


def _floats(reply: Reply) -> np.ndarray:
    """Every number the reply carries, flattened (weights, arrays, metrics, documents)."""
    parts = [np.asarray(v, dtype=np.float64).ravel() for v in
             (*reply.weights.values(), *reply.arrays.values())]
    parts.append(np.asarray(list(reply.metrics.values()), dtype=np.float64))

    def walk(doc: Any) -> list[float]:
        if isinstance(doc, dict):
            return [x for v in doc.values() for x in walk(v)]
        if isinstance(doc, list):
            return [x for v in doc for x in walk(v)]
        return [float(doc)] if isinstance(doc, int | float) and not isinstance(doc, bool) else []

    parts.append(np.asarray([x for d in reply.documents.values() for x in walk(json.loads(d))]))
    return np.concatenate(parts)


# --------------------------------------------------------------------------- fit


def test_fit_leaves_out_a_modality_group_of_fewer_than_min_cell(
    tiny: tuple[ExperimentConfig, dict[str, SiteData]], tmp_path: Path
) -> None:
    site = _site(tiny, tmp_path, name="site_b")  # 10 training patients, 7 with an image
    init = site.handle(Request(Kind.INIT, 0))
    reply = site.handle(_fit(init.weights))
    assert reply.n_samples == 10
    assert reply.group_counts["encoders.image."] == reply.group_counts["proj.image."] == 0
    assert not [k for k in reply.weights if k.startswith(("encoders.image.", "proj.image."))]
    assert reply.group_counts["proj.text."] == 10
    assert any(k.startswith("proj.text.") for k in reply.weights)
    # the server takes it, and keeps the global image weights
    check_fit_reply(reply, site="site_b", round=1, reference=init.weights)
    out = aggregate([reply], init.weights)
    assert not [k for k in out if k.startswith(("encoders.image.", "proj.image."))]
    fit_log = next(e for e in _egress(tmp_path, "site_b") if e["kind"] == "fit")
    assert any("'encoders.image.': 7 patients < min_cell 10" in s for s in fit_log["suppressed"])


def test_a_site_with_fewer_than_min_cell_training_patients_does_not_train(
    tiny: tuple[ExperimentConfig, dict[str, SiteData]], tmp_path: Path
) -> None:
    site = _site(tiny, tmp_path, policy=SitePolicy(min_cell=20))  # site_a: 12 training
    before = {k: v.clone() for k, v in site.model.state_dict().items()}
    weights = {k: v.numpy() + 1.0 for k, v in before.items()}
    for request in (_fit(weights), Request(Kind.INFO, 0), Request(Kind.INIT, 0)):
        with pytest.raises(SiteRefused) as info:
            site.handle(request)
        assert str(info.value) == ("site site_a: fewer than 20 training patients "
                                   "(site policy min_cell=20)")
    after = site.model.state_dict()  # it neither loaded the weights nor trained
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert next(e["refused"] for e in _egress(tmp_path)).startswith("site site_a: fewer than 20")
    # over a federation the refusal is a failure with its reason, as any site's failure
    answer = InProcessFederation({"site_a": site}).broadcast({"site_a": _fit()})["site_a"]
    assert isinstance(answer, SiteFailure) and "fewer than 20 training patients" in answer.reason


# --------------------------------------------------------------------------- policy


def test_a_kind_the_policy_does_not_answer_is_refused(
    tiny: tuple[ExperimentConfig, dict[str, SiteData]], tmp_path: Path
) -> None:
    site = _site(tiny, tmp_path, policy=SitePolicy(answers=["info", "predict"]))
    assert site.handle(Request(Kind.INFO, 0)).n_samples == 12
    with pytest.raises(SiteRefused, match="site policy does not answer 'fit' requests"):
        site.handle(_fit())
    assert [(e["kind"], e["released"]) for e in _egress(tmp_path)] == [
        ("info", True), ("fit", False)]


def test_a_stricter_policy_wins_and_a_looser_one_does_not(
    tiny: tuple[ExperimentConfig, dict[str, SiteData]], tmp_path: Path
) -> None:
    cfg, sites = tiny
    folder = tmp_path / "site_a"
    folder.mkdir()
    cfg = cfg.model_copy(update={"sites": [s.model_copy(update={"path": folder})
                                           for s in cfg.sites]})
    (folder / "policy.yaml").write_text("min_cell: 15\n")  # stricter than the config's 10
    strict = FusionSite("site_a", cfg, sites["site_a"], run_dir=tmp_path / "s")
    assert strict.gate.policy.min_cell == 15
    with pytest.raises(SiteRefused, match="fewer than 15 training patients"):
        strict.handle(Request(Kind.INFO, 0))
    # a request may tighten it further, never loosen it
    assert strict.gate.min_cell(Request(Kind.INFO, 0, config={"min_cell": 5})) == 15
    assert strict.gate.min_cell(Request(Kind.INFO, 0, config={"min_cell": 30})) == 30
    (folder / "policy.yaml").write_text("min_cell: 5\n")  # looser: the config's 10 holds
    loose = FusionSite("site_a", cfg, sites["site_b"], run_dir=tmp_path / "l")
    assert loose.gate.policy.min_cell == 5
    assert loose.gate.min_cell(Request(Kind.INFO, 0)) == 10
    assert loose.handle(Request(Kind.INFO, 0)).n_samples == 10
    with pytest.raises(SiteRefused, match="fewer than 11 training patients"):
        loose.handle(Request(Kind.INFO, 0, config={"min_cell": 11}))
    assert [e["min_cell"] for e in _egress(tmp_path / "l")] == [10, 11]


# --------------------------------------------------------------------------- evaluate


def test_a_tiny_validation_split_sends_no_figure(
    tiny: tuple[ExperimentConfig, dict[str, SiteData]], tmp_path: Path
) -> None:
    """The attack: a 2-patient validation split sent AUC 1.0, Brier and ECE every round."""
    _, sites = tiny
    data = sites["site_a"]
    y = data.dataset.labels.numpy()
    ids = data.dataset.patient_ids
    two = [ids[int(np.flatnonzero(y == 1)[0])], ids[int(np.flatnonzero(y == 0)[0])]]
    splits = {p: "val" if p in two else ("train" if s == "val" else s)
              for p, s in data.splits.items()}
    site = _site(tiny, tmp_path, data=dataclasses.replace(data, splits=splits, _parts={}))
    assert len(site.data.val) == 2
    init = site.handle(Request(Kind.INIT, 0))
    reply = site.handle(Request(Kind.EVALUATE, 1, weights=init.weights))
    assert reply.metrics == {} and reply.n_samples == 0
    assert not reply.arrays and not reply.documents
    entry = _egress(tmp_path)[-1]
    assert entry["kind"] == "evaluate" and entry["released"]
    assert entry["suppressed"] == ["validation metrics and histograms: patients: 2 < min_cell "
                                   "10; positives: 1 < min_cell 10; negatives: 1 < min_cell 10"]


def test_evaluate_releases_merged_counts_of_at_least_min_cell(
    tiny: tuple[ExperimentConfig, dict[str, SiteData]], tmp_path: Path
) -> None:
    _, sites = tiny
    data = sites["site_c"]  # 19 patients, 2 positives: all of them validation
    splits = dict.fromkeys(data.splits, "val")
    ids = data.dataset.patient_ids
    splits[ids[0]] = "train"
    site = _site(tiny, tmp_path, name="site_c", min_cell=5,
                 data=dataclasses.replace(data, splits=splits, _parts={}))
    init = _site(tiny, tmp_path / "a").handle(Request(Kind.INIT, 0))
    val_y = site.data.val.labels.numpy()
    assert 0 < val_y.sum() < 5  # positives below min_cell: nothing leaves
    reply = site.handle(Request(Kind.EVALUATE, 1, weights=init.weights))
    assert reply.n_samples == 0 and not reply.metrics and not reply.documents
    # with only negatives (0 positives is a count that may leave) the histogram leaves
    neg_only = {p: s for p, s in splits.items()}
    for i in np.flatnonzero(data.dataset.labels.numpy() == 1):
        neg_only[ids[int(i)]] = "test"
    site = _site(tiny, tmp_path, name="site_c", min_cell=5,
                 data=dataclasses.replace(data, splits=neg_only, _parts={}))
    reply = site.handle(Request(Kind.EVALUATE, 1, weights=init.weights))
    n = len(site.data.val)
    assert reply.n_samples == n >= 5 and "val_auc" not in reply.metrics
    assert set(reply.metrics) == {"val_brier", "val_ece"}
    doc = reply.document(Doc.VALIDATION)
    assert doc["pos"] == {"start": [], "stop": [], "count": []}
    assert sum(doc["neg"]["count"]) == n and all(c >= 5 for c in doc["neg"]["count"])
    assert set(doc) == {"n_bins", "pos", "neg"} and "score_sum" not in doc["neg"]


def _carried_fit(weights: dict[str, np.ndarray]) -> Request:
    """Round 2's fit request carrying round 1's evaluation of the same weights."""
    fit = Request(Kind.FIT, 2, weights=dict(weights), config={"seed": 0, "local_steps": 1,
                                                              "lr": 1e-3})
    return carry_evaluation(fit, Request(Kind.EVALUATE, 1, weights=dict(weights)))


def test_a_carried_evaluation_leaves_as_its_own_evaluate_reply_would(
    tiny: tuple[ExperimentConfig, dict[str, SiteData]], tmp_path: Path
) -> None:
    """One message per round: the fit reply carries exactly what the evaluate request would
    have released, the fit part is the fit reply, and the egress log has both, in order."""
    _, sites = tiny
    data = sites["site_a"]  # 20 patients, 4 positives: 8 negatives in validation may leave
    negatives = [p for p, label in zip(data.dataset.patient_ids, data.dataset.labels.numpy(),
                                       strict=True) if label == 0]
    splits = {p: "val" if p in negatives[:8] else "train" for p in data.splits}
    data = dataclasses.replace(data, splits=splits, _parts={})
    init = _site(tiny, tmp_path / "i").handle(Request(Kind.INIT, 0))
    plain = _site(tiny, tmp_path / "plain", data=data, min_cell=5)
    evaluated = plain.handle(Request(Kind.EVALUATE, 1, weights=dict(init.weights)))
    fitted = plain.handle(Request(Kind.FIT, 2, weights=dict(init.weights),
                                  config={"seed": 0, "local_steps": 1, "lr": 1e-3}))
    carrying = _site(tiny, tmp_path / "carried", data=data, min_cell=5)
    fit, carried = detach_evaluation(carrying.handle(_carried_fit(init.weights)), 1)
    assert isinstance(carried, Reply) and carried.n_samples == 8 and carried.metrics
    assert carried.document(Doc.VALIDATION)["neg"]["count"]
    assert carried == evaluated
    assert fit.metrics == fitted.metrics and fit.n_samples == fitted.n_samples
    assert all(np.array_equal(fit.weights[k], v) for k, v in fitted.weights.items())
    kinds = [(e["kind"], e["round"]) for e in _egress(tmp_path / "carried")]
    assert kinds == [("evaluate", 1), ("fit", 2)]


def test_a_carried_evaluation_passes_the_evaluate_rule_and_the_policy(
    tiny: tuple[ExperimentConfig, dict[str, SiteData]], tmp_path: Path
) -> None:
    """A 2-patient validation split sends no figure in a fit reply either; a policy that does
    not answer evaluate requests sends its refusal, and the site still trains."""
    _, sites = tiny
    data = sites["site_a"]
    y = data.dataset.labels.numpy()
    ids = data.dataset.patient_ids
    two = [ids[int(np.flatnonzero(y == 1)[0])], ids[int(np.flatnonzero(y == 0)[0])]]
    splits = {p: "val" if p in two else ("train" if s == "val" else s)
              for p, s in data.splits.items()}
    init = _site(tiny, tmp_path / "i").handle(Request(Kind.INIT, 0))
    small = _site(tiny, tmp_path / "small",
                  data=dataclasses.replace(data, splits=splits, _parts={}))
    fit, carried = detach_evaluation(small.handle(_carried_fit(init.weights)), 1)
    assert isinstance(carried, Reply) and carried.n_samples == 0 and not carried.metrics
    assert not carried.documents and fit.weights and fit.metrics.keys() == {"loss"}
    assert _egress(tmp_path / "small")[0]["suppressed"][0].startswith("validation metrics")
    no_eval = _site(tiny, tmp_path / "policy",
                    policy=SitePolicy(answers=["init", "fit"]))
    fit, carried = detach_evaluation(no_eval.handle(_carried_fit(init.weights)), 1)
    # as a separate evaluate request's refusal reads (a bug hunt: the type was missing)
    assert carried == "SiteRefused: site site_a: site policy does not answer 'evaluate' requests"
    assert fit.weights and fit.n_samples > 0


# --------------------------------------------------------------------------- moments


def test_single_patient_moments_do_not_send_the_value(
    tiny: tuple[ExperimentConfig, dict[str, SiteData]], tmp_path: Path
) -> None:
    """The attack: a feature seen in one patient sent that patient's value as its sum."""
    _, sites = tiny
    data = sites["site_a"]
    ds = data.dataset.subset(list(range(len(data.dataset))))
    train = [i for i, p in enumerate(ds.patient_ids) if data.splits[p] == "train"]
    value = 0.7318497  # the one training patient's value of feature 0
    ds.inputs["tabular"][:, 0] = float("nan")
    ds.inputs["tabular"][train[0], 0] = value
    site = _site(tiny, tmp_path, data=dataclasses.replace(data, dataset=ds, _parts={}))
    reply = site.handle(Request(Kind.MOMENTS, 0))
    assert reply.arrays["n"][0] == 0 and reply.arrays["sum"][0] == 0
    assert reply.arrays["sumsq"][0] == 0
    assert not np.isclose(_floats(reply), value, atol=1e-4).any()
    assert not np.isclose(_floats(reply), value**2, atol=1e-4).any()
    entry = _egress(tmp_path)[-1]
    assert entry["suppressed"] and "features [0" in entry["suppressed"][0]


# --------------------------------------------------------------------------- PCA


def test_pca_with_no_more_patients_than_dimensions_sends_no_rows(
    tiny: tuple[ExperimentConfig, dict[str, SiteData]], tmp_path: Path
) -> None:
    """The attack: n <= d sent the site's centred rows up to a rotation (and n = 1 its row)."""
    site = _site(tiny, tmp_path, min_cell=5)
    request = Request(Kind.PCA, 0, config={"modality": "text", "svd_solver": "full"})
    train = tiny[1]["site_a"].train  # the rows the summary is made of (they stay at the site)
    x = train.inputs["text"][train.mask[:, train.modalities.index("text")]].numpy()
    x = x.astype(np.float64)
    n, d = x.shape
    assert n <= d
    reply = site.handle(request)
    block = reply.arrays["block"]
    assert block.shape[0] == pca_rank_cap(n, 5) == n // 5 < n - 1
    assert np.linalg.matrix_rank(block) == n // 5
    centred = x - x.mean(0)
    # nothing the summary holds reproduces the rows' scatter, and most of each row lies
    # outside the directions sent: the rows cannot be rebuilt, not even up to a rotation
    scatter = centred.T @ centred
    assert np.linalg.norm(scatter - block.T @ block) > 0.2 * np.linalg.norm(scatter)
    basis = np.linalg.qr(block.T)[0]
    kept = np.linalg.norm(centred @ basis) ** 2 / np.linalg.norm(centred) ** 2
    assert kept < 0.8
    # fewer than min_cell patients: no summary at all, not even a mean
    with pytest.raises(SiteRefused, match="fewer than 20 patients with text for a PCA summary"):
        _site(tiny, tmp_path, policy=SitePolicy(min_cell=20)).handle(request)


def test_a_reply_over_its_pca_cap_does_not_leave(tmp_path: Path) -> None:
    from multimodal_fl.federated.pca import site_pca_reply

    rows = np.random.default_rng(0).normal(size=(12, 30))
    gate = DisclosureGate("x", SitePolicy(), egress_log=tmp_path / "egress.jsonl")

    def exact(request: Request) -> Reply:  # a handler that forgot the cap
        return Reply("x", "pca", 0, n_samples=12, arrays=site_pca_reply(rows))

    with pytest.raises(SiteError) as info:
        gate.release(Request(Kind.PCA, 0), exact)
    assert "broke the site's disclosure rules" in str(info.value)
    assert "rows" not in str(info.value)  # the detail stays in the site's log
    entry = json.loads((tmp_path / "egress.jsonl").read_text())
    assert not entry["released"] and "at most floor(n / min_cell) = 2" in entry["failed"]


# --------------------------------------------------------------------------- the backstop


@pytest.mark.parametrize(("kind", "fields", "what"), [
    (Kind.INFO, {"n_samples": 12, "metrics": {"val_auc": 0.5}}, "metrics"),
    (Kind.FIT, {"n_samples": 12, "metrics": {"loss": 0.1, "auc": 0.9}}, "metrics"),
    # a fit reply's carried evaluation is held to the evaluate declaration
    (Kind.FIT, {"n_samples": 12, "metrics": {"loss": 0.1, "evaluate.n_samples": 3.0,
                                             "evaluate.val_auc": 1.0}}, "n_samples=3"),
    (Kind.FIT, {"n_samples": 12, "metrics": {"loss": 0.1, "evaluate.n_samples": 12.0},
                "arrays": {"evaluate.val_pos_counts": np.ones(3)}}, "undeclared arrays"),
    (Kind.MOMENTS, {"n_samples": 12, "arrays": {"n": np.ones(2, np.int64),
                                                "sum": np.ones(2), "sumsq": np.ones(2),
                                                "rows": np.ones((12, 2))}}, "arrays"),
    (Kind.INFO, {"n_samples": 12, "documents": {"scores": "[0.12]"}}, "documents"),
    (Kind.EVALUATE, {"n_samples": 12, "metrics": {"val_auc": 0.5}}, "lacks"),
    (Kind.INFO, {"n_samples": 3}, "should have refused"),
    (Kind.PCA_APPLY, {"n_samples": 12}, "n_samples"),
    (Kind.INFO, {"n_samples": 12, "weights": {"w": np.ones(1)}}, "weights"),
    (Kind.DESCRIBE, {}, "declared"),  # answered by the transport, never by a site
])
def test_an_undeclared_field_never_leaves(kind: Kind, fields: dict[str, Any], what: str,
                                          tmp_path: Path) -> None:
    gate = DisclosureGate("x", SitePolicy(), egress_log=tmp_path / "egress.jsonl")
    request = Request(kind, 1)
    with pytest.raises(SiteError, match="broke the site's disclosure rules"):
        gate.release(request, lambda r: Reply("x", kind.value, 1, **fields))
    entry = json.loads((tmp_path / "egress.jsonl").read_text())
    assert not entry["released"] and what in entry["failed"]


_SECURED = {"secure_aggregation": True}


@pytest.mark.parametrize(("fields", "what"), [
    # the loss is in the masked sum: in the clear it is undeclared, as is any other metric
    ({"metrics": {"epsilon": 1.5, "delta": 1e-5, "loss": 0.3}}, "undeclared metrics ['loss']"),
    ({"metrics": {"epsilon": 1.5, "grad_norm": 2.0}}, "undeclared metrics ['grad_norm']"),
    ({"weights": {"w": np.ones(2)}, "group_counts": {"w": 12}}, "weights; none are declared in "
                                                                 "a secured round"),
    ({"arrays": {"fit_update": np.ones(2)}}, "undeclared arrays ['fit_update']"),
])
def test_a_secured_fit_reply_with_an_undeclared_field_never_leaves(
        fields: dict[str, Any], what: str, tmp_path: Path) -> None:
    gate = DisclosureGate("x", SitePolicy(), egress_log=tmp_path / "egress.jsonl")
    request = Request(Kind.FIT, 1, config=dict(_SECURED))
    with pytest.raises(SiteError, match="broke the site's disclosure rules"):
        gate.release(request, lambda r: Reply("x", "fit", 1, n_samples=12, **fields))
    entry = json.loads((tmp_path / "egress.jsonl").read_text())
    assert not entry["released"] and what in entry["failed"]


def test_a_secured_fit_reply_carries_the_sites_epsilon_through_the_gate(tmp_path: Path) -> None:
    """The declared fields of a secured fit: the count, FedBN's local key names and DP-SGD's
    epsilon and delta, named in the egress log; the loss is declared only in a plain round."""
    gate = DisclosureGate("x", SitePolicy(), egress_log=tmp_path / "egress.jsonl")
    sent = gate.release(Request(Kind.FIT, 1, config=dict(_SECURED)), lambda r: Reply(
        "x", "fit", 1, n_samples=12, local_keys=["bn.weight"],
        metrics={"epsilon": 1.5, "delta": 1e-5}))
    assert sent.metrics == {"epsilon": 1.5, "delta": 1e-5}
    plain = gate.release(Request(Kind.FIT, 2), lambda r: Reply(
        "x", "fit", 2, n_samples=12, weights={"w": np.ones(2)},
        metrics={"loss": 0.3, "epsilon": 1.5, "delta": 1e-5}))
    assert plain.metrics["loss"] == 0.3
    entries = [json.loads(line) for line in (tmp_path / "egress.jsonl").read_text().splitlines()]
    assert [(e["released"], e["metrics"], e["weights"]) for e in entries] == [
        (True, ["delta", "epsilon"], 0), (True, ["delta", "epsilon", "loss"], 1)]


# --------------------------------------------------------------------------- the server side


def test_init_asks_the_next_site_when_the_first_declines(
    tiny: tuple[ExperimentConfig, dict[str, SiteData]], tmp_path: Path
) -> None:
    from multimodal_fl.engines.federated import run_federated_experiment

    cfg, sites = tiny
    cfg = cfg.model_copy(update={"federated": cfg.federated.model_copy(update={"rounds": 1})})
    run = tmp_path / "run"
    federation = InProcessFederation({
        "site_a": FusionSite("site_a", cfg, sites["site_a"], run_dir=run,
                             policy=SitePolicy(min_cell=20)),  # 12 training patients: declines
        "site_b": FusionSite("site_b", cfg, sites["site_b"], run_dir=run),
    })
    outcome = run_federated_experiment(cfg, run, federation=federation)
    rounds = outcome.metrics["rounds"]
    assert rounds[0]["replied"] == ["site_b"] and "fewer than 20" in rounds[0]["failed"]["site_a"]
    assert outcome.metrics["standardisation"]["sites"] == ["site_b"]
    first = [(e["kind"], e["released"]) for e in _egress(run, "site_a")][:1]
    assert first == [("init", False)]
    assert ("init", True) in [(e["kind"], e["released"]) for e in _egress(run, "site_b")]


def test_a_rule_may_withhold_a_reply_with_a_reason(tmp_path: Path) -> None:
    def withhold(reply: Reply, min_cell: int, policy: SitePolicy) -> Any:
        raise SiteRefused("site x: info withheld: a figure on fewer than 10 patients")

    gate = DisclosureGate("x", SitePolicy(), egress_log=tmp_path / "egress.jsonl",
                          rules={Kind.INFO: withhold})
    with pytest.raises(SiteRefused, match="info withheld"):
        gate.release(Request(Kind.INFO, 0), lambda r: Reply("x", "info", 0, n_samples=12))
    entry = json.loads((tmp_path / "egress.jsonl").read_text())
    assert not entry["released"] and entry["refused"].endswith("fewer than 10 patients")


def test_the_batch_note_stays_in_the_sites_log(
        tiny: tuple[ExperimentConfig, dict[str, SiteData]], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """The enlarged batch's note names the site's class counts: the site logs it (round 1
    only), and neither the reply nor the egress record carries it."""
    cfg, sites = tiny
    rare = cfg.model_copy(update={"training": cfg.training.model_copy(
        update={"min_rare_per_batch": 50.0})})
    init = _site(tiny, tmp_path / "i").handle(Request(Kind.INIT, 0))
    site = FusionSite("site_a", rare, sites["site_a"], run_dir=tmp_path)
    with caplog.at_level(logging.INFO, logger="multimodal_fl.federated.site"):
        reply = site.handle(_fit(init.weights))
    noted = [r.getMessage() for r in caplog.records if "min_rare_per_batch" in r.getMessage()]
    assert len(noted) == 1 and noted[0].startswith("site site_a training: batch size ")
    assert "min_rare_per_batch" not in repr(reply.metrics) + repr(reply.documents)
    assert "min_rare_per_batch" not in (tmp_path / "sites" / "site_a" / "egress.jsonl"
                                        ).read_text()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="multimodal_fl.federated.site"):
        site.handle(Request(Kind.FIT, 2, weights=dict(init.weights),
                            config={"seed": 0, "local_steps": 1, "lr": 1e-3}))
    assert not any("min_rare_per_batch" in r.getMessage() for r in caplog.records)


def test_kept_optimiser_state_stays_at_the_site_and_survives_a_rebuild(
        tiny: tuple[ExperimentConfig, dict[str, SiteData]], tmp_path: Path) -> None:
    """``federated.keep_optimizer_state``: a site rebuilt for every message (as on Flower),
    handed back its ``export_state``, fits round 2 bit for bit as a site that stayed; the
    moments matter (a fresh optimiser gives other weights) and never enter a reply."""
    cfg, sites = tiny
    keep = cfg.model_copy(update={"federated": cfg.federated.model_copy(
        update={"keep_optimizer_state": True})})
    init = _site(tiny, tmp_path / "i").handle(Request(Kind.INIT, 0))

    def fit(site: FusionSite, round: int, weights: dict[str, np.ndarray]) -> Reply:
        return site.handle(Request(Kind.FIT, round, weights=dict(weights),
                                   config={"seed": 0, "local_steps": 3, "lr": 1e-3}))

    stayed = FusionSite("site_a", keep, sites["site_a"], run_dir=tmp_path / "s")
    first = fit(stayed, 1, init.weights)
    second = fit(stayed, 2, first.weights)
    built = FusionSite("site_a", keep, sites["site_a"], run_dir=tmp_path / "b")
    assert fit(built, 1, init.weights).weights.keys() == first.weights.keys()
    state = built.export_state()
    assert any(k.startswith("optimizer/") for k in state)
    rebuilt = FusionSite("site_a", keep, sites["site_a"], run_dir=tmp_path / "b")
    rebuilt.restore_state(state)
    again = fit(rebuilt, 2, first.weights)
    assert all(np.array_equal(again.weights[k], second.weights[k]) for k in second.weights)
    fresh = fit(FusionSite("site_a", cfg, sites["site_a"], run_dir=tmp_path / "f"), 2,
                first.weights)
    assert any(not np.array_equal(fresh.weights[k], second.weights[k]) for k in second.weights)
    for reply in (first, second, again):
        assert not any("optimizer" in k for k in (*reply.arrays, *reply.documents,
                                                  *reply.metrics))
    for run in ("s", "b"):
        assert "optimizer" not in (tmp_path / run / "sites" / "site_a" / "egress.jsonl"
                                   ).read_text()


def test_linear_warmup_runs_in_a_sites_first_round_only(
        tiny: tuple[ExperimentConfig, dict[str, SiteData]], tmp_path: Path) -> None:
    """``training.linear_warmup_steps``: a site fits the linear path alone before its first
    round's steps, and never again (round 2 from the same weights is the run without it)."""
    cfg, sites = tiny
    assert cfg.modalities.tabular.linear_path
    warm = cfg.model_copy(update={"training": cfg.training.model_copy(
        update={"linear_warmup_steps": 7})})
    init = _site(tiny, tmp_path / "i").handle(Request(Kind.INIT, 0))

    def fit(c: ExperimentConfig, round: int, run: str) -> dict[str, np.ndarray]:
        site = FusionSite("site_a", c, sites["site_a"], run_dir=tmp_path / run)
        return site.handle(Request(Kind.FIT, round, weights=dict(init.weights),
                                   config={"seed": 0, "local_steps": 2, "lr": 1e-3})).weights

    def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
        return all(np.array_equal(a[k], b[k]) for k in a)

    assert not same(fit(warm, 1, "w1"), fit(cfg, 1, "c1"))
    assert same(fit(warm, 2, "w2"), fit(cfg, 2, "c2"))
    fitted = cfg.model_copy(update={"training": cfg.training.model_copy(
        update={"linear_warmup_fit": True})})
    assert not same(fit(fitted, 1, "f1"), fit(cfg, 1, "c1b"))
    assert same(fit(fitted, 2, "f2"), fit(cfg, 2, "c2b"))
