"""On-disk embedding cache for frozen encoders, per site, keyed by content and encoder fingerprint.

Layout (``<folder>`` is ``sha256(fingerprint)[:32]``, see :func:`cache_folder_name`)::

    <root>/<site>/<folder>/fingerprint.json     full fingerprint + description
    <root>/<site>/<folder>/shard-*.npz           keys (sha256 hex) + float32 rows

(``site=None``: ``root`` is the site's own cache folder, ``<root>/<folder>/``.) Folders
written by earlier versions, named ``fingerprint[:16]``, are still read when their
``fingerprint.json`` holds the same (64-hex-digit) fingerprint. Shards are read only from a
folder whose ``fingerprint.json`` holds the cache's own fingerprint.

An item's key is the sha256 of its content: the file's bytes for an image path
(:class:`pathlib.Path`), the text for a note (``str``). The encoder fingerprint hashes the
weights and the preprocessing description (see ``ImageEncoder.fingerprint`` and
``TextEncoder.fingerprint``), so changed weights or transforms land in a new folder and
everything is recomputed. Each :meth:`EmbeddingCache.get_or_compute` call that computes
something writes one shard (atomically), so ~1000 items take a handful of files.

The cache holds patient-derived data: keep it at the site (under the run's
``sites/<site>/`` folder or the user cache folder), never inside ``sample_data/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from multimodal_fl.encoders._common import is_missing

__all__ = [
    "EmbeddingCache",
    "cache_folder_name",
    "clear_file_hashes",
    "content_key",
    "default_cache_root",
]

_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def clear_file_hashes() -> None:
    """Forget the file digests remembered in this process.

    :func:`content_key` remembers each file's sha256 by (resolved path, mtime, size), so a
    file is read once per process. Clearing makes the next lookups read and hash the files
    again (a benchmark's cold pass).
    """
    _FILE_HASHES.clear()


def default_cache_root() -> Path:
    """Cache root: ``$MMFL_CACHE``, else ``$XDG_CACHE_HOME/multimodal_fl`` or ``~/.cache/...``."""
    env = os.environ.get("MMFL_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "multimodal_fl"


def cache_folder_name(fingerprint: str) -> str:
    """Name of a fingerprint's cache folder: the first 32 hex digits of its sha256.

    Distinct fingerprints get distinct folders (a shared prefix does not matter).

    Parameters
    ----------
    fingerprint : str
        The encoder fingerprint.

    Returns
    -------
    str
        32 hex characters.
    """
    return hashlib.sha256(b"fingerprint:" + fingerprint.encode("utf-8")).hexdigest()[:32]


def _stored_fingerprint(folder: Path) -> str | None:
    """The fingerprint in ``folder/fingerprint.json``; ``None`` when there is none."""
    meta = folder / "fingerprint.json"
    if not meta.is_file():
        return None
    stored = json.loads(meta.read_text()).get("fingerprint")
    return stored if isinstance(stored, str) else None


def _is_hex_digest(fingerprint: str) -> bool:
    return len(fingerprint) == 64 and all(c in "0123456789abcdef" for c in fingerprint)


def _file_sha256(path: Path) -> str:
    st = path.stat()
    memo = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    digest = _FILE_HASHES.get(memo)
    if digest is None:
        h = hashlib.sha256(b"file:")
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        digest = h.hexdigest()
        _FILE_HASHES[memo] = digest
    return digest


def content_key(item: Any) -> str:
    """sha256 hex key of an item's content.

    Parameters
    ----------
    item : Path, str, bytes, list of str or None
        A :class:`pathlib.Path` (or other ``os.PathLike``) is hashed by its file's bytes
        (a folder, e.g. a DICOM series, by its files' names and bytes); a ``str`` is hashed
        as text (an image path given as ``str`` is *text*: wrap it in ``Path``); ``bytes``
        as is; a list/tuple (several notes) by its elements; ``None`` (or NaN, ``pd.NA``)
        as "missing".

    Returns
    -------
    str
        64 hex characters.
    """
    if isinstance(item, os.PathLike):
        p = Path(item)
        if p.is_dir():
            h = hashlib.sha256(b"dir:")
            for f in sorted(x for x in p.rglob("*") if x.is_file()):
                h.update(str(f.relative_to(p)).encode() + b"\x00" + _file_sha256(f).encode())
            return h.hexdigest()
        if not p.is_file():
            raise FileNotFoundError(f"cannot hash {str(p)!r}: file does not exist")
        return _file_sha256(p)
    if isinstance(item, str):
        return hashlib.sha256(b"text:" + item.encode("utf-8")).hexdigest()
    if isinstance(item, bytes | bytearray | memoryview):
        return hashlib.sha256(b"bytes:" + bytes(item)).hexdigest()
    if is_missing(item):
        return hashlib.sha256(b"missing").hexdigest()
    if isinstance(item, Sequence | np.ndarray):
        h = hashlib.sha256(b"seq:")
        for sub in item:
            h.update(content_key(sub).encode())
        return h.hexdigest()
    raise TypeError(
        f"cannot build a cache key for {type(item).__name__}; accepted: Path (file content), "
        "str (text), bytes, a list of those, or None"
    )


class EmbeddingCache:
    """Embeddings of one frozen encoder at one site, computed once and read from disk after.

    Parameters
    ----------
    root : path-like or None
        Cache root; ``None`` uses :func:`default_cache_root`. A root inside a folder
        named ``sample_data`` is refused.
    fingerprint : str
        The encoder fingerprint (weights + preprocessing), e.g. ``encoder.fingerprint(desc)``.
    site : str or None, default "default"
        Site name (one sub-folder per site); ``None``: ``root`` is already this site's own
        cache folder (e.g. ``RUN_DIR/sites/<site>/cache``).
    description : str, default ""
        Human-readable description stored beside the shards.

    Attributes
    ----------
    directory : Path
        ``root/site/<folder>`` (``root/<folder>`` with ``site=None``), ``<folder>`` being
        :func:`cache_folder_name` of the fingerprint, or ``fingerprint[:16]`` for a folder
        an earlier version wrote for the same 64-hex-digit fingerprint.
    hits : int
        Items whose row was already cached when asked for, since construction.
    misses : int
        Distinct items computed, since construction (an item repeated in one call counts
        once).

    Examples
    --------
    >>> import numpy as np, tempfile
    >>> cache = EmbeddingCache(tempfile.mkdtemp(), fingerprint="f" * 64, site="a")
    >>> cache.get_or_compute(["x", "y"], lambda items: np.ones((len(items), 2))).shape
    (2, 2)
    >>> cache.get_or_compute(["x"], lambda items: np.zeros((len(items), 2)))[0].tolist()
    [1.0, 1.0]
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        fingerprint: str,
        site: str | None = "default",
        description: str = "",
    ) -> None:
        root_path = Path(root) if root is not None else default_cache_root()
        resolved = root_path.expanduser().resolve()
        if "sample_data" in resolved.parts:
            raise ValueError(
                f"embedding cache root {str(root_path)!r} is inside a 'sample_data' folder; "
                "caches hold derived patient data: use the run folder or ~/.cache/multimodal_fl "
                "($MMFL_CACHE)"
            )
        if not fingerprint or any(c in fingerprint for c in "/\\.") or len(fingerprint) < 16:
            raise ValueError(
                f"fingerprint must be a hex digest of at least 16 characters, got {fingerprint!r}"
            )
        if site is not None and (not site or any(c in site for c in "/\\")
                                 or site in (".", "..")):
            raise ValueError(f"site must be a plain folder name or None, got {site!r}")
        self.root = resolved
        self.site = site
        self.fingerprint = fingerprint
        self.description = description
        base = resolved if site is None else resolved / site
        legacy = base / fingerprint[:16]
        if _is_hex_digest(fingerprint) and _stored_fingerprint(legacy) == fingerprint:
            self.directory = legacy  # written by a version that named folders fingerprint[:16]
        else:
            self.directory = base / cache_folder_name(fingerprint)
        self.hits = 0
        self.misses = 0
        self._index: dict[str, np.ndarray] = {}
        self._seen_shards: set[str] = set()
        self._dim: int | None = None
        self._verified = False

    def _verify_owner(self) -> bool:
        """Check the folder's ``fingerprint.json`` is this cache's; ``False`` when absent.

        Raises
        ------
        ValueError
            The folder belongs to another fingerprint (its shards are never read).
        """
        if self._verified:
            return True
        meta = self.directory / "fingerprint.json"
        if not meta.is_file():
            return False
        stored = _stored_fingerprint(self.directory)
        if stored != self.fingerprint:
            raise ValueError(
                f"cache folder {str(self.directory)!r} belongs to fingerprint {stored!r}, "
                f"not {self.fingerprint!r}; remove the folder"
            )
        self._verified = True
        return True

    def _check_directory(self) -> None:
        meta = self.directory / "fingerprint.json"
        if not self._verify_owner():
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = meta.with_suffix(f".{uuid.uuid4().hex}.tmp")
            tmp.write_text(
                json.dumps({"fingerprint": self.fingerprint, "description": self.description})
            )
            os.replace(tmp, meta)
            self._verified = True

    def _load_new_shards(self) -> None:
        if not self._verify_owner():
            return  # no folder, or no fingerprint.json: no shard of this fingerprint
        for shard in sorted(self.directory.glob("shard-*.npz")):
            if shard.name in self._seen_shards:
                continue
            with np.load(shard, allow_pickle=False) as data:
                keys, emb = data["keys"], data["emb"]
            for k, row in zip(keys.tolist(), emb, strict=True):
                self._index[k] = row
            if emb.ndim == 2 and self._dim is None:
                self._dim = int(emb.shape[1])
            self._seen_shards.add(shard.name)

    def __len__(self) -> int:
        """Number of cached items (on disk, as far as loaded)."""
        self._load_new_shards()
        return len(self._index)

    def get_or_compute(
        self,
        items: Sequence[Any],
        compute_fn: Callable[[list[Any]], np.ndarray | torch.Tensor],
        *,
        keys: Sequence[str] | None = None,
    ) -> np.ndarray:
        """Return one embedding row per item, computing (and storing) only the missing ones.

        Parameters
        ----------
        items : sequence
            Items to embed (see :func:`content_key` for how each is keyed).
        compute_fn : callable
            ``compute_fn(list_of_missing_items) -> array [n_missing, dim]``, called at most
            once, with each distinct missing item once, in first-seen order.
        keys : sequence of str or None
            Precomputed content keys (one per item); default :func:`content_key`.

        Returns
        -------
        ndarray float32 [len(items), dim]
        """
        item_list = list(items)
        key_list = list(keys) if keys is not None else [content_key(it) for it in item_list]
        if len(key_list) != len(item_list):
            raise ValueError(f"got {len(key_list)} keys for {len(item_list)} items")
        if not self._index or any(k not in self._index for k in key_list):
            self._load_new_shards()
        todo: dict[str, Any] = {}
        for k, it in zip(key_list, item_list, strict=True):
            if k not in self._index and k not in todo:
                todo[k] = it
        self.hits += sum(k in self._index for k in key_list)
        self.misses += len(todo)
        if todo:
            raw = compute_fn(list(todo.values()))
            arr = raw.detach().cpu().numpy() if isinstance(raw, torch.Tensor) else np.asarray(raw)
            arr = arr.astype(np.float32, copy=False)
            if arr.ndim != 2 or arr.shape[0] != len(todo):
                raise ValueError(
                    f"compute_fn returned shape {arr.shape} for {len(todo)} items; "
                    "expected [n_items, dim]"
                )
            if self._dim is not None and arr.shape[1] != self._dim:
                raise ValueError(
                    f"compute_fn returned dim {arr.shape[1]} but the cache holds dim {self._dim}"
                )
            self._dim = int(arr.shape[1])
            self._write_shard(list(todo), arr)
            for k, row in zip(todo, arr, strict=True):
                self._index[k] = row
        if not key_list:
            return np.zeros((0, self._dim or 0), dtype=np.float32)
        return np.stack([self._index[k] for k in key_list]).astype(np.float32, copy=False)

    def _write_shard(self, keys: list[str], emb: np.ndarray) -> None:
        self._check_directory()
        name = f"shard-{uuid.uuid4().hex}.npz"
        tmp = self.directory / f".{name}.tmp"
        with tmp.open("wb") as fh:
            np.savez(fh, keys=np.asarray(keys, dtype="<U64"), emb=emb)
        os.replace(tmp, self.directory / name)
        self._seen_shards.add(name)

    def clear(self) -> None:
        """Delete this fingerprint's shards (other fingerprints and sites are kept)."""
        if self.directory.is_dir():
            for f in self.directory.iterdir():
                f.unlink()
            self.directory.rmdir()
        self._verified = False
        self._index.clear()
        self._seen_shards.clear()
        self._dim = None
