"""TextEmbedder / ImageEmbedder: scikit-learn estimator checks, pickling, pipelines, cache."""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.utils.estimator_checks import parametrize_with_checks

from multimodal_fl.encoders import ImageEmbedder, TextEmbedder
from tests.encoders.conftest import make_tiny_text_model


def _shared_tiny_model() -> Path:
    """The checks' tiny BERT at one path per user and transformers version.

    scikit-learn's check ids print the estimator, its ``model_path`` included: a fresh
    temporary folder per session made the ids differ between sessions (``pytest --lf`` could
    not find them) and between workers (``pytest -n`` refused to run). The model is seeded,
    so every session builds the same one; it is built in a folder of its own and renamed into
    place, and a session that loses that race uses the winner's.
    """
    import transformers

    final = Path(tempfile.gettempdir()) / (
        f"mmfl_tiny_bert_checks_{os.getuid()}_{transformers.__version__}")
    if (final / "config.json").is_file():
        return final
    staging = Path(tempfile.mkdtemp(prefix="mmfl_tiny_bert_", dir=final.parent))
    try:
        os.rename(make_tiny_text_model(staging / "model"), final)
    except OSError:  # another session renamed its copy first: the same seeded model
        pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


_TINY = _shared_tiny_model()

# scikit-learn's generic checks feed numeric 2-D arrays (make_blobs): a text or image-path
# featurizer must reject them with a clear TypeError, so the checks that fit on such data
# cannot apply. Each is listed with that reason; pickling, fit idempotence, sample order
# invariance and n_features handling on real inputs are tested below on text/paths.
_NUMERIC_INPUT = "fits on numeric 2-D arrays; input is one text / image path per sample"
_EXPECTED_NUMERIC = [
    "check_fit_score_takes_y",
    "check_estimators_overwrite_params",
    "check_dont_overwrite_parameters",
    "check_estimators_fit_returns_self",
    "check_readonly_memmap_input",
    "check_n_features_in_after_fitting",
    "check_positive_only_tag_during_fit",
    "check_estimators_dtypes",
    "check_estimators_empty_data_messages",
    "check_pipeline_consistency",
    "check_estimators_nan_inf",
    "check_estimators_pickle",
    "check_f_contiguous_array_estimator",
    "check_transformer_data_not_an_array",
    "check_transformer_general",
    "check_transformer_preserve_dtypes",
    "check_dtype_object",
    "check_methods_sample_order_invariance",
    "check_methods_subset_invariance",
    "check_fit2d_1sample",
    "check_fit2d_1feature",
    "check_dict_unchanged",
    "check_fit_idempotent",
    "check_fit_check_is_fitted",
    "check_n_features_in",
    "check_fit1d",
    "check_fit2d_predict1d",
    "check_set_output_transform",
    "check_set_output_transform_pandas",
    "check_global_output_transform_pandas",
    "check_global_set_output_transform_polars",
    "check_set_output_transform_polars",
    "check_get_feature_names_out_error",
]


def _expected_failed(estimator: object) -> dict[str, str]:
    return dict.fromkeys(_EXPECTED_NUMERIC, _NUMERIC_INPUT)


@parametrize_with_checks(
    [TextEmbedder(str(_TINY)), ImageEmbedder("smallcnn", size=16)],
    expected_failed_checks=_expected_failed,
)
def test_sklearn_compatible(estimator: object, check: object) -> None:
    check(estimator)  # type: ignore[operator]


NOTES = [
    "fever and cough , oxygen saturation low on room air",
    "ankle pain , no fever",
    "",
    ["chest x ray shows opacity", "admitted , oxygen"],
    "mild cough , discharged",
    "severe opacity , oxygen high",
]


def test_text_embedder_on_real_input_pickle_and_order() -> None:
    est = TextEmbedder(str(_TINY), max_length=8)
    assert est.fit(NOTES) is est
    out = est.transform(NOTES)
    assert out.shape == (6, 16) and out.dtype == np.float32
    assert np.count_nonzero(out[2]) == 0  # no text -> zero row
    np.testing.assert_allclose(est.transform(NOTES[::-1]), out[::-1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(est.transform(NOTES[:2]), out[:2], rtol=1e-5, atol=1e-6)
    restored = pickle.loads(pickle.dumps(est))
    np.testing.assert_allclose(restored.transform(NOTES), out, rtol=1e-6, atol=1e-7)
    unfitted = clone(est)
    assert unfitted.get_params() == est.get_params() and not hasattr(unfitted, "encoder_")
    assert list(est.get_feature_names_out()[:2]) == ["text_emb_0", "text_emb_1"]
    # DataFrame column and 2-D single-column input give the same rows
    frame = pd.DataFrame({"note": NOTES})
    np.testing.assert_allclose(est.transform(frame), out, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="sample 0 is a int"):
        est.transform([1, 2])
    with pytest.raises(ValueError, match="one column"):
        est.transform(pd.DataFrame({"a": ["x"], "b": ["y"]}))


def test_image_embedder_on_paths_pickle_and_cache(
    image_files: dict[str, Path], tmp_path: Path
) -> None:
    paths = [str(image_files[k]) for k in ("grey_png", "rgb_jpg", "dicom", "rgba_png")]
    est = ImageEmbedder("smallcnn", size=16, cache_dir=str(tmp_path / "cache"), site="a")
    out = est.fit(paths).transform(paths)
    assert out.shape == (4, est.n_features_out_) and est.n_features_out_ == 128
    again = est.transform(paths)  # from the cache
    np.testing.assert_array_equal(again, out)
    assert any((tmp_path / "cache" / "a").rglob("shard-*.npz"))
    uncached = clone(est).set_params(cache_dir=None).fit(paths).transform(paths)
    np.testing.assert_allclose(uncached, out, rtol=1e-5, atol=1e-6)  # same seed, same network
    restored = pickle.loads(pickle.dumps(est))
    np.testing.assert_allclose(restored.transform(paths), out, rtol=1e-6, atol=1e-7)
    other_seed = clone(est).set_params(random_state=1, cache_dir=None).fit(paths)
    assert not np.allclose(other_seed.transform(paths), out)
    with pytest.raises(TypeError, match="image file path"):
        est.transform([3.0])
    with_missing = est.transform([paths[0], None, "", paths[1]])
    np.testing.assert_allclose(with_missing[[0, 3]], out[:2], rtol=1e-6, atol=1e-7)
    assert np.count_nonzero(with_missing[1:3]) == 0


def test_pipelines(image_files: dict[str, Path]) -> None:
    y = np.array([1, 0, 0, 1, 0, 1])
    text_clf = make_pipeline(TextEmbedder(str(_TINY)), LogisticRegression(max_iter=200))
    proba = text_clf.fit(NOTES, y).predict_proba(NOTES)
    assert proba.shape == (6, 2)
    images = [str(image_files[k]) for k in ("grey_png", "rgb_jpg", "dicom")] * 2
    frame = pd.DataFrame({"note": NOTES, "image": images, "age": [50, 60, 70, 40, 30, 80]})
    features = ColumnTransformer(
        [
            ("text", TextEmbedder(str(_TINY)), ["note"]),
            ("image", ImageEmbedder("smallcnn", size=16, embed_dim=4), ["image"]),
            ("num", "passthrough", ["age"]),
        ]
    )
    clf = make_pipeline(features, LogisticRegression(max_iter=500))
    clf.fit(frame, y)
    assert clf.predict(frame).shape == (6,)
    assert features.transform(frame).shape == (6, 16 + 4 + 1)


def test_pandas_na_is_a_missing_sample(image_files: dict[str, Path], tmp_path: Path) -> None:
    """pd.NA (a "string" column's missing value) means "no text / no image", as None does."""
    from multimodal_fl.encoders import TextEncoder, content_key
    from multimodal_fl.encoders.text import normalize_notes

    notes = pd.Series(["fever and cough", None], dtype="string")
    assert notes[1] is pd.NA
    text = TextEmbedder(str(_TINY), max_length=8, cache_dir=str(tmp_path / "t"))
    out = text.fit(notes).transform(notes)
    np.testing.assert_allclose(out, text.transform(["fever and cough", None]), rtol=1e-6)
    assert np.count_nonzero(out[1]) == 0 and np.count_nonzero(out[0]) > 0
    enc = TextEncoder(str(_TINY), max_length=8)
    emb, present = enc.encode(list(notes))
    assert present.tolist() == [True, False] and not emb[1].any()
    assert normalize_notes(pd.NA) == [] and normalize_notes(pd.NaT) == []
    assert content_key(pd.NA) == content_key(None) == content_key(float("nan"))

    paths = pd.Series([str(image_files["grey_png"]), None], dtype="string")
    image = ImageEmbedder("smallcnn", size=16, cache_dir=str(tmp_path / "i"))
    rows = image.fit(paths).transform(paths)
    assert np.count_nonzero(rows[1]) == 0 and np.count_nonzero(rows[0]) > 0
