"""Progress events: what long-running library code reports, so that nothing in it prints.

Library code that takes a while (data preparation, the in-process federation, the baselines'
training loops) accepts an optional ``progress: ProgressCallback`` and calls it with small
frozen events; the command line renders them (``rich.progress`` bars on a terminal, plain
lines in a log). Reporting never changes what is computed.

Events
------
:class:`PrepareEvent`
    One site's modality being prepared: FHIR files read, images read, notes or images
    embedded by a frozen encoder; how many came from the embedding cache.
:class:`ReplyEvent`
    One site's answer to a broadcast (a federated round's ``fit``, ``evaluate``, a stage's
    ``predict``, ...), and the start of each broadcast (``answered == 0``).
:class:`StepEvent`
    One training step of a non-federated model (the local and centralized baselines).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["PrepareEvent", "ProgressCallback", "ProgressEvent", "ReplyEvent", "StepEvent",
           "Tally"]


@dataclass(frozen=True)
class PrepareEvent:
    """Preparation of one site's modality: ``done`` of ``total`` items, some from the cache.

    Parameters
    ----------
    site : str
        The site.
    modality : str
        ``"records"`` (the FHIR files read to build the cohort), ``"image"`` or ``"text"``.
    action : str
        ``"read"`` (files read and preprocessed) or ``"embedded"`` (a frozen encoder applied).
    done : int
        Items finished so far, those served from the cache included.
    total : int
        Items to prepare (patients with that modality; files for ``"records"``).
    cache_hits : int, default 0
        Items served from the embedding cache so far.
    """

    site: str
    modality: str
    action: str
    done: int
    total: int
    cache_hits: int = 0


@dataclass(frozen=True)
class ReplyEvent:
    """A site's answer to one broadcast arrived (or the broadcast started).

    Parameters
    ----------
    kind : str
        The request kind (``"fit"``, ``"evaluate"``, ``"predict"``, ...).
    round : int
        The request's round (0 for the stages outside the rounds).
    answered : int
        Sites that have answered so far (0: the broadcast starts).
    asked : int
        Sites asked.
    site : str or None, default None
        The site that answered (``None`` when the broadcast starts).
    ok : bool, default True
        False when the answer is a failure (the site raised or timed out).
    """

    kind: str
    round: int
    answered: int
    asked: int
    site: str | None = None
    ok: bool = True


@dataclass(frozen=True)
class StepEvent:
    """One training step of a model trained outside the federation (the baselines).

    Parameters
    ----------
    label : str
        Which model (``"local site_a"``, ``"centralized"``).
    step : int
        Steps done.
    total : int
        Steps planned (early stopping may end before).
    loss : float
        The last step's training loss.
    """

    label: str
    step: int
    total: int
    loss: float


#: Any progress event.
ProgressEvent = PrepareEvent | ReplyEvent | StepEvent
#: What library code calls with each event.
ProgressCallback = Callable[[ProgressEvent], None]


class Tally:
    """Counts the items of one site's modality and reports them as :class:`PrepareEvent`.

    Parameters
    ----------
    progress : ProgressCallback or None
        Where events go (``None``: counting only).
    site, modality, action : str
        See :class:`PrepareEvent`.
    total : int
        Items to prepare.

    Examples
    --------
    >>> seen = []
    >>> tally = Tally(seen.append, "site_a", "image", "read", total=3)
    >>> tally.start(); tally.hit(2); tally.advance(); tally.finish()
    >>> [(e.done, e.cache_hits) for e in seen]
    [(0, 0), (2, 2), (3, 2), (3, 2)]
    """

    def __init__(self, progress: ProgressCallback | None, site: str, modality: str,
                 action: str, *, total: int) -> None:
        self.progress = progress
        self.site, self.modality, self.action = site, modality, action
        self.total = total
        self.done = 0
        self.cache_hits = 0

    def _report(self) -> None:
        if self.progress is not None:
            self.progress(PrepareEvent(self.site, self.modality, self.action,
                                       min(self.done, self.total), self.total, self.cache_hits))

    def start(self) -> None:
        """Report that the work starts (nothing done yet)."""
        self.done = self.cache_hits = 0
        self._report()

    def hit(self, n: int) -> None:
        """``n`` items were found in the cache."""
        self.cache_hits += n
        self.done += n
        if n:
            self._report()

    def advance(self, n: int = 1) -> None:
        """``n`` more items were computed."""
        self.done += n
        self._report()

    def reach(self, done: int) -> None:
        """``done`` items are finished (cache hits included); reported when it moved."""
        if done != self.done:
            self.done = done
            self._report()

    def finish(self, cache_hits: int | None = None) -> None:
        """Report the work done (``cache_hits``: the exact count, when known at the end)."""
        if cache_hits is not None:
            self.cache_hits = cache_hits
        self.done = self.total
        self._report()
