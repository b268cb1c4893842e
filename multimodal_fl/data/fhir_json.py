"""FHIR JSON without models: files -> resource dicts, and the dated fields inside them.

The lowest FHIR layer of :mod:`multimodal_fl.data`: :mod:`~multimodal_fl.data.fhir` (the
reader), :mod:`~multimodal_fl.data.text`, :mod:`~multimodal_fl.data.imaging` and
:mod:`~multimodal_fl.data.cohort` build on it, and it imports none of them.

- :func:`iter_file_resources` / :func:`unpack_resources`: a ``.json`` Bundle or resource,
  or an ``.ndjson`` Bulk Data file (read a line at a time), -> ``(resource, fullUrl)``
  pairs; Bundles inside Bundle entries are read to :data:`MAX_BUNDLE_DEPTH` levels; what is
  not FHIR is reported and skipped.
- :func:`parse_time` / :func:`first_time`: FHIR date / dateTime / instant values ->
  timezone-aware UTC datetimes; a bad value raises :class:`BadField`, which names the field.
  Values without an offset are read in the site's time zone (``tz``, default UTC). A partial
  date (``YYYY``, ``YYYY-MM``, ``YYYY-MM-DD``) names a period: its first instant when the
  caller asks for clinical time (``end=False``: labels, the index), its last second when it
  asks when the record became known (``end=True``: features), so a record dated only by the
  day of the index is never known before a same-day index. Known times are whole seconds,
  the precision of a FHIR ``dateTime`` (and so of an index): a fraction is dropped, so a
  value issued 0.869 s after an effective time equal to the index (Synthea writes such
  ``issued`` instants) is known at the index.
"""

from __future__ import annotations

import functools
import gc
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import orjson

from multimodal_fl.data.errors import ErrorSink

__all__ = ["MAX_BUNDLE_DEPTH", "BadField", "date_period", "first_time", "iter_file_resources",
           "parse_time", "paused_gc", "shifted", "unpack_resources"]

_PARTIAL_DATE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?$")


def _period_end(first: date, unit: str) -> date:
    """The day after the period (``"year"``, ``"month"``, ``"day"``) that starts on ``first``."""
    if unit == "year":
        return date(first.year + 1, 1, 1)
    if unit == "month":
        return (first.replace(day=28) + timedelta(days=4)).replace(day=1)
    return first + timedelta(days=1)


def date_period(first: date, unit: str, *, tz: tzinfo = UTC, end: bool = False) -> datetime:
    """The first (or, with ``end``, the last) instant of a calendar period in ``tz``, in UTC.

    Parameters
    ----------
    first
        The period's first day.
    unit
        ``"year"``, ``"month"`` or ``"day"``: the period's length.
    tz
        The time zone the period is a local period of.
    end
        Return the period's last second (one second before the next period starts) instead
        of its first instant.

    Returns
    -------
    datetime
        Timezone-aware, UTC.
    """
    if not end:
        return datetime.combine(first, time(), tzinfo=tz).astimezone(UTC)
    try:
        after = _period_end(first, unit)
    except (ValueError, OverflowError):  # the period ends with year 9999
        return datetime.max.replace(tzinfo=UTC)
    return datetime.combine(after, time(), tzinfo=tz).astimezone(UTC) - timedelta(seconds=1)


def shifted(t: datetime, delta: timedelta) -> datetime:
    """``t + delta``, held at the first or last instant a datetime holds instead of overflowing.

    A window around a time in year 1 or 9999 (an index minus its lookback, a cut-off plus
    its label window) then ends at the edge of the range.

    Parameters
    ----------
    t
        A timezone-aware UTC datetime.
    delta
        The shift.

    Returns
    -------
    datetime
        Timezone-aware, UTC.
    """
    try:
        return t + delta
    except OverflowError:
        edge = datetime.max if delta > timedelta(0) else datetime.min
        return edge.replace(tzinfo=UTC)


def parse_time(value: Any, *, tz: tzinfo = UTC, end: bool = False) -> datetime:
    """Parse a FHIR date / dateTime / instant into an aware UTC datetime.

    Parameters
    ----------
    value
        ``YYYY``, ``YYYY-MM``, ``YYYY-MM-DD`` or a full dateTime (``Z`` or an offset).
    tz
        The site's time zone: a partial date names a period of its calendar, and a
        dateTime without an offset is its local time.
    end
        Known time: a partial date is the last second of the period it names (when the
        record was known at the latest) instead of its first instant, and a dateTime is
        truncated to the whole second.

    Returns
    -------
    datetime
        Timezone-aware, UTC.

    Raises
    ------
    ValueError
        When the value is not a FHIR date/dateTime, or when it lies outside years 1-9999
        once in UTC (``0001-01-01`` in a zone east of UTC).
    """
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a FHIR date/dateTime string, got {value!r}")
    return _parse_time(value, tz, end)


@functools.lru_cache(maxsize=1 << 16)
def _parse_time(value: str, tz: tzinfo, end: bool) -> datetime:
    """:func:`parse_time` of a string, remembered (sites repeat times; datetimes are immutable)."""
    try:
        return _parse_in_range(value, tz, end)
    except OverflowError:  # 0001-01-01 east of UTC, 9999-12-31T23:00-05:00: year 0 or 10000
        raise ValueError(f"'{value}' lies outside the times this reader can place (years "
                         "1-9999 in UTC, after the site's time zone or the value's offset is "
                         "applied)") from None


def _parse_in_range(value: str, tz: tzinfo, end: bool) -> datetime:
    """:func:`_parse_time`; raises OverflowError when UTC would leave years 1-9999."""
    s = value.strip()
    bad = (f"'{value}' is not a FHIR date/dateTime (expected e.g. 2020-03-01 or "
           "2020-03-01T10:00:00+01:00)")
    partial = _PARTIAL_DATE.match(s)
    if partial is not None:
        year, month, day = partial.groups()
        try:
            first = date(int(year), int(month or 1), int(day or 1))
        except ValueError:
            raise ValueError(bad) from None
        unit = "day" if day else "month" if month else "year"
        return date_period(first, unit, tz=tz, end=end)
    try:
        dt = datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(bad) from None
    if not any(sep in s for sep in "T :"):  # another ISO spelling of a date (20200301)
        return date_period(dt.date(), "day", tz=tz, end=end)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=tz)
    return dt.astimezone(UTC).replace(microsecond=0) if end else dt.astimezone(UTC)


@contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while FHIR is read (re-enabled after, if it was on).

    Reading keeps every selected resource dict alive until the site is finished, so the
    collector's full passes grow with the heap and cost more than the parsing itself (twice
    the CPU time of a read of the Synthea bundles); resource dicts hold no reference cycles,
    so reference counting frees them all the same.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class BadField(ValueError):
    """A field of a resource holds a value that cannot be read (e.g. a malformed date).

    Parameters
    ----------
    field_name
        The dotted field path (``"onsetDateTime"``, ``"period.start"`` ...); kept as
        ``self.field`` so the caller can report it.
    message
        What was wrong and what would be accepted.
    """

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name


def first_time(res: dict[str, Any], fields: Iterable[str], *, tz: tzinfo = UTC,
               end: bool = False) -> tuple[datetime | None, str]:
    """The first present time among dotted ``fields`` of a resource dict.

    Parameters
    ----------
    res
        The resource.
    fields
        Dotted field paths in order of preference (``"effectivePeriod.start"``).
    tz, end
        As for :func:`parse_time`: the site's time zone, and whether a partial date is the
        end of its period (known time) rather than its start (clinical time).

    Returns
    -------
    tuple
        ``(time, field)`` of the first field present, or ``(None, "")`` when none is.

    Raises
    ------
    BadField
        When the first present field is not a FHIR date/dateTime; it names that field.
    """
    for f in fields:
        node: Any = res
        for part in f.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            try:
                return parse_time(node, tz=tz, end=end), f
            except ValueError as exc:
                raise BadField(f, str(exc)) from None
    return None, ""


_UTF8_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_UTF16_MESSAGE = ("the file starts with a UTF-16 byte order mark; FHIR JSON is UTF-8 "
                  "(UTF-16: export the file as UTF-8)")


def iter_file_resources(path: Path, label: str, sink: ErrorSink
                        ) -> Iterator[tuple[dict[str, Any], str | None]]:
    """Yield ``(resource, fullUrl)`` from a ``.json`` Bundle/resource or an ``.ndjson`` file.

    An ``.ndjson`` file is read line by line (:func:`_ndjson_lines`): the reader holds one
    line at a time, not the file, so a Bulk Data export of any size reads in the memory of
    its longest line. A ``.json`` file is one JSON value and is read whole. A leading UTF-8
    byte order mark is dropped; a UTF-16 file is reported. Invalid JSON and
    JSON that is not FHIR are reported to ``sink`` (file, line or entry) and skipped; the
    rest of the file is still read.

    Parameters
    ----------
    path
        The file.
    label
        Its name in reports.
    sink
        Receives what cannot be read.

    Yields
    ------
    tuple
        ``(resource dict, the entry's fullUrl or None)``.
    """
    if path.suffix.lower() == ".ndjson":
        for lineno, line in _ndjson_lines(path, label, sink):
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                sink.report(label, f"line {lineno}", "<json>", "invalid_json",
                            f"line {lineno} is not valid JSON ({exc}); NDJSON needs one "
                            "resource object per line")
                continue
            yield from unpack_resources(obj, label, sink, where=f"line {lineno}")
        return
    try:
        raw = path.read_bytes()
    except OSError as exc:
        sink.report(label, "", "<file>", "unreadable_file", f"cannot read file: {exc}")
        return
    if raw.startswith(_UTF16_BOMS):
        sink.report(label, "", "<json>", "invalid_json", _UTF16_MESSAGE)
        return
    try:
        obj = orjson.loads(raw[len(_UTF8_BOM):] if raw.startswith(_UTF8_BOM) else raw)
    except orjson.JSONDecodeError as exc:
        sink.report(label, "", "<json>", "invalid_json",
                    f"not valid JSON ({exc}); expected a FHIR Bundle or resource")
        return
    del raw  # the parsed value is all that is needed
    yield from unpack_resources(obj, label, sink, where="")


def _ndjson_lines(path: Path, label: str, sink: ErrorSink) -> Iterator[tuple[int, bytes]]:
    """The non-blank lines of an NDJSON file, numbered from 1, read one at a time.

    A UTF-8 byte order mark before the first line is dropped; a UTF-16 file is reported
    (``invalid_json``) and not read.

    Lines end at ``\\n``, ``\\r\\n`` or a lone ``\\r`` (as ``bytes.splitlines`` splits them),
    so the numbers, and the bytes each line holds, are those of the whole file split at
    once. A file that cannot be opened, or stops being readable part-way, is reported
    (``unreadable_file``); the lines read before are kept.
    """
    lineno = 0
    try:
        with path.open("rb") as fh:
            for physical in fh:
                if lineno == 0 and physical.startswith(_UTF16_BOMS):
                    sink.report(label, "", "<json>", "invalid_json", _UTF16_MESSAGE)
                    return
                if lineno == 0 and physical.startswith(_UTF8_BOM):
                    physical = physical[len(_UTF8_BOM):]
                # the line without its ending; a lone '\r' inside it also ends a line
                for line in physical.splitlines():
                    lineno += 1
                    if line.strip():
                        yield lineno, line
    except OSError as exc:
        where = f"line {lineno + 1}" if lineno else ""
        sink.report(label, where, "<file>", "unreadable_file", f"cannot read file: {exc}")


#: How deep Bundles are read inside one another: a Bundle is level 1, a Bundle in one of its
#: entries (a ``collection`` of ``transaction`` Bundles) level 2. A Bundle deeper than this
#: is reported (``bundle_too_deep``) and its entries are not read.
MAX_BUNDLE_DEPTH = 5


def unpack_resources(obj: Any, label: str, sink: ErrorSink, where: str
                     ) -> Iterator[tuple[dict[str, Any], str | None]]:
    """Yield ``(resource, fullUrl)`` from one parsed JSON value: a Bundle's entries, or itself.

    A Bundle in an entry is read in turn (a ``collection`` of ``transaction`` Bundles), to
    :data:`MAX_BUNDLE_DEPTH` levels; its entries are named by their path
    (``entry[1].resource.entry[0]``) in reports. An entry's resource without an ``id``
    whose ``fullUrl`` is ``urn:uuid:<uuid>`` (a transaction's new resource) is yielded as
    a copy with that uuid as its id.

    Parameters
    ----------
    obj
        A parsed JSON value: a Bundle (any type) or a single resource.
    label
        Its source (a file name) in reports.
    sink
        Receives what is not FHIR (no ``resourceType``, a bad ``Bundle.entry``) and Bundles
        nested too deep.
    where
        Where ``obj`` sits in its source (``"line 3"`` of an NDJSON file, or ``""``).

    Yields
    ------
    tuple
        ``(resource dict, the entry's fullUrl or None)``.
    """
    if not isinstance(obj, dict) or not isinstance(obj.get("resourceType"), str):
        sink.report(label, where, "resourceType", "not_fhir",
                    "JSON is not a FHIR resource: expected an object with a 'resourceType' "
                    "(a Bundle or a single resource)")
        return
    if obj["resourceType"] != "Bundle":
        yield obj, None
        return
    yield from _bundle_entries(obj, label, sink, str(obj.get("id") or where), "", 1)


_URN_UUID = "urn:uuid:"
# Type/id, or a URL ending in it, either version-specific (.../_history/<version>)
_LITERAL_REF = re.compile(r"(?:^|/)([A-Za-z]+)/([^/]+)(?:/_history/[^/]+)?$")


def literal_ref(ref: str) -> tuple[str, str] | None:
    """``(type, id)`` of a literal reference or RESTful URL, None for another form.

    ``Type/<id>`` or a URL ending in it (``https://host/fhir/Type/<id>``), either with
    ``/_history/<version>``; a percent-encoded id is decoded.
    """
    match = _LITERAL_REF.search(ref)
    if match is None:
        return None
    return match.group(1), unquote(match.group(2))


def _entry_url_id(res: dict[str, Any], full_url: str) -> str | None:
    """The id that an entry's ``fullUrl`` gives its resource, None when it gives none.

    ``urn:uuid:<uuid>`` gives the uuid; a RESTful URL (``https://host/fhir/Patient/123``,
    either with ``/_history/<version>``) gives ``123`` when its type is the resource's own
    (FHIR: the fullUrl of a resource on a server is its base, type and id).
    """
    if full_url.startswith(_URN_UUID):
        return full_url[len(_URN_UUID):] or None
    named = literal_ref(full_url)
    if named is None or named[0] != res.get("resourceType"):
        return None
    return named[1] or None


def _with_entry_id(res: dict[str, Any], full_url: Any) -> dict[str, Any]:
    """``res``, or a copy whose ``id`` is the one its entry's ``fullUrl`` gives it.

    A transaction or batch Bundle creates resources that have no id yet: the entry's
    ``fullUrl: urn:uuid:<uuid>`` names the resource, and the other entries reference it by
    that (``subject: {reference: urn:uuid:<uuid>}``). The uuid is its id here, so the
    resource is joined and referenced as a resource with that id would be. An entry read
    from a server (a searchset, a PUT in a transaction) may omit ``id`` beside a fullUrl
    ``https://host/fhir/Patient/123``: the id is ``123`` (see :func:`_entry_url_id`).
    """
    if res.get("id") or not isinstance(full_url, str):
        return res
    rid = _entry_url_id(res, full_url)
    return {**res, "id": rid} if rid else res


def _bundle_entries(bundle: dict[str, Any], label: str, sink: ErrorSink, name: str,
                    path: str, depth: int) -> Iterator[tuple[dict[str, Any], str | None]]:
    """The entries of a Bundle at ``depth`` (1: the file's own), nested Bundles read in turn.

    ``name`` names the Bundle in a report about its ``entry``; ``path`` prefixes its
    entries' names (``""``, or ``"entry[1].resource."`` for a Bundle in an entry).
    """
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        sink.report(label, name, "entry", "not_fhir", "Bundle.entry must be a list")
        return
    for i, entry in enumerate(entries):
        res = entry.get("resource") if isinstance(entry, dict) else None
        where = f"{path}entry[{i}]"
        if not isinstance(res, dict) or not isinstance(res.get("resourceType"), str):
            sink.report(label, where, "entry.resource.resourceType", "not_fhir",
                        "bundle entry has no resource with a 'resourceType'")
            continue
        full_url = entry.get("fullUrl")
        if res["resourceType"] != "Bundle":
            yield _with_entry_id(res, full_url), full_url
        elif depth >= MAX_BUNDLE_DEPTH:
            sink.report(label, where, "entry.resource", "bundle_too_deep",
                        f"a Bundle nested {depth + 1} levels deep; Bundles inside Bundles are "
                        f"read to {MAX_BUNDLE_DEPTH} levels, so its entries are not read")
        else:
            yield from _bundle_entries(res, label, sink, str(res.get("id") or where),
                                       f"{where}.resource.", depth + 1)
