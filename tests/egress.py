"""The egress audit's checks, shared by ``tests/test_egress_audit.py`` (in process) and
``tests/federated/test_flower_experiment.py`` (Flower loopback).

A :class:`Recorder` wraps the federation the server job talks to and keeps every request it
sent and every answer it got: that is all that crossed the sites' boundaries. Each check takes
what was recorded and returns its findings as lines (empty: nothing found), so a test asserts
an empty list and a negative control asserts the line a planted breach produces.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from multimodal_fl.config import SitePolicy
from multimodal_fl.encoders.tabular import Standardizer
from multimodal_fl.engines.flower_jobs import experiment_job
from multimodal_fl.federated.aggregation import group_of
from multimodal_fl.federated.disclosure import (
    DECLARED,
    DisclosureViolation,
    check_declared,
    secured_fit,
)
from multimodal_fl.federated.protocol import (
    Kind,
    Reply,
    Request,
    SiteFailure,
    detach_evaluation,
    split_carried,
)
from multimodal_fl.federated.secure_update import (
    UPDATE_VECTOR,
    SecureAggregation,
    encode_update,
    summed_keys,
)
from multimodal_fl.federated.server import Federation, Site

__all__ = [
    "ALLOW_LIST",
    "CLASS_FIGURES",
    "LONG",
    "RECORDING_FILE",
    "Crossing",
    "Known",
    "Recorder",
    "Released",
    "Secrets",
    "audit",
    "backstop_findings",
    "class_figure_findings",
    "cohort_secrets",
    "correlations",
    "crossing_texts",
    "declared_findings",
    "effective_min_cell",
    "egress_findings",
    "held_vector",
    "load_crossings",
    "log_name_findings",
    "long_arrays",
    "model_shapes",
    "patient_values",
    "plain_update",
    "read_egress",
    "recording_experiment_job",
    "released_numbers",
    "secured_update_findings",
    "split_classes",
    "statistic_count_findings",
    "text_findings",
    "weight_findings",
]

#: Where :func:`recording_experiment_job` leaves what it recorded: beside the run directory.
RECORDING_FILE = "server_recording.pkl"


@dataclass
class Crossing:
    """One request sent to one site and the answer that came back across its boundary."""

    site: str
    request: Request
    answer: Reply | SiteFailure


class Recorder:
    """A :class:`~multimodal_fl.federated.server.Federation` that keeps every crossing.

    Parameters
    ----------
    inner : Federation
        The federation the job would have used (in process, or Flower's).
    """

    def __init__(self, inner: Federation) -> None:
        self.inner = inner
        self.crossings: list[Crossing] = []

    def sites(self) -> list[str]:
        """The inner federation's sites."""
        return list(self.inner.sites())

    def broadcast(self, requests: Mapping[str, Request], timeout: float | None = None
                  ) -> dict[str, Reply | SiteFailure]:
        """Broadcast through the inner federation and keep each request with its answer."""
        answers = self.inner.broadcast(requests, timeout)
        for s in requests:
            if s in answers:
                self.crossings += _crossings(s, requests[s], answers[s])
        return answers


def _crossings(site: str, request: Request, answer: Reply | SiteFailure) -> list[Crossing]:
    """One message's crossings: a fit that carries an evaluation is two (evaluate, then fit),
    as the site's gate releases and logs them."""
    fit, evaluation = split_carried(request)
    if evaluation is None or isinstance(answer, SiteFailure):
        return [Crossing(site, request, answer)]
    fit_reply, carried = detach_evaluation(answer, evaluation.round)
    first: Reply | SiteFailure = (SiteFailure(site, carried) if isinstance(carried, str) else
                                  carried or SiteFailure(site, "no carried evaluation"))
    return [Crossing(site, evaluation, first), Crossing(site, fit, fit_reply)]


def recording_experiment_job(run_config: Mapping[str, Any]) -> Any:
    """``server-factory``: the experiment's Flower job, recording what crosses to the server.

    The job of :func:`multimodal_fl.engines.flower_jobs.experiment_job`, whose federation is
    wrapped in a :class:`Recorder`; the crossings are pickled into :data:`RECORDING_FILE`
    beside ``run-dir`` (never inside it: the server's run directory stays as the job made it),
    each request without its weights and arrays (the server's own; the audit reads the
    replies).
    """
    job = experiment_job(run_config)
    inner = job.main
    out = Path(str(run_config["run-dir"])).parent / RECORDING_FILE

    def main(federation: Federation) -> None:
        recorder = Recorder(federation)
        try:
            inner(recorder)
        finally:
            light = [replace(c, request=replace(c.request, weights={}, arrays={}))
                     for c in recorder.crossings]
            out.write_bytes(pickle.dumps(light))

    job.main = main
    return job


def load_crossings(path: Path) -> list[Crossing]:
    """What :func:`recording_experiment_job` recorded."""
    crossings = pickle.loads(path.read_bytes())
    assert isinstance(crossings, list)
    return crossings


def effective_min_cell(cfg_min_cell: int, request: Request,
                       policy: SitePolicy | None = None) -> int:
    """The threshold the site's gate applied (no ``policy.yaml``: the default policy)."""
    asked = request.config.get("min_cell")
    return (policy or SitePolicy()).effective_min_cell(
        cfg_min_cell, int(asked) if asked is not None else None)


# --------------------------------------------------------------------------- declared fields


def declared_findings(crossing: Crossing, min_cell: int) -> list[str]:
    """The reply carries only what :data:`DECLARED` allows its kind (``check_declared``)."""
    reply = crossing.answer
    if not isinstance(reply, Reply):
        return []
    try:
        check_declared(Kind(crossing.request.kind), reply, min_cell,
                       secured=secured_fit(crossing.request))
    except DisclosureViolation as exc:
        return [f"{crossing.site} {reply.kind} round {reply.round}: {exc}"]
    return []


def weight_findings(crossing: Crossing, reference: Mapping[str, tuple[tuple[int, ...], str]]
                    ) -> list[str]:
    """``weights``: the keys, shapes and dtypes of the model's ``state_dict()``.

    Keys of a parameter group counted 0 (not trained at the site; the fit rule's left-out
    groups) and FedBN's ``local_keys`` may be absent; nothing else may be, and nothing may be
    added.
    """
    reply = crossing.answer
    if not isinstance(reply, Reply) or not reply.weights:
        return []
    where = f"{crossing.site} {reply.kind} round {reply.round}"
    zero = {g for g, c in reply.group_counts.items() if c == 0}
    optional = {k for k in reference if k in reply.local_keys or
                (zero and group_of(k, reply.group_counts) in zero)}
    found = [f"{where}: weights carry {k!r}, not a key of the model's state_dict"
             for k in sorted(set(reply.weights) - set(reference))]
    found += [f"{where}: weights lack {k!r}" for k in sorted(set(reference) - set(reply.weights)
                                                          - optional)]
    for key, value in reply.weights.items():
        if key in reference:
            shape, dtype = reference[key]
            got = (tuple(np.shape(value)), str(np.asarray(value).dtype))
            if got != (shape, dtype):
                found.append(f"{where}: weights[{key!r}] is {got}, the model's is "
                             f"{(shape, dtype)}")
    return found


def statistic_count_findings(crossing: Crossing, count_keys: Iterable[str], min_cell: int
                             ) -> list[str]:
    """Counts of patients carried in the weights (a standardiser's per-feature ``count``)
    are 0 or at least ``min_cell``: a mean over fewer than ``min_cell`` patients must not
    leave in a model any more than in a ``moments`` reply."""
    reply = crossing.answer
    if not isinstance(reply, Reply):
        return []
    found = []
    for key in count_keys:
        if key in reply.weights:
            counts = np.asarray(reply.weights[key]).ravel()
            small = np.flatnonzero((counts > 0) & (counts < min_cell)).tolist()
            if small:
                found.append(f"{crossing.site} {reply.kind} round {reply.round}: weights[{key!r}]"
                             f" counts fewer than {min_cell} patients at features {small}")
    return found


# --------------------------------------------------------------------------- text


@dataclass
class Secrets:
    """What of a site's patients must never cross as text: ids and note text.

    Parameters
    ----------
    ids : set of str
        Patient ids.
    notes : list of str
        Every note's text and each sentence of it of at least :attr:`MIN_PHRASE` characters.
    """

    ids: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)

    MIN_PHRASE = 20

    def add_notes(self, texts: Iterable[str]) -> None:
        """Add notes: each whole, and each sentence of at least :attr:`MIN_PHRASE` chars."""
        for text in texts:
            self.notes.append(text)
            self.notes += [s.strip() for s in re.split(r"[.\n]", text)
                           if len(s.strip()) >= self.MIN_PHRASE]


def crossing_texts(crossing: Crossing) -> Iterator[tuple[str, str]]:
    """Every text that crossed: names of fields, documents, a failure's reason."""
    answer = crossing.answer
    where = f"{crossing.site} {crossing.request.kind}"
    if isinstance(answer, SiteFailure):
        yield f"{where} failure", f"{answer.reason}"
        return
    yield f"{where} names", " ".join([*answer.weights, *answer.metrics, *answer.arrays,
                                      *answer.documents, *answer.group_counts,
                                      *answer.local_keys])
    for name, text in answer.documents.items():
        yield f"{where} document {name}", text


def text_findings(texts: Iterable[tuple[str, str]], secrets: Secrets) -> list[str]:
    """Where a patient id or a note's text appears in what crossed."""
    found = []
    for where, text in texts:
        found += [f"{where}: patient id {pid!r}" for pid in sorted(secrets.ids) if pid in text]
        found += [f"{where}: note text {n[:30]!r}..." for n in secrets.notes if n in text]
    return found


# --------------------------------------------------------------------------- numbers

#: The backstop's allow-list: the declared aggregates a released number may be although it lies
#: within the tolerance of a patient's value. Each entry holds only with its condition, checked
#: number by number (:func:`released_numbers` finds the patients the number is computed from).
ALLOW_LIST: dict[str, str] = {
    "figure": "a metric, its bootstrap bound or a loss (AUC, Brier, sensitivity, calibration "
              "bin means...) on a cell of at least min_cell patients (the cell's own count, "
              "or the reply's n_samples); on small splits such figures are ratios of small "
              "counts (0.6, 0.75) that equal a feature recorded to one or two decimals by chance",
    "moment": "a per-feature sum or sum of squares (moments), or a standardiser's mean or scale "
              "carried in the weights, over the at least min_cell patients the feature was "
              "seen in (its count beside it in the same reply)",
    "pca": "a PCA summary of n >= min_cell patients with at most floor(n / min_cell) rows: "
           "the mean and the rows of S·Vᵀ (singular directions, not patients' rows)",
    "grid": "a constant of the protocol on the histogram grid (a multiple of 1/n_bins): ROC "
            "thresholds, calibration bin edges, the site's decision threshold",
}

#: Document keys whose numbers are figures of a cell (the ``"figure"`` entry).
FIGURE_KEYS = frozenset({"value", "lo", "hi", "mean_score", "observed", "loss", "train_loss",
                         "val_auc", "best_val_auc", "intercept", "slope",
                         # the recalibration entry's before/after ECE, beside its split's n
                         "ece"})
#: Document paths of grid constants (the ``"grid"`` entry).
GRID_PATH = re.compile(r".*/(threshold(/\d+)?|bins/\d+/(lo|hi))")
#: Keys whose integer values count the patients of the record holding them.
COUNT_FIELDS = ("n", "n_samples")


@dataclass(frozen=True)
class Released:
    """One number that crossed, with where it was and what covers it on the allow-list.

    ``entry`` names the :data:`ALLOW_LIST` entry whose kind of number this is (None: none) and
    ``support`` the patients it is computed from (None: unknown, or a constant).
    """

    kind: str
    part: str  # "metrics", "arrays", "documents" or "weights"
    path: str  # the metric, the array, the document path or the weight key
    value: float
    site: str = ""
    entry: str | None = None
    support: int | None = None


def _support(record: Any) -> int | None:
    if isinstance(record, dict):
        for key in COUNT_FIELDS:
            if isinstance(record.get(key), int) and not isinstance(record.get(key), bool):
                return int(record[key])
    return None


def _document_numbers(doc: Any, path: str, n_bins: int, stack: tuple[Any, ...] = ()
                      ) -> Iterator[tuple[str, float, str | None, int | None]]:
    """(path, value, allow-list entry, support) of every number in a JSON document."""
    if isinstance(doc, bool) or doc is None:
        return
    if isinstance(doc, int | float):
        key = path.rsplit("/", 1)[-1]
        if GRID_PATH.fullmatch(path) and abs(doc * n_bins - round(doc * n_bins)) < 1e-9:
            yield path, float(doc), "grid", None
        elif key in FIGURE_KEYS:  # the nearest record that counts its patients
            support = next((s for s in map(_support, reversed(stack)) if s is not None), None)
            yield path, float(doc), "figure", support
        else:
            yield path, float(doc), None, None
    elif isinstance(doc, dict):
        for key, value in doc.items():
            yield from _document_numbers(value, f"{path}/{key}", n_bins, (*stack, doc))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield from _document_numbers(value, f"{path}/{i}", n_bins, (*stack, doc))


def _metric_support(reply: Reply, name: str) -> int | None:
    """The patients a reply's metric is computed from."""
    if reply.kind != Kind.PREDICT:
        return reply.n_samples
    split, _, rest = name.partition("/")
    doc = json.loads(reply.documents.get("site_metrics", "{}"))
    return _support(((doc.get("metrics") or {}).get(split) or {}).get(rest.split("/")[0]))


def _array_numbers(reply: Reply, min_cell: int) -> list[Released]:
    """The arrays' numbers: moments against each feature's count, PCA against its cap."""
    out = []
    n = np.asarray(reply.arrays.get("n", -1)).astype(np.int64)
    for name, array in reply.arrays.items():
        values = np.asarray(array)
        if values.dtype.kind not in "fiu":
            continue
        flat = values.astype(np.float64).ravel()
        if reply.kind == Kind.MOMENTS and name in ("sum", "sumsq"):
            out += [Released(str(reply.kind), "arrays", f"{name}[{j}]", v, reply.site, "moment",
                             int(n.ravel()[j])) for j, v in enumerate(flat)]
        elif reply.kind == Kind.PCA and name != "n":
            rows = np.asarray(reply.arrays.get("block", np.zeros((0, 0)))).shape[0]
            ok = int(n) >= min_cell and rows <= int(n) // min_cell
            out += [Released(str(reply.kind), "arrays", name, v, reply.site, "pca",
                             int(n) if ok else None) for v in flat]
        else:
            out += [Released(str(reply.kind), "arrays", name, v, reply.site) for v in flat]
    return out


def _statistic_numbers(reply: Reply, statistic_keys: Mapping[str, str]) -> list[Released]:
    """A standardiser's mean and scale in the weights, against each feature's count."""
    out = []
    for key, count_key in statistic_keys.items():
        if key not in reply.weights:
            continue
        counts = np.asarray(reply.weights.get(count_key, np.zeros(0))).ravel()
        for j, v in enumerate(np.asarray(reply.weights[key], dtype=np.float64).ravel()):
            support = int(counts[j]) if j < counts.size else None
            out.append(Released(str(reply.kind), "weights", f"{key}[{j}]", float(v),
                                reply.site, "moment", support))
    return out


def released_numbers(crossing: Crossing, *, min_cell: int, n_bins: int,
                     statistic_keys: Mapping[str, str] | None = None) -> list[Released]:
    """Every number a reply carried but model weights: metrics, arrays, documents.

    Parameters
    ----------
    crossing : Crossing
    min_cell : int
        The threshold the site applied.
    n_bins : int
        The histogram grid (``evaluation.histogram_bins``).
    statistic_keys : mapping of str to str or None
        Weight keys holding statistics of patient data rather than learned parameters (the
        tabular standardiser's mean and scale), each with the key of its per-feature count:
        they count as released numbers.

    Returns
    -------
    list of Released
        A ``secure_sum`` reply's arrays (public keys, encrypted shares, the masked vector,
        which is uniform on its own, and the unmasking shares) are left out: alone they
        reveal nothing.
    """
    reply = crossing.answer
    if not isinstance(reply, Reply):
        return []
    kind, site = str(reply.kind), crossing.site
    out = [Released(kind, "metrics", k, float(v), site, "figure", _metric_support(reply, k))
           for k, v in reply.metrics.items()]
    if kind != Kind.SECURE_SUM:
        out += _array_numbers(reply, min_cell)
    for name, text in reply.documents.items():
        out += [Released(kind, "documents", p, v, site, entry, support)
                for p, v, entry, support in _document_numbers(json.loads(text), name, n_bins)]
    return out + _statistic_numbers(reply, statistic_keys or {})


def backstop_findings(numbers: Iterable[Released], patient_values: np.ndarray, *,
                      min_cell: int, tol: float = 1e-4) -> list[str]:
    """Released numbers within ``tol`` of a patient's value that no :data:`ALLOW_LIST` entry
    covers.

    "Within" is relative to the patient's value: ``|released - value| <= tol * |value|``. A
    copy of a patient's value (float32 rounding: relative error 6e-8) is within it at every
    magnitude, down to a score of 1e-30; a released constant is not made a copy by a patient's
    value that happens to lie near it in absolute terms (a zero weight beside a saturated
    score of 7.6e-24 reveals nothing of that score). Patient values that are integers (0 and
    1 included: a score saturated in float32) are left out, as integer features are in
    :func:`patient_values`: an integer released is a count or a constant, which the count
    and declared-field checks judge.

    Parameters
    ----------
    numbers : iterable of Released
    patient_values : ndarray
        Every patient's scores and non-integer feature values.
    min_cell : int
        A number is covered by its entry when its support is at least this (a ``"grid"``
        constant needs none).
    tol : float

    Returns
    -------
    list of str
    """
    values = np.unique(np.asarray(patient_values, dtype=np.float64))
    values = values[values != np.round(values)]
    found = []
    for number in numbers:
        i = int(np.searchsorted(values, number.value))
        near = values[max(i - 1, 0):i + 1]
        close = np.abs(near - number.value) <= tol * np.abs(near)
        if not close.any():
            continue
        if number.entry == "grid" or (number.entry is not None and number.support is not None
                                      and number.support >= min_cell):
            continue
        hit = float(near[close][0])
        if number.entry is None:
            why = "no allow-list entry covers it"
        elif number.support is None:
            why = f"a {number.entry!r} whose condition does not hold"
        else:
            why = f"a {number.entry!r} on {number.support} patients, fewer than {min_cell}"
        found.append(f"{number.site} {number.kind} {number.part} {number.path} = "
                     f"{number.value!r} is within a relative {tol} of a patient's value "
                     f"{hit!r} ({why})")
    return found


#: Figures of a class metric (they need ``min_cell`` patients of each class, as
#: ``released_metric`` and the ``evaluate`` rule ask), with the split they are computed on.
CLASS_FIGURES: dict[tuple[str, str], tuple[re.Pattern[str], str]] = {
    ("evaluate", "metrics"): (re.compile(r"val_(auc|average_precision)"), "val"),
    ("predict", "metrics"): (re.compile(r"(?P<split>\w+)/(auc|average_precision|sensitivity|"
                                        r"specificity)(/lo|/hi)?"), ""),
    ("cross_evaluate", "metrics"): (re.compile(r"(auc|average_precision)(/lo|/hi)?"), "test"),
    ("local_train", "documents"): (re.compile(r"local_training/(best_val_auc|history/\d+/val_auc)"),
                                   "val"),
}


def class_figure_findings(numbers: Iterable[Released],
                          classes: Mapping[str, Mapping[str, tuple[int, int]]], min_cell: int
                          ) -> list[str]:
    """Class metrics released on a split with fewer than ``min_cell`` patients of a class.

    Parameters
    ----------
    numbers : iterable of Released
    classes : mapping
        Per site, per split, ``(positives, negatives)``: what the auditor knows of the data.
    min_cell : int
    """
    found = []
    for number in numbers:
        rule = CLASS_FIGURES.get((number.kind, number.part))
        match = rule[0].fullmatch(number.path) if rule else None
        if rule is None or match is None:
            continue
        split = rule[1] or match.group("split")
        pos, neg = classes[number.site][split]
        if min(pos, neg) < min_cell:
            found.append(f"{number.site} {number.kind} {number.part} {number.path} = "
                         f"{number.value!r}: a class metric on a {split} split of {pos} "
                         f"positives and {neg} negatives (min_cell {min_cell})")
    return found


# --------------------------------------------------------------------------- the egress log


def read_egress(path: Path) -> list[dict[str, Any]]:
    """A site's egress log, one dict per line."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def egress_findings(crossings: Iterable[Crossing], log: list[dict[str, Any]]) -> list[str]:
    """The site's egress log says, message by message, what the server got.

    The crossings are one site's, in order; the log is that site's. Each message has one log
    entry of its kind and round, ``released`` true exactly when a reply came back, and a
    released entry names the reply's metrics, arrays and documents, its ``n_samples`` and its
    number of weights.
    """
    crossings = list(crossings)
    found = []
    if len(crossings) != len(log):
        found.append(f"{len(crossings)} messages crossed, the egress log has {len(log)} entries")
    for i, (c, entry) in enumerate(zip(crossings, log, strict=False)):
        where = f"{c.site} message {i} ({c.request.kind}, round {c.request.round})"
        if (entry.get("kind"), entry.get("round")) != (str(c.request.kind), c.request.round):
            found.append(f"{where}: logged as {entry.get('kind')} round {entry.get('round')}")
            continue
        got = isinstance(c.answer, Reply)
        if bool(entry.get("released")) != got:
            found.append(f"{where}: logged released={entry.get('released')}, the server got "
                         f"{'a reply' if got else 'a failure'}")
            continue
        if got:
            r = c.answer
            assert isinstance(r, Reply)
            want = {"metrics": sorted(r.metrics), "arrays": sorted(r.arrays),
                    "documents": sorted(r.documents), "n_samples": r.n_samples,
                    "weights": len(r.weights)}
            diff = {k: (entry.get(k), v) for k, v in want.items() if entry.get(k) != v}
            if diff:
                found.append(f"{where}: the log differs from the reply: {diff}")
    used = {str(c.request.kind) for c in crossings}
    logged = {str(e.get("kind")) for e in log}
    found += [f"kind {k!r} crossed but is not in the egress log" for k in sorted(used - logged)]
    return found


def log_name_findings(log: Iterable[dict[str, Any]]) -> list[str]:
    """Every released log entry's metric, array and document names fit :data:`DECLARED`."""
    found = []
    for entry in log:
        if not entry.get("released"):
            continue
        kind = Kind(entry["kind"])
        probe = Reply(site=str(entry.get("site", "")), kind=kind, round=int(entry["round"]),
                      metrics=dict.fromkeys(entry.get("metrics", []), 0.0),
                      arrays={k: np.zeros(0) for k in entry.get("arrays", [])},
                      documents=dict.fromkeys(entry.get("documents", []), "{}"))
        if kind not in DECLARED:
            found.append(f"{entry.get('site')} {kind}: no fields declared for this kind")
            continue
        try:
            check_declared(kind, probe, int(entry["min_cell"]))
        except DisclosureViolation as exc:
            found.append(f"{entry.get('site')} {kind} round {entry['round']}: {exc}")
    return found


# --------------------------------------------------------------------------- the whole audit


@dataclass
class Known:
    """What the auditor knows that the server must not learn, and the model's shape.

    Parameters
    ----------
    secrets : Secrets
        Every site's patient ids and note text.
    values : ndarray
        Every patient's scores (under every model that scored them) and non-integer tabular
        feature values.
    shapes : dict of str to (shape, dtype)
        The model's ``state_dict()``.
    statistics : dict of str to str
        Weight keys holding statistics of patient data (a standardiser's mean and scale), each
        with the key of its per-feature count.
    classes : dict
        Per site, per split, ``(positives, negatives)`` (:func:`split_classes`).
    """

    secrets: Secrets
    values: np.ndarray
    shapes: dict[str, tuple[tuple[int, ...], str]]
    statistics: dict[str, str]
    classes: dict[str, dict[str, tuple[int, int]]]

    @property
    def counts(self) -> list[str]:
        """The weight keys that count patients."""
        return sorted(set(self.statistics.values()))


def model_shapes(model: torch.nn.Module) -> tuple[dict[str, tuple[tuple[int, ...], str]],
                                                  dict[str, str]]:
    """A model's state-dict keys with (shape, dtype), and its standardisers' statistic keys."""
    shapes = {k: (tuple(v.shape), str(v.detach().numpy().dtype))
              for k, v in model.state_dict().items()}
    statistics = {f"{name}.{stat}": f"{name}.count" for name, module in model.named_modules()
                  if isinstance(module, Standardizer) for stat in ("mean", "scale")}
    return shapes, statistics


def cohort_secrets(cohorts: Mapping[str, Any]) -> Secrets:
    """Patient ids and note text of every site's cohort (:class:`~multimodal_fl.data.
    cohort.SiteCohort`)."""
    secrets = Secrets()
    for cohort in cohorts.values():
        secrets.ids |= {str(p) for p in cohort.table["patient_id"]}
        for notes in cohort.table["notes"]:
            secrets.add_notes(notes)
    return secrets


def patient_values(data: Mapping[str, Any], scores: Iterable[Iterable[float]]) -> np.ndarray:
    """Scores, and every non-integer finite tabular value of every site's prepared data."""
    parts = [np.asarray(list(s), dtype=np.float64) for s in scores]
    for sd in data.values():
        tab = sd.dataset.inputs["tabular"].numpy().astype(np.float64).ravel()
        parts.append(tab[np.isfinite(tab) & (tab != np.round(tab))])
    return np.concatenate(parts)


def split_classes(data: Mapping[str, Any]) -> dict[str, dict[str, tuple[int, int]]]:
    """Per site (:class:`~multimodal_fl.training.SiteData`), per split, (positives, negatives)."""
    out: dict[str, dict[str, tuple[int, int]]] = {}
    for name, sd in data.items():
        out[name] = {}
        for split in ("train", "val", "test"):
            labels = sd.part(split).labels.numpy()
            pos = int((labels > 0.5).sum())
            out[name][split] = (pos, int(labels.size) - pos)
    return out


def audit(crossings: Iterable[Crossing], known: Known, *, cfg_min_cell: int, n_bins: int
          ) -> dict[str, list[str]]:
    """Every check over every crossing: findings by check (all empty: nothing found)."""
    found: dict[str, list[str]] = {k: [] for k in (
        "declared", "weights", "statistic counts", "text", "backstop", "class figures")}
    for c in crossings:
        min_cell = effective_min_cell(cfg_min_cell, c.request)
        found["declared"] += declared_findings(c, min_cell)
        found["weights"] += weight_findings(c, known.shapes)
        found["statistic counts"] += statistic_count_findings(c, known.counts, min_cell)
        found["text"] += text_findings(crossing_texts(c), known.secrets)
        numbers = released_numbers(c, min_cell=min_cell, n_bins=n_bins,
                                   statistic_keys=known.statistics)
        found["backstop"] += backstop_findings(numbers, known.values, min_cell=min_cell)
        found["class figures"] += class_figure_findings(numbers, known.classes, min_cell)
    return found


# --------------------------------------------------------------------------- secured rounds

#: Arrays shorter than this are keys, encrypted Shamir shares and unmasking shares: fixed
#: sizes that do not grow with the model (:func:`long_arrays` checks they are bytes), too short
#: for a correlation to mean much.
LONG = 1000


def plain_update(site: Site, request: Request) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """What ``site`` would have sent for a secured ``fit`` request in a plain round.

    The request is answered again with secure aggregation off (same round, weights and seed:
    the same training), by a site built like the one that answered it.

    Returns
    -------
    (ndarray, dict of str to int64 array)
        The plain update, flattened over the summed keys in sorted order, as the secure sum
        lays out their deltas (a key the fit rule left out counts 0), and the parts of the
        vector the site holds for the secure sum instead, before masking
        (:func:`~multimodal_fl.federated.secure_update.encode_update`).
    """
    settings = SecureAggregation.from_request(request)
    assert settings is not None, "not a secured fit request"
    plain = replace(request, config={**request.config, "secure_aggregation": False})
    reply = site.handle(plain)
    assert reply.weights, f"{reply.site}: the plain fit sent no weights"
    start = request.weights
    delta = np.concatenate([(reply.weights[k].astype(np.float64) - start[k]).ravel()
                            if k in reply.weights else np.zeros(np.size(start[k]))
                            for k in sorted(summed_keys(start, reply.local_keys))])
    parts = encode_update(reply.weights, start, n_samples=reply.n_samples,
                          group_counts=reply.group_counts,
                          loss=float(reply.metrics.get("loss", 0.0)), settings=settings,
                          local_keys=reply.local_keys, site=reply.site)
    return delta, parts


def held_vector(parts: Mapping[str, np.ndarray]) -> np.ndarray:
    """The parts of a held vector in the order the secure sum lays them out (sorted)."""
    return np.concatenate([np.asarray(parts[k]).ravel() for k in sorted(parts)])


def long_arrays(crossing: Crossing) -> list[tuple[str, np.ndarray]]:
    """A reply's weights and arrays of at least :data:`LONG` values (as float64, flattened);
    the shorter ones must be bytes (keys and shares)."""
    reply = crossing.answer
    if not isinstance(reply, Reply):
        return []
    where = f"{crossing.site} {crossing.request.kind} {crossing.request.config.get('step', '')}"
    named = [*((f"{where} weights/{k}", v) for k, v in reply.weights.items()),
             *((f"{where} arrays/{k}", v) for k, v in reply.arrays.items())]
    short = [(n, v) for n, v in named if np.asarray(v).size < LONG]
    assert all(np.asarray(v).dtype == np.uint8 for _, v in short), short
    return [(n, np.asarray(v, dtype=np.float64).ravel()) for n, v in named
            if np.asarray(v).size >= LONG]


def correlations(arrays: Iterable[tuple[str, np.ndarray]], updates: Mapping[str, np.ndarray]
                 ) -> dict[tuple[str, str], float]:
    """Pearson correlation of every array with every site's update (over their common length)."""
    out = {}
    for name, values in arrays:
        for site, update in updates.items():
            n = min(values.size, update.size)
            out[(name, site)] = float(np.corrcoef(values[:n], update[:n])[0, 1])
    return out


def secured_update_findings(crossings: Iterable[Crossing],
                            updates: Mapping[int, Mapping[str, tuple[np.ndarray, Any]]],
                            limit: float = 0.05) -> list[str]:
    """What of the sites' plain updates reached the server in secured rounds.

    Parameters
    ----------
    crossings : iterable of Crossing
        What the server got (any engine).
    updates : mapping
        Per round, per site, :func:`plain_update`'s plain update and held parts.
    limit : float
        The largest ``|corr|`` allowed.

    Returns
    -------
    list of str
        A ``fit`` reply that carries weights, arrays, group counts or metrics; a round whose
        ``fit_update`` secure sum did not get one long array (the masked vector) per site; an
        array the server received in a round's fit or ``fit_update`` sum that equals a site's
        held vector or correlates with its plain update or held vector (``|corr| >= limit``).
    """
    found = []
    crossings = list(crossings)
    for c in crossings:
        r = c.answer
        if c.request.kind == Kind.FIT and isinstance(r, Reply) and (
                r.weights or r.arrays or r.group_counts or r.metrics):
            found.append(f"{c.site} fit round {r.round}: a secured fit reply carries "
                         f"{sorted([*r.weights, *r.arrays, *r.group_counts, *r.metrics])[:3]}")
    for rnd, sites in updates.items():
        arrays = [a for c in crossings if c.request.round == rnd and (
            c.request.kind == Kind.FIT or (c.request.kind == Kind.SECURE_SUM
                                           and c.request.config.get("vector") == UPDATE_VECTOR))
                  for a in long_arrays(c)]
        if len(arrays) != len(sites):
            found.append(f"round {rnd}: {len(arrays)} long arrays reached the server, "
                         f"expected one masked vector per site ({len(sites)})")
        held = {s: held_vector(parts).astype(np.float64) for s, (_, parts) in sites.items()}
        for name, values in arrays:
            found += [f"round {rnd}: {name} equals {s}'s unmasked vector"
                      for s, vector in held.items()
                      if values.size == vector.size and np.array_equal(values, vector)]
        for which, vectors in (("plain update", {s: d for s, (d, _) in sites.items()}),
                               ("unmasked vector", held)):
            found += [f"round {rnd}: {name} correlates with {s}'s {which} ({corr:+.3f})"
                      for (name, s), corr in correlations(arrays, vectors).items()
                      if not abs(corr) < limit]
    return found
