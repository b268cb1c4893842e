"""Synthetic predictions for the evaluation tests (seeded numpy, no files)."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

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


def write_run_dir(
    root: os.PathLike[str] | str,
    engine: str,
    *,
    seed: int = 0,
    noise: float = 0.2,
    n_boot: int = 50,
    sites: tuple[tuple[str, int, float], ...] = (("a", 400, 1.6), ("b", 300, 1.4), ("c", 60, 1.2)),
) -> Path:
    """A run directory in the layout `mmfl train` writes.

    Config, metrics (with the histogram-pooled test figures), each site's predictions (its own
    audit, never read by the report) and each site's disclosed document, made from them as a
    site makes it. The same patients (same seed) in every engine's run; ``noise`` perturbs the
    scores so engines differ. The local engine's small site gets extra noise (it learns least
    alone).
    """

    import json
    import statistics

    import yaml

    from multimodal_fl.evaluation.disclosed import site_disclosure
    from multimodal_fl.evaluation.histograms import pooled_evaluation, summarise_site

    base = make_predictions(seed, sites=sites)
    rng = np.random.default_rng(zlib.crc32(engine.encode()))
    run = Path(root) / f"cfg-{engine}"
    run.mkdir(parents=True)
    cfg = {"name": "cfg", "seed": seed, "federated": {"engine": engine},
           "evaluation": {"sensitive": ["sex", "age_band"], "min_cell": 10, "n_boot": n_boot,
                          "histogram_bins": 100, "threshold": "youden"}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "disclosed").mkdir()
    summaries, thresholds = [], []
    for site, d in base.groupby("site"):
        extra = 0.25 if (engine == "local" and site == "c") else 0.0
        logit = np.log(d.score / (1 - d.score)) + rng.normal(0, noise + extra, len(d))
        out = d.drop(columns=["site"]).assign(score=1 / (1 + np.exp(-logit)))
        (run / "sites" / str(site)).mkdir(parents=True)
        out.to_csv(run / "sites" / str(site) / "predictions.csv", index=False)
        doc = site_disclosure(out, site=str(site), min_cell=10, n_boot=n_boot, seed=seed)
        (run / "disclosed" / f"{site}.json").write_text(json.dumps(doc))
        thresholds.append(doc["threshold"])
        test = out[out.split == "test"]
        summaries.append((str(site), test))
    # as the engines pool: the federated sites send no threshold, local-only runs have one
    # per site, the centralized model one (the sites' median)
    common = statistics.median(thresholds) if engine == "centralized" else None
    pooled = pooled_evaluation([
        summarise_site(s, t.label.to_numpy(), t.score.to_numpy(), groups=t[["sex", "age_band"]],
                       threshold=common, min_cell=10, n_boot=0, seed=seed)
        for s, t in summaries]).to_dict()
    metrics: dict = {"engine": engine, "config": "cfg", "pooled_from_histograms": pooled}
    if engine in ("inprocess", "flower"):
        metrics["rounds"] = [
            {"round": r, "train_loss": 0.7 - 0.02 * r,
             "eval_metrics": {s: {"val_auc": 0.6 + 0.01 * r, "loss": 0.5} for s in "abc"}}
            for r in range(1, 11)
        ]
    else:
        names = ["a", "b", "c"] if engine == "local" else ["centralized"]
        metrics["history"] = {
            n: [{"step": 10 * k, "train_loss": 0.7 - 0.01 * k, "val_auc": 0.6 + 0.02 * k}
                for k in range(1, 8)]
            for n in names
        }
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def redisclose(run: Path, site: str, frame: pd.DataFrame, *, n_boot: int = 50) -> None:
    """Rewrite one site's predictions and its disclosed document, as the site would make them."""
    import json

    from multimodal_fl.evaluation.disclosed import site_disclosure

    frame.to_csv(run / "sites" / site / "predictions.csv", index=False)
    doc = site_disclosure(frame, site=site, min_cell=10, n_boot=n_boot)
    (run / "disclosed" / f"{site}.json").write_text(json.dumps(doc))
