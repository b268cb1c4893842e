"""Cohorts from the shared Synthea bundles (skipped when ../shared/data is absent).

COVID-19: the shipped covid_oxygen_24h task; oxygen prevalence in range; no feature after
the index; the leakage check of issue 2 (missingness alone is no better than age with the
default allowance; a 48 h allowance reproduces the leak).

Alzheimer's: the shipped task, reference date 2020-01-01: the bundles' onsets of Alzheimer's
disease run from 1970 to 2020 and the records of living patients run into 2020-2021, so on
2020-01-01 the living patients are still followed and most prevalent cases are diagnosed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score

from multimodal_fl.config import TaskSpec, load_task
from multimodal_fl.data import SiteCohort, build_cohort

pytestmark = pytest.mark.shared_data


def _with_allowance(task: TaskSpec, hours: float) -> TaskSpec:
    return task.model_copy(update={"index": task.index.model_copy(
        update={"allowance_hours": hours})})


@pytest.fixture(scope="module")
def covid(synthea_covid_site: Path) -> SiteCohort:
    return build_cohort(synthea_covid_site, load_task("covid_oxygen_24h"))


def _cv_auc(X: np.ndarray, y: np.ndarray) -> float:
    cv = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
    scores = cross_val_score(LogisticRegression(max_iter=1000), X, y, cv=cv,
                             scoring="roc_auc")
    return float(scores.mean())


def test_covid_cohort_counts(covid: SiteCohort) -> None:
    t = covid.table
    assert covid.counts["patients_read"] > len(t) >= 150  # 267 bundles, 196 with COVID-19
    prevalence = t["label"].mean()
    assert 0.12 <= prevalence <= 0.30
    assert covid.counts["resources_validated"] < covid.counts["resources_read"] / 10
    assert t["has_tabular"].all() and not t["has_image"].any()


def test_covid_no_feature_after_index(covid: SiteCohort) -> None:
    t = covid.table
    assert t["max_feature_time"].notna().all()
    assert (t["max_feature_time"] <= t["index_time"]).all()  # default allowance 0


def test_covid_task_cannot_leak(covid: SiteCohort, synthea_covid_site: Path) -> None:
    t = covid.table
    y = t["label"].to_numpy()
    missing = [c for c in covid.feature_names if c.startswith("missing_")]
    auc_age = _cv_auc(t[["age"]].to_numpy(), y)
    auc_missing = _cv_auc(t[missing].to_numpy(), y)
    assert auc_missing <= auc_age + 0.05, (auc_missing, auc_age)
    # negative control: features reaching 48 h into the admission, same labels
    task48 = _with_allowance(load_task("covid_oxygen_24h"), 48.0)
    late = build_cohort(synthea_covid_site, task48.model_copy(update={
        "label": task48.label.model_copy(update={"exclude_prior_events": False})})).table
    joined = t[["patient_id", "label"]].merge(late[["patient_id", *missing]], on="patient_id")
    assert len(joined) == len(t)
    assert _cv_auc(joined[missing].to_numpy(), joined["label"].to_numpy()) > 0.95


def test_alzheimers_cohort(synthea_alzheimers_site: Path) -> None:
    cohort = build_cohort(synthea_alzheimers_site, load_task("alzheimers"))
    t = cohort.table
    assert 40 <= len(t) <= 108 and 3 <= t["label"].sum() <= len(t) / 2
    assert (t["age"] >= 50).all()
    index = pd.Timestamp("2020-01-01", tz="UTC")
    assert (t["index_time"] == index).all() and (t["max_feature_time"] <= index).all()
    assert cohort.counts["excluded_by_reason"].get("died_before_index", 0) > 0
    # the older Synthea blood-pressure panels carry no unit: reported, never guessed
    assert set(cohort.counts["skipped_by_reason"]) <= {"unknown_unit"}
    assert t["hypertension"].sum() > 0
