"""``mmfl data import-csv``: a flat cohort table (one row per patient, or per admission) into
site directories of the site data contract.

Each row becomes, at the site its split column names: a Patient (sex, birth date), an
Encounter (the admission, starting at the row's index, with its class), a Condition per
present yes/no column (SNOMED CT), an Observation per column with a value (LOINC or a local
code system; numbers with their unit as given, or yes/no), a ``labels.csv`` row (the
label and any other outcome columns) and ``images.csv`` rows (the images copied into the
site's ``images/``). The mapping (:mod:`multimodal_fl.data.csv_mapping`) says how.

Times. Every value carries two times: its clinical time (Condition ``onsetDateTime``,
Observation ``effectiveDateTime``) and the time it became known (Condition
``recordedDate``, Observation ``issued``), which is what the time-of-knowledge rule of the
data contract reads. ``at_index`` sets both to the index time. A known time read from a
date-only column is the end of that day (23:59:59 UTC, the contract's rule for a partial
date); every time is written as a full dateTime in UTC, never as a bare date that a reader
could place at either end of the day.

Ids. ``Patient.id`` is the CSV key when it already matches FHIR's id pattern
``[A-Za-z0-9-.]{1,64}`` (and is at most 48 characters); otherwise it is the key with every
other character replaced by ``-``, cut to 37 characters, plus ``-`` and the first 10 hex
digits of the key's SHA-256, so two keys never meet in one id. Other ids are
``<patient id>.e<n>`` (the patient's n-th row by index time) and ``<patient id>.e<n>.<name>``
(the mapping entry), hashed the same way only when longer than 64 characters. The CSV key
is kept in ``Patient.identifier``; ``labels.csv`` and ``images.csv`` use ``Patient.id``.

Output. FHIR is written as one NDJSON file per resource type (``fhir/Patient.ndjson``,
``fhir/Encounter.ndjson`` ...): the Bulk Data export's form, written as a stream, one
resource per line, so a reader skips one bad line rather than a whole bundle, and a
60,000-row CSV does not become 60,000 bundle files or one bundle too large to parse at once.
Every resource is built with the ``fhir.resources.R4B`` models, which validate it.

Bad rows (a value that is not one of the column's codes, not a number, not a date; a
missing key or index; a repeated key with ``rows: per_patient``; a row with the wrong number
of fields or broken quoting) are reported with the CSV line (the header is line 1) and the
column, under the mapping's ``on_error``: ``skip`` (the row is left out, the others kept) or
``fail`` (stop at the first, one line naming file, line and column). A mapped column missing
from the header, an unreadable file or a wrong encoding always stops the import.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
import math
import os
import re
import shutil
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import IO, Any

from fhir.resources.R4B.codeableconcept import CodeableConcept
from fhir.resources.R4B.coding import Coding
from fhir.resources.R4B.condition import Condition
from fhir.resources.R4B.encounter import Encounter
from fhir.resources.R4B.identifier import Identifier
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.period import Period
from fhir.resources.R4B.quantity import Quantity
from fhir.resources.R4B.reference import Reference
from fhir.resources.R4B.resource import Resource

from multimodal_fl.data.csv_mapping import (
    AT_INDEX,
    CodeMap,
    ConditionColumn,
    CsvMapping,
    ImageFile,
    LabelSpec,
    ObservationColumn,
    load_mapping,
)
from multimodal_fl.data.errors import DataError, ErrorSink, Skip

__all__ = [
    "POOL_SITE",
    "Fact",
    "ImageLink",
    "ImportResult",
    "ParsedRow",
    "RowParser",
    "SiteSummary",
    "SiteWriter",
    "assign_sites",
    "fhir_id",
    "import_csv",
]

POOL_SITE = "other"
PATIENT_ID_MAX = 48
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
_NULL_FLAVOR = "http://terminology.hl7.org/CodeSystem/v3-NullFlavor"
_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
_UCUM = "http://unitsofmeasure.org"
_END_OF_DAY = time(23, 59, 59)


def fhir_id(key: str, max_len: int = 64) -> str:
    """A FHIR id for ``key``: the key itself when valid, else sanitised plus a hash.

    Parameters
    ----------
    key
        The CSV key (or a composite ``<patient id>.e<n>.<name>``).
    max_len
        The longest id kept as is (at most 64).

    Returns
    -------
    str
        ``key`` when it matches ``[A-Za-z0-9-.]{1,64}`` and is at most ``max_len`` long;
        otherwise ``<key, other characters as '-', cut>-<10 hex digits of sha256(key)>``.
    """
    if len(key) <= max_len and _ID.fullmatch(key):
        return key
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:10]
    clean = re.sub(r"[^A-Za-z0-9.-]+", "-", key).strip("-.")[: max_len - 11].rstrip("-.")
    return f"{clean}-{digest}" if clean else f"k-{digest}"


# --------------------------------------------------------------------------- parsed rows


@dataclass
class Fact:
    """One Condition or Observation value of a row, with its clinical and known times."""

    spec: ConditionColumn | ObservationColumn
    value: bool | Decimal
    clinical: datetime
    known: datetime


@dataclass
class ImageLink:
    """One image file of a row."""

    source: Path
    rel: str
    spec: ImageFile
    acquired: datetime


@dataclass
class ParsedRow:
    """One good CSV row, parsed by the mapping."""

    line: int
    key: str
    split_value: str
    index: datetime
    gender: str | None = None
    birth: date | None = None
    deceased: date | datetime | None = None
    enc_class: str = "AMB"
    facts: list[Fact] = field(default_factory=list)
    label: int | None = None
    outcomes: dict[str, int] = field(default_factory=dict)
    images: list[ImageLink] = field(default_factory=list)


class _Bad(Exception):
    """A bad value: the column, a reason for counting, and what would be accepted."""

    def __init__(self, column: str, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.column = column
        self.reason = reason
        self.detail = detail


def _parse_when(text: str, fmt: str | None) -> tuple[datetime, bool]:
    """An aware UTC datetime and whether the text held a date only."""
    if fmt:
        dt = datetime.strptime(text, fmt)
        date_only = dt.time() == time(0) and not any(c in fmt for c in "HIMSfp")
    else:
        try:  # a date alone, extended (2021-07-01) or basic (20210701): no time of day
            dt, date_only = datetime.combine(date.fromisoformat(text), time(0)), True
        except ValueError:
            dt, date_only = datetime.fromisoformat(text.replace("Z", "+00:00")), False
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC), date_only


def _list(codes: list[str]) -> str:
    return ", ".join(repr(c) for c in codes) or "none"


class RowParser:
    """Turns CSV rows into :class:`ParsedRow` by the mapping, reporting bad values.

    Parameters
    ----------
    mapping
        The mapping.
    csv_dir
        The CSV's folder (image folders are relative to it).
    file
        The CSV's name, for reports.
    sink
        Receives bad rows (by line and column) under the error policy.
    split_by
        The column that names each row's site, or None.
    """

    def __init__(self, mapping: CsvMapping, csv_dir: Path, file: str, sink: ErrorSink,
                 split_by: str | None = None) -> None:
        self.m = mapping
        self.file = file
        self.sink = sink
        self.split_by = split_by
        self.missing = set(mapping.missing)
        self.image_dir = (csv_dir / mapping.images.dir).resolve() if mapping.images else None
        self.keys: dict[str, int] = {}
        # each column's codes, resolved once (the per-column lists over the defaults)
        # (a number's column only its own: the defaults are yes/no codes, and 98 is a CRP)
        self.codes: dict[str, CodeMap] = {
            spec.name: spec.codes(CodeMap() if isinstance(spec, ObservationColumn)
                                  and spec.type == "quantity" else mapping.codes)
            for spec in (*mapping.conditions, *mapping.observations)}
        self.images_missing = 0
        self._filters = [(f.column, set(f.values) if f.values is not None else None,
                          re.compile(f.matches) if f.matches is not None else None)
                         for f in mapping.keep_rows]

    def keep(self, values: dict[str, str]) -> bool:
        """Whether the row passes every ``keep_rows`` filter."""
        for column, allowed, pattern in self._filters:
            v = values[column]
            if allowed is not None and v not in allowed:
                return False
            if pattern is not None and not pattern.fullmatch(v):
                return False
        return True

    def parse(self, line: int, values: dict[str, str]) -> ParsedRow | None:
        """The parsed row, or None when a value is bad (each bad value is reported)."""
        errors: list[_Bad] = []
        row = self._start(line, values, errors)
        if row is not None:
            for step in (self._sex, self._birth, self._deceased, self._class, self._label,
                         self._outcomes, self._images):
                try:
                    step(row, values)
                except _Bad as bad:
                    errors.append(bad)
            errors.extend(self._facts(row, values))
        for err in errors:
            self.sink.report(self.file, f"line {line}", err.column, err.reason, err.detail)
        if errors or row is None:
            return None
        if self.m.rows == "per_patient":
            self.keys[row.key] = line
        return row

    # ---------------------------------------------------------------- values

    def _value(self, values: dict[str, str], column: str) -> str | None:
        v = values[column]
        return None if v in self.missing else v

    def _when(self, values: dict[str, str], column: str, *, known: bool = False
              ) -> datetime | None:
        v = self._value(values, column)
        if v is None:
            return None
        dt, date_only = self._when_parsed(column, v)
        if known and date_only:
            return datetime.combine(dt.date(), _END_OF_DAY, tzinfo=UTC)
        return dt

    def _when_parsed(self, column: str, v: str) -> tuple[datetime, bool]:
        """:func:`_parse_when` of a column's value, or the bad date it is."""
        try:
            return _parse_when(v, self.m.source.date_format)
        except ValueError:
            expected = self.m.source.date_format or "an ISO date or dateTime, e.g. 2021-07-08"
            raise _Bad(column, "bad_date", f"'{v}' is not a date ({expected})") from None
        except OverflowError:
            raise _Bad(column, "bad_date", f"'{v}' is out of the range of dates (years 1 to "
                       "9999, in UTC)") from None

    def _timepoint(self, values: dict[str, str], spec: str, index: datetime, *,
                   known: bool = False) -> datetime | None:
        return index if spec == AT_INDEX else self._when(values, spec, known=known)

    def _start(self, line: int, values: dict[str, str], errors: list[_Bad]
               ) -> ParsedRow | None:
        """The row's key and index (without them nothing else can be placed)."""
        col = self.m.patient_id
        key = values[col]
        if not key or key in self.missing:
            errors.append(_Bad(col, "missing_value", "the patient key is empty" if not key
                               else f"the patient key '{key}' is a missing value (missing: "
                               f"{_list(self.m.missing)})"))
        elif key in self.keys:
            errors.append(_Bad(col, "duplicate_patient",
                               f"patient key '{key}' is already on line {self.keys[key]} "
                               "(rows: per_patient); use rows: per_event when each row is "
                               "one admission"))
        index: datetime | None
        if self.m.index.date is not None:
            index = datetime.combine(self.m.index.date, time(0), tzinfo=UTC)
        else:
            assert self.m.index.column is not None  # the mapping's validator guarantees it
            try:
                index = self._when(values, self.m.index.column)
                if index is None:
                    raise _Bad(self.m.index.column, "missing_value",
                               "the index date is empty; every row needs one")
            except _Bad as bad:
                errors.append(bad)
                index = None
        if errors or index is None:
            return None
        split = values[self.split_by] if self.split_by else ""
        return ParsedRow(line=line, key=key, split_value=split, index=index)

    def _sex(self, row: ParsedRow, values: dict[str, str]) -> None:
        sex = self.m.patient.sex
        if sex is None:
            return
        v = self._value(values, sex.column)
        if v is None or v in sex.unknown:
            return
        for gender, codes in (("female", sex.female), ("male", sex.male),
                              ("other", sex.other)):
            if v in codes:
                row.gender = gender
                return
        raise _Bad(sex.column, "bad_value",
                   f"'{v}' is not a sex code (female: {_list(sex.female)}; male: "
                   f"{_list(sex.male)}; other: {_list(sex.other)}; unknown: "
                   f"{_list(sex.unknown)})")

    def _birth(self, row: ParsedRow, values: dict[str, str]) -> None:
        pat = self.m.patient
        if pat.birth_date is not None:
            when = self._when(values, pat.birth_date)
            row.birth = when.date() if when else None
            if row.birth is not None and row.birth > row.index.date():
                raise _Bad(pat.birth_date, "bad_date",
                           f"birth date {row.birth} is after the index {row.index.date()}")
            return
        if pat.age is None:
            return
        v = self._value(values, pat.age)
        if v is None:
            return
        try:
            age = float(v) if "_" not in v else float("nan")
        except ValueError:
            age = float("nan")
        if not 0 <= age <= 150:  # also NaN and inf
            raise _Bad(pat.age, "bad_number",
                       f"'{v}' is not an age in years (a number from 0 to 150)")
        years = age + 0.5 if v.isdigit() else age  # completed years: the middle of that year
        try:
            row.birth = row.index.date() - timedelta(days=round(years * 365.25))
        except OverflowError:
            raise _Bad(pat.age, "bad_date", f"age {v} at the index {row.index.date()} gives "
                       "a birth date before year 1") from None

    def _deceased(self, row: ParsedRow, values: dict[str, str]) -> None:
        dec = self.m.patient.deceased
        if dec is None or values[dec.column] in dec.unknown:
            return
        text = self._value(values, dec.column)
        if text is None:
            return
        when, date_only = self._when_parsed(dec.column, text)
        row.deceased = when.date() if date_only else when
        if row.birth is not None and when.date() < row.birth:
            raise _Bad(dec.column, "bad_date", f"date of death {when.date()} is before the "
                       f"patient's birth ({row.birth})")

    def _class(self, row: ParsedRow, values: dict[str, str]) -> None:
        spec = self.m.encounter.class_
        if spec.fixed is not None:
            row.enc_class = spec.fixed
            return
        assert spec.column is not None  # the mapping's validator guarantees it
        v = self._value(values, spec.column)
        if v is None or v in spec.unknown:
            row.enc_class = "UNK"
        elif v in spec.codes:
            row.enc_class = spec.codes[v]
        else:
            raise _Bad(spec.column, "bad_value",
                       f"'{v}' is not an encounter class code (codes: "
                       f"{_list(list(spec.codes))}; unknown: {_list(spec.unknown)})")

    # ---------------------------------------------------------------- facts

    def _facts(self, row: ParsedRow, values: dict[str, str]) -> list[_Bad]:
        """Adds the row's Condition and Observation values; returns the bad ones."""
        errors: list[_Bad] = []
        specs: list[ConditionColumn | ObservationColumn] = [*self.m.conditions,
                                                             *self.m.observations]
        for spec in specs:
            try:
                fact = self._fact(spec, row, values)
            except _Bad as bad:
                errors.append(bad)
                continue
            if fact is not None:
                row.facts.append(fact)
        return errors

    def _fact(self, spec: ConditionColumn | ObservationColumn, row: ParsedRow,
              values: dict[str, str]) -> Fact | None:
        value: bool | Decimal | None
        if isinstance(spec, ObservationColumn) and spec.type == "quantity":
            value = self._quantity(spec, values)
        else:
            value = self._boolean(spec, values)
            if isinstance(spec, ConditionColumn) and value is False:
                value = None  # a Condition is written only when present
        if value is None:
            return None
        known = self._timepoint(values, spec.known, row.index, known=True)
        if known is None:
            raise _Bad(spec.known, "missing_value",
                       f"'{spec.column}' has a value but the date it became known "
                       f"('{spec.known}') is empty")
        # clinical time: its own spec, else the known column's time read as clinical (a
        # date's first instant, while it is known at the day's end)
        clinical = self._timepoint(values, spec.clinical() or spec.known, row.index)
        return Fact(spec, value, clinical or known, known)

    def _boolean(self, spec: ConditionColumn | ObservationColumn, values: dict[str, str]
                 ) -> bool | None:
        codes = self.codes[spec.name]
        v = values[spec.column]
        if v in codes.present:
            return True
        if v in codes.absent:
            return False
        if v in codes.unknown or v in self.missing:
            return None
        if v in codes.not_applicable:
            return {"present": True, "absent": False}.get(str(spec.not_applicable_means))
        raise _Bad(spec.column, "bad_value",
                   f"'{v}' is not a code of this column (present: {_list(codes.present)}; "
                   f"absent: {_list(codes.absent)}; unknown: {_list(codes.unknown)}; not "
                   f"applicable: {_list(codes.not_applicable)}; missing: "
                   f"{_list(self.m.missing)})")

    def _quantity(self, spec: ObservationColumn, values: dict[str, str]) -> Decimal | None:
        codes = self.codes[spec.name]
        v = values[spec.column]
        if v in self.missing or v in codes.unknown:
            return None
        if v in codes.not_applicable:
            means = spec.not_applicable_means
            return Decimal(str(means)) if isinstance(means, float) else None
        try:
            number = Decimal(v) if "_" not in v else Decimal("NaN")
        except InvalidOperation:
            number = Decimal("NaN")
        if not number.is_finite() or not math.isfinite(float(number)):
            raise _Bad(spec.column, "bad_number",
                       f"'{v}' is not a number (write e.g. 0.743; unknown: "
                       f"{_list(codes.unknown)}; missing: {_list(self.m.missing)})")
        return number

    # ---------------------------------------------------------------- label, images

    def _label(self, row: ParsedRow, values: dict[str, str]) -> None:
        if self.m.label is not None:
            row.label = self._coded(self.m.label, values, "label")

    def _outcomes(self, row: ParsedRow, values: dict[str, str]) -> None:
        for spec in self.m.outcomes:
            value = self._coded(spec, values, f"outcome '{spec.name}'")
            if value is not None:
                row.outcomes[spec.name] = value

    def _coded(self, spec: LabelSpec, values: dict[str, str], what: str) -> int | None:
        """The 0/1 value of a label or outcome column; None when unknown or missing."""
        v = values[spec.column]
        if v in self.missing or v in spec.unknown:
            return None
        if spec.above is not None:
            try:
                number = float(v)
            except ValueError:
                number = float("nan")
            if number != number:
                raise _Bad(spec.column, "bad_number", f"{what} '{v}' is not a number")
            return int(number > spec.above)
        if v in spec.positive:
            return 1
        if v in spec.negative:
            return 0
        raise _Bad(spec.column, "bad_value",
                   f"'{v}' is not a {what} code (positive: {_list(spec.positive)}; "
                   f"negative: {_list(spec.negative)}; unknown: {_list(spec.unknown)})")

    def _images(self, row: ParsedRow, values: dict[str, str]) -> None:
        if self.m.images is None or self.image_dir is None:
            return
        for spec in self.m.images.files:
            rel = spec.path.format_map(values)
            source = (self.image_dir / rel).resolve()
            if not source.is_relative_to(self.image_dir):
                raise _Bad(spec.columns()[0] if spec.columns() else "images", "bad_value",
                           f"image path '{rel}' leads outside {self.image_dir}")
            if not source.is_file():
                self.images_missing += 1
                continue
            acquired = self._timepoint(values, spec.acquired, row.index)
            if acquired is None:
                raise _Bad(spec.acquired, "missing_value",
                           f"image '{rel}' exists but its acquisition date is empty")
            # the copy's path under images/ is the file's own, resolved: never a '..' that
            # would lead the copy out of the site
            row.images.append(ImageLink(source, source.relative_to(self.image_dir).as_posix(),
                                        spec, acquired))


# --------------------------------------------------------------------------- reading


def _read_text(path: Path, encoding: str) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the CSV file: {exc.strerror or exc}") from None
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{path.name}: line {line}: not valid {encoding} text ({exc.reason}); "
                        "set source.encoding in the mapping (e.g. latin-1)") from None
    except LookupError:
        raise DataError(f"source.encoding '{encoding}' is not a known text encoding") from None


def _header(reader: Any, file: str) -> list[str]:
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise DataError(f"{file}: the file is empty (expected a header line)") from None
    except csv.Error as exc:
        raise DataError(f"{file}: line 1: the header is not valid CSV: {exc}") from None
    empty = [i + 1 for i, h in enumerate(header) if not h]
    if empty:
        trailing = " (a delimiter at the end of the header line?)" if empty[-1] == len(header) \
            else ""
        raise DataError(f"{file}: line 1: column {empty[0]} of the header has no name"
                        f"{trailing}; every column needs one")
    dup = sorted({h for h in header if header.count(h) > 1})
    if dup:
        raise DataError(f"{file}: line 1: column(s) {dup} appear twice in the header")
    return header


def _check_columns(header: list[str], mapping: CsvMapping, split_by: str | None,
                   file: str, mapping_name: str) -> None:
    """Every column the mapping (and --split-by) reads must be in the header."""
    wanted = mapping.columns_used()
    if split_by:
        wanted.setdefault(split_by, "--split-by")
    for column, key in wanted.items():
        if column in header:
            continue
        if header and header[0].startswith("\ufeff"):
            raise DataError(f"{file}: the file starts with a byte-order mark, read as part of "
                            f"the first column's name ('{header[0][1:]}'); set "
                            "source.encoding: utf-8-sig in the mapping")
        other = [d for d in ",;\t|" if len(header) == 1 and d in header[0]]
        if other:
            raise DataError(f"{file}: the header is one column, '{header[0][:60]}'; is the "
                            f"delimiter {other[0]!r}? (set source.delimiter in the mapping)")
        lower = {h.lower(): h for h in header}
        close = difflib.get_close_matches(column.lower(), list(lower), n=1, cutoff=0.6)
        hint = f"; did you mean '{lower[close[0]]}'?" if close else ""
        raise DataError(f"{file}: column '{column}' ({mapping_name}: {key}) is not in the "
                        f"header{hint} (columns: {', '.join(header)})")


def _rows(reader: Any, header: list[str], file: str, sink: ErrorSink
          ) -> Iterator[tuple[int, dict[str, str] | None]]:
    """(line, values) per data row; values None for a malformed row (reported)."""
    end = reader.line_num
    while True:
        start = end + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            end = reader.line_num
            span = (f" (a quoted field opened on line {start} runs to line {end}: lines "
                    f"{start}-{end} are lost; check the quotes on line {start})"
                    if end > start else "")
            sink.report(file, f"line {start}", "<row>", "bad_row",
                        f"not valid CSV: {exc}{span}")
            yield start, None
            continue
        end = reader.line_num
        if not fields:
            continue  # a blank line
        if any("\x00" in f for f in fields):
            sink.report(file, f"line {start}", "<row>", "bad_row",
                        "the row holds a NUL byte (a binary or corrupt file?)")
            yield start, None
            continue
        if len(fields) != len(header):
            sink.report(file, f"line {start}", "<row>", "bad_row",
                        f"{len(fields)} fields, the header has {len(header)}")
            yield start, None
            continue
        yield start, {h: v.strip() for h, v in zip(header, fields, strict=True)}


# --------------------------------------------------------------------------- sites


def _site_name(column: str, value: str, names: dict[str, str]) -> str:
    if value in names:
        return names[value]
    raw = f"{column}-{value}" if value else f"{column}-missing"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", raw).strip("-.") or "site"


def _distinct_names(column: str, raw: list[str], names: dict[str, str]) -> dict[str, str]:
    """Each raw split value's site name; two values whose generated names collide ('a/b' and
    'a b' are both 'COLUMN-a-b') keep apart, the later ones with a short hash of the value.
    Names the mapping gives (``site_names``) are taken as they are: two values it names alike
    are meant to be one site."""
    out: dict[str, str] = {}
    taken: set[str] = set()
    for value in raw:
        name = _site_name(column, value, names)
        if name in taken and value not in names:
            name = f"{name}-{hashlib.sha256(value.encode()).hexdigest()[:6]}"
        out[value] = name
        taken.add(name)
    return out


def assign_sites(rows: list[ParsedRow], split_by: str | None, names: dict[str, str],
                 min_site_size: int, single: str) -> dict[str, tuple[list[ParsedRow], list[str]]]:
    """Group rows into sites; sites with fewer patients than ``min_site_size`` are pooled.

    Parameters
    ----------
    rows
        The parsed rows.
    split_by
        The split column, or None (one site, named ``single``).
    names
        Raw split value -> site name (the mapping's ``site_names`` for that column).
    min_site_size
        Sites with fewer patients go into one site named :data:`POOL_SITE`.
    single
        The site's name without a split.

    Returns
    -------
    dict
        Site name -> (its rows, the raw split values it holds), largest site first.
    """
    if split_by is None:
        return {single: (rows, [])}
    groups: dict[str, list[ParsedRow]] = defaultdict(list)
    values: dict[str, set[str]] = defaultdict(set)
    site_of = _distinct_names(split_by, sorted({r.split_value for r in rows}), names)
    for row in rows:
        name = site_of[row.split_value]
        groups[name].append(row)
        values[name].add(row.split_value)
    sites: dict[str, tuple[list[ParsedRow], list[str]]] = {}
    pool: list[ParsedRow] = []
    pooled: set[str] = set()
    for name, members in groups.items():
        if len({r.key for r in members}) < min_site_size:
            pool.extend(members)
            pooled |= values[name]
        else:
            sites[name] = (members, sorted(values[name]))
    if pool:
        held, held_values = sites.pop(POOL_SITE, ([], []))
        sites[POOL_SITE] = (sorted([*held, *pool], key=lambda r: r.line),
                            sorted({*held_values, *pooled}))
    return dict(sorted(sites.items(), key=lambda kv: (-len({r.key for r in kv[1][0]}),
                                                      kv[0])))


# --------------------------------------------------------------------------- writing


@dataclass
class SiteSummary:
    """What one site directory received."""

    name: str
    path: Path
    patients: int = 0
    rows: int = 0
    labelled: int = 0
    positives: int = 0
    images: int = 0
    resources: Counter[str] = field(default_factory=Counter)
    split_values: list[str] = field(default_factory=list)
    #: other outcome columns of labels.csv: name -> {"labelled": n, "positives": n}
    outcomes: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready mapping."""
        return {"site": self.name, "path": str(self.path), "patients": self.patients,
                "rows": self.rows, "labelled": self.labelled, "positives": self.positives,
                "positive_rate": (self.positives / self.labelled) if self.labelled else None,
                "outcomes": self.outcomes,
                "images": self.images, "resources": dict(sorted(self.resources.items())),
                "split_values": self.split_values}


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _coding(system: str, code: str, display: str | None = None) -> CodeableConcept:
    return CodeableConcept(coding=[Coding(system=system, code=code, display=display)])


class SiteWriter:
    """Writes one site directory: ``fhir/<Type>.ndjson``, ``labels.csv``, ``images.csv``.

    Parameters
    ----------
    root
        The site directory (created).
    mapping
        The mapping (code systems, identifier system).
    """

    def __init__(self, root: Path, mapping: CsvMapping) -> None:
        self.root = root
        self.m = mapping
        self.id_system = mapping.system_uri("local") + ":" + \
            re.sub(r"[^A-Za-z0-9._-]+", "-", mapping.patient_id)

    def write(self, name: str, rows: list[ParsedRow]) -> SiteSummary:
        """Write the site's rows; return what was written."""
        summary = SiteSummary(name=name, path=self.root)
        by_patient: dict[str, list[ParsedRow]] = defaultdict(list)
        for row in rows:
            by_patient[row.key].append(row)
        labels: list[tuple[str, int | None, dict[str, int]]] = []
        images: list[list[str]] = []
        (self.root / "fhir").mkdir(parents=True, exist_ok=True)
        with ExitStack() as stack:
            files: dict[str, IO[str]] = {}

            def emit(resource: Resource) -> None:
                kind = resource.get_resource_type()
                if kind not in files:
                    files[kind] = stack.enter_context(
                        (self.root / "fhir" / f"{kind}.ndjson").open("w", encoding="utf-8"))
                files[kind].write(resource.model_dump_json() + "\n")
                summary.resources[kind] += 1

            for key, own in by_patient.items():
                own.sort(key=lambda r: (r.index, r.line))
                pid = fhir_id(key, PATIENT_ID_MAX)
                emit(self._patient(pid, key, own[0]))
                for n, row in enumerate(own, start=1):
                    for resource in self._row_resources(pid, n, row):
                        emit(resource)
                    images.extend(self._copy_images(pid, row))
                # the earliest row that knows each outcome gives it
                label = next((r.label for r in own if r.label is not None), None)
                outcomes: dict[str, int] = {}
                for r in own:
                    outcomes = {**r.outcomes, **outcomes}
                if label is not None or outcomes:
                    labels.append((pid, label, outcomes))
                summary.rows += len(own)
        summary.patients = len(by_patient)
        known = [lab for _, lab, _ in labels if lab is not None]
        summary.labelled, summary.positives = len(known), sum(known)
        for spec in self.m.outcomes:
            values = [o[spec.name] for _, _, o in labels if spec.name in o]
            summary.outcomes[spec.name] = {"labelled": len(values), "positives": sum(values)}
        summary.images = len(images)
        self._write_csvs(labels, images)
        return summary

    def _write_csvs(self, labels: list[tuple[str, int | None, dict[str, int]]],
                    images: list[list[str]]) -> None:
        names = [o.name for o in self.m.outcomes]
        if self.m.label is not None or names:
            with (self.root / "labels.csv").open("w", newline="", encoding="utf-8") as fh:
                w = csv.writer(fh)
                has_label = self.m.label is not None
                w.writerow(["patient_id", *(["label"] if has_label else []), *names])
                for pid, label, outcomes in labels:
                    cells = [*([label] if has_label else []),
                             *(outcomes.get(n) for n in names)]
                    w.writerow([pid, *("" if c is None else c for c in cells)])
        if images:
            with (self.root / "images.csv").open("w", newline="", encoding="utf-8") as fh:
                w = csv.writer(fh)
                w.writerow(["patient_id", "path", "modality", "view", "acquired"])
                w.writerows(images)

    def _copy_images(self, pid: str, row: ParsedRow) -> list[list[str]]:
        out = []
        for link in row.images:
            rel = f"images/{link.rel}"
            dest = self.root / rel
            if not dest.exists():
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(link.source, dest)
            out.append([pid, rel, link.spec.modality or "", link.spec.view or "",
                        _iso(link.acquired)])
        return out

    def _patient(self, pid: str, key: str, row: ParsedRow) -> Patient:
        return Patient(id=pid, identifier=[Identifier(system=self.id_system, value=key)],
                       gender=row.gender, birthDate=row.birth,
                       # FHIR dateTime takes a date; the model's hint says datetime only
                       deceasedDateTime=row.deceased)  # type: ignore[arg-type]

    def _row_resources(self, pid: str, n: int, row: ParsedRow) -> Iterator[Resource]:
        enc_id = fhir_id(f"{pid}.e{n}")
        subject = Reference(reference=f"Patient/{pid}")
        encounter = Reference(reference=f"Encounter/{enc_id}")
        system = _NULL_FLAVOR if row.enc_class == "UNK" else _ACT_CODE
        yield Encounter.model_validate({
            "id": enc_id, "status": "finished", "class": Coding(system=system,
                                                                  code=row.enc_class),
            "subject": subject, "period": Period(start=row.index)})
        for fact in row.facts:
            rid = fhir_id(f"{pid}.e{n}.{fact.spec.slug()}")
            code = _coding(self.m.system_uri(fact.spec.system), fact.spec.code,
                           fact.spec.display)
            if isinstance(fact.spec, ConditionColumn):
                yield Condition(id=rid, subject=subject, encounter=encounter, code=code,
                                clinicalStatus=_coding(_CLINICAL, "active"),
                                onsetDateTime=fact.clinical, recordedDate=fact.known)
            else:
                yield self._observation(rid, fact, code, subject, encounter)

    @staticmethod
    def _observation(rid: str, fact: Fact, code: CodeableConcept, subject: Reference,
                     encounter: Reference) -> Observation:
        spec = fact.spec
        assert isinstance(spec, ObservationColumn)
        value: dict[str, Any]
        if isinstance(fact.value, bool):
            value = {"valueBoolean": fact.value}
        else:
            value = {"valueQuantity": Quantity(value=fact.value, unit=spec.unit, system=_UCUM,
                                               code=spec.unit)}
        return Observation(id=rid, status="final", code=code, subject=subject,
                           encounter=encounter, effectiveDateTime=fact.clinical,
                           issued=fact.known, **value)


# --------------------------------------------------------------------------- import


@dataclass
class ImportResult:
    """What an import read, skipped and wrote."""

    csv: Path
    mapping: str
    out: Path
    sites: list[SiteSummary]
    counts: Counter[str]
    skipped: list[Skip]
    split_by: str | None = None
    min_site_size: int = 0
    #: one line each: a mapping's ``site_names`` entry that names no value of the split column
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """JSON-ready mapping (written to ``import_report.json``)."""
        return {
            "csv": str(self.csv), "mapping": self.mapping, "out": str(self.out),
            "split_by": self.split_by, "min_site_size": self.min_site_size,
            "warnings": self.warnings,
            "counts": dict(sorted(self.counts.items())),
            "sites": [s.to_dict() for s in self.sites],
            "skipped_by_reason": dict(sorted(Counter(s.reason for s in self.skipped).items())),
            "skipped": [s.to_dict() for s in self.skipped],
        }


def _one_site_per_patient(rows: list[ParsedRow]) -> int:
    """Give every row of a patient the split value of the patient's earliest row (by index,
    then line), so that a patient is at one site only; the number of patients moved."""
    first: dict[str, ParsedRow] = {}
    for row in rows:
        held = first.get(row.key)
        if held is None or (row.index, row.line) < (held.index, held.line):
            first[row.key] = row
    moved = {row.key for row in rows if row.split_value != first[row.key].split_value}
    for row in rows:
        row.split_value = first[row.key].split_value
    return len(moved)


def unmatched_site_names(column: str, names: dict[str, str], values: set[str]) -> list[str]:
    """One line per ``site_names`` entry of ``column`` that matches none of its ``values``,
    when some value has no entry (a likely misspelling: that value's site got a generated name).

    A mapping may name more values than one extract holds (a national code list imported for
    one region): with every value named, entries that match nothing are not warned of.

    Parameters
    ----------
    column
        The split column.
    names
        The mapping's ``site_names`` for it: raw value -> site name.
    values
        The column's values in the imported rows.

    Returns
    -------
    list of str
        E.g. ``site_names.hospital: "St Marys Leeds" (-> st_marys) matches no value of column
        'hospital' ...; nearest unnamed value: "St. Mary's, Leeds" ...``; empty when every
        value is named or every entry matches.
    """
    unnamed = sorted(values - set(names))
    if not unnamed:
        return []
    out: list[str] = []
    for raw, site in names.items():
        if raw in values:
            continue
        close = difflib.get_close_matches(raw, unnamed, n=1, cutoff=0.0)
        near = (f'; nearest unnamed value: "{close[0]}" (values are compared exactly, spaces, '
                "case and punctuation included)" if close else "")
        out.append(f'site_names.{column}: "{raw}" (-> {site}) matches no value of column '
                   f"'{column}' in the imported rows, so it names no site{near}")
    return out


def _nothing_imported(file: str, counts: Counter[str], skipped: list[Skip]) -> str:
    """Why no row of ``file`` was imported: the most common failing column and reason."""
    head = (f"{file}: 0 of {counts['rows_read']} rows imported ({counts['rows_skipped']} "
            f"skipped, {counts['rows_not_kept']} not kept by keep_rows); nothing written")
    if not skipped:
        return f"{head}: no row passes the mapping's keep_rows filters"
    common = Counter((s.field, s.reason) for s in skipped).most_common()
    (column, reason), n = common[0]
    first = next(s for s in skipped if (s.field, s.reason) == (column, reason))
    others = f"; {len(common) - 1} other column/reason pair(s)" if len(common) > 1 else ""
    return (f"{head}: most often column '{column}' ({reason}, {n} row(s)), e.g. "
            f"{first.resource_id}: {first.detail or reason}{others}")


def _check_out(out: Path) -> None:
    """``out`` is a new or empty directory that can be made (checked before any row is read)."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: a file, not a directory; give a new or empty directory")
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out}: the output directory exists and is not empty; give a new "
                        "or empty directory")
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise DataError(f"{out}: cannot be made: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DataError(f"{out}: cannot be made: {parent} is not writable")


def import_csv(csv_path: Path | str, mapping: CsvMapping | Path | str, out: Path | str, *,
               split_by: str | None = None, min_site_size: int = 0,
               on_error: str | None = None) -> ImportResult:
    """Import a flat CSV into site directories of the site data contract.

    Parameters
    ----------
    csv_path
        The CSV file.
    mapping
        A :class:`CsvMapping` or the path of its YAML file.
    out
        The output directory (new or empty). Without ``split_by`` it is the site; with it,
        each site is ``out/<site>``.
    split_by
        The column whose value names each row's site (``site_names`` in the mapping give
        names; otherwise ``<COLUMN>-<value>``).
    min_site_size
        Sites with fewer patients are pooled into one site named ``other``.
    on_error
        ``skip`` or ``fail``; default: the mapping's ``on_error``.

    Returns
    -------
    ImportResult
        Rows read, kept, skipped (each with file, line, column), and every site's size.

    Raises
    ------
    DataError
        When the CSV cannot be read, a mapped column is missing, the output directory is
        not empty, no row is imported (every row skipped or none kept by ``keep_rows``:
        nothing is written; the message names the commonest failing column), or
        (``on_error: fail``) at the first bad row.
    MappingError
        When the mapping file is invalid.
    """
    m = mapping if isinstance(mapping, CsvMapping) else load_mapping(mapping)
    csv_path, out = Path(csv_path), Path(out)
    policy = on_error or m.on_error
    if policy not in ("skip", "fail"):
        raise DataError(f"on_error '{on_error}': expected skip or fail")
    sink = ErrorSink(on_error="fail" if policy == "fail" else "skip")
    if min_site_size and not split_by:
        raise DataError(f"--min-site-size {min_site_size} pools the sites of --split-by; give "
                        "--split-by COLUMN, or leave it out")
    _check_out(out)
    file = csv_path.name
    reader = csv.reader(io.StringIO(_read_text(csv_path, m.source.encoding), newline=""),
                        delimiter=m.source.delimiter, strict=True)
    header = _header(reader, file)
    _check_columns(header, m, split_by, file, f"mapping '{m.name}'")
    parser = RowParser(m, csv_path.parent, file, sink, split_by)
    counts: Counter[str] = Counter(rows_read=0, rows_imported=0)
    parsed: list[ParsedRow] = []
    for line, values in _rows(reader, header, file, sink):
        counts["rows_read"] += 1
        if values is not None and not parser.keep(values):
            counts["rows_not_kept"] += 1
            continue
        row = parser.parse(line, values) if values is not None else None
        if row is None:
            counts["rows_skipped"] += 1
        else:
            parsed.append(row)
    if not counts["rows_read"]:
        raise DataError(f"{file}: the header has no data rows under it; nothing to import")
    if not parsed:
        raise DataError(_nothing_imported(file, counts, sink.skipped))
    counts["rows_imported"] = len(parsed)
    counts["images_not_found"] = parser.images_missing
    if split_by and m.rows == "per_event":
        counts["patients_kept_in_one_site"] = _one_site_per_patient(parsed)
    sites = assign_sites(parsed, split_by, m.site_names.get(split_by or "", {}),
                         min_site_size, out.name)
    pooled = sites.get(POOL_SITE)
    if split_by and pooled is not None and len({r.key for r in pooled[0]}) < min_site_size:
        counts["pooled_site_patients_below_minimum"] = len({r.key for r in pooled[0]})
    try:
        out.mkdir(parents=True, exist_ok=True)
        summaries = [SiteWriter(out / name if split_by else out, m).write(name, rows)
                     for name, (rows, _) in sites.items()]
    except OSError as exc:
        raise DataError(f"{out}: cannot write the sites: {exc.strerror or exc}") from None
    for s in summaries:
        s.split_values = sites[s.name][1]
    warnings = (unmatched_site_names(split_by, m.site_names.get(split_by, {}),
                                     {r.split_value for r in parsed}) if split_by else [])
    result = ImportResult(csv_path, m.name, out, summaries, counts, list(sink.skipped),
                          split_by, min_site_size, warnings)
    (out / "import_report.json").write_text(json.dumps(result.summary(), indent=2) + "\n")
    return result
