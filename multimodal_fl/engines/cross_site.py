"""The local-only job's server side: every site trains alone, then cross-site validation.

This is NVFlare's cross-site validation over any :class:`~multimodal_fl.federated.server.
Federation` (in process or on Flower):

1. :func:`local_training_stage`: every site gets a ``local_train`` request, trains its own
   model to completion at home and replies with its weights only where its policy shares its
   local-only model (``share_local_model``, default true: the weights are the same kind of
   object as every fit reply of federated training). The server aggregates nothing.
2. :func:`cross_site_validation`: each shared local-only model goes to every other site in a
   ``cross_evaluate`` request; each site scores its own model from home. Every site scores on
   its own test split and discloses one cell under its small-cell rule. A model withheld by
   its site's policy gets :data:`WITHHELD` in every other site's cell of its row.

The server keeps only the disclosed cells: :func:`cross_site_validation` returns the
``cross_site.json`` document (:data:`~multimodal_fl.rundir.CROSS_SITE_FILE`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from multimodal_fl.config import ExperimentConfig
from multimodal_fl.federated.gather import StageFailed
from multimodal_fl.federated.protocol import ConfigValue, Doc, Kind, Reply, Request, SiteFailure
from multimodal_fl.federated.server import Federation

__all__ = [
    "CROSS_METRIC",
    "WITHHELD",
    "cross_site_validation",
    "local_model_name",
    "local_training_stage",
]

log = logging.getLogger(__name__)

#: The reason a cell of a model withheld by its site's policy shows.
WITHHELD = "withheld by policy"
#: The metric of the cross-site matrix.
CROSS_METRIC = "auc"


def local_model_name(site: str) -> str:
    """The name of ``site``'s local-only model in the matrix and the report (``local:<site>``).

    Parameters
    ----------
    site : str

    Returns
    -------
    str
    """
    return f"local:{site}"


def _answer(answers: Mapping[str, Reply | SiteFailure], site: str, kind: Kind
            ) -> Reply | str:
    """A site's good reply, or why there is none."""
    answer = answers.get(site)
    if isinstance(answer, Reply) and answer.site == site and answer.kind == kind:
        return answer
    return answer.reason if isinstance(answer, SiteFailure) else f"bad reply {answer!r}"


def local_training_stage(
    federation: Federation, sites: Sequence[str], *, engine: str,
) -> tuple[dict[str, Reply], dict[str, str]]:
    """Every site trains its local-only model at home (``local_train``); nothing is aggregated.

    Parameters
    ----------
    federation : Federation
    sites : sequence of str
    engine : str
        Recorded in the model files the sites keep.

    Returns
    -------
    trained : dict of str to Reply
        The sites that trained a model, in sorted order; a reply carries the model's weights
        only where the site shares it.
    notes : dict of str to str
        Why each other site has no local-only model (its refusal or failure).

    Raises
    ------
    StageFailed
        When no site trained a model.
    """
    requests = {s: Request(Kind.LOCAL_TRAIN, 0, config={"engine": engine}) for s in sites}
    # training to completion takes as long as it takes: no per-round timeout here
    answers = federation.broadcast(requests, None)
    trained: dict[str, Reply] = {}
    notes: dict[str, str] = {}
    for site in sorted(requests):
        answer = _answer(answers, site, Kind.LOCAL_TRAIN)
        if isinstance(answer, Reply):
            trained[site] = answer
        else:
            notes[site] = f"no local-only model: {answer}"
            log.warning("site %s: no local-only model: %s", site, answer)
    if not trained:
        detail = "; ".join(f"{s}: {r}" for s, r in notes.items()) or "no sites"
        raise StageFailed(f"stage 'local_train': no site trained a local-only model ({detail})")
    return trained, notes


def _cell(model: str, site: str, answer: Reply | str, metric: str) -> dict[str, Any]:
    """One matrix cell from a site's ``cross_evaluate`` reply (or why it has none)."""
    cell: dict[str, Any] = {"model": model, "test_site": site, "value": None, "lo": None,
                            "hi": None, "n": None, "suppressed": True}
    if not isinstance(answer, Reply):
        return cell | {"reason": f"not scored: {answer}"}
    doc = answer.document(Doc.CROSS_SITE)
    m = answer.metrics
    return cell | {
        "value": m.get(metric), "lo": m.get(f"{metric}/lo"), "hi": m.get(f"{metric}/hi"),
        "n": answer.n_samples or None,
        "suppressed": bool(doc.get("suppressed")) or metric not in m,
        "reason": doc.get("reason"),
    }


def cross_site_validation(
    federation: Federation, cfg: ExperimentConfig, sites: Sequence[str],
    trained: Mapping[str, Reply],
) -> dict[str, Any]:
    """Every local-only model scored on every site's test split, by the sites themselves.

    Parameters
    ----------
    federation : Federation
    cfg : ExperimentConfig
        ``evaluation.n_boot`` and ``seed`` (the cells' bootstrap), ``federated.timeout_s``.
    sites : sequence of str
        The test sites (every site of the federation).
    trained : mapping of str to Reply
        :func:`local_training_stage`'s replies: a reply without weights is a model its site
        keeps to itself.

    Returns
    -------
    dict
        The ``cross_site.json`` document: ``metric``, ``split``, ``n_boot``, ``seed``,
        ``min_cell`` (the config's; a site's policy may apply a stricter one, its cells say
        so), ``models`` (``local:<site>`` -> ``shared`` or :data:`WITHHELD`) and ``cells`` (one
        per (model, test site): ``model``, ``test_site``, ``value``, ``lo``, ``hi``, ``n``,
        ``suppressed``, ``reason``), as
        :meth:`~multimodal_fl.evaluation.fairness.CrossSiteResult.from_dict` reads it.
    """
    metric = CROSS_METRIC
    settings: dict[str, ConfigValue] = {"metric": metric, "n_boot": cfg.evaluation.n_boot,
                                        "seed": cfg.seed}
    models: dict[str, str] = {}
    cells: list[dict[str, Any]] = []
    for owner in sorted(trained):
        name = local_model_name(owner)
        weights = trained[owner].weights
        models[name] = "shared" if weights else WITHHELD
        requests = {
            t: Request(Kind.CROSS_EVALUATE, 0, weights={} if t == owner else weights,
                       config={"model": name, "model_site": owner, **settings})
            for t in sites if t == owner or weights
        }
        answers = federation.broadcast(requests, cfg.federated.timeout_s)
        for t in sorted(sites):
            if t in requests:
                cells.append(_cell(name, t, _answer(answers, t, Kind.CROSS_EVALUATE), metric))
            else:
                cells.append({"model": name, "test_site": t, "value": None, "lo": None,
                              "hi": None, "n": None, "suppressed": True, "reason": WITHHELD})
    return {"metric": metric, "split": "test", "n_boot": cfg.evaluation.n_boot,
            "seed": cfg.seed, "min_cell": cfg.evaluation.min_cell, "models": models,
            "cells": cells}
