"""The site side of the PCA stage and analysis: a site's rows, projecting them, their summary.

Sits below :mod:`multimodal_fl.federated.site` (which answers ``pca``, ``pca_apply`` and
``pca_scores`` requests with these functions) and above training; the math of the summaries is
:mod:`multimodal_fl.federated.pca`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from multimodal_fl.evaluation.histograms import coarsen_counts
from multimodal_fl.federated.pca import FederatedPCA
from multimodal_fl.moments import column_moments, withheld_columns
from multimodal_fl.training import CohortDataset, SiteData

__all__ = [
    "PROJECTION_KEYS",
    "STANDARDIZE_MEAN",
    "STANDARDIZE_SCALE",
    "FloatArray",
    "project",
    "project_site_data",
    "projection_arrays",
    "score_summary",
    "site_matrix",
    "withheld_pca_columns",
]

#: float64 arrays.
FloatArray = npt.NDArray[np.float64]

STANDARDIZE_MEAN = "standardize/mean"
"""Request array: pooled per-feature mean of tabular features (tabular PCA only)."""


STANDARDIZE_SCALE = "standardize/scale"
"""Request array: pooled per-feature scale of tabular features (tabular PCA only)."""


PROJECTION_KEYS = ("mean", "components", "scale")
"""The arrays of a projection (:func:`projection_arrays`)."""


def _present_rows(data: SiteData, modality: str, split: str) -> FloatArray:
    """The split's rows of patients with ``modality``, as loaded (float64)."""
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
    x: FloatArray = part.inputs[modality][part.mask[:, j]].numpy().astype(np.float64)
    if x.shape[0] == 0:
        raise ValueError(f"site {data.site}: no patient with {modality} in split {split!r}")
    return x


def withheld_pca_columns(data: SiteData, modality: str, *, split: str = "train",
                         min_cell: int = 0) -> npt.NDArray[np.bool_]:
    """The columns a site leaves out of its PCA rows: those its ``moments`` reply hides.

    :func:`~multimodal_fl.moments.withheld_columns` of the rows as loaded (before any
    standardisation): a column seen in fewer than ``min_cell`` patients, and a 0/1 column
    (a condition, a medication, a missing-value indicator) with fewer than ``min_cell``
    patients of either value, whose PCA mean would give that count.

    Parameters
    ----------
    data : SiteData
    modality : str
    split : str, default "train"
    min_cell : int, default 0
        The site's effective small-cell threshold (0: nothing is withheld).

    Returns
    -------
    numpy.ndarray of bool, shape (d,)

    Raises
    ------
    ValueError
        As :func:`site_matrix`.
    """
    return _withheld(_present_rows(data, modality, split), min_cell,
                     where=f"site {data.site} {modality}")


def _withheld(x: FloatArray, min_cell: int, *, where: str) -> npt.NDArray[np.bool_]:
    """:func:`~multimodal_fl.moments.withheld_columns` of rows (none when ``min_cell <= 1``)."""
    if min_cell <= 1:
        return np.zeros(x.shape[1], dtype=bool)
    return withheld_columns(*column_moments(x, where=where), min_cell)


def site_matrix(
    data: SiteData,
    modality: str,
    *,
    split: str = "train",
    standardize: tuple[npt.ArrayLike, npt.ArrayLike] | None = None,
    min_cell: int = 0,
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
    min_cell : int, default 0
        The site's effective small-cell threshold: every column of
        :func:`withheld_pca_columns` is 0 in every row (as if unseen), so the summary's mean
        and ``S·Vᵀ`` carry nothing of it (0: nothing is withheld).

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
    x = _present_rows(data, modality, split)
    withheld = _withheld(x, min_cell, where=f"site {data.site} {modality}")
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
    x[:, withheld] = 0.0
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
                    dict(data.image_errors), notes=list(data.notes))


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

