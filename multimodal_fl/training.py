"""Train, evaluate and predict the fusion model on one dataset; knows no federated learning.

The pieces, in the order a run uses them:

1. :func:`split_patients` assigns every patient of a site to ``train``/``val``/``test`` from a
   hash of (seed, site, patient id), stratified by label: the local, centralized and federated
   engines all get the same split.
2. :func:`prepare_site_data` turns a site's cohort table into tensors once (:class:`SiteData`
   holding a :class:`CohortDataset`): images are read and preprocessed once; frozen encoders
   (text by default, image when ``frozen: true``) are applied once through the embedding cache,
   so the model sees their embeddings; trainable modalities keep their raw input.
3. :func:`build_model` makes the :class:`~multimodal_fl.fusion.FusionModel` from the config,
   with seeded initial weights; :func:`fit_tabular_standardizer` sets the tabular
   standardisation from training rows (pooled, or from per-dataset moments, which is the same
   arithmetic the federated engine uses).
4. :func:`train` runs a number of optimisation steps (AdamW, fresh every call), sampling
   batches from a caller-seeded ``torch.Generator``, with ``pos_weight`` from the training
   labels, validation-AUC early stopping and an optional proximal (FedProx) term.
   :func:`local_update` is the federated site's entry point: load weights, run ``steps``.
5. :func:`evaluate` (AUC, average precision, Brier, ECE via
   :mod:`multimodal_fl.evaluation.metrics`) and :func:`predict` (probabilities).

Determinism
-----------
All randomness of a :func:`train` call (batch order, dropout, modality dropout, augmentation)
derives from its ``generator``: the global torch RNG is forked and seeded from it for the
duration of the call, then restored. On CPU the same generator seed and the same starting
weights give bit-identical weights.

Optimiser state
---------------
Every :func:`train` / :func:`local_update` call creates a new AdamW optimiser. In federated
training the optimiser state is therefore reset at every round *by design*: nothing but the
weights crosses rounds, so there is no optimiser state to checkpoint or to average.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np
import pandas as pd
import torch
from torch import nn

from multimodal_fl.evaluation.metrics import MetricValue, binary_metrics
from multimodal_fl.fusion import MODALITIES, FusionModel, NoModalityError

if TYPE_CHECKING:
    from multimodal_fl.config import ExperimentConfig, SplitConfig, TrainingConfig
    from multimodal_fl.encoders.image import ImageEncoder
    from multimodal_fl.encoders.tabular import TabularEncoder
    from multimodal_fl.encoders.text import TextEncoder
    from multimodal_fl.encoders.transforms import ImageTransformSpec

__all__ = [
    "EVAL_METRICS",
    "SPLITS",
    "Batch",
    "CohortDataset",
    "FrozenEncoders",
    "ProximalFn",
    "SiteData",
    "TrainResult",
    "augment_images",
    "batch_augmenter",
    "build_model",
    "enabled_modalities",
    "evaluate",
    "fit_tabular_standardizer",
    "load_weights",
    "local_update",
    "predict",
    "prepare_site_data",
    "resolve_device",
    "split_patients",
    "train",
]

logger = logging.getLogger("multimodal_fl.training")

#: Split names, in order.
SPLITS: tuple[str, ...] = ("train", "val", "test")
#: Metrics :func:`evaluate` reports.
EVAL_METRICS: tuple[str, ...] = ("auc", "average_precision", "brier", "ece")
#: Columns kept beside the tensors for predictions and fairness tables (when in the table).
META_COLUMNS: tuple[str, ...] = ("patient_id", "site", "sex", "age", "age_band")

#: A proximal hook: ``proximal(model) -> scalar tensor`` added to the loss (FedProx).
ProximalFn = Callable[[nn.Module], torch.Tensor]


class CohortLike(Protocol):
    """What :func:`prepare_site_data` needs from a site cohort (``data.cohort.SiteCohort``)."""

    table: pd.DataFrame
    feature_names: list[str]


# ============================================================================ splits


def _fractions(fractions: Any) -> tuple[float, float, float]:
    if hasattr(fractions, "train") and hasattr(fractions, "val") and hasattr(fractions, "test"):
        f = (float(fractions.train), float(fractions.val), float(fractions.test))
    elif isinstance(fractions, Mapping):
        try:
            f = (float(fractions["train"]), float(fractions["val"]), float(fractions["test"]))
        except KeyError as exc:
            raise ValueError(
                f"split fractions need keys train, val and test; got {sorted(fractions)}"
            ) from exc
    else:
        seq = list(fractions)
        if len(seq) != 3:
            raise ValueError(f"split fractions must be (train, val, test), got {fractions!r}")
        f = (float(seq[0]), float(seq[1]), float(seq[2]))
    if any(x < 0 for x in f) or f[0] <= 0 or abs(sum(f) - 1.0) > 1e-6:
        raise ValueError(
            f"split fractions (train, val, test) = {f} must be non-negative, train > 0, "
            "and sum to 1"
        )
    return f


def _hash_uniform(seed: int, site: str, patient_id: str) -> float:
    digest = hashlib.sha256(f"mmfl-split|{seed}|{site}|{patient_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_patients(
    patient_ids: Sequence[str],
    labels: Sequence[int] | np.ndarray,
    *,
    seed: int,
    site: str,
    fractions: SplitConfig | Mapping[str, float] | Sequence[float],
) -> dict[str, str]:
    """Assign each patient of one site to ``train``, ``val`` or ``test``, stratified by label.

    Every patient gets a uniform number from ``sha256(seed, site, patient_id)``. Within each
    label class, patients are ranked by that number; the first ``round(n * test)`` go to
    test, the next ``round(n * val)`` to val and the rest to train. A class with at least
    3 patients puts at least one in each split with a positive fraction, so validation and
    test AUC are defined whenever the site has 3 patients of each class. The assignment
    depends only on the seed, the site name, the patient ids and their labels -- not on the
    order of the cohort -- so every engine gets the same split.

    Parameters
    ----------
    patient_ids : sequence of str
        Unique patient ids of one site.
    labels : sequence of int
        0/1 labels, same order.
    seed : int
        Experiment seed.
    site : str
        Site name.
    fractions : SplitConfig, mapping or (train, val, test)
        Fractions summing to 1.

    Returns
    -------
    dict of str to str
        ``{patient_id: "train" | "val" | "test"}``.
    """
    ids = [str(p) for p in patient_ids]
    y = np.asarray(labels)
    if y.shape != (len(ids),):
        raise ValueError(f"site {site!r}: {len(ids)} patient ids but labels of shape {y.shape}")
    if len(set(ids)) != len(ids):
        dupes = sorted({p for p in ids if ids.count(p) > 1})[:5]
        raise ValueError(f"site {site!r}: patient ids must be unique; repeated: {dupes}")
    bad = ~np.isin(y, (0, 1))
    if bad.any():
        raise ValueError(
            f"site {site!r}: labels must be 0 or 1; patient {ids[int(np.argmax(bad))]!r} has "
            f"{y[bad][0]!r}"
        )
    _, f_val, f_test = _fractions(fractions)
    out: dict[str, str] = {}
    for cls in (0, 1):
        members = [p for p, lab in zip(ids, y.tolist(), strict=True) if int(lab) == cls]
        members.sort(key=lambda p: (_hash_uniform(seed, site, p), p))
        n = len(members)
        n_test = round(n * f_test)
        n_val = round(n * f_val)
        if n >= 3:
            n_test = max(n_test, 1 if f_test > 0 else 0)
            n_val = max(n_val, 1 if f_val > 0 else 0)
        while n_test + n_val >= n and n > 0 and (n_test + n_val) > 0:
            # keep at least one training patient per class
            if n_val >= n_test and n_val > 0:
                n_val -= 1
            else:
                n_test -= 1
            if n_test + n_val < n:
                break
        for i, p in enumerate(members):
            out[p] = "test" if i < n_test else ("val" if i < n_test + n_val else "train")
    return out


# ============================================================================ datasets


@dataclass
class Batch:
    """One batch: per-modality inputs, presence mask, labels and patient ids.

    Attributes
    ----------
    inputs : dict of str to Tensor
        Per-modality tensors with ``B`` rows (raw images, tabular rows with NaN, or
        precomputed embeddings).
    mask : Tensor[B, M] of bool
        Presence mask, columns in ``modalities`` order.
    labels : Tensor[B] of float32
        0/1 labels.
    patient_ids : list of str
    """

    inputs: dict[str, torch.Tensor]
    mask: torch.Tensor
    labels: torch.Tensor
    patient_ids: list[str]

    def to(self, device: torch.device | str) -> Batch:
        """Return the batch on ``device``."""
        return Batch(
            {k: v.to(device) for k, v in self.inputs.items()},
            self.mask.to(device),
            self.labels.to(device),
            self.patient_ids,
        )


class CohortDataset(torch.utils.data.Dataset[dict[str, Any]]):
    """A cohort as tensors: one row per patient, ready for :class:`FusionModel`.

    Parameters
    ----------
    patient_ids : sequence of str
        Row names.
    labels : array-like of 0/1
        Labels.
    inputs : mapping of str to Tensor
        Per-modality tensors with one row per patient (``image``: ``[N, C, *S]``;
        ``tabular``: ``[N, F]`` with NaN for missing values; frozen modalities: ``[N, D]``
        embeddings). Rows of absent modalities are ignored.
    mask : Tensor[N, M] of bool
        Presence mask, columns in ``modalities`` order.
    modalities : sequence of str
        Modalities, in :data:`~multimodal_fl.fusion.MODALITIES` order.
    meta : DataFrame or None
        Per-row attributes kept for predictions (``patient_id``, ``site``, ``sex``, ``age``,
        ``age_band`` ...), same row order.
    precomputed : sequence of str
        Modalities whose input is a frozen encoder's embedding.

    Raises
    ------
    NoModalityError
        When a patient has no modality present.
    """

    def __init__(
        self,
        patient_ids: Sequence[str],
        labels: Any,
        inputs: Mapping[str, torch.Tensor],
        mask: torch.Tensor,
        modalities: Sequence[str],
        *,
        meta: pd.DataFrame | None = None,
        precomputed: Sequence[str] = (),
    ) -> None:
        self.patient_ids = [str(p) for p in patient_ids]
        n = len(self.patient_ids)
        self.modalities = tuple(m for m in MODALITIES if m in modalities)
        if len(self.modalities) != len(modalities) or len(set(modalities)) != len(modalities):
            raise ValueError(
                f"modalities {list(modalities)} must be distinct names from {list(MODALITIES)}"
            )
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.float32))
        if self.labels.shape != (n,):
            raise ValueError(f"{n} patients but labels of shape {tuple(self.labels.shape)}")
        if not bool(((self.labels == 0) | (self.labels == 1)).all()):
            raise ValueError("labels must be 0 or 1")
        self.mask = torch.as_tensor(mask).bool()
        if self.mask.shape != (n, len(self.modalities)):
            raise ValueError(
                f"mask must have shape [{n}, {len(self.modalities)}] (columns "
                f"{list(self.modalities)}), got {tuple(self.mask.shape)}"
            )
        self.inputs: dict[str, torch.Tensor] = {}
        for m in self.modalities:
            if m not in inputs:
                raise ValueError(f"no input tensor for modality {m!r} (got {sorted(inputs)})")
            t = inputs[m]
            if t.shape[0] != n:
                raise ValueError(f"input {m!r} has {t.shape[0]} rows for {n} patients")
            self.inputs[m] = t
        self.precomputed = tuple(m for m in self.modalities if m in precomputed)
        self.meta = (
            meta.reset_index(drop=True)
            if meta is not None
            else pd.DataFrame({"patient_id": self.patient_ids})
        )
        if len(self.meta) != n:
            raise ValueError(f"meta has {len(self.meta)} rows for {n} patients")
        empty = (~self.mask.any(1)).nonzero().flatten().tolist()
        if n and empty:
            raise NoModalityError([self.patient_ids[i] for i in empty])

    # -- construction ---------------------------------------------------------------

    @classmethod
    def from_table(
        cls,
        table: pd.DataFrame,
        *,
        modalities: Sequence[str],
        feature_names: Sequence[str] = (),
        embeddings: Mapping[str, Any] | None = None,
        images: torch.Tensor | None = None,
        present: Mapping[str, Any] | None = None,
    ) -> CohortDataset:
        """Build from a cohort table plus precomputed tensors.

        Parameters
        ----------
        table : DataFrame
            Cohort rows: ``patient_id``, ``label``, ``has_<modality>`` columns, the feature
            columns, and optionally ``site``, ``sex``, ``age``, ``age_band``.
        modalities : sequence of str
            Modalities to use.
        feature_names : sequence of str
            Tabular input columns, in order (required when ``tabular`` is used).
        embeddings : mapping of str to array [N, D] or None
            Precomputed (frozen-encoder) embeddings by modality, rows in table order.
        images : Tensor[N, C, *S] or None
            Preprocessed images for a trainable image encoder (zeros where absent).
        present : mapping of str to bool array or None
            Presence overriding the table's ``has_<modality>`` (e.g. an image that failed to
            read is absent).

        Returns
        -------
        CohortDataset
        """
        embeddings = dict(embeddings or {})
        present = dict(present or {})
        mods = [m for m in MODALITIES if m in modalities]
        for col in ("patient_id", "label"):
            if col not in table.columns:
                raise ValueError(f"cohort table lacks column {col!r} (has {list(table.columns)})")
        n = len(table)
        inputs: dict[str, torch.Tensor] = {}
        mask_cols: list[np.ndarray] = []
        for m in mods:
            if m in present:
                pres = np.asarray(present[m], dtype=bool)
            elif f"has_{m}" in table.columns:
                pres = table[f"has_{m}"].fillna(False).to_numpy(dtype=bool)
            else:
                raise ValueError(
                    f"cohort table lacks column 'has_{m}' and no presence was given for {m!r}"
                )
            if pres.shape != (n,):
                raise ValueError(f"presence of {m!r} has shape {pres.shape}, expected ({n},)")
            if m in embeddings:
                inputs[m] = torch.as_tensor(np.asarray(embeddings[m], dtype=np.float32))
            elif m == "tabular":
                missing = [c for c in feature_names if c not in table.columns]
                if not feature_names or missing:
                    raise ValueError(
                        "tabular modality needs feature_names that are columns of the table; "
                        f"missing: {missing[:5] if missing else 'no feature names given'}"
                    )
                x = table[list(feature_names)].to_numpy(dtype=np.float32, na_value=np.nan)
                inputs[m] = torch.from_numpy(np.ascontiguousarray(x))
            elif m == "image":
                if images is None:
                    raise ValueError(
                        "image modality needs preprocessed images (images=) or precomputed "
                        "embeddings (embeddings['image'])"
                    )
                inputs[m] = images
            else:
                raise ValueError(
                    f"modality {m!r} needs precomputed embeddings (embeddings[{m!r}]); raw text "
                    "is encoded by a frozen TextEncoder through the cache"
                )
            mask_cols.append(pres)
        mask = torch.from_numpy(np.stack(mask_cols, 1)) if mask_cols else torch.zeros(n, 0)
        meta = table[[c for c in META_COLUMNS if c in table.columns]].copy()
        return cls(
            table["patient_id"].astype(str).tolist(),
            table["label"].to_numpy(),
            inputs,
            mask,
            mods,
            meta=meta,
            precomputed=[m for m in mods if m in embeddings],
        )

    @classmethod
    def concat(cls, datasets: Sequence[CohortDataset]) -> CohortDataset:
        """Stack datasets with the same modalities (e.g. pooled sites for centralized training).

        Parameters
        ----------
        datasets : sequence of CohortDataset
            At least one; same modalities and per-modality trailing shapes.

        Returns
        -------
        CohortDataset
        """
        if not datasets:
            raise ValueError("CohortDataset.concat needs at least one dataset")
        first = datasets[0]
        for d in datasets[1:]:
            if d.modalities != first.modalities:
                raise ValueError(
                    f"cannot pool datasets with modalities {first.modalities} and {d.modalities}"
                )
        return cls(
            [p for d in datasets for p in d.patient_ids],
            torch.cat([d.labels for d in datasets]).numpy(),
            {m: torch.cat([d.inputs[m] for d in datasets]) for m in first.modalities},
            torch.cat([d.mask for d in datasets]),
            first.modalities,
            meta=pd.concat([d.meta for d in datasets], ignore_index=True),
            precomputed=first.precomputed,
        )

    # -- access -----------------------------------------------------------------------

    def __len__(self) -> int:
        """Number of patients."""
        return len(self.patient_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        """One patient as a dict: modality tensors, ``mask``, ``label``, ``patient_id``."""
        item: dict[str, Any] = {m: self.inputs[m][i] for m in self.modalities}
        item.update(mask=self.mask[i], label=self.labels[i], patient_id=self.patient_ids[i])
        return item

    def batch(self, index: torch.Tensor | Sequence[int]) -> Batch:
        """Gather rows into a :class:`Batch`.

        Parameters
        ----------
        index : Tensor or sequence of int
            Row numbers.

        Returns
        -------
        Batch
        """
        idx = torch.as_tensor(index, dtype=torch.long)
        return Batch(
            {m: t.index_select(0, idx) for m, t in self.inputs.items()},
            self.mask.index_select(0, idx),
            self.labels.index_select(0, idx),
            [self.patient_ids[i] for i in idx.tolist()],
        )

    def batches(self, batch_size: int = 256) -> Iterator[Batch]:
        """Iterate over the rows in order, ``batch_size`` at a time."""
        for start in range(0, len(self), batch_size):
            yield self.batch(range(start, min(start + batch_size, len(self))))

    def subset(self, index: torch.Tensor | Sequence[int]) -> CohortDataset:
        """Return the rows ``index`` as a new dataset (tensors are gathered, not shared)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        rows = idx.tolist()
        return CohortDataset(
            [self.patient_ids[i] for i in rows],
            self.labels.index_select(0, idx).numpy(),
            {m: t.index_select(0, idx) for m, t in self.inputs.items()},
            self.mask.index_select(0, idx),
            self.modalities,
            meta=self.meta.iloc[rows].reset_index(drop=True),
            precomputed=self.precomputed,
        )

    def select_modalities(self, modalities: Sequence[str]) -> CohortDataset:
        """Keep only some modalities; patients left with none are dropped (for ablations).

        Parameters
        ----------
        modalities : sequence of str
            A non-empty subset of :attr:`modalities`.

        Returns
        -------
        CohortDataset
        """
        unknown = sorted(set(modalities) - set(self.modalities))
        if unknown or not modalities:
            raise ValueError(
                f"select_modalities: {list(modalities)} must be a non-empty subset of "
                f"{list(self.modalities)}"
            )
        cols = [j for j, m in enumerate(self.modalities) if m in modalities]
        mask = self.mask[:, cols]
        keep = mask.any(1).nonzero().flatten()
        mods = [self.modalities[j] for j in cols]
        return CohortDataset(
            [self.patient_ids[i] for i in keep.tolist()],
            self.labels.index_select(0, keep).numpy(),
            {m: self.inputs[m].index_select(0, keep) for m in mods},
            mask.index_select(0, keep),
            mods,
            meta=self.meta.iloc[keep.tolist()].reset_index(drop=True),
            precomputed=[m for m in self.precomputed if m in mods],
        )

    def modality_counts(self) -> dict[str, int]:
        """Patients with each modality present."""
        return {m: int(self.mask[:, j].sum()) for j, m in enumerate(self.modalities)}

    def input_dims(self) -> dict[str, int]:
        """Width of each precomputed or tabular input (what :func:`build_model` needs)."""
        return {m: int(self.inputs[m].shape[1]) for m in self.modalities if m != "image"
                or m in self.precomputed}


@dataclass
class SiteData:
    """One site's prepared data: the full dataset and the split of its patients.

    Attributes
    ----------
    site : str
        Site name.
    dataset : CohortDataset
        Every usable patient of the site.
    splits : dict of str to str
        ``{patient_id: "train" | "val" | "test"}`` (from :func:`split_patients`).
    feature_names : list of str
        Tabular input columns.
    dropped : dict of str to str
        Patients left out, with the reason (e.g. no modality present).
    image_errors : dict of str to str
        Patients whose image could not be read (their image counts as absent).
    """

    site: str
    dataset: CohortDataset
    splits: dict[str, str]
    feature_names: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)
    image_errors: dict[str, str] = field(default_factory=dict)
    _parts: dict[str, tuple[tuple[int, int], CohortDataset]] = field(
        default_factory=dict, repr=False, compare=False
    )

    def part(self, split: str) -> CohortDataset:
        """The patients of one split (``"train"``, ``"val"``, ``"test"``) or ``"all"``.

        The subset is built once and reused while ``dataset`` and ``splits`` are the same
        objects (replace them rather than mutating them in place).
        """
        if split == "all":
            return self.dataset
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; accepted: {list(SPLITS)} or 'all'")
        key = (id(self.dataset), id(self.splits))
        cached = self._parts.get(split)
        if cached is not None and cached[0] == key:
            return cached[1]
        idx = [i for i, p in enumerate(self.dataset.patient_ids) if self.splits[p] == split]
        sub = self.dataset.subset(idx)
        self._parts[split] = (key, sub)
        return sub

    @property
    def train(self) -> CohortDataset:
        """Training patients."""
        return self.part("train")

    @property
    def val(self) -> CohortDataset:
        """Validation patients."""
        return self.part("val")

    @property
    def test(self) -> CohortDataset:
        """Test patients."""
        return self.part("test")


# ============================================================================ preparation


def _section(section: Any, drop: Sequence[str] = ("enabled", "max_chunks")) -> dict[str, Any]:
    """A modality config section as encoder keyword arguments (training-only keys removed)."""
    data = dict(section.model_dump()) if hasattr(section, "model_dump") else dict(section)
    for k in drop:
        data.pop(k, None)
    return data


def enabled_modalities(cfg: ExperimentConfig) -> list[str]:
    """Modalities enabled in the config, in canonical order."""
    return [m for m in MODALITIES if getattr(cfg.modalities, m).enabled]


class FrozenEncoders:
    """The frozen encoders of an experiment, built once and shared by every site.

    Parameters
    ----------
    cfg : ExperimentConfig
        The experiment; ``modalities.text`` (when enabled) must be frozen, and
        ``modalities.image`` is frozen when ``frozen: true``.

    Attributes
    ----------
    text : TextEncoder or None
        Built on first use (loading a transformers model takes seconds).
    image : ImageEncoder or None
        A frozen image backbone (no projection head; initialised from ``cfg.seed`` unless
        ``weights`` is given), built on first use.
    image_spec : ImageTransformSpec or None
        The evaluation preprocessing of images (used for every image, trainable or frozen).
    """

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        self._text: TextEncoder | None = None
        self._image: ImageEncoder | None = None
        self.image_spec: ImageTransformSpec | None = None
        img = cfg.modalities.image
        if img.enabled:
            from multimodal_fl.encoders.transforms import ImageTransformSpec

            self.image_spec = ImageTransformSpec(
                spatial_dims=img.spatial_dims, size=img.size, channels=img.in_channels
            )
        txt = cfg.modalities.text
        if txt.enabled and not txt.frozen:
            raise ValueError(
                "modalities.text.frozen=false is not supported by the training loop yet (it "
                "trains on cached embeddings); set modalities.text.frozen: true"
            )

    @property
    def text(self) -> TextEncoder:
        """The frozen text encoder."""
        if self._text is None:
            from multimodal_fl.encoders.text import TextEncoder

            self._text = TextEncoder.from_config(_section(self.cfg.modalities.text))
            self._text.eval()
        return self._text

    @property
    def image(self) -> ImageEncoder:
        """The frozen image backbone (``output_dim`` = backbone width)."""
        if self._image is None:
            from multimodal_fl.encoders.image import ImageEncoder

            sec = _section(self.cfg.modalities.image, drop=("enabled", "size", "augment"))
            sec.update(embed_dim=None, frozen=True)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.cfg.seed)
                self._image = ImageEncoder.from_config(sec)
            self._image.eval()
        return self._image


def _image_path(raw: Any, site_dir: Path | None) -> Path | None:
    if raw is None or (isinstance(raw, float) and math.isnan(raw)) or str(raw) == "":
        return None
    p = Path(str(raw))
    if not p.is_absolute() and site_dir is not None:
        p = site_dir / p
    return p


def _load_images(
    paths: Sequence[Path | None],
    spec: ImageTransformSpec,
    *,
    cache_root: Path | None,
    site: str,
) -> tuple[torch.Tensor, np.ndarray, dict[int, str]]:
    """Read and preprocess images once (through the cache when given); zeros where absent.

    An unreadable file is cached as a NaN row (the same bytes fail the same way), so it is
    reported, not re-read, by later runs.
    """
    from multimodal_fl.encoders.transforms import ImageReadError, load_image

    shape = (spec.channels, *([spec.size] * spec.spatial_dims))
    out = torch.zeros(len(paths), *shape)
    ok = np.zeros(len(paths), dtype=bool)
    errors: dict[int, str] = {}
    rows = [i for i, p in enumerate(paths) if p is not None]
    readable: list[int] = []
    for i in rows:
        p = paths[i]
        if p is not None and p.exists():
            readable.append(i)
        else:
            errors[i] = f"image file {str(p)!r} does not exist"
    if not readable:
        return out, ok, errors

    reasons: dict[str, str] = {}

    def compute(items: list[Path]) -> np.ndarray:
        arrs = []
        for item in items:
            try:
                arrs.append(load_image(item, spec=spec).reshape(-1).numpy())
            except ImageReadError as exc:
                arrs.append(np.full(int(np.prod(shape)), np.nan, dtype=np.float32))
                reasons[str(item)] = str(exc)
                logger.warning("site %s: %s", site, exc)
        return np.stack(arrs).astype(np.float32)

    items = [paths[i] for i in readable]
    with warnings.catch_warnings():
        # MONAI's DICOM reader warns on import when an optional GPU decoder is absent
        warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
        flat = _cached_pixels(items, compute, spec, cache_root=cache_root, site=site)
    for row, i in zip(flat, readable, strict=True):
        if np.isnan(row).any():
            errors[i] = reasons.get(
                str(paths[i]), f"image file {str(paths[i])!r} could not be read (cached result)"
            )
            continue
        out[i] = torch.from_numpy(row.reshape(shape))
        ok[i] = True
    return out, ok, errors


def _cached_pixels(
    items: list[Path | None],
    compute: Callable[[list[Path]], np.ndarray],
    spec: ImageTransformSpec,
    *,
    cache_root: Path | None,
    site: str,
) -> np.ndarray:
    from multimodal_fl.encoders.cache import EmbeddingCache

    if cache_root is not None:
        fp = hashlib.sha256(("pixels|" + spec.describe()).encode()).hexdigest()
        cache = EmbeddingCache(cache_root, fingerprint=fp, site=site,
                               description="preprocessed image pixels " + spec.describe())
        return cache.get_or_compute(items, compute)
    return compute(items)  # type: ignore[arg-type]


def prepare_site_data(
    cohort: CohortLike,
    cfg: ExperimentConfig,
    *,
    cache: str | os.PathLike[str] | None,
    site: str | None = None,
    site_dir: str | os.PathLike[str] | None = None,
    frozen: FrozenEncoders | None = None,
) -> SiteData:
    """Turn one site's cohort into tensors, once, and split its patients.

    Images are read and preprocessed once into one tensor (cached as pixels under
    ``cache``); frozen encoders (text; image when ``modalities.image.frozen``) are applied
    once through :class:`~multimodal_fl.encoders.cache.EmbeddingCache`. Patients with no
    usable modality are dropped and listed in :attr:`SiteData.dropped` when
    ``cfg.data.on_error == "skip"``; with ``"fail"`` they raise.

    Parameters
    ----------
    cohort : SiteCohort
        ``.table`` (one row per patient) and ``.feature_names``.
    cfg : ExperimentConfig
        The experiment (modalities, seed, split fractions, data policy).
    cache : path-like or None
        Embedding-cache root (``None``: compute without caching).
    site : str or None
        Site name; default ``cohort.site``/``cohort.name`` or the table's ``site`` column.
    site_dir : path-like or None
        Directory relative image paths are resolved against; default the config's site path.
    frozen : FrozenEncoders or None
        Shared frozen encoders (built from ``cfg`` when absent).

    Returns
    -------
    SiteData
    """
    table = cohort.table.reset_index(drop=True)
    name = site or getattr(cohort, "site", None) or getattr(cohort, "name", None)
    if not isinstance(name, str) or not name:
        if "site" in table.columns and table["site"].nunique() == 1:
            name = str(table["site"].iloc[0])
        else:
            raise ValueError("prepare_site_data: give site= (the cohort does not name its site)")
    if site_dir is None:
        match = [s.path for s in cfg.sites if s.name == name]
        site_dir = match[0] if match else None
    frozen = frozen or FrozenEncoders(cfg)
    cache_root = Path(cache) if cache is not None else None
    mods = enabled_modalities(cfg)
    feature_names = list(cohort.feature_names) if "tabular" in mods else []
    embeddings: dict[str, np.ndarray] = {}
    present: dict[str, np.ndarray] = {}
    images: torch.Tensor | None = None
    image_errors: dict[str, str] = {}
    pids = table["patient_id"].astype(str).tolist()

    if "image" in mods:
        assert frozen.image_spec is not None
        has = table["has_image"].fillna(False).to_numpy(dtype=bool) if "has_image" in table \
            else table["image_path"].notna().to_numpy()
        col = table["image_path"] if "image_path" in table else pd.Series([None] * len(table))
        paths = [
            _image_path(raw, Path(site_dir) if site_dir else None) if h else None
            for raw, h in zip(col.tolist(), has.tolist(), strict=True)
        ]
        pix, ok, errs = _load_images(paths, frozen.image_spec, cache_root=cache_root, site=name)
        image_errors = {pids[i]: msg for i, msg in errs.items()}
        present["image"] = ok
        if cfg.modalities.image.frozen:
            enc = frozen.image
            embeddings["image"] = _frozen_image_embeddings(
                enc, pix, ok, frozen.image_spec, cache_root=cache_root, site=name, paths=paths
            )
        else:
            images = pix

    if "text" in mods:
        notes_col = table["notes"] if "notes" in table else pd.Series([[]] * len(table))
        from multimodal_fl.encoders.text import normalize_notes

        notes = [normalize_notes(x) for x in notes_col.tolist()]
        has_text = np.array([bool(n) for n in notes])
        if "has_text" in table:
            has_text &= table["has_text"].fillna(False).to_numpy(dtype=bool)
        present["text"] = has_text
        embeddings["text"] = _frozen_text_embeddings(
            frozen, notes, has_text, cache_root=cache_root, site=name
        )

    if "tabular" in mods and "has_tabular" not in table:
        present["tabular"] = table[feature_names].notna().any(axis=1).to_numpy()

    cols = [
        present[m] if m in present else table[f"has_{m}"].fillna(False).to_numpy(dtype=bool)
        for m in mods
    ]
    any_present = np.stack(cols, 1).any(1)
    dropped: dict[str, str] = {}
    if not any_present.all():
        bad = [pids[i] for i in np.flatnonzero(~any_present)]
        if cfg.data.on_error == "fail":
            raise NoModalityError([f"{name}/{p}" for p in bad])
        dropped = {p: f"no usable modality of {mods}" for p in bad}
        logger.warning("site %s: %d patient(s) with no usable modality left out: %s",
                       name, len(bad), bad[:10])
        keep = np.flatnonzero(any_present)
        table = table.iloc[keep].reset_index(drop=True)
        embeddings = {m: e[keep] for m, e in embeddings.items()}
        present = {m: p[keep] for m, p in present.items()}
        if images is not None:
            images = images[torch.from_numpy(keep)]
    if "site" not in table.columns:
        table = table.assign(site=name)
    dataset = CohortDataset.from_table(
        table,
        modalities=mods,
        feature_names=feature_names,
        embeddings=embeddings,
        images=images,
        present=present,
    )
    splits = split_patients(
        dataset.patient_ids,
        dataset.labels.numpy().astype(int),
        seed=cfg.seed,
        site=name,
        fractions=cfg.training.split,
    )
    return SiteData(name, dataset, splits, feature_names, dropped, image_errors)


def _frozen_text_embeddings(
    frozen: FrozenEncoders,
    notes: list[list[str]],
    present: np.ndarray,
    *,
    cache_root: Path | None,
    site: str,
) -> np.ndarray:
    rows = np.flatnonzero(present)
    if rows.size == 0:
        # no note at this site: the encoder is still needed for its width only
        return np.zeros((len(notes), frozen.text.output_dim), dtype=np.float32)
    enc = frozen.text

    def compute(items: list[list[str]]) -> np.ndarray:
        with torch.no_grad():
            return enc.encode(items)[0].cpu().numpy()

    items = [notes[i] for i in rows]
    if cache_root is not None:
        from multimodal_fl.encoders.cache import EmbeddingCache

        cache = EmbeddingCache(cache_root, fingerprint=enc.fingerprint(), site=site,
                               description="frozen text encoder")
        emb = cache.get_or_compute(items, compute)
    else:
        emb = compute(items)
    out = np.zeros((len(notes), emb.shape[1]), dtype=np.float32)
    out[rows] = emb
    return out


def _frozen_image_embeddings(
    enc: ImageEncoder,
    pixels: torch.Tensor,
    ok: np.ndarray,
    spec: ImageTransformSpec,
    *,
    cache_root: Path | None,
    site: str,
    paths: Sequence[Path | None],
) -> np.ndarray:
    rows = [int(i) for i in np.flatnonzero(ok)]
    out = np.zeros((len(ok), enc.output_dim), dtype=np.float32)
    if not rows:
        return out

    def compute(items: list[int]) -> np.ndarray:
        idx = torch.as_tensor(items, dtype=torch.long)
        with torch.no_grad():
            parts = [enc(pixels[idx[s : s + 64]]) for s in range(0, len(idx), 64)]
        return torch.cat(parts).numpy()

    if cache_root is not None:
        from multimodal_fl.encoders.cache import EmbeddingCache, content_key

        cache = EmbeddingCache(
            cache_root, fingerprint=enc.fingerprint(spec.describe()), site=site,
            description="frozen image encoder",
        )
        keys = [content_key(paths[i]) for i in rows]
        emb = cache.get_or_compute(rows, compute, keys=keys)
    else:
        emb = compute(rows)
    out[rows] = emb
    return out


# ============================================================================ model


def build_model(cfg: ExperimentConfig, data: CohortDataset | SiteData) -> FusionModel:
    """Build the fusion model of an experiment for data shaped like ``data``.

    Initial weights are drawn from a generator seeded by ``cfg.seed`` (the global RNG is
    left as it was), so every site and engine starts from the same weights.

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
    from multimodal_fl.encoders.image import ImageEncoder
    from multimodal_fl.encoders.tabular import TabularEncoder

    encoders: dict[str, nn.Module | int] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        for m in ds.modalities:
            if m in ds.precomputed:
                encoders[m] = int(ds.inputs[m].shape[1])
            elif m == "image":
                sec = _section(cfg.modalities.image, drop=("enabled", "size", "augment"))
                encoders[m] = ImageEncoder.from_config(sec)
            elif m == "tabular":
                sec = _section(cfg.modalities.tabular)
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
    return model


def fit_tabular_standardizer(model: FusionModel, datasets: Sequence[CohortDataset]) -> None:
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
    """
    if "tabular" not in model.modalities or "tabular" in model.precomputed:
        return
    from multimodal_fl.encoders.tabular import Standardizer, combine_moments

    enc = cast("TabularEncoder", model.encoders["tabular"])
    moments = []
    for d in datasets:
        j = d.modalities.index("tabular")
        x = d.inputs["tabular"][d.mask[:, j]]
        moments.append(Standardizer.site_moments(x.numpy()))
    if moments:
        enc.standardizer.set_moments(*combine_moments(moments))


# ============================================================================ training


@dataclass
class TrainResult:
    """What a :func:`train` call did.

    Attributes
    ----------
    steps : int
        Optimisation steps run in this call.
    last_step : int
        ``start_step + steps``: the global step count after the call.
    loss : float
        Mean training loss (without the proximal term) over the steps of this call.
    history : list of dict
        One entry per validation: ``step``, ``train_loss`` (mean since the last entry),
        ``val_auc`` (float or None) and ``val_auc_reason`` (why it is None).
    best_step : int or None
        Step whose weights were kept by early stopping (None: final weights kept).
    best_val_auc : float or None
        Validation AUC at ``best_step``.
    stopped_early : bool
        Whether patience ran out before ``steps``.
    n_samples : int
        Training patients.
    modality_counts : dict of str to int
        Training patients with each modality present.
    pos_weight : float
        The positive-class weight used in the loss (negatives / positives).
    notes : list of str
        Human-readable remarks (e.g. "validation AUC undefined (no positives): early
        stopping off").
    """

    steps: int
    last_step: int
    loss: float
    history: list[dict[str, Any]] = field(default_factory=list)
    best_step: int | None = None
    best_val_auc: float | None = None
    stopped_early: bool = False
    n_samples: int = 0
    modality_counts: dict[str, int] = field(default_factory=dict)
    pos_weight: float = 1.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return {
            "steps": self.steps,
            "last_step": self.last_step,
            "loss": self.loss,
            "history": self.history,
            "best_step": self.best_step,
            "best_val_auc": self.best_val_auc,
            "stopped_early": self.stopped_early,
            "n_samples": self.n_samples,
            "modality_counts": self.modality_counts,
            "pos_weight": self.pos_weight,
            "notes": self.notes,
        }


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


def _generator_seed(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=generator).item())


def _batch_stream(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless batches of row indices: successive random permutations, cut into batches."""
    buf = torch.empty(0, dtype=torch.long)
    size = min(batch_size, n)
    while True:
        while buf.numel() < size:
            buf = torch.cat([buf, torch.randperm(n, generator=generator)])
        yield buf[:size]
        buf = buf[size:]


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    previous = torch.are_deterministic_algorithms_enabled()
    warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=warn)


def _val_auc(model: FusionModel, data: CohortDataset, device: torch.device) -> MetricValue:
    return evaluate(model, data, device=device, metrics=("auc",))["auc"]


def train(
    model: FusionModel,
    train_data: CohortDataset,
    val_data: CohortDataset | None,
    cfg: TrainingConfig,
    *,
    steps: int | None = None,
    generator: torch.Generator,
    start_step: int = 0,
    proximal: ProximalFn | None = None,
    augment: Callable[[Batch], Batch] | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Run ``steps`` optimisation steps of AdamW on ``train_data``, in place.

    Batches of ``cfg.batch_size`` rows are drawn without replacement from successive random
    permutations of the training rows (cycling through the data as often as ``steps``
    needs). The loss is ``BCEWithLogits`` with ``pos_weight`` = negatives / positives of the
    training rows. Every ``cfg.eval_every`` steps the validation AUC is computed; when it
    does not improve for ``cfg.patience`` evaluations, training stops and the best weights
    are restored. When the validation AUC is undefined (no positives or no negatives in
    ``val_data``), that is recorded in ``notes`` and early stopping is off.

    Parameters
    ----------
    model : FusionModel
        Trained in place (moved to ``cfg.device``).
    train_data : CohortDataset
        Training rows (at least one).
    val_data : CohortDataset or None
        Validation rows; ``None`` (or empty) disables validation and early stopping.
    cfg : TrainingConfig
        ``batch_size``, ``lr``, ``weight_decay``, ``eval_every``, ``patience``, ``device``.
    steps : int or None
        Steps to run; default ``cfg.steps``.
    generator : torch.Generator
        The only source of randomness (batch order; dropout and augmentation through a
        forked global RNG seeded from it). Seed it, e.g. from (seed, site, round).
    start_step : int, default 0
        Global step count before this call (for step numbers in ``history``).
    proximal : callable or None
        ``proximal(model) -> scalar`` added to the loss (FedProx). Its gradient is applied
        only to parameters the batch's loss reached, so parameters of a modality absent
        from a batch stay untouched (as without the term).
    augment : callable or None
        ``augment(batch) -> batch`` applied to training batches (e.g. image augmentation).
    progress : callable or None
        ``progress(step, loss)`` called after every step (e.g. to advance a progress bar).

    Returns
    -------
    TrainResult
    """
    steps = cfg.steps if steps is None else int(steps)
    if steps < 0:
        raise ValueError(f"steps must be non-negative, got {steps}")
    if len(train_data) == 0:
        raise ValueError("train: the training set is empty")
    device = resolve_device(cfg.device)
    model.to(device)
    y = train_data.labels
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    notes: list[str] = []
    if n_pos == 0 or n_neg == 0:
        pos_weight = 1.0
        notes.append(f"training set has {n_pos} positives and {n_neg} negatives: pos_weight=1")
    else:
        pos_weight = n_neg / n_pos
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight, device=device))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    validate = val_data is not None and len(val_data) > 0
    result = TrainResult(
        steps=0,
        last_step=start_step,
        loss=float("nan"),
        n_samples=len(train_data),
        modality_counts=train_data.modality_counts(),
        pos_weight=float(pos_weight),
        notes=notes,
    )
    best_state: dict[str, torch.Tensor] | None = None
    best_auc = -math.inf
    bad_evals = 0
    early_ok = True
    total_loss = 0.0
    window_loss, window_n = 0.0, 0
    stream = _batch_stream(len(train_data), cfg.batch_size, generator)
    cuda_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_ids), _deterministic():
        torch.manual_seed(_generator_seed(generator))
        for k in range(steps):
            step = start_step + k + 1
            model.train()
            batch = train_data.batch(next(stream))
            if augment is not None:
                batch = augment(batch)
            batch = batch.to(device)
            logits = model(batch.inputs, batch.mask, patient_ids=batch.patient_ids)
            loss = loss_fn(logits, batch.labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if proximal is not None:
                untouched = [p for p in params if p.grad is None]
                proximal(model).backward()
                for p in untouched:
                    p.grad = None
            opt.step()
            value = float(loss.detach())
            total_loss += value
            window_loss += value
            window_n += 1
            result.steps = k + 1
            result.last_step = step
            if progress is not None:
                progress(step, value)
            if validate and step % cfg.eval_every == 0:
                assert val_data is not None
                auc = _val_auc(model, val_data, device)
                entry: dict[str, Any] = {
                    "step": step,
                    "train_loss": window_loss / window_n,
                    "val_auc": auc.value,
                    "val_auc_reason": auc.reason,
                }
                result.history.append(entry)
                window_loss, window_n = 0.0, 0
                if auc.value is None:
                    if early_ok:
                        notes.append(
                            f"validation AUC undefined ({auc.reason}): early stopping off, "
                            "final weights kept"
                        )
                    early_ok = False
                    continue
                if auc.value > best_auc:
                    best_auc = auc.value
                    bad_evals = 0
                    result.best_step = step
                    result.best_val_auc = float(auc.value)
                    best_state = copy.deepcopy(model.state_dict())
                else:
                    bad_evals += 1
                    if early_ok and cfg.patience > 0 and bad_evals >= cfg.patience:
                        result.stopped_early = True
                        break
    result.loss = total_loss / result.steps if result.steps else float("nan")
    if early_ok and best_state is not None:
        model.load_state_dict(best_state)
    else:
        result.best_step = None
        result.best_val_auc = None
    return result


def load_weights(model: nn.Module, weights: Mapping[str, Any], *, strict: bool = True) -> None:
    """Load a state dict of tensors or numpy arrays into ``model`` (copied, dtype kept).

    Parameters
    ----------
    model : nn.Module
    weights : mapping of str to Tensor or ndarray
        E.g. a federated request's global weights.
    strict : bool, default True
        Missing or unexpected keys are an error (False, e.g. for FedBN's local keys, loads
        the keys given).
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
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if strict and (missing or unexpected):
        raise ValueError(
            f"weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.load_state_dict(state, strict=strict)


def local_update(
    model: FusionModel,
    weights: Mapping[str, Any] | None,
    train_data: CohortDataset,
    cfg: TrainingConfig,
    *,
    steps: int,
    generator: torch.Generator,
    proximal: ProximalFn | None = None,
    augment: Callable[[Batch], Batch] | None = None,
    strict: bool = True,
) -> TrainResult:
    """One federated site's local training: load ``weights``, run ``steps`` steps, no validation.

    A fresh AdamW optimiser is created at every call: the optimiser state is reset every
    round by design (see the module docstring).

    Parameters
    ----------
    model : FusionModel
        Updated in place.
    weights : mapping or None
        Starting state dict (``None``: keep the model's current weights).
    train_data : CohortDataset
    cfg : TrainingConfig
    steps : int
        Local steps.
    generator : torch.Generator
        Seeded by the caller, e.g. from (seed, site, round).
    proximal : callable or None
        FedProx term.
    augment : callable or None
        Training-batch augmentation.
    strict : bool, default True
        Passed to :func:`load_weights`.

    Returns
    -------
    TrainResult
        ``n_samples`` and ``modality_counts`` give the per-group sample counts
        (:meth:`FusionModel.group_counts`).
    """
    if weights is not None:
        load_weights(model, weights, strict=strict)
    return train(
        model, train_data, None, cfg, steps=steps, generator=generator, proximal=proximal,
        augment=augment,
    )


# ============================================================================ inference


@torch.no_grad()
def predict(
    model: FusionModel,
    data: CohortDataset,
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Predicted probabilities, one per row of ``data``.

    Parameters
    ----------
    model : FusionModel
    data : CohortDataset
    batch_size : int, default 256
    device : str, torch.device or None
        Default: the model's device.

    Returns
    -------
    ndarray of float64, shape (len(data),)
    """
    dev = resolve_device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    model.to(dev)
    out: list[np.ndarray] = []
    try:
        for b in data.batches(batch_size):
            b = b.to(dev)
            logits = model(b.inputs, b.mask, patient_ids=b.patient_ids)
            out.append(torch.sigmoid(logits.double()).cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float64)


def evaluate(
    model: FusionModel,
    data: CohortDataset,
    *,
    metrics: Sequence[str] = EVAL_METRICS,
    n_boot: int = 0,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> dict[str, MetricValue]:
    """AUC, average precision, Brier score and ECE of the model on ``data``.

    An undefined metric (no patients, no positives or no negatives) is a
    :class:`~multimodal_fl.evaluation.metrics.MetricValue` with ``value=None`` and its
    ``reason``, never a number.

    Parameters
    ----------
    model : FusionModel
    data : CohortDataset
    metrics : sequence of str
        Subset of :data:`EVAL_METRICS` (threshold-free metrics).
    n_boot : int, default 0
        Bootstrap resamples for 95% intervals.
    seed : int, default 0
        Bootstrap seed.
    device : str, torch.device or None

    Returns
    -------
    dict of str to MetricValue
    """
    scores = predict(model, data, device=device)
    return binary_metrics(
        data.labels.numpy().astype(np.int64), scores, metrics=list(metrics), n_boot=n_boot,
        seed=seed,
    )
