"""Optional experiment tracking of each round: TensorBoard or MLflow, when installed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from multimodal_fl.evaluation.histograms import pooled_auc
from multimodal_fl.federated.gather import StageFailed
from multimodal_fl.federated.server import RoundRecord

__all__ = ["RoundTracker"]


class RoundTracker:
    """Optional experiment tracking of each round: TensorBoard or MLflow, when installed.

    Logs ``train/loss``, ``<site>/<metric>`` (the validation metrics a site disclosed) and
    ``pooled/val_auc`` (the AUC of the sites' disclosed validation histograms added, when
    defined) with the round as the step. Only what the server already holds is logged.

    Parameters
    ----------
    kind : {"none", "tensorboard", "mlflow"}
    run_dir : Path
        TensorBoard writes to ``run_dir/tensorboard``, MLflow to ``run_dir/mlruns``.

    Raises
    ------
    StageFailed
        When the chosen package is not installed (the message says what to install).
    """

    def __init__(self, kind: str, run_dir: Path) -> None:
        self.kind = kind
        self._writer: Any = None
        self._mlflow: Any = None
        if kind == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise StageFailed(
                    "federated.tracker 'tensorboard' needs the tensorboard package: "
                    "pip install tensorboard (or set federated.tracker: none)"
                ) from None
            self._writer = SummaryWriter(str(run_dir / "tensorboard"))
        elif kind == "mlflow":
            try:
                import mlflow
            except ImportError:
                raise StageFailed(
                    "federated.tracker 'mlflow' needs the mlflow package: pip install mlflow "
                    "(or set federated.tracker: none)"
                ) from None
            mlflow.set_tracking_uri((run_dir / "mlruns").resolve().as_uri())
            mlflow.start_run(run_name=run_dir.name)
            self._mlflow = mlflow

    def log(self, record: RoundRecord) -> None:
        """Log one completed round."""
        values: dict[str, float] = {}
        if record.train_loss is not None:
            values["train/loss"] = float(record.train_loss)
        for site, metrics in sorted(record.eval_metrics.items()):
            for name, value in sorted(metrics.items()):
                values[f"{site}/{name}"] = float(value)
        docs = record.disclosed_validation()
        auc = pooled_auc(docs)[0] if docs else None
        if auc is not None:
            values["pooled/val_auc"] = auc
        if self._writer is not None:
            for key, value in values.items():
                self._writer.add_scalar(key, value, record.round)
            self._writer.flush()
        if self._mlflow is not None:
            self._mlflow.log_metrics({k.replace("/", "."): v for k, v in values.items()},
                                     step=record.round)

    def close(self) -> None:
        """Flush and close the tracker."""
        if self._writer is not None:
            self._writer.close()
        if self._mlflow is not None:
            self._mlflow.end_run()

