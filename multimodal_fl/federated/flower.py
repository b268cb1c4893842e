"""The Flower engine: the package's one server loop over Flower 1.42's ``Grid`` (Message API).

Three pieces, none of which holds FL logic of its own:

* :class:`FlowerFederation` implements :class:`~.server.Federation` over a Flower ``Grid``: it
  maps each :class:`~.messages.Request` onto a Flower ``Message`` (arrays in an ``ArrayRecord``,
  scalars in a ``ConfigRecord``), sends one per SuperNode, and maps the replies (arrays,
  ``MetricRecord``, ``ConfigRecord``) back onto :class:`~.messages.Reply` objects, or onto
  :class:`~.messages.SiteFailure` when a site raised, timed out or cannot be reached.
* :data:`server_app` (a ``flwr.serverapp.ServerApp``) whose main builds a :class:`ServerJob` from
  the run config and runs :func:`~.server.run_federated` with a :class:`FlowerFederation` (or
  the job's own program, e.g.
  :func:`multimodal_fl.engines.federated.run_federated_experiment` through
  :mod:`~.flower_app`).
* :data:`client_app` (a ``flwr.clientapp.ClientApp``) that builds the site object from the
  SuperNode's ``--node-config`` (``site-name``, ``site-dir``) and the run config, and hands it
  every ``train`` / ``evaluate`` / ``query`` message as a :class:`~.messages.Request`. Flower
  starts a fresh ClientApp process per message: either the run config's ``site-worker`` keeps
  each site in one long-lived process (:mod:`~.flower_worker`), or a site that must keep arrays
  between requests (FedBN's local layers) implements ``export_state() -> dict[str, ndarray]``
  and ``restore_state(arrays)``, kept in the SuperNode's per-run context state.

Also here: :class:`LoopbackDeployment` and :func:`run_loopback` (a SuperLink and SuperNodes as
local processes on 127.0.0.1, for tests, demos and benchmarks) and the command lines they use.

Which server job and which site run is pluggable: the run config names two ``"module:callable"``
factories, ``server-factory`` (``f(run_config) -> ServerJob``) and ``site-factory``
(``f(site_name, site_dir, run_config) -> Site``). :func:`write_app_dir` writes the small Flower App
directory (a ``pyproject.toml`` only; the code is this installed package) that ``flwr run``
submits. ``docs/deployment.md`` gives the commands.

Site names: a SuperNode is known to the SuperLink only by a random node id. Before the first
request to a node the federation sends it a ``query`` message of kind :data:`DESCRIBE`; the
ClientApp answers with the ``site-name`` of its node config (without building the site). Replies
are returned keyed by site name; the server loop aggregates them in sorted site order, whatever
order they arrived in.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app import MessageType as _MessageType
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from safetensors.numpy import load_file, save_file

from multimodal_fl.federated.protocol import (
    ConfigValue,
    Kind,
    Reply,
    Request,
    SiteFailure,
    StateDict,
)
from multimodal_fl.federated.server import (
    FederatedResult,
    Federation,
    RoundRecord,
    RunConfig,
    Site,
    run_federated,
)

__all__ = [
    "DEFAULT_RUN_CONFIG",
    "DESCRIBE",
    "SITE_STATE_KEY",
    "FlowerFederation",
    "FlowerResult",
    "FlowerRunError",
    "LoopbackDeployment",
    "ServerJob",
    "SiteFactory",
    "client_app",
    "content_to_reply",
    "content_to_request",
    "flower_env",
    "flower_exe",
    "flwr_run_command",
    "free_port",
    "load_object",
    "load_result",
    "reply_to_content",
    "request_to_content",
    "run_loopback",
    "server_app",
    "superlink_command",
    "supernode_command",
    "write_app_dir",
]

log = logging.getLogger(__name__)

#: Request kind of the discovery query: the ClientApp answers with its site name, no site built.
DESCRIBE = Kind.DESCRIBE

#: Key of a site's exported arrays in the SuperNode's per-run context state (see the ClientApp).
SITE_STATE_KEY = "mmfl.site-state"

#: The run-config keys this module reads, with their defaults. ``flwr run`` accepts overrides
#: only for keys the app declares, so :func:`write_app_dir` always writes all of them.
DEFAULT_RUN_CONFIG: dict[str, ConfigValue] = {
    # "module:callable" returning a ServerJob, called as f(run_config) in the ServerApp process
    "server-factory": "",
    # "module:callable" returning a Site, called as f(site_name, site_dir, run_config) per message
    "site-factory": "",
    # where the ServerApp writes weights.safetensors and result.json ("" : nowhere)
    "out-dir": "",
    # wait for this many SuperNodes before round 1 (0: the job's min_sites)
    "min-nodes": 0,
    # seconds to wait for them
    "node-wait": 120.0,
    # seconds between two pulls of replies from the SuperLink (Flower's own loop sleeps 3 s)
    "poll-interval": 0.2,
    # seconds a discovery query may take per node
    "describe-timeout": 60.0,
    # torch.set_num_threads in the ServerApp and every ClientApp process (0: leave as is)
    "torch-threads": 0,
    # keep each site in one long-lived process per (run, SuperNode) instead of building it for
    # every message (multimodal_fl.federated.flower_worker)
    "site-worker": False,
    # seconds without a request after which a site worker ends
    "site-worker-idle": 1800.0,
    # seconds a new site worker may take to build its site
    "site-worker-start": 600.0,
}

_ARRAYS = "arrays"
_CONFIG = "config"
_METRICS = "metrics"
_SITE_NAME = "site-name"
_SITE_DIR = "site-dir"

# Flower's error codes (flwr.common.constant.ErrorCode) in words.
_ERROR_WORDS = {
    1: "the ClientApp could not be loaded",
    2: "the site raised",
    3: "the message was unavailable",
    4: "the reply expired",
    5: "the SuperNode is unavailable (no heartbeat)",
    7: "the app bundle is invalid",
    8: "the ClientApp crashed",
}

#: A site factory: ``f(site_name, site_dir, run_config) -> Site``.
SiteFactory = Callable[[str, Path, Mapping[str, Any]], Site]


# --------------------------------------------------------------------------- records <-> messages


def _array_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    # Array(ndarray) serialises with np.save: dtype, shape (0-d included) and bytes kept exactly
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def _numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def request_to_content(request: Request) -> RecordDict:
    """Put a request into a Flower ``RecordDict``.

    Parameters
    ----------
    request : Request
        The request.

    Returns
    -------
    RecordDict
        ``"arrays"``: an ``ArrayRecord`` of the weights; ``"config"``: a ``ConfigRecord`` of
        kind, round and config (see :meth:`~.messages.Request.to_records`).
    """
    arrays, config = request.to_records()
    return RecordDict({_ARRAYS: _array_record(arrays), _CONFIG: ConfigRecord(dict(config))})


def content_to_request(content: RecordDict) -> Request:
    """Rebuild a request from :func:`request_to_content` output.

    Parameters
    ----------
    content : RecordDict
        A message's content.

    Returns
    -------
    Request
        The request.

    Raises
    ------
    ValueError
        If the content lacks the ``"config"`` record or the request keys.
    """
    if _CONFIG not in content.config_records:
        raise ValueError(
            f"message content has no {_CONFIG!r} ConfigRecord (it has "
            f"{sorted(content.keys())}); expected one written by request_to_content"
        )
    arrays = content.array_records.get(_ARRAYS)
    config = cast(Mapping[str, ConfigValue], dict(content.config_records[_CONFIG]))
    return Request.from_records(_numpy(arrays) if arrays is not None else {}, config)


def reply_to_content(reply: Reply) -> RecordDict:
    """Put a reply into a Flower ``RecordDict``.

    Parameters
    ----------
    reply : Reply
        The reply.

    Returns
    -------
    RecordDict
        ``"arrays"`` (``ArrayRecord``), ``"metrics"`` (``MetricRecord``) and ``"config"``
        (``ConfigRecord``), as :meth:`~.messages.Reply.to_records` lays them out.
    """
    arrays, metrics, config = reply.to_records()
    return RecordDict(
        {
            _ARRAYS: _array_record(arrays),
            _METRICS: MetricRecord(dict(metrics)),
            _CONFIG: ConfigRecord(cast(dict[str, Any], dict(config))),
        }
    )


def content_to_reply(content: RecordDict) -> Reply:
    """Rebuild a reply from :func:`reply_to_content` output.

    Parameters
    ----------
    content : RecordDict
        A reply message's content.

    Returns
    -------
    Reply
        The reply.

    Raises
    ------
    ValueError
        If a record or a required key is missing.
    """
    missing = [
        name
        for name, records in (
            (_METRICS, content.metric_records),
            (_CONFIG, content.config_records),
        )
        if name not in records
    ]
    if missing:
        raise ValueError(
            f"reply content lacks record(s) {missing} (it has {sorted(content.keys())}); "
            "expected 'arrays', 'metrics' and 'config' as reply_to_content writes them"
        )
    arrays = content.array_records.get(_ARRAYS)
    return Reply.from_records(
        _numpy(arrays) if arrays is not None else {},
        cast(Mapping[str, int | float], dict(content.metric_records[_METRICS])),
        dict(content.config_records[_CONFIG]),
    )


def _message_type(kind: str) -> str:
    if kind == Kind.FIT:
        return _MessageType.TRAIN
    if kind == Kind.EVALUATE:
        return _MessageType.EVALUATE
    return _MessageType.QUERY  # info, describe, summaries...: the kind travels in the config


# --------------------------------------------------------------------------- the federation


class FlowerFederation:
    """A :class:`~.server.Federation` over a Flower ``Grid`` (one site per SuperNode).

    Parameters
    ----------
    grid : flwr.serverapp.Grid
        The grid the ServerApp's main was given.
    poll_interval : float
        Seconds between two pulls of replies (Flower's ``send_and_receive`` sleeps 3 s).
    describe_timeout : float
        Seconds a node may take to answer the discovery query that names its site.

    Notes
    -----
    Site names are learnt, not configured: :meth:`sites` asks each SuperNode it has not met
    (``query`` message of kind :data:`DESCRIBE`) for the ``site-name`` in its node config, waiting
    up to ``describe_timeout``. A node that has not answered by then is left out for now; later
    calls pick up its late answer without waiting, and ask it afresh once the question expired.

    Two nodes claiming one name: the one met first keeps it (of nodes met together, the lower
    node id) and the other is ignored, with an error in the log. A node that leaves the
    SuperLink leaves :meth:`sites`.

    ``timeout`` in :meth:`broadcast` bounds the whole exchange (the sites run in parallel).
    Requests go out with the timeout as their Flower TTL, so a late reply expires at the
    SuperLink instead of waiting for a pull that never comes.
    """

    def __init__(
        self, grid: Grid, *, poll_interval: float = 0.2, describe_timeout: float = 60.0
    ) -> None:
        if not poll_interval > 0:
            raise ValueError(f"poll_interval={poll_interval}; expected seconds > 0")
        if not describe_timeout > 0:
            raise ValueError(f"describe_timeout={describe_timeout}; expected seconds > 0")
        self.grid = grid
        self.poll_interval = float(poll_interval)
        self.describe_timeout = float(describe_timeout)
        self._node_of: dict[str, int] = {}
        self._ignored: set[int] = set()
        self._describing: dict[int, tuple[str, float]] = {}  # node -> (message id, expiry)

    # -- discovery

    def node_ids(self) -> list[int]:
        """Return the ids of the SuperNodes currently connected to this run, sorted.

        Returns
        -------
        list[int]
            Node ids.
        """
        return sorted(int(n) for n in self.grid.get_node_ids())

    def wait_for_nodes(self, n: int, timeout: float) -> list[int]:
        """Wait until at least ``n`` SuperNodes are connected.

        Parameters
        ----------
        n : int
            How many.
        timeout : float
            Seconds to wait at most.

        Returns
        -------
        list[int]
            The connected node ids (possibly fewer than ``n`` if the time ran out).
        """
        deadline = time.monotonic() + timeout
        nodes = self.node_ids()
        while len(nodes) < n and time.monotonic() < deadline:
            time.sleep(min(self.poll_interval * 5, 1.0))
            nodes = self.node_ids()
        return nodes

    def site_nodes(self) -> dict[str, int]:
        """Return site name -> node id for the sites met so far and still connected.

        Returns
        -------
        dict[str, int]
            The mapping (a copy).
        """
        self.sites()
        return dict(self._node_of)

    def sites(self) -> list[str]:
        """Return the names of the sites whose SuperNode is connected, sorted.

        Meets new nodes first (see the class notes).

        Returns
        -------
        list[str]
            Site names.
        """
        nodes = self.node_ids()
        online = set(nodes)
        for site, node in list(self._node_of.items()):
            if node not in online:
                log.warning("site %s (node %d) left the federation", site, node)
                del self._node_of[site]
        known = set(self._node_of.values()) | self._ignored
        new = [n for n in nodes if n not in known]
        if new:
            self._describe(new)
        return sorted(self._node_of)

    def _describe(self, nodes: list[int]) -> None:
        """Ask ``nodes`` their site names; register the answers (see the class notes).

        A node met for the first time is waited for up to ``describe_timeout``; a node whose
        earlier question is still unanswered is only checked for its answer (no wait), and asked
        afresh once that question's TTL (10 x ``describe_timeout``, at least 60 s) has run out.
        """
        now = time.monotonic()
        for node, (_, expires) in list(self._describing.items()):
            if expires <= now:
                del self._describing[node]
        fresh = [n for n in nodes if n not in self._describing]
        # the question outlives the wait, so that a slow node's late answer is still picked up
        ttl = max(10 * self.describe_timeout, 60.0)
        pending, failed = self._push({n: Request(DESCRIBE, 0) for n in fresh}, ttl)
        for msg_id, node in pending.items():
            self._describing[node] = (msg_id, now + ttl)
        waiting = {msg_id: node for node, (msg_id, _) in self._describing.items()}
        answers = self._collect(waiting, self.describe_timeout if pending else 0.0)
        answers.update(failed)
        for node in sorted(answers):
            answer = answers[node]
            if isinstance(answer, str) and answer.startswith("timed out"):
                continue  # still asked: looked at again at the next call
            self._describing.pop(node, None)
            if not (isinstance(answer, Reply) and answer.site):
                why = answer if isinstance(answer, str) else "an empty site name"
                log.warning("node %d did not name its site (%s); asking again later", node, why)
                continue
            owner = self._node_of.get(answer.site)
            if owner is not None and owner != node:
                log.error(
                    "node %d says it is site %r, which node %d already is; node %d is "
                    "ignored: give each SuperNode its own --node-config site-name",
                    node,
                    answer.site,
                    owner,
                    node,
                )
                self._ignored.add(node)
                continue
            self._node_of[answer.site] = node
            log.info("node %d is site %s", node, answer.site)

    # -- messaging

    def _push(
        self, requests: Mapping[int, Request], ttl: float | None
    ) -> tuple[dict[str, int], dict[int, Reply | str]]:
        """Push one message per node; return (message id -> node, node -> why not sent)."""
        nodes = sorted(requests)
        if not nodes:
            return {}, {}
        messages = [
            Message(
                request_to_content(requests[n]),
                n,
                _message_type(requests[n].kind),
                ttl=None if ttl is None else max(float(ttl), 1.0),
                group_id=str(requests[n].round),
            )
            for n in nodes
        ]
        ids = list(self.grid.push_messages(messages))
        pending: dict[str, int] = {}
        failed: dict[int, Reply | str] = {}
        for i, node in enumerate(nodes):
            msg_id = ids[i] if i < len(ids) else None
            if msg_id:
                pending[str(msg_id)] = node
            else:
                failed[node] = "the SuperLink did not accept the message"
        return pending, failed

    def _collect(self, pending: Mapping[str, int], timeout: float | None) -> dict[int, Reply | str]:
        """Pull replies to ``pending`` (message id -> node) until all came or ``timeout``."""
        waiting = dict(pending)
        out: dict[int, Reply | str] = {}
        deadline = None if timeout is None else time.monotonic() + float(timeout)
        while waiting:
            for msg in self.grid.pull_messages(list(waiting)):
                replied_to = msg.metadata.reply_to_message_id
                if replied_to not in waiting:
                    continue
                node = waiting.pop(replied_to)
                if msg.has_error():
                    code = int(msg.error.code)
                    what = _ERROR_WORDS.get(code, "Flower reported an error")
                    out[node] = f"{what} (Flower error code {code}): {msg.error.reason}"
                    continue
                try:
                    out[node] = content_to_reply(msg.content)
                except (ValueError, TypeError, KeyError) as exc:
                    out[node] = f"unreadable reply: {exc}"
            if not waiting or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.poll_interval)
        for node in waiting.values():
            out[node] = f"timed out: no reply within {timeout:g} s"
        return out

    def _exchange(
        self, requests: Mapping[int, Request], timeout: float | None
    ) -> dict[int, Reply | str]:
        """Send one request per node; return node -> reply, or node -> why there is none."""
        pending, out = self._push(requests, timeout)
        out.update(self._collect(pending, timeout))
        return out

    def broadcast(
        self, requests: Mapping[str, Request], timeout: float | None = None
    ) -> dict[str, Reply | SiteFailure]:
        """Send one request per site, all at once, and gather the replies.

        Parameters
        ----------
        requests : Mapping[str, Request]
            Site name -> the request for that site.
        timeout : float or None
            Seconds to wait for all replies (None: as long as it takes).

        Returns
        -------
        dict[str, Reply | SiteFailure]
            One entry per requested site, in sorted site order.
        """
        answers: dict[str, Reply | SiteFailure] = {}
        by_node: dict[int, Request] = {}
        site_of: dict[int, str] = {}
        for site in sorted(requests):
            node = self._node_of.get(site)
            if node is None:
                answers[site] = SiteFailure(
                    site, f"unknown site {site!r}; connected sites: {sorted(self._node_of)}"
                )
                continue
            by_node[node] = requests[site]
            site_of[node] = site
        if by_node:
            for node, answer in self._exchange(by_node, timeout).items():
                site = site_of[node]
                answers[site] = SiteFailure(site, answer) if isinstance(answer, str) else answer
        return {site: answers[site] for site in sorted(answers)}


# --------------------------------------------------------------------------- the server side


@dataclass
class ServerJob:
    """What a ``server-factory`` returns: what the ServerApp runs over the federation.

    Either the training loop (``initial_weights`` and ``config``: the ServerApp calls
    :func:`~.server.run_federated`), or any other server program (``main``, e.g. a federated PCA
    that broadcasts its own request kind and merges the replies).

    Parameters
    ----------
    initial_weights : Mapping[str, numpy.ndarray] or None
        The initial global state dict.
    config : RunConfig or None
        The server loop's settings.
    checkpoint_dir : Path or None
        Passed to :func:`~.server.run_federated` (checkpoint after every round).
    resume : bool
        Passed to :func:`~.server.run_federated`.
    on_round : callable or None
        Passed to :func:`~.server.run_federated`.
    on_finish : callable or None
        Called with the :class:`~.server.FederatedResult` at the end (e.g. to write a run
        directory).
    main : callable or None
        Instead of training: called as ``main(federation)`` with the :class:`FlowerFederation`.

    Raises
    ------
    ValueError
        If neither ``main`` nor both ``initial_weights`` and ``config`` are given.
    """

    initial_weights: Mapping[str, np.ndarray] | None = None
    config: RunConfig | None = None
    checkpoint_dir: Path | None = None
    resume: bool = False
    on_round: Callable[[RoundRecord, StateDict], None] | None = None
    on_finish: Callable[[FederatedResult], None] | None = None
    main: Callable[[Federation], None] | None = None

    def __post_init__(self) -> None:
        """Check that the job says what to run."""
        if self.main is None and (self.initial_weights is None or self.config is None):
            raise ValueError(
                "ServerJob needs initial_weights and config (federated training) or main "
                "(another server program); got neither"
            )


@dataclass
class FlowerResult:
    """What the ServerApp leaves in ``out-dir`` (read back with :func:`load_result`).

    Parameters
    ----------
    weights : dict[str, numpy.ndarray]
        The final global state dict (empty after a ``ServerJob.main`` program).
    completed_rounds : int
        The last completed round (0 after a ``ServerJob.main`` program).
    history : list[dict[str, Any]]
        :meth:`~.server.RoundRecord.deterministic` of every round, with ``seconds`` and
        ``server_seconds`` added back.
    site_sizes : dict[str, int]
        Training-set sizes the sites declared.
    site_nodes : dict[str, int]
        Site name -> Flower node id.
    seconds : float
        Wall time of the server loop.
    """

    weights: StateDict
    completed_rounds: int
    history: list[dict[str, Any]] = field(default_factory=list)
    site_sizes: dict[str, int] = field(default_factory=dict)
    site_nodes: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


_RESULT_JSON = "result.json"
_WEIGHTS_FILE = "weights.safetensors"


def _write_result(out_dir: Path, result: FlowerResult) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    if result.weights:
        weights = {k: np.asarray(v, order="C") for k, v in result.weights.items()}  # 0-d kept
        save_file(weights, str(out_dir / _WEIGHTS_FILE))
    meta = asdict(result)
    del meta["weights"]
    tmp = out_dir / (_RESULT_JSON + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
    os.replace(tmp, out_dir / _RESULT_JSON)  # written last: its presence means "finished"


def load_result(out_dir: str | os.PathLike[str]) -> FlowerResult:
    """Read what the ServerApp wrote into ``out-dir``.

    Parameters
    ----------
    out_dir : path-like
        The run's ``out-dir``.

    Returns
    -------
    FlowerResult
        Final weights and history.

    Raises
    ------
    FileNotFoundError
        If the run did not finish (no ``result.json``).
    """
    root = Path(out_dir)
    meta_path = root / _RESULT_JSON
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{meta_path} does not exist: the Flower run did not finish (see the ServerApp log, "
            "e.g. `flwr log RUN_ID`)"
        )
    meta = json.loads(meta_path.read_text())
    weights_path = root / _WEIGHTS_FILE
    weights = load_file(str(weights_path)) if weights_path.is_file() else {}
    return FlowerResult(weights=weights, **meta)


def load_object(ref: str, what: str) -> Any:
    """Import the object a ``"module:attribute"`` reference names.

    Parameters
    ----------
    ref : str
        E.g. ``"multimodal_fl.federated.site:flower_site"``.
    what : str
        The run-config key it came from (for the error message).

    Returns
    -------
    Any
        The object.

    Raises
    ------
    ValueError
        If ``ref`` is malformed, the module cannot be imported or has no such attribute.
    """
    module_name, _, attr = str(ref).partition(":")
    if not module_name or not attr:
        raise ValueError(
            f"run config {what}={ref!r}: expected 'package.module:callable', e.g. "
            "'multimodal_fl.federated.site:flower_site'"
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"run config {what}={ref!r}: cannot import {module_name!r} ({exc}); the module must "
            "be importable in the SuperLink's / SuperNode's Python environment"
        ) from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(
                f"run config {what}={ref!r}: {module_name!r} has no attribute {attr!r}"
            )
        obj = getattr(obj, part)
    return obj


def _settings(run_config: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = dict(DEFAULT_RUN_CONFIG)
    out.update({k: v for k, v in run_config.items() if k in DEFAULT_RUN_CONFIG})
    return out


def _set_torch_threads(n: int) -> None:
    if n > 0:
        import torch

        torch.set_num_threads(n)


server_app = ServerApp()


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    """The ServerApp's main: build the job, wait for the SuperNodes, run the one server loop.

    Parameters
    ----------
    grid : flwr.serverapp.Grid
        Flower's grid.
    context : flwr.app.Context
        Carries the run config (see :data:`DEFAULT_RUN_CONFIG`).

    Raises
    ------
    ValueError
        If the run config names no usable ``server-factory``.
    RuntimeError
        If fewer than ``min-nodes`` SuperNodes connect within ``node-wait`` seconds.
    """
    run_config = dict(context.run_config)
    opts = _settings(run_config)
    _set_torch_threads(int(opts["torch-threads"]))
    package_log = logging.getLogger("multimodal_fl")
    if not package_log.handlers:  # the ServerApp's stdout is what `flwr run --stream` shows
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        package_log.addHandler(handler)
        package_log.setLevel(logging.INFO)
    if not opts["server-factory"]:
        raise ValueError(
            "run config 'server-factory' is empty; expected 'module:callable' returning a "
            "multimodal_fl.federated.flower.ServerJob"
        )
    factory = load_object(str(opts["server-factory"]), "server-factory")
    job = factory(run_config)
    if not isinstance(job, ServerJob):
        raise TypeError(
            f"server-factory {opts['server-factory']!r} returned a {type(job).__name__}; "
            "expected a multimodal_fl.federated.flower.ServerJob"
        )
    federation = FlowerFederation(
        grid,
        poll_interval=float(opts["poll-interval"]),
        describe_timeout=float(opts["describe-timeout"]),
    )
    need = int(opts["min-nodes"]) or (job.config.min_sites if job.config is not None else 1)
    nodes = federation.wait_for_nodes(need, float(opts["node-wait"]))
    if len(nodes) < need:
        raise RuntimeError(
            f"only {len(nodes)} SuperNode(s) connected within {opts['node-wait']} s; the run "
            f"needs {need} (run config 'min-nodes', else the job's min_sites)"
        )
    sites = federation.site_nodes()
    log.info("sites: %s", ", ".join(f"{s} (node {n})" for s, n in sorted(sites.items())))
    if job.main is not None:
        t0 = time.perf_counter()
        job.main(federation)
        if opts["out-dir"]:  # no weights: the program writes its own output; this marks the end
            _write_result(
                Path(str(opts["out-dir"])),
                FlowerResult(
                    weights={},
                    completed_rounds=0,
                    site_nodes=federation.site_nodes(),
                    seconds=time.perf_counter() - t0,
                ),
            )
        return
    if job.initial_weights is None or job.config is None:  # ServerJob checks it; for mypy
        raise ValueError("ServerJob without main needs initial_weights and config")
    t0 = time.perf_counter()
    result = run_federated(
        federation,
        job.initial_weights,
        job.config,
        checkpoint_dir=job.checkpoint_dir,
        resume=job.resume,
        on_round=job.on_round,
    )
    seconds = time.perf_counter() - t0
    if opts["out-dir"]:
        history = []
        for record in result.history:
            row = record.deterministic()
            row.update(seconds=record.seconds, server_seconds=record.server_seconds)
            history.append(row)
        _write_result(
            Path(str(opts["out-dir"])),
            FlowerResult(
                weights=result.weights,
                completed_rounds=result.completed_rounds,
                history=history,
                site_sizes=result.site_sizes,
                site_nodes=federation.site_nodes(),
                seconds=seconds,
            ),
        )
    if job.on_finish is not None:
        job.on_finish(result)


# --------------------------------------------------------------------------- the client side


client_app = ClientApp()


def _site_identity(node_config: Mapping[str, Any]) -> tuple[str, Path]:
    site_dir = node_config.get(_SITE_DIR)
    if not site_dir:
        raise ValueError(
            f"this SuperNode has no {_SITE_DIR!r} in its node config (it has "
            f"{sorted(node_config)}); start it with --node-config \"site-dir='/path/to/site' "
            "site-name='site_a'\""
        )
    name = node_config.get(_SITE_NAME) or Path(str(site_dir)).name
    return str(name), Path(str(site_dir))


def _handle(msg: Message, context: Context) -> Message:
    """Answer one message: describe the node, or hand the request to the site."""
    node_config = dict(context.node_config)
    run_config = dict(context.run_config)
    name, site_dir = _site_identity(node_config)
    request = content_to_request(msg.content)
    if request.kind == DESCRIBE:
        reply = Reply(site=name, kind=DESCRIBE, round=request.round)
        return Message(reply_to_content(reply), reply_to=msg)
    opts = _settings(run_config)
    _set_torch_threads(int(opts["torch-threads"]))
    if not opts["site-factory"]:
        raise ValueError(
            "run config 'site-factory' is empty; expected 'module:callable' taking "
            "(site_name, site_dir, run_config) and returning a Site"
        )
    if opts["site-worker"]:  # one long-lived process per (run, node) holds the site
        from multimodal_fl.federated.flower_worker import call_worker, worker_address

        reply = call_worker(
            worker_address(context.run_id, context.node_id, name, run_config),
            request,
            site=name,
            site_dir=site_dir,
            factory=str(opts["site-factory"]),
            run_config=run_config,
            idle=float(opts["site-worker-idle"]),
            start_timeout=float(opts["site-worker-start"]),
        )
        return Message(reply_to_content(reply), reply_to=msg)
    factory = cast(SiteFactory, load_object(str(opts["site-factory"]), "site-factory"))
    site = factory(name, site_dir, run_config)
    # Opt-in: a site that keeps arrays between requests (e.g. FedBN's local layers) exports
    # them; they live in the SuperNode's per-run context state, since every message gets a
    # fresh ClientApp process. Nothing of it leaves the SuperNode.
    restore = getattr(site, "restore_state", None)
    if callable(restore) and SITE_STATE_KEY in context.state.array_records:
        restore(_numpy(context.state.array_records[SITE_STATE_KEY]))
    reply = site.handle(request)
    if not isinstance(reply, Reply):
        raise TypeError(f"site {name!r}: handle() returned a {type(reply).__name__}, not a Reply")
    export = getattr(site, "export_state", None)
    if callable(export):
        context.state[SITE_STATE_KEY] = _array_record(export())
    return Message(reply_to_content(reply), reply_to=msg)


@client_app.train()
def client_train(msg: Message, context: Context) -> Message:
    """ClientApp ``train`` handler (fit requests).

    Parameters
    ----------
    msg : flwr.app.Message
        The instruction.
    context : flwr.app.Context
        Node config (site) and run config.

    Returns
    -------
    flwr.app.Message
        The reply.
    """
    return _handle(msg, context)


@client_app.evaluate()
def client_evaluate(msg: Message, context: Context) -> Message:
    """ClientApp ``evaluate`` handler (evaluate requests).

    Parameters
    ----------
    msg : flwr.app.Message
        The instruction.
    context : flwr.app.Context
        Node config (site) and run config.

    Returns
    -------
    flwr.app.Message
        The reply.
    """
    return _handle(msg, context)


@client_app.query()
def client_query(msg: Message, context: Context) -> Message:
    """ClientApp ``query`` handler (describe, info and any other request kind).

    Parameters
    ----------
    msg : flwr.app.Message
        The instruction.
    context : flwr.app.Context
        Node config (site) and run config.

    Returns
    -------
    flwr.app.Message
        The reply.
    """
    return _handle(msg, context)


# --------------------------------------------------------------------------- the app directory


def _toml_value(value: ConfigValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"run config value {value!r} is not finite; TOML run configs need one")
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def write_app_dir(
    dest: str | os.PathLike[str],
    run_config: Mapping[str, ConfigValue],
    *,
    name: str = "mmfl-app",
) -> Path:
    """Write the Flower App directory that ``flwr run DEST CONNECTION`` submits.

    The app holds only a ``pyproject.toml``: its components point at :data:`server_app` and
    :data:`client_app` in this installed package, and its ``[tool.flwr.app.config]`` holds
    :data:`DEFAULT_RUN_CONFIG` updated with ``run_config`` (``flwr run --run-config`` can override
    only keys declared there, so every key is written).

    Parameters
    ----------
    dest : path-like
        The directory (created; an existing ``pyproject.toml`` is replaced).
    run_config : Mapping[str, int | float | str | bool]
        Run-config entries (``server-factory``, ``site-factory``, ``out-dir``, anything the
        factories read).
    name : str
        The app's name (letters, digits, hyphens).

    Returns
    -------
    Path
        ``dest``.
    """
    from multimodal_fl import __version__

    config: dict[str, ConfigValue] = dict(DEFAULT_RUN_CONFIG)
    config.update(run_config)
    lines = [
        "# Written by multimodal_fl.federated.flower.write_app_dir: the package's Flower App.",
        "[project]",
        f"name = {json.dumps(name)}",
        f"version = {json.dumps(str(__version__))}",
        'description = "multimodal_fl federated training: the package server loop on Flower"',
        'license = "Apache-2.0"',
        "dependencies = []",
        "",
        "[tool.flwr.app]",
        'publisher = "multimodal-fl"',
        "",
        "[tool.flwr.app.components]",
        'serverapp = "multimodal_fl.federated.flower:server_app"',
        'clientapp = "multimodal_fl.federated.flower:client_app"',
        "",
        "[tool.flwr.app.config]",
    ]
    lines += [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in config.items()]
    root = Path(dest)
    root.mkdir(parents=True, exist_ok=True)
    (root / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return root


# --------------------------------------------------------------------------- local processes

#: Environment every Flower process of :class:`LoopbackDeployment` gets: no telemetry, no
#: update check (both would reach the network).
QUIET_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def flower_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for Flower processes: this one, quiet, with this Python's scripts first.

    Parameters
    ----------
    extra : Mapping[str, str] or None
        Entries added last (e.g. ``FLWR_HOME``, ``PYTHONPATH``).

    Returns
    -------
    dict[str, str]
        ``os.environ`` plus :data:`QUIET_ENV`, with the directory of ``sys.executable`` first on
        ``PATH`` (the SuperLink and SuperNode start ``flower-superexec`` and the app processes
        from ``PATH``).
    """
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, **QUIET_ENV, **dict(extra or {})}


def flower_exe(name: str) -> str:
    """Find a Flower executable (``flwr``, ``flower-superlink``...) next to this Python first.

    Parameters
    ----------
    name : str
        The executable's name.

    Returns
    -------
    str
        Its path.

    Raises
    ------
    FileNotFoundError
        If Flower is not installed.
    """
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(
            f"{name!r} not found next to {sys.executable} nor on PATH; install the Flower extra "
            "(pip install 'multimodal_fl[flower]')"
        )
    return found


def superlink_command(port: int, *, host: str = "127.0.0.1", insecure: bool = True) -> list[str]:
    """The ``flower-superlink`` command line (one HTTP port for Fleet, Control and ServerAppIo).

    Parameters
    ----------
    port : int
        The SuperLink's port.
    host : str
        Interface to listen on.
    insecure : bool
        Plain HTTP (loopback tests); False needs ``--ssl-*`` flags added by the caller.

    Returns
    -------
    list[str]
        The argv. Runtime dependency installation is always disabled (it would run ``uv sync``
        against the network): the package must already be installed where the SuperLink runs.
    """
    cmd = [flower_exe("flower-superlink"), "--disable-runtime-dependency-installation"]
    if insecure:
        cmd.append("--insecure")
    return [*cmd, "--host", host, "--port", str(port)]


def supernode_command(
    superlink: str,
    port: int,
    site_dir: str | os.PathLike[str],
    *,
    site_name: str | None = None,
    insecure: bool = True,
) -> list[str]:
    """The ``flower-supernode`` command line for one site.

    Parameters
    ----------
    superlink : str
        ``host:port`` of the SuperLink.
    port : int
        This SuperNode's own ClientAppIo port (one per SuperNode on a machine).
    site_dir : path-like
        The site's data directory (``--node-config site-dir``).
    site_name : str or None
        The site's name (default: the directory's name).
    insecure : bool
        Plain HTTP to the SuperLink.

    Returns
    -------
    list[str]
        The argv.
    """
    name = site_name or Path(site_dir).name
    for key, value in ((_SITE_NAME, name), (_SITE_DIR, str(site_dir))):
        if "'" in value:
            raise ValueError(f"{key} {value!r} may not contain a single quote (--node-config)")
    node_config = f"{_SITE_NAME}='{name}' {_SITE_DIR}='{Path(site_dir).resolve()}'"
    cmd = [flower_exe("flower-supernode"), "--superlink", superlink, "--port", str(port)]
    if insecure:
        cmd.append("--insecure")
    return [*cmd, "--node-config", node_config]


def flwr_run_command(app_dir: str | os.PathLike[str], connection: str | None = None) -> list[str]:
    """The ``flwr run APP [CONNECTION] --stream`` command line.

    Parameters
    ----------
    app_dir : path-like
        A directory written by :func:`write_app_dir`.
    connection : str or None
        A SuperLink connection named in ``$FLWR_HOME/config.toml`` (None: its default).

    Returns
    -------
    list[str]
        The argv.
    """
    cmd = [flower_exe("flwr"), "run", str(app_dir)]
    if connection:
        cmd.append(connection)
    return [*cmd, "--stream"]


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` right now.

    Parameters
    ----------
    host : str
        The interface.

    Returns
    -------
    int
        The port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode} at start")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:g} s ({proc.args!r})")


class LoopbackDeployment:
    """One SuperLink and one SuperNode per site as local processes on 127.0.0.1.

    For tests, demos and benchmarks: the real deployment runs the same commands on different
    machines (``docs/deployment.md``). Every process runs in its own process group with
    telemetry and update checks off and logs to ``log_dir``; :meth:`stop` ends the groups.

    Parameters
    ----------
    sites : Mapping[str, path-like]
        Site name -> site directory, one SuperNode each.
    home : path-like
        ``FLWR_HOME`` for every process (installed apps; the ``config.toml`` naming the
        connection :attr:`CONNECTION`).
    log_dir : path-like or None
        Where each process writes ``<name>.log`` (default: ``home/logs``).
    env : Mapping[str, str] or None
        Extra environment (e.g. ``PYTHONPATH`` for factories outside the package).
    startup_timeout : float
        Seconds to wait for the SuperLink to listen.
    """

    #: The connection name written into ``FLWR_HOME/config.toml``.
    CONNECTION = "mmfl-loopback"

    def __init__(
        self,
        sites: Mapping[str, str | os.PathLike[str]],
        *,
        home: str | os.PathLike[str],
        log_dir: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        if not sites:
            raise ValueError("LoopbackDeployment needs at least one site; got none")
        self.sites = {name: Path(path) for name, path in sites.items()}
        self.home = Path(home)
        self.log_dir = Path(log_dir) if log_dir is not None else self.home / "logs"
        self.env = flower_env({"FLWR_HOME": str(self.home), **dict(env or {})})
        self.startup_timeout = float(startup_timeout)
        self.port = 0
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[Any] = []

    @property
    def address(self) -> str:
        """``host:port`` of the SuperLink."""
        return f"127.0.0.1:{self.port}"

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        out = (self.log_dir / f"{name}.log").open("wb")
        self._logs.append(out)
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        self.procs[name] = proc
        return proc

    def start(self) -> LoopbackDeployment:
        """Start the SuperLink, wait until it listens, start the SuperNodes, write config.toml.

        Returns
        -------
        LoopbackDeployment
            ``self``.
        """
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{self.CONNECTION}"\n\n'
            f'[superlink.{self.CONNECTION}]\naddress = "{self.address}"\ninsecure = true\n'
        )
        link = self._spawn("superlink", superlink_command(self.port))
        _wait_for_port("127.0.0.1", self.port, self.startup_timeout, link)
        for name, site_dir in sorted(self.sites.items()):
            cmd = supernode_command(self.address, free_port(), site_dir, site_name=name)
            self._spawn(f"supernode-{name}", cmd)
        return self

    def run(
        self, app_dir: str | os.PathLike[str], *, timeout: float = 600.0
    ) -> subprocess.CompletedProcess[str]:
        """Submit the app with ``flwr run APP CONNECTION --stream`` and wait for it to end.

        Parameters
        ----------
        app_dir : path-like
            A directory written by :func:`write_app_dir`.
        timeout : float
            Seconds before ``flwr run`` is killed.

        Returns
        -------
        subprocess.CompletedProcess
            ``flwr run``'s exit status and output (its exit status is 0 even when the ServerApp
            raised: check the result, e.g. with :func:`load_result`).
        """
        cmd = flwr_run_command(app_dir, self.CONNECTION)
        return subprocess.run(
            cmd, env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )

    def logs(self) -> str:
        """Return every process's log, concatenated (for error messages).

        Returns
        -------
        str
            The logs, each under a header.
        """
        parts = []
        for path in sorted(self.log_dir.glob("*.log")):
            parts.append(f"===== {path.name}\n{path.read_text(errors='replace')}")
        return "\n".join(parts)

    def stop(self, grace: float = 5.0) -> None:
        """End every process group (SIGTERM, then SIGKILL after ``grace`` seconds).

        Parameters
        ----------
        grace : float
            Seconds to wait after SIGTERM.
        """
        for proc in self.procs.values():
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.procs.values():
            _signal_group(proc, signal.SIGKILL)  # also the ServerApp / ClientApp children
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log.error("process %s did not end after SIGKILL", proc.pid)
        for handle in self._logs:
            handle.close()
        self._logs.clear()

    def __enter__(self) -> LoopbackDeployment:
        """Start (see :meth:`start`); stop on exit even if starting fails half-way."""
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        """Stop every process."""
        self.stop()


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)  # start_new_session=True: the group id is the pid
    except (ProcessLookupError, PermissionError):
        pass


class FlowerRunError(RuntimeError):
    """A Flower run ended without a result; the message carries the processes' logs."""


def run_loopback(
    sites: Mapping[str, str | os.PathLike[str]],
    run_config: Mapping[str, ConfigValue],
    workdir: str | os.PathLike[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 3600.0,
) -> FlowerResult:
    """Run the package's app on a :class:`LoopbackDeployment` and return its result.

    Writes the app into ``workdir/app``, the result into ``workdir/out`` (unless ``run_config``
    names an ``out-dir``), Flower's home and logs into ``workdir/flwr_home``; waits for all
    sites (``min-nodes`` defaults to their number).

    Parameters
    ----------
    sites : Mapping[str, path-like]
        Site name -> site directory, one SuperNode each.
    run_config : Mapping[str, int | float | str | bool]
        The run config (``server-factory`` and ``site-factory`` at least).
    workdir : path-like
        Working directory (created).
    env : Mapping[str, str] or None
        Extra environment for the Flower processes (e.g. ``PYTHONPATH``).
    timeout : float
        Seconds before ``flwr run`` is stopped.

    Returns
    -------
    FlowerResult
        Final weights, history, timings.

    Raises
    ------
    FlowerRunError
        If the run wrote no result (the message ends with the processes' logs).
    """
    root = Path(workdir)
    config: dict[str, ConfigValue] = {"min-nodes": len(sites), "out-dir": str(root / "out")}
    config.update(run_config)
    app_dir = write_app_dir(root / "app", config)
    with LoopbackDeployment(sites, home=root / "flwr_home", env=env) as deployment:
        try:
            done = deployment.run(app_dir, timeout=timeout)
            output = f"flwr run exited with {done.returncode}:\n{done.stdout[-4000:]}"
        except subprocess.TimeoutExpired:
            output = f"flwr run did not end within {timeout:g} s"
        try:
            return load_result(str(config["out-dir"]))
        except FileNotFoundError as exc:
            logs = deployment.logs()
            causes = re.findall(r"^\w+(?:Error|Exception): .*$", output + logs, re.MULTILINE)
            cause = f"the last error: {causes[-1]}\n" if causes else ""
            raise FlowerRunError(f"{cause}{exc}\n{output}\n{logs[-8000:]}") from None
