"""The project's own generated multi-site sample cohorts (COVID-19 oxygen need, Alzheimer's).

``generate(out, seed=0, profile="default")`` writes, deterministically from the seed,
``out/covid_oxygen/site_a..site_d`` and ``out/alzheimers/site_a..site_d`` in the site
data contract (FHIR R4 Bundles and NDJSON, images, notes, CSV side files), plus
``out/README.md`` and ``out/MANIFEST.json`` (content hashes of decoded files). The
signal model, the sites and the routes each uses are documented in
``docs/sample-data.md``; a change to the generator needs a bump of
:data:`GENERATOR_VERSION` and a reason in that page's changelog.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from joblib import Parallel, delayed
from joblib.externals.loky import get_reusable_executor

from multimodal_fl.sample_data._cohorts import SIGMA_E, PatientRecord, iter_site, simulate_site
from multimodal_fl.sample_data._sites import PROFILES, SiteSpec, sites_for
from multimodal_fl.sample_data._write import write_site

# Pillow, pydicom and nibabel are heavy to import: imported inside the functions that use them

__all__ = [
    "GENERATOR_VERSION",
    "PROFILES",
    "SIGMA_E",
    "TASKS",
    "SiteSummary",
    "content_hash",
    "content_manifest",
    "generate",
    "write_manifest",
]

#: version of the generator; bump it (and write a changelog entry) on any change to the output
GENERATOR_VERSION = "1.2"
#: sample tasks: folder name -> the shipped task file(s) they serve
TASKS: dict[str, tuple[str, ...]] = {
    "covid_oxygen": ("covid_oxygen_24h", "covid_oxygen_72h"),
    "alzheimers": ("alzheimers",),
}


@dataclass(frozen=True)
class SiteSummary:
    """What was generated for one site (the true labels, before any task rule is applied).

    Attributes
    ----------
    task, site
        Sample task folder and site name.
    patients
        Patients written.
    positives
        Positives by the generator (24 h label for COVID-19).
    positives_72h
        COVID-19 positives within 72 h (None for Alzheimer's).
    excluded
        Patients written on purpose so that the task excludes them.
    images, notes
        Patients with an image / with a note.
    routes
        The site's routes of the contract, in words.
    """

    task: str
    site: str
    patients: int
    positives: int
    positives_72h: int | None
    excluded: int
    images: int
    notes: int
    routes: str


def _routes(task: str, spec: SiteSpec) -> str:
    fhir = {"transaction": "transaction Bundle per patient", "collection": "collection Bundles",
            "ndjson": "NDJSON bulk export", "single": "single-resource Patient files + searchset "
            "Bundles"}[spec.fhir]
    image = {"dicom": "DICOM PatientID", "imagingstudy": "ImagingStudy", "csv": "images.csv"}[
        spec.image_link]
    notes = {"docref_data": "DocumentReference base64", "docref_url": "DocumentReference url",
             "diagreport": "DiagnosticReport presentedForm/conclusion", "notes_csv": "notes.csv",
             "none": "no notes"}[spec.notes]
    parts = [fhir, f"{spec.refs} references", image, notes]
    if spec.units:
        parts.append("units " + ", ".join(f"{k} in {v}" for k, v in sorted(spec.units.items())))
    if spec.labels_csv:
        parts.append("labels.csv")
    return "; ".join(parts)


def _summary(task: str, spec: SiteSpec, recs: list[PatientRecord]) -> SiteSummary:
    return SiteSummary(
        task=task, site=spec.name, patients=len(recs),
        positives=sum(r.label for r in recs),
        positives_72h=sum(r.label_72h or 0 for r in recs) if task == "covid_oxygen" else None,
        excluded=sum(r.excluded is not None for r in recs),
        images=sum(r.image_time is not None for r in recs),
        notes=0 if spec.notes == "none" else sum(bool(r.notes) for r in recs),
        routes=_routes(task, spec),
    )


def generate(out: Path | str, *, seed: int = 0, profile: str = "default",
             tasks: tuple[str, ...] = ("covid_oxygen", "alzheimers"),
             overwrite: bool = True, leaky_encounters: bool = False,
             patients: int | None = None, sites: int | None = None,
             workers: int = 0) -> list[SiteSummary]:
    """Write the generated multi-site cohorts, a README and a content manifest.

    Parameters
    ----------
    out
        Output folder; ``out/<task>/<site>/`` are (re)created.
    seed
        Generation seed: the same seed gives the same content.
    profile
        ``default`` (4 sites of 80-220 patients per task), ``tiny`` (3 sites of 20
        patients, 16-voxel volumes, 32-pixel images; for tests) or ``scale`` (``patients``
        per task over ``sites`` sites, 128-pixel X-rays and 48-voxel volumes; for
        benchmarks, see :func:`~multimodal_fl.sample_data._sites.scale_sites`).
    tasks
        Which sample tasks to write (``covid_oxygen``, ``alzheimers``).
    overwrite
        Remove existing ``out/<task>`` folders first; when False an existing one is an error.
    leaky_encounters
        A negative control, off by default: the COVID-19 presentation encounter is class
        ``IMP`` with a 3-12 day stay exactly for the 72 h positives (``EMER``, 4-30 h, for
        the rest), as in generator 1.0, so the encounter alone predicts the label. Recorded
        in the README and manifest. Nothing else changes.
    patients, sites
        ``scale`` only: patients per task (default 1,000) and sites per task (default 20).
    workers
        ``scale`` only: processes writing sites (each site is written by one process, from
        its own random stream, so the files do not depend on it); 0: one per core, 1: this
        process.

    Returns
    -------
    list of SiteSummary
        One summary per site written.

    Raises
    ------
    ValueError
        On an unknown profile or task, ``patients``/``sites`` outside the scale profile or
        out of range, or an existing task folder with ``overwrite=False``.
    """
    if profile not in PROFILES:
        raise ValueError(f"unknown profile '{profile}'; expected one of {sorted(PROFILES)}")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown sample task(s) {unknown}; expected some of {sorted(TASKS)}")
    specs = {task: sites_for(task, profile, patients=patients, sites=sites) for task in tasks}
    root = Path(out)
    for task in tasks:
        task_dir = root / task
        if task_dir.exists():
            if not overwrite:
                raise ValueError(f"{task_dir} exists; pass overwrite=True to replace it")
            _check_generated(root, task_dir)
            shutil.rmtree(task_dir)
    size = None
    if profile == "scale":
        first = next(iter(specs.values()), ())
        size = (sum(spec.n for spec in first), len(first))
        summaries, files = _write_scale(root, specs, seed, leaky_encounters, workers)
    else:
        summaries, files = [], None
        for task in tasks:
            for k, spec in enumerate(specs[task]):
                recs = simulate_site(task, spec, seed, k, leaky_encounters=leaky_encounters)
                write_site(root / task / spec.name, task, spec, recs)
                summaries.append(_summary(task, spec, recs))
    _write_readme(root, seed, profile, summaries, leaky_encounters=leaky_encounters,
                  scale=size)
    write_manifest(root, seed=seed, profile=profile, summaries=summaries,
                   leaky_encounters=leaky_encounters, files=files, scale=size)
    return summaries


def _write_scale_site(root: Path, task: str, spec: SiteSpec, seed: int, index: int,
                      leaky_encounters: bool) -> tuple[SiteSummary, dict[str, str]]:
    """Simulate and write one site of the scale profile, one image in memory at a time.

    Returns its summary and the content hashes of its files (paths relative to ``root``).
    """
    site_dir = root / task / spec.name
    recs = write_site(site_dir, task, spec,
                      iter_site(task, spec, seed, index, leaky_encounters=leaky_encounters),
                      release_images=True)
    hashes = {p.relative_to(root).as_posix(): content_hash(p)
              for p in sorted(site_dir.rglob("*")) if p.is_file()}
    return _summary(task, spec, recs), hashes


def _write_scale(root: Path, specs: dict[str, tuple[SiteSpec, ...]], seed: int,
                 leaky_encounters: bool, workers: int
                 ) -> tuple[list[SiteSummary], dict[str, str]]:
    """Write every site of the scale profile, by a pool of processes when ``workers`` != 1.

    Returns the summaries in (task, site) order and every file's content hash.
    """
    jobs = [(root, task, spec, seed, k, leaky_encounters)
            for task, task_specs in specs.items() for k, spec in enumerate(task_specs)]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else os.cpu_count() or 1
    n = max(1, min(workers or cores, len(jobs)))
    if n == 1:
        results = [_write_scale_site(*job) for job in jobs]
    else:
        # loky: fresh interpreters (a fork would inherit the caller's threads) that do not
        # re-run the caller's script; shut down after, so that they hold no memory
        try:
            results = Parallel(n_jobs=n, backend="loky")(
                delayed(_write_scale_site)(*job) for job in jobs)
        finally:
            get_reusable_executor().shutdown(wait=True)
    files: dict[str, str] = {}
    for _, hashes in results:
        files.update(hashes)
    return [summary for summary, _ in results], dict(sorted(files.items()))


# --------------------------------------------------------------------------- manifest


def content_hash(path: Path) -> str:
    """SHA-256 of a file's decoded content.

    JSON and NDJSON are parsed and re-serialised with sorted keys; PNG, DICOM and NIfTI
    are hashed as their decoded pixel arrays (with shape, dtype and the linking tags or
    affine), so compression settings and container metadata do not matter. Other files
    are hashed as bytes.

    Parameters
    ----------
    path
        The file.

    Returns
    -------
    str
        Hex digest.
    """
    h = hashlib.sha256()
    name = path.name.lower()
    if name.endswith(".json"):
        h.update(json.dumps(json.loads(path.read_text("utf-8")), sort_keys=True).encode())
    elif name.endswith(".ndjson"):
        for line in path.read_text("utf-8").splitlines():
            if line.strip():
                h.update(json.dumps(json.loads(line), sort_keys=True).encode() + b"\n")
    elif name.endswith(".png"):
        from PIL import Image

        with Image.open(path) as im:
            _hash_array(h, np.asarray(im))
    elif name.endswith(".dcm"):
        import pydicom

        ds = pydicom.dcmread(path)
        h.update(f"{ds.PatientID}|{ds.StudyDate}|{ds.SOPInstanceUID}".encode())
        _hash_array(h, ds.pixel_array)
    elif name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        raw = path.read_bytes()
        if name.endswith(".gz"):
            raw = gzip.decompress(raw)
        img = nib.Nifti1Image.from_stream(io.BytesIO(raw))
        _hash_array(h, np.asanyarray(img.dataobj))
        _hash_array(h, np.asarray(img.affine, dtype=np.float64))
    else:
        h.update(path.read_bytes())
    return h.hexdigest()


def _hash_array(h: Any, arr: np.ndarray) -> None:
    arr = np.ascontiguousarray(arr)
    h.update(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(arr.tobytes())


def content_manifest(root: Path | str) -> dict[str, str]:
    """Content hashes of every generated file under ``root`` (README and MANIFEST aside).

    Parameters
    ----------
    root
        A folder written by :func:`generate`.

    Returns
    -------
    dict
        POSIX path relative to ``root`` -> :func:`content_hash`, sorted by path.
    """
    base = Path(root)
    files = sorted(p for p in base.rglob("*") if p.is_file()
                   and p.relative_to(base).as_posix() not in {"MANIFEST.json", "README.md"})
    return {p.relative_to(base).as_posix(): content_hash(p) for p in files}


def _command(out: str, seed: int, profile: str, leaky_encounters: bool,
             scale: tuple[int, int] | None = None) -> str:
    leaky = " --leaky-encounters" if leaky_encounters else ""
    size = f" --patients {scale[0]} --sites {scale[1]}" if scale is not None else ""
    return f"mmfl sample-data {out} --seed {seed} --profile {profile}{size}{leaky}"


def write_manifest(root: Path | str, *, seed: int, profile: str,
                   summaries: list[SiteSummary] | None = None,
                   leaky_encounters: bool = False, files: dict[str, str] | None = None,
                   scale: tuple[int, int] | None = None) -> Path:
    """Write ``root/MANIFEST.json``: generator version, options, sites and file hashes.

    Parameters
    ----------
    root
        A folder written by :func:`generate`.
    seed, profile
        What it was generated with.
    summaries
        Site summaries to record (optional).
    leaky_encounters
        Whether the data was generated with the leaky-encounter negative control.
    files
        The files' content hashes when already computed (default: :func:`content_manifest`).
    scale
        ``(patients, sites)`` per task of the scale profile (recorded in the manifest).

    Returns
    -------
    pathlib.Path
        The manifest file.
    """
    base = Path(root)
    files = content_manifest(base) if files is None else files
    data = {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "profile": profile,
        **({"patients_per_task": scale[0], "sites_per_task": scale[1]} if scale is not None
           else {}),
        "leaky_encounters": leaky_encounters,
        "command": _command("OUT", seed, profile, leaky_encounters, scale),
        "sites": [s.__dict__ for s in summaries or []],
        "files": files,
        "digest": hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest(),
    }
    path = base / "MANIFEST.json"
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return path


def _check_generated(root: Path, task_dir: Path) -> None:
    """Refuse to replace a task folder that holds a file no earlier generation wrote (the
    ``files`` of ``root/MANIFEST.json``): a user's own data is never removed."""
    try:
        listed = set(json.loads((root / "MANIFEST.json").read_text(encoding="utf-8"))["files"])
    except (OSError, ValueError, KeyError, TypeError):
        listed = set()
    stray = sorted(p.relative_to(root).as_posix() for p in task_dir.rglob("*")
                   if p.is_file() and p.relative_to(root).as_posix() not in listed)
    if stray:
        raise ValueError(f"{task_dir} holds {len(stray)} file(s) that no sample-data run wrote "
                         f"there (e.g. {stray[0]}; {root / 'MANIFEST.json'} does not list "
                         "them): not replaced; give another folder, or move them first")


def _write_readme(root: Path, seed: int, profile: str, summaries: list[SiteSummary], *,
                  leaky_encounters: bool, scale: tuple[int, int] | None = None) -> None:
    warning = [
        "**Negative control: generated with `--leaky-encounters`.** The COVID-19 presentation "
        "encounter is class IMP with a 3-12 day stay exactly for the 72 h positives, so the "
        "encounter alone predicts the label. Do not use this folder to measure a model.",
        "",
    ] if leaky_encounters else []
    lines = [
        "# Generated sample data",
        "",
        "Everything in this folder is **generated** by `multimodal_fl.sample_data` "
        f"(generator version {GENERATOR_VERSION}); no real patient is in it. Do not edit it "
        "by hand: regenerate it with",
        "",
        "```bash",
        _command("sample_data", seed, profile, leaky_encounters, scale),
        "```",
        "",
        *warning,
        "and check `MANIFEST.json` (hashes of the decoded content of every file) is unchanged. "
        "The signal model, the sites and which route of the site data contract each uses are "
        "described in `docs/sample-data.md`.",
        "",
        "Counts are the generator's truth over every patient written (before the task's "
        "exclusions); `mmfl data summary configs/<task>.yaml` shows the cohorts the tasks build.",
        "",
        "| task | site | patients | positives | excluded on purpose | images | notes | routes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in summaries:
        pos = f"{s.positives}" + (f" (72 h: {s.positives_72h})" if s.positives_72h else "")
        lines.append(f"| {s.task} | {s.site} | {s.patients} | {pos} | {s.excluded} | {s.images} "
                     f"| {s.notes} | {s.routes} |")
    root.mkdir(parents=True, exist_ok=True)
    (root / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
