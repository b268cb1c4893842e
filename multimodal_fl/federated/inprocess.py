"""The embedded federation: sites are objects in this process, asked one after another."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from multimodal_fl.federated.protocol import Reply, Request, SiteFailure
from multimodal_fl.federated.server import Site
from multimodal_fl.progress import ProgressCallback, broadcast_reporter

__all__ = ["InProcessFederation"]

log = logging.getLogger(__name__)


class InProcessFederation:
    """A :class:`~.server.Federation` whose sites live in this process (the default engine).

    Requests go to the sites sequentially in sorted site order. Each site gets its own copy of
    the request's arrays and the server gets a copy of the reply's, so no array is shared
    between a site and the server (as across a network).

    Parameters
    ----------
    sites : Mapping[str, Site]
        Site name -> site object (anything with ``handle(request) -> Reply``).
    progress : callable or None
        Called with a :class:`~multimodal_fl.progress.ReplyEvent` when a broadcast starts
        and after each site's answer (the sites are asked one after another).

    Notes
    -----
    A site that raises becomes a :class:`~.messages.SiteFailure` carrying the exception's type
    and message. The timeout is measured per site: a site cannot be interrupted in this
    process, so one that takes longer than ``timeout`` runs to its end and its reply is then
    discarded as timed out.
    """

    def __init__(self, sites: Mapping[str, Site], *,
                 progress: ProgressCallback | None = None) -> None:
        if not sites:
            raise ValueError("InProcessFederation needs at least one site; got none")
        for name, site in sites.items():
            if not callable(getattr(site, "handle", None)):
                raise TypeError(
                    f"site {name!r} is a {type(site).__name__} without a handle(request) method; "
                    "expected an object implementing multimodal_fl.federated.server.Site"
                )
        self._sites = dict(sites)
        self.progress = progress
        #: Seconds each site's ``handle`` took in the last broadcast (for overhead benchmarks).
        self.last_site_seconds: dict[str, float] = {}

    def sites(self) -> list[str]:
        """Return the site names, sorted.

        Returns
        -------
        list[str]
            Site names.
        """
        return sorted(self._sites)

    def broadcast(
        self, requests: Mapping[str, Request], timeout: float | None = None
    ) -> dict[str, Reply | SiteFailure]:
        """Hand each request to its site, one after another, and collect the answers.

        Parameters
        ----------
        requests : Mapping[str, Request]
            Site name -> request.
        timeout : float or None
            Per-site limit in seconds (None: none).

        Returns
        -------
        dict[str, Reply | SiteFailure]
            One answer per requested site.
        """
        answers: dict[str, Reply | SiteFailure] = {}
        self.last_site_seconds = {}
        report = broadcast_reporter(self.progress, requests)
        for name in sorted(requests):
            answers[name] = self._ask(name, requests[name], timeout)
            report(name, isinstance(answers[name], Reply))
        return answers

    def _ask(self, name: str, request: Request, timeout: float | None) -> Reply | SiteFailure:
        """One site's answer to its request, as the server will see it."""
        site = self._sites.get(name)
        if site is None:
            return SiteFailure(
                name, f"unknown site {name!r}; this federation has {sorted(self._sites)}"
            )
        own = request.copy()
        started = time.perf_counter()
        try:
            reply = site.handle(own)
        except Exception as exc:  # a site's fault must never stop the server
            log.debug("site %s raised", name, exc_info=True)
            self.last_site_seconds[name] = time.perf_counter() - started
            return SiteFailure(name, f"{type(exc).__name__}: {exc}")
        elapsed = time.perf_counter() - started
        self.last_site_seconds[name] = elapsed
        if timeout is not None and elapsed > timeout:
            return SiteFailure(
                name, f"timed out: replied after {elapsed:.2f} s, timeout {timeout:g} s"
            )
        if not isinstance(reply, Reply):
            return SiteFailure(
                name, f"handle() returned a {type(reply).__name__}, expected a Reply"
            )
        return reply.copy()
