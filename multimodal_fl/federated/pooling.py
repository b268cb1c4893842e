"""Secure sums over a federation: the server drives the four steps and keeps only the total.

:func:`secure_total` runs the protocol of :mod:`multimodal_fl.federated.secure_sum` over any
:class:`~multimodal_fl.federated.protocol.Federation` (in process or Flower): one ``secure_sum``
request per site and step, answered by each site's
:class:`~multimodal_fl.federated.secure_sum.SecureSumParty`:

1. ``advertise``: each site that holds the vector and takes part sends two public keys and the
   names and widths of the parts it holds (``overall``, ``sex=F``, ...); a site that does not
   take part says why (e.g. too few test patients). With fewer than
   :data:`~multimodal_fl.federated.secure_sum.MIN_SITES` sites the sum is refused here, before
   any vector is sent. A part held by fewer than that many sites is left out of the layout.
2. ``share``: the server relays the keys; each site returns its encrypted Shamir shares. A
   site that fails here restarts the sum without it (nothing has been sent yet).
3. ``masked``: each site sends its masked vector, parts laid out in the server's order.
   A site that drops now does not stop the sum.
4. ``unmask``: the sites that sent a masked vector return the shares the server needs to
   remove the masks; the server keeps the total and splits it back into parts.

This module knows no modality, no file and no config schema.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from multimodal_fl.federated.protocol import Doc, Federation, Reply, Request, SiteFailure
from multimodal_fl.federated.secure_sum import (
    DEFAULT_BITS,
    MIN_SITES,
    SecureSumError,
    SecureSumServer,
    keys_arrays,
    reply_bytes,
    step_request,
)

__all__ = ["REFUSED", "SecureTotal", "complete_parts", "secure_total"]

log = logging.getLogger(__name__)

#: How a refused secure sum starts its reason (``metrics.json`` shows it).
REFUSED = f"refused: a secure sum needs at least {MIN_SITES} sites"

IntArray = npt.NDArray[np.int64]


@dataclass
class SecureTotal:
    """What the server learns from one secure sum.

    Attributes
    ----------
    vector : str
        The vector's name.
    parts : dict of str to int64 array
        The total of every part in the layout (empty when refused).
    contributors : dict of str to list of str
        Per part, the sites whose masked vector held it.
    sites : list of str
        The sites whose masked vector is in the total.
    excluded : dict of str to str
        Sites left out, with the reason (refused, failed, dropped).
    left_out : dict of str to str
        Parts held by some site but not summed, with the reason.
    min_cell : int
        The largest small-cell threshold the contributing sites named.
    refused : str or None
        Why there is no total (starts with :data:`REFUSED` when too few sites took part).
    """

    vector: str
    parts: dict[str, IntArray] = field(default_factory=dict)
    contributors: dict[str, list[str]] = field(default_factory=dict)
    sites: list[str] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)
    left_out: dict[str, str] = field(default_factory=dict)
    min_cell: int = 0
    refused: str | None = None


def _ask(federation: Federation, requests: Mapping[str, Request], timeout: float | None,
         excluded: dict[str, str], step: str) -> dict[str, Reply]:
    """Broadcast; keep the good replies, note every other site's reason in ``excluded``."""
    answers = federation.broadcast(requests, timeout)
    good: dict[str, Reply] = {}
    for site in sorted(requests):
        reply = answers.get(site)
        if isinstance(reply, Reply) and reply.site == site and reply.kind == requests[site].kind:
            good[site] = reply
            continue
        reason = reply.reason if isinstance(reply, SiteFailure) else f"bad reply {reply!r}"
        excluded[site] = f"{step}: {reason}"
        log.info("secure sum step %s: site %s left out: %s", step, site, reason)
    return good


def _too_few(n: int, what: str, need: int = MIN_SITES) -> str:
    if need == MIN_SITES:
        return f"{REFUSED}, {n} {what}"
    return f"{REFUSED} ({need} for this sum, the caller's minimum), {n} {what}"


@dataclass(frozen=True)
class _Advert:
    """One site's advertise reply: its public keys and the parts it holds."""

    keys: dict[str, bytes]
    parts: frozenset[str]
    widths: dict[str, int]
    min_cell: int


def _advertise(federation: Federation, sites: Sequence[str], vector: str, round: int,
               timeout: float | None, bits: int, result: SecureTotal) -> dict[str, _Advert]:
    replies = _ask(federation, {s: step_request("advertise", vector, round, bits=bits)
                                for s in sites}, timeout, result.excluded, "advertise")
    out: dict[str, _Advert] = {}
    for site, reply in replies.items():
        try:
            doc = reply.document(Doc.SECURE_SUM)
            names = [str(p) for p in doc["parts"]]
            widths = dict(zip(names, (int(w) for w in doc["widths"]), strict=True))
            out[site] = _Advert(reply_bytes(reply), frozenset(names), widths,
                                int(doc.get("min_cell", 0)))
        except (ValueError, KeyError, TypeError) as exc:
            result.excluded[site] = f"advertise: {type(exc).__name__}: {exc}"
    seen: dict[str, set[int]] = {}
    for advert in out.values():
        for part, width in advert.widths.items():
            seen.setdefault(part, set()).add(width)
    differ = sorted(p for p, w in seen.items() if len(w) > 1)
    if differ:
        raise SecureSumError(f"secure sum of {vector!r}: the sites' parts {differ[:3]} differ "
                             f"in width {sorted(seen[differ[0]])}; every site must lay out "
                             "the same vector")
    return out


def _attribute(part: str) -> str | None:
    """The attribute of a subgroup part (``"sex=F"`` -> ``"sex"``); ``None`` for a whole part."""
    return part.split("=", 1)[0] if "=" in part else None


def complete_parts(held: Mapping[str, frozenset[str]]) -> tuple[list[str], dict[str, str]]:
    """The parts that may be summed, and why each other part is not.

    A part held by fewer than :data:`~multimodal_fl.federated.secure_sum.MIN_SITES` sites is
    not summed. Nor is any level of an attribute that is not *complete*: an attribute's levels
    are summed only when every site that sums a whole part (``overall``) also sums that
    attribute, and every level any of them holds is summed. Otherwise the whole part's total
    minus the summed levels would be the patients left out — one site's level of 1 patient, or
    the whole histogram of a site whose policy keeps its subgroups home.

    Parameters
    ----------
    held : mapping of site to the names of the parts it holds

    Returns
    -------
    (list of str, dict of str to str)
        The parts to sum, sorted; the parts left out with the reason.
    """
    holders: dict[str, int] = {}
    for parts in held.values():
        for part in parts:
            holders[part] = holders.get(part, 0) + 1
    left_out = {part: f"held by {n} site(s); a secure sum needs at least {MIN_SITES}"
                for part, n in sorted(holders.items()) if n < MIN_SITES}
    whole = [s for s, parts in held.items() if any(_attribute(p) is None for p in parts)]
    for attribute in sorted({a for p in holders if (a := _attribute(p)) is not None}):
        levels = sorted(p for p in holders if _attribute(p) == attribute)
        short = [p for p in levels if p in left_out]
        without = sorted(s for s in whole if not any(p in levels for p in held[s]))
        if not short and not without:
            continue
        why = (f"level(s) {', '.join(short)} cannot be summed" if short else
               f"site(s) {', '.join(without)} send no {attribute!r} levels")
        for part in levels:
            left_out.setdefault(part, f"{attribute!r} left out: {why}, and the whole minus "
                                      "the other levels would give their patients")
    return sorted(p for p in holders if p not in left_out), left_out


def _layout(adverts: Mapping[str, _Advert], result: SecureTotal) -> list[str]:
    """The parts :func:`complete_parts` lets the sites sum, in sorted order."""
    layout, left_out = complete_parts({s: a.parts for s, a in adverts.items()})
    result.left_out.update(left_out)
    return layout


def secure_total(federation: Federation, sites: Sequence[str], vector: str, *,
                 round: int = 0, timeout: float | None = None,
                 bits: int = DEFAULT_BITS, minimum: int = MIN_SITES) -> SecureTotal:
    """Sum the sites' vector ``vector`` so that the server learns only the total.

    Parameters
    ----------
    federation : Federation
    sites : sequence of str
        The sites to ask (each must hold the vector, e.g. after the predict stage).
    vector : str
        The vector's name (``config["vector"]``).
    round : int
        The requests' round.
    timeout : float or None
        Per-site timeout of every step.
    bits : int
        Modulus exponent (the total must stay below ``2**bits``).
    minimum : int
        The fewest sites whose vectors the caller can use (at least :data:`MIN_SITES`). With
        fewer masked vectors the sum stops **before** its unmask step: a total the caller
        would reject is never computed, so the sites have not unmasked that content with this
        set, and a retry of the same content over more sites is not a second sum of it
        (:class:`~multimodal_fl.federated.secure_sum.SecureSumParty` refuses those).

    Returns
    -------
    SecureTotal
        The total per part, or ``refused`` with the reason; never raises for a site's fault.
    """
    result = SecureTotal(vector)
    need = max(int(minimum), MIN_SITES)
    candidates = sorted(sites)
    if len(candidates) < need:  # not even the keys are asked for
        result.refused = _too_few(len(candidates), "asked", need)
        return result
    while True:
        adverts = _advertise(federation, candidates, vector, round, timeout, bits, result)
        if len(adverts) < need:
            result.refused = _too_few(len(adverts), "took part", need)
            return result
        server = SecureSumServer(bits)
        keys = server.collect_keys({s: a.keys for s, a in adverts.items()})
        shared = _ask(federation, {s: step_request("share", vector, round,
                                                   arrays=keys_arrays(keys))
                                   for s in adverts}, timeout, result.excluded, "share")
        if len(shared) == len(adverts):
            break
        candidates = sorted(shared)  # a site failed before any vector was sent: start again
    result.min_cell = max(a.min_cell for a in adverts.values())
    layout = _layout(adverts, result)
    routed = server.route({s: reply_bytes(r, "to/") for s, r in shared.items()})
    masked_replies = _ask(federation, {
        s: step_request("masked", vector, round, parts=json.dumps(layout),
                        widths=json.dumps([_width(adverts, p) for p in layout]), arrays={
            f"from/{sender}": np.frombuffer(c, dtype=np.uint8).copy()
            for sender, c in routed.get(s, {}).items()})
        for s in shared}, timeout, result.excluded, "masked")
    masked = {s: np.asarray(r.arrays.get("y", np.zeros(0)), dtype=np.int64)
              for s, r in masked_replies.items()}
    if len(masked) < need:  # stop before unmasking a total the caller could not use
        result.refused = _too_few(len(masked), "sent a masked vector", need)
        return result
    return _unmask(federation, server, result, masked, sorted(shared), adverts, layout,
                   round=round, timeout=timeout)


def _width(adverts: Mapping[str, _Advert], part: str) -> int:
    """A part's width (the same at every site that holds it, checked at advertise)."""
    return next(a.widths[part] for a in adverts.values() if part in a.widths)


def _unmask(federation: Federation, server: SecureSumServer, result: SecureTotal,
            masked: Mapping[str, IntArray], shared: list[str], adverts: Mapping[str, _Advert],
            layout: list[str], *, round: int, timeout: float | None) -> SecureTotal:
    """Step 4: the shares that remove the masks; the total split back into its parts."""
    sent, dropped = sorted(masked), sorted(set(shared) - set(masked))
    unmasked = _ask(federation, {s: step_request("unmask", result.vector, round,
                                                 sent=json.dumps(sent),
                                                 dropped=json.dumps(dropped))
                                 for s in sent}, timeout, result.excluded, "unmask")
    try:
        total = server.total(masked, {s: reply_bytes(r) for s, r in unmasked.items()}, shared)
    except SecureSumError as exc:
        result.refused = f"secure sum of {result.vector!r} failed: {exc}"
        return result
    result.sites = sent
    # a holder that dropped after sharing may leave a part short, and its attribute incomplete
    kept, short = complete_parts({s: adverts[s].parts & frozenset(layout) for s in sent})
    for part, why in short.items():
        result.left_out[part] = f"after the masked step: {why}"
    start = 0
    for part in layout:
        end = start + _width(adverts, part)
        if part in kept:
            result.parts[part] = total[start:end].copy()
            result.contributors[part] = [s for s in sent if part in adverts[s].parts]
        start = end
    return result
