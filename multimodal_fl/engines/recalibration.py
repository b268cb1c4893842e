"""The recalibration stage: fit ``evaluation.recalibrate`` on the pooled validation split.

Between the server loop and ``predict`` (:func:`recalibration_stage`), every site scores its
validation split with the final model (the ``calibrate`` request) and holds the fine counts of
those scores per label (:data:`~multimodal_fl.federated.site.POOLED_VALIDATION`); a secure sum
(:func:`~multimodal_fl.federated.pooling.secure_total`, at least three sites) gives the server
their total only, on which it fits the recalibration
(:func:`~multimodal_fl.evaluation.recalibration.fit_recalibration`, each fine bin's patients at
its midpoint). The server keeps that histogram to itself: ``metrics.json`` gets the two
parameters, what they were fitted on and the pooled validation size, never the counts. The
parameters travel with the ``predict`` request, so every site applies the same map before it
writes its predictions and computes its disclosed document.

With fewer than three sites taking part the secure sum is refused; the stage then falls back to
what the sites disclosed anyway: the counts-only validation histograms of the selected round's
``evaluate`` replies (bins merged at each site until they hold 0 or ``min_cell`` patients,
spread evenly over their fine bins), which score the same weights. When those are missing too
(every site's validation split below ``min_cell``), the scores are not recalibrated, and
``metrics.json`` and the console say why.

The baselines do the same on their own validation splits: the centralized model on the pooled
validation split in process (:func:`fit_on_scores`, the same fit on the same histogram), each
local-only model at its own site.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from multimodal_fl.config import ExperimentConfig
from multimodal_fl.evaluation.histograms import OVERALL
from multimodal_fl.evaluation.recalibration import (
    Recalibration,
    RecalibrationError,
    fit_recalibration,
)
from multimodal_fl.federated.gather import StageFailed, gather
from multimodal_fl.federated.pooling import secure_total
from multimodal_fl.federated.protocol import ConfigValue, Kind, Request, StateDict
from multimodal_fl.federated.server import Federation, RoundRecord
from multimodal_fl.federated.site import POOLED_VALIDATION, RECALIBRATION_FILE

__all__ = [
    "RECALIBRATION_FILE",
    "disclosed_validation_counts",
    "local_summary",
    "predict_config",
    "recalibration_line",
    "recalibration_stage",
    "skipped",
]

log = logging.getLogger(__name__)


def skipped(method: str, reason: str) -> dict[str, Any]:
    """``metrics.json``'s ``recalibration`` entry of a run whose scores were left as they are.

    Parameters
    ----------
    method : str
    reason : str

    Returns
    -------
    dict
    """
    return {"method": method, "applied": False, "reason": reason}


def _applied(fitted: Recalibration) -> dict[str, Any]:
    return {**fitted.to_dict(), "applied": True}


def disclosed_validation_counts(docs: Mapping[str, Mapping[str, Any]]
                                ) -> tuple[np.ndarray, np.ndarray] | None:
    """The sites' counts-only validation histograms, pooled on the fine grid.

    Each merged bin's patients are spread evenly over its fine bins (as
    :func:`~multimodal_fl.evaluation.histograms.counts_summary` reads them).

    Parameters
    ----------
    docs : mapping of site to its ``validation`` document
        ``{"n_bins", "pos": {"start", "stop", "count"}, "neg": {...}}``.

    Returns
    -------
    (neg, pos) : two float arrays of ``n_bins``, or None
        ``None`` without a document, or when they disagree on ``n_bins``.
    """
    grids = {int(d["n_bins"]) for d in docs.values()}
    if len(grids) != 1:
        return None
    n_bins = grids.pop()
    out = {label: np.zeros(n_bins) for label in ("neg", "pos")}
    for doc in docs.values():
        for label, fine in out.items():
            part = doc[label]
            for a, b, k in zip(part["start"], part["stop"], part["count"], strict=True):
                fine[int(a):int(b)] += float(k) / (int(b) - int(a))
    return out["neg"], out["pos"]


def _fit_combined(vector: np.ndarray, contributors: list[str], record: RoundRecord | None,
                  method: str) -> tuple[Recalibration | None, str]:
    """Fit on the secure sum of the sites that released nothing of their validation split,
    plus the histograms the other sites disclosed at the selected round's ``evaluate``.

    A site whose validation class counts are released does not join the sum (its histogram
    would let the total be differenced into the others' hidden counts); its disclosed
    histogram of the same model's scores is added here instead.
    """
    half = vector.size // 2
    neg, pos = vector[:half].astype(np.float64), vector[half:].astype(np.float64)
    docs = {} if record is None else record.disclosed_validation(exclude=contributors)
    counts = disclosed_validation_counts(docs) if docs else None
    source = (f"the secure sum of the validation histograms of {len(contributors)} sites "
              f"({', '.join(contributors)})")
    if counts is not None and counts[0].size == half:
        neg, pos = neg + counts[0], pos + counts[1]
        source += (f" and the validation histograms of round {record.round if record else '?'}"
                   f" disclosed by {', '.join(sorted(docs))}")
    try:
        return fit_recalibration(neg, pos, method=method, source=source), ""
    except RecalibrationError as exc:
        return None, f"{exc} (on {source})"


def _from_disclosed(record: RoundRecord | None, method: str, why: str
                    ) -> tuple[Recalibration | None, str]:
    """The fallback fit on the selected round's disclosed validation histograms."""
    docs = {} if record is None else record.disclosed_validation()
    counts = disclosed_validation_counts(docs) if docs else None
    if counts is None:
        return None, (f"{why}; and no site disclosed a validation histogram of the selected "
                      "round: the scores are not recalibrated")
    source = (f"the counts-only validation histograms of round {record.round if record else '?'}"
              f" disclosed by {', '.join(sorted(docs))} (the secure sum: {why})")
    try:
        return fit_recalibration(*counts, method=method, source=source), ""
    except RecalibrationError as exc:
        return None, f"{why}; the disclosed validation histograms: {exc}"


def recalibration_stage(
    federation: Federation, cfg: ExperimentConfig, sites: list[str], weights: StateDict,
    round: int, record: RoundRecord | None = None,
) -> tuple[Recalibration | None, dict[str, Any]]:
    """Fit the recalibration of ``weights`` on the sites' pooled validation split.

    Parameters
    ----------
    federation : Federation
    cfg : ExperimentConfig
        ``evaluation.recalibrate`` (the method), ``evaluation.histogram_bins``.
    sites : list of str
    weights : dict
        The final model.
    round : int
        The requests' round.
    record : RoundRecord or None
        The selected round's record (its ``evaluate`` documents are the fallback with fewer
        than three sites).

    Returns
    -------
    recalibration : Recalibration or None
        ``None``: the scores are left as they are.
    doc : dict
        ``metrics.json``'s ``recalibration`` entry (``method``, ``applied``, and ``a``, ``b``,
        ``n``, ``source``, or ``reason``).
    """
    method = cfg.evaluation.recalibrate
    if method == "none":
        return None, skipped(method, "evaluation.recalibrate: none")
    try:
        held = gather(federation, {s: Request(Kind.CALIBRATE, round, weights=weights,
                                              config={"fedbn": cfg.federated.fedbn})
                                   for s in sites},
                      cfg.federated.timeout_s, stage=Kind.CALIBRATE, minimum=1)
    except StageFailed as exc:
        held, why = {}, f"no site scored its validation split ({exc})"
    if held:
        total = secure_total(federation, sorted(held), POOLED_VALIDATION, round=round,
                             timeout=cfg.federated.timeout_s)
        why = total.refused or (f"no site sent its {OVERALL!r} validation histogram"
                                if OVERALL not in total.parts else "")
    if why:  # no secure sum: what the sites disclosed anyway
        fitted, reason = _from_disclosed(record, method, why)
    else:
        fitted, reason = _fit_combined(total.parts[OVERALL], total.contributors[OVERALL],
                                       record, method)
    if fitted is None:
        log.info("recalibration: %s", reason)
        return None, skipped(method, reason)
    log.info("recalibration: %s a=%.4f b=%.4f from %s", method, fitted.a, fitted.b,
             fitted.source)
    return fitted, _applied(fitted)


def predict_config(cfg: ExperimentConfig, fitted: Recalibration | None,
                   doc: Mapping[str, Any] | None, *, local: bool = False
                   ) -> dict[str, ConfigValue]:
    """The ``predict`` request's recalibration settings.

    Parameters
    ----------
    cfg : ExperimentConfig
    fitted : Recalibration or None
        The server's fit (the global model).
    doc : mapping or None
        :func:`recalibration_stage`'s entry (its ``reason`` and ``source`` go to the sites).
    local : bool
        Each site scores its own local-only model: it fits its own recalibration at home.

    Returns
    -------
    dict
    """
    method = cfg.evaluation.recalibrate
    if local or method == "none":
        return {"recalibrate": method}
    if fitted is None:
        reason = (doc or {}).get("reason") or "not fitted"
        return {"recalibrate": method, "recalibrate_reason": str(reason)}
    return {**fitted.to_config(), "recalibrate_source": fitted.source}


def recalibration_line(metrics: Mapping[str, Any]) -> str | None:
    """One console line on the run's recalibration (``None`` for a run without the entry).

    Parameters
    ----------
    metrics : mapping
        The run's ``metrics.json``.

    Returns
    -------
    str or None
    """
    doc = metrics.get("recalibration")
    if not isinstance(doc, Mapping):
        return None
    method = doc.get("method")
    if doc.get("applied"):
        return (f"recalibration: {method}, score' = expit({doc['a']:.3f} + {doc['b']:.3f} "
                f"logit(score)), fitted on {doc.get('source')}")
    sites = doc.get("sites")
    if isinstance(sites, Mapping):  # one per site (local-only models)
        done = sorted(s for s, d in sites.items() if d.get("applied"))
        rest = {s: d.get("reason") for s, d in sites.items() if not d.get("applied")}
        parts = [f"{method} at {', '.join(done)} (each on its own validation split)"] if done \
            else []
        parts += [f"not at {s} ({why})" for s, why in sorted(rest.items())]
        return "recalibration: " + "; ".join(parts or ["none"])
    return f"recalibration: not applied ({doc.get('reason')})"


def local_summary(cfg: ExperimentConfig, disclosed: Mapping[str, Mapping[str, Any]]
                  ) -> dict[str, Any]:
    """``metrics.json``'s ``recalibration`` entry of a local-only run: per site, as it said.

    Parameters
    ----------
    cfg : ExperimentConfig
    disclosed : mapping of site to its disclosed document

    Returns
    -------
    dict
        ``method`` and ``sites``: per site ``applied`` and ``source`` or ``reason``.
    """
    sites = {}
    for site, doc in sorted(disclosed.items()):
        entry = doc.get("recalibration") or {}
        sites[site] = {k: entry.get(k) for k in ("applied", "source", "reason")}
    return {"method": cfg.evaluation.recalibrate, "sites": sites}
