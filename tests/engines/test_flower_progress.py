"""What `mmfl train --engine flower` shows while the ServerApp, another process, runs: its
federation's events (the run config's ``progress-file``) and each round from its checkpoint."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from multimodal_fl.engines.flower_jobs import LoopbackOptions, _RoundWatch
from multimodal_fl.federated.flower.deploy import _waiting
from multimodal_fl.federated.server import RoundRecord
from multimodal_fl.progress import EventLog, EventTail, ProgressEvent, ReplyEvent


def _checkpoint(out: Path, rounds: int) -> None:
    folder = out / "checkpoint"
    folder.mkdir(parents=True, exist_ok=True)
    history = [asdict(RoundRecord(r, selected=["a", "b"], replied=["a", "b"], train_loss=1 / r))
               for r in range(1, rounds + 1)]
    (folder / "checkpoint.json").write_text(json.dumps({"round": rounds,
                                                        "meta": {"history": history}}))


def test_each_round_and_event_is_passed_on_once(tmp_path: Path) -> None:
    rounds: list[RoundRecord] = []
    events: list[ProgressEvent] = []
    log = tmp_path / "flower" / "progress.jsonl"
    watch = _RoundWatch(tmp_path, log, rounds.append, events.append)
    watch()  # nothing there yet: nothing happens
    assert rounds == [] and events == []
    EventLog(log)(ReplyEvent("fit", 1, 0, 2))
    with log.open("a") as f:
        f.write('{"event": "reply", "kind": "fit", "round": 1, "ans')  # being written
    _checkpoint(tmp_path, 1)
    watch()
    assert [r.round for r in rounds] == [1] and events == [ReplyEvent("fit", 1, 0, 2)]
    with log.open("a") as f:
        f.write('wered": 1, "asked": 2, "site": "a", "ok": true}\n')
    time.sleep(0.01)
    _checkpoint(tmp_path, 3)
    watch()
    assert [r.round for r in rounds] == [1, 2, 3] and rounds[2].train_loss == pytest.approx(1 / 3)
    assert events[1] == ReplyEvent("fit", 1, 1, 2, site="a")
    watch.rounds([asdict(RoundRecord(r)) for r in range(1, 5)])  # the metrics at the end
    assert [r.round for r in rounds] == [1, 2, 3, 4]


def test_a_line_that_is_no_event_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('not json\n{"event": "nope"}\n' + '{"event": "reply", "kind": "fit", '
                    '"round": 2, "answered": 0, "asked": 3, "site": null, "ok": true}\n')
    assert EventTail(path).read() == [ReplyEvent("fit", 2, 0, 3)]


def test_the_wait_is_shown_while_the_work_runs_and_once_after() -> None:
    calls: list[bool] = []
    finished = threading.Event()

    def work() -> str:
        time.sleep(1.3)
        finished.set()
        return "done"

    assert _waiting(work, lambda: calls.append(finished.is_set()), interval=0.2) == "done"  # type: ignore[arg-type,comparison-overlap]
    assert calls.count(False) >= 3 and calls[-1] is True


def test_what_the_work_raises_reaches_the_caller() -> None:
    def work() -> str:
        raise TimeoutError("flwr run took too long")

    with pytest.raises(TimeoutError, match="took too long"):
        _waiting(work, lambda: None, interval=0.05)  # type: ignore[arg-type]


def test_loopback_options_keep_to_the_deployment() -> None:
    assert LoopbackOptions(60, {"node-wait": 30.0}).run_config == {"node-wait": 30.0}
    with pytest.raises(ValueError, match="server-factory"):
        LoopbackOptions(60, {"server-factory": "x:y"})
    with pytest.raises(ValueError, match="seconds > 0"):
        LoopbackOptions(0)
