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

The analysis command (``mmfl pca``, :mod:`multimodal_fl.pca_analysis`) uses the same
request kinds with ``split: all`` and, for tabular features, the pooled standardisation.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from multimodal_fl.engine import gather
from multimodal_fl.federated.pca import FederatedPCA, server_pca_merge
from multimodal_fl.federated.protocol import ConfigValue, Kind, Request

if TYPE_CHECKING:
    from multimodal_fl.config import ExperimentConfig
    from multimodal_fl.federated.server import Federation
    from multimodal_fl.training import SiteData

__all__ = [
    "PROJECTION_KEYS",
    "STANDARDIZE_MEAN",
    "STANDARDIZE_SCALE",
    "apply_pca_stage",
    "check_pca_stage",
    "federated_pca",
    "fit_pca_stage",
    "project",
    "project_site_data",
    "projection_arrays",
    "run_pca_stage",
    "score_summary",
    "site_matrix",
]

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]

STANDARDIZE_MEAN = "standardize/mean"
"""Request array: pooled per-feature mean of tabular features (tabular PCA only)."""
STANDARDIZE_SCALE = "standardize/scale"
"""Request array: pooled per-feature scale of tabular features (tabular PCA only)."""

PROJECTION_KEYS = ("mean", "components", "scale")
"""The arrays of a projection (:func:`projection_arrays`)."""


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


def site_matrix(
    data: SiteData,
    modality: str,
    *,
    split: str = "train",
    standardize: tuple[npt.ArrayLike, npt.ArrayLike] | None = None,
) -> FloatArray:
    """The rows a site's PCA uses: one split, patients with the modality present, float64.

    Parameters
    ----------
    data : SiteData
        The site's prepared data.
    modality : str
        ``image`` or ``text`` (precomputed embeddings), or ``tabular``.
    split : str, default "train"
        ``train``, ``val``, ``test`` or ``all``.
    standardize : (mean, scale) or None
        Required for ``tabular``: the pooled standardisation; the result is
        ``(x - mean) / scale`` with missing values (NaN) set to 0, i.e. to the pooled mean.

    Returns
    -------
    ndarray of shape (n_present, d)

    Raises
    ------
    ValueError
        When the site lacks the modality or has no patient with it in ``split``, its
        embeddings are not precomputed, or tabular data comes without a standardisation of
        the right width.
    """
    part = data.part(split)
    if modality not in part.modalities:
        raise ValueError(
            f"site {data.site}: no {modality!r} modality for PCA (it has {list(part.modalities)})"
        )
    if modality != "tabular" and modality not in part.precomputed:
        raise ValueError(
            f"site {data.site}: PCA of {modality!r} needs frozen (precomputed) embeddings; this "
            f"site has precomputed {list(part.precomputed)} (set modalities.{modality}.frozen: "
            "true)"
        )
    j = part.modalities.index(modality)
    x = part.inputs[modality][part.mask[:, j]].numpy().astype(np.float64)
    if x.shape[0] == 0:
        raise ValueError(f"site {data.site}: no patient with {modality} in split {split!r}")
    if modality == "tabular":
        if standardize is None:
            raise ValueError(
                f"site {data.site}: tabular PCA needs the pooled standardisation "
                f"({STANDARDIZE_MEAN!r} and {STANDARDIZE_SCALE!r} in the request)"
            )
        mean = np.asarray(standardize[0], dtype=np.float64).reshape(-1)
        scale = np.asarray(standardize[1], dtype=np.float64).reshape(-1)
        if mean.shape != (x.shape[1],) or scale.shape != (x.shape[1],) or np.any(scale <= 0):
            raise ValueError(
                f"site {data.site}: standardisation of shapes {mean.shape}, {scale.shape} for "
                f"{x.shape[1]} tabular features; positive scales of that length are expected"
            )
        x = np.nan_to_num((x - mean) / scale, nan=0.0)
    return x


def projection_arrays(pca: FederatedPCA) -> dict[str, FloatArray]:
    """What the server broadcasts so that sites project: mean, components, scale.

    Parameters
    ----------
    pca : FederatedPCA
        Fitted.

    Returns
    -------
    dict of str to ndarray
        ``mean`` ``(d,)``, ``components`` ``(k, d)``, ``scale`` ``(k,)`` (the square root of
        the explained variance when ``whiten``, else ones), float64.
    """
    k = int(pca.n_components_)
    scale = np.sqrt(pca.explained_variance_) if pca.whiten else np.ones(k)
    scale = np.maximum(scale, np.finfo(np.float64).eps)
    return {
        "mean": np.asarray(pca.mean_, dtype=np.float64).copy(),
        "components": np.ascontiguousarray(pca.components_, dtype=np.float64),
        "scale": np.asarray(scale, dtype=np.float64),
    }


def _check_projection(arrays: Mapping[str, Any], d: int, where: str) -> tuple[FloatArray, ...]:
    missing = [k for k in PROJECTION_KEYS if k not in arrays]
    if missing:
        raise ValueError(f"{where}: projection lacks {missing}; expected keys {PROJECTION_KEYS}")
    mean, comps, scale = (np.asarray(arrays[k], dtype=np.float64) for k in PROJECTION_KEYS)
    if comps.ndim != 2 or mean.shape != (comps.shape[1],) or scale.shape != (comps.shape[0],):
        raise ValueError(
            f"{where}: projection of shapes mean {mean.shape}, components {comps.shape}, scale "
            f"{scale.shape}; expected (d,), (k, d), (k,)"
        )
    if comps.shape[1] != d:
        raise ValueError(
            f"{where}: the projection expects {comps.shape[1]} features but the data has {d}"
        )
    if not (np.isfinite(mean).all() and np.isfinite(comps).all() and (scale > 0).all()):
        raise ValueError(f"{where}: projection arrays must be finite with positive scales")
    return mean, comps, scale


def project(x: npt.ArrayLike, arrays: Mapping[str, Any], *, where: str = "project") -> FloatArray:
    """Project rows with :func:`projection_arrays`: ``((x - mean) @ components.T) / scale``.

    Parameters
    ----------
    x : array-like of shape (n, d)
    arrays : mapping
        ``mean``, ``components``, ``scale``.
    where : str
        Named in error messages.

    Returns
    -------
    ndarray of shape (n, k)
    """
    xx = np.asarray(x, dtype=np.float64)
    if xx.ndim != 2:
        raise ValueError(f"{where}: expected a 2-D array of rows, got shape {xx.shape}")
    mean, comps, scale = _check_projection(arrays, xx.shape[1], where)
    out: FloatArray = ((xx - mean) @ comps.T) / scale
    return out


def project_site_data(data: SiteData, modality: str, arrays: Mapping[str, Any]) -> SiteData:
    """A copy of ``data`` whose ``modality`` embeddings are replaced by their projection.

    Rows without the modality stay zeros (the presence mask hides them from the model).

    Parameters
    ----------
    data : SiteData
    modality : str
        A precomputed modality of ``data``.
    arrays : mapping
        :func:`projection_arrays`.

    Returns
    -------
    SiteData
        Same patients, splits and masks; ``dataset.inputs[modality]`` is float32 ``(N, k)``.
    """
    import torch

    from multimodal_fl.training import CohortDataset, SiteData

    ds = data.dataset
    if modality not in ds.precomputed:
        raise ValueError(
            f"site {data.site}: cannot project {modality!r}: not a precomputed modality "
            f"(precomputed: {list(ds.precomputed)})"
        )
    j = ds.modalities.index(modality)
    present = ds.mask[:, j].numpy()
    z = project(ds.inputs[modality].numpy(), arrays, where=f"site {data.site}")
    z[~present] = 0.0
    inputs = dict(ds.inputs)
    inputs[modality] = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32))
    new = CohortDataset(ds.patient_ids, ds.labels.numpy(), inputs, ds.mask, ds.modalities,
                        meta=ds.meta, precomputed=ds.precomputed)
    # a new SiteData, not dataclasses.replace: nothing cached for the old dataset is shared
    return SiteData(data.site, new, data.splits, list(data.feature_names), dict(data.dropped),
                    dict(data.image_errors))


def fit_pca_stage(cfg: ExperimentConfig, site_data: Mapping[str, SiteData]) -> FederatedPCA:
    """Fit the stage's PCA from in-memory sites (local and centralized engines).

    The same summaries of the same rows, merged in the same sorted site order, as
    :func:`run_pca_stage` over a federation: the projection is identical. A site whose
    :func:`site_matrix` fails (e.g. no patient with the modality in its training split) is
    left out with a warning, as its federated reply would fail.

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
    names: list[str] = []
    arrays: list[FloatArray] = []
    for name in sorted(site_data):
        try:
            x = site_matrix(site_data[name], modality)
        except ValueError as exc:  # as its federated reply would fail
            log.warning("PCA stage: site %s left out: %s", name, exc)
            continue
        names.append(name)
        arrays.append(x)
    if not arrays:
        raise ValueError(f"PCA stage: no site has {modality} in its training split")
    pca = FederatedPCA(
        p.n_components, site_rank=p.site_rank, whiten=p.whiten, svd_solver=p.svd_solver
    ).fit_sites(arrays)
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
        Fitted; ``site_names_``, ``site_bytes_`` (bytes each site sent) and ``site_n_``
        (rows each site summarised) are set.
    """
    config: dict[str, ConfigValue] = {"modality": modality, "site_rank": int(site_rank or 0),
                                      "svd_solver": svd_solver, "split": split}
    arrays: dict[str, np.ndarray] = {}
    if standardize is not None:
        arrays = {STANDARDIZE_MEAN: np.asarray(standardize[0], dtype=np.float64),
                  STANDARDIZE_SCALE: np.asarray(standardize[1], dtype=np.float64)}
    requests = {s: Request(Kind.PCA, 0, arrays=arrays, config=config) for s in sites}
    good = gather(federation, requests, timeout, stage=Kind.PCA, minimum=minimum)
    pca = server_pca_merge({s: r.arrays for s, r in good.items()}, n_components, whiten=whiten,
                           svd_solver=svd_solver)
    pca.set_params(site_rank=site_rank)
    pca.site_n_ = {s: int(r.n_samples) for s, r in good.items()}
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
    pca = federated_pca(
        federation, sites, modality=modality, n_components=p.n_components,
        site_rank=p.site_rank, whiten=p.whiten, svd_solver=p.svd_solver, timeout=fed.timeout_s,
        minimum=fed.min_sites,
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
        "site_bytes": {s: int(b) for s, b in pca.site_bytes_.items()},
        "applied": sorted(applied),
        "truncated": bool(pca.truncated_),
        "subspace_error_bound": float(pca.subspace_error_bound_),
        "subspace_error_bounds": [float(b) for b in pca.subspace_error_bounds_],
    }
    log.info("PCA stage: %s %d -> %d dims, %.1f%% of the variance kept (sites %s)", modality,
             pca.n_features_in_, pca.n_components_, 100 * pca.explained_variance_ratio_.sum(),
             ", ".join(pca.site_names_))
    return pca, doc


def score_summary(
    scores: npt.ArrayLike,
    edges: npt.ArrayLike,
    levels: npt.ArrayLike,
    *,
    min_cell: int,
) -> dict[str, Any]:
    """Aggregate statistics of one site's component scores (what a ``pca_scores`` reply holds).

    Parameters
    ----------
    scores : array-like of shape (n, k)
        The site's projected rows (they stay at the site).
    edges : array-like of shape (k, n_bins + 1)
        Histogram bin edges per component, chosen by the server so that sites are
        comparable; scores outside are counted in the first or last bin.
    levels : array-like of shape (q,)
        Quantile levels in ``[0, 1]``.
    min_cell : int
        The site's small-cell threshold: quantiles are sent only when ``n >= min_cell``, and
        histogram bins are merged until each holds 0 or at least ``min_cell`` rows
        (:func:`~multimodal_fl.evaluation.histograms.coarsen_counts`).

    Returns
    -------
    dict
        ``n``, ``mean`` (k), ``std`` (k, ``ddof=1``), ``cov`` (k x k), ``quantiles``
        (``{"levels", "values"}`` with values k x q, or None), ``quantiles_reason``,
        ``histograms`` (per component a coarsened histogram dict, or the reason it is not
        sent). Mean and covariance are what the site's PCA summary already reveals.
    """
    from multimodal_fl.evaluation.histograms import coarsen_counts

    z = np.asarray(scores, dtype=np.float64)
    e = np.asarray(edges, dtype=np.float64)
    lv = np.asarray(levels, dtype=np.float64).reshape(-1)
    if z.ndim != 2 or e.ndim != 2 or e.shape[0] != z.shape[1] or e.shape[1] < 2:
        raise ValueError(
            f"score_summary: scores {z.shape} and edges {e.shape}; expected (n, k) and "
            "(k, n_bins + 1)"
        )
    if np.any(np.diff(e, axis=1) <= 0) or np.any((lv < 0) | (lv > 1)):
        raise ValueError("score_summary: edges must increase and levels lie in [0, 1]")
    n, k = z.shape
    doc: dict[str, Any] = {"n": int(n)}
    doc["mean"] = z.mean(0).tolist() if n else [None] * k
    if n > 1:
        cov = np.atleast_2d(np.cov(z, rowvar=False, ddof=1))
        doc["std"] = np.sqrt(np.diag(cov)).tolist()
        doc["cov"] = cov.tolist()
    else:
        doc["std"] = [None] * k
        doc["cov"] = None
    if n >= min_cell and n > 0:
        doc["quantiles"] = {"levels": lv.tolist(), "values": np.quantile(z, lv, axis=0).T.tolist()}
        doc["quantiles_reason"] = None
    else:
        doc["quantiles"] = None
        doc["quantiles_reason"] = f"fewer than {min_cell} patients"
    hists: list[Any] = []
    n_bins = e.shape[1] - 1
    for i in range(k):
        idx = np.clip(np.searchsorted(e[i], z[:, i], side="right") - 1, 0, n_bins - 1)
        counts = np.bincount(idx, minlength=n_bins)
        sums = np.bincount(idx, weights=z[:, i], minlength=n_bins)
        h = coarsen_counts(counts, sums, min_cell=min_cell)
        hists.append(h if isinstance(h, str) else h.to_dict())
    doc["histograms"] = hists
    return doc
