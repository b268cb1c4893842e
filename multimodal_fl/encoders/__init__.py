"""Encoders for images, tabular EHR features and clinical text, and their scikit-learn featurizers.

Each encoder is an ``nn.Module`` with ``output_dim`` and
``forward(batch) -> Tensor[B, output_dim]``, built from keyword arguments or its config
section (``from_config``):

>>> from multimodal_fl.encoders import ImageEncoder, TabularEncoder, TextEncoder

The featurizers ``TextEmbedder`` and ``ImageEmbedder`` wrap the frozen encoders for
scikit-learn pipelines; ``EmbeddingCache`` stores frozen embeddings per site on disk.
MONAI and transformers are imported only when an image or text encoder is built.
"""

from multimodal_fl.encoders._common import LoadReport, read_state_dict
from multimodal_fl.encoders.cache import EmbeddingCache, content_key, default_cache_root
from multimodal_fl.encoders.embedders import ImageEmbedder, TextEmbedder
from multimodal_fl.encoders.image import BACKBONES, ImageEncoder
from multimodal_fl.encoders.tabular import Standardizer, TabularEncoder, combine_moments
from multimodal_fl.encoders.text import TextEncoder, default_text_model_path
from multimodal_fl.encoders.transforms import (
    ImageReadError,
    ImageTransformSpec,
    build_transform,
    load_image,
)

__all__ = [
    "BACKBONES",
    "EmbeddingCache",
    "ImageEmbedder",
    "ImageEncoder",
    "ImageReadError",
    "ImageTransformSpec",
    "LoadReport",
    "Standardizer",
    "TabularEncoder",
    "TextEmbedder",
    "TextEncoder",
    "build_transform",
    "combine_moments",
    "content_key",
    "default_cache_root",
    "default_text_model_path",
    "load_image",
    "read_state_dict",
]
