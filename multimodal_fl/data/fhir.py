"""FHIR R4 Bundles / NDJSON -> per-patient records the task needs.

Reading is two-pass by design:

1. a fast dict-level pass (``orjson``) over every resource, which keeps only the
   resources the task uses: ``Patient``; ``Encounter`` (for ``condition_encounter``
   index times); ``Condition`` with a cohort, comorbidity or label code; ``Observation``
   with a feature code (also as a ``component`` code, e.g. the blood-pressure panel
   85354-9 with components 8480-6 / 8462-4); ``Procedure`` with a label code; ``Device``
   with a label code and the ``DeviceUseStatement`` that dates it; ``MedicationRequest``
   with a medication code (``medicationCodeableConcept``, or ``medicationReference`` to a
   ``Medication`` with one: contained, ``Medication/<id>`` or a bundle ``fullUrl``; every
   ``Medication`` is kept when the task has medication features); ``DocumentReference``;
   ``DiagnosticReport`` with ``presentedForm`` or ``conclusion``; ``ImagingStudy``;
2. validation of only those resources with ``fhir.resources.R4B`` pydantic models
   (``DataConfig.validation == "task"``), or of every resource (``"all"``).

Patients are joined by ``Patient.id``; references may be ``Patient/<id>``,
``urn:uuid:<id>`` (Synthea's transaction bundles) or any ``fullUrl`` of a bundle entry, and
``<Type>/<id>`` may be an absolute URL and version-specific (``.../_history/2``), for every
type the reader follows (Patient, Encounter, Device, Medication). Encounter and Device ids
are per patient: two patients' files may each hold an ``Encounter/e1``. A record whose
status says it did not happen or was entered in error (:data:`VOID_STATUS`) is not used,
nor is a MedicationRequest whose contained Medication's status says so. An Observation is
one record per (patient, id): a later version (``meta.versionId``, else ``meta.lastUpdated``)
replaces an earlier one, an identical copy is dropped, and another content without a version
order is reported (``conflicting_observation``) with the first kept.
An id outside FHIR's id pattern ``[A-Za-z0-9-.]{1,64}`` (``OAS1_0018_MR1``: underscores are
common in source ids) is kept as written, so the resource and every reference to it
(``Patient/<id>``, its percent-encoded form, ``urn:uuid:<id>``) still meet, and noted
(``nonconforming_id``); the R4B model checks the rest of the resource. With
``strict_ids`` such a resource is refused (``invalid_fhir``), as R4B refuses it.
All times become timezone-aware UTC datetimes; a date without a time, or a time without an
offset, is read in the site's time zone (``tz``). Observations, Conditions and
MedicationRequests keep two times (see :mod:`~multimodal_fl.data.records`): the clinical
time (``effective[x]``, onset, ``authoredOn``; a partial date's first instant; an ``onsetAge``
from the birth date) for the index
and the labels, and the time they became known (``issued``, ``recordedDate``; a partial date's
last second; never before the clinical time) for the feature cut-off.

The reader sits above the modules it uses: JSON files and dated fields in
:mod:`~multimodal_fl.data.fhir_json`, the record types in :mod:`~multimodal_fl.data.records`,
notes in :mod:`~multimodal_fl.data.text` and the index rule in :mod:`~multimodal_fl.data.tasks`
(to validate only the Encounters and Observations the task can use). ``Coded``,
``ObservationValue``, ``PatientRecord``, ``SiteRecords``, ``matches``, ``iter_file_resources``
and ``parse_time`` live in those modules and are re-exported here for existing imports.
"""

from __future__ import annotations

import functools
import re
import types
import typing
from collections import defaultdict
from collections.abc import Container
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import orjson
from pydantic import ValidationError

from multimodal_fl.config import TaskSpec
from multimodal_fl.data.errors import ErrorSink
from multimodal_fl.data.fhir_json import (
    BadField,
    first_time,
    iter_file_resources,
    literal_ref,
    parse_time,
    shifted,
)
from multimodal_fl.data.records import (
    Coded,
    Coding,
    ImageRef,
    ObservationValue,
    PatientRecord,
    SiteRecords,
    matches,
)
from multimodal_fl.data.tasks import index_time
from multimodal_fl.data.text import notes_from_resource
from multimodal_fl.data.units import UnitError, accepts_unitless, convert

# fhir.resources is heavy to import: imported inside the functions that use it

__all__ = [
    "ADMINISTRATIVE_GENDER",
    "FHIR_ID",
    "VOID_STATUS",
    "Coded",
    "FHIRReader",
    "ObservationValue",
    "PatientRecord",
    "SiteRecords",
    "at_age",
    "iter_file_resources",
    "known_resource_types",
    "matches",
    "nonconforming_ids",
    "parse_time",
    "void_status",
    "with_site_offsets",
]


@functools.cache
def known_resource_types() -> frozenset[str]:
    """Resource type names of FHIR R4B (classes deriving from Resource / DomainResource).

    Read from the ``fhir.resources.R4B`` module sources (importing every model class
    would take seconds).
    """
    import fhir.resources.R4B as r4b

    pattern = re.compile(
        r"^class (\w+)\((?:domainresource\.DomainResource|resource\.Resource)\)", re.M)
    names: set[str] = set()
    for folder in r4b.__path__:
        for path in Path(folder).glob("*.py"):
            names.update(pattern.findall(path.read_text(encoding="utf-8")))
    names.discard("DomainResource")
    return frozenset(names)


@functools.cache
def _model(resource_type: str) -> Any:
    # fhir.resources is heavy (a pydantic model per resource type): imported on first use
    from fhir.resources.R4B import get_fhir_model_class

    return get_fhir_model_class(resource_type)


@functools.cache
def _element_fields(resource_type: str) -> dict[str, tuple[Any, bool]]:
    """JSON key -> (the R4B model of its complex datatype, whether it is a list), per type.

    ``code`` -> ``(CodeableConcept, False)``, ``category`` -> ``(CodeableConcept, True)``;
    primitives and ``contained`` (any resource) are left out.
    """
    out: dict[str, tuple[Any, bool]] = {}
    for name, info in _model(resource_type).model_fields.items():
        ann: Any = info.annotation
        many = False
        while True:
            origin = typing.get_origin(ann)
            args = [a for a in typing.get_args(ann) if a is not type(None)]
            if origin in (typing.Union, types.UnionType) and len(args) == 1:
                ann = args[0]
            elif origin is list and len(args) == 1:
                ann, many = args[0], True
            else:
                break
        klass = ann.get_model_klass() if hasattr(ann, "get_model_klass") else None
        if klass is not None and klass.__name__ not in {"Resource", "DomainResource"}:
            out[info.alias or name] = (klass, many)
    return out


class _ElementCache:
    """R4B validation that checks each distinct complex element once per site.

    A resource is validated as its model with every top-level complex element (a
    CodeableConcept, a Reference, a Quantity ...) replaced by the model instance that the
    same JSON value validated to before: the site's hundred thousand Observations share a few
    hundred codes, subjects and encounters. An element is context-free (its model does not
    depend on where it sits), so the outcome is the model's own; the resource's own rules
    (required elements, one of ``value[x]``, nulls in lists) are checked every time. When an
    element is invalid, the whole resource is validated as written, so that the error is
    the one the model reports.
    """

    def __init__(self, limit: int = 200_000) -> None:
        self.limit = limit
        self._seen: dict[tuple[Any, bytes], Any] = {}

    def _element(self, klass: Any, value: dict[str, Any]) -> Any:
        key = (klass, orjson.dumps(value, option=orjson.OPT_SORT_KEYS))
        inst = self._seen.get(key)
        if inst is None:
            inst = klass.model_validate(value)
            if len(self._seen) >= self.limit:
                self._seen.clear()
            self._seen[key] = inst
        return inst

    def validate(self, resource_type: str, res: dict[str, Any]) -> None:
        """Validate ``res`` with its R4B model; raise as ``model_validate`` would."""
        fields = _element_fields(resource_type)
        data = dict(res)
        try:
            for key, value in res.items():
                spec = fields.get(key)
                if spec is None:
                    continue
                klass, many = spec
                if many and isinstance(value, list) and all(isinstance(v, dict) for v in value):
                    data[key] = [self._element(klass, v) for v in value]
                elif not many and isinstance(value, dict):
                    data[key] = self._element(klass, value)
        except (ValidationError, orjson.JSONEncodeError):
            data = res  # the model's own report of what is wrong
        _model(resource_type).model_validate(data)


def _codings(concept: Any) -> list[Coding]:
    if not isinstance(concept, dict):
        return []
    out = []
    for c in concept.get("coding") or []:
        if isinstance(c, dict) and c.get("code") is not None:
            out.append((str(c.get("system") or ""), str(c["code"])))
    return out


def _has_code(concept: Any, codes: Container[str]) -> bool:
    """Whether a CodeableConcept has a coding whose code is in ``codes`` (as :func:`_codings`)."""
    if not isinstance(concept, dict):
        return False
    for c in concept.get("coding") or ():
        if isinstance(c, dict):
            code = c.get("code")
            if code is not None and str(code) in codes:
                return True
    return False


def _coding_list(node: Any) -> list[Coding]:
    """Codings of a Coding, a list of Codings or a CodeableConcept (``ImagingStudy.modality``)."""
    items = node if isinstance(node, list) else [node]
    out: list[Coding] = []
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("coding"), list):
            out += _codings(item)
        elif isinstance(item, dict) and item.get("code") is not None:
            out.append((str(item.get("system") or ""), str(item["code"])))
    return out


#: FHIR's id datatype (R4B ``id``): 1-64 of letters, digits, '-' and '.'.
FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_STAND_IN_ID = "nonconforming-id"  # what the R4B model sees instead of a nonconforming id


def _nonconforming(value: Any) -> bool:
    return isinstance(value, str) and value != "" and FHIR_ID.fullmatch(value) is None


def nonconforming_ids(res: dict[str, Any]) -> list[str]:
    """The ids of ``res`` and of its contained resources that are outside :data:`FHIR_ID`.

    Parameters
    ----------
    res
        A resource dict.

    Returns
    -------
    list of str
        The offending ids, the resource's own first; empty when every id conforms (an
        absent or empty id is not counted here: the R4B model reports it).
    """
    contained = res.get("contained")
    inner = [c.get("id") for c in contained if isinstance(c, dict)] \
        if isinstance(contained, list) else []
    return [str(i) for i in (res.get("id"), *inner) if _nonconforming(i)]


def _with_stand_in_ids(res: dict[str, Any]) -> dict[str, Any]:
    """A shallow copy of ``res`` whose nonconforming ids are a conforming stand-in.

    Only the R4B model sees the copy: the reader keeps the ids as written.
    """
    out = dict(res)
    if _nonconforming(out.get("id")):
        out["id"] = _STAND_IN_ID
    contained = res.get("contained")
    if isinstance(contained, list):
        out["contained"] = [{**c, "id": _STAND_IN_ID}
                            if isinstance(c, dict) and _nonconforming(c.get("id")) else c
                            for c in contained]
    return out


_LOCAL_DATETIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?")


def _local_offset(value: str, tz: tzinfo) -> str:
    """``+hh:mm``: the offset of ``tz`` at the local time ``value`` (``""`` when not a time)."""
    try:
        z = datetime.fromisoformat(value).replace(tzinfo=tz).strftime("%z")
    except (ValueError, OverflowError):
        return ""  # not a time: the model reports it as written
    return f"{z[:3]}:{z[3:5]}" if z else ""


def with_site_offsets(node: Any, tz: tzinfo) -> Any:
    """``node`` with each dateTime that has a time but no offset given ``tz``'s offset.

    FHIR requires an offset on a dateTime with a time, so the R4B model refuses
    ``2019-06-01T10:00:00``; the reader reads such a value in the site's time zone
    (:func:`~multimodal_fl.data.fhir_json.parse_time`). Only the copy the model validates
    gets the offset, as it gets stand-in ids (:func:`_with_stand_in_ids`); ``node`` itself is
    returned, unchanged, when nothing in it needs one.

    Parameters
    ----------
    node
        A resource dict, or any JSON value inside one.
    tz
        The site's time zone.

    Returns
    -------
    Any
        ``node``, or a copy (shallow where unchanged) with the offsets added.
    """
    if isinstance(node, str):
        if len(node) >= 19 and node[10] == "T" and _LOCAL_DATETIME.fullmatch(node):
            return node + _local_offset(node, tz)
        return node
    if isinstance(node, dict):
        out: dict[str, Any] | None = None
        for key, value in node.items():
            new = with_site_offsets(value, tz)
            if new is not value:
                out = dict(node) if out is None else out
                out[key] = new
        return node if out is None else out
    if isinstance(node, list):
        items = [with_site_offsets(v, tz) for v in node]
        return node if all(a is b for a, b in zip(items, node, strict=True)) else items
    return node


def _alias_keys(rt: str, rid: str, full_url: str | None) -> list[str]:
    """The reference strings that name resource ``rt/rid``.

    Its bundle ``fullUrl``, ``Type/id``, the same with the id percent-encoded (an id with a
    space or a slash, as a REST reference writes it) and, for a Patient, ``urn:uuid:id``.
    """
    keys = [k for k in (full_url, f"{rt}/{rid}", f"{rt}/{quote(rid, safe='')}") if k]
    if rt == "Patient":
        keys.append(f"urn:uuid:{rid}")
    return list(dict.fromkeys(keys))


def _ref_key(ref: Any) -> str | None:
    """Reference -> lookup key: 'Type/id', 'urn:uuid:x' or the literal reference."""
    if not isinstance(ref, dict):
        return None
    r = ref.get("reference")
    if not isinstance(r, str) or not r:
        return None
    return r


def _ref_id(ref: str, rt: str) -> str | None:
    """The id of the ``rt`` resource that a reference string names, read from its form.

    ``rt/<id>``, a URL ending in it (``http://host/fhir/rt/<id>``), either with
    ``/_history/<version>``, or ``urn:uuid:<id>`` (Synthea's fullUrls are ``urn:uuid:`` and
    the resource's id); a percent-encoded id is decoded. None for another type or form (a
    bundle ``fullUrl`` of another shape resolves through the reader's aliases instead).
    """
    if ref.startswith("urn:uuid:"):
        return ref[len("urn:uuid:"):] or None
    named = literal_ref(ref)
    if named is None or named[0] != rt:
        return None
    return named[1]


def _class_code(res: dict[str, Any]) -> str | None:
    """An Encounter's ``class`` code (``IMP``, ``AMB``), None when it has none."""
    codes = [code for _, code in _coding_list(res.get("class"))]
    return codes[-1] if codes else None


_SUBJECT_FIELD = {"Device": "patient", "Patient": ""}
_DEFERRED = {"Encounter", "Observation"}
# resource, file, id, subject reference, clinical time (an Encounter's start), known time
# (Observations) or period end (Encounters)
_Deferred = tuple[dict[str, Any], str, str, str, datetime | None, datetime | None]
# clinical time first, then when the record became known (partial dates: end of the period)
_OBS_CLINICAL = ("effectiveDateTime", "effectivePeriod.start", "effectiveInstant", "issued",
                 "effectivePeriod.end")
_OBS_KNOWN = ("issued", "effectiveDateTime", "effectivePeriod.end", "effectivePeriod.start",
              "effectiveInstant")
_COND_CLINICAL = ("onsetDateTime", "onsetPeriod.start", "onsetPeriod.end", "recordedDate")
_COND_KNOWN = ("recordedDate", "onsetDateTime", "onsetPeriod.start", "onsetPeriod.end")
_PROC_CLINICAL = ("performedDateTime", "performedPeriod.start", "performedPeriod.end")
# an Age's unit (UCUM, or as written) -> months per unit, or days per unit (second item)
_AGE_UNITS: dict[str, tuple[int, float]] = {
    "a": (12, 0.0), "yr": (12, 0.0), "year": (12, 0.0), "years": (12, 0.0),
    "mo": (1, 0.0), "month": (1, 0.0), "months": (1, 0.0),
    "wk": (0, 7.0), "week": (0, 7.0), "weeks": (0, 7.0),
    "d": (0, 1.0), "day": (0, 1.0), "days": (0, 1.0),
    "h": (0, 1 / 24), "min": (0, 1 / 1440)}


#: Per resource type, the status fields and the codes of their FHIR R4 value sets that say
#: the record did not happen (``not-done``, ``cancelled``, ``refuted``) or was entered in
#: error; such a record is never used (``not_done_or_in_error``). Every other code, and a
#: missing status, is read as before (``Condition.clinicalStatus`` is not one of them).
VOID_STATUS: dict[str, tuple[tuple[str, frozenset[str]], ...]] = {
    "Condition": (("verificationStatus", frozenset({"refuted", "entered-in-error"})),),
    # not yet happened: a Procedure in preparation, a draft order, a device use intended, an
    # encounter planned (R4 event-status, request-status, device-statement-status,
    # encounter-status); they say nothing about what was done by the index
    "Procedure": (("status", frozenset({"not-done", "preparation", "entered-in-error"})),),
    "Observation": (("status", frozenset({"cancelled", "entered-in-error"})),),
    "MedicationRequest": (("status", frozenset({"cancelled", "draft", "entered-in-error"})),),
    "Medication": (("status", frozenset({"entered-in-error"})),),
    "Device": (("status", frozenset({"entered-in-error"})),),
    "DeviceUseStatement": (("status", frozenset({"intended", "entered-in-error"})),),
    "Encounter": (("status", frozenset({"planned", "cancelled", "entered-in-error"})),),
    "DocumentReference": (("status", frozenset({"entered-in-error"})),
                          ("docStatus", frozenset({"entered-in-error"}))),
    "DiagnosticReport": (("status", frozenset({"cancelled", "entered-in-error"})),),
    "ImagingStudy": (("status", frozenset({"cancelled", "entered-in-error"})),),
}
_VER_STATUS_SYSTEM = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
#: FHIR R4 administrative-gender: any other ``Patient.gender`` is reported (``unknown_gender``)
ADMINISTRATIVE_GENDER = frozenset({"male", "female", "other", "unknown"})


def _image_paths(res: dict[str, Any]) -> list[str]:
    """The site-relative image paths an ImagingStudy names (``urn:mmfl:image-path``)."""
    return [ident["value"] for ident in res.get("identifier") or []
            if isinstance(ident, dict) and ident.get("system") == "urn:mmfl:image-path"
            and isinstance(ident.get("value"), str)]


def void_status(rt: str, res: dict[str, Any]) -> tuple[str, str] | None:
    """The status that says ``res`` did not happen or was entered in error, if it has one.

    Parameters
    ----------
    rt
        The resource type.
    res
        The resource dict.

    Returns
    -------
    tuple of str or None
        ``(field, code)`` of the first such status (see :data:`VOID_STATUS`); None when the
        record stands (any other status, or none).
    """
    for fld, codes in VOID_STATUS.get(rt, ()):
        value = res.get(fld)
        if isinstance(value, str):
            if value in codes:
                return fld, value
        elif isinstance(value, dict):  # a CodeableConcept (Condition.verificationStatus)
            for system, code in _codings(value):
                if code in codes and system in {"", _VER_STATUS_SYSTEM}:
                    return fld, code
    return None


# pending kind -> the SiteRecords field it is appended to, per patient
_PENDING_FIELD = {"medication": "medications", "note": "notes", "image": "images",
                  "study": "studies"}


def _choice(res: dict[str, Any], name: str) -> str:
    """The key of ``res``'s ``<name>[x]`` choice present (``onsetString``), ``""`` when none."""
    return next((k for k in res if k.startswith(name) and k[len(name):][:1].isupper()), "")


@dataclass(frozen=True)
class _ObsCopy:
    """One read of an Observation: its file, version order and content.

    ``version`` is ``meta.versionId``, ``updated`` ``meta.lastUpdated``, ``res`` the
    resource as read (compared field by field only when its id is read again).
    """

    file: str
    version: str | None
    updated: datetime | None
    res: dict[str, Any]


def _obs_copy(res: dict[str, Any], label: str, tz: tzinfo) -> _ObsCopy:
    """The :class:`_ObsCopy` of an Observation read from ``label``."""
    meta = res.get("meta")
    meta = meta if isinstance(meta, dict) else {}
    version = meta.get("versionId")
    try:
        updated, _ = first_time(meta, ("lastUpdated",), tz=tz)
    except BadField:
        updated = None
    return _ObsCopy(label, None if version is None else str(version), updated, res)


def _version_order(old: _ObsCopy, new: _ObsCopy) -> int:
    """1 when ``new`` is a later version than ``old``, -1 when earlier, 0 when unordered.

    A higher ``meta.versionId`` (both whole numbers) is later; else a later
    ``meta.lastUpdated``.
    """
    a, b = old.version, new.version
    if a is not None and b is not None and a != b and a.isdigit() and b.isdigit():
        return 1 if int(b) > int(a) else -1
    if old.updated is not None and new.updated is not None and old.updated != new.updated:
        return 1 if new.updated > old.updated else -1
    return 0


def _add_months(t: datetime, months: int) -> datetime:
    """``t`` that many calendar months later (the 29th-31st held at the month's last day)."""
    year, month = divmod(t.month - 1 + months, 12)
    for day in range(t.day, 28, -1):
        try:
            return t.replace(year=t.year + year, month=month + 1, day=day)
        except ValueError:
            continue
    return t.replace(year=t.year + year, month=month + 1, day=min(t.day, 28))  # may raise


def at_age(birth: datetime, age: Any, tz: tzinfo, *, end: bool = False) -> datetime | None:
    """When a patient born at ``birth`` reached a FHIR ``Age`` (``onsetAge``, ``performedAge``).

    Parameters
    ----------
    birth
        The patient's birth (the first instant of ``birthDate`` in the site's zone), UTC.
    age
        The Age: ``{"value": 59, "code": "a"}``; UCUM ``a``, ``mo``, ``wk``, ``d``, ``h``,
        ``min`` (in ``code``, else ``unit``), or the words ``years``, ``months`` ....
    tz
        The site's time zone: years and months are counted on its calendar.
    end
        The last second of the age's period (a whole 59 years: the day before the 60th
        birthday ends) instead of its first instant, as a partial date's known time.

    Returns
    -------
    datetime or None
        UTC; None when the value is not a number or the unit is not a time unit.
    """
    if not isinstance(age, dict) or not isinstance(age.get("value"), int | float) \
            or isinstance(age.get("value"), bool):
        return None
    unit = _AGE_UNITS.get(str(age.get("code") or age.get("unit") or "").strip().lower())
    if unit is None:
        return None
    value = float(age["value"]) + (1.0 if end and float(age["value"]).is_integer() else 0.0)
    months, days = unit
    local = birth.astimezone(tz)
    try:
        if months:
            whole = int(value * months)
            when = _add_months(local, whole) + timedelta(days=(value * months - whole) * 30.4375)
        else:
            when = local + timedelta(days=value * days)
    except (OverflowError, ValueError):
        return None
    when = when.astimezone(UTC)
    return when - timedelta(seconds=1) if end and float(age["value"]).is_integer() else when


def _by_start(items: list[_Deferred]) -> list[_Deferred]:
    """Deferred encounters with a start, in start order (file order among equal starts)."""
    dated = [(it[4], i, it) for i, it in enumerate(items) if it[4] is not None]
    return [it for _, _, it in sorted(dated, key=lambda x: (x[0], x[1]))]


class FHIRReader:
    """Reads FHIR files of one site into :class:`SiteRecords` for one task.

    Parameters
    ----------
    task
        The task: its codes decide which resources are kept and validated.
    sink
        Error policy and skip collection.
    validation
        ``"task"``: validate only kept resources with R4B models; ``"all"``: every resource.
    tz
        The site's time zone: dates without a time and times without an offset are read in
        it (see :func:`~multimodal_fl.data.fhir_json.parse_time`).
    strict_ids
        Refuse a resource whose id (or a contained resource's id) is outside
        :data:`FHIR_ID` (``invalid_fhir``) instead of keeping it with a ``nonconforming_id``
        note.
    """

    def __init__(self, task: TaskSpec, sink: ErrorSink, *,
                 validation: Literal["task", "all"] = "task", tz: tzinfo = UTC,
                 strict_ids: bool = False) -> None:
        self.task = task
        self.sink = sink
        self.validation = validation
        self.tz = tz
        self.strict_ids = strict_ids
        self.records = SiteRecords()
        lab = task.label
        self._cond_sets = [*task.cohort.conditions, *task.features.conditions, *lab.conditions]
        self._cond_codes = {c for s in self._cond_sets for c in s.codes}
        self._proc_codes = {c for s in lab.procedures for c in s.codes}
        self._dev_codes = {c for s in lab.devices for c in s.codes}
        self._med_codes = {c for s in task.features.medications for c in s.codes}
        self._obs: dict[str, list[tuple[str, str]]] = defaultdict(list)  # code -> (name, unit)
        for feat in task.features.observations:
            for code in feat.codes:
                self._obs[code].append((feat.name, feat.unit))
        self._need_encounters = task.index.kind in {"condition_encounter", "first_encounter"}
        # pending items whose references are resolved in finish()
        self._alias: dict[str, str] = {}  # fullUrl / 'Patient/id' -> patient id
        # reference string (fullUrl, 'Encounter/id') -> id; the ids of every Encounter read
        self._enc_alias: dict[str, str] = {}
        self._enc_ids: set[str] = set()
        self._dev_alias: dict[str, str] = {}
        self._med_alias: dict[str, tuple[Coding, ...]] = {}  # 'Medication/id', fullUrl -> code
        self._pending: list[tuple[str, str, str, str, Any]] = []  # kind, ref, file, rid, item
        self._device_types: dict[tuple[str, str], Coded] = {}  # (patient, Device id) ->
        self._device_uses: list[tuple[str, str, str, str, datetime]] = []
        self._known = known_resource_types()
        self._deferred_enc: list[_Deferred] = []
        self._deferred_obs: list[_Deferred] = []
        self._dated_devices: set[tuple[str, str]] = set()
        self._elements = _ElementCache()
        self._void_refs: dict[str, str] = {}  # references to records not used: their status
        self._obs_copies: dict[tuple[str, str], _ObsCopy] = {}  # (patient, Observation id) ->

    # ------------------------------------------------------------------ reading

    def read_file(self, path: Path, label: str) -> None:
        """Read one ``.json`` / ``.ndjson`` file (``label``: its name in reports)."""
        self.records.counts["files_read"] += 1
        self.records.counts["bytes_read"] += path.stat().st_size if path.exists() else 0
        for res, full_url in iter_file_resources(path, label, self.sink):
            self.add_resource(res, label, full_url)

    def add_resource(self, res: dict[str, Any], label: str, full_url: str | None = None) -> None:
        """Select, validate and record one resource dict."""
        counts = self.records.counts
        counts["resources_read"] += 1
        rt = res["resourceType"]
        rid = str(res.get("id") or "")
        if rt not in self._known:
            self.sink.report(label, rid, "resourceType", "unknown_resource_type",
                             f"unknown resourceType '{rt}' (not a FHIR R4/R4B resource)")
            return
        wanted = self._wanted(rt, res)
        if wanted and self.validation == "task" and rt in _DEFERRED:
            counts["resources_selected"] += 1
            if self._void(rt, res, label, rid, full_url):
                return
            try:
                self._defer(rt, res, label, rid, full_url)
            except BadField as exc:
                self.sink.report(label, rid, exc.field, "bad_date", str(exc))
            return
        if wanted or self.validation == "all":
            if not self._validate(rt, res, label, rid):
                return
        if not wanted:
            counts["resources_not_used"] += 1
            return
        counts["resources_selected"] += 1
        if self._void(rt, res, label, rid, full_url):
            return
        counts["resources_used"] += 1
        counts[f"used_{rt}"] += 1
        try:
            self._record(rt, res, label, rid, full_url)
        except BadField as exc:
            self.sink.report(label, rid, exc.field, "bad_date", str(exc))

    def _void(self, rt: str, res: dict[str, Any], label: str, rid: str,
              full_url: str | None) -> bool:
        """Report ``res`` when its status says it did not happen or was entered in error.

        Such a record is not used (``not_done_or_in_error``, naming its status field); the
        references that name it are remembered, so that a record pointing to it says why it
        does not resolve.
        """
        void = void_status(rt, res)
        if void is None:
            return False
        fld, code = void
        self.sink.report(label, rid, fld, "not_done_or_in_error",
                         f"{rt} {fld} is '{code}': the record says it did not happen or was "
                         "entered in error, so it is not used")
        for key in _alias_keys(rt, rid, full_url):
            self._void_refs[key] = code
        if rt == "ImagingStudy":  # its files must not reach the patient another way
            self.records.voided_images.update(_image_paths(res))
        return True

    def _defer(self, rt: str, res: dict[str, Any], label: str, rid: str,
               full_url: str | None) -> None:
        """Keep an Encounter / Observation unvalidated until the index time is known."""
        ref = self._subject(rt, res, label, rid)
        if ref is None:
            return
        if rt == "Encounter":
            start, _ = first_time(res, ("period.start", "period.end"), tz=self.tz)
            end, _ = first_time(res, ("period.end",), tz=self.tz)
            self._name_encounter(rid, full_url, label)
            self._deferred_enc.append((res, label, rid, ref, start, end))
        else:
            t, known = self._times(res, _OBS_CLINICAL, _OBS_KNOWN)
            self._deferred_obs.append((res, label, rid, ref, t, known))

    def _name_encounter(self, rid: str, full_url: str | None, label: str) -> None:
        """Remember the reference strings of Encounter ``rid`` (see :meth:`_name`)."""
        self._enc_ids.add(rid)
        self._name(self._enc_alias, "Encounter", rid, full_url, label)

    def _name(self, aliases: dict[str, str], rt: str, rid: str, full_url: str | None,
              label: str) -> None:
        """Map the reference strings of ``rt/rid`` (its fullUrl, ``rt/id``) to ``rid``.

        Ids are per patient (two patients may each have an ``Encounter/e1``), but a fullUrl
        names one resource: a fullUrl already naming another id keeps the first and is
        reported (``conflicting_encounter`` / ``conflicting_device``, field ``fullUrl``).
        """
        for key in _alias_keys(rt, rid, full_url):
            first = aliases.setdefault(key, rid)
            if first != rid:
                self.sink.report(label, rid, "fullUrl", f"conflicting_{rt.lower()}",
                                 f"fullUrl '{key}' of {rt} '{rid}' already names {rt} "
                                 f"'{first}'; references to it resolve to '{first}'")

    def _times(self, res: dict[str, Any], clinical: tuple[str, ...], known: tuple[str, ...]
               ) -> tuple[datetime | None, datetime | None]:
        """``(clinical time, known time)`` of a resource; known is never before clinical.

        The clinical time is the first present of ``clinical`` (a partial date's first
        instant); the known time the first present of ``known`` (a partial date's last
        second; whole seconds).
        """
        t, _ = first_time(res, clinical, tz=self.tz)
        k, _ = first_time(res, known, tz=self.tz, end=True)
        if t is not None and (k is None or k < t.replace(microsecond=0)):
            k = t.replace(microsecond=0)
        return t, k

    def _use(self, rt: str, res: dict[str, Any], label: str, rid: str) -> bool:
        """Validate a deferred resource now that it is needed; record it when valid."""
        if not self._validate(rt, res, label, rid):
            return False
        self.records.counts["resources_used"] += 1
        self.records.counts[f"used_{rt}"] += 1
        try:
            self._record(rt, res, label, rid, None)
        except BadField as exc:
            self.sink.report(label, rid, exc.field, "bad_date", str(exc))
            return False
        return True

    def _wanted(self, rt: str, res: dict[str, Any]) -> bool:
        if rt == "Observation":
            if _has_code(res.get("code"), self._obs):
                return True
            comps = res.get("component")
            return bool(comps) and isinstance(comps, list) and any(
                isinstance(comp, dict) and _has_code(comp.get("code"), self._obs)
                for comp in comps)
        if rt == "Condition":
            return _has_code(res.get("code"), self._cond_codes)
        if rt == "Patient":
            return True
        if rt == "Encounter":
            return self._need_encounters
        if rt == "Procedure":
            return _has_code(res.get("code"), self._proc_codes)
        if rt == "Device":
            return _has_code(res.get("type"), self._dev_codes)
        if rt == "DeviceUseStatement":
            return bool(self._dev_codes)
        if rt == "MedicationRequest":
            if isinstance(res.get("medicationReference"), dict):
                return bool(self._med_codes)  # resolved against the Medication in finish()
            return _has_code(res.get("medicationCodeableConcept"), self._med_codes)
        if rt == "Medication":
            return bool(self._med_codes)
        if rt == "DiagnosticReport":
            return bool(res.get("presentedForm") or res.get("conclusion"))
        return rt in {"DocumentReference", "ImagingStudy"}

    def _validate(self, rt: str, res: dict[str, Any], label: str, rid: str) -> bool:
        """Validate ``res`` with its R4B model; report it when invalid.

        A nonconforming id is refused under ``strict_ids``; otherwise the model checks a
        copy with a conforming stand-in id and the resource is kept, with a note. A dateTime
        without an offset is checked with the site's (:func:`with_site_offsets`).
        """
        self.records.counts["resources_validated"] += 1
        bad = nonconforming_ids(res)
        rule = ("outside FHIR's id pattern [A-Za-z0-9-.]{1,64}" if not bad else
                f"'{bad[0]}' is outside FHIR's id pattern [A-Za-z0-9-.]{{1,64}}")
        if bad and self.strict_ids:
            self.sink.report(label, rid, "id", "invalid_fhir",
                             f"not a valid FHIR R4B {rt}: id {rule} (data.strict_ids: false "
                             "keeps such ids)")
            return False
        try:
            self._elements.validate(
                rt, with_site_offsets(_with_stand_in_ids(res) if bad else res, self.tz))
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err.get("loc", ())) or "<resource>"
            more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
            self.sink.report(label, rid, loc, "invalid_fhir",
                             f"not a valid FHIR R4B {rt}: {err.get('msg')}{more}")
            return False
        except Exception as exc:
            self.sink.report(label, rid, "<resource>", "invalid_fhir",
                             f"not a valid FHIR R4B {rt}: {exc}")
            return False
        if bad:
            self.sink.note(label, rid, "id", "nonconforming_id",
                           f"{rt} id {rule}; kept as written (references to it resolve), "
                           "data.strict_ids: true would refuse it")
        return True

    def _subject(self, rt: str, res: dict[str, Any], label: str, rid: str) -> str | None:
        fld = _SUBJECT_FIELD.get(rt, "subject")
        ref = _ref_key(res.get(fld))
        if ref is None and rt != "Device":
            ref = _ref_key(res.get("patient"))
        if ref is None:
            self.sink.report(label, rid, fld, "no_subject",
                             f"{rt} has no {fld} reference; expected "
                             "{'reference': 'Patient/<id>'} or 'urn:uuid:<id>'")
        return ref

    def _record(self, rt: str, res: dict[str, Any], label: str, rid: str,
                full_url: str | None) -> None:
        if rt == "Patient":
            self._record_patient(res, label, rid, full_url)
            return
        if rt == "DeviceUseStatement":
            self._record_device_use(res, label, rid)
            return
        if rt == "Medication":
            codings = tuple(_codings(res.get("code")))
            for key in _alias_keys(rt, rid, full_url):
                self._med_alias[key] = codings
            return
        ref = self._subject(rt, res, label, rid)
        if ref is None:
            return
        if rt == "Encounter":
            start, _ = first_time(res, ("period.start", "period.end"), tz=self.tz)
            end, _ = first_time(res, ("period.end",), tz=self.tz)
            enc = Coded(rid, label, tuple(_codings((res.get("type") or [{}])[0])), start, end)
            self._name_encounter(rid, full_url, label)
            self._pending.append(("encounter", ref, label, rid, (enc, _class_code(res))))
        elif rt == "Condition":
            self._record_condition(res, ref, label, rid)
        elif rt == "Procedure":
            t, _ = first_time(res, _PROC_CLINICAL, tz=self.tz)
            self._pending.append(("procedure", ref, label, rid,
                                  (Coded(rid, label, tuple(_codings(res.get("code"))), t),
                                   res.get("performedAge"), _choice(res, "performed"))))
        elif rt == "Device":
            dev = Coded(rid, label, tuple(_codings(res.get("type"))), None)
            self._name(self._dev_alias, "Device", rid, full_url, label)
            self._pending.append(("device_owner", ref, label, rid, dev))
        elif rt == "MedicationRequest":
            t, known = self._times(res, ("authoredOn",), ("authoredOn",))
            med_ref = _ref_key(res.get("medicationReference"))
            if med_ref is None:
                self._pending.append(("medication", ref, label, rid, Coded(
                    rid, label, tuple(_codings(res.get("medicationCodeableConcept"))), t,
                    known=known)))
            elif med_ref.startswith("#"):  # a contained Medication
                drug = self._contained_medication(res, med_ref, label, rid)
                if drug is not None:
                    self._pending.append(("medication", ref, label, rid,
                                          Coded(rid, label, drug, t, known=known)))
            else:  # resolved in finish(), once every Medication has been read
                self._pending.append(("medication_ref", ref, label, rid,
                                      (Coded(rid, label, (), t, known=known), med_ref)))
        elif rt == "Observation":
            self._record_observation(res, ref, label, rid)
        elif rt in {"DocumentReference", "DiagnosticReport"}:
            for note in notes_from_resource(res, label, self.sink, tz=self.tz):
                self._pending.append(("note", ref, label, rid, note))
        elif rt == "ImagingStudy":
            self._record_study(res, ref, label, rid)

    def _record_condition(self, res: dict[str, Any], ref: str, label: str, rid: str) -> None:
        """A Condition: its onset and abatement, dated in :meth:`_resolve_condition`.

        ``onsetAge`` / ``abatementAge`` need the patient's birth date, known only once every
        file has been read.
        """
        if "onsetAge" in res:  # onset[x] is one choice; recordedDate when it cannot be dated
            onset, known = self._times(res, ("recordedDate",), ("recordedDate",))
        else:
            onset, known = self._times(res, _COND_CLINICAL, _COND_KNOWN)
        abate, _ = first_time(res, ("abatementDateTime", "abatementPeriod.end"), tz=self.tz)
        enc_ref = _ref_key(res.get("encounter"))
        fact = Coded(rid, label, tuple(_codings(res.get("code"))), onset, abate, enc_ref, known)
        self._pending.append(("condition", ref, label, rid,
                              (fact, res.get("onsetAge"), res.get("abatementAge"),
                               res.get("recordedDate"), _choice(res, "onset"))))

    def _resolve_condition(self, pid: str, label: str, rid: str, item: Any) -> None:
        """Date a Condition of ``pid`` (its ages from the birth date) and record it.

        One that still has no clinical time is reported (``undated_event``): it is no
        label, feature or cohort condition by its onset (an encounter still gives an index).
        """
        fact, onset_age, abate_age, recorded, onset_field = item
        birth = self.records.patients[pid].birth
        if onset_age is not None and birth is not None:
            onset = at_age(birth, onset_age, self.tz)
            if onset is not None:
                known = fact.known if recorded is not None else at_age(
                    birth, onset_age, self.tz, end=True)
                fact = replace(fact, time=onset, known=max(known or onset, onset))
        if abate_age is not None and birth is not None and fact.end is None:
            fact = replace(fact, end=at_age(birth, abate_age, self.tz))
        for name, age, dated in (("onsetAge", onset_age, fact.time is not None),
                                 ("abatementAge", abate_age, fact.end is not None)):
            if age is not None and not dated:
                why = "the patient has no birthDate" if birth is None else \
                    "its value is not a number of a time unit (a, mo, wk, d, h, min)"
                self.sink.report(label, rid, name, "undated_event",
                                 f"Condition {name} {age!r} cannot be dated: {why}")
        if fact.time is None and onset_age is None:
            which = f" ({onset_field} cannot be dated)" if onset_field else ""
            self.sink.report(label, rid, onset_field or "onsetDateTime", "undated_event",
                             "Condition has no onsetDateTime, onsetPeriod, onsetAge or "
                             f"recordedDate{which}; it cannot be placed in time, so it is "
                             "no label, feature or cohort condition by its onset")
        self.records.conditions[pid].append(
            replace(fact, encounter=self.encounter_id(fact.encounter)))

    def _resolve_procedure(self, pid: str, label: str, rid: str, item: Any) -> None:
        """Record a label Procedure of ``pid``; one that cannot be dated is reported."""
        proc, age, performed = item
        birth = self.records.patients[pid].birth
        if proc.time is None and age is not None and birth is not None:
            proc = replace(proc, time=at_age(birth, age, self.tz))
        if proc.time is None:
            why = "" if age is None else " (the patient has no birthDate)" if birth is None \
                else " (its value is not a number of a time unit: a, mo, wk, d, h, min)"
            what = f"'s {performed} cannot be dated{why}" if performed else \
                " has no performed[x]"
            self.sink.report(label, rid, performed or "performed[x]", "undated_event",
                             f"Procedure{what}; expected performedDateTime, performedPeriod "
                             "or performedAge: a label event that cannot be placed in time is "
                             "not used")
            return
        self.records.procedures[pid].append(proc)

    def _contained_medication(self, res: dict[str, Any], med_ref: str, label: str,
                              rid: str) -> tuple[Coding, ...] | None:
        """Codes of the Medication a MedicationRequest contains as ``med_ref`` (``#<id>``).

        None, reported, when the request contains no Medication with that id
        (``unresolved_reference``) or when its status voids it as a top-level Medication's
        would (:data:`VOID_STATUS`; ``not_done_or_in_error``, field ``contained[i].status``
        of the request): the request then names no drug and is not used.
        """
        contained = res.get("contained")
        for i, med in enumerate(contained if isinstance(contained, list) else ()):
            if not (isinstance(med, dict) and med.get("resourceType") == "Medication"
                    and med.get("id") == med_ref[1:]):
                continue
            void = void_status("Medication", med)
            if void is not None:
                fld, code = void
                self.sink.report(label, rid, f"contained[{i}].{fld}", "not_done_or_in_error",
                                 f"contained Medication '{med_ref}' {fld} is '{code}': the "
                                 "record says it did not happen or was entered in error, so "
                                 "the MedicationRequest names no drug and is not used")
                return None
            return tuple(_codings(med.get("code")))
        self.sink.report(label, rid, "medicationReference", "unresolved_reference",
                         f"references contained medication '{med_ref}', but the "
                         "MedicationRequest contains no Medication with that id")
        return None

    def _record_study(self, res: dict[str, Any], ref: str, label: str, rid: str) -> None:
        """An ImagingStudy: its modality and times (a scan index), and its linked image path."""
        start, known = self._times(res, ("started",), ("started",))
        modality = tuple(_coding_list(res.get("modality")))
        for series in res.get("series") or []:
            if isinstance(series, dict):
                modality += tuple(_coding_list(series.get("modality")))
        self._pending.append(("study", ref, label, rid,
                              Coded(rid, label, modality, start, known=known)))
        for path in _image_paths(res):
            self._pending.append(("image", ref, label, rid, ImageRef(path, known, label, rid)))

    def _record_patient(self, res: dict[str, Any], label: str, rid: str,
                        full_url: str | None) -> None:
        if not rid:
            self.sink.report(label, "", "id", "no_id", "Patient has no id; patients are "
                             "joined by Patient.id")
            return
        birth, _ = first_time(res, ("birthDate",), tz=self.tz)
        deceased, _ = first_time(res, ("deceasedDateTime",), tz=self.tz)
        deceased_end, _ = first_time(res, ("deceasedDateTime",), tz=self.tz, end=True)
        gender = res.get("gender")
        if gender is not None and gender not in ADMINISTRATIVE_GENDER:
            self.sink.report(label, rid, "gender", "unknown_gender",
                             f"gender {gender!r} is not a FHIR administrative-gender code "
                             f"({', '.join(sorted(ADMINISTRATIVE_GENDER))}); the patient is "
                             "kept with sex unknown (codes such as HL7 v2 'F' / 'M' are not "
                             "mapped: export the FHIR codes)")
            gender = None
        rec = PatientRecord(rid, label, birth, gender, deceased, deceased_end)
        if deceased is None and res.get("deceasedBoolean") is True:
            rec.deceased = None  # known dead, unknown date: no event time
        old = self.records.patients.get(rid)
        if old is not None:
            diff = [f for f in ("birth", "gender", "deceased")
                    if getattr(old, f) != getattr(rec, f)]
            if diff:
                names = {"birth": "birthDate", "gender": "gender", "deceased": "deceasedDateTime"}
                fld = ",".join(names[f] for f in diff)
                self.sink.report(
                    label, rid, fld, "conflicting_patient",
                    f"Patient '{rid}' conflicts with the same id in {old.file} on {fld} "
                    f"({', '.join(f'{getattr(old, f)} vs {getattr(rec, f)}' for f in diff)}); "
                    f"kept the first ({old.file})")
            return
        self.records.patients[rid] = rec
        for key in _alias_keys("Patient", rid, full_url):
            self._alias[key] = rid

    def _record_device_use(self, res: dict[str, Any], label: str, rid: str) -> None:
        ref = self._subject("DeviceUseStatement", res, label, rid)
        dev = _ref_key(res.get("device"))
        if ref is None:
            return
        if dev is None:
            self.sink.report(label, rid, "device", "no_device",
                             "DeviceUseStatement has no device reference")
            return
        t, _ = first_time(res, ("timingDateTime", "timingPeriod.start", "recordedOn"),
                          tz=self.tz)
        if t is None:
            self.sink.report(label, rid, "timingDateTime", "undated_event",
                             "DeviceUseStatement has no timingDateTime, timingPeriod.start or "
                             "recordedOn; its device use cannot be placed in time")
            return
        self._device_uses.append((ref, dev, label, rid, t))

    def _record_observation(self, res: dict[str, Any], ref: str, label: str, rid: str) -> None:
        """Read an Observation's feature values; its patient gets them in :meth:`finish`.

        The values go as one pending item with the resource's :class:`_ObsCopy`, so that a
        copy of the same Observation read again replaces them or is dropped
        (:meth:`_keep_observation`).
        """
        values: list[ObservationValue] = []
        self._observation_values(res, ref, label, rid, values)
        self._pending.append(("observation", ref, label, rid,
                              (values, _obs_copy(res, label, self.tz))))

    def _observation_values(self, res: dict[str, Any], ref: str, label: str, rid: str,
                            values: list[ObservationValue]) -> None:
        """Append the feature values of Observation ``res`` to ``values``; report the rest."""
        t, known = self._times(res, _OBS_CLINICAL, _OBS_KNOWN)
        if t is None or known is None:
            self.sink.report(label, rid, "effectiveDateTime", "undated_event",
                             "Observation has no effectiveDateTime, effectivePeriod.start or "
                             "end, effectiveInstant or issued time")
            return
        parts: list[tuple[dict[str, Any], str]] = [(res, "valueQuantity")]
        for i, comp in enumerate(res.get("component") or []):
            if isinstance(comp, dict):
                parts.append((comp, f"component[{i}].valueQuantity"))
        for node, fld in parts:
            codes = [c for _, c in _codings(node.get("code")) if c in self._obs]
            if not codes:
                continue
            if isinstance(node.get("valueBoolean"), bool):
                self._boolean_values(node["valueBoolean"], codes[0], values, label, rid,
                                     fld.replace("valueQuantity", "valueBoolean"), t, known)
                continue
            vq = node.get("valueQuantity")
            if not isinstance(vq, dict) or not isinstance(vq.get("value"), int | float):
                self._non_quantity(node, codes[0], label, rid, fld)
                continue
            if vq.get("comparator"):  # '<5': a bound (a detection limit), not a measurement
                self.sink.report(label, rid, f"{fld}.comparator", "value_with_comparator",
                                 f"value for feature '{self._obs[codes[0]][0][0]}' is "
                                 f"'{vq['comparator']}' {vq['value']}: a bound, not a "
                                 "measured value, so it is not used")
                continue
            for name, target in self._obs[codes[0]]:
                value = self._feature_value(vq, name, target, label, rid, f"{fld}.code")
                if value is not None:
                    values.append(ObservationValue(name, value, t, rid, known))

    def _non_quantity(self, node: dict[str, Any], code: str, label: str, rid: str,
                      fld: str) -> None:
        """Report a feature's value that is not a number in a ``valueQuantity``.

        A ``valueString`` ("83.36"), a ``valueQuantity.value`` written as a string or a
        ``valueCodeableConcept`` is reported (``non_quantity_value``, naming the field):
        numbers are not guessed from text. A node without any ``value[x]`` (a panel, a
        ``dataAbsentReason``) is only counted (``observations_without_quantity``).
        """
        self.records.counts["observations_without_quantity"] += 1
        prefix = fld[:-len("valueQuantity")]
        vq = node.get("valueQuantity")
        if isinstance(vq, dict):
            where, value = f"{fld}.value", vq.get("value")
        else:
            key = next((k for k in node if k.startswith("value")), None)
            if key is None:
                return
            where, value = prefix + key, node[key]
        self.sink.report(label, rid, where, "non_quantity_value",
                         f"value for feature '{self._obs[code][0][0]}' is {where} "
                         f"{orjson.dumps(value).decode()[:80]}, not a number in a "
                         "valueQuantity; it is not used (numbers are not read from text: "
                         "export a number in valueQuantity.value, with its unit)")

    def _boolean_values(self, value: bool, code: str, values: list[ObservationValue],
                        label: str, rid: str, fld: str, t: datetime, known: datetime) -> None:
        """A ``valueBoolean``: 1.0 / 0.0 for each feature of ``code`` whose unit is ``1``.

        A yes/no is dimensionless; for a feature in any other unit it is reported
        (``boolean_value``) and not used.
        """
        for name, target in self._obs[code]:
            if target.strip() == "1":
                values.append(ObservationValue(name, float(value), t, rid, known))
            else:
                self.sink.report(label, rid, fld, "boolean_value",
                                 f"value for feature '{name}' is a valueBoolean ({value}); a "
                                 f"yes/no is read (as 1 / 0) only for a feature whose unit is "
                                 f"'1', not '{target}'")

    def _feature_value(self, vq: dict[str, Any], name: str, target: str, label: str,
                       rid: str, fld: str) -> float | None:
        """A valueQuantity in the feature's unit ``target``, or None (reported).

        None when its unit is missing, unknown or not convertible. A value without a unit
        is taken only for a feature in ``1`` or a UCUM annotation (``{score}``), and noted
        (``unitless_value``).
        """
        unit = vq.get("code") or vq.get("unit")
        if not unit and accepts_unitless(target):
            self.sink.note(label, rid, fld, "unitless_value",
                           f"value for feature '{name}' has no unit; taken as '{target}' "
                           "(dimensionless)")
            return float(vq["value"])
        if not unit:
            self.sink.report(label, rid, fld, "unknown_unit",
                             f"value for feature '{name}' has no unit (expected UCUM "
                             f"'{target}' or a convertible unit; a value without a unit is "
                             "taken only for a feature in '1' or a {...} annotation)")
            return None
        try:
            return convert(float(vq["value"]), str(unit), target)
        except UnitError as exc:
            self.sink.report(label, rid, fld, "unknown_unit", f"feature '{name}': {exc}")
            return None

    # ------------------------------------------------------------------ finishing

    def resolve_patient(self, ref: str) -> str | None:
        """Patient id for a reference string, or None when no such Patient was read."""
        if ref in self._alias:
            return self._alias[ref]
        pid = _ref_id(ref, "Patient")  # a URL, a version-specific reference
        return pid if pid is not None and pid in self.records.patients else None

    def finish(self) -> SiteRecords:
        """Resolve references (patients, encounters, devices) and return the records.

        Deferred Encounters and Observations (``validation="task"``) are validated and
        recorded only when the task can use them: the encounters that can be a patient's
        index encounter, and the observations inside some feature window
        ``[index - lookback, index + allowance]``.
        """
        self._resolve_pending()
        self._finish_deferred()
        self._resolve_pending()
        self._obs_copies.clear()  # the Observations read, kept only to merge their copies
        return self.records

    def _finish_deferred(self) -> None:
        self._finish_encounters()
        self._resolve_pending()
        self._finish_observations()

    def _finish_encounters(self) -> None:
        """Validate and record each patient's index encounter (none for other index kinds).

        Mirrors :func:`~multimodal_fl.data.tasks.index_time`: for ``condition_encounter``
        the earliest cohort Condition's encounter, else the valid encounter in progress at
        its onset, else the first valid encounter starting on or after it; for
        ``first_encounter`` the first valid encounter of the configured class.
        """
        by_pid: dict[str, list[_Deferred]] = defaultdict(list)
        for item in self._deferred_enc:
            pid = self.resolve_patient(item[3])
            if pid is None:
                self.sink.report(item[1], item[2], "subject", "missing_patient",
                                 f"references patient '{item[3]}', but no Patient with that "
                                 "id was read at this site")
                continue
            by_pid[pid].append(item)
        classes = set(self.task.index.encounter_class)
        for pid, all_items in by_pid.items():
            items = self._distinct_encounters(pid, all_items)
            if self.task.index.kind == "first_encounter":
                candidates = _by_start([it for it in items if any(
                    code in classes for _, code in _coding_list(it[0].get("class")))])
            else:
                candidates = self._condition_encounters(pid, items)
            for res, label, rid, _, _, _ in candidates:
                if self._use("Encounter", res, label, rid):
                    break
        self._deferred_enc.clear()

    def _distinct_encounters(self, pid: str, items: list[_Deferred]) -> list[_Deferred]:
        """A patient's deferred Encounters, each id once: the first read.

        A later one with the same id and another start or class is reported
        (``conflicting_encounter``); an identical one is the same encounter read twice.
        """
        first: dict[str, _Deferred] = {}
        for it in items:
            old = first.setdefault(it[2], it)
            if old is not it:
                self._check_same_encounter(pid, it[2], old[1], (old[4], _class_code(old[0])),
                                           it[1], (it[4], _class_code(it[0])))
        return list(first.values())

    def _check_same_encounter(self, pid: str, rid: str, first_file: str,
                              first: tuple[datetime | None, str | None], file: str,
                              again: tuple[datetime | None, str | None]) -> None:
        """Report Encounter ``rid`` of ``pid`` read again with another (start, class)."""
        diff = [(name, a, b) for name, a, b in zip(("period.start", "class"), first, again,
                                                   strict=True) if a != b]
        if diff:
            fld = ",".join(name for name, _, _ in diff)
            self.sink.report(
                file, rid, fld, "conflicting_encounter",
                f"Encounter '{rid}' of patient '{pid}' conflicts with the same id in "
                f"{first_file} on {fld} ({'; '.join(f'{a} vs {b}' for _, a, b in diff)}); "
                f"kept the first ({first_file})")

    def _condition_encounters(self, pid: str, items: list[_Deferred]) -> list[_Deferred]:
        """The encounters that can be ``pid``'s ``condition_encounter`` index, best first.

        The earliest cohort Condition's own encounter when it has a start, else the
        encounters in progress at its onset (start at or before it, end at or after it;
        latest start first), else those starting on or after the onset.
        """
        conds = [c for c in self.records.conditions.get(pid, [])
                 if any(matches(c.codings, cs) for cs in self.task.cohort.conditions)
                 and (c.time is not None or c.encounter is not None)]
        if not conds:
            return []
        first = min(conds, key=lambda c: (c.time is None, c.time or datetime.max))
        own = [it for it in items if it[2] == first.encounter and it[4] is not None][:1]
        onset = first.time
        if onset is None:
            return own
        rest = [it for it in items if all(it is not o for o in own)]
        during = _by_start([it for it in rest if it[4] is not None and it[4] <= onset
                            and it[5] is not None and onset <= it[5]])[::-1]
        later = _by_start([it for it in rest if it[4] is not None and it[4] >= onset
                           and all(it is not d for d in during)])
        return own + during + later

    def _finish_observations(self) -> None:
        """Validate and record the deferred Observations inside some feature window."""
        rec = self.records
        task = self.task
        max_lookback = max([task.features.lookback_days,
                            *[o.lookback_days or 0.0 for o in task.features.observations]])
        allowance = timedelta(hours=task.index.allowance_hours)
        windows: dict[str, tuple[datetime, datetime] | None] = {}
        for pid, (res, label, rid, _, t, known) in self._distinct_observations():
            if pid not in windows:
                index, _ = index_time(task, pid, rec)
                windows[pid] = None if index is None else (
                    shifted(index, -timedelta(days=max_lookback)), shifted(index, allowance))
            win = windows[pid]
            if t is not None and known is not None and (
                    win is None or not (win[0] <= t and known <= win[1])):
                rec.counts["observations_outside_window"] += 1
                continue
            self._use("Observation", res, label, rid)
        self._deferred_obs.clear()

    def _distinct_observations(self) -> list[tuple[str, _Deferred]]:
        """The deferred Observations with their patient, one per (patient, id).

        The version kept is the one :meth:`_keep_observation` keeps, chosen before the
        feature windows so that a later version outside them removes an earlier one inside.
        """
        kept: dict[tuple[str, str], tuple[str, _Deferred]] = {}
        for i, item in enumerate(self._deferred_obs):
            res, label, rid, ref = item[:4]
            pid = self.resolve_patient(ref)
            if pid is None:
                self.sink.report(label, rid, "subject", "missing_patient",
                                 f"references patient '{ref}', but no Patient with that id "
                                 "was read at this site")
                continue
            if self._keep_observation(pid, rid, _obs_copy(res, label, self.tz)):
                kept[(pid, rid or f"#{i}")] = (pid, item)
        self._obs_copies.clear()  # the kept ones are recorded afresh
        return list(kept.values())

    def _resolve_pending(self) -> None:
        """Give each pending record to its patient, once every resource has been read."""
        pending = sorted(self._pending, key=lambda p: p[0] != "encounter")  # encounters first
        for kind, ref, label, rid, item in pending:
            pid = self.resolve_patient(ref)
            if pid is None:
                field_name = "patient" if kind == "device_owner" else "subject"
                self.sink.report(label, rid, field_name, "missing_patient",
                                 f"references patient '{ref}', but no Patient with that id "
                                 "was read at this site")
                continue
            self._resolve_item(kind, pid, label, rid, item)
        self._resolve_device_uses()
        self._pending.clear()

    def _resolve_item(self, kind: str, pid: str, label: str, rid: str, item: Any) -> None:
        """Record one pending ``item`` of ``kind`` for patient ``pid``."""
        rec = self.records
        if kind == "encounter":
            enc, klass = item
            key = (pid, rid)
            old = rec.encounter_by_key.get(key)
            if old is not None:  # the patient's encounter read again
                self._check_same_encounter(pid, rid, old.file,
                                           (old.time, rec.encounter_class.get(key)), label,
                                           (enc.time, klass))
                return
            rec.encounters[pid].append(enc)
            rec.encounter_by_key[key] = enc
            if klass is not None:
                rec.encounter_class[key] = klass
        elif kind == "condition":
            self._resolve_condition(pid, label, rid, item)
        elif kind == "procedure":
            self._resolve_procedure(pid, label, rid, item)
        elif kind == "medication_ref":
            request, med_ref = item
            codings = self.medication_codings(med_ref)
            if codings is None:
                void = self._void_refs.get(med_ref) or self._void_refs.get(
                    f"Medication/{_ref_id(med_ref, 'Medication')}")
                why = (f"but that Medication is '{void}' (not used)" if void else
                       "but no Medication with that id was read at this site")
                self.sink.report(label, rid, "medicationReference", "unresolved_reference",
                                 f"references medication '{med_ref}', {why}")
                return
            rec.medications[pid].append(replace(request, codings=codings))
        elif kind == "device_owner":
            self._record_device(pid, label, rid, item)
        elif kind == "observation":
            values, copy = item
            earlier = rid != "" and (pid, rid) in self._obs_copies
            if self._keep_observation(pid, rid, copy):
                if earlier:  # a later version: its values replace the earlier one's
                    rec.observations[pid] = [o for o in rec.observations[pid]
                                             if o.resource_id != rid]
                rec.observations[pid].extend(values)
        else:
            getattr(rec, _PENDING_FIELD[kind])[pid].append(item)

    def _keep_observation(self, pid: str, rid: str, copy: _ObsCopy) -> bool:
        """Whether this read of ``pid``'s Observation ``rid`` replaces the one kept so far.

        One record per (patient, Observation id): the first read is kept, and a later
        version (higher ``meta.versionId``, else later ``meta.lastUpdated``) replaces it. An
        identical copy (an overlapping search page) is the same record read twice; another
        content without a version order is reported (``conflicting_observation``, naming
        the fields) and the first is kept. An Observation without an id is always kept.
        """
        if not rid:
            return True
        key = (pid, rid)
        old = self._obs_copies.get(key)
        if old is None:
            self._obs_copies[key] = copy
            return True
        order = _version_order(old, copy)
        if order:
            if order > 0:
                self._obs_copies[key] = copy
            return order > 0
        diff = sorted(k for k in old.res.keys() | copy.res.keys()
                      if k != "meta" and old.res.get(k) != copy.res.get(k))
        if diff:
            fld = ",".join(diff)
            self.sink.report(copy.file, rid, fld, "conflicting_observation",
                             f"Observation '{rid}' of patient '{pid}' conflicts with the same "
                             f"id in {old.file} on {fld}, and neither is a later version "
                             "(meta.versionId, meta.lastUpdated); kept the first "
                             f"({old.file})")
        return False

    def _record_device(self, pid: str, label: str, rid: str, dev: Coded) -> None:
        """Keep ``pid``'s Device ``rid``; the same id read again with another type is reported."""
        first = self._device_types.setdefault((pid, rid), dev)
        if first is not dev and set(first.codings) != set(dev.codings):
            self.sink.report(label, rid, "type", "conflicting_device",
                             f"Device '{rid}' of patient '{pid}' conflicts with the same id in "
                             f"{first.file} on type ({list(first.codings)} vs "
                             f"{list(dev.codings)}); kept the first ({first.file})")

    def _resolve_device_uses(self) -> None:
        """Date each patient's label Devices by the DeviceUseStatements that name them."""
        rec = self.records
        for ref, dev_ref, label, rid, t in self._device_uses:
            pid = self.resolve_patient(ref)
            if pid is None:
                self.sink.report(label, rid, "subject", "missing_patient",
                                 f"references patient '{ref}', but no Patient with that id "
                                 "was read at this site")
                continue
            dev_id = self._dev_alias.get(dev_ref) or _ref_id(dev_ref, "Device")
            dev = None if dev_id is None else self._device_types.get((pid, dev_id))
            if dev_id is None or dev is None:
                continue  # a device the task does not ask for (or not this patient's)
            self._dated_devices.add((pid, dev_id))
            rec.devices[pid].append(Coded(rid, label, dev.codings, t))
        undated = set(self._device_types) - self._dated_devices
        if undated:
            rec.counts["devices_without_use_statement"] = len(undated)
        self._device_uses.clear()

    def medication_codings(self, ref: str | None) -> tuple[Coding, ...] | None:
        """Codes of the Medication a ``medicationReference`` points at (None: not read)."""
        if not ref:
            return None
        if ref in self._med_alias:
            return self._med_alias[ref]
        mid = _ref_id(ref, "Medication")  # a URL, a version-specific reference, urn:uuid
        return None if mid is None else self._med_alias.get(f"Medication/{mid}")

    def encounter_id(self, ref: str | None) -> str | None:
        """Encounter id for a reference, None when no Encounter with that id was read.

        The reference is a fullUrl, ``Encounter/<id>``, a URL ending in it, any of them
        version-specific, or ``urn:uuid:<id>``. Ids are per patient: the caller looks the id
        up among its patient's encounters (``SiteRecords.encounter_by_key``).
        """
        if not ref:
            return None
        if ref in self._enc_alias:
            return self._enc_alias[ref]
        eid = _ref_id(ref, "Encounter")
        return eid if eid in self._enc_ids else None
