"""The OASIS-1 dementia task: YAML alone, on a tiny CSV in OASIS-1's shape (rows made up here).

The CSV goes through ``import_csv`` with the shipped mapping (``configs/mappings/oasis1.yaml``)
and the cohort is built by the shipped experiment (``configs/oasis1.yaml``) with each shipped
task file: label CDR > 0 from ``labels.csv``, CDR never a feature, MMSE only in the task that
names it, ages at the visit.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd
import pytest

from multimodal_fl.config import load_config
from multimodal_fl.data import build_cohorts
from multimodal_fl.data.csv_import import import_csv

ROOT = Path(__file__).resolve().parents[2]
MAPPING = ROOT / "configs" / "mappings" / "oasis1.yaml"
CONFIG = ROOT / "configs" / "oasis1.yaml"
HEADER = ["ID", "M/F", "Hand", "Age", "Educ", "SES", "MMSE", "CDR", "eTIV", "nWBV", "ASF",
          "Delay"]
ROWS = [
    ["OAS1_0001_MR1", "F", "R", "74", "2", "3", "29", "0", "1344", "0.743", "1.306", "N/A"],
    ["OAS1_0003_MR1", "F", "R", "73", "4", "3", "27", "0.5", "1454", "0.708", "1.207", "N/A"],
    ["OAS1_0004_MR1", "M", "R", "28", "", "", "", "", "1588", "0.803", "1.105", "N/A"],
    ["OAS1_0007_MR1", "M", "R", "81", "1", "N/A", "21", "1", "1500", "0.690", "1.170", "N/A"],
    ["OAS1_0001_MR2", "F", "R", "74", "2", "3", "29", "0", "1344", "0.743", "1.306", "10"],
]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("oasis")
    with (tmp / "oasis.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(HEADER)
        w.writerows(ROWS)
    import_csv(tmp / "oasis.csv", MAPPING, tmp / "oasis1")
    return tmp / "oasis1"


def _cohort(site: Path, task: str) -> tuple[pd.DataFrame, list[str]]:
    cfg = load_config(CONFIG, [f"sites.0.path={site}", f"task=tasks/{task}.yaml",
                               "modalities.image.enabled=false"])
    (cohort,) = build_cohorts(cfg).values()
    table = cohort.table.copy()
    table.index = [str(p).split("-")[1] for p in table["patient_id"]]
    return table, list(cohort.feature_names)


@pytest.mark.parametrize("task", ["oasis1_dementia", "oasis1_dementia_no_mmse"])
def test_labels_features_and_ages(site: Path, task: str) -> None:
    table, names = _cohort(site, task)
    assert ("mmse" in names) == (task == "oasis1_dementia")
    assert not any("cdr" in n for n in names)
    assert {"age", "sex_female", "education", "ses", "etiv", "nwbv", "asf"} <= set(names)
    labelled = table[table["label"].notna()]
    assert labelled["label"].astype(int).to_dict() == {"0001": 0, "0003": 1, "0007": 1}
    assert labelled.loc["0007", "age"] == pytest.approx(81.5, abs=0.5)
    if task == "oasis1_dementia":
        assert labelled.loc["0003", "mmse"] == 27
    assert pd.isna(labelled.loc["0007", "ses"])  # N/A is missing, not 0
