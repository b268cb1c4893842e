"""What a site keeps across runs: its privacy accountant and the sums it has helped unmask.

A site's disclosure rules see one message; two of them see one run (the privacy ledger in the
run's ``sites/<site>/privacy.json``, the secure-sum record in the site's state for the run).
A hospital whose policy names a ``state_dir`` (:class:`~multimodal_fl.config.SitePolicy`)
makes both span every run that uses that policy:

* ``privacy.json``: the DP-SGD accountant (:class:`~multimodal_fl.training.privacy.
  PrivacyLedger`), so ``max_epsilon`` is a budget of the site's patients, not of one run;
* ``secure_sums.json``: per site, the content digest of every vector it has helped unmask (and
  of each non-zero part of a histogram vector, ``part:<digest>``) with the sites summed, so no
  second run gets a total of the same content over another set of sites (two totals whose
  difference is one site's vector).

Both are read and written under one lock (``state.lock``, the ``filelock`` package), so runs
that overlap in time at one site see each other's spending and sums: a private fit holds it
from its budget check to its saved spending, an unmask step from its check to its record.

The files hold no patient data: the accountant's noise multipliers, sampling rates and step
counts, and SHA-256 digests of integer vectors with site names.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

__all__ = ["GRID", "LOCK_FILE", "PART", "SECURE_SUMS", "STATE_PRIVACY", "SiteState",
           "SiteStateError", "grid_bins", "grid_key"]

#: The lock every reader and writer of a state directory takes.
LOCK_FILE = "state.lock"
#: The privacy accountant kept across runs.
STATE_PRIVACY = "privacy.json"
#: Per site: content digest (and :func:`grid_key` records) -> the sorted sites of the sum.
SECURE_SUMS = "secure_sums.json"
#: The prefix of a histogram part's digest (beside its whole vector's).
PART = "part:"
#: The prefix of a record of the grid histograms were summed on (``grid:<bins>:<sites>``).
GRID = "grid:"


def grid_key(bins: int, sites: list[str]) -> str:
    """The record of a histogram sum on ``bins`` bins over ``sites`` (sorted)."""
    return f"{GRID}{int(bins)}:{','.join(sites)}"


def grid_bins(key: str) -> int | None:
    """The bins of a :func:`grid_key` record; ``None`` for any other key."""
    return int(key[len(GRID):].partition(":")[0]) if key.startswith(GRID) else None


class SiteStateError(RuntimeError):
    """A state directory that cannot be locked, read or written (one line naming it)."""


class SiteState:
    """A site's state directory (see the module docstring).

    Parameters
    ----------
    root : path-like
        The directory (created on first write).
    site : str
        The site's name (its entries in ``secure_sums.json``).
    timeout : float
        Seconds to wait for another run's lock before giving up.
    writable : bool
        ``False``: read only (``mmfl site check``: what a request would meet, nothing
        spent or recorded); :meth:`locked` takes no lock and :meth:`record_sums` writes
        nothing.
    """

    def __init__(self, root: str | os.PathLike[str], site: str, *, timeout: float = 600.0,
                 writable: bool = True) -> None:
        self.root = Path(root)
        self.site = site
        self.timeout = float(timeout)
        self.writable = bool(writable)
        self._lock: FileLock | None = None

    @property
    def privacy_path(self) -> Path:
        """The privacy accountant's file."""
        return self.root / STATE_PRIVACY

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the directory's lock (re-entrant within this object).

        Raises
        ------
        SiteStateError
            When the directory cannot be made or another run holds the lock past ``timeout``.
        """
        if not self.writable:  # nothing will be written: the files are read as they are
            yield
            return
        if self._lock is None:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise SiteStateError(f"site {self.site}: its policy's state_dir {self.root} "
                                     f"cannot be created ({exc.strerror})") from None
            self._lock = FileLock(self.root / LOCK_FILE)
        try:
            with self._lock.acquire(timeout=self.timeout):
                yield
        except Timeout:
            raise SiteStateError(f"site {self.site}: its state_dir {self.root} stayed locked "
                                 f"by another run for {self.timeout:g} s") from None

    def sums(self) -> dict[str, list[str]]:
        """This site's recorded sums: content digest -> the sites summed.

        Returns
        -------
        dict of str to list of str
        """
        return {k: [str(s) for s in v] for k, v in self._sums_doc().get(self.site, {}).items()}

    def record_sums(self, sums: dict[str, list[str]]) -> None:
        """Write this site's sums (the caller holds :meth:`locked` and read them first).

        Parameters
        ----------
        sums : dict of str to list of str
        """
        if not self.writable:
            return
        doc = self._sums_doc()
        doc[self.site] = {k: sorted(v) for k, v in sorted(sums.items())}
        path = self.root / SECURE_SUMS
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, path)

    def summary(self) -> dict[str, Any]:
        """What the directory holds, for the hospital (``mmfl site check``): no lock taken.

        Returns
        -------
        dict
            ``dir``; ``private_fits`` (counted training calls of every run), ``epsilon`` and
            ``delta`` after the last one (None before any), ``accountant``; ``secure_sums``
            (vectors this site helped unmask; their parts' digests and grids not counted);
            ``grids`` (the bins of the grids its histograms were summed on).

        Raises
        ------
        SiteStateError
            For a file that is not what it should be (one line naming it).
        """
        sums = self.sums()
        out: dict[str, Any] = {
            "dir": str(self.root), "private_fits": 0, "epsilon": None, "delta": None,
            "accountant": None, "secure_sums": sum(not k.startswith((PART, GRID)) for k in sums),
            "grids": sorted({b for b in map(grid_bins, sums) if b is not None})}
        if self.privacy_path.is_file():
            try:
                doc = json.loads(self.privacy_path.read_text())
                fits = list(doc.get("fits", []))
                out.update(private_fits=len(fits), accountant=str(doc["mechanism"]))
                if fits:
                    out.update(epsilon=float(fits[-1]["epsilon"]),
                               delta=float(fits[-1]["delta"]))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise SiteStateError(f"{self.privacy_path}: not a privacy ledger "
                                     f"({type(exc).__name__}: {exc})") from None
        return out

    def _sums_doc(self) -> dict[str, dict[str, list[str]]]:
        path = self.root / SECURE_SUMS
        if not path.is_file():
            return {}
        try:
            doc = json.loads(path.read_text())
            if not isinstance(doc, dict) or not all(isinstance(v, dict) for v in doc.values()):
                raise ValueError("expected an object of sites, each an object of digests")
        except ValueError as exc:
            raise SiteStateError(f"{path}: not a secure-sum record ({exc}); the site refuses "
                                 "to unmask without it rather than forget its sums") from None
        return doc
