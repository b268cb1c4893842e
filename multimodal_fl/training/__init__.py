"""Train, evaluate and predict the fusion model on one dataset; knows no federated learning.

The modules, in the order a run uses them:

1. :mod:`~multimodal_fl.training.splits`: :func:`split_patients` assigns every patient of a
   site to ``train``/``val``/``test`` from a hash of (seed, site, patient id), stratified by
   label: the local, centralized and federated engines all get the same split.
2. :mod:`~multimodal_fl.training.dataset`: :class:`CohortDataset` (a cohort as tensors, with
   its :class:`Batch`) and :class:`SiteData` (one site's dataset and split).
3. :mod:`~multimodal_fl.training.prepare`: :func:`prepare_site_data` turns a site's cohort
   table into a :class:`SiteData` once: images are read and preprocessed once; frozen
   encoders (text by default, image when ``frozen: true``) are applied once through the
   embedding cache, so the model sees their embeddings; trainable modalities keep their raw
   input. :func:`load_site_data` does it for every site of a config.
4. :mod:`~multimodal_fl.training.model`: :func:`build_model` makes the
   :class:`~multimodal_fl.fusion.FusionModel` from the config, with seeded initial weights;
   :func:`fit_tabular_standardizer` sets the tabular standardisation from training rows
   (pooled, or from per-dataset moments, which is the same arithmetic the federated engine
   uses); :func:`load_weights`, :func:`resolve_device`, :func:`batch_augmenter`.
5. :mod:`~multimodal_fl.training.loop`: :func:`train` runs a number of optimisation steps
   (AdamW, fresh every call), sampling batches from a caller-seeded ``torch.Generator``, with
   ``pos_weight`` from the training labels, validation-AUC early stopping and an optional
   proximal (FedProx) term. :func:`local_update` is the federated site's entry point: load
   weights, run ``steps``. The module's docstring says how a call is deterministic and why the
   optimiser state is reset at every call.
6. :mod:`~multimodal_fl.training.baseline`: :func:`train_to_completion` (``training.steps``
   with early stopping, seeded from (seed, ``"train"``, key)) and :func:`train_local_model`
   (a site's local-only model on its own splits): the local and centralized baselines.
7. :mod:`~multimodal_fl.training.inference`: :func:`evaluate` (AUC, average precision,
   Brier, ECE via :mod:`multimodal_fl.evaluation.metrics`), :func:`predict`
   (probabilities), :func:`predictions_frame` and :func:`metrics_by_split`.
"""

from __future__ import annotations

from multimodal_fl.training.baseline import train_local_model, train_to_completion
from multimodal_fl.training.dataset import META_COLUMNS, Batch, CohortDataset, SiteData
from multimodal_fl.training.inference import (
    EVAL_METRICS,
    SENSITIVE_COLUMNS,
    check_sensitive,
    evaluate,
    metrics_by_split,
    predict,
    predictions_frame,
)
from multimodal_fl.training.loop import (
    EarlyStopping,
    ProximalFn,
    TrainResult,
    batch_size_for,
    local_update,
    torch_threads,
    train,
)
from multimodal_fl.training.model import (
    augment_images,
    batch_augmenter,
    build_model,
    fit_tabular_standardizer,
    load_weights,
    resolve_device,
    warmup_fit,
    warmup_steps,
)
from multimodal_fl.training.prepare import (
    CohortLike,
    FrozenEncoders,
    cache_root,
    enabled_modalities,
    load_site_data,
    prepare_site_data,
)
from multimodal_fl.training.splits import SPLITS, split_patients

__all__ = [
    "EVAL_METRICS",
    "META_COLUMNS",
    "SENSITIVE_COLUMNS",
    "SPLITS",
    "Batch",
    "CohortDataset",
    "CohortLike",
    "EarlyStopping",
    "FrozenEncoders",
    "ProximalFn",
    "SiteData",
    "TrainResult",
    "augment_images",
    "batch_augmenter",
    "batch_size_for",
    "build_model",
    "cache_root",
    "check_sensitive",
    "enabled_modalities",
    "evaluate",
    "fit_tabular_standardizer",
    "load_site_data",
    "load_weights",
    "local_update",
    "metrics_by_split",
    "predict",
    "predictions_frame",
    "prepare_site_data",
    "resolve_device",
    "split_patients",
    "torch_threads",
    "train",
    "train_local_model",
    "train_to_completion",
    "warmup_fit",
    "warmup_steps",
]
