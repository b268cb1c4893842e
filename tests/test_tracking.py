"""Optional experiment tracking of federated rounds (TensorBoard / MLflow when installed)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from multimodal_fl.config import load_config
from multimodal_fl.engines.federated import run_federated_experiment
from multimodal_fl.engines.tracking import RoundTracker
from multimodal_fl.federated.gather import StageFailed
from multimodal_fl.federated.server import RoundRecord


def test_missing_tracker_package_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # makes `import mlflow` fail
    with pytest.raises(StageFailed, match="pip install mlflow"):
        RoundTracker("mlflow", tmp_path)


def test_no_tracker_logs_nothing(tmp_path: Path) -> None:
    tracker = RoundTracker("none", tmp_path)
    tracker.log(RoundRecord(round=1, train_loss=0.5))
    tracker.close()
    assert list(tmp_path.iterdir()) == []


def test_tensorboard_receives_every_round(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    pytest.importorskip("tensorboard", reason="tensorboard not installed (optional)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config(tiny_config("covid_oxygen", federated={"tracker": "tensorboard"}))
    run = run_federated_experiment(cfg, tmp_path / "run").run_dir
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2]
    # every tiny site's validation split is below min_cell: no validation figure is logged
    assert acc.Tags()["scalars"] == ["train/loss"]


def test_tracker_logs_what_sites_disclosed_and_the_pooled_auc(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="tensorboard not installed (optional)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from multimodal_fl.engines.tracking import RoundTracker
    from multimodal_fl.federated.server import RoundRecord

    hist = {"n_bins": 10, "pos": {"start": [6], "stop": [10], "count": [5]},
            "neg": {"start": [0], "stop": [4], "count": [7]}}
    record = RoundRecord(round=1, train_loss=0.5, eval_metrics={"a": {"val_auc": 1.0}},
                         eval_documents={"a": {"validation": hist}})
    tracker = RoundTracker("tensorboard", tmp_path)
    tracker.log(record)
    tracker.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["a/val_auc", "pooled/val_auc", "train/loss"]
    assert acc.Scalars("pooled/val_auc")[0].value == 1.0
