"""Patient simulation for the two sample tasks: latent signal -> FHIR, image, notes.

Signal model (fixed; documented in ``docs/sample-data.md``): every patient has three
independent standard-normal latents, one per modality (``tab``, ``img``, ``txt``), and
a risk ``r = tab + img + txt + SIGMA_E * e``. Within a site the ``round(prevalence*n)``
patients with the highest risk are positive. Each modality is written from its own
latent only (plus its own measurement noise), so each sees about a third of the signal
and fusion sees all of it.

The COVID-19 presentation encounter's class (EMER or IMP) and stay come from their own
stream, independent of every latent and label (:class:`EncounterDraw`); the
``leaky_encounters`` option restores generator 1.0's label-dependent class and stay, as a
negative control.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import numpy as np

from multimodal_fl.sample_data import _images, _text
from multimodal_fl.sample_data._fhir import Refs
from multimodal_fl.sample_data._sites import SiteSpec

__all__ = ["INPATIENT_SHARE", "SIGMA_E", "EncounterDraw", "PatientRecord", "iter_site",
           "simulate_site", "site_signal"]

#: standard deviation of the risk noise no modality sees
SIGMA_E = 0.6
#: extra share of positives whose oxygen starts between 24 h and 72 h (COVID-19)
LATE_SHARE = 0.08
#: share of COVID-19 presentations admitted (class IMP, 3-12 days), drawn independently of the label
INPATIENT_SHARE = 0.35
COVID_BASE = datetime(2020, 3, 1, tzinfo=UTC)
AD_REFERENCE = datetime(2020, 1, 1, tzinfo=UTC)
_NS = uuid.UUID("6f1c2d36-8e0a-4b1e-9a55-0c6b6d2f7a10")

Resource = dict[str, Any]


@dataclass
class PatientRecord:
    """Everything generated for one patient before it is written in a site's routes."""

    pid: str
    resources: list[Resource]
    label: int
    label_72h: int | None = None
    image: np.ndarray | None = None
    image_time: datetime | None = None
    notes: list[tuple[str, datetime, str]] = field(default_factory=list)
    discharge: tuple[str, datetime] | None = None
    excluded: str | None = None
    encounter: str | None = None
    latents: tuple[float, float, float] = (0.0, 0.0, 0.0)


class _Ids:
    """Deterministic resource ids for one site (UUIDs for urn sites, short ids otherwise)."""

    def __init__(self, seed: int, task: str, site: SiteSpec) -> None:
        self.prefix = f"{seed}:{task}:{site.name}"
        self.urn = site.refs == "urn"
        self.tag = site.name.removeprefix("site_")  # "a" for site_a, "007" for site_007

    def patient(self, i: int) -> str:
        return self._make(f"p{i}", f"{self.tag}{i:04d}")

    def child(self, pid: str, key: str) -> str:
        return self._make(f"{pid}:{key}", f"{pid}-{key}".replace("_", "-"))

    def _make(self, key: str, short: str) -> str:
        return str(uuid.uuid5(_NS, f"{self.prefix}:{key}")) if self.urn else short


def _minutes(rng: np.random.Generator, lo: float, hi: float) -> timedelta:
    return timedelta(minutes=int(rng.integers(int(lo), int(hi) + 1)))


def _hours(rng: np.random.Generator, lo: float, hi: float) -> timedelta:
    return timedelta(minutes=int(rng.integers(int(lo * 60), int(hi * 60) + 1)))


def _days(rng: np.random.Generator, lo: float, hi: float) -> timedelta:
    return timedelta(days=int(rng.integers(int(lo), int(hi) + 1)))


class EncounterDraw:
    """Class and stay of the COVID-19 presentation encounter.

    By default both come from this object's own generator, independently of the patient's
    latents and labels: ``IMP`` (admitted, 3-12 days) with probability
    :data:`INPATIENT_SHARE`, else ``EMER`` (4-30 h). Generator 1.0 drew them from the
    patient's stream by the 72 h label (IMP and 3-12 days exactly for the positives); that
    draw is still taken from the patient's stream, so every other value a patient gets is
    unchanged, and ``leaky=True`` uses it (a negative control: class alone then predicts
    the 72 h label almost perfectly).

    Parameters
    ----------
    rng
        The encounter stream of one site (not the patients' stream).
    leaky
        Use the label-dependent 1.0 draw instead.
    """

    def __init__(self, rng: np.random.Generator, *, leaky: bool = False) -> None:
        self.rng = rng
        self.leaky = leaky

    def draw(self, patient_rng: np.random.Generator, positive_72h: bool
             ) -> tuple[str, timedelta]:
        """``(class, stay)`` of one presentation; always takes the 1.0 draw from ``patient_rng``.

        Parameters
        ----------
        patient_rng
            The patient's stream (the site's main generator).
        positive_72h
            The patient's 72 h label (used only when ``leaky``).

        Returns
        -------
        tuple
            ActCode class (``EMER`` or ``IMP``) and the stay from the index.
        """
        leaked = (("IMP", _days(patient_rng, 3, 12)) if positive_72h
                  else ("EMER", _hours(patient_rng, 4, 30)))
        if self.leaky:
            return leaked
        if self.rng.random() < INPATIENT_SHARE:
            return "IMP", _days(self.rng, 3, 12)
        return "EMER", _hours(self.rng, 4, 30)


def _birth(index: datetime, age: float, rng: np.random.Generator) -> date:
    return (index - timedelta(days=float(age) * 365.25)).date() - timedelta(
        days=int(rng.integers(0, 300)))


def _rank_labels(risk: np.ndarray, share: float) -> np.ndarray:
    k = max(1, round(share * len(risk)))
    order = np.argsort(-risk, kind="stable")
    labels = np.zeros(len(risk), dtype=int)
    labels[order[:k]] = 1
    return labels


def _latents(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    z = rng.standard_normal((n, 3))
    risk = z.sum(axis=1) + SIGMA_E * rng.standard_normal(n)
    return z, risk


# --------------------------------------------------------------------------- COVID-19

# name: (codes (default, alternative), canonical unit, decimals, missing share,
#        f(z, noise) in canonical unit)
_COVID_OBS: dict[str, tuple[tuple[str, str], str, int, float, Any]] = {
    "spo2": (("59408-5", "2708-6"), "%", 0, 0.03,
             lambda z, e: min(100.0, 95.0 - 1.8 * z + 1.3 * e)),
    "resp_rate": (("9279-1", "9279-1"), "/min", 0, 0.05,
                  lambda z, e: 19.0 + 2.4 * z + 2.4 * e),
    "heart_rate": (("8867-4", "8867-4"), "/min", 0, 0.03,
                   lambda z, e: 90.0 + 5.0 * z + 14.0 * e),
    "temperature": (("8310-5", "8331-1"), "Cel", 1, 0.06,
                    lambda z, e: 37.7 + 0.25 * z + 0.6 * e),
    "crp": (("1988-5", "1988-5"), "mg/L", 1, 0.15,
            lambda z, e: float(np.exp(np.log(45.0) + 0.55 * z + 0.6 * e))),
    "d_dimer": (("48065-7", "48065-7"), "ug/mL", 2, 0.30,
                lambda z, e: float(np.exp(np.log(0.8) + 0.30 * z + 0.7 * e))),
    "ldh": (("2532-0", "14804-9"), "U/L", 0, 0.30,
            lambda z, e: float(np.exp(np.log(270.0) + 0.22 * z + 0.25 * e))),
    "ferritin": (("2276-4", "2276-4"), "ug/L", 0, 0.35,
                 lambda z, e: float(np.exp(np.log(420.0) + 0.25 * z + 0.8 * e))),
    "procalcitonin": (("33959-8", "33959-8"), "ng/mL", 2, 0.65,
                      lambda z, e: float(np.exp(np.log(0.12) + 0.25 * z + 0.9 * e))),
    "troponin_i": (("89579-7", "89579-7"), "pg/mL", 0, 0.60,
                   lambda z, e: float(np.exp(np.log(8.0) + 0.15 * z + 0.9 * e))),
    "wbc": (("6690-2", "6690-2"), "10*3/uL", 1, 0.08,
            lambda z, e: float(np.exp(np.log(7.0) + 0.08 * z + 0.35 * e))),
    "lymphocytes": (("731-0", "731-0"), "10*3/uL", 2, 0.12,
                    lambda z, e: float(np.exp(np.log(1.1) - 0.20 * z + 0.40 * e))),
    "neutrophils": (("751-8", "751-8"), "10*3/uL", 1, 0.12,
                    lambda z, e: float(np.exp(np.log(5.0) + 0.12 * z + 0.40 * e))),
    "creatinine": (("2160-0", "38483-4"), "mg/dL", 2, 0.08,
                   lambda z, e: float(np.exp(np.log(0.95) + 0.08 * z + 0.30 * e))),
    "glucose": (("2345-7", "2339-0"), "mg/dL", 0, 0.10,
                lambda z, e: 118.0 + 6.0 * z + 35.0 * e),
    "ast": (("1920-8", "1920-8"), "U/L", 0, 0.25,
            lambda z, e: float(np.exp(np.log(38.0) + 0.12 * z + 0.45 * e))),
}
# SNOMED code, display, base log-odds, slope on the tabular latent
_COVID_COMORBID = (
    ("59621000", "Essential hypertension", -0.8, 0.35),
    ("44054006", "Diabetes mellitus type 2", -1.6, 0.35),
    ("15777000", "Prediabetes", -1.4, 0.1),
    ("162864005", "Body mass index 30+ - obesity", -1.2, 0.3),
    ("53741008", "Coronary arteriosclerosis", -2.4, 0.35),
    ("13645005", "Chronic obstructive bronchitis", -2.6, 0.35),
    ("195967001", "Asthma", -2.4, 0.0),
    ("431855005", "Chronic kidney disease stage 1", -2.8, 0.3),
    ("55822004", "Hyperlipidemia", -1.3, 0.1),
)
_UNIT_FROM_CANONICAL = {
    ("Cel", "[degF]"): lambda v: v * 9.0 / 5.0 + 32.0,
    ("mg/L", "mg/dL"): lambda v: v / 10.0,
    ("10*3/uL", "10*9/L"): lambda v: v,
}


def _value(v: float, decimals: int) -> float | int:
    return round(v) if decimals == 0 else round(float(v), decimals)


def _to_site_unit(name: str, unit: str, value: float, site: SiteSpec,
                  decimals: int) -> tuple[float | int, str]:
    target = site.units.get(name)
    if target is None or target == unit:
        return _value(value, decimals), unit
    converted = _UNIT_FROM_CANONICAL[(unit, target)](value)
    return _value(converted, decimals + (1 if target == "mg/dL" else 0)), target


def _sigmoid(x: float) -> float:
    return float(1.0 / (1.0 + np.exp(-x)))


def _covid_outcome(rng: np.random.Generator, index: datetime, label: int, late: int, top: bool
                   ) -> tuple[datetime | None, datetime | None, bool]:
    """The outcome timeline after the index: ``(death, oxygen start, ventilated)``.

    Drawn before the Patient is written, as its ``deceasedDateTime`` needs it.
    """
    deceased: datetime | None = None
    oxygen_at: datetime | None = None
    ventilated = False
    if label:
        if top and rng.random() < 0.25:
            deceased = index + _hours(rng, 3, 23)
        if deceased is None or rng.random() < 0.5:
            oxygen_at = index + _hours(rng, 0.5, 22)
            ventilated = top and rng.random() < 0.5
    elif late:
        oxygen_at = index + _hours(rng, 26, 70)
    elif rng.random() < 0.02:
        deceased = index + _days(rng, 10, 40)  # death outside any label window
    return deceased, oxygen_at, ventilated


def _covid_wellness_visit(res: list[Resource], pid: str, ids: _Ids, refs: Refs,
                          rng: np.random.Generator, index: datetime, zt: float,
                          age: float) -> None:
    """A wellness visit months before the index, where the comorbidities are recorded."""
    well = index - _days(rng, 60, 700)
    well_id = ids.child(pid, "e0")
    res.append(refs.encounter(well_id, pid, "AMB", "162673000", well, well + timedelta(minutes=30)))
    for k, (code, display, base, slope) in enumerate(_COVID_COMORBID):
        if rng.random() < _sigmoid(base + slope * zt + 0.02 * (age - 60.0)):
            onset = well - _days(rng, 0, 3000)
            res.append(refs.condition(ids.child(pid, f"c{k}"), pid, code, onset, display=display,
                                      encounter=well_id, recorded=well))
    if rng.random() < 0.7:
        res.append(refs.bp_panel(ids.child(pid, "w-bp"), pid, well,
                                 _value(125 + 14 * rng.standard_normal(), 0),
                                 _value(78 + 9 * rng.standard_normal(), 0), encounter=well_id))
        res.append(refs.observation(ids.child(pid, "w-cr"), pid, "2160-0", well,
                                    _value(np.exp(np.log(0.9) + 0.25 * rng.standard_normal()), 2),
                                    "mg/dL", encounter=well_id))


def _covid_observations(res: list[Resource], pid: str, ids: _Ids, refs: Refs,
                        rng: np.random.Generator, site: SiteSpec, index: datetime, enc_id: str,
                        zt: float, positive_72h: int) -> None:
    """Observations at presentation, and a repeat SpO2 after the index.

    Vitals are taken at the index, labs up to 45 min before; the repeat vitals after the
    index know the outcome and must never be features.
    """
    for name, (codes, unit, dec, missing, fn) in _COVID_OBS.items():
        if rng.random() < missing:
            continue
        code = codes[1] if site.alt_codes else codes[0]
        value, out_unit = _to_site_unit(name, unit, fn(zt, rng.standard_normal()), site, dec)
        when = index if name in {"spo2", "resp_rate", "heart_rate", "temperature"} else (
            index - _minutes(rng, 0, 45))
        res.append(refs.observation(ids.child(pid, f"o-{name}"), pid, code, when, value,
                                    out_unit, encounter=enc_id))
    if rng.random() > 0.04:
        res.append(refs.bp_panel(ids.child(pid, "o-bp"), pid, index,
                                 _value(128 - 3 * zt + 17 * rng.standard_normal(), 0),
                                 _value(77 - 1 * zt + 10 * rng.standard_normal(), 0),
                                 encounter=enc_id))
    later = index + _hours(rng, 2, 6)
    spo2_code = _COVID_OBS["spo2"][0][1 if site.alt_codes else 0]
    res.append(refs.observation(ids.child(pid, "r-spo2"), pid, spo2_code, later,
                                _value(min(100.0, 95.0 - 6.0 * positive_72h
                                           + 1.2 * rng.standard_normal()), 0),
                                "%", encounter=enc_id))


def _covid_oxygen(res: list[Resource], pid: str, ids: _Ids, refs: Refs,
                  rng: np.random.Generator, oxygen_at: datetime, ventilated: bool,
                  enc_id: str) -> None:
    """Oxygen after the index (positives and late positives), with ventilation and ventilator."""
    res.append(refs.procedure(ids.child(pid, "o2"), pid, "371908008",
                              "Oxygen administration by mask", oxygen_at,
                              oxygen_at + _hours(rng, 2, 48), encounter=enc_id))
    if ventilated:
        vent_at = oxygen_at + _hours(rng, 0.2, 1.5)
        res.append(refs.procedure(ids.child(pid, "vent"), pid, "26763009", "Ventilation",
                                  vent_at, vent_at + _days(rng, 2, 9), encounter=enc_id))
        res.append(refs.device(ids.child(pid, "dev"), pid, "449071006",
                               "Mechanical ventilator", vent_at))


def _covid_patient(i: int, site: SiteSpec, ids: _Ids, refs: Refs, rng: np.random.Generator,
                   z: np.ndarray, label: int, late: int, top: bool,
                   encounter: EncounterDraw) -> PatientRecord:
    """Simulate one COVID-19 patient: FHIR resources, notes and a chest X-ray."""
    pid = ids.patient(i)
    zt, zi, zx = (float(v) for v in z)
    index = COVID_BASE + _days(rng, 0, 300) + _minutes(rng, 0, 24 * 60 - 1)
    age = float(np.clip(60.0 + 10.0 * zt + 11.0 * rng.standard_normal(), 18, 95))
    gender = "male" if rng.random() < 0.5 + 0.05 * np.tanh(zt) else "female"
    res: list[Resource] = []
    deceased, oxygen_at, ventilated = _covid_outcome(rng, index, label, late, top)
    res.append(refs.patient(pid, gender, _birth(index, age, rng), deceased))
    _covid_wellness_visit(res, pid, ids, refs, rng, index, zt, age)

    # the COVID-19 presentation encounter: its start is the index time
    enc_id = ids.child(pid, "e1")
    cls, stay = encounter.draw(rng, bool(label or late))
    res.append(refs.encounter(enc_id, pid, cls, "50849002", index, index + stay))
    onset = index - _days(rng, 0, 7) - _minutes(rng, 0, 600)
    no_enc = rng.random() < site.no_encounter_ref
    res.append(refs.condition(ids.child(pid, "covid"), pid, "840539006", onset, display="COVID-19",
                              encounter=None if no_enc else enc_id, recorded=index))
    _covid_observations(res, pid, ids, refs, rng, site, index, enc_id, zt, label or late)
    if oxygen_at is not None:
        _covid_oxygen(res, pid, ids, refs, rng, oxygen_at, ventilated, enc_id)

    record = PatientRecord(pid=pid, resources=res, label=label, label_72h=int(label or late),
                           encounter=enc_id, latents=(zt, zi, zx))
    # a few patients were already on oxygen before the index: the task excludes them
    if rng.random() < 0.03:
        before = index - _hours(rng, 3, 36)
        res.append(refs.procedure(ids.child(pid, "o2-prior"), pid, "371908008",
                                  "Oxygen administration by mask", before,
                                  before + _hours(rng, 1, 2)))
        record.excluded = "oxygen before the index"

    record.notes.append((_text.covid_note(zx, rng), index - _minutes(rng, 0, 20), "ed_note"))
    if site.discharge_trap:
        record.discharge = (_text.covid_discharge_note(bool(label or late), rng), index + stay)
    if rng.random() >= site.image_missing:
        record.image = _images.chest_xray(zi + 0.25 * rng.standard_normal(), rng,
                                          site.image_size, site.acquisition)
        record.image_time = index - _minutes(rng, 10, 90)
    return record


# --------------------------------------------------------------------------- Alzheimer's

_AD_OBS: dict[str, tuple[tuple[str, str], str, int, float, Any]] = {
    "bmi": (("39156-5", "39156-5"), "kg/m2", 1, 0.10, lambda z, e: 27.0 - 1.3 * z + 3.5 * e),
    "glucose": (("2345-7", "2339-0"), "mg/dL", 0, 0.20, lambda z, e: 104.0 + 4.0 * z + 18.0 * e),
    "hba1c": (("4548-4", "4548-4"), "%", 1, 0.35, lambda z, e: 5.8 + 0.12 * z + 0.6 * e),
    "total_cholesterol": (("2093-3", "2093-3"), "mg/dL", 0, 0.30,
                          lambda z, e: 198.0 + 4.0 * z + 35.0 * e),
    "creatinine": (("2160-0", "38483-4"), "mg/dL", 2, 0.25,
                   lambda z, e: float(np.exp(np.log(1.0) + 0.05 * z + 0.25 * e))),
}
_AD_COMORBID = (
    ("59621000", "Essential hypertension", -0.3, 0.30),
    ("44054006", "Diabetes mellitus type 2", -1.4, 0.30),
    ("55822004", "Hyperlipidemia", -0.8, 0.15),
    ("53741008", "Coronary arteriosclerosis", -2.0, 0.25),
    ("230690007", "Cerebrovascular accident", -2.8, 0.45),
)


def _ad_patient(i: int, site: SiteSpec, ids: _Ids, refs: Refs, rng: np.random.Generator,
                z: np.ndarray, label: int) -> PatientRecord:
    pid = ids.patient(i)
    zt, zi, zx = (float(v) for v in z)
    ref = AD_REFERENCE
    age = float(np.clip(73.0 + 6.0 * zt + 5.5 * rng.standard_normal(), 50, 96))
    excluded = None
    if rng.random() < 0.02:
        age = float(rng.uniform(42, 49.5))  # under the task's min_age: excluded
        excluded = "younger than 50 at the reference date"
    gender = "female" if rng.random() < 0.55 else "male"
    res: list[Resource] = [refs.patient(pid, gender, _birth(ref, age, rng), None)]

    n_visits = int(rng.integers(1, 4))
    visits = sorted(ref - _days(rng, 20, 1700) - _minutes(rng, 8 * 60, 17 * 60)
                    for _ in range(n_visits))
    for k, when in enumerate(visits):
        eid = ids.child(pid, f"e{k}")
        res.append(refs.encounter(eid, pid, "AMB", "185349003", when, when + timedelta(minutes=20)))
        if k == 0:
            edu = float(np.clip(np.rint(14.0 - 2.0 * zt + 2.2 * rng.standard_normal()), 6, 22))
            res.append(refs.observation(ids.child(pid, "edu"), pid, "82590-1", when, int(edu), "a",
                                        encounter=eid))
        if rng.random() > 0.05:
            res.append(refs.bp_panel(ids.child(pid, f"bp{k}"), pid, when,
                                     _value(136 + 5.0 * zt + 14 * rng.standard_normal(), 0),
                                     _value(80 + 9 * rng.standard_normal(), 0), encounter=eid))
        for name, (codes, unit, dec, missing, fn) in _AD_OBS.items():
            if rng.random() < missing:
                continue
            code = codes[1] if site.alt_codes else codes[0]
            res.append(refs.observation(ids.child(pid, f"{name}{k}"), pid, code, when,
                                        _value(fn(zt, rng.standard_normal()), dec), unit,
                                        encounter=eid))
    first = visits[0]
    for k, (code, display, base, slope) in enumerate(_AD_COMORBID):
        if rng.random() < _sigmoid(base + slope * zt + 0.03 * (age - 73.0)):
            res.append(refs.condition(ids.child(pid, f"c{k}"), pid, code,
                                      first - _days(rng, 0, 5000), display=display))
    onset: datetime | None = None
    if not site.labels_csv:
        if label:
            code = "26929004" if rng.random() < 0.6 else "230265002"
            onset = ref - _days(rng, 60, 1500)
            res.append(refs.condition(ids.child(pid, "ad"), pid, code, onset,
                                      display="Alzheimer's disease"))
        elif rng.random() < 0.06:  # incident after the reference date: negative at the index
            res.append(refs.condition(ids.child(pid, "ad"), pid, "26929004",
                                      ref + _days(rng, 30, 700), display="Alzheimer's disease"))
    # cognitive score recorded after the reference date: never a feature (a leakage trap)
    if rng.random() < 0.5:
        res.append(refs.observation(ids.child(pid, "mmse"), pid, "72106-8",
                                    ref + _days(rng, 20, 300),
                                    int(np.clip(28 - 7 * label + 2 * rng.standard_normal(), 5, 30)),
                                    "{score}"))
    record = PatientRecord(pid=pid, resources=res, label=label, excluded=excluded,
                           latents=(zt, zi, zx))
    # the note is written before any diagnosis, for positives as for negatives: a note dated
    # after the diagnosis is (rightly) not a feature, and dropping it for positives only would
    # make "has a note" give the label away
    note_time = visits[-1] + timedelta(minutes=15)
    if onset is not None and note_time >= onset:
        note_time = onset - timedelta(days=1, minutes=-15)
    record.notes.append((_text.alzheimers_note(zx, rng), note_time, "primary_care_note"))
    if rng.random() >= site.image_missing:
        record.image = _images.brain_mri(zi + 0.25 * rng.standard_normal(), rng,
                                         site.image_size, site.acquisition)
        record.image_time = ref - _days(rng, 30, 900) - _minutes(rng, 8 * 60, 17 * 60)
    return record


# --------------------------------------------------------------------------- sites


#: the sample tasks' keys in the generators' seeds
_TASK_KEYS = {"covid_oxygen": 1, "alzheimers": 2}
#: extra seed key of the COVID-19 encounter stream (class and stay)
_ENCOUNTER_STREAM = 1


def _site_signal(task: str, site: SiteSpec, seed: int, site_index: int
                 ) -> tuple[np.random.Generator, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, _TASK_KEYS[task], site_index])
    z, risk = _latents(rng, site.n)
    return rng, z, risk, _rank_labels(risk, site.prevalence)


def site_signal(task: str, site: SiteSpec, seed: int, site_index: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """The latents and labels of one site, without writing anything (fast).

    Parameters
    ----------
    task, site, seed, site_index
        As for :func:`simulate_site`.

    Returns
    -------
    tuple of numpy.ndarray
        ``(n, 3)`` latents (tabular, image, text) and the ``(n,)`` 0/1 labels that
        :func:`simulate_site` gives the same patients.
    """
    _, z, _, labels = _site_signal(task, site, seed, site_index)
    return z, labels


def simulate_site(task: str, site: SiteSpec, seed: int, site_index: int, *,
                  leaky_encounters: bool = False) -> list[PatientRecord]:
    """Simulate every patient of one site.

    Parameters
    ----------
    task
        ``covid_oxygen`` or ``alzheimers``.
    site
        The site's specification.
    seed
        Generation seed; each site draws from its own generator seeded by
        ``(seed, task, site index)``.
    site_index
        Position of the site within the task.
    leaky_encounters
        COVID-19 only: make the presentation encounter's class and stay follow the 72 h
        label, as generator 1.0 did (a negative control; off by default). See
        :class:`EncounterDraw`.

    Returns
    -------
    list of PatientRecord
        The site's patients, in id order.
    """
    return list(iter_site(task, site, seed, site_index, leaky_encounters=leaky_encounters))


def iter_site(task: str, site: SiteSpec, seed: int, site_index: int, *,
              leaky_encounters: bool = False) -> Iterator[PatientRecord]:
    """The patients of :func:`simulate_site`, one at a time (the same draws, in the same order).

    A writer that consumes them one by one holds one patient's image at a time.
    """
    rng, z, risk, labels = _site_signal(task, site, seed, site_index)
    ids = _Ids(seed, task, site)
    refs = Refs(site.refs, tz_hours=site.tz_hours)
    if task == "covid_oxygen":
        labels_72 = _rank_labels(risk, site.prevalence + LATE_SHARE)
        top = _rank_labels(risk, site.prevalence * 0.4)
        encounter = EncounterDraw(
            np.random.default_rng([seed, _TASK_KEYS[task], site_index, _ENCOUNTER_STREAM]),
            leaky=leaky_encounters)
        for i in range(site.n):
            yield _covid_patient(i, site, ids, refs, rng, z[i], int(labels[i]),
                                 int(labels_72[i] and not labels[i]), bool(top[i]), encounter)
        return
    for i in range(site.n):
        yield _ad_patient(i, site, ids, refs, rng, z[i], int(labels[i]))
