"""Secure sum: integer vectors summed across sites so that the server learns only the total.

The protocol of Bonawitz et al. (2017, "Practical Secure Aggregation for Privacy-Preserving
Machine Learning"), built from library primitives only — no cipher is written here:

1. **advertise**: every site makes two key pairs (elliptic-curve Diffie-Hellman, the
   ``cryptography`` package): one to encrypt the shares it sends the others, one whose pairwise
   shared secrets seed the pairwise masks; the server relays the public keys.
2. **share**: every site draws a self-mask seed and splits it and its mask private key into
   Shamir shares (Flower's ``flwr.common.secure_aggregation.crypto.shamir``, threshold ``t``);
   each share for site ``j`` is encrypted with the site pair's shared key (Flower's
   ``symmetric_encryption``: HKDF + Fernet) and relayed by the server, which cannot read it.
3. **masked input**: a site sends ``y = x + PRG(self seed) + sum_{j>i} PRG(s_ij) - sum_{j<i}
   PRG(s_ij)`` modulo ``2**bits``; PRG is the ChaCha20 keystream (``cryptography``). Every
   ``y`` on its own is uniformly distributed: it tells the server nothing about ``x``.
4. **unmask**: the surviving sites send, for each site that sent ``y``, its self-seed share,
   and for each site that dropped after step 2, its mask-key share; with ``t`` shares the
   server rebuilds what it needs, removes the masks and keeps the sum.

A site that drops after sharing its keys does not stop the sum (its pairwise masks are
rebuilt from the others' shares) as long as ``t`` sites remain. At least three sites are
required: with two, each would recover the other's vector by subtracting its own from the
total, so a two-site sum is refused with that reason.

The classes are transport-free: in process, :func:`secure_sum` passes the messages between
objects; over a federation, each step is one request kind whose payload is the dict these
methods take and return (bytes and integer arrays only).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    decrypt,
    encrypt,
    generate_shared_key,
)

__all__ = [
    "MIN_SITES",
    "SecureSumError",
    "SecureSumServer",
    "SecureSumSite",
    "secure_sum",
    "threshold",
]

#: The fewest sites a secure sum runs with (with two, each learns the other's vector).
MIN_SITES = 3
_CURVE = ec.SECP384R1()
_SEED_BYTES = 32

IntArray = npt.NDArray[np.int64]


class SecureSumError(ValueError):
    """A secure sum that cannot run or cannot finish; the message says why."""


def threshold(n_sites: int) -> int:
    """Shares needed to rebuild a secret: a majority of the sites, at least 2.

    Parameters
    ----------
    n_sites : int

    Returns
    -------
    int
    """
    return max(2, n_sites // 2 + 1)


def _public_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


def _public_key(raw: bytes) -> ec.EllipticCurvePublicKey:
    return ec.EllipticCurvePublicKey.from_encoded_point(_CURVE, raw)


def _private_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _private_key(raw: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_der_private_key(raw, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SecureSumError("a rebuilt mask key is not an elliptic-curve key")
    return key


def _prg(seed: bytes, size: int, bits: int) -> IntArray:
    """``size`` integers in ``[0, 2**bits)`` from the ChaCha20 keystream of ``seed``."""
    key = hashlib.sha256(seed).digest()
    stream = Cipher(algorithms.ChaCha20(key, b"\x00" * 16), mode=None).encryptor()
    raw = np.frombuffer(stream.update(b"\x00" * (8 * size)), dtype="<u8")
    return (raw & np.uint64((1 << bits) - 1)).astype(np.int64)


def _pair_seed(own: ec.EllipticCurvePrivateKey, other: bytes) -> bytes:
    return generate_shared_key(own, _public_key(other))


def _pack(seed_share: bytes, key_share: bytes) -> bytes:
    return len(seed_share).to_bytes(4, "little") + seed_share + key_share


def _unpack(raw: bytes) -> tuple[bytes, bytes]:
    n = int.from_bytes(raw[:4], "little")
    return raw[4:4 + n], raw[4 + n:]


@dataclass
class SecureSumSite:
    """One site's side of a secure sum (state kept between the four steps).

    Parameters
    ----------
    name : str
        The site's name (the server routes by it).
    bits : int
        Arithmetic is modulo ``2**bits`` (at most 62); the total must stay below it.
    """

    name: str
    bits: int = 40
    _enc: ec.EllipticCurvePrivateKey = field(init=False, repr=False)
    _mask: ec.EllipticCurvePrivateKey = field(init=False, repr=False)
    _seed: bytes = field(init=False, repr=False)
    _keys: dict[str, tuple[bytes, bytes]] = field(default_factory=dict, init=False, repr=False)
    _shares: dict[str, tuple[bytes, bytes]] = field(default_factory=dict, init=False,
                                                    repr=False)

    def advertise(self) -> dict[str, bytes]:
        """Step 1: fresh key pairs; the public halves to relay to every other site."""
        self._enc = ec.generate_private_key(_CURVE)
        self._mask = ec.generate_private_key(_CURVE)
        self._seed = np.random.default_rng().bytes(_SEED_BYTES)
        return {"enc": _public_bytes(self._enc), "mask": _public_bytes(self._mask)}

    def share(self, keys: Mapping[str, Mapping[str, bytes]]) -> dict[str, bytes]:
        """Step 2: Shamir shares of the self seed and the mask key, encrypted per site.

        Parameters
        ----------
        keys : mapping of site name to its advertised public keys (every site, this one too)

        Returns
        -------
        dict of site name to ciphertext (the server relays each to its site)
        """
        names = sorted(keys)
        if len(names) < MIN_SITES:
            raise SecureSumError(_too_few(len(names)))
        self._keys = {s: (bytes(k["enc"]), bytes(k["mask"])) for s, k in keys.items()}
        t = threshold(len(names))
        seed_shares = create_shares(self._seed, t, len(names))
        key_shares = create_shares(_private_bytes(self._mask), t, len(names))
        out = {}
        for other, seed_share, key_share in zip(names, seed_shares, key_shares, strict=True):
            secret = generate_shared_key(self._enc, _public_key(self._keys[other][0]))
            out[other] = encrypt(secret, _pack(seed_share, key_share))
        return out

    def masked(self, received: Mapping[str, bytes], x: npt.ArrayLike) -> IntArray:
        """Step 3: keep the shares sent to this site; return the masked vector.

        Parameters
        ----------
        received : mapping of sender to the ciphertext it addressed to this site
        x : array-like of int
            Non-negative integers; the sum over sites must stay below ``2**bits``.

        Returns
        -------
        numpy.ndarray of int64
        """
        values = np.asarray(x)
        if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
            raise SecureSumError(f"site {self.name}: a secure sum takes a 1-D integer vector, "
                                 f"got {values.dtype} of shape {values.shape}")
        if (values < 0).any() or (values >= (1 << self.bits) // len(self._keys)).any():
            raise SecureSumError(f"site {self.name}: values must lie in [0, 2**{self.bits} / "
                                 f"{len(self._keys)}) so the total cannot wrap")
        for sender, ciphertext in received.items():
            secret = generate_shared_key(self._enc, _public_key(self._keys[sender][0]))
            self._shares[sender] = _unpack(decrypt(secret, ciphertext))
        modulus = 1 << self.bits
        y = (values.astype(np.int64) + _prg(self._seed, values.size, self.bits)) % modulus
        for other in sorted(self._keys):
            if other == self.name:
                continue
            mask = _prg(_pair_seed(self._mask, self._keys[other][1]), values.size, self.bits)
            y = (y + mask) % modulus if other > self.name else (y - mask) % modulus
        return y

    def unmask(self, sent: Sequence[str], dropped: Sequence[str]) -> dict[str, bytes]:
        """Step 4: self-seed shares of the sites that sent, mask-key shares of those that dropped.

        Parameters
        ----------
        sent, dropped : sequences of site names (disjoint: a site is never asked both)

        Returns
        -------
        dict of ``"seed/<site>"`` or ``"key/<site>"`` to this site's share
        """
        overlap = set(sent) & set(dropped)
        if overlap:
            raise SecureSumError(f"site {self.name}: refuses to reveal both secrets of "
                                 f"{sorted(overlap)} (that would unmask its vector)")
        out = {f"seed/{s}": self._shares[s][0] for s in sent if s in self._shares}
        out.update({f"key/{s}": self._shares[s][1] for s in dropped if s in self._shares})
        return out


class SecureSumServer:
    """The server's side: relays keys and shares, removes the masks, keeps only the total.

    Parameters
    ----------
    bits : int
        The sites' modulus exponent.
    """

    def __init__(self, bits: int = 40) -> None:
        self.bits = bits
        self.keys: dict[str, dict[str, bytes]] = {}

    def collect_keys(self, keys: Mapping[str, Mapping[str, bytes]]) -> dict[str, dict[str, bytes]]:
        """Step 1 at the server: the public keys every site receives.

        Raises
        ------
        SecureSumError
            With fewer than :data:`MIN_SITES` sites.
        """
        if len(keys) < MIN_SITES:
            raise SecureSumError(_too_few(len(keys)))
        self.keys = {s: dict(k) for s, k in sorted(keys.items())}
        return self.keys

    @staticmethod
    def route(shares: Mapping[str, Mapping[str, bytes]]) -> dict[str, dict[str, bytes]]:
        """Step 2 at the server: ``{sender: {receiver: c}}`` -> ``{receiver: {sender: c}}``."""
        out: dict[str, dict[str, bytes]] = {}
        for sender, per_receiver in shares.items():
            for receiver, ciphertext in per_receiver.items():
                out.setdefault(receiver, {})[sender] = ciphertext
        return out

    def total(self, masked: Mapping[str, IntArray], shares: Mapping[str, Mapping[str, bytes]],
              shared: Sequence[str]) -> IntArray:
        """Step 4 at the server: the sum of the masked vectors, masks removed.

        Parameters
        ----------
        masked : mapping of site to its masked vector (the sites that sent one)
        shares : mapping of surviving site to its :meth:`SecureSumSite.unmask` reply
        shared : the sites whose shares went out in step 2

        Returns
        -------
        numpy.ndarray of int64
            The sum of the vectors of the sites in ``masked``.

        Raises
        ------
        SecureSumError
            When fewer than the threshold of shares came back.
        """
        t = threshold(len(self.keys))
        if len(shares) < t:
            raise SecureSumError(f"secure sum: {len(shares)} site(s) sent their shares, "
                                 f"{t} are needed to remove the masks")
        modulus = 1 << self.bits
        size = len(next(iter(masked.values())))
        acc = np.zeros(size, dtype=np.int64)
        for y in masked.values():
            acc = (acc + np.asarray(y, dtype=np.int64)) % modulus
        for site in masked:
            seed = combine_shares([s[f"seed/{site}"] for s in shares.values()][:t])
            acc = (acc - _prg(seed, size, self.bits)) % modulus
        for gone in sorted(set(shared) - set(masked)):
            key = _private_key(combine_shares([s[f"key/{gone}"] for s in shares.values()][:t]))
            for other in masked:
                mask = _prg(_pair_seed(key, self.keys[other]["mask"]), size, self.bits)
                # ``other`` added +mask when gone > other, -mask otherwise: undo it
                acc = (acc - mask) % modulus if gone > other else (acc + mask) % modulus
        return acc


def _too_few(n: int) -> str:
    return (f"secure sum needs at least {MIN_SITES} sites, got {n}: with two, each site "
            "recovers the other's vector by subtracting its own from the total")


def secure_sum(vectors: Mapping[str, npt.ArrayLike], *, bits: int = 40,
               drop_after_sharing: Sequence[str] = ()) -> IntArray:
    """Run the whole protocol in process (the sites as objects) and return the total.

    Parameters
    ----------
    vectors : mapping of site name to a 1-D non-negative integer vector (equal lengths)
    bits : int
        Modulus exponent.
    drop_after_sharing : sequence of str
        Sites that vanish after step 2 (tests the dropout path); their vectors are not summed.

    Returns
    -------
    numpy.ndarray of int64
        The sum over the sites that did not drop.
    """
    sites = {name: SecureSumSite(name, bits) for name in sorted(vectors)}
    server = SecureSumServer(bits)
    keys = server.collect_keys({n: s.advertise() for n, s in sites.items()})
    routed = server.route({n: s.share(keys) for n, s in sites.items()})
    alive = {n: s for n, s in sites.items() if n not in set(drop_after_sharing)}
    masked = {n: s.masked(routed[n], vectors[n]) for n, s in alive.items()}
    dropped = sorted(set(sites) - set(alive))
    shares = {n: s.unmask(sorted(masked), dropped) for n, s in alive.items()}
    return server.total(masked, shares, sorted(sites))
