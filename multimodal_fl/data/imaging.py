"""Linking image files to patients (no transforms: those live in ``encoders``).

Linking rules (an image file linked by an earlier rule is not linked again by a later
one); all images linked to a patient are candidates, and the one used is the latest
acquired on or before the feature cut-off (index + allowance), else the first undated one
by path. An image acquired after the cut-off is never used.

1. ``images.csv`` (``patient_id,path[,modality,view,acquired]``): ``path`` is relative to
   the site directory (e.g. ``images/p001.png``).
2. **ImagingStudy**: ``ImagingStudy.subject`` names the patient (``Patient/<id>`` or
   ``urn:uuid:<id>``); the file is the site-relative path held in an
   ``ImagingStudy.identifier`` whose ``system`` is ``urn:mmfl:image-path``::

       {"resourceType": "ImagingStudy", "id": "img-p001", "status": "available",
        "subject": {"reference": "Patient/p001"},
        "started": "2020-03-01T10:00:00Z",
        "identifier": [{"system": "urn:mmfl:image-path", "value": "images/p001.dcm"}]}

   ``started`` dates the image (an image started after the feature cut-off is not used).
3. **DICOM PatientID**: every ``.dcm`` file under ``images/`` not linked by rules 1-2 is
   read header-only (``pydicom.dcmread(stop_before_pixels=True)``) and linked by its
   ``PatientID`` tag (0010,0020) equal to the FHIR ``Patient.id``, and dated by
   :func:`dicom_known_time`.

Every image is dated by when it was known: a date without a time (``images.csv``
``acquired``, ``ImagingStudy.started``, a DICOM date whose time is missing) is the end of
that day in the site's time zone, so an image dated only by the day of the index is never
used for a same-day index.

Paths that lead outside the site directory (``..``, absolute paths, symlinks escaping)
are refused and reported, never read. A linked image must be readable at header level
(DICOM header, NIfTI header, PNG/JPEG header via Pillow); an unreadable image counts as
absent and is reported.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta, timezone, tzinfo
from pathlib import Path
from typing import Any

from multimodal_fl.data.errors import ErrorSink
from multimodal_fl.data.fhir_json import date_period, parse_time
from multimodal_fl.data.records import SiteRecords
from multimodal_fl.data.sites import SiteFiles, image_suffix, read_csv, resolve_inside

# pydicom, nibabel and Pillow are heavy to import: imported inside the functions that use them

__all__ = ["check_readable", "dicom_known_time", "link_images", "select_image"]

IMAGE_PATH_SYSTEM = "urn:mmfl:image-path"
# (date tag, its time tag); DA is YYYYMMDD, TM is HH[MM[SS[.FFFFFF]]] (older files: HH:MM:SS)
_DICOM_WHEN = (("AcquisitionDate", "AcquisitionTime"), ("StudyDate", "StudyTime"),
               ("ContentDate", "ContentTime"))
_DICOM_TAGS = ["PatientID", "TimezoneOffsetFromUTC",
               *[tag for pair in _DICOM_WHEN for tag in pair]]
_DA = re.compile(r"^(\d{4})(\d{2})(\d{2})$")
_TM = re.compile(r"^(\d{2})(\d{2})?(\d{2})?(?:\.(\d{1,6}))?$")
_OFFSET = re.compile(r"^([+-])(\d{2})(\d{2})$")


def check_readable(path: Path) -> str | None:
    """Header-level readability check of an image file.

    DICOM: ``pydicom.dcmread(stop_before_pixels=True)``; NIfTI: ``nibabel.load`` (header
    only, the array proxy is not read); PNG/JPEG: ``PIL.Image.open`` + ``verify``.

    Returns
    -------
    str or None
        None when readable, else why not.
    """
    suffix = image_suffix(path)
    if not path.is_file():
        return "file does not exist"
    try:
        if suffix == ".dcm":
            import pydicom

            ds = pydicom.dcmread(path, stop_before_pixels=True)
            if "Rows" not in ds and "PixelData" not in ds:
                return "DICOM file has no image (no Rows / PixelData)"
        elif suffix in {".nii", ".nii.gz"}:
            import nibabel as nib

            img = nib.load(str(path))
            if len(img.shape) < 2:  # type: ignore[attr-defined]
                return f"NIfTI image has shape {img.shape}"  # type: ignore[attr-defined]
        elif suffix in {".png", ".jpg", ".jpeg"}:
            from PIL import Image

            with Image.open(path) as im:
                im.verify()
        else:
            return "unsupported image type (accepted: .dcm .nii .nii.gz .png .jpg .jpeg)"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _dicom_day(value: Any) -> date | None:
    match = _DA.match(str(value or "").strip())
    if match is None:
        return None
    try:
        return date(*(int(g) for g in match.groups()))
    except ValueError:
        return None


def _dicom_instant(day: date, value: Any, tz: tzinfo) -> datetime | None:
    """The last second a DICOM TM names on ``day`` (``18`` -> 18:59:59), or None."""
    match = _TM.match(str(value or "").strip().replace(":", ""))
    if match is None:
        return None
    hh, mm, ss, frac = match.groups()
    try:
        start = datetime(day.year, day.month, day.day, int(hh), int(mm or 0), int(ss or 0),
                         int((frac or "0").ljust(6, "0")), tzinfo=tz)
    except ValueError:
        return None
    step = timedelta(hours=1) if mm is None else timedelta(minutes=1) if ss is None else None
    try:
        end = start if step is None else start + step - timedelta(seconds=1)
        return end.astimezone(UTC).replace(microsecond=0)  # known times are whole seconds
    except OverflowError:  # year 0 or 10000 in UTC: the day's end (held at the range) instead
        return None


def dicom_known_time(tags: Any, tz: tzinfo = UTC) -> datetime | None:
    """When a DICOM image was known, from its date and time tags.

    Each of ``AcquisitionDate``/``AcquisitionTime``, ``StudyDate``/``StudyTime`` and
    ``ContentDate``/``ContentTime`` gives an instant: the date at its time (a partial time
    ``HH`` / ``HHMM`` is the last second of that hour / minute; a fraction of a second is
    dropped), or, when the time is missing, the
    time of another tag pair with the same date, else the end of the day. The latest of
    these is the image's time. Times are local to ``TimezoneOffsetFromUTC`` (``+hhmm``)
    when the file has it, else to the site's time zone ``tz``.

    Parameters
    ----------
    tags
        A ``pydicom`` dataset (or any mapping with ``.get``) holding the tags.
    tz
        The site's time zone.

    Returns
    -------
    datetime or None
        Timezone-aware, UTC; None when no date tag holds a valid ``YYYYMMDD``.
    """
    offset = _OFFSET.match(str(tags.get("TimezoneOffsetFromUTC", "") or "").strip())
    if offset is not None:
        sign = -1 if offset.group(1) == "-" else 1
        tz = timezone(sign * timedelta(hours=int(offset.group(2)),
                                       minutes=int(offset.group(3))))
    days: list[date] = []
    timed: dict[date, datetime] = {}
    for date_tag, time_tag in _DICOM_WHEN:
        day = _dicom_day(tags.get(date_tag))
        if day is None:
            continue
        days.append(day)
        instant = _dicom_instant(day, tags.get(time_tag), tz)
        if instant is not None:
            timed[day] = max(instant, timed.get(day, instant))
    if not days:
        return None
    return max(timed[d] if d in timed else date_period(d, "day", tz=tz, end=True)
               for d in days)


def _dicom_link(path: Path, tz: tzinfo) -> tuple[str | None, datetime | None]:
    """The file's PatientID and known time; ``ValueError`` naming why it cannot be read."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_DICOM_TAGS)
    except Exception as exc:  # pydicom raises many kinds on a damaged or foreign file
        raise ValueError(f"not a readable DICOM file ({type(exc).__name__}: {exc})") from None
    pid = str(ds.get("PatientID", "") or "").strip() or None
    return pid, dicom_known_time(ds, tz)


def link_images(records: SiteRecords, site: SiteFiles, sink: ErrorSink,
                known: Iterable[str], *, tz: tzinfo = UTC
                ) -> dict[str, list[tuple[Path, datetime | None, str]]]:
    """Link image files to patients by the rules in the module docstring.

    Parameters
    ----------
    records
        The site's FHIR records (ImagingStudy references in ``records.images``).
    site
        The site's files.
    sink
        Receives refused paths, unknown patients and bad dates.
    known
        Patient ids read from FHIR.
    tz
        The site's time zone (dates without a time, DICOM times without an offset).

    Returns
    -------
    dict
        Patient id -> list of ``(absolute path, time known or None, rule)``.
    """
    known_ids = set(known)
    out: dict[str, list[tuple[Path, datetime | None, str]]] = {}
    linked: set[Path] = set()

    def add(pid: str, path: Path, when: datetime | None, rule: str) -> None:
        out.setdefault(pid, []).append((path, when, rule))
        linked.add(path)

    if site.images_csv is not None:
        for row in read_csv(site.images_csv, "images.csv", sink):
            rid = f"row {row['_row']}"
            pid = row.get("patient_id", "")
            if pid not in known_ids:
                sink.report("images.csv", rid, "patient_id", "missing_patient",
                            f"patient '{pid}' has no Patient resource at this site")
                continue
            path = resolve_inside(site.root, row.get("path", ""), file="images.csv", row=rid,
                                  field="path", sink=sink)
            if path is None:
                continue
            when = None
            if row.get("acquired"):
                try:
                    when = parse_time(row["acquired"], tz=tz, end=True)
                except ValueError as exc:
                    sink.report("images.csv", rid, "acquired", "bad_date", str(exc))
                    continue
            add(pid, path, when, "images.csv")
    for pid, refs in records.images.items():
        for ref in refs:
            path = resolve_inside(site.root, ref.path, file=ref.source, row=ref.resource_id,
                                  field="identifier.value", sink=sink)
            if path is not None and path not in linked:
                add(pid, path, ref.time, "ImagingStudy")
    voided = {(site.root / v).resolve() for v in records.voided_images}
    for path in site.image_files:
        if image_suffix(path) != ".dcm" or path.resolve() in linked:
            continue
        if path.resolve() in voided:
            sink.report(site.rel(path), "", "<file>", "not_done_or_in_error",
                        "an ImagingStudy that did not happen or was entered in error names this "
                        "file: it is not linked by its DICOM PatientID either")
            continue
        if not path.resolve().is_relative_to(site.root):
            sink.report(site.rel(path), "", "<file>", "path_outside_site",
                        f"{path} is a symlink leading outside the site directory; refused")
            continue
        try:
            dicom_pid, when = _dicom_link(path, tz)
        except ValueError as exc:
            sink.report(site.rel(path), "", "<file>", "unreadable_image", str(exc))
            continue
        if dicom_pid is None:
            sink.report(site.rel(path), "", "PatientID", "missing_patient",
                        "a DICOM file with no PatientID, and no images.csv row or ImagingStudy "
                        "names it: it belongs to no patient")
            continue
        if dicom_pid not in known_ids:
            sink.report(site.rel(path), dicom_pid, "PatientID", "missing_patient",
                        f"DICOM PatientID '{dicom_pid}' has no Patient resource at this site")
            continue
        add(dicom_pid, path.resolve(), when, "DICOM PatientID")
    return out


def select_image(candidates: list[tuple[Path, datetime | None, str]], cutoff: datetime
                 ) -> tuple[list[tuple[Path, datetime | None, str]], int]:
    """Order a patient's images for use: dated on/before ``cutoff`` (latest first), then undated.

    Returns
    -------
    tuple
        The usable candidates in preference order, and how many were dropped because they
        were acquired after the cut-off.
    """
    dated = sorted((c for c in candidates if c[1] is not None and c[1] <= cutoff),
                   key=lambda c: c[1], reverse=True)  # type: ignore[arg-type, return-value]
    undated = sorted((c for c in candidates if c[1] is None), key=lambda c: str(c[0]))
    late = sum(1 for c in candidates if c[1] is not None and c[1] > cutoff)
    return [*dated, *undated], late
