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
objects; over a federation, each step is one ``secure_sum`` request (:func:`step_request`)
that a site's :class:`SecureSumParty` answers, its payload the bytes and integer arrays these
methods take and return (``multimodal_fl.federated.pooling.secure_total`` drives the steps
from the server).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

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

from multimodal_fl.federated.protocol import (
    ConfigValue,
    Doc,
    Kind,
    Reply,
    Request,
    pack_document,
)
from multimodal_fl.federated.site_state import PART, SiteState, grid_bins, grid_key

__all__ = [
    "DEFAULT_BITS",
    "MIN_SITES",
    "STEPS",
    "SecureSumError",
    "SecureSumParty",
    "SecureSumServer",
    "SecureSumSite",
    "keys_arrays",
    "reply_bytes",
    "secure_sum",
    "step_request",
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

    def export(self) -> dict[str, bytes]:
        """This site's secrets and what it received so far, as bytes (kept at the site).

        A site rebuilt for every message (Flower without a site worker) keeps them in its
        SuperNode's state between the steps; nothing of it leaves the site.

        Returns
        -------
        dict of str to bytes
            Read back by :meth:`restore`.
        """
        out: dict[str, bytes] = {}
        if hasattr(self, "_enc"):
            out.update(enc=_private_bytes(self._enc), mask=_private_bytes(self._mask),
                       seed=self._seed)
        for site, (enc, mask) in self._keys.items():
            out[f"keys/enc/{site}"], out[f"keys/mask/{site}"] = enc, mask
        for site, (seed_share, key_share) in self._shares.items():
            out[f"shares/seed/{site}"], out[f"shares/key/{site}"] = seed_share, key_share
        return out

    @classmethod
    def restore(cls, name: str, bits: int, state: Mapping[str, bytes]) -> SecureSumSite:
        """The site :meth:`export` described.

        Parameters
        ----------
        name : str
        bits : int
        state : mapping of str to bytes

        Returns
        -------
        SecureSumSite
        """
        site = cls(name, bits)
        if "enc" in state:
            site._enc = _private_key(bytes(state["enc"]))
            site._mask = _private_key(bytes(state["mask"]))
            site._seed = bytes(state["seed"])
        for key, value in state.items():
            kind, _, rest = key.partition("/")
            part, _, other = rest.partition("/")
            if kind == "keys":
                enc, mask = site._keys.get(other, (b"", b""))
                site._keys[other] = (bytes(value), mask) if part == "enc" else (enc, bytes(value))
            elif kind == "shares":
                seed, share = site._shares.get(other, (b"", b""))
                site._shares[other] = ((bytes(value), share) if part == "seed"
                                       else (seed, bytes(value)))
        return site


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


# --------------------------------------------------------------------------- over the wire

#: The four steps, in order; a ``secure_sum`` request names one in ``config["step"]``.
STEPS = ("advertise", "share", "masked", "unmask")
#: Default modulus exponent of a secure sum over the wire.
DEFAULT_BITS = 40
_STATE = "secure_sum/"


def _u8(raw: bytes) -> npt.NDArray[np.uint8]:
    return np.frombuffer(raw, dtype=np.uint8).copy()


def _raw(arrays: Mapping[str, np.ndarray], prefix: str) -> dict[str, bytes]:
    """The byte strings of ``arrays`` under ``prefix``, keyed by the rest of the name."""
    return {k[len(prefix):]: np.asarray(v, dtype=np.uint8).tobytes()
            for k, v in arrays.items() if k.startswith(prefix)}


def step_request(step: str, vector: str, round: int, *,
                 arrays: Mapping[str, np.ndarray] | None = None,
                 **config: ConfigValue) -> Request:
    """One secure-sum request (what the server sends a site at ``step``).

    Parameters
    ----------
    step : str
        One of :data:`STEPS`.
    vector : str
        Which vector the sites sum.
    round : int
    arrays : mapping, optional
        ``keys/enc/<site>`` and ``keys/mask/<site>`` (share), ``from/<site>`` (masked).
    **config
        ``bits`` (advertise), ``parts`` and ``widths`` (masked: JSON lists), ``sent`` and
        ``dropped`` (unmask: JSON lists).

    Returns
    -------
    Request
    """
    if step not in STEPS:
        raise ValueError(f"secure sum step {step!r}; expected one of {list(STEPS)}")
    return Request(Kind.SECURE_SUM, round, config={"step": step, "vector": vector, **config},
                   arrays=dict(arrays or {}))


def keys_arrays(keys: Mapping[str, Mapping[str, bytes]]) -> dict[str, npt.NDArray[np.uint8]]:
    """Every site's public keys as the ``share`` request's arrays.

    Parameters
    ----------
    keys : mapping of site to ``{"enc": bytes, "mask": bytes}``

    Returns
    -------
    dict of str to uint8 array
    """
    return {f"keys/{kind}/{site}": _u8(k[kind]) for site, k in keys.items()
            for kind in ("enc", "mask")}


def reply_bytes(reply: Reply, prefix: str = "") -> dict[str, bytes]:
    """The byte strings a secure-sum reply carries (its ``uint8`` arrays), keyed without
    ``prefix``.

    Parameters
    ----------
    reply : Reply
    prefix : str

    Returns
    -------
    dict of str to bytes
    """
    return _raw({k: v for k, v in reply.arrays.items() if v.dtype == np.uint8}, prefix)


@dataclass
class _Held:
    """One vector a site holds for a secure sum."""

    parts: dict[str, IntArray]
    refusal: str | None
    min_cell: int
    once: bool = False
    grid: int | None = None


def _digests(held: _Held) -> list[str]:
    """A held vector's content as sha256 hex digests: the whole vector (part names, widths,
    values) and, for a vector that is not summed once (histograms, not a model update), each
    non-zero part's values alone (``part:<digest>``), whatever its name.

    Per part, because a second run whose config differs only in the parts it asks for (no
    subgroups, other age bands) holds the same ``overall`` histogram in another vector: its
    total over other sites would give the difference. A model update's parts are not
    checked one by one: its group counts (``w/...``) are the same every round, and rounds
    sum them over changing sets of sites by design.
    """
    whole = hashlib.sha256()
    out: list[str] = []
    for name in sorted(held.parts):
        part = np.ascontiguousarray(held.parts[name], dtype="<i8")
        whole.update(json.dumps([name, int(part.size)]).encode())
        whole.update(part.tobytes())
        if not held.once and part.any():
            out.append(PART + hashlib.sha256(
                json.dumps(int(part.size)).encode() + part.tobytes()).hexdigest())
    return [whole.hexdigest(), *sorted(set(out))]


class SecureSumParty:
    """A site's side of secure sums over a federation: answers the four ``secure_sum`` steps.

    The site first :meth:`hold` s a vector under a name (e.g. its test histograms at the
    predict stage, or its model update after a secured fit), in named parts (``overall``,
    ``sex=F``, ...; ``d/<key>``, ``w/<key>``, ...); the server's ``advertise`` request then
    learns the part names and their widths, never a number, and its ``masked`` request names
    the parts and widths every site lays out in one order (a part the site does not hold is
    zeros). Between the steps the :class:`SecureSumSite` lives in this object;
    :meth:`export_state` / :meth:`restore_state` carry it through a site rebuilt for every
    message (Flower without a site worker), inside the site's own state.

    **One vector, one set of sites.** Two totals of the same vector over different sets of
    sites give the server their difference: over all four sites and then over three of them,
    the fourth site's vector exactly. So the party keeps a digest of the content of every
    vector it has helped unmask (:attr:`summed`, with the sites summed), and of each non-zero
    part of one that is not a model update (``_digests``: the same ``overall`` histogram
    inside a vector with other subgroup parts), and its ``unmask`` step refuses a vector of
    the same content, or one holding such a part, summed with any other set of sites (the
    same hold asked again, the same histograms held again by a later request on the same
    weights, or by a run that asks for other parts); the same set again gives the same total
    and is answered. The record lives as long as the site's state (a run; it travels in
    :meth:`export_state`), or, with a ``state`` directory (the policy's ``state_dir``),
    across every run that uses it.
    A vector of *different* content that overlaps (e.g. histograms of slightly different
    weights) is not caught: differencing those gives an approximation, not the vector.

    Parameters
    ----------
    site : str
        The site's name.
    state : SiteState or None
        The site's state directory (its policy's ``state_dir``): the record of sums is read
        from it and written to it under its lock at every unmask step, so it spans every run
        that uses it. ``None``: the record lives in this object (and its exported state).
    """

    def __init__(self, site: str, state: SiteState | None = None) -> None:
        self.site = site
        self.state = state
        self.held: dict[str, _Held] = {}
        self.live: dict[str, SecureSumSite] = {}
        #: content digest of every vector this site helped unmask -> the sites summed with it
        self.summed: dict[str, list[str]] = {}

    def hold(self, vector: str, parts: Mapping[str, npt.ArrayLike], *,
             refusal: str | None = None, min_cell: int = 0, once: bool = False,
             grid: int | None = None) -> None:
        """Keep a vector for a later secure sum (replacing one of the same name).

        Parameters
        ----------
        vector : str
            Its name (the requests' ``config["vector"]``).
        parts : mapping of str to 1-D non-negative int array-like
            The named parts; each part has one width at every site (the server checks).
        refusal : str or None
            Why this site does not take part (said at ``advertise``, from counts only).
        min_cell : int
            The site's small-cell threshold in force (the server releases nothing finer).
        once : bool
            Forget the vector after its ``unmask`` step (a model update: it is summed once
            and not kept at the site, nor in a SuperNode's state, any longer).
        grid : int or None
            For score histograms: the bins of their grid (``evaluation.histogram_bins``). The
            site keeps the grids it has summed histograms on with the sites summed, and
            refuses a histogram on another grid over another set of sites (see
            :meth:`_unmask`).

        Raises
        ------
        SecureSumError
            For a part that is not a 1-D integer vector.
        """
        arrays = {str(k): np.asarray(v) for k, v in parts.items()}
        bad = sorted(k for k, a in arrays.items()
                     if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer))
        if bad:
            raise SecureSumError(f"site {self.site}: the parts of {vector!r} must be 1-D "
                                 f"integer vectors; {bad[:3]} are not")
        self.held[vector] = _Held({k: a.astype(np.int64) for k, a in arrays.items()}, refusal,
                                  int(min_cell), bool(once),
                                  None if grid is None else int(grid))
        self.live.pop(vector, None)

    def answer(self, request: Request) -> Reply:
        """Answer one ``secure_sum`` request.

        Parameters
        ----------
        request : Request

        Returns
        -------
        Reply

        Raises
        ------
        SecureSumError
            The site does not take part (no such vector, too few patients, too few sites) or
            the step comes out of order; the message is made from names and counts only.
        """
        step = str(request.config.get("step", ""))
        vector = str(request.config.get("vector", ""))
        held = self.held.get(vector)
        if held is None:
            raise SecureSumError(f"site {self.site}: holds no vector {vector!r} (it holds "
                                 f"{sorted(self.held)})")
        if held.refusal is not None or not held.parts:
            raise SecureSumError(f"site {self.site}: {held.refusal or 'holds an empty vector'}")
        if step == "advertise":
            return self._advertise(request, vector, held)
        live = self.live.get(vector)
        if live is None or step not in STEPS:
            raise SecureSumError(f"site {self.site}: secure sum step {step!r} of {vector!r} "
                                 "without an advertise step before it")
        reply = Reply(self.site, request.kind, request.round)
        if step == "share":
            keys: dict[str, dict[str, bytes]] = {}
            for name, raw in _raw(request.arrays, "keys/").items():
                kind, _, site = name.partition("/")
                keys.setdefault(site, {})[kind] = raw
            reply.arrays = {f"to/{s}": _u8(c) for s, c in live.share(keys).items()}
        elif step == "masked":
            x = self._laid_out(request, vector, held)
            reply.arrays = {"y": live.masked(_raw(request.arrays, "from/"), x)}
        else:
            with self.state.locked() if self.state is not None else nullcontext():
                reply.arrays = self._unmask(request, vector, held, live)
        return reply

    def _unmask(self, request: Request, vector: str, held: _Held, live: SecureSumSite
                ) -> dict[str, npt.NDArray[np.uint8]]:
        """The unmask step, once the vector's content was not summed with other sites."""
        sent = sorted(str(s) for s in json.loads(str(request.config.get("sent", "[]"))))
        dropped = [str(s) for s in json.loads(str(request.config.get("dropped", "[]")))]
        if len(sent) < MIN_SITES:
            raise SecureSumError(_too_few(len(sent)))
        if self.state is not None:  # the sums of every run at this site, not only this one's
            self.summed.update(self.state.sums())
        digests = _digests(held)
        refusal = self._other_grid(held, sent)
        before = next((self.summed[d] for d in digests
                       if d in self.summed and self.summed[d] != sent), None)
        if before is not None:
            what = f"this {vector!r}" if self.summed.get(digests[0]) == before else \
                f"a part of this {vector!r}"
            refusal = (f"{what} was summed before with {len(before)} sites; a second sum with "
                       f"a different set of {len(sent)} would give the server the difference "
                       "of the two totals (refused)")
        if refusal is not None:
            del self.live[vector]
            raise SecureSumError(f"site {self.site}: {refusal}")
        arrays = {k: _u8(v) for k, v in live.unmask(sent, dropped).items()}
        self.summed.update(dict.fromkeys(digests, sent))
        if held.grid is not None:
            self.summed[grid_key(held.grid, sent)] = sent
        if self.state is not None:
            self.state.record_sums(self.summed)
        del self.live[vector]
        if held.once:
            del self.held[vector]
        return arrays

    def _other_grid(self, held: _Held, sent: list[str]) -> str | None:
        """Why a histogram on this grid may not be summed over ``sent``, or ``None``.

        One model's histograms on two grids, merged onto a grid both refine (their greatest
        common divisor of bins: 50 for 100 and 50, 10 for 100 and 30), are the same counts:
        totals on the two grids over different sets of sites give the difference there, while
        no digest matches (the contents differ). So a histogram on another grid than one
        summed before over another set of sites is refused, whatever its content.
        """
        if held.grid is None:
            return None
        for key, sites in sorted(self.summed.items()):
            bins = grid_bins(key)
            if bins is not None and bins != held.grid and sites != sent:
                return (f"this histogram on {held.grid} bins is asked over {len(sent)} sites, "
                        f"and histograms on {bins} bins were summed before with {len(sites)} "
                        "sites: merged onto a grid both refine, one model's histograms on the "
                        "two grids would give the server the difference of the two totals "
                        f"(refused on another grid: keep evaluation.histogram_bins at {bins}, "
                        "or the same sites)")
        return None

    def _laid_out(self, request: Request, vector: str, held: _Held) -> IntArray:
        """The held parts in the server's order (``parts``, ``widths``); zeros where absent."""
        layout = [str(p) for p in json.loads(str(request.config.get("parts", "[]")))]
        widths = [int(w) for w in json.loads(str(request.config.get("widths", "[]")))]
        if len(widths) != len(layout):
            raise SecureSumError(f"site {self.site}: the masked step of {vector!r} names "
                                 f"{len(layout)} parts and {len(widths)} widths")
        chunks = []
        for part, width in zip(layout, widths, strict=True):
            value = held.parts.get(part, np.zeros(width, np.int64))
            if value.size != width:
                raise SecureSumError(f"site {self.site}: part {part!r} of {vector!r} has "
                                     f"{value.size} values, the layout says {width}")
            chunks.append(value)
        return np.concatenate(chunks or [np.zeros(0, np.int64)])

    def _advertise(self, request: Request, vector: str, held: _Held) -> Reply:
        bits = int(request.config.get("bits", DEFAULT_BITS))
        live = self.live[vector] = SecureSumSite(self.site, bits)
        keys = live.advertise()
        names = sorted(held.parts)
        doc = {"parts": names, "widths": [int(held.parts[n].size) for n in names],
               "min_cell": held.min_cell}
        return Reply(self.site, request.kind, request.round,
                     arrays={"enc": _u8(keys["enc"]), "mask": _u8(keys["mask"])},
                     documents={Doc.SECURE_SUM: pack_document(doc)})

    def export_state(self) -> dict[str, np.ndarray]:
        """The held vectors and the live sums as arrays (they never leave the site).

        Returns
        -------
        dict of str to ndarray
        """
        meta: dict[str, Any] = {}
        out: dict[str, np.ndarray] = {}
        for i, (vector, held) in enumerate(sorted(self.held.items())):
            names = sorted(held.parts)
            entry: dict[str, Any] = {"index": i, "parts": names, "refusal": held.refusal,
                                     "min_cell": held.min_cell, "once": held.once,
                                     "grid": held.grid,
                                     "widths": [int(held.parts[n].size) for n in names]}
            if names:
                out[f"{_STATE}{i}/parts"] = np.concatenate([held.parts[n] for n in names])
            live = self.live.get(vector)
            if live is not None:
                state = live.export()
                entry.update(bits=live.bits, live=sorted(state))
                out.update({f"{_STATE}{i}/live/{j}": _u8(state[k])
                            for j, k in enumerate(sorted(state))})
            meta[vector] = entry
        if meta:
            out[f"{_STATE}meta"] = _u8(json.dumps(meta).encode())
        if self.summed:
            out[f"{_STATE}summed"] = _u8(json.dumps(self.summed).encode())
        return out

    def restore_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Take back what :meth:`export_state` gave.

        Parameters
        ----------
        arrays : mapping of str to ndarray
        """
        if f"{_STATE}summed" in arrays:
            self.summed = {str(k): [str(x) for x in v] for k, v in json.loads(
                np.asarray(arrays[f"{_STATE}summed"], dtype=np.uint8).tobytes()).items()}
        if f"{_STATE}meta" not in arrays:
            return
        meta = json.loads(np.asarray(arrays[f"{_STATE}meta"], dtype=np.uint8).tobytes())
        for vector, entry in meta.items():
            i = entry["index"]
            flat = np.asarray(arrays.get(f"{_STATE}{i}/parts", np.zeros(0)), dtype=np.int64)
            ends = np.cumsum([int(w) for w in entry["widths"]]).tolist()
            parts = {n: flat[end - w:end].copy() for n, w, end in
                     zip(entry["parts"], entry["widths"], ends, strict=True)}
            grid = entry.get("grid")
            self.held[vector] = _Held(parts, entry["refusal"], int(entry["min_cell"]),
                                      bool(entry.get("once", False)),
                                      None if grid is None else int(grid))
            if "live" in entry:
                state = {k: np.asarray(arrays[f"{_STATE}{i}/live/{j}"], np.uint8).tobytes()
                         for j, k in enumerate(entry["live"])}
                self.live[vector] = SecureSumSite.restore(self.site, int(entry["bits"]), state)
