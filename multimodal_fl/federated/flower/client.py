"""The package's ClientApp: the forwarding side of every message a SuperNode gets.

Flower 1.42 starts a fresh ``flwr-clientapp`` process for every message, so what this module
imports is paid per message. It imports Flower's ``flwr.app`` / ``flwr.clientapp`` (loaded by
Flower's process already), the codec, the factories and the site worker's client, and nothing
else of the package: no torch (the site worker sets the thread count, ``torch-threads``), no
server loop, no credentials. :data:`client_app` is this package's
``multimodal_fl.federated.flower.client:client_app`` (also reachable as
``multimodal_fl.federated.flower:client_app``).

Every message is answered by the site: its long-lived worker (run config ``site-worker``,
:mod:`.worker`), or a site built for this message from the run config's ``site-factory`` (a
site that must keep arrays between requests implements ``export_state() -> dict[str, ndarray]``
and ``restore_state(arrays)``, kept in the SuperNode's per-run context state).

With the environment variable :data:`TIMINGS_ENV` set to a folder on the SuperNode's machine,
each message appends one JSON line to ``<folder>/<site>.jsonl`` (:func:`message_timing`): where
the message's time went, measured in this process and the worker (Flower's process start, this
module's import, the hand-off, the site's own work). The line stays on the SuperNode; nothing
of it travels in a reply.
"""

from __future__ import annotations

import time

#: Wall clock and this process's CPU seconds when the package's ClientApp import starts.
_IMPORT_STARTED = (time.time(), time.process_time())

import json  # noqa: E402 - after the clock above: its cost is the package's share
import logging  # noqa: E402
import os  # noqa: E402
from collections.abc import Mapping  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, cast  # noqa: E402

from flwr.app import Context, Message  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from multimodal_fl.federated.flower.codec import (  # noqa: E402
    DESCRIBE,
    RELEASE,
    array_record,
    content_to_request,
    record_arrays,
    reply_to_content,
)
from multimodal_fl.federated.flower.factories import SiteFactory, load_object  # noqa: E402
from multimodal_fl.federated.flower.worker import (  # noqa: E402
    WorkerFailed,
    call_worker,
    stop_worker,
    worker_address,
)
from multimodal_fl.federated.protocol import (  # noqa: E402
    ConfigValue,
    Reply,
    Request,
    SiteError,
    SiteRefused,
    boundary_reason,
)

__all__ = [
    "DEFAULT_RUN_CONFIG",
    "FLOWER_RUN_ID",
    "NODE_CONFIG_PREFIX",
    "NODE_SITE_DIR",
    "NODE_SITE_NAME",
    "SITE_STATE_KEY",
    "TIMINGS_ENV",
    "client_app",
    "client_evaluate",
    "client_query",
    "client_train",
    "message_timing",
    "run_settings",
]

log = logging.getLogger(__name__)

#: The environment variable naming a folder for per-message timing lines (unset: none written).
TIMINGS_ENV = "MMFL_MESSAGE_TIMINGS"

#: Key of a site's exported arrays in the SuperNode's per-run context state (see the ClientApp).
SITE_STATE_KEY = "mmfl.site-state"

#: The node-config key naming a SuperNode's site (``--node-config site-name='site_a'``).
NODE_SITE_NAME = "site-name"
#: The node-config key of a SuperNode's site directory (``--node-config site-dir='/data/a'``).
NODE_SITE_DIR = "site-dir"
#: The site factory sees Flower's run id in its run config under this key (e.g. for its egress
#: log, which may hold the lines of many runs).
FLOWER_RUN_ID = "flower-run-id"
#: The attribute of a site factory that records, in its site's egress log, a request that
#: failed before any gate saw it (the site could not be built, its worker died):
#: ``factory.record_failure(site_name, site_dir, run_config, request, failed)``. Optional.
RECORD_FAILURE = "record_failure"
#: The site factory sees the SuperNode's node config in its run config under this prefix
#: (``node.min-cell``, ...): how a hospital's SuperNode hands its own settings to its site.
NODE_CONFIG_PREFIX = "node."

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
    # append every site's answer to this file as a JSON line, on the ServerApp's machine ("":
    # nowhere); `mmfl flower local` and `mmfl train --engine flower` draw their bars from it
    "progress-file": "",
    # torch.set_num_threads in the ServerApp and every ClientApp process (0: leave as is)
    "torch-threads": 0,
    # keep each site in one long-lived process per (run, SuperNode) instead of building it for
    # every message (multimodal_fl.federated.flower.worker)
    "site-worker": False,
    # seconds without a request after which a site worker ends
    "site-worker-idle": 1800.0,
    # seconds a new site worker may take to build its site
    "site-worker-start": 600.0,
}


def run_settings(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The run config's keys of :data:`DEFAULT_RUN_CONFIG`, defaults filled in.

    Parameters
    ----------
    run_config : Mapping[str, Any]
        A run's run config.

    Returns
    -------
    dict[str, Any]
        Every key of :data:`DEFAULT_RUN_CONFIG`.
    """
    out: dict[str, Any] = dict(DEFAULT_RUN_CONFIG)
    out.update({k: v for k, v in run_config.items() if k in DEFAULT_RUN_CONFIG})
    return out



# --------------------------------------------------------------------------- the client side


client_app = ClientApp()


def _site_identity(node_config: Mapping[str, Any]) -> tuple[str, Path]:
    """The node's site name and directory, from its node config."""
    site_dir = node_config.get(NODE_SITE_DIR)
    if not site_dir:
        raise ValueError(
            f"this SuperNode has no {NODE_SITE_DIR!r} in its node config (it has "
            f"{sorted(node_config)}); start it with --node-config \"site-dir='/path/to/site' "
            "site-name='site_a'\""
        )
    name = node_config.get(NODE_SITE_NAME) or Path(str(site_dir)).name
    return str(name), Path(str(site_dir))


def _set_torch_threads(n: int) -> None:
    """``torch.set_num_threads(n)`` when ``n > 0`` (a site built in this process only)."""
    if n > 0:
        import torch  # only for a site built here; a worker sets its own

        torch.set_num_threads(n)


def _process_started() -> float:
    """When this process started (epoch seconds), from ``/proc`` (NaN where there is none)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in
                    Path("/proc/stat").read_text().splitlines() if line.startswith("btime"))
    except (OSError, ValueError, IndexError, StopIteration):
        return float("nan")
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def message_timing(request: Request, site: str, entered: tuple[float, float],
                   left: tuple[float, float], site_work: Mapping[str, float]) -> dict[str, Any]:
    """Where one message's time went in the ClientApp process and the site (one timing line).

    Parameters
    ----------
    request : Request
        The message's request.
    site : str
        The site's name.
    entered, left : tuple[float, float]
        Wall clock and process CPU seconds when the handler was entered and left.
    site_work : mapping
        ``wall`` and ``cpu`` seconds of the site's own ``handle()`` (in its worker, or here).

    Returns
    -------
    dict[str, Any]
        ``flower_start`` (process start to this module's import: Flower's process and its own
        imports; ``cpu`` is all of this process's CPU until then), ``import`` (this module's
        import), ``handler_wait`` (import end to the handler: Flower reading the message),
        ``handoff`` (the handler minus the site's work: decoding, the worker's socket,
        encoding), ``site`` (the site's work), each with ``wall`` and ``cpu`` seconds;
        ``process_start`` and ``handler_end`` (epoch seconds).
    """
    started = _process_started()
    site_wall, site_cpu = float(site_work.get("wall", 0.0)), float(site_work.get("cpu", 0.0))
    in_worker = bool(site_work.get("worker", 0.0))
    handler_wall, handler_cpu = left[0] - entered[0], left[1] - entered[1]
    return {
        "site": site, "kind": str(request.kind), "round": int(request.round), "pid": os.getpid(),
        "process_start": started, "handler_end": left[0],
        "flower_start": {"wall": _IMPORT_STARTED[0] - started, "cpu": _IMPORT_STARTED[1]},
        "import": {"wall": _IMPORTED[0] - _IMPORT_STARTED[0],
                   "cpu": _IMPORTED[1] - _IMPORT_STARTED[1]},
        "handler_wait": {"wall": entered[0] - _IMPORTED[0], "cpu": entered[1] - _IMPORTED[1]},
        "handoff": {"wall": handler_wall - site_wall,
                    # the worker's CPU is another process's; a site built here is this one's
                    "cpu": handler_cpu - (0.0 if in_worker else site_cpu)},
        "site_work": {"wall": site_wall, "cpu": site_cpu, "in_worker": in_worker},
    }


def _write_timing(line: Mapping[str, Any]) -> None:
    """Append one timing line to ``$MMFL_MESSAGE_TIMINGS/<site>.jsonl`` (never raises)."""
    folder = os.environ.get(TIMINGS_ENV)
    if not folder:
        return
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with (Path(folder) / f"{line['site']}.jsonl").open("a") as out:
            out.write(json.dumps(line) + "\n")
    except OSError as exc:  # a timing line is never worth a failed message
        log.warning("could not write the message timing to %s: %s", folder, exc)


def _handle(msg: Message, context: Context) -> Message:
    """Answer one message: describe the node, or hand the request to the site."""
    entered = (time.time(), time.process_time())
    node_config = dict(context.node_config)
    run_config = dict(context.run_config)
    name, site_dir = _site_identity(node_config)
    request = content_to_request(msg.content)
    if request.kind == DESCRIBE:
        reply = Reply(site=name, kind=DESCRIBE, round=request.round)
        return Message(reply_to_content(reply), reply_to=msg)
    opts = run_settings(run_config)
    if request.kind == RELEASE:  # the run ended: its worker has nothing more to do
        if opts["site-worker"]:
            stop_worker(worker_address(context.run_id, context.node_id, name, run_config))
        return Message(reply_to_content(Reply(site=name, kind=RELEASE, round=0)), reply_to=msg)
    if not opts["site-factory"]:
        raise ValueError(
            "run config 'site-factory' is empty; expected 'module:callable' taking "
            "(site_name, site_dir, run_config) and returning a Site"
        )
    site_config = {**run_config, **{NODE_CONFIG_PREFIX + str(k): v for k, v in node_config.items()},
                   FLOWER_RUN_ID: int(context.run_id)}
    work: dict[str, float] = {}
    try:
        reply = _site_reply(request, context, name, site_dir, opts, site_config, work)
    except (SiteRefused, SiteError):  # made to cross the site boundary
        raise
    except Exception as exc:  # only boundary_reason crosses; the traceback stays in this log
        log.exception("site %s failed on a %s request", name, request.kind)
        raise SiteError(f"site {name!r}: {boundary_reason(exc)}") from None
    out = Message(reply_to_content(reply), reply_to=msg)
    if os.environ.get(TIMINGS_ENV):
        _write_timing(message_timing(request, name, entered,
                                     (time.time(), time.process_time()), work))
    return out


def _record_failure(request: Request, name: str, site_dir: Path, opts: Mapping[str, Any],
                    site_config: Mapping[str, Any], failed: str) -> None:
    """Write a failure no gate saw into the site's egress log, through its factory's
    :data:`RECORD_FAILURE` (nothing where the factory has none; never raises)."""
    try:
        factory = load_object(str(opts["site-factory"]), "site-factory")
        record = getattr(factory, RECORD_FAILURE, None)
        if callable(record):
            record(name, site_dir, site_config, request, failed)
    except Exception as exc:  # the failure itself is what the server must hear about
        log.warning("site %s: could not record the failure in its egress log: %s", name, exc)


def _site_reply(request: Request, context: Context, name: str, site_dir: Path,
                opts: Mapping[str, Any], site_config: Mapping[str, Any],
                work: dict[str, float]) -> Reply:
    """The site's reply: from its worker, or from a site built for this message.

    ``work`` receives the site's own ``wall`` and ``cpu`` seconds (and ``worker``: 1.0 when the
    worker answered).
    """
    if opts["site-worker"]:  # one long-lived process per (run, node) holds the site
        try:
            return call_worker(
                worker_address(context.run_id, context.node_id, name,
                               dict(context.run_config)),
                request,
                site=name,
                site_dir=site_dir,
                factory=str(opts["site-factory"]),
                run_config=site_config,
                idle=float(opts["site-worker-idle"]),
                start_timeout=float(opts["site-worker-start"]),
                timing=work,
            )
        except WorkerFailed as exc:
            _record_failure(request, name, site_dir, opts, site_config, exc.failed)
            raise
    _set_torch_threads(int(opts["torch-threads"]))
    started = (time.perf_counter(), time.process_time())
    factory = cast(SiteFactory, load_object(str(opts["site-factory"]), "site-factory"))
    try:
        site = factory(name, site_dir, site_config)
    except Exception as exc:
        _record_failure(request, name, site_dir, opts, site_config,
                        f"{type(exc).__name__} while building the site")
        raise
    # Opt-in: a site that keeps arrays between requests (e.g. FedBN's local layers) exports
    # them; they live in the SuperNode's per-run context state, since every message gets a
    # fresh ClientApp process. Nothing of it leaves the SuperNode.
    restore = getattr(site, "restore_state", None)
    if callable(restore) and SITE_STATE_KEY in context.state.array_records:
        restore(record_arrays(context.state.array_records[SITE_STATE_KEY]))
    reply = site.handle(request)
    if not isinstance(reply, Reply):
        raise TypeError(f"site {name!r}: handle() returned a {type(reply).__name__}, not a Reply")
    export = getattr(site, "export_state", None)
    if callable(export):
        context.state[SITE_STATE_KEY] = array_record(export())
    work.update(wall=time.perf_counter() - started[0], cpu=time.process_time() - started[1])
    return reply


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

_IMPORTED = (time.time(), time.process_time())
