"""TLS certificates for the SuperLink and authentication keys for the SuperNodes.

Made with the ``cryptography`` package, no OpenSSL command line:

* :func:`make_certificates` writes a certificate authority (``ca.crt``, ``ca.key``) and the
  SuperLink's certificate and key (``server.pem``, ``server.key``) signed by it, with the
  SuperLink's DNS names and IP addresses as subject alternative names; with ``renew=True`` it
  signs a new SuperLink certificate with the CA already in the folder (so the hospitals keep
  their ``ca.crt``). These are the files ``flower-superlink --ssl-certfile/--ssl-keyfile/
  --ssl-ca-certfile`` and ``flower-supernode --root-certificates`` take (:class:`TlsFiles`).
* :func:`make_site_keys` writes a site's SuperNode key pair in the format Flower 1.42 reads:
  an EC key on a NIST curve in OpenSSH format (``flower-supernode
  --auth-supernode-private-key``; ``flwr supernode register`` takes the ``.pub``).

Private keys are created with mode 0600 (never readable by others, not even for an instant);
:func:`check_private_file` refuses a key that others can read, as ``ssh`` does.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
import re
import shlex
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "LOOPBACK_IPS",
    "SERVER_CERT",
    "SERVER_KEY",
    "CredentialsError",
    "SiteKeys",
    "TlsFiles",
    "WrittenFile",
    "check_private_file",
    "is_loopback",
    "key_fingerprint",
    "load_site_private_key",
    "make_certificates",
    "make_site_keys",
    "registration_steps",
    "split_address",
]

#: File names :func:`make_certificates` writes into its folder.
CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.crt", "ca.key", "server.pem", "server.key"
#: IP addresses every SuperLink certificate names (see :func:`make_certificates`).
LOOPBACK_IPS = ("127.0.0.1", "::1")

_CURVE = ec.SECP384R1  # NIST P-384: what Flower's node authentication expects, and fine for TLS
_HASH = hashes.SHA384
_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class CredentialsError(ValueError):
    """Bad input for a certificate or key: the message is one line naming what and why."""


@dataclass(frozen=True)
class WrittenFile:
    """One file written, and what it is for (the line ``mmfl flower certs|keys`` prints)."""

    path: Path
    what: str

    def line(self) -> str:
        """The one line printed for this file."""
        mode = stat.S_IMODE(self.path.stat().st_mode)
        return f"wrote {self.path} (mode {mode:04o}): {self.what}"


@dataclass(frozen=True)
class TlsFiles:
    """The SuperLink's TLS files: the CA certificate, its certificate and its private key.

    Parameters
    ----------
    ca_cert : Path
        The CA certificate (PEM): ``--ssl-ca-certfile`` of the SuperLink, ``--root-certificates``
        of every SuperNode and ``root-certificates`` of ``flwr``'s connection.
    server_cert : Path
        The SuperLink's certificate (PEM, ``--ssl-certfile``).
    server_key : Path
        The SuperLink's private key (PEM, ``--ssl-keyfile``).
    """

    ca_cert: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_folder(cls, folder: str | os.PathLike[str]) -> TlsFiles:
        """The files :func:`make_certificates` wrote into ``folder``.

        Parameters
        ----------
        folder : path-like
            The folder.

        Returns
        -------
        TlsFiles
            Their paths (absolute).
        """
        root = Path(folder).resolve()
        return cls(root / CA_CERT, root / SERVER_CERT, root / SERVER_KEY)

    def check(self) -> TlsFiles:
        """Check that each file exists and the key is private.

        Returns
        -------
        TlsFiles
            ``self``.

        Raises
        ------
        CredentialsError
            Naming the first missing file, or the key readable by others.
        """
        for flag, path in (
            ("--ssl-ca-certfile", self.ca_cert),
            ("--ssl-certfile", self.server_cert),
            ("--ssl-keyfile", self.server_key),
        ):
            if not path.is_file():
                raise CredentialsError(
                    f"{flag} {path}: no such file (make the files with `mmfl flower certs DIR`)"
                )
        check_private_file(self.server_key)
        return self


@dataclass(frozen=True)
class SiteKeys:
    """A site's SuperNode key pair and the public key's fingerprint."""

    site: str
    private_key: Path
    public_key: Path
    fingerprint: str


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an IP address) is this machine's loopback interface.

    Parameters
    ----------
    host : str
        ``localhost``, an IPv4 or IPv6 address (brackets allowed), or another name.

    Returns
    -------
    bool
        True for ``localhost`` and 127.0.0.0/8 or ::1; False for anything else (``0.0.0.0``
        listens on every interface and is not loopback).
    """
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_address(address: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6) into host and port.

    Parameters
    ----------
    address : str
        The address.

    Returns
    -------
    tuple[str, int]
        The host (without brackets) and the port.

    Raises
    ------
    CredentialsError
        If there is no port.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise CredentialsError(
            f"address {address!r}: expected host:port, e.g. link.example.org:8000 or [::1]:8000"
        )
    return host.strip("[]"), int(port)


def check_private_file(path: str | os.PathLike[str]) -> Path:
    """Refuse a private key that other users may read (as ``ssh`` refuses one).

    Parameters
    ----------
    path : path-like
        The key file.

    Returns
    -------
    Path
        The path.

    Raises
    ------
    CredentialsError
        If the file is missing or its mode gives group or others any access.
    """
    path = Path(path)
    if not path.is_file():
        raise CredentialsError(f"private key {path}: no such file")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise CredentialsError(
            f"private key {path} is accessible by other users (mode {mode:04o}); "
            f"run `chmod 600 {path}`"
        )
    return path


def _write(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` from the start (no window where others could read it)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, mode)  # the umask may have removed bits from a public file's mode


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _subject_names(
    name: str, dns: Sequence[str], ips: Sequence[str]
) -> list[x509.GeneralName]:
    """The certificate's subject alternative names, each input checked."""
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys([name, *dns]):
        if _is_ip(host):
            names.append(x509.IPAddress(ipaddress.ip_address(host.strip("[]"))))
        elif _HOSTNAME.match(host):
            names.append(x509.DNSName(host.lower()))
        else:
            raise CredentialsError(
                f"DNS name {host!r} is not a host name (letters, digits, '-' and dots, "
                "e.g. link.example.org)"
            )
    for raw in ips:
        try:
            address = ipaddress.ip_address(raw.strip("[]"))
        except ValueError:
            raise CredentialsError(
                f"--ip {raw!r} is not an IP address (e.g. 10.0.0.5 or ::1)"
            ) from None
        if x509.IPAddress(address) not in names:
            names.append(x509.IPAddress(address))
    return names


def _is_ip(host: str) -> bool:
    """Whether ``host`` is an IPv4 or IPv6 address (brackets allowed)."""
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _ca_certificate(
    key: ec.EllipticCurvePrivateKey, organisation: str, now: dt.datetime, days: int
) -> x509.Certificate:
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{organisation} federation CA"),
        ]
    )
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, _HASH())
    )


def _server_certificate(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    key: ec.EllipticCurvePrivateKey,
    names: list[x509.GeneralName],
    common_name: str,
    now: dt.datetime,
    days: int,
) -> x509.Certificate:
    public = key.public_key()
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, _HASH())
    )


def _previous_names(path: Path) -> tuple[str, list[x509.GeneralName]]:
    """The common name and subject alternative names of the certificate being renewed."""
    if not path.is_file():
        raise CredentialsError(
            f"--renew: {path} not found, so its names cannot be kept; pass --name (and --dns, "
            "--ip) for the new certificate"
        )
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        names = list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except (ValueError, x509.ExtensionNotFound) as exc:
        raise CredentialsError(f"--renew: cannot read the names of {path}: {exc}") from None
    common = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return (str(common[0].value) if common else str(names[0].value)), names


def _load_ca(folder: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA certificate and key already in ``folder`` (for ``renew``)."""
    cert_path, key_path = folder / CA_CERT, folder / CA_KEY
    for path in (cert_path, key_path):
        if not path.is_file():
            raise CredentialsError(
                f"--renew: {path} not found; renewing signs a new SuperLink certificate with the "
                f"CA in {folder}: copy {path.name} back from where it is kept offline (the "
                "deployment checklist moves ca.key off the SuperLink's machine). Dropping "
                "--renew makes a new CA, which every hospital would then have to trust again"
            )
    check_private_file(key_path)
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except ValueError as exc:
        raise CredentialsError(f"--renew: cannot read the CA in {folder}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CredentialsError(f"--renew: {key_path} is not an EC private key")
    if key.public_key() != cert.public_key():
        raise CredentialsError(f"--renew: {key_path} is not the key of {cert_path}")
    return cert, key


def make_certificates(
    folder: str | os.PathLike[str],
    *,
    name: str | None = None,
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
    days: int = 365,
    ca_days: int = 3650,
    organisation: str = "multimodal_fl",
    renew: bool = False,
) -> list[WrittenFile]:
    """Write a CA and the SuperLink's certificate and key into ``folder``.

    Parameters
    ----------
    folder : path-like
        Created if missing (mode 0700).
    name : str or None
        The SuperLink's host name as SuperNodes dial it (the certificate's common name and
        first subject alternative name; an IP address is taken as an IP name). None:
        ``localhost``, or with ``renew`` and no ``dns`` nor ``ips``, the names of the
        certificate being renewed.
    dns : sequence of str
        More DNS names the SuperLink answers to.
    ips : sequence of str
        IP addresses the SuperLink answers to. 127.0.0.1 and ::1 are always added: the
        SuperLink's own ServerApp processes reach it over loopback (with ``--host 0.0.0.0``
        too) and check its certificate like any SuperNode.
    days : int
        The SuperLink certificate's validity (at most the CA's).
    ca_days : int
        The CA's validity (ignored with ``renew``).
    organisation : str
        The CA's organisation name.
    renew : bool
        Keep the CA in ``folder`` and write a new SuperLink certificate and key only.

    Returns
    -------
    list[WrittenFile]
        Each file written, in order.

    Raises
    ------
    CredentialsError
        Bad names, addresses or durations; a file that would be overwritten (without
        ``renew``); a missing or mismatched CA (with ``renew``).
    """
    for flag, value in (("--days", days), ("--ca-days", ca_days)):
        if value < 1:
            raise CredentialsError(f"{flag} {value}: the validity must be at least 1 day")
    root = Path(folder)
    if renew and name is None and not dns and not ips:
        name, names = _previous_names(root / SERVER_CERT)
    else:
        name = name or "localhost"
        names = _subject_names(name, dns, [*ips, *LOOPBACK_IPS])
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    targets = [SERVER_CERT, SERVER_KEY] if renew else [CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY]
    now = dt.datetime.now(dt.UTC)
    if renew:
        ca_cert, ca_key = _load_ca(root)
        for target in targets:
            (root / target).unlink(missing_ok=True)
    else:
        taken = [str(root / t) for t in targets if (root / t).exists()]
        if taken:
            raise CredentialsError(
                f"{taken[0]} exists; pass --renew to sign a new SuperLink certificate with the CA "
                "there, or choose an empty folder"
            )
        ca_key = ec.generate_private_key(_CURVE())
        ca_cert = _ca_certificate(ca_key, organisation, now, ca_days)
    key = ec.generate_private_key(_CURVE())
    cert = _server_certificate(ca_cert, ca_key, key, names, name, now, days)
    until = cert.not_valid_after_utc.date().isoformat()
    sans = ", ".join(str(n.value) for n in names)
    files = [
        (CA_CERT, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644,
         "CA certificate: --root-certificates of every SuperNode and root-certificates in "
         f"flwr's config.toml (valid until {ca_cert.not_valid_after_utc.date().isoformat()})"),
        (CA_KEY, _pem_key(ca_key), 0o600,
         "CA private key: keep it offline; needed only to renew the SuperLink certificate"),
        (SERVER_CERT, cert.public_bytes(serialization.Encoding.PEM), 0o644,
         f"SuperLink certificate for {sans} (--ssl-certfile; valid until {until})"),
        (SERVER_KEY, _pem_key(key), 0o600, "SuperLink private key (--ssl-keyfile)"),
    ]
    written = []
    for file_name, data, mode, what in files:
        if file_name in targets:
            _write(root / file_name, data, mode)
            written.append(WrittenFile(root / file_name, what))
    return written


def key_fingerprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """The key's SHA-256 fingerprint as ``ssh-keygen -l`` prints it (``SHA256:...``).

    Parameters
    ----------
    public_key : EllipticCurvePublicKey
        The key.

    Returns
    -------
    str
        ``SHA256:`` and the unpadded base64 digest of the key's OpenSSH wire form: read it to
        the coordinating centre over a trusted channel before it registers the key.
    """
    line = public_key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    blob = base64.b64decode(line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def make_site_keys(site: str, folder: str | os.PathLike[str]) -> tuple[SiteKeys, list[WrittenFile]]:
    """Write a site's SuperNode key pair: ``folder/<site>.key`` and ``folder/<site>.pub``.

    Parameters
    ----------
    site : str
        The site's name (letters, digits, ``_``, ``.``, ``-``); also the public key's comment.
    folder : path-like
        Created if missing (mode 0700).

    Returns
    -------
    tuple[SiteKeys, list[WrittenFile]]
        The key pair's paths and fingerprint, and the files written.

    Raises
    ------
    CredentialsError
        A bad site name, or a key file that exists already.
    """
    if not _SITE_NAME.match(site):
        raise CredentialsError(
            f"site name {site!r}: use letters, digits, '_', '.' and '-' (at most 64), e.g. site_a"
        )
    root = Path(folder)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    private_path, public_path = root / f"{site}.key", root / f"{site}.pub"
    for path in (private_path, public_path):
        if path.exists():
            raise CredentialsError(
                f"{path} exists; a site's key is made once (move the old pair away to rotate it)"
            )
    key = ec.generate_private_key(_CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write(private_path, private, 0o600)
    _write(public_path, public + f" {site}\n".encode(), 0o644)
    keys = SiteKeys(site, private_path, public_path, key_fingerprint(key.public_key()))
    return keys, [
        WrittenFile(private_path, "SuperNode private key: stays at the site "
                    "(--auth-key of `mmfl flower supernode`)"),
        WrittenFile(public_path, f"SuperNode public key ({keys.fingerprint}): send it to the "
                    "coordinating centre to register"),
    ]


def load_site_private_key(path: str | os.PathLike[str]) -> ec.EllipticCurvePrivateKey:
    """Read a SuperNode's private key as Flower does, with a one-line error if it cannot.

    Parameters
    ----------
    path : path-like
        An OpenSSH-format EC private key (:func:`make_site_keys`, or ``ssh-keygen -t ecdsa``).

    Returns
    -------
    EllipticCurvePrivateKey
        The key.

    Raises
    ------
    CredentialsError
        Missing, readable by others, or not an unencrypted OpenSSH EC key.
    """
    path = check_private_file(path)
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise CredentialsError(
            f"--auth-key {path}: not an unencrypted OpenSSH private key ({exc}); make one with "
            "`mmfl flower keys SITE DIR`"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CredentialsError(
            f"--auth-key {path}: Flower needs an EC (ECDSA, NIST curve) key, got "
            f"{type(key).__name__}; make one with `mmfl flower keys SITE DIR`"
        )
    return key


def registration_steps(keys: SiteKeys, *, connection: str | None = None) -> list[str]:
    """What to do with a new key pair: the lines ``mmfl flower keys`` prints.

    Parameters
    ----------
    keys : SiteKeys
        The site's key pair (:func:`make_site_keys`).
    connection : str or None
        The SuperLink connection in ``flwr``'s ``config.toml`` at the coordinating centre
        (None: its default connection).

    Returns
    -------
    list[str]
        The registration step (``flwr supernode register``, Flower's CLI-managed SuperNode
        authentication) and the SuperNode's command line.
    """
    where = f" {shlex.quote(connection)}" if connection else ""
    public = shlex.quote(keys.public_key.name)
    private = shlex.quote(str(keys.private_key.resolve()))
    return [
        f"1. send {keys.public_key.name} to the coordinating centre and confirm its fingerprint "
        f"{keys.fingerprint} over a trusted channel (phone, not the same e-mail)",
        "2. there, with the SuperLink running with --enable-supernode-auth, register it (in the "
        f"folder holding {keys.public_key.name}):",
        f"   flwr supernode register {public}{where} --name {shlex.quote(keys.site)}",
        f"3. here, start the SuperNode with the private key ({keys.private_key.name} never "
        "leaves this machine):",
        f"   mmfl flower supernode SITE_DIR --name {keys.site} --superlink HOST:PORT "
        f"--root-certificates ca.crt --auth-key {private}",
    ]
