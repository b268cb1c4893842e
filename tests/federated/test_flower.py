"""The Flower engine: records on the wire, the federation over a fake grid, and a real loopback run.

The loopback test (marker ``flower``) starts one SuperLink and three SuperNodes on free loopback
ports, runs two rounds of the toy site through ``flwr run``, and checks the final weights equal
the in-process engine's bit for bit.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.task_identity import TaskIdentity

from multimodal_fl.federated.flower import (
    SITE_STATE_KEY,
    FlowerFederation,
    FlowerRunError,
    ServerJob,
    client_app,
    content_to_reply,
    content_to_request,
    reply_to_content,
    request_to_content,
    run_loopback,
    write_app_dir,
)
from multimodal_fl.federated.protocol import (
    ConfigValue,
    Reply,
    Request,
    SiteFailure,
    SiteRefused,
)
from multimodal_fl.federated.server import run_federated

REPO = Path(__file__).resolve().parents[2]
SITES = ("a", "b", "c")


# --------------------------------------------------------------------------- factories
# Imported by name ("tests.federated.test_flower:toy_site") in the ServerApp / ClientApp processes.


def toy_site(name: str, site_dir: Path, run_config: Mapping[str, Any]) -> Any:
    """The toy site of ``tests/federated/toy.py``'s ``toy_federation`` for ``name``.

    With run config ``fit-only-state = true`` it also counts its fit requests in exported
    state and raises if the count restored before round ``r`` is not ``r - 1`` (the loopback
    test's check that the SuperNode keeps a site's state between ClientApp processes).
    """
    from tests.federated.toy import ToySite

    i = SITES.index(name)
    fault = str(run_config.get("fault-site", ""))
    site = ToySite(name, n=32 + 16 * i, shift=0.3 * i, fault="raise" if fault == name else None)
    return StatefulToySite(site) if run_config.get("fit-only-state") else site


class StatefulToySite:
    """A toy site that counts its fit requests in exported state (see :func:`toy_site`)."""

    def __init__(self, site: Any) -> None:
        self.site = site
        self.fits = np.zeros((), dtype=np.int64)

    def export_state(self) -> dict[str, np.ndarray]:
        """The fit count."""
        return {"fits": self.fits}

    def restore_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Take back the fit count."""
        self.fits = arrays["fits"]

    def handle(self, request: Request) -> Reply:
        """Check the count, then answer as the toy site."""
        if request.kind == "fit":
            if int(self.fits) != request.round - 1:
                raise RuntimeError(f"restored {int(self.fits)} fits before round {request.round}")
            self.fits = self.fits + 1
        reply: Reply = self.site.handle(request)
        return reply


def toy_job(run_config: Mapping[str, Any]) -> ServerJob:
    """The toy server job: ``toy_config`` with ``rounds`` from the run config."""
    from tests.federated.toy import initial_weights, toy_config

    config = toy_config(
        rounds=int(run_config["rounds"]),
        evaluate_every=int(run_config.get("evaluate-every", 1)),
        ask_sizes=bool(run_config.get("ask-sizes", True)),
    )
    return ServerJob(initial_weights(0), config)


def failing_job(run_config: Mapping[str, Any]) -> ServerJob:
    """A server job that asks every site once (their workers start), then fails."""

    def main(federation: Any) -> None:
        federation.broadcast({s: Request("info", 1) for s in federation.sites()}, timeout=60)
        raise RuntimeError("the job failed after its first exchange")

    return ServerJob(main=main)


def pca_data(name: str) -> np.ndarray:
    """A site's data for the PCA test: sizes and means differ, site c has fewer rows than d."""
    i = SITES.index(name)
    rng = np.random.default_rng([11, i])
    n = (40, 25, 6)[i]
    return rng.normal(size=(n, 8)) * np.linspace(3.0, 0.5, 8) + 2.0 * i


class PCASite:
    """Answers ``pca`` requests with its summary (``multimodal_fl.federated.pca``)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def handle(self, request: Request) -> Reply:
        """Reply with this site's PCA summary."""
        from multimodal_fl.federated.pca import site_pca_reply

        x = pca_data(self.name)
        return Reply(
            self.name, request.kind, request.round, n_samples=len(x), arrays=site_pca_reply(x)
        )


class CountingSite:
    """Counts the requests it answered, in state it exports (the opt-in state protocol)."""

    def __init__(self, name: str, *, fail: bool = False) -> None:
        self.name = name
        self.fail = fail
        self.calls = np.zeros((), dtype=np.int64)

    def export_state(self) -> dict[str, np.ndarray]:
        """The arrays to keep until the next request."""
        return {"calls": self.calls}

    def restore_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Take back what :meth:`export_state` gave."""
        self.calls = arrays["calls"]

    def handle(self, request: Request) -> Reply:
        """Reply with the number of requests answered so far, this one included."""
        if self.fail:
            raise RuntimeError(f"{self.name} crashed on purpose")
        self.calls = self.calls + 1
        return Reply(self.name, request.kind, request.round, n_samples=int(self.calls))


def counting_site(name: str, site_dir: Path, run_config: Mapping[str, Any]) -> CountingSite:
    """Site factory of the state tests (a new object for every request, as in Flower)."""
    SITES.index(name)  # ValueError for a site it does not know
    return CountingSite(name, fail=run_config.get("fault-site") == name)


def _record_failure(name: str, site_dir: Path, run_config: Mapping[str, Any],
                    request: Request, failed: str) -> None:
    """``counting_site``'s egress record of a failure no gate saw: a line in ``failure-log``."""
    if run_config.get("failure-log"):
        with open(str(run_config["failure-log"]), "a") as fh:
            fh.write(json.dumps({"site": name, "kind": str(request.kind), "failed": failed}) + "\n")


counting_site.record_failure = _record_failure  # type: ignore[attr-defined]


class RefusingSite:
    """Declines every request under its policy (a ``SiteRefused``, whose text may cross)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def handle(self, request: Request) -> Reply:
        """Refuse."""
        raise SiteRefused("fewer than 10 training patients (site policy min_cell=10)")


def refusing_site(name: str, site_dir: Path, run_config: Mapping[str, Any]) -> RefusingSite:
    """Site factory of the refusal test."""
    return RefusingSite(name)


def sum_vectors(name: str) -> dict[str, np.ndarray]:
    """A site's parts for the secure-sum tests (site c lacks one level of ``age``)."""
    rng = np.random.default_rng([5, SITES.index(name)])
    parts = {p: rng.integers(0, 1000, 12) for p in ("overall", "sex=F", "sex=M", "age=old",
                                                     "age=young")}
    if name == "c":
        del parts["age=old"]
    return parts


class SumSite:
    """Holds its vector and answers secure-sum steps; its party travels in exported state."""

    def __init__(self, name: str) -> None:
        from multimodal_fl.federated.secure_sum import SecureSumParty

        self.party = SecureSumParty(name)
        self.party.hold("v", sum_vectors(name), min_cell=5)

    def export_state(self) -> dict[str, np.ndarray]:
        """The party's state (keys and shares between the steps)."""
        return self.party.export_state()

    def restore_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Take it back."""
        self.party.restore_state(arrays)

    def handle(self, request: Request) -> Reply:
        """One secure-sum step."""
        return self.party.answer(request)


def sum_site(name: str, site_dir: Path, run_config: Mapping[str, Any]) -> SumSite:
    """Site factory of the secure-sum test (a new object for every message, as in Flower)."""
    return SumSite(name)


def pca_site(name: str, site_dir: Path, run_config: Mapping[str, Any]) -> PCASite:
    """Site factory of the PCA test."""
    return PCASite(name)


# --------------------------------------------------------------------------- helpers


def over_the_wire(content: RecordDict) -> RecordDict:
    """Serialise a RecordDict into Flower's wire objects and back, as the SuperLink stores it."""
    objects = get_all_nested_objects(content)
    wire = {object_id: obj.deflate() for object_id, obj in objects.items()}
    back = inflate_object_from_contents(content.object_id, wire)
    assert isinstance(back, RecordDict)
    return back


class FakeGrid:
    """A Grid whose nodes run the package's ClientApp in this process (no SuperLink)."""

    def __init__(self, node_config: Mapping[int, dict[str, Any]], run_config: dict[str, Any]):
        self.node_config = dict(node_config)
        self.run_config = run_config
        self.replies: dict[str, Message] = {}
        self.silent: set[int] = set()
        self.held: dict[str, Message] = {}
        self.states: dict[int, RecordDict] = {}
        self.pushed = 0
        self.pulls = 0

    def get_node_ids(self) -> list[int]:
        return list(self.node_config)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id
            node = msg.metadata.dst_node_id
            sent = Message(
                over_the_wire(msg.content), node, msg.metadata.message_type
            )  # what the node receives
            sent.metadata.__dict__["_message_id"] = msg.object_id
            sent.metadata.__dict__["_src_node_id"] = 0
            state = self.states.setdefault(node, RecordDict())  # the SuperNode keeps it per run
            context = Context(1, node, self.node_config[node], state, self.run_config)
            try:
                reply = client_app(message=sent, context=context)
                reply = Message(over_the_wire(reply.content), reply_to=sent)
            except Exception as exc:  # the SuperNode turns a raising ClientApp into an error
                reply = Message(
                    Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION,  # Flower's own format
                          str(type(exc)) + ":<'" + str(exc) + "'>"),
                    reply_to=sent,
                )
            if node in self.silent:
                self.held[msg.object_id] = reply
            else:
                self.replies[msg.object_id] = reply
            ids.append(msg.object_id)
        self.pushed += len(ids)
        return ids

    def release(self) -> None:
        """Deliver the replies of silent nodes now (late replies)."""
        self.replies.update(self.held)
        self.held.clear()
        self.silent.clear()

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        self.pulls += 1
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


def fake_federation(run_config: dict[str, Any], **kwargs: Any) -> tuple[FlowerFederation, FakeGrid]:
    # node ids deliberately not in site order
    nodes = {30: "a", 10: "b", 20: "c"}
    grid = FakeGrid(
        {n: {"site-name": s, "site-dir": f"/nowhere/{s}"} for n, s in nodes.items()}, run_config
    )
    return FlowerFederation(grid, poll_interval=0.01, **kwargs), grid  # type: ignore[arg-type]


@pytest.fixture
def task_identity() -> Iterable[None]:
    """Messages made outside a ServerApp process need Flower's task identity set."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


RUN_CONFIG: dict[str, ConfigValue] = {
    "site-factory": "tests.federated.test_flower:toy_site",
    "torch-threads": 1,
}


# --------------------------------------------------------------------------- unit tests


def test_request_survives_the_wire_exactly() -> None:
    weights = {
        "w": np.arange(6, dtype=np.float32).reshape(2, 3) / 7,
        "bn.num_batches_tracked": np.array(5, dtype=np.int64),  # 0-d stays 0-d
        "h": np.array([1.5, np.pi], dtype=np.float64),
    }
    config: dict[str, ConfigValue] = {
        "seed": 2**62 + 1,
        "fedbn": True,
        "lr": 0.1,
        "name": "x",
        "steps": 3,
    }
    back = content_to_request(over_the_wire(request_to_content(Request("fit", 3, weights, config))))
    assert (back.kind, back.round, back.config) == ("fit", 3, config)
    assert all(type(back.config[k]) is type(v) for k, v in config.items())  # bool stays bool
    assert set(back.weights) == set(weights)
    for k, v in weights.items():
        assert back.weights[k].dtype == v.dtype and back.weights[k].shape == v.shape
        assert back.weights[k].tobytes() == v.tobytes()


def test_reply_survives_the_wire_exactly() -> None:
    reply = Reply(
        "site_a",
        "fit",
        2,
        weights={"w": np.linspace(0, 1, 5, dtype=np.float32)},
        group_counts={"encoders.text.": 0, "encoders.image.": 12},
        n_samples=12,
        metrics={"loss": 0.125},
        arrays={"pca/s_vt": np.eye(3)},
        local_keys=["bn.running_mean", "bn.running_var"],
    )
    back = content_to_reply(over_the_wire(reply_to_content(reply)))
    assert back.weights["w"].tobytes() == reply.weights["w"].tobytes()
    assert np.array_equal(back.arrays["pca/s_vt"], reply.arrays["pca/s_vt"])
    for attr in ("site", "kind", "round", "group_counts", "n_samples", "metrics", "local_keys"):
        assert getattr(back, attr) == getattr(reply, attr), attr
    empty = content_to_reply(over_the_wire(reply_to_content(Reply("b", "info", 0, n_samples=3))))
    assert (empty.weights, empty.local_keys, empty.n_samples) == ({}, [], 3)


def test_content_without_records_is_rejected_with_the_reason() -> None:
    with pytest.raises(ValueError, match="'config'"):
        content_to_request(RecordDict())
    with pytest.raises(ValueError, match="lacks record"):
        content_to_reply(RecordDict())


def test_sites_are_named_by_their_nodes_answers_in_site_order(task_identity: None) -> None:
    federation, grid = fake_federation(dict(RUN_CONFIG))
    assert federation.sites() == ["a", "b", "c"]
    assert federation.site_nodes() == {"a": 30, "b": 10, "c": 20}
    requests = {s: Request("info", 0, {}, {"seed": 1}) for s in ("c", "a", "b")}
    answers = federation.broadcast(requests, timeout=5)
    assert list(answers) == ["a", "b", "c"]
    assert {s: a.n_samples for s, a in answers.items() if isinstance(a, Reply)} == {
        "a": 32,
        "b": 48,
        "c": 64,
    }
    # a node that leaves is no longer a site; an unknown site is a failure, not an exception
    del grid.node_config[20]
    assert federation.sites() == ["a", "b"]
    answer = federation.broadcast({"c": Request("info", 0, {}, {"seed": 1})}, timeout=1)["c"]
    assert isinstance(answer, SiteFailure) and "unknown site" in answer.reason


def test_a_raising_site_and_a_silent_site_become_failures(task_identity: None) -> None:
    federation, grid = fake_federation({**RUN_CONFIG, "fault-site": "b"})
    federation.sites()
    grid.silent.add(20)  # site c never answers
    from tests.federated.toy import initial_weights

    requests = {s: Request("fit", 1, initial_weights(0), {"seed": 3}) for s in SITES}
    started = time.monotonic()
    answers = federation.broadcast(requests, timeout=0.3)
    assert time.monotonic() - started < 5
    assert isinstance(answers["a"], Reply) and answers["a"].site == "a"
    # what crosses the site boundary is the exception type; its message stays in the site's log
    assert isinstance(answers["b"], SiteFailure) and "RuntimeError" in answers["b"].reason
    assert "crashed on purpose" not in answers["b"].reason
    assert isinstance(answers["c"], SiteFailure) and "timed out" in answers["c"].reason


def test_each_answer_is_reported_as_it_arrives(task_identity: None) -> None:
    """The bars of `mmfl train --engine flower` come from these events (through the ServerApp's
    progress-file): the start, then one per site as its reply or failure comes in."""
    from multimodal_fl.progress import ReplyEvent

    events: list[ReplyEvent] = []
    federation, grid = fake_federation({**RUN_CONFIG, "fault-site": "b"},
                                       progress=events.append)
    federation.sites()
    grid.silent.add(20)  # site c never answers
    from tests.federated.toy import initial_weights

    requests = {s: Request("fit", 4, initial_weights(0), {"seed": 3}) for s in (*SITES, "x")}
    federation.broadcast(requests, timeout=0.3)
    assert events[0] == ReplyEvent("fit", 4, 0, 4)
    # the unknown site first (nothing was sent), the silent one last (timed out)
    assert events[1] == ReplyEvent("fit", 4, 1, 4, site="x", ok=False)
    assert {(e.site, e.ok) for e in events[2:4]} == {("a", True), ("b", False)}
    assert events[4] == ReplyEvent("fit", 4, 4, 4, site="c", ok=False)
    assert [e.answered for e in events] == [0, 1, 2, 3, 4] and len(events) == 5


def test_a_node_slow_to_name_itself_is_not_waited_for_twice(task_identity: None) -> None:
    federation, grid = fake_federation({}, describe_timeout=0.2)
    grid.silent.add(20)  # site c's answer comes late
    assert federation.sites() == ["a", "b"]
    pushed = grid.pushed
    assert federation.sites() == ["a", "b"]
    assert grid.pushed == pushed  # not asked again while its question is alive, only looked for
    grid.release()
    assert federation.sites() == ["a", "b", "c"]
    assert grid.pushed == pushed


def test_site_state_survives_between_requests_per_node(task_identity: None) -> None:
    federation, grid = fake_federation(
        {"site-factory": "tests.federated.test_flower:counting_site"}
    )
    sites = federation.sites()
    for expected in (1, 2, 3):
        answers = federation.broadcast({s: Request("info", expected) for s in sites}, timeout=5)
        assert {s: a.n_samples for s, a in answers.items() if isinstance(a, Reply)} == {
            s: expected for s in SITES
        }
    assert all(SITE_STATE_KEY in state.array_records for state in grid.states.values())


def test_site_worker_keeps_one_site_per_node_across_requests(
    task_identity: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from multimodal_fl.federated.flower.client import TIMINGS_ENV
    from multimodal_fl.federated.flower.worker import stop_worker, worker_address

    monkeypatch.setenv(TIMINGS_ENV, str(tmp_path / "timings"))

    run_config: dict[str, ConfigValue] = {
        "site-factory": "tests.federated.test_flower:counting_site",
        "site-worker": True,
        "site-worker-start": 60.0,
        "site-worker-idle": 60.0,
    }
    federation, grid = fake_federation(run_config)
    addresses = [
        worker_address(1, node, site["site-name"], run_config)
        for node, site in grid.node_config.items()
    ]
    try:
        sites = federation.sites()
        for expected in (1, 2, 3):
            answers = federation.broadcast({s: Request("info", 1) for s in sites}, timeout=60)
            # the same site object answered: its count lives in the worker's memory
            assert {s: getattr(a, "n_samples", a) for s, a in answers.items()} == {
                s: expected for s in SITES
            }
        assert not grid.states or not any(st.array_records for st in grid.states.values())
    finally:
        stopped = [stop_worker(address) for address in addresses]
    assert all(stopped)
    assert not any(address.socket.exists() for address in addresses)
    # one timing line per message (the describe query builds no site: none), on the SuperNode
    for site in SITES:
        lines = [json.loads(x) for x in
                 (tmp_path / "timings" / f"{site}.jsonl").read_text().splitlines()]
        assert [(x["kind"], x["site"]) for x in lines] == [("info", site)] * 3
        for x in lines:
            assert x["site_work"]["in_worker"] and x["site_work"]["wall"] >= 0
            assert {"flower_start", "import", "handler_wait", "handoff"} <= set(x)
            assert 0 <= x["handoff"]["wall"] and x["process_start"] <= x["handler_end"]


def test_the_end_of_a_run_stops_every_site_worker(task_identity: None) -> None:
    """A deployed run left one worker per SuperNode idling for site-worker-idle (30 min, about
    0.5 GB each) after every run: the release at the end stops them (a hospital's bug report)."""
    from multimodal_fl.federated.flower.worker import _alive, _read_pid, stop_worker, worker_address

    run_config: dict[str, ConfigValue] = {
        "site-factory": "tests.federated.test_flower:counting_site",
        "site-worker": True, "site-worker-start": 60.0, "site-worker-idle": 600.0,
    }
    federation, grid = fake_federation(run_config)
    addresses = [worker_address(1, node, site["site-name"], run_config)
                 for node, site in grid.node_config.items()]
    try:
        sites = federation.sites()
        federation.broadcast({s: Request("info", 1) for s in sites}, timeout=60)
        pids = [_read_pid(a) for a in addresses]
        assert all(pid is not None and _alive(pid) for pid in pids)
        assert federation.release(timeout=30) == list(SITES)
        assert not any(_alive(pid) for pid in pids if pid is not None)
        assert not any(address.socket.exists() for address in addresses)
    finally:
        for address in addresses:
            stop_worker(address)


def test_a_failed_run_still_releases_its_workers(
    task_identity: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ServerApp's main releases the workers however the job ends."""
    from flwr.app import Context as FlowerContext

    from multimodal_fl.federated.flower import apps
    from multimodal_fl.federated.flower.worker import _alive, _read_pid, stop_worker, worker_address

    run_config: dict[str, ConfigValue] = {
        "server-factory": "tests.federated.test_flower:failing_job",
        "site-factory": "tests.federated.test_flower:counting_site",
        "site-worker": True, "site-worker-start": 60.0, "site-worker-idle": 600.0,
        "min-nodes": 3, "poll-interval": 0.01,
    }
    monkeypatch.setattr(apps, "_log_to_stdout", lambda: None)
    nodes = {30: "a", 10: "b", 20: "c"}
    grid = FakeGrid({n: {"site-name": s, "site-dir": f"/nowhere/{s}"} for n, s in nodes.items()},
                    run_config)
    addresses = [worker_address(1, n, s, run_config) for n, s in nodes.items()]
    try:
        with pytest.raises(RuntimeError, match="failed after its first exchange"):
            apps.server_main(grid, FlowerContext(1, 0, {}, RecordDict(), run_config))  # type: ignore[arg-type]
        pids = [_read_pid(a) for a in addresses]
        assert not any(pid is not None and _alive(pid) for pid in pids)
        assert not any(address.socket.exists() for address in addresses)
    finally:
        for address in addresses:
            stop_worker(address)


def test_the_client_app_imports_no_torch_and_no_server_side() -> None:
    """A ClientApp process starts per message: its module loads Flower, the codec and the
    worker's client only (``python -X importtime`` showed torch, scikit-learn and the server
    loop before)."""
    code = ("import sys, multimodal_fl.federated.flower as f; f.client_app; "
            "print(' '.join(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(REPO)}).stdout.split()
    heavy = {"torch", "sklearn", "scipy", "pandas", "safetensors",
             "multimodal_fl.federated.server", "multimodal_fl.federated.flower.apps",
             "multimodal_fl.federated.flower.credentials", "multimodal_fl.federated.pca",
             "multimodal_fl.config"}
    assert "multimodal_fl.federated.flower.client" in out
    assert sorted(heavy & set(out)) == []


def test_site_worker_failures_become_site_failures(task_identity: None, tmp_path: Path) -> None:
    from multimodal_fl.federated.flower.worker import stop_worker, worker_address

    run_config: dict[str, ConfigValue] = {
        "site-factory": "tests.federated.test_flower:counting_site",
        "fault-site": "b",
        "site-worker": True,
        "site-worker-start": 60.0,
        "failure-log": str(tmp_path / "failures.jsonl"),
    }
    federation, grid = fake_federation(run_config)
    grid.node_config[40] = {"site-name": "d", "site-dir": "/nowhere/d"}  # the factory knows no d
    addresses = [
        worker_address(1, node, site["site-name"], run_config)
        for node, site in grid.node_config.items()
    ]
    try:
        sites = federation.sites()
        answers = federation.broadcast({s: Request("info", 1) for s in sites}, timeout=120)
    finally:
        for address in addresses:
            stop_worker(address)
    assert isinstance(answers["a"], Reply)
    assert isinstance(answers["b"], SiteFailure) and "RuntimeError" in answers["b"].reason
    assert "crashed on purpose" not in answers["b"].reason
    failure = answers["d"]  # its worker could not build the site: the log says why
    assert isinstance(failure, SiteFailure) and "ended before listening" in failure.reason
    assert "ValueError" in failure.reason
    dead = addresses[list(grid.node_config).index(40)]
    # the log (a traceback quoting the factory's error) stays on the SuperNode, never leaves
    assert "x not in tuple" in dead.log.read_text()
    assert "x not in tuple" not in failure.reason and "Traceback" not in failure.reason
    # no file name of the site's machine crosses either (a bug hunt: the log's path did), the
    # log is the SuperNode user's only, and the site's egress record has the failure
    assert dead.log.name not in failure.reason and str(dead.log.parent) not in failure.reason
    assert stat.S_IMODE(dead.log.stat().st_mode) == 0o600
    lines = [json.loads(x) for x in (tmp_path / "failures.jsonl").read_text().splitlines()]
    assert lines == [{"site": "d", "kind": "info", "failed": "ValueError while building the site"}]
    for address in addresses:
        address.log.unlink(missing_ok=True)  # a crashed worker leaves its log for diagnosis


def test_a_refusal_crosses_flower_with_its_reason(task_identity: None) -> None:
    federation, _ = fake_federation(
        {"site-factory": "tests.federated.test_flower:refusing_site"})
    sites = federation.sites()
    answers = federation.broadcast({s: Request("info", 1) for s in sites}, timeout=5)
    for site in sites:
        failure = answers[site]
        assert isinstance(failure, SiteFailure)
        assert "fewer than 10 training patients (site policy min_cell=10)" in failure.reason
        # the in-process form: the exception's name, then its words; no Flower wrapper
        assert failure.reason.startswith("SiteRefused: "), failure.reason
        assert "<class" not in failure.reason and "Flower error code" not in failure.reason


def test_duplicate_site_name_keeps_the_first_node(task_identity: None) -> None:
    grid = FakeGrid(
        {5: {"site-name": "a", "site-dir": "/x"}, 3: {"site-name": "a", "site-dir": "/y"}},
        dict(RUN_CONFIG),
    )
    federation = FlowerFederation(grid, poll_interval=0.01)  # type: ignore[arg-type]
    assert federation.site_nodes() == {"a": 3}


def test_describe_needs_no_site_factory_but_a_site_dir(task_identity: None) -> None:
    federation, _ = fake_federation({})  # no site-factory: describing still works
    assert federation.sites() == ["a", "b", "c"]
    grid = FakeGrid({1: {"site-name": "a"}}, {})
    lonely = FlowerFederation(grid, poll_interval=0.01, describe_timeout=1)  # type: ignore[arg-type]
    assert lonely.sites() == []  # the ClientApp raised: no site-dir in its node config


def test_server_loop_over_fake_grid_equals_in_process(task_identity: None) -> None:
    torch = pytest.importorskip("torch")
    from tests.federated.toy import initial_weights, toy_config, toy_federation

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = run_federated(toy_federation(), initial_weights(0), toy_config(rounds=2))
        federation, _ = fake_federation(dict(RUN_CONFIG))
        over_flower = run_federated(federation, initial_weights(0), toy_config(rounds=2))
    finally:
        torch.set_num_threads(threads)
    assert set(over_flower.weights) == set(reference.weights)
    for key, value in reference.weights.items():
        assert over_flower.weights[key].tobytes() == value.tobytes(), key
    assert [r.deterministic() for r in over_flower.history] == [
        r.deterministic() for r in reference.history
    ]


def test_secured_rounds_over_the_flower_wire_equal_in_process(task_identity: None) -> None:
    """Secured rounds: fit replies without weights, then the four secure-sum steps as Flower
    messages to ClientApps that rebuild the site for every message (the held update and the
    secrets in the SuperNode's state); the model is the in-process secured run's, bit for bit."""
    torch = pytest.importorskip("torch")
    from multimodal_fl.federated.secure_update import SecureAggregation
    from tests.federated.toy import initial_weights, toy_config, toy_federation

    config = toy_config(rounds=2, min_sites=3, secure=SecureAggregation())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = run_federated(toy_federation(), initial_weights(0), config)
        federation, grid = fake_federation(dict(RUN_CONFIG))
        over_flower = run_federated(federation, initial_weights(0), config)
    finally:
        torch.set_num_threads(threads)
    for key, value in reference.weights.items():
        assert over_flower.weights[key].tobytes() == value.tobytes(), key
    history = [r.deterministic() for r in over_flower.history]
    assert history == [r.deterministic() for r in reference.history]
    assert [r["secure"]["sites"] for r in history] == [list(SITES)] * 2
    # per round: info once, fit, four secure-sum steps and evaluate, to each of 3 sites
    assert grid.pushed == 3 + 3 + 2 * 3 * (1 + 4 + 1)


def test_federated_pca_over_flower_equals_in_process(task_identity: None) -> None:
    from multimodal_fl.federated.pca import FederatedPCA, server_pca_merge

    federation, _ = fake_federation({"site-factory": "tests.federated.test_flower:pca_site"})
    sites = federation.sites()
    answers = federation.broadcast({s: Request("pca", 0) for s in sites}, timeout=10)
    replies = {s: a.arrays for s, a in answers.items() if isinstance(a, Reply)}
    assert sorted(replies) == list(SITES)
    over_flower = server_pca_merge(replies, 3)
    in_process = FederatedPCA(3).fit_sites([pca_data(s) for s in SITES])
    assert np.array_equal(over_flower.components_, in_process.components_)
    assert np.array_equal(over_flower.explained_variance_, in_process.explained_variance_)
    # what crossed the wire: counts, means and d x r blocks, never the rows
    assert all(v.size <= 8 * 8 + 8 + 1 for r in replies.values() for v in r.values())


def test_secure_sum_over_flower_equals_the_plain_sum(task_identity: None) -> None:
    """The four steps as Flower messages to ClientApps that rebuild the site for every message
    (its secrets kept in the SuperNode's state): the total is the plain sum."""
    from multimodal_fl.federated.pooling import secure_total

    federation, grid = fake_federation({"site-factory": "tests.federated.test_flower:sum_site"})
    total = secure_total(federation, federation.sites(), "v", timeout=30)
    assert total.refused is None and total.sites == list(SITES)
    vectors = {s: sum_vectors(s) for s in SITES}
    for part in ("overall", "sex=F", "sex=M"):
        np.testing.assert_array_equal(total.parts[part], sum(v[part] for v in vectors.values()))
    assert "held by 2 site(s)" in total.left_out["age=old"]  # site c has none: not summed
    # nor its attribute's other level: the whole minus it would be the level left out
    assert "'age' left out" in total.left_out["age=young"] and "age=young" not in total.parts
    assert grid.pushed == 3 + 4 * 3  # name queries, then four steps per site
    assert all(SITE_STATE_KEY in state.array_records for state in grid.states.values())


def test_server_job_needs_something_to_run() -> None:
    with pytest.raises(ValueError, match="initial_weights and config"):
        ServerJob()


def test_app_dir_is_a_valid_flower_app(tmp_path: Path) -> None:
    from flwr.cli.config_utils import load_and_validate

    app = write_app_dir(tmp_path / "app", {**RUN_CONFIG, "rounds": 2, "out-dir": "/tmp/x y"})
    config, _ = load_and_validate(app / "pyproject.toml", check_module=True)
    run_config = config["tool"]["flwr"]["app"]["config"]
    assert run_config["rounds"] == 2 and run_config["out-dir"] == "/tmp/x y"
    assert run_config["torch-threads"] == 1 and run_config["poll-interval"] == 0.2
    components = config["tool"]["flwr"]["app"]["components"]
    assert components["serverapp"] == "multimodal_fl.federated.flower:server_app"


# --------------------------------------------------------------------------- loopback deployment


@pytest.mark.flower
@pytest.mark.timeout(300)
def test_loopback_deployment_equals_in_process(tmp_path: Path) -> None:
    """SuperLink + 3 SuperNodes on loopback, 2 rounds: the same weights as in process."""
    torch = pytest.importorskip("torch")
    from tests.federated.toy import initial_weights, toy_config, toy_federation

    # Two fit rounds only (no info request, no evaluation): each message costs a ClientApp
    # process start, 5-20 s on a loaded 2-core runner. Info and evaluation requests cross the
    # same ClientApp code and wire format in the fake-grid tests above.
    config = toy_config(rounds=2, evaluate_every=0, ask_sizes=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the Flower processes get torch-threads = 1 too
    try:
        reference = run_federated(toy_federation(), initial_weights(0), config)
    finally:
        torch.set_num_threads(threads)

    sites = {s: tmp_path / "sites" / s for s in SITES}
    for path in sites.values():
        path.mkdir(parents=True)
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    run_config: dict[str, ConfigValue] = {
        "server-factory": "tests.federated.test_flower:toy_job",
        "site-factory": "tests.federated.test_flower:toy_site",
        "node-wait": 60.0,
        "torch-threads": 1,
        "rounds": config.rounds,
        "evaluate-every": config.evaluate_every,
        "ask-sizes": config.ask_sizes,
        "fit-only-state": True,  # and the site state kept by the SuperNodes is checked
    }
    started = time.monotonic()
    try:  # starts and stops every process (process groups killed on the way out)
        result = run_loopback(
            sites, run_config, tmp_path / "flower", env={"PYTHONPATH": pythonpath}, timeout=240
        )
    except FlowerRunError as exc:
        pytest.fail(str(exc))
    seconds = time.monotonic() - started
    print(f"loopback run: {seconds:.1f} s, server loop {result.seconds:.1f} s")
    assert result.completed_rounds == 2
    assert sorted(result.site_nodes) == list(SITES)
    assert set(result.weights) == set(reference.weights)
    for key, value in reference.weights.items():
        got = result.weights[key]
        assert got.dtype == value.dtype and got.shape == value.shape, key
        assert got.tobytes() == value.tobytes(), f"{key} differs from the in-process engine"
    drop = ("seconds", "server_seconds")
    flower_history = [{k: v for k, v in r.items() if k not in drop} for r in result.history]
    assert flower_history == [r.deterministic() for r in reference.history]


@pytest.mark.timeout(300)
def test_pca_analysis_over_flower_wire_equals_in_process(
    tiny_config: Any, tmp_path: Path, task_identity: None
) -> None:
    """``mmfl pca`` on Flower (its server job and sites, over the wire) writes the same pca.json."""
    from multimodal_fl.config import load_config
    from multimodal_fl.engines.flower_jobs import pca_analysis_job, pca_analysis_run_config
    from multimodal_fl.pca.analysis import run_pca_analysis

    cfg = load_config(tiny_config("covid_oxygen"))
    options: dict[str, Any] = {"n_components": 3, "site_rank": 4, "svd_solver": "full"}
    ref = run_pca_analysis(cfg, "tabular", tmp_path / "inprocess", **options).document
    out = tmp_path / "flower"
    run_config = pca_analysis_run_config(
        cfg, "tabular", out_dir=out, site_out=out, site_worker=False, **options
    )
    nodes = {10 * (i + 1): s for i, s in enumerate(cfg.sites)}
    grid = FakeGrid(
        {n: {"site-name": s.name, "site-dir": str(s.path)} for n, s in nodes.items()}, run_config
    )
    job = pca_analysis_job(run_config)
    assert job.main is not None
    job.main(FlowerFederation(grid, poll_interval=0.01))  # type: ignore[arg-type]
    doc = json.loads((out / "pca.json").read_text())
    assert (out / "pca_sites.png").stat().st_size > 0
    assert (out / "pca_variance.png").stat().st_size > 0
    assert doc["truncation"]["site_rank"] == 4 and doc["svd_solver"] == "full"
    assert sorted(doc["sites"]) == sorted(s.name for s in cfg.sites)
    for key in ("components", "explained_variance_ratio", "mean", "standardisation", "sites",
                "truncation", "edges", "notes"):
        assert doc[key] == ref[key], key
    # one name query per node, then 3 stages (moments, pca, pca_scores), one message each
    assert grid.pushed == 4 * len(cfg.sites)
    # a component count beyond the data names the run-config key the user set
    too_many = {**run_config, "pca-n-components": 1000}
    job = pca_analysis_job(too_many)
    assert job.main is not None
    with pytest.raises(ValueError, match=r"^run config pca-n-components 1000: the pooled data"):
        job.main(FlowerFederation(FakeGrid(grid.node_config, too_many),  # type: ignore[arg-type]
                                  poll_interval=0.01))
    with pytest.raises(ValueError, match="pca-features='genome'"):
        pca_analysis_run_config(cfg, "genome", out_dir=out)
    with pytest.raises(ValueError, match="pca-svd-solver='eig'"):
        pca_analysis_run_config(cfg, "tabular", out_dir=out, svd_solver="eig")


def test_mmfl_pca_engine_flower_and_flower_local_print_the_analysis(
    tiny_config: Any, tmp_path: Path, task_identity: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI routes (--engine flower, flower local with the PCA factories), with the
    loopback deployment replaced by the fake grid (a real loopback run is in docs/pca.md)."""
    from typer.testing import CliRunner

    from multimodal_fl.cli import app
    from multimodal_fl.config import load_config
    from multimodal_fl.federated import flower as flower_module
    from multimodal_fl.federated.flower.worker import stop_worker, worker_address

    calls: list[dict[str, Any]] = []

    def fake_loopback(sites: Mapping[str, Any], run_config: Mapping[str, Any], workdir: Any,
                      **_: Any) -> None:
        calls.append(dict(run_config))
        grid = FakeGrid({10 * (i + 1): {"site-name": n, "site-dir": str(p)}
                         for i, (n, p) in enumerate(sorted(sites.items()))}, dict(run_config))
        factory = flower_module.load_object(str(run_config["server-factory"]), "server-factory")
        job = factory(run_config)
        job.main(FlowerFederation(grid, poll_interval=0.01))  # type: ignore[arg-type]

    monkeypatch.setattr(flower_module, "run_loopback", fake_loopback)
    cfg = str(tiny_config("covid_oxygen"))
    runner = CliRunner()
    res = runner.invoke(app, ["pca", cfg, "--features", "tabular", "--out", str(tmp_path / "a"),
                              "--n-components", "2", "--engine", "flower"])
    assert res.exit_code == 0, res.output
    assert "federated PCA of tabular features" in res.output and "bytes sent" in res.output
    assert calls[-1]["pca-features"] == "tabular" and calls[-1]["pca-n-components"] == 2
    assert json.loads((tmp_path / "a" / "pca.json").read_text())["n_components"] == 2
    res = runner.invoke(app, [
        "flower", "local", cfg, "--out", str(tmp_path / "b"),
        "--server-factory", "multimodal_fl.engines.flower_jobs:pca_analysis_job",
        "--site-factory", "multimodal_fl.engines.flower_jobs:pca_analysis_site",
        "-c", "pca-features=tabular", "-c", "pca-n-components=2"])
    assert res.exit_code == 0, res.output
    assert "federated PCA of tabular features" in res.output
    a = json.loads((tmp_path / "a" / "pca.json").read_text())
    b = json.loads((tmp_path / "b" / "pca.json").read_text())
    assert a["components"] == b["components"]
    bad = runner.invoke(app, ["pca", cfg, "--features", "tabular", "--out", str(tmp_path / "c"),
                              "--engine", "local"])
    assert bad.exit_code == 2 and "inprocess or flower" in bad.output
    # `mmfl pca --engine flower` keeps each site in a worker (site-worker); stop them here
    assert calls[0]["site-worker"] is True
    for run_config in calls:
        for i, site in enumerate(sorted(s.name for s in load_config(cfg).sites)):
            stop_worker(worker_address(1, 10 * (i + 1), site, run_config))


@pytest.mark.timeout(300)
def test_flower_local_config_writes_the_run_of_train_and_shows_its_rounds(
    tiny_config: Any, tmp_path: Path, task_identity: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`mmfl flower local CONFIG` is `mmfl train CONFIG --engine flower`: run.json, the report and
    the model card (it wrote none before), the sites' answers and each round as they come (the
    loopback deployment replaced by the fake grid, the ServerApp's job in a thread)."""
    from typer.testing import CliRunner

    from multimodal_fl.cli import app
    from multimodal_fl.engines import flower_jobs
    from multimodal_fl.federated.flower import deploy
    from multimodal_fl.progress import EventLog
    from multimodal_fl.rundir import read_manifest

    seen: list[dict[str, Any]] = []

    def fake_loopback(sites: Mapping[str, Any], run_config: Mapping[str, Any], workdir: Any, *,
                      timeout: float, on_wait: Any = None, **_: Any) -> None:
        seen.append({**run_config, "timeout": timeout})
        grid = FakeGrid({10 * (i + 1): {"site-name": n, "site-dir": str(p)}
                         for i, (n, p) in enumerate(sorted(sites.items()))}, dict(run_config))
        progress = EventLog(run_config["progress-file"]) if run_config.get("progress-file") \
            else None
        job = flower_jobs.experiment_job(run_config)
        assert job.main is not None
        main = job.main
        federation = FlowerFederation(grid, poll_interval=0.01,  # type: ignore[arg-type]
                                      progress=progress)
        deploy._waiting(lambda: main(federation), on_wait)  # type: ignore[arg-type,return-value]

    monkeypatch.setattr(flower_jobs, "run_loopback", fake_loopback)
    cfg = str(tiny_config("covid_oxygen"))
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["flower", "local", cfg, "--out", str(out), "--timeout", "900",
                                   "-c", "site-worker=false"])
    assert res.exit_code == 0, res.output
    assert seen[0]["site-worker"] is False and seen[0]["timeout"] == 900
    assert seen[0]["progress-file"] == str(out / "flower" / "progress.jsonl")
    assert "round 1: 3/3 sites replied" in res.output  # the bars' plain lines
    rows = [line.split() for line in res.output.splitlines()]
    assert ["round", "replied", "train_loss"] in [r[:3] for r in rows]  # the round table
    assert [r[:2] for r in rows if r[:1] in (["1"], ["2"])] == [["1", "3/3"], ["2", "3/3"]]
    manifest = read_manifest(out)
    assert manifest is not None and manifest.status == "completed"
    assert manifest.engine == "flower"
    assert (out / "report" / "report.html").is_file() and (out / "model_card.json").is_file()
    assert f"report: {out / 'report' / 'report.html'}" in res.output.replace("\n", "")
    for log in sorted((out / "sites").glob("*/egress.jsonl")):  # each line names its run
        lines = [json.loads(x) for x in log.read_text().splitlines()]
        assert lines and all(x["run"] == {"dir": str(out), "flower_run_id": 1} for x in lines)
    # a run-config key that would change what is trained is refused with CONFIG
    bad = CliRunner().invoke(app, ["flower", "local", cfg, "--out", str(tmp_path / "b"),
                                   "-c", "run-dir=/elsewhere"])
    assert bad.exit_code == 2 and "only the deployment's own keys" in bad.output


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_experiment_over_flower_wire_equals_mmfl_train(
    tiny_config: Any, tmp_path: Path, task_identity: None
) -> None:
    """flower_jobs's server job and sites, over the Flower wire (fake grid, site workers)."""
    torch = pytest.importorskip("torch")
    from safetensors.numpy import load_file

    from multimodal_fl.config import load_config
    from multimodal_fl.engines.federated import run_federated_experiment
    from multimodal_fl.engines.flower_jobs import experiment_job, experiment_run_config
    from multimodal_fl.federated.flower.worker import stop_worker, worker_address

    # half of each site's patients in test, so the pooled secure sum has sites to sum
    cfg = load_config(tiny_config("covid_oxygen", evaluation={"min_cell": 5},
                                  training={"split": {"train": 0.3, "val": 0.2, "test": 0.5}}))
    assert cfg.training.num_threads == 1  # the site workers get torch-threads = 1 from it
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = run_federated_experiment(cfg, tmp_path / "inprocess").run_dir
    finally:
        torch.set_num_threads(threads)

    run_dir = tmp_path / "flower"
    run_config = experiment_run_config(cfg, run_dir=run_dir, site_out=run_dir)
    nodes = {10 * (i + 1): s for i, s in enumerate(cfg.sites)}
    grid = FakeGrid(
        {n: {"site-name": s.name, "site-dir": str(s.path)} for n, s in nodes.items()}, run_config
    )
    federation = FlowerFederation(grid, poll_interval=0.01)  # type: ignore[arg-type]
    job = experiment_job(run_config)
    assert job.main is not None
    try:
        job.main(federation)
    finally:
        for n, s in nodes.items():
            stop_worker(worker_address(1, n, s.name, run_config))
    a = load_file(str(reference / "model.safetensors"))
    b = load_file(str(run_dir / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for key, value in a.items():
        assert b[key].dtype == value.dtype and b[key].tobytes() == value.tobytes(), key
    for site in cfg.sites:
        rows = (run_dir / "sites" / site.name / "predictions.csv").read_text()
        assert rows == (reference / "sites" / site.name / "predictions.csv").read_text()
    # the pooled test figures: a secure sum over the Flower wire gives the in-process total
    pooled = [json.loads((d / "metrics.json").read_text())["pooled_from_histograms"]
              for d in (reference, run_dir)]
    assert pooled[0]["overall"]["auc"]["value"] is not None
    assert pooled[1] == pooled[0]
