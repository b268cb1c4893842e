"""End-to-end tests of the federated engine on the tiny generated cohort."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from multimodal_fl.cli import app
from multimodal_fl.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def model_bytes(run_dir: Path) -> bytes:
    return (run_dir / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, tiny_sample: Path, tiny_bert: Path,
                  ) -> tuple[Path, Path]:
    """One uninterrupted 3-round run (the reference every interrupted run must equal)."""
    from tests.conftest import write_tiny_config

    root = tmp_path_factory.mktemp("engine")
    config = write_tiny_config(root, tiny_sample, tiny_bert, "covid_oxygen",
                               federated={"rounds": 3})
    result = CliRunner().invoke(app, ["train", str(config), "--out", str(root / "full"),
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    return config, root / "full"


def test_federated_run_writes_the_run_directory(uninterrupted: tuple[Path, Path]) -> None:
    config, run = uninterrupted
    cfg = load_config(config)
    for name in ("config.yaml", "metrics.json", "model.safetensors"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["engine"] == "inprocess" and metrics["completed_rounds"] == 3
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3]
    assert 1 <= metrics["selected_round"] <= 3
    assert set(metrics["sites"]) == {s.name for s in cfg.sites}
    server_text = (run / "metrics.json").read_text()
    for site in cfg.sites:
        folder = run / "sites" / site.name
        pred = pd.read_csv(folder / "predictions.csv")
        assert {"patient_id", "split", "label", "score", "sex", "age_band"} <= set(pred.columns)
        assert pred["score"].between(0, 1).all()
        splits = json.loads((folder / "splits.json").read_text())["splits"]
        assert set(pred["patient_id"].astype(str)) == set(splits)
        # no patient id reaches the server-side documents
        assert not any(f'"{pid}"' in server_text for pid in splits)
    assert metrics["standardisation"]["sites"] == sorted(s.name for s in cfg.sites)


class RecordingFederation:
    """A federation that keeps every reply crossing to the server: the egress path."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.replies: list[Any] = []

    def sites(self) -> list[str]:
        return list(self.inner.sites())

    def broadcast(self, requests: Any, timeout: float | None = None) -> Any:
        from multimodal_fl.federated.protocol import Reply

        answers = self.inner.broadcast(requests, timeout)
        self.replies += [a for a in answers.values() if isinstance(a, Reply)]
        return answers


def _numbers(doc: Any) -> list[float]:
    if isinstance(doc, dict):
        return [x for v in doc.values() for x in _numbers(v)]
    if isinstance(doc, list):
        return [x for v in doc for x in _numbers(v)]
    if isinstance(doc, int | float) and not isinstance(doc, bool):
        return [float(doc)]
    return []


PLANTED = 0.7318497  # a feature value only one training patient of site_a has


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory, tiny_sample: Path, tiny_bert: Path,
             ) -> tuple[Path, Any, RecordingFederation]:
    """A tiny in-process run whose every reply is kept; site_a has a one-patient feature."""
    import dataclasses

    from multimodal_fl.engines.federated import inprocess_federation, run_federated_experiment
    from multimodal_fl.training import load_site_data
    from tests.conftest import write_tiny_config

    root = tmp_path_factory.mktemp("recorded")
    cfg = load_config(write_tiny_config(root, tiny_sample, tiny_bert, "covid_oxygen"))
    data = load_site_data(cfg, root / "prep")
    a = data["site_a"]
    ds = a.dataset.subset(list(range(len(a.dataset))))
    first = next(i for i, p in enumerate(ds.patient_ids) if a.splits[p] == "train")
    ds.inputs["tabular"][:, 0] = float("nan")
    ds.inputs["tabular"][first, 0] = PLANTED
    data["site_a"] = dataclasses.replace(a, dataset=ds, _parts={})
    federation = RecordingFederation(inprocess_federation(cfg, root / "run", data=data))
    run_federated_experiment(cfg, root / "run", federation=federation)  # type: ignore[arg-type]
    return root / "run", data, federation


def test_nothing_released_is_a_patient_id_score_or_feature_value(
    recorded: tuple[Path, Any, RecordingFederation]
) -> None:
    """Every reply that crossed to the server, and the server's metrics.json: no patient id,
    and no number (model weights aside) equal to a patient's score or feature value."""
    run, data, federation = recorded
    released: list[float] = _numbers(json.loads((run / "metrics.json").read_text()))
    texts = [(run / "metrics.json").read_text()]
    kinds = set()
    for reply in federation.replies:
        kinds.add(reply.kind)
        for value in (*reply.arrays.values(), list(reply.metrics.values())):
            released += np.asarray(value, dtype=np.float64).ravel().tolist()
        for text in reply.documents.values():
            released += _numbers(json.loads(text))
            texts.append(text)
    assert {"init", "moments", "info", "fit", "evaluate", "predict"} <= kinds
    patient: list[float] = []
    for name, sd in data.items():
        scores = pd.read_csv(run / "sites" / name / "predictions.csv")["score"]
        patient += scores.astype(float).tolist()
        tab = sd.dataset.inputs["tabular"].numpy().astype(np.float64).ravel()
        patient += [v for v in tab if np.isfinite(v) and not float(v).is_integer()]
        for pid in sd.dataset.patient_ids:
            assert not any(str(pid) in text for text in texts), pid
    assert PLANTED in np.float32(patient).tolist() or np.isclose(patient, PLANTED).any()
    values = np.asarray([v for v in released if not float(v).is_integer()])
    hits = np.isclose(values[:, None], np.asarray(patient)[None, :], rtol=1e-9, atol=0.0)
    assert not hits.any(), sorted({float(v) for v in values[hits.any(1)]})


def test_without_a_pooled_validation_auc_the_last_round_is_kept(
    uninterrupted: tuple[Path, Path]
) -> None:
    """Every tiny site's validation split is below min_cell: nothing to select on, said so."""
    from safetensors.numpy import load_file

    from multimodal_fl.engines.federated import validation_score
    from multimodal_fl.federated.checkpoint import load_checkpoint
    from multimodal_fl.federated.server import RoundRecord

    _, run = uninterrupted
    metrics = json.loads((run / "metrics.json").read_text())
    for r in metrics["rounds"]:
        assert all(m == {} for m in r["eval_metrics"].values())  # suppressed at every site
        assert validation_score(RoundRecord(round=r["round"],
                                            eval_documents=r["eval_documents"])) is None
    assert metrics["selected_round"] == metrics["completed_rounds"] == 3
    detail = metrics["selection_detail"]
    assert detail["rule"] == "the last round"
    assert detail["note"].startswith("no round had a pooled validation AUC")
    assert not (run / "checkpoint" / "best.safetensors").exists()
    last = load_checkpoint(run / "checkpoint")
    assert last is not None and last.round == 3
    final = load_file(str(run / "model.safetensors"))
    assert final.keys() == last.weights.keys()
    assert all((last.weights[k] == final[k]).all() for k in final)


def test_the_best_round_is_chosen_on_the_pooled_validation_histograms() -> None:
    from multimodal_fl.engines.federated import pooled_validation, validation_score
    from multimodal_fl.evaluation.histograms import counts_histogram, label_counts
    from multimodal_fl.evaluation.metrics import binary_metrics
    from multimodal_fl.federated.server import RoundRecord

    rng = np.random.default_rng(3)
    y = {"a": rng.integers(0, 2, 40), "b": rng.integers(0, 2, 30)}
    s = {k: np.clip(0.5 + 0.3 * (v - 0.5) + rng.normal(0, 0.2, v.size), 0, 1)
         for k, v in y.items()}

    def doc(site: str) -> dict[str, object]:
        pos, neg = label_counts(y[site], s[site])
        return {"validation": {"n_bins": 100, "pos": counts_histogram(pos, min_cell=5),
                               "neg": counts_histogram(neg, min_cell=5)}}

    record = RoundRecord(round=1, eval_documents={"a": doc("a"), "b": doc("b")},
                         eval_metrics={"a": {"val_auc": 0.99}, "b": {"val_auc": 0.01}})
    pooled = validation_score(record)
    exact = binary_metrics(np.concatenate([y["a"], y["b"]]), np.concatenate([s["a"], s["b"]]),
                           metrics=["auc"])["auc"].value
    # the pooled histograms' AUC, not the sites' own AUCs (which say 0.99 and 0.01)
    assert pooled is not None and abs(pooled - exact) < 0.03
    assert "70 patients of 2 site(s)" in pooled_validation(record)[1]
    only_a = RoundRecord(round=2, eval_documents={"a": doc("a")})
    assert validation_score(only_a) is not None
    one_class = {"validation": {"n_bins": 100, "pos": {"start": [], "stop": [], "count": []},
                                "neg": {"start": [0], "stop": [100], "count": [9]}}}
    none = RoundRecord(round=3, eval_documents={"c": one_class})
    assert validation_score(none) is None
    assert "one class only" in pooled_validation(none)[1]


def test_a_round_is_not_chosen_on_one_sites_validation() -> None:
    """Four sites evaluated and only one disclosed (its validation the others' too small): a
    round chosen on it would be chosen for it (the sample COVID-19 cohort's best round on
    site_b alone tested 0.573 against the last round's 0.688), so there is no pooled AUC."""
    from multimodal_fl.engines.federated import pooled_validation, validation_score
    from multimodal_fl.evaluation.histograms import counts_histogram, label_counts
    from multimodal_fl.federated.server import RoundRecord

    rng = np.random.default_rng(4)

    def doc(n: int) -> dict[str, object]:
        y = rng.integers(0, 2, n)
        pos, neg = label_counts(y, np.clip(0.5 + 0.2 * (y - 0.5) + rng.normal(0, 0.2, n), 0, 1))
        return {"validation": {"n_bins": 100, "pos": counts_histogram(pos, min_cell=5),
                               "neg": counts_histogram(neg, min_cell=5)}}

    evaluated = {s: {} for s in ("a", "b", "c", "d")}
    one = RoundRecord(round=1, eval_metrics=evaluated, eval_documents={"b": doc(60)})
    assert validation_score(one) is None
    assert "only 1 site(s) (b) disclosed" in pooled_validation(one)[1]
    three = RoundRecord(round=1, eval_metrics=evaluated,
                        eval_documents={s: doc(60) for s in ("a", "b", "c")})
    assert validation_score(three) is not None


def test_stop_after_round_then_resume_equals_uninterrupted(
    uninterrupted: tuple[Path, Path], tmp_path: Path
) -> None:
    config, full = uninterrupted
    runner = CliRunner()
    staged = tmp_path / "staged"
    r2 = runner.invoke(
        app, ["train", str(config), "--out", str(staged), "--stop-after-round", "1", "--quiet"]
    )
    assert r2.exit_code == 0, r2.output
    assert json.loads((staged / "metrics.json").read_text())["stopped_after_round"] == 1
    r3 = runner.invoke(app, ["train", "--resume", str(staged), "--quiet"])
    assert r3.exit_code == 0, r3.output
    assert model_bytes(full) == model_bytes(staged)


def test_sigkill_mid_round_then_resume_equals_uninterrupted(
    uninterrupted: tuple[Path, Path], tmp_path: Path
) -> None:
    """A separate process, killed mid-round and resumed, ends with the same bytes."""
    config, full = uninterrupted
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "multimodal_fl", "train", str(config), "--quiet"]
    proc = subprocess.Popen([*cmd, "--out", str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = killed / "checkpoint" / "round_00001.safetensors"
    deadline = time.monotonic() + 240
    try:
        while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert first.exists(), "round 1 checkpoint never appeared"
        # round 2 starts as soon as round 1's checkpoint is written: kill now, mid-round
        if proc.poll() is not None:
            pytest.skip("the run finished before it could be killed mid-round")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert not (killed / "model.safetensors").exists()
    resumed = subprocess.run([*cmd[:3], "train", "--resume", str(killed), "--quiet"],
                             env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert model_bytes(full) == model_bytes(killed)


def test_run_config_from_the_typed_experiment_config(tiny_config: Callable[..., Path]) -> None:
    from multimodal_fl.config import FederatedConfig
    from multimodal_fl.engines.federated import (
        ENGINE_FIELDS,
        LOOP_FIELDS,
        SITE_FIELDS,
        run_config,
    )

    cfg = load_config(tiny_config(federated={"algorithm": "fedprox", "mu": 0.3, "local_steps": 7,
                                             "timeout_s": 9.0}, seed=5))
    config = run_config(cfg)
    assert config.optimizer.name == "fedprox" and config.proximal_mu == 0.3
    assert config.fit_config == {"local_steps": 7, "lr": cfg.training.lr}
    assert config.timeout == 9.0 and config.seed == 5
    assert config.min_sites == cfg.federated.min_sites and config.rounds == cfg.federated.rounds
    adam = run_config(cfg.model_copy(update={"federated": cfg.federated.model_copy(
        update={"algorithm": "fedadam", "server_lr": 0.1})}))
    assert adam.proximal_mu == 0.0 and adam.optimizer.eta == 0.1
    # a new federated field must be mapped onto the loop or named as the engine's own
    assert set(FederatedConfig.model_fields) == LOOP_FIELDS | ENGINE_FIELDS | SITE_FIELDS
