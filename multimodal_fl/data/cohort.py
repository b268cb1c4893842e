"""One table per site: patients, index time, label, features, images, notes, modality mask.

``build_cohort(site, task, data=..., site_name=...)`` reads a site directory (see
:mod:`multimodal_fl.data.sites`) and applies a task; ``build_cohorts(cfg)`` does it for
every site of an experiment.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from joblib import Parallel, delayed
from joblib.externals.loky import get_reusable_executor

from multimodal_fl.config import COHORT_COLUMNS, DataConfig, ExperimentConfig, SiteConfig, TaskSpec
from multimodal_fl.data.errors import DataError, ErrorSink, Skip
from multimodal_fl.data.fhir import FHIRReader
from multimodal_fl.data.fhir_json import paused_gc, unpack_resources
from multimodal_fl.data.imaging import link_images
from multimodal_fl.data.records import Note
from multimodal_fl.data.sites import (
    FHIR_SUFFIXES,
    SiteFiles,
    discover_site,
    read_csv,
    site_timezone,
)
from multimodal_fl.data.tasks import apply_task, feature_names
from multimodal_fl.data.text import load_url_notes, notes_from_csv

__all__ = ["META_COLUMNS", "POOL_MIN_BYTES", "DataError", "EmptySiteError", "SiteCohort",
           "available_cores", "build_cohort", "build_cohort_from_resources", "build_cohorts",
           "check_site_count", "cohort_workers", "empty_site_message", "empty_table",
           "features_without_value", "reads_labels_csv"]

META_COLUMNS = list(COHORT_COLUMNS)

ProgressFn = Callable[[str, int, int], None]

logger = logging.getLogger(__name__)


@dataclass
class SiteCohort:
    """The cohort table of one site and how it was read.

    Attributes
    ----------
    site
        Site name.
    table
        One row per patient: ``patient_id, site, index_time, label`` (0/1), one float
        column per feature (NaN when missing), ``missing_<name>`` indicators,
        ``image_path`` (absolute path or None), ``notes`` (list of str), ``has_image``,
        ``has_text``, ``has_tabular``, ``sex``, ``age``, ``age_band``, ``max_feature_time``.
    feature_names
        The model input columns, in a stable order.
    skipped
        Every skipped file or record.
    counts
        Resources read / used / validated, skips by reason, exclusions by reason, notes by
        reason (``noted_by_reason``), the task's features no patient has a value of
        (``features_without_value``), the labels by source (``labels_from``: ``labels_csv``,
        ``rule``), and ``labels_csv_unused`` (a line) when the site has a ``labels.csv``
        that the task does not read.
    noted
        Every record kept with a note (``nonconforming_id``, ``unitless_value``).
    """

    site: str
    table: pd.DataFrame
    feature_names: list[str]
    skipped: list[Skip] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)
    noted: list[Skip] = field(default_factory=list)

    @property
    def n_patients(self) -> int:
        """Patients in the cohort."""
        return len(self.table)

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary: patients, positives, coverage, missingness, skips, notes.

        A site without patients also has ``"empty"``: :func:`empty_site_message`.
        """
        t = self.table
        n = len(t)
        pos = int(t["label"].sum()) if n else 0
        obs = [c for c in self.feature_names if f"missing_{c}" in t.columns]
        missing = {c: (float(t[c].isna().mean()) if n else None) for c in obs}
        return {
            "site": self.site,
            "patients": n,
            "positives": pos,
            "prevalence": pos / n if n else None,
            "coverage": {m: (float(t[f"has_{m}"].mean()) if n else None)
                         for m in ("image", "text", "tabular")},
            "missingness": missing,
            "counts": self.counts,
            "skipped": [s.to_dict() for s in self.skipped],
            "noted": [s.to_dict() for s in self.noted],
            **({"empty": empty_site_message(self.site, self.counts)} if not n else {}),
        }


def empty_site_message(site: str, counts: dict[str, Any], *, top: int = 3) -> str:
    """One line saying why ``site`` has no patients: its most frequent skip and exclusion reasons.

    Parameters
    ----------
    site
        The site name.
    counts
        The site's :attr:`SiteCohort.counts` (``patients_read``, ``skipped_by_reason``,
        ``excluded_by_reason``).
    top
        How many reasons to name.

    Returns
    -------
    str
        E.g. ``site 'site_a' has 0 patients (196 Patient resource(s) read); top reasons:
        skipped missing_patient 1391, skipped invalid_fhir 196 ...``.
    """
    reasons = [(v, f"skipped {k}") for k, v in counts.get("skipped_by_reason", {}).items()]
    reasons += [(v, f"excluded {k}") for k, v in counts.get("excluded_by_reason", {}).items()]
    reasons.sort(key=lambda r: (-r[0], r[1]))
    read = counts.get("patients_read", 0)
    why = ", ".join(f"{name} {n}" for n, name in reasons[:top]) or "no Patient resource read"
    more = f" (+{len(reasons) - top} more)" if len(reasons) > top else ""
    return (f"site '{site}' has 0 patients ({read} Patient resource(s) read); top reasons: "
            f"{why}{more}")


class EmptySiteError(DataError):
    """Sites without patients leave too few sites for the run (one line naming each and why).

    Parameters
    ----------
    message
        The sites, their top skip / exclusion reasons and the rule that is not met.
    """


def check_site_count(left_out: Mapping[str, str], *, total: int, min_sites: int) -> None:
    """Refuse a run that sites without patients leave with fewer than ``min_sites`` sites.

    Parameters
    ----------
    left_out
        Site name -> why it has no patient (:func:`empty_site_message`).
    total
        The sites of the run, those left out included.
    min_sites
        The sites a run needs (``federated.min_sites``); at least one always is.

    Raises
    ------
    EmptySiteError
        When ``left_out`` is not empty and fewer than ``max(1, min_sites)`` sites remain; the
        one-line message names every site left out and its reasons.
    """
    need = max(1, min_sites)
    kept = total - len(left_out)
    if left_out and kept < need:
        raise EmptySiteError(
            f"{'; '.join(left_out.values())}: {kept} of {total} site(s) left, the run needs "
            f"{need} (federated.min_sites = {min_sites}); `mmfl data summary CONFIG --json` "
            "lists every skipped record")


def empty_table(names: list[str]) -> pd.DataFrame:
    """An empty cohort table with the right columns."""
    return pd.DataFrame(columns=[*META_COLUMNS[:4], *[n for n in names if n not in META_COLUMNS],
                                 *META_COLUMNS[4:]])


def features_without_value(task: TaskSpec, table: pd.DataFrame) -> list[str]:
    """The task's features that no patient of ``table`` has: an observation feature missing
    for all, a comorbidity or medication recorded for none (empty for an empty table).

    Parameters
    ----------
    task
        The task whose observation, condition and medication features are checked.
    table
        A site's cohort table.

    Returns
    -------
    list of str
        The feature names, in the task's order.
    """
    if table.empty:
        return []
    feats = task.features
    flags = [c.name for c in (*feats.conditions, *feats.medications)]
    return ([o.name for o in feats.observations if table[o.name].isna().all()]
            + [n for n in flags if not (table[n] == 1.0).any()])


def reads_labels_csv(task: TaskSpec) -> bool:
    """Whether ``task``'s label reads a site's ``labels.csv`` (kind ``labels_csv``, or a rule
    with ``label.labels_csv`` ``prefer`` or ``fallback``)."""
    return task.label.kind == "labels_csv" or task.label.labels_csv != "ignore"


def _read_labels(site: SiteFiles, sink: ErrorSink, known: set[str],
                 column: str = "label") -> dict[str, int]:
    """``labels.csv``'s ``column`` by patient id; an empty cell is no label (an unknown outcome)."""
    if site.labels_csv is None:
        return {}
    out: dict[str, int] = {}
    for row in read_csv(site.labels_csv, "labels.csv", sink, require=(column,)):
        rid = f"row {row['_row']}"
        pid = row.get("patient_id", "")
        if pid not in known:
            sink.report("labels.csv", rid, "patient_id", "missing_patient",
                        f"patient '{pid}' has no Patient resource at this site")
            continue
        raw = row.get(column, "").lower()
        if raw == "":
            continue
        if raw not in {"0", "1", "true", "false", "0.0", "1.0"}:
            sink.report("labels.csv", rid, column, "bad_label",
                        f"{column} '{row.get(column)}' is not 0/1 (true/false accepted; "
                        "empty: no label)")
            continue
        value = int(raw in {"1", "true", "1.0"})
        if pid in out and out[pid] != value:
            sink.report("labels.csv", rid, column, "conflicting_label",
                        f"patient '{pid}' has conflicting labels; kept the first")
            continue
        out[pid] = value
    return out


def _to_table(rows: list[dict[str, Any]], names: list[str]) -> pd.DataFrame:
    if not rows:
        return empty_table(names)
    table = pd.DataFrame(rows)
    order = [*META_COLUMNS[:4], *[n for n in names if n not in META_COLUMNS],
             *META_COLUMNS[4:]]
    table = table[order]
    table["index_time"] = pd.to_datetime(table["index_time"], utc=True)
    table["max_feature_time"] = pd.to_datetime(table["max_feature_time"], utc=True)
    table["label"] = table["label"].astype(int)
    for n in names:
        table[n] = table[n].astype(float)
    for b in ("has_image", "has_text", "has_tabular"):
        table[b] = table[b].astype(bool)
    table["image_path"] = pd.Series([r["image_path"] for r in rows], dtype=object)
    return table.reset_index(drop=True)


def build_cohort(
    site: SiteConfig | Path | str,
    task: TaskSpec,
    *,
    data: DataConfig | None = None,
    site_name: str | None = None,
    progress: ProgressFn | None = None,
    check_images: bool = True,
) -> SiteCohort:
    """Read one site directory and build its cohort table for ``task``.

    Parameters
    ----------
    site
        A :class:`SiteConfig` or the site directory.
    task
        The task (cohort, index, features, label).
    data
        Error policy (``on_error``), validation scope and the site's time zone
        (``timezone``); default ``DataConfig()``.
    site_name
        Name for the ``site`` column (default: the SiteConfig name or the folder name).
    progress
        Called as ``progress(site_name, files_done, files_total)`` while reading FHIR.
    check_images
        Check each used image is readable (header level).

    Returns
    -------
    SiteCohort
        The table, feature names, skipped records and counts.

    Raises
    ------
    DataError
        When the site directory is missing or empty, or (``on_error: fail``) at the first
        bad file or record.
    """
    with paused_gc():
        return _build_cohort(site, task, data or DataConfig(), site_name, progress,
                             check_images=check_images)


def _build_cohort(site: SiteConfig | Path | str, task: TaskSpec, data: DataConfig,
                  site_name: str | None, progress: ProgressFn | None, *,
                  check_images: bool) -> SiteCohort:
    if isinstance(site, SiteConfig):
        site_name = site_name or site.name
        path = site.path
    else:
        path = Path(site)
        site_name = site_name or path.name
    files = discover_site(path)
    sink = ErrorSink(on_error=data.on_error)
    reader = FHIRReader(task, sink, validation=data.validation, tz=site_timezone(data, files),
                        strict_ids=data.strict_ids)
    for f in files.other_fhir_files:  # a compressed export, say: not read, and said so
        sink.report(files.rel(f), "", "<file>", "unread_file",
                    f"only .json and .ndjson files under fhir/ are read, not '{f.name}'"
                    + ("; decompress it" if f.suffix.lower() in (".gz", ".zip", ".bz2", ".xz")
                       else ""))
    n = len(files.fhir_files)
    for i, f in enumerate(files.fhir_files, start=1):
        reader.read_file(f, files.rel(f))
        if progress is not None:
            progress(site_name, i, n)
    return _assemble(reader, task, sink, site_name, files, check_images=check_images)


def build_cohort_from_resources(
    resources: Iterable[tuple[dict[str, Any] | Path, str]],
    task: TaskSpec,
    *,
    data: DataConfig | None = None,
    site_name: str = "bundles",
) -> SiteCohort:
    """Build a cohort from FHIR resource dicts (Bundles or single resources) in memory.

    Parameters
    ----------
    resources
        ``(bundle_or_resource_dict, label)`` pairs, or ``(path, label)`` for ``.json`` /
        ``.ndjson`` files; ``label`` names the source in reports.
    task, data, site_name
        As for :func:`build_cohort` (no images, notes.csv or labels.csv here).

    Returns
    -------
    SiteCohort
        The cohort of the resources' patients.
    """
    data = data or DataConfig()
    sink = ErrorSink(on_error=data.on_error)
    reader = FHIRReader(task, sink, validation=data.validation, tz=site_timezone(data),
                        strict_ids=data.strict_ids)
    with paused_gc():
        for obj, label in resources:
            if isinstance(obj, Path):
                reader.read_file(obj, label)
                continue
            for res, full_url in unpack_resources(obj, label, sink, where=""):
                reader.add_resource(res, label, full_url)
        return _assemble(reader, task, sink, site_name, None, check_images=False)


def _assemble(reader: FHIRReader, task: TaskSpec, sink: ErrorSink, site_name: str,
              files: SiteFiles | None, *, check_images: bool) -> SiteCohort:
    records = reader.finish()
    known = set(records.patients)
    notes: dict[str, list[Note]] = {}
    images: dict[str, list[tuple[Path, Any, str]]] = {}
    labels: dict[str, int] = {}
    if files is not None:
        load_url_notes(records, files, sink)
        if files.notes_csv is not None:
            for pid, extra in notes_from_csv(files.notes_csv, sink, known,
                                             tz=reader.tz).items():
                notes.setdefault(pid, []).extend(extra)
        images = link_images(records, files, sink, known, tz=reader.tz)
        if reads_labels_csv(task):
            labels = _read_labels(files, sink, known, task.label.labels_csv_column)
    for pid, fhir_notes in records.notes.items():
        notes[pid] = [n for n in fhir_notes if n.url is None] + notes.get(pid, [])
    names = feature_names(task)
    result = apply_task(task, records, site=site_name, sink=sink, notes=notes, images=images,
                        labels_csv=labels, check_images=check_images)
    table = _to_table(result.rows, names)
    counts: dict[str, Any] = dict(records.counts)
    counts["patients_read"] = len(records.patients)
    for candidates in images.values():
        for _, _, rule in candidates:
            key = f"images_linked_by_{rule.replace(' ', '_').replace('.', '_')}"
            counts[key] = counts.get(key, 0) + 1
    counts["skipped_by_reason"] = dict(sorted(sink.by_reason.items()))
    counts["noted_by_reason"] = dict(sorted(sink.noted_by_reason.items()))
    counts["excluded_by_reason"] = dict(sorted(result.excluded.items()))
    counts.update({k: v for k, v in result.counts.items() if v})
    counts["features_without_value"] = features_without_value(task, table)
    counts["labels_from"] = {"labels_csv": result.label_sources["labels_csv"],
                             "rule": result.label_sources["rule"]}
    if files is not None and files.labels_csv is not None and not reads_labels_csv(task):
        counts["labels_csv_unused"] = (
            f"{files.rel(files.labels_csv)} is present but not read: the task's label.kind "
            f"'{task.label.kind}' has label.labels_csv 'ignore' (set prefer or fallback to use "
            "it)")
    return SiteCohort(site=site_name, table=table, feature_names=names,
                      skipped=list(sink.skipped), counts=counts, noted=list(sink.noted))


#: automatic ``data.workers``: a pool only when the sites' FHIR files add up to this many bytes
#: (below it, starting the processes costs more than the pool saves)
POOL_MIN_BYTES = 64 * 2**20


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _fhir_bytes(path: Path) -> int:
    fhir = Path(path).expanduser() / "fhir"
    if not fhir.is_dir():
        return 0
    return sum(p.stat().st_size for p in fhir.rglob("*")
               if p.suffix.lower() in FHIR_SUFFIXES and p.is_file())


def cohort_workers(cfg: ExperimentConfig) -> int:
    """How many processes :func:`build_cohorts` uses for ``cfg`` (``data.workers``, resolved).

    Parameters
    ----------
    cfg
        The experiment: its sites and ``data.workers``.

    Returns
    -------
    int
        ``data.workers`` when set (at most one per site); when 0, one per available core (at
        most one per site) if there are several sites whose FHIR files add up to at least
        :data:`POOL_MIN_BYTES`, else 1 (this process).
    """
    n_sites = len(cfg.sites)
    if cfg.data.workers:
        return max(1, min(cfg.data.workers, n_sites))
    cores = available_cores()
    if n_sites < 2 or cores < 2:
        return 1
    total = 0
    for site in cfg.sites:
        total += _fhir_bytes(site.path)
        if total >= POOL_MIN_BYTES:
            return min(cores, n_sites)
    return 1


def build_cohorts(cfg: ExperimentConfig, *, progress: ProgressFn | None = None
                  ) -> dict[str, SiteCohort]:
    """Build the cohort of every site of an experiment (``cfg.sites``, ``cfg.task``, ``cfg.data``).

    With more than one process (:func:`cohort_workers`, ``data.workers``) the sites are read
    by a pool of processes, one site per process at a time; the cohorts are those a serial
    build gives (the same tables, skips, notes and counts), and the first site (in config
    order) whose data stops the run raises as it would serially. The wall time is logged.

    Parameters
    ----------
    cfg
        The experiment.
    progress
        Called as ``progress(site_name, files_done, files_total)``: per file when sites are
        read in this process, once per site (all its files) when they are read by the pool.

    Returns
    -------
    dict
        Site name -> :class:`SiteCohort`, in the config's site order.
    """
    start = time.perf_counter()
    workers = cohort_workers(cfg)
    out: dict[str, SiteCohort] = {}
    if workers <= 1:
        for site in cfg.sites:
            out[site.name] = build_cohort(site, cfg.task, data=cfg.data, progress=progress)
    else:
        out = _build_in_pool(cfg, workers, progress)
    logger.info("built %d site cohort(s) in %.2f s wall (%d process(es))", len(out),
                time.perf_counter() - start, workers)
    return out


def _cohort_or_error(site: SiteConfig, task: TaskSpec, data: DataConfig
                     ) -> SiteCohort | DataError:
    """A pool worker's job: the site's cohort, or the :class:`DataError` that stopped it."""
    try:
        return build_cohort(site, task, data=data)
    except DataError as exc:
        return exc


def _build_in_pool(cfg: ExperimentConfig, workers: int, progress: ProgressFn | None
                   ) -> dict[str, SiteCohort]:
    """Every site's cohort, read by a pool of ``workers`` fresh processes (joblib's loky).

    loky's workers are fresh interpreters (a forked child would inherit the caller's
    threads) that do not re-run the caller's script, so a script needs no ``__main__``
    guard; they are shut down when the sites are read, so they hold no memory after.
    """
    jobs = (delayed(_cohort_or_error)(site, cfg.task, cfg.data) for site in cfg.sites)
    out: dict[str, SiteCohort] = {}
    try:
        results = Parallel(n_jobs=workers, backend="loky", return_as="generator")(jobs)
        for site, cohort in zip(cfg.sites, results, strict=True):
            if isinstance(cohort, DataError):
                raise cohort  # the first failing site in config order, as a serial build
            out[site.name] = cohort
            if progress is not None:
                files = int(cohort.counts.get("files_read", 0))
                progress(site.name, files, files)
    finally:
        get_reusable_executor().shutdown(wait=True)
    return out
