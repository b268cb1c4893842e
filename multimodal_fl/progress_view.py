"""How the command line shows :mod:`multimodal_fl.progress` events.

On a terminal, :class:`ProgressView` draws ``rich.progress`` bars (one per site and modality
while preparing, one for the federated rounds, one per baseline model) and removes them when
the run ends. Elsewhere (a log file, a CI job) it prints one plain line when a site's modality
is prepared, when a site answers a round, when a stage's sites have all answered and when a
model is trained. The time left of a federated run is the median duration of the rounds so
far times the rounds still to run (during round 1: the pace of its replies).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from multimodal_fl.progress import PrepareEvent, ProgressEvent, ReplyEvent, StepEvent

__all__ = ["ProgressView", "RoundClock", "format_duration"]

#: The stages outside the rounds that print a line when their sites have answered (in a log;
#: the quick ones, ``init``, ``info`` and ``moments``, only show on a terminal).
_STAGES_SHOWN = ("pca", "pca_apply", "pca_scores", "predict")


def format_duration(seconds: float) -> str:
    """A short duration: ``45s``, ``1m20s``, ``2h05m``.

    Parameters
    ----------
    seconds : float

    Returns
    -------
    str
    """
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class RoundClock:
    """Times the federated rounds from the start of each round's ``fit`` broadcast.

    Parameters
    ----------
    last_round : int or None
        The last round this run will train (``None``: unknown, no estimate).
    clock : callable, default time.monotonic
        Seconds now.
    """

    def __init__(self, last_round: int | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.last_round = last_round
        self.clock = clock
        self.started: dict[int, float] = {}
        self.durations: list[float] = []

    def round_started(self, rnd: int) -> None:
        """Round ``rnd`` sends its fit requests (the previous round is then complete)."""
        now = self.clock()
        if rnd - 1 in self.started and rnd not in self.started:
            self.durations.append(now - self.started[rnd - 1])
        self.started.setdefault(rnd, now)

    def seconds_left(self, rnd: int, answered: int, asked: int) -> float | None:
        """Estimated seconds until the last round is done, during round ``rnd``.

        Parameters
        ----------
        rnd : int
            The round under way.
        answered, asked : int
            Its sites answered so far, and asked.

        Returns
        -------
        float or None
            ``None`` before anything can be estimated.
        """
        if self.last_round is None or rnd not in self.started:
            return None
        elapsed = self.clock() - self.started[rnd]
        if self.durations:
            per_round = statistics.median(self.durations)
        elif answered > 0:
            per_round = elapsed * asked / answered
        else:
            return None
        return max(per_round - elapsed, 0.0) + per_round * max(self.last_round - rnd, 0)


class _EtaColumn(ProgressColumn):
    """The time left: the task's own estimate (``eta`` field), else rich's from its speed."""

    def render(self, task: Task) -> Text:
        eta = task.fields.get("eta", task.time_remaining)
        text = "" if eta is None or task.finished else f"ETA ~{format_duration(eta)}"
        return Text(text, style="progress.remaining")


class ProgressView:
    """Renders progress events on a console (``rich`` bars on a terminal, else plain lines).

    Use as a context manager and pass the instance as the ``progress`` callback.

    Parameters
    ----------
    console : rich.console.Console
        Where to draw (the CLI's stderr console).
    last_round : int or None
        The last federated round this run trains (for the time left).
    """

    def __init__(self, console: Console, *, last_round: int | None = None) -> None:
        self.console = console
        self.clock = RoundClock(last_round)
        self.bars: Progress | None = None
        self._tasks: dict[Any, TaskID] = {}
        self._failed: dict[tuple[str, int], int] = {}
        self._printed: set[Any] = set()

    def __enter__(self) -> ProgressView:
        if self.console.is_terminal:
            self.bars = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), _EtaColumn(),
                console=self.console, transient=True,
                redirect_stdout=sys.stdout.isatty(),
            )
            self.bars.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.bars is not None:
            self.bars.stop()
            self.bars = None

    def __call__(self, event: ProgressEvent) -> None:
        """Show one event."""
        if isinstance(event, PrepareEvent):
            self._prepare(event)
        elif isinstance(event, ReplyEvent):
            self._reply(event)
        elif isinstance(event, StepEvent):
            self._step(event)

    def _task(self, key: Any, description: str, total: int | None) -> TaskID:
        assert self.bars is not None
        if key not in self._tasks:
            self._tasks[key] = self.bars.add_task(description, total=total, info="")
        return self._tasks[key]

    def _prepare(self, e: PrepareEvent) -> None:
        what = f"{e.site} {e.modality} {e.action}"
        cached = f"{e.cache_hits} from cache" if e.cache_hits else ""
        if self.bars is not None:
            task = self._task(("prepare", e.site, e.modality, e.action), what, e.total)
            self.bars.update(task, completed=e.done, total=e.total, info=cached)
        elif e.done == e.total and e.total > 0 and self._first(e.site, e.modality, e.action):
            unit = "file" if e.modality == "records" else "patient"
            count = f"{e.done} {unit}{'' if e.done == 1 else 's'}"
            self.console.print(f"{what}: {count}" + (f" ({cached})" if cached else ""),
                               highlight=False)

    def _reply(self, e: ReplyEvent) -> None:
        key = (e.kind, e.round)
        if e.answered == 0:
            self._failed[key] = 0
            if e.kind == "fit":
                self.clock.round_started(e.round)
        elif not e.ok:
            self._failed[key] = self._failed.get(key, 0) + 1
        failed = self._failed.get(key, 0)
        tail = f", {failed} failed" if failed else ""
        if e.kind == "fit":
            text = f"round {e.round}: {e.answered}/{e.asked} sites replied{tail}"
        elif e.kind == "evaluate":
            text = f"round {e.round}: evaluated at {e.answered}/{e.asked} sites{tail}"
        else:
            text = f"{e.kind}: {e.answered}/{e.asked} sites replied{tail}"
        eta = self.clock.seconds_left(e.round, e.answered, e.asked) if e.kind == "fit" else None
        if self.bars is not None:
            self._show_round(e, text, eta)
        elif e.kind == "fit" and e.answered > 0:
            when = "" if eta is None else f", ETA ~{format_duration(eta)}"
            self.console.print(text + when, highlight=False)
        elif e.kind in _STAGES_SHOWN and e.answered == e.asked:
            self.console.print(text, highlight=False)

    def _first(self, *key: Any) -> bool:
        """True the first time ``key`` is seen (a plain line is printed once)."""
        if key in self._printed:
            return False
        self._printed.add(key)
        return True

    def _show_round(self, e: ReplyEvent, text: str, eta: float | None) -> None:
        assert self.bars is not None
        for key, task in self._tasks.items():  # preparation is over once sites answer
            if key[0] == "prepare" and self.bars.tasks[task].finished:
                self.bars.update(task, visible=False)
        total = self.clock.last_round
        task = self._task("rounds", text, total)
        fields: dict[str, Any] = {"description": text}
        if e.kind in ("fit", "evaluate"):  # rounds done: those before this one
            fields["completed"] = e.round - 1
        elif e.kind == "predict":
            fields["completed"] = total
        if e.kind == "fit":
            fields["eta"] = eta
        self.bars.update(task, **fields)
        self.bars.refresh()

    def _step(self, e: StepEvent) -> None:
        loss = f"loss {e.loss:.3f}"
        if self.bars is not None:
            task = self._task(("steps", e.label), e.label, e.total)
            self.bars.update(task, completed=e.step, total=e.total, info=loss)
        elif e.step == e.total and self._first(e.label):
            self.console.print(f"{e.label}: {e.step} steps, {loss}", highlight=False)
