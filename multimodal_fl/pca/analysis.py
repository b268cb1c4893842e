"""``mmfl pca``: how do our cohorts differ? A federated PCA analysis of one feature space.

The protocol runs through the :class:`~multimodal_fl.federated.server.Federation` interface
only (in process by default; on Flower through
:func:`multimodal_fl.engines.flower_jobs.pca_analysis_job`), on every patient of each site
(``split: all``) who has the chosen features:

1. ``tabular`` only: the sites send per-feature moments (``moments``); the server pools them
   into one standardisation, which it sends with the next requests; each site standardises
   its rows with it and sets missing values (NaN) to 0, i.e. to the pooled mean;
2. ``pca``: each site sends its exact PCA summary (count, mean, ``S·Vᵀ`` block, total sum of
   squares); the server merges them (:func:`~multimodal_fl.federated.pca.server_pca_merge`);
3. ``pca_scores``: the server sends the projection and fixed histogram edges (± 4 pooled
   standard deviations per component, in ``n_bins`` bins); each site returns aggregates of
   its scores (:func:`~multimodal_fl.pca.site.score_summary`): mean, standard deviation and
   covariance (what its PCA summary already reveals), and, under the site's own small-cell
   rule (``evaluation.min_cell``), quantiles and coarsened histograms.

Outputs: ``pca.json`` (components, explained variance and ratio, per-site ``n``, bytes sent
vs raw data bytes, score distributions), ``pca_sites.png`` (per-site mean ± 1 and 2 sd
ellipses in the first two components, and per-site histograms of each of the first two
components) and ``pca_variance.png`` (explained variance ratio per component, cumulative).

Image features are the frozen image encoder's embeddings: without
``modalities.image.weights`` that encoder is randomly initialised (seeded by ``seed``) and
untrained, which the JSON and the command say.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from multimodal_fl.config import ExperimentConfig
from multimodal_fl.data.cohort import build_cohorts
from multimodal_fl.data.tasks import feature_names
from multimodal_fl.federated.aggregation import pool_moments
from multimodal_fl.federated.gather import gather
from multimodal_fl.federated.inprocess import InProcessFederation
from multimodal_fl.federated.pca import FederatedPCA, TruncationWarning
from multimodal_fl.federated.protocol import Doc, Kind, Reply, Request
from multimodal_fl.federated.server import Federation
from multimodal_fl.federated.site import fusion_sites
from multimodal_fl.moments import standardization
from multimodal_fl.pca.site import (
    STANDARDIZE_MEAN,
    STANDARDIZE_SCALE,
    projection_arrays,
)
from multimodal_fl.pca.stage import federated_pca

__all__ = ["FEATURES", "QUANTILE_LEVELS", "PCAAnalysis", "analysis_config", "run_pca_analysis"]

FEATURES = ("image", "tabular", "text")
"""Feature spaces ``mmfl pca`` analyses."""
QUANTILE_LEVELS = (0.05, 0.25, 0.5, 0.75, 0.95)
"""Quantiles each site reports per component (when it has ``min_cell`` patients)."""
DEFAULT_COMPONENTS = 10
"""Components kept when neither ``--n-components`` nor the data say fewer."""


@dataclass
class PCAAnalysis:
    """The result of :func:`run_pca_analysis`.

    Attributes
    ----------
    pca : FederatedPCA
        Fitted (``site_names_``, ``site_bytes_``, ``site_n_`` set).
    document : dict
        What ``pca.json`` holds.
    json_path, sites_png, variance_png : Path
        The files written.
    """

    pca: FederatedPCA
    document: dict[str, Any]
    json_path: Path
    sites_png: Path
    variance_png: Path


def analysis_config(cfg: ExperimentConfig, features: str) -> ExperimentConfig:
    """The experiment with only ``features`` enabled (frozen), for preparing the sites.

    Patients without those features are left out of the analysis (``data.on_error: skip``
    for that step only; cohorts are built with the experiment's own policy).

    Parameters
    ----------
    cfg : ExperimentConfig
    features : str
        ``image``, ``tabular`` or ``text``.

    Returns
    -------
    ExperimentConfig
    """
    if features not in FEATURES:
        raise ValueError(f"features {features!r}; expected one of {', '.join(FEATURES)}")
    mods = cfg.modalities
    update: dict[str, Any] = {}
    for m in FEATURES:
        extra: dict[str, Any] = {"enabled": m == features}
        if m == features and m in ("image", "text"):
            extra["frozen"] = True
        update[m] = getattr(mods, m).model_copy(update=extra)
    return cfg.model_copy(update={
        "modalities": mods.model_copy(update=update),
        "data": cfg.data.model_copy(update={"on_error": "skip"}),
    })


def _pooled_standardisation(
    federation: Federation, sites: list[str], timeout: float | None
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """The pooled per-feature mean and scale, from the sites' moments (``split: all``).

    Returns
    -------
    mean, scale : ndarray
    """
    requests = {s: Request(Kind.MOMENTS, 0, config={"split": "all"}) for s in sites}
    good = gather(federation, requests, timeout, stage=Kind.MOMENTS, minimum=1)
    moments = [(r.arrays["n"], r.arrays["sum"], r.arrays["sumsq"]) for r in good.values()]
    return standardization(*pool_moments(moments))


def _feature_names(cfg: ExperimentConfig, features: str, d: int) -> list[str]:
    """The task's tabular feature names when they match ``d``, else ``{features}_{i}``."""
    if features == "tabular":
        names = list(feature_names(cfg.task))
        if len(names) == d:
            return names
    return [f"{features}_{i}" for i in range(d)]


def _top_loadings(components: npt.NDArray[np.float64], names: list[str],
                  top: int = 5) -> list[list[tuple[str, float]]]:
    """Per component, the ``top`` features of largest absolute loading, with the loading."""
    out = []
    for row in components:
        order = np.argsort(-np.abs(row), kind="stable")[:top]
        out.append([(names[j], float(row[j])) for j in order])
    return out


def _image_note(cfg: ExperimentConfig) -> str | None:
    """The note on where the image embeddings come from (trained weights or a random net)."""
    img = cfg.modalities.image
    if img.weights is not None:
        return f"image embeddings from the frozen {img.encoder} with weights {img.weights}"
    return (
        f"image embeddings come from a randomly initialised, untrained {img.encoder} (seed "
        f"{cfg.seed}): the components describe that random network's features, not a learned "
        "representation; set modalities.image.weights for a trained encoder"
    )


# --------------------------------------------------------------------- the analysis, step by step


def _check_arguments(
    features: str, n_bins: int, n_components: int | None, site_rank: int | None
) -> None:
    """Reject what :func:`run_pca_analysis` cannot run, before any site is asked.

    Parameters
    ----------
    features, n_bins, n_components, site_rank
        As :func:`run_pca_analysis`.

    Raises
    ------
    ValueError
        For unknown features, ``n_bins < 2``, or a non-positive ``n_components`` or
        ``site_rank``.
    """
    if features not in FEATURES:
        raise ValueError(f"--features {features!r}; expected one of {', '.join(FEATURES)}")
    if n_bins < 2:
        raise ValueError(f"n_bins={n_bins}; at least 2 histogram bins are needed")
    if n_components is not None and n_components < 1:
        raise ValueError(f"--n-components {n_components}; a positive integer is expected")
    if site_rank is not None and site_rank < 1:
        raise ValueError(f"--site-rank {site_rank}; a positive integer is expected")


def _analysis_federation(
    cfg: ExperimentConfig, features: str, out: Path,
    federation: Federation | None, cohorts: Mapping[str, Any] | None,
) -> Federation:
    """The federation the analysis asks: ``federation`` if given, else in-process sites.

    The in-process sites are those of :func:`analysis_config` (only ``features`` enabled),
    over ``cohorts`` (built from ``cfg`` when None), caching under ``out``.

    Returns
    -------
    Federation
    """
    if federation is not None:
        return federation
    acfg = analysis_config(cfg, features)
    if cohorts is None:
        cohorts = build_cohorts(cfg)
    return InProcessFederation(fusion_sites(acfg, out, cohorts=cohorts))


def _choose_components(
    full: FederatedPCA, n_components: int | None, site_rank: int | None
) -> int:
    """Components to keep: ``n_components``, or ``min(DEFAULT_COMPONENTS, limit)``.

    Parameters
    ----------
    full : FederatedPCA
        The full-rank fit; its ``n_components_`` is the limit (``min(n, d)``, or fewer
        when the sites sent at most ``site_rank`` rows each).
    n_components, site_rank : int or None
        As :func:`run_pca_analysis`.

    Returns
    -------
    int

    Raises
    ------
    ValueError
        When ``n_components`` exceeds the limit.
    """
    limit = int(full.n_components_)
    k = min(DEFAULT_COMPONENTS, limit) if n_components is None else int(n_components)
    if k > limit:
        rows = "" if site_rank is None else f" and the sites sent at most {site_rank} rows each"
        raise ValueError(
            f"--n-components {k}: the pooled data has n={full.n_samples_} rows and "
            f"d={full.n_features_in_} features{rows}, so at most {limit} components"
        )
    return k


def _fit_components(
    federation: Federation, sites: list[str], features: str, *,
    n_components: int | None, site_rank: int | None, svd_solver: str,
    std: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]] | None,
    timeout: float | None,
) -> tuple[FederatedPCA, FederatedPCA, int]:
    """Fit every component from the sites' summaries, then keep ``k`` of them.

    One round of ``pca`` requests: the full-rank fit gives the spectrum and the limit on
    ``k`` (:func:`_choose_components`); the kept fit is refitted from the same merged
    summary. Truncation warnings are silenced: ``pca.json`` reports them.

    Returns
    -------
    full : FederatedPCA
        The full-rank fit.
    pca : FederatedPCA
        The ``k``-component fit, with the full fit's ``site_names_``, ``site_bytes_`` and
        ``site_n_``.
    k : int
    """
    with warnings.catch_warnings():  # reported in pca.json's notes and "truncation"
        warnings.simplefilter("ignore", TruncationWarning)
        full = federated_pca(federation, sites, modality=features, n_components=None,
                             site_rank=site_rank, svd_solver=svd_solver, split="all",
                             standardize=std, timeout=timeout, minimum=1)
        k = _choose_components(full, n_components, site_rank)
        pca = FederatedPCA(k, site_rank=site_rank, svd_solver=svd_solver)
        pca.fit_from_summaries([full.summary_])
    pca.site_names_, pca.site_bytes_, pca.site_n_ = full.site_names_, full.site_bytes_, full.site_n_
    pca.site_rows_ = full.site_rows_
    return full, pca, k


def _score_requests(
    pca: FederatedPCA, features: str,
    std: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]] | None, n_bins: int,
) -> tuple[dict[str, Request], npt.NDArray[np.float64]]:
    """The ``pca_scores`` request to each site of the fit, and the histogram edges it carries.

    Each request carries the projection (:func:`~multimodal_fl.pca.site.projection_arrays`),
    the edges (``n_bins`` bins over ± 4 pooled standard deviations per component; ± 4 when a
    component has no variance), the quantile levels and, for tabular features, the pooled
    standardisation.

    Returns
    -------
    requests : dict of str to Request
    edges : ndarray of shape (k, n_bins + 1)
    """
    arrays = projection_arrays(pca)
    sd = np.sqrt(np.maximum(pca.explained_variance_, 0.0))
    sd = np.where(sd > 0, sd, 1.0)
    edges = np.stack([np.linspace(-4 * s, 4 * s, n_bins + 1) for s in sd])
    arrays = {**arrays, "edges": edges, "levels": np.asarray(QUANTILE_LEVELS, dtype=np.float64)}
    if std is not None:
        arrays.update({STANDARDIZE_MEAN: std[0], STANDARDIZE_SCALE: std[1]})
    requests = {s: Request(Kind.PCA_SCORES, 0, arrays=arrays,
                           config={"modality": features, "split": "all"}) for s in pca.site_names_}
    return requests, edges


def _site_documents(pca: FederatedPCA, good: Mapping[str, Reply]) -> dict[str, Any]:
    """``pca.json``'s ``sites``: per site of the fit, its size, bytes and score summary.

    Parameters
    ----------
    pca : FederatedPCA
        The kept fit (``site_names_``, ``site_n_``, ``site_bytes_`` set).
    good : mapping of str to Reply
        The good ``pca_scores`` replies; a site without one gets ``scores: None``.

    Returns
    -------
    dict of str to dict
        ``n``, ``bytes_sent`` (its PCA summary), ``raw_bytes`` (``8 * n * d``), ``ratio``,
        ``scores`` and ``scores_bytes`` (the scores document's size on the wire).
    """
    d = int(pca.n_features_in_)
    site_docs: dict[str, Any] = {}
    for s in pca.site_names_:
        n = int(pca.site_n_[s])
        raw = 8 * n * d
        sent = int(pca.site_bytes_[s])
        scores = good[s].document(Doc.PCA_SCORES) if s in good else None
        site_docs[s] = {
            "n": n, "rows_sent": int(pca.site_rows_[s]), "bytes_sent": sent, "raw_bytes": raw,
            "ratio": sent / raw if raw else None,
            "scores": scores,
            "scores_bytes": (len(good[s].documents[Doc.PCA_SCORES].encode()) if s in good
                             else None),
        }
    return site_docs


def _truncation_note(pca: FederatedPCA, site_rank: int | None, k: int) -> str:
    """The note on a truncated fit: variance the sites dropped, Davis-Kahan bounds.

    Returns
    -------
    str
    """
    total = float(pca.summary_.total_ss) / (pca.n_samples_ - 1)
    bounds = pca.subspace_error_bounds_
    well = int(np.sum(np.cumprod(bounds <= 0.1)))
    return (
        ("" if site_rank is None else f"site_rank={site_rank} and ")
        + f"the sites' rank caps (floor(n / min_cell)): the sites "
        f"dropped {pca.discarded_variance_:.3g} of "
        f"{total:.3g} total variance "
        f"({100 * pca.discarded_variance_ / total if total > 0 else 0.0:.2f}%); "
        f"sin(largest principal angle) to the exact components <= "
        f"{pca.subspace_error_bound_:.3g} for all {k}; "
        + (f"the first {well} are within 0.1 " if well else "no leading component is "
           "bounded within 0.1 ")
        + "(Davis-Kahan bounds per leading components in pca.json 'truncation')")


def _notes(
    cfg: ExperimentConfig, features: str, pca: FederatedPCA, *, k: int,
    site_rank: int | None, sites: list[str], site_docs: Mapping[str, Any],
    absent: Mapping[str, str],
) -> list[str]:
    """``pca.json``'s ``notes``: how to read it, and what to be careful about.

    Always: what the byte counts and the score summaries mean. When they apply: the
    truncation (:func:`_truncation_note`), sites whose summary reveals their rows
    (``n <= d``), sites that did not reply, configured sites that were never asked
    (``absent``: no patients), the tabular standardisation, the image encoder.

    Returns
    -------
    list of str
    """
    d = int(pca.n_features_in_)
    rank_text = ("min(n, d, floor(n / min_cell))" if site_rank is None else
                 f"min(n, d, floor(n / min_cell), {site_rank})")
    notes = [
        f"bytes_sent: the site's PCA summary, 8 * ({rank_text} * d + d + 3) bytes as float64; "
        "raw_bytes: its n x d rows as float64 (8 * n * d)",
        "scores: per component; histogram bins index the 'edges' of that component; scores "
        "outside the edges are counted in the first or last bin; bins hold 0 or at least "
        "evaluation.min_cell patients (merged at the site)",
    ]
    capped = {s: row["rows_sent"] for s, row in site_docs.items()
              if row["rows_sent"] < min(row["n"], d) and
              (site_rank is None or row["rows_sent"] < site_rank)}
    if pca.truncated_:
        notes.append(_truncation_note(pca, site_rank, k))
    if capped:
        notes.append(
            "rows_sent: each site sends at most floor(n / min_cell) rows of S·Vᵀ under its "
            "disclosure policy, so no summary reveals a site's rows; capped: "
            + ", ".join(f"{s} ({r} rows)" for s, r in sorted(capped.items())))
    asked = [s for s in sites if s not in absent]
    missing = sorted(set(asked) - set(pca.site_names_))
    if missing:
        notes.append(f"left out (declined under its policy, or no reply; see the log): "
                     f"{', '.join(missing)}")
    if absent:
        notes.append("left out before the analysis: " + "; ".join(
            f"{s} ({why})" for s, why in sorted(absent.items())))
    if features == "tabular":
        notes.append("tabular features standardised with the pooled (federated) mean and "
                     "scale; missing values set to 0 (the pooled mean) after standardisation")
    if features == "image":
        note = _image_note(cfg)
        if note:
            notes.append(note)
    return notes


def _document(
    cfg: ExperimentConfig, features: str, full: FederatedPCA, pca: FederatedPCA, *,
    k: int, std: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]] | None,
    edges: npt.NDArray[np.float64], svd_solver: str, site_rank: int | None,
    sites: list[str], site_docs: dict[str, Any], notes: list[str],
    absent: Mapping[str, str],
) -> dict[str, Any]:
    """What ``pca.json`` holds (:attr:`PCAAnalysis.document`).

    Returns
    -------
    dict
        The kept fit (components, explained variance and ratio, top loadings), the full
        fit's spectrum (at most 100 ratios), the standardisation, the histogram edges, the
        truncation, the per-site documents, the sites left out (``missing_sites``, every
        configured or asked site that sent no summary; ``missing_reasons`` why, where known)
        and the notes.
    """
    missing = sorted(set(sites) - set(pca.site_names_))
    d = int(pca.n_features_in_)
    spectrum = full.explained_variance_ratio_[: min(int(full.n_components_), 100)]
    return {
        "config": cfg.name,
        "task": cfg.task.name,
        "features": features,
        "split": "all",
        "n_samples": int(pca.n_samples_),
        "n_features": d,
        "n_components": k,
        "feature_names": _feature_names(cfg, features, d),
        "mean": pca.mean_.tolist(),
        "components": pca.components_.tolist(),
        "explained_variance": pca.explained_variance_.tolist(),
        "explained_variance_ratio": pca.explained_variance_ratio_.tolist(),
        "top_loadings": _top_loadings(pca.components_, _feature_names(cfg, features, d)),
        "cumulative_variance_ratio": np.cumsum(pca.explained_variance_ratio_).tolist(),
        "spectrum_ratio": spectrum.tolist(),
        "standardisation": (
            {"mean": std[0].tolist(), "scale": std[1].tolist()} if std is not None else None
        ),
        "edges": edges.tolist(),
        "quantile_levels": list(QUANTILE_LEVELS),
        "svd_solver": svd_solver,
        "truncation": {
            "site_rank": site_rank,
            "truncated": bool(pca.truncated_),
            "discarded_variance": float(pca.discarded_variance_),
            "subspace_error_bound": float(pca.subspace_error_bound_),
            "subspace_error_bounds": [float(b) for b in pca.subspace_error_bounds_],
        },
        "sites": site_docs,
        "missing_sites": missing,
        "missing_reasons": {s: absent.get(s, "declined under its policy, or no reply (see "
                                             "the log)") for s in missing},
        "notes": notes,
    }


def _write_outputs(doc: dict[str, Any], out: Path) -> tuple[Path, Path, Path]:
    """Write ``pca.json``, ``pca_sites.png`` and ``pca_variance.png`` into ``out``.

    Returns
    -------
    json_path, sites_png, variance_png : Path
    """
    json_path = out / "pca.json"
    json_path.write_text(json.dumps(doc, indent=2) + "\n")
    sites_png = out / "pca_sites.png"
    variance_png = out / "pca_variance.png"
    _plot_sites(doc, sites_png)
    _plot_variance(doc, variance_png)
    return json_path, sites_png, variance_png


def run_pca_analysis(
    cfg: ExperimentConfig,
    features: str,
    out_dir: str | os.PathLike[str],
    *,
    n_components: int | None = None,
    site_rank: int | None = None,
    svd_solver: str = "auto",
    n_bins: int = 40,
    federation: Federation | None = None,
    cohorts: Mapping[str, Any] | None = None,
) -> PCAAnalysis:
    """Run the federated PCA analysis; write ``pca.json``, ``pca_sites.png``, ``pca_variance.png``.

    Parameters
    ----------
    cfg : ExperimentConfig
        The experiment (sites, task, encoders, ``evaluation.min_cell``, seed).
    features : str
        ``image`` (frozen image-encoder embeddings), ``tabular`` (pooled-standardised FHIR
        features, missing values at the pooled mean) or ``text`` (frozen text embeddings).
    out_dir : path-like
        Output folder (created); the in-process sites keep their embedding cache under
        ``out_dir/sites/<site>/cache`` unless ``data.cache_dir`` or ``$MMFL_CACHE`` is set.
    n_components : int or None
        Components to keep (default ``min(10, n, d)``).
    site_rank : int or None
        Rows of ``S·Vᵀ`` each site sends (None: exact, ``min(n, d)``). Fewer rows send fewer
        bytes and reveal less; the fit is then approximate, and ``pca.json`` carries the
        variance dropped and a bound on the error of the components (``truncation``).
    svd_solver : {"auto", "full", "covariance_eigh"}
        How sites and server compute ``S·Vᵀ`` (:class:`FederatedPCA`).
    n_bins : int, default 40
        Histogram bins per component over ± 4 pooled standard deviations.
    federation : Federation or None
        Default: the in-process sites of :func:`analysis_config` (``cfg``'s sites).
    cohorts : mapping or None
        Pre-built cohorts for the in-process sites.

    Returns
    -------
    PCAAnalysis

    Raises
    ------
    ValueError
        For unknown features, ``n_components`` beyond ``min(n, d)``, or ``n_bins < 2``.
    multimodal_fl.federated.gather.StageFailed
        When no site answers.
    """
    _check_arguments(features, n_bins, n_components, site_rank)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    federation = _analysis_federation(cfg, features, out, federation, cohorts)
    asked = sorted(federation.sites())
    absent = {s.name: "never asked: no patients with the analysis' modality when its data "
                      "were prepared, or not in the federation (see the log)"
              for s in cfg.sites if s.name not in asked}
    sites = sorted({*asked, *absent})
    timeout = cfg.federated.timeout_s
    std = _pooled_standardisation(federation, asked, timeout) if features == "tabular" else None
    full, pca, k = _fit_components(federation, asked, features, n_components=n_components,
                                   site_rank=site_rank, svd_solver=svd_solver, std=std,
                                   timeout=timeout)
    requests, edges = _score_requests(pca, features, std, n_bins)
    good = gather(federation, requests, timeout, stage=Kind.PCA_SCORES, minimum=1)
    site_docs = _site_documents(pca, good)
    notes = _notes(cfg, features, pca, k=k, site_rank=site_rank, sites=sites,
                   site_docs=site_docs, absent=absent)
    doc = _document(cfg, features, full, pca, k=k, std=std, edges=edges, svd_solver=svd_solver,
                    site_rank=site_rank, sites=sites, site_docs=site_docs, notes=notes,
                    absent=absent)
    json_path, sites_png, variance_png = _write_outputs(doc, out)
    return PCAAnalysis(pca, doc, json_path, sites_png, variance_png)


# --------------------------------------------------------------------------- figures


def _ellipse(ax: Any, mean: Any, cov: Any, n_sd: float, color: Any, **kw: Any) -> None:
    """Draw the ``n_sd`` standard-deviation ellipse of a 2-d ``mean`` and ``cov`` on ``ax``."""
    # matplotlib: heavy third-party (a core dependency), imported only when drawing
    from matplotlib.patches import Ellipse

    vals, vecs = np.linalg.eigh(np.asarray(cov, dtype=np.float64))
    vals = np.maximum(vals, 0.0)
    angle = float(np.degrees(np.arctan2(vecs[1, -1], vecs[0, -1])))
    width, height = 2 * n_sd * np.sqrt(vals[-1]), 2 * n_sd * np.sqrt(vals[0])
    ax.add_patch(Ellipse(tuple(mean), width, height, angle=angle, fill=False, color=color, **kw))


def _density(h: Mapping[str, Any], edges: npt.NDArray[np.float64]) -> tuple[Any, Any]:
    """Bin boundaries and densities of one coarsened histogram (gaps as zero-density bins)."""
    total = float(sum(h["count"]))
    idx: list[int] = []
    dens: list[float] = []
    for a, b, cnt in zip(h["start"], h["stop"], h["count"], strict=True):
        if idx and idx[-1] < a:
            dens.append(0.0)
        elif idx:
            idx.pop()
        idx += [a, b]
        dens.append(cnt / total / float(edges[b] - edges[a]))
    return edges[np.asarray(idx)], np.asarray(dens)


def _plot_sites(doc: Mapping[str, Any], path: Path) -> None:
    """Write ``pca_sites.png``: per-site ellipses in PC1/PC2, per-site histograms of each."""
    # matplotlib: heavy third-party (a core dependency), imported only when drawing, and
    # pyplot only after selecting the Agg backend
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = int(doc["n_components"])
    ratio = doc["explained_variance_ratio"]
    sites = list(doc["sites"])
    colors = plt.get_cmap("tab10")
    n_hist = min(k, 2)
    fig, axes = plt.subplots(1, 1 + n_hist, figsize=(5.2 * (1 + n_hist), 4.6),
                             layout="constrained")
    ax = axes[0]
    if k >= 2:
        for i, s in enumerate(sites):
            sc = doc["sites"][s]["scores"]
            if not sc or sc["cov"] is None:
                continue
            mean = sc["mean"][:2]
            cov = np.asarray(sc["cov"])[:2, :2]
            c = colors(i % 10)
            _ellipse(ax, mean, cov, 1.0, c, lw=2)
            _ellipse(ax, mean, cov, 2.0, c, lw=1, ls="--")
            ax.plot(*mean, "o", color=c, label=f"{s} (n={sc['n']})")
        lim = 4 * np.sqrt(np.asarray(doc["explained_variance"][:2]))
        ax.set_xlim(-lim[0], lim[0])
        ax.set_ylim(-lim[1], lim[1])
        ax.axhline(0, color="0.8", lw=0.8)
        ax.axvline(0, color="0.8", lw=0.8)
        ax.set_xlabel(f"PC1 ({100 * ratio[0]:.1f}% of variance)")
        ax.set_ylabel(f"PC2 ({100 * ratio[1]:.1f}% of variance)")
        ax.set_title("sites: mean, ±1 sd (solid) and ±2 sd (dashed)")
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "one component only:\nno two-dimensional view", ha="center",
                va="center", transform=ax.transAxes)
        ax.set_axis_off()
    for c_i in range(n_hist):
        hax = axes[1 + c_i]
        edges = np.asarray(doc["edges"][c_i])
        drawn = False
        for i, s in enumerate(sites):
            sc = doc["sites"][s]["scores"]
            h = sc["histograms"][c_i] if sc else None
            if not isinstance(h, dict):
                continue
            bounds, dens = _density(h, edges)
            hax.stairs(dens, bounds, fill=True, color=colors(i % 10), alpha=0.2)
            hax.stairs(dens, bounds, color=colors(i % 10), lw=1.2)
            hax.plot([], [], color=colors(i % 10), label=s)
            drawn = True
        hax.set_xlabel(f"PC{c_i + 1} score")
        hax.set_ylabel("density")
        hax.set_title(f"PC{c_i + 1} per site (bins of ≥ min_cell patients)")
        if drawn:
            hax.legend(fontsize=8)
        else:
            hax.text(0.5, 0.5, "no site sent a histogram\n(small-cell rule)", ha="center",
                     va="center", transform=hax.transAxes)
    fig.suptitle(f"{doc['task']}: federated PCA of {doc['features']} features "
                 f"(n={doc['n_samples']}, d={doc['n_features']})")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_variance(doc: Mapping[str, Any], path: Path) -> None:
    """Write ``pca_variance.png``: explained variance ratio per component, and cumulative."""
    # matplotlib: heavy third-party (a core dependency), imported only when drawing, and
    # pyplot only after selecting the Agg backend
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spectrum = np.asarray(doc["spectrum_ratio"][:30])
    k = int(doc["n_components"])
    x = np.arange(1, spectrum.size + 1)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
    ax.bar(x, spectrum, color=["tab:blue" if i <= k else "0.7" for i in x],
           label="per component")
    ax.plot(x, np.cumsum(spectrum), "o-", color="tab:orange", ms=3, label="cumulative")
    ax.axvline(k + 0.5, color="0.4", ls=":", lw=1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("component")
    ax.set_ylabel("explained variance ratio")
    ax.set_title(f"{doc['features']}: {k} components keep "
                 f"{100 * sum(doc['explained_variance_ratio']):.1f}% of the variance")
    ax.legend()
    fig.savefig(path, dpi=110)
    plt.close(fig)
