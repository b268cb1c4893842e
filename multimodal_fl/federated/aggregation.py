"""Pure functions over state dicts: reply checks, weighted averaging, server optimisers, moments.

Everything here works on ``dict[str, numpy.ndarray]`` and knows no modality, model or file.

Rules (also in ``docs/federated.md``):

* **Weights.** A site's weight for a key is the sample count of the key's parameter group:
  ``Reply.group_counts[g]`` for the longest prefix ``g`` among the groups *that site* lists
  which the key starts with; ``Reply.n_samples`` when the key is in none of its groups. A site
  with count 0 for a group does not contribute to it. A key no site contributed
  to keeps its old global value (and the server optimiser leaves it and its state untouched).
* **Floating arrays** (parameters and buffers such as BatchNorm running statistics alike) are
  averaged as ``sum_i (c_i / C) * w_i`` in float64 and cast back to their dtype, in sorted site
  order, so one site gives back its weights exactly and the result never depends on arrival order.
  A reply may leave out the keys of a group whose count is 0 (:func:`check_fit_reply`).
* **Integer and boolean arrays** (e.g. ``num_batches_tracked``) are not averaged: the result is
  the element-wise **maximum** over contributing sites (logical or for booleans). The server
  optimiser never touches them; they take the aggregated value directly.
* **FedBN.** Keys a site lists in ``Reply.local_keys`` are excluded from aggregation for every
  site; the server keeps its previous (initial) global value for them and sites keep their own.
* **Server optimisers** (Reddi et al., 2021, "Adaptive Federated Optimization", Alg. 2), on the
  pseudo-gradient ``delta = average - global``: ``fedavg`` ``x + eta * delta`` (with
  ``eta == 1`` the average itself, exactly); ``fedadam`` / ``fedyogi`` / ``fedadagrad`` with
  ``m = b1 m + (1 - b1) delta``, ``v`` per variant, ``x + eta * m / (sqrt(v) + tau)``; ``m``
  starts at 0, ``v`` at ``tau**2``; no bias correction (as in the paper). State is a dict of
  float64 arrays (``"m/<key>"``, ``"v/<key>"``), checkpointable as is.
* **Federated moments** (standardisation): each site sends :func:`column_moments` of its rows;
  :func:`standardizer_state` pools them and gives the standardiser's mean, scale and count under
  the state-dict keys the moments replies name (one implementation, :mod:`multimodal_fl.moments`,
  shared with the encoders' ``Standardizer``).
* **FedProx** is FedAvg on the server; the proximal term is added by the site
  (:func:`multimodal_fl.federated.proximal.proximal_term`), ``mu`` from the request config.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from multimodal_fl.federated.protocol import InvalidReply, Reply, StateDict, unpack_document
from multimodal_fl.moments import column_moments, pool_moments, standardization

__all__ = [
    "STANDARDIZER_STATE",
    "ServerOptimizer",
    "aggregate",
    "check_evaluate_reply",
    "check_fit_reply",
    "column_moments",
    "group_of",
    "merge_moments",
    "pool_moments",
    "server_step",
    "standardizer_state",
]

#: The standardiser's state a moments exchange fills: its names in :func:`standardizer_state`.
STANDARDIZER_STATE = ("mean", "scale", "count")

Algorithm = Literal["fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad"]
_ADAPTIVE = ("fedadam", "fedyogi", "fedadagrad")
_MAX_LISTED = 5


def _is_float(array: np.ndarray) -> bool:
    return bool(np.issubdtype(array.dtype, np.floating))


def _listed(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    more = f" (and {len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return ", ".join(repr(k) for k in keys[:_MAX_LISTED]) + more


def group_of(key: str, groups: Iterable[str]) -> str | None:
    """Return the longest group prefix that ``key`` starts with.

    Parameters
    ----------
    key : str
        A state-dict key, e.g. ``"encoders.text.layer.0.weight"``.
    groups : Iterable[str]
        Group prefixes, e.g. ``["encoders.text.", "encoders."]``.

    Returns
    -------
    str or None
        The longest matching prefix, or None when the key is in no group (the default group).
    """
    best: str | None = None
    for group in groups:
        if key.startswith(group) and (best is None or len(group) > len(best)):
            best = group
    return best


# --------------------------------------------------------------------------- checks


def check_fit_reply(
    reply: Reply,
    *,
    site: str,
    round: int,
    reference: Mapping[str, np.ndarray],
    allow_local_keys: bool = False,
    max_samples: int | None = None,
    masked: bool = False,
) -> None:
    """Check one fit reply before aggregation.

    Parameters
    ----------
    reply : Reply
        The reply to check.
    site : str
        The site the request went to (the reply must name it).
    round : int
        The request's round (the reply must echo it).
    reference : Mapping[str, numpy.ndarray]
        The global state dict: the expected keys, shapes and dtypes.
    allow_local_keys : bool
        Whether FedBN is on (otherwise a non-empty ``local_keys`` is an error).
    max_samples : int or None
        Plausibility cap on ``n_samples`` (the training-set size the site declared), if known.
    masked : bool
        A secured round: the reply must carry no weights, no group counts and no arrays (the
        update stays at the site for the secure sum, whose total is checked instead).

    Raises
    ------
    InvalidReply
        Naming the site and what was wrong: identity, sample count, group counts, local keys,
        missing / unexpected keys, shape, dtype, non-finite values or metrics. The keys of a
        group whose count is 0 may be absent (the site did not train it, or its disclosure
        gate left it out); any other missing key is an error.
    """
    if reply.site != site:
        raise InvalidReply(site, f"reply names site {reply.site!r}, expected {site!r}")
    if reply.kind != "fit" or reply.round != round:
        raise InvalidReply(
            site,
            f"reply is for ({reply.kind!r}, round {reply.round}), expected ('fit', round {round})",
        )
    n = reply.n_samples
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n <= 0:
        raise InvalidReply(site, f"n_samples is {n!r}; expected a positive integer")
    if max_samples is not None and n > max_samples:
        raise InvalidReply(
            site, f"n_samples {n} exceeds the training-set size {max_samples} the site declared"
        )
    if masked:
        _check_masked(site, reply)
    for group, count in reply.group_counts.items():
        if not isinstance(group, str) or not group:
            raise InvalidReply(site, f"group_counts key {group!r} is not a non-empty prefix string")
        if (
            isinstance(count, bool)
            or not isinstance(count, int | np.integer)
            or not 0 <= count <= n
        ):
            raise InvalidReply(
                site,
                f"group_counts[{group!r}] is {count!r}; expected an integer in [0, n_samples={n}]",
            )
    local = set(reply.local_keys)
    if local and not allow_local_keys:
        raise InvalidReply(
            site, f"local_keys given ({_listed(local)}) but FedBN is off; expected an empty list"
        )
    unknown_local = local - set(reference)
    if unknown_local:
        raise InvalidReply(site, f"local_keys not in the model: {_listed(unknown_local)}")
    if masked:
        _check_metrics(site, reply.metrics)
        return
    expected = set(reference) - local
    got = set(reply.weights)
    # a group the site did not train (count 0) may be left out of the reply: a site's
    # disclosure gate leaves out groups trained by fewer than its small-cell threshold
    missing = {k for k in expected - got
               if (g := group_of(k, reply.group_counts)) is None or reply.group_counts[g] != 0}
    if missing:
        raise InvalidReply(site, f"missing keys: {_listed(missing)}")
    unexpected = got - set(reference)
    if unexpected:
        raise InvalidReply(site, f"unexpected keys: {_listed(unexpected)}")
    for key in sorted(got - local):
        value, ref = reply.weights[key], reference[key]
        if not isinstance(value, np.ndarray):
            raise InvalidReply(site, f"{key!r} is a {type(value).__name__}, expected numpy.ndarray")
        if value.shape != ref.shape:
            raise InvalidReply(
                site, f"{key!r} has shape {tuple(value.shape)}, expected {tuple(ref.shape)}"
            )
        if value.dtype != ref.dtype:
            raise InvalidReply(site, f"{key!r} has dtype {value.dtype}, expected {ref.dtype}")
        if _is_float(value) and not np.isfinite(value).all():
            bad = int(value.size - np.isfinite(value).sum())
            raise InvalidReply(site, f"{key!r} has {bad} non-finite value(s) (NaN or inf)")
    _check_metrics(site, reply.metrics)


def _check_masked(site: str, reply: Reply) -> None:
    """A secured fit reply carries no weights, group counts or arrays."""
    sent = [f for f, v in (("weights", reply.weights), ("group_counts", reply.group_counts),
                           ("arrays", reply.arrays)) if v]
    if sent:
        raise InvalidReply(site, f"a secured fit reply carries {sent}; the update must stay "
                                 "at the site for the secure sum")


def check_evaluate_reply(reply: Reply, *, site: str, round: int) -> None:
    """Check one evaluation reply (identity, a non-negative count, finite metrics, documents).

    Parameters
    ----------
    reply : Reply
        The reply.
    site : str
        The site the request went to.
    round : int
        The request's round.

    Raises
    ------
    InvalidReply
        Naming the site and what was wrong.
    """
    if reply.site != site:
        raise InvalidReply(site, f"reply names site {reply.site!r}, expected {site!r}")
    if reply.kind != "evaluate" or reply.round != round:
        raise InvalidReply(
            site,
            f"reply is for ({reply.kind!r}, round {reply.round}), "
            f"expected ('evaluate', round {round})",
        )
    n = reply.n_samples
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        raise InvalidReply(site, f"n_samples is {n!r}; expected a non-negative integer")
    _check_metrics(site, reply.metrics)
    for name, text in reply.documents.items():
        try:
            unpack_document(text)
        except ValueError as exc:
            raise InvalidReply(site, f"document {name!r} is not JSON ({exc})") from None


def _check_metrics(site: str, metrics: Mapping[str, float]) -> None:
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float | np.number):
            raise InvalidReply(site, f"metric {name!r} is {value!r}; expected a number")
        if not math.isfinite(float(value)):
            raise InvalidReply(site, f"metric {name!r} is {value!r}; expected a finite number")


# --------------------------------------------------------------------------- averaging


def _average_key(values: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    pairs = [(v, w) for v, w in zip(values, weights, strict=True) if w > 0]
    first = pairs[0][0]
    if not _is_float(first):
        out = pairs[0][0].copy()
        for v, _ in pairs[1:]:
            out = np.logical_or(out, v) if out.dtype == np.bool_ else np.maximum(out, v)
        return np.asarray(out, dtype=first.dtype)
    total = float(sum(w for _, w in pairs))
    acc = np.zeros(first.shape, dtype=np.float64)
    for v, w in pairs:
        acc += (w / total) * v.astype(np.float64)
    return acc.astype(first.dtype)


def aggregate(replies: Sequence[Reply], global_weights: Mapping[str, np.ndarray]) -> StateDict:
    """Average checked fit replies per parameter group, in sorted site order.

    Parameters
    ----------
    replies : Sequence[Reply]
        Checked fit replies (any order; they are sorted by site name here).
    global_weights : Mapping[str, numpy.ndarray]
        The current global state dict (the key set and the fallback).

    Returns
    -------
    dict[str, numpy.ndarray]
        The averaged value of every key at least one site contributed to (FedBN local keys and
        groups no site trained are absent: the caller keeps their old global values).
    """
    ordered = sorted(replies, key=lambda r: r.site)
    local: set[str] = set()
    for reply in ordered:
        local.update(reply.local_keys)
    out: StateDict = {}
    for key in global_weights:
        if key in local:
            continue
        values: list[np.ndarray] = []
        weights: list[float] = []
        for reply in ordered:
            group = group_of(key, reply.group_counts)
            count = reply.n_samples if group is None else reply.group_counts[group]
            if count > 0:
                values.append(reply.weights[key])
                weights.append(float(count))
        if values:
            out[key] = _average_key(values, weights)
    return out


# --------------------------------------------------------------------------- server optimisers


@dataclass(frozen=True)
class ServerOptimizer:
    """Server-side update on the pseudo-gradient ``average - global``.

    Parameters
    ----------
    name : {"fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad"}
        ``fedavg`` / ``fedprox``: ``x + eta * delta`` (``eta = 1`` gives the plain average).
        Adaptive variants follow Reddi et al. (2021), Algorithm 2.
    eta : float
        Server learning rate (default 1.0; Reddi et al. tune it, e.g. 1e-2 to 1 for FedAdam).
    beta1 : float
        First-moment decay (adaptive variants).
    beta2 : float
        Second-moment decay (``fedadam`` / ``fedyogi``).
    tau : float
        Adaptivity constant; ``v`` starts at ``tau**2``.
    """

    name: Algorithm = "fedavg"
    eta: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        """Validate the hyper-parameters."""
        allowed = ("fedavg", "fedprox", *_ADAPTIVE)
        if self.name not in allowed:
            raise ValueError(f"unknown server algorithm {self.name!r}; expected one of {allowed}")
        if not self.eta > 0:
            raise ValueError(f"eta must be > 0, got {self.eta}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"beta1, beta2 must be in [0, 1); got {self.beta1}, {self.beta2}")
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")


def server_step(
    global_weights: Mapping[str, np.ndarray],
    averaged: Mapping[str, np.ndarray],
    state: Mapping[str, np.ndarray],
    optimizer: ServerOptimizer,
) -> tuple[StateDict, StateDict]:
    """Apply the server optimiser to the keys that were aggregated this round.

    Parameters
    ----------
    global_weights : Mapping[str, numpy.ndarray]
        The current global state dict.
    averaged : Mapping[str, numpy.ndarray]
        :func:`aggregate` output (a subset of the keys).
    state : Mapping[str, numpy.ndarray]
        Optimiser state (``"m/<key>"``, ``"v/<key>"``, float64); empty at the start.
    optimizer : ServerOptimizer
        Which update and its hyper-parameters.

    Returns
    -------
    new_weights : dict[str, numpy.ndarray]
        The new global state dict (keys not in ``averaged`` unchanged; integer keys set to the
        aggregated value).
    new_state : dict[str, numpy.ndarray]
        The new optimiser state (entries of untouched keys carried over).
    """
    new_weights: StateDict = {k: np.array(v, copy=True) for k, v in global_weights.items()}
    new_state: StateDict = {k: np.array(v, copy=True) for k, v in state.items()}
    for key, avg in averaged.items():
        old = global_weights[key]
        if not _is_float(old):
            new_weights[key] = np.array(avg, copy=True)
            continue
        if optimizer.name in ("fedavg", "fedprox"):
            if optimizer.eta == 1.0:
                new_weights[key] = np.array(avg, copy=True)
            else:
                x = old.astype(np.float64)
                new_weights[key] = (x + optimizer.eta * (avg.astype(np.float64) - x)).astype(
                    old.dtype
                )
            continue
        x = old.astype(np.float64)
        delta = avg.astype(np.float64) - x
        m = state.get(f"m/{key}", np.zeros_like(x))
        v = state.get(f"v/{key}", np.full_like(x, optimizer.tau**2))
        m = optimizer.beta1 * m + (1.0 - optimizer.beta1) * delta
        d2 = delta * delta
        if optimizer.name == "fedadam":
            v = optimizer.beta2 * v + (1.0 - optimizer.beta2) * d2
        elif optimizer.name == "fedyogi":
            v = v - (1.0 - optimizer.beta2) * d2 * np.sign(v - d2)
        else:  # fedadagrad
            v = v + d2
        new_weights[key] = (x + optimizer.eta * m / (np.sqrt(v) + optimizer.tau)).astype(old.dtype)
        new_state[f"m/{key}"] = m
        new_state[f"v/{key}"] = v
    return new_weights, new_state


# --------------------------------------------------------------------------- federated moments


def merge_moments(
    summaries: Sequence[tuple[np.ndarray | int, np.ndarray | float, np.ndarray | float]],
    *,
    ddof: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pool per-site (count, sum, sum of squares) into the pooled mean and variance.

    Equals the mean / variance of the pooled data (up to float64 rounding; the sum-of-squares
    form loses precision when the mean is huge relative to the spread — standardise inputs of
    extreme scale first). No site's rows are needed, and no one site's statistics are used alone.

    Parameters
    ----------
    summaries : Sequence[tuple]
        One ``(n, sum, sumsq)`` per site (e.g. from :func:`column_moments`); scalars or arrays.
    ddof : int
        Delta degrees of freedom for the variance (0: population, 1: sample).

    Returns
    -------
    n, mean, var : numpy.ndarray
        Pooled count, mean and variance (NaN where the pooled count is ``<= ddof``; variance
        clipped at 0 against rounding).

    Raises
    ------
    ValueError
        If ``summaries`` is empty, the feature counts differ or a count is negative.
    """
    n, s, ss = pool_moments(summaries)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, s / n, np.nan)
        var = np.where(n > ddof, (ss - n * mean * mean) / (n - ddof), np.nan)
    var = np.where(np.isnan(var), var, np.maximum(var, 0.0))
    return n, mean, var


def standardizer_state(
    summaries: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], targets: Mapping[str, str]
) -> StateDict:
    """Pool per-site moments into a standardiser's state, keyed by the targets' state-dict keys.

    Parameters
    ----------
    summaries : sequence of (n, sum, sumsq)
        One :func:`column_moments` summary per site, in sorted site order.
    targets : Mapping[str, str]
        ``"mean"``, ``"scale"`` and ``"count"`` -> the state-dict key each fills (as a moments
        reply names them).

    Returns
    -------
    dict[str, numpy.ndarray]
        float64 arrays under the target keys.

    Raises
    ------
    ValueError
        If a target is missing or the summaries do not pool (see :func:`pool_moments`).
    """
    missing = [k for k in STANDARDIZER_STATE if k not in targets]
    if missing:
        raise ValueError(f"standardizer targets lack {missing}; they have {sorted(targets)}")
    n, s, ss = pool_moments(summaries)
    mean, scale = standardization(n, s, ss)
    values = {"mean": mean, "scale": scale, "count": n}
    return {targets[k]: values[k] for k in STANDARDIZER_STATE}
