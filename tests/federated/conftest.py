"""The session's one secure loopback deployment: TLS, registered SuperNodes, a refused one.

``secure_deployment`` (marker ``flower`` on the tests that use it) starts, once per test
session, a SuperLink on a free loopback port with certificates made by ``mmfl flower certs``
and ``--enable-supernode-auth``; the key pairs of sites ``a``, ``c`` and ``d`` (``mmfl flower
keys a`` ...) are registered with ``flwr supernode register`` and their SuperNodes connect
with them (three: the fewest a secured round sums); site ``b``'s SuperNode has a key pair
that nobody registered, and the SuperLink refuses it. Every process is ended in teardown.
Tests submit apps with ``deployment.run(app_dir)``: :func:`one_site_job` is a server job that
needs only one registered site, :func:`secure_job` one secured round of the toy sites of
:func:`registered_toy_site`.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


def one_site_job(run_config: Mapping[str, Any]) -> Any:
    """The toy server job with ``min_sites = 1``: ``rounds`` fit rounds, no info, no evaluation.

    Imported by name (``tests.federated.conftest:one_site_job``) in the ServerApp process.
    """
    from multimodal_fl.federated.flower import ServerJob
    from tests.federated.toy import initial_weights, toy_config

    config = toy_config(
        rounds=int(run_config.get("rounds", 1)), evaluate_every=0, ask_sizes=False, min_sites=1
    )
    return ServerJob(initial_weights(0), config)


#: The registered sites of the secure deployment (``b`` is the unregistered one).
REGISTERED = ("a", "c", "d")


def registered_toy_site(name: str, site_dir: Path, run_config: Mapping[str, Any]) -> Any:
    """``site-factory``: the toy site of a registered node (sizes and shifts by its place)."""
    from tests.federated.toy import ToySite

    i = REGISTERED.index(name)
    return ToySite(name, n=32 + 16 * i, shift=0.3 * i)


def secure_toy_config(rounds: int = 1) -> Any:
    """The secured toy run: ``rounds`` rounds over the three registered sites."""
    from multimodal_fl.federated.secure_update import SecureAggregation
    from tests.federated.toy import toy_config

    return toy_config(rounds=rounds, evaluate_every=0, ask_sizes=False, min_sites=3,
                      secure=SecureAggregation())


def secure_job(run_config: Mapping[str, Any]) -> Any:
    """``server-factory``: :func:`secure_toy_config` from the toy's initial weights."""
    from multimodal_fl.federated.flower import ServerJob
    from tests.federated.toy import initial_weights

    return ServerJob(initial_weights(0), secure_toy_config(int(run_config.get("rounds", 1))))


@dataclass
class SecureDeployment:
    """What :func:`secure_deployment` yields."""

    deployment: Any  # multimodal_fl.federated.flower.LoopbackDeployment
    certs: Path
    keys: dict[str, Any]  # site -> SiteKeys ("a", "c", "d" registered, "b" not)
    registered: dict[str, int]  # site -> node id given by `flwr supernode register`
    unregistered: subprocess.Popen[bytes]  # site b's SuperNode
    root: Path
    cli_output: dict[str, str]  # "certs" / "keys a" / "keys b" -> what `mmfl flower` printed
    started_seconds: float

    def log(self, name: str) -> str:
        """One process's log so far (``superlink``, ``supernode-a``, ``supernode-b``)."""
        return (self.deployment.log_dir / f"{name}.log").read_text(errors="replace")


def _mmfl(*args: str) -> str:
    """Run ``mmfl ARGS`` in process; fail the test with its output if it fails."""
    from typer.testing import CliRunner

    from multimodal_fl.cli import app

    result = CliRunner().invoke(app, list(args))
    if result.exit_code != 0:
        pytest.fail(f"mmfl {' '.join(args)} exited with {result.exit_code}: {result.output}")
    return str(result.output)


@pytest.fixture(scope="session")
def secure_deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureDeployment]:
    """A SuperLink with TLS and SuperNode auth on loopback; sites a, c, d registered, b not."""
    pytest.importorskip("flwr")
    from multimodal_fl.federated.flower import LoopbackDeployment, SiteKeys, TlsFiles

    root = tmp_path_factory.mktemp("secure_flower")
    output = {"certs": _mmfl("flower", "certs", str(root / "certs"))}
    keys = {}
    for site in (*REGISTERED, "b"):
        output[f"keys {site}"] = _mmfl("flower", "keys", site, str(root / "keys"))
        private, public = root / "keys" / f"{site}.key", root / "keys" / f"{site}.pub"
        keys[site] = SiteKeys(site, private, public, fingerprint="")
    sites = {s: root / "sites" / s for s in (*REGISTERED, "b")}
    for path in sites.values():
        path.mkdir(parents=True)
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    deployment = LoopbackDeployment(
        {s: sites[s] for s in REGISTERED},
        home=root / "flwr_home",
        env={"PYTHONPATH": pythonpath},
        tls=TlsFiles.in_folder(root / "certs"),
        keys={s: keys[s] for s in REGISTERED},
    )
    started = time.monotonic()
    with deployment:
        rogue = deployment.start_supernode("b", sites["b"], auth_key=keys["b"].private_key)
        yield SecureDeployment(
            deployment=deployment,
            certs=root / "certs",
            keys=keys,
            registered=dict(deployment.node_ids),
            unregistered=rogue,
            root=root,
            cli_output=output,
            started_seconds=time.monotonic() - started,
        )
