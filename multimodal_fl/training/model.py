"""The fusion model of an experiment: build it, set its weights, place it, augment its batches.

:func:`build_model` makes the :class:`~multimodal_fl.fusion.FusionModel` from the config with
seeded initial weights; :func:`fit_tabular_standardizer` sets the tabular standardisation from
training rows (pooled, or from per-dataset moments, which is the same arithmetic the federated
engine uses); :func:`load_weights` loads a state dict of tensors or arrays;
:func:`resolve_device` says where the model runs (training and inference both ask it);
:func:`batch_augmenter` is the training-batch augmentation the config asks for.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import nn

from multimodal_fl.encoders.image import ImageEncoder
from multimodal_fl.encoders.tabular import Standardizer, TabularEncoder, combine_moments
from multimodal_fl.fusion import FusionModel
from multimodal_fl.moments import withheld_columns
from multimodal_fl.training.dataset import Batch, CohortDataset, SiteData
from multimodal_fl.training.privacy import make_private_compatible

if TYPE_CHECKING:
    from multimodal_fl.config import ExperimentConfig

__all__ = [
    "augment_images",
    "batch_augmenter",
    "build_model",
    "encoder_kwargs",
    "fit_tabular_standardizer",
    "load_weights",
    "resolve_device",
    "warmup_fit",
    "warmup_steps",
]

log = logging.getLogger(__name__)


def encoder_kwargs(section: Any, drop: Sequence[str] = ("enabled", "max_chunks")) -> dict[str, Any]:
    """A modality config section as encoder keyword arguments (training-only keys removed).

    Parameters
    ----------
    section : pydantic model or mapping
        E.g. ``cfg.modalities.image``.
    drop : sequence of str
        Keys the encoder does not take.

    Returns
    -------
    dict of str to Any
    """
    data = dict(section.model_dump()) if hasattr(section, "model_dump") else dict(section)
    for k in drop:
        data.pop(k, None)
    return data


def build_model(cfg: ExperimentConfig, data: CohortDataset | SiteData) -> FusionModel:
    """Build the fusion model of an experiment for data shaped like ``data``.

    Initial weights are drawn from a generator seeded by ``cfg.seed`` (the global RNG is
    left as it was), so every site and engine starts from the same weights. With
    ``privacy.dp`` the model is made DP-SGD's form
    (:func:`~multimodal_fl.training.privacy.make_private_compatible`: GroupNorm for BatchNorm,
    no in-place activation, dense fusion) for every engine and request alike; with
    ``privacy.site_level`` alone, GroupNorm for BatchNorm. With
    ``training.linear_warmup_steps`` or ``linear_warmup_fit`` the fused head's weights start at zero
    (:meth:`FusionModel.zero_head_weights`): the model starts as its tabular linear path.

    Parameters
    ----------
    cfg : ExperimentConfig
        Modalities, fusion settings and seed.
    data : CohortDataset or SiteData
        Gives the modalities present in the inputs, the tabular feature count and the
        widths of precomputed embeddings.

    Returns
    -------
    FusionModel
    """
    ds = data.dataset if isinstance(data, SiteData) else data
    encoders: dict[str, nn.Module | int] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        for m in ds.modalities:
            if m in ds.precomputed:
                encoders[m] = int(ds.inputs[m].shape[1])
            elif m == "image":
                sec = encoder_kwargs(cfg.modalities.image, drop=("enabled", "size", "augment"))
                encoders[m] = ImageEncoder.from_config(sec)
            elif m == "tabular":
                sec = encoder_kwargs(cfg.modalities.tabular)
                encoders[m] = TabularEncoder.from_config(
                    sec, n_features=int(ds.inputs[m].shape[1])
                )
            else:
                raise ValueError(f"modality {m!r} has no trainable encoder in the training loop")
        model = FusionModel(
            encoders,
            kind=cfg.fusion.kind,
            dim=cfg.fusion.dim,
            heads=cfg.fusion.heads,
            modality_dropout=cfg.fusion.modality_dropout,
            dropout=cfg.fusion.dropout,
        )
    if warmup_steps(cfg, model) or warmup_fit(cfg, model):
        model.zero_head_weights()  # the model starts as its linear path (train's warm-up)
    privacy = cfg.privacy
    if privacy.dp is not None or privacy.site_level is not None:
        model, changes = make_private_compatible(model, per_sample=privacy.dp is not None)
        for line in changes:
            log.debug("privacy.dp model: %s", line)
    return model


def warmup_steps(cfg: ExperimentConfig, model: FusionModel) -> int:
    """The linear warm-up a training of ``model`` starts with (``train(warmup_steps=...)``).

    ``training.linear_warmup_steps`` when the model has a linear path, else 0 (a model
    built for other modalities, such as an image-only one, has nothing to warm up).

    Parameters
    ----------
    cfg : ExperimentConfig
        Its ``training.linear_warmup_steps``.
    model : FusionModel
        The model about to train (:meth:`FusionModel.linear_path_parameters`).

    Returns
    -------
    int
        Steps for ``train(..., warmup_steps=)``.
    """
    return cfg.training.linear_warmup_steps if model.linear_path_parameters() else 0


def warmup_fit(cfg: ExperimentConfig, model: FusionModel) -> bool:
    """Whether a training of ``model`` starts with the fitted warm-up (``train(warmup_fit=)``).

    ``training.linear_warmup_fit`` when the model has a linear path, else False.

    Parameters
    ----------
    cfg : ExperimentConfig
        Its ``training.linear_warmup_fit``.
    model : FusionModel
        The model to train.

    Returns
    -------
    bool
    """
    return bool(cfg.training.linear_warmup_fit and model.linear_path_parameters())


def fit_tabular_standardizer(model: FusionModel, datasets: Sequence[CohortDataset], *,
                             min_count: int = 0) -> None:
    """Set the tabular encoder's standardisation from training rows of one or more datasets.

    Sums per-dataset moments (count, sum, sum of squares per feature, over rows with tabular
    data present) -- the same arithmetic the federated engine applies to site summaries, so
    pooled and federated statistics agree. Does nothing when the model has no trainable
    tabular encoder.

    Parameters
    ----------
    model : FusionModel
    datasets : sequence of CohortDataset
        Usually the training split(s).
    min_count : int, default 0
        A feature observed in fewer than ``min_count`` rows of a dataset, or a 0/1 feature with
        fewer than ``min_count`` rows of either value, is left out of that dataset's moments,
        as a site's ``moments`` reply leaves it out under its ``min_cell``
        (:func:`~multimodal_fl.moments.withheld_columns`): a model whose weights leave the site
        (the local-only model) then carries no mean, scale or count of fewer patients. ``0``:
        every observed value counts.
    """
    if "tabular" not in model.modalities or "tabular" in model.precomputed:
        return
    enc = cast(TabularEncoder, model.encoders["tabular"])
    moments = []
    for d in datasets:
        j = d.modalities.index("tabular")
        x = d.inputs["tabular"][d.mask[:, j]]
        n, s, ss = Standardizer.site_moments(x.numpy())
        rare = withheld_columns(n, s, ss, min_count)
        moments.append((np.where(rare, 0, n), np.where(rare, 0.0, s), np.where(rare, 0.0, ss)))
    if moments:
        enc.standardizer.set_moments(*combine_moments(moments))


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda"`` without a GPU is an error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "training.device is 'cuda' but no CUDA device is available; use auto or cpu"
        )
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not one of auto, cpu, cuda")
    return torch.device(device)


def load_weights(model: nn.Module, weights: Mapping[str, Any], *, strict: bool = True) -> None:
    """Load a state dict of tensors or numpy arrays into ``model`` (copied, dtype kept).

    Parameters
    ----------
    model : nn.Module
    weights : mapping of str to Tensor or ndarray
        E.g. a federated request's global weights.
    strict : bool, default True
        Missing or unexpected keys are an error (False, e.g. for FedBN's local keys, loads
        the keys given). Weights with no tabular linear path (``encoders.tabular.linear.``)
        load into a model with one as a zero path: exactly the model they come from.
    """
    own = model.state_dict()
    state = {}
    for k, v in weights.items():
        t = torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v
        if k in own:
            if tuple(t.shape) != tuple(own[k].shape):
                raise ValueError(
                    f"weight {k!r} has shape {tuple(t.shape)}, the model expects "
                    f"{tuple(own[k].shape)}"
                )
            t = t.to(own[k].dtype)
        state[k] = t
    wide = "encoders.tabular.linear."
    if strict and not any(k.startswith(wide) for k in state):
        # weights from a model without the linear path: the path at zero is that model
        state |= {k: torch.zeros_like(v) for k, v in own.items() if k.startswith(wide)}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if strict and (missing or unexpected):
        hint = ""
        if any(k.startswith(wide) for k in unexpected):
            hint = ("; the weights have a tabular linear path: set "
                    "modalities.tabular.linear_path to true to load them")
        raise ValueError(
            f"weights do not match the model: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}{hint}"
        )
    model.load_state_dict(state, strict=strict)


def augment_images(x: torch.Tensor, spatial_dims: int, *, strength: float = 0.1) -> torch.Tensor:
    """Cheap batched augmentation of preprocessed images (random flip, intensity jitter).

    Uses torch's global RNG (which :func:`train` forks and seeds from its generator).

    Parameters
    ----------
    x : Tensor[B, C, *spatial]
    spatial_dims : int
        Number of spatial axes.
    strength : float
        Maximum relative intensity scale change and absolute shift.

    Returns
    -------
    Tensor
        Augmented copy.
    """
    b = x.shape[0]
    view = (b,) + (1,) * (x.ndim - 1)
    flip = torch.rand(b, device=x.device) < 0.5
    axis = x.ndim - spatial_dims
    x = torch.where(flip.view(view), x.flip(axis), x)
    scale = 1 + (torch.rand(b, device=x.device) * 2 - 1) * strength
    shift = (torch.rand(b, device=x.device) * 2 - 1) * strength
    return x * scale.view(view) + shift.view(view)


def batch_augmenter(cfg: ExperimentConfig, model: FusionModel) -> Callable[[Batch], Batch] | None:
    """The training-batch augmentation the config asks for, or ``None``.

    Images fed raw to a trainable image encoder are augmented with :func:`augment_images`
    when ``modalities.image.augment`` is true; precomputed embeddings are never augmented.

    Parameters
    ----------
    cfg : ExperimentConfig
    model : FusionModel

    Returns
    -------
    callable or None
        ``augment(batch) -> batch`` for :func:`train`.
    """
    img = cfg.modalities.image
    if "image" not in model.modalities or "image" in model.precomputed or not img.augment:
        return None
    dims = img.spatial_dims

    def augment(batch: Batch) -> Batch:
        inputs = dict(batch.inputs)
        inputs["image"] = augment_images(inputs["image"], dims)
        return Batch(inputs, batch.mask, batch.labels, batch.patient_ids)

    return augment
