"""Small builders for the FHIR R4 resources the sample cohorts need (plain dicts).

The resources are deliberately lean (no narrative, few ``display`` strings) so the
committed sample data stays small; they parse with ``fhir.resources.R4B``.
"""

from __future__ import annotations

import base64
from datetime import date, datetime, timedelta, timezone
from typing import Any, Literal

__all__ = [
    "LOINC",
    "SNOMED",
    "UCUM",
    "RefStyle",
    "Refs",
    "fhir_date",
    "fhir_datetime",
]

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
IMAGE_PATH_SYSTEM = "urn:mmfl:image-path"

RefStyle = Literal["urn", "relative"]
Resource = dict[str, Any]


def fhir_datetime(when: datetime, tz_hours: int = 0) -> str:
    """Format an aware UTC datetime as a FHIR ``dateTime`` in a fixed UTC offset.

    Parameters
    ----------
    when
        The instant (timezone-aware).
    tz_hours
        Offset the string is written in (the instant is unchanged).

    Returns
    -------
    str
        ``YYYY-MM-DDThh:mm:ss+hh:mm`` (``Z`` for offset 0).
    """
    local = when.astimezone(timezone(timedelta(hours=tz_hours)))
    text = local.replace(microsecond=0).isoformat()
    return text[:-6] + "Z" if tz_hours == 0 else text


def fhir_date(day: date) -> str:
    """Format a date as a FHIR ``date``."""
    return day.isoformat()


def coding(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    """A CodeableConcept with one coding."""
    c: dict[str, str] = {"system": system, "code": code}
    if display:
        c["display"] = display
    return {"coding": [c]}


def quantity(value: float, unit: str) -> dict[str, Any]:
    """A UCUM valueQuantity."""
    return {"value": value, "unit": unit, "system": UCUM, "code": unit}


class Refs:
    """Resource ids and references for one site, in that site's reference style.

    ``urn`` sites use UUID ids and ``urn:uuid:<id>`` references (Synthea's transaction
    bundles); ``relative`` sites use short ids and ``Type/<id>`` references.

    Parameters
    ----------
    style
        ``"urn"`` or ``"relative"``.
    tz_hours
        UTC offset every dateTime of the site is written in.
    """

    def __init__(self, style: RefStyle, *, tz_hours: int = 0) -> None:
        self.style = style
        self.tz_hours = tz_hours

    def ref(self, rtype: str, rid: str) -> dict[str, str]:
        """A Reference to ``rtype/rid`` in the site's style."""
        if self.style == "urn":
            return {"reference": f"urn:uuid:{rid}"}
        return {"reference": f"{rtype}/{rid}"}

    def dt(self, when: datetime) -> str:
        """A dateTime string in the site's offset."""
        return fhir_datetime(when, self.tz_hours)

    # ----------------------------------------------------------------- resources

    def patient(self, pid: str, gender: str, birth: date, deceased: datetime | None) -> Resource:
        """A Patient (gender, birthDate, deceasedDateTime when dead)."""
        res: Resource = {"resourceType": "Patient", "id": pid, "gender": gender,
                         "birthDate": fhir_date(birth)}
        if deceased is not None:
            res["deceasedDateTime"] = self.dt(deceased)
        return res

    def encounter(self, eid: str, pid: str, cls: str, snomed: str, start: datetime,
                  end: datetime) -> Resource:
        """An Encounter with an ActCode class (AMB, EMER, IMP) and a SNOMED type."""
        return {"resourceType": "Encounter", "id": eid, "status": "finished",
                "class": {"system": ACT_CODE, "code": cls},
                "type": [coding(SNOMED, snomed)], "subject": self.ref("Patient", pid),
                "period": {"start": self.dt(start), "end": self.dt(end)}}

    def condition(self, cid: str, pid: str, code: str, onset: datetime, *,
                  display: str | None = None, encounter: str | None = None,
                  recorded: datetime | None = None) -> Resource:
        """An active, confirmed SNOMED Condition with onsetDateTime."""
        res: Resource = {
            "resourceType": "Condition", "id": cid,
            "clinicalStatus": coding(CLINICAL, "active"),
            "verificationStatus": coding(VERIFICATION, "confirmed"),
            "code": coding(SNOMED, code, display), "subject": self.ref("Patient", pid),
            "onsetDateTime": self.dt(onset),
        }
        if encounter is not None:
            res["encounter"] = self.ref("Encounter", encounter)
        if recorded is not None:
            res["recordedDate"] = self.dt(recorded)
        return res

    def observation(self, oid: str, pid: str, loinc: str, when: datetime, value: float,
                    unit: str, *, encounter: str | None = None) -> Resource:
        """A final LOINC Observation with a UCUM valueQuantity."""
        res: Resource = {"resourceType": "Observation", "id": oid, "status": "final",
                         "code": coding(LOINC, loinc), "subject": self.ref("Patient", pid),
                         "effectiveDateTime": self.dt(when), "valueQuantity": quantity(value, unit)}
        if encounter is not None:
            res["encounter"] = self.ref("Encounter", encounter)
        return res

    def bp_panel(self, oid: str, pid: str, when: datetime, systolic: float, diastolic: float,
                 *, encounter: str | None = None) -> Resource:
        """Blood-pressure panel 85354-9 with components 8480-6 and 8462-4."""
        res: Resource = {
            "resourceType": "Observation", "id": oid, "status": "final",
            "code": coding(LOINC, "85354-9"), "subject": self.ref("Patient", pid),
            "effectiveDateTime": self.dt(when),
            "component": [
                {"code": coding(LOINC, "8480-6"), "valueQuantity": quantity(systolic, "mm[Hg]")},
                {"code": coding(LOINC, "8462-4"), "valueQuantity": quantity(diastolic, "mm[Hg]")},
            ],
        }
        if encounter is not None:
            res["encounter"] = self.ref("Encounter", encounter)
        return res

    def procedure(self, prid: str, pid: str, code: str, display: str, start: datetime,
                  end: datetime, *, encounter: str | None = None) -> Resource:
        """A completed SNOMED Procedure with performedPeriod."""
        res: Resource = {"resourceType": "Procedure", "id": prid, "status": "completed",
                         "code": coding(SNOMED, code, display),
                         "subject": self.ref("Patient", pid),
                         "performedPeriod": {"start": self.dt(start), "end": self.dt(end)}}
        if encounter is not None:
            res["encounter"] = self.ref("Encounter", encounter)
        return res

    def device(self, did: str, pid: str, code: str, display: str, when: datetime) -> Resource:
        """A Device as Synthea writes it: SNOMED type, patient, manufactureDate = time of use."""
        return {"resourceType": "Device", "id": did, "status": "active",
                "type": coding(SNOMED, code, display), "patient": self.ref("Patient", pid),
                "manufactureDate": self.dt(when)}

    def document_reference(self, did: str, pid: str, when: datetime, *, text: str | None = None,
                           url: str | None = None, loinc: str = "34111-5",
                           encounter: str | None = None) -> Resource:
        """A DocumentReference with inline base64 ``data`` or a site-relative ``url``."""
        attachment: dict[str, Any] = {"contentType": "text/plain"}
        if text is not None:
            attachment["data"] = base64.b64encode(text.encode("utf-8")).decode("ascii")
        if url is not None:
            attachment["url"] = url
        res: Resource = {"resourceType": "DocumentReference", "id": did, "status": "current",
                         "type": coding(LOINC, loinc), "subject": self.ref("Patient", pid),
                         "date": self.dt(when), "content": [{"attachment": attachment}]}
        if encounter is not None:
            res["context"] = {"encounter": [self.ref("Encounter", encounter)]}
        return res

    def diagnostic_report(self, rid: str, pid: str, when: datetime, text: str, *,
                          presented_form: bool, loinc: str = "34111-5",
                          encounter: str | None = None) -> Resource:
        """A DiagnosticReport carrying the note in ``presentedForm`` (base64) or ``conclusion``."""
        res: Resource = {"resourceType": "DiagnosticReport", "id": rid, "status": "final",
                         "code": coding(LOINC, loinc), "subject": self.ref("Patient", pid),
                         "effectiveDateTime": self.dt(when), "issued": self.dt(when)}
        if presented_form:
            res["presentedForm"] = [{
                "contentType": "text/plain",
                "data": base64.b64encode(text.encode("utf-8")).decode("ascii"),
            }]
        else:
            res["conclusion"] = text
        if encounter is not None:
            res["encounter"] = self.ref("Encounter", encounter)
        return res

    def imaging_study(self, sid: str, pid: str, when: datetime, path: str,
                      modality: str) -> Resource:
        """An ImagingStudy naming a site-relative image path (``urn:mmfl:image-path``)."""
        return {"resourceType": "ImagingStudy", "id": sid, "status": "available",
                "subject": self.ref("Patient", pid), "started": self.dt(when),
                "identifier": [{"system": IMAGE_PATH_SYSTEM, "value": path}],
                "modality": [{"system": DCM, "code": modality}],
                "numberOfSeries": 1, "numberOfInstances": 1}
