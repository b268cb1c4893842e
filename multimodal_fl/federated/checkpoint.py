"""Crash-safe server checkpoints: safetensors for arrays, JSON for everything else.

Layout of a checkpoint directory::

    checkpoint.json             the commit point: round, weights file name, its SHA-256, meta
    round_00003.safetensors     "weights/<key>" (global state dict) + "optimizer/<key>" (state)

Every file is written to a temporary name in the same directory, flushed, ``fsync``-ed and
moved into place with ``os.replace`` (atomic on POSIX). The safetensors file of round k is
written first, ``checkpoint.json`` naming it second; a SIGKILL at any moment therefore leaves
either the old ``checkpoint.json`` (pointing at a complete older file) or the new one. The two
newest safetensors files are kept, older ones deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from multimodal_fl.federated.protocol import StateDict

__all__ = ["CHECKPOINT_JSON", "Checkpoint", "CheckpointError", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_JSON = "checkpoint.json"
FORMAT_VERSION = 1
_WEIGHTS = "weights/"
_OPTIMIZER = "optimizer/"
_KEEP = 2


class CheckpointError(RuntimeError):
    """A checkpoint directory is unreadable, inconsistent or does not match the run."""


@dataclass
class Checkpoint:
    """The server's state after a completed round.

    Parameters
    ----------
    round : int
        The last completed round.
    weights : dict[str, numpy.ndarray]
        The global state dict after that round.
    optimizer_state : dict[str, numpy.ndarray]
        The server optimiser's state.
    meta : dict[str, Any]
        JSON-able run state: config, history, site sizes, RNG scheme.
    """

    round: int
    weights: StateDict
    optimizer_state: StateDict = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def save_checkpoint(directory: str | os.PathLike[str], checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` atomically into ``directory`` (created if needed).

    Parameters
    ----------
    directory : path-like
        The checkpoint directory.
    checkpoint : Checkpoint
        What to save.

    Returns
    -------
    pathlib.Path
        The path of ``checkpoint.json``.
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    tensors = {_WEIGHTS + k: np.asarray(v, order="C") for k, v in checkpoint.weights.items()}
    tensors.update(
        {_OPTIMIZER + k: np.asarray(v, order="C") for k, v in checkpoint.optimizer_state.items()}
    )
    blob = st_save(tensors, metadata={"round": str(checkpoint.round)})
    name = f"round_{checkpoint.round:05d}.safetensors"
    _atomic_write(root / name, blob)
    record = {
        "format": FORMAT_VERSION,
        "round": checkpoint.round,
        "weights_file": name,
        "sha256": hashlib.sha256(blob).hexdigest(),
        "meta": checkpoint.meta,
    }
    out = root / CHECKPOINT_JSON
    _atomic_write(out, json.dumps(record, indent=1, sort_keys=True).encode())
    old = sorted(root.glob("round_*.safetensors"))
    for stale in old[:-_KEEP]:
        if stale.name != name:
            stale.unlink(missing_ok=True)
    return out


def load_checkpoint(directory: str | os.PathLike[str]) -> Checkpoint | None:
    """Read the last completed round's checkpoint from ``directory``.

    Parameters
    ----------
    directory : path-like
        The checkpoint directory.

    Returns
    -------
    Checkpoint or None
        The checkpoint, or None when the directory holds none (no round completed yet).

    Raises
    ------
    CheckpointError
        If ``checkpoint.json`` is unreadable, of another format, or its weights file is missing
        or does not match the recorded SHA-256.
    """
    root = Path(directory)
    path = root / CHECKPOINT_JSON
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint record ({exc})") from exc
    if record.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {record.get('format')!r}, "
            f"this version reads {FORMAT_VERSION}"
        )
    weights_path = root / str(record.get("weights_file"))
    try:
        blob = weights_path.read_bytes()
    except OSError as exc:
        raise CheckpointError(
            f"{path} names {weights_path.name}, which cannot be read ({exc})"
        ) from exc
    digest = hashlib.sha256(blob).hexdigest()
    if digest != record.get("sha256"):
        raise CheckpointError(
            f"{weights_path}: SHA-256 {digest} does not match {record.get('sha256')} in {path}"
        )
    tensors = st_load(blob)
    weights = {k[len(_WEIGHTS) :]: v for k, v in tensors.items() if k.startswith(_WEIGHTS)}
    state = {k[len(_OPTIMIZER) :]: v for k, v in tensors.items() if k.startswith(_OPTIMIZER)}
    return Checkpoint(
        round=int(record["round"]), weights=weights, optimizer_state=state, meta=record["meta"]
    )
