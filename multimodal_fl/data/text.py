"""Clinical notes: DocumentReference, DiagnosticReport and ``notes.csv``.

Sources
-------
- ``DocumentReference.content[].attachment``: inline base64 ``data``, or ``url``: a path
  relative to the site directory (``notes/p001.txt``; a ``file:`` URL is accepted,
  anything leading outside the site is refused and reported). Only text attachments are
  read (``contentType`` ``text/*`` or absent), in the charset the ``contentType`` declares
  (``text/plain; charset=iso-8859-1``), else UTF-8; a charset without a text codec is
  reported (``unknown_charset``, field ``content[i].attachment.contentType``) and that
  attachment is not read.
- ``DiagnosticReport.presentedForm[]`` (base64 text, its charset as above) and
  ``DiagnosticReport.conclusion``.
- ``notes.csv``: ``patient_id,text[,date,kind]``.

Dating (notes after the index are future information and are never used)
-----------------------------------------------------------------------
- DocumentReference: ``date``, else ``context.period.end``, else ``context.period.start``.
- DiagnosticReport: ``issued``, else ``effectiveDateTime``, else ``effectivePeriod.end``
  (``issued`` first: a report is known when it is released).
- notes.csv: the ``date`` column.

A note's time is when it was known: a date without a time is the end of that day (of that
month or year for ``YYYY-MM`` / ``YYYY``) in the site's time zone, so a note dated only by
the day of the index never counts for a same-day index. A note counts only when dated on or
before the feature cut-off (index + allowance).
Undated notes: a FHIR note without any of the dates above is skipped and reported
(``undated_note``); in ``notes.csv`` *without* a ``date`` column the site vouches that its
notes precede the index, and they are used; a row with an empty date in a ``notes.csv``
that has a ``date`` column is skipped and reported.
"""

from __future__ import annotations

import base64
import binascii
import email.message
from collections.abc import Iterable
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Any

from multimodal_fl.data.errors import ErrorSink
from multimodal_fl.data.fhir_json import BadField, first_time, parse_time
from multimodal_fl.data.records import Note, SiteRecords
from multimodal_fl.data.sites import SiteFiles, read_csv, resolve_inside

__all__ = ["load_url_notes", "notes_from_csv", "notes_from_resource"]


def _decode(data: str, charset: str | None, label: str, rid: str, fld: str,
            sink: ErrorSink) -> str | None:
    """Base64 ``data`` decoded as text in ``charset`` (None: UTF-8); None, reported, if not."""
    try:
        return base64.b64decode(data, validate=True).decode(charset or "utf-8")
    except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
        sink.report(label, rid, fld, "bad_attachment",
                    f"attachment data is not base64-encoded {charset or 'UTF-8'} text ({exc})")
        return None


def _is_text(att: dict[str, Any]) -> bool:
    ct = att.get("contentType")
    return ct is None or str(ct).lower().startswith("text/")


class _UnknownCharset(LookupError):
    """An attachment's declared charset names no text codec (the report is made)."""


def _charset(att: dict[str, Any], label: str, rid: str, fld: str, sink: ErrorSink) -> str | None:
    """The charset an attachment's ``contentType`` declares (``text/plain; charset=latin-1``).

    Read as a MIME Content-Type header (quotes, case, RFC 2231 as :mod:`email` reads them).
    None when none is declared: the text is UTF-8.

    Raises
    ------
    _UnknownCharset
        After reporting ``unknown_charset`` (field ``<fld>.contentType``), when Python has
        no text codec of that name.
    """
    ct = att.get("contentType")
    if not isinstance(ct, str) or "charset" not in ct.lower():
        return None
    header = email.message.Message()
    header["content-type"] = ct
    charset = header.get_content_charset()
    if charset is None:
        return None
    try:  # an unknown name, or a codec that is not a text encoding (hex, rot13), raises
        b"\0".decode(charset, "ignore")
    except (LookupError, ValueError):
        sink.report(label, rid, f"{fld}.contentType", "unknown_charset",
                    f"contentType '{ct}' declares charset '{charset}', which names no text "
                    "encoding known here (e.g. utf-8, iso-8859-1, windows-1252), so the note "
                    "is not read")
        raise _UnknownCharset(charset) from None
    return charset


def notes_from_resource(res: dict[str, Any], label: str, sink: ErrorSink, *,
                        tz: tzinfo = UTC) -> list[Note]:
    """Notes held by one DocumentReference or DiagnosticReport dict.

    Parameters
    ----------
    res
        The resource (already validated).
    label
        Its file, for reports.
    sink
        Receives undecodable attachments, unknown charsets and undated notes.
    tz
        The site's time zone (a date without a time is the end of that local day).

    Returns
    -------
    list of Note
        Inline texts, and url notes (``Note.url`` set, text filled later by
        :func:`load_url_notes`).
    """
    rt = res["resourceType"]
    rid = str(res.get("id") or "")
    fields = (("date", "context.period.end", "context.period.start") if rt == "DocumentReference"
              else ("issued", "effectiveDateTime", "effectivePeriod.end"))
    try:
        t, _ = first_time(res, fields, tz=tz, end=True)
    except BadField as exc:
        sink.report(label, rid, exc.field, "bad_date", str(exc))
        return []
    out: list[Note] = []
    kind = rt
    if rt == "DocumentReference":
        for i, content in enumerate(res.get("content") or []):
            att = content.get("attachment") if isinstance(content, dict) else None
            if not isinstance(att, dict):
                continue
            fld = f"content[{i}].attachment"
            if not _is_text(att):
                sink.report(label, rid, f"{fld}.contentType", "unsupported_content_type",
                            f"contentType '{att.get('contentType')}' is not text/*")
                continue
            if not isinstance(att.get("data"), str) and not isinstance(att.get("url"), str):
                continue
            try:
                charset = _charset(att, label, rid, fld, sink)
            except _UnknownCharset:
                continue
            if isinstance(att.get("data"), str):
                text = _decode(att["data"], charset, label, rid, f"{fld}.data", sink)
                if text is not None:
                    out.append(Note(text, t, label, rid, kind=kind))
            elif isinstance(att.get("url"), str):
                out.append(Note("", t, label, rid, url=att["url"], kind=kind,
                                charset=charset or "utf-8"))
    else:
        for i, att in enumerate(res.get("presentedForm") or []):
            if isinstance(att, dict) and isinstance(att.get("data"), str) and _is_text(att):
                try:
                    charset = _charset(att, label, rid, f"presentedForm[{i}]", sink)
                except _UnknownCharset:
                    continue
                text = _decode(att["data"], charset, label, rid, f"presentedForm[{i}].data",
                               sink)
                if text is not None:
                    out.append(Note(text, t, label, rid, kind=kind))
        if isinstance(res.get("conclusion"), str) and res["conclusion"].strip():
            out.append(Note(res["conclusion"], t, label, rid, kind=kind))
    if out and t is None:
        sink.report(label, rid, fields[0], "undated_note",
                    f"{rt} has no {' / '.join(fields)}; an undated note may postdate the "
                    "index, so it is not used")
        return []
    return out


def load_url_notes(records: SiteRecords, site: SiteFiles, sink: ErrorSink) -> None:
    """Fill in the text of url notes (site-relative files), dropping refused/unreadable ones."""
    for pid, notes in records.notes.items():
        kept: list[Note] = []
        for note in notes:
            if note.url is None:
                kept.append(note)
                continue
            path = resolve_inside(site.root, note.url, file=note.source, row=note.resource_id,
                                  field="content.attachment.url", sink=sink)
            if path is None:
                continue
            try:
                text = path.read_text(encoding=note.charset)
            except (OSError, UnicodeDecodeError) as exc:
                sink.report(note.source, note.resource_id, "content.attachment.url",
                            "unreadable_file", f"cannot read note '{note.url}': {exc}")
                continue
            kept.append(Note(text, note.time, note.source, note.resource_id, kind=note.kind))
        records.notes[pid] = kept


def notes_from_csv(path: Path, sink: ErrorSink, known: Iterable[str], *,
                   tz: tzinfo = UTC) -> dict[str, list[Note]]:
    """Notes from ``notes.csv`` (``patient_id,text[,date,kind]``) by patient id.

    Rows naming a patient not in ``known`` are reported (``missing_patient``); rows with an
    unparseable date are reported (``bad_date``); see the module docstring for undated rows.
    ``tz`` is the site's time zone (a date without a time is the end of that local day).
    """
    rows = read_csv(path, "notes.csv", sink)
    known_ids = set(known)
    out: dict[str, list[Note]] = {}
    if not rows:
        return out
    has_date = "date" in rows[0]
    for row in rows:
        rid = f"row {row['_row']}"
        pid = row.get("patient_id", "")
        if pid not in known_ids:
            sink.report("notes.csv", rid, "patient_id", "missing_patient",
                        f"patient '{pid}' has no Patient resource at this site")
            continue
        t: datetime | None = None
        if has_date:
            if not row.get("date"):
                sink.report("notes.csv", rid, "date", "undated_note",
                            "empty date in a notes.csv with a date column; an undated note "
                            "may postdate the index, so it is not used")
                continue
            try:
                t = parse_time(row["date"], tz=tz, end=True)
            except ValueError as exc:
                sink.report("notes.csv", rid, "date", "bad_date", str(exc))
                continue
        if row.get("text"):
            out.setdefault(pid, []).append(
                Note(row["text"], t, "notes.csv", rid, kind=row.get("kind", "") or "notes.csv"))
    return out
