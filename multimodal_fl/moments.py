"""Per-feature moments: the one implementation of federated standardisation's statistics.

A site summarises its rows as per-feature (count, sum, sum of squares) with
:func:`column_moments`; the server adds the summaries with :func:`pool_moments`; and
:func:`standardization` turns pooled moments into a standardiser's state (mean, scale). No
site's rows are needed and no one site's statistics are used alone.

Pure numpy and at the bottom of the package's layers, because three layers use the same
arithmetic: the :class:`~multimodal_fl.encoders.tabular.Standardizer` (fit on pooled rows must
equal the federated result), training's local and centralized baselines, and the federated
server (:mod:`multimodal_fl.federated.aggregation` re-exports these functions).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

__all__ = [
    "Moments",
    "column_moments",
    "count_like",
    "pool_moments",
    "standardization",
    "withheld_columns",
]

#: Per-feature ``(count, sum, sum of squares)``.
Moments = tuple[npt.NDArray[np.int64] | npt.NDArray[np.float64], npt.NDArray[np.float64],
                npt.NDArray[np.float64]]


def column_moments(x: npt.ArrayLike, *, where: str = "column_moments") -> Moments:
    """One site's summary: per-column count of observed values, their sum and sum of squares.

    NaN marks a missing value and is left out of every column's count and sums.

    Parameters
    ----------
    x : array-like [n_samples, n_features]
    where : str
        Named in errors.

    Returns
    -------
    n, sum, sumsq : numpy.ndarray
        Counts (int64), sums and sums of squares (float64), one per column.

    Raises
    ------
    ValueError
        If ``x`` is not 2-D or holds an infinite value.
    """
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{where}: expected a 2-D array (samples x features), got shape "
                         f"{arr.shape}")
    if np.isinf(arr).any():
        raise ValueError(f"{where}: infinite values are not allowed (use NaN for missing)")
    present = ~np.isnan(arr)
    filled = np.where(present, arr, 0.0)
    return present.sum(axis=0).astype(np.int64), filled.sum(axis=0), (filled * filled).sum(axis=0)


def count_like(n: npt.ArrayLike, sums: npt.ArrayLike, sumsq: npt.ArrayLike
               ) -> npt.NDArray[np.bool_]:
    """Which columns' moments are those of a 0/1 column: their ``sum`` counts patients.

    A column whose observed values are all 0 or 1 has ``sum == sumsq``, an integer: ``sum`` is
    the number of its patients with the value 1 (a condition, a medication, a missing-value
    indicator, a sex). Recognised from the moments alone, so the disclosure gate can tell such
    a column from the reply; any column whose moments look so is treated as one.

    Parameters
    ----------
    n, sums, sumsq : array-like [F]
        Per-column observed count, sum and sum of squares (:func:`column_moments`).

    Returns
    -------
    numpy.ndarray of bool [F]
        True for an observed column (``n > 0``) with ``sum == sumsq`` and ``sum`` an integer.
    """
    n_, s_, q_ = (np.asarray(v, dtype=np.float64).reshape(-1) for v in (n, sums, sumsq))
    with np.errstate(invalid="ignore"):
        out: npt.NDArray[np.bool_] = (n_ > 0) & (s_ == q_) & (s_ == np.round(s_))
    return out


def withheld_columns(n: npt.ArrayLike, sums: npt.ArrayLike, sumsq: npt.ArrayLike,
                     min_cell: int) -> npt.NDArray[np.bool_]:
    """Which columns a site sends as unseen under the small-cell rule (``min_cell``).

    A column observed in fewer than ``min_cell`` patients (its moments are theirs), and a
    :func:`count_like` column whose count ``sum`` or complement ``n - sum`` lies in
    ``(0, min_cell)`` (its moments count so few patients with, or without, the value 1). The
    ``moments`` rule of the disclosure gate sends such a column as ``n = sum = sumsq = 0``,
    the PCA summary of the rows leaves it out, and a local-only model's standardiser does not
    use it: one rule for every place a column's statistics leave a site.

    Parameters
    ----------
    n, sums, sumsq : array-like [F]
        Per-column observed count, sum and sum of squares of the site's rows.
    min_cell : int
        The small-cell threshold (``0`` or ``1``: nothing is withheld).

    Returns
    -------
    numpy.ndarray of bool [F]
    """
    n_, s_, _ = (np.asarray(v, dtype=np.float64).reshape(-1) for v in (n, sums, sumsq))

    def small(k: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
        return (k > 0) & (k < min_cell)

    out: npt.NDArray[np.bool_] = small(n_) | (count_like(n, sums, sumsq)
                                              & (small(s_) | small(n_ - s_)))
    return out


def pool_moments(summaries: Iterable[tuple[npt.ArrayLike, npt.ArrayLike, npt.ArrayLike]]
                 ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64],
                            npt.NDArray[np.float64]]:
    """Add per-site moments, in the order given, in float64.

    Parameters
    ----------
    summaries : iterable of (n, sum, sumsq)
        One triple per site (e.g. from :func:`column_moments`); scalars or arrays.

    Returns
    -------
    n, sum, sumsq : numpy.ndarray
        Element-wise sums (float64).

    Raises
    ------
    ValueError
        If there is no summary, the sites' feature counts differ, or a count is negative.
    """
    items = [tuple(np.asarray(v, dtype=np.float64) for v in m) for m in summaries]
    if not items:
        raise ValueError("pool_moments needs at least one (n, sum, sumsq) summary")
    shapes = sorted({m[0].shape for m in items})
    if len(shapes) != 1:
        raise ValueError(f"pool_moments: sites report different feature counts {shapes}")
    for i, m in enumerate(items):
        if (m[0] < 0).any():
            raise ValueError(f"pool_moments: summary {i} has a negative count: {m[0]}")
    n, s, ss = (np.sum([m[j] for m in items], axis=0) for j in range(3))
    return n, s, ss


def standardization(n: npt.ArrayLike, sums: npt.ArrayLike, sumsq: npt.ArrayLike
                    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """A standardiser's mean and scale from pooled moments (population variance, ``ddof=0``).

    A feature never observed gets mean 0 and scale 1; a constant feature gets scale 1.

    Parameters
    ----------
    n, sums, sumsq : array-like [F]
        Pooled observed counts, sums and sums of squares.

    Returns
    -------
    mean, scale : numpy.ndarray
        float64 [F].

    Raises
    ------
    ValueError
        If the three differ in length, a count is negative or a value is not finite.
    """
    n_, s_, q_ = (np.asarray(v, dtype=np.float64).reshape(-1) for v in (n, sums, sumsq))
    if not n_.shape == s_.shape == q_.shape:
        raise ValueError(f"moments differ in length: {n_.shape}, {s_.shape}, {q_.shape}")
    if (n_ < 0).any() or not np.isfinite(np.concatenate([n_, s_, q_])).all():
        raise ValueError("moments must be finite with non-negative counts")
    safe_n = np.where(n_ > 0, n_, 1.0)
    mean = np.where(n_ > 0, s_ / safe_n, 0.0)
    var = np.where(n_ > 0, np.maximum(q_ / safe_n - mean**2, 0.0), 1.0)
    std = np.sqrt(var)
    scale = np.where(std > 1e-12 * np.maximum(1.0, np.abs(mean)), std, 1.0)
    return mean, scale
