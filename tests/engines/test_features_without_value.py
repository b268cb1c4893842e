"""The federated engine names a task feature that a site's moments show without a value."""

from __future__ import annotations

import numpy as np

from multimodal_fl.config import ExperimentConfig
from multimodal_fl.data.tasks import feature_names
from multimodal_fl.engines.federated import features_without_value
from multimodal_fl.federated.protocol import Kind, Reply


def _cfg() -> ExperimentConfig:
    return ExperimentConfig.model_validate({
        "task": {"name": "dm", "index": {"kind": "first_encounter", "encounter_class": ["IMP"]},
                 "features": {"observations": [
                     {"name": "hba1c", "codes": ["4548-4"], "unit": "%"},
                     {"name": "insulin", "codes": ["on-insulin"], "unit": "1"}],
                     "conditions": [{"name": "ckd", "codes": ["709044004"]}],
                     "medications": [{"name": "metformin", "codes": ["6809"]}]},
                 "label": {"kind": "labels_csv"}},
        "sites": [{"name": "a", "path": "a"}, {"name": "b", "path": "b"}]})


def _reply(site: str, columns: list[str], n: dict[str, int], sums: dict[str, float]) -> Reply:
    return Reply(site=site, kind=Kind.MOMENTS, round=0, n_samples=40, arrays={
        "n": np.array([n.get(c, 40) for c in columns], dtype=np.float64),
        "sum": np.array([sums.get(c, 7.0) for c in columns], dtype=np.float64),
        "sumsq": np.ones(len(columns))})


def test_features_without_value_from_the_sites_moments() -> None:
    """An all-missing observation (count 0: none, or fewer than min_cell, which the gate
    sends as unseen) and a never-recorded comorbidity (sum 0) trained silently."""
    cfg = _cfg()
    columns = feature_names(cfg.task)
    assert columns == ["age", "sex_female", "hba1c", "insulin", "missing_hba1c",
                       "missing_insulin", "ckd", "metformin"]
    replies = {"b": _reply("b", columns, {"insulin": 0}, {"insulin": 0.0, "ckd": 0.0}),
               "a": _reply("a", columns, {"insulin": 0}, {"insulin": 0.0, "missing_hba1c": 0.0,
                                                          "metformin": 0.0})}
    assert features_without_value(cfg, replies) == {"insulin": ["a", "b"], "metformin": ["a"],
                                                    "ckd": ["b"]}
    # a demographic or a missing indicator of sum 0 is a value, not a feature without one
    assert features_without_value(cfg, {"a": _reply("a", columns, {}, {})}) == {}
