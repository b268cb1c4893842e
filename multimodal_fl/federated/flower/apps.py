"""The package's Flower App: :data:`server_app`, :data:`client_app`, and the app directory.

* :data:`server_app` (a ``flwr.serverapp.ServerApp``): its main (:func:`server_main`) builds a
  :class:`ServerJob` from the run config's ``server-factory`` and runs
  :func:`~multimodal_fl.federated.server.run_federated` over a
  :class:`~.federation.FlowerFederation`, or the job's own program (``ServerJob.main``, e.g. the
  experiment's stages, :mod:`multimodal_fl.engines.flower_jobs`).
* :data:`client_app` (a ``flwr.clientapp.ClientApp``, defined in :mod:`.client` and kept
  lean there, since Flower starts its process for every message): hands every ``train`` /
  ``evaluate`` / ``query`` message to the site of its SuperNode, its long-lived worker
  (``site-worker``) or a site built for the message.
* :func:`write_app_dir` writes the small Flower App directory (a ``pyproject.toml`` only; the
  code is this installed package) whose components are
  ``multimodal_fl.federated.flower:server_app`` and
  ``multimodal_fl.federated.flower.client:client_app``, and
  :func:`load_result` reads back what the ServerApp left in ``out-dir``.

Which server job and which site run is pluggable: the run config names two ``"module:callable"``
factories (:mod:`.factories`), ``server-factory`` (``f(run_config) -> ServerJob``) and
``site-factory`` (``f(site_name, site_dir, run_config) -> Site``). ``docs/deployment.md`` gives
the commands.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from safetensors.numpy import load_file, save_file

from multimodal_fl import __version__
from multimodal_fl.federated.flower.client import (
    DEFAULT_RUN_CONFIG,
    NODE_CONFIG_PREFIX,
    NODE_SITE_DIR,
    NODE_SITE_NAME,
    SITE_STATE_KEY,
    client_app,
    client_evaluate,
    client_query,
    client_train,
    run_settings,
)
from multimodal_fl.federated.flower.factories import load_object
from multimodal_fl.federated.flower.federation import FlowerFederation
from multimodal_fl.federated.protocol import (
    ConfigValue,
    StateDict,
)
from multimodal_fl.federated.server import (
    FederatedResult,
    Federation,
    RoundRecord,
    RunConfig,
    run_federated,
)
from multimodal_fl.progress import EventLog

__all__ = [
    "DEFAULT_RUN_CONFIG",
    "NODE_CONFIG_PREFIX",
    "NODE_SITE_DIR",
    "NODE_SITE_NAME",
    "SITE_STATE_KEY",
    "FlowerResult",
    "ServerJob",
    "client_app",
    "client_evaluate",
    "client_query",
    "client_train",
    "load_result",
    "server_app",
    "server_main",
    "write_app_dir",
]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- the server side


@dataclass
class ServerJob:
    """What a ``server-factory`` returns: what the ServerApp runs over the federation.

    Either the training loop (``initial_weights`` and ``config``: the ServerApp calls
    :func:`~multimodal_fl.federated.server.run_federated`), or any other server program
    (``main``, e.g. a federated PCA that broadcasts its own request kind and merges the replies).

    Parameters
    ----------
    initial_weights : Mapping[str, numpy.ndarray] or None
        The initial global state dict.
    config : RunConfig or None
        The server loop's settings.
    checkpoint_dir : Path or None
        Passed to ``run_federated`` (checkpoint after every round).
    resume : bool
        Passed to ``run_federated``.
    on_round : callable or None
        Passed to ``run_federated``.
    on_finish : callable or None
        Called with the :class:`~multimodal_fl.federated.server.FederatedResult` at the end
        (e.g. to write a run directory).
    main : callable or None
        Instead of training: called as ``main(federation)`` with the
        :class:`~.federation.FlowerFederation`.

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
        :meth:`~multimodal_fl.federated.server.RoundRecord.deterministic` of every round, with
        ``seconds`` and ``server_seconds`` added back.
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
    """Write ``result`` into ``out_dir``: the weights first, ``result.json`` (the end mark) last."""
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


def _set_torch_threads(n: int) -> None:
    """``torch.set_num_threads(n)`` when ``n > 0``."""
    if n > 0:
        # torch only when asked: the transport needs none, and a ClientApp process starts for
        # every message (a describe query should not pay for importing torch)
        import torch

        torch.set_num_threads(n)


def _log_to_stdout() -> None:
    """Show the package's log on the ServerApp's stdout (what ``flwr run --stream`` shows)."""
    package_log = logging.getLogger("multimodal_fl")
    if not package_log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        package_log.addHandler(handler)
        package_log.setLevel(logging.INFO)


def _server_job(opts: Mapping[str, Any], run_config: Mapping[str, Any]) -> ServerJob:
    """Call the run config's ``server-factory``; check that it made a :class:`ServerJob`."""
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
    return job


def _connect(grid: Grid, job: ServerJob, opts: Mapping[str, Any]) -> FlowerFederation:
    """The federation over ``grid``, once ``min-nodes`` (else the job's min_sites) connected."""
    federation = FlowerFederation(
        grid,
        poll_interval=float(opts["poll-interval"]),
        describe_timeout=float(opts["describe-timeout"]),
        progress=EventLog(opts["progress-file"]) if opts["progress-file"] else None,
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
    return federation


def _run_program(
    main: Callable[[Federation], None], federation: FlowerFederation, out_dir: str
) -> None:
    """Run a job's own program; mark its end in ``out_dir`` (no weights: it writes its own)."""
    t0 = time.perf_counter()
    main(federation)
    if out_dir:
        _write_result(
            Path(out_dir),
            FlowerResult(
                weights={},
                completed_rounds=0,
                site_nodes=federation.site_nodes(),
                seconds=time.perf_counter() - t0,
            ),
        )


def _history(result: FederatedResult) -> list[dict[str, Any]]:
    """Every round's deterministic record, with its two timings added back."""
    history = []
    for record in result.history:
        row = record.deterministic()
        row.update(seconds=record.seconds, server_seconds=record.server_seconds)
        history.append(row)
    return history


def _run_training(job: ServerJob, federation: FlowerFederation, out_dir: str) -> None:
    """Run the one server loop with the job's weights and config; write the result."""
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
    if out_dir:
        _write_result(
            Path(out_dir),
            FlowerResult(
                weights=result.weights,
                completed_rounds=result.completed_rounds,
                history=_history(result),
                site_sizes=result.site_sizes,
                site_nodes=federation.site_nodes(),
                seconds=seconds,
            ),
        )
    if job.on_finish is not None:
        job.on_finish(result)


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
    opts = run_settings(run_config)
    _set_torch_threads(int(opts["torch-threads"]))
    _log_to_stdout()
    job = _server_job(opts, run_config)
    federation = _connect(grid, job, opts)
    out_dir = str(opts["out-dir"] or "")
    try:
        if job.main is not None:
            _run_program(job.main, federation, out_dir)
        else:
            _run_training(job, federation, out_dir)
    finally:  # a failed run too: its site workers would idle for site-worker-idle seconds
        if opts["site-worker"]:
            federation.release()


# --------------------------------------------------------------------------- the app directory


def _toml_value(value: ConfigValue) -> str:
    """``value`` as a TOML value."""
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
        'clientapp = "multimodal_fl.federated.flower.client:client_app"',
        "",
        "[tool.flwr.app.config]",
    ]
    lines += [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in config.items()]
    root = Path(dest)
    root.mkdir(parents=True, exist_ok=True)
    (root / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return root
