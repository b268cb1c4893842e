"""A model trained to completion on one dataset: the local-only and centralized baselines.

:func:`train_to_completion` runs ``training.steps`` optimisation steps with the experiment's
training settings and early stopping on the given validation rows, from a generator seeded by
(seed, ``"train"``, key). :func:`train_local_model` is a site's local-only model: built from
the experiment's seed, standardised on the site's own training split, trained on it and
stopped on its own validation split. The local engine's sites (in process and on Flower) and
the centralized engine train through these two functions, so every engine gives the weights
``tests/test_reference_weights.py`` pins.
"""

from __future__ import annotations

import torch

from multimodal_fl.config import ExperimentConfig
from multimodal_fl.evaluation.metrics import derive_seed
from multimodal_fl.fusion import FusionModel
from multimodal_fl.progress import ProgressCallback, StepEvent
from multimodal_fl.training.dataset import CohortDataset, SiteData
from multimodal_fl.training.loop import TrainResult, train
from multimodal_fl.training.model import (
    batch_augmenter,
    build_model,
    fit_tabular_standardizer,
    warmup_fit,
    warmup_steps,
)

__all__ = ["train_local_model", "train_to_completion"]


def train_to_completion(
    cfg: ExperimentConfig, train_set: CohortDataset, val_set: CohortDataset | None,
    model: FusionModel, *, seed_key: str, progress: ProgressCallback | None = None,
    label: str = "",
) -> TrainResult:
    """Train ``model`` in place with ``cfg.training`` and validation-AUC early stopping.

    Parameters
    ----------
    cfg : ExperimentConfig
        ``training`` (steps, batch size, learning rate, ``eval_every``, ``patience``), the seed
        and the image augmentation.
    train_set : CohortDataset
        Training rows (at least one).
    val_set : CohortDataset or None
        Validation rows (early stopping); ``None`` or empty: none.
    model : FusionModel
        Trained in place.
    seed_key : str
        The generator is seeded from ``derive_seed(cfg.seed, "train", seed_key)``: the site's
        name for a local-only model, ``"centralized"`` for the pooled one.
    progress : callable or None
        Called with a :class:`~multimodal_fl.progress.StepEvent` after every step (and once
        more at the end when early stopping ended the run before ``training.steps``).
    label : str
        The events' label (``"local site_a"``).

    Returns
    -------
    TrainResult
    """
    events: list[StepEvent] = []

    def tick(step: int, loss: float) -> None:
        events[:] = [StepEvent(label, step, cfg.training.steps, loss)]
        if progress is not None:
            progress(events[0])

    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "train", seed_key))
    result = train(model, train_set, val_set, cfg.training, generator=gen,
                   augment=batch_augmenter(cfg, model), progress=tick,
                   warmup_steps=warmup_steps(cfg, model), warmup_fit=warmup_fit(cfg, model))
    if progress is not None and events and result.steps < cfg.training.steps:
        # early stopping: the model is done all the same
        progress(StepEvent(label, result.steps, result.steps, events[0].loss))
    return result


def train_local_model(
    cfg: ExperimentConfig, data: SiteData, *, seed_key: str, min_cell: int = 0,
    progress: ProgressCallback | None = None, label: str = "",
) -> tuple[FusionModel, TrainResult]:
    """A site's local-only model: its own standardisation, training and early stopping.

    The model starts from the experiment's seeded initial weights (:func:`build_model`), takes
    its tabular standardisation from the site's training split (features seen in fewer than
    ``min_cell`` of its patients left unstandardised, as the ``moments`` rule sends them), and
    is trained with :func:`train_to_completion` on that split, stopped on the site's
    validation split.

    Parameters
    ----------
    cfg : ExperimentConfig
    data : SiteData
        The site's prepared data (its training split is not empty).
    seed_key : str
        The site's name (see :func:`train_to_completion`).
    min_cell : int, default 0
        The site's effective small-cell threshold: the model's standardiser carries no
        statistic of fewer patients (:func:`fit_tabular_standardizer`'s ``min_count``), so
        its weights may leave the site.
    progress : callable or None
        Called with every step's :class:`~multimodal_fl.progress.StepEvent`.
    label : str
        The events' label.

    Returns
    -------
    model : FusionModel
        The trained model (early stopping's best weights).
    result : TrainResult
    """
    model = build_model(cfg, data)
    fit_tabular_standardizer(model, [data.train], min_count=min_cell)
    result = train_to_completion(cfg, data.train, data.val, model, seed_key=seed_key,
                                 progress=progress, label=label)
    return model, result

