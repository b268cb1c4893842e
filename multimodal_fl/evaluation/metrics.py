"""Binary-classification metrics with honest undefined values and bootstrap confidence intervals.

Every metric is returned as a :class:`MetricValue`: a point estimate, an optional percentile
bootstrap interval, the number of patients, and -- when the metric cannot be computed -- a
``reason`` string instead of a number (``"no positives"``, ``"no negatives"``,
``"fewer than 10 patients"``). An undefined metric has ``value is None``; it is never reported
as 0.5 or 0.

Conventions
-----------
* Labels are 0/1 (booleans accepted); scores are predicted probabilities in ``[0, 1]``.
* A patient is predicted positive when ``score >= threshold``.
* Expected calibration error (ECE) uses ``n_bins`` equal-width bins on ``[0, 1]`` (10 by
  default); a score ``s`` falls in bin ``min(floor(s * n_bins), n_bins - 1)``;
  ``ECE = sum_k (n_k / n) * |mean(label)_k - mean(score)_k|``.
* Bootstrap intervals resample patients with replacement *within each class* (stratified), so
  every resample keeps the original numbers of positives and negatives; percentile intervals at
  ``alpha / 2`` and ``1 - alpha / 2``. Resamples on which a metric is undefined are skipped and
  counted in :attr:`MetricValue.n_skipped`.
* A set of patients' bootstrap is seeded by :func:`bootstrap_seed`: the base seed and the
  scores resampled. Wherever the same patients' scores are bootstrapped (the console and
  ``metrics.json``, the site's disclosed document, the report's cells), the resamples and so
  the interval are the same.

The built-in metrics (``auc``, ``average_precision``, ``brier``, ``ece``, ``sensitivity``,
``specificity``) are computed on all bootstrap resamples at once with numpy (rank-based AUC), so
1000 resamples of 500 patients take a few tens of milliseconds.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

__all__ = [
    "HIGHER_IS_BETTER",
    "METRIC_NAMES",
    "MetricValue",
    "binary_metrics",
    "bootstrap_ci",
    "bootstrap_metrics",
    "bootstrap_seed",
    "calibration_bins",
    "check_binary_inputs",
    "choose_threshold",
    "derive_seed",
    "disclosable",
    "disclosed_count",
    "expected_calibration_error",
    "metric_point",
    "paired_bootstrap_difference",
    "repeated_cv_auc",
    "roc_auc",
    "suppress_cells",
    "undefined_reason",
]

METRIC_NAMES: tuple[str, ...] = (
    "auc",
    "average_precision",
    "brier",
    "ece",
    "sensitivity",
    "specificity",
)
"""Names of the built-in metrics, in report order."""

HIGHER_IS_BETTER: dict[str, bool] = {
    "auc": True,
    "average_precision": True,
    "brier": False,
    "ece": False,
    "sensitivity": True,
    "specificity": True,
}
"""Direction of each built-in metric: the "worst" site or group is the min or the max."""

# which class each metric needs to be defined
_NEEDS_POS = {"auc", "average_precision", "sensitivity"}
_NEEDS_NEG = {"auc", "average_precision", "specificity"}
_NEEDS_THRESHOLD = {"sensitivity", "specificity"}

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class MetricValue:
    """One metric: a value with an optional confidence interval, or a reason it has none.

    Parameters
    ----------
    value : float or None
        The point estimate; ``None`` when the metric is undefined or suppressed.
    lo, hi : float or None
        Percentile bootstrap interval bounds; ``None`` when no interval was computed.
    n : int or None
        Patients the value was computed on; ``None`` when the count itself is suppressed
        (a cell below the small-cell threshold).
    reason : str or None
        Why ``value`` is ``None`` (``"no positives"``, ``"fewer than 10 patients"``, ...), or
        ``None`` when the value is defined.
    n_boot : int
        Bootstrap resamples requested (0 when no interval was computed).
    n_skipped : int
        Resamples skipped because the metric was undefined on them.
    """

    value: float | None
    lo: float | None = None
    hi: float | None = None
    n: int | None = None
    reason: str | None = None
    n_boot: int = 0
    n_skipped: int = 0

    @property
    def defined(self) -> bool:
        """Whether the metric has a value."""
        return self.value is not None

    def __float__(self) -> float:
        """The value, or NaN when undefined (for plotting and sorting only)."""
        return math.nan if self.value is None else float(self.value)

    def text(self, digits: int = 3) -> str:
        """``0.871 [0.842, 0.899]``, the value alone without an interval, or the reason.

        Parameters
        ----------
        digits : int, default 3
            Decimals of the value and the bounds.

        Returns
        -------
        str
            ``- (reason)`` when the metric is undefined.
        """
        if self.value is None:
            return f"- ({self.reason})"
        if self.lo is None or self.hi is None:
            return f"{self.value:.{digits}f}"
        return f"{self.value:.{digits}f} [{self.lo:.{digits}f}, {self.hi:.{digits}f}]"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (``None`` for missing numbers, never NaN)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MetricValue:
        """Rebuild from :meth:`to_dict` output.

        Parameters
        ----------
        data : mapping
            Keys of this dataclass; unknown keys are an error.

        Returns
        -------
        MetricValue
        """
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"MetricValue.from_dict: unknown keys {sorted(unknown)}; "
                f"accepted: {sorted(cls.__dataclass_fields__)}"
            )
        return cls(**dict(data))

    @classmethod
    def undefined(cls, reason: str, n: int | None = None) -> MetricValue:
        """An undefined metric with its reason.

        Parameters
        ----------
        reason : str
            Why there is no value.
        n : int or None
            Patient count to show, or ``None`` to hide it.

        Returns
        -------
        MetricValue
        """
        return cls(value=None, n=n, reason=reason)

    def __str__(self) -> str:
        """Human-readable form, e.g. ``0.812 [0.761, 0.858]`` or ``— (no positives)``."""
        if self.value is None:
            return f"— ({self.reason})"
        if self.lo is None or self.hi is None:
            return f"{self.value:.3f}"
        return f"{self.value:.3f} [{self.lo:.3f}, {self.hi:.3f}]"


# --------------------------------------------------------------------------------------------
# input checks


def check_binary_inputs(
    y_true: npt.ArrayLike, y_score: npt.ArrayLike, *, where: str = "metrics"
) -> tuple[IntArray, FloatArray]:
    """Validate and convert labels and scores.

    Parameters
    ----------
    y_true : array-like of shape (n,)
        Labels, 0/1 or booleans.
    y_score : array-like of shape (n,)
        Predicted probabilities in ``[0, 1]``.
    where : str
        Context named in error messages (e.g. ``"site_a/test"``).

    Returns
    -------
    y : ndarray of int64
    s : ndarray of float64

    Raises
    ------
    ValueError
        On shape mismatch, labels other than 0/1, or scores that are not finite in ``[0, 1]``.
    """
    y_arr = np.asarray(y_true)
    s = np.asarray(y_score, dtype=np.float64)
    if y_arr.ndim != 1 or s.ndim != 1:
        raise ValueError(
            f"{where}: labels and scores must be 1-D, got shapes {y_arr.shape} and {s.shape}"
        )
    if y_arr.shape[0] != s.shape[0]:
        raise ValueError(
            f"{where}: {y_arr.shape[0]} labels but {s.shape[0]} scores; they must be the same "
            "patients in the same order"
        )
    if y_arr.dtype == bool:
        y = y_arr.astype(np.int64)
    else:
        try:
            y_float = y_arr.astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: labels must be 0/1, got dtype {y_arr.dtype}") from exc
        bad = ~np.isin(y_float, (0.0, 1.0))
        if bad.any():
            example = y_arr[bad][:3].tolist()
            raise ValueError(
                f"{where}: labels must be 0 or 1; found {int(bad.sum())} other value(s), "
                f"e.g. {example}"
            )
        y = y_float.astype(np.int64)
    bad_s = ~np.isfinite(s) | (s < 0.0) | (s > 1.0)
    if bad_s.any():
        example = s[bad_s][:3].tolist()
        raise ValueError(
            f"{where}: scores must be probabilities, finite and in [0, 1]; found "
            f"{int(bad_s.sum())} other value(s), e.g. {example}"
        )
    return y, s


def undefined_reason(
    y: npt.ArrayLike, metric: str | None = None, *, min_cell: int = 0
) -> str | None:
    """Why a metric cannot be computed on these labels, or ``None`` if it can.

    Parameters
    ----------
    y : array-like of 0/1
        Labels of the patients in the cell.
    metric : str or None
        A name in :data:`METRIC_NAMES`; ``None`` applies the strict rule of every ranking
        metric (both classes needed).
    min_cell : int
        Cells with fewer patients are suppressed (``0`` disables).

    Returns
    -------
    str or None
    """
    y_arr = np.asarray(y)
    n = int(y_arr.shape[0])
    n_pos = int(np.sum(y_arr == 1))
    if n == 0:
        return "no patients"
    if n < min_cell:
        return f"fewer than {min_cell} patients"
    needs_pos = metric is None or metric in _NEEDS_POS
    needs_neg = metric is None or metric in _NEEDS_NEG
    if needs_pos and n_pos == 0:
        return "no positives"
    if needs_neg and n_pos == n:
        return "no negatives"
    return None


# --------------------------------------------------------------------------------------------
# point estimates


def calibration_bins(y_score: npt.ArrayLike, n_bins: int = 10) -> IntArray:
    """Equal-width bin index of each score on ``[0, 1]``.

    Parameters
    ----------
    y_score : array-like
        Scores in ``[0, 1]``.
    n_bins : int
        Number of bins.

    Returns
    -------
    ndarray of int64
        ``min(floor(score * n_bins), n_bins - 1)``.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins}")
    s = np.asarray(y_score, dtype=np.float64)
    return np.minimum(np.floor(s * n_bins).astype(np.int64), n_bins - 1)


def expected_calibration_error(
    y_true: npt.ArrayLike, y_score: npt.ArrayLike, *, n_bins: int = 10
) -> float:
    """Expected calibration error over equal-width bins.

    Parameters
    ----------
    y_true, y_score : array-like
        Labels and probabilities (see :func:`check_binary_inputs`).
    n_bins : int
        Equal-width bins on ``[0, 1]`` (10 by default).

    Returns
    -------
    float
        ``sum_k (n_k / n) |mean(y)_k - mean(s)_k|``.
    """
    y, s = check_binary_inputs(y_true, y_score, where="expected_calibration_error")
    if y.size == 0:
        raise ValueError("expected_calibration_error: no patients")
    b = calibration_bins(s, n_bins)
    sum_y = np.bincount(b, weights=y.astype(np.float64), minlength=n_bins)
    sum_s = np.bincount(b, weights=s, minlength=n_bins)
    return float(np.sum(np.abs(sum_y - sum_s)) / y.size)


def roc_auc(y_true: npt.ArrayLike, y_score: npt.ArrayLike) -> MetricValue:
    """Area under the ROC curve, or an undefined value with its reason.

    Parameters
    ----------
    y_true, y_score : array-like
        Labels and probabilities.

    Returns
    -------
    MetricValue
        ``reason="no positives"`` / ``"no negatives"`` when one class is absent.
    """
    return binary_metrics(y_true, y_score, metrics=("auc",))["auc"]


def metric_point(
    name: str, y: IntArray, s: FloatArray, *, threshold: Threshold | None, n_bins: int = 10
) -> float:
    """Point estimate of one built-in metric on validated inputs (defined cells only).

    Parameters
    ----------
    name : str
        A name in :data:`METRIC_NAMES`.
    y, s : ndarray
        Validated labels and scores (:func:`check_binary_inputs`).
    threshold : float, array or None
        Needed by ``sensitivity`` and ``specificity``; an array gives each patient's own.
    n_bins : int
        ECE bins.

    Returns
    -------
    float
    """
    if name == "auc":
        return float(roc_auc_score(y, s))
    if name == "average_precision":
        return float(average_precision_score(y, s))
    if name == "brier":
        return float(brier_score_loss(y, s))
    if name == "ece":
        return expected_calibration_error(y, s, n_bins=n_bins)
    if name in _NEEDS_THRESHOLD:
        if threshold is None:
            raise ValueError(f"metric {name!r} needs a threshold; pass threshold=...")
        pred = s >= np.asarray(threshold, dtype=np.float64)
        if name == "sensitivity":
            return float(np.mean(pred[y == 1]))
        return float(np.mean(~pred[y == 0]))
    raise ValueError(f"unknown metric {name!r}; accepted: {', '.join(METRIC_NAMES)}")


def _check_metric_names(metrics: Sequence[str] | None, threshold: object) -> list[str]:
    names = list(METRIC_NAMES) if metrics is None else list(metrics)
    unknown = [m for m in names if m not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; accepted: {', '.join(METRIC_NAMES)}")
    if threshold is None:
        if metrics is None:
            names = [m for m in names if m not in _NEEDS_THRESHOLD]
        elif any(m in _NEEDS_THRESHOLD for m in names):
            raise ValueError("sensitivity and specificity need a threshold; pass threshold=...")
    else:
        thr = np.asarray(threshold, dtype=np.float64)
        if not (np.all(np.isfinite(thr)) and np.all((thr >= 0.0) & (thr <= 1.0))):
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    return names


Threshold = float | npt.ArrayLike
"""A decision threshold: one float, or one per patient (e.g. each site's own threshold)."""


def _threshold_array(threshold: Threshold | None, n: int) -> FloatArray | float | None:
    """``None``, a float, or a length-``n`` array of per-patient thresholds."""
    if threshold is None:
        return None
    thr = np.asarray(threshold, dtype=np.float64)
    if thr.ndim == 0:
        return float(thr)
    if thr.shape != (n,):
        raise ValueError(
            f"per-patient thresholds must have one value per patient ({n}), got shape {thr.shape}"
        )
    return thr


def binary_metrics(
    y_true: npt.ArrayLike,
    y_score: npt.ArrayLike,
    *,
    threshold: Threshold | None = None,
    metrics: Sequence[str] | None = None,
    n_bins: int = 10,
    n_boot: int = 0,
    alpha: float = 0.05,
    seed: int = 0,
    min_cell: int = 0,
) -> dict[str, MetricValue]:
    """All built-in metrics of one set of patients, with optional bootstrap intervals.

    Parameters
    ----------
    y_true, y_score : array-like
        Labels (0/1) and predicted probabilities.
    threshold : float, array of shape (n,) or None
        Decision threshold for sensitivity and specificity (``score >= threshold`` is
        positive); an array gives each patient's own threshold (e.g. per-site thresholds).
        Without it those two metrics are left out (unless named in ``metrics``, which is then
        an error).
    metrics : sequence of str or None
        Subset of :data:`METRIC_NAMES`; default all.
    n_bins : int
        Equal-width ECE bins on ``[0, 1]``.
    n_boot : int
        Stratified bootstrap resamples for percentile intervals (0: no intervals).
    alpha : float
        Interval level is ``1 - alpha``.
    seed : int
        Bootstrap seed.
    min_cell : int
        Fewer patients than this suppress every metric (``reason="fewer than ... patients"``,
        ``n=None``).

    Returns
    -------
    dict of str to MetricValue
        Keyed by metric name, in :data:`METRIC_NAMES` order.
    """
    names = _check_metric_names(metrics, threshold)
    y, s = check_binary_inputs(y_true, y_score, where="binary_metrics")
    n = int(y.size)
    thr = _threshold_array(threshold, n)
    out: dict[str, MetricValue] = {}
    if n < min_cell and n > 0:
        return {m: MetricValue.undefined(f"fewer than {min_cell} patients") for m in names}
    boot: dict[str, MetricValue] = {}
    if n_boot > 0:
        boot = bootstrap_metrics(
            y, s, metrics=names, threshold=thr, n_bins=n_bins, n_boot=n_boot,
            alpha=alpha, seed=seed,
        )
    for m in names:
        reason = undefined_reason(y, m)
        if reason is not None:
            out[m] = MetricValue.undefined(reason, n=n)
            continue
        value = metric_point(m, y, s, threshold=thr, n_bins=n_bins)
        if m in boot:
            b = boot[m]
            out[m] = MetricValue(value, b.lo, b.hi, n, None, b.n_boot, b.n_skipped)
        else:
            out[m] = MetricValue(value, n=n)
    return out


# --------------------------------------------------------------------------------------------
# thresholds


def choose_threshold(
    y_val: npt.ArrayLike,
    s_val: npt.ArrayLike,
    rule: Literal["youden", "sensitivity", "specificity"] = "youden",
    *,
    target: float = 0.9,
) -> float:
    """Choose a decision threshold on validation data.

    Parameters
    ----------
    y_val, s_val : array-like
        Validation labels and scores (never the test split).
    rule : {"youden", "sensitivity", "specificity"}
        ``"youden"`` maximises ``sensitivity + specificity - 1``; ``"sensitivity"`` is the
        highest threshold whose validation sensitivity is at least ``target``;
        ``"specificity"`` the lowest whose specificity is at least ``target``.
    target : float
        Target for the ``"sensitivity"`` / ``"specificity"`` rules.

    Returns
    -------
    float
        A threshold in ``[0, 1]``; patients with ``score >= threshold`` are positive.

    Raises
    ------
    ValueError
        If the validation data lack positives or negatives, or the rule is unknown.
    """
    y, s = check_binary_inputs(y_val, s_val, where="choose_threshold")
    reason = undefined_reason(y)
    if reason is not None:
        raise ValueError(
            f"choose_threshold: validation data have {reason}; a threshold needs both classes"
        )
    if rule not in ("youden", "sensitivity", "specificity"):
        raise ValueError(
            f"choose_threshold: unknown rule {rule!r}; accepted: youden, sensitivity, specificity"
        )
    # candidate thresholds: every distinct score (predict positive when s >= t)
    cand = np.unique(s)
    pos = np.sort(s[y == 1])
    neg = np.sort(s[y == 0])
    sens = 1.0 - np.searchsorted(pos, cand, side="left") / pos.size
    spec = np.searchsorted(neg, cand, side="left") / neg.size
    if rule == "youden":
        j = sens + spec - 1.0
        return float(cand[int(np.argmax(j))])
    if rule == "sensitivity":
        ok = np.flatnonzero(sens >= target)
        return float(cand[ok[-1]]) if ok.size else float(cand[0])
    ok = np.flatnonzero(spec >= target)
    return float(cand[ok[0]]) if ok.size else float(cand[-1])


# --------------------------------------------------------------------------------------------
# bootstrap


def derive_seed(seed: int, *keys: object) -> int:
    """A reproducible seed for one cell, derived from a base seed and the cell's key.

    Parameters
    ----------
    seed : int
        Base seed.
    *keys : object
        Anything identifying the cell (site, attribute, group); turned into ``str``.

    Returns
    -------
    int
    """
    text = "\x1f".join(str(k) for k in keys)
    return int(np.random.SeedSequence([seed, zlib.crc32(text.encode())]).generate_state(1)[0])


def bootstrap_seed(seed: int, y_score: npt.ArrayLike) -> int:
    """The bootstrap seed of one set of patients: the base seed and the scores resampled.

    The one seeding rule of every per-site interval (a site's splits in ``metrics.json`` and in
    its disclosed document, its fairness cells, a cross-site cell): the seed depends on the
    patients' scores, in order, and their number only, so the same patients' same scores give
    the same resamples, and the same interval, whichever code path bootstraps them.

    Parameters
    ----------
    seed : int
        Base seed (the experiment's ``seed``).
    y_score : array-like
        The scores of the patients resampled, as float64.

    Returns
    -------
    int
    """
    s = np.ascontiguousarray(y_score, dtype=np.float64).ravel()
    return derive_seed(seed, zlib.crc32(s.tobytes()), s.size)


def _stratified_indices(y: IntArray, n_boot: int, rng: np.random.Generator) -> IntArray:
    """Resample indices within each class; positives first, then negatives."""
    pos = np.flatnonzero(y == 1)
    neg = np.flatnonzero(y == 0)
    parts = []
    if pos.size:
        parts.append(pos[rng.integers(0, pos.size, size=(n_boot, pos.size))])
    if neg.size:
        parts.append(neg[rng.integers(0, neg.size, size=(n_boot, neg.size))])
    return np.concatenate(parts, axis=1)


def _batched_metrics(
    names: Sequence[str],
    yb: IntArray,
    sb: FloatArray,
    threshold: FloatArray | float | None,
    n_bins: int,
) -> dict[str, FloatArray]:
    """Metrics of each row of ``(B, n)`` label/score matrices; NaN where undefined."""
    n_boot, n = sb.shape
    npos = yb.sum(axis=1).astype(np.float64)
    nneg = n - npos
    out: dict[str, FloatArray] = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        if "auc" in names:
            ranks = rankdata(sb, axis=1)  # average ranks for ties (Mann-Whitney)
            rpos = np.sum(ranks * yb, axis=1)
            out["auc"] = (rpos - npos * (npos + 1) / 2.0) / (npos * nneg)
        if "average_precision" in names:
            order = np.argsort(-sb, axis=1, kind="stable")
            s_sorted = np.take_along_axis(sb, order, axis=1)
            y_sorted = np.take_along_axis(yb, order, axis=1).astype(np.float64)
            tp = np.cumsum(y_sorted, axis=1)
            k = np.arange(1, n + 1, dtype=np.float64)
            # last position of each tie group of scores, as sklearn's thresholds
            end = np.ones_like(s_sorted, dtype=bool)
            end[:, :-1] = s_sorted[:, :-1] != s_sorted[:, 1:]
            tp_end = np.where(end, tp, 0.0)
            prev = np.maximum.accumulate(tp_end, axis=1)
            prev = np.concatenate([np.zeros((n_boot, 1)), prev[:, :-1]], axis=1)
            contrib = np.where(end, (tp - prev) * (tp / k), 0.0)
            out["average_precision"] = contrib.sum(axis=1) / npos
        if "brier" in names:
            out["brier"] = np.mean((sb - yb) ** 2, axis=1)
        if "ece" in names:
            b = calibration_bins(sb, n_bins) + np.arange(n_boot)[:, None] * n_bins
            flat = b.ravel()
            size = n_boot * n_bins
            sy = np.bincount(flat, weights=yb.ravel().astype(np.float64), minlength=size)
            ss = np.bincount(flat, weights=sb.ravel(), minlength=size)
            out["ece"] = np.abs(sy - ss).reshape(n_boot, n_bins).sum(axis=1) / n
        if "sensitivity" in names or "specificity" in names:
            if threshold is None:
                raise ValueError("sensitivity and specificity need a threshold")
            pred = sb >= threshold
            out["sensitivity"] = np.sum(pred & (yb == 1), axis=1) / npos
            out["specificity"] = np.sum(~pred & (yb == 0), axis=1) / nneg
    if "auc" in out:
        out["auc"][(npos == 0) | (nneg == 0)] = np.nan
    if "average_precision" in out:
        out["average_precision"][(npos == 0) | (nneg == 0)] = np.nan
    return {m: out[m] for m in names}


def _percentile(values: FloatArray, alpha: float, n_boot: int, n: int | None) -> MetricValue:
    ok = values[np.isfinite(values)]
    skipped = int(n_boot - ok.size)
    if ok.size == 0:
        return MetricValue(None, n=n, reason="undefined on every bootstrap resample",
                           n_boot=n_boot, n_skipped=skipped)
    lo, hi = np.quantile(ok, [alpha / 2.0, 1.0 - alpha / 2.0])
    return MetricValue(None, float(lo), float(hi), n, None, n_boot, skipped)


def bootstrap_metrics(
    y_true: npt.ArrayLike,
    y_score: npt.ArrayLike,
    *,
    metrics: Sequence[str] | None = None,
    threshold: Threshold | None = None,
    n_bins: int = 10,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    stratified: bool = True,
) -> dict[str, MetricValue]:
    """Percentile bootstrap intervals of the built-in metrics, all resamples at once.

    Parameters
    ----------
    y_true, y_score : array-like
        Labels and probabilities.
    metrics : sequence of str or None
        Subset of :data:`METRIC_NAMES`; default all (the threshold metrics only with a
        threshold).
    threshold : float, array of shape (n,) or None
        Decision threshold for sensitivity / specificity (per patient when an array).
    n_bins : int
        ECE bins.
    n_boot : int
        Number of resamples.
    alpha : float
        Interval level ``1 - alpha``.
    seed : int
        Seed of the resampling.
    stratified : bool
        Resample within each class (default). Unstratified resamples that lose a class are
        skipped for the metrics that need it and counted in ``n_skipped``.

    Returns
    -------
    dict of str to MetricValue
        ``value`` is ``None`` here (only ``lo``, ``hi``, ``n_boot``, ``n_skipped``); see
        :func:`binary_metrics` for point estimate and interval together.
    """
    names = _check_metric_names(metrics, threshold)
    y, s = check_binary_inputs(y_true, y_score, where="bootstrap_metrics")
    if n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    n = int(y.size)
    if n == 0:
        return {m: MetricValue.undefined("no patients", n=0) for m in names}
    thr = _threshold_array(threshold, n)
    rng = np.random.default_rng(seed)
    # chunk so the (B, n) matrices stay below ~4M entries
    chunk = max(1, min(n_boot, 4_000_000 // max(n, 1)))
    acc: dict[str, list[FloatArray]] = {m: [] for m in names}
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        if stratified:
            idx = _stratified_indices(y, b, rng)
        else:
            idx = rng.integers(0, n, size=(b, n))
        tb = thr[idx] if isinstance(thr, np.ndarray) else thr
        vals = _batched_metrics(names, y[idx], s[idx], tb, n_bins)
        for m in names:
            acc[m].append(vals[m])
        done += b
    return {m: _percentile(np.concatenate(acc[m]), alpha, n_boot, n) for m in names}


def bootstrap_ci(
    metric_fn: str | Callable[[IntArray, FloatArray], float],
    y_true: npt.ArrayLike,
    y_score: npt.ArrayLike,
    *,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    stratified: bool = True,
    threshold: Threshold | None = None,
) -> MetricValue:
    """Point estimate and percentile bootstrap interval of one metric.

    Parameters
    ----------
    metric_fn : str or callable
        A built-in metric name (vectorised over resamples) or any ``fn(y, s) -> float``
        (called once per resample; NaN or a ``ValueError`` marks a resample as degenerate).
    y_true, y_score : array-like
        Labels and probabilities.
    n_boot : int
        Number of resamples.
    alpha : float
        Interval level ``1 - alpha``.
    seed : int
        Resampling seed.
    stratified : bool
        Resample within each class (default).
    threshold : float, array or None
        For the built-in threshold metrics.

    Returns
    -------
    MetricValue
        With ``n_skipped`` the number of degenerate resamples that were left out.
    """
    if isinstance(metric_fn, str):
        return binary_metrics(
            y_true, y_score, metrics=(metric_fn,), threshold=threshold, n_boot=n_boot,
            alpha=alpha, seed=seed,
        )[metric_fn]
    y, s = check_binary_inputs(y_true, y_score, where="bootstrap_ci")
    n = int(y.size)
    try:
        point = float(metric_fn(y, s))
    except ValueError as exc:
        return MetricValue.undefined(str(exc), n=n)
    if not math.isfinite(point):
        return MetricValue.undefined("metric undefined on these patients", n=n)
    rng = np.random.default_rng(seed)
    idx = _stratified_indices(y, n_boot, rng) if stratified else rng.integers(0, n, (n_boot, n))
    vals = np.full(n_boot, np.nan)
    for i in range(n_boot):
        try:
            vals[i] = float(metric_fn(y[idx[i]], s[idx[i]]))
        except ValueError:
            vals[i] = np.nan
    ci = _percentile(vals, alpha, n_boot, n)
    return MetricValue(point, ci.lo, ci.hi, n, None, n_boot, ci.n_skipped)


def paired_bootstrap_difference(
    y_true: npt.ArrayLike,
    score_a: npt.ArrayLike,
    score_b: npt.ArrayLike,
    *,
    metric: str = "auc",
    threshold: Threshold | None = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> MetricValue:
    """Difference ``metric(b) - metric(a)`` of two models scored on the same patients.

    The same stratified resample of patients is used for both models (a paired bootstrap),
    so the interval reflects the uncertainty of the *change*, e.g. local-only -> federated.

    Parameters
    ----------
    y_true : array-like
        Labels of the shared patients.
    score_a, score_b : array-like
        Scores of model a (baseline) and model b on the same patients, same order.
    metric : str
        A built-in metric name.
    threshold : float, array or None
        For threshold metrics.
    n_boot, alpha, seed
        Bootstrap settings.

    Returns
    -------
    MetricValue
        The difference with its interval, or undefined with the reason.
    """
    names = _check_metric_names((metric,), threshold)
    y, sa = check_binary_inputs(y_true, score_a, where="paired_bootstrap_difference (a)")
    _, sb = check_binary_inputs(y_true, score_b, where="paired_bootstrap_difference (b)")
    n = int(y.size)
    reason = undefined_reason(y, metric)
    if reason is not None:
        return MetricValue.undefined(reason, n=n)
    thr = _threshold_array(threshold, n)
    point = metric_point(metric, y, sb, threshold=thr) - metric_point(
        metric, y, sa, threshold=thr
    )
    rng = np.random.default_rng(seed)
    idx = _stratified_indices(y, n_boot, rng)
    tb = thr[idx] if isinstance(thr, np.ndarray) else thr
    va = _batched_metrics(names, y[idx], sa[idx], tb, 10)[metric]
    vb = _batched_metrics(names, y[idx], sb[idx], tb, 10)[metric]
    ci = _percentile(vb - va, alpha, n_boot, n)
    return MetricValue(point, ci.lo, ci.hi, n, None, n_boot, ci.n_skipped)


def _cv_score_matrix(scores: npt.ArrayLike, n: int, where: str) -> FloatArray:
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != n:
        raise ValueError(f"{where}: expected scores of shape [repeats, {n}] (one out-of-fold "
                         f"score per patient and repeat), got shape {np.shape(scores)}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{where}: scores must be finite (every patient needs an out-of-fold "
                         "score in every repeat)")
    return arr


def _mean_pooled_auc(y: IntArray, scores: FloatArray, idx: IntArray) -> FloatArray:
    """Mean over repeats of the AUC on each resample (rows of ``idx``): shape ``[n_boot]``."""
    yb = y[idx]
    per_repeat = [_batched_metrics(("auc",), yb, row[idx], None, 10)["auc"] for row in scores]
    return np.mean(per_repeat, axis=0)


def repeated_cv_auc(
    y_true: npt.ArrayLike,
    scores: npt.ArrayLike,
    *,
    baseline: npt.ArrayLike | None = None,
    compare: Literal["difference", "ratio"] = "difference",
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> MetricValue:
    """AUC of repeated k-fold cross-validation, with a patient bootstrap interval.

    Each repeat of a k-fold cross-validation scores every patient once, out of fold. The
    estimate is the mean over repeats of the AUC of each repeat's pooled out-of-fold scores.
    The interval resamples patients within each class (one resample shared by every repeat),
    recomputes that mean and takes percentiles. With ``baseline`` (a second model's scores
    for the same patients, folds and repeats) the same resamples give a paired interval of
    ``mean AUC(scores) - mean AUC(baseline)`` (``compare="difference"``) or of their
    quotient (``compare="ratio"``).

    Parameters
    ----------
    y_true : array-like [n]
        0/1 labels of the patients.
    scores : array-like [repeats, n] or [n]
        Out-of-fold scores, one row per repeat, columns in the order of ``y_true``.
    baseline : array-like [repeats, n] or None
        The reference model's out-of-fold scores (same shape), for a paired comparison.
    compare : {"difference", "ratio"}
        How ``scores`` is compared with ``baseline``.
    n_boot, alpha, seed
        Bootstrap resamples, interval level ``1 - alpha``, resampling seed.

    Returns
    -------
    MetricValue
        The mean AUC (or the difference or ratio) and its interval; undefined with the
        reason when a class is missing. With one repeat and no baseline, value and interval
        equal :func:`bootstrap_ci` of the AUC with the same seed.
    """
    if compare not in ("difference", "ratio"):
        raise ValueError(f"compare must be 'difference' or 'ratio', got {compare!r}")
    y = np.asarray(y_true)
    if y.ndim != 1 or not np.isin(y, (0, 1)).all():
        raise ValueError("repeated_cv_auc: y_true must be a 1-D array of 0/1 labels")
    y = y.astype(np.int64)
    n = int(y.size)
    reason = undefined_reason(y, "auc")
    if reason is not None:
        return MetricValue.undefined(reason, n=n)
    sa = _cv_score_matrix(scores, n, "repeated_cv_auc (scores)")
    everyone = np.arange(n)[None, :]
    point = float(_mean_pooled_auc(y, sa, everyone)[0])
    idx = _stratified_indices(y, n_boot, np.random.default_rng(seed))
    boot = _mean_pooled_auc(y, sa, idx)
    if baseline is not None:
        sb = _cv_score_matrix(baseline, n, "repeated_cv_auc (baseline)")
        if sb.shape != sa.shape:
            raise ValueError(f"repeated_cv_auc: baseline has shape {sb.shape}, scores "
                             f"{sa.shape}; they must match")
        ref = float(_mean_pooled_auc(y, sb, everyone)[0])
        ref_boot = _mean_pooled_auc(y, sb, idx)
        if compare == "ratio":
            point, boot = point / ref, boot / ref_boot
        else:
            point, boot = point - ref, boot - ref_boot
    ci = _percentile(boot, alpha, n_boot, n)
    return MetricValue(point, ci.lo, ci.hi, n, None, n_boot, ci.n_skipped)


# --------------------------------------------------------------------------------------------
# small cells: what may leave a site or a report


def disclosable(count: int, min_cell: int) -> bool:
    """Whether a count may be shown: 0, or at least ``min_cell``.

    Parameters
    ----------
    count : int
    min_cell : int

    Returns
    -------
    bool
    """
    return count == 0 or count >= min_cell


def disclosed_count(count: int, min_cell: int, *, of: int | None = None) -> int | None:
    """``count`` when it may be shown, else ``None``.

    Parameters
    ----------
    count : int
    min_cell : int
    of : int or None
        The shown total it is part of: then its complement ``of - count`` must be
        disclosable too (else it would be derived by subtraction).

    Returns
    -------
    int or None
    """
    if not disclosable(int(count), min_cell):
        return None
    if of is not None and not disclosable(int(of) - int(count), min_cell):
        return None
    return int(count)


def suppress_cells(
    cells: Mapping[str, Sequence[int]],
    min_cell: int,
    *,
    total: Sequence[int] | None = None,
    names: Sequence[str] = ("patients",),
) -> dict[str, str]:
    """The cells of one partition to suppress, each with its reason (complementary suppression).

    A cell is suppressed when it holds fewer than ``min_cell`` patients (the sum of its
    counts) or any of its counts (e.g. positives, negatives) lies in ``(0, min_cell)``. Then,
    while what the shown cells leave of ``total`` (the suppressed cells together, and anything
    outside the cells) has a count in ``(0, min_cell)``, the shown cell with the fewest
    patients is suppressed too: no suppressed cell can be derived by subtraction.

    Parameters
    ----------
    cells : mapping of str to sequence of int
        Each cell's counts, in the order of ``names``.
    min_cell : int
    total : sequence of int or None
        The counts of the whole, if shown (default: the cells' sum, which then reveals nothing
        beyond the cells).
    names : sequence of str
        What each count counts (``patients``; ``positives``, ``negatives``), for the reasons.

    Returns
    -------
    dict of str to str
        Suppressed cell -> reason; cells not in it may be shown.
    """
    counts = {k: np.asarray(v, dtype=np.int64) for k, v in cells.items()}
    whole = (np.asarray(total, dtype=np.int64) if total is not None
             else sum(counts.values(), np.zeros(len(names), dtype=np.int64)))
    out: dict[str, str] = {}
    for key, c in counts.items():
        n = int(c.sum())
        if 0 < n < min_cell:
            out[key] = f"fewer than {min_cell} patients"
            continue
        small = [name for name, k in zip(names, c, strict=True)
                 if not disclosable(int(k), min_cell)]
        if small and n > 0:
            out[key] = f"fewer than {min_cell} {small[0]}"
    while True:
        shown = [k for k in counts if k not in out]
        rest = whole - sum((counts[k] for k in shown), np.zeros_like(whole))
        if all(disclosable(int(k), min_cell) for k in (*rest, int(rest.sum()))) or not shown:
            return out
        smallest = min(shown, key=lambda k: (int(counts[k].sum()), k))
        out[smallest] = (f"suppressed so that a cell of fewer than {min_cell} cannot be derived "
                         "by subtraction")
