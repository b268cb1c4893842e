"""Writing simulated patients into a site directory through the site's contract routes."""

from __future__ import annotations

import csv
import json
import uuid
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from multimodal_fl.sample_data import _images
from multimodal_fl.sample_data._cohorts import PatientRecord
from multimodal_fl.sample_data._fhir import Refs, fhir_datetime
from multimodal_fl.sample_data._sites import SiteSpec

__all__ = ["write_site"]

Resource = dict[str, Any]


def _dump(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _entry(res: Resource, site: SiteSpec, transaction: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {}
    if site.refs == "urn":
        entry["fullUrl"] = f"urn:uuid:{res['id']}"
    entry["resource"] = res
    if transaction:
        if site.refs == "urn":
            entry["request"] = {"method": "POST", "url": res["resourceType"]}
        else:
            entry["request"] = {"method": "PUT", "url": f"{res['resourceType']}/{res['id']}"}
    return entry


def _bundle(kind: str, resources: list[Resource], site: SiteSpec) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind,
            "entry": [_entry(r, site, kind == "transaction") for r in resources]}


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _image_file(task: str, site: SiteSpec, pid: str) -> str:
    if task == "alzheimers":
        return f"images/{pid}.nii.gz"
    return f"images/{pid}.dcm" if site.image_link == "dicom" else f"images/{pid}.png"


def _add_image(root: Path, task: str, site: SiteSpec, refs: Refs, rec: PatientRecord,
               res: list[Resource], images_rows: list[list[str]]) -> None:
    """Write the patient's image file and link it by the site's route.

    The route is an ImagingStudy (appended to ``res``), a row of ``images.csv`` (appended to
    ``images_rows``) or the DICOM PatientID tag written into the file.
    """
    if rec.image is None or rec.image_time is None:
        return
    rel = _image_file(task, site, rec.pid)
    path = root / rel
    if task == "alzheimers":
        _images.write_nifti(path, rec.image, voxel_mm=192.0 / rec.image.shape[0])
    elif site.image_link == "dicom":
        _images.write_dicom(path, rec.image, patient_id=rec.pid,
                            study_date=rec.image_time,
                            uid_seed=f"{site.name}:{rec.pid}",
                            pixel_mm=350.0 / rec.image.shape[0], tz_hours=site.tz_hours)
    else:
        _images.write_png(path, rec.image)
    modality = "MR" if task == "alzheimers" else "DX"
    if site.image_link == "imagingstudy":
        res.append(refs.imaging_study(f"{rec.pid}-img" if site.refs != "urn" else
                                      _child_uuid(rec.pid, "img"), rec.pid,
                                      rec.image_time, rel, modality))
    elif site.image_link == "csv":
        view = "axial" if task == "alzheimers" else "PA"
        images_rows.append([rec.pid, rel, modality, view,
                            fhir_datetime(rec.image_time, site.tz_hours)])


def _add_notes(root: Path, task: str, site: SiteSpec, refs: Refs, rec: PatientRecord,
               res: list[Resource], notes_rows: list[list[str]], position: int) -> None:
    """Write the patient's notes (and discharge note) by the site's route.

    The route is a DocumentReference with inline data or a url to a file under
    ``notes/``, a DiagnosticReport (``presentedForm`` for every other patient by
    ``position``, else ``conclusion``), or a row of ``notes.csv``.
    """
    for k, (text, when, kind) in enumerate(rec.notes):
        nid = f"{rec.pid}-n{k}" if site.refs != "urn" else _child_uuid(rec.pid, f"n{k}")
        loinc = "34111-5" if task == "covid_oxygen" else "11506-3"
        if site.notes == "docref_data":
            res.append(refs.document_reference(nid, rec.pid, when, text=text, loinc=loinc,
                                               encounter=rec.encounter))
        elif site.notes == "docref_url":
            rel = f"notes/{rec.pid}-{k}.txt"
            _write_text(root / rel, text)
            res.append(refs.document_reference(nid, rec.pid, when, url=rel, loinc=loinc,
                                               encounter=rec.encounter))
        elif site.notes == "diagreport":
            res.append(refs.diagnostic_report(nid, rec.pid, when, text,
                                              presented_form=position % 2 == 0,
                                              loinc=loinc, encounter=rec.encounter))
        elif site.notes == "notes_csv":
            notes_rows.append([rec.pid, text, fhir_datetime(when, site.tz_hours), kind])
    if rec.discharge is not None and site.notes != "none":
        text, when = rec.discharge
        did = f"{rec.pid}-dc" if site.refs != "urn" else _child_uuid(rec.pid, "dc")
        res.append(refs.document_reference(did, rec.pid, when, text=text, loinc="18842-5",
                                           encounter=rec.encounter))


def _write_fhir(fhir: Path, site: SiteSpec, patients: list[PatientRecord],
                per_patient: list[list[Resource]]) -> None:
    """Write the patients' resources in the site's FHIR layout.

    Layouts: one transaction Bundle per patient, collection Bundles of 50 patients, one
    NDJSON file per resource type, or Patient resources alone with the rest in searchset
    Bundles of 2000 resources.
    """
    fhir.mkdir(parents=True, exist_ok=True)
    if site.fhir == "transaction":
        for rec, res in zip(patients, per_patient, strict=True):
            _write_text(fhir / f"{rec.pid}.json", _dump(_bundle("transaction", res, site)))
    elif site.fhir == "collection":
        for start in range(0, len(per_patient), 50):
            chunk = [r for res in per_patient[start:start + 50] for r in res]
            _write_text(fhir / f"collection-{start // 50 + 1:03d}.json",
                        _dump(_bundle("collection", chunk, site)))
    elif site.fhir == "ndjson":
        by_type: dict[str, list[str]] = defaultdict(list)
        for res in per_patient:
            for r in res:
                by_type[r["resourceType"]].append(_dump(r))
        for rtype in sorted(by_type):
            _write_text(fhir / f"{rtype}.ndjson", "\n".join(by_type[rtype]) + "\n")
    else:  # single: Patient resources alone, the rest in searchset bundles
        rest: list[Resource] = []
        for res in per_patient:
            for r in res:
                if r["resourceType"] == "Patient":
                    _write_text(fhir / "Patient" / f"{r['id']}.json", _dump(r))
                else:
                    rest.append(r)
        for k, start in enumerate(range(0, len(rest), 2000)):
            _write_text(fhir / f"searchset-{k + 1:03d}.json",
                        _dump(_bundle("searchset", rest[start:start + 2000], site)))


def write_site(root: Path, task: str, site: SiteSpec, patients: Iterable[PatientRecord], *,
               release_images: bool = False) -> list[PatientRecord]:
    """Write one site directory from simulated patients.

    Parameters
    ----------
    root
        The site directory (created).
    task
        ``covid_oxygen`` or ``alzheimers``.
    site
        The site's specification (routes, units, acquisition).
    patients
        The simulated patients (a list, or an iterator such as
        :func:`~multimodal_fl.sample_data._cohorts.iter_site` that makes them one at a time).
    release_images
        Drop each patient's pixels (``image = None``) once its file is written, so that a
        large site holds one image at a time; ``image_time`` still says it has one.

    Returns
    -------
    list of PatientRecord
        The patients written, in order.
    """
    refs = Refs(site.refs, tz_hours=site.tz_hours)
    images_rows: list[list[str]] = []
    notes_rows: list[list[str]] = []
    per_patient: list[list[Resource]] = []
    written: list[PatientRecord] = []
    for rec in patients:
        res = list(rec.resources)
        _add_image(root, task, site, refs, rec, res, images_rows)
        if release_images:
            rec.image = None
        _add_notes(root, task, site, refs, rec, res, notes_rows, position=len(per_patient))
        per_patient.append(res)
        written.append(rec)
    _write_fhir(root / "fhir", site, written, per_patient)
    if images_rows:
        _write_csv(root / "images.csv", ["patient_id", "path", "modality", "view", "acquired"],
                   images_rows)
    if notes_rows:
        _write_csv(root / "notes.csv", ["patient_id", "text", "date", "kind"], notes_rows)
    if site.labels_csv:
        _write_csv(root / "labels.csv", ["patient_id", "label"],
                   [[rec.pid, str(rec.label)] for rec in written])
    return written


def _child_uuid(pid: str, key: str) -> str:
    """A deterministic UUID for a patient's child resource (sites with ``urn:uuid`` ids)."""
    return str(uuid.uuid5(uuid.UUID(pid), key))


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
