"""Evaluation: metrics with intervals, fairness tables, federated (histogram) evaluation.

Public API
----------
- :func:`fairness_report` -- per-site / per-subgroup tables on fairlearn's ``MetricFrame`` with
  small-cell suppression (:mod:`.fairness`).
- :func:`cross_site_matrix`, :func:`local_vs_federated` -- generalisability tables.
- :func:`binary_metrics`, :func:`bootstrap_ci`, :func:`choose_threshold`, :class:`MetricValue`
  (:mod:`.metrics`).
- :func:`summarise_site`, :func:`pooled_evaluation` -- what a site sends and what the server
  pools from it (:mod:`.histograms`).
- :func:`~multimodal_fl.evaluation.disclosed.site_disclosure`,
  :func:`~multimodal_fl.evaluation.disclosed.read_disclosure` -- a site's report document, built
  at the site under the small-cell rules, and its typed reader (:mod:`.disclosed`, a layer
  above the others: import it from its module).

The report (:mod:`.report`: ``report.json`` and ``report.html`` from run directories) sits a
layer higher (beside ``pca`` and ``federated``, below the engines); it is not imported here.
"""

from multimodal_fl.evaluation.fairness import (
    CrossSiteResult,
    FairnessReport,
    cross_site_matrix,
    fairness_report,
    local_vs_federated,
)
from multimodal_fl.evaluation.histograms import (
    PooledEvaluation,
    SiteEvaluation,
    pooled_evaluation,
    summarise_site,
)
from multimodal_fl.evaluation.metrics import (
    MetricValue,
    binary_metrics,
    bootstrap_ci,
    choose_threshold,
)

__all__ = [
    "CrossSiteResult",
    "FairnessReport",
    "MetricValue",
    "PooledEvaluation",
    "SiteEvaluation",
    "binary_metrics",
    "bootstrap_ci",
    "choose_threshold",
    "cross_site_matrix",
    "fairness_report",
    "local_vs_federated",
    "pooled_evaluation",
    "summarise_site",
]
