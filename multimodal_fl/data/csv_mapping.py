"""The mapping of a flat CSV onto the site contract: a YAML schema validated with pydantic.

A mapping says, for one CSV layout, which column holds the patient key, what each row's
index (presentation) time is, how the patient's sex and age are coded, which columns become
Conditions (SNOMED CT) and Observations (LOINC, or a local code system), which column is
the label (and which are further outcomes: more ``labels.csv`` columns), and which image
files belong to a row. Per column it also says when the value
became known (``known: at_index`` or a date column) and which raw codes mean *unknown* (an
absent value) or *not applicable* (``not_applicable_means``: what it means for that column).
See ``docs/import-csv.md``; the shipped mappings are in ``configs/mappings/``.

:func:`load_mapping` reads a YAML file; unknown keys fail with a did-you-mean hint, like the
experiment configuration.
"""

from __future__ import annotations

import difflib
import re
import string
from datetime import date as calendar_date
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

__all__ = [
    "AT_INDEX",
    "ENCOUNTER_CLASSES",
    "CodeMap",
    "ConditionColumn",
    "CsvMapping",
    "EncounterSpec",
    "ImageFile",
    "ImagesSpec",
    "IndexSpec",
    "LabelSpec",
    "MappingError",
    "ObservationColumn",
    "OutcomeSpec",
    "PatientSpec",
    "RowFilter",
    "SexSpec",
    "SourceSpec",
    "load_mapping",
]

AT_INDEX = "at_index"
SYSTEM_ALIASES = {
    "snomed": "http://snomed.info/sct",
    "loinc": "http://loinc.org",
}
# HL7 v3 ActCode encounter classes (R4 Encounter.class is a Coding from this value set)
EncounterClassCode = Literal["AMB", "EMER", "FLD", "HH", "IMP", "ACUTE", "NONAC", "OBSENC",
                             "PRENC", "SS", "VR"]
ENCOUNTER_CLASSES: tuple[str, ...] = get_args(EncounterClassCode)
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")


def _name_ok(v: str) -> str:
    """A short name: a letter first, then letters, digits, ``_`` and ``-``; at most 32."""
    if not _NAME.match(v):
        raise ValueError("must start with a letter and hold only letters, digits, _ and - "
                         "(at most 32 characters)")
    return v


#: A name used in resource ids and code systems (checked by :func:`_name_ok`).
ShortName = Annotated[str, AfterValidator(_name_ok)]


def _as_text(value: Any) -> Any:
    """YAML reads ``97`` as an int; codes are compared as the CSV's text, so keep ints as text."""
    if isinstance(value, bool):
        return value  # rejected by the str check: 'yes'/'no' unquoted are YAML booleans
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return [_as_text(v) for v in value]
    if isinstance(value, dict):
        return {_as_text(k): v for k, v in value.items()}
    return value


Codes = Annotated[list[str], BeforeValidator(_as_text)]


def _code_ok(v: str) -> str:
    """FHIR's ``code`` type: no leading, trailing or doubled whitespace, at least a character
    (the FHIR model refuses anything else when the site is written, after the whole CSV)."""
    if not re.fullmatch(r"[^\s]+(\s[^\s]+)*", v):
        raise ValueError(f"'{v}' is not a FHIR code: no leading, trailing or repeated spaces, "
                         "not empty")
    return v


#: A code or unit as FHIR writes it (checked by :func:`_code_ok`).
FhirCode = Annotated[str, BeforeValidator(_as_text), AfterValidator(_code_ok)]


def _system_ok(v: str) -> str:
    """``snomed``, ``loinc``, ``local`` or an absolute URI (a scheme, then ``:``)."""
    if v in (*SYSTEM_ALIASES, "local") or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:\S+$", v):
        return v
    close = difflib.get_close_matches(v, [*SYSTEM_ALIASES, "local"], n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise ValueError(f"'{v}' is not a code system: {hint}expected snomed, loinc, local or an "
                     "absolute URI (e.g. http://snomed.info/sct)")


#: A code system: an alias or an absolute URI (checked by :func:`_system_ok`).
CodeSystem = Annotated[str, AfterValidator(_system_ok)]


class MappingError(ValueError):
    """A mapping file is invalid; the message names the file, the key and what is accepted."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class SourceSpec(_Strict):
    """How the CSV file is read."""

    encoding: str = Field(default="utf-8-sig",
                          description="Text encoding ('utf-8-sig' also reads plain UTF-8).")
    delimiter: str = Field(default=",", min_length=1, max_length=1,
                           description="Field separator.")
    date_format: str | None = Field(
        default=None,
        description="strptime format of every date column (e.g. '%d/%m/%Y'); None: ISO 8601 "
        "dates or dateTimes. A date is 00:00 UTC; a dateTime without an offset is UTC.")

    @field_validator("date_format")
    @classmethod
    def _format_parses(cls, fmt: str | None) -> str | None:
        """A format strptime cannot read back is refused here, not blamed on every row."""
        if fmt is None:
            return fmt
        from datetime import datetime

        try:
            datetime.strptime(datetime(2001, 2, 3, 4, 5, 6).strftime(fmt), fmt)
        except ValueError as exc:
            raise ValueError(f"'{fmt}' is not a strptime format that reads back its own "
                             f"dates ({exc})") from None
        return fmt


class CodeMap(_Strict):
    """Raw codes of a yes/no column (per column, or the mapping's default ``codes``)."""

    present: Codes = Field(default_factory=list, description="Codes meaning yes / present.")
    absent: Codes = Field(default_factory=list, description="Codes meaning no / absent.")
    unknown: Codes = Field(default_factory=list,
                           description="Codes meaning unknown: the value is absent.")
    not_applicable: Codes = Field(
        default_factory=list,
        description="Codes meaning 'not applicable'; what they mean is the column's "
        "not_applicable_means.")


class RowFilter(_Strict):
    """Keep only rows whose ``column`` is one of ``values`` (or matches ``matches``)."""

    column: str = Field(description="The column tested.")
    values: Codes | None = Field(default=None, description="Raw values kept.")
    matches: str | None = Field(default=None,
                                description="A regular expression the whole value must match.")

    @model_validator(mode="after")
    def _one_test(self) -> RowFilter:
        if (self.values is None) == (self.matches is None):
            raise ValueError("give exactly one of 'values' or 'matches'")
        if self.matches is not None:
            try:
                re.compile(self.matches)
            except re.error as exc:
                raise ValueError(f"'matches' is not a regular expression: {exc}") from None
        return self


class IndexSpec(_Strict):
    """Each row's index (presentation) time: a date/dateTime column, or one fixed date."""

    column: str | None = Field(default=None, description="Date or dateTime column.")
    date: calendar_date | None = Field(default=None,
                              description="One index date (00:00 UTC) for every row; ages "
                              "are then ages at that date.")

    @model_validator(mode="after")
    def _one_source(self) -> IndexSpec:
        if (self.column is None) == (self.date is None):
            raise ValueError("give exactly one of 'column' or 'date'")
        return self


class SexSpec(_Strict):
    """The sex column and its codes (any other non-missing value is a bad value)."""

    column: str = Field(description="The column.")
    female: Codes = Field(description="Codes meaning female.")
    male: Codes = Field(description="Codes meaning male.")
    other: Codes = Field(default_factory=list, description="Codes meaning other.")
    unknown: Codes = Field(default_factory=list,
                           description="Codes meaning unknown (no gender written).")


class DateColumn(_Strict):
    """A date column with its own codes for 'no date' (e.g. 9999-99-99)."""

    column: str = Field(description="The column.")
    unknown: Codes = Field(default_factory=list, description="Values meaning no date (absent).")


class PatientSpec(_Strict):
    """Patient demographics: sex, and the age at the index or a birth date."""

    sex: SexSpec | None = Field(default=None, description="Patient.gender.")
    age: str | None = Field(
        default=None,
        description="Column with the age in years at the index. Whole years (digits only) "
        "are completed years: birthDate is set half a year earlier (the middle of that year "
        "of age); a decimal age is taken as exact.")
    birth_date: str | None = Field(default=None, description="Column with the birth date.")
    deceased: DateColumn | None = Field(default=None,
                                        description="Date-of-death column (deceasedDateTime).")

    @model_validator(mode="after")
    def _one_age(self) -> PatientSpec:
        if self.age is not None and self.birth_date is not None:
            raise ValueError("give 'age' or 'birth_date', not both")
        return self


class EncounterClass(_Strict):
    """The class of each row's Encounter: fixed, or coded in a column."""

    fixed: EncounterClassCode | None = Field(
        default=None, description="One class for every row (v3 ActCode, e.g. AMB).")
    column: str | None = Field(default=None, description="Column holding the class code.")
    codes: Annotated[dict[str, EncounterClassCode], BeforeValidator(_as_text)] = Field(
        default_factory=dict, description="Raw value -> v3 ActCode class (AMB, IMP, EMER ...).")
    unknown: Codes = Field(default_factory=list,
                           description="Raw values meaning unknown (class UNK).")

    @model_validator(mode="after")
    def _one_source(self) -> EncounterClass:
        if (self.fixed is None) == (self.column is None):
            raise ValueError("give exactly one of 'fixed' or 'column'")
        if self.column is not None and not self.codes:
            raise ValueError("'column' needs 'codes' (raw value -> AMB, IMP, EMER ...)")
        return self


class EncounterSpec(_Strict):
    """One Encounter per row (the admission or visit), starting at the row's index."""

    class_: EncounterClass = Field(default_factory=lambda: EncounterClass(fixed="AMB"),
                                   alias="class", description="Encounter.class.")


class _Column(_Strict):
    """What a Condition and an Observation column share."""

    name: ShortName = Field(description="Short name (letters, digits, _ and -), used in resource "
                                        "ids.")
    column: str = Field(description="The CSV column.")
    code: FhirCode = Field(description="The code written (SNOMED CT, LOINC, local).")
    display: str | None = Field(default=None, description="Human-readable name of the code.")
    known: str = Field(
        default=AT_INDEX,
        description="When the value became known: 'at_index' (known at presentation, timed at "
        "the index) or a date column. Written to recordedDate / issued.")
    present: Codes | None = Field(default=None, description="Override of codes.present.")
    absent: Codes | None = Field(default=None, description="Override of codes.absent.")
    unknown: Codes | None = Field(default=None, description="Override of codes.unknown.")
    not_applicable: Codes | None = Field(default=None,
                                             description="Override of codes.not_applicable.")

    def clinical(self) -> str | None:
        """The clinical-time spec (``onset`` / ``effective``); None: the known time."""
        return None

    def slug(self) -> str:
        """The name as it appears in resource ids (lower case, ``_`` -> ``-``)."""
        return self.name.lower().replace("_", "-")

    def codes(self, default: CodeMap) -> CodeMap:
        """This column's codes: its own lists where given, else the mapping's defaults."""
        return CodeMap(
            present=default.present if self.present is None else self.present,
            absent=default.absent if self.absent is None else self.absent,
            unknown=default.unknown if self.unknown is None else self.unknown,
            not_applicable=(default.not_applicable if self.not_applicable is None
                            else self.not_applicable),
        )


class ConditionColumn(_Column):
    """A yes/no column written as a Condition when yes (no Condition when no or unknown)."""

    system: CodeSystem = Field(default="snomed",
                               description="Code system: 'snomed', 'loinc', 'local' or a URI.")
    onset: str | None = Field(
        default=None,
        description="Clinical onset: 'at_index' or a date column; default: the known time.")
    not_applicable_means: Literal["present", "absent", "unknown"] = Field(
        default="unknown", description="What a 'not applicable' code means for this column.")

    def clinical(self) -> str | None:
        """The onset spec (``at_index`` or a date column); None: the known time."""
        return self.onset


class ObservationColumn(_Column):
    """A column written as one Observation per row: a number with its unit, or yes/no."""

    system: CodeSystem = Field(default="loinc",
                               description="Code system: 'loinc', 'snomed', 'local' or a URI.")
    type: Literal["quantity", "boolean"] = Field(
        default="quantity", description="quantity: valueQuantity; boolean: valueBoolean.")
    unit: FhirCode | None = Field(default=None,
                                  description="UCUM unit of a quantity, as given (e.g. 'cm3', "
                                  "'1').")
    effective: str | None = Field(
        default=None,
        description="Clinical time: 'at_index' or a date column; default: the known time.")
    not_applicable_means: Literal["present", "absent", "unknown"] | float = Field(
        default="unknown",
        description="What a 'not applicable' code means: present/absent (boolean), a number "
        "(quantity), or unknown (absent).")

    def clinical(self) -> str | None:
        """The effective-time spec (``at_index`` or a date column); None: the known time."""
        return self.effective

    @model_validator(mode="after")
    def _unit_for_quantity(self) -> ObservationColumn:
        if self.type == "quantity" and not self.unit:
            raise ValueError(f"observation '{self.name}' is a quantity and needs a 'unit'")
        means = self.not_applicable_means
        if self.type == "quantity" and means in ("present", "absent"):
            raise ValueError(f"observation '{self.name}' is a quantity: not_applicable_means "
                             "must be a number or 'unknown'")
        if self.type == "boolean" and isinstance(means, float):
            raise ValueError(f"observation '{self.name}' is boolean: not_applicable_means must "
                             "be present, absent or unknown")
        return self


class LabelSpec(_Strict):
    """The label column, written to ``labels.csv``: codes, or a threshold on a number."""

    column: str = Field(description="The column (never also a Condition or Observation).")
    positive: Codes = Field(default_factory=list, description="Codes meaning label 1.")
    negative: Codes = Field(default_factory=list, description="Codes meaning label 0.")
    above: float | None = Field(default=None,
                                description="Numeric rule: label 1 when value > above, else 0.")
    unknown: Codes = Field(default_factory=list,
                           description="Values meaning no label (the row gets none).")

    @model_validator(mode="after")
    def _one_rule(self) -> LabelSpec:
        coded = bool(self.positive or self.negative)
        if coded == (self.above is not None):
            raise ValueError("give either 'positive' and 'negative' codes or 'above'")
        if coded and not (self.positive and self.negative):
            raise ValueError("give both 'positive' and 'negative' codes")
        return self


class OutcomeSpec(LabelSpec):
    """Another outcome column of ``labels.csv`` (beside ``label``), coded like the label.

    A registry often records several outcomes of one stay (ICU, intubation) without a date:
    each becomes a column of ``labels.csv`` that a task picks with
    ``label.labels_csv_column``; never a feature.
    """

    name: ShortName = Field(description="Its column in labels.csv (not 'label' or "
                                        "'patient_id').")


class ImageFile(_Strict):
    """One image file per row, found by a path template such as ``'{ID}_a.jpg'``."""

    path: str = Field(description="Path relative to images.dir, with {COLUMN} placeholders.")
    modality: str | None = Field(default=None, description="images.csv modality.")
    view: str | None = Field(default=None, description="images.csv view.")
    acquired: str = Field(default=AT_INDEX,
                          description="Acquisition time: 'at_index' or a date column.")

    @field_validator("path")
    @classmethod
    def _template_ok(cls, v: str) -> str:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(v) if f is not None]
        except ValueError as exc:
            raise ValueError(f"not a path template: {exc}") from None
        if not all(fields):
            raise ValueError("placeholders must name a column, e.g. '{ID}_a.jpg'")
        return v

    def columns(self) -> list[str]:
        """The columns the path template names."""
        return [f for _, f, _, _ in string.Formatter().parse(self.path) if f]


class ImagesSpec(_Strict):
    """Image files copied into the site's ``images/`` and listed in ``images.csv``."""

    dir: str = Field(description="Folder of the source images, relative to the CSV file.")
    files: list[ImageFile] = Field(min_length=1, description="The files of each row.")


class CsvMapping(_Strict):
    """How one CSV layout maps onto the site contract (one YAML file)."""

    name: ShortName = Field(description="Mapping name; also names the local code system.")
    description: str = Field(default="", description="What the CSV is, in words.")
    source: SourceSpec = Field(default_factory=SourceSpec, description="How the file is read.")
    patient_id: str = Field(description="The column with the patient key.")
    rows: Literal["per_patient", "per_event"] = Field(
        default="per_patient",
        description="per_patient: a repeated key is a bad row; per_event: each row is one "
        "admission of the patient the key names.")
    keep_rows: list[RowFilter] = Field(default_factory=list,
                                       description="Only rows passing every filter are read.")
    index: IndexSpec = Field(description="Each row's index time.")
    missing: Codes = Field(default_factory=lambda: [""],
                               description="Values meaning 'no value' in every column.")
    codes: CodeMap = Field(default_factory=CodeMap,
                           description="Default codes of yes/no columns.")
    on_error: Literal["skip", "fail"] = Field(
        default="skip", description="A bad row: skip it and report it, or stop.")
    site_names: dict[str, Annotated[dict[str, str], BeforeValidator(_as_text)]] = Field(
        default_factory=dict,
        description="Per split column: raw value -> site directory name.")
    patient: PatientSpec = Field(default_factory=PatientSpec, description="Demographics.")
    encounter: EncounterSpec = Field(default_factory=EncounterSpec,
                                     description="The Encounter of each row.")
    conditions: list[ConditionColumn] = Field(default_factory=list,
                                              description="Yes/no columns -> Conditions.")
    observations: list[ObservationColumn] = Field(default_factory=list,
                                                  description="Columns -> Observations.")
    label: LabelSpec | None = Field(default=None, description="labels.csv.")
    outcomes: list[OutcomeSpec] = Field(
        default_factory=list,
        description="More outcome columns of labels.csv, one per entry (named by 'name').")
    images: ImagesSpec | None = Field(default=None, description="images.csv.")

    @model_validator(mode="after")
    def _consistent(self) -> CsvMapping:
        slugs = [c.slug() for c in (*self.conditions, *self.observations)]
        dup = sorted({n for n in slugs if slugs.count(n) > 1})
        if dup:
            raise ValueError(f"condition/observation names {dup} are used twice (names are "
                             "compared ignoring case, with _ read as -)")
        feats = {c.column for c in (*self.conditions, *self.observations)}
        if self.label is not None and self.label.column in feats:
            raise ValueError(f"label column '{self.label.column}' is also a condition or "
                             "observation: a label must never become a feature")
        self._check_outcomes(feats)
        for names_map in self.site_names.values():
            for site in names_map.values():
                if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", site):
                    raise ValueError(f"site name '{site}' is not a plain folder name "
                                     "(letters, digits, . _ -)")
                if site == "import_report.json":
                    raise ValueError("site name 'import_report.json' is the import's report "
                                     "file in the output directory; choose another")
        return self

    def _check_outcomes(self, feats: set[str]) -> None:
        names = [o.name for o in self.outcomes]
        for o in self.outcomes:
            if o.name in ("label", "patient_id") or names.count(o.name) > 1:
                raise ValueError(f"outcome name '{o.name}' is taken (outcome names are "
                                 "labels.csv columns: unique, not 'label' or 'patient_id')")
            if o.column in feats:
                raise ValueError(f"outcome column '{o.column}' (outcome '{o.name}') is also a "
                                 "condition or observation: an outcome must never become a "
                                 "feature")

    def system_uri(self, system: str) -> str:
        """The URI of a code system alias (``snomed``, ``loinc``, ``local``) or URI."""
        if system == "local":
            return f"urn:mmfl:csv:{self.name}"
        return SYSTEM_ALIASES.get(system, system)

    def columns_used(self) -> dict[str, str]:
        """Every column the mapping reads -> the mapping key that names it (for messages)."""
        used: dict[str, str] = {"": ""}
        used[self.patient_id] = "patient_id"
        for i, flt in enumerate(self.keep_rows):
            used.setdefault(flt.column, f"keep_rows[{i}].column")
        if self.index.column:
            used.setdefault(self.index.column, "index.column")
        pat = self.patient
        for key, col in (("patient.sex.column", pat.sex.column if pat.sex else None),
                         ("patient.age", pat.age), ("patient.birth_date", pat.birth_date),
                         ("patient.deceased.column",
                          pat.deceased.column if pat.deceased else None),
                         ("encounter.class.column", self.encounter.class_.column),
                         ("label.column", self.label.column if self.label else None)):
            if col:
                used.setdefault(col, key)
        for i, outcome in enumerate(self.outcomes):
            used.setdefault(outcome.column, f"outcomes[{i}].column")
        self._timed_columns(used)
        del used[""]
        return used

    def _timed_columns(self, used: dict[str, str]) -> None:
        groups: tuple[tuple[str, list[ConditionColumn] | list[ObservationColumn]], ...] = (
            ("conditions", self.conditions), ("observations", self.observations))
        for kind, cols in groups:
            for i, c in enumerate(cols):
                used.setdefault(c.column, f"{kind}[{i}].column")
                for key, col in (("known", c.known), ("onset/effective", c.clinical())):
                    if col and col != AT_INDEX:
                        used.setdefault(col, f"{kind}[{i}].{key}")
        for i, img in enumerate(self.images.files if self.images else []):
            for col in img.columns():
                used.setdefault(col, f"images.files[{i}].path")
            if img.acquired != AT_INDEX:
                used.setdefault(img.acquired, f"images.files[{i}].acquired")


# --------------------------------------------------------------------------- loading


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Keys accepted at ``loc`` (minus its last part), following nested models."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int) or not (isinstance(current, type)
                                         and issubclass(current, BaseModel)):
            continue
        field = next((f for n, f in current.model_fields.items()
                      if part in (n, f.alias)), None)
        if field is None:
            return []
        current = _model_in(field.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return [f.alias or n for n, f in current.model_fields.items()]
    return []


def _model_in(annotation: Any) -> Any:
    """The BaseModel subclass inside ``list[...]``, ``X | None`` or ``dict[..., X]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _format(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid mapping"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        where = ".".join(str(p) for p in loc) or "<root>"
        if err["type"] == "extra_forbidden":
            valid = _fields_at(CsvMapping, loc)
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            lines.append(f"  - unknown key '{where}'{hint} (valid keys here: "
                         f"{', '.join(valid)})")
        elif err["type"] == "missing":
            lines.append(f"  - missing required key '{where}'")
        elif isinstance(err.get("input"), bool):  # YAML's yes/no/on/off/true/false, unquoted
            lines.append(f"  - '{where}': {err['msg']} (got the YAML boolean "
                         f"{err['input']}: unquoted yes/no/on/off/true/false are booleans in "
                         "YAML; quote the value: \"yes\", \"no\")")
        else:
            lines.append(f"  - '{where}': {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def _boolean_key(data: Any, where: str) -> str:
    """The dotted path of the first key YAML read as a boolean, or ``""``."""
    items = (data.items() if isinstance(data, dict)
             else enumerate(data) if isinstance(data, list) else ())
    for key, value in items:
        path = f"{where}.{key}" if where else str(key)
        if isinstance(key, bool):
            return path
        found = _boolean_key(value, path)
        if found:
            return found
    return ""


def load_mapping(path: Path | str) -> CsvMapping:
    """Read and validate a mapping YAML file.

    Parameters
    ----------
    path
        The mapping file (e.g. ``configs/mappings/mexico_covid.yaml``).

    Returns
    -------
    CsvMapping
        The validated mapping.

    Raises
    ------
    MappingError
        When the file is missing or not YAML, or a key is unknown (with the nearest valid
        key) or invalid.
    """
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MappingError(f"mapping file not found: {p}") from None
    except IsADirectoryError:
        raise MappingError(f"{p}: a directory, not a mapping file") from None
    except OSError as exc:
        raise MappingError(f"{p}: cannot read the mapping file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise MappingError(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start}); save the "
                           "mapping as UTF-8") from None
    except yaml.YAMLError as exc:
        raise MappingError(f"{p}: not valid YAML: {exc}") from None
    except ValueError as exc:  # a YAML date that is no date (2021-02-30): PyYAML's own error
        raise MappingError(f"{p}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise MappingError(f"{p}: expected a mapping at the top level, got "
                           f"{type(data).__name__}")
    bad = _boolean_key(data, "")
    if bad:
        raise MappingError(f"{p}: key '{bad}' is a YAML boolean (unquoted yes/no/on/off/true/"
                           "false): quote it, or use present/absent for codes")
    try:
        return CsvMapping.model_validate(data)
    except ValidationError as exc:
        raise MappingError(_format(exc, str(p))) from None
