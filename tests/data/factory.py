"""Small hand-made FHIR R4 resources and site directories for the data tests."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"

COVID = "840539006"
OXYGEN = "371908008"
VENTILATOR = "449071006"
HYPERTENSION = "59621000"
ALZHEIMERS = "26929004"


def patient(pid: str, *, birth: str = "1960-05-01", gender: str = "female",
            deceased: str | None = None) -> dict[str, Any]:
    """A Patient."""
    p: dict[str, Any] = {"resourceType": "Patient", "id": pid, "birthDate": birth,
                         "gender": gender}
    if deceased:
        p["deceasedDateTime"] = deceased
    return p


def encounter(eid: str, pid: str, start: str, end: str | None = None, *,
              ref: str = "Patient/{pid}") -> dict[str, Any]:
    """An ambulatory Encounter."""
    period = {"start": start, **({"end": end} if end else {})}
    return {"resourceType": "Encounter", "id": eid, "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                      "code": "AMB"},
            "subject": {"reference": ref.format(pid=pid)}, "period": period}


def condition(cid: str, pid: str, code: str, onset: str, *, encounter_id: str | None = None,
              abatement: str | None = None, ref: str = "Patient/{pid}",
              recorded: str | None = None) -> dict[str, Any]:
    """A Condition with a SNOMED code (``recorded``: its recordedDate)."""
    c: dict[str, Any] = {"resourceType": "Condition", "id": cid,
                         "code": {"coding": [{"system": SNOMED, "code": code}]},
                         "subject": {"reference": ref.format(pid=pid)}, "onsetDateTime": onset}
    if recorded:
        c["recordedDate"] = recorded
    if encounter_id:
        c["encounter"] = {"reference": f"Encounter/{encounter_id}"}
    if abatement:
        c["abatementDateTime"] = abatement
    return c


def observation(oid: str, pid: str, code: str, value: float, unit: str, when: str, *,
                ucum: bool = True, ref: str = "Patient/{pid}",
                issued: str | None = None) -> dict[str, Any]:
    """An Observation with a LOINC code and a valueQuantity (``issued``: when released)."""
    vq: dict[str, Any] = {"value": value, "unit": unit}
    if ucum:
        vq.update(system=UCUM, code=unit)
    obs: dict[str, Any] = {"resourceType": "Observation", "id": oid, "status": "final",
                           "code": {"coding": [{"system": LOINC, "code": code}]},
                           "subject": {"reference": ref.format(pid=pid)},
                           "effectiveDateTime": when, "valueQuantity": vq}
    if issued:
        obs["issued"] = issued
    return obs


def bp_panel(oid: str, pid: str, systolic: float, diastolic: float, when: str
             ) -> dict[str, Any]:
    """A blood-pressure panel (85354-9) with systolic/diastolic components."""
    def comp(code: str, v: float) -> dict[str, Any]:
        return {"code": {"coding": [{"system": LOINC, "code": code}]},
                "valueQuantity": {"value": v, "unit": "mm[Hg]", "system": UCUM,
                                  "code": "mm[Hg]"}}
    return {"resourceType": "Observation", "id": oid, "status": "final",
            "code": {"coding": [{"system": LOINC, "code": "85354-9"}]},
            "subject": {"reference": f"Patient/{pid}"}, "effectiveDateTime": when,
            "component": [comp("8480-6", systolic), comp("8462-4", diastolic)]}


def procedure(prid: str, pid: str, code: str, when: str) -> dict[str, Any]:
    """A completed Procedure with a SNOMED code."""
    return {"resourceType": "Procedure", "id": prid, "status": "completed",
            "code": {"coding": [{"system": SNOMED, "code": code}]},
            "subject": {"reference": f"Patient/{pid}"},
            "performedPeriod": {"start": when, "end": when}}


def device(did: str, pid: str, code: str) -> dict[str, Any]:
    """A Device with a SNOMED type."""
    return {"resourceType": "Device", "id": did,
            "type": {"coding": [{"system": SNOMED, "code": code}]},
            "patient": {"reference": f"Patient/{pid}"}}


def device_use(uid: str, pid: str, did: str, when: str) -> dict[str, Any]:
    """A DeviceUseStatement dating a Device's use."""
    return {"resourceType": "DeviceUseStatement", "id": uid, "status": "active",
            "subject": {"reference": f"Patient/{pid}"},
            "device": {"reference": f"Device/{did}"}, "timingDateTime": when}


def document(did: str, pid: str, text: str | None, when: str | None, *,
             url: str | None = None, period_start: str | None = None) -> dict[str, Any]:
    """A DocumentReference with an inline base64 note or a url.

    ``when`` is ``date`` (a FHIR instant); ``period_start`` is ``context.period.start``
    (a dateTime, so it may be a date only).
    """
    att: dict[str, Any] = {"contentType": "text/plain"}
    if text is not None:
        att["data"] = base64.b64encode(text.encode()).decode()
    if url is not None:
        att["url"] = url
    d: dict[str, Any] = {"resourceType": "DocumentReference", "id": did, "status": "current",
                         "subject": {"reference": f"Patient/{pid}"},
                         "content": [{"attachment": att}]}
    if when:
        d["date"] = when
    if period_start:
        d["context"] = {"period": {"start": period_start}}
    return d


def report(rid: str, pid: str, conclusion: str, issued: str | None, *,
           effective: str | None = None) -> dict[str, Any]:
    """A DiagnosticReport with a conclusion (``issued`` an instant, ``effective`` a dateTime)."""
    r: dict[str, Any] = {"resourceType": "DiagnosticReport", "id": rid, "status": "final",
                         "code": {"coding": [{"system": LOINC, "code": "18748-4"}]},
                         "subject": {"reference": f"Patient/{pid}"}, "conclusion": conclusion}
    if issued:
        r["issued"] = issued
    if effective:
        r["effectiveDateTime"] = effective
    return r


def imaging_study(sid: str, pid: str, path: str, started: str) -> dict[str, Any]:
    """An ImagingStudy linking a site-relative image path (urn:mmfl:image-path)."""
    return {"resourceType": "ImagingStudy", "id": sid, "status": "available",
            "subject": {"reference": f"Patient/{pid}"}, "started": started,
            "identifier": [{"system": "urn:mmfl:image-path", "value": path}]}


def bundle(resources: list[dict[str, Any]], *, kind: str = "collection",
           urn: bool = False) -> dict[str, Any]:
    """A Bundle; ``urn=True`` uses urn:uuid fullUrls (as Synthea does)."""
    entries = []
    for r in resources:
        e: dict[str, Any] = {"resource": r}
        if urn:
            e["fullUrl"] = f"urn:uuid:{r['id']}"
        entries.append(e)
    return {"resourceType": "Bundle", "type": kind, "entry": entries}


def write_json(path: Path, obj: Any) -> Path:
    """Write JSON, creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def covid_patient(pid: str, index: str = "2020-03-01T10:00:00+00:00", *,
                  oxygen_at: str | None = None, birth: str = "1960-05-01",
                  gender: str = "female", deceased: str | None = None,
                  extra: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """A COVID-19 patient: encounter at ``index``, the Condition pointing to it, vitals
    one hour before, a CRP one day later (after the index), optional oxygen procedure."""
    res = [
        patient(pid, birth=birth, gender=gender, deceased=deceased),
        encounter(f"{pid}-enc", pid, index),
        condition(f"{pid}-covid", pid, COVID, index, encounter_id=f"{pid}-enc"),
        observation(f"{pid}-hr", pid, "8867-4", 80.0, "/min", "2020-03-01T09:00:00+00:00"),
        observation(f"{pid}-crp-late", pid, "1988-5", 50.0, "mg/L",
                    "2020-03-02T10:00:00+00:00"),
    ]
    if oxygen_at:
        res.append(procedure(f"{pid}-o2", pid, OXYGEN, oxygen_at))
    return res + (extra or [])


def dicom(path: Path, patient_id: str, *, study_date: str, study_time: str | None = None,
          tz_offset: str | None = None) -> Path:
    """A minimal 8x8 DICOM file linked by ``PatientID`` and dated by ``StudyDate`` (+ time).

    ``tz_offset`` sets ``TimezoneOffsetFromUTC`` (``"+1000"``).
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # type: ignore[assignment]
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.PatientID = patient_id
    ds.StudyDate = study_date
    if study_time is not None:
        ds.StudyTime = study_time
    if tz_offset is not None:
        ds.TimezoneOffsetFromUTC = tz_offset
    ds.Rows, ds.Columns = 8, 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(64)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
