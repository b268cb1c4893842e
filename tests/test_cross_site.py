"""Cross-site validation as NVFlare runs it: the local-only job over the federation.

Each site trains alone and keeps its model at home; a model its site's policy shares goes to the
other sites, which score it on their own test splits and disclose one cell each under their
small-cell rule; the server writes only those cells (``cross_site.json``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from safetensors.torch import load_file

from multimodal_fl.config import ExperimentConfig, SitePolicy, load_config
from multimodal_fl.engines.baselines import run_local
from multimodal_fl.engines.cross_site import WITHHELD
from multimodal_fl.engines.federated import inprocess_federation
from multimodal_fl.evaluation.disclosed import coarse_rank, released_metric
from multimodal_fl.evaluation.fairness import CrossSiteResult, cross_site_frame
from multimodal_fl.evaluation.report import build_report
from multimodal_fl.federated.disclosure import DisclosureGate, SiteRefused
from multimodal_fl.federated.protocol import Kind, Reply, Request, SiteFailure
from multimodal_fl.federated.server import Federation
from multimodal_fl.federated.site import LOCAL_MODEL, FusionSite
from multimodal_fl.rundir import CROSS_SITE_FILE, read_cross_site
from multimodal_fl.training import build_model, load_site_data, load_weights, predictions_frame

#: Splits with test splits of 8 patients per tiny site (the default 20% gives 3-4, all below
#: the package's floor of 5): cells with figures to compare.
SPLIT = {"train": 0.4, "val": 0.2, "test": 0.4}


def _cfg(tiny_config: Callable[..., Path], split: Mapping[str, float] = SPLIT
         ) -> ExperimentConfig:
    training = {"steps": 6, "batch_size": 8, "eval_every": 3, "num_threads": 1,
                "split": dict(split)}
    return load_config(tiny_config(training=training, evaluation={"n_boot": 20, "min_cell": 5}))


def _own_sites(cfg: ExperimentConfig, root: Path,
               policies: Mapping[str, dict[str, Any]]) -> ExperimentConfig:
    """``cfg`` over copies of its site directories, with a ``policy.yaml`` where given."""
    sites = []
    for site in cfg.sites:
        path = root / "sites" / site.name
        shutil.copytree(site.path, path)
        if site.name in policies:
            (path / "policy.yaml").write_text(yaml.safe_dump(policies[site.name]))
        sites.append(site.model_copy(update={"path": path}))
    return cfg.model_copy(update={"sites": sites})


def _balanced_labels(cfg: ExperimentConfig, root: Path) -> ExperimentConfig:
    """``cfg`` over copies of its sites whose ``labels.csv`` makes every other patient positive.

    The tiny cohort has 3-6 positives per site, so no test split holds ``min_cell`` (5)
    patients of each class and every disclosed AUC would be suppressed: nothing to compare.
    """
    cfg = _own_sites(cfg, root, {})
    for name, sd in load_site_data(cfg, root / "probe").items():
        ids = sorted({*sd.train.patient_ids, *sd.val.patient_ids, *sd.test.patient_ids})
        rows = "".join(f"{pid},{i % 2}\n" for i, pid in enumerate(ids))
        (root / "sites" / name / "labels.csv").write_text("patient_id,label\n" + rows)
    return cfg


def _direct_matrix(cfg: ExperimentConfig, run: Path) -> CrossSiteResult:
    """What the local engine computed before the job: every local model of the run, scored on
    every site's test split in one process, under the rule of a site's own disclosed cells
    (``released_metric``: a class metric needs ``min_cell`` patients of each class)."""
    data = load_site_data(cfg, run)
    rows = []
    ev = cfg.evaluation
    for owner in sorted(data):
        model = build_model(cfg, data[owner])
        load_weights(model, load_file(str(run / "sites" / owner / "model.safetensors")))
        for site, sd in sorted(data.items()):
            frame = predictions_frame(model, sd)
            test = frame[frame["split"] == "test"]
            name = f"local:{owner}"
            rows.append({"model": name, "test_site": site, **released_metric(
                test["label"].to_numpy(), test["score"].to_numpy(), min_cell=ev.min_cell,
                n_boot=ev.n_boot, seed=cfg.seed)})
    return CrossSiteResult(cross_site_frame(rows), "auc")


def _cells(result: CrossSiteResult) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["model"], r["test_site"]): r for r in result.to_dict()["cells"]}


class Recorder:
    """A federation that keeps every request it sent and every answer it got."""

    def __init__(self, inner: Federation) -> None:
        self.inner = inner
        self.sent: list[tuple[str, Request]] = []
        self.answers: list[Reply | SiteFailure] = []

    def sites(self) -> list[str]:
        return self.inner.sites()

    def broadcast(self, requests: Mapping[str, Request], timeout: float | None = None
                  ) -> dict[str, Reply | SiteFailure]:
        self.sent += list(requests.items())
        out = self.inner.broadcast(requests, timeout)
        self.answers += list(out.values())
        return out


def test_local_job_matrix_equals_the_direct_computation(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    # a large, balanced test split: a disclosed AUC needs min_cell (5) patients of each class
    cfg = _balanced_labels(_cfg(tiny_config, {"train": 0.3, "val": 0.1, "test": 0.6}),
                           tmp_path)
    run = run_local(cfg, tmp_path / "local").run_dir
    got = read_cross_site(run)
    assert got is not None, f"the local job wrote no {CROSS_SITE_FILE}"
    want = _cells(_direct_matrix(cfg, run))
    cells = _cells(got)
    names = sorted(s.name for s in cfg.sites)
    assert set(cells) == set(want) == {(f"local:{m}", t) for m in names for t in names}
    for key, w in want.items():
        g = cells[key]
        assert (g["suppressed"], g["reason"], g["n"]) == (w["suppressed"], w["reason"], w["n"]), key
        for part in ("value", "lo", "hi"):
            assert (g[part] is None) == (w[part] is None), (key, part)
            if w[part] is not None:  # a cross-site AUC leaves with two decimals: no class
                # counts beside it, so at full precision it would give them (coarse_rank)
                assert abs(g[part] - coarse_rank(w[part])) <= 1e-9, (key, part, g[part], w[part])
    shown = [k for k, c in cells.items() if k[0] != f"local:{k[1]}" and c["value"] is not None]
    assert len(shown) >= 3, "too few cells with a figure for the comparison to mean much"
    # the report shows the disclosed matrix: every model on every site
    doc, _, _ = build_report([run])
    report = {(c["model"], c["test_site"]): c for c in doc["cross_site"]["cells"]}
    for key, c in cells.items():  # a site's own cell comes from its document: the same value,
        # to more decimals where the document releases the class counts beside it
        assert coarse_rank(report[key]["value"]) == c["value"], key
    # patient-level files stay in the sites' folders; the server side holds the matrix only
    assert not list(run.glob("sites/*/cross_predictions.csv"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["local_models"] == {f"local:{s}": "shared" for s in names}


def test_a_withheld_model_reads_withheld_by_policy_and_its_weights_never_leave(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    cfg = _own_sites(_cfg(tiny_config), tmp_path, {"site_c": {"share_local_model": False}})
    run_dir = tmp_path / "run"
    federation = Recorder(inprocess_federation(cfg, run_dir))
    run_local(cfg, run_dir, federation=federation)
    cells = _cells(read_cross_site(run_dir))  # type: ignore[arg-type]
    for site in ("site_a", "site_b"):
        cell = cells[("local:site_c", site)]
        assert cell["reason"] == WITHHELD and cell["value"] is None and cell["n"] is None
        assert cells[("local:site_a", site)]["reason"] != WITHHELD
    assert cells[("local:site_c", "site_c")]["reason"] != WITHHELD  # scored at home
    assert json.loads((run_dir / CROSS_SITE_FILE).read_text())["models"]["local:site_c"] == WITHHELD
    # the model stays at home ...
    assert (run_dir / "sites" / "site_c" / "model.safetensors").is_file()
    # ... no reply of site_c carried weights, no request carried its model anywhere
    replies = [a for a in federation.answers if isinstance(a, Reply)]
    assert {r.kind for r in replies if r.site == "site_c"} >= {"local_train", "cross_evaluate"}
    assert not [r for r in replies if r.site == "site_c" and r.weights]
    assert [r for r in replies if r.site == "site_a" and r.kind == "local_train" and r.weights]
    for site, request in federation.sent:
        if request.config.get("model_site") == "site_c":
            assert site == "site_c" and not request.weights
    log = [json.loads(line) for line in
           (run_dir / "sites" / "site_c" / "egress.jsonl").read_text().splitlines()]
    assert {e["kind"] for e in log} >= {"local_train", "cross_evaluate", "predict"}
    assert all(e["weights"] == 0 for e in log)
    assert all(e["policy"]["share_local_model"] is False for e in log)
    # the report reads the row as the sites disclosed it
    doc, _, _ = build_report([run_dir])
    report = {(c["model"], c["test_site"]): c for c in doc["cross_site"]["cells"]}
    assert report[("local:site_c", "site_a")]["reason"] == WITHHELD


def test_a_test_split_below_min_cell_gives_suppressed_cells(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    # site_b's policy: min_cell 10; its test split has 8 patients, its training split 12
    cfg = _own_sites(_cfg(tiny_config, {"train": 0.6, "val": 0.0, "test": 0.4}), tmp_path,
                     {"site_b": {"min_cell": 10}})
    run = run_local(cfg, tmp_path / "run").run_dir
    got = read_cross_site(run)
    assert got is not None
    cells = _cells(got)
    for model in ("local:site_a", "local:site_b", "local:site_c"):
        cell = cells[(model, "site_b")]
        assert cell["suppressed"] and cell["value"] is None and cell["n"] is None, model
        assert cell["reason"] == "fewer than 10 patients", model
    # the other sites apply their own min_cell (5): their 8-patient test splits show n (an AUC
    # would also need 5 patients of each class, which the tiny cohort's test splits lack)
    others = [c for (m, t), c in cells.items() if t != "site_b"]
    assert others and all(c["n"] == 8 for c in others), others
    log = [json.loads(line) for line in
           (run / "sites" / "site_b" / "egress.jsonl").read_text().splitlines()]
    cross = [e for e in log if e["kind"] == "cross_evaluate"]
    assert len(cross) == 3 and all(e["min_cell"] == 10 and e["metrics"] == [] for e in cross)
    assert all(any("fewer than 10 patients" in s for s in e["suppressed"]) for e in cross)


def test_gate_withholds_a_local_model_the_policy_keeps_home(tmp_path: Path) -> None:
    """The gate's rule holds even if a handler forgot the policy."""
    log = tmp_path / "egress.jsonl"
    gate = DisclosureGate("a", SitePolicy(share_local_model=False), egress_log=log)
    weights = {"w": np.ones(3, dtype=np.float32)}
    reply = gate.release(Request(Kind.LOCAL_TRAIN, 0),
                         lambda r: Reply("a", r.kind, r.round, weights=weights, n_samples=20))
    assert reply.weights == {} and reply.n_samples == 20
    entry = json.loads(log.read_text())
    assert entry["weights"] == 0 and "withheld by policy" in entry["suppressed"][0]
    shared = DisclosureGate("a", SitePolicy()).release(
        Request(Kind.LOCAL_TRAIN, 0),
        lambda r: Reply("a", r.kind, r.round, weights=weights, n_samples=20))
    assert set(shared.weights) == {"w"}
    # a cross_evaluate reply never carries weights, nor figures on fewer than min_cell
    cell = DisclosureGate("a", SitePolicy(min_cell=10)).release(
        Request(Kind.CROSS_EVALUATE, 0),
        lambda r: Reply("a", r.kind, r.round, weights=weights, n_samples=6,
                        metrics={"auc": 0.9}))
    assert cell.weights == {} and cell.metrics == {} and cell.n_samples == 0


def test_a_site_built_afresh_scores_and_predicts_with_the_model_it_keeps_at_home(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    """Flower without site workers builds a site per message: the model comes from home."""
    cfg = _balanced_labels(_cfg(tiny_config, {"train": 0.3, "val": 0.1, "test": 0.6}),
                           tmp_path / "cohort")
    data = load_site_data(cfg, tmp_path)["site_a"]
    own = {"model": "local:site_a", "model_site": "site_a", "metric": "auc", "n_boot": 20,
           "seed": 0}
    fresh = FusionSite("site_a", cfg, data, run_dir=tmp_path)
    with pytest.raises(SiteRefused, match="no local-only model"):
        fresh.handle(Request(Kind.CROSS_EVALUATE, 0, config=dict(own)))
    first = FusionSite("site_a", cfg, data, run_dir=tmp_path)
    first.handle(Request(Kind.LOCAL_TRAIN, 0, config={"engine": "local"}))
    assert (tmp_path / "sites" / "site_a" / "model.safetensors").is_file()
    a = first.handle(Request(Kind.CROSS_EVALUATE, 0, config=dict(own)))
    b = FusionSite("site_a", cfg, data, run_dir=tmp_path).handle(
        Request(Kind.CROSS_EVALUATE, 0, config=dict(own)))
    assert a.metrics and a.metrics == b.metrics and a.n_samples == b.n_samples
    first.handle(Request(Kind.PREDICT, 0, config={"engine": "local", "model": LOCAL_MODEL}))
    at_first = (tmp_path / "sites" / "site_a" / "predictions.csv").read_text()
    FusionSite("site_a", cfg, data, run_dir=tmp_path).handle(
        Request(Kind.PREDICT, 0, config={"engine": "local", "model": LOCAL_MODEL}))
    assert (tmp_path / "sites" / "site_a" / "predictions.csv").read_text() == at_first


@pytest.mark.flower
@pytest.mark.timeout(600)
def test_local_job_on_a_flower_loopback_deployment_gives_the_in_process_matrix(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    from multimodal_fl.engines.flower_jobs import run_flower_loopback

    cfg = _cfg(tiny_config)
    inprocess = read_cross_site(run_local(cfg, tmp_path / "inprocess").run_dir)
    run = run_flower_loopback(cfg, tmp_path / "flower", timeout=540, job="local").run_dir
    flower = read_cross_site(run)
    assert inprocess is not None and flower is not None
    a, b = _cells(inprocess), _cells(flower)
    assert set(a) == set(b)
    for key, cell in a.items():
        for part in ("value", "lo", "hi"):
            assert (cell[part] is None) == (b[key][part] is None), (key, part)
            if cell[part] is not None:
                assert abs(cell[part] - b[key][part]) <= 1e-6, (key, part)
        assert (cell["n"], cell["reason"]) == (b[key]["n"], b[key]["reason"]), key
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["engine"] == "local" and metrics["transport"] == "flower"
    assert sorted(metrics["sites"]) == sorted(s.name for s in cfg.sites)
    for site in cfg.sites:
        assert (run / "sites" / site.name / "egress.jsonl").is_file()
