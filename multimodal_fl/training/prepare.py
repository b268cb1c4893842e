"""Preparation: a site's cohort table into tensors, once (images read, frozen encoders applied).

:func:`prepare_site_data` turns a site's cohort table into a :class:`SiteData` holding a
:class:`CohortDataset`: images are read and preprocessed once, at the configured size (never
held at the source's); frozen encoders (text by default, image when ``frozen: true``) are
applied once through the embedding cache, so the model sees their embeddings (a frozen image
encoder embeds the images :data:`IMAGE_CHUNK` at a time as they are read, and only the
embeddings are kept); trainable modalities keep their raw input. Patients are split
with :func:`split_patients`. :func:`load_site_data` does it for every site of a config.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd
import torch

from multimodal_fl.data.cohort import build_cohorts, check_site_count, empty_site_message
from multimodal_fl.encoders.cache import EmbeddingCache, content_key
from multimodal_fl.encoders.image import ImageEncoder
from multimodal_fl.encoders.text import TextEncoder, normalize_notes
from multimodal_fl.encoders.transforms import (
    ImageReadError,
    ImageTransformSpec,
    apply_transform,
    build_transform,
)
from multimodal_fl.fusion import MODALITIES, NoModalityError
from multimodal_fl.progress import PrepareEvent, ProgressCallback, Tally
from multimodal_fl.training.dataset import CohortDataset, SiteData
from multimodal_fl.training.model import encoder_kwargs
from multimodal_fl.training.splits import split_patients

if TYPE_CHECKING:
    from multimodal_fl.config import ExperimentConfig

__all__ = [
    "CohortLike",
    "FrozenEncoders",
    "cache_root",
    "enabled_modalities",
    "load_site_data",
    "prepare_site_data",
]

logger = logging.getLogger(__name__)


class CohortLike(Protocol):
    """What :func:`prepare_site_data` needs from a site cohort (``data.cohort.SiteCohort``)."""

    table: pd.DataFrame
    feature_names: list[str]


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
            self._text = TextEncoder.from_config(encoder_kwargs(self.cfg.modalities.text))
            self._text.eval()
        return self._text

    @property
    def image(self) -> ImageEncoder:
        """The frozen image backbone (``output_dim`` = backbone width)."""
        if self._image is None:
            sec = encoder_kwargs(self.cfg.modalities.image, drop=("enabled", "size", "augment"))
            sec.update(embed_dim=None, frozen=True)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.cfg.seed)
                self._image = ImageEncoder.from_config(sec)
            self._image.eval()
        return self._image


def _image_path(raw: Any, site_dir: Path | None) -> Path | None:
    """The image file of a table's ``image_path`` entry; ``None`` when missing (NaN, pd.NA, "")."""
    if raw is None or (pd.api.types.is_scalar(raw) and pd.isna(raw)) or str(raw) == "":
        return None
    p = Path(str(raw))
    if not p.is_absolute() and site_dir is not None:
        p = site_dir / p
    return p


def _load_images(
    paths: Sequence[Path | None],
    spec: ImageTransformSpec,
    *,
    cache_dir: Path | None,
    site: str,
    progress: ProgressCallback | None = None,
    notes: list[str] | None = None,
) -> tuple[torch.Tensor, np.ndarray, dict[int, str]]:
    """Read and preprocess images once (through the cache when given); zeros where absent.

    An unreadable file is cached as a NaN row (the same bytes fail the same way), so it is
    reported, not re-read, by later runs. What the reads noticed about the files (DICOM
    without orientation tags) is added to ``notes``, once for the site.
    """
    shape = (spec.channels, *([spec.size] * spec.spatial_dims))
    out = torch.zeros(len(paths), *shape)
    ok = np.zeros(len(paths), dtype=bool)
    readable, errors = _readable(paths)
    if not readable:
        return out, ok, errors

    reasons: dict[str, str] = {}
    no_geometry: list[str] = []
    tally = Tally(progress, site, "image", "read", total=len(readable))

    def compute(items: list[Path]) -> np.ndarray:
        tally.hit(len(readable) - len(items))
        arrs = []
        pipeline = build_transform(spec)  # one pipeline for every file (no random step)
        for item in items:
            try:
                arrs.append(apply_transform(pipeline, item, notes=no_geometry)
                            .reshape(-1).numpy())
            except ImageReadError as exc:
                arrs.append(np.full(int(np.prod(shape)), np.nan, dtype=np.float32))
                reasons[str(item)] = str(exc)
                logger.warning("site %s: %s", site, exc)
            tally.advance()
        return np.stack(arrs).astype(np.float32)

    items = [paths[i] for i in readable]
    tally.start()
    with warnings.catch_warnings():
        # MONAI's DICOM reader warns on import when an optional GPU decoder is absent
        warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
        flat, hits = _cached_pixels(items, compute, spec, cache_dir=cache_dir, site=site)
    tally.finish(hits)
    if no_geometry:
        _note_missing_geometry(no_geometry, spec, site=site, notes=notes)
    for row, i in zip(flat, readable, strict=True):
        if np.isnan(row).any():
            errors[i] = reasons.get(
                str(paths[i]), f"image file {str(paths[i])!r} could not be read (cached result)"
            )
            continue
        out[i] = torch.from_numpy(row.reshape(shape))
        ok[i] = True
    return out, ok, errors


def _note_missing_geometry(files: list[str], spec: ImageTransformSpec, *, site: str,
                           notes: list[str] | None) -> None:
    """Record, once for the site, the DICOM files read without orientation tags."""
    effect = ("no effect on 2D images" if spec.spatial_dims == 2
              else "3D volumes may be misoriented before the reorientation to "
              f"{spec.orientation}")
    note = (f"{len(files)} DICOM file(s) without ImageOrientationPatient/ImagePositionPatient "
            f"(e.g. {Path(files[0]).name}): read with an identity orientation ({effect})")
    if notes is not None:
        notes.append(note)
    logger.log(logging.INFO if spec.spatial_dims == 2 else logging.WARNING,
               "site %s: %s", site, note)


def _cached_pixels(
    items: list[Path | None],
    compute: Callable[[list[Path]], np.ndarray],
    spec: ImageTransformSpec,
    *,
    cache_dir: Path | None,
    site: str,
) -> tuple[np.ndarray, int]:
    """The images' preprocessed pixels, read or from the cache, and the cache hits."""
    if cache_dir is not None:
        fp = hashlib.sha256(("pixels|" + spec.describe()).encode()).hexdigest()
        cache = EmbeddingCache(cache_dir, fingerprint=fp, site=None,
                               description="preprocessed image pixels " + spec.describe())
        return cache.get_or_compute(items, compute), cache.hits
    return compute(items), 0  # type: ignore[arg-type]


def prepare_site_data(
    cohort: CohortLike,
    cfg: ExperimentConfig,
    *,
    cache: str | os.PathLike[str] | None,
    site: str | None = None,
    site_dir: str | os.PathLike[str] | None = None,
    frozen: FrozenEncoders | None = None,
    progress: ProgressCallback | None = None,
) -> SiteData:
    """Turn one site's cohort into tensors, once, and split its patients.

    Images are read and preprocessed once at the configured size: into one tensor (cached
    as pixels under ``cache``) for a trainable image encoder, or straight into a frozen one's
    embeddings, :data:`IMAGE_CHUNK` images at a time; frozen encoders (text; image when
    ``modalities.image.frozen``) are applied once through
    :class:`~multimodal_fl.encoders.cache.EmbeddingCache`. Patients with no
    usable modality are dropped and listed in :attr:`SiteData.dropped` when
    ``cfg.data.on_error == "skip"``; with ``"fail"`` they raise.

    Parameters
    ----------
    cohort : SiteCohort
        ``.table`` (one row per patient) and ``.feature_names``.
    cfg : ExperimentConfig
        The experiment (modalities, seed, split fractions, data policy).
    cache : path-like or None
        This site's embedding-cache folder, e.g. ``cache_root(cfg, run_dir, site)``
        (``None``: compute without caching).
    site : str or None
        Site name; default ``cohort.site``/``cohort.name`` or the table's ``site`` column.
    site_dir : path-like or None
        Directory relative image paths are resolved against; default the config's site path.
    frozen : FrozenEncoders or None
        Shared frozen encoders (built from ``cfg`` when absent).
    progress : callable or None
        Called with a :class:`~multimodal_fl.progress.PrepareEvent` as images are read and
        notes or images embedded (per modality: items done, total, cache hits).

    Returns
    -------
    SiteData
        With :attr:`SiteData.notes`: what reading the files noticed (e.g. DICOM files
        without orientation tags), once for the site.
    """
    table = cohort.table.reset_index(drop=True)
    name = _site_name(cohort, table, site)
    if site_dir is None:
        match = [s.path for s in cfg.sites if s.name == name]
        site_dir = match[0] if match else None
    frozen = frozen or FrozenEncoders(cfg)
    cache_dir = Path(cache) if cache is not None else None
    mods = enabled_modalities(cfg)
    feature_names = list(cohort.feature_names) if "tabular" in mods else []
    inputs = _SiteInputs()
    pids = table["patient_id"].astype(str).tolist()

    if "image" in mods:
        _read_images(table, cfg, frozen, inputs, pids=pids, site=name, cache_dir=cache_dir,
                     site_dir=Path(site_dir) if site_dir else None, progress=progress)
    if "text" in mods:
        _read_text(table, frozen, inputs, site=name, cache_dir=cache_dir, progress=progress)
    if "tabular" in mods and "has_tabular" not in table:
        inputs.present["tabular"] = table[feature_names].notna().any(axis=1).to_numpy()

    table, dropped = _drop_patients_without_modality(
        table, mods, inputs, pids=pids, site=name, on_error=cfg.data.on_error
    )
    if "site" not in table.columns:
        table = table.assign(site=name)
    dataset = CohortDataset.from_table(
        table,
        modalities=mods,
        feature_names=feature_names,
        embeddings=inputs.embeddings,
        images=inputs.images,
        present=inputs.present,
    )
    splits = split_patients(
        dataset.patient_ids,
        dataset.labels.numpy().astype(int),
        seed=cfg.seed,
        site=name,
        fractions=cfg.training.split,
    )
    return SiteData(name, dataset, splits, feature_names, dropped, inputs.image_errors,
                    notes=inputs.notes)


def _site_name(cohort: CohortLike, table: pd.DataFrame, site: str | None) -> str:
    """The site's name: ``site``, else the cohort's ``site``/``name``, else the table's one site."""
    name = site or getattr(cohort, "site", None) or getattr(cohort, "name", None)
    if not isinstance(name, str) or not name:
        if "site" in table.columns and table["site"].nunique() == 1:
            return str(table["site"].iloc[0])
        raise ValueError("prepare_site_data: give site= (the cohort does not name its site)")
    return name


@dataclass
class _SiteInputs:
    """What preparation has read so far: embeddings, presence and raw images by modality."""

    embeddings: dict[str, np.ndarray] = field(default_factory=dict)
    present: dict[str, np.ndarray] = field(default_factory=dict)
    images: torch.Tensor | None = None
    image_errors: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def keep(self, rows: np.ndarray) -> None:
        """Keep only the patients at table rows ``rows``."""
        self.embeddings = {m: e[rows] for m, e in self.embeddings.items()}
        self.present = {m: p[rows] for m, p in self.present.items()}
        if self.images is not None:
            self.images = self.images[torch.from_numpy(rows)]


def _read_images(
    table: pd.DataFrame,
    cfg: ExperimentConfig,
    frozen: FrozenEncoders,
    inputs: _SiteInputs,
    *,
    pids: list[str],
    site: str,
    cache_dir: Path | None,
    site_dir: Path | None,
    progress: ProgressCallback | None,
) -> None:
    """Read the site's images once at the configured size; a frozen encoder embeds them as read.

    A trainable encoder keeps every image at the configured size (never the source's); a
    frozen one keeps only their embeddings (:func:`_frozen_image_embeddings`).
    """
    spec = frozen.image_spec
    assert spec is not None
    has = table["has_image"].fillna(False).to_numpy(dtype=bool) if "has_image" in table \
        else table["image_path"].notna().to_numpy()
    col = table["image_path"] if "image_path" in table else pd.Series([None] * len(table))
    paths = [
        _image_path(raw, site_dir) if h else None
        for raw, h in zip(col.tolist(), has.tolist(), strict=True)
    ]
    if cfg.modalities.image.frozen:
        emb, ok, errs = _frozen_image_embeddings(frozen, paths, spec, cache_dir=cache_dir,
                                                 site=site, progress=progress,
                                                 notes=inputs.notes)
        inputs.embeddings["image"] = emb
    else:
        inputs.images, ok, errs = _load_images(paths, spec, cache_dir=cache_dir, site=site,
                                               progress=progress, notes=inputs.notes)
    inputs.image_errors = {pids[i]: msg for i, msg in errs.items()}
    inputs.present["image"] = ok


def _read_text(
    table: pd.DataFrame,
    frozen: FrozenEncoders,
    inputs: _SiteInputs,
    *,
    site: str,
    cache_dir: Path | None,
    progress: ProgressCallback | None,
) -> None:
    """Embed the site's notes with the frozen text encoder (through the cache)."""
    notes_col = table["notes"] if "notes" in table else pd.Series([[]] * len(table))
    notes = [normalize_notes(x) for x in notes_col.tolist()]
    has_text = np.array([bool(n) for n in notes])
    if "has_text" in table:
        has_text &= table["has_text"].fillna(False).to_numpy(dtype=bool)
    inputs.present["text"] = has_text
    inputs.embeddings["text"] = _frozen_text_embeddings(
        frozen, notes, has_text, cache_dir=cache_dir, site=site, progress=progress
    )


def _drop_patients_without_modality(
    table: pd.DataFrame,
    mods: list[str],
    inputs: _SiteInputs,
    *,
    pids: list[str],
    site: str,
    on_error: str,
) -> tuple[pd.DataFrame, dict[str, str]]:
    """Leave out (``skip``) or refuse (``fail``) patients with no usable modality.

    Returns the table of the patients kept (``inputs`` cut alike) and the dropped ones with
    the reason.
    """
    cols = [
        inputs.present[m] if m in inputs.present
        else table[f"has_{m}"].fillna(False).to_numpy(dtype=bool)
        for m in mods
    ]
    any_present = np.stack(cols, 1).any(1)
    if any_present.all():
        return table, {}
    bad = [pids[i] for i in np.flatnonzero(~any_present)]
    if on_error == "fail":
        raise NoModalityError([f"{site}/{p}" for p in bad])
    dropped = {p: f"no usable modality of {mods}" for p in bad}
    logger.warning("site %s: %d patient(s) with no usable modality left out: %s",
                   site, len(bad), bad[:10])
    keep = np.flatnonzero(any_present)
    inputs.keep(keep)
    return table.iloc[keep].reset_index(drop=True), dropped


def _frozen_text_embeddings(
    frozen: FrozenEncoders,
    notes: list[list[str]],
    present: np.ndarray,
    *,
    cache_dir: Path | None,
    site: str,
    progress: ProgressCallback | None,
) -> np.ndarray:
    rows = np.flatnonzero(present)
    if rows.size == 0:
        # no note at this site: the encoder is still needed for its width only
        return np.zeros((len(notes), frozen.text.output_dim), dtype=np.float32)
    tally = Tally(progress, site, "text", "embedded", total=int(rows.size))
    tally.start()  # before the encoder loads (seconds for a transformers model)
    enc = frozen.text

    def compute(items: list[list[str]]) -> np.ndarray:
        done = len(rows) - len(items)
        tally.hit(done)
        with torch.no_grad():
            emb = enc.encode(items, progress=lambda n: tally.reach(done + n))
        return emb[0].cpu().numpy()

    items = [notes[i] for i in rows]
    if cache_dir is not None:
        cache = EmbeddingCache(cache_dir, fingerprint=enc.fingerprint(), site=None,
                               description="frozen text encoder")
        emb = cache.get_or_compute(items, compute)
        tally.finish(cache.hits)
    else:
        emb = compute(items)
        tally.finish()
    out = np.zeros((len(notes), emb.shape[1]), dtype=np.float32)
    out[rows] = emb
    return out


#: images decoded and embedded together by a frozen image encoder (the most held at once)
IMAGE_CHUNK = 64


def _readable(paths: Sequence[Path | None]) -> tuple[list[int], dict[int, str]]:
    """Rows whose image file exists, and why the others with a path cannot be read."""
    rows: list[int] = []
    errors: dict[int, str] = {}
    for i, p in enumerate(paths):
        if p is None:
            continue
        if p.exists():
            rows.append(i)
        else:
            errors[i] = f"image file {str(p)!r} does not exist"
    return rows, errors


def _embed_as_read(paths: Sequence[Path | None], spec: ImageTransformSpec, enc: ImageEncoder,
                   tallies: tuple[Tally, Tally], *, reasons: dict[str, str],
                   notes: list[str], site: str) -> np.ndarray:
    """Read ``paths`` and embed them :data:`IMAGE_CHUNK` at a time (NaN rows: unreadable)."""
    read, embedded = tallies
    emb = np.full((len(paths), enc.output_dim), np.nan, dtype=np.float32)
    batch: list[tuple[int, torch.Tensor]] = []
    pipeline = build_transform(spec)  # one pipeline for every file (no random step)
    for j, path in enumerate(paths):
        try:
            batch.append((j, apply_transform(pipeline, path, notes=notes)))  # type: ignore[arg-type]
        except ImageReadError as exc:
            reasons[str(path)] = str(exc)
            logger.warning("site %s: %s", site, exc)
            embedded.advance()
        read.advance()
        if len(batch) == IMAGE_CHUNK or (j == len(paths) - 1 and batch):
            with torch.no_grad():
                vectors = enc(torch.stack([px for _, px in batch])).numpy()
            emb[[k for k, _ in batch]] = vectors
            embedded.advance(len(batch))
            batch = []
    return emb


def _frozen_image_embeddings(
    frozen: FrozenEncoders,
    paths: Sequence[Path | None],
    spec: ImageTransformSpec,
    *,
    cache_dir: Path | None,
    site: str,
    progress: ProgressCallback | None,
    notes: list[str] | None,
) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """Embed the site's images with the frozen encoder, :data:`IMAGE_CHUNK` read at a time.

    Only the embeddings are kept: images are read (at the configured size) and embedded in
    chunks, so a site never holds more than a chunk of pixels. Embeddings are cached by file
    content; an unreadable file is cached as a NaN row (reported, not re-read, by later runs).

    Returns
    -------
    tuple
        ``(embeddings [N, D] (zeros where absent), present [N] bool, {row: why unreadable})``.
    """
    rows, errors = _readable(paths)
    read = Tally(progress, site, "image", "read", total=len(rows))
    embedded = Tally(progress, site, "image", "embedded", total=len(rows))
    read.start()
    embedded.start()  # before the backbone is built
    enc = frozen.image
    out = np.zeros((len(paths), enc.output_dim), dtype=np.float32)
    ok = np.zeros(len(paths), dtype=bool)
    if not rows:
        return out, ok, errors
    reasons: dict[str, str] = {}
    no_geometry: list[str] = []

    def compute(items: list[int]) -> np.ndarray:
        read.hit(len(rows) - len(items))
        embedded.hit(len(rows) - len(items))
        return _embed_as_read([paths[i] for i in items], spec, enc, (read, embedded),
                              reasons=reasons, notes=no_geometry, site=site)

    with warnings.catch_warnings():
        # MONAI's DICOM reader warns on import when an optional GPU decoder is absent
        warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
        if cache_dir is not None:
            cache = EmbeddingCache(
                cache_dir, fingerprint=enc.fingerprint(spec.describe()), site=None,
                description="frozen image encoder",
            )
            emb = cache.get_or_compute(rows, compute, keys=[content_key(paths[i]) for i in rows])
            hits = cache.hits
        else:
            emb, hits = compute(rows), 0
    read.finish(hits)
    embedded.finish(hits)
    if no_geometry:
        _note_missing_geometry(no_geometry, spec, site=site, notes=notes)
    for row, i in zip(emb, rows, strict=True):
        if np.isnan(row).any():
            errors[i] = reasons.get(
                str(paths[i]), f"image file {str(paths[i])!r} could not be read (cached result)")
            continue
        out[i] = row
        ok[i] = True
    return out, ok, errors


def cache_root(cfg: ExperimentConfig, run_dir: Path, site: str) -> Path:
    """A site's embedding-cache folder: patient-derived, so it stays with the site.

    ``data.cache_dir/<site>``, else ``$MMFL_CACHE/<site>``, else ``RUN_DIR/sites/<site>/cache``
    (the site's own folder of the run, where its other patient-level files are).

    Parameters
    ----------
    cfg : ExperimentConfig
    run_dir : Path
        The run directory (a SuperNode's site output folder on Flower).
    site : str
        The site's name.

    Returns
    -------
    Path
    """
    if cfg.data.cache_dir is not None:
        return Path(cfg.data.cache_dir).expanduser() / site
    env = os.environ.get("MMFL_CACHE")
    if env:
        return Path(env).expanduser() / site
    return run_dir / "sites" / site / "cache"


def load_site_data(cfg: ExperimentConfig, run_dir: Path, *,
                   cohorts: Mapping[str, Any] | None = None,
                   progress: ProgressCallback | None = None) -> dict[str, SiteData]:
    """Build every site's cohort (unless given) and prepare it as tensors.

    Parameters
    ----------
    cfg : ExperimentConfig
    run_dir : Path
        Where the default embedding cache goes (see :func:`cache_root`).
    cohorts : mapping of site name to SiteCohort or None
        Pre-built cohorts (default: ``data.cohort.build_cohorts(cfg)``).
    progress : callable or None
        Called with a :class:`~multimodal_fl.progress.PrepareEvent` per FHIR file read
        (modality ``"records"``) and as each site's modalities are prepared (see
        :func:`prepare_site_data`).

    Returns
    -------
    dict of str to SiteData
        In the config's site order. A site with no patient (none in its cohort, or none
        with a usable modality) is left out with a warning naming its top skip reasons,
        while ``federated.min_sites`` sites remain.

    Raises
    ------
    EmptySiteError
        When sites without patients leave fewer than ``federated.min_sites`` (or no) sites.
    """
    if cohorts is None:
        def files_read(site: str, done: int, total: int) -> None:
            if progress is not None:
                progress(PrepareEvent(site, "records", "read", done, total))

        cohorts = build_cohorts(cfg, progress=files_read)
    min_sites, total = cfg.federated.min_sites, len(cohorts)
    left_out = {name: empty_site_message(name, getattr(cohort, "counts", {}))
                for name, cohort in cohorts.items() if len(cohort.table) == 0}
    check_site_count(left_out, total=total, min_sites=min_sites)
    frozen = FrozenEncoders(cfg)
    out: dict[str, SiteData] = {}
    for name, cohort in cohorts.items():
        if name not in left_out:
            out[name] = prepare_site_data(cohort, cfg, cache=cache_root(cfg, run_dir, name),
                                          site=name, frozen=frozen, progress=progress)
    left_out |= {name: f"site '{name}' has 0 patients with a usable modality of "
                       f"{enabled_modalities(cfg)} ({len(sd.dropped)} left out)"
                 for name, sd in out.items() if len(sd.dataset) == 0}
    check_site_count(left_out, total=total, min_sites=min_sites)
    for message in left_out.values():
        logger.warning("%s; this run leaves the site out (`mmfl data summary` lists every "
                       "skipped record)", message)
    return {name: sd for name, sd in out.items() if name not in left_out}
