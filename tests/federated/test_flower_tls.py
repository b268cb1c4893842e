"""TLS and registered SuperNodes on a real SuperLink (the session's ``secure_deployment``).

One SuperLink with certificates from ``mmfl flower certs`` and ``--enable-supernode-auth``:
its port speaks TLS with that certificate only, and the unregistered SuperNode (a key nobody
registered) is refused. The registered nodes (the tiny cohort's sites, registered with ``flwr
supernode register``) run the real experiment with secure aggregation on, bit for bit the
in-process secured run, and the egress audit, on the same deployment in
``test_flower_experiment.py``; a toy round here too cost 84 s of a 15-minute suite for nothing
that test does not check (the secure sum with sites rebuilt for every message stays covered
on the fake grid, ``test_flower.py``).
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from multimodal_fl.federated.flower import make_certificates
from tests.federated.conftest import (
    UNREGISTERED,
    SecureDeployment,
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


def test_unregistered_supernode_is_refused(secure_deployment: SecureDeployment) -> None:
    """The unregistered site's key was never registered: the SuperLink refuses to activate it,
    and it exits."""
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
