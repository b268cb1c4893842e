"""The federated PCA pipeline stage (multimodal_fl.pca.stage) on the tiny generated cohort."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from sklearn.decomposition import PCA

from multimodal_fl.config import load_config
from multimodal_fl.engines.federated import inprocess_federation, run_federated_experiment
from multimodal_fl.federated.pca import FederatedPCA, local_summary, subspace_error
from multimodal_fl.pca.site import project, projection_arrays, score_summary
from multimodal_fl.pca.stage import apply_pca_stage, check_pca_stage, fit_pca_stage, run_pca_stage
from multimodal_fl.training import load_site_data

torch.set_num_threads(1)

PCA_ON = {"rounds": 2, "local_steps": 3, "min_sites": 1,
          "pca": {"enabled": True, "modality": "text", "n_components": 4}}


def capped_pca(arrays: list[np.ndarray], n_components: int, min_cell: int,
               svd_solver: str = "auto") -> FederatedPCA:
    """The reference: each site's exact summary cut to its disclosure cap, floor(n / min_cell)."""
    return FederatedPCA(n_components, svd_solver=svd_solver).fit_from_summaries(
        [local_summary(a, len(a) // min_cell, svd_solver=svd_solver) for a in arrays])


def _train_text(sd: object) -> np.ndarray:
    """A site's training-split text embeddings of patients with notes (independent of the stage)."""
    train = sd.train  # type: ignore[attr-defined]
    j = train.modalities.index("text")
    return train.inputs["text"][train.mask[:, j]].numpy().astype(np.float64)


def test_run_with_pca_stage_trains_on_k_text_inputs(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    cfg = load_config(tiny_config("covid_oxygen", federated=PCA_ON))
    out = run_federated_experiment(cfg, tmp_path / "run")
    metrics = json.loads((out.run_dir / "metrics.json").read_text())
    assert metrics["completed_rounds"] == 2
    pca = metrics["pca"]
    assert pca["modality"] == "text" and pca["n_components"] == 4
    assert pca["applied"] == sorted(s.name for s in cfg.sites)
    weights = load_file(str(out.run_dir / "model.safetensors"))
    assert weights["proj.text.0.weight"].shape == (cfg.fusion.dim, 4)
    proj = load_file(str(out.run_dir / "pca.safetensors"))
    assert proj["components"].shape == (4, pca["n_features"])
    assert all(np.isfinite(r["train_loss"]) for r in metrics["rounds"])


def test_federated_fit_equals_pooled_training_embeddings(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    cfg = load_config(tiny_config("covid_oxygen", federated=PCA_ON))
    data = load_site_data(cfg, tmp_path / "run")
    arrays = [_train_text(data[s]) for s in sorted(data)]
    m = cfg.evaluation.min_cell  # above the package floor; the tiny sites set no policy
    reference = capped_pca(arrays, 4, m)
    pooled = PCA(4, svd_solver="full").fit(np.vstack(arrays))

    federation = inprocess_federation(cfg, tmp_path / "run", data=data)
    fed, doc = run_pca_stage(federation, cfg, sorted(data))
    assert doc["site_n"] == {s: a.shape[0] for s, a in zip(sorted(data), arrays, strict=True)}
    # no site sent more than floor(n / min_cell) rows: with n <= d, never its rows
    assert doc["site_rows"] == {s: a.shape[0] // m for s, a in zip(sorted(data), arrays,
                                                                      strict=True)}
    assert all(a.shape[0] <= a.shape[1] for a in arrays)
    assert subspace_error(fed.components_, reference.components_) < 1e-10
    np.testing.assert_allclose(np.abs(fed.components_), np.abs(reference.components_),
                               atol=1e-10)
    np.testing.assert_allclose(fed.explained_variance_ratio_,
                               reference.explained_variance_ratio_, rtol=1e-8)
    # the caps cost accuracy against the pooled data (the price of no site's rows leaving)
    assert fed.truncated_ and subspace_error(fed.components_, pooled.components_) > 1e-6

    # the in-memory helper of the local / centralized engines gives the same projection
    local = fit_pca_stage(cfg, data)
    for key, value in projection_arrays(local).items():
        np.testing.assert_array_equal(value, projection_arrays(fed)[key])

    # every federated site now holds the projected embeddings, as apply_pca_stage computes them
    projected = apply_pca_stage(data, local, "text")
    for name, site in federation._sites.items():  # type: ignore[attr-defined]
        ds = site.data.dataset
        assert ds.inputs["text"].shape[1] == 4
        assert site.model.input_dims["text"] == 4
        torch.testing.assert_close(ds.inputs["text"], projected[name].dataset.inputs["text"])
        j = ds.modalities.index("text")
        present = ds.mask[:, j]
        raw = data[name].dataset.inputs["text"][present].numpy()
        np.testing.assert_allclose(ds.inputs["text"][present].numpy(),
                                   project(raw, projection_arrays(local)), rtol=1e-4, atol=1e-5)
        assert not ds.inputs["text"][~present].any()
        # the originals are untouched
        assert data[name].dataset.inputs["text"].shape[1] == pooled.n_features_in_


def test_stage_sends_the_configured_solver_to_the_sites(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    pca_full = {**PCA_ON, "pca": {**PCA_ON["pca"], "svd_solver": "full"}}  # type: ignore[dict-item]
    cfg = load_config(tiny_config("covid_oxygen", federated=pca_full))
    data = load_site_data(cfg, tmp_path / "run")
    federation = inprocess_federation(cfg, tmp_path / "run", data=data)
    sent: list[Any] = []
    broadcast = federation.broadcast

    def spy(requests: Any, *args: Any, **kwargs: Any) -> Any:
        sent.extend(requests.values())
        return broadcast(requests, *args, **kwargs)

    federation.broadcast = spy  # type: ignore[method-assign]
    fed, doc = run_pca_stage(federation, cfg, sorted(data))
    asked = [r for r in sent if r.kind == "pca"]
    assert len(asked) == len(data) and all(r.config["svd_solver"] == "full" for r in asked)
    assert doc["svd_solver"] == "full" and fed.svd_solver == "full"
    reference = capped_pca([_train_text(data[s]) for s in sorted(data)], 4,
                           cfg.evaluation.min_cell, svd_solver="full")
    np.testing.assert_array_equal(fed.components_, reference.components_)


def test_stage_refuses_what_it_cannot_reduce(tiny_config: Callable[..., Path]) -> None:
    tab = load_config(tiny_config("covid_oxygen", federated={
        "pca": {"enabled": True, "modality": "tabular"}}))
    with pytest.raises(ValueError, match="tabular"):
        check_pca_stage(tab)
    img = load_config(tiny_config("covid_oxygen", federated={
        "pca": {"enabled": True, "modality": "image"}}))
    with pytest.raises(ValueError, match="frozen"):
        check_pca_stage(img)
    assert check_pca_stage(load_config(tiny_config("covid_oxygen", federated=PCA_ON))) == "text"


def test_score_summary_keeps_the_small_cell_rule() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(size=(40, 2))
    edges = np.tile(np.linspace(-4, 4, 17), (2, 1))
    doc = score_summary(z, edges, [0.25, 0.5, 0.75], min_cell=10)
    np.testing.assert_allclose(doc["mean"], z.mean(0))
    np.testing.assert_allclose(doc["cov"], np.cov(z, rowvar=False))
    np.testing.assert_allclose(doc["quantiles"]["values"], np.quantile(z, [.25, .5, .75], 0).T)
    for h in doc["histograms"]:
        assert sum(h["count"]) == 40 and all(c >= 10 for c in h["count"])
    small = score_summary(z[:5], edges, [0.5], min_cell=10)
    assert small["quantiles"] is None and all(isinstance(h, str) for h in small["histograms"])


# --------------------------------------------------------------------------- over Flower

_FLOWER: dict[str, Any] = {}


def fresh_fusion_site(name: str, site_dir: Path, run_config: Mapping[str, Any]) -> Any:
    """Site factory of the Flower test: a fresh FusionSite per message, as in a ClientApp."""
    from multimodal_fl.federated.site import FusionSite

    return FusionSite(name, _FLOWER["cfg"], _FLOWER["data"][name], run_dir=_FLOWER["run_dir"])


def test_pca_stage_over_the_flower_wire_equals_in_process(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    pytest.importorskip("flwr")
    from flwr.supercore.task_identity import TaskIdentity

    from multimodal_fl.federated.flower import FlowerFederation
    from tests.federated.test_flower import FakeGrid

    cfg = load_config(tiny_config("covid_oxygen", federated=PCA_ON))
    data = load_site_data(cfg, tmp_path / "prep")
    a = run_federated_experiment(cfg, tmp_path / "a", data=data).run_dir

    _FLOWER.update(cfg=cfg, data=data, run_dir=tmp_path / "b")
    nodes = {10 * (i + 1): {"site-name": s, "site-dir": f"/nowhere/{s}"}
             for i, s in enumerate(sorted(data, reverse=True))}
    grid = FakeGrid(nodes, {"site-factory": "tests.test_pca_stage:fresh_fusion_site",
                            "torch-threads": 1})
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    try:
        federation = FlowerFederation(grid, poll_interval=0.01)  # type: ignore[arg-type]
        b = run_federated_experiment(cfg, tmp_path / "b", engine="flower",
                                     federation=federation).run_dir
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
    metrics = json.loads((b / "metrics.json").read_text())
    assert metrics["completed_rounds"] == 2 and metrics["pca"]["n_components"] == 4
    # every message met a fresh site: the projection came back through export/restore_state
    for name in ("pca.safetensors", "model.safetensors"):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys()
        for key in wa:
            np.testing.assert_array_equal(wa[key], wb[key], err_msg=f"{name}: {key}")


def test_resumed_run_with_pca_stage_equals_an_uninterrupted_one(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    cfg = load_config(tiny_config("covid_oxygen", federated=PCA_ON))
    data = load_site_data(cfg, tmp_path / "prep")
    whole = run_federated_experiment(cfg, tmp_path / "whole", data=data).run_dir
    part = tmp_path / "part"
    stopped = run_federated_experiment(cfg, part, data=data, stop_after_round=1)
    assert stopped.metrics["completed_rounds"] == 1
    # a new process: fresh sites from the data as loaded; the stage runs again before init
    run_federated_experiment(cfg, part, data=data, resume=True)
    wa, wb = load_file(str(whole / "model.safetensors")), load_file(str(part / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        np.testing.assert_array_equal(wa[key], wb[key], err_msg=key)
