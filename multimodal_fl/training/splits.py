"""Patient splits: every patient of a site to ``train``, ``val`` or ``test``.

The assignment comes from a hash of (seed, site, patient id), stratified by label, so the
local, centralized and federated engines all get the same split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from multimodal_fl.config import SplitConfig

__all__ = ["SPLITS", "split_patients"]

#: Split names, in order.
SPLITS: tuple[str, ...] = ("train", "val", "test")


def _fractions(fractions: Any) -> tuple[float, float, float]:
    if hasattr(fractions, "train") and hasattr(fractions, "val") and hasattr(fractions, "test"):
        f = (float(fractions.train), float(fractions.val), float(fractions.test))
    elif isinstance(fractions, Mapping):
        try:
            f = (float(fractions["train"]), float(fractions["val"]), float(fractions["test"]))
        except KeyError as exc:
            raise ValueError(
                f"split fractions need keys train, val and test; got {sorted(fractions)}"
            ) from exc
    else:
        seq = list(fractions)
        if len(seq) != 3:
            raise ValueError(f"split fractions must be (train, val, test), got {fractions!r}")
        f = (float(seq[0]), float(seq[1]), float(seq[2]))
    if any(x < 0 for x in f) or f[0] <= 0 or abs(sum(f) - 1.0) > 1e-6:
        raise ValueError(
            f"split fractions (train, val, test) = {f} must be non-negative, train > 0, "
            "and sum to 1"
        )
    return f


def _hash_uniform(seed: int, site: str, patient_id: str) -> float:
    digest = hashlib.sha256(f"mmfl-split|{seed}|{site}|{patient_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_patients(
    patient_ids: Sequence[str],
    labels: Sequence[int] | np.ndarray,
    *,
    seed: int,
    site: str,
    fractions: SplitConfig | Mapping[str, float] | Sequence[float],
) -> dict[str, str]:
    """Assign each patient of one site to ``train``, ``val`` or ``test``, stratified by label.

    Every patient gets a uniform number from ``sha256(seed, site, patient_id)``. Within each
    label class, patients are ranked by that number; the first ``round(n * test)`` go to
    test, the next ``round(n * val)`` to val and the rest to train. A class with at least
    3 patients puts at least one in each split with a positive fraction, so validation and
    test AUC are defined whenever the site has 3 patients of each class. The assignment
    depends only on the seed, the site name, the patient ids and their labels -- not on the
    order of the cohort -- so every engine gets the same split.

    Parameters
    ----------
    patient_ids : sequence of str
        Unique patient ids of one site.
    labels : sequence of int
        0/1 labels, same order.
    seed : int
        Experiment seed.
    site : str
        Site name.
    fractions : SplitConfig, mapping or (train, val, test)
        Fractions summing to 1.

    Returns
    -------
    dict of str to str
        ``{patient_id: "train" | "val" | "test"}``.
    """
    ids = [str(p) for p in patient_ids]
    y = np.asarray(labels)
    if y.shape != (len(ids),):
        raise ValueError(f"site {site!r}: {len(ids)} patient ids but labels of shape {y.shape}")
    if len(set(ids)) != len(ids):
        dupes = sorted({p for p in ids if ids.count(p) > 1})[:5]
        raise ValueError(f"site {site!r}: patient ids must be unique; repeated: {dupes}")
    bad = ~np.isin(y, (0, 1))
    if bad.any():
        raise ValueError(
            f"site {site!r}: labels must be 0 or 1; patient {ids[int(np.argmax(bad))]!r} has "
            f"{y[bad][0]!r}"
        )
    _, f_val, f_test = _fractions(fractions)
    out: dict[str, str] = {}
    for cls in (0, 1):
        members = [p for p, lab in zip(ids, y.tolist(), strict=True) if int(lab) == cls]
        members.sort(key=lambda p: (_hash_uniform(seed, site, p), p))
        n = len(members)
        n_test = round(n * f_test)
        n_val = round(n * f_val)
        if n >= 3:
            n_test = max(n_test, 1 if f_test > 0 else 0)
            n_val = max(n_val, 1 if f_val > 0 else 0)
        while n_test + n_val >= n and n > 0 and (n_test + n_val) > 0:
            # keep at least one training patient per class
            if n_val >= n_test and n_val > 0:
                n_val -= 1
            else:
                n_test -= 1
            if n_test + n_val < n:
                break
        for i, p in enumerate(members):
            out[p] = "test" if i < n_test else ("val" if i < n_test + n_val else "train")
    return out
