"""Applying a :class:`~multimodal_fl.config.TaskSpec` to one site's records.

Per patient: cohort rule -> index time -> feature cut-off (index + allowance) -> features
from data known by the cut-off only -> label from events after it.

Two clocks (see :mod:`~multimodal_fl.data.records`): the index, the cohort and the label
rules use clinical time (``effective[x]``, onset, performed; a partial date's first
instant); features use the time a record became known (``issued``, ``recordedDate``; a
partial date's last second in the site's time zone; whole seconds). A record known exactly
at the cut-off counts; one known a second later does not.

Boundaries (also in ``docs/data-contract.md``):

- index: ``condition_encounter``: the start of the encounter the (earliest) cohort
  Condition points to, else of the encounter in progress at its onset (start at or before,
  end at or after it), else of the first encounter starting on or after its onset, else
  the onset; ``reference_date``: the configured date (00:00 UTC) for every patient, who
  must be born and alive then; ``first_imaging_study``: per patient, the known time of the
  first ImagingStudy of the task's ``image_modality`` (its ``started``; a date alone at the
  end of that day, so the scan and the day's records are known at the index);
  ``first_encounter``: per patient, the start of the first Encounter of a configured class.
  Under the per-patient kinds and ``reference_date`` a cohort Condition counts only with
  onset by the cut-off.
- feature window: clinical time at or after ``index - lookback`` and known at or before
  the cut-off ``index + allowance``; comorbidities: known (recorded) by the cut-off and not
  abated before the index; medications: authored (known) by the cut-off; age at the index;
  sex. A patient has tabular data (``has_tabular``) when any demographic or observation
  feature has a value or a comorbidity / medication is recorded.
- label window (``events_after_index``): ``(cut-off, cut-off + window_hours]``; a label
  procedure/device event, or death when ``death_is_positive``, inside it is positive. A
  death dated without a time is the whole of its day: on the index day it is after the
  index (positive), not before it (excluded as ``died_before_index`` only when its whole
  period is at or before the cut-off).
  A patient with such an event (or death) at or before the cut-off is excluded when
  ``exclude_prior_events`` (already on oxygen).
- ``condition_at_index``: positive when a label condition has onset on or before the
  cut-off. Notes known on or after the patient's first label-condition time (onset) are
  not used: a note written after the diagnosis can name it.
- ``labels.csv``: ``ignore`` (the default: the rule alone), ``prefer`` overrides the rule
  for the patients it lists, ``fallback`` labels only patients the rule cannot label; label
  kind ``labels_csv`` uses it alone. Each label's source is counted (``labels_from``).

Leakage is impossible by construction: every feature value is taken from a record known
at or before the cut-off; the latest such known time is kept per patient
(``max_feature_time``) so tests can check it.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from multimodal_fl.config import IMAGING_MODALITY_CODES, TaskSpec
from multimodal_fl.data.errors import ErrorSink
from multimodal_fl.data.fhir_json import shifted
from multimodal_fl.data.imaging import check_readable, select_image
from multimodal_fl.data.records import Note, ObservationValue, SiteRecords, known_time, matches

__all__ = ["SEX_LEVELS", "TaskResult", "age_band", "age_band_levels", "apply_task",
           "declared_levels", "feature_names", "index_time"]

_UNKNOWN_SEX = "unknown"
#: Every value of the cohort's ``sex`` column (any other ``Patient.gender`` is ``unknown``).
SEX_LEVELS: tuple[str, ...] = ("female", "male", "other", _UNKNOWN_SEX)
_IMAGE_FIELD = {"images.csv": "images.csv:path", "ImagingStudy": "ImagingStudy.identifier",
                "DICOM PatientID": "DICOM PatientID"}


def feature_names(task: TaskSpec) -> list[str]:
    """The model input columns of ``task``, in a stable order.

    Order: demographics (``age``, ``sex_female``), observation features, their
    ``missing_<name>`` indicators (when enabled), comorbidities, medications.
    """
    names: list[str] = []
    if "age" in task.features.demographics:
        names.append("age")
    if "sex" in task.features.demographics:
        names.append("sex_female")
    obs = [o.name for o in task.features.observations]
    names += obs
    if task.features.missing_indicators:
        names += [f"missing_{n}" for n in obs]
    names += [c.name for c in task.features.conditions]
    names += [m.name for m in task.features.medications]
    return names


def _band_label(lo: float, hi: float) -> str:
    return f"{lo:g}+" if hi >= 150 else f"{lo:g}-{hi - 1:g}"


def age_band(age: float | None, edges: list[float]) -> str:
    """Age band label such as ``'40-59'`` from band edges ``[0, 40, 60, ...]``."""
    if age is None or math.isnan(age):
        return "unknown"
    for lo, hi in itertools.pairwise(edges):
        if lo <= age < hi:
            return _band_label(lo, hi)
    return "unknown"


def age_band_levels(edges: list[float]) -> tuple[str, ...]:
    """Every label :func:`age_band` gives with band edges ``edges``, ``'unknown'`` last."""
    return (*(_band_label(lo, hi) for lo, hi in itertools.pairwise(edges)), "unknown")


def declared_levels(task: TaskSpec, attributes: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """The levels of the sensitive attributes that the task itself fixes, before any data.

    ``sex`` takes :data:`SEX_LEVELS`, ``age_band`` the task's bands
    (:func:`age_band_levels`); any other attribute's levels come from the data, so it has
    none here. Every site of a run knows these, so a site can lay out one histogram part per
    declared level, empty ones included, and the layout says nothing of its patients
    (:func:`~multimodal_fl.evaluation.histograms.histogram_parts`).

    Parameters
    ----------
    task : TaskSpec
    attributes : iterable of str
        The sensitive attributes in use (``evaluation.sensitive``).

    Returns
    -------
    dict of str to tuple of str
        ``{attribute: levels}`` for the attributes among ``sex`` and ``age_band``.
    """
    fixed = {"sex": SEX_LEVELS, "age_band": age_band_levels(task.age_bands)}
    return {a: fixed[a] for a in attributes if a in fixed}


def _years(a: datetime, b: datetime) -> float:
    return (b - a).total_seconds() / (365.25 * 86400)


def index_time(task: TaskSpec, pid: str, records: SiteRecords) -> tuple[datetime | None, str]:
    """The index time of one patient, or None with the exclusion reason."""
    rule = task.index
    if rule.kind == "reference_date":
        assert rule.reference_date is not None  # guaranteed by IndexRule's validator
        return datetime(rule.reference_date.year, rule.reference_date.month,
                        rule.reference_date.day, tzinfo=UTC), ""
    if rule.kind == "first_imaging_study":
        codes = set(IMAGING_MODALITY_CODES[task.image_modality])
        scans = [s.known for s in records.studies.get(pid, []) if s.known is not None
                 and any(code in codes for _, code in s.codings)]
        return (min(scans), "") if scans else (None, "no_index_study")
    if rule.kind == "first_encounter":
        classes = set(rule.encounter_class)
        starts = [e.time for e in records.encounters.get(pid, []) if e.time is not None
                  and records.encounter_class.get((pid, e.resource_id)) in classes]
        return (min(starts), "") if starts else (None, "no_index_encounter")
    conds = [c for c in records.conditions.get(pid, [])
             if any(matches(c.codings, s) for s in task.cohort.conditions)]
    conds = [c for c in conds if c.time is not None or c.encounter is not None]
    if not conds:
        return None, "no_index_condition"
    first = min(conds, key=lambda c: (c.time is None, c.time or datetime.max))
    enc = records.encounter_by_key.get((pid, first.encounter)) if first.encounter else None
    if enc is not None and enc.time is not None:  # the patient's own encounter of that id
        return enc.time, ""
    if first.time is None:
        return None, "no_index_time"
    spans = [(e.time, e.end) for e in records.encounters.get(pid, []) if e.time is not None]
    during = [start for start, end in spans
              if start <= first.time and end is not None and first.time <= end]
    if during:  # the encounter in progress at the onset (the latest to start, if nested)
        return max(during), ""
    later = sorted(start for start, _ in spans if start >= first.time)
    return (later[0] if later else first.time), ""


@dataclass
class TaskResult:
    """Rows of the cohort table and the exclusions, for one site.

    ``label_sources`` counts the rows' labels by source: ``labels_csv`` or ``rule``.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    excluded: Counter[str] = field(default_factory=Counter)
    counts: Counter[str] = field(default_factory=Counter)
    label_sources: Counter[str] = field(default_factory=Counter)


def _in_cohort(task: TaskSpec, pid: str, records: SiteRecords, cutoff: datetime | None) -> bool:
    if not task.cohort.conditions:
        return True
    for c in records.conditions.get(pid, []):
        if any(matches(c.codings, s) for s in task.cohort.conditions):
            if task.index.kind == "condition_encounter" or cutoff is None:
                return True
            if c.time is not None and c.time <= cutoff:
                return True
    return False


def _events(task: TaskSpec, pid: str, records: SiteRecords) -> list[tuple[datetime, str]]:
    lab = task.label
    out: list[tuple[datetime, str]] = []
    for p in records.procedures.get(pid, []):
        if p.time is not None and any(matches(p.codings, s) for s in lab.procedures):
            out.append((p.time, f"Procedure/{p.resource_id}"))
    for d in records.devices.get(pid, []):
        if d.time is not None and any(matches(d.codings, s) for s in lab.devices):
            out.append((d.time, f"DeviceUseStatement/{d.resource_id}"))
    return out


@dataclass(frozen=True)
class _Window:
    """A cohort patient's index time, feature cut-off (index + allowance) and age at the index."""

    index: datetime
    cutoff: datetime
    age: float


def _window(task: TaskSpec, pid: str, records: SiteRecords) -> tuple[_Window | None, str]:
    """The patient's index, cut-off and age, or None with the exclusion reason.

    Checks, in order: an index time, the cohort rule, born before and alive at the
    cut-off, the cohort's minimum age.
    """
    pat = records.patients[pid]
    index, why = index_time(task, pid, records)
    if index is None:
        if task.cohort.conditions and not _in_cohort(task, pid, records, None):
            return None, "not_in_cohort"
        return None, why
    cutoff = shifted(index, timedelta(hours=task.index.allowance_hours))
    if not _in_cohort(task, pid, records, cutoff):
        return None, "not_in_cohort"
    if pat.birth is not None and pat.birth > index:
        return None, "born_after_index"
    if pat.deceased is not None and (pat.deceased_end or pat.deceased) <= cutoff:
        return None, "died_before_index"  # the whole of the death's date is at or before it
    age = _years(pat.birth, index) if pat.birth is not None else float("nan")
    if task.cohort.min_age is not None and not (age >= task.cohort.min_age):
        return None, "under_min_age"
    return _Window(index, cutoff, age), ""


def _label(task: TaskSpec, pid: str, records: SiteRecords, cutoff: datetime,
           csv_label: int | None) -> tuple[int | None, str]:
    """The patient's 0/1 label by the task's rule and ``labels.csv``, or None with the reason.

    The second item is the label's source (``labels_csv`` or ``rule``) when there is a label.
    """
    label_rule = task.label
    label: int | None = None
    if label_rule.kind == "events_after_index":
        assert label_rule.window_hours is not None  # guaranteed by LabelRule's validator
        end = shifted(cutoff, timedelta(hours=label_rule.window_hours))
        events = _events(task, pid, records)
        if label_rule.exclude_prior_events and any(t <= cutoff for t, _ in events):
            return None, "prior_event"
        positive = any(cutoff < t <= end for t, _ in events)
        pat = records.patients[pid]
        if label_rule.death_is_positive and pat.deceased is not None:
            # the death's period (a day, for a date) meets (cut-off, end]
            positive = positive or (pat.deceased <= end
                                    and (pat.deceased_end or pat.deceased) > cutoff)
        label = int(positive)
    elif label_rule.kind == "condition_at_index":
        label = int(any(
            c.time is not None and c.time <= cutoff
            and any(matches(c.codings, s) for s in label_rule.conditions)
            for c in records.conditions.get(pid, [])))
    source = "rule"
    if label_rule.kind == "labels_csv" or label_rule.labels_csv == "prefer":
        if csv_label is not None:
            label, source = csv_label, "labels_csv"
        elif label_rule.kind == "labels_csv":
            label = None
    elif label_rule.labels_csv == "fallback" and label is None and csv_label is not None:
        label, source = csv_label, "labels_csv"
    if label is None:
        return None, "no_label"
    return label, source


def _observation_features(row: dict[str, Any], task: TaskSpec, obs: list[ObservationValue],
                          window: _Window) -> list[datetime]:
    """Add the observation columns to ``row``; return the known times of the values used.

    A value counts when its clinical time is inside the lookback and it was known (issued)
    by the cut-off; ``last`` / ``first`` order the values by clinical time.
    """
    feats = task.features
    times: list[datetime] = []
    for spec in feats.observations:
        lookback = timedelta(days=spec.lookback_days if spec.lookback_days is not None
                             else feats.lookback_days)
        start = shifted(window.index, -lookback)
        vals = sorted((o for o in obs if o.feature == spec.name and start <= o.time
                       and o.known <= window.cutoff), key=lambda o: o.time)
        if vals:
            used = {"last": vals[-1:], "first": vals[:1]}.get(spec.agg, vals)
            times.append(max(o.known for o in used))
            arr = np.array([o.value for o in vals], dtype=float)
            value = {"last": arr[-1], "first": arr[0], "min": arr.min(), "max": arr.max(),
                     "mean": arr.mean()}[spec.agg]
            row[spec.name] = float(value)
        else:
            row[spec.name] = float("nan")
        if feats.missing_indicators:
            row[f"missing_{spec.name}"] = float(not vals)
    return times


def _tabular_features(row: dict[str, Any], task: TaskSpec, pid: str, records: SiteRecords,
                      window: _Window, sex: str) -> list[datetime]:
    """Add the tabular feature columns to ``row``; return the known times of the records used.

    Only records known by the cut-off count: observations inside their lookback,
    comorbidities recorded by the cut-off and not abated before the index, medications
    authored by the cut-off.
    """
    feats = task.features
    index, cutoff = window.index, window.cutoff
    if "sex" in feats.demographics:
        row["sex_female"] = (float(sex == "female") if sex in {"female", "male"}
                             else float("nan"))
    times = _observation_features(row, task, records.observations.get(pid, []), window)
    for kind, specs in (("conditions", feats.conditions), ("medications", feats.medications)):
        facts = getattr(records, kind).get(pid, [])
        for cs in specs:
            hits = [known for c in facts if (known := known_time(c)) is not None
                    and known <= cutoff and (c.end is None or c.end >= index)
                    and matches(c.codings, cs)]
            row[cs.name] = float(bool(hits))
            times += hits
    return times


def _has_tabular(row: dict[str, Any], task: TaskSpec) -> bool:
    """Whether the patient has tabular data (the ``has_tabular`` modality mask).

    A demographic or observation value, or a recorded comorbidity / medication. Demographics
    count: a patient with age and sex and no Observation keeps the tabular
    modality. A task whose features cannot be missing (only comorbidities and
    medications, 0 when unrecorded) gives every patient tabular data.
    """
    feats = task.features
    optional = [n for n, on in (("age", "age" in feats.demographics),
                                ("sex_female", "sex" in feats.demographics)) if on]
    optional += [o.name for o in feats.observations]
    flags = [c.name for c in (*feats.conditions, *feats.medications)]
    if not optional:
        return True
    return any(not math.isnan(row[n]) for n in optional) or any(row[n] == 1.0 for n in flags)


def _first_label_condition(task: TaskSpec, pid: str, records: SiteRecords) -> datetime | None:
    """The clinical time (onset) of the patient's first label condition (``condition_at_index``)."""
    if task.label.kind != "condition_at_index":
        return None
    onsets = [c.time for c in records.conditions.get(pid, []) if c.time is not None
              and any(matches(c.codings, s) for s in task.label.conditions)]
    return min(onsets, default=None)


def _kept_notes(notes: list[Note], cutoff: datetime, times: list[datetime],
                counts: Counter[str], *, diagnosed: datetime | None = None) -> list[str]:
    """The texts of the notes dated on/before ``cutoff`` (see text.py for undated ones).

    A note dated on or after ``diagnosed`` (the first label-condition time) is dropped too
    (``notes_after_label_condition``): written after the diagnosis, it can name it.
    Appends the dates of the kept notes to ``times``; counts the later ones.
    """
    kept: list[str] = []
    for note in notes:
        if note.time is not None and note.time > cutoff:
            counts["notes_after_cutoff"] += 1
        elif diagnosed is not None and note.time is not None and note.time >= diagnosed:
            counts["notes_after_label_condition"] += 1
        else:
            kept.append(note.text)
            if note.time is not None:
                times.append(note.time)
    return kept


def _chosen_image(candidates: list[tuple[Path, datetime | None, str]], pid: str,
                  cutoff: datetime, *, sink: ErrorSink, check_images: bool,
                  times: list[datetime], counts: Counter[str]) -> str | None:
    """The path of the image used for the patient: the first readable one in preference order.

    Reports unreadable images to ``sink``; appends the chosen image's date to ``times``;
    counts the images acquired after the cut-off.
    """
    ordered, late = select_image(candidates, cutoff)
    counts["images_after_cutoff"] += late
    for path, when, rule in ordered:
        problem = check_readable(path) if check_images else None
        if problem is not None:
            sink.report(str(path), pid, _IMAGE_FIELD.get(rule, rule), "unreadable_image",
                        f"image '{path}' linked to patient '{pid}' is unreadable: "
                        f"{problem}")
            continue
        if when is not None:
            times.append(when)
        return str(path)
    return None


def apply_task(
    task: TaskSpec,
    records: SiteRecords,
    *,
    site: str,
    sink: ErrorSink,
    notes: dict[str, list[Note]] | None = None,
    images: dict[str, list[tuple[Path, datetime | None, str]]] | None = None,
    labels_csv: dict[str, int] | None = None,
    check_images: bool = True,
) -> TaskResult:
    """Build the per-patient rows of ``task`` from one site's records.

    Parameters
    ----------
    task
        The task.
    records
        The site's FHIR records.
    site
        Site name (a column of the table).
    sink
        Receives unreadable images.
    notes
        Notes by patient id (FHIR and notes.csv merged).
    images
        Linked image candidates by patient id.
    labels_csv
        ``labels.csv`` labels by patient id.
    check_images
        Check the chosen image is readable (header level).

    Returns
    -------
    TaskResult
        Rows (one per patient in the cohort), exclusions by reason, counts.
    """
    notes = notes or {}
    images = images or {}
    labels_csv = labels_csv or {}
    res = TaskResult()
    for pid in sorted(records.patients):
        window, why = _window(task, pid, records)
        if window is None:
            res.excluded[why] += 1
            continue
        label, why = _label(task, pid, records, window.cutoff, labels_csv.get(pid))
        if label is None:
            res.excluded[why] += 1
            continue
        res.label_sources[why] += 1
        gender = records.patients[pid].gender
        sex = gender if gender in SEX_LEVELS else _UNKNOWN_SEX
        row: dict[str, Any] = {"patient_id": pid, "site": site, "index_time": window.index,
                               "label": label}
        times = _tabular_features(row, task, pid, records, window, sex)
        kept_notes = _kept_notes(notes.get(pid, []), window.cutoff, times, res.counts,
                                 diagnosed=_first_label_condition(task, pid, records))
        row["notes"] = kept_notes
        image_path = _chosen_image(images.get(pid, []), pid, window.cutoff, sink=sink,
                                   check_images=check_images, times=times, counts=res.counts)
        row["image_path"] = image_path
        row["sex"] = sex
        row["age"] = window.age
        row["age_band"] = age_band(window.age, task.age_bands)
        row["max_feature_time"] = max(times) if times else None
        row["has_image"] = image_path is not None
        row["has_text"] = bool(kept_notes)
        row["has_tabular"] = _has_tabular(row, task)
        res.rows.append(row)
    return res
