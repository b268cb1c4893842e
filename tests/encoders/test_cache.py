"""EmbeddingCache: cached == recomputed, invalidation by weights and transforms, layout, safety."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from multimodal_fl.encoders import (
    EmbeddingCache,
    ImageEncoder,
    ImageTransformSpec,
    TextEncoder,
    content_key,
    load_image,
)
from multimodal_fl.encoders.cache import cache_folder_name


def _proj(enc: ImageEncoder) -> torch.nn.Linear:
    proj = enc.projection
    assert proj is not None
    return proj


class Counter:
    """compute_fn that records the items it was asked for."""

    def __init__(self, fn: object) -> None:
        self.fn = fn
        self.calls: list[list[Any]] = []

    def __call__(self, items: Sequence[Any]) -> np.ndarray:
        self.calls.append(list(items))
        return self.fn(items)  # type: ignore[operator]


def _image_fn(enc: ImageEncoder, spec: ImageTransformSpec) -> Counter:
    def fn(paths: Sequence[Path]) -> np.ndarray:
        with torch.no_grad():
            return enc(torch.stack([load_image(p, spec=spec) for p in paths])).numpy()

    return Counter(fn)


def test_cached_equals_recomputed_and_persists(
    tmp_path: Path, image_files: dict[str, Path]
) -> None:
    torch.manual_seed(0)
    spec = ImageTransformSpec(size=16)
    enc = ImageEncoder("smallcnn", embed_dim=6, frozen=True).eval()
    paths = [image_files[k] for k in ("grey_png", "rgb_jpg", "dicom", "grey_png")]
    fp = enc.fingerprint(spec.describe())
    cache = EmbeddingCache(tmp_path, fingerprint=fp, site="site_a")
    fn = _image_fn(enc, spec)
    first = cache.get_or_compute(paths, fn)
    assert len(fn.calls) == 1 and len(fn.calls[0]) == 3  # duplicate computed once
    fresh = fn(paths)
    np.testing.assert_allclose(first, fresh, rtol=1e-6, atol=1e-6)
    # a new cache object (new process) reads the shard from disk and computes nothing
    again = EmbeddingCache(tmp_path, fingerprint=fp, site="site_a")
    fn2 = _image_fn(enc, spec)
    np.testing.assert_array_equal(again.get_or_compute(paths, fn2), first)
    assert fn2.calls == [] and again.hits == 4 and again.misses == 0
    folder = cache_folder_name(fp)
    assert (tmp_path / "site_a" / folder / "fingerprint.json").is_file()
    assert len(list((tmp_path / "site_a" / folder).glob("shard-*.npz"))) == 1
    # another site has its own folder
    other = EmbeddingCache(tmp_path, fingerprint=fp, site="site_b")
    other.get_or_compute(paths[:1], _image_fn(enc, spec))
    assert (tmp_path / "site_b" / folder).is_dir()


def test_changed_weights_invalidate(tmp_path: Path, image_files: dict[str, Path]) -> None:
    torch.manual_seed(0)
    spec = ImageTransformSpec(size=16)
    enc = ImageEncoder("smallcnn", embed_dim=4, frozen=True).eval()
    paths = [image_files["grey_png"], image_files["dicom"]]
    EmbeddingCache(tmp_path, fingerprint=enc.fingerprint(spec.describe())).get_or_compute(
        paths, _image_fn(enc, spec)
    )
    with torch.no_grad():
        _proj(enc).weight.mul_(2.0)
    fn = _image_fn(enc, spec)
    cache = EmbeddingCache(tmp_path, fingerprint=enc.fingerprint(spec.describe()))
    out = cache.get_or_compute(paths, fn)
    assert len(fn.calls) == 1 and len(fn.calls[0]) == 2  # recomputed
    np.testing.assert_allclose(out, fn(paths), rtol=1e-6)


def test_changed_transform_invalidates(tmp_path: Path, image_files: dict[str, Path]) -> None:
    torch.manual_seed(0)
    enc = ImageEncoder("smallcnn", embed_dim=4, frozen=True).eval()
    paths = [image_files["grey_png"]]
    small, large = ImageTransformSpec(size=16), ImageTransformSpec(size=24)
    a = EmbeddingCache(tmp_path, fingerprint=enc.fingerprint(small.describe()))
    first = a.get_or_compute(paths, _image_fn(enc, small))
    fn = _image_fn(enc, large)
    b = EmbeddingCache(tmp_path, fingerprint=enc.fingerprint(large.describe()))
    second = b.get_or_compute(paths, fn)
    assert len(fn.calls) == 1 and not np.allclose(first, second)


def test_changed_file_content_is_a_new_key(tmp_path: Path) -> None:
    from PIL import Image

    p = tmp_path / "img.png"
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(p)
    k1 = content_key(p)
    Image.fromarray(np.full((8, 8), 9, dtype=np.uint8)).save(p)
    assert content_key(p) != k1
    assert content_key(str(p)) != content_key(p)  # a str is text, not a file
    assert content_key("fever") == content_key("fever") != content_key("cough")
    assert content_key(["a", "b"]) != content_key(["b", "a"])
    with pytest.raises(FileNotFoundError):
        content_key(tmp_path / "nope.png")


def test_text_encoder_through_cache(tmp_path: Path, tiny_text_model: Path) -> None:
    enc = TextEncoder(tiny_text_model)
    notes = ["fever and cough", "", ["oxygen low", "chest pain"], "fever and cough"]

    def compute(items: Sequence[Any]) -> np.ndarray:
        with torch.no_grad():
            return enc(items).numpy()

    fn = Counter(compute)
    cache = EmbeddingCache(tmp_path, fingerprint=enc.fingerprint(), site="s")
    out = cache.get_or_compute(notes, fn)
    assert len(fn.calls[0]) == 3
    np.testing.assert_allclose(out, compute(notes), rtol=1e-6, atol=1e-7)
    assert cache.get_or_compute(notes[::-1], fn).tolist() == out[::-1].tolist()
    assert len(fn.calls) == 1


def test_refuses_sample_data_and_bad_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="sample_data"):
        EmbeddingCache(tmp_path / "sample_data" / "cache", fingerprint="a" * 64)
    with pytest.raises(ValueError, match="fingerprint"):
        EmbeddingCache(tmp_path, fingerprint="../x")
    with pytest.raises(ValueError, match="site"):
        EmbeddingCache(tmp_path, fingerprint="a" * 64, site="../b")
    monkeypatch.setenv("MMFL_CACHE", str(tmp_path / "envcache"))
    assert EmbeddingCache(fingerprint="a" * 64).root == (tmp_path / "envcache").resolve()


def test_compute_fn_shape_checked(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path, fingerprint="b" * 64)
    with pytest.raises(ValueError, match=r"expected \[n_items, dim\]"):
        cache.get_or_compute(["x", "y"], lambda items: np.zeros(3))
    cache.get_or_compute(["x"], lambda items: np.zeros((1, 3)))
    with pytest.raises(ValueError, match="dim 3"):
        cache.get_or_compute(["z"], lambda items: np.zeros((1, 4)))
    cache.clear()
    assert len(cache) == 0 and not cache.directory.exists()


def test_fingerprints_sharing_a_prefix_never_share_rows(tmp_path: Path) -> None:
    v1 = EmbeddingCache(tmp_path, fingerprint="cxr-resnet18-weights-v1", site="a")
    v1.get_or_compute(["note A"], lambda items: np.ones((len(items), 2)))
    v2 = EmbeddingCache(tmp_path, fingerprint="cxr-resnet18-weights-v2", site="a")
    assert v2.directory != v1.directory
    fn = Counter(lambda items: np.zeros((len(items), 2)))
    assert v2.get_or_compute(["note A"], fn).tolist() == [[0.0, 0.0]]
    assert fn.calls == [["note A"]]
    hexes = EmbeddingCache(tmp_path, fingerprint="a" * 16 + "b" * 48, site="a")
    EmbeddingCache(tmp_path, fingerprint="a" * 64, site="a").get_or_compute(
        ["x"], lambda items: np.ones((1, 2)))
    assert hexes.get_or_compute(["x"], lambda items: np.zeros((1, 2))).tolist() == [[0.0, 0.0]]


def test_shards_of_another_fingerprint_are_never_read(tmp_path: Path) -> None:
    fp = "c" * 64
    cache = EmbeddingCache(tmp_path, fingerprint=fp, site="a")
    cache.get_or_compute(["x"], lambda items: np.ones((1, 2)))
    meta = cache.directory / "fingerprint.json"
    meta.write_text(json.dumps({"fingerprint": "d" * 64, "description": ""}))
    with pytest.raises(ValueError, match="belongs to fingerprint"):
        EmbeddingCache(tmp_path, fingerprint=fp, site="a").get_or_compute(
            ["x"], lambda items: np.zeros((1, 2)))


def test_folder_of_an_earlier_version_is_still_read(tmp_path: Path) -> None:
    fp = "0123456789abcdef" * 4
    legacy = tmp_path / "a" / fp[:16]  # earlier versions named the folder fingerprint[:16]
    legacy.mkdir(parents=True)
    (legacy / "fingerprint.json").write_text(json.dumps({"fingerprint": fp}))
    np.savez(legacy / "shard-old.npz", keys=np.asarray([content_key("x")], dtype="<U64"),
             emb=np.full((1, 2), 7.0, dtype=np.float32))
    cache = EmbeddingCache(tmp_path, fingerprint=fp, site="a")
    fn = Counter(lambda items: np.zeros((len(items), 2)))
    assert cache.get_or_compute(["x"], fn).tolist() == [[7.0, 7.0]] and fn.calls == []
    other = EmbeddingCache(tmp_path, fingerprint=fp[:16] + "f" * 48, site="a")
    assert other.directory != legacy


def test_duplicate_items_count_one_miss(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path, fingerprint="e" * 64, site="a")
    cache.get_or_compute(["a", "a", "b"], lambda items: np.ones((len(items), 2)))
    assert (cache.hits, cache.misses) == (0, 2)
    cache.get_or_compute(["a", "c", "c"], lambda items: np.ones((len(items), 2)))
    assert (cache.hits, cache.misses) == (1, 3)
