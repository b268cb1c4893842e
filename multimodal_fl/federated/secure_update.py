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
say nothing about it. The server learns, per key, ``sum c_i q_i / (S C)``: the weighted mean
delta, with ``|error| <= 1 / (2 S)`` per value (:attr:`SecureAggregation.error_bound`),
whatever the counts. Integer and boolean buffers (BatchNorm's ``num_batches_tracked``) are
not in the sum: they keep their global value (PyTorch reads ``num_batches_tracked`` only when
a BatchNorm layer has ``momentum=None``, which the package's models never set). FedBN's local
keys stay at the site, as in a plain round.

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

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from multimodal_fl.federated.aggregation import group_of
from multimodal_fl.federated.protocol import ConfigValue, Reply, Request, StateDict
from multimodal_fl.federated.secure_sum import SecureSumParty

__all__ = [
    "COUNT_PART",
    "DELTA_PREFIX",
    "LOSS_PART",
    "UPDATE_VECTOR",
    "WEIGHT_PREFIX",
    "DecodedUpdate",
    "SecureAggregation",
    "UpdateRejected",
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

IntArray = npt.NDArray[np.int64]
_MAX_NAMED = 3


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
    """

    clip: float = 64.0
    scale_bits: int = 24
    bits: int = 62

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
        return {"secure_aggregation": True, "secure_clip": float(self.clip),
                "secure_scale_bits": int(self.scale_bits), "secure_bits": int(self.bits)}

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
        return cls(clip=float(c.get("secure_clip", cls.clip)),
                   scale_bits=int(c.get("secure_scale_bits", cls.scale_bits)),
                   bits=int(c.get("secure_bits", cls.bits)))


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


def _quantised(key: str, new: np.ndarray | None, old: np.ndarray, settings: SecureAggregation,
               site: str) -> tuple[IntArray, int]:
    """One key's quantised delta and how many of its values lie outside ``±clip``."""
    if new is None:
        return np.zeros(old.size, np.int64), 0
    if new.shape != old.shape:
        raise UpdateRejected(f"site {site}: secure update of {key!r} has shape "
                             f"{tuple(new.shape)}, the global weights {tuple(old.shape)}")
    delta = new.astype(np.float64).ravel() - old.astype(np.float64).ravel()
    if not np.isfinite(delta).all():
        raise UpdateRejected(f"site {site}: secure update of {key!r} has non-finite values; "
                             "nothing was masked or sent")
    q = np.rint(delta * settings.scale)
    clipped = int(np.count_nonzero(np.abs(q) > settings.offset))
    return np.clip(q, -settings.offset, settings.offset).astype(np.int64), clipped


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
    local_keys : sequence of str
        FedBN's local keys (not summed).
    site : str
        The site's name (for messages).

    Returns
    -------
    dict of str to int64 array
        ``n``, ``loss``, ``w/<key>`` and ``d/<key>`` for every summed key.

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
    for key in summed_keys(global_weights, local_keys):
        group = group_of(key, group_counts)
        count = n if group is None else int(group_counts[group])
        if count and key not in new_weights:
            raise UpdateRejected(f"site {site}: secure update lacks {key!r}, a key its "
                                 f"group counts {count} patients for")
        q, out = _quantised(key, new_weights.get(key) if count else None,
                            np.asarray(global_weights[key]), settings, site)
        if out:
            clipped[key] = out
        parts[WEIGHT_PREFIX + key] = np.array([count], np.int64)
        parts[DELTA_PREFIX + key] = count * (q + k)
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
        ``n_samples`` and ``local_keys`` only: no weight, no count per group, no loss.

    Raises
    ------
    UpdateRejected
        See :func:`encode_update`.
    """
    parts = encode_update(reply.weights, request.weights, n_samples=reply.n_samples,
                          group_counts=reply.group_counts,
                          loss=float(reply.metrics.get("loss", 0.0)), settings=settings,
                          local_keys=reply.local_keys, site=reply.site)
    party.hold(UPDATE_VECTOR, parts, min_cell=min_cell, once=True)
    return Reply(reply.site, reply.kind, reply.round, n_samples=reply.n_samples,
                 local_keys=list(reply.local_keys))


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
    k = settings.offset
    n = int(_part(parts, COUNT_PART, 1)[0])
    if not 0 < n <= max_count:
        raise UpdateRejected(f"secure sum: training count {n}, expected 1 to {max_count} (the "
                             "summed sites' declared counts)")
    loss = (int(_part(parts, LOSS_PART, 1)[0]) - k * n) / (settings.scale * n)
    averaged: StateDict = {}
    counts: dict[str, int] = {}
    square = 0.0
    for key in summed_keys(global_weights, local_keys):
        old = np.asarray(global_weights[key])
        count = int(_part(parts, WEIGHT_PREFIX + key, 1)[0])
        if not 0 <= count <= max_count:
            raise UpdateRejected(f"secure sum: count of {key!r} is {count}, expected 0 to "
                                 f"{max_count}")
        counts[key] = count
        if count == 0:
            continue
        q = _part(parts, DELTA_PREFIX + key, old.size) - k * count
        if np.abs(q).max(initial=0) > k * count:
            raise UpdateRejected(f"secure sum: the mean delta of {key!r} lies outside "
                                 f"±{settings.clip:g}: a site's masked vector was out of range")
        mean = q.astype(np.float64) / (settings.scale * count)
        square += float(mean @ mean)
        new = old.astype(np.float64).ravel() + mean
        if not np.isfinite(new).all():
            raise UpdateRejected(f"secure sum: the new value of {key!r} is not finite")
        averaged[key] = new.reshape(old.shape).astype(old.dtype)
    return DecodedUpdate(averaged, float(loss), n, counts, math.sqrt(square))


def update_summary(decoded: DecodedUpdate, settings: SecureAggregation,
                   sites: Sequence[str], excluded: Mapping[str, str]) -> dict[str, Any]:
    """What a round record keeps of a secured round (no per-site number).

    Parameters
    ----------
    decoded : DecodedUpdate
    settings : SecureAggregation
    sites : sequence of str
        The sites whose update is in the sum.
    excluded : mapping of str to str
        Sites left out of the sum, with the reason.

    Returns
    -------
    dict
    """
    return {"sites": list(sites), "excluded": dict(excluded), "clip": settings.clip,
            "scale_bits": settings.scale_bits, "bits": settings.bits,
            "error_bound": settings.error_bound, "n_samples": decoded.n_samples,
            "delta_norm": decoded.delta_norm}
