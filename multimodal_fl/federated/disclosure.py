"""The egress gate: every reply passes the site's disclosure policy before it leaves the site.

A :class:`DisclosureGate` stands between a site's request handlers and the wire. The site's one
dispatch method (:meth:`multimodal_fl.federated.site.FusionSite.handle`) calls
:meth:`DisclosureGate.release` with the handler for the request's kind, so no handler can
forget the gate, on either engine. The gate:

1. refuses request kinds the hospital's :class:`~multimodal_fl.config.SitePolicy` does not
   answer, and a plain ``fit`` request where the policy requires secure aggregation;
2. writes the effective small-cell threshold into ``request.config["min_cell"]`` (the largest of
   the package floor, the site policy, the experiment config and the request: stricter, never
   looser), so every handler computes its aggregates with it;
3. runs the handler; a failure leaves the site as :class:`SiteRefused` (its message is made
   from counts and policy names only) or as a scrubbed :class:`SiteError` that names the
   exception type and nothing else (the traceback stays in the site's log);
4. applies the rule of the reply's kind (:data:`RULES`), then the backstops
   (:func:`check_declared`: only the fields :data:`DECLARED` for the kind, or
   :data:`SECURED_FIT` for a secured ``fit``, every count 0 or at least ``min_cell``;
   :func:`check_levels`: every level name of a sensitive attribute in a document, a cell's
   group, a disparity's groups or a secure sum's part, is ``"(other)"`` or held by at least
   ``min_cell`` of the site's test patients, by the site's own count where it has one), and
   records the released message in the site's egress log
   (``sites/<site>/egress.jsonl``). A reply that breaks a rule or a backstop never leaves:
   the site answers with a scrubbed :class:`SiteError`, or, where a rule or
   :func:`check_levels` withholds it, a :class:`SiteRefused` that names the paths only.

A ``fit`` request that carries the evaluation of the weights it sends
(:func:`~multimodal_fl.federated.protocol.carry_evaluation`) passes the gate as two requests
(:meth:`DisclosureGate.release_carried`): the evaluation first, under the ``evaluate`` rule and
declaration (or its refusal, whose words may cross), then the fit; the fit reply leaves with the
released evaluation under ``evaluate.`` and :func:`check_declared` checks the carried fields
against :data:`DECLARED` for ``evaluate``. Both are recorded in the egress log.

The rules, with ``m`` the effective threshold: a site with fewer than ``m`` training patients
declines ``info``, ``init``, ``moments`` and ``fit`` (its handler raises
:class:`SiteRefused` before training; the rule checks the count); ``fit`` leaves out a
modality group trained by fewer than ``m`` patients (count 0, its weights not sent);
``moments`` sends a feature seen in fewer than ``m`` patients as unseen, and a 0/1 feature with
fewer than ``m`` patients of either value (its ``sum`` counts them); ``pca`` carries at most
``floor(n / m)`` rows (:func:`pca_rank_cap`, capped by the handler, checked here) and nothing of
a column the ``moments`` rule would hide (left out by the site, checked by
:func:`check_withheld` against the site's own rows);
``pca_scores`` needs ``m`` patients; ``evaluate`` sends its metrics and its validation
histograms (counts only, bins of 0 or at least ``m``) only when the split and each class
count allow, else nothing; ``calibrate`` sends nothing at all (its validation counts stay at the
site for the secure sum).

The hospital's policy comes from ``policy.yaml`` in its site directory and, on Flower, from its
SuperNode's node config (:func:`site_policy`; the stricter of each field).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from multimodal_fl.config import POLICY_FILE, ConfigError, SitePolicy, load_policy
from multimodal_fl.evaluation.histograms import UNNAMED, counts_histogram, declared_layout
from multimodal_fl.federated.aggregation import group_of
from multimodal_fl.federated.pca import SUMMARY_KEYS
from multimodal_fl.federated.protocol import (
    Doc,
    Kind,
    Reply,
    Request,
    SiteError,
    SiteRefused,
    attach_evaluation,
    detach_evaluation,
    pack_document,
    unpack_document,
)
from multimodal_fl.federated.secure_update import (
    DELTA_PREFIX,
    SECURED_FIT_METRICS,
    WEIGHT_PREFIX,
)
from multimodal_fl.moments import withheld_columns

__all__ = [
    "COUNT_KEYS",
    "COUNT_MAPS",
    "DECLARED",
    "EGRESS_LOG",
    "NODE_POLICY_FILE",
    "NODE_POLICY_KEYS",
    "RULES",
    "SECURED_FIT",
    "VALIDATION_COUNTS",
    "Census",
    "Declared",
    "DisclosureGate",
    "DisclosureViolation",
    "Released",
    "SiteError",
    "SiteRefused",
    "check_declared",
    "check_levels",
    "check_withheld",
    "node_policy",
    "pca_rank_cap",
    "secured_fit",
    "site_policy",
    "small_cells",
    "stricter_policy",
]

log = logging.getLogger(__name__)

#: The egress log's file name inside the site's folder.
EGRESS_LOG = "egress.jsonl"


@dataclass
class Released:
    """What a rule lets leave: the reply and what it suppressed.

    Parameters
    ----------
    reply : Reply
        The reply as it leaves the site.
    suppressed : list of str
        One entry per suppressed figure or group, in words (for the egress log).
    """

    reply: Reply
    suppressed: list[str] = field(default_factory=list)


#: A kind's rule: (reply, effective min_cell, policy) -> what leaves.
Rule = Callable[[Reply, int, SitePolicy], Released]


class DisclosureViolation(ValueError):
    """A reply breaks its kind's rule or declaration; it does not leave the site."""


def _pass(reply: Reply, min_cell: int, policy: SitePolicy) -> Released:
    return Released(reply)


def _training_count(reply: Reply, min_cell: int) -> None:
    """A training count below ``min_cell`` never leaves: the handler should have refused."""
    if reply.n_samples < min_cell:
        raise DisclosureViolation(
            f"{reply.kind} reply counts {reply.n_samples} training patients, fewer than "
            f"min_cell={min_cell}; the site should have refused")


def _training_rule(reply: Reply, min_cell: int, policy: SitePolicy) -> Released:
    """``info`` and ``init``: the training count is at least ``min_cell``."""
    _training_count(reply, min_cell)
    return Released(reply)


def _fit_rule(reply: Reply, min_cell: int, policy: SitePolicy) -> Released:
    """``fit``: a modality group trained by fewer than ``min_cell`` patients is left out.

    Its count becomes 0 and its weights are not sent (the server keeps the global value).
    """
    _training_count(reply, min_cell)
    counts = dict(reply.group_counts)
    small = sorted(g for g, c in counts.items() if 0 < c < min_cell)
    if not small:
        return Released(reply)
    suppressed = [f"group {g!r}: {counts[g]} patients < min_cell {min_cell}: left out of the "
                  "update" for g in small]
    counts.update(dict.fromkeys(small, 0))
    weights = {k: v for k, v in reply.weights.items() if group_of(k, counts) not in small}
    return Released(replace(reply, group_counts=counts, weights=weights), suppressed)


def _moments_rule(reply: Reply, min_cell: int, policy: SitePolicy) -> Released:
    """``moments``: a feature of fewer than ``min_cell`` patients is sent as unseen.

    Unseen (``n = sum = sumsq = 0``): a feature seen in fewer than ``min_cell`` patients, and a
    0/1 feature (:func:`~multimodal_fl.moments.count_like`, recognised from the reply) whose
    count of ones or of zeros lies in ``(0, min_cell)``: its ``sum`` is that count
    (:func:`~multimodal_fl.moments.withheld_columns`).
    """
    _training_count(reply, min_cell)
    n, s, ss = (np.asarray(reply.arrays[k]) for k in ("n", "sum", "sumsq"))
    withheld = withheld_columns(n, s, ss, min_cell)
    if not withheld.any():
        return Released(reply)
    arrays = dict(reply.arrays)
    for key in ("n", "sum", "sumsq"):
        arrays[key] = np.where(withheld, np.zeros((), arrays[key].dtype), arrays[key])
    rare = (n > 0) & (n < min_cell)
    lines = []
    if rare.any():
        lines.append(f"features {np.flatnonzero(rare).tolist()}: seen in fewer than {min_cell} "
                     "patients: sent as unseen (n=0, sum=0, sumsq=0)")
    if (withheld & ~rare).any():
        lines.append(f"features {np.flatnonzero(withheld & ~rare).tolist()}: 0/1 with fewer "
                     f"than {min_cell} patients of a value: sent as unseen (n=0, sum=0, "
                     "sumsq=0)")
    return Released(replace(reply, arrays=arrays), lines)


def pca_rank_cap(n: int, min_cell: int) -> int:
    """The most ``S·Vᵀ`` rows a site of ``n`` patients may send: ``floor(n / min_cell)``.

    Parameters
    ----------
    n : int
        Patients the summary is computed from.
    min_cell : int
        The effective small-cell threshold.

    Returns
    -------
    int
        0: the site sends no PCA summary at all (nor its mean).
    """
    return int(n) // int(min_cell)


def _pca_rule(reply: Reply, min_cell: int, policy: SitePolicy) -> Released:
    """``pca``: the mean only on ``n >= min_cell``; at most ``floor(n / min_cell)`` rows."""
    n = int(np.asarray(reply.arrays["n"]))
    if n != reply.n_samples:
        raise DisclosureViolation(f"pca reply: n={n} but n_samples={reply.n_samples}")
    cap = pca_rank_cap(n, min_cell)
    rows = int(np.asarray(reply.arrays["block"]).shape[0])
    if cap == 0 or rows > cap:
        raise DisclosureViolation(
            f"pca reply of {n} patients sends {rows} rows; at most floor(n / min_cell) = {cap} "
            f"may leave (min_cell={min_cell})")
    return Released(reply)


def check_withheld(released: Released, withheld: np.ndarray | None) -> Released:
    """The backstop of ``pca`` replies: the columns the site withholds carry nothing.

    A column the site's ``moments`` reply would send as unseen
    (:func:`~multimodal_fl.moments.withheld_columns` of its rows, before standardisation: a
    0/1 column's PCA mean times ``n`` is its count) must be exactly 0 in the reply's ``mean``
    and in every row of its ``block``, as the site's builder leaves it
    (:func:`~multimodal_fl.pca.site.site_matrix`).

    Parameters
    ----------
    released : Released
        A ``pca`` reply as its rule lets it leave.
    withheld : numpy.ndarray of bool or None
        Per column of the summarised rows, whether the site withholds it (the site's own
        computation; ``None``: not known, nothing checked).

    Returns
    -------
    Released
        ``released`` with a suppression line naming the withheld columns, if any.

    Raises
    ------
    DisclosureViolation
        A withheld column shows in the mean or the block.
    """
    if withheld is None or not np.asarray(withheld).any():
        return released
    cols = np.asarray(withheld, dtype=bool).reshape(-1)
    mean = np.asarray(released.reply.arrays["mean"]).reshape(-1)
    block = np.atleast_2d(np.asarray(released.reply.arrays["block"]))
    if mean.shape != cols.shape or block.shape[1] != cols.size:
        raise DisclosureViolation(f"pca reply of {mean.size} features; the site withholds "
                                  f"columns of {cols.size}")
    shown = np.flatnonzero(cols & ((mean != 0) | (block != 0).any(axis=0))).tolist()
    if shown:
        raise DisclosureViolation(f"pca reply shows features {shown}, which the site withholds "
                                  "(fewer than min_cell patients of a value)")
    return replace(released, suppressed=[
        *released.suppressed, f"features {np.flatnonzero(cols).tolist()}: fewer than min_cell "
        "patients of a value (or seen): left out of the PCA summary (0 in mean and block)"])


def _count_rule(reply: Reply, min_cell: int, policy: SitePolicy) -> Released:
    """``pca_scores``: computed from at least ``min_cell`` patients."""
    if reply.n_samples < min_cell:
        raise DisclosureViolation(
            f"{reply.kind} reply summarises {reply.n_samples} patients, fewer than "
            f"min_cell={min_cell}; the site should have refused")
    return Released(reply)


#: The arrays of an ``evaluate`` reply that stay at the site: the validation scores' counts
#: per label on the fine grid, which the rule coarsens into the :attr:`Doc.VALIDATION` document.
VALIDATION_COUNTS = ("val_pos_counts", "val_neg_counts")


def _evaluate_rule(reply: Reply, min_cell: int, policy: SitePolicy) -> Released:
    """``evaluate``: metrics and histograms of at least ``min_cell`` patients, or nothing.

    Both labels must hold 0 or at least ``min_cell`` patients (a count of positives is a
    count); the histograms leave with bins merged until each holds 0 or ``min_cell``.
    """
    missing = [k for k in VALIDATION_COUNTS if k not in reply.arrays]
    if missing:
        raise DisclosureViolation(f"evaluate reply lacks {missing}")
    pos, neg = (np.asarray(reply.arrays[k], dtype=np.int64) for k in VALIDATION_COUNTS)
    n, n_pos, n_neg = reply.n_samples, int(pos.sum()), int(neg.sum())
    if n != n_pos + n_neg:
        raise DisclosureViolation(f"evaluate reply: n_samples={n}, histograms hold "
                                  f"{n_pos + n_neg}")
    why = [f"{what}: {k} < min_cell {min_cell}" for what, k in
           (("patients", n), ("positives", n_pos), ("negatives", n_neg))
           if 0 < k < min_cell or (what == "patients" and k < min_cell)]
    if why:
        quiet = replace(reply, n_samples=0, metrics={}, arrays={}, documents={})
        return Released(quiet, ["validation metrics and histograms: " + "; ".join(why)])
    hp = counts_histogram(pos, min_cell=min_cell)
    hn = counts_histogram(neg, min_cell=min_cell)
    if isinstance(hp, str) or isinstance(hn, str):  # unreachable after the checks above
        raise DisclosureViolation(f"evaluate reply: histogram cannot leave ({hp}, {hn})")
    doc = {"n_bins": int(pos.size), "pos": hp, "neg": hn}
    return Released(replace(reply, arrays={},
                            documents={**reply.documents, Doc.VALIDATION: pack_document(doc)}))


#: Document keys whose integer values count patients (``n_boot``, ``n_bins``... do not).
COUNT_KEYS = frozenset({"n", "n_pos", "n_neg", "n_patients", "n_positive", "n_test", "count",
                        "dropped", "image_errors"})
#: Document keys whose values are mappings of counts (``{"image": 58, ...}``).
COUNT_MAPS = frozenset({"modality_counts"})


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def small_cells(doc: Any, min_cell: int, path: str = "") -> list[str]:
    """Where a document counts patients in ``(0, min_cell)``: one path per such count.

    Parameters
    ----------
    doc : Any
        An unpacked JSON document.
    min_cell : int
    path : str
        The document's own path (prefixes the result).

    Returns
    -------
    list of str
        Paths such as ``"site_metrics/metrics/val/auc/n"`` (names only, no number).
    """
    found: list[str] = []
    if isinstance(doc, dict):
        for key, value in doc.items():
            where = f"{path}/{key}"
            if key in COUNT_KEYS and _count(value) and 0 < value < min_cell:
                found.append(where)
            elif key in COUNT_MAPS and isinstance(value, dict):
                found += [f"{where}/{k}" for k, v in value.items()
                          if _count(v) and 0 < v < min_cell]
            else:
                found += small_cells(value, min_cell, where)
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            found += small_cells(value, min_cell, f"{path}/{i}")
    return found


def _predict_rule(reply: Reply, min_cell: int, policy: SitePolicy) -> Released:
    """The backstop of ``predict`` replies: no count, and no figure, on fewer than min_cell.

    Walks every document for patient counts in ``(0, min_cell)`` and checks that every per-split
    number in ``metrics`` (``"<split>/<metric>[/lo|/hi]"``) belongs to a split whose
    ``site_metrics`` document shows at least ``min_cell`` patients; any breach withholds the
    whole reply (the handler should have suppressed it: this only catches a forgotten path).
    """
    breaches: list[str] = []
    docs: dict[str, Any] = {}
    for name, text in reply.documents.items():
        docs[name] = unpack_document(text)
        breaches += small_cells(docs[name], min_cell, name)
    splits = (docs.get(Doc.SITE_METRICS) or {}).get("metrics") or {}
    for key in reply.metrics:
        split, _, rest = key.partition("/")
        n = ((splits.get(split) or {}).get(rest.split("/")[0]) or {}).get("n")
        if not (isinstance(n, int) and n >= min_cell):
            breaches.append(f"metrics/{key}")
    if breaches:
        raise SiteRefused(f"site {reply.site}: predict reply withheld: a figure on fewer than "
                          f"{min_cell} patients at {', '.join(sorted(breaches)[:5])}")
    return Released(reply, _disclosed_suppressions(docs.get(Doc.DISCLOSED)))


def _disclosed_suppressions(doc: Any) -> list[str]:
    """The cells a site's report document shows without a figure, suppressed by its builder
    (``evaluation.disclosed``) at the site: one entry per cell (the site, a subgroup), the
    reason of its first suppressed metric, for the egress log."""
    seen: dict[str, str] = {}
    cells = doc.get("cells") if isinstance(doc, dict) else None
    for cell in cells if isinstance(cells, list) else []:
        if not (isinstance(cell, dict) and cell.get("suppressed") and cell.get("reason")):
            continue
        name = ("overall" if cell.get("attribute") is None
                else f"{cell.get('attribute')}={cell.get('group')}")
        seen.setdefault(name, str(cell["reason"]))
    return [f"{name}: {reason}" for name, reason in sorted(seen.items())]


#: The rule applied to each kind's reply before it leaves the site (then :func:`check_declared`).
RULES: dict[Kind, Rule] = {kind: _pass for kind in Kind}
RULES.update({
    Kind.INFO: _training_rule,
    Kind.INIT: _training_rule,
    Kind.FIT: _fit_rule,
    Kind.MOMENTS: _moments_rule,
    Kind.PCA: _pca_rule,
    Kind.PCA_SCORES: _count_rule,
    Kind.EVALUATE: _evaluate_rule,
    Kind.PREDICT: _predict_rule,
})


@dataclass(frozen=True)
class Declared:
    """What one kind's reply may carry as it leaves a site (anything else is an error).

    Parameters
    ----------
    n_samples : bool
        Whether ``n_samples`` is sent (a count: 0 or at least ``min_cell``); else it is 0.
    weights : bool
        Model weights (``weights``; ``group_counts`` and ``local_keys`` go with them).
    local_keys : bool
        ``local_keys`` (FedBN's names of the layers kept at the site) without weights.
    metrics : str
        A regular expression every metric name must match in full ("" : no metrics).
    arrays : frozenset of str
        The array names allowed.
    array_pattern : str
        A regular expression for further array names ("" : none), for kinds whose array names
        carry another site's name (the secure sum's encrypted shares).
    documents : frozenset of str
        The document names allowed (:class:`~multimodal_fl.federated.protocol.Doc` values).
    """

    n_samples: bool = False
    weights: bool = False
    local_keys: bool = False
    metrics: str = ""
    arrays: frozenset[str] = frozenset()
    array_pattern: str = ""
    documents: frozenset[str] = frozenset()


_SPLIT_METRIC = r"(train|val|test)/[a-z_]+(/lo|/hi)?"

#: Every field each kind's reply may carry as it leaves a site: the protocol's declaration
#: in one table. A kind not listed answers nothing that may leave.
DECLARED: dict[Kind, Declared] = {
    Kind.INFO: Declared(n_samples=True),
    Kind.INIT: Declared(n_samples=True, weights=True,
                        documents=frozenset({Doc.STANDARDIZER})),
    Kind.MOMENTS: Declared(n_samples=True, arrays=frozenset({"n", "sum", "sumsq"}),
                           documents=frozenset({Doc.STANDARDIZER})),
    Kind.PCA: Declared(n_samples=True, arrays=frozenset(SUMMARY_KEYS)),
    Kind.PCA_APPLY: Declared(),
    Kind.PCA_SCORES: Declared(n_samples=True, documents=frozenset({Doc.PCA_SCORES})),
    # the training loss; under DP-SGD the site's epsilon spent so far and its delta
    Kind.FIT: Declared(n_samples=True, weights=True, metrics="loss|epsilon|delta"),
    Kind.EVALUATE: Declared(n_samples=True, metrics=r"val_(auc|average_precision|brier|ece)",
                            documents=frozenset({Doc.VALIDATION})),
    # the validation counts stay at the site for the secure sum: nothing in the reply
    Kind.CALIBRATE: Declared(),
    Kind.PREDICT: Declared(n_samples=True, metrics=_SPLIT_METRIC,
                           documents=frozenset({Doc.EVALUATION, Doc.SITE_METRICS,
                                                Doc.DISCLOSED})),
    Kind.LOCAL_TRAIN: Declared(n_samples=True, weights=True,
                               documents=frozenset({Doc.LOCAL_TRAINING})),
    Kind.CROSS_EVALUATE: Declared(n_samples=True, metrics=r"[a-z_]+(/lo|/hi)?",
                                  documents=frozenset({Doc.CROSS_SITE})),
    # keys, encrypted shares, the masked vector (uniform on its own), the unmasking shares
    Kind.SECURE_SUM: Declared(arrays=frozenset({"enc", "mask", "y"}),
                              array_pattern=r"(to|seed|key)/[^/]+",
                              documents=frozenset({Doc.SECURE_SUM})),
}

#: A secured ``fit`` reply (the request has ``secure_aggregation``): the training count, FedBN's
#: local key names and, under DP-SGD, the site's epsilon so far and its delta (per-site privacy
#: parameters, in the clear); the update, the group counts and the loss wait at the site for
#: the secure sum, so a weight or the loss in the reply is undeclared.
SECURED_FIT = Declared(n_samples=True, local_keys=True, metrics="|".join(SECURED_FIT_METRICS))


def _declaration(kind: Kind, secured: bool) -> Declared | None:
    return SECURED_FIT if secured and kind is Kind.FIT else DECLARED.get(kind)


def secured_fit(request: Request) -> bool:
    """Whether ``request`` is a ``fit`` of a secured round (its reply: :data:`SECURED_FIT`).

    Parameters
    ----------
    request : Request

    Returns
    -------
    bool
    """
    return request.kind is Kind.FIT and bool(request.config.get("secure_aggregation"))


def check_declared(kind: Kind, reply: Reply, min_cell: int, *, secured: bool = False) -> None:
    """The backstop after every rule: the reply carries only fields declared for its kind.

    Parameters
    ----------
    kind : Kind
        The request's kind.
    reply : Reply
        The reply as it would leave.
    min_cell : int
        The effective threshold (``n_samples`` and each group count: 0 or at least it).
    secured : bool
        A secured ``fit`` (:func:`secured_fit`): checked against :data:`SECURED_FIT`.

    Raises
    ------
    DisclosureViolation
        Naming the first undeclared field.
    """
    if kind is Kind.FIT:  # the evaluation it may carry: the evaluate declaration for those fields
        reply, carried = detach_evaluation(reply, reply.round)
        if isinstance(carried, Reply):
            check_declared(Kind.EVALUATE, carried, min_cell)
    declared = _declaration(kind, secured)
    if declared is None:
        raise DisclosureViolation(f"no reply fields are declared for {kind.value!r} replies")
    if reply.kind != kind:
        raise DisclosureViolation(f"a {kind.value!r} request got a {reply.kind!r} reply")
    n = reply.n_samples
    if (n and not declared.n_samples) or 0 < n < min_cell:
        raise DisclosureViolation(f"{kind.value} reply: n_samples={n} (declared: "
                                  f"{'0 or >= min_cell' if declared.n_samples else '0'})")
    if not declared.weights and (reply.weights or reply.group_counts
                                 or (reply.local_keys and not declared.local_keys)):
        raise DisclosureViolation(f"{kind.value} reply carries weights; none are declared"
                                  + (" in a secured round" if secured else ""))
    small = {g: c for g, c in reply.group_counts.items() if 0 < c < min_cell}
    if small:
        raise DisclosureViolation(f"{kind.value} reply: group counts {sorted(small)} below "
                                  f"min_cell={min_cell}")
    pattern = re.compile(declared.metrics) if declared.metrics else None
    bad = [k for k in reply.metrics if pattern is None or not pattern.fullmatch(k)]
    named = re.compile(declared.array_pattern) if declared.array_pattern else None
    arrays = [k for k in reply.arrays
              if k not in declared.arrays and (named is None or not named.fullmatch(k))]
    extra = [("metrics", bad), ("arrays", sorted(arrays)),
             ("documents", sorted(set(reply.documents) - declared.documents))]
    for field_name, names in extra:
        if names:
            raise DisclosureViolation(f"{kind.value} reply carries undeclared {field_name} "
                                      f"{sorted(names)}")


#: What a site knows of its own levels: ``{attribute: {level: patients of its test split}}``
#: (:func:`~multimodal_fl.evaluation.histograms.level_census`); it never leaves the site.
Census = Mapping[str, Mapping[str, int]]


def _named(doc: Any, path: str) -> Iterator[tuple[str, str, str, Any]]:
    """Every level name in a document: ``(path, attribute, level, count beside it)``.

    The shapes that name levels: a cell (``attribute`` and ``group``, its ``n`` beside it), a
    disparity (``attribute`` with ``groups_used`` / ``groups_suppressed``, no count) and a
    ``subgroups`` mapping (``{attribute: {level: cell}}``, the cell's ``n``). The paths hold
    indices, never the level itself, so a refusal naming them says nothing of the levels.
    """
    if isinstance(doc, dict):
        attribute = doc.get("attribute")
        if isinstance(attribute, str):
            if isinstance(doc.get("group"), str):
                yield f"{path}/group", attribute, doc["group"], doc.get("n")
            for key in ("groups_used", "groups_suppressed"):
                for i, level in enumerate(doc.get(key) or []):
                    yield f"{path}/{key}/{i}", attribute, str(level), None
        subgroups = doc.get("subgroups")
        if isinstance(subgroups, dict):
            for a, levels in subgroups.items():
                for i, (level, cell) in enumerate(sorted((levels or {}).items())):
                    n = cell.get("n") if isinstance(cell, dict) else None
                    yield f"{path}/subgroups/{a}/{i}", str(a), str(level), n
        for key, value in doc.items():
            if key != "subgroups":
                yield from _named(value, f"{path}/{key}")
            elif isinstance(value, dict):
                for a, levels in value.items():
                    for i, (_, cell) in enumerate(sorted((levels or {}).items())):
                        yield from _named(cell, f"{path}/subgroups/{a}/{i}")
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield from _named(value, f"{path}/{i}")


def _part_levels(doc: Any, path: str) -> Iterator[tuple[str, str, str, Any]]:
    """The level names of a secure sum's parts (``"<attribute>=<level>"``) at ``advertise``.

    A model update's parts (``d/<key>``, ``w/<key>``, ``n``...) name no level.
    """
    parts = doc.get("parts") if isinstance(doc, dict) else None
    for i, part in enumerate(parts or []):
        name = str(part)
        if "=" in name and not name.startswith((DELTA_PREFIX, WEIGHT_PREFIX)):
            attribute, _, level = name.partition("=")
            yield f"{path}/parts/{i}", attribute, level, None


def _secure_sum_layout(doc: Any, path: str, declared: Mapping[str, Sequence[str]]
                       ) -> tuple[set[tuple[str, str]], list[str]]:
    """The declared levels a secure sum's layout may name, and where it breaks the layout.

    An attribute whose levels the task fixes is laid out with every name of
    :func:`~multimodal_fl.evaluation.histograms.declared_layout` at every site, so its names
    say nothing of the site's patients; a layout naming only some of them would say which the
    site holds, and is withheld.
    """
    names = [str(p) for p in (doc.get("parts") or [])] if isinstance(doc, dict) else []
    allowed: set[tuple[str, str]] = set()
    broken: list[str] = []
    for attribute, levels in declared.items():
        full = set(declared_layout(levels))
        held = {n.partition("=")[2] for n in names if n.partition("=")[0] == attribute
                and "=" in n and not n.startswith((DELTA_PREFIX, WEIGHT_PREFIX))}
        if held and held != full:
            broken.append(f"{path}/parts (attribute {sorted(declared).index(attribute)} of "
                          "the declared ones: not its whole layout)")
        allowed |= {(attribute, level) for level in full}
    return allowed, broken


def check_levels(reply: Reply, min_cell: int, *, census: Census | None = None,
                 declared: Mapping[str, Sequence[str]] | None = None) -> None:
    """The backstop of level names: no reply names a level held by fewer than ``min_cell``.

    A level of a sensitive attribute may leave a site only when its test split holds at least
    ``min_cell`` patients with it, every other level as :data:`~multimodal_fl.evaluation.
    histograms.UNNAMED` (the builders' rule, :func:`~multimodal_fl.evaluation.histograms.
    named_levels`). Checked here on every reply, whatever built it: every level name in a
    document (a cell's ``group``, a disparity's ``groups_used`` and ``groups_suppressed``, a
    ``subgroups`` key, a secure sum's part ``"<attribute>=<level>"``) must be
    :data:`~multimodal_fl.evaluation.histograms.UNNAMED` or backed by ``min_cell`` patients:
    by the site's own ``census`` where it counts the attribute (the gate runs at the site:
    names leave without a count beside them in the pooled form, in a complementary-suppressed
    cell, in a disparity's groups and in a secure sum's layout), else by the count the reply
    shows beside the name.

    Parameters
    ----------
    reply : Reply
        The reply as it would leave.
    min_cell : int
        The effective threshold.
    census : Census or None
        The site's level counts of its test split (``None``: only the reply's own counts).
    declared : mapping of str to sequence of str, optional
        The attributes whose levels the task fixes
        (:func:`~multimodal_fl.data.tasks.declared_levels`): in a secure sum's layout their
        names need no count, when the layout names every one of them
        (:func:`~multimodal_fl.evaluation.histograms.declared_layout`, the same at every
        site); a layout naming only some is withheld. Elsewhere they follow the census.

    Raises
    ------
    SiteRefused
        The reply is withheld; the message names the documents' paths (indices, no level).
    """
    found: list[str] = []
    for name, text in reply.documents.items():
        doc = unpack_document(text)
        levels = list(_named(doc, str(name)))
        laid_out: set[tuple[str, str]] = set()
        if name == Doc.SECURE_SUM:
            laid_out, broken = _secure_sum_layout(doc, str(name), declared or {})
            found += broken
            levels += [lv for lv in _part_levels(doc, str(name))
                       if (lv[1], lv[2]) not in laid_out]
        for where, attribute, level, shown in levels:
            known = (census or {}).get(attribute)
            held = shown if known is None else known.get(level, 0)
            if level != UNNAMED and not (_count(held) and held >= min_cell):
                found.append(where)
    if found:
        raise SiteRefused(f"site {reply.site}: {Kind(reply.kind).value} reply withheld: a level "
                          f"named without {min_cell} test patients of it at the site, at "
                          f"{', '.join(sorted(found)[:5])}")


#: A SuperNode's node-config keys of a site policy (``--node-config "min-cell=10 ..."``), and the
#: :class:`~multimodal_fl.config.SitePolicy` field each sets.
NODE_POLICY_KEYS: dict[str, str] = {
    "min-cell": "min_cell",
    "subgroup-summaries": "subgroup_summaries",
    "share-local-model": "share_local_model",
    "answers": "answers",
    "secure-aggregation": "secure_aggregation",
    "max-epsilon": "max_epsilon",
    "dp-delta": "dp_delta",
    "state-dir": "state_dir",
}
#: The node-config key naming a policy file on the SuperNode's machine.
NODE_POLICY_FILE = "policy-file"


def _node_value(key: str, value: Any) -> Any:
    """A node-config value as the policy field wants it (node configs hold scalars only)."""
    if key == "answers":
        items = value if isinstance(value, list | tuple) else str(value).replace(",", " ").split()
        return [str(v) for v in items]
    if key in ("subgroup-summaries", "share-local-model", "secure-aggregation") and \
            isinstance(value, str):
        lowered = value.strip().lower()
        if lowered not in ("true", "false"):
            raise ConfigError(f"node config {key}={value!r}: expected true or false")
        return lowered == "true"
    if key == "state-dir":  # relative to the SuperNode's working directory
        return str(Path(str(value)).expanduser().resolve())
    return value


def node_policy(node_config: Mapping[str, Any]) -> SitePolicy | None:
    """The policy a SuperNode's node config sets (``min-cell``, ..., or ``policy-file``).

    Parameters
    ----------
    node_config : mapping
        The node config (other keys, e.g. ``site-dir``, are ignored).

    Returns
    -------
    SitePolicy or None
        ``None`` when it sets none. With both a ``policy-file`` and keys, the stricter of
        each (:func:`stricter_policy`).

    Raises
    ------
    ConfigError
        For a missing policy file or a bad value (one line naming the key).
    """
    keys = {k: v for k, v in node_config.items() if k in NODE_POLICY_KEYS}
    policies: list[SitePolicy] = []
    if NODE_POLICY_FILE in node_config:
        path = Path(str(node_config[NODE_POLICY_FILE])).expanduser()
        if not path.is_file():
            raise ConfigError(f"node config {NODE_POLICY_FILE}={str(path)!r}: no such file; "
                              "expected a policy YAML (docs/data-contract.md)")
        policies.append(load_policy(path))
    if keys:
        fields = {NODE_POLICY_KEYS[k]: _node_value(k, v) for k, v in keys.items()}
        try:
            policies.append(SitePolicy.model_validate(fields))
        except ValidationError as exc:
            err = exc.errors()[0]
            key = next((k for k, f in NODE_POLICY_KEYS.items() if f == err["loc"][0]),
                       str(err["loc"][0]))
            raise ConfigError(f"node config {key}={keys.get(key)!r}: {err['msg']}") from None
    if not policies:
        return None
    out = policies[0]
    for other in policies[1:]:
        out = stricter_policy(out, other)
    return out


def stricter_policy(a: SitePolicy, b: SitePolicy) -> SitePolicy:
    """The stricter of two policies, field by field.

    The larger ``min_cell``; subgroup summaries and local-model sharing only if both allow
    them; the request kinds both answer; secure aggregation required if either requires it;
    the smaller privacy budget ``max_epsilon`` and the smaller ``dp_delta`` (either where only
    one sets it). ``timezone`` is not a matter of strictness: ``a``'s, else ``b``'s; nor is
    ``state_dir``: the one either sets (two different ones are an error).

    Parameters
    ----------
    a, b : SitePolicy

    Returns
    -------
    SitePolicy

    Raises
    ------
    ConfigError
        When both set a ``state_dir`` and they differ.
    """
    if a.answers is None or b.answers is None:
        answers = a.answers if b.answers is None else b.answers
    else:
        answers = [k for k in a.answers if k in b.answers]
    if a.state_dir is not None and b.state_dir is not None and \
            Path(a.state_dir) != Path(b.state_dir):
        raise ConfigError(f"two state_dir values for one site ({a.state_dir} and "
                          f"{b.state_dir}): a site keeps one state across runs; set it once")
    return SitePolicy(min_cell=max(a.min_cell, b.min_cell),
                      subgroup_summaries=a.subgroup_summaries and b.subgroup_summaries,
                      share_local_model=a.share_local_model and b.share_local_model,
                      answers=answers, timezone=a.timezone or b.timezone,
                      secure_aggregation=a.secure_aggregation or b.secure_aggregation,
                      max_epsilon=_smaller(a.max_epsilon, b.max_epsilon),
                      dp_delta=_smaller(a.dp_delta, b.dp_delta),
                      state_dir=a.state_dir or b.state_dir)


def _smaller(a: float | None, b: float | None) -> float | None:
    """The smaller of two optional limits (``None``: no limit)."""
    return b if a is None else a if b is None else min(a, b)


def site_policy(site_dir: str | Path, node_config: Mapping[str, Any] | None = None
                ) -> tuple[SitePolicy, dict[str, str]]:
    """A site's policy: ``policy.yaml`` in its directory and, on Flower, its node config.

    Where both set a field, the stricter value holds (:func:`stricter_policy`): a hospital's
    SuperNode operator and its data steward can each tighten the policy, neither loosen it.

    Parameters
    ----------
    site_dir : path-like
        The site directory (``policy.yaml`` is optional).
    node_config : mapping or None
        The SuperNode's node config.

    Returns
    -------
    policy : SitePolicy
    origin : dict of str to str
        Per policy field, where its value came from (``"default"``, ``"<site>/policy.yaml"``,
        ``"node config"``, or both).

    Raises
    ------
    ConfigError
        For a bad ``policy.yaml`` or node config (one line).
    """
    file = Path(site_dir) / POLICY_FILE
    sources: list[tuple[str, SitePolicy]] = []
    if file.is_file():
        sources.append((str(file), load_policy(site_dir)))
    node = node_policy(node_config or {})
    if node is not None:
        sources.append(("node config", node))
    policy = SitePolicy()
    for _, p in sources:
        policy = stricter_policy(policy, p)
    origin = {}
    for name in SitePolicy.model_fields:
        setters = [where for where, p in sources if name in p.model_fields_set]
        origin[name] = " and ".join(setters) + (" (the stricter)" if len(setters) > 1 else "") \
            if setters else "default"
    return policy, origin


def _withhold_local_model(reply: Reply, min_cell: int, policy: SitePolicy) -> Released:
    """``local_train``: the local-only model's weights leave only where the policy shares it,
    and never under a privacy budget (the local-only model is not trained with DP-SGD)."""
    if not reply.weights or (policy.share_local_model and policy.max_epsilon is None):
        return Released(reply)
    why = ("share_local_model: false" if not policy.share_local_model else
           f"max_epsilon={policy.max_epsilon:g}: it is not trained with DP-SGD")
    return Released(replace(reply, weights={}), [f"local-only model withheld by policy ({why})"])


def _cross_cell(reply: Reply, min_cell: int, policy: SitePolicy) -> Released:
    """``cross_evaluate``: one matrix cell; no weights, no figure on fewer than ``min_cell``."""
    suppressed: list[str] = []
    if reply.weights:
        reply = replace(reply, weights={})
        suppressed.append("weights (no part of a cross_evaluate reply)")
    if reply.metrics and reply.n_samples < min_cell:
        reply = replace(reply, n_samples=0, metrics={})
        suppressed.append(f"cell figures on fewer than {min_cell} patients")
    if Doc.CROSS_SITE in reply.documents:
        cell = unpack_document(reply.documents[Doc.CROSS_SITE])
        if cell.get("suppressed"):
            suppressed.append(f"cell {cell.get('model')} on {cell.get('test_site')}: "
                              f"{cell.get('reason')}")
    return Released(reply, suppressed)


RULES.update({Kind.LOCAL_TRAIN: _withhold_local_model, Kind.CROSS_EVALUATE: _cross_cell})


def _size(reply: Reply) -> int:
    """Bytes of numbers and documents the reply carries (weights and arrays at their size)."""
    arrays = sum(int(a.nbytes) for a in (*reply.weights.values(), *reply.arrays.values()))
    return arrays + 8 * (len(reply.metrics) + len(reply.group_counts) + 1) + sum(
        len(d) for d in reply.documents.values())


class DisclosureGate:
    """The one egress path of a site (see the module docstring).

    Parameters
    ----------
    site : str
        The site's name.
    policy : SitePolicy
        The hospital's policy.
    config_min_cell : int or None
        The experiment config's ``evaluation.min_cell``.
    egress_log : path-like or None
        The site's egress log file (``None``: nothing is written).
    rules : mapping of Kind to rule, optional
        The rule per kind (default :data:`RULES`).
    on_record : callable or None
        Also called with every egress-log entry (a dict), e.g. by ``mmfl site check``.
    run : mapping or None
        Which run the site answers (``dir``: the run directory; ``flower_run_id`` on Flower),
        written into every egress-log entry: one log may hold the lines of many runs.
    census : callable or None
        Returns what the site knows of its levels (:data:`Census`: the test split's patients
        per level of each attribute) when a reply is checked by :func:`check_levels`;
        ``None``: level names are backed only by the counts beside them in the reply.
    declared : mapping of str to sequence of str, optional
        The attributes whose levels the site's task fixes, for :func:`check_levels`.
    withheld : callable or None
        Called with a ``pca`` request (its ``min_cell`` written in): per column of the rows
        it summarises, whether the site withholds it (:func:`check_withheld`); ``None``:
        not checked.
    """

    def __init__(self, site: str, policy: SitePolicy, *, config_min_cell: int | None = None,
                 egress_log: str | Path | None = None,
                 rules: Mapping[Kind, Rule] | None = None,
                 on_record: Callable[[dict[str, Any]], None] | None = None,
                 run: Mapping[str, Any] | None = None,
                 census: Callable[[], Census] | None = None,
                 declared: Mapping[str, Sequence[str]] | None = None,
                 withheld: Callable[[Request], np.ndarray] | None = None) -> None:
        self.run = dict(run) if run else None
        self.withheld = withheld
        self.census = census
        self.declared = dict(declared or {})
        self.site = site
        self.policy = policy
        self.config_min_cell = config_min_cell
        self.egress_log = Path(egress_log) if egress_log is not None else None
        self.rules = dict(RULES if rules is None else rules)
        self.on_record = on_record

    def min_cell(self, request: Request) -> int:
        """The effective small-cell threshold for one request.

        Parameters
        ----------
        request : Request

        Returns
        -------
        int
        """
        asked = request.config.get("min_cell")
        return self.policy.effective_min_cell(
            self.config_min_cell, int(asked) if asked is not None else None)

    def release(self, request: Request, handler: Callable[[Request], Reply]) -> Reply:
        """Answer ``request`` with ``handler`` and let out only what the policy allows.

        Parameters
        ----------
        request : Request
        handler : callable
            The site's handler for the request's kind.

        Returns
        -------
        Reply
            The reply as it leaves the site.

        Raises
        ------
        SiteRefused
            The policy declines the request (the message is safe to send).
        SiteError
            The handler failed (the message names the exception type only).
        """
        if not self.policy.answers_kind(request.kind.value):
            self._refuse(request, self.policy.refusal(request.kind.value))
        if (self.policy.secure_aggregation and request.kind == Kind.FIT
                and not request.config.get("secure_aggregation")):
            self._refuse(request, "site policy requires secure aggregation (secure_aggregation: "
                                  "true); this fit request would send the update in the clear")
        min_cell = self.min_cell(request)
        request.config["min_cell"] = min_cell
        try:
            reply = handler(request)
        except SiteRefused as exc:
            self._record(request, min_cell, refused=str(exc))
            raise
        except Exception as exc:  # the site's own log keeps the message (traceback: debug)
            log.warning("site %s: %s request of round %d failed: %s: %s", self.site,
                        request.kind.value, request.round, type(exc).__name__, exc)
            log.debug("site %s: traceback", self.site, exc_info=True)
            self._record(request, min_cell, failed=type(exc).__name__)
            raise SiteError(f"{type(exc).__name__} while answering {request.kind.value!r} "
                            "(details in the site's own log)") from None
        try:
            released = self.rules.get(request.kind, _pass)(reply, min_cell, self.policy)
            if request.kind is Kind.PCA and self.withheld is not None:
                released = check_withheld(released, self.withheld(request))
            check_declared(request.kind, released.reply, min_cell,
                           secured=secured_fit(request))
            check_levels(released.reply, min_cell,
                         census=None if self.census is None else self.census(),
                         declared=self.declared)
        except SiteRefused as exc:  # a rule withholds the whole reply, saying why
            self._record(request, min_cell, refused=str(exc))
            raise
        except Exception as exc:  # nothing leaves; the reason stays in the site's log
            log.warning("site %s: the %s reply of round %d broke the disclosure rules: %s",
                        self.site, request.kind.value, request.round, exc)
            self._record(request, min_cell, failed=f"disclosure: {exc}")
            raise SiteError(f"{type(exc).__name__}: the {request.kind.value!r} reply broke the "
                            "site's disclosure rules and was not sent (details in the site's "
                            "own log)") from None
        self._record(request, min_cell, released=released)
        return released.reply

    def release_carried(self, fit: Request, evaluation: Request,
                        handlers: Mapping[Kind, Callable[[Request], Reply]]) -> Reply:
        """Answer a fit request that carries an evaluation: the evaluation first, then the fit.

        Each part passes :meth:`release` under its own kind's rule and declaration; the fit
        reply leaves with the released evaluation (or the words of its refusal or failure)
        attached (:func:`~multimodal_fl.federated.protocol.attach_evaluation`), checked once
        more by :func:`check_declared`.

        Parameters
        ----------
        fit, evaluation : Request
            The two parts (:func:`~multimodal_fl.federated.protocol.split_carried`).
        handlers : mapping of Kind to callable
            The site's handlers (``fit`` and ``evaluate`` are used).

        Returns
        -------
        Reply
            The fit reply as it leaves the site.

        Raises
        ------
        SiteRefused, SiteError
            As :meth:`release`, for the fit part (a failed evaluation only travels as words).
        """
        carried: Reply | str
        try:
            carried = self.release(evaluation, handlers[Kind.EVALUATE])
        except (SiteRefused, SiteError) as exc:  # both made to cross the boundary
            # the words a separate evaluate broadcast records: "SiteRefused: site a: ..."
            carried = f"{type(exc).__name__}: {exc}"
        min_cell = self.min_cell(fit)
        reply = attach_evaluation(self.release(fit, handlers[Kind.FIT]), carried)
        check_declared(Kind.FIT, reply, min_cell, secured=secured_fit(fit))
        return reply

    def _refuse(self, request: Request, reason: str) -> None:
        self._record(request, self.min_cell(request), refused=reason)
        raise SiteRefused(f"site {self.site}: {reason}")

    def _record(self, request: Request, min_cell: int, *, released: Released | None = None,
                refused: str | None = None, failed: str | None = None) -> None:
        """Append one line to the egress log (and hand it to ``on_record``)."""
        if self.egress_log is None and self.on_record is None:
            return
        entry: dict[str, Any] = {
            "time": time.time(), "site": self.site, "kind": request.kind.value,
            "round": request.round, "min_cell": min_cell,
            "policy": self.policy.model_dump(),
        }
        if self.run is not None:
            entry["run"] = self.run
        if released is not None:
            r = released.reply
            entry.update(released=True, bytes=_size(r), n_samples=r.n_samples,
                         weights=len(r.weights), arrays=sorted(r.arrays),
                         metrics=sorted(r.metrics), documents=sorted(r.documents),
                         suppressed=released.suppressed)
        else:
            entry.update(released=False, refused=refused, failed=failed)
        if self.on_record is not None:
            self.on_record(entry)
        if self.egress_log is None:
            return
        self.egress_log.parent.mkdir(parents=True, exist_ok=True)
        with self.egress_log.open("a") as fh:
            fh.write(json.dumps(entry) + "\n")
