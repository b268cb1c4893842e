"""Helpers shared by the encoders: config sections, weight loading, fingerprints, missing.

Nothing here imports MONAI or transformers; both are imported lazily by the encoders
that need them so that ``import multimodal_fl.encoders`` stays fast.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

# safetensors is heavy to import: imported inside the functions that use it

logger = logging.getLogger("multimodal_fl.encoders")


def is_missing(item: Any) -> bool:
    """Whether one sample's entry means "missing": ``None``, a float NaN or ``pd.NA``/``NaT``.

    Parameters
    ----------
    item : object
        One entry (a note, a path, ...). pandas' scalar missing values (``pd.NA``, as a
        ``"string"`` column holds, and ``pd.NaT``) count like ``None``; strings, lists and
        arrays are never missing here (an empty string is the caller's decision).

    Returns
    -------
    bool
    """
    if item is None or (isinstance(item, float) and item != item):
        return True
    if type(item).__module__.split(".")[0] in ("pandas", "numpy"):  # pd.NA, NaT, np.float32
        import pandas as pd

        return bool(pd.api.types.is_scalar(item) and pd.isna(item))
    return False


@dataclass(frozen=True)
class LoadReport:
    """What happened when user weights were loaded into an encoder.

    Attributes
    ----------
    path : str
        The file the weights came from.
    loaded : tuple of str
        Keys copied into the module.
    missing : tuple of str
        Keys the module has that the file lacks (left at their initial values).
    unexpected : tuple of str
        Keys in the file that the module does not have (ignored).
    mismatched : tuple of str
        Keys present in both whose shapes differ (not loaded), as
        ``"key: file_shape != module_shape"``.
    """

    path: str
    loaded: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    mismatched: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        """True when every key matched in name and shape."""
        return not (self.missing or self.unexpected or self.mismatched)


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict from a local safetensors file or a torch checkpoint.

    Parameters
    ----------
    path : path-like
        ``*.safetensors`` (read with safetensors) or anything else (read with
        ``torch.load(weights_only=True)``). A checkpoint holding ``{"state_dict": ...}``
        or ``{"model": ...}`` is unwrapped, and a ``module.`` prefix (DataParallel) is stripped.

    Returns
    -------
    dict of str to Tensor
        The tensors by key.

    Raises
    ------
    FileNotFoundError
        When the file does not exist (nothing is ever downloaded).
    ValueError
        When the file cannot be read as weights.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"weights file {str(p)!r} does not exist; give a local .safetensors or torch "
            "state-dict file (weights are never downloaded)"
        )
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(p))
        else:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"could not read weights from {str(p)!r}: {exc}. Accepted: a safetensors file or a "
            "torch state dict saved with torch.save(module.state_dict(), path)"
        ) from exc
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, Mapping) and wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise ValueError(f"{str(p)!r} does not hold a state dict (a mapping of names to tensors)")
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()}


def load_weights_into(
    module: nn.Module, path: str | os.PathLike[str], *, strict: bool = False
) -> LoadReport:
    """Load a local weights file into ``module``, reporting what did not match.

    Parameters
    ----------
    module : nn.Module
        The module to load into.
    path : path-like
        See :func:`read_state_dict`.
    strict : bool, default False
        When True, any missing, unexpected or shape-mismatched key raises ``ValueError``
        and nothing is loaded. When False, matching keys are loaded and the others are
        reported (and logged as a warning).

    Returns
    -------
    LoadReport
        Loaded, missing, unexpected and mismatched keys.
    """
    state = read_state_dict(path)
    own = module.state_dict()
    mismatched = tuple(
        f"{k}: {tuple(v.shape)} != {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    )
    usable = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    report = LoadReport(
        path=str(path),
        loaded=tuple(sorted(usable)),
        missing=tuple(sorted(k for k in own if k not in state)),
        unexpected=tuple(sorted(k for k in state if k not in own)),
        mismatched=mismatched,
    )
    if strict and not report.ok:
        raise ValueError(
            f"weights in {str(path)!r} do not match {type(module).__name__}: "
            f"{len(report.missing)} missing (e.g. {list(report.missing[:3])}), "
            f"{len(report.unexpected)} unexpected (e.g. {list(report.unexpected[:3])}), "
            f"{len(report.mismatched)} with another shape (e.g. {list(report.mismatched[:3])}); "
            "pass strict=False to load the matching keys only"
        )
    if not usable:
        raise ValueError(
            f"no key of {str(path)!r} matches {type(module).__name__} "
            f"(file keys e.g. {list(state)[:3]}, module keys e.g. {list(own)[:3]}); "
            "was it saved from another architecture?"
        )
    module.load_state_dict(usable, strict=False)
    if not report.ok:
        logger.warning(
            "loaded %d tensors from %s into %s; %d missing %s, %d unexpected %s, "
            "%d shape-mismatched %s",
            len(report.loaded),
            path,
            type(module).__name__,
            len(report.missing),
            list(report.missing[:5]),
            len(report.unexpected),
            list(report.unexpected[:5]),
            len(report.mismatched),
            list(report.mismatched[:5]),
        )
    return report


def state_fingerprint(module: nn.Module, *extra: str) -> str:
    """Return a sha256 hex digest of a module's state dict and extra descriptions.

    Parameters
    ----------
    module : nn.Module
        Every tensor of its ``state_dict()`` (names, dtypes, shapes and bytes) enters the hash.
    *extra : str
        Further text to hash (class name, preprocessing description, ...).

    Returns
    -------
    str
        64 hex characters; equal for equal weights and descriptions.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    for e in extra:
        h.update(b"\x00" + e.encode())
    return h.hexdigest()


def section_to_kwargs(
    section: Any, *, accepted: Iterable[str], ignored: Iterable[str] = (), where: str,
    keep_none: Iterable[str] = (),
) -> dict[str, Any]:
    """Turn a config section (mapping or pydantic model) into constructor keyword arguments.

    Parameters
    ----------
    section : Mapping or object with ``model_dump()``
        The section, e.g. ``{"encoder": "densenet121", "spatial_dims": 2}``.
    accepted : iterable of str
        Keys passed on to the constructor.
    ignored : iterable of str
        Keys that belong to other layers (e.g. ``size`` for the transforms) and are dropped.
    where : str
        Name of the section, for error messages.
    keep_none : iterable of str
        Accepted keys whose ``None`` is passed on: those where the constructor gives
        ``None`` a meaning other than its default (``ImageEncoder``'s ``embed_dim=None``:
        no head). A key left out of the section still falls to the default.

    Returns
    -------
    dict
        The accepted keys with their values (``None`` values dropped, but for
        ``keep_none``).

    Raises
    ------
    ValueError
        On an unknown key, with a did-you-mean suggestion.
    """
    if hasattr(section, "model_dump"):
        data = dict(section.model_dump())
    elif isinstance(section, Mapping):
        data = dict(section)
    else:
        raise TypeError(
            f"{where}: expected a mapping or a pydantic model, got {type(section).__name__}"
        )
    acc, ign, keep = set(accepted), set(ignored), set(keep_none)
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in acc:
            if value is not None or key in keep:
                out[key] = value
        elif key not in ign:
            close = difflib.get_close_matches(key, sorted(acc | ign), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"{where}: unknown key {key!r}{hint} Accepted keys: {sorted(acc | ign)}"
            )
    return out
