"""Recalibration of a model's scores: an intercept, Platt scaling, or a temperature on the logit.

A model trained with a positive-class weight (``pos_weight``, the default of the training loop)
ranks patients well but its scores are not risks: every logit is shifted by about
``log(pos_weight)``, so the mean predicted risk sits far above the prevalence. A recalibration
maps each score ``s`` to

``s' = expit(a + b * logit(s))``

* ``platt`` (Platt 1999; the default): both ``a`` and ``b`` are fitted. The intercept undoes
  the shift of the class weight, the slope corrects over- or under-confidence, at the price of
  a slope estimated from the validation split. A fit with ``b <= 0`` would reverse the
  ranking: it keeps the intercept alone (``b = 1``). The default since the tabular linear path
  trains at 10 times the learning rate, which made the sample models over-confident as well
  as shifted (``benchmarks/calibration.py``, seeds 0-5: docs/fairness.md says how it was
  chosen).
* ``intercept`` (recalibration-in-the-large): ``b = 1``, ``a`` fitted. A class weight ``w``
  moves every logit by about ``log(w)``, which is exactly an intercept; one parameter is the
  steadiest fit on a validation split of a hundred or so patients.
* ``temperature`` (Guo et al. 2017): ``a = 0``, ``b = 1 / T``. One parameter; it cannot move
  the mean predicted risk of a model whose logits are shifted, so it does not undo a class
  weight. Offered for models trained without one.
* ``closed_test`` (the closed testing procedure of Vergouwe et al. 2017, Stat Med 36:4529,
  for choosing how much of a prediction model to update, reduced to these three maps): the
  original scores (``original``: ``a = 0, b = 1``), the intercept and Platt are fitted on the
  same histogram; Platt is tested against the original scores by the likelihood ratio (2
  degrees of freedom) and, if that is significant at ``ALPHA``, against the intercept alone
  (1 degree of freedom). The first test not significant stops it: the original scores, or the
  intercept; otherwise Platt. So the slope is fitted only when the validation split shows it
  is needed (an over-confident model), and a split too small to show it keeps the steadier
  intercept. The result's ``method`` is the map chosen; its ``source`` gives both statistics.
  The deviances are computed on the histogram's counts with each bin's patients at its
  midpoint, from the parameters fitted as above (Platt's smoothed targets), so they are
  those of the fits actually applied.

Each is one monotone map, so the ranking, and the AUC, is unchanged. All are fitted by
:func:`fit_recalibration` on **counts**: a fine histogram of the
validation scores per label (negatives, then positives, on ``n_bins`` equal-width bins of
``[0, 1]``, :func:`~multimodal_fl.evaluation.histograms.fine_counts`), each bin's patients at
its midpoint. In a federation that histogram is the secure sum of the sites' validation
histograms, so the server fits without any site's scores; on one site or in process it is the
site's or the pooled split's own. The loss is the binomial log-loss with Platt's smoothed
targets (``(N+ + 1) / (N+ + 2)`` and ``1 / (N- + 2)``), so a histogram whose classes separate
still gives finite parameters; the fit itself is scikit-learn's ``LogisticRegression`` with
per-row weights. A Platt fit whose slope comes out not positive (a model that ranks the
validation split backwards, e.g. barely trained on a few patients) would reverse the ranking:
it is replaced by calibration-in-the-large alone (``b = 1``, ``a`` solving the same weighted
score equation), so the AUC never changes; a temperature cannot do that and is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from scipy.optimize import brentq
from scipy.special import expit, logit
from scipy.stats import chi2
from sklearn.linear_model import LogisticRegression

from multimodal_fl.evaluation.metrics import calibration_bins, check_binary_inputs

__all__ = [
    "ALPHA",
    "CONFIG_KEYS",
    "MAPS",
    "METHODS",
    "RAW_SCORE",
    "Recalibration",
    "RecalibrationError",
    "fit_on_scores",
    "fit_recalibration",
    "recalibrated_frame",
]

#: The methods ``evaluation.recalibrate`` names (``none``: scores are left as they are).
METHODS: tuple[str, ...] = ("intercept", "platt", "temperature", "closed_test", "none")
#: The methods that fit something.
FITTED: tuple[str, ...] = METHODS[:4]
#: The maps a fitted :class:`Recalibration` can be (``closed_test`` chooses one of the first
#: two or ``original``, the scores as they are).
MAPS: tuple[str, ...] = ("intercept", "platt", "temperature", "original")
#: The closed test's significance level (Vergouwe et al. 2017 used 0.05).
ALPHA = 0.05
#: Scores are clipped to ``[EPS, 1 - EPS]`` before the logit.
EPS = 1e-6
#: A request's config keys of a recalibration (method, intercept, slope).
CONFIG_KEYS: tuple[str, str, str] = ("recalibrate", "recalibrate_a", "recalibrate_b")
#: The predictions table's column of the model's own score, beside the recalibrated ``score``.
RAW_SCORE = "score_raw"


class RecalibrationError(ValueError):
    """A recalibration that cannot be fitted from the counts given (one line saying why)."""


@dataclass(frozen=True)
class Recalibration:
    """A fitted recalibration: ``expit(a + b * logit(score))``.

    Attributes
    ----------
    method : str
        The map: ``intercept``, ``platt``, ``temperature`` or ``original`` (``a = 0, b = 1``,
        chosen by the closed test).
    a : float
        Intercept (0 for ``temperature``).
    b : float
        Slope on ``logit(score)`` (1 for ``intercept``, ``1 / T`` for ``temperature``);
        positive.
    n : int
        Patients of the histogram it was fitted on.
    source : str
        What it was fitted on, in words.
    """

    method: str
    a: float
    b: float
    n: int = 0
    source: str = ""

    def apply(self, scores: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """The recalibrated scores.

        Parameters
        ----------
        scores : array-like
            Probabilities in ``[0, 1]``.

        Returns
        -------
        ndarray of float64
        """
        s = np.clip(np.asarray(scores, dtype=np.float64), EPS, 1.0 - EPS)
        out: npt.NDArray[np.float64] = expit(self.a + self.b * logit(s))
        return out

    def to_config(self) -> dict[str, str | float]:
        """The recalibration as request config values (:data:`CONFIG_KEYS`).

        Returns
        -------
        dict
        """
        return dict(zip(CONFIG_KEYS, (self.method, float(self.a), float(self.b)), strict=True))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Recalibration | None:
        """The recalibration a request carries, or ``None`` when it carries none.

        Parameters
        ----------
        config : mapping
            A request's config.

        Returns
        -------
        Recalibration or None

        Raises
        ------
        RecalibrationError
            For an unknown method or a non-finite or non-positive slope.
        """
        method, ka, kb = CONFIG_KEYS
        if kb not in config:
            return None
        name = str(config.get(method, "intercept"))
        a, b = float(config.get(ka, 0.0)), float(config[kb])
        _check(name, a, b, where="request config")
        return cls(name, a, b, source="the request")

    def to_dict(self) -> dict[str, Any]:
        """JSON form (``metrics.json``, ``recalibration.json``).

        Returns
        -------
        dict
            ``method``, ``a``, ``b``, ``n``, ``source``.
        """
        return {"method": self.method, "a": self.a, "b": self.b, "n": self.n,
                "source": self.source}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], *, where: str = "recalibration") -> Recalibration:
        """Read :meth:`to_dict`'s form back.

        Parameters
        ----------
        doc : mapping
        where : str
            Names the document in errors (a file path).

        Returns
        -------
        Recalibration

        Raises
        ------
        RecalibrationError
            One line naming ``where`` and the field.
        """
        try:
            method, a, b = str(doc["method"]), float(doc["a"]), float(doc["b"])
        except (KeyError, TypeError, ValueError) as exc:
            raise RecalibrationError(f"{where}: expected fields method, a, b ({exc})") from None
        _check(method, a, b, where=where)
        return cls(method, a, b, n=int(doc.get("n", 0)), source=str(doc.get("source", "")))


def _check(method: str, a: float, b: float, *, where: str) -> None:
    if method not in MAPS:
        raise RecalibrationError(f"{where}: recalibration method {method!r}; expected one of "
                                 f"{list(MAPS)}")
    if not (np.isfinite(a) and np.isfinite(b) and b > 0):
        raise RecalibrationError(f"{where}: recalibration a={a}, b={b}; expected finite values "
                                 "and b > 0 (a monotone map)")


def fit_recalibration(
    neg: npt.ArrayLike, pos: npt.ArrayLike, *, method: str = "intercept", source: str = "",
) -> Recalibration:
    """Fit a recalibration on a fine histogram of scores per label.

    Each bin's patients are placed at its midpoint, ``(k + 0.5) / n_bins``.

    Parameters
    ----------
    neg, pos : array-like of int, shape (n_bins,)
        Negatives' and positives' counts per equal-width bin of ``[0, 1]``.
    method : {"intercept", "platt", "temperature", "closed_test", "original"}
        ``original`` is the identity map (what the closed test keeps when no update is
        significant; given here so that its choice can be refitted by name).
    source : str
        What the histogram is, in words (kept with the result).

    Returns
    -------
    Recalibration

    Raises
    ------
    RecalibrationError
        For an unknown method, mismatched or negative counts, a histogram with one class only,
        or a temperature fit whose inverse temperature is not positive (a Platt fit then keeps
        its intercept alone, with ``b = 1``).
    """
    if method not in (*FITTED, "original"):
        raise RecalibrationError(f"recalibration method {method!r}; expected one of "
                                 f"{[*FITTED, 'original']}")
    n_arr = np.asarray(neg, dtype=np.float64).ravel()
    p_arr = np.asarray(pos, dtype=np.float64).ravel()
    if n_arr.shape != p_arr.shape or n_arr.size < 2:
        raise RecalibrationError(f"recalibration: negatives' and positives' histograms of "
                                 f"{n_arr.size} and {p_arr.size} bins; expected the same number, "
                                 "at least 2")
    if (n_arr < 0).any() or (p_arr < 0).any():
        raise RecalibrationError("recalibration: negative counts in the histogram")
    n_neg, n_pos = float(n_arr.sum()), float(p_arr.sum())
    if n_neg == 0 or n_pos == 0:
        raise RecalibrationError(f"recalibration: the histogram holds {int(n_pos)} positives "
                                 f"and {int(n_neg)} negatives; both classes are needed")
    x = logit(np.clip(_midpoints(n_arr.size), EPS, 1.0 - EPS))
    t_pos, t_neg = (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0)  # Platt's targets
    keep = (n_arr + p_arr) > 0
    xs, n_k, p_k = x[keep], n_arr[keep], p_arr[keep]
    w1 = p_k * t_pos + n_k * t_neg  # each bin: a soft label as a positive and a negative row
    w0 = p_k * (1.0 - t_pos) + n_k * (1.0 - t_neg)
    rows = np.concatenate([xs, xs])[:, None]
    labels = np.concatenate([np.ones(xs.size), np.zeros(xs.size)])
    n = round(n_neg + n_pos)
    if method == "original":
        return Recalibration(method, 0.0, 1.0, n=n, source=source)
    if method == "intercept":
        return Recalibration(method, _intercept(xs, w1, w0), 1.0, n=n, source=source)
    if method == "closed_test":
        return _closed_test(n_arr, p_arr, source)
    model = LogisticRegression(C=np.inf, fit_intercept=method == "platt", max_iter=1000)
    model.fit(rows, labels, sample_weight=np.concatenate([w1, w0]))
    a = float(model.intercept_[0]) if method == "platt" else 0.0
    b = float(model.coef_[0, 0])
    if np.isfinite(a) and np.isfinite(b) and b > 0:
        return Recalibration(method, a, b, n=n, source=source)
    if method == "temperature":
        raise RecalibrationError(f"recalibration: the fitted inverse temperature is {b:.3g}; "
                                 "one that is not positive would reverse the model's ranking, "
                                 "so the scores are left as they are")
    # the slope would reverse the ranking: calibration-in-the-large only (slope fixed at 1)
    return Recalibration(method, _intercept(xs, w1, w0), 1.0, n=n, source=(
        f"{source}; intercept only: the fitted slope ({b:.3g}) was not positive" if source
        else f"intercept only: the fitted slope ({b:.3g}) was not positive"))


def _midpoints(n_bins: int) -> npt.NDArray[np.float64]:
    """Where a fine bin's patients are placed: ``(k + 0.5) / n_bins``."""
    return (np.arange(n_bins) + 0.5) / n_bins


def _deviance(fit: Recalibration, neg: npt.NDArray[np.float64],
              pos: npt.NDArray[np.float64]) -> float:
    """-2 log-likelihood of the histogram's labels under ``fit`` (patients at bin midpoints)."""
    p = np.clip(fit.apply(_midpoints(neg.size)), 1e-12, 1.0 - 1e-12)
    return float(-2.0 * np.sum(pos * np.log(p) + neg * np.log1p(-p)))


def _closed_test(neg: npt.NDArray[np.float64], pos: npt.NDArray[np.float64],
                 source: str) -> Recalibration:
    """Vergouwe et al.'s closed test over the original scores, the intercept and Platt, on
    the histogram :func:`fit_recalibration` has already checked."""
    fits = {m: fit_recalibration(neg, pos, method=m, source=source)
            for m in ("original", "intercept", "platt")}
    dev = {m: _deviance(f, neg, pos) for m, f in fits.items()}
    lr2 = max(dev["original"] - dev["platt"], 0.0)
    lr1 = max(dev["intercept"] - dev["platt"], 0.0)
    p2, p1 = float(chi2.sf(lr2, 2)), float(chi2.sf(lr1, 1))
    if fits["platt"].b == 1.0:  # the slope came out not positive: Platt is the intercept
        p1 = 1.0
    chosen = "original" if p2 >= ALPHA else ("intercept" if p1 >= ALPHA else "platt")
    how = (f"closed test at {ALPHA}: Platt against the original scores LR {lr2:.2f} "
           f"(p = {p2:.3g}), against the intercept LR {lr1:.2f} (p = {p1:.3g}); {chosen} "
           "chosen")
    fit = fits[chosen]
    return Recalibration(chosen, fit.a, fit.b, n=fit.n,
                         source=f"{fit.source}; {how}" if fit.source else how)


def _intercept(x: npt.NDArray[np.float64], w1: npt.NDArray[np.float64],
               w0: npt.NDArray[np.float64]) -> float:
    """The ``a`` of ``expit(a + x)`` whose weighted score equation is 0 (the slope fixed at 1)."""
    return float(brentq(lambda c: float(np.sum(w1 - (w1 + w0) * expit(c + x))), -50.0, 50.0))


def fit_on_scores(y_true: npt.ArrayLike, y_score: npt.ArrayLike, *, method: str = "intercept",
                  n_bins: int = 100, source: str = "") -> Recalibration:
    """:func:`fit_recalibration` on the fine histogram of one set of labelled scores.

    The histogram a site would hold for the secure sum (``n_bins`` equal-width bins), so a fit
    in process (the centralized baseline, a local-only model at its site) is the same fit as
    the federated one.

    Parameters
    ----------
    y_true, y_score : array-like
        Labels (0/1) and scores of the validation split.
    method : {"intercept", "platt", "temperature", "closed_test", "original"}
    n_bins : int
        Fine grid (``evaluation.histogram_bins``).
    source : str

    Returns
    -------
    Recalibration

    Raises
    ------
    RecalibrationError
        As :func:`fit_recalibration`.
    """
    y, s = check_binary_inputs(y_true, y_score, where="recalibration")
    b = calibration_bins(s, n_bins)
    return fit_recalibration(np.bincount(b[y == 0], minlength=n_bins),
                             np.bincount(b[y == 1], minlength=n_bins), method=method,
                             source=source)


def recalibrated_frame(frame: pd.DataFrame, recalibration: Recalibration | None) -> pd.DataFrame:
    """A predictions table with the recalibrated ``score`` and the model's own beside it.

    Parameters
    ----------
    frame : pandas.DataFrame
        With a ``score`` column (the model's probabilities).
    recalibration : Recalibration or None
        ``None``: ``score`` is left as it is (and copied to :data:`RAW_SCORE`).

    Returns
    -------
    pandas.DataFrame
        A copy with :data:`RAW_SCORE` right after ``score``.
    """
    out = frame.copy()
    raw = out["score"].to_numpy(dtype=np.float64)
    if recalibration is not None:
        out["score"] = recalibration.apply(raw)
    out.insert(list(out.columns).index("score") + 1, RAW_SCORE, raw)
    return out
