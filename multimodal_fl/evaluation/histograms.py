"""Federated evaluation: what a site sends, and pooled figures computed from it alone.

Site side -- :func:`summarise_site` turns one site's patient-level labels and scores into a
:class:`SiteEvaluation`: counts, metrics with stratified bootstrap intervals (computed at the
site), and per-label score histograms, overall and per subgroup. Nothing patient-level is in it;
:meth:`SiteEvaluation.to_dict` is the JSON that crosses the boundary.

Histograms -- scores are binned on a fine grid of ``n_bins`` equal-width bins on ``[0, 1]``
(default :data:`DEFAULT_BINS` = 100; a score ``s`` is in bin ``min(floor(s * n_bins),
n_bins - 1)``), separately for positives and negatives. The small-cell rule applies to bins:
before leaving the site, each label's histogram is *coarsened* (:func:`coarsen_counts`) --
walking up the grid, adjacent bins are merged from the first non-empty bin until the merged bin
holds at least ``min_cell`` patients; a remainder below ``min_cell`` at the top is merged into
the last merged bin. Every transmitted bin therefore holds 0 or >= ``min_cell`` patients; empty
stretches stay empty bins, so merged bins stay as narrow as the data allow. A label with fewer
than ``min_cell`` patients in total sends no histogram (and the site or subgroup is left out of
pooled figures, saying so). Each merged bin also carries the sum of its scores (an aggregate of
>= ``min_cell`` patients) so calibration uses true mean predictions.

Server side -- :func:`pool_histograms` adds the sites' histograms on the fine grid (a merged
bin's patients are spread uniformly over the widest window centred on their mean score that
fits in the bin, see :meth:`BinnedCounts.to_fine`), and :func:`pooled_metrics` computes:

* AUC as the Mann-Whitney statistic on binned scores (pairs in the same fine bin count 1/2),
  plus *guaranteed bounds* on the exact patient-level AUC: pairs whose bins do not overlap are
  ordered for certain, the rest may go either way;
* the calibration curve and ECE on ``ece_bins`` equal-width bins (exact when no merged bin
  straddles a calibration-bin edge, since every fine bin lies in exactly one calibration bin);
* sensitivity and specificity at a threshold (exact when the threshold is a fine-bin edge
  ``k / n_bins`` and no merged bin straddles it; otherwise the straddling bin is split in
  proportion to its width, and bounds are given);
* :func:`histogram_threshold` chooses a threshold (Youden) from pooled validation histograms.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from multimodal_fl.config import SitePolicy
from multimodal_fl.evaluation.metrics import (
    MetricValue,
    binary_metrics,
    bootstrap_seed,
    calibration_bins,
    check_binary_inputs,
    derive_seed,
    disclosable,
    suppress_cells,
    undefined_reason,
)
from multimodal_fl.federated.pooling import MIN_SITES, complete_parts

__all__ = [
    "DEFAULT_BINS",
    "OVERALL",
    "UNNAMED",
    "BinnedCounts",
    "GroupSummary",
    "PooledEvaluation",
    "PooledHistogram",
    "SiteEvaluation",
    "coarsen_counts",
    "counts_histogram",
    "counts_summary",
    "fine_counts",
    "histogram_auc",
    "histogram_calibration",
    "histogram_parts",
    "histogram_sens_spec",
    "histogram_threshold",
    "joint_partition",
    "label_counts",
    "level_census",
    "named_levels",
    "part_name",
    "pool_histograms",
    "pooled_auc",
    "pooled_evaluation",
    "pooled_from_counts",
    "pooled_in_process",
    "pooled_metrics",
    "pooled_sites_in_process",
    "refused_pooling",
    "summarise_site",
    "summarise_sites",
]

DEFAULT_BINS = 100
"""Fine histogram grid: 100 equal-width bins on [0, 1]."""

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class BinnedCounts:
    """One label's score histogram after coarsening: intervals of the fine grid.

    Attributes
    ----------
    n_bins : int
        Fine grid size; interval ``i`` covers scores in ``[start_i / n_bins, stop_i / n_bins)``
        (the last fine bin includes 1.0).
    start, stop : list of int
        Fine-bin indices of each interval (``stop`` exclusive); intervals are disjoint and
        increasing.
    count : list of int
        Patients in each interval (each >= ``min_cell``).
    score_sum : list of float
        Sum of the scores in each interval.
    """

    n_bins: int
    start: list[int]
    stop: list[int]
    count: list[int]
    score_sum: list[float]

    @property
    def total(self) -> int:
        """Patients in the histogram."""
        return int(sum(self.count))

    def to_fine(self) -> tuple[FloatArray, FloatArray]:
        """Counts and score sums on the fine grid.

        An interval's patients are spread uniformly over the widest window centred on their
        mean score that fits inside the interval (a single fine bin when the interval is one
        bin wide). Centring on the transmitted mean keeps the pooled AUC close to the exact
        one: on realistic data, 4x less error than spreading over the whole interval.

        Returns
        -------
        counts, sums : ndarray of shape (n_bins,)
            Fractional counts; each fine bin's mean score is its interval's mean.
        """
        nb = self.n_bins
        c = np.zeros(nb)
        s = np.zeros(nb)
        edges = np.arange(nb + 1, dtype=np.float64)
        for a, b, k, t in zip(self.start, self.stop, self.count, self.score_sum, strict=True):
            if k <= 0:
                continue
            m = min(max(t / k * nb, float(a)), float(b))  # mean, in fine-bin units
            half = min(m - a, b - m)
            if b - a == 1 or half < 1e-9:
                j = min(max(math.floor(m), a), b - 1)
                c[j] += k
                s[j] += t
                continue
            lo, hi = m - half, m + half
            overlap = np.clip(np.minimum(edges[1:], hi) - np.maximum(edges[:-1], lo), 0.0, None)
            w = overlap / overlap.sum()
            c += k * w
            s += t * w
        return c, s

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BinnedCounts:
        """Rebuild and check a histogram received from a site.

        Parameters
        ----------
        d : mapping
            Output of :meth:`to_dict`.

        Returns
        -------
        BinnedCounts

        Raises
        ------
        ValueError
            On lists of different lengths, intervals out of order or off the grid, or
            negative counts.
        """
        h = cls(int(d["n_bins"]), [int(x) for x in d["start"]], [int(x) for x in d["stop"]],
                [int(x) for x in d["count"]], [float(x) for x in d["score_sum"]])
        lens = {len(h.start), len(h.stop), len(h.count), len(h.score_sum)}
        if len(lens) != 1:
            raise ValueError("histogram: start/stop/count/score_sum have different lengths")
        prev = 0
        for a, b, k in zip(h.start, h.stop, h.count, strict=True):
            if not (prev <= a < b <= h.n_bins) or k < 0:
                raise ValueError(
                    f"histogram: interval [{a}, {b}) with count {k} is out of order or off the "
                    f"grid of {h.n_bins} bins"
                )
            prev = b
        return h


def coarsen_counts(
    counts: npt.ArrayLike, score_sums: npt.ArrayLike, *, min_cell: int
) -> BinnedCounts | str:
    """Merge adjacent fine bins until every non-empty bin holds at least ``min_cell`` patients.

    Parameters
    ----------
    counts : array-like of int, shape (n_bins,)
        Patients per fine bin.
    score_sums : array-like of float, shape (n_bins,)
        Sum of scores per fine bin.
    min_cell : int
        Minimum patients per transmitted bin (1 disables merging).

    Returns
    -------
    BinnedCounts or str
        The coarsened histogram, or the reason it cannot be sent (fewer than ``min_cell``
        patients in total).
    """
    c = np.asarray(counts, dtype=np.int64)
    sm = np.asarray(score_sums, dtype=np.float64)
    total = int(c.sum())
    if total == 0:
        return "no patients"
    if total < min_cell:
        return f"fewer than {min_cell} patients"
    starts: list[int] = []
    stops: list[int] = []
    cnts: list[int] = []
    sums: list[float] = []
    cur_start: int | None = None
    cur = 0
    cur_sum = 0.0
    last_nonzero = 0
    for i in range(c.size):
        if c[i] == 0 and cur_start is None:
            continue
        if c[i] > 0:
            last_nonzero = i
        if cur_start is None:
            cur_start = i
        cur += int(c[i])
        cur_sum += float(sm[i])
        if cur >= min_cell:
            starts.append(cur_start)
            stops.append(i + 1)
            cnts.append(cur)
            sums.append(cur_sum)
            cur_start, cur, cur_sum = None, 0, 0.0
    if cur > 0:  # remainder below min_cell joins the last merged bin
        stops[-1] = last_nonzero + 1
        cnts[-1] += cur
        sums[-1] += cur_sum
    return BinnedCounts(int(c.size), starts, stops, cnts, sums)


def _fine_histogram(s: FloatArray, n_bins: int) -> tuple[npt.NDArray[np.int64], FloatArray]:
    b = calibration_bins(s, n_bins)
    return (np.bincount(b, minlength=n_bins).astype(np.int64),
            np.bincount(b, weights=s, minlength=n_bins).astype(np.float64))


@dataclass(frozen=True)
class GroupSummary:
    """What a site sends about one set of its patients (the site, or one subgroup).

    Attributes
    ----------
    n, n_pos : int or None
        Counts; ``None`` when suppressed for size.
    metrics : dict of str to MetricValue
        Metrics with bootstrap intervals, computed at the site (empty when suppressed).
    pos, neg : BinnedCounts or None
        Coarsened score histograms of positives and negatives (``None`` when not sent).
    reason : str or None
        Why the cell is suppressed (``None`` when it is not).
    histogram_reason : str or None
        Why a histogram was not sent although the cell is shown.
    """

    n: int | None
    n_pos: int | None
    metrics: dict[str, MetricValue]
    pos: BinnedCounts | None
    neg: BinnedCounts | None
    reason: str | None = None
    histogram_reason: str | None = None

    @property
    def has_histogram(self) -> bool:
        """Whether both label histograms were sent."""
        return self.pos is not None and self.neg is not None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return {
            "n": self.n,
            "n_pos": self.n_pos,
            "metrics": {k: v.to_dict() for k, v in self.metrics.items()},
            "pos": None if self.pos is None else self.pos.to_dict(),
            "neg": None if self.neg is None else self.neg.to_dict(),
            "reason": self.reason,
            "histogram_reason": self.histogram_reason,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GroupSummary:
        """Rebuild from :meth:`to_dict` output.

        Parameters
        ----------
        d : mapping

        Returns
        -------
        GroupSummary
        """
        return cls(
            n=d.get("n"),
            n_pos=d.get("n_pos"),
            metrics={k: MetricValue.from_dict(v) for k, v in d.get("metrics", {}).items()},
            pos=None if d.get("pos") is None else BinnedCounts.from_dict(d["pos"]),
            neg=None if d.get("neg") is None else BinnedCounts.from_dict(d["neg"]),
            reason=d.get("reason"),
            histogram_reason=d.get("histogram_reason"),
        )


@dataclass(frozen=True)
class SiteEvaluation:
    """Everything one site reports about one split: the evaluation message.

    Attributes
    ----------
    site : str
    split : str
    threshold : float or None
        Decision threshold used for sensitivity / specificity.
    overall : GroupSummary
        All the site's patients in the split.
    subgroups : dict
        ``{attribute: {level: GroupSummary}}``.
    settings : dict
        ``n_bins``, ``min_cell``, ``n_boot``, ``alpha``, ``ece_bins``.
    """

    site: str
    split: str
    threshold: float | None
    overall: GroupSummary
    subgroups: dict[str, dict[str, GroupSummary]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def n_bins(self) -> int:
        """Fine histogram grid size."""
        return int(self.settings["n_bins"])

    def to_dict(self) -> dict[str, Any]:
        """The JSON message that crosses the site boundary (no patient-level data).

        Returns
        -------
        dict
        """
        return {
            "site": self.site,
            "split": self.split,
            "threshold": self.threshold,
            "overall": self.overall.to_dict(),
            "subgroups": {
                a: {g: v.to_dict() for g, v in levels.items()}
                for a, levels in self.subgroups.items()
            },
            "settings": dict(self.settings),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SiteEvaluation:
        """Rebuild (and check) a site's message.

        Parameters
        ----------
        d : mapping

        Returns
        -------
        SiteEvaluation
        """
        return cls(
            site=str(d["site"]),
            split=str(d["split"]),
            threshold=d.get("threshold"),
            overall=GroupSummary.from_dict(d["overall"]),
            subgroups={
                a: {g: GroupSummary.from_dict(v) for g, v in levels.items()}
                for a, levels in d.get("subgroups", {}).items()
            },
            settings=dict(d.get("settings", {})),
        )


def _group_summary(
    y: npt.NDArray[np.int64],
    s: FloatArray,
    *,
    threshold: float | None,
    n_bins: int,
    min_cell: int,
    n_boot: int,
    alpha: float,
    seed: int,
    ece_bins: int,
    histograms: bool,
) -> GroupSummary:
    reason = undefined_reason(y, None, min_cell=min_cell)
    size_hidden = y.size == 0 or y.size < min_cell
    if reason is not None:
        return GroupSummary(
            n=None if size_hidden else int(y.size),
            n_pos=None if size_hidden else int(y.sum()),
            metrics={}, pos=None, neg=None, reason=reason,
        )
    mets = binary_metrics(y, s, threshold=threshold, n_bins=ece_bins, n_boot=n_boot,
                          alpha=alpha, seed=seed)
    if not histograms:
        return GroupSummary(int(y.size), int(y.sum()), mets, None, None, None,
                            "histograms not requested")
    hp = coarsen_counts(*_fine_histogram(s[y == 1], n_bins), min_cell=min_cell)
    hn = coarsen_counts(*_fine_histogram(s[y == 0], n_bins), min_cell=min_cell)
    why = []
    if isinstance(hp, str):
        why.append(f"positives: {hp}")
    if isinstance(hn, str):
        why.append(f"negatives: {hn}")
    if why:
        return GroupSummary(int(y.size), int(y.sum()), mets, None, None, None, "; ".join(why))
    assert not isinstance(hp, str) and not isinstance(hn, str)  # narrowed for mypy
    return GroupSummary(int(y.size), int(y.sum()), mets, hp, hn)


def summarise_site(
    site: str,
    y_true: npt.ArrayLike,
    y_score: npt.ArrayLike,
    *,
    groups: pd.DataFrame | Mapping[str, npt.ArrayLike] | None = None,
    threshold: float | None = None,
    split: str = "test",
    n_bins: int = DEFAULT_BINS,
    min_cell: int = 10,
    n_boot: int = 1000,
    alpha: float = 0.05,
    ece_bins: int = 10,
    seed: int = 0,
    subgroup_histograms: bool = True,
) -> SiteEvaluation:
    """Run at the site: metrics with intervals, counts and coarsened histograms.

    Parameters
    ----------
    site : str
        Site name.
    y_true, y_score : array-like
        The site's labels and scores for one split.
    groups : DataFrame or mapping of str to array-like, optional
        Sensitive attributes, one value per patient (missing values become ``"(missing)"``).
        A level is named only when at least ``min_cell`` of these patients hold it
        (:func:`named_levels`); the others form one subgroup :data:`UNNAMED`.
    threshold : float or None
        Decision threshold (e.g. chosen by :func:`histogram_threshold` on pooled validation
        histograms); ``None`` leaves out sensitivity and specificity.
    split : str
        Name of the split summarised.
    n_bins : int
        Fine histogram grid (default 100 bins on [0, 1]).
    min_cell : int
        Small-cell threshold for the site, its subgroups and each histogram bin.
    n_boot, alpha : int, float
        Stratified bootstrap settings for the site's metric intervals.
    ece_bins : int
        ECE bins.
    seed : int
        Base seed (each cell's bootstrap is seeded by it and the cell's scores,
        :func:`~multimodal_fl.evaluation.metrics.bootstrap_seed`, as in a run).
    subgroup_histograms : bool
        Send histograms per subgroup too (needed for pooled subgroup AUC). Independently
        coarsened overlapping histograms can in principle be differenced; set ``False`` for
        strict disclosure control.

    Returns
    -------
    SiteEvaluation
        ``subgroups`` keyed by the levels as named (small ones as :data:`UNNAMED`).
    """
    y, s = check_binary_inputs(y_true, y_score, where=f"site {site!r}")
    if n_bins < 1 or n_bins % ece_bins:
        raise ValueError(
            f"n_bins ({n_bins}) must be a positive multiple of ece_bins ({ece_bins}) so every "
            "histogram bin lies in one calibration bin"
        )
    common: dict[str, Any] = {
        "threshold": threshold, "n_bins": n_bins, "min_cell": min_cell, "n_boot": n_boot,
        "alpha": alpha, "ece_bins": ece_bins,
    }
    overall = _group_summary(y, s, seed=bootstrap_seed(seed, s), histograms=True, **common)
    subgroups: dict[str, dict[str, GroupSummary]] = {}
    if groups is not None:
        gdf = pd.DataFrame(groups)
        if len(gdf) != y.size:
            raise ValueError(
                f"site {site!r}: groups has {len(gdf)} rows but there are {y.size} patients"
            )
        for a in gdf.columns:
            col, _ = named_levels(gdf[a].to_numpy(), min_cell=min_cell)
            subgroups[str(a)] = {
                str(g): _group_summary(
                    y[col == g], s[col == g], seed=bootstrap_seed(seed, s[col == g]),
                    histograms=subgroup_histograms, **common,
                )
                for g in sorted(set(col))
            }
    settings = {"n_bins": n_bins, "min_cell": min_cell, "n_boot": n_boot, "alpha": alpha,
                "ece_bins": ece_bins}
    return SiteEvaluation(site, split, threshold, overall, subgroups, settings)


def summarise_sites(
    predictions: pd.DataFrame,
    *,
    sensitive: Sequence[str] = (),
    split: str = "test",
    site_col: str = "site",
    label_col: str = "label",
    score_col: str = "score",
    split_col: str = "split",
    **kwargs: Any,
) -> list[SiteEvaluation]:
    """:func:`summarise_site` for every site of a predictions table (a simulation helper).

    Parameters
    ----------
    predictions : pandas.DataFrame
        Rows with ``site``, ``split``, ``label``, ``score`` and the ``sensitive`` columns.
    sensitive : sequence of str
        Attribute columns to summarise by.
    split : str
        Split to summarise.
    site_col, label_col, score_col, split_col : str
        Column names.
    **kwargs
        Passed to :func:`summarise_site`.

    Returns
    -------
    list of SiteEvaluation
    """
    df = predictions[predictions[split_col] == split]
    out = []
    for site, d in df.groupby(site_col, sort=True):
        out.append(
            summarise_site(
                str(site), d[label_col].to_numpy(), d[score_col].to_numpy(),
                groups=d[list(sensitive)] if sensitive else None, split=split, **kwargs,
            )
        )
    return out


# --------------------------------------------------------------------------------------------
# server side


@dataclass(frozen=True)
class PooledHistogram:
    """Histograms of several sites added on the fine grid.

    Attributes
    ----------
    n_bins : int
    pos, neg : ndarray of shape (n_bins,)
        Fine-grid counts (fractional where merged bins were spread).
    pos_sum, neg_sum : ndarray of shape (n_bins,)
        Fine-grid score sums.
    pos_intervals, neg_intervals : list of (start, stop, count)
        The transmitted intervals, for exact bounds.
    sites : list of str
        Contributing sites.
    excluded : dict of str to str
        Sites left out, with the reason.
    """

    n_bins: int
    pos: FloatArray
    neg: FloatArray
    pos_sum: FloatArray
    neg_sum: FloatArray
    pos_intervals: list[tuple[int, int, int]]
    neg_intervals: list[tuple[int, int, int]]
    sites: list[str]
    excluded: dict[str, str]

    @property
    def n_pos(self) -> int:
        """Positives pooled."""
        return int(sum(k for _, _, k in self.pos_intervals))

    @property
    def n_neg(self) -> int:
        """Negatives pooled."""
        return int(sum(k for _, _, k in self.neg_intervals))


def pool_histograms(
    parts: Mapping[str, GroupSummary] | Sequence[tuple[str, GroupSummary]],
) -> PooledHistogram:
    """Add sites' histograms (for the overall cell or one subgroup) on the fine grid.

    Parameters
    ----------
    parts : mapping or sequence of (site, GroupSummary)
        The cells to pool; suppressed cells or cells without histograms are excluded and
        listed in ``excluded``.

    Returns
    -------
    PooledHistogram

    Raises
    ------
    ValueError
        If sites used different fine grids.
    """
    items = list(parts.items()) if isinstance(parts, Mapping) else list(parts)
    grids = {g.pos.n_bins for _, g in items if g.pos is not None} | {
        g.neg.n_bins for _, g in items if g.neg is not None
    }
    if len(grids) > 1:
        raise ValueError(f"sites used different histogram grids {sorted(grids)}; use one n_bins")
    n_bins = grids.pop() if grids else DEFAULT_BINS
    pos = np.zeros(n_bins)
    neg = np.zeros(n_bins)
    pos_sum = np.zeros(n_bins)
    neg_sum = np.zeros(n_bins)
    pi: list[tuple[int, int, int]] = []
    ni: list[tuple[int, int, int]] = []
    sites: list[str] = []
    excluded: dict[str, str] = {}
    for site, g in items:
        if g.pos is None or g.neg is None:
            excluded[site] = g.reason or g.histogram_reason or "no histogram"
            continue
        c, sm = g.pos.to_fine()
        pos += c
        pos_sum += sm
        c, sm = g.neg.to_fine()
        neg += c
        neg_sum += sm
        pi += list(zip(g.pos.start, g.pos.stop, g.pos.count, strict=True))
        ni += list(zip(g.neg.start, g.neg.stop, g.neg.count, strict=True))
        if site not in sites:  # one site's unnamed levels are several cells of it
            sites.append(site)
    excluded = {site: why for site, why in excluded.items() if site not in sites}
    return PooledHistogram(n_bins, pos, neg, pos_sum, neg_sum, pi, ni, sites, excluded)


def histogram_auc(h: PooledHistogram) -> tuple[float, float, float]:
    """AUC from binned scores, with guaranteed bounds on the exact patient-level AUC.

    Parameters
    ----------
    h : PooledHistogram

    Returns
    -------
    auc : float
        ``sum_b P_b (N_{<b} + N_b / 2) / (n_pos n_neg)`` on the fine grid (Mann-Whitney with
        pairs in the same bin counted as ties), kept within ``[lower, upper]`` (summing
        floats can put it a few 1e-16 outside, e.g. ``1.0000000000000009``).
    lower, upper : float
        The exact AUC of the underlying scores lies in ``[lower, upper]``: a positive-negative
        pair is certainly ordered when its two transmitted bins do not overlap; every other
        pair is counted 0 for ``lower`` and 1 for ``upper``.

    Raises
    ------
    ValueError
        When the pooled histograms lack positives or negatives.
    """
    n_p, n_n = h.pos.sum(), h.neg.sum()
    if n_p <= 0 or n_n <= 0:
        raise ValueError("pooled histograms have no positives or no negatives: AUC undefined")
    below = np.concatenate([[0.0], np.cumsum(h.neg)[:-1]])
    auc = float(np.sum(h.pos * (below + 0.5 * h.neg)) / (n_p * n_n))
    # bounds from the transmitted intervals
    nb = h.n_bins
    by_stop = np.zeros(nb + 1)
    by_start = np.zeros(nb + 1)
    for a, b, k in h.neg_intervals:
        by_stop[b] += k
        by_start[a] += k
    neg_stop_le = np.cumsum(by_stop)  # negatives whose interval ends at or below index
    neg_start_ge = np.cumsum(by_start[::-1])[::-1]  # negatives whose interval starts at/after
    gt = sum(k * neg_stop_le[a] for a, _, k in h.pos_intervals)
    lt = sum(k * neg_start_ge[b] if b <= nb else 0.0 for _, b, k in h.pos_intervals)
    pairs = float(h.n_pos) * float(h.n_neg)
    return _within(auc, float(gt / pairs), float((pairs - lt) / pairs))


def _within(value: float, lower: float, upper: float) -> tuple[float, float, float]:
    """``(value, lower, upper)`` with the bounds in [0, 1] and the value between them.

    The bounds are exact ratios of counts; the estimate is a sum of floats that round-off can
    put just outside them (``-2.2e-16`` would read ``-0.000``). Only round-off moves: the
    estimate lies within its guaranteed bounds in exact arithmetic.
    """
    lower, upper = min(max(lower, 0.0), 1.0), min(max(upper, 0.0), 1.0)
    return min(max(value, lower), upper), lower, upper


def histogram_calibration(h: PooledHistogram, n_bins: int = 10) -> pd.DataFrame:
    """Calibration curve on equal-width bins from pooled histograms.

    Parameters
    ----------
    h : PooledHistogram
    n_bins : int
        Calibration bins; must divide the fine grid.

    Returns
    -------
    pandas.DataFrame
        One row per calibration bin: ``lo``, ``hi``, ``n``, ``mean_score``, ``observed``
        (fraction positive); ``mean_score``/``observed`` are NaN for empty bins.
    """
    if h.n_bins % n_bins:
        raise ValueError(f"calibration bins ({n_bins}) must divide the grid ({h.n_bins})")
    k = h.n_bins // n_bins
    p = h.pos.reshape(n_bins, k).sum(axis=1)
    q = h.neg.reshape(n_bins, k).sum(axis=1)
    ssum = (h.pos_sum + h.neg_sum).reshape(n_bins, k).sum(axis=1)
    n = p + q
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_score = np.where(n > 0, ssum / n, np.nan)
        observed = np.where(n > 0, p / n, np.nan)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return pd.DataFrame({"lo": edges[:-1], "hi": edges[1:], "n": n, "mean_score": mean_score,
                         "observed": observed})


def histogram_ece(h: PooledHistogram, n_bins: int = 10) -> float:
    """Expected calibration error from pooled histograms.

    Parameters
    ----------
    h : PooledHistogram
    n_bins : int
        Calibration bins (must divide the fine grid).

    Returns
    -------
    float
    """
    cal = histogram_calibration(h, n_bins)
    n = cal["n"].to_numpy()
    ok = n > 0
    gap = np.abs(cal["observed"].to_numpy()[ok] - cal["mean_score"].to_numpy()[ok])
    return min(max(float(np.sum(n[ok] * gap) / n.sum()), 0.0), 1.0)  # round-off kept in range


def _above(intervals: list[tuple[int, int, int]], fine: FloatArray, n_bins: int,
           threshold: float) -> tuple[float, float, float]:
    """Patients with score >= threshold: estimate, lower and upper bound."""
    x = threshold * n_bins
    j = min(math.floor(x), n_bins - 1)
    frac = x - j  # part of fine bin j below the threshold
    est = float(fine[j + 1:].sum() + fine[j] * (1.0 - frac))
    lo = hi = 0.0
    for a, b, k in intervals:
        if a >= x:
            lo += k
            hi += k
        elif b > x or (b == n_bins and threshold >= 1.0):
            hi += k
    return est, lo, hi


def histogram_sens_spec(
    h: PooledHistogram, threshold: float
) -> dict[str, tuple[float, float, float]]:
    """Sensitivity and specificity at a threshold from pooled histograms.

    Parameters
    ----------
    h : PooledHistogram
    threshold : float
        Scores ``>= threshold`` are positive.

    Returns
    -------
    dict
        ``{"sensitivity": (estimate, lower, upper), "specificity": (...)}``; the bounds
        contain the exact patient-level value, and the estimate is kept within them (float
        round-off aside, it lies there already).
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    n_p, n_n = h.n_pos, h.n_neg
    if n_p == 0 or n_n == 0:
        raise ValueError("pooled histograms have no positives or no negatives")
    tp, tp_lo, tp_hi = _above(h.pos_intervals, h.pos, h.n_bins, threshold)
    fp, fp_lo, fp_hi = _above(h.neg_intervals, h.neg, h.n_bins, threshold)
    return {
        "sensitivity": _within(tp / n_p, tp_lo / n_p, tp_hi / n_p),
        "specificity": _within(1 - fp / n_n, 1 - fp_hi / n_n, 1 - fp_lo / n_n),
    }


def histogram_threshold(h: PooledHistogram) -> float:
    """Youden threshold among the fine-grid edges, from pooled (validation) histograms.

    Parameters
    ----------
    h : PooledHistogram
        Pooled histograms of the validation split.

    Returns
    -------
    float
        ``k / n_bins`` maximising sensitivity + specificity - 1.
    """
    if h.pos.sum() <= 0 or h.neg.sum() <= 0:
        raise ValueError("pooled validation histograms need positives and negatives")
    pos_ge = np.concatenate([np.cumsum(h.pos[::-1])[::-1], [0.0]]) / h.pos.sum()
    neg_lt = np.concatenate([[0.0], np.cumsum(h.neg)]) / h.neg.sum()
    k = int(np.argmax(pos_ge + neg_lt - 1.0))
    return k / h.n_bins


@dataclass(frozen=True)
class PooledEvaluation:
    """Pooled figures computed by the server from site summaries only.

    Attributes
    ----------
    overall : dict
        Output of :func:`pooled_metrics` for all sites.
    subgroups : dict
        ``{attribute: {level: pooled_metrics output}}``.
    sites : list of dict
        Per-site counts and metrics as the sites reported them.
    settings : dict
    """

    overall: dict[str, Any]
    subgroups: dict[str, dict[str, dict[str, Any]]]
    sites: list[dict[str, Any]]
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return asdict(self)


def pooled_metrics(
    h: PooledHistogram, *, threshold: float | None = None, ece_bins: int = 10
) -> dict[str, Any]:
    """AUC (with bounds), ECE, calibration curve and sensitivity/specificity from histograms.

    Parameters
    ----------
    h : PooledHistogram
    threshold : float or None
        For sensitivity and specificity.
    ece_bins : int
        Calibration bins.

    Returns
    -------
    dict
        ``n_pos``, ``n_neg``, ``sites``, ``excluded``, ``auc`` ({value, lower, upper}),
        ``ece``, ``calibration`` (records), and with a threshold ``sensitivity`` and
        ``specificity`` ({value, lower, upper}); ``reason`` when nothing could be pooled.
    """
    out: dict[str, Any] = {"n_pos": h.n_pos, "n_neg": h.n_neg, "sites": list(h.sites),
                           "excluded": dict(h.excluded), "n_bins": h.n_bins, "reason": None}
    if h.n_pos == 0 or h.n_neg == 0:
        out["reason"] = "no site sent both histograms" if not h.sites else (
            "no positives" if h.n_pos == 0 else "no negatives")
        return out
    auc, lo, hi = histogram_auc(h)
    out["auc"] = {"value": auc, "lower": lo, "upper": hi}
    out["ece"] = histogram_ece(h, ece_bins)
    cal = histogram_calibration(h, ece_bins)
    out["calibration"] = [
        {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
        for r in cal.to_dict("records")
    ]
    if threshold is not None:
        out["threshold"] = threshold
        for name, (v, a, b) in histogram_sens_spec(h, threshold).items():
            out[name] = {"value": v, "lower": a, "upper": b}
    return out


def pooled_evaluation(
    summaries: Sequence[SiteEvaluation], *, threshold: float | None = None,
    min_cell: int | None = None,
) -> PooledEvaluation:
    """Server side: pool site summaries into overall and per-subgroup figures.

    A site's level is pooled under its name only when the site's cell of it shows at least
    ``min_cell`` patients (the naming rule of :func:`named_levels`); every other level of the
    site joins the site's :data:`UNNAMED` subgroup, so no level is named in the pooled figures
    that no site holds ``min_cell`` patients of (a summary made by hand, or before
    :func:`summarise_site` named its levels, may carry such a level).

    Parameters
    ----------
    summaries : sequence of SiteEvaluation
        One message per site, all of the same split and grid.
    threshold : float or None
        Threshold for pooled sensitivity/specificity; default the sites' common threshold.
    min_cell : int or None
        The naming rule's threshold; each site's own (``settings["min_cell"]``) where that is
        larger (default: each site's own).

    Returns
    -------
    PooledEvaluation
    """
    if not summaries:
        raise ValueError("pooled_evaluation: no site summaries")
    splits = {s.split for s in summaries}
    if len(splits) > 1:
        raise ValueError(f"site summaries mix splits {sorted(splits)}; pool one split at a time")
    if threshold is None:
        ts = {s.threshold for s in summaries}
        threshold = ts.pop() if len(ts) == 1 else None
    ece_bins = int(summaries[0].settings.get("ece_bins", 10))
    overall = pooled_metrics(pool_histograms([(s.site, s.overall) for s in summaries]),
                             threshold=threshold, ece_bins=ece_bins)
    named = [_named_subgroups(s, min_cell) for s in summaries]
    subgroups: dict[str, dict[str, dict[str, Any]]] = {}
    for a in sorted({a for n in named for a in n}):
        levels = sorted({g for n in named for g in n.get(a, {})})
        subgroups[a] = {}
        for g in levels:
            parts = [(s.site, cell) for s, n in zip(summaries, named, strict=True)
                     for cell in n.get(a, {}).get(g, [])]
            subgroups[a][g] = pooled_metrics(pool_histograms(parts), threshold=threshold,
                                             ece_bins=ece_bins)
    sites = [
        {"site": s.site, "n": s.overall.n, "n_pos": s.overall.n_pos, "reason": s.overall.reason,
         "metrics": {k: v.to_dict() for k, v in s.overall.metrics.items()}}
        for s in summaries
    ]
    settings = {"split": splits.pop(), "threshold": threshold, "ece_bins": ece_bins,
                "n_bins": summaries[0].n_bins}
    return PooledEvaluation(overall, subgroups, sites, settings)


def _named_subgroups(summary: SiteEvaluation, min_cell: int | None
                     ) -> dict[str, dict[str, list[GroupSummary]]]:
    """A site's subgroup cells under the names that may leave: a level whose cell shows fewer
    than the site's ``min_cell`` patients (or hides its size) is :data:`UNNAMED`."""
    m = max(int(summary.settings.get("min_cell", 1)), int(min_cell or 0))
    out: dict[str, dict[str, list[GroupSummary]]] = {}
    for a, levels in summary.subgroups.items():
        for g, cell in sorted(levels.items()):
            name = g if g == UNNAMED or (cell.n is not None and cell.n >= m) else UNNAMED
            out.setdefault(a, {}).setdefault(name, []).append(cell)
    return out


# --------------------------------------------------------------------------------------------
# pooled by secure sum: fine counts summed across sites, coarsened after summation

#: The part of a secure-summed histogram vector that holds all of a site's patients.
OVERALL = "overall"


#: The one label a site gives every level of an attribute held by fewer than ``min_cell`` of its
#: patients in the split concerned (:func:`named_levels`): no such level is named off the site.
UNNAMED = "(other)"


def named_levels(values: npt.ArrayLike, *, min_cell: int) -> tuple[npt.NDArray[np.str_], int]:
    """Each patient's level of an attribute as it may leave the site, and how many were unnamed.

    A level's label may leave the site only when the site holds at least ``min_cell`` patients
    with that level in the split the figures describe (the test split): a label held by fewer
    (a patient's exact age, a rare code) would say that such a patient exists at the site. Every
    such level is relabelled :data:`UNNAMED`; its patients stay in the figures (as one group
    whose cell follows the small-cell rules like any other), only the labels go. Missing values
    are the level ``"(missing)"`` first, as everywhere else.

    Parameters
    ----------
    values : array-like
        One value per patient of the split.
    min_cell : int
        The effective small-cell threshold (the site's gate's).

    Returns
    -------
    labels : ndarray of str
        The level per patient, small levels as :data:`UNNAMED`.
    unnamed : int
        The number of distinct levels relabelled (the most that may leave about them).
    """
    labels = _level_labels(values)
    counts = labels.value_counts()
    small = counts.index[counts < min_cell]
    out = labels.where(~labels.isin(small), UNNAMED).to_numpy(dtype=str)
    return out, len(small)


#: The level of a patient whose value of an attribute is missing.
MISSING = "(missing)"


def _level_labels(values: npt.ArrayLike) -> pd.Series:
    """Each patient's level as a string, missing values as :data:`MISSING`."""
    col = pd.Series(np.asarray(values, dtype=object))
    return col.where(col.notna(), MISSING).astype(str)


def declared_layout(levels: Sequence[str]) -> tuple[str, ...]:
    """Every part name a site lays out for an attribute of declared ``levels``, in order.

    The declared levels, then :data:`MISSING` and :data:`UNNAMED` (a value outside them):
    the same at every site whatever its patients, so the names say nothing of them.

    Parameters
    ----------
    levels : sequence of str
        The attribute's levels fixed by the task
        (:func:`~multimodal_fl.data.tasks.declared_levels`).

    Returns
    -------
    tuple of str
    """
    return tuple(dict.fromkeys([*map(str, levels), MISSING, UNNAMED]))


def declared_labels(values: npt.ArrayLike, levels: Sequence[str]) -> npt.NDArray[np.str_]:
    """Each patient's level of an attribute of declared ``levels``; any other as UNNAMED.

    Parameters
    ----------
    values : array-like
        One value per patient.
    levels : sequence of str
        The attribute's declared levels.

    Returns
    -------
    ndarray of str
    """
    labels = _level_labels(values)
    return labels.where(labels.isin(declared_layout(levels)), UNNAMED).to_numpy(dtype=str)


def level_census(frame: pd.DataFrame, attributes: Sequence[str]) -> dict[str, dict[str, int]]:
    """How many of these patients hold each level of each attribute (it stays at the site).

    The levels are spelt as :func:`named_levels` spells them (strings, missing values as
    ``"(missing)"``), so a level name that leaves the site can be looked up here: the
    disclosure gate lets a name leave only where it counts at least ``min_cell`` patients of
    the test split (:func:`~multimodal_fl.federated.disclosure.check_levels`).

    Parameters
    ----------
    frame : pandas.DataFrame
        One row per patient (the site's test split).
    attributes : sequence of str
        The columns to count; one absent from ``frame`` is skipped.

    Returns
    -------
    dict of str to dict of str to int
        ``{attribute: {level: patients}}``.
    """
    return {str(a): {str(k): int(v) for k, v in
                     _level_labels(frame[a].to_numpy()).value_counts().items()}
            for a in attributes if a in frame.columns}


def part_name(attribute: str, level: str) -> str:
    """The part of a histogram vector for one subgroup: ``"<attribute>=<level>"``.

    Parameters
    ----------
    attribute, level : str

    Returns
    -------
    str
    """
    return f"{attribute}={level}"


def fine_counts(y: npt.ArrayLike, s: npt.ArrayLike, n_bins: int) -> npt.NDArray[np.int64]:
    """Negatives' then positives' patient counts per fine bin: one part of the summed vector.

    Parameters
    ----------
    y, s : array-like
        Labels (0/1) and scores.
    n_bins : int
        Fine grid size.

    Returns
    -------
    ndarray of int64, shape (2 * n_bins,)
    """
    y_arr = np.asarray(y).astype(np.int64)
    b = calibration_bins(np.asarray(s, dtype=np.float64), n_bins)
    return np.concatenate([np.bincount(b[y_arr == 0], minlength=n_bins),
                           np.bincount(b[y_arr == 1], minlength=n_bins)]).astype(np.int64)


def histogram_parts(
    y_true: npt.ArrayLike, y_score: npt.ArrayLike, *,
    groups: pd.DataFrame | Mapping[str, npt.ArrayLike] | None = None, n_bins: int = DEFAULT_BINS,
    min_cell: int, declared: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, npt.NDArray[np.int64]]:
    """A site's fine score histograms as the parts of one vector to secure-sum.

    Computed at the site and never sent in the clear: only the sum over at least three sites
    reaches the server (``multimodal_fl.federated.pooling``), which coarsens it
    (:func:`pooled_from_counts`).

    Parameters
    ----------
    y_true, y_score : array-like
        The site's labels and scores of one split.
    groups : DataFrame or mapping, optional
        Sensitive attributes, one value per patient (missing values become ``"(missing)"``).
    n_bins : int
        Fine grid size.
    min_cell : int
        The site's effective small-cell threshold: a level held by fewer of these patients is
        not named (:func:`named_levels`), so no part's name carries a rare label.
    declared : mapping of str to sequence of str, optional
        Attributes whose levels the task fixes (``sex``, ``age_band``:
        :func:`~multimodal_fl.data.tasks.declared_levels`): such an attribute has a part for
        every name of :func:`declared_layout`, empty ones too, whatever the site holds, so
        its small levels join the sum under their own names (the sum hides each site's
        part; the layout is every site's).

    Returns
    -------
    dict of str to int64 array
        :data:`OVERALL` and one ``"<attribute>=<level>"`` part per level present
        (:func:`fine_counts` of its patients), the small levels together as
        ``"<attribute>=(other)"``; per declared level for a declared attribute.
    """
    y, s = check_binary_inputs(y_true, y_score, where="histogram_parts")
    parts = {OVERALL: fine_counts(y, s, n_bins)}
    if groups is not None:
        gdf = pd.DataFrame(groups)
        for a in gdf.columns:
            levels = (declared or {}).get(str(a))
            if levels is None:
                col, _ = named_levels(gdf[a].to_numpy(), min_cell=min_cell)
                names: Sequence[str] = sorted(set(col))
            else:
                col, names = declared_labels(gdf[a].to_numpy(), levels), declared_layout(levels)
            for g in names:
                parts[part_name(str(a), g)] = fine_counts(y[col == g], s[col == g], n_bins)
    return parts


def _split_counts(vector: npt.ArrayLike) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    v = np.asarray(vector, dtype=np.int64)
    half = v.size // 2
    return v[:half], v[half:]


def joint_partition(
    histograms: Sequence[tuple[npt.ArrayLike, npt.ArrayLike]], min_cell: int
) -> list[tuple[int, int]] | None:
    """One partition of the fine grid in which every histogram's bins are shown safely.

    Walking up the grid, bins are merged until, in the merged bin, every histogram's negatives
    and positives are each 0 or at least ``min_cell``; a remainder at the top that is not is
    merged into the bins below it. Histograms that add up to a shown one (the groups of one
    attribute and what they leave of the whole) share the partition, so no bin of one can be
    derived from the others by subtraction.

    Parameters
    ----------
    histograms : sequence of (negatives, positives) fine counts
    min_cell : int

    Returns
    -------
    list of (start, stop) or None
        Contiguous intervals covering the grid; ``None`` when even one bin over the whole grid
        leaves a count in ``(0, min_cell)``.
    """
    counts = np.stack([np.stack([np.asarray(n), np.asarray(p)]) for n, p in histograms])
    n_bins = counts.shape[-1]

    def ok(c: npt.NDArray[np.int64]) -> bool:
        return bool(np.all((c == 0) | (c >= min_cell)))

    bounds: list[tuple[int, int]] = []
    start = 0
    acc = np.zeros(counts.shape[:-1], dtype=np.int64)
    for i in range(n_bins):
        acc += counts[..., i]
        if acc.any() and ok(acc):
            bounds.append((start, i + 1))
            start, acc = i + 1, np.zeros_like(acc)
    while not ok(acc):
        if not bounds:
            return None
        a, _ = bounds.pop()
        acc = counts[..., a:].sum(axis=-1)
        start = a
    if start < n_bins:
        if bounds and not acc.any():
            bounds[-1] = (bounds[-1][0], n_bins)  # an empty top joins the bin below
        else:
            bounds.append((start, n_bins))
    return bounds


def _auc_ci(neg: npt.NDArray[np.int64], pos: npt.NDArray[np.int64], *, n_boot: int,
            alpha: float, seed: int) -> tuple[float | None, float | None]:
    """Percentile interval of the binned AUC, resampling each class's histogram (multinomial)."""
    if n_boot <= 0:
        return None, None
    rng = np.random.default_rng(seed)
    n_p, n_n = int(pos.sum()), int(neg.sum())
    p = rng.multinomial(n_p, pos / n_p, size=n_boot).astype(np.float64)
    q = rng.multinomial(n_n, neg / n_n, size=n_boot).astype(np.float64)
    below = np.concatenate([np.zeros((n_boot, 1)), np.cumsum(q, axis=1)[:, :-1]], axis=1)
    aucs = (p * (below + 0.5 * q)).sum(axis=1) / (n_p * n_n)
    lo, hi = np.quantile(aucs, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


#: Equal-width bins of the ECE (``metrics.expected_calibration_error``'s default).
ECE_BINS = 10


def _grid_ece(neg: npt.NDArray[np.int64], pos: npt.NDArray[np.int64],
              bins: list[tuple[int, int]]) -> tuple[float, float, float]:
    """ECE over ``bins`` (intervals of the fine grid) from fine counts, with guaranteed bounds.

    Each patient's score lies in its fine bin, so a bin's mean score lies between the mean of
    its patients' fine-bin lower edges and that of their upper edges: the estimate takes each
    patient at the middle of its fine bin, and the bounds take the distance of the bin's
    observed fraction from that interval (nearest and farthest point). The ECE of the
    patient-level scores over the same bins lies within ``[lower, upper]``, at most
    ``1 / (2 n_bins)`` from the estimate.
    """
    n_bins = neg.size
    count = (neg + pos).astype(np.float64)
    total = float(count.sum())
    edges = np.arange(n_bins + 1) / n_bins
    est = lower = upper = 0.0
    for a, b in bins:
        n = float(count[a:b].sum())
        if n == 0:
            continue
        obs = float(pos[a:b].sum()) / n
        lo = float((count[a:b] * edges[a:b]).sum()) / n
        hi = float((count[a:b] * edges[a + 1:b + 1]).sum()) / n
        w = n / total
        est += w * abs(obs - (lo + hi) / 2)
        lower += w * max(lo - obs, obs - hi, 0.0)
        upper += w * max(abs(obs - lo), abs(obs - hi))
    return _within(est, lower, upper)


def _ece_figures(neg: npt.NDArray[np.int64], pos: npt.NDArray[np.int64],
                 partition: list[tuple[int, int]]) -> dict[str, Any]:
    """The cell's ECE: on the 10 equal-width bins when the fine grid refines them, else on the
    calibration bins shown (``ece_bins`` says which), with its guaranteed bounds."""
    n_bins = neg.size
    if n_bins % ECE_BINS == 0:
        k = n_bins // ECE_BINS
        bins, on = [(j * k, (j + 1) * k) for j in range(ECE_BINS)], f"{ECE_BINS} equal-width bins"
    else:
        bins, on = partition, "the calibration bins shown"
    value, lower, upper = _grid_ece(neg, pos, bins)
    return {"ece": value, "ece_bounds": [lower, upper], "ece_bins": on}


def _threshold_figures(h: PooledHistogram, threshold: float, min_cell: int) -> dict[str, Any]:
    """Sensitivity and specificity at a threshold, when no count they rest on is small.

    The positives (and negatives) on either side of a fine-grid edge are counts of the pooled
    patients: each must be 0 or at least ``min_cell``, or neither figure leaves; a threshold
    between grid edges gives only bounds of those counts, and is withheld too.
    """
    out: dict[str, Any] = {"threshold": threshold}
    x = threshold * h.n_bins
    edge = round(x)
    why = None
    if abs(x - edge) > 1e-9:
        why = f"the threshold {threshold:g} is not an edge of the {h.n_bins}-bin grid"
    else:
        counts = [float(c[edge:].sum()) for c in (h.pos, h.neg)]
        counts += [float(h.pos.sum()) - counts[0], float(h.neg.sum()) - counts[1]]
        if not all(disclosable(round(c), min_cell) for c in counts):
            why = f"a side of the threshold holds fewer than {min_cell} of a class"
    for name, (v, a, b) in histogram_sens_spec(h, threshold).items():
        out[name] = ({"value": v, "lower": a, "upper": b} if why is None else
                     {"value": None, "lower": None, "upper": None, "reason": why})
    return out


def _counted_cell(
    neg: npt.NDArray[np.int64], pos: npt.NDArray[np.int64], partition: list[tuple[int, int]],
    *, sites: list[str], n_boot: int, alpha: float, seed: int,
    threshold: float | None = None, min_cell: int = 1,
) -> dict[str, Any]:
    """One pooled cell's figures: AUC (bounds, interval), ECE, calibration on ``partition`` and,
    with a threshold, sensitivity and specificity."""
    n_bins = neg.size
    out: dict[str, Any] = {"n_pos": int(pos.sum()), "n_neg": int(neg.sum()), "sites": sites,
                           "n_bins": n_bins, "reason": None}
    if out["n_pos"] == 0 or out["n_neg"] == 0:
        out["reason"] = "no positives" if out["n_pos"] == 0 else "no negatives"
        return out
    bins = [(i, i + 1) for i in range(n_bins)]
    h = PooledHistogram(n_bins, pos.astype(np.float64), neg.astype(np.float64),
                        np.zeros(n_bins), np.zeros(n_bins),
                        [(a, b, int(pos[a])) for a, b in bins if pos[a]],
                        [(a, b, int(neg[a])) for a, b in bins if neg[a]], sites, {})
    value, lower, upper = histogram_auc(h)
    lo, hi = _auc_ci(neg, pos, n_boot=n_boot, alpha=alpha, seed=seed)
    out["auc"] = {"value": value, "lower": lower, "upper": upper, "lo": lo, "hi": hi}
    mid = (np.arange(n_bins) + 0.5) / n_bins
    calibration = []
    for a, b in partition:
        n_a = int(pos[a:b].sum() + neg[a:b].sum())
        if n_a == 0:
            continue
        mean = float(((pos[a:b] + neg[a:b]) * mid[a:b]).sum() / n_a)
        calibration.append({"lo": a / n_bins, "hi": b / n_bins, "n": n_a,
                            "n_pos": int(pos[a:b].sum()), "mean_score": mean,
                            "observed": float(pos[a:b].sum() / n_a)})
    out.update(_ece_figures(neg, pos, partition))
    out["calibration"] = calibration
    if threshold is not None:
        out.update(_threshold_figures(h, threshold, min_cell))
    return out


def _attribute_cells(
    attribute: str, levels: Mapping[str, npt.NDArray[np.int64]],
    overall: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]], *, min_cell: int,
    contributors: Mapping[str, list[str]], n_boot: int, alpha: float, seed: int,
    threshold: float | None = None,
) -> dict[str, dict[str, Any]]:
    """One attribute's pooled cells: small ones suppressed, complementary suppression against
    the pooled whole, one shared partition for the shown cells and what they leave."""
    split = {g: _split_counts(v) for g, v in levels.items()}
    whole = (int(overall[1].sum()), int(overall[0].sum()))
    suppressed = suppress_cells({g: (int(p.sum()), int(n.sum())) for g, (n, p) in split.items()},
                                min_cell, total=whole, names=("positives", "negatives"))
    shown = [g for g in sorted(split) if g not in suppressed]
    rest_n = overall[0] - sum((split[g][0] for g in shown), np.zeros_like(overall[0]))
    rest_p = overall[1] - sum((split[g][1] for g in shown), np.zeros_like(overall[1]))
    partition = joint_partition([split[g] for g in shown] + [(rest_n, rest_p)], min_cell)
    out: dict[str, dict[str, Any]] = {}
    for g in sorted(split):
        part = part_name(attribute, g)
        who = list(contributors.get(part, []))
        if g in suppressed or partition is None:
            out[g] = {"reason": suppressed.get(g, "no safe histogram partition"), "sites": who}
            continue
        out[g] = _counted_cell(*split[g], partition, sites=who, n_boot=n_boot, alpha=alpha,
                               seed=derive_seed(seed, "pooled", attribute, g),
                               threshold=threshold, min_cell=min_cell)
    return out


def pooled_from_counts(
    parts: Mapping[str, npt.ArrayLike],
    *,
    min_cell: int,
    contributors: Mapping[str, list[str]] | None = None,
    excluded: Mapping[str, str] | None = None,
    left_out: Mapping[str, str] | None = None,
    sites: Sequence[Mapping[str, Any]] = (),
    n_boot: int = 0,
    alpha: float = 0.05,
    seed: int = 0,
    split: str = "test",
    threshold: float | None = None,
) -> PooledEvaluation:
    """Pooled figures from histogram counts summed across sites (a secure sum's total).

    The server holds the fine pooled counts; what it shows is coarsened after summation: the
    overall cell only when its positives and negatives are each 0 or at least ``min_cell``;
    subgroup cells under :func:`~multimodal_fl.evaluation.metrics.suppress_cells` (small
    cells and complementary suppression per attribute, against the overall cell); calibration
    bins on :func:`joint_partition` s, so every shown bin holds 0 or at least ``min_cell``
    positives and negatives. AUC (Mann-Whitney on the fine bins, with bounds on the exact
    patient-level AUC and a bootstrap interval) is an aggregate of the whole cell.

    Parameters
    ----------
    parts : mapping of str to int array
        :data:`OVERALL` and ``"<attribute>=<level>"`` totals (negatives then positives per bin).
    min_cell : int
    contributors : mapping of part to sites, optional
    excluded : mapping of site to reason, optional
        Sites whose counts are not in the total.
    left_out : mapping of part to reason, optional
        Parts some site held but that were not summed (shown as suppressed).
    sites : sequence of dict
        Per-site entries (counts and metrics as each site disclosed them).
    n_boot, alpha, seed : int, float, int
        The AUC interval's bootstrap.
    split : str
    threshold : float or None
        One model's one threshold: sensitivity and specificity at it, where the counts on
        either side of it are 0 or at least ``min_cell`` of each class.

    Returns
    -------
    PooledEvaluation
        Every shown cell's ECE is on the 10 equal-width bins of the metric (``ece_bins``) when
        the fine grid refines them, with ``ece_bounds`` that hold the patient-level ECE.
    """
    contributors = dict(contributors or {})
    neg, pos = _split_counts(parts[OVERALL])
    settings = {"split": split, "threshold": threshold, "n_bins": int(neg.size),
                "min_cell": min_cell, "source": "secure sum", "n_boot": n_boot}
    who = list(contributors.get(OVERALL, []))
    small = [name for name, k in (("positives", pos.sum()), ("negatives", neg.sum()))
             if not disclosable(int(k), min_cell)]
    partition = joint_partition([(neg, pos)], min_cell)
    if small or partition is None:
        overall: dict[str, Any] = {"reason": f"fewer than {min_cell} {(small or ['patients'])[0]}",
                                   "sites": who}
    else:
        overall = _counted_cell(neg, pos, partition, sites=who, n_boot=n_boot, alpha=alpha,
                                seed=derive_seed(seed, "pooled", OVERALL),
                                threshold=threshold, min_cell=min_cell)
    overall["excluded"] = dict(excluded or {})
    levels: dict[str, dict[str, npt.NDArray[np.int64]]] = {}
    for name, vector in parts.items():
        if name != OVERALL:
            attribute, _, level = name.partition("=")
            counts = np.asarray(vector, dtype=np.int64)
            n = int(counts.sum())
            # a level no pooled patient holds is no group; a named level under min_cell can
            # only be a declared one (every site lays those out, empty or small): not named,
            # its patients stay in the whole, under complementary suppression like any cell
            if n > 0 and (n >= min_cell or level == UNNAMED):
                levels.setdefault(attribute, {})[level] = counts
    subgroups = {a: _attribute_cells(a, lv, (neg, pos), min_cell=min_cell,
                                     contributors=contributors, n_boot=n_boot, alpha=alpha,
                                     seed=seed, threshold=threshold)
                 for a, lv in sorted(levels.items())}
    for name, reason in (left_out or {}).items():
        attribute, _, level = name.partition("=")
        if name != OVERALL:
            subgroups.setdefault(attribute, {})[level] = {"reason": reason, "sites": []}
    if small:  # the whole is not shown: neither are its parts
        subgroups = {a: {g: {"reason": overall["reason"], "sites": c.get("sites", [])}
                         for g, c in lv.items()} for a, lv in subgroups.items()}
    return PooledEvaluation(overall, subgroups, [dict(s) for s in sites], settings)


def pooled_in_process(
    tests: Mapping[str, pd.DataFrame],
    *,
    sensitive: Sequence[str],
    min_cell: Mapping[str, int],
    subgroups: Mapping[str, bool] | None = None,
    secure_sum: Mapping[str, bool] | None = None,
    n_bins: int = DEFAULT_BINS,
    n_boot: int = 0,
    seed: int = 0,
    threshold: float | None = None,
    sites: Sequence[Mapping[str, Any]] = (),
    declared: Mapping[str, Sequence[str]] | None = None,
) -> PooledEvaluation:
    """The pooled test figures of sites whose predictions are in one process, as a secure sum
    would give them (the local-only and centralized engines, a user's predictions table).

    Each site's fine histograms are its :func:`histogram_parts` at its own ``min_cell`` (levels
    under it unnamed); a site of fewer than ``min_cell`` test patients takes no part, nor does
    a site whose policy does not answer ``secure_sum`` requests (it would join no secure sum on
    the federated engine, and sends its document in the released form there); the parts
    summed are those :func:`~multimodal_fl.federated.pooling.complete_parts` lets a secure sum
    add (at least three sites, and an attribute's levels only when every pooled site's are in,
    so every shown subgroup cell covers every site the overall cell covers); the total is
    coarsened by :func:`pooled_from_counts`. With fewer than three sites there are no figures:
    the total minus one site's disclosed figures would be the other's.

    Parameters
    ----------
    tests : mapping of site to DataFrame
        Each site's test rows: ``label``, ``score`` and the ``sensitive`` columns it has.
    sensitive : sequence of str
    min_cell : mapping of site to int
        Each site's effective small-cell threshold; the pooled one is the largest.
    subgroups : mapping of site to bool, optional
        Whether each site's policy lets subgroup summaries leave (default: all).
    secure_sum : mapping of site to bool, optional
        Whether each site's policy answers ``secure_sum`` requests
        (:meth:`~multimodal_fl.config.SitePolicy.answers_kind`; default: all). A site that
        does not is excluded, the reason its policy's refusal.
    n_bins, n_boot, seed : int
    threshold : float or None
        For sensitivity and specificity (:func:`pooled_from_counts`).
    sites : sequence of dict
        Per-site entries as each site disclosed them.
    declared : mapping of str to sequence of str, optional
        The attributes whose levels the task fixes (:func:`histogram_parts`): every site lays
        out each of their levels, as a federated site does.

    Returns
    -------
    PooledEvaluation
        ``settings["source"]`` is ``"in process"``.
    """
    held, excluded, kept, left_out = _in_process_parts(
        tests, sensitive=sensitive, min_cell=min_cell, subgroups=subgroups,
        secure_sum=secure_sum, n_bins=n_bins, declared=declared)
    pooled_min = max([1, *(int(v) for v in min_cell.values())])
    if OVERALL not in kept:
        return refused_pooling(
            f"refused: pooled figures need at least {MIN_SITES} sites (fewer would let a site "
            f"subtract its own figures from them), {len(held)} took part",
            excluded=excluded, sites=sites, min_cell=pooled_min)
    contributors = {k: [s for s in sorted(held) if k in held[s]] for k in kept}
    total = {k: np.sum([held[s][k] for s in contributors[k]], axis=0) for k in kept}
    out = pooled_from_counts(total, min_cell=pooled_min, contributors=contributors,
                             excluded=excluded, left_out=left_out, sites=sites, n_boot=n_boot,
                             seed=seed, threshold=threshold)
    out.settings["source"] = "in process"
    return out


def _in_process_parts(
    tests: Mapping[str, pd.DataFrame], *, sensitive: Sequence[str], min_cell: Mapping[str, int],
    subgroups: Mapping[str, bool] | None, n_bins: int,
    secure_sum: Mapping[str, bool] | None = None,
    declared: Mapping[str, Sequence[str]] | None = None,
) -> tuple[dict[str, dict[str, npt.NDArray[np.int64]]], dict[str, str], frozenset[str],
           dict[str, str]]:
    """Each site's fine histograms, the sites left out and why, the parts summed and the parts
    not summed and why (:func:`pooled_in_process`'s rule, in one place)."""
    held: dict[str, dict[str, npt.NDArray[np.int64]]] = {}
    excluded: dict[str, str] = {}
    for site, test in sorted(tests.items()):
        m = int(min_cell[site])
        if secure_sum is not None and not secure_sum.get(site, True):
            excluded[site] = SitePolicy.refusal("secure_sum")
            continue
        if len(test) < m:
            excluded[site] = f"fewer than {m} test patients"
            continue
        cols = [c for c in sensitive if c in test.columns]
        groups = {c: test[c].to_numpy() for c in cols} if cols and (
            subgroups is None or subgroups.get(site, True)) else None
        held[site] = histogram_parts(test["label"].to_numpy(), test["score"].to_numpy(),
                                     groups=groups, n_bins=n_bins, min_cell=m,
                                     declared=declared)
    kept, left_out = complete_parts({s: frozenset(p) for s, p in held.items()})
    # the secure sum's rule, in this process's words: no secure sum is run here
    left_out = {k: v.replace("a secure sum needs", "pooling needs") for k, v in left_out.items()}
    return held, excluded, frozenset(kept), left_out


def pooled_sites_in_process(
    tests: Mapping[str, pd.DataFrame],
    *,
    sensitive: Sequence[str],
    min_cell: Mapping[str, int],
    subgroups: Mapping[str, bool] | None = None,
    secure_sum: Mapping[str, bool] | None = None,
    n_bins: int = DEFAULT_BINS,
    declared: Mapping[str, Sequence[str]] | None = None,
) -> list[str]:
    """The sites whose test histograms :func:`pooled_in_process` adds into its total.

    Decided by the same rule (the same call), before any site's document is written: each of
    these sites releases its document in the pooled form
    (:func:`~multimodal_fl.evaluation.disclosed.pooled_form`), as a federated site that joins
    the secure sum does, or the pooled total minus the other sites' released counts would give
    what one of them hides.

    Parameters
    ----------
    tests : mapping of site to DataFrame
    sensitive : sequence of str
    min_cell : mapping of site to int
    subgroups : mapping of site to bool, optional
    secure_sum : mapping of site to bool, optional
    n_bins : int
    declared : mapping of str to sequence of str, optional
        As for :func:`pooled_in_process`: a site whose policy does not answer ``secure_sum``
        is not among them, and releases its document in full.

    Returns
    -------
    list of str
        The contributors of any part summed, sorted; empty when nothing is pooled (fewer than
        three sites).
    """
    held, _, kept, _ = _in_process_parts(tests, sensitive=sensitive, min_cell=min_cell,
                                         subgroups=subgroups, secure_sum=secure_sum,
                                         n_bins=n_bins, declared=declared)
    return sorted(s for s, parts in held.items() if kept & parts.keys()) if OVERALL in kept \
        else []


def refused_pooling(reason: str, *, excluded: Mapping[str, str] | None = None,
                    sites: Sequence[Mapping[str, Any]] = (), split: str = "test",
                    min_cell: int = 0) -> PooledEvaluation:
    """The pooled document when there is no secure sum: every cell says why.

    Parameters
    ----------
    reason : str
        E.g. ``"refused: a secure sum needs at least 3 sites, 2 took part"``.
    excluded : mapping of site to reason, optional
    sites : sequence of dict
    split : str
    min_cell : int

    Returns
    -------
    PooledEvaluation
    """
    return PooledEvaluation({"reason": reason, "sites": [], "excluded": dict(excluded or {})},
                            {}, [dict(s) for s in sites],
                            {"split": split, "threshold": None, "min_cell": min_cell,
                             "source": "secure sum"})


# --------------------------------------------------------------------------------------------
# counts-only histograms: the validation histogram of an ``evaluate`` reply


def label_counts(
    y_true: npt.ArrayLike, y_score: npt.ArrayLike, *, n_bins: int = DEFAULT_BINS
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Fine-grid score counts of positives and negatives (site side; never sent as they are).

    Parameters
    ----------
    y_true, y_score : array-like
        Labels (0/1) and scores in ``[0, 1]``.
    n_bins : int
        Fine grid size.

    Returns
    -------
    pos, neg : ndarray of int64, shape (n_bins,)
    """
    y, s = check_binary_inputs(y_true, y_score, where="label_counts")
    return _fine_histogram(s[y == 1], n_bins)[0], _fine_histogram(s[y == 0], n_bins)[0]


def counts_histogram(counts: npt.ArrayLike, *, min_cell: int) -> dict[str, list[int]] | str:
    """One label's fine counts as they may leave a site: merged bins, counts only.

    Adjacent bins are merged as :func:`coarsen_counts` does, until every bin holds 0 or at
    least ``min_cell`` patients; no score sums travel (a reader spreads a bin's patients
    uniformly over it, :func:`counts_summary`).

    Parameters
    ----------
    counts : array-like of int, shape (n_bins,)
    min_cell : int

    Returns
    -------
    dict or str
        ``{"start", "stop", "count"}`` (empty lists when the label has no patient), or the
        reason it cannot leave (fewer than ``min_cell`` patients).
    """
    c = np.asarray(counts, dtype=np.int64)
    if int(c.sum()) == 0:
        return {"start": [], "stop": [], "count": []}
    h = coarsen_counts(c, np.zeros(c.size), min_cell=min_cell)
    if isinstance(h, str):
        return h
    return {"start": h.start, "stop": h.stop, "count": h.count}


def counts_summary(doc: Mapping[str, Any]) -> GroupSummary:
    """Server side: a counts-only histogram document as a cell :func:`pool_histograms` takes.

    Parameters
    ----------
    doc : mapping
        ``{"n_bins", "pos": {"start", "stop", "count"}, "neg": {...}}``.

    Returns
    -------
    GroupSummary
        Counts and both histograms, each bin's patients at its middle score (spread uniformly
        over the bin by :meth:`BinnedCounts.to_fine`); no metrics.

    Raises
    ------
    ValueError
        On a malformed document (see :meth:`BinnedCounts.from_dict`).
    """
    n_bins = int(doc["n_bins"])
    parts = {}
    for label in ("pos", "neg"):
        d = doc[label]
        start, stop, count = ([int(x) for x in d[k]] for k in ("start", "stop", "count"))
        mids = [k * (a + b) / (2 * n_bins) for a, b, k in zip(start, stop, count, strict=True)]
        parts[label] = BinnedCounts.from_dict({"n_bins": n_bins, "start": start, "stop": stop,
                                               "count": count, "score_sum": mids})
    n_pos, n_neg = parts["pos"].total, parts["neg"].total
    return GroupSummary(n_pos + n_neg, n_pos, {}, parts["pos"], parts["neg"])


def pooled_auc(docs: Mapping[str, Mapping[str, Any]]) -> tuple[float | None, str]:
    """The AUC of the sites' counts-only histograms pooled, or why there is none.

    Parameters
    ----------
    docs : mapping of site to histogram document
        As :func:`counts_summary` reads them.

    Returns
    -------
    auc : float or None
        The Mann-Whitney AUC on the pooled fine grid (:func:`histogram_auc`).
    why : str
        What the figure is pooled from, or why it is undefined.
    """
    if not docs:
        return None, "no site disclosed a histogram"
    pooled = pool_histograms([(s, counts_summary(d)) for s, d in sorted(docs.items())])
    if pooled.n_pos == 0 or pooled.n_neg == 0:
        return None, f"the pooled histograms of {', '.join(pooled.sites)} have one class only"
    auc = histogram_auc(pooled)[0]
    return auc, (f"{pooled.n_pos + pooled.n_neg} patients of {len(pooled.sites)} site(s) "
                 f"({', '.join(pooled.sites)})")
