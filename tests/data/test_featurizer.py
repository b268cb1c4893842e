"""FHIRFeaturizer: scikit-learn compatibility and use in a pipeline."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.pipeline import make_pipeline
from sklearn.utils.estimator_checks import parametrize_with_checks

from multimodal_fl.data import build_cohort
from multimodal_fl.data.featurizer import FHIRFeaturizer
from tests.data import factory as f

_NOT_ARRAYS = ("input is FHIR data (site directories, files, Bundle dicts), not a numeric "
               "array; numeric-array checks cannot apply")
EXPECTED_FAILED = {
    name: _NOT_ARRAYS for name in (
        "check_pipeline_consistency", "check_estimators_pickle",
        "check_f_contiguous_array_estimator", "check_transformer_data_not_an_array",
        "check_transformer_general", "check_transformer_preserve_dtypes",
        "check_methods_sample_order_invariance", "check_methods_subset_invariance",
        "check_dict_unchanged", "check_fit_idempotent", "check_fit_check_is_fitted",
        "check_n_features_in", "check_fit2d_predict1d", "check_fit2d_1sample",
        "check_fit2d_1feature", "check_estimators_nan_inf", "check_estimator_sparse_tag",
        "check_estimator_sparse_array", "check_estimator_sparse_matrix",
        "check_fit_score_takes_y", "check_estimators_overwrite_params",
        "check_dont_overwrite_parameters", "check_estimators_fit_returns_self",
        "check_readonly_memmap_input", "check_n_features_in_after_fitting",
        "check_positive_only_tag_during_fit", "check_estimators_dtypes", "check_complex_data",
        "check_dtype_object", "check_estimators_empty_data_messages",
    )
}


@parametrize_with_checks([FHIRFeaturizer()],
                         expected_failed_checks=lambda est: EXPECTED_FAILED)
def test_sklearn_compatible(estimator, check) -> None:
    check(estimator)


def _site(tmp_path: Path, n: int = 24, name: str = "site") -> Path:
    res = []
    for i in range(n):
        oxygen = "2020-03-01T12:00:00Z" if i % 3 == 0 else None
        extra = [f.observation(f"spo2-{i}", f"p{i}", "59408-5", 85.0 if oxygen else 97.0, "%",
                               "2020-03-01T09:00:00Z")]
        res += f.covid_patient(f"p{i}", oxygen_at=oxygen, extra=extra)
    root = tmp_path / name
    f.write_json(root / "fhir" / "b.json", f.bundle(res))
    return root


def test_pipeline_on_site_directories(tmp_path: Path) -> None:
    sites = [_site(tmp_path, name="a"), _site(tmp_path, n=12, name="b")]
    y = FHIRFeaturizer(task="covid_oxygen_24h").cohort_labels(sites)
    assert len(y) == 36 and y.sum() == 12
    model = make_pipeline(FHIRFeaturizer(task="covid_oxygen_24h"),
                          HistGradientBoostingClassifier(max_iter=5, min_samples_leaf=2))
    model.fit(sites, y)
    assert model.score(sites, y) == 1.0  # SpO2 separates the labels in this toy data
    X = model[0].transform(sites)
    assert list(X.columns) == list(model[0].get_feature_names_out())
    assert X.index[0] == "a/p0" and X.shape[0] == 36
    # CRP is recorded only after the index: never a value, so the column is dropped
    assert "crp" in model[0].empty_features_ and "crp" not in X.columns
    assert "missing_crp" in X.columns
    kept = FHIRFeaturizer(keep_empty_features=True).fit_transform(sites)
    assert kept["crp"].isna().all()


def test_bundle_dicts_files_and_tables_give_the_same_features(tmp_path: Path) -> None:
    root = _site(tmp_path, n=6)
    bundle_file = root / "fhir" / "b.json"
    import json

    bundle = json.loads(bundle_file.read_text())
    feat = FHIRFeaturizer(keep_empty_features=True).fit([bundle])
    from_dict = feat.transform([bundle])
    from_file = feat.transform([bundle_file])
    from_table = feat.transform(build_cohort(root, feat.task_).table)
    np.testing.assert_array_equal(from_dict.to_numpy(), from_file.to_numpy())
    np.testing.assert_array_equal(from_dict.to_numpy(), from_table.to_numpy())


def test_clone_pickle_set_params(tmp_path: Path) -> None:
    site = _site(tmp_path, n=6)
    feat = FHIRFeaturizer(task="covid_oxygen_24h", allowance_hours=2.0).fit([site])
    again = pickle.loads(pickle.dumps(feat))
    np.testing.assert_array_equal(again.transform([site]).to_numpy(),
                                  feat.transform([site]).to_numpy())
    assert again.task_.index.allowance_hours == 2.0
    fresh = clone(feat)
    assert fresh.get_params() == feat.get_params() and not hasattr(fresh, "task_")
    fresh.set_params(task="covid_oxygen_72h")
    assert fresh.fit([site]).task_.label.window_hours == 72


def test_bad_inputs_are_explained(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="expects a list of site directories"):
        FHIRFeaturizer().fit(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="does not exist"):
        FHIRFeaturizer().fit([tmp_path / "nope"])


def test_labels_of_the_feature_table_name_the_expected_input(tmp_path: Path) -> None:
    """``cohort_labels(X)`` with the feature table (the natural mistake) says what to pass."""
    sites = [_site(tmp_path, n=6)]
    feat = FHIRFeaturizer(keep_empty_features=True)
    X = feat.fit_transform(sites)
    with pytest.raises(ValueError, match=r"without a 'label' column.*site directories"):
        feat.cohort_labels(X)
    table = feat.cohort(sites)  # the cohort table carries the labels: accepted
    np.testing.assert_array_equal(feat.cohort_labels(table), feat.cohort_labels(sites))


def test_bad_files_follow_the_error_policy(tmp_path: Path) -> None:
    good = f.write_json(tmp_path / "good.json", f.bundle(f.covid_patient("p1")))
    bad = tmp_path / "bad.ndjson"
    bad.write_text("{nope\n")
    feat = FHIRFeaturizer().fit([good, bad])
    assert feat.transform([good, bad]).shape[0] == 1
    assert feat.last_cohorts_[0].counts["skipped_by_reason"] == {"invalid_json": 1}
    from multimodal_fl.data import DataError

    with pytest.raises(DataError, match=r"bad\.ndjson"):
        FHIRFeaturizer(on_error="fail").fit([good, bad])


def test_public_import_path() -> None:
    """The issue's import path works: ``from multimodal_fl.data import FHIRFeaturizer``."""
    from multimodal_fl.data import FHIRFeaturizer as Public
    from multimodal_fl.data.featurizer import FHIRFeaturizer as Direct

    assert Public is Direct


def test_timezone_reads_date_only_records_in_the_site_zone() -> None:
    """Index 20:00 UTC; a CRP dated 1 March is over by then in Brisbane, not in UTC."""
    bundle = f.bundle(f.covid_patient("p1", "2020-03-01T20:00:00+00:00", extra=[
        f.observation("crp", "p1", "1988-5", 80.0, "mg/L", "2020-03-01")]))
    utc = FHIRFeaturizer().fit_transform([bundle])
    brisbane = FHIRFeaturizer(timezone="Australia/Brisbane").fit_transform([bundle])
    assert "crp" not in utc.columns  # no value at all: dropped as an empty feature
    assert brisbane["crp"].tolist() == [80.0]
    with pytest.raises(ValueError, match="FHIRFeaturizer timezone: 'Mars/Olympus' is not an "
                                         "IANA time zone name"):
        FHIRFeaturizer(timezone="Mars/Olympus").fit([bundle])
