"""A cohort as tensors: :class:`CohortDataset`, its :class:`Batch`, one site's :class:`SiteData`."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from multimodal_fl.fusion import MODALITIES, NoModalityError
from multimodal_fl.training.splits import SPLITS

__all__ = ["META_COLUMNS", "Batch", "CohortDataset", "SiteData"]

#: Columns kept beside the tensors for predictions and fairness tables (when in the table).
META_COLUMNS: tuple[str, ...] = ("patient_id", "site", "sex", "age", "age_band")


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
    notes : list of str
        What reading the site's files noticed, once per condition (e.g. DICOM files
        without orientation tags), instead of a warning per file.
    """

    site: str
    dataset: CohortDataset
    splits: dict[str, str]
    feature_names: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)
    image_errors: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
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
