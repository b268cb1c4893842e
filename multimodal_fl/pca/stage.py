"""The federated PCA stage of an experiment, shared by every engine.


When ``federated.pca.enabled`` is true, the frozen embeddings of one modality
(``federated.pca.modality``: ``text``, or ``image`` with ``modalities.image.frozen: true``)
are reduced to ``federated.pca.n_components`` dimensions before the fusion model is built:

* federated engines (in-process and Flower) run :func:`run_pca_stage` over the
  :class:`~multimodal_fl.federated.server.Federation` before ``init``: every site sends a
  ``pca`` summary of its training split's embeddings
  (:func:`~multimodal_fl.federated.pca.site_pca_reply`), the server merges them
  (:func:`~multimodal_fl.federated.pca.server_pca_merge`) and broadcasts ``pca_apply`` with
  :func:`projection_arrays` (mean, components, scale); each site replaces its embeddings by
  the projection (:func:`project_site_data`) and rebuilds its model, whose input width is
  now ``n_components``;
* the local and centralized engines, which hold every site's prepared data, call
  :func:`fit_pca_stage` (the same summaries and the same merge, in the same sorted site
  order, so the same projection bit for bit) and :func:`apply_pca_stage`.

The analysis command (``mmfl pca``, :mod:`multimodal_fl.pca.analysis`) uses the same
request kinds with ``split: all`` and, for tabular features, the pooled standardisation.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from multimodal_fl.config import ExperimentConfig, SitePolicy, load_policy
from multimodal_fl.federated.disclosure import pca_rank_cap
from multimodal_fl.federated.gather import gather
from multimodal_fl.federated.pca import (
    FederatedPCA,
    PCASummary,
    TruncationWarning,
    local_summary,
    server_pca_merge,
)
from multimodal_fl.federated.protocol import ConfigValue, Kind, Request
from multimodal_fl.federated.server import Federation
from multimodal_fl.pca.site import (
    STANDARDIZE_MEAN,
    STANDARDIZE_SCALE,
    project_site_data,
    projection_arrays,
    site_matrix,
)
from multimodal_fl.training import SiteData

__all__ = [
    "apply_pca_stage",
    "check_pca_stage",
    "federated_pca",
    "fit_pca_stage",
    "run_pca_stage",
]

log = logging.getLogger(__name__)

def check_pca_stage(cfg: ExperimentConfig) -> str:
    """Check that ``federated.pca`` can run as a pipeline stage; return its modality.

    Parameters
    ----------
    cfg : ExperimentConfig

    Returns
    -------
    str
        ``"image"`` or ``"text"``.

    Raises
    ------
    ValueError
        When the modality is disabled, is ``tabular`` (the stage reduces frozen embeddings;
        tabular PCA is an analysis, ``mmfl pca --features tabular``) or is a trainable image
        encoder.
    """
    pca = cfg.federated.pca
    m = pca.modality
    if m == "tabular":
        raise ValueError(
            "federated.pca.modality: 'tabular' is not a pipeline stage (the stage reduces frozen "
            "embeddings before fusion); use 'text', or 'image' with modalities.image.frozen: "
            "true. For a PCA of the tabular features run `mmfl pca CONFIG --features tabular`"
        )
    if not getattr(cfg.modalities, m).enabled:
        raise ValueError(
            f"federated.pca.modality: '{m}' but modalities.{m}.enabled is false; enable it or "
            "choose an enabled frozen modality"
        )
    if m == "image" and not cfg.modalities.image.frozen:
        raise ValueError(
            "federated.pca.modality: 'image' needs modalities.image.frozen: true (PCA reduces "
            "frozen embeddings; a trainable image encoder has none before training)"
        )
    return m


def fit_pca_stage(cfg: ExperimentConfig, site_data: Mapping[str, SiteData]) -> FederatedPCA:
    """Fit the stage's PCA from in-memory sites (local and centralized engines).

    The same summaries of the same rows, merged in the same sorted site order, as
    :func:`run_pca_stage` over a federation: the projection is identical. Each site's summary
    is capped as its disclosure gate caps it (at most ``floor(n / min_cell)`` rows, with the
    site's ``policy.yaml`` and ``evaluation.min_cell``); a site whose :func:`site_matrix`
    fails (e.g. no patient with the modality in its training split) or with fewer than
    ``min_cell`` patients is left out with a warning, as its federated reply would fail or
    be refused.

    Parameters
    ----------
    cfg : ExperimentConfig
        ``federated.pca`` gives modality, ``n_components``, ``site_rank``, ``whiten`` and
        ``svd_solver``.
    site_data : mapping of site name to SiteData

    Returns
    -------
    FederatedPCA
        Fitted; ``site_names_`` lists the sites used.
    """
    modality = check_pca_stage(cfg)
    p = cfg.federated.pca
    paths = {s.name: s.path for s in cfg.sites}
    names: list[str] = []
    summaries: list[PCASummary] = []
    for name in sorted(site_data):
        policy = load_policy(paths[name]) if name in paths else SitePolicy()
        min_cell = policy.effective_min_cell(cfg.evaluation.min_cell)
        try:  # the columns its gate withholds left out, as in its federated reply
            x = site_matrix(site_data[name], modality, min_cell=min_cell)
        except ValueError as exc:  # as its federated reply would fail
            log.warning("PCA stage: site %s left out: %s", name, exc)
            continue
        cap = pca_rank_cap(x.shape[0], min_cell)
        if cap == 0:  # as its federated reply would be refused
            log.warning("PCA stage: site %s left out: fewer than min_cell patients", name)
            continue
        rank = cap if p.site_rank is None else min(p.site_rank, cap)
        names.append(name)
        summaries.append(local_summary(x, rank, svd_solver=p.svd_solver, site=name))
    if not summaries:
        raise ValueError(f"PCA stage: no site has {modality} in its training split for at "
                         "least min_cell patients")
    with warnings.catch_warnings():  # as run_pca_stage: the caps truncate, by design
        warnings.simplefilter("ignore", TruncationWarning)
        pca = FederatedPCA(
            p.n_components, site_rank=p.site_rank, whiten=p.whiten, svd_solver=p.svd_solver
        ).fit_from_summaries(summaries)
    pca.site_names_ = names
    return pca


def apply_pca_stage(
    site_data: Mapping[str, SiteData], pca: FederatedPCA, modality: str
) -> dict[str, SiteData]:
    """Project every site's ``modality`` embeddings with a fitted PCA.

    Parameters
    ----------
    site_data : mapping of site name to SiteData
    pca : FederatedPCA
        Fitted (e.g. by :func:`fit_pca_stage`).
    modality : str

    Returns
    -------
    dict of str to SiteData
        New site data, same order; the originals are unchanged.
    """
    arrays = projection_arrays(pca)
    return {name: project_site_data(sd, modality, arrays) for name, sd in site_data.items()}


def federated_pca(
    federation: Federation,
    sites: list[str],
    *,
    modality: str,
    n_components: int | None,
    site_rank: int | None = None,
    whiten: bool = False,
    svd_solver: str = "auto",
    split: str = "train",
    standardize: tuple[npt.ArrayLike, npt.ArrayLike] | None = None,
    timeout: float | None = None,
    minimum: int = 1,
) -> FederatedPCA:
    """One federated PCA over ``sites``: broadcast ``pca`` requests, check, merge.

    Parameters
    ----------
    federation : Federation
        In-process or Flower.
    sites : list of str
        Sites to ask.
    modality : str
        ``image``, ``text`` or ``tabular``.
    n_components : int or None
        Components to keep; None keeps ``min(n, d)``. Larger than ``min(n, d)`` raises.
    site_rank : int or None
        Truncation at the sites (None: exact).
    whiten : bool
        Passed to :class:`FederatedPCA`.
    svd_solver : {"auto", "full", "covariance_eigh"}
        Solver at the sites (sent with the request) and at the server.
    split : str
        Which split the sites summarise (``train`` for the stage, ``all`` for the analysis).
    standardize : (mean, scale) or None
        Pooled tabular standardisation, sent with the request (tabular only).
    timeout : float or None
        Per-reply timeout.
    minimum : int
        Replies needed (else :class:`~multimodal_fl.engine.StageFailed`).

    Returns
    -------
    FederatedPCA
        Fitted; ``site_names_``, ``site_bytes_`` (bytes each site sent), ``site_n_``
        (rows each site summarised) and ``site_rows_`` (``S·Vᵀ`` rows each sent: at most
        ``floor(n / min_cell)`` under its disclosure gate) are set. Sites that decline
        (fewer than ``min_cell`` patients) are left out, as long as ``minimum`` reply.
    """
    config: dict[str, ConfigValue] = {"modality": modality, "site_rank": int(site_rank or 0),
                                      "svd_solver": svd_solver, "split": split}
    arrays: dict[str, np.ndarray] = {}
    if standardize is not None:
        arrays = {STANDARDIZE_MEAN: np.asarray(standardize[0], dtype=np.float64),
                  STANDARDIZE_SCALE: np.asarray(standardize[1], dtype=np.float64)}
    requests = {s: Request(Kind.PCA, 0, arrays=arrays, config=config) for s in sites}
    good = gather(federation, requests, timeout, stage=Kind.PCA, minimum=minimum)
    try:
        pca = server_pca_merge({s: r.arrays for s, r in good.items()}, n_components,
                               whiten=whiten, svd_solver=svd_solver)
    except ValueError as exc:
        if "exceeds the" not in str(exc):
            raise
        rows = {s: int(np.asarray(r.arrays["block"]).shape[0]) for s, r in good.items()}
        raise ValueError(
            f"{exc} (rows each site sent: {rows}; a site sends at most floor(n / min_cell) rows "
            "under its disclosure policy; lower n_components)") from None
    pca.set_params(site_rank=site_rank)
    pca.site_n_ = {s: int(r.n_samples) for s, r in good.items()}
    pca.site_rows_ = {s: int(np.asarray(r.arrays["block"]).shape[0]) for s, r in good.items()}
    return pca


def run_pca_stage(
    federation: Federation, cfg: ExperimentConfig, sites: list[str]
) -> tuple[FederatedPCA, dict[str, Any]]:
    """The pipeline stage over a federation: fit federated, then every site projects.

    Must run before ``init`` (the model's input width becomes ``n_components``).

    Parameters
    ----------
    federation : Federation
    cfg : ExperimentConfig
        ``federated.pca`` settings; ``federated.min_sites`` replies are needed at each step.
    sites : list of str

    Returns
    -------
    pca : FederatedPCA
        The fitted projection.
    doc : dict
        For ``metrics.json``: modality, components kept, explained variance ratio, sites,
        bytes and rows per site, sites that applied the projection, truncation report.

    Raises
    ------
    ValueError
        For a ``federated.pca`` the stage cannot run (see :func:`check_pca_stage`).
    multimodal_fl.engine.StageFailed
        When fewer than ``federated.min_sites`` sites reply at either step.
    """
    modality = check_pca_stage(cfg)
    fed = cfg.federated
    p = fed.pca
    with warnings.catch_warnings():  # the sites' caps truncate: reported in the doc below
        warnings.simplefilter("ignore", TruncationWarning)
        pca = federated_pca(
            federation, sites, modality=modality, n_components=p.n_components,
            site_rank=p.site_rank, whiten=p.whiten, svd_solver=p.svd_solver,
            timeout=fed.timeout_s, minimum=fed.min_sites,
        )
    arrays = projection_arrays(pca)
    requests = {s: Request(Kind.PCA_APPLY, 0, arrays=arrays, config={"modality": modality})
                for s in sites}
    applied = gather(federation, requests, fed.timeout_s, stage=Kind.PCA_APPLY,
                     minimum=fed.min_sites)
    doc: dict[str, Any] = {
        "modality": modality,
        "n_features": int(pca.n_features_in_),
        "n_components": int(pca.n_components_),
        "whiten": bool(p.whiten),
        "svd_solver": p.svd_solver,
        "explained_variance_ratio": [float(v) for v in pca.explained_variance_ratio_],
        "sites": list(pca.site_names_),
        "site_n": dict(pca.site_n_),
        "site_rows": dict(pca.site_rows_),
        "site_bytes": {s: int(b) for s, b in pca.site_bytes_.items()},
        "applied": sorted(applied),
        "truncated": bool(pca.truncated_),
        "discarded_variance": float(pca.discarded_variance_),
        "subspace_error_bound": float(pca.subspace_error_bound_),
        "subspace_error_bounds": [float(b) for b in pca.subspace_error_bounds_],
    }
    log.info("PCA stage: %s %d -> %d dims, %.1f%% of the variance kept (sites %s; rows sent "
             "%s, %.3g of the variance dropped by the sites' caps)", modality,
             pca.n_features_in_, pca.n_components_, 100 * pca.explained_variance_ratio_.sum(),
             ", ".join(pca.site_names_), pca.site_rows_, pca.discarded_variance_)
    return pca, doc

