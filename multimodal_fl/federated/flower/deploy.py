"""Flower's processes on one machine: the command lines, and a loopback deployment for tests.

The real deployment runs a SuperLink at the coordinating centre and one SuperNode per hospital
(``docs/deployment.md``); :func:`superlink_command`, :func:`supernode_command` and
:func:`flwr_run_command` are the command lines ``mmfl flower superlink|supernode|run`` run there.
:class:`LoopbackDeployment` and :func:`run_loopback` run the same commands as local processes
on 127.0.0.1 (for tests, demos, benchmarks and ``mmfl flower local``), with telemetry and
update checks off (:data:`QUIET_ENV`, :func:`flower_env`), over plain HTTP or, given
certificates and site keys (:mod:`.credentials`), over TLS with registered SuperNodes only.

Plain HTTP is allowed only on loopback: :func:`superlink_command` and
:func:`supernode_command` raise :class:`~.credentials.CredentialsError` for any other address
without certificates.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from multimodal_fl.federated.flower.apps import (
    NODE_SITE_DIR,
    NODE_SITE_NAME,
    FlowerResult,
    load_result,
    write_app_dir,
)
from multimodal_fl.federated.flower.credentials import (
    CredentialsError,
    SiteKeys,
    TlsFiles,
    is_loopback,
    load_site_private_key,
    split_address,
)
from multimodal_fl.federated.protocol import ConfigValue

__all__ = [
    "QUIET_ENV",
    "FlowerRunError",
    "LoopbackDeployment",
    "flower_env",
    "flower_exe",
    "flwr_run_command",
    "free_port",
    "run_loopback",
    "run_status",
    "submit_run",
    "superlink_command",
    "supernode_command",
]

log = logging.getLogger(__name__)

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


def superlink_command(
    port: int,
    *,
    host: str = "127.0.0.1",
    tls: TlsFiles | None = None,
    supernode_auth: bool = False,
) -> list[str]:
    """The ``flower-superlink`` command line (one HTTP port for Fleet, Control and ServerAppIo).

    Parameters
    ----------
    port : int
        The SuperLink's port.
    host : str
        Interface to listen on.
    tls : TlsFiles or None
        The CA certificate and the SuperLink's certificate and key (HTTPS). None: plain
        HTTP (``--insecure``), allowed only on a loopback ``host``.
    supernode_auth : bool
        ``--enable-supernode-auth``: admit only SuperNodes whose public keys were registered
        with ``flwr supernode register`` (needs ``tls``).

    Returns
    -------
    list[str]
        The argv. Runtime dependency installation is always disabled (it would run ``uv sync``
        against the network): the package must already be installed where the SuperLink runs.

    Raises
    ------
    CredentialsError
        Plain HTTP on an address other than loopback, SuperNode authentication without TLS,
        a missing TLS file or a private key others can read.
    """
    cmd = [flower_exe("flower-superlink"), "--disable-runtime-dependency-installation"]
    if tls is None:
        if not is_loopback(host):
            raise CredentialsError(
                f"a SuperLink on {host} needs TLS: pass --certs DIR (made by `mmfl flower certs "
                "DIR`) or --ssl-certfile, --ssl-keyfile and --ssl-ca-certfile; plain HTTP "
                "(--insecure) is allowed on 127.0.0.1 only"
            )
        if supernode_auth:
            raise CredentialsError(
                "--enable-supernode-auth needs TLS: pass --certs DIR (made by `mmfl flower certs "
                "DIR`) or --ssl-certfile, --ssl-keyfile and --ssl-ca-certfile"
            )
        cmd.append("--insecure")
    else:
        tls.check()
        cmd += [
            "--ssl-certfile", str(tls.server_cert),
            "--ssl-keyfile", str(tls.server_key),
            "--ssl-ca-certfile", str(tls.ca_cert),
        ]  # fmt: skip
        if supernode_auth:
            cmd.append("--enable-supernode-auth")
    return [*cmd, "--host", host, "--port", str(port)]


def supernode_command(
    superlink: str,
    port: int,
    site_dir: str | os.PathLike[str],
    *,
    site_name: str | None = None,
    root_certificates: str | os.PathLike[str] | None = None,
    auth_key: str | os.PathLike[str] | None = None,
    node_config: str = "",
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
    root_certificates : path-like or None
        The CA certificate that signed the SuperLink's certificate (HTTPS). None: plain
        HTTP (``--insecure``), allowed only to a SuperLink on loopback.
    auth_key : path-like or None
        This SuperNode's private key (``--auth-supernode-private-key``), whose public key the
        coordinating centre registered (needs ``root_certificates``).
    node_config : str
        More node-config entries (``"min-cell=20 max-epsilon=8"``: the hospital's policy),
        appended to ``site-name`` and ``site-dir``, which it may not set.

    Returns
    -------
    list[str]
        The argv.

    Raises
    ------
    CredentialsError
        Plain HTTP to a SuperLink not on loopback, a key without TLS, a missing CA file, or a
        key that is missing, readable by others or not an OpenSSH EC key.
    """
    name = site_name or Path(site_dir).name
    for key, value in ((NODE_SITE_NAME, name), (NODE_SITE_DIR, str(site_dir))):
        if "'" in value:
            raise ValueError(f"{key} {value!r} may not contain a single quote (--node-config)")
    for key in (NODE_SITE_NAME, NODE_SITE_DIR):
        if re.search(rf"(^|\s){key}\s*=", node_config):
            raise ValueError(f"--node-config sets {key}, which the site directory and --name "
                             "set; leave it out")
    node_config = " ".join(filter(None, [
        f"{NODE_SITE_NAME}='{name}' {NODE_SITE_DIR}='{Path(site_dir).resolve()}'",
        node_config.strip()]))
    cmd = [flower_exe("flower-supernode"), "--superlink", superlink, "--port", str(port)]
    host, _ = split_address(superlink)
    if root_certificates is None:
        if not is_loopback(host):
            raise CredentialsError(
                f"the SuperLink {superlink} is not on loopback: pass --root-certificates "
                "CA.crt (the ca.crt of `mmfl flower certs`); plain HTTP (--insecure) is allowed "
                "to 127.0.0.1 only"
            )
        if auth_key is not None:
            raise CredentialsError(
                "--auth-key needs TLS: pass --root-certificates CA.crt as well"
            )
        cmd.append("--insecure")
    else:
        ca = Path(root_certificates).resolve()
        if not ca.is_file():
            raise CredentialsError(f"--root-certificates {ca}: no such file")
        cmd += ["--root-certificates", str(ca)]
    if auth_key is not None:
        load_site_private_key(auth_key)  # a clear error here rather than Flower's exit code
        cmd += ["--auth-supernode-private-key", str(Path(auth_key).resolve())]
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


#: What ``flwr run`` prints once the SuperLink accepted the run (Flower 1.42).
_STARTED = re.compile(r"Successfully started run (\d+)")


def submit_run(command: list[str], env: Mapping[str, str] | None = None) -> tuple[int, int | None]:
    """Run ``flwr run ... --stream`` (:func:`flwr_run_command`), echoing its output as it
    comes, and return its exit status and the run id the SuperLink gave.

    Parameters
    ----------
    command : list of str
        The command line.
    env : Mapping[str, str] or None
        Its environment (default :func:`flower_env`).

    Returns
    -------
    tuple[int, int or None]
        The exit status (0 even when the ServerApp failed: ask :func:`run_status`) and the run
        id, ``None`` when none was printed (the run was not started).
    """
    run_id: int | None = None
    with subprocess.Popen(command, env=dict(env or flower_env()), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, errors="replace") as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            found = _STARTED.search(line)
            if found and run_id is None:
                run_id = int(found.group(1))
    return proc.returncode, run_id


def run_status(run_id: int, connection: str | None = None,
               env: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """The status of run ``run_id`` at the SuperLink, from ``flwr ls --run-id ID --format json``.

    Parameters
    ----------
    run_id : int
    connection : str or None
        The SuperLink connection (``None``: the default one).
    env : Mapping[str, str] or None
        The environment (default :func:`flower_env`).

    Returns
    -------
    tuple[str, str] or None
        Flower's status (``finished:completed``, ``finished:failed``, ``running``, ...) and its
        details; ``None`` when the SuperLink could not be asked.
    """
    cmd = [flower_exe("flwr"), "ls", *([connection] if connection else []),
           "--run-id", str(run_id), "--format", "json"]
    try:
        done = subprocess.run(cmd, env=dict(env or flower_env()), capture_output=True,
                              text=True, timeout=60, check=False)
        runs = json.loads(done.stdout).get("runs", [])
    except (OSError, subprocess.TimeoutExpired, ValueError, AttributeError):
        return None
    for row in runs:
        if str(row.get("run-id")) == str(run_id):
            return str(row.get("status", "")), str(row.get("status-details", "") or "")
    return None


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
    """Wait until something listens on ``host:port``; fail if ``proc`` exits first."""
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
    tls : TlsFiles or None
        Run the SuperLink with these certificates (HTTPS; their subject alternative names must
        include 127.0.0.1, as :func:`~.credentials.make_certificates`' do); SuperNodes and
        ``flwr`` trust its CA. None: plain HTTP.
    keys : Mapping[str, SiteKeys] or None
        Site name -> its SuperNode key pair: the SuperLink runs with
        ``--enable-supernode-auth`` (needs ``tls``), each public key is registered with
        ``flwr supernode register`` once the SuperLink listens (:attr:`node_ids`), and each
        site's SuperNode starts with its private key. A site without keys is started without
        one (and refused by the SuperLink).
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
        tls: TlsFiles | None = None,
        keys: Mapping[str, SiteKeys] | None = None,
    ) -> None:
        if not sites:
            raise ValueError("LoopbackDeployment needs at least one site; got none")
        if keys is not None and tls is None:
            raise CredentialsError("LoopbackDeployment: SuperNode keys need tls (certificates)")
        self.sites = {name: Path(path) for name, path in sites.items()}
        self.home = Path(home)
        self.log_dir = Path(log_dir) if log_dir is not None else self.home / "logs"
        self.env = flower_env({"FLWR_HOME": str(self.home), **dict(env or {})})
        self.startup_timeout = float(startup_timeout)
        self.tls = tls
        self.keys = dict(keys) if keys is not None else None
        self.port = 0
        #: Site name -> the node id ``flwr supernode register`` gave its public key.
        self.node_ids: dict[str, int] = {}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[Any] = []

    @property
    def address(self) -> str:
        """``host:port`` of the SuperLink."""
        return f"127.0.0.1:{self.port}"

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        """Start ``cmd`` in its own process group, logging to ``log_dir/<name>.log``."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        out = (self.log_dir / f"{name}.log").open("wb")
        self._logs.append(out)
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        self.procs[name] = proc
        return proc

    def _connection_toml(self) -> str:
        """``config.toml`` naming :attr:`CONNECTION` (with the CA when the link speaks TLS)."""
        trust = (
            "insecure = true"
            if self.tls is None
            else f"root-certificates = {json.dumps(str(self.tls.ca_cert.resolve()))}"
        )
        return (
            f'[superlink]\ndefault = "{self.CONNECTION}"\n\n'
            f'[superlink.{self.CONNECTION}]\naddress = "{self.address}"\n{trust}\n'
        )

    def start(self) -> LoopbackDeployment:
        """Start the SuperLink, wait until it listens, register keys, start the SuperNodes.

        Returns
        -------
        LoopbackDeployment
            ``self``.
        """
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        (self.home / "config.toml").write_text(self._connection_toml())
        cmd = superlink_command(self.port, tls=self.tls, supernode_auth=self.keys is not None)
        link = self._spawn("superlink", cmd)
        _wait_for_port("127.0.0.1", self.port, self.startup_timeout, link)
        for name, site_dir in sorted(self.sites.items()):
            site_keys = (self.keys or {}).get(name)
            if site_keys is not None:
                self.node_ids[name] = self.register(site_keys)
            self.start_supernode(
                name, site_dir, auth_key=site_keys.private_key if site_keys else None
            )
        return self

    def start_supernode(
        self,
        name: str,
        site_dir: str | os.PathLike[str],
        *,
        auth_key: str | os.PathLike[str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start one SuperNode for ``name`` (logging to ``supernode-<name>.log``).

        Parameters
        ----------
        name : str
            The site's name.
        site_dir : path-like
            Its directory.
        auth_key : path-like or None
            Its private key (``--auth-supernode-private-key``).

        Returns
        -------
        subprocess.Popen
            The SuperNode's process (a process group, ended by :meth:`stop`).
        """
        ca = self.tls.ca_cert if self.tls is not None else None
        cmd = supernode_command(
            self.address, free_port(), site_dir, site_name=name, root_certificates=ca,
            auth_key=auth_key,
        )  # fmt: skip
        return self._spawn(f"supernode-{name}", cmd)

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run the Flower CLI (``flwr ARGS``) against this deployment's ``FLWR_HOME``.

        Parameters
        ----------
        *args : str
            The arguments, e.g. ``"supernode", "list", CONNECTION, "--format", "json"``.
        timeout : float
            Seconds before it is killed.

        Returns
        -------
        subprocess.CompletedProcess
            Exit status and output.
        """
        return subprocess.run(
            [flower_exe("flwr"), *args], env=self.env, capture_output=True, text=True,
            timeout=timeout, check=False,
        )  # fmt: skip

    def register(self, keys: SiteKeys) -> int:
        """Register a site's public key with the SuperLink (``flwr supernode register``).

        Parameters
        ----------
        keys : SiteKeys
            The site's key pair (only the public key is read).

        Returns
        -------
        int
            The node id the SuperLink gave it.

        Raises
        ------
        FlowerRunError
            If ``flwr`` did not report a node id (its output in the message).
        """
        done = self.flwr(
            "supernode", "register", str(keys.public_key), self.CONNECTION,
            "--name", keys.site, "--format", "json",
        )  # fmt: skip
        match = re.search(r'"node-id":\s*(\d+)', done.stdout)
        if done.returncode != 0 or match is None:
            raise FlowerRunError(
                f"flwr supernode register {keys.public_key} exited with {done.returncode}: "
                f"{(done.stdout + done.stderr).strip()[-2000:]}"
            )
        return int(match.group(1))

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
    """Send ``sig`` to ``proc``'s process group, if it still exists."""
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
    on_wait: Callable[[], None] | None = None,
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
    on_wait : callable or None
        Called about twice a second while the run goes on, and once after it ended, in this
        thread (e.g. to show the progress the ServerApp writes to its ``progress-file``); what
        it raises stops the deployment.

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
            done = _waiting(lambda: deployment.run(app_dir, timeout=timeout), on_wait)
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


def _waiting(
    work: Callable[[], subprocess.CompletedProcess[str]], on_wait: Callable[[], None] | None,
    interval: float = 0.5,
) -> subprocess.CompletedProcess[str]:
    """``work()``, calling ``on_wait()`` every ``interval`` seconds meanwhile and once at the
    end (``work`` then runs in a daemon thread: an interrupt here does not wait for it)."""
    if on_wait is None:
        return work()
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["done"] = work()
        except BaseException as exc:  # handed to the caller's thread below
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="flwr-run", daemon=True)
    thread.start()
    while thread.is_alive():
        on_wait()
        thread.join(interval)
    on_wait()
    if "error" in outcome:
        raise outcome["error"]
    done: subprocess.CompletedProcess[str] = outcome["done"]
    return done
