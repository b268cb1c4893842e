"""The run directory: its layout, the writer, and what the server side of a run may hold.

Every engine writes the same layout, so runs compare directly::

    RUN_DIR/                      default runs/<config-name>-<YYYYmmdd-HHMMSS>
      run.json                    the manifest, written first: engine, config digest, seed,
                                  package version, each site's data fingerprint, start and
                                  end time, status (running -> completed | stopped | failed)
      config.yaml                 the resolved configuration
      metrics.json                engine, per-site metrics per split, training history
      model.safetensors           the model (centralized, federated)
      cross_site.json             the cross-site matrix the sites disclosed (local engine):
                                  metric, settings, each local-only model's status (shared or
                                  withheld by policy) and one cell per (model, test site)
      model_card.json, .md        what the model is for and how it did (completed runs)
      report/                     report.json and report.html (``mmfl train`` ends with it),
                                  built from disclosed/, metrics.json and cross_site.json only
      disclosed/<site>.json       what each site disclosed for the report (fairness cells,
                                  ROC and calibration summaries under the small-cell rules)
      cross_site.json             the cross-site matrix (models x test sites), when made
      sites/<site>/
        splits.json               patient -> train/val/test, with counts
        predictions.csv           patient_id, split, label, score, sex, age_band, age, ...
        model.safetensors         the site's own model (local engine), kept at the site
        egress.jsonl              every message that left the site (its disclosure gate)
        cache/<fingerprint>/      embedding cache (unless data.cache_dir or $MMFL_CACHE is set)

Patient-level rows (splits, predictions) and anything derived from them (the embedding cache)
are written only under ``sites/<site>/``: in a deployment that folder is at the hospital. The
server side holds weights, counts, metrics and aggregate summaries.

One run per run directory: :func:`prepare_run_dir` refuses a directory that holds anything
unless asked to remove a run there first; :func:`check_resume` accepts only an unfinished run
of the same configuration (:func:`config_digest`) and data (:func:`site_fingerprint`).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from filelock import FileLock, Timeout
from safetensors.torch import save_file
from torch import nn

from multimodal_fl import __version__
from multimodal_fl.config import ExperimentConfig
from multimodal_fl.evaluation.fairness import CrossSiteResult
from multimodal_fl.evaluation.metrics import MetricValue, disclosed_count
from multimodal_fl.training import SPLITS, SiteData

#: The folder of the sites' disclosed report documents, ``RUN_DIR/disclosed/<site>.json``.
DISCLOSED_DIR = "disclosed"
#: The cross-site matrix file, ``RUN_DIR/cross_site.json`` (``CrossSiteResult.to_dict()``).
CROSS_SITE_FILE = "cross_site.json"

__all__ = [
    "CROSS_SITE_FILE",
    "DIGEST_EXCLUDES",
    "DISCLOSED_DIR",
    "MANIFEST",
    "RunDirError",
    "RunManifest",
    "RunOutcome",
    "RunWriter",
    "check_resume",
    "config_diff",
    "config_digest",
    "default_run_dir",
    "describe_status",
    "digest_view",
    "flatten",
    "jsonable",
    "prepare_run_dir",
    "read_cross_site",
    "read_manifest",
    "run_in_progress",
    "save_model",
    "site_fingerprint",
    "site_summary",
]


def default_run_dir(cfg: ExperimentConfig, root: str | os.PathLike[str] = "runs",
                    *, now: datetime | None = None) -> Path:
    """``<root>/<config-name>-<YYYYmmdd-HHMMSS>`` (UTC); a numeric suffix avoids collisions.

    Parameters
    ----------
    cfg : ExperimentConfig
        Its ``name`` (the config file stem by default) names the run.
    root : path-like, default "runs"
    now : datetime or None
        Timestamp (default: now, UTC).

    Returns
    -------
    Path
        A directory that does not exist yet.
    """
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{cfg.name or 'run'}-{stamp}"
    path, k = base, 1
    while path.exists():
        k += 1
        path = base.with_name(f"{base.name}-{k}")
    return path


def _contiguous_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def save_model(model: nn.Module, path: str | os.PathLike[str],
               metadata: Mapping[str, str] | None = None) -> Path:
    """Write the model's ``state_dict`` (buffers included) to a safetensors file.

    Parameters
    ----------
    model : nn.Module
    path : path-like
    metadata : mapping of str to str or None
        Stored in the file header as one JSON string under the key ``multimodal_fl``
        (one key, sorted: safetensors writes several keys in a random order, which would
        make equal weights give different files). Keep timestamps out of it.

    Returns
    -------
    Path
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    header = {"multimodal_fl": json.dumps(dict(metadata or {}), sort_keys=True)}
    save_file(_contiguous_state(model), str(p), metadata=header)
    return p


class RunWriter:
    """Writes one run directory (see the module docstring for the layout).

    Parameters
    ----------
    run_dir : path-like
        Created if needed.
    cfg : ExperimentConfig
        The resolved configuration.
    engine : str
        ``local``, ``centralized``, ``inprocess`` or ``flower``.
    """

    def __init__(self, run_dir: str | os.PathLike[str], cfg: ExperimentConfig, engine: str) -> None:
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.engine = engine
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def site_dir(self, site: str) -> Path:
        """``RUN_DIR/sites/<site>`` (created)."""
        d = self.run_dir / "sites" / site
        d.mkdir(parents=True, exist_ok=True)
        return d

    def write_config(self) -> Path:
        """Write ``config.yaml`` (the resolved configuration, engine included)."""
        data = self.cfg.resolved_dict()
        data.setdefault("federated", {})["engine"] = self.engine
        path = self.run_dir / "config.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def save_model(self, model: nn.Module, site: str | None = None) -> Path:
        """Write ``model.safetensors`` (``sites/<site>/model.safetensors`` for a site's model)."""
        folder = self.site_dir(site) if site is not None else self.run_dir
        meta = {"engine": self.engine, "config": self.cfg.name or ""}
        if site is not None:
            meta["site"] = site
        return save_model(model, folder / "model.safetensors", meta)

    def write_splits(self, site: str, data: SiteData) -> Path:
        """Write ``sites/<site>/splits.json``: seed, fractions, counts and the assignment."""
        labels = dict(zip(data.dataset.patient_ids, data.dataset.labels.int().tolist(),
                          strict=True))
        counts = {
            s: {
                "n": sum(1 for v in data.splits.values() if v == s),
                "n_pos": sum(labels[p] for p, v in data.splits.items() if v == s),
            }
            for s in SPLITS
        }
        doc = {
            "site": site,
            "seed": self.cfg.seed,
            "fractions": self.cfg.training.split.model_dump(),
            "rule": "sha256(seed, site, patient_id), stratified by label (training.split_patients)",
            "counts": counts,
            "dropped": data.dropped,
            "image_unreadable": data.image_errors,
            "notes": data.notes,
            "splits": dict(sorted(data.splits.items())),
        }
        path = self.site_dir(site) / "splits.json"
        path.write_text(json.dumps(doc, indent=2))
        return path

    def write_predictions(self, site: str, frame: pd.DataFrame) -> Path:
        """Write ``sites/<site>/predictions.csv``."""
        path = self.site_dir(site) / "predictions.csv"
        frame.to_csv(path, index=False)
        return path

    def write_cross_site(self, doc: Mapping[str, Any]) -> Path:
        """Write ``cross_site.json``: the cross-site matrix of disclosed cells.

        Parameters
        ----------
        doc : mapping
            :meth:`~multimodal_fl.evaluation.fairness.CrossSiteResult.to_dict` (``metric``,
            ``cells``) with the job's settings and each model's status.

        Returns
        -------
        Path
        """
        path = self.run_dir / CROSS_SITE_FILE
        path.write_text(json.dumps(jsonable(dict(doc)), indent=2))
        return path

    def write_disclosed(self, site: str, doc: Mapping[str, Any]) -> Path:
        """Write ``disclosed/<site>.json``: the report document the site disclosed.

        Parameters
        ----------
        site : str
        doc : mapping
            :func:`~multimodal_fl.evaluation.disclosed.site_disclosure`'s output.

        Returns
        -------
        Path
        """
        folder = self.run_dir / DISCLOSED_DIR
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{site}.json"
        path.write_text(json.dumps(jsonable(dict(doc)), indent=1, allow_nan=False))
        return path

    def write_metrics(self, metrics: Mapping[str, Any]) -> Path:
        """Write ``metrics.json`` (``engine`` and ``config`` added)."""
        doc = {"engine": self.engine, "config": self.cfg.name, **metrics}
        path = self.run_dir / "metrics.json"
        path.write_text(json.dumps(jsonable(doc), indent=2))
        return path


def read_cross_site(run_dir: str | os.PathLike[str]) -> CrossSiteResult | None:
    """The cross-site matrix a run's sites disclosed (``cross_site.json``), if it has one.

    Parameters
    ----------
    run_dir : path-like

    Returns
    -------
    CrossSiteResult or None
        ``None`` when the run has no ``cross_site.json``.

    Raises
    ------
    ValueError
        When the file is not JSON or not a cross-site document (one line naming the file).
    """
    path = Path(run_dir) / CROSS_SITE_FILE
    if not path.is_file():
        return None
    try:
        return CrossSiteResult.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not a cross-site matrix ({exc})") from None


def jsonable(obj: Any) -> Any:
    """A document made JSON-safe: metric values as dicts, numpy scalars as Python numbers,
    non-finite floats as ``None``, keys as strings.

    Parameters
    ----------
    obj : Any

    Returns
    -------
    Any
    """
    if isinstance(obj, MetricValue):
        return obj.to_dict()
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    return obj


@dataclass
class RunOutcome:
    """Result of an engine run.

    Attributes
    ----------
    run_dir : Path
        The run directory written.
    metrics : dict
        What ``metrics.json`` holds.
    finished : Any
        What the end of a completed run wrote (the report, the model card), when
        :func:`multimodal_fl.engines.run` ran it; ``None`` otherwise.
    """

    run_dir: Path
    metrics: dict[str, Any]
    finished: Any = None


def site_summary(data: SiteData, *, min_cell: int = 0) -> dict[str, Any]:
    """A site's cohort in counts (what ``metrics.json`` shows per site).

    Parameters
    ----------
    data : SiteData
    min_cell : int
        The small-cell threshold in force (0: none): a count in ``(0, min_cell)`` is shown as
        ``None``, and so is one whose complement in the patients shown would be (positives and
        negatives, patients with and without a modality).

    Returns
    -------
    dict
        ``n_patients``, ``n_positive``, ``modality_counts``, ``dropped``, ``image_errors``.
    """
    n = len(data.dataset)
    total = disclosed_count(n, min_cell)
    return {
        "n_patients": total,
        "n_positive": None if total is None else disclosed_count(
            int(data.dataset.labels.sum()), min_cell, of=n),
        "modality_counts": {
            m: None if total is None else disclosed_count(int(k), min_cell, of=n)
            for m, k in data.dataset.modality_counts().items()},
        "dropped": disclosed_count(len(data.dropped), min_cell),
        "image_errors": disclosed_count(len(data.image_errors), min_cell),
    }


# --------------------------------------------------------------------------- one run per directory

#: The manifest's file name, ``RUN_DIR/run.json``.
MANIFEST = "run.json"

#: Resolved-config keys the config digest leaves out (``*`` is any list index): each names
#: the run, says where something is, or may change when a stopped run is resumed, and none
#: changes what a round computes.
DIGEST_EXCLUDES: tuple[str, ...] = (
    "name",                 # names the run
    "sites.*.path",         # where a site's data is; what it is: the data fingerprints
    "data.cache_dir",       # where embeddings are cached (keyed by content)
    "data.workers",         # how many processes read the sites, not what they read
    "federated.engine",     # the manifest's own ``engine``
    "federated.rounds",     # a stopped run may be resumed for more rounds
    "federated.timeout_s",  # how long the server waits, not what a site computes
    "federated.tracker",    # where rounds are logged
)

#: How :func:`site_fingerprint` is computed (stored in every manifest).
FINGERPRINT_RULE = (
    "sha256 over the sorted lines 'relative path, size, sha256 of the content' of every file "
    "under the site directory (names starting with '.' skipped); timestamps and the "
    "directory's own location do not count"
)

#: Manifest statuses: a run is ``running`` until it ``completed``, ``stopped`` after a round
#: (resumable) or ``failed`` (the error is recorded).
STATUSES: tuple[str, ...] = ("running", "completed", "stopped", "failed")


class RunDirError(ValueError):
    """A run directory that cannot be used as asked (one line naming it and the way out)."""


def flatten(doc: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested document as ``{"a.b.c": value}``; lists of mappings are indexed (``sites.0.name``).

    Parameters
    ----------
    doc : mapping
        E.g. :meth:`ExperimentConfig.resolved_dict` or a ``config.yaml`` read back.
    prefix : str
        Prepended to every key (used by the recursion).

    Returns
    -------
    dict of str to Any
        Leaves only; lists of scalars are one leaf.
    """
    out: dict[str, Any] = {}
    for key, value in doc.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            for i, item in enumerate(value):
                out.update(flatten(item, f"{name}.{i}."))
        else:
            out[name] = value
    return out


_MISSING = object()


def _excluded(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def digest_view(resolved: Mapping[str, Any]) -> dict[str, Any]:
    """The flattened config the digest covers: :data:`DIGEST_EXCLUDES` removed.

    Parameters
    ----------
    resolved : mapping
        A resolved configuration (``cfg.resolved_dict()`` or a run's ``config.yaml``).

    Returns
    -------
    dict of str to Any
    """
    return {k: v for k, v in flatten(resolved).items() if not _excluded(k, DIGEST_EXCLUDES)}


def config_digest(cfg: ExperimentConfig | Mapping[str, Any]) -> str:
    """``sha256:<hex>`` of the resolved configuration without :data:`DIGEST_EXCLUDES`.

    Parameters
    ----------
    cfg : ExperimentConfig or mapping
        The configuration, or its resolved dict.

    Returns
    -------
    str
    """
    resolved = cfg.resolved_dict() if isinstance(cfg, ExperimentConfig) else cfg
    text = json.dumps(jsonable(digest_view(resolved)), sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def config_diff(a: Mapping[str, Any], b: Mapping[str, Any], *,
                ignore: Iterable[str] = DIGEST_EXCLUDES) -> list[str]:
    """The flattened keys whose values differ between two resolved configurations.

    Parameters
    ----------
    a, b : mapping
        Resolved configurations.
    ignore : iterable of str
        Key patterns left out (default :data:`DIGEST_EXCLUDES`).

    Returns
    -------
    list of str
        Sorted; a key present in one only counts as differing.
    """
    fa, fb = flatten(a), flatten(b)
    patterns = list(ignore)
    return sorted(k for k in set(fa) | set(fb)
                  if not _excluded(k, patterns) and fa.get(k, _MISSING) != fb.get(k, _MISSING))


def _site_files(root: Path) -> list[tuple[str, Path]]:
    """Every file under ``root`` as ``(relative posix path, path)``, hidden names skipped."""
    found: list[tuple[str, Path]] = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith("."):
                path = Path(folder) / name
                found.append((path.relative_to(root).as_posix(), path))
    return sorted(found)


def site_fingerprint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A site directory's data fingerprint (see :data:`FINGERPRINT_RULE`).

    The content of every file counts (a changed record, image or label changes it), and so
    do the relative paths (``images.csv`` names images by them); modification times and
    where the directory lies do not, so a copy of the data fingerprints the same.

    Parameters
    ----------
    path : path-like
        The site directory.

    Returns
    -------
    dict
        ``fingerprint`` (``sha256:<hex>``), ``files`` and ``bytes``.

    Raises
    ------
    RunDirError
        When the path is not a directory.
    """
    root = Path(path)
    if not root.is_dir():
        raise RunDirError(f"{root}: site directory does not exist or is not a directory")
    outer = hashlib.sha256()
    n_bytes = 0
    files = _site_files(root)
    for rel, file in files:
        with file.open("rb") as fh:
            inner = hashlib.file_digest(fh, "sha256").hexdigest()
        size = file.stat().st_size
        n_bytes += size
        outer.update(f"{rel}\0{size}\0{inner}\n".encode())
    return {"fingerprint": "sha256:" + outer.hexdigest(), "files": len(files), "bytes": n_bytes}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class RunManifest:
    """``RUN_DIR/run.json``: what the run is, written before anything else.

    Attributes
    ----------
    engine : str
    config_name : str or None
    config_digest : str
        :func:`config_digest` of the run's configuration.
    task : str
        The task's name.
    seed : int
    data : dict
        Per site, :func:`site_fingerprint`.
    package_version : str
    run_id : str
        Unique per run (a copied run directory keeps it).
    started, ended : str or None
        ISO 8601 UTC.
    status : str
        One of :data:`STATUSES`.
    resumed : list of str
        When the run was resumed.
    stopped_after_round : int or None
    error : str or None
        The failure, one line.
    """

    engine: str
    config_name: str | None
    config_digest: str
    task: str
    seed: int
    data: dict[str, dict[str, Any]]
    package_version: str = __version__
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started: str = field(default_factory=_now)
    ended: str | None = None
    status: str = "running"
    resumed: list[str] = field(default_factory=list)
    stopped_after_round: int | None = None
    error: str | None = None
    format: int = 1
    digest_excludes: list[str] = field(default_factory=lambda: list(DIGEST_EXCLUDES))
    fingerprint_rule: str = FINGERPRINT_RULE

    @classmethod
    def start(cls, cfg: ExperimentConfig, engine: str,
              data: Mapping[str, dict[str, Any]]) -> RunManifest:
        """A new run's manifest (status ``running``).

        Parameters
        ----------
        cfg : ExperimentConfig
        engine : str
        data : mapping
            Per site, :func:`site_fingerprint`.

        Returns
        -------
        RunManifest
        """
        return cls(engine=engine, config_name=cfg.name, config_digest=config_digest(cfg),
                   task=cfg.task.name, seed=cfg.seed, data=dict(data))

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> RunManifest:
        """Read a manifest document (unknown keys ignored)."""
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in doc.items() if k in known})

    def finish(self, status: str, *, stopped_after_round: int | None = None,
               error: str | None = None) -> None:
        """Record the end of the run (``completed``, ``stopped`` or ``failed``)."""
        if status not in STATUSES:
            raise ValueError(f"status {status!r}: expected one of {', '.join(STATUSES)}")
        self.status = status
        self.ended = _now()
        self.stopped_after_round = stopped_after_round
        self.error = error

    def resume(self) -> None:
        """Record a resume: status back to ``running``."""
        self.resumed.append(_now())
        self.status, self.ended, self.error = "running", None, None

    def write(self, run_dir: str | os.PathLike[str]) -> Path:
        """Write ``RUN_DIR/run.json`` atomically (the folder is created)."""
        folder = Path(run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / MANIFEST
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(jsonable(asdict(self)), indent=2))
        os.replace(tmp, path)
        return path


def read_manifest(run_dir: str | os.PathLike[str]) -> RunManifest | None:
    """``RUN_DIR/run.json``, or ``None`` when there is none.

    Raises
    ------
    RunDirError
        When the file is not a manifest.
    """
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        return RunManifest.from_dict(doc)
    except (ValueError, TypeError) as exc:
        raise RunDirError(f"{path}: not a run manifest ({exc})") from None


def _a(word: str) -> str:
    """The indefinite article before ``word`` (``an inprocess run``, ``a local run``)."""
    return "an" if word[:1].lower() in "aeiou" else "a"


#: Held by the process that writes a run directory (``engines.run``), so that a second
#: ``--resume`` of a run still in progress is refused.
RUN_LOCK = "run.lock"
#: What a run writes at the top of its directory: ``--overwrite`` removes a folder only when it
#: holds nothing else (a user's own files beside a run are never removed).
RUN_ENTRIES = frozenset({
    MANIFEST, f"{MANIFEST}.tmp", "config.yaml", "metrics.json", "model.safetensors",
    "model_card.json", "model_card.md", "recalibration.json", "report", "sites", "checkpoint",
    DISCLOSED_DIR, CROSS_SITE_FILE, "pca.safetensors", "pca.json", "pca_variance.png",
    "pca_sites.png", "flower", "tensorboard", "mlruns", RUN_LOCK})


def _what_is_there(path: Path) -> tuple[str, bool]:
    """A folder's description for messages (``a local run (completed)``, ``""`` when it holds
    no run), and whether the run there is unfinished."""
    try:
        manifest = read_manifest(path)
    except RunDirError:
        manifest = None
    if manifest is not None:
        return (f"{_a(manifest.engine)} {manifest.engine} run ({manifest.status})",
                manifest.status != "completed")
    if any((path / name).is_file() for name in (MANIFEST, "metrics.json", "config.yaml")):
        return "a run", False
    return "", False


def run_in_progress(run_dir: str | os.PathLike[str]) -> bool:
    """Whether a process still writes the run: it holds ``RUN_DIR/run.lock``.

    The lock is an OS file lock, released when its process ends however it ends (``kill -9``
    included), so a run whose ``run.json`` still says ``running`` but whose lock is free was
    stopped before it could record its end. Nothing is written (a missing lock file is not
    created).

    Parameters
    ----------
    run_dir : path-like

    Returns
    -------
    bool
        ``True`` when the lock is held (or cannot be tried), ``False`` when it is free or
        absent.
    """
    path = Path(run_dir) / RUN_LOCK
    if not path.is_file():
        return False
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    except OSError:  # cannot tell: believe the manifest
        return True
    lock.release()
    return False


def describe_status(run_dir: str | os.PathLike[str], manifest: RunManifest) -> str:
    """The run's status in words, for messages: ``running`` only while a process holds its lock.

    Parameters
    ----------
    run_dir : path-like
    manifest : RunManifest

    Returns
    -------
    str
        The manifest's status, or, for a ``running`` run no process writes any more,
        ``interrupted (its run.json says running, but no process holds its run.lock: ...)``.
    """
    if manifest.status == "running" and not run_in_progress(run_dir):
        return (f"interrupted (its {MANIFEST} says running, but no process holds its "
                f"{RUN_LOCK}: it was killed, or its machine stopped, before it recorded its end)")
    return manifest.status


def prepare_run_dir(path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Make sure a new run may be written to ``path``: one run per run directory.

    An empty or missing folder is fine. A folder that holds a run is refused unless
    ``overwrite``, which removes it first; a folder that holds anything else is never
    removed.

    Parameters
    ----------
    path : path-like
    overwrite : bool
        Remove the run already there.

    Returns
    -------
    Path

    Raises
    ------
    RunDirError
        One line naming the folder and what would be accepted.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise RunDirError(f"--out {p}: is a file; give a new or empty folder")
    if overwrite and p.is_symlink():
        raise RunDirError(f"--out {p}: is a symbolic link; give the run directory it points to "
                          f"({p.resolve()}) to remove the run there")
    if not p.is_dir() or not any(e.name != RUN_LOCK for e in p.iterdir()):
        return p
    what, unfinished = _what_is_there(p)
    if not what:
        raise RunDirError(f"--out {p}: the folder holds files and is not a run directory (no "
                          f"{MANIFEST}, config.yaml or metrics.json); give a new or empty folder"
                          + (" (--overwrite removes only run directories)" if overwrite else ""))
    if not overwrite:
        resume = f", or --resume {p} to continue it" if unfinished else ""
        raise RunDirError(f"--out {p}: {what} is already there; give another --out or "
                          f"--overwrite to remove it first{resume}")
    foreign = sorted(e.name for e in p.iterdir() if e.name not in RUN_ENTRIES)
    if foreign or not (p / MANIFEST).is_file():
        why = (f"it also holds {', '.join(repr(f) for f in foreign[:5])}, which no run writes"
               if foreign else f"it has no {MANIFEST}, so it is not known to be a run")
        raise RunDirError(f"--out {p}: not removed: {why}; --overwrite removes only a run "
                          "directory and nothing else (move those files, or give another --out)")
    for entry in p.iterdir():  # all but the lock this run holds (a new lock file would not be)
        if entry.name == RUN_LOCK:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    return p


def check_resume(run_dir: str | os.PathLike[str], cfg: ExperimentConfig, *, engine: str,
                 resumable: Iterable[str]) -> RunManifest:
    """The manifest of the run ``--resume`` continues, after checking it may be continued.

    Accepted: an unfinished run (``running`` after a kill, ``stopped`` or ``failed``) of a
    resumable engine, the same engine, and the same :func:`config_digest`. The data
    fingerprints are checked by the caller once computed.

    Parameters
    ----------
    run_dir : path-like
    cfg : ExperimentConfig
        The configuration the run would continue with.
    engine : str
        The engine asked for.
    resumable : iterable of str
        Engines that can resume.

    Returns
    -------
    RunManifest

    Raises
    ------
    RunDirError
        One line naming the run and the reason (the differing config keys for a changed
        configuration).
    """
    p = Path(run_dir)
    engines = list(resumable)
    able = ", ".join(engines)
    if not p.is_dir():
        raise RunDirError(f"--resume {p}: no such run directory")
    manifest = read_manifest(p)
    if manifest is None:
        raise RunDirError(f"--resume {p}: no {MANIFEST} (not a run directory, or one from an "
                          "older version); start a new run with --out")
    if manifest.engine not in engines:
        raise RunDirError(f"--resume {p}: {_a(manifest.engine)} {manifest.engine} run; only an "
                          f"unfinished {able} run can be resumed")
    if manifest.engine != engine:
        raise RunDirError(f"--resume {p}: the run's engine is {manifest.engine}, not {engine}")
    if manifest.status == "completed":
        raise RunDirError(f"--resume {p}: the run completed at {manifest.ended}; start a new "
                          "run with --out to train again")
    digest = config_digest(cfg)
    if digest != manifest.config_digest:
        keys = _config_keys_changed(p, cfg)
        raise RunDirError(f"--resume {p}: the configuration differs from the run's ({keys}); "
                          "resume with the run's own config.yaml (mmfl train --resume RUN_DIR) "
                          "or start a new run")
    return manifest


def _config_keys_changed(run_dir: Path, cfg: ExperimentConfig) -> str:
    """The keys that differ from the run's ``config.yaml``, for a message."""
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return "config digest differs; the run's config.yaml is unreadable"
    keys = config_diff(cfg.resolved_dict(), saved)
    return ", ".join(keys) if keys else "config digest differs"
