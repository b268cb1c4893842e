"""The fairness and generalisability report: ``report.json`` and one self-contained ``report.html``.

Built from what the sites disclosed (never runs a model, never reads a patient row), in three
steps:

- :mod:`.load` -- read a run directory: the typed config (:class:`ReportConfig`), ``metrics.json``,
  the sites' disclosed documents (``disclosed/<site>.json``) and the cross-site matrix
  (``cross_site.json``) (:func:`load_run`, :class:`RunData`; a run made before sites disclosed
  is refused in one line, :class:`OldRunDirectory`); :mod:`.compare` -- which runs may share a
  report (the same task, data, seed, splits and evaluation settings; never one run twice) and
  their labels (:func:`load_runs`);
- :mod:`.compute` -- the report document: fairness tables, federated (histogram-pooled)
  evaluation, the cross-site matrix, the change from local-only training and the training
  curves (:func:`build_report`, :func:`report_from_runs`; :func:`run_from_frame` for a
  predictions DataFrame, through the same site-side builder), each run named by what it is
  (:data:`RUN_LABELS`: ``federated (in-process)``, ``local-only``, ...);
- :mod:`.html` -- the figures (``*_figure`` functions return matplotlib figures) and the HTML
  page; :func:`write_report` writes ``report.json`` and ``report.html`` for run directories,
  :func:`write_frame_report` for a predictions DataFrame of your own.
"""

from multimodal_fl.evaluation.report.compare import (
    IncomparableRuns,
    comparable_labels,
    load_runs,
)
from multimodal_fl.evaluation.report.compute import (
    FRAME_LABEL,
    RUN_LABELS,
    SPLIT,
    build_report,
    global_threshold,
    json_ready,
    report_from_runs,
    run_from_frame,
    run_label,
    run_thresholds,
)
from multimodal_fl.evaluation.report.html import (
    SECTIONS,
    STATUS_SCRIPT,
    calibration_figure,
    change_figure,
    cross_site_figure,
    forest_figure,
    roc_figure,
    training_figure,
    write_frame_report,
    write_report,
)
from multimodal_fl.evaluation.report.load import (
    OldRunDirectory,
    ReportConfig,
    RunData,
    RunIdentity,
    load_run,
    read_identity,
    read_report_config,
)

__all__ = [
    "FRAME_LABEL",
    "RUN_LABELS",
    "SECTIONS",
    "SPLIT",
    "STATUS_SCRIPT",
    "IncomparableRuns",
    "OldRunDirectory",
    "ReportConfig",
    "RunData",
    "RunIdentity",
    "build_report",
    "calibration_figure",
    "change_figure",
    "comparable_labels",
    "cross_site_figure",
    "forest_figure",
    "global_threshold",
    "json_ready",
    "load_run",
    "load_runs",
    "read_identity",
    "read_report_config",
    "report_from_runs",
    "roc_figure",
    "run_from_frame",
    "run_label",
    "run_thresholds",
    "training_figure",
    "write_frame_report",
    "write_report",
]
