"""The fairness and generalisability report: ``report.json`` and one self-contained ``report.html``.

Built from run directories alone (never runs a model), in three steps:

- :mod:`.load` -- read a run directory: the typed config (:class:`ReportConfig`), ``metrics.json``
  and the sites' predictions (:func:`load_run`, :class:`RunData`); :mod:`.compare` -- which
  runs may share a report (the same task, data, seed, splits and evaluation settings; never
  one run twice) and their labels (:func:`load_runs`);
- :mod:`.compute` -- the report document: fairness tables, federated (histogram-pooled)
  evaluation, the cross-site matrix, the change from local-only training and the training
  curves (:func:`build_report`);
- :mod:`.html` -- figures as base64 PNG and the HTML page; :func:`write_report` writes
  ``report.json`` and ``report.html``.
"""

from multimodal_fl.evaluation.report.compare import (
    IncomparableRuns,
    comparable_labels,
    load_runs,
)
from multimodal_fl.evaluation.report.compute import SPLIT, build_report, json_ready, run_thresholds
from multimodal_fl.evaluation.report.html import SECTIONS, STATUS_SCRIPT, write_report
from multimodal_fl.evaluation.report.load import (
    ReportConfig,
    RunData,
    RunIdentity,
    load_run,
    read_identity,
    read_report_config,
)

__all__ = [
    "SECTIONS",
    "SPLIT",
    "STATUS_SCRIPT",
    "IncomparableRuns",
    "ReportConfig",
    "RunData",
    "RunIdentity",
    "build_report",
    "comparable_labels",
    "json_ready",
    "load_run",
    "load_runs",
    "read_identity",
    "read_report_config",
    "run_thresholds",
    "write_report",
]
