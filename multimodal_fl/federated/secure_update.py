"""Secure aggregation of model updates: what a site masks, and what the server reads from the sum.

With secure aggregation on (``federated.secure_aggregation``), a site answers a ``fit`` request
without weights: it keeps its update at home as the parts of one integer vector
(:func:`encode_update`, held by its :class:`~multimodal_fl.federated.secure_sum.
SecureSumParty` under :data:`UPDATE_VECTOR`), and the server sums the vectors of the sites that
trained with :func:`~multimodal_fl.federated.pooling.secure_total`, learning only the total
(:func:`decode_update`). The encoding, per site ``i`` with training count ``n_i``:

* ``d/<key>``, for every floating state-dict key (parameters and floating buffers such as
  BatchNorm's running statistics): ``c_i * (q + K)`` with ``q = rint((w_i - w) * S)`` the delta
  from the global weights ``w`` quantised at scale ``S = 2**scale_bits``, ``K = rint(clip *
  S)`` the offset that makes it non-negative, ``c_i`` the key's weight (its parameter group's
  training count, 0 for a group the site did not train or left out under its small-cell rule;
  ``n_i`` for a key in no group: the FedAvg weights of :func:`~multimodal_fl.federated.
  aggregation.aggregate`);
* ``w/<key>``: ``c_i`` itself, so the server learns the per-key total ``C = sum c_i`` and
  FedAvg per parameter group stays exact (a site without a modality adds 0 to both);
* ``n``: ``n_i``; ``loss``: ``n_i * (rint(loss_i * S) + K)`` (the mean training loss).

Every site lays out every part (zeros where it has nothing), so the part names it advertises
say nothing about it.

The server learns, per key, ``sum c_i q_i / (S C)``: the weighted mean
delta, with ``|error| <= 1 / (2 S)`` per value (:attr:`SecureAggregation.error_bound`),
whatever the counts. Integer and boolean buffers (BatchNorm's ``num_batches_tracked``) are
not in the sum: they keep their global value (PyTorch reads ``num_batches_tracked`` only when
a BatchNorm layer has ``momentum=None``, which the package's models never set). FedBN's local
keys stay at the site, as in a plain round.

With site-level differential privacy (:attr:`SecureAggregation.clip_norm` set: the server's
``privacy.site_level``), the weights are equal, as the site-level accountant assumes, and the
clipping happens at the site, as with Flower's ``DifferentialPrivacyClientSideFixedClipping``
and its ``fixedclipping_mod``: the site's UNWEIGHTED update ``u_i = w_i - w`` over the summed
keys (0 for a group it did not train) is clipped to L2 norm ``clip_norm`` before it is
quantised and masked, ``c_i`` is 1 for a key the site changed and 0 otherwise (the server
learns per key how many sites changed it, so a key no site changed keeps its value and takes
no noise), and the part ``clipped`` says whether the site scaled its update down (1 or 0: the
server learns how many sites clipped, not which, and no norm). The server reads the sum of the
clipped updates (:func:`decode_clipped_sum`) and adds the Gaussian noise to it
(:func:`~multimodal_fl.federated.central_dp.noisy_mean`). Each value of a clipped update is at
most ``clip_norm`` in absolute value, so with ``clip_norm <= clip`` no value can exceed the
quantisation's ``±clip`` (``federated.secure_clip``) and no site is refused for it; with a
larger ``clip_norm`` a site can still be (the loss too must stay within ``±clip``).

Checks: at the site, before anything is masked, the update must have the global weights'
keys and shapes and finite values, and no quantised delta may lie outside ``[-clip, clip]``:
a clipped value would bias the sum unseen, so the site counts them and refuses to take part
(:class:`UpdateRejected`, one line naming the keys and ``federated.secure_clip``) rather than
clip. At the server, on the unmasked sum: every part present with its width, every per-key
count ``C`` between 0 and the training counts the summed sites declared, every mean delta
within ``[-clip, clip]`` (a site that sent values out of range shows here) and the new weights
finite.

The sum must not wrap modulo ``2**bits``: each site's largest value, ``2 K n_i``, must stay
below ``2**bits / n_sites`` (the secure sum refuses a site whose vector does not, naming it).
With the defaults (``clip = 64``, ``scale_bits = 24``, ``bits = 62``) that allows
``n_i * n_sites < 2**31`` (e.g. 20 million patients per site at 100 sites).

This module knows no modality, no file and no config schema.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from multimodal_fl.federated.aggregation import group_of
from multimodal_fl.federated.central_dp import clip_update
from multimodal_fl.federated.protocol import ConfigValue, Reply, Request, StateDict
from multimodal_fl.federated.secure_sum import SecureSumParty

__all__ = [
    "CLIPPED_PART",
    "COUNT_PART",
    "DELTA_PREFIX",
    "LOSS_PART",
    "SECURED_FIT_METRICS",
    "UPDATE_VECTOR",
    "WEIGHT_PREFIX",
    "ClippedSum",
    "DecodedUpdate",
    "SecureAggregation",
    "UpdateRejected",
    "decode_clipped_sum",
    "decode_update",
    "encode_update",
    "hold_update",
    "summed_keys",
    "update_summary",
]

#: The vector a site holds after a secured ``fit`` (the ``secure_sum`` requests' ``vector``).
UPDATE_VECTOR = "fit_update"
#: Part-name prefixes: a key's weighted, quantised delta and its weight.
DELTA_PREFIX = "d/"
WEIGHT_PREFIX = "w/"
#: The parts of the training count and the count-weighted training loss.
COUNT_PART = "n"
LOSS_PART = "loss"
#: With site-level DP: 1 where the site scaled its update down to the clipping norm, else 0.
CLIPPED_PART = "clipped"
#: The metrics a secured fit reply may carry in the clear: the site's DP-SGD epsilon so far and
#: its delta (per-site privacy parameters, not patient data); the loss is in the masked sum.
SECURED_FIT_METRICS = ("epsilon", "delta")

IntArray = npt.NDArray[np.int64]
_MAX_NAMED = 3

log = logging.getLogger(__name__)


class UpdateRejected(ValueError):
    """An update (at the site) or a sum of updates (at the server) that fails its checks."""


@dataclass(frozen=True)
class SecureAggregation:
    """The quantisation of a secured round (the fit request carries it to every site).

    Parameters
    ----------
    clip : float
        Largest ``|delta|`` of one value in one round; a site whose update exceeds it refuses
        to take part (nothing is clipped silently).
    scale_bits : int
        Deltas are rounded to multiples of ``2**-scale_bits``.
    bits : int
        The secure sum's arithmetic is modulo ``2**bits`` (at most 62).
    clip_norm : float or None
        Site-level DP (the server's ``site_dp``): each site clips its unweighted update to this
        L2 norm before masking and the sites are summed with equal weights (see the module
        docstring); None: FedAvg weights by training count.
    """

    clip: float = 64.0
    scale_bits: int = 24
    bits: int = 62
    clip_norm: float | None = None

    def __post_init__(self) -> None:
        """Check the settings (the offset and one count's value must fit the modulus)."""
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"secure aggregation clip={self.clip}: expected a finite number > 0")
        if not 1 <= self.scale_bits <= 40 or not 8 <= self.bits <= 62:
            raise ValueError(f"secure aggregation scale_bits={self.scale_bits}, bits="
                             f"{self.bits}: expected 1 <= scale_bits <= 40, 8 <= bits <= 62")
        if 2 * self.offset >= 1 << (self.bits - 2):
            raise ValueError(f"secure aggregation clip={self.clip} at 2**{self.scale_bits}: "
                             f"the offset does not fit 2**{self.bits}; lower the clip")
        if self.clip_norm is not None and not (math.isfinite(self.clip_norm)
                                               and self.clip_norm > 0):
            raise ValueError(f"secure aggregation clip_norm={self.clip_norm}: expected a finite "
                             "number > 0 (the site-level DP clipping norm)")

    @property
    def scale(self) -> float:
        """``S = 2**scale_bits``."""
        return float(1 << self.scale_bits)

    @property
    def offset(self) -> int:
        """``K = rint(clip * S)``: the largest quantised ``|delta|``."""
        return round(self.clip * self.scale)

    @property
    def error_bound(self) -> float:
        """The largest error of one value of the mean delta: ``1 / (2 S)``."""
        return 0.5 / self.scale

    def to_config(self) -> dict[str, ConfigValue]:
        """The fit request's config entries.

        Returns
        -------
        dict of str to int, float or bool
        """
        out: dict[str, ConfigValue] = {
            "secure_aggregation": True, "secure_clip": float(self.clip),
            "secure_scale_bits": int(self.scale_bits), "secure_bits": int(self.bits)}
        if self.clip_norm is not None:
            out["secure_clip_norm"] = float(self.clip_norm)
        return out

    @classmethod
    def from_request(cls, request: Request) -> SecureAggregation | None:
        """The settings a fit request carries, or ``None`` for a plain round.

        Parameters
        ----------
        request : Request

        Returns
        -------
        SecureAggregation or None
        """
        c = request.config
        if not c.get("secure_aggregation"):
            return None
        norm = c.get("secure_clip_norm")
        return cls(clip=float(c.get("secure_clip", cls.clip)),
                   scale_bits=int(c.get("secure_scale_bits", cls.scale_bits)),
                   bits=int(c.get("secure_bits", cls.bits)),
                   clip_norm=None if norm is None else float(norm))


def _listed(keys: Sequence[str]) -> str:
    more = f" and {len(keys) - _MAX_NAMED} more" if len(keys) > _MAX_NAMED else ""
    return ", ".join(repr(k) for k in keys[:_MAX_NAMED]) + more


def _is_float(array: np.ndarray) -> bool:
    return bool(np.issubdtype(array.dtype, np.floating))


def summed_keys(global_weights: Mapping[str, np.ndarray], local_keys: Sequence[str] = ()
                ) -> list[str]:
    """The keys whose deltas are summed: floating keys, FedBN's local keys left out, sorted.

    Parameters
    ----------
    global_weights : mapping of str to ndarray
    local_keys : sequence of str

    Returns
    -------
    list of str
    """
    local = set(local_keys)
    return sorted(k for k, v in global_weights.items() if _is_float(v) and k not in local)


def _delta(key: str, new: np.ndarray, old: np.ndarray, site: str) -> npt.NDArray[np.float64]:
    """One key's delta from the global weights, flat, in float64 (shape and finiteness checked)."""
    if new.shape != old.shape:
        raise UpdateRejected(f"site {site}: secure update of {key!r} has shape "
                             f"{tuple(new.shape)}, the global weights {tuple(old.shape)}")
    delta = new.astype(np.float64).ravel() - old.astype(np.float64).ravel()
    if not np.isfinite(delta).all():
        raise UpdateRejected(f"site {site}: secure update of {key!r} has non-finite values; "
                             "nothing was masked or sent")
    return delta


def _deltas(new_weights: Mapping[str, np.ndarray], global_weights: Mapping[str, np.ndarray],
            keys: Sequence[str], n: int, group_counts: Mapping[str, int], site: str
            ) -> tuple[dict[str, npt.NDArray[np.float64]], dict[str, int]]:
    """Every summed key's delta (0 for a group counted 0) and its FedAvg weight ``c_i``."""
    deltas: dict[str, npt.NDArray[np.float64]] = {}
    counts: dict[str, int] = {}
    for key in keys:
        group = group_of(key, group_counts)
        count = n if group is None else int(group_counts[group])
        if count and key not in new_weights:
            raise UpdateRejected(f"site {site}: secure update lacks {key!r}, a key its "
                                 f"group counts {count} patients for")
        old = np.asarray(global_weights[key])
        deltas[key] = (_delta(key, np.asarray(new_weights[key]), old, site) if count
                       else np.zeros(old.size, np.float64))
        counts[key] = count
    return deltas, counts


def encode_update(new_weights: Mapping[str, np.ndarray], global_weights: Mapping[str, np.ndarray],
                  *, n_samples: int, group_counts: Mapping[str, int], loss: float,
                  settings: SecureAggregation, local_keys: Sequence[str] = (),
                  site: str = "") -> dict[str, IntArray]:
    """A site's update as the parts of the vector it secure-sums (see the module docstring).

    Parameters
    ----------
    new_weights : mapping of str to ndarray
        The site's weights after training (a key of a group counted 0 may be absent).
    global_weights : mapping of str to ndarray
        The weights the fit request carried.
    n_samples : int
        The site's training count.
    group_counts : mapping of str to int
        Training count per parameter group (as a plain fit reply's ``group_counts``).
    loss : float
        The site's mean training loss.
    settings : SecureAggregation
        With ``clip_norm``: the unweighted update clipped to that L2 norm, equal weights and
        the ``clipped`` part (site-level DP).
    local_keys : sequence of str
        FedBN's local keys (not summed).
    site : str
        The site's name (for messages).

    Returns
    -------
    dict of str to int64 array
        ``n``, ``loss``, ``w/<key>`` and ``d/<key>`` for every summed key; ``clipped`` with
        ``clip_norm``.

    Raises
    ------
    UpdateRejected
        A shape unlike the global weights', a non-finite value, a delta or loss outside
        ``±clip`` (counted: none may be clipped), or a count the modulus cannot hold.
    """
    n = int(n_samples)
    if n <= 0:
        raise UpdateRejected(f"site {site}: secure update of {n} training patients")
    if not math.isfinite(loss):
        raise UpdateRejected(f"site {site}: secure update with a non-finite training loss")
    k = settings.offset
    parts: dict[str, IntArray] = {COUNT_PART: np.array([n], np.int64)}
    clipped: dict[str, int] = {}
    q_loss = int(np.rint(loss * settings.scale))
    if abs(q_loss) > k:
        clipped["loss"] = 1
    parts[LOSS_PART] = np.array([n * (int(np.clip(q_loss, -k, k)) + k)], np.int64)
    deltas, counts = _deltas(new_weights, global_weights,
                             summed_keys(global_weights, local_keys), n, group_counts, site)
    if settings.clip_norm is not None:  # site-level DP: clipped here, before any masking
        counts = {key: int(np.any(d != 0)) for key, d in deltas.items()}
        deltas, norm = clip_update(deltas, settings.clip_norm)
        parts[CLIPPED_PART] = np.array([int(norm > settings.clip_norm)], np.int64)
    for key, delta in deltas.items():
        q = np.rint(delta * settings.scale)
        out = int(np.count_nonzero(np.abs(q) > k))
        if out:
            clipped[key] = out
        parts[WEIGHT_PREFIX + key] = np.array([counts[key]], np.int64)
        parts[DELTA_PREFIX + key] = counts[key] * (np.clip(q, -k, k).astype(np.int64) + k)
    if clipped:
        raise UpdateRejected(
            f"site {site}: {sum(clipped.values())} update value(s) outside ±{settings.clip:g} "
            f"(federated.secure_clip) in {_listed(sorted(clipped))}; none is clipped "
            "silently, so this site sends nothing this round: raise federated.secure_clip")
    if 2 * k * n >= 1 << (settings.bits - 1):
        raise UpdateRejected(f"site {site}: {n} training patients at clip "
                             f"{settings.clip:g} do not fit the secure sum's 2**{settings.bits}")
    return parts


def hold_update(party: SecureSumParty, reply: Reply, request: Request,
                settings: SecureAggregation, *, min_cell: int = 0) -> Reply:
    """Keep a plain fit reply's update at the site for the secure sum; return what is sent.

    Parameters
    ----------
    party : SecureSumParty
        The site's secure-sum side (it answers the ``secure_sum`` steps that follow).
    reply : Reply
        The fit reply as the site's disclosure rule would release it in a plain round
        (weights, ``n_samples``, ``group_counts``, ``metrics["loss"]``, ``local_keys``).
    request : Request
        The fit request (its ``weights`` are the global weights).
    settings : SecureAggregation
    min_cell : int
        The site's small-cell threshold in force.

    Returns
    -------
    Reply
        ``n_samples``, ``local_keys`` and, under DP-SGD, the metrics
        :data:`SECURED_FIT_METRICS` (the site's epsilon so far and its delta): no weight, no
        count per group, no loss.

    Raises
    ------
    UpdateRejected
        See :func:`encode_update`.
    """
    parts = encode_update(reply.weights, request.weights, n_samples=reply.n_samples,
                          group_counts=reply.group_counts,
                          loss=float(reply.metrics.get("loss", 0.0)), settings=settings,
                          local_keys=reply.local_keys, site=reply.site)
    if CLIPPED_PART in parts and parts[CLIPPED_PART][0]:  # the site's own log; no norm
        log.info("site %s: round %d: update clipped to L2 norm %g before masking (site-level "
                 "DP)", reply.site, reply.round, settings.clip_norm)
    party.hold(UPDATE_VECTOR, parts, min_cell=min_cell, once=True)
    return Reply(reply.site, reply.kind, reply.round, n_samples=reply.n_samples,
                 local_keys=list(reply.local_keys),
                 metrics={k: float(reply.metrics[k]) for k in SECURED_FIT_METRICS
                          if k in reply.metrics})


@dataclass
class DecodedUpdate:
    """What the server reads from the sum of the sites' update vectors.

    Attributes
    ----------
    averaged : dict of str to ndarray
        The FedAvg of the summed keys (global + mean delta, in the weights' dtype); a key no
        site trained (total count 0) is absent and keeps its global value.
    train_loss : float
        The count-weighted mean training loss.
    n_samples : int
        The summed training count.
    counts : dict of str to int
        Per summed key, the total count ``C``.
    delta_norm : float
        The L2 norm of the mean delta (every summed key).
    """

    averaged: StateDict
    train_loss: float
    n_samples: int
    counts: dict[str, int]
    delta_norm: float


def _part(parts: Mapping[str, np.ndarray], name: str, width: int) -> IntArray:
    value = parts.get(name)
    if value is None:
        raise UpdateRejected(f"secure sum of the updates lacks part {name!r}")
    array = np.asarray(value, dtype=np.int64)
    if array.size != width:
        raise UpdateRejected(f"secure sum part {name!r} has {array.size} values, expected "
                             f"{width}")
    return array


def _summed(parts: Mapping[str, np.ndarray], global_weights: Mapping[str, np.ndarray],
            settings: SecureAggregation, *, max_count: int, max_key_count: int,
            local_keys: Sequence[str]) -> tuple[int, float, dict[str, tuple[int, IntArray]]]:
    """The checked total: the training count, the mean loss, per key ``(C, sum c_i q_i)``."""
    k = settings.offset
    n = int(_part(parts, COUNT_PART, 1)[0])
    if not 0 < n <= max_count:
        raise UpdateRejected(f"secure sum: training count {n}, expected 1 to {max_count} (the "
                             "summed sites' declared counts)")
    loss = (int(_part(parts, LOSS_PART, 1)[0]) - k * n) / (settings.scale * n)
    keys: dict[str, tuple[int, IntArray]] = {}
    for key in summed_keys(global_weights, local_keys):
        old = np.asarray(global_weights[key])
        count = int(_part(parts, WEIGHT_PREFIX + key, 1)[0])
        if not 0 <= count <= max_key_count:
            raise UpdateRejected(f"secure sum: count of {key!r} is {count}, expected 0 to "
                                 f"{max_key_count}")
        if count == 0:
            keys[key] = (0, np.zeros(0, np.int64))
            continue
        q = _part(parts, DELTA_PREFIX + key, old.size) - k * count
        if np.abs(q).max(initial=0) > k * count:
            raise UpdateRejected(f"secure sum: the mean delta of {key!r} lies outside "
                                 f"±{settings.clip:g}: a site's masked vector was out of range")
        keys[key] = (count, q)
    return n, float(loss), keys


def decode_update(parts: Mapping[str, np.ndarray], global_weights: Mapping[str, np.ndarray],
                  settings: SecureAggregation, *, max_count: int,
                  local_keys: Sequence[str] = ()) -> DecodedUpdate:
    """Check the sum of the sites' update vectors and read the FedAvg from it.

    Parameters
    ----------
    parts : mapping of str to int64 array
        The secure sum's total per part (:attr:`~multimodal_fl.federated.pooling.SecureTotal.
        parts`).
    global_weights : mapping of str to ndarray
        The weights the round started from.
    settings : SecureAggregation
    max_count : int
        The largest plausible total count: the training counts the summed sites declared.
    local_keys : sequence of str
        FedBN's local keys (not summed).

    Returns
    -------
    DecodedUpdate

    Raises
    ------
    UpdateRejected
        A missing part or width, a count outside ``[0, max_count]``, a mean delta outside
        ``±clip`` or a non-finite result: the sum is not used.
    """
    n, loss, summed = _summed(parts, global_weights, settings, max_count=max_count,
                              max_key_count=max_count, local_keys=local_keys)
    averaged: StateDict = {}
    counts: dict[str, int] = {}
    square = 0.0
    for key, (count, q) in summed.items():
        counts[key] = count
        if count == 0:
            continue
        old = np.asarray(global_weights[key])
        mean = q.astype(np.float64) / (settings.scale * count)
        square += float(mean @ mean)
        new = old.astype(np.float64).ravel() + mean
        if not np.isfinite(new).all():
            raise UpdateRejected(f"secure sum: the new value of {key!r} is not finite")
        averaged[key] = new.reshape(old.shape).astype(old.dtype)
    return DecodedUpdate(averaged, loss, n, counts, math.sqrt(square))


@dataclass
class ClippedSum:
    """What the server reads from the sum of the sites' clipped update vectors (site-level DP).

    Attributes
    ----------
    sums : dict of str to ndarray
        Per key some site changed, the sum of the sites' clipped updates (float64, the key's
        shape): what the server adds the noise to.
    train_loss : float
        The count-weighted mean training loss.
    n_samples : int
        The summed training count.
    counts : dict of str to int
        Per summed key, how many sites changed it.
    clipped : int
        How many sites scaled their update down to the clipping norm.
    sum_norm : float
        The L2 norm of the summed clipped updates (at most ``n_sites * clip_norm`` plus the
        quantisation error).
    """

    sums: StateDict
    train_loss: float
    n_samples: int
    counts: dict[str, int]
    clipped: int
    sum_norm: float


def decode_clipped_sum(parts: Mapping[str, np.ndarray], global_weights: Mapping[str, np.ndarray],
                       settings: SecureAggregation, *, max_count: int, n_sites: int,
                       local_keys: Sequence[str] = ()) -> ClippedSum:
    """Check the sum of ``n_sites`` clipped update vectors and read the sum of the updates.

    Parameters
    ----------
    parts : mapping of str to int64 array
        The secure sum's total per part.
    global_weights : mapping of str to ndarray
        The weights the round started from.
    settings : SecureAggregation
        With ``clip_norm`` (the sites clipped to it).
    max_count : int
        The training counts the summed sites declared.
    n_sites : int
        The sites in the sum.
    local_keys : sequence of str
        FedBN's local keys (not summed).

    Returns
    -------
    ClippedSum

    Raises
    ------
    UpdateRejected
        As :func:`decode_update`, a key changed by more than ``n_sites`` sites, a clipped count
        outside ``[0, n_sites]``, or a sum longer than ``n_sites`` clipped updates can be.
    """
    if settings.clip_norm is None:
        raise ValueError("decode_clipped_sum: the settings have no clip_norm (site-level DP)")
    n, loss, summed = _summed(parts, global_weights, settings, max_count=max_count,
                              max_key_count=n_sites, local_keys=local_keys)
    clipped = int(_part(parts, CLIPPED_PART, 1)[0])
    if not 0 <= clipped <= n_sites:
        raise UpdateRejected(f"secure sum: {clipped} sites clipped, expected 0 to {n_sites}")
    sums: StateDict = {}
    counts: dict[str, int] = {}
    size = 0
    for key, (count, q) in summed.items():
        counts[key] = count
        size += int(np.asarray(global_weights[key]).size)
        if count:
            sums[key] = (q.astype(np.float64) / settings.scale).reshape(
                np.shape(global_weights[key]))
    norm = math.sqrt(sum(float(np.sum(np.square(v))) for v in sums.values()))
    # each site's quantised update is within sqrt(size) / (2 S) of its clipped one
    bound = n_sites * (settings.clip_norm + math.sqrt(size) * settings.error_bound)
    if norm > bound:
        raise UpdateRejected(f"secure sum: the summed updates' norm {norm:.6g} exceeds {n_sites} "
                             f"sites x clip_norm {settings.clip_norm:g}: a site did not clip")
    return ClippedSum(sums, loss, n, counts, clipped, norm)


def update_summary(decoded: DecodedUpdate | ClippedSum, settings: SecureAggregation,
                   sites: Sequence[str], excluded: Mapping[str, str]) -> dict[str, Any]:
    """What a round record keeps of a secured round (no per-site number).

    Parameters
    ----------
    decoded : DecodedUpdate or ClippedSum
        With site-level DP (:class:`ClippedSum`) no norm is kept: the sum before the noise is
        not for the record (``clip_norm`` is, and the sites' clipped count is in ``site_dp``).
    settings : SecureAggregation
    sites : sequence of str
        The sites whose update is in the sum.
    excluded : mapping of str to str
        Sites left out of the sum, with the reason.

    Returns
    -------
    dict
    """
    out = {"sites": list(sites), "excluded": dict(excluded), "clip": settings.clip,
           "scale_bits": settings.scale_bits, "bits": settings.bits,
           "error_bound": settings.error_bound, "n_samples": decoded.n_samples}
    if isinstance(decoded, DecodedUpdate):
        out["delta_norm"] = decoded.delta_norm
    else:
        out["clip_norm"] = settings.clip_norm
    return out
