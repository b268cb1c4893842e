"""The federated server loop, written once against a small :class:`Federation` interface.

Knows no modality, no file format and no torch: it sends :class:`~.messages.Request` objects,
receives :class:`~.messages.Reply` objects, checks and aggregates state dicts of numpy arrays.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

from multimodal_fl.federated.messages import Reply, Request, SiteFailure

__all__ = ["Federation", "Site"]


@runtime_checkable
class Site(Protocol):
    """The site side: answers one request at a time.

    A site owns its data and its model code; the server sees it only through this method.
    It must set ``Reply.site`` to its own name, ``Reply.kind`` / ``Reply.round`` to the
    request's, and draw all randomness from
    ``messages.site_seed(request.config["seed"], site, request.round)``.
    """

    def handle(self, request: Request) -> Reply:
        """Answer ``request`` (train, evaluate, describe, ...).

        Parameters
        ----------
        request : Request
            What to do.

        Returns
        -------
        Reply
            The answer. Raising is allowed: the federation turns it into a SiteFailure.
        """
        ...


@runtime_checkable
class Federation(Protocol):
    """How the server reaches sites: in this process, over Flower's Grid, ..."""

    def sites(self) -> list[str]:
        """Return the names of the sites currently reachable, in any order.

        Returns
        -------
        list[str]
            Site names.
        """
        ...

    def broadcast(
        self, requests: Mapping[str, Request], timeout: float | None = None
    ) -> dict[str, Reply | SiteFailure]:
        """Send one request per site and gather the replies.

        Parameters
        ----------
        requests : Mapping[str, Request]
            Site name -> the request for that site.
        timeout : float or None
            Seconds to wait for each reply (None: wait as long as it takes).

        Returns
        -------
        dict[str, Reply | SiteFailure]
            One entry per requested site: its reply, or a SiteFailure naming why there is none
            (the site raised, timed out or is unknown). Never raises for a site's fault.
        """
        ...
