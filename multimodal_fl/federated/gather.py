"""Gather one stage's replies: broadcast, keep the good ones, fail with every site's reason.

The stages around the training rounds (PCA, init, moments, predict) and the PCA analysis
broadcast one request per site and need a minimum number of good replies; this is that step,
over any :class:`~multimodal_fl.federated.server.Federation`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from multimodal_fl.federated.protocol import Reply, Request, SiteFailure
from multimodal_fl.federated.server import Federation

__all__ = ["StageFailed", "gather"]

log = logging.getLogger(__name__)


class StageFailed(RuntimeError):
    """A stage outside the training rounds got too few replies; the message names each site."""


def gather(
    federation: Federation, requests: Mapping[str, Request], timeout: float | None,
    *, stage: str, minimum: int, failed: dict[str, str] | None = None,
) -> dict[str, Reply]:
    """Broadcast one stage's requests and keep the good replies, in sorted site order.

    A reply is good when it names the site it went to and answers the request's kind;
    anything else (a :class:`SiteFailure`, a stray reply) is logged with its reason.

    Parameters
    ----------
    federation : Federation
    requests : mapping of site to Request
    timeout : float or None
    stage : str
        Named in logs and errors.
    minimum : int
        Good replies needed.
    failed : dict or None
        Filled with site -> reason for each site that gave no good reply.

    Returns
    -------
    dict of str to Reply

    Raises
    ------
    StageFailed
        With fewer than ``minimum`` good replies; the message gives each failed site's reason.
    """
    replies = federation.broadcast(requests, timeout)
    good: dict[str, Reply] = {}
    failed = {} if failed is None else failed
    for site in sorted(requests):
        reply = replies.get(site)
        if isinstance(reply, Reply) and reply.site == site and reply.kind == requests[site].kind:
            good[site] = reply
        else:
            reason = reply.reason if isinstance(reply, SiteFailure) else f"bad reply {reply!r}"
            failed[site] = reason
            log.warning("stage %s: site %s failed: %s", stage, site, reason)
    if len(good) < minimum:
        detail = "; ".join(f"{s}: {r}" for s, r in failed.items()) or "no sites"
        raise StageFailed(
            f"stage '{stage}': {len(good)} site(s) replied, at least {minimum} needed ({detail})"
        )
    return good

