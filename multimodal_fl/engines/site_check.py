"""``mmfl site check``: a hospital's dry run before it joins a federation.

:func:`site_check` shows a site its disclosure policy (``policy.yaml``, and where each value
came from) and, with an experiment config, what each request kind would release from its
data: it builds the site exactly as a run does (:class:`~multimodal_fl.federated.site.
FusionSite`, with the config's task) and asks it each kind through its disclosure gate,
writing nothing (no egress log, no predictions, the embedding cache in a temporary folder
unless ``data.cache_dir`` or ``$MMFL_CACHE`` say otherwise). Every figure in the result is the
hospital's own, shown to the hospital; the ``released`` and ``suppressed`` columns say what
would leave.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from multimodal_fl.config import DEFAULT_MIN_CELL, ConfigError, ExperimentConfig, SiteConfig
from multimodal_fl.engines.federated import fit_settings
from multimodal_fl.federated.disclosure import pca_rank_cap, site_policy
from multimodal_fl.federated.protocol import (
    Kind,
    Reply,
    Request,
    SiteError,
    SiteRefused,
)
from multimodal_fl.federated.secure_sum import MIN_SITES, step_request
from multimodal_fl.federated.secure_update import SecureAggregation
from multimodal_fl.federated.site import (
    POOLED_TEST,
    POOLED_VALIDATION,
    FusionSite,
    state_to_numpy,
)
from multimodal_fl.federated.site_state import SiteState, SiteStateError
from multimodal_fl.training import SiteData, load_site_data

__all__ = ["site_check"]


def site_check(
    site_dir: str | os.PathLike[str], cfg: ExperimentConfig | None = None, *,
    name: str | None = None, node_config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A site's policy and, with ``cfg``, what each request kind would release from its data.

    Parameters
    ----------
    site_dir : path-like
        The site directory.
    cfg : ExperimentConfig or None
        The experiment the site would join (its task, modalities, ``evaluation.min_cell``).
    name : str or None
        The site's name (default: the config's name for this directory, else its folder's).
    node_config : mapping or None
        The SuperNode's node config (``min-cell``, ..., ``policy-file``) when the site will
        run as one: the policy in force is the stricter of it and ``policy.yaml``.

    Returns
    -------
    dict
        ``site``, ``site_dir``, ``policy``, ``origin`` (per field, where it came from),
        ``state`` when the policy names a ``state_dir`` (:meth:`~multimodal_fl.federated.
        site_state.SiteState.summary`: the epsilon spent and the sums recorded so far), and
        with ``cfg``: ``min_cell`` (floor, policy, config, effective), ``splits`` (patients and
        positives per split, and whether each count may leave) and ``kinds`` (per request
        kind, each asked through the site's own gate (``pca``: the gate's rank cap and refusal,
        computed beside it): released or refused, what it carries,
        what was suppressed, and ``holds``: the vector it keeps for a secure sum; ``pca``:
        per modality the rows it may carry, or the policy's refusal; ``secure_sum``: per
        vector held, the gate's answer to its first step).

    Raises
    ------
    multimodal_fl.config.ConfigError
        For a bad ``policy.yaml`` (one line).
    multimodal_fl.data.DataError
        When the site's data cannot be read under the config's policy.
    """
    folder = Path(site_dir)
    policy, origin = site_policy(folder, node_config)
    doc: dict[str, Any] = {"site": name or folder.name, "site_dir": str(folder),
                           "policy": policy.model_dump(), "origin": origin}
    if policy.state_dir is not None:  # what every earlier run has spent and summed
        try:
            doc["state"] = SiteState(policy.state_dir, name or folder.name).summary()
        except SiteStateError as exc:
            raise ConfigError(str(exc)) from None
    if cfg is None:
        return doc
    known = [s.name for s in cfg.sites if Path(s.path).resolve() == folder.resolve()]
    pooled = len(cfg.sites) >= MIN_SITES  # a federated run's predict asks so (predict_stage)
    site_name = name or (known[0] if known else folder.name)
    doc["site"] = site_name
    cfg = cfg.model_copy(update={
        "sites": [SiteConfig(name=site_name, path=folder)],
        "evaluation": cfg.evaluation.model_copy(update={"n_boot": 0}),
    })
    cfg = cfg.in_zone_of(policy)  # also a SuperNode's policy-file zone, not only policy.yaml's
    m = policy.effective_min_cell(cfg.evaluation.min_cell)
    doc["min_cell"] = {"package floor": DEFAULT_MIN_CELL, "policy": policy.min_cell,
                       "config": cfg.evaluation.min_cell, "effective": m}
    with tempfile.TemporaryDirectory(prefix="mmfl-site-check-") as tmp:
        data = load_site_data(cfg, Path(tmp))[site_name]
        entries: list[dict[str, Any]] = []
        # keep_state=False: a state_dir is read (the budget spent so far), never written
        site = FusionSite(site_name, cfg, data, policy=policy, keep_state=False)
        site.gate.on_record = entries.append
        doc["splits"] = _splits(data, m)
        doc["kinds"] = _ask_every_kind(site, cfg, entries, pooled=pooled)
    return doc


def _splits(data: SiteData, min_cell: int) -> dict[str, dict[str, Any]]:
    """Patients and positives per split, and whether each count is one that may leave."""
    out = {}
    for split in ("train", "val", "test"):
        part = data.part(split)
        n, pos = len(part), int(part.labels.sum())
        out[split] = {"n": n, "positives": pos,
                      "counts_may_leave": all(k == 0 or k >= min_cell for k in (n, pos, n - pos))
                      and n >= min_cell}
    return out


def _ask(site: FusionSite, request: Request, entries: list[dict[str, Any]]
         ) -> tuple[Reply | None, dict[str, Any]]:
    """One request through the site's gate: its reply (or none) and its egress entry."""
    try:
        reply: Reply | None = site.handle(request)
    except (SiteRefused, SiteError):
        reply = None
    entry = dict(entries[-1]) if entries else {}
    for key in ("time", "site", "policy", "round"):
        entry.pop(key, None)
    return reply, entry


def _ask_every_kind(site: FusionSite, cfg: ExperimentConfig, entries: list[dict[str, Any]],
                    *, pooled: bool) -> dict[str, Any]:
    """Each kind of a run, in a run's order, through the gate (nothing is written)."""
    kinds: dict[str, Any] = {}
    _, kinds["info"] = _ask(site, Request(Kind.INFO, 0), entries)
    init, kinds["init"] = _ask(site, Request(Kind.INIT, 0), entries)
    weights = init.weights if init is not None else state_to_numpy(site.model)
    if "tabular" in site.data.train.modalities:
        _, kinds["moments"] = _ask(site, Request(Kind.MOMENTS, 0), entries)
    kinds["pca"] = _pca(site)
    fit = fit_settings(cfg, local_steps=1).to_config()
    if cfg.federated.secure_aggregation:  # the update stays for the secure sum: none leaves
        fit.update(SecureAggregation(clip=cfg.federated.secure_clip).to_config())
    _, kinds["fit"] = _ask(site, Request(Kind.FIT, 1, weights=weights, config=dict(fit)),
                           entries)
    _, kinds["evaluate"] = _ask(site, Request(Kind.EVALUATE, 1, weights=weights), entries)
    _, kinds["calibrate"] = _ask(site, Request(Kind.CALIBRATE, 1, weights=weights), entries)
    _, kinds["predict"] = _ask(site, Request(Kind.PREDICT, 1, weights=weights,
                                             config={"pooled": pooled}), entries)
    kinds["secure_sum"] = _secure_sums(site, kinds, entries)
    return kinds


def _pca(site: FusionSite) -> dict[str, Any]:
    """Per modality and split: the rows of ``S·Vᵀ`` a PCA summary may carry (0: the site
    declines) at the gate's ``min_cell`` for a ``pca`` request, or, when the gate's policy
    does not answer ``pca`` requests (its ``answers``), that reason on every row."""
    request = Request(Kind.PCA, 0)
    policy = site.gate.policy
    declined = (None if policy.answers_kind(request.kind.value)
                else policy.refusal(request.kind.value))
    min_cell = site.gate.min_cell(request)
    out: dict[str, Any] = {}
    for split in ("train", "all"):
        part = site.data.part(split)
        for j, modality in enumerate(part.modalities):
            n = int(part.mask[:, j].sum())
            out[f"{modality} ({split})"] = (
                {"n": n, "rank_cap": 0, "refused": declined} if declined
                else {"n": n, "rank_cap": pca_rank_cap(n, min_cell)})
    return out


#: The vectors a site holds for a secure sum, by the kind whose request makes it hold them.
HELD_BY = {POOLED_VALIDATION: "calibrate", POOLED_TEST: "predict"}


def _secure_sums(site: FusionSite, kinds: dict[str, Any], entries: list[dict[str, Any]]
                 ) -> dict[str, Any]:
    """Each vector the site holds for a secure sum, through the gate: its first step."""
    out: dict[str, Any] = {}
    for vector in sorted(site.secure.held):
        kind = HELD_BY.get(vector)
        if kind in kinds:
            kinds[kind]["holds"] = vector
        _, out[vector] = _ask(site, step_request("advertise", vector, 1), entries)
    return out
