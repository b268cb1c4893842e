"""A site's disclosed report document: what the fairness report needs, computed at the site.

At the ``predict`` stage every site turns its own predictions frame (one row per patient:
``split``, ``label``, ``score`` and the sensitive attributes, as
:func:`multimodal_fl.training.predictions_frame` makes it) into one document,
:func:`site_disclosure`, and only that document leaves the site for the report. The report
(:mod:`multimodal_fl.evaluation.report`) is built from these documents, ``metrics.json`` and the
cross-site matrix; it never reads a patient row. :func:`read_disclosure` reads a document back
into a typed :class:`SiteDisclosure` and refuses a version it does not know, in one line.

What the document holds, with ``m`` the effective small-cell threshold (``min_cell``):

* **per split** (train, val, test): the number of patients when it is 0 or at least ``m``; the
  number of positives only when both class counts are 0 or at least ``m``; the metrics
  (:data:`~multimodal_fl.evaluation.metrics.METRIC_NAMES`) with stratified bootstrap 95%
  intervals;
* **fairness cells** of the test split (scope ``site`` and, per sensitive attribute and level,
  ``site_subgroup``), computed with :func:`~multimodal_fl.evaluation.fairness.fairness_report`
  (fairlearn's ``MetricFrame``) at the site's threshold; **disparities** per attribute
  (fairlearn's equalised-odds and demographic-parity differences) over the released groups;
* a **ROC summary** and a **calibration summary** of the test split, on one partition of the
  score range (see below), and calibration-in-the-large (the logistic recalibration intercept
  with the slope fixed at 1) and the calibration slope.

The rules (every number is a count of 0 or at least ``m`` patients, or an aggregate over at
least ``m`` patients):

* a level of a sensitive attribute is named only when the test split holds at least ``m``
  patients with it (:func:`name_test_levels`); the others form one group ``"(other)"``, and a
  note says how many levels were unnamed;
* a cell on fewer than ``m`` patients is suppressed: no value, no count, its reason
  (``"fewer than 10 patients"``);
* class counts are counts: a cell's positives and negatives are released only when each is 0 or
  at least ``m``; the metrics that condition on a class (AUC, average precision, sensitivity,
  specificity) only when each class holds at least ``m`` patients (sensitivity on 2 positives
  would tell what the model said about those 2); Brier score and ECE need ``m`` patients;
* **complementary suppression** (:func:`complementary_suppression`): within each attribute the
  released cells, the site's own row included, never let a suppressed cell be derived by
  subtraction. When the suppressed groups of an attribute hold fewer than ``m`` patients in
  all, the next smallest group is suppressed too; when the groups whose class counts are
  hidden hold between 1 and ``m - 1`` positives (or negatives) in all, the next smallest group's
  class counts are hidden too. The splits are public (:func:`split_suppression`: the training
  count leaves with every ``fit``, the validation count at ``evaluate``, the test count in the
  cells), so where small splits hold fewer than ``m`` patients (or of a class) in all, the
  site's total (its positives) is withheld instead, never another split;
* the ROC points and the calibration bins share one partition of the score range into steps on
  the fine grid of ``n_bins`` bins (:func:`score_steps`): every step holds 0 or at least ``m``
  positives and 0 or at least ``m`` negatives, so no difference of released cumulative counts
  is a small cell; a calibration bin carries its patients, its mean predicted risk and its
  fraction positive; no score sum is released anywhere, and nothing per subgroup but the cells;
* the site's threshold, when it chooses one (``threshold_rule="youden"``), is a fine-grid edge
  ``k / n_bins`` chosen on its validation split (never a patient's score), and only when that
  split holds at least ``m`` positives and ``m`` negatives; else 0.5, said so.

A site whose policy keeps subgroup summaries home (``subgroup_summaries=False``) sends the
site's own cells and no subgroup cells or disparities.

A site whose test histograms join the secure sum of the pooled figures sends the
:func:`pooled_form`: no count of its test patients but their number (no class counts, no
subgroup counts, no threshold metrics, ROC points or calibration bins), so the sum's total minus
released counts never gives what another site hides.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd
from fairlearn.metrics import demographic_parity_difference, equalized_odds_difference
from pydantic import BaseModel, ConfigDict, ValidationError
from scipy.optimize import brentq
from scipy.special import expit, logit
from sklearn.linear_model import LogisticRegression

from multimodal_fl import __version__
from multimodal_fl.evaluation.fairness import CELL_COLUMNS, fairness_report
from multimodal_fl.evaluation.histograms import (
    UNNAMED,
    PooledHistogram,
    histogram_threshold,
    named_levels,
)
from multimodal_fl.evaluation.metrics import (
    METRIC_NAMES,
    MetricValue,
    binary_metrics,
    bootstrap_seed,
    calibration_bins,
    check_binary_inputs,
    expected_calibration_error,
)

__all__ = [
    "CLASS_METRICS",
    "DISCLOSURE_VERSION",
    "POOLED_REASON",
    "REPORT_SPLIT",
    "THRESHOLD_METRICS",
    "CalibrationBin",
    "CalibrationFigures",
    "CalibrationSummary",
    "DisclosedCell",
    "DisclosedMetric",
    "Disparity",
    "RecalibrationSummary",
    "RocSummary",
    "SiteDisclosure",
    "SplitSummary",
    "Suppression",
    "class_reason",
    "complementary_suppression",
    "logistic_calibration",
    "name_test_levels",
    "pooled_form",
    "read_disclosure",
    "recalibration_summary",
    "released_metric",
    "score_steps",
    "site_disclosure",
    "split_suppression",
]

#: The version of the document :func:`site_disclosure` writes and :func:`read_disclosure` reads.
DISCLOSURE_VERSION = 1
#: The split the fairness cells, ROC and calibration summaries describe.
REPORT_SPLIT = "test"
#: The splits summarised, in order.
SPLITS: tuple[str, ...] = ("train", "val", "test")
#: Metrics that condition on a class: released only when each class holds ``min_cell`` patients.
CLASS_METRICS = frozenset({"auc", "average_precision", "sensitivity", "specificity"})
#: Metrics that count patients on one side of the threshold (a linear function of class counts).
THRESHOLD_METRICS = frozenset({"sensitivity", "specificity"})
#: Why a figure of a site that joins the pooled secure sum is left to the pooled figures.
POOLED_REASON = ("in the pooled figures only: the site's test histogram joins the secure sum, "
                 "whose total minus a released count would give another site's hidden one")


# --------------------------------------------------------------------------------------------
# the document


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DisclosedMetric(_Doc):
    """One metric of a split: value and bootstrap 95% interval, or why it is absent."""

    value: float | None
    lo: float | None = None
    hi: float | None = None
    reason: str | None = None
    n_boot: int = 0
    n_skipped: int = 0


class SplitSummary(_Doc):
    """One split of the site: counts (``None`` when suppressed), metrics, or the reason."""

    n: int | None
    n_pos: int | None
    reason: str | None = None
    metrics: dict[str, DisclosedMetric] = {}


class DisclosedCell(_Doc):
    """One fairness cell of the test split (the columns of ``fairness.CELL_COLUMNS``)."""

    scope: Literal["site", "site_subgroup"]
    attribute: str | None
    group: str | None
    metric: str
    value: float | None
    lo: float | None
    hi: float | None
    n: int | None
    n_pos: int | None
    n_neg: int | None
    suppressed: bool
    reason: str | None
    n_boot: int = 0
    n_skipped: int = 0


class Disparity(_Doc):
    """fairlearn's disparity differences of one attribute at the site, over released groups."""

    attribute: str
    equalized_odds_difference: float | None
    demographic_parity_difference: float | None
    groups_used: list[str]
    groups_suppressed: list[str]
    suppressed: bool
    reason: str | None


class RocSummary(_Doc):
    """ROC points at the step edges (ascending thresholds); empty with a reason when withheld.

    ``tpr[i]`` and ``fpr[i]`` are the fractions of positives and negatives scoring at least
    ``threshold[i]``; the point (0, 0) above every score is implied.
    """

    threshold: list[float] = []
    tpr: list[float] = []
    fpr: list[float] = []
    reason: str | None = None


class CalibrationBin(_Doc):
    """One step of the score range: ``[lo, hi)``, its patients, mean risk and fraction positive."""

    lo: float
    hi: float
    n: int
    mean_score: float
    observed: float


class CalibrationSummary(_Doc):
    """Calibration bins, calibration-in-the-large and slope (each with a reason when absent)."""

    bins: list[CalibrationBin] = []
    reason: str | None = None
    intercept: float | None = None
    slope: float | None = None
    fit_reason: str | None = None


class CalibrationFigures(_Doc):
    """Calibration of one score of the test split: ECE, mean risk, intercept and slope.

    ``n`` is the test split's released count; every figure is absent (with ``reason``) when the
    split's count is withheld. ``observed`` (the fraction positive) only when the split's
    class counts are released; ``intercept`` (calibration-in-the-large: the logistic
    recalibration intercept with the slope fixed at 1) and ``slope`` only when each class holds
    at least ``min_cell`` patients.
    """

    n: int | None = None
    ece: float | None = None
    mean_score: float | None = None
    observed: float | None = None
    intercept: float | None = None
    slope: float | None = None
    reason: str | None = None


class RecalibrationSummary(_Doc):
    """The recalibration the site applied before predict, and the test split's calibration
    before (the model's own scores) and after it.

    ``method`` is ``platt``, ``temperature`` or ``none``; ``applied`` says whether the scores
    were changed; ``source`` what it was fitted on, or ``reason`` why it was not applied. The
    parameters themselves are not in the document (the server's ``metrics.json`` holds those it
    fitted; a local-only model's stay at its site).
    """

    method: str
    applied: bool
    source: str | None = None
    reason: str | None = None
    before: CalibrationFigures
    after: CalibrationFigures


class SiteDisclosure(_Doc):
    """A site's disclosed report document, typed (:func:`read_disclosure`).

    Attributes
    ----------
    version : int
        :data:`DISCLOSURE_VERSION`.
    site : str
    split : str
        The split of the cells, ROC and calibration (``test``).
    min_cell : int
        The effective small-cell threshold the site applied.
    n_boot : int
        Bootstrap resamples of the intervals.
    n_bins : int
        The fine grid of the score steps.
    sensitive : list of str
        The attributes the cells cover.
    subgroup_summaries : bool
        Whether the site's policy let subgroup cells leave.
    threshold : float
        The decision threshold of sensitivity, specificity and the disparities.
    threshold_source : str
        How the threshold was obtained.
    splits : dict of str to SplitSummary
    cells : list of DisclosedCell
    disparities : list of Disparity
    roc : RocSummary
    calibration : CalibrationSummary
    notes : list of str
    package_version : str
        The multimodal_fl that made it.
    pooled : bool
        The site's test histogram joins the secure sum of the pooled figures, so its test
        class counts, threshold metrics, ROC points and calibration bins are left to the
        pooled figures (:func:`pooled_form`).
    recalibration : RecalibrationSummary or None
        The recalibration applied before predict and the calibration before and after it
        (:func:`recalibration_summary`; absent from documents made before it existed).
    """

    version: int
    site: str
    split: str
    min_cell: int
    n_boot: int
    n_bins: int
    sensitive: list[str]
    subgroup_summaries: bool
    threshold: float
    threshold_source: str
    splits: dict[str, SplitSummary]
    cells: list[DisclosedCell]
    disparities: list[Disparity]
    roc: RocSummary
    calibration: CalibrationSummary
    notes: list[str] = []
    package_version: str = ""
    pooled: bool = False
    recalibration: RecalibrationSummary | None = None

    def cells_frame(self) -> pd.DataFrame:
        """The cells as a frame with the columns of ``fairness.CELL_COLUMNS`` (site filled).

        Returns
        -------
        pandas.DataFrame
            Float columns ``value``/``lo``/``hi`` (NaN when absent), nullable integer counts.
        """
        rows = [{**c.model_dump(), "site": self.site} for c in self.cells]
        df = pd.DataFrame(rows, columns=list(CELL_COLUMNS))
        for col in ("value", "lo", "hi"):
            df[col] = pd.to_numeric(df[col], errors="coerce").astype(np.float64)
        for col in ("n", "n_pos", "n_neg"):
            df[col] = pd.array(df[col].tolist(), dtype="Int64")
        return df

    def cell(self, metric: str, attribute: str | None = None,
             group: str | None = None) -> DisclosedCell | None:
        """One cell (the site's own row without ``attribute``), or ``None`` when absent.

        Parameters
        ----------
        metric : str
        attribute, group : str or None

        Returns
        -------
        DisclosedCell or None
        """
        for c in self.cells:
            if c.metric == metric and c.attribute == attribute and c.group == group:
                return c
        return None


def read_disclosure(doc: Mapping[str, Any], *, where: str = "disclosed document"
                    ) -> SiteDisclosure:
    """Read a disclosed document back into a :class:`SiteDisclosure`.

    Parameters
    ----------
    doc : mapping
        :func:`site_disclosure`'s output (a site's ``disclosed/<site>.json``).
    where : str
        Names the document in errors (a file path).

    Returns
    -------
    SiteDisclosure

    Raises
    ------
    ValueError
        One line: an unknown ``version`` (naming the version this package reads) or a field
        that does not fit.
    """
    if not isinstance(doc, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(doc).__name__}")
    version = doc.get("version")
    if version != DISCLOSURE_VERSION:
        made = doc.get("package_version") or "an unknown version"
        raise ValueError(
            f"{where}: disclosed-document version {version!r} (made by multimodal_fl {made}) is "
            f"not one multimodal_fl {__version__} reads (version {DISCLOSURE_VERSION}); build "
            "the report with the version that made the run")
    try:
        return SiteDisclosure.model_validate(dict(doc))
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"{where}: field {loc!r}: {first['msg']}") from None


# --------------------------------------------------------------------------------------------
# suppression


def _releasable(k: int, min_cell: int) -> bool:
    """A count may leave: 0 or at least ``min_cell``."""
    return k == 0 or k >= min_cell


@dataclass(frozen=True)
class Suppression:
    """What :func:`complementary_suppression` hides, by part, with the reason.

    Attributes
    ----------
    hidden : dict of str to str
        Parts suppressed entirely (no count, no metric).
    classes_hidden : dict of str to str
        Parts shown whose class counts (and class-conditional metrics) are hidden.
    """

    hidden: dict[str, str]
    classes_hidden: dict[str, str]
    total: str | None = None
    total_classes: str | None = None


def complementary_suppression(
    parts: Mapping[str, tuple[int, int]], *, min_cell: int, what: str = "group",
    total_released: bool = True, classes_released: bool = True,
    public: Collection[str] = (),
) -> Suppression:
    """Cells to hide so that no released set of cells reveals a small one by subtraction.

    The parts partition a released total (the site's row, or its whole cohort for the splits).

    Parameters
    ----------
    parts : mapping of str to (n, n_pos)
        Patients and positives of each part.
    min_cell : int
        The small-cell threshold.
    what : str
        What a part is, for the reasons (``"sex"``, ``"split"``).
    total_released : bool
        The total's patient count is released (the site's row is shown).
    classes_released : bool
        The total's class counts are released.
    public : collection of str
        Parts whose count (and class counts) leave the site elsewhere anyway when they are 0
        or at least ``min_cell``: never hidden to protect another part (the splits: the
        training count leaves with every ``fit``, the validation count at ``evaluate``, the
        test count in the cells and the cross-site matrix). Where only public parts are left
        to hide, the total is withheld instead (``total``, ``total_classes``).

    Returns
    -------
    Suppression
        ``hidden``: parts on 1 to ``min_cell - 1`` patients, and as many of the next
        smallest (not public) as it takes for the hidden parts to hold ``min_cell`` patients
        in all; ``classes_hidden``: parts whose class counts are not releasable (a class of 1
        to ``min_cell - 1``), and the next smallest until the hidden class counts add up to 0
        or at least ``min_cell`` in each class; ``total`` (``total_classes``): why the total's
        patient count (its class counts) must be withheld, when no part is left to hide.
    """
    order = sorted(parts, key=lambda g: (parts[g][0], g))
    hidden = {g: f"fewer than {min_cell} patients" for g in order
              if 0 < parts[g][0] < min_cell}
    classes: dict[str, str] = {}
    for g in order:
        n, p = parts[g]
        if g not in hidden and not (_releasable(p, min_cell) and _releasable(n - p, min_cell)):
            classes[g] = f"fewer than {min_cell} {'positives' if 0 < p < min_cell else 'negatives'}"
    complementary = (f"complementary suppression: the other suppressed {what} cells hold fewer "
                     f"than {min_cell} patients")
    total: str | None = None
    total_classes: str | None = None
    while True:
        if total_released and hidden and sum(parts[g][0] for g in hidden) < min_cell:
            rest = [g for g in order if g not in hidden and parts[g][0] > 0 and g not in public]
            if not rest:
                total = total_classes = (f"complementary suppression: the suppressed {what} "
                                         f"cells hold fewer than {min_cell} patients and the "
                                         f"other {what} counts leave the site")
                break
            hidden[rest[0]] = complementary
            classes.pop(rest[0], None)
            continue
        covered = set(hidden) | set(classes)
        if total_released and classes_released and covered:
            pos = sum(parts[g][1] for g in covered)
            neg = sum(parts[g][0] - parts[g][1] for g in covered)
            if not (_releasable(pos, min_cell) and _releasable(neg, min_cell)):
                rest = [g for g in order if g not in covered and parts[g][0] > 0
                        and g not in public]
                if rest:
                    classes[rest[0]] = (f"complementary suppression: the {what} cells whose "
                                        f"class counts are hidden hold fewer than {min_cell} "
                                        "of a class")
                    continue
                total_classes = (f"complementary suppression: the {what} cells whose class "
                                 f"counts are hidden hold fewer than {min_cell} of a class and "
                                 f"the other {what} class counts leave the site")
        break
    return Suppression(hidden, classes, total, total_classes)


def split_suppression(frame: pd.DataFrame, *, min_cell: int) -> Suppression:
    """What a site withholds of its split and total counts, over everything it sends in a run.

    Each split's size is public once it is 0 or at least ``min_cell``: the training count
    leaves with every ``fit`` (FedAvg weights by it; in a secured round too), ``info`` and
    ``local_train``, the validation count at ``evaluate``, the test count in the fairness cells,
    the pooled form and the cross-site matrix. So a small split is never protected by hiding
    another split (its count has left already): the site's total (``n_patients``, the
    ``predict`` reply's ``n_samples``, the model card's patients) is withheld instead when
    the small splits hold fewer than ``min_cell`` patients in all, and its positives when the
    splits whose class counts are hidden hold fewer than ``min_cell`` of a class.

    Parameters
    ----------
    frame : pandas.DataFrame
        The site's predictions (``split``, ``label``).
    min_cell : int
        The effective small-cell threshold.

    Returns
    -------
    Suppression
        ``hidden`` and ``classes_hidden`` by split; ``total`` and ``total_classes``.
    """
    parts = {}
    for split in SPLITS:
        y = frame.loc[frame["split"] == split, "label"].to_numpy(dtype=np.int64)
        parts[split] = (int(y.size), int(y.sum()))
    return complementary_suppression(parts, min_cell=min_cell, what="split", public=SPLITS)


def class_reason(metric: str, n_pos: int, n_neg: int, min_cell: int) -> str | None:
    """Why a class-conditional metric is withheld on these class counts, or ``None``.

    AUC, average precision, sensitivity and specificity (:data:`CLASS_METRICS`) need at least
    ``min_cell`` patients of each class: an AUC over two positives ranks those two patients.

    Parameters
    ----------
    metric : str
    n_pos, n_neg : int
        The class counts.
    min_cell : int

    Returns
    -------
    str or None
    """
    if metric not in CLASS_METRICS:
        return None
    for count, name in ((n_pos, "positives"), (n_neg, "negatives")):
        if count == 0:
            return f"no {name}"
        if count < min_cell:
            return f"fewer than {min_cell} {name}"
    return None


def released_metric(y_true: npt.ArrayLike, y_score: npt.ArrayLike, *, metric: str = "auc",
                    min_cell: int, n_boot: int = 0, seed: int = 0,
                    threshold: float | None = None) -> dict[str, Any]:
    """One metric of one set of patients as it may leave the site (a cross-site cell).

    Parameters
    ----------
    y_true, y_score : array-like
        Labels and scores, at the site.
    metric : str
        A name of :data:`~multimodal_fl.evaluation.metrics.METRIC_NAMES`.
    min_cell : int
        The small-cell threshold: fewer patients hide the count too; a class metric needs
        ``min_cell`` patients of each class.
    n_boot, seed
        Stratified bootstrap of the 95% interval; ``seed`` is the base seed, the bootstrap's
        is derived from it and the scores
        (:func:`~multimodal_fl.evaluation.metrics.bootstrap_seed`), so a site's own model on
        its test split gives the interval of its disclosed test figure.
    threshold : float or None
        For sensitivity and specificity.

    Returns
    -------
    dict
        ``value``, ``lo``, ``hi``, ``n`` (``None`` below ``min_cell``), ``suppressed``,
        ``reason``: the columns of a cross-site cell.
    """
    y, s = check_binary_inputs(y_true, y_score, where="released metric")
    n, n_pos = int(y.size), int(y.sum())
    empty = {"value": None, "lo": None, "hi": None, "suppressed": True}
    if n < min_cell:
        return empty | {"n": None, "reason": "no patients" if n == 0 else
                        f"fewer than {min_cell} patients"}
    why = class_reason(metric, n_pos, n - n_pos, min_cell)
    if why is not None:
        return empty | {"n": n, "reason": why}
    v = binary_metrics(y, s, metrics=(metric,), threshold=threshold, n_boot=n_boot,
                       seed=bootstrap_seed(seed, s))[metric]
    return {"value": v.value, "lo": v.lo, "hi": v.hi, "n": n, "suppressed": v.value is None,
            "reason": v.reason}


# --------------------------------------------------------------------------------------------
# threshold, steps, ROC and calibration


def _grid_counts(y: npt.NDArray[np.int64], s: npt.NDArray[np.float64], n_bins: int
                 ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Positives and negatives per fine-grid bin."""
    b = calibration_bins(s, n_bins)
    return (np.bincount(b[y == 1], minlength=n_bins).astype(np.int64),
            np.bincount(b[y == 0], minlength=n_bins).astype(np.int64))


def _site_threshold(val: pd.DataFrame, rule: str | float, *, min_cell: int,
                    n_bins: int) -> tuple[float, str]:
    """The site's decision threshold and how it was obtained (see the module docstring)."""
    if not (isinstance(rule, str) and rule == "youden"):
        t = float(rule)
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"threshold_rule: {rule!r} is not 'youden' or a value in [0, 1]")
        return t, f"given ({t:g})"
    y, s = check_binary_inputs(val["label"].to_numpy(), val["score"].to_numpy(),
                               where="validation split")
    n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
    if n_pos < min_cell or n_neg < min_cell:
        return 0.5, (f"0.5: the site's validation split has fewer than {min_cell} positives or "
                     "negatives to choose on")
    pos, neg = _grid_counts(y, s, n_bins)
    zeros = np.zeros(n_bins)
    grid = PooledHistogram(n_bins, pos.astype(np.float64), neg.astype(np.float64), zeros, zeros,
                           [], [], [], {})
    t = histogram_threshold(grid)
    return t, f"chosen on the site's validation split (youden on {n_bins} grid edges: {t:g})"


def score_steps(y_true: npt.ArrayLike, y_score: npt.ArrayLike, *, min_cell: int,
                n_bins: int = 100) -> list[tuple[int, int, int, int]] | str:
    """Partition the fine grid into steps of 0 or at least ``min_cell`` of each class.

    Walking up the grid of ``n_bins`` equal-width bins on [0, 1], adjacent bins are merged until
    the step holds patients and each class count is 0 or at least ``min_cell``; a remainder at
    the top joins the steps below it until that holds again. The first step starts at bin 0
    and the last ends at ``n_bins``.

    Parameters
    ----------
    y_true, y_score : array-like
        Labels (0/1) and scores in [0, 1].
    min_cell : int
        The small-cell threshold.
    n_bins : int
        The fine grid.

    Returns
    -------
    list of (start, stop, n_pos, n_neg) or str
        The steps (``stop`` exclusive, in grid bins), or why there are none (a class of 1 to
        ``min_cell - 1`` patients in all, or no patients).
    """
    y, s = check_binary_inputs(y_true, y_score, where="score steps")
    if y.size == 0:
        return "no patients"
    total_pos, total_neg = int(y.sum()), int(y.size - y.sum())
    for count, name in ((total_pos, "positives"), (total_neg, "negatives")):
        if not _releasable(count, min_cell):
            return f"fewer than {min_cell} {name}"
    pos, neg = _grid_counts(y, s, n_bins)
    cum_pos = np.concatenate([[0], np.cumsum(pos)])
    cum_neg = np.concatenate([[0], np.cumsum(neg)])
    # most[i]: the most steps [0, i) can be cut into; prev[i]: where the last of them starts
    most = np.full(n_bins + 1, -1, dtype=np.int64)
    prev = np.zeros(n_bins + 1, dtype=np.int64)
    most[0] = 0
    for i in range(1, n_bins + 1):
        p = cum_pos[i] - cum_pos[:i]
        q = cum_neg[i] - cum_neg[:i]
        ok = ((p == 0) | (p >= min_cell)) & ((q == 0) | (q >= min_cell)) & (p + q > 0)
        ok &= most[:i] >= 0
        if ok.any():
            j = int(np.argmax(np.where(ok, most[:i], -1)))
            most[i], prev[i] = most[j] + 1, j
        elif most[i - 1] >= 1 and pos[i - 1] + neg[i - 1] == 0:
            most[i], prev[i] = most[i - 1], -1  # an empty bin extends the last step
    steps: list[tuple[int, int, int, int]] = []
    i = n_bins
    while i > 0:
        stop = i
        while prev[i] < 0:  # empty bins at the top of the step
            i -= 1
        j = int(prev[i])
        steps.append((j, stop, int(cum_pos[i] - cum_pos[j]), int(cum_neg[i] - cum_neg[j])))
        i = j
    return steps[::-1]


def _roc(steps: list[tuple[int, int, int, int]], n_bins: int) -> RocSummary:
    """ROC points at the step starts: the fractions of each class scoring at or above."""
    n_pos = sum(p for _, _, p, _ in steps)
    n_neg = sum(q for _, _, _, q in steps)
    if n_pos == 0 or n_neg == 0:
        return RocSummary(reason="no positives" if n_pos == 0 else "no negatives")
    thresholds, tpr, fpr = [], [], []
    above_pos = above_neg = 0
    for a, _, p, q in reversed(steps):
        above_pos += p
        above_neg += q
        thresholds.append(a / n_bins)
        tpr.append(above_pos / n_pos)
        fpr.append(above_neg / n_neg)
    return RocSummary(threshold=thresholds[::-1], tpr=tpr[::-1], fpr=fpr[::-1])


def _calibration(y: npt.NDArray[np.int64], s: npt.NDArray[np.float64],
                 steps: list[tuple[int, int, int, int]], n_bins: int,
                 min_cell: int) -> CalibrationSummary:
    """Calibration on the steps, and the logistic recalibration intercept and slope."""
    b = calibration_bins(s, n_bins)
    bins = []
    for a, stop, p, q in steps:
        inside = (b >= a) & (b < stop)
        bins.append(CalibrationBin(lo=a / n_bins, hi=stop / n_bins, n=p + q,
                                   mean_score=float(s[inside].mean()), observed=p / (p + q)))
    n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
    fit_reason = class_reason("auc", n_pos, n_neg, min_cell)
    if fit_reason is not None:
        return CalibrationSummary(bins=bins, fit_reason=fit_reason)
    intercept, slope = logistic_calibration(y, s)
    return CalibrationSummary(bins=bins, intercept=intercept, slope=slope)


def logistic_calibration(y: npt.NDArray[np.int64], s: npt.NDArray[np.float64]
                         ) -> tuple[float, float]:
    """Calibration-in-the-large and the calibration slope of scores ``s`` for labels ``y``.

    Parameters
    ----------
    y : ndarray of int
        Labels, both classes present.
    s : ndarray of float
        Scores.

    Returns
    -------
    intercept : float
        The ``a`` with ``sum(y - expit(a + logit(s))) = 0`` (the slope fixed at 1).
    slope : float
        The slope of a logistic regression of ``y`` on ``logit(s)``.
    """
    x = logit(np.clip(s, 1e-6, 1.0 - 1e-6))
    slope = float(LogisticRegression(C=np.inf).fit(x[:, None], y).coef_[0, 0])
    # calibration-in-the-large: the intercept a with sum(y - expit(a + logit(s))) = 0
    intercept = float(brentq(lambda a: float(np.sum(y - expit(a + x))), -50.0, 50.0))
    return intercept, slope


# --------------------------------------------------------------------------------------------
# splits, cells, disparities


def _metric_doc(v: MetricValue) -> DisclosedMetric:
    return DisclosedMetric(value=v.value, lo=v.lo, hi=v.hi, reason=v.reason, n_boot=v.n_boot,
                           n_skipped=v.n_skipped)


def _splits(frame: pd.DataFrame, *, threshold: float, min_cell: int, n_boot: int,
            seed: int, ece_bins: int) -> dict[str, SplitSummary]:
    """Counts and metrics per split, with suppression across the splits.

    A split's bootstrap is seeded by its scores
    (:func:`~multimodal_fl.evaluation.metrics.bootstrap_seed`), as the fairness cells and
    ``metrics.json`` are: the test split's figures equal the site's own cell.
    """
    sup = split_suppression(frame, min_cell=min_cell)
    out: dict[str, SplitSummary] = {}
    for split in SPLITS:
        y = frame.loc[frame["split"] == split, "label"].to_numpy(dtype=np.int64)
        n, n_pos = int(y.size), int(y.sum())
        if split in sup.hidden:
            out[split] = SplitSummary(n=None, n_pos=None, reason=sup.hidden[split])
            continue
        if n == 0:
            out[split] = SplitSummary(n=0, n_pos=0, reason="no patients")
            continue
        part = frame[frame["split"] == split]
        scores = part["score"].to_numpy(dtype=np.float64)
        vals = binary_metrics(part["label"].to_numpy(), scores,
                              threshold=threshold, n_bins=ece_bins, n_boot=n_boot,
                              seed=bootstrap_seed(seed, scores))
        hide_classes = split in sup.classes_hidden
        metrics = {}
        for m, v in vals.items():
            why = sup.classes_hidden[split] if hide_classes and m in CLASS_METRICS else \
                class_reason(m, n_pos, n - n_pos, min_cell)
            metrics[m] = DisclosedMetric(value=None, reason=why) if why else _metric_doc(v)
        out[split] = SplitSummary(n=n, n_pos=None if hide_classes else n_pos, metrics=metrics)
    return out


def _groups(test: pd.DataFrame, attribute: str) -> pd.Series:
    """The attribute's level per patient, missing values as ``"(missing)"`` (as fairness does)."""
    col = test[attribute]
    return col.astype(object).where(col.notna(), "(missing)").astype(str)


def _cell_rows(computed: pd.DataFrame, *, scope: str, attribute: str | None,
               group: str | None, n: int, n_pos: int, hidden: str | None,
               classes_hidden: str | None, min_cell: int) -> list[DisclosedCell]:
    """The released form of one cell's rows (one per metric)."""
    rows = []
    for metric in METRIC_NAMES:
        hit = computed[computed["metric"] == metric]
        base: dict[str, Any] = {"scope": scope, "attribute": attribute, "group": group,
                                "metric": metric}
        if hidden is not None:
            rows.append(DisclosedCell(**base, value=None, lo=None, hi=None, n=None, n_pos=None,
                                      n_neg=None, suppressed=True, reason=hidden))
            continue
        show_classes = classes_hidden is None
        counts: dict[str, Any] = {"n": n, "n_pos": n_pos if show_classes else None,
                                  "n_neg": n - n_pos if show_classes else None}
        why = classes_hidden if (classes_hidden and metric in CLASS_METRICS) else \
            class_reason(metric, n_pos, n - n_pos, min_cell)
        r = hit.iloc[0] if len(hit) else None
        if r is None or why is not None or pd.isna(r["value"]):
            why = why or ("no patients" if r is None else str(r["reason"]))
            rows.append(DisclosedCell(**base, **counts, value=None, lo=None, hi=None,
                                      suppressed=True, reason=why))
            continue
        rows.append(DisclosedCell(
            **base, **counts, value=float(r["value"]),
            lo=None if pd.isna(r["lo"]) else float(r["lo"]),
            hi=None if pd.isna(r["hi"]) else float(r["hi"]), suppressed=False, reason=None,
            n_boot=int(r["n_boot"]), n_skipped=int(r["n_skipped"])))
    return rows


def _disparity(test: pd.DataFrame, attribute: str, groups: pd.Series, used: list[str],
               suppressed: list[str], threshold: float, min_cell: int) -> Disparity:
    """fairlearn's two differences over the groups whose every cell is released."""
    base: dict[str, Any] = {"attribute": attribute, "groups_used": used,
                            "groups_suppressed": suppressed}
    if len(used) < 2:
        return Disparity(**base, equalized_odds_difference=None,
                         demographic_parity_difference=None, suppressed=True,
                         reason=f"fewer than 2 groups of {attribute!r} with at least {min_cell} "
                                "positives and negatives")
    keep = groups.isin(used).to_numpy()
    y = test["label"].to_numpy(dtype=np.int64)[keep]
    pred = (test["score"].to_numpy(dtype=np.float64)[keep] >= threshold).astype(np.int64)
    sf = groups.to_numpy()[keep]
    return Disparity(
        **base, suppressed=False, reason=None,
        equalized_odds_difference=float(equalized_odds_difference(y, pred, sensitive_features=sf)),
        demographic_parity_difference=float(
            demographic_parity_difference(y, pred, sensitive_features=sf)))


def _fairness(test: pd.DataFrame, *, site: str, sensitive: Sequence[str], threshold: float,
              min_cell: int, n_boot: int, seed: int, ece_bins: int
              ) -> tuple[list[DisclosedCell], list[Disparity]]:
    """The site's released cells and disparities of the test split."""
    y = test["label"].to_numpy(dtype=np.int64)
    n, n_pos = int(y.size), int(y.sum())
    if n < min_cell:
        why = "no patients" if n == 0 else f"fewer than {min_cell} patients"
        return _cell_rows(pd.DataFrame(columns=list(CELL_COLUMNS)), scope="site",
                          attribute=None, group=None, n=n, n_pos=n_pos, hidden=why,
                          classes_hidden=None, min_cell=min_cell), []
    computed = fairness_report(
        test.assign(site=site, split=REPORT_SPLIT), sensitive=list(sensitive),
        min_cell=min_cell, threshold=threshold, split=REPORT_SPLIT, n_boot=n_boot,
        ece_bins=ece_bins, seed=seed).cells
    classes_ok = _releasable(n_pos, min_cell) and _releasable(n - n_pos, min_cell)
    cells = _cell_rows(computed[computed["scope"] == "site"], scope="site", attribute=None,
                       group=None, n=n, n_pos=n_pos, hidden=None,
                       classes_hidden=None if classes_ok else class_reason(
                           "auc", n_pos, n - n_pos, min_cell), min_cell=min_cell)
    disparities = []
    for a in sensitive:
        groups = _groups(test, a)
        parts = {str(g): (int((groups == g).sum()), int(y[(groups == g).to_numpy()].sum()))
                 for g in sorted(groups.unique())}
        sup = complementary_suppression(parts, min_cell=min_cell, what=a,
                                        classes_released=classes_ok)
        for g, (gn, gp) in parts.items():
            mine = computed[(computed["scope"] == "site_subgroup")
                            & (computed["attribute"] == a) & (computed["group"] == g)]
            cells += _cell_rows(mine, scope="site_subgroup", attribute=a, group=g, n=gn,
                                n_pos=gp, hidden=sup.hidden.get(g),
                                classes_hidden=sup.classes_hidden.get(g), min_cell=min_cell)
        used = [g for g, (gn, gp) in parts.items() if g not in sup.hidden
                and g not in sup.classes_hidden and class_reason("auc", gp, gn - gp,
                                                                  min_cell) is None]
        disparities.append(_disparity(test, a, groups, used,
                                      [g for g in parts if g not in used], threshold, min_cell))
    return cells, disparities


# --------------------------------------------------------------------------------------------
# the builder


def _check_frame(frame: pd.DataFrame, site: str, sensitive: Sequence[str]) -> list[str]:
    """Refuse a frame without its columns (one line); return notes on absent attributes."""
    if not isinstance(frame, pd.DataFrame):
        raise ValueError(f"site {site}: predictions must be a pandas DataFrame, got "
                         f"{type(frame).__name__}")
    missing = [c for c in ("split", "label", "score") if c not in frame.columns]
    if missing:
        raise ValueError(f"site {site}: predictions lack column(s) {missing}; present: "
                         f"{list(frame.columns)}")
    check_binary_inputs(frame["label"].to_numpy(), frame["score"].to_numpy(),
                        where=f"site {site} predictions")
    return [f"sensitive attribute {a!r} is not among the site's columns: no cells"
            for a in sensitive if a not in frame.columns]


def site_disclosure(
    frame: pd.DataFrame,
    *,
    site: str,
    sensitive: Sequence[str] = ("sex", "age_band"),
    min_cell: int = 10,
    n_boot: int = 1000,
    seed: int = 0,
    threshold_rule: str | float = "youden",
    subgroup_summaries: bool = True,
    n_bins: int = 100,
    ece_bins: int = 10,
    pooled: bool = False,
) -> dict[str, Any]:
    """The site's disclosed report document, computed at the site from its own predictions.

    Parameters
    ----------
    frame : pandas.DataFrame
        The site's predictions: ``split``, ``label`` (0/1), ``score`` (probability) and the
        sensitive columns (others, such as ``patient_id``, are ignored and never leave).
    site : str
        The site's name.
    sensitive : sequence of str
        Attributes of the subgroup cells; one absent from ``frame`` is noted and skipped.
    min_cell : int
        The effective small-cell threshold (the disclosure gate's).
    n_boot : int
        Stratified bootstrap resamples of the 95% intervals (0: none).
    seed : int
        Base seed of the bootstraps; each set of patients' bootstrap is seeded by it and their
        scores (:func:`~multimodal_fl.evaluation.metrics.bootstrap_seed`), so a figure here
        equals the same patients' figure in ``metrics.json``.
    threshold_rule : str or float
        ``"youden"`` (chosen on the site's validation split), or a fixed threshold (``"0.5"``,
        or the value a request carries).
    subgroup_summaries : bool
        The site's policy lets subgroup cells leave.
    n_bins : int
        Fine grid of the score steps (``evaluation.histogram_bins``).
    ece_bins : int
        ECE bins.
    pooled : bool
        The site's test histograms join the secure sum of the pooled figures: the document
        takes the :func:`pooled_form`.

    Returns
    -------
    dict
        The JSON document (:class:`SiteDisclosure`'s fields; missing numbers ``None``).

    Raises
    ------
    ValueError
        On a frame without ``split``/``label``/``score``, invalid labels or scores, a
        ``min_cell`` below 1, or a threshold outside [0, 1] (one line).
    """
    if min_cell < 1:
        raise ValueError(f"site {site}: min_cell must be at least 1, got {min_cell}")
    notes = _check_frame(frame, site, sensitive)
    shown = [a for a in sensitive if a in frame.columns]
    if shown and not subgroup_summaries:
        notes.append("subgroup summaries withheld by the site's policy")
        shown = []
    frame, unnamed = name_test_levels(frame, shown, min_cell=min_cell)
    notes += unnamed
    threshold, source = _site_threshold(frame[frame["split"] == "val"], threshold_rule,
                                        min_cell=min_cell, n_bins=n_bins)
    test = frame[frame["split"] == REPORT_SPLIT].reset_index(drop=True)
    cells, disparities = _fairness(test, site=site, sensitive=shown, threshold=threshold,
                                   min_cell=min_cell, n_boot=n_boot, seed=seed,
                                   ece_bins=ece_bins)
    y = test["label"].to_numpy(dtype=np.int64)
    s = test["score"].to_numpy(dtype=np.float64)
    steps = score_steps(y, s, min_cell=min_cell, n_bins=n_bins) if y.size >= min_cell else (
        "no patients" if y.size == 0 else f"fewer than {min_cell} patients")
    if isinstance(steps, str):
        roc, calibration = RocSummary(reason=steps), CalibrationSummary(reason=steps,
                                                                        fit_reason=steps)
    else:
        roc, calibration = _roc(steps, n_bins), _calibration(y, s, steps, n_bins, min_cell)
    doc = SiteDisclosure(
        version=DISCLOSURE_VERSION, site=site, split=REPORT_SPLIT, min_cell=min_cell,
        n_boot=n_boot, n_bins=n_bins, sensitive=shown, subgroup_summaries=subgroup_summaries,
        threshold=threshold, threshold_source=source,
        splits=_splits(frame, threshold=threshold, min_cell=min_cell, n_boot=n_boot,
                       seed=seed, ece_bins=ece_bins),
        cells=cells, disparities=disparities, roc=roc, calibration=calibration, notes=notes,
        package_version=__version__)
    if pooled:
        doc = pooled_form(doc)
    out: dict[str, Any] = doc.model_dump(mode="json")
    return _finite(out)


def name_test_levels(frame: pd.DataFrame, attributes: Sequence[str], *, min_cell: int
                     ) -> tuple[pd.DataFrame, list[str]]:
    """The predictions with each attribute's levels as they may leave the site, and notes.

    A level is named only when the site's test split (the split the cells and the pooled
    histograms describe) holds at least ``min_cell`` patients with it
    (:func:`~multimodal_fl.evaluation.histograms.named_levels`): every other level of the
    attribute becomes the one group ``"(other)"``, so no exact value of a
    patient (an age, a rare code) is named in a cell, a disparity's groups, a secure-sum part or
    a note. The notes say only how many levels were unnamed.

    Parameters
    ----------
    frame : pandas.DataFrame
        The site's predictions (``split`` and the attribute columns).
    attributes : sequence of str
        The attributes whose levels leave the site.
    min_cell : int
        The effective small-cell threshold.

    Returns
    -------
    frame : pandas.DataFrame
        A copy whose test rows carry the released levels (as strings).
    notes : list of str
    """
    if not attributes:
        return frame, []
    out = frame.copy()
    test = (out["split"] == REPORT_SPLIT).to_numpy()
    notes = []
    for a in attributes:
        labels, unnamed = named_levels(out.loc[test, a].to_numpy(), min_cell=min_cell)
        col = out[a].astype(object)
        col[test] = labels
        out[a] = col
        if unnamed:
            notes.append(f"sensitive attribute {a!r}: {unnamed} level(s) held by fewer than "
                         f"{min_cell} test patients each are not named; their patients form the "
                         f"group {UNNAMED!r}")
    return out, notes


#: Metrics that order a split's positives against its negatives: with the patients' number,
#: an exact value gives the class counts (AUC x positives x negatives is a whole number of pairs).
RANK_METRICS = frozenset({"auc", "average_precision"})
#: Decimals a rank metric keeps where the class counts behind it are withheld (the pooled form).
RANK_DECIMALS = 2


def coarse_rank(value: float | None) -> float | None:
    """A rank metric (or a bound of its interval) to :data:`RANK_DECIMALS` decimals.

    With ``m`` or more patients of each class (the class rule of every released AUC), a step of
    0.01 spans at least one concordant pair for every split of the ``n`` patients into
    positives and negatives, so the rounded value no longer singles out the class counts
    behind it.

    Parameters
    ----------
    value : float or None

    Returns
    -------
    float or None
    """
    return None if value is None else round(float(value), RANK_DECIMALS)


def _coarse_metric(metric: DisclosedMetric) -> DisclosedMetric:
    return metric.model_copy(update={"value": coarse_rank(metric.value),
                                     "lo": coarse_rank(metric.lo), "hi": coarse_rank(metric.hi)})


def _pooled_cell(cell: DisclosedCell) -> DisclosedCell:
    """A fairness cell of a pooled site: no class counts (no counts at all in a subgroup), and
    its rank metrics coarsened (:func:`coarse_rank`)."""
    update: dict[str, Any] = {"n_pos": None, "n_neg": None}
    if cell.scope == "site_subgroup":
        update["n"] = None
    if cell.metric in THRESHOLD_METRICS and not cell.suppressed:
        update.update(value=None, lo=None, hi=None, suppressed=True, reason=POOLED_REASON,
                      n_boot=0, n_skipped=0)
    elif cell.metric in RANK_METRICS:
        update.update(value=coarse_rank(cell.value), lo=coarse_rank(cell.lo),
                      hi=coarse_rank(cell.hi))
    return cell.model_copy(update=update)


def pooled_form(doc: SiteDisclosure) -> SiteDisclosure:
    """The document of a site whose test histograms join the pooled secure sum.

    The server learns the secure sum's total of every part (the test split overall and each
    subgroup level). Were a site to release an exact count of the same patients — its test
    positives, a subgroup cell's patients or positives, a count on one side of a threshold
    (sensitivity, specificity), a cumulative count at a ROC step or a calibration bin — the
    total minus the released counts would give what the other sites hide (a site's 4 test
    positives under ``min_cell`` 10, say). So a pooled site releases none of them: of the test
    split it keeps the number of patients (the total of which the server learns anyway) and
    the metrics that are not counts (AUC, average precision, Brier score, ECE, each under its
    own rule), per subgroup the same metrics without counts, the disparities (differences of
    rates, not counts), and calibration-in-the-large and slope; the class counts, threshold
    metrics, ROC points and calibration bins are the pooled figures'. The site's positives in
    all (``n_positive`` of its metrics document) go too, or they would give the test split's
    by subtraction of the training and validation ones. The rank metrics (AUC, average
    precision) and their bounds keep :data:`RANK_DECIMALS` decimals (:func:`coarse_rank`): at
    full precision, with the number of patients, they give the class counts withheld.

    Parameters
    ----------
    doc : SiteDisclosure

    Returns
    -------
    SiteDisclosure
        A copy with ``pooled`` set.
    """
    splits = dict(doc.splits)
    test = splits.get(REPORT_SPLIT)
    if test is not None:
        metrics = {m: (DisclosedMetric(value=None, reason=POOLED_REASON)
                       if m in THRESHOLD_METRICS and v.value is not None else
                       _coarse_metric(v) if m in RANK_METRICS else v)
                   for m, v in test.metrics.items()}
        splits[REPORT_SPLIT] = test.model_copy(update={"n_pos": None, "metrics": metrics})
    calibration = doc.calibration.model_copy(update={"bins": [], "reason": POOLED_REASON})
    return doc.model_copy(update={
        "splits": splits, "cells": [_pooled_cell(c) for c in doc.cells],
        "roc": RocSummary(reason=POOLED_REASON), "calibration": calibration, "pooled": True,
        "notes": [*doc.notes, "test class counts, threshold metrics, ROC points and "
                  "calibration bins: in the pooled figures (the site joins the secure sum)"]})


def _finite(doc: Any) -> Any:
    """The document with non-finite floats as ``None`` (JSON has no NaN)."""
    if isinstance(doc, dict):
        return {k: _finite(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_finite(v) for v in doc]
    if isinstance(doc, float) and not math.isfinite(doc):
        return None
    return doc


# --------------------------------------------------------------------------------------------
# recalibration: the test split's calibration before and after


def _calibration_figures(y: npt.NDArray[np.int64], s: npt.NDArray[np.float64],
                         split: SplitSummary | None, *, min_cell: int,
                         ece_bins: int) -> CalibrationFigures:
    """One score's calibration figures on the test split, under the split's released counts."""
    if split is None or split.n is None or split.n == 0 or y.size != split.n:
        reason = (split.reason if split is not None else None) or "no test patients"
        return CalibrationFigures(reason=reason)
    n_pos = int(y.sum())
    fit_reason = class_reason("auc", n_pos, int(y.size) - n_pos, min_cell)
    intercept = slope = None
    if fit_reason is None:
        intercept, slope = logistic_calibration(y, s)
    return CalibrationFigures(
        n=int(y.size), ece=expected_calibration_error(y, s, n_bins=ece_bins),
        mean_score=float(s.mean()),
        observed=None if split.n_pos is None else split.n_pos / split.n,
        intercept=intercept, slope=slope, reason=fit_reason)


def recalibration_summary(
    frame: pd.DataFrame, disclosed: Mapping[str, Any], *, method: str, applied: bool,
    source: str | None = None, reason: str | None = None, ece_bins: int = 10,
) -> dict[str, Any]:
    """The ``recalibration`` entry of a site's document: what was applied, and the test split's
    calibration before and after it.

    Computed at the site from its predictions (``score``: recalibrated, ``score_raw``: the
    model's own), under the counts :func:`site_disclosure` released for the test split: no
    figure when the split's count is withheld, no fraction positive when its class counts are,
    no intercept or slope below ``min_cell`` patients of a class.

    Parameters
    ----------
    frame : pandas.DataFrame
        The site's predictions with ``split``, ``label``, ``score`` and ``score_raw``.
    disclosed : mapping
        The site's document from :func:`site_disclosure` (its ``splits`` and ``min_cell``).
    method : str
        ``platt``, ``temperature`` or ``none``.
    applied : bool
        Whether ``score`` differs from ``score_raw`` by a recalibration.
    source, reason : str or None
        What the recalibration was fitted on; why it was not applied.
    ece_bins : int
        ECE bins.

    Returns
    -------
    dict
        :class:`RecalibrationSummary` as JSON.

    Raises
    ------
    ValueError
        When ``frame`` has no ``score_raw`` column (one line).
    """
    if "score_raw" not in frame.columns:
        raise ValueError(f"site {disclosed.get('site')}: predictions lack column 'score_raw'; "
                         f"present: {list(frame.columns)}")
    doc = read_disclosure(disclosed)
    test = frame[frame["split"] == REPORT_SPLIT]
    y = test["label"].to_numpy(dtype=np.int64)
    split = doc.splits.get(REPORT_SPLIT)
    figures = {when: _calibration_figures(y, test[col].to_numpy(dtype=np.float64), split,
                                          min_cell=doc.min_cell, ece_bins=ece_bins)
               for when, col in (("before", "score_raw"), ("after", "score"))}
    summary = RecalibrationSummary(method=method, applied=applied, source=source,
                                   reason=reason, **figures)
    out: dict[str, Any] = _finite(summary.model_dump(mode="json"))
    return out
