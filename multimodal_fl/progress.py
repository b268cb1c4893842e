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

Across processes
----------------
A Flower ServerApp runs in a process of its own: with the run config's ``progress-file`` its
federation appends every event to that file as a JSON line (:class:`EventLog`), and
``mmfl train --engine flower`` / ``mmfl flower local`` read them back as they come
(:class:`EventTail`) to draw the same bars as the in-process engine.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["EventLog", "EventTail", "PrepareEvent", "ProgressCallback", "ProgressEvent",
           "ReplyEvent", "StepEvent", "Tally", "broadcast_reporter", "event_from_json",
           "event_to_json"]


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


def broadcast_reporter(progress: ProgressCallback | None, requests: Mapping[str, Any]
                       ) -> Callable[[str, bool], None]:
    """Report a broadcast's start to ``progress`` (``answered == 0``); return what reports each
    site's answer as it comes (both federations, in process and over Flower).

    Parameters
    ----------
    progress : ProgressCallback or None
        Where the :class:`ReplyEvent` go (``None`` or nothing asked: nowhere).
    requests : Mapping[str, Request]
        The broadcast: site -> request (its ``kind`` and ``round`` name the events).

    Returns
    -------
    callable
        ``report(site, ok)``: one more site answered (``ok`` False: a failure).

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> seen, fit = [], SimpleNamespace(kind="fit", round=3)
    >>> report = broadcast_reporter(seen.append, {"site_a": fit, "site_b": fit})
    >>> report("site_b", False)
    >>> [(e.answered, e.site, e.ok) for e in seen]
    [(0, None, True), (1, 'site_b', False)]
    """
    if progress is None or not requests:
        return lambda site, ok: None
    callback = progress
    first = next(iter(requests.values()))
    kind, rnd, asked = str(first.kind), int(first.round), len(requests)
    callback(ReplyEvent(kind, rnd, 0, asked))
    answered = 0

    def report(site: str, ok: bool) -> None:
        nonlocal answered
        answered += 1
        callback(ReplyEvent(kind, rnd, answered, asked, site=site, ok=ok))

    return report


_EVENT_TYPES: dict[str, type[PrepareEvent] | type[ReplyEvent] | type[StepEvent]] = {
    "prepare": PrepareEvent, "reply": ReplyEvent, "step": StepEvent}


def event_to_json(event: ProgressEvent) -> str:
    """One event as one line of JSON (no newline).

    Parameters
    ----------
    event : ProgressEvent

    Returns
    -------
    str

    Examples
    --------
    >>> event_to_json(StepEvent("centralized", 3, 10, 0.5))
    '{"event": "step", "label": "centralized", "step": 3, "total": 10, "loss": 0.5}'
    """
    name = next(k for k, v in _EVENT_TYPES.items() if isinstance(event, v))
    return json.dumps({"event": name, **asdict(event)})


def event_from_json(line: str) -> ProgressEvent:
    """The event :func:`event_to_json` wrote.

    Parameters
    ----------
    line : str

    Returns
    -------
    ProgressEvent

    Raises
    ------
    ValueError
        When the line is not such an event.

    Examples
    --------
    >>> event_from_json(event_to_json(StepEvent("centralized", 3, 10, 0.5)))
    StepEvent(label='centralized', step=3, total=10, loss=0.5)
    """
    try:
        doc: dict[str, Any] = json.loads(line)
        kind = _EVENT_TYPES[doc.pop("event")]
        return kind(**doc)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a progress event: {line[:200]!r} ({exc})") from None


class EventLog:
    """A progress callback that appends each event to a file, one JSON line each.

    Each line is written with one ``write`` call on a file opened for appending and flushed at
    once, so a reader never sees half a line it cannot wait out (:class:`EventTail` keeps an
    unfinished last line for the next read).

    Parameters
    ----------
    path : path-like
        The file (created with its folder; appended to).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, event: ProgressEvent) -> None:
        """Append ``event``."""
        with self.path.open("a", encoding="utf-8") as out:
            out.write(event_to_json(event) + "\n")


class EventTail:
    """Reads the events an :class:`EventLog` appends, as they come.

    Parameters
    ----------
    path : path-like
        The file (it need not exist yet).

    Examples
    --------
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "progress.jsonl"
    >>> tail = EventTail(path)
    >>> tail.read()
    []
    >>> EventLog(path)(ReplyEvent("fit", 1, 0, 2))
    >>> [e.round for e in tail.read()], tail.read()
    ([1], [])
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.offset = 0

    def read(self) -> list[ProgressEvent]:
        """The events appended since the last call (complete lines only).

        Returns
        -------
        list of ProgressEvent
            A line that is not an event is skipped: progress must never stop a run.
        """
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self.offset += end
        events: list[ProgressEvent] = []
        for raw in data[:end].splitlines():
            try:
                events.append(event_from_json(raw.decode("utf-8")))
            except (ValueError, UnicodeDecodeError):
                continue
        return events
