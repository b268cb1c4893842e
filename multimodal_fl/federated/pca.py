"""Exact federated PCA: site summaries, their associative merge, and an estimator.

The protocol has two halves.

* At a site, :func:`local_summary` reduces the site's ``(n, d)`` data to a
  :class:`PCASummary`: the sample count ``n``, the site mean, and the block
  ``S · Vᵀ`` of the thin SVD of the site's data centred on its own mean (at most
  ``min(n, d)`` rows), plus the exact total sum of squares. Nothing else leaves
  the site; :meth:`PCASummary.to_arrays` turns it into a dict of numpy arrays
  that can travel as a message.
  ``svd_solver`` says how the block is computed: ``full`` (Householder QR, then
  LAPACK's SVD of the triangle) or ``covariance_eigh`` (the symmetric
  eigendecomposition of the ``d × d`` scatter matrix: about twice as fast, with
  the condition number squared); ``auto`` picks the latter when ``n >= d``.
* At the server, :func:`merge` stacks the blocks together with one between-site
  correction row ``sqrt(n_a · n_b / (n_a + n_b)) · (mean_a − mean_b)`` per site
  added (as scikit-learn's ``IncrementalPCA.partial_fit`` does for batches) and
  takes one SVD in float64. Without truncation, ``blockᵀ · block`` equals the
  scatter matrix of the pooled centred data, so the merged components,
  explained variances and ratios equal those of PCA on the pooled data up to
  float rounding, and merging is associative: any order or tree of merges
  gives the same result.

:class:`FederatedPCA` is the scikit-learn-style estimator built on the two
halves; :func:`site_pca_reply` and :func:`server_pca_merge` are the
message-friendly entry points for the federated engine.

What is exact and what is not
-----------------------------
``n``, the mean and the total sum of squares are always exact (up to float
rounding), so ``explained_variance_ratio_`` and ``noise_variance_`` are
relative to the true total variance even when sites truncate their blocks.
With ``site_rank`` set, each site drops its singular values beyond
``site_rank``; the merged scatter then misses a positive semi-definite term whose
spectral norm is at most the sum over sites of the largest dropped squared
singular value (carried as :attr:`PCASummary.discarded_norm`). The estimator
reports that as ``truncated_``, ``discarded_variance_`` and a Davis–Kahan bound
``subspace_error_bound_`` on the sine of the largest principal angle between
the fitted and the pooled-data subspace, and warns with
:class:`TruncationWarning`.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import linalg
from scipy.linalg import lapack
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.utils.extmath import svd_flip
from sklearn.utils.validation import check_array, check_is_fitted, validate_data

from multimodal_fl.federated.protocol import InvalidReply

__all__ = [
    "SUMMARY_KEYS",
    "SVD_SOLVERS",
    "FederatedPCA",
    "PCASummary",
    "SummaryError",
    "TruncationWarning",
    "local_summary",
    "merge",
    "resolve_solver",
    "server_pca_merge",
    "site_pca_reply",
    "subspace_error",
]

FloatArray = npt.NDArray[np.float64]

#: Keys of the message produced by :meth:`PCASummary.to_arrays`.
SUMMARY_KEYS: tuple[str, ...] = ("n", "mean", "block", "total_ss", "discarded_norm")

Site = str | int | None


class SummaryError(ValueError):
    """A site's data or PCA summary was rejected.

    Parameters
    ----------
    site : str, int or None
        The site's name (str), its position in a list of sites (int), or None
        when the input is not tied to a site.
    reason : str
        What was wrong and what would be accepted.

    Attributes
    ----------
    site : str, int or None
        As given.
    reason : str
        As given.
    """

    def __init__(self, site: Site, reason: str) -> None:
        self.site = site
        self.reason = reason
        super().__init__(f"{_where(site)}: {reason}")


class TruncationWarning(UserWarning):
    """Site blocks were truncated (``site_rank``), so the fit is approximate.

    The fitted estimator's ``subspace_error_bound_`` bounds the error.
    """


def _where(site: Site) -> str:
    if site is None:
        return "input"
    if isinstance(site, str):
        return f"site {site!r}"
    return f"site {site} (index in the list of sites)"


# --------------------------------------------------------------------------- linear algebra


SVD_SOLVERS: tuple[str, ...] = ("auto", "full", "covariance_eigh")
"""Accepted ``svd_solver`` values (as scikit-learn's PCA names them)."""


def _check_solver(svd_solver: Any) -> str:
    if not isinstance(svd_solver, str) or svd_solver not in SVD_SOLVERS:
        raise ValueError(
            f"svd_solver={svd_solver!r}; expected one of {', '.join(map(repr, SVD_SOLVERS))}"
        )
    return svd_solver


def resolve_solver(svd_solver: str, n_rows: int, n_features: int) -> str:
    """The solver ``"auto"`` picks for an ``(n_rows, n_features)`` matrix.

    ``covariance_eigh`` when ``n_rows >= n_features`` (the decomposition then works on a
    ``d × d`` matrix either way, and the Gram matrix plus a symmetric eigensolver costs
    about half of a QR plus an SVD), otherwise ``full``.

    Parameters
    ----------
    svd_solver : {"auto", "full", "covariance_eigh"}
        The requested solver.
    n_rows, n_features : int
        Shape of the matrix to decompose.

    Returns
    -------
    str
        ``"full"`` or ``"covariance_eigh"``.
    """
    solver = _check_solver(svd_solver)
    if solver == "auto":
        return "covariance_eigh" if n_rows >= n_features else "full"
    return solver


def _right_svd(
    a: FloatArray, *, overwrite: bool = False, svd_solver: str = "full"
) -> tuple[FloatArray, FloatArray]:
    """Singular values and right singular vectors of ``a``, signs fixed.

    The left factor is never formed. With ``full``, tall matrices are first
    reduced by a Householder QR to their ``(d, d)`` triangle ``R`` (same
    singular values and right vectors), then ``R`` (or a wide ``a``) goes to
    LAPACK's ``gesdd``. With ``covariance_eigh``, the Gram matrix ``aᵀa`` goes to
    LAPACK's symmetric divide-and-conquer eigensolver (``syevd``); singular
    values are the square roots of its eigenvalues (negative rounding noise set
    to 0). That is about twice as fast and as accurate in absolute terms
    (``‖aᵀa‖·ε``), but a singular value ``σ_i`` loses about
    ``log10(σ_1² / σ_i²)`` digits instead of ``log10(σ_1 / σ_i)``: the condition
    number is squared, as for scikit-learn's ``PCA(svd_solver="covariance_eigh")``.
    Signs follow scikit-learn's PCA (``svd_flip`` on the rows of ``Vt``).

    Parameters
    ----------
    a : ndarray of shape (m, d), float64
        Matrix to decompose. Must be finite (not checked here).
    overwrite : bool, default=False
        Allow LAPACK to overwrite ``a`` (saves a copy when ``a`` is a
        Fortran-ordered temporary).
    svd_solver : {"auto", "full", "covariance_eigh"}, default="full"
        See :func:`resolve_solver` for ``auto``.

    Returns
    -------
    s : ndarray of shape (min(m, d),)
        Singular values, descending.
    vt : ndarray of shape (min(m, d), d)
        Right singular vectors as rows.
    """
    m, d = a.shape
    if m == 0:
        return np.zeros(0), np.zeros((0, d))
    if resolve_solver(svd_solver, m, d) == "covariance_eigh":
        return _gram_factor(a.T @ a, min(m, d))  # numpy calls BLAS syrk for aᵀa
    if m > d:
        lwork_query, info = lapack.dgeqrf_lwork(m, d)
        lwork = max(int(lwork_query), 1) if info == 0 else max(3 * d, 1)
        qr, _tau, _work, info = lapack.dgeqrf(
            np.asfortranarray(a), lwork=lwork, overwrite_a=int(overwrite)
        )
        if info != 0:
            raise np.linalg.LinAlgError(f"LAPACK dgeqrf failed with info={info}")
        a = np.triu(qr[:d])
        overwrite = True
    _u, s, vt = linalg.svd(
        a, full_matrices=False, overwrite_a=overwrite, check_finite=False, lapack_driver="gesdd"
    )
    _u, vt = svd_flip(None, vt, u_based_decision=False)
    return s, vt


def _gram_factor(gram: FloatArray, rank: int) -> tuple[FloatArray, FloatArray]:
    """``s`` and ``vt`` of a matrix from its Gram matrix (overwritten), ``rank`` rows kept."""
    w, v = linalg.eigh(gram, overwrite_a=True, check_finite=False, driver="evd")
    s = np.sqrt(np.maximum(w[::-1][:rank], 0.0))
    vt = np.ascontiguousarray(v[:, ::-1][:, :rank].T)
    _u, vt = svd_flip(None, vt, u_based_decision=False)
    return s, vt


# --------------------------------------------------------------------------- the summary


def _as_float_array(value: Any, name: str, ndim: int, site: Site) -> FloatArray:
    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf":
        raise SummaryError(
            site, f"{name!r} has dtype {arr.dtype}; a real numeric array (float64) is expected"
        )
    if arr.ndim != ndim:
        raise SummaryError(site, f"{name!r} has shape {arr.shape}; a {ndim}-D array is expected")
    out = np.array(arr, dtype=np.float64, copy=True)
    if not np.all(np.isfinite(out)):
        raise SummaryError(
            site, f"{name!r} contains NaN or infinite values; finite values are expected"
        )
    out.setflags(write=False)
    return out


def _as_scalar(value: Any, name: str, site: Site, *, integer: bool) -> float | int:
    arr = np.asarray(value)
    if arr.size != 1 or arr.dtype.kind not in ("iu" if integer else "iuf"):
        kind = "an integer" if integer else "a real number"
        raise SummaryError(
            site,
            f"{name!r} is {value!r} (dtype {arr.dtype}, shape {arr.shape}); {kind} is expected",
        )
    scalar = arr.reshape(()).item()
    if not integer and not math.isfinite(scalar):
        raise SummaryError(site, f"{name!r} is {scalar}; a finite number is expected")
    return int(scalar) if integer else float(scalar)


@dataclass(frozen=True, eq=False)
class PCASummary:
    """What one site (or a merge of sites) sends for federated PCA.

    Parameters
    ----------
    n : int
        Number of samples summarised (at least 1).
    mean : ndarray of shape (d,)
        Mean of those samples.
    block : ndarray of shape (r, d)
        ``S · Vᵀ`` of the thin SVD of the samples centred on ``mean``, rows in
        descending singular value order; ``blockᵀ · block`` is the (possibly
        truncated) centred scatter matrix. ``r <= min(n, d)`` for a site.
    total_ss : float
        Exact total sum of squares of the centred samples (trace of the full
        scatter matrix), kept even when ``block`` is truncated.
    discarded_norm : float, default=0.0
        Upper bound on the spectral norm of the scatter dropped by truncation
        (0 when nothing was dropped).

    Notes
    -----
    Arrays are copied to float64 and made read-only. Instances compare by
    identity; compare the arrays explicitly.
    """

    n: int
    mean: FloatArray
    block: FloatArray
    total_ss: float
    discarded_norm: float = 0.0

    def __post_init__(self) -> None:
        self._validate(None)

    def _validate(self, site: Site) -> None:
        n = _as_scalar(self.n, "n", site, integer=True)
        if n < 1:
            raise SummaryError(site, f"'n' is {n}; a positive sample count is expected")
        mean = _as_float_array(self.mean, "mean", 1, site)
        block = _as_float_array(self.block, "block", 2, site)
        if block.shape[1] != mean.shape[0]:
            raise SummaryError(
                site,
                f"'block' has {block.shape[1]} columns but 'mean' has {mean.shape[0]} features; "
                "they must match",
            )
        total_ss = _as_scalar(self.total_ss, "total_ss", site, integer=False)
        discarded = _as_scalar(self.discarded_norm, "discarded_norm", site, integer=False)
        if total_ss < 0 or discarded < 0:
            raise SummaryError(
                site,
                "'total_ss' and 'discarded_norm' must be non-negative; "
                f"got {total_ss} and {discarded}",
            )
        object.__setattr__(self, "n", int(n))
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "block", block)
        object.__setattr__(self, "total_ss", float(total_ss))
        object.__setattr__(self, "discarded_norm", float(discarded))

    @property
    def n_features(self) -> int:
        """Number of features ``d``."""
        return int(self.mean.shape[0])

    @property
    def rank(self) -> int:
        """Number of rows of ``block``."""
        return int(self.block.shape[0])

    @property
    def residual_ss(self) -> float:
        """Sum of squares not represented in ``block`` (dropped by truncation)."""
        kept = float(np.einsum("ij,ij->", self.block, self.block))
        return max(self.total_ss - kept, 0.0) if self.discarded_norm > 0 else 0.0

    @property
    def nbytes(self) -> int:
        """Size in bytes of the arrays in :meth:`to_arrays` (what crosses the boundary)."""
        return int(sum(v.nbytes for v in self.to_arrays().values()))

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Encode as a message: a dict of numpy arrays (scalars as 0-d arrays).

        Returns
        -------
        dict of str to ndarray
            Keys :data:`SUMMARY_KEYS`: ``n`` (int64), ``mean`` (d,), ``block``
            (r, d), ``total_ss`` and ``discarded_norm`` (float64).
        """
        return {
            "n": np.asarray(self.n, dtype=np.int64),
            "mean": np.array(self.mean, dtype=np.float64),
            "block": np.array(self.block, dtype=np.float64),
            "total_ss": np.asarray(self.total_ss, dtype=np.float64),
            "discarded_norm": np.asarray(self.discarded_norm, dtype=np.float64),
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any], *, site: Site = None) -> PCASummary:
        """Decode and check a message made by :meth:`to_arrays`.

        Parameters
        ----------
        arrays : mapping of str to array-like
            Must have exactly the keys :data:`SUMMARY_KEYS`.
        site : str, int or None, default=None
            Named in error messages.

        Returns
        -------
        PCASummary

        Raises
        ------
        SummaryError
            On missing or extra keys, wrong shapes or dtypes, non-finite values,
            or a non-positive count.
        """
        if not isinstance(arrays, Mapping):
            raise SummaryError(
                site, f"a PCA summary must be a mapping of arrays, got {type(arrays).__name__}"
            )
        missing = [k for k in SUMMARY_KEYS if k not in arrays]
        extra = sorted(str(k) for k in arrays if k not in SUMMARY_KEYS)
        if missing or extra:
            raise SummaryError(
                site,
                f"PCA summary keys wrong (missing {missing}, unexpected {extra}); "
                f"expected exactly {list(SUMMARY_KEYS)}",
            )
        obj = cls.__new__(cls)
        for key in SUMMARY_KEYS:
            object.__setattr__(obj, key, arrays[key])
        obj._validate(site)
        return obj


def _check_site_array(X: Any, site: Site) -> FloatArray:
    """Check one site's data: 2-D, numeric, finite, at least one row and column."""
    try:
        arr = np.asarray(X)
    except Exception as exc:  # e.g. ragged nested lists
        raise SummaryError(site, f"data could not be read as an array ({exc})") from exc
    if arr.dtype.kind not in "biuf":
        raise SummaryError(
            site,
            f"data has dtype {arr.dtype}; a real numeric (n_samples, n_features) array is expected",
        )
    if arr.ndim != 2:
        raise SummaryError(
            site, f"data has shape {arr.shape}; a 2-D (n_samples, n_features) array is expected"
        )
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise SummaryError(
            site, f"data has shape {arr.shape}; at least one sample and one feature are expected"
        )
    arr = np.asarray(arr, dtype=np.float64)
    # a finite sum proves every entry finite (NaN and inf propagate); only an overflowing
    # or non-finite sum needs the element-wise check (scikit-learn's trick)
    if not math.isfinite(float(np.sum(arr))) and not np.all(np.isfinite(arr)):
        bad = int(np.count_nonzero(~np.isfinite(arr).all(axis=1)))
        raise SummaryError(
            site,
            f"data contains NaN or infinite values in {bad} row(s); finite values are expected",
        )
    return arr


def _column_names(X: Any) -> np.ndarray | None:
    """A DataFrame's column names when all are strings (as scikit-learn keeps them), else None."""
    columns = getattr(X, "columns", None)
    if columns is None or not all(isinstance(c, str) for c in columns):
        return None
    return np.asarray(list(columns), dtype=object)


def _sites_feature_names(sites: Sequence[Any]) -> np.ndarray | None:
    """The feature names every site's DataFrame shares; None unless every site has names.

    Raises
    ------
    SummaryError
        When two sites' DataFrames name their columns differently (or in another order):
        their features would be mixed column by column.
    """
    names = [_column_names(x) for x in sites]
    named = [(i, n) for i, n in enumerate(names) if n is not None]
    for i, n in named[1:]:
        first, ref = named[0]
        if len(n) == len(ref) and not np.array_equal(n, ref):
            same = sorted(n.tolist()) == sorted(ref.tolist())
            raise SummaryError(
                i,
                f"DataFrame columns {n.tolist()} differ from site {first}'s {ref.tolist()}"
                + (" (the same names in another order)" if same else "")
                + "; give every site the same columns in the same order",
            )
    if len(named) != len(names):
        return None
    return named[0][1]


def _check_overflow(total_ss: float, x: FloatArray, site: Site) -> None:
    if not math.isfinite(total_ss):
        raise SummaryError(
            site,
            f"the data's sum of squares overflows float64 (largest |value| "
            f"{float(np.max(np.abs(x))):.3g}); rescale the features",
        )


def _check_rank(site_rank: Any) -> int | None:
    if site_rank is None:
        return None
    if isinstance(site_rank, bool) or not isinstance(site_rank, numbers.Integral) or site_rank < 1:
        raise ValueError(f"site_rank={site_rank!r}; a positive integer or None is expected")
    return int(site_rank)


def local_summary(
    X: Any,
    site_rank: int | None = None,
    *,
    svd_solver: str = "auto",
    site: Site = None,
) -> PCASummary:
    """Summarise one site's data for federated PCA (runs at the site).

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
        The site's data. Never leaves the site.
    site_rank : int or None, default=None
        Keep at most this many rows of ``S · Vᵀ``; None keeps ``min(n, d)``
        (exact).
    svd_solver : {"auto", "full", "covariance_eigh"}, default="auto"
        How ``S · Vᵀ`` is computed: ``full`` (QR then SVD), ``covariance_eigh``
        (eigendecomposition of the ``d × d`` scatter matrix; faster, squares the
        condition number) or ``auto`` (``covariance_eigh`` when ``n >= d``); see
        :func:`resolve_solver`.
    site : str, int or None, default=None
        Named in error messages.

    Returns
    -------
    PCASummary
        ``n``, mean, block, exact total sum of squares, and the largest
        dropped squared singular value as ``discarded_norm``. A column that is 0 in every
        row is exactly 0 in ``mean`` and ``block``.
    """
    rank = _check_rank(site_rank)
    _check_solver(svd_solver)
    x = _check_site_array(X, site)
    n, d = x.shape
    mean = x.mean(axis=0)
    if resolve_solver(svd_solver, n, d) == "covariance_eigh":
        centred = x - mean
        gram = centred.T @ centred  # BLAS syrk
        del centred
        total_ss = float(np.trace(gram))
        _check_overflow(total_ss, x, site)
        s, vt = _gram_factor(gram, min(n, d))
    else:  # QR / SVD want Fortran order
        centred = np.empty((n, d), dtype=np.float64, order="F")
        np.subtract(x, mean, out=centred)
        total_ss = float(np.einsum("ij,ij->", centred, centred))
        _check_overflow(total_ss, x, site)
        s, vt = _right_svd(centred, overwrite=True, svd_solver="full")
    discarded = 0.0
    if rank is not None and rank < s.shape[0]:
        discarded = float(s[rank] ** 2)
        s, vt = s[:rank], vt[:rank]
    block = s[:, None] * vt
    # a column 0 in every row (one a site leaves out) carries no variance: 0, not rounding
    block[:, ~x.any(axis=0)] = 0.0
    return PCASummary(n=n, mean=mean, block=block, total_ss=total_ss, discarded_norm=discarded)


def merge(summaries: Sequence[PCASummary], *, svd_solver: str = "auto") -> PCASummary:
    """Merge site (or already merged) summaries into one, with one SVD.

    Summaries are added left to right: when summary ``b`` joins the running
    union ``a``, the rows of ``b.block`` and the correction row
    ``sqrt(n_a n_b / (n_a + n_b)) · (mean_a − mean_b)`` are stacked; one float64
    SVD of all rows ends the merge. The result equals merging pairwise in any
    order or tree, up to float rounding and the signs of singular vectors.

    Parameters
    ----------
    summaries : sequence of PCASummary
        At least one, all with the same number of features.
    svd_solver : {"auto", "full", "covariance_eigh"}, default="auto"
        How the SVD of the stacked rows is computed (see :func:`resolve_solver`;
        ``auto`` uses the ``d × d`` Gram matrix when there are at least ``d`` rows).

    Returns
    -------
    PCASummary
        The summary of the union; ``block`` has ``min(rows, d)`` rows.

    Raises
    ------
    SummaryError
        When a summary is not a :class:`PCASummary` or its feature count differs
        from the first one's (names the index).
    """
    items = list(summaries)
    solver = _check_solver(svd_solver)
    if not items:
        raise ValueError("merge needs at least one PCASummary; got none")
    for i, item in enumerate(items):
        if not isinstance(item, PCASummary):
            raise SummaryError(i, f"expected a PCASummary, got {type(item).__name__}")
        if item.n_features != items[0].n_features:
            raise SummaryError(
                i,
                f"summary has {item.n_features} features but summary 0 has "
                f"{items[0].n_features}; all sites must share the feature space",
            )
    if len(items) == 1:
        return items[0]
    first = items[0]
    n_run = first.n
    mean_run = np.array(first.mean)
    total = first.total_ss
    discarded = first.discarded_norm
    rows: list[FloatArray] = [first.block]
    for item in items[1:]:
        n_new = n_run + item.n
        correction = math.sqrt(n_run * item.n / n_new) * (mean_run - item.mean)
        rows.append(item.block)
        rows.append(correction[None, :])
        total += item.total_ss + float(correction @ correction)
        discarded += item.discarded_norm
        mean_run = mean_run + (item.n / n_new) * (item.mean - mean_run)
        n_run = n_new
    stacked = np.vstack(rows)
    s, vt = _right_svd(stacked, overwrite=True, svd_solver=solver)
    return PCASummary(
        n=n_run, mean=mean_run, block=s[:, None] * vt, total_ss=total, discarded_norm=discarded
    )


def subspace_error(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    """Sine of the largest principal angle between the row spaces of ``a`` and ``b``.

    Equals ``||P_a − P_b||_2`` for orthogonal projectors onto subspaces of the
    same dimension; insensitive to signs and rotations within the subspace.

    Parameters
    ----------
    a, b : array-like of shape (k, d)
        Rows spanning each subspace (e.g. ``components_``).

    Returns
    -------
    float
        In [0, 1]; 0 for identical subspaces.
    """
    a_arr = np.atleast_2d(np.asarray(a, dtype=np.float64))
    b_arr = np.atleast_2d(np.asarray(b, dtype=np.float64))
    if a_arr.shape[1] != b_arr.shape[1]:
        raise ValueError(
            f"subspaces live in different spaces: {a_arr.shape[1]} vs {b_arr.shape[1]} features"
        )
    angles = linalg.subspace_angles(a_arr.T, b_arr.T)
    return float(np.sin(np.max(angles))) if angles.size else 0.0


# --------------------------------------------------------------------------- the estimator


class FederatedPCA(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Exact PCA over data split across sites, from site summaries only.

    Parameters
    ----------
    n_components : int or None, default=None
        Number of components to keep; None keeps ``min(n_samples, n_features)``
        (or all the merged summary carries, when ``site_rank`` truncates).
        Must not exceed ``min(n_samples, n_features)`` of the pooled data.
    site_rank : int or None, default=None
        Rows of ``S · Vᵀ`` each site keeps in :meth:`local_summary`; None is
        exact. Smaller values send fewer bytes and make the fit approximate
        (reported in ``truncated_`` and ``subspace_error_bound_``).
    whiten : bool, default=False
        Scale transformed components to unit variance, as scikit-learn's PCA.
    svd_solver : {"auto", "full", "covariance_eigh"}, default="auto"
        How sites and the server compute ``S · Vᵀ``: ``full`` (QR then LAPACK
        SVD), ``covariance_eigh`` (symmetric eigensolver on the ``d × d`` scatter
        matrix: about twice as fast, but it squares the condition number, so
        components whose variance is below about ``1e-8`` of the first lose
        digits), or ``auto`` (``covariance_eigh`` wherever a matrix has at least
        as many rows as features, else ``full``), as scikit-learn's PCA names them.

    Attributes
    ----------
    mean_ : ndarray of shape (n_features,)
        Pooled mean.
    components_ : ndarray of shape (n_components_, n_features)
        Principal axes, signs as scikit-learn's ``PCA(svd_solver="full")``.
    explained_variance_ : ndarray of shape (n_components_,)
        Variance along each axis (divided by ``n_samples_ - 1``).
    explained_variance_ratio_ : ndarray of shape (n_components_,)
        Fraction of the exact total variance.
    singular_values_ : ndarray of shape (n_components_,)
        Singular values of the pooled centred data.
    noise_variance_ : float
        Mean of the remaining ``min(n, d) - n_components_`` eigenvalues (exact
        total minus kept), as scikit-learn's PCA.
    n_samples_ : int
        Samples over all sites.
    n_components_ : int
        Components kept.
    n_features_in_ : int
        Features.
    summary_ : PCASummary
        Merged summary; :meth:`partial_fit_summary` merges into it.
    truncated_ : bool
        True when some site dropped non-zero variance (``site_rank``).
    discarded_variance_ : float
        Variance (divided by ``n_samples_ - 1``) dropped by truncation.
    subspace_error_bound_ : float
        Davis–Kahan bound on :func:`subspace_error` between ``components_`` and
        pooled PCA's caused by truncation (0 when exact; float rounding aside).
    subspace_error_bounds_ : ndarray of shape (n_components_,)
        The same bound for the leading ``j`` components, ``j = 1 … n_components_``
        (the last entry is ``subspace_error_bound_``): with truncation, a small
        gap after component ``k`` can make the bound for all ``k`` vacuous (1) while
        the leading components, with larger gaps, are still well determined.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> sites = [rng.normal(size=(50, 8)), rng.normal(loc=1.0, size=(30, 8))]
    >>> pca = FederatedPCA(3).fit_sites(sites)
    >>> pca.components_.shape
    (3, 8)
    """

    def __init__(
        self,
        n_components: int | None = None,
        *,
        site_rank: int | None = None,
        whiten: bool = False,
        svd_solver: str = "auto",
    ) -> None:
        self.n_components = n_components
        self.site_rank = site_rank
        self.whiten = whiten
        self.svd_solver = svd_solver

    # ----------------------------------------------------------- protocol halves

    def local_summary(self, X: Any, *, site: Site = None) -> PCASummary:
        """Summarise one site's data with this estimator's ``site_rank`` and ``svd_solver``.

        Needs no fit.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            The site's data.
        site : str, int or None, default=None
            Named in error messages.

        Returns
        -------
        PCASummary
        """
        return local_summary(X, self.site_rank, svd_solver=self.svd_solver, site=site)

    def merge(self, summaries: Sequence[PCASummary]) -> PCASummary:
        """Merge summaries with this estimator's ``svd_solver``; see :func:`merge`.

        Parameters
        ----------
        summaries : sequence of PCASummary
            At least one.

        Returns
        -------
        PCASummary
        """
        return merge(summaries, svd_solver=self.svd_solver)

    # ----------------------------------------------------------------- fitting

    def fit_from_summaries(self, summaries: Sequence[PCASummary]) -> FederatedPCA:
        """Fit from site summaries (the server side).

        Parameters
        ----------
        summaries : sequence of PCASummary
            One per site (or already merged groups).

        Returns
        -------
        self
        """
        self._validate_params_()
        merged = merge(summaries, svd_solver=self.svd_solver)
        if hasattr(self, "feature_names_in_"):
            del self.feature_names_in_
        self._fit_merged(merged)
        return self

    def partial_fit_summary(self, summary: PCASummary) -> FederatedPCA:
        """Merge one more summary (e.g. a site's new data) into the fitted state.

        Other sites are not revisited: the stored ``summary_`` stands for them.

        Parameters
        ----------
        summary : PCASummary
            Summary of the new data.

        Returns
        -------
        self
        """
        if not hasattr(self, "summary_"):
            return self.fit_from_summaries([summary])
        self._validate_params_()
        self._fit_merged(merge([self.summary_, summary], svd_solver=self.svd_solver))
        return self

    def partial_fit(self, X: Any, y: Any = None) -> FederatedPCA:
        """Summarise ``X`` locally and merge it into the fitted state.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            New data. The first call keeps a DataFrame's column names in
            ``feature_names_in_``; later calls are checked against them, as scikit-learn
            checks ``transform``'s input.
        y : None
            Ignored.

        Returns
        -------
        self
        """
        if hasattr(self, "summary_"):
            X = validate_data(self, X, dtype=np.float64, reset=False)
            return self.partial_fit_summary(self.local_summary(X))
        names = _column_names(X)
        self.partial_fit_summary(self.local_summary(X))
        if names is not None:
            self.feature_names_in_ = names
        return self

    def fit_sites(self, sites: Sequence[Any]) -> FederatedPCA:
        """Fit from in-memory site arrays: summarise each, merge, fit.

        Parameters
        ----------
        sites : sequence of array-like, each of shape (n_k, n_features)
            One array per site; all must share ``n_features``. When every site is a
            DataFrame with the same (string) column names, they are kept in
            ``feature_names_in_``, as :meth:`fit` keeps one DataFrame's.

        Returns
        -------
        self

        Raises
        ------
        SummaryError
            When a site's data is not a finite 2-D numeric array, its number of features
            differs from site 0's, or two sites' DataFrames name their columns differently
            (or in another order).
        """
        self._validate_params_()
        if isinstance(sites, np.ndarray) or not isinstance(sites, Sequence) or len(sites) == 0:
            raise ValueError(
                "fit_sites expects a non-empty list of 2-D arrays, one per site; "
                f"got {type(sites).__name__}"
            )
        arrays = [_check_site_array(x, i) for i, x in enumerate(sites)]
        for i, arr in enumerate(arrays):
            if arr.shape[1] != arrays[0].shape[1]:
                raise SummaryError(
                    i,
                    f"data has {arr.shape[1]} features but site 0 has {arrays[0].shape[1]}; "
                    "all sites must share the feature space",
                )
        names = _sites_feature_names(sites)
        summaries = [
            local_summary(x, self.site_rank, svd_solver=self.svd_solver, site=i)
            for i, x in enumerate(arrays)
        ]
        if hasattr(self, "feature_names_in_"):
            del self.feature_names_in_
        self._fit_merged(merge(summaries, svd_solver=self.svd_solver))
        if names is not None:
            self.feature_names_in_ = names
        return self

    def fit(self, X: Any, y: Any = None) -> FederatedPCA:
        """Fit on one array (a single site), for scikit-learn compatibility.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training data.
        y : None
            Ignored.

        Returns
        -------
        self
        """
        self._validate_params_()
        x = validate_data(self, X, dtype=np.float64, ensure_min_samples=2, reset=True)
        names = getattr(self, "feature_names_in_", None)
        self.fit_sites([x])
        if names is not None:
            self.feature_names_in_ = names
        return self

    def _validate_params_(self) -> None:
        k = self.n_components
        if k is not None and (isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1):
            raise ValueError(f"n_components={k!r}; a positive integer or None is expected")
        _check_rank(self.site_rank)
        _check_solver(self.svd_solver)
        if not isinstance(self.whiten, bool | np.bool_):
            raise ValueError(f"whiten={self.whiten!r}; True or False is expected")

    def _fit_merged(self, merged: PCASummary) -> None:
        n, d = merged.n, merged.n_features
        if n < 2:
            raise ValueError(f"PCA needs at least 2 samples over all sites; got {n}")
        limit = min(n, d)
        k = min(limit, merged.rank) if self.n_components is None else int(self.n_components)
        if k > limit:
            raise ValueError(
                f"n_components={k} must be between 1 and min(n_samples, n_features)="
                f"min({n}, {d})={limit}"
            )
        if k > merged.rank:
            raise ValueError(
                f"n_components={k} exceeds the {merged.rank} directions the truncated site "
                f"summaries carry (site_rank={self.site_rank}); lower n_components or raise "
                "site_rank"
            )
        block = merged.block
        s = np.linalg.norm(block, axis=1)
        if np.any(s[:k] <= np.finfo(np.float64).tiny):
            s, vt = _right_svd(block)
        else:
            vt = block[:k] / s[:k, None]
        total_var = merged.total_ss / (n - 1)
        ev_all = s**2 / (n - 1)
        ev = ev_all[:k].copy()

        self.mean_ = np.array(merged.mean)
        self.components_ = np.ascontiguousarray(vt[:k])
        self.singular_values_ = s[:k].copy()
        self.explained_variance_ = ev
        self.explained_variance_ratio_ = ev / total_var if total_var > 0 else np.zeros_like(ev)
        self.noise_variance_ = (
            max(total_var - float(ev.sum()), 0.0) / (limit - k) if k < limit else 0.0
        )
        self.n_samples_ = n
        self.n_components_ = k
        self.n_features_in_ = d
        self.summary_ = merged
        self.truncated_ = merged.discarded_norm > 0.0
        self.discarded_variance_ = merged.residual_ss / (n - 1)
        eigs = s**2
        self.subspace_error_bounds_ = np.array(
            [_davis_kahan_bound(eigs, j, merged.discarded_norm) for j in range(1, k + 1)]
        )
        self.subspace_error_bound_ = float(self.subspace_error_bounds_[-1])
        if self.truncated_:
            warnings.warn(
                f"site summaries were truncated to site_rank={self.site_rank}: "
                f"{self.discarded_variance_:.3g} of {total_var:.3g} total variance was dropped; "
                f"sin(largest principal angle) to pooled PCA <= {self.subspace_error_bound_:.3g} "
                "(see subspace_error_bound_)",
                TruncationWarning,
                stacklevel=3,
            )

    # -------------------------------------------------------------- transforms

    @property
    def _n_features_out(self) -> int:
        return int(self.components_.shape[0])

    def transform(self, X: Any) -> FloatArray:
        """Project ``X`` on the components (whitened when ``whiten=True``).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Data.

        Returns
        -------
        ndarray of shape (n_samples, n_components_)
        """
        check_is_fitted(self, "components_")
        x = validate_data(self, X, dtype=np.float64, reset=False)
        out: FloatArray = (x - self.mean_) @ self.components_.T
        if self.whiten:
            scale = np.sqrt(self.explained_variance_)
            out /= np.maximum(scale, np.finfo(np.float64).eps)
        return out

    def inverse_transform(self, X: Any) -> FloatArray:
        """Map component scores back to feature space.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_components_)
            Scores, as returned by :meth:`transform`.

        Returns
        -------
        ndarray of shape (n_samples, n_features_in_)
        """
        check_is_fitted(self, "components_")
        x = check_array(X, dtype=np.float64)
        if x.shape[1] != self.n_components_:
            raise ValueError(
                f"X has {x.shape[1]} columns but this FederatedPCA has "
                f"{self.n_components_} components"
            )
        comps = self.components_
        if self.whiten:
            comps = np.sqrt(self.explained_variance_)[:, None] * comps
        result: FloatArray = x @ comps + self.mean_
        return result


def _davis_kahan_bound(eigs: FloatArray, k: int, err_norm: float) -> float:
    """Bound on sin(largest principal angle) from a PSD perturbation of norm ``err_norm``."""
    if err_norm <= 0.0:
        return 0.0
    next_eig = float(eigs[k]) if eigs.shape[0] > k else 0.0
    gap = float(eigs[k - 1]) - next_eig - err_norm
    return min(1.0, err_norm / gap) if gap > 0 else 1.0


# --------------------------------------------------------------------------- protocol helpers


def site_pca_reply(
    X: Any, site_rank: int | None = None, *, svd_solver: str = "auto"
) -> dict[str, np.ndarray]:
    """A site's reply to a PCA request: its summary as a dict of numpy arrays.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
        The site's data (stays at the site).
    site_rank : int or None, default=None
        See :func:`local_summary`.
    svd_solver : {"auto", "full", "covariance_eigh"}, default="auto"
        See :func:`local_summary`.

    Returns
    -------
    dict of str to ndarray
        Keys :data:`SUMMARY_KEYS`.
    """
    return local_summary(X, site_rank, svd_solver=svd_solver).to_arrays()


def server_pca_merge(
    replies: Mapping[str, Mapping[str, Any]],
    n_components: int | None = None,
    *,
    whiten: bool = False,
    svd_solver: str = "auto",
) -> FederatedPCA:
    """Check the sites' replies, merge them in sorted site order, fit.

    Parameters
    ----------
    replies : mapping of site name to reply
        Each reply as produced by :func:`site_pca_reply`.
    n_components : int or None, default=None
        Components to keep.
    whiten : bool, default=False
        Passed to :class:`FederatedPCA`.
    svd_solver : {"auto", "full", "covariance_eigh"}, default="auto"
        Solver of the server's merge (see :func:`merge`).

    Returns
    -------
    FederatedPCA
        Fitted; ``site_names_`` lists the sites in merge order and
        ``site_bytes_`` the bytes each sent.

    Raises
    ------
    multimodal_fl.federated.protocol.InvalidReply
        Naming the site whose reply is malformed or has a different feature count.
    """
    if not replies:
        raise ValueError("server_pca_merge needs at least one site reply; got none")
    names = sorted(replies)
    summaries: list[PCASummary] = []
    for name in names:
        try:
            summaries.append(PCASummary.from_arrays(replies[name], site=name))
        except SummaryError as exc:
            raise InvalidReply(name, exc.reason) from exc
        if summaries[-1].n_features != summaries[0].n_features:
            raise InvalidReply(
                name,
                f"PCA summary has {summaries[-1].n_features} features but site {names[0]!r} has "
                f"{summaries[0].n_features}; all sites must share the feature space",
            )
    est = FederatedPCA(n_components, whiten=whiten, svd_solver=svd_solver)
    est.fit_from_summaries(summaries)
    est.site_names_ = list(names)
    est.site_bytes_ = {name: s.nbytes for name, s in zip(names, summaries, strict=True)}
    return est
