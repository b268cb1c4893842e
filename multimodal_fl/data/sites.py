"""The site data contract: discovering and validating a site directory.

A site is a directory::

    <site>/
      fhir/          *.json (a Bundle of any type, or a single resource) and/or *.ndjson
      images/        .dcm .nii .nii.gz .png .jpg .jpeg, any sub-folders
      images.csv     optional: patient_id,path[,modality,view,acquired]
      notes.csv      optional: patient_id,text[,date,kind]
      labels.csv     optional: patient_id,label[,other outcome columns]

Paths inside CSV files and attachment URLs are relative to the site directory; one that
leads outside it (``..``, an absolute path, a symlink escaping) is refused and reported,
never read. See ``docs/data-contract.md``.
"""

from __future__ import annotations

import csv
import zoneinfo
from dataclasses import dataclass, field
from pathlib import Path

from multimodal_fl.config import DataConfig, check_timezone, load_policy
from multimodal_fl.data.errors import DataError, ErrorSink

__all__ = [
    "IMAGE_SUFFIXES",
    "SiteFiles",
    "discover_site",
    "image_suffix",
    "read_csv",
    "resolve_inside",
    "site_timezone",
]

IMAGE_SUFFIXES = (".dcm", ".nii", ".nii.gz", ".png", ".jpg", ".jpeg")
CSV_COLUMNS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # name: (required, optional)
    "images.csv": (("patient_id", "path"), ("modality", "view", "acquired")),
    "notes.csv": (("patient_id", "text"), ("date", "kind")),
    # the label column is the task's (label.labels_csv_column, default 'label'): read_csv's
    # ``require`` adds it
    "labels.csv": (("patient_id",), ("label",)),
}


def site_timezone(data: DataConfig, site: SiteFiles | None = None) -> zoneinfo.ZoneInfo:
    """The time zone a site's dates without a time (and times without an offset) are read in.

    The one place it is looked up: the ``timezone`` of the site's own ``policy.yaml`` when it
    names one (the hospital knows where its records were written), else the experiment's
    ``data.timezone``.

    Parameters
    ----------
    data
        The experiment's data settings.
    site
        The site's files; ``None``: no site directory (resources in memory).

    Returns
    -------
    zoneinfo.ZoneInfo
        The zone.

    Raises
    ------
    ConfigError
        When the site's ``policy.yaml`` is not a valid policy (one line naming it).
    """
    own = load_policy(site.root).timezone if site is not None else None
    return check_timezone(own or data.timezone)


def image_suffix(path: Path) -> str | None:
    """The image suffix of ``path`` (``.nii.gz`` counts as one), or None."""
    name = path.name.lower()
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return None


#: The suffixes of the FHIR files a site's ``fhir/`` folder is read for.
FHIR_SUFFIXES = frozenset({".json", ".ndjson"})


@dataclass
class SiteFiles:
    """The files of one site directory, as the contract names them."""

    root: Path
    fhir_files: list[Path] = field(default_factory=list)
    #: files under ``fhir/`` that are not read (not ``.json`` / ``.ndjson``: a compressed
    #: export, say): reported, so that they are not taken for read
    other_fhir_files: list[Path] = field(default_factory=list)
    image_files: list[Path] = field(default_factory=list)
    images_csv: Path | None = None
    notes_csv: Path | None = None
    labels_csv: Path | None = None

    def rel(self, path: Path) -> str:
        """``path`` relative to the site root (for messages)."""
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)


#: Names only a site directory holds at its top (a folder holding folders with them holds sites).
_SITE_ENTRIES = ("fhir", "images", "images.csv", "notes.csv", "labels.csv")


def _what_it_holds(root: Path) -> str:
    """What a folder without site data holds, and what a site holds, for the message."""
    expected = ("no fhir/*.json or fhir/*.ndjson, no images/, no images.csv, notes.csv or "
                "labels.csv")
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    if all(p.name in _SITE_ENTRIES or p.name == "policy.yaml" for p in entries):
        return f"site directory is empty: {expected}"  # its folders hold nothing to read
    site = ("a site directory holds fhir/ (*.json, *.ndjson) and optional images/, "
            "images.csv, notes.csv, labels.csv")
    if (root / "run.json").is_file() or ((root / "config.yaml").is_file() and (
            (root / "metrics.json").is_file() or (root / "sites").is_dir())):
        return (f"holds a run directory (run.json, config.yaml), not a site's data: {expected}; "
                f"{site}")
    sites = [p.name for p in entries
             if p.is_dir() and any((p / name).exists() for name in _SITE_ENTRIES)]
    if sites:
        more = f", +{len(sites) - 3} more" if len(sites) > 3 else ""
        return (f"holds {len(sites)} site folder(s) ({', '.join(sites[:3])}{more}), not one "
                f"site's data: {expected}; give one of them")
    names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in entries[:5])
    more = f", +{len(entries) - 5} more" if len(entries) > 5 else ""
    return f"not a site directory: it holds {names}{more}; {expected}; {site}"


def discover_site(path: Path | str) -> SiteFiles:
    """List a site directory's files per the contract.

    Parameters
    ----------
    path
        The site directory.

    Returns
    -------
    SiteFiles
        FHIR files (sorted), image files (sorted) and the optional CSV files.

    Raises
    ------
    DataError
        When the directory is missing, not a directory, or holds none of ``fhir/``,
        ``images/``, ``images.csv``, ``notes.csv``, ``labels.csv`` with content.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"{root}: site directory does not exist (expected a directory with "
                        "fhir/, images/ and optional images.csv, notes.csv, labels.csv)")
    if not root.is_dir():
        raise DataError(f"{root}: site path is not a directory")
    root = root.resolve()
    site = SiteFiles(root=root)
    fhir_dir = root / "fhir"
    if fhir_dir.is_dir():
        found = [p for p in fhir_dir.rglob("*")
                 if p.is_file() and not any(part.startswith(".") for part in
                                            p.relative_to(fhir_dir).parts)]
        site.fhir_files = sorted(p for p in found if p.suffix.lower() in FHIR_SUFFIXES)
        site.other_fhir_files = sorted(p for p in found if p.suffix.lower() not in FHIR_SUFFIXES)
    img_dir = root / "images"
    if img_dir.is_dir():
        site.image_files = sorted(
            p for p in img_dir.rglob("*") if p.is_file() and image_suffix(p) is not None
        )
    for name in CSV_COLUMNS:
        p = root / name
        if p.is_file():
            setattr(site, name.replace(".", "_"), p)
    if not (site.fhir_files or site.image_files or site.images_csv or site.notes_csv
            or site.labels_csv):
        others = ""
        if site.other_fhir_files:
            names = ", ".join(site.rel(p) for p in site.other_fhir_files[:3])
            others = (f" (fhir/ holds {len(site.other_fhir_files)} other file(s), e.g. {names}: "
                      "only .json and .ndjson files are read; decompress or convert them)")
        raise DataError(f"{root}: {_what_it_holds(root)}{others}")
    return site


def resolve_inside(root: Path, ref: str, *, file: str, row: str, field: str,
                   sink: ErrorSink) -> Path | None:
    """Resolve a site-relative path, refusing anything that leads outside the site.

    Parameters
    ----------
    root
        The (resolved) site directory.
    ref
        The path as written (``images/p1.png``; ``file:`` URLs are accepted).
    file, row, field
        Where the path came from, for the report.
    sink
        Receives the refusal.

    Returns
    -------
    Path or None
        The resolved path inside the site, or None when refused (reported).
    """
    raw = ref.strip()
    if raw.startswith("file://"):
        raw = raw[len("file://"):]
    elif raw.startswith("file:"):
        raw = raw[len("file:"):]
    if "://" in raw:
        sink.report(file, row, field, "path_outside_site",
                    f"'{ref}' is a remote URL; only paths relative to the site are read")
        return None
    candidate = Path(raw)
    if candidate.is_absolute() or ".." in candidate.parts:
        sink.report(file, row, field, "path_outside_site",
                    f"'{ref}' leads outside the site directory (absolute or '..'); "
                    "give a path relative to the site")
        return None
    resolved = (root / candidate).resolve()
    if not resolved.is_relative_to(root):
        sink.report(file, row, field, "path_outside_site",
                    f"'{ref}' resolves (through a symlink) to {resolved}, outside the site "
                    "directory; refused")
        return None
    return resolved


def read_csv(path: Path, name: str, sink: ErrorSink, *,
             require: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """Read one of the contract's CSV files, checking its header.

    Parameters
    ----------
    path
        The CSV file.
    name
        ``images.csv``, ``notes.csv`` or ``labels.csv`` (selects the expected columns).
    sink
        Receives a bad header or an unreadable file.
    require
        Columns required beyond the file's own (``labels.csv``: the task's label column).

    Returns
    -------
    list of dict
        One mapping per row (``_row``: the 1-based data row number, as a string).
    """
    required, optional = CSV_COLUMNS[name]
    required = (*required, *(c for c in require if c not in required))
    optional = tuple(c for c in optional if c not in required)
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in reader.fieldnames or []]
            missing = [c for c in required if c not in header]
            if missing:
                sink.report(name, "", ",".join(missing), "bad_csv_header",
                            f"missing column(s) {missing}; expected {', '.join(required)}"
                            f"[, {', '.join(optional)}]" if optional else
                            f"missing column(s) {missing}; expected {', '.join(required)}")
                return []
            rows = []
            for i, row in enumerate(reader, start=1):
                clean = {(k or "").strip(): (v or "").strip() if isinstance(v, str) else ""
                         for k, v in row.items()}
                clean["_row"] = str(i)
                rows.append(clean)
            return rows
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        sink.report(name, "", "<file>", "unreadable_file", f"cannot read {name}: {exc}")
        return []
