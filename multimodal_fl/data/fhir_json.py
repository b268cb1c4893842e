"""FHIR JSON without models: files -> resource dicts, and the dated fields inside them.

The lowest FHIR layer of :mod:`multimodal_fl.data`: :mod:`~multimodal_fl.data.fhir` (the
reader), :mod:`~multimodal_fl.data.text`, :mod:`~multimodal_fl.data.imaging` and
:mod:`~multimodal_fl.data.cohort` build on it, and it imports none of them.

- :func:`iter_file_resources` / :func:`unpack_resources`: a ``.json`` Bundle or resource,
  or an ``.ndjson`` Bulk Data file, -> ``(resource, fullUrl)`` pairs; what is not FHIR is
  reported and skipped.
- :func:`parse_time` / :func:`first_time`: FHIR date / dateTime / instant values ->
  timezone-aware UTC datetimes (a date without a time is its midnight UTC; a time without
  an offset is taken as UTC); a bad value raises :class:`BadField`, which names the field.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from multimodal_fl.data.errors import ErrorSink

__all__ = ["BadField", "first_time", "iter_file_resources", "parse_time", "unpack_resources"]


def parse_time(value: Any) -> datetime:
    """Parse a FHIR date / dateTime / instant into an aware UTC datetime.

    Parameters
    ----------
    value
        ``YYYY``, ``YYYY-MM``, ``YYYY-MM-DD`` or a full dateTime (``Z`` or an offset).

    Returns
    -------
    datetime
        Timezone-aware, UTC.

    Raises
    ------
    ValueError
        When the value is not a FHIR date/dateTime.
    """
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a FHIR date/dateTime string, got {value!r}")
    s = value.strip()
    if len(s) == 4 and s.isdigit():
        s = f"{s}-01-01"
    elif len(s) == 7 and s[4] == "-":
        s = f"{s}-01"
    try:
        dt = datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"'{value}' is not a FHIR date/dateTime (expected e.g. 2020-03-01 or "
            "2020-03-01T10:00:00+01:00)"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC)


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


def first_time(res: dict[str, Any], fields: Iterable[str]) -> tuple[datetime | None, str]:
    """The first present time among dotted ``fields`` of a resource dict.

    Parameters
    ----------
    res
        The resource.
    fields
        Dotted field paths in order of preference (``"effectivePeriod.start"``).

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
                return parse_time(node), f
            except ValueError as exc:
                raise BadField(f, str(exc)) from None
    return None, ""


def iter_file_resources(path: Path, label: str, sink: ErrorSink
                        ) -> Iterator[tuple[dict[str, Any], str | None]]:
    """Yield ``(resource, fullUrl)`` from a ``.json`` Bundle/resource or an ``.ndjson`` file.

    Invalid JSON and JSON that is not FHIR are reported to ``sink`` (file, line or entry)
    and skipped; the rest of the file is still read.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        sink.report(label, "", "<file>", "unreadable_file", f"cannot read file: {exc}")
        return
    if path.suffix.lower() == ".ndjson":
        for lineno, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
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
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        sink.report(label, "", "<json>", "invalid_json",
                    f"not valid JSON ({exc}); expected a FHIR Bundle or resource")
        return
    yield from unpack_resources(obj, label, sink, where="")


def unpack_resources(obj: Any, label: str, sink: ErrorSink, where: str
                     ) -> Iterator[tuple[dict[str, Any], str | None]]:
    """Yield ``(resource, fullUrl)`` from one parsed JSON value: a Bundle's entries, or itself.

    Parameters
    ----------
    obj
        A parsed JSON value: a Bundle (any type) or a single resource.
    label
        Its source (a file name) in reports.
    sink
        Receives what is not FHIR (no ``resourceType``, a bad ``Bundle.entry``).
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
    entries = obj.get("entry") or []
    if not isinstance(entries, list):
        sink.report(label, str(obj.get("id") or where), "entry", "not_fhir",
                    "Bundle.entry must be a list")
        return
    for i, entry in enumerate(entries):
        res = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(res, dict) or not isinstance(res.get("resourceType"), str):
            sink.report(label, f"entry[{i}]", "entry.resource.resourceType", "not_fhir",
                        "bundle entry has no resource with a 'resourceType'")
            continue
        yield res, entry.get("fullUrl")
