"""``mmfl flower certs|keys`` and the TLS / SuperNode-auth command lines (no process started).

The certificates are checked with ``cryptography``'s own path validation (chain, names, key
usage); the SuperNode keys with the loaders Flower 1.42 itself uses.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("flwr")

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from typer.testing import CliRunner

from multimodal_fl.cli import app
from multimodal_fl.federated.flower import (
    CredentialsError,
    TlsFiles,
    superlink_command,
    supernode_command,
)


def mmfl(*args: str) -> Any:
    """``mmfl ARGS`` in process."""
    return CliRunner().invoke(app, [str(a) for a in args])


def ok(*args: str) -> str:
    result = mmfl(*args)
    assert result.exit_code == 0, result.output
    return str(result.output)


def refused(*args: str) -> str:
    """``mmfl ARGS`` must end with exit 2 and one ``error:`` line, no traceback."""
    result = mmfl(*args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.output.startswith("error: ") and result.output.count("error: ") == 1
    return " ".join(result.output.split())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def verify(ca: Path, leaf: Path, name: x509.GeneralName) -> None:
    """Path validation as a TLS client does it: chain to ``ca``, ``name`` in the SANs, usages."""
    store = Store([load_cert(ca)])
    verifier = PolicyBuilder().store(store).build_server_verifier(name)  # type: ignore[arg-type]
    verifier.verify(load_cert(leaf), [])


# --------------------------------------------------------------------------- mmfl flower certs


def test_certs_verify_as_a_chain_with_their_names_and_key_usage(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    printed = ok("flower", "certs", out, "--name", "link.example.org", "--dns", "mmfl-link",
                 "--ip", "10.0.0.5", "--days", "30")  # fmt: skip
    lines = printed.strip().splitlines()
    assert [line.split()[1] for line in lines] == [
        str(out / f) for f in ("ca.crt", "ca.key", "server.pem", "server.key")
    ]
    assert all(line.startswith("wrote ") for line in lines)

    names: list[x509.GeneralName] = [
        x509.DNSName("link.example.org"), x509.DNSName("mmfl-link"),
        x509.IPAddress(ipaddress.ip_address("10.0.0.5")),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]  # fmt: skip
    for name in names:
        verify(out / "ca.crt", out / "server.pem", name)
    with pytest.raises(VerificationError):
        verify(out / "ca.crt", out / "server.pem", x509.DNSName("other.example.org"))

    ca, leaf = load_cert(out / "ca.crt"), load_cert(out / "server.pem")
    ca_bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert ca_bc.critical and ca_bc.value.ca and ca_bc.value.path_length == 0
    ca_ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ca_ku.key_cert_sign and ca_ku.crl_sign and not ca_ku.digital_signature
    leaf_bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert leaf_bc.critical and not leaf_bc.value.ca
    leaf_ku = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert leaf_ku.critical and leaf_ku.value.digital_signature and not leaf_ku.value.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]
    assert set(leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value) == set(
        names
    )
    lifetime = leaf.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=29) < lifetime <= dt.timedelta(days=30)

    key = serialization.load_pem_private_key((out / "server.key").read_bytes(), password=None)
    assert key.public_key() == leaf.public_key()
    assert mode(out) == 0o700
    assert (mode(out / "ca.key"), mode(out / "server.key")) == (0o600, 0o600)
    assert (mode(out / "ca.crt"), mode(out / "server.pem")) == (0o644, 0o644)


def test_certs_are_not_overwritten_and_renew_keeps_the_ca_and_the_names(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    ok("flower", "certs", out, "--name", "link.example.org", "--ip", "10.0.0.5")
    ca_before, leaf_before = (out / "ca.crt").read_bytes(), (out / "server.pem").read_bytes()

    message = refused("flower", "certs", out)
    assert "ca.crt exists" in message and "--renew" in message
    assert (out / "ca.crt").read_bytes() == ca_before

    printed = ok("flower", "certs", out, "--renew", "--days", "10")
    assert [line.split()[1] for line in printed.strip().splitlines()] == [
        str(out / "server.pem"), str(out / "server.key")
    ]
    assert (out / "ca.crt").read_bytes() == ca_before  # the hospitals keep their ca.crt
    assert (out / "server.pem").read_bytes() != leaf_before
    verify(out / "ca.crt", out / "server.pem", x509.DNSName("link.example.org"))
    san = x509.SubjectAlternativeName
    renewed, before = load_cert(out / "server.pem"), x509.load_pem_x509_certificate(leaf_before)
    assert set(renewed.extensions.get_extension_for_class(san).value) == set(
        before.extensions.get_extension_for_class(san).value
    )
    assert mode(out / "server.key") == 0o600


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--ip", "999.1.1.1"], "--ip '999.1.1.1' is not an IP address"),
        (["--dns", "bad name"], "DNS name 'bad name' is not a host name"),
        (["--name", "-x.org"], "DNS name '-x.org' is not a host name"),
        (["--days", "0"], "--days 0: the validity must be at least 1 day"),
        (["--renew"], "--renew: "),
    ],
)
def test_certs_bad_input_is_one_line(tmp_path: Path, args: list[str], expected: str) -> None:
    assert expected in refused("flower", "certs", tmp_path / "c", *args)
    assert not list((tmp_path / "c").glob("*.pem"))


# --------------------------------------------------------------------------- mmfl flower keys


def test_site_keys_are_read_by_flower_and_the_registration_step_is_printed(
    tmp_path: Path,
) -> None:
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    printed = ok("flower", "keys", "site_a", tmp_path / "keys", "--connection", "hospitals")
    private_path, public_path = tmp_path / "keys" / "site_a.key", tmp_path / "keys" / "site_a.pub"
    assert (mode(private_path), mode(public_path), mode(tmp_path / "keys")) == (0o600, 0o644, 0o700)

    # what flower-supernode --auth-supernode-private-key does with the file
    key = serialization.load_ssh_private_key(private_path.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    # what `flwr supernode register` does with the public key: the same key
    assert try_load_public_key(public_path) == public_key_to_bytes(key.public_key())

    blob = base64.b64decode(public_path.read_text().split()[1])
    fingerprint = "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    if shutil.which("ssh-keygen"):  # the fingerprint a site reads out is ssh-keygen's
        listed = subprocess.run(["ssh-keygen", "-lf", str(public_path)], capture_output=True,
                                text=True, check=True)  # fmt: skip
        assert listed.stdout.split()[1] == fingerprint
    flat = " ".join(printed.split())
    assert fingerprint in flat
    assert "flwr supernode register site_a.pub hospitals --name site_a" in flat
    assert f"--auth-key {private_path}" in flat
    assert [line.split()[1] for line in printed.splitlines()[:2]] == [
        str(private_path), str(public_path)
    ]


def test_site_keys_refuse_a_bad_name_and_an_existing_pair(tmp_path: Path) -> None:
    assert "site name 'a b'" in refused("flower", "keys", "a b", tmp_path)
    ok("flower", "keys", "site_a", tmp_path)
    before = (tmp_path / "site_a.key").read_bytes()
    assert "site_a.key exists" in refused("flower", "keys", "site_a", tmp_path)
    assert (tmp_path / "site_a.key").read_bytes() == before


# --------------------------------------------------------------------------- command lines


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Certificates and the key pairs of site_a, in one folder each."""
    root = tmp_path_factory.mktemp("creds")
    ok("flower", "certs", root / "certs")
    ok("flower", "keys", "site_a", root / "keys")
    return root


def test_superlink_command_tls_and_auth(creds: Path) -> None:
    tls = TlsFiles.in_folder(creds / "certs")
    cmd = superlink_command(8000, host="0.0.0.0", tls=tls, supernode_auth=True)
    assert "--insecure" not in cmd
    for flag, path in (("--ssl-certfile", tls.server_cert), ("--ssl-keyfile", tls.server_key),
                       ("--ssl-ca-certfile", tls.ca_cert)):  # fmt: skip
        assert cmd[cmd.index(flag) + 1] == str(path)
    assert "--enable-supernode-auth" in cmd
    assert "--disable-runtime-dependency-installation" in cmd

    assert "--insecure" in superlink_command(8000)  # plain HTTP on loopback: allowed
    with pytest.raises(CredentialsError, match=r"on 0\.0\.0\.0 needs TLS: pass --certs"):
        superlink_command(8000, host="0.0.0.0")
    with pytest.raises(CredentialsError, match="--enable-supernode-auth needs TLS"):
        superlink_command(8000, supernode_auth=True)
    with pytest.raises(CredentialsError, match=r"--ssl-keyfile .*: no such file"):
        superlink_command(8000, tls=TlsFiles(tls.ca_cert, tls.server_cert, creds / "nope.key"))
    readable = creds / "readable.key"
    readable.write_bytes(tls.server_key.read_bytes())
    os.chmod(readable, 0o640)
    with pytest.raises(CredentialsError, match=r"accessible by other users \(mode 0640\)"):
        superlink_command(8000, tls=TlsFiles(tls.ca_cert, tls.server_cert, readable))


def test_supernode_command_tls_and_auth(creds: Path, tmp_path: Path) -> None:
    ca, key = creds / "certs" / "ca.crt", creds / "keys" / "site_a.key"
    cmd = supernode_command("link.example.org:8000", 9094, tmp_path, site_name="site_a",
                            root_certificates=ca, auth_key=key)  # fmt: skip
    assert cmd[cmd.index("--root-certificates") + 1] == str(ca.resolve())
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(key.resolve())
    assert "--insecure" not in cmd

    assert "--insecure" in supernode_command("127.0.0.1:8000", 9094, tmp_path)
    assert "--insecure" in supernode_command("[::1]:8000", 9094, tmp_path)
    with pytest.raises(CredentialsError, match="is not on loopback: pass --root-certificates"):
        supernode_command("link.example.org:8000", 9094, tmp_path)
    with pytest.raises(CredentialsError, match="is not on loopback"):
        supernode_command("0.0.0.0:8000", 9094, tmp_path)
    with pytest.raises(CredentialsError, match="--auth-key needs TLS"):
        supernode_command("127.0.0.1:8000", 9094, tmp_path, auth_key=key)
    with pytest.raises(CredentialsError, match="not an unencrypted OpenSSH private key"):
        supernode_command("127.0.0.1:8000", 9094, tmp_path, root_certificates=ca,
                          auth_key=creds / "certs" / "server.key")  # fmt: skip
    shared = tmp_path / "shared.key"
    shared.write_bytes(key.read_bytes())
    os.chmod(shared, 0o644)
    with pytest.raises(CredentialsError, match=r"accessible by other users \(mode 0644\)"):
        supernode_command("127.0.0.1:8000", 9094, tmp_path, root_certificates=ca, auth_key=shared)


@pytest.fixture
def execs(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Capture the argv ``mmfl flower superlink|supernode`` would exec (nothing runs)."""
    calls: list[list[str]] = []
    monkeypatch.setattr(os, "execve", lambda path, argv, env: calls.append(list(argv)))
    return calls


def test_cli_superlink_runs_tls_with_auth_and_refuses_plain_http_off_loopback(
    creds: Path, execs: list[list[str]]
) -> None:
    result = mmfl("flower", "superlink", "--host", "0.0.0.0", "--certs", creds / "certs",
                  "--enable-supernode-auth", "--database", "state.db")  # fmt: skip
    assert result.exit_code == 0, result.output
    (cmd,) = execs
    assert cmd[cmd.index("--ssl-certfile") + 1] == str((creds / "certs" / "server.pem").resolve())
    assert "--enable-supernode-auth" in cmd and cmd[-2:] == ["--database", "state.db"]
    assert "warning" not in result.output

    for args in (["--host", "0.0.0.0"], ["--host", "10.0.0.5", "--insecure"]):
        message = refused("flower", "superlink", *args)
        assert "needs TLS: pass --certs DIR" in message
    assert "--insecure for a plain-HTTP trial" in refused("flower", "superlink")
    assert "missing --ssl-keyfile" in refused(
        "flower", "superlink", "--ssl-certfile", creds / "certs" / "server.pem"
    )
    assert len(execs) == 1  # nothing refused was started

    result = mmfl("flower", "superlink", "--insecure")
    assert result.exit_code == 0 and "--insecure" in execs[-1]
    assert "warning: SuperLink on 127.0.0.1:8000 over plain HTTP" in " ".join(result.output.split())


def _site(tmp_path: Path) -> Path:
    """A site directory the SuperNode's start check accepts (one FHIR file; never read here)."""
    site = tmp_path / "site_a"
    (site / "fhir").mkdir(parents=True)
    (site / "fhir" / "p.json").write_text('{"resourceType": "Patient", "id": "p"}')
    return site


def test_cli_supernode_takes_the_ca_and_the_site_key(
    creds: Path, execs: list[list[str]], tmp_path: Path
) -> None:
    site = _site(tmp_path)
    result = mmfl("flower", "supernode", site, "--superlink", "link.example.org:8000",
                  "--root-certificates", creds / "certs" / "ca.crt",
                  "--auth-key", creds / "keys" / "site_a.key")  # fmt: skip
    assert result.exit_code == 0, result.output
    (cmd,) = execs
    key = str((creds / "keys" / "site_a.key").resolve())
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == key
    assert "--insecure" not in cmd

    message = refused("flower", "supernode", site, "--superlink", "link.example.org:8000")
    assert "pass --root-certificates CA.crt" in message
    assert len(execs) == 1
    result = mmfl("flower", "supernode", site, "--insecure")
    assert result.exit_code == 0 and "--insecure" in execs[-1]
    assert "warning: SuperNode to 127.0.0.1:8000 over plain HTTP" in " ".join(result.output.split())


def test_cli_supernode_carries_the_sites_policy_in_its_node_config(
    creds: Path, execs: list[list[str]], tmp_path: Path
) -> None:
    """``--node-config`` adds the hospital's policy to site-name and site-dir (a second
    ``--node-config`` passed through to Flower would have replaced them); a key the policy
    reader does not know, a bad value or an attempt to set site-name is refused before Flower
    starts."""
    from flwr.common.config import parse_config_args

    from multimodal_fl.federated.disclosure import node_policy

    site = _site(tmp_path)
    tls = ["--superlink", "link.example.org:8000", "--root-certificates",
           creds / "certs" / "ca.crt", "--auth-key", creds / "keys" / "site_a.key"]
    policy = "min-cell=20 max-epsilon=8 secure-aggregation=true answers='info,init,fit'"
    result = mmfl("flower", "supernode", site, *tls, "--node-config", policy)
    assert result.exit_code == 0, result.output
    (cmd,) = execs
    assert cmd.count("--node-config") == 1
    config = parse_config_args([cmd[cmd.index("--node-config") + 1]])  # as Flower reads it
    assert config["site-name"] == "site_a" and config["site-dir"] == str(site.resolve())
    read = node_policy(config)
    assert read is not None and read.min_cell == 20 and read.max_epsilon == 8
    assert read.secure_aggregation and read.answers == ["info", "init", "fit"]

    assert "did you mean 'max-epsilon'" in refused(
        "flower", "supernode", site, *tls, "--node-config", "max-epsylon=8")
    assert "node config min-cell=-1" in refused(
        "flower", "supernode", site, *tls, "--node-config", "min-cell=-1")
    assert "expected one of" in refused(
        "flower", "supernode", site, *tls, "--node-config", "site-name='b'")
    with pytest.raises(ValueError, match="--node-config sets site-dir"):
        supernode_command("127.0.0.1:8000", 9094, tmp_path, node_config="site-dir='/x'")
    assert len(execs) == 1  # nothing refused was started
