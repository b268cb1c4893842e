"""The local engine scores every site's model on every other site (EXAM's cross-site matrix)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

from multimodal_fl.config import load_config
from multimodal_fl.engines.baselines import run_local
from multimodal_fl.evaluation.report import build_report


def test_local_run_writes_cross_site_predictions_and_the_report_uses_them(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    cfg = load_config(tiny_config("covid_oxygen"))
    run = run_local(cfg, tmp_path / "local").run_dir
    names = sorted(s.name for s in cfg.sites)
    for site in names:
        cross = pd.read_csv(run / "sites" / site / "cross_predictions.csv")
        own = pd.read_csv(run / "sites" / site / "predictions.csv")
        assert set(cross["model"]) == {f"local:{o}" for o in names if o != site}
        assert set(cross["split"]) == {"test"}
        test_ids = set(own.loc[own["split"] == "test", "patient_id"].astype(str))
        for _, part in cross.groupby("model"):
            assert set(part["patient_id"].astype(str)) == test_ids
        assert cross["score"].between(0, 1).all()
    doc, _, _ = build_report([run])
    pairs = {(r["model"], r["test_site"]) for r in doc["cross_site"]["cells"]}
    # every local model on every site: the full matrix, not only its diagonal
    assert {(f"local:{m}", t) for m in names for t in names} <= pairs
