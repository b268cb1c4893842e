"""A site that outlives Flower's ClientApp processes: one worker process per (run, SuperNode).

Flower 1.42 starts a fresh ClientApp process for every message, so a site built by the ClientApp
(imports, cohort, prepared data, model) is rebuilt for every request. With the run config's
``site-worker = true`` the ClientApp instead hands each request to a long-lived worker process on
the same machine, started by the first request of the run, that builds the site once and answers
every later request from memory (site state, e.g. FedBN's local layers, stays in it too).

The worker listens on a Unix socket in the temporary directory (``multiprocessing.connection``,
authenticated by a random key in a file only this user can read); nothing leaves the machine.
It ends when the SuperNode's task runner that started it ends, after ``site-worker-idle`` seconds
without a request, or when asked (:func:`stop_worker`). This module does not import Flower; the
worker process runs ``python -m multimodal_fl.federated.flower SPEC`` (:mod:`.__main__`, which
calls :func:`worker_main`), and imports its site factory with :func:`.factories.load_object`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import Any

from multimodal_fl.federated.flower.factories import load_object
from multimodal_fl.federated.protocol import (
    Reply,
    Request,
    SiteError,
    SiteRefused,
    boundary_reason,
)

__all__ = ["WorkerAddress", "WorkerFailed", "call_worker", "stop_worker", "worker_address",
           "worker_main"]

log = logging.getLogger(__name__)

_STOP = "stop"


@dataclass(frozen=True)
class WorkerAddress:
    """Where one worker lives: its socket and the files next to it.

    Parameters
    ----------
    socket : Path
        The Unix socket.
    """

    socket: Path

    def _with(self, suffix: str) -> Path:
        return self.socket.with_suffix(suffix)

    @property
    def key(self) -> Path:
        """The authentication key file (mode 0600)."""
        return self._with(".key")

    @property
    def spec(self) -> Path:
        """The worker's start-up spec (JSON; removed once read)."""
        return self._with(".json")

    @property
    def pid(self) -> Path:
        """The worker's process id, written by whoever started it."""
        return self._with(".pid")

    @property
    def log(self) -> Path:
        """The worker's log (its stdout and stderr)."""
        return self._with(".log")

    @property
    def failure(self) -> Path:
        """Why the worker could not build its site: the exception's type name only."""
        return self._with(".failed")


def worker_address(
    run_id: int, node_id: int, site: str, run_config: Mapping[str, Any] | None = None
) -> WorkerAddress:
    """Return the address of the worker of one site in one run.

    Parameters
    ----------
    run_id, node_id : int
        Flower's run and node ids.
    site : str
        The site's name.
    run_config : mapping or None
        The run config; part of the address, so that a worker built for another run config
        (a reused run id, e.g. after a SuperLink restart) is never asked.

    Returns
    -------
    WorkerAddress
        In ``$MMFL_WORKER_DIR`` if set, else the temporary directory (short paths: Unix
        sockets allow about 100 characters). Test sessions set their own folder, so two
        sessions on one machine never share a worker.
    """
    config = json.dumps(dict(run_config or {}), sort_keys=True, default=str)
    key = f"{run_id}\x1f{node_id}\x1f{site}\x1f{config}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    folder = os.environ.get("MMFL_WORKER_DIR") or tempfile.gettempdir()
    return WorkerAddress(Path(folder) / f"mmfl-site-{digest}.sock")


def _alive(pid: int) -> bool:
    try:  # reap it if it is our child that ended (a zombie still answers kill 0)
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_pid(address: WorkerAddress) -> int | None:
    try:
        return int(address.pid.read_text().strip())
    except (OSError, ValueError):
        return None


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _start(
    address: WorkerAddress,
    *,
    site: str,
    site_dir: Path,
    factory: str,
    run_config: Mapping[str, Any],
    idle: float,
) -> subprocess.Popen[bytes]:
    """Start a worker process."""
    address.failure.unlink(missing_ok=True)
    _write_private(address.key, secrets.token_bytes(32))
    spec = {
        "site": site,
        "site_dir": str(site_dir),
        "factory": factory,
        "run_config": dict(run_config),
        "socket": str(address.socket),
        "parent_pid": os.getppid(),  # the SuperNode's task runner: the worker ends with it
        "idle": float(idle),
    }
    _write_private(address.spec, json.dumps(spec).encode())
    # the log may quote the site's data: readable by the SuperNode's user only
    fd = os.open(address.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(fd, 0o600)  # one left by an older version may be 0644
    with os.fdopen(fd, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "multimodal_fl.federated.flower", str(address.spec)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # outlives the ClientApp process that starts it
        )
    address.pid.write_text(str(proc.pid))
    return proc


def _log_tail(address: WorkerAddress, n: int = 3000) -> str:
    try:
        return address.log.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


class WorkerFailed(SiteError):
    """The site's worker did not answer (it died, or never listened): no gate saw the request.

    Parameters
    ----------
    message : str
        What crosses the site boundary.
    failed : str
        What the site's egress log records: the exception type the worker recorded while
        building the site, else what happened to the worker.
    """

    def __init__(self, message: str, failed: str) -> None:
        super().__init__(message)
        self.failed = failed


def _worker_failed(address: WorkerAddress, site: str, what: str) -> WorkerFailed:
    """The failure of a worker that did not answer, as it may cross the site boundary.

    The end of the worker's log goes to this process's log (the SuperNode's), never into
    the failure: a log line may name a patient or quote a file, and the log's own path names a
    file of the site's machine. What crosses is what happened and the exception type the worker
    recorded (if any).
    """
    log.error("the site worker of %r %s; the end of its log (%s):\n%s", site, what,
              address.log, _log_tail(address))
    try:
        kind = address.failure.read_text().strip()
    except OSError:
        kind = ""
    built = f", {kind} while building the site" if kind else ""
    return WorkerFailed(f"the site worker of {site!r} {what}{built}; its log stays on the "
                        "SuperNode (the SuperNode's log names it)",
                        f"{kind} while building the site" if kind else f"site worker {what}")


def call_worker(
    address: WorkerAddress,
    request: Request,
    *,
    site: str,
    site_dir: Path,
    factory: str,
    run_config: Mapping[str, Any],
    idle: float = 1800.0,
    start_timeout: float = 600.0,
    timing: dict[str, float] | None = None,
) -> Reply:
    """Hand ``request`` to the site's worker, starting the worker if there is none.

    Parameters
    ----------
    address : WorkerAddress
        From :func:`worker_address`.
    request : Request
        The request.
    site, site_dir, factory, run_config
        What the worker builds its site from: ``factory(site, site_dir, run_config)``, where
        ``factory`` is a ``"module:callable"`` reference.
    idle : float
        Seconds without a request after which a new worker ends.
    start_timeout : float
        Seconds to wait for a new worker to build its site and listen.
    timing : dict or None
        Receives the site's own ``wall`` and ``cpu`` seconds on this request, as the worker
        measured them, and ``worker`` = 1.0 (they stay on this machine).

    Returns
    -------
    Reply
        The site's reply.

    Raises
    ------
    SiteRefused
        If the site declined the request (its message passes).
    SiteError
        If the site failed (the message carries what may cross the site boundary, see
        :func:`~multimodal_fl.federated.protocol.boundary_reason`), or the worker died or did
        not start in time (the message says so and where the worker's log is; the log's end
        goes to this process's log, never into the message).
    """
    deadline = time.monotonic() + start_timeout
    proc: subprocess.Popen[bytes] | None = None  # the worker, when this call started it
    while True:
        try:
            key = address.key.read_bytes()
            conn = Client(str(address.socket), family="AF_UNIX", authkey=key)
            break
        except (OSError, EOFError) as exc:
            if proc is not None and proc.poll() is not None:  # poll() also reaps it
                failed = _worker_failed(address, site, f"ended before listening (exit "
                                        f"{proc.returncode}, {type(exc).__name__})")
                for path in (address.key, address.spec, address.pid, address.failure):
                    path.unlink(missing_ok=True)  # the log stays
                raise failed from None
            pid = _read_pid(address)
            if proc is None and (pid is None or not _alive(pid)):
                address.socket.unlink(missing_ok=True)  # a stale socket of a dead worker
                proc = _start(
                    address,
                    site=site,
                    site_dir=site_dir,
                    factory=factory,
                    run_config=run_config,
                    idle=idle,
                )
            if time.monotonic() > deadline:
                raise _worker_failed(
                    address, site, f"did not listen within {start_timeout:g} s") from None
            time.sleep(0.1)
    with conn:
        conn.send(request)
        try:
            answer = conn.recv()
        except EOFError:
            raise _worker_failed(address, site, "died while answering") from None
    status, payload = answer[0], answer[1]
    if timing is not None and len(answer) > 2:
        timing.update({k: float(v) for k, v in answer[2].items()}, worker=1.0)
    if status == "refused":
        raise SiteRefused(str(payload))
    if status != "ok" or not isinstance(payload, Reply):
        raise SiteError(f"site {site!r} (worker): {payload}")
    return payload


def stop_worker(address: WorkerAddress, timeout: float = 10.0) -> bool:
    """Ask a worker to end, and wait for it.

    Parameters
    ----------
    address : WorkerAddress
        The worker.
    timeout : float
        Seconds to wait for it to end.

    Returns
    -------
    bool
        True if no worker runs there any more.
    """
    pid = _read_pid(address)
    try:
        with Client(str(address.socket), family="AF_UNIX", authkey=address.key.read_bytes()) as c:
            c.send(_STOP)
    except (OSError, EOFError):
        pass
    deadline = time.monotonic() + timeout
    while pid is not None and _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return pid is None or not _alive(pid)


def _cleanup(address: WorkerAddress) -> None:
    for path in (address.socket, address.key, address.spec, address.pid, address.log,
                 address.failure):
        path.unlink(missing_ok=True)


def worker_main(argv: list[str] | None = None) -> None:
    """Run a worker: build the site, then answer requests until stopped, orphaned or idle.

    Parameters
    ----------
    argv : list[str] or None
        ``[spec_path]`` (default: ``sys.argv[1:]``); the spec is what :func:`call_worker` wrote.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    spec_path = Path((argv if argv is not None else sys.argv[1:])[0])
    spec = json.loads(spec_path.read_text())
    spec_path.unlink(missing_ok=True)
    address = WorkerAddress(Path(spec["socket"]))
    threads = int(spec["run_config"].get("torch-threads", 0) or 0)
    if threads > 0:
        import torch  # only when asked: the worker itself needs no torch (its site may)

        torch.set_num_threads(threads)
    try:
        factory = load_object(spec["factory"], "site-factory")
        site_obj = factory(spec["site"], Path(spec["site_dir"]), spec["run_config"])
    except Exception as exc:  # the type is what crosses; the traceback stays in the log
        _write_private(address.failure, type(exc).__name__.encode())
        raise
    last = [time.monotonic()]
    parent, idle = int(spec["parent_pid"]), float(spec["idle"])

    def watchdog() -> None:
        while True:
            time.sleep(1.0)
            if not _alive(parent) or time.monotonic() - last[0] > idle:
                why = "its SuperNode ended" if not _alive(parent) else f"idle for {idle:g} s"
                log.info("site worker %s ends: %s", spec["site"], why)
                _cleanup(address)
                os._exit(0)

    threading.Thread(target=watchdog, daemon=True).start()
    listener = Listener(str(address.socket), family="AF_UNIX", authkey=address.key.read_bytes())
    log.info("site worker %s (pid %d) listens on %s", spec["site"], os.getpid(), address.socket)
    while True:
        try:
            conn = listener.accept()
        except (OSError, EOFError) as exc:  # e.g. a client with the wrong key
            log.warning("rejected a connection: %s", exc)
            continue
        with conn:
            try:
                request = conn.recv()
            except EOFError:
                continue
            last[0] = time.monotonic()
            if request == _STOP:
                break
            started = (time.perf_counter(), time.process_time())
            answer: tuple[str, Any]
            try:
                answer = ("ok", site_obj.handle(request))
            except SiteRefused as exc:  # made to cross the boundary
                answer = ("refused", str(exc))
            except Exception as exc:  # the site's fault goes back as a failure, scrubbed
                log.exception("site %s raised on %s", spec["site"], getattr(request, "kind", "?"))
                answer = ("error", boundary_reason(exc))
            # the site's own time on it (stays on this machine: the ClientApp's timing line)
            work = {"wall": time.perf_counter() - started[0],
                    "cpu": time.process_time() - started[1]}
            conn.send((*answer, work))
            last[0] = time.monotonic()
    listener.close()
    _cleanup(address)
