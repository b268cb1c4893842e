"""A pooled site's AUC does not give its withheld test class counts.

The attack (a red team, 2026-12-01): a site that joins the pooled secure sum withholds its
test positives, but releases its test ``n`` and its AUC (and average precision, and their
bootstrap bounds). AUC x positives x negatives is a whole number of concordant pairs, so at
full precision only ``k`` or ``n - k`` positives fit the released value; the AP settles which,
and the pooled total minus the other sites' then gives a fourth site's. The pooled form now
keeps two decimals of each rank metric (``disclosed.coarse_rank``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from multimodal_fl.evaluation.disclosed import site_disclosure

MIN_CELL = 10


def _frame(n_test: int, n_pos: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    y = np.array([1] * n_pos + [0] * (n_test - n_pos) + [1, 0] * 30)
    s = np.clip(rng.normal(0.35 + 0.3 * y, 0.15), 0.01, 0.99)
    split = ["test"] * n_test + ["train"] * 60
    return pd.DataFrame({"split": split, "label": y, "score": s,
                         "sex": np.where(np.arange(y.size) % 2 == 0, "female", "male")})


def _fits(value: float, k: int, n: int, decimals: int | None) -> bool:
    """Whether some whole number of concordant pairs (halves for ties) over ``k`` positives
    and ``n - k`` negatives gives ``value`` as released (to ``decimals``, or to 1e-9)."""
    pairs = k * (n - k)
    for twice in range(0, 2 * pairs + 1):
        auc = twice / (2 * pairs)
        if (abs(auc - value) < 1e-9 if decimals is None else round(auc, decimals) == value):
            return True
    return False


def _candidates(doc: dict, n: int) -> list[int]:
    """The adversary: every class count the released AUC fits (its bootstrap bounds are
    interpolated percentiles, not pair counts)."""
    auc = doc["splits"]["test"]["metrics"]["auc"]["value"]
    decimals = None if auc != round(auc, 2) else 2
    return [k for k in range(MIN_CELL, n - MIN_CELL + 1) if _fits(auc, k, n, decimals)]


def test_a_pooled_sites_auc_fits_almost_every_class_count() -> None:
    n, k = 84, 17
    frame = _frame(n, k, seed=0)
    full = site_disclosure(frame, site="a", min_cell=MIN_CELL, n_boot=200)  # released counts
    assert full["splits"]["test"]["n_pos"] == k
    assert _candidates(full, n) == [k, n - k]  # non-vacuity: full precision pins it
    pooled = site_disclosure(frame, site="a", min_cell=MIN_CELL, n_boot=200, pooled=True)
    assert pooled["splits"]["test"]["n_pos"] is None and pooled["splits"]["test"]["n"] == n
    candidates = _candidates(pooled, n)
    assert k in candidates and len(candidates) >= (n - 2 * MIN_CELL) // 2, candidates
    for cell in pooled["cells"]:  # the subgroups' rank metrics too
        if cell["metric"] in ("auc", "average_precision") and cell["value"] is not None:
            assert cell["value"] == round(cell["value"], 2)
    ap = pooled["splits"]["test"]["metrics"]["average_precision"]
    assert ap["value"] == round(ap["value"], 2)
