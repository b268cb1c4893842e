"""Synthetic predictions for the evaluation tests (seeded numpy, no files)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest


def make_predictions(
    seed: int = 0,
    sites: tuple[tuple[str, int, float], ...] = (("a", 400, 1.6), ("b", 300, 1.2), ("c", 60, 0.8)),
    prevalence: float = 0.3,
) -> pd.DataFrame:
    """Patient-level predictions: per site (name, patients, separation of the score logits)."""
    rng = np.random.default_rng(seed)
    frames = []
    for site, n, sep in sites:
        y = (rng.random(n) < prevalence).astype(int)
        s = 1.0 / (1.0 + np.exp(-rng.normal(-1.0 + sep * y, 1.0)))
        frames.append(
            pd.DataFrame(
                {
                    "patient_id": [f"{site}-{i}" for i in range(n)],
                    "site": site,
                    "split": rng.choice(["train", "val", "test"], n, p=[0.5, 0.2, 0.3]),
                    "label": y,
                    "score": s,
                    "sex": rng.choice(["F", "M"], n),
                    "age_band": rng.choice(["<50", "50-70", "70+"], n, p=[0.3, 0.6, 0.1]),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


@pytest.fixture
def predictions() -> pd.DataFrame:
    """Three sites, one small (c: 60 patients, ~18 in test)."""
    return make_predictions()
