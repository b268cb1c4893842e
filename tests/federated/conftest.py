"""The session's one secure loopback deployment: TLS, registered SuperNodes, a refused one.

``secure_deployment`` (marker ``flower`` on the tests that use it) starts, once per test
session, a SuperLink on a free loopback port with certificates made by ``mmfl flower certs``
and ``--enable-supernode-auth``. Its registered SuperNodes are the sites of the tiny COVID-19
cohort (:data:`REGISTERED`, their real site folders, named as the experiment's config names
them; three, the fewest a secured round sums): their key pairs (``mmfl flower keys site_a``
...) are registered with ``flwr supernode register`` and their SuperNodes connect with them.
One more SuperNode, :data:`UNREGISTERED`, has a key pair that nobody registered, and the
SuperLink refuses it. Every process is ended in teardown, the site workers included.

One SuperNode serves any job, since the site factory comes with each run's config: the real
experiment (``tests/federated/test_flower_experiment.py``: ``flower_jobs.experiment_site``,
secure aggregation on, the egress audit). Tests submit apps with
:meth:`SecureDeployment.submit`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]

#: The registered sites of the secure deployment: the tiny COVID-19 cohort's sites.
REGISTERED = ("site_a", "site_b", "site_c")
#: The SuperNode whose key nobody registered (the SuperLink refuses it).
UNREGISTERED = "unregistered"
#: The tiny cohort's task folder the registered SuperNodes serve.
TASK = "covid_oxygen"


@dataclass
class SecureDeployment:
    """What :func:`secure_deployment` yields."""

    deployment: Any  # multimodal_fl.federated.flower.LoopbackDeployment
    certs: Path
    keys: dict[str, Any]  # site -> SiteKeys (REGISTERED registered, UNREGISTERED not)
    registered: dict[str, int]  # site -> node id given by `flwr supernode register`
    sites: dict[str, Path]  # registered site -> the folder its SuperNode serves
    unregistered: subprocess.Popen[bytes]  # the UNREGISTERED site's SuperNode
    root: Path
    workers: Path  # $MMFL_WORKER_DIR of the deployment's processes (the site workers' sockets)
    cli_output: dict[str, str]  # "certs" / "keys site_a" / ... -> what `mmfl flower` printed
    started_seconds: float

    def log(self, name: str) -> str:
        """One process's log so far (``superlink``, ``supernode-site_a``, ...)."""
        return (self.deployment.log_dir / f"{name}.log").read_text(errors="replace")

    def submit(self, name: str, run_config: Mapping[str, Any], *, timeout: float = 240.0
               ) -> tuple[Any, float]:
        """Run an app on the deployment: ``flwr run`` of ``run_config``, written into
        ``root/name/app`` (the result into ``root/name/out`` unless it names an ``out-dir``).

        Returns the :class:`~multimodal_fl.federated.flower.FlowerResult` and the seconds
        ``flwr run`` took; fails the test with ``flwr run``'s output and the logs when the
        run wrote no result.
        """
        from multimodal_fl.federated.flower import load_result, write_app_dir

        config = {"out-dir": str(self.root / name / "out"), **run_config}
        app_dir = write_app_dir(self.root / name / "app", config)
        started = time.monotonic()
        try:
            done = self.deployment.run(app_dir, timeout=timeout)
            said = f"flwr run exited with {done.returncode}:\n{done.stdout[-3000:]}"
        except subprocess.TimeoutExpired:
            said = f"flwr run did not end within {timeout:g} s"
        seconds = time.monotonic() - started
        try:
            return load_result(str(config["out-dir"])), seconds
        except FileNotFoundError:
            pytest.fail(f"no result of {name}; {said}\n{self.deployment.logs()[-6000:]}")

    def stop_workers(self) -> list[str]:
        """Stop every site worker the deployment's runs started (a run's workers otherwise
        live until their SuperNode ends or they idle out); the sockets of any left running."""
        from multimodal_fl.federated.flower.worker import WorkerAddress, stop_worker

        return [str(s) for s in sorted(self.workers.glob("*.sock"))
                if not stop_worker(WorkerAddress(s))]


def _mmfl(*args: str) -> str:
    """Run ``mmfl ARGS`` in process; fail the test with its output if it fails."""
    from typer.testing import CliRunner

    from multimodal_fl.cli import app

    result = CliRunner().invoke(app, list(args))
    if result.exit_code != 0:
        pytest.fail(f"mmfl {' '.join(args)} exited with {result.exit_code}: {result.output}")
    return str(result.output)


@pytest.fixture(scope="session")
def secure_deployment(tmp_path_factory: pytest.TempPathFactory, tiny_sample: Path
                      ) -> Iterator[SecureDeployment]:
    """A SuperLink with TLS and SuperNode auth on loopback; the tiny COVID-19 cohort's sites
    registered (their own folders), :data:`UNREGISTERED` not."""
    pytest.importorskip("flwr")
    from multimodal_fl.federated.flower import LoopbackDeployment, SiteKeys, TlsFiles

    sites = {p.name: p for p in sorted((tiny_sample / TASK).iterdir()) if p.is_dir()}
    assert tuple(sites) == REGISTERED, f"the tiny {TASK} cohort's sites changed: {list(sites)}"
    root = tmp_path_factory.mktemp("secure_flower")
    output = {"certs": _mmfl("flower", "certs", str(root / "certs"))}
    keys = {}
    for site in (*REGISTERED, UNREGISTERED):
        output[f"keys {site}"] = _mmfl("flower", "keys", site, str(root / "keys"))
        private, public = root / "keys" / f"{site}.key", root / "keys" / f"{site}.pub"
        keys[site] = SiteKeys(site, private, public, fingerprint="")
    rogue_dir = root / "sites" / UNREGISTERED
    rogue_dir.mkdir(parents=True)
    # the site workers' sockets in a short folder of this deployment's own
    workers = Path(tempfile.mkdtemp(prefix="mmfl-sd-"))
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    deployment = LoopbackDeployment(
        sites,
        home=root / "flwr_home",
        env={"PYTHONPATH": pythonpath, "MMFL_WORKER_DIR": str(workers)},
        tls=TlsFiles.in_folder(root / "certs"),
        keys={s: keys[s] for s in REGISTERED},
    )
    started = time.monotonic()
    with deployment:
        rogue = deployment.start_supernode(UNREGISTERED, rogue_dir,
                                           auth_key=keys[UNREGISTERED].private_key)
        secure = SecureDeployment(
            deployment=deployment,
            certs=root / "certs",
            keys=keys,
            registered=dict(deployment.node_ids),
            sites=sites,
            unregistered=rogue,
            root=root,
            workers=workers,
            cli_output=output,
            started_seconds=time.monotonic() - started,
        )
        try:
            yield secure
        finally:
            secure.stop_workers()
    shutil.rmtree(workers, ignore_errors=True)
