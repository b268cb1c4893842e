"""scikit-learn featurizers around the frozen encoders: notes or image paths -> embedding arrays.

``TextEmbedder`` and ``ImageEmbedder`` follow scikit-learn's estimator form (parameters
only in ``__init__``, the network built in ``fit``, fitted attributes ending in ``_``), so
they drop into ``Pipeline`` / ``ColumnTransformer``::

    make_pipeline(TextEmbedder(), LogisticRegression())

Input is one entry per sample: a 1-D sequence (list, ``numpy`` array, ``pandas.Series``)
or a 2-D array/DataFrame with a single column. Text entries are ``str`` (or a list of
notes); image entries are file paths. A sample without text or without an image (``None``,
``""``, NaN, ``pd.NA``; ``[]`` for text) gets a zero row.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from multimodal_fl.encoders._common import is_missing
from multimodal_fl.encoders.cache import EmbeddingCache
from multimodal_fl.encoders.image import ImageEncoder
from multimodal_fl.encoders.text import TextEncoder
from multimodal_fl.encoders.transforms import ImageTransformSpec, apply_transform, build_transform

__all__ = ["ImageEmbedder", "TextEmbedder"]


def _column(X: Any, where: str) -> list[Any]:
    """One entry per sample from a 1-D sequence or a single-column 2-D container."""
    if hasattr(X, "tocsr") or hasattr(X, "sparse"):
        raise TypeError(
            f"{where}: sparse input is not supported; give one text / image path per sample"
        )
    if isinstance(X, np.ndarray) and np.iscomplexobj(X):
        raise ValueError(f"{where}: Complex data not supported")
    if isinstance(X, str | bytes | os.PathLike):
        raise TypeError(f"{where}: expected a sequence of samples, got a single {type(X).__name__}")
    if hasattr(X, "iloc") and getattr(X, "ndim", 1) == 2:  # DataFrame
        if X.shape[1] != 1:
            raise ValueError(f"{where}: expected one column, got {X.shape[1]} ({list(X.columns)})")
        return list(X.iloc[:, 0])
    if isinstance(X, np.ndarray):
        if X.ndim == 2:
            if X.shape[1] != 1:
                raise ValueError(f"{where}: expected one column, got array of shape {X.shape}")
            return list(X[:, 0])
        if X.ndim != 1:
            raise ValueError(f"{where}: expected a 1-D array, got shape {X.shape}")
        return list(X)
    if not hasattr(X, "__len__"):
        raise TypeError(f"{where}: expected a sequence of samples, got {type(X).__name__}")
    items = list(X)
    if items and all(isinstance(r, list | tuple | np.ndarray) and len(r) == 1 for r in items):
        items = [r[0] for r in items]  # [[a], [b]] -> [a, b]
    return items


def _texts(X: Any, where: str) -> list[Any]:
    items = _column(X, where)
    for i, it in enumerate(items):
        if isinstance(it, str) or is_missing(it):
            continue
        if isinstance(it, list | tuple) and all(isinstance(n, str) for n in it):
            continue
        raise TypeError(
            f"{where}: sample {i} is a {type(it).__name__} ({it!r:.40}); accepted: a note (str), "
            "a list of notes, or None/''/NaN/pd.NA for a sample without text"
        )
    return [list(it) if isinstance(it, tuple) else None if is_missing(it) else it
            for it in items]


def _paths(X: Any, where: str) -> list[Path | None]:
    items = _column(X, where)
    out: list[Path | None] = []
    for i, it in enumerate(items):
        if is_missing(it) or (isinstance(it, str) and not it):
            out.append(None)  # no image for this sample
        elif isinstance(it, str | os.PathLike):
            out.append(Path(it))
        else:
            raise TypeError(
                f"{where}: sample {i} is a {type(it).__name__} ({it!r:.40}); accepted: an image "
                "file path (str or Path), or None/''/NaN/pd.NA for a sample without an image"
            )
    return out


class TextEmbedder(TransformerMixin, BaseEstimator):
    """Notes -> embedding array with a frozen :class:`~multimodal_fl.encoders.TextEncoder`.

    Parameters
    ----------
    model_path : str or None
        Local model folder; ``None`` is the bundled all-MiniLM-L6-v2.
    max_length, stride, batch_size, normalize
        Passed to :class:`~multimodal_fl.encoders.TextEncoder`.
    cache_dir : str or None
        Embedding cache root (see :class:`~multimodal_fl.encoders.EmbeddingCache`);
        ``None`` disables caching.
    site : str, default "default"
        Site name for the cache folder.

    Attributes
    ----------
    encoder_ : TextEncoder
    fingerprint_ : str
        Encoder fingerprint (weights + chunking), the cache key's second half.
    n_features_out_ : int
    """

    def __init__(
        self,
        model_path: str | None = None,
        *,
        max_length: int | None = None,
        stride: int = 0,
        batch_size: int = 32,
        normalize: bool | None = None,
        cache_dir: str | None = None,
        site: str = "default",
    ) -> None:
        self.model_path = model_path
        self.max_length = max_length
        self.stride = stride
        self.batch_size = batch_size
        self.normalize = normalize
        self.cache_dir = cache_dir
        self.site = site

    def fit(self, X: Any, y: Any = None) -> TextEmbedder:
        """Validate ``X`` and load the model (nothing is learnt); returns ``self``."""
        _texts(X, "TextEmbedder.fit")
        self.encoder_ = TextEncoder(
            self.model_path,
            max_length=self.max_length,
            stride=self.stride,
            batch_size=self.batch_size,
            normalize=self.normalize,
        )
        self.fingerprint_ = self.encoder_.fingerprint()
        self.n_features_out_ = self.encoder_.output_dim
        return self

    def _compute(self, texts: list[Any]) -> np.ndarray:
        with torch.no_grad():
            return self.encoder_(texts).cpu().numpy().astype(np.float32)

    def transform(self, X: Any) -> np.ndarray:
        """Embed each sample's notes: ``float32 [n_samples, n_features_out_]``, 0 if no text."""
        check_is_fitted(self, "encoder_")
        texts = _texts(X, "TextEmbedder.transform")
        if not texts:
            return np.zeros((0, self.n_features_out_), dtype=np.float32)
        if self.cache_dir is None:
            return self._compute(texts)
        cache = EmbeddingCache(self.cache_dir, fingerprint=self.fingerprint_, site=self.site)
        return cache.get_or_compute(texts, self._compute)

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        """``text_emb_0 ... text_emb_{d-1}``."""
        check_is_fitted(self, "encoder_")
        return np.asarray([f"text_emb_{i}" for i in range(self.n_features_out_)], dtype=object)

    def __sklearn_tags__(self) -> Any:
        """Tags: string input, stateless (fit learns nothing)."""
        tags = super().__sklearn_tags__()
        tags.input_tags.string = True
        tags.requires_fit = True
        return tags


class ImageEmbedder(TransformerMixin, BaseEstimator):
    """Image paths -> embedding array with a frozen :class:`~multimodal_fl.encoders.ImageEncoder`.

    Parameters
    ----------
    encoder : str, default "smallcnn"
        Backbone name (see :class:`~multimodal_fl.encoders.ImageEncoder`).
    spatial_dims : int, default 2
    size : int, default 64
        Preprocessing side length (see :class:`~multimodal_fl.encoders.ImageTransformSpec`).
    embed_dim : int or None, default None
        Projection size; ``None`` returns the backbone's pooled features.
    weights : str or None
        Local weights file (strongly advised: a random network embeds poorly).
    batch_size : int, default 16
    cache_dir : str or None
        Embedding cache root; ``None`` disables caching.
    site : str, default "default"
    random_state : int, default 0
        Seed for the network's initialisation (used where ``weights`` does not cover it).

    Attributes
    ----------
    encoder_ : ImageEncoder
    spec_ : ImageTransformSpec
    transform_ : monai.transforms.Compose
        The evaluation preprocessing pipeline.
    fingerprint_ : str
    n_features_out_ : int
    """

    def __init__(
        self,
        encoder: str = "smallcnn",
        *,
        spatial_dims: int = 2,
        size: int = 64,
        embed_dim: int | None = None,
        weights: str | None = None,
        batch_size: int = 16,
        cache_dir: str | None = None,
        site: str = "default",
        random_state: int = 0,
    ) -> None:
        self.encoder = encoder
        self.spatial_dims = spatial_dims
        self.size = size
        self.embed_dim = embed_dim
        self.weights = weights
        self.batch_size = batch_size
        self.cache_dir = cache_dir
        self.site = site
        self.random_state = random_state

    def fit(self, X: Any, y: Any = None) -> ImageEmbedder:
        """Validate ``X`` and build the (frozen) network; returns ``self``."""
        _paths(X, "ImageEmbedder.fit")
        self.spec_ = ImageTransformSpec(spatial_dims=self.spatial_dims, size=self.size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.random_state)
            self.encoder_ = ImageEncoder(
                self.encoder,
                spatial_dims=self.spatial_dims,
                in_channels=self.spec_.channels,
                embed_dim=self.embed_dim,
                frozen=True,
                weights=self.weights,
            ).eval()
        self.transform_ = build_transform(self.spec_, train=False)
        self.fingerprint_ = self.encoder_.fingerprint(self.spec_.describe(train=False))
        self.n_features_out_ = self.encoder_.output_dim
        return self

    def _compute(self, paths: Sequence[Path]) -> np.ndarray:
        rows: list[np.ndarray] = []
        for start in range(0, len(paths), self.batch_size):
            batch = torch.stack(
                [
                    apply_transform(self.transform_, p)
                    for p in paths[start : start + self.batch_size]
                ]
            )
            with torch.no_grad():
                rows.append(self.encoder_(batch).cpu().numpy().astype(np.float32))
        return np.concatenate(rows)

    def transform(self, X: Any) -> np.ndarray:
        """Embed each image: ``float32 [n_samples, n_features_out_]``, 0 where no image."""
        check_is_fitted(self, "encoder_")
        paths = _paths(X, "ImageEmbedder.transform")
        out = np.zeros((len(paths), self.n_features_out_), dtype=np.float32)
        present = [i for i, p in enumerate(paths) if p is not None]
        if not present:
            return out
        todo = [p for p in paths if p is not None]
        if self.cache_dir is None:
            out[present] = self._compute(todo)
        else:
            cache = EmbeddingCache(self.cache_dir, fingerprint=self.fingerprint_, site=self.site)
            out[present] = cache.get_or_compute(todo, self._compute)
        return out

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        """``image_emb_0 ... image_emb_{d-1}``."""
        check_is_fitted(self, "encoder_")
        return np.asarray([f"image_emb_{i}" for i in range(self.n_features_out_)], dtype=object)

    def __sklearn_tags__(self) -> Any:
        """Tags: string (path) input."""
        tags = super().__sklearn_tags__()
        tags.input_tags.string = True
        return tags
