"""What a task needs from one site's FHIR data, grouped by patient: the record types.

:class:`~multimodal_fl.data.fhir.FHIRReader` fills a :class:`SiteRecords`;
:mod:`~multimodal_fl.data.text`, :mod:`~multimodal_fl.data.imaging` and
:mod:`~multimodal_fl.data.tasks` read it. This module knows no file and no reader, so all
of them can import it. Every time is a timezone-aware UTC datetime.

Two times per record where they differ: ``time`` is the clinical time (when it happened:
``effective[x]``, onset, ``authoredOn``; for a partial date, the start of its period), the
one the index and the label rules use; ``known`` is when the record became known
(``issued``, ``recordedDate``; for a partial date, the last second of its period; whole
seconds), the one the feature cut-off uses. Notes and images carry only their known time.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from multimodal_fl.config import CodeSet

__all__ = ["Coded", "Coding", "ImageRef", "Note", "ObservationValue", "PatientRecord",
           "SiteRecords", "known_time", "matches"]

Coding = tuple[str, str]  # (system, code)


def matches(codings: Iterable[Coding], codeset: CodeSet) -> bool:
    """True when any coding belongs to ``codeset`` (system-restricted when it names one)."""
    codes = set(codeset.codes)
    return any(code in codes and (codeset.system is None or system == codeset.system)
               for system, code in codings)


@dataclass
class PatientRecord:
    """One patient's demographics."""

    id: str
    file: str
    birth: datetime | None = None
    gender: str | None = None
    deceased: datetime | None = None
    #: The end of the death's period: ``deceased`` itself for a date and time, the end of
    #: the day (month, year) for a partial date. A death dated ``2021-03-05`` happened some
    #: time that day, so it is not before an index at 10:00 that day.
    deceased_end: datetime | None = None


@dataclass(frozen=True)
class Coded:
    """A coded, timed fact (condition, procedure, device use, medication request).

    ``time`` is the clinical time (onset, performed, authored), ``end`` the abatement or
    period end, ``known`` when the fact became known (``recordedDate``; never before
    ``time``); :func:`known_time` reads it, falling back to ``time``.
    """

    resource_id: str
    file: str
    codings: tuple[Coding, ...]
    time: datetime | None
    end: datetime | None = None
    encounter: str | None = None
    known: datetime | None = None


def known_time(fact: Coded) -> datetime | None:
    """When ``fact`` became known: its ``known`` time, else its clinical ``time``."""
    return fact.known if fact.known is not None else fact.time


@dataclass(frozen=True)
class ObservationValue:
    """One observation value of one feature, in the feature's canonical unit.

    ``time`` is the clinical time (``effective[x]``), ``known`` when the value was released
    (``issued``; never before ``time``).
    """

    feature: str
    value: float
    time: datetime
    resource_id: str
    known: datetime


@dataclass(frozen=True)
class Note:
    """One clinical note with the time it was known (None when undated) and its source.

    A url note (``url`` set) has no text until its file is read, in ``charset`` (the one its
    attachment's ``contentType`` declares, else UTF-8).
    """

    text: str
    time: datetime | None
    source: str
    resource_id: str
    url: str | None = None
    kind: str = ""
    charset: str = "utf-8"


@dataclass(frozen=True)
class ImageRef:
    """An image file referenced by the FHIR data (ImagingStudy), with the time it was known."""

    path: str
    time: datetime | None
    source: str
    resource_id: str


@dataclass
class SiteRecords:
    """What the task needs from one site's FHIR data, grouped by patient id.

    ``studies`` are the ImagingStudies (codings: their DICOM modality codes, ``time`` the
    clinical and ``known`` the known time of ``started``), whether or not they link an
    image. Encounter ids are per patient (two patients' files may each hold an
    ``Encounter/e1``): ``encounter_by_key`` maps ``(patient id, Encounter id)`` to the
    encounter and ``encounter_class`` to its ``class`` code (``IMP``, ``AMB``).
    """

    patients: dict[str, PatientRecord] = field(default_factory=dict)
    encounters: dict[str, list[Coded]] = field(default_factory=lambda: defaultdict(list))
    encounter_by_key: dict[tuple[str, str], Coded] = field(default_factory=dict)
    conditions: dict[str, list[Coded]] = field(default_factory=lambda: defaultdict(list))
    procedures: dict[str, list[Coded]] = field(default_factory=lambda: defaultdict(list))
    devices: dict[str, list[Coded]] = field(default_factory=lambda: defaultdict(list))
    medications: dict[str, list[Coded]] = field(default_factory=lambda: defaultdict(list))
    observations: dict[str, list[ObservationValue]] = field(
        default_factory=lambda: defaultdict(list))
    notes: dict[str, list[Note]] = field(default_factory=lambda: defaultdict(list))
    images: dict[str, list[ImageRef]] = field(default_factory=lambda: defaultdict(list))
    studies: dict[str, list[Coded]] = field(default_factory=lambda: defaultdict(list))
    #: site-relative image paths named by an ImagingStudy that did not happen or was entered in
    #: error: not linked to anyone by their DICOM PatientID either
    voided_images: set[str] = field(default_factory=set)
    encounter_class: dict[tuple[str, str], str] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
