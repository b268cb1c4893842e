"""TLS and registered SuperNodes on a real SuperLink (the session's ``secure_deployment``).

One SuperLink with certificates from ``mmfl flower certs`` and ``--enable-supernode-auth``:
its port speaks TLS with that certificate only; the tiny cohort's sites (registered with ``flwr
supernode register``) train a round of toy sites over it, then a secured round whose updates
the server learns only as their sum; the unregistered SuperNode (a key nobody registered) is
refused. The real experiment with secure aggregation and the egress audit runs on the same
deployment in ``test_flower_experiment.py``.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("flwr")

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from multimodal_fl.federated.flower import make_certificates
from tests.federated.conftest import (
    REGISTERED,
    UNREGISTERED,
    SecureDeployment,
    registered_toy_site,
    secure_toy_config,
)

pytestmark = [pytest.mark.flower, pytest.mark.timeout(300)]


def _handshake(port: int, ca: Path) -> bytes:
    """The certificate the SuperLink presents to a client that trusts ``ca`` (DER)."""
    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            return der


def test_superlink_port_speaks_tls_with_the_certificate_from_mmfl_flower_certs(
    secure_deployment: SecureDeployment, tmp_path: Path
) -> None:
    port = secure_deployment.deployment.port
    presented = _handshake(port, secure_deployment.certs / "ca.crt")
    pem = (secure_deployment.certs / "server.pem").read_bytes()
    expected = x509.load_pem_x509_certificate(pem)
    assert presented == expected.public_bytes(Encoding.DER)

    # a client trusting another CA refuses the SuperLink
    make_certificates(tmp_path / "other")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(port, tmp_path / "other" / "ca.crt")

    # plain HTTP gets no HTTP answer on that port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        raw.settimeout(10)
        try:
            answer = raw.recv(64)
        except (ConnectionResetError, TimeoutError):
            answer = b""
    assert not answer.startswith(b"HTTP/")

    link_log = secure_deployment.log("superlink")
    assert f"running on https://127.0.0.1:{port}" in link_log


@pytest.fixture(scope="module")
def secured_toy_run(secure_deployment: SecureDeployment) -> tuple[Any, float]:
    """One secured round of the toy sites of the three registered nodes over TLS (one run
    serves both tests below: each message exchange costs a ClientApp process per node)."""
    return secure_deployment.submit("secure", {
        "server-factory": "tests.federated.conftest:secure_job",
        "site-factory": "tests.federated.conftest:registered_toy_site",
        "rounds": 1,
        "min-nodes": 3,
        "node-wait": 90.0,
        "torch-threads": 1,
    })


def test_a_round_over_tls_completes_with_the_registered_nodes(
    secure_deployment: SecureDeployment, secured_toy_run: tuple[Any, float]
) -> None:
    result, seconds = secured_toy_run
    print(
        f"secure deployment: started in {secure_deployment.started_seconds:.1f} s; "
        f"secured round over TLS: run {seconds:.1f} s (server loop {result.seconds:.1f} s)"
    )
    assert result.completed_rounds == 1
    assert result.site_nodes == secure_deployment.registered
    assert sorted(result.site_nodes) == list(REGISTERED)
    assert result.history[0]["replied"] == list(REGISTERED)


def test_a_secured_round_over_tls_gives_the_in_process_secured_model(
    secured_toy_run: tuple[Any, float],
) -> None:
    """One secured round of the three registered sites over the TLS deployment: the fit
    replies carry no weights, the four secure-sum steps cross as Flower messages to ClientApps
    rebuilt for every message, and the model is the in-process secured run's, bit for bit."""
    import torch

    from multimodal_fl.federated.inprocess import InProcessFederation
    from multimodal_fl.federated.server import run_federated
    from tests.federated.toy import initial_weights

    result, _ = secured_toy_run
    record = result.history[0]
    assert record["replied"] == list(REGISTERED) and record["fit_metrics"] == {}
    assert record["secure"]["sites"] == list(REGISTERED) and record["secure"]["excluded"] == {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sites = {n: registered_toy_site(n, Path("."), {}) for n in REGISTERED}
        reference = run_federated(InProcessFederation(sites), initial_weights(0),
                                  secure_toy_config(1))
    finally:
        torch.set_num_threads(threads)
    for key, value in reference.weights.items():
        assert result.weights[key].tobytes() == value.tobytes(), key


def test_unregistered_supernode_is_refused(secure_deployment: SecureDeployment) -> None:
    """The unregistered site's key was never registered: the SuperLink refuses to activate it,
    and it exits.

    (After the run above, so waiting for the refusal costs nothing.)"""
    rogue = secure_deployment.unregistered
    try:
        code = rogue.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"SuperNode {UNREGISTERED} is still running:\n"
                    f"{secure_deployment.log(f'supernode-{UNREGISTERED}')}")
    node_log = secure_deployment.log(f"supernode-{UNREGISTERED}")
    assert code != 0, node_log
    assert "Failed to initialize the connection to the SuperLink" in node_log, node_log
    assert "[code: 2004] Failed to activate SuperNode" in node_log, node_log
    link_log = secure_deployment.log("superlink")
    refused = r"activate-node\]\[ApiError:2004\].*No SuperNode found with the given public key"
    assert re.search(refused, link_log), link_log

    # Flower's own record: only the registered node exists
    listed = secure_deployment.deployment.flwr(
        "supernode", "list", secure_deployment.deployment.CONNECTION, "--format", "json"
    )
    assert listed.returncode == 0, listed.stdout + listed.stderr
    nodes = json.loads(listed.stdout)["nodes"]
    assert {int(n["node-id"]) for n in nodes} == set(secure_deployment.registered.values())
