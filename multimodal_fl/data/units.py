"""Unit normalisation to one canonical UCUM unit per feature.

A small hand-written table of the units clinical observations use (UCUM codes plus the
common free-text spellings). Why not a library: ``pint`` does not parse UCUM syntax
(``10*3/uL``, ``[degF]``, ``mm[Hg]``, ``Cel``, ``{beats}/min``), and ``ucumvert`` (UCUM on
top of pint) is not available from the package index this project uses; the table below is
short, explicit and tested. A unit that is unknown, or known but of another dimension than
the target (e.g. ``mmol/L`` to ``mg/dL``, which needs the analyte's molar mass), raises
:class:`UnitError`: it is reported, never guessed.

Dimensionless units. A UCUM annotation alone (``{score}``, ``{ratio}``) is a unit of its own:
it converts only to the same annotation, never to ``1`` or ``%``. A value written without a
unit is taken only for a feature whose unit is ``1`` or such an annotation
(:func:`accepts_unitless`): a missing ``%`` or ``mg/dL`` could be a fraction, a percentage
or another unit, so it is never assumed.
"""

from __future__ import annotations

import re

__all__ = ["UnitError", "accepts_unitless", "canonical_unit", "convert"]


class UnitError(ValueError):
    """A unit is unknown or cannot be converted to the feature's unit."""


# a UCUM annotation standing alone: curly braces around anything but braces
_ANNOTATION = re.compile(r"^\{[^{}]*\}$")


# unit -> (dimension, factor to the dimension's base unit)
_LINEAR: dict[str, tuple[str, float]] = {
    # mass concentration, base g/L
    "g/L": ("mass_conc", 1.0),
    "g/dL": ("mass_conc", 10.0),
    "mg/mL": ("mass_conc", 1.0),
    "mg/dL": ("mass_conc", 1e-2),
    "mg/L": ("mass_conc", 1e-3),
    "ug/mL": ("mass_conc", 1e-3),
    "ug/dL": ("mass_conc", 1e-5),
    "ug/L": ("mass_conc", 1e-6),
    "ng/mL": ("mass_conc", 1e-6),
    "ng/dL": ("mass_conc", 1e-8),
    "ng/L": ("mass_conc", 1e-9),
    "pg/mL": ("mass_conc", 1e-9),
    "mg{FEU}/L": ("mass_conc", 1e-3),
    "ug{FEU}/mL": ("mass_conc", 1e-3),
    "ng{FEU}/mL": ("mass_conc", 1e-6),
    # number concentration, base /L
    "/L": ("num_conc", 1.0),
    "10*9/L": ("num_conc", 1e9),
    "10*12/L": ("num_conc", 1e12),
    "10*3/uL": ("num_conc", 1e9),
    "10*6/uL": ("num_conc", 1e12),
    "/uL": ("num_conc", 1e6),
    "/mm3": ("num_conc", 1e6),
    "10*3/mm3": ("num_conc", 1e9),
    # substance concentration, base mol/L
    "mol/L": ("subst_conc", 1.0),
    "mmol/L": ("subst_conc", 1e-3),
    "umol/L": ("subst_conc", 1e-6),
    "nmol/L": ("subst_conc", 1e-9),
    # catalytic concentration, base U/L
    "U/L": ("cat_conc", 1.0),
    "[IU]/L": ("cat_conc", 1.0),
    "kU/L": ("cat_conc", 1e3),
    "U/mL": ("cat_conc", 1e3),
    # rates, base /min
    "/min": ("rate", 1.0),
    "/s": ("rate", 60.0),
    "/h": ("rate", 1 / 60),
    # fraction, base %
    "%": ("fraction", 1.0),
    "1": ("fraction", 100.0),
    # pressure, base mm[Hg]
    "mm[Hg]": ("pressure", 1.0),
    "kPa": ("pressure", 7.500617),
    "Pa": ("pressure", 7.500617e-3),
    # mass, base kg (pg: mean corpuscular haemoglobin)
    "kg": ("mass", 1.0),
    "g": ("mass", 1e-3),
    "mg": ("mass", 1e-6),
    "ug": ("mass", 1e-9),
    "pg": ("mass", 1e-15),
    "[lb_av]": ("mass", 0.45359237),
    # volume, base L (fL: mean corpuscular volume; cm3 is mL)
    "L": ("volume", 1.0),
    "dL": ("volume", 1e-1),
    "mL": ("volume", 1e-3),
    "cm3": ("volume", 1e-3),
    "uL": ("volume", 1e-6),
    "fL": ("volume", 1e-15),
    # volume flow, base L/min (oxygen flow, urine output)
    "L/min": ("flow", 1.0),
    "mL/min": ("flow", 1e-3),
    "L/h": ("flow", 1 / 60),
    "mL/h": ("flow", 1e-3 / 60),
    # body-surface-normalised filtration (eGFR), its own dimension
    "mL/min/{1.73_m2}": ("egfr", 1.0),
    # length, base m
    "m": ("length", 1.0),
    "cm": ("length", 1e-2),
    "mm": ("length", 1e-3),
    "[in_i]": ("length", 0.0254),
    # area density, base kg/m2
    "kg/m2": ("bmi", 1.0),
    # time, base a (years)
    "a": ("time", 1.0),
    "mo": ("time", 1 / 12),
    "wk": ("time", 7 / 365.25),
    "d": ("time", 1 / 365.25),
    # dimensionless scores
    "{score}": ("score", 1.0),
}

# temperature: unit -> (scale, offset) such that Cel = value * scale + offset
_TEMPERATURE: dict[str, tuple[float, float]] = {
    "Cel": (1.0, 0.0),
    "[degF]": (5.0 / 9.0, -32.0 * 5.0 / 9.0),
    "K": (1.0, -273.15),
}

# free-text spellings -> UCUM code
_SYNONYMS: dict[str, str] = {
    "°c": "Cel", "degc": "Cel", "celsius": "Cel", "deg c": "Cel",
    "°f": "[degF]", "degf": "[degF]", "fahrenheit": "[degF]", "deg f": "[degF]",
    "mmhg": "mm[Hg]", "mm hg": "mm[Hg]",
    "beats/min": "/min", "{beats}/min": "/min", "breaths/min": "/min", "{breaths}/min": "/min",
    "bpm": "/min", "per min": "/min", "1/min": "/min",
    "k/ul": "10*3/uL", "x10^3/ul": "10*3/uL", "10^3/ul": "10*3/uL", "10e3/ul": "10*3/uL",
    "thou/ul": "10*3/uL", "x10^9/l": "10*9/L", "10^9/l": "10*9/L", "g/l": "g/L",
    "iu/l": "[IU]/L", "u/l": "U/L", "ui/l": "U/L",
    "lb": "[lb_av]", "lbs": "[lb_av]", "in": "[in_i]", "years": "a", "year": "a", "yr": "a",
    "kg/m^2": "kg/m2", "percent": "%",
    "cc": "mL", "ccm": "mL", "lpm": "L/min", "l/min": "L/min",
    "ml/min/1.73m2": "mL/min/{1.73_m2}", "ml/min/1.73 m2": "mL/min/{1.73_m2}",
    "ml/min/1.73m^2": "mL/min/{1.73_m2}", "ml/min/{1.73_m2}": "mL/min/{1.73_m2}",
}


def canonical_unit(unit: str) -> str:
    """Map a UCUM code or a common free-text spelling to the UCUM code this table uses.

    Parameters
    ----------
    unit
        ``valueQuantity.code`` or ``valueQuantity.unit``.

    Returns
    -------
    str
        The UCUM code.

    Raises
    ------
    UnitError
        When the unit is not in the table.
    """
    u = unit.strip()
    if u in _LINEAR or u in _TEMPERATURE:
        return u
    if _ANNOTATION.match(u) and u.lower() not in _SYNONYMS \
            and all(code.lower() != u.lower() for code in _LINEAR):
        return u  # an annotation of its own: only ever equal to itself
    low = re.sub(r"\s+", " ", u.lower())
    if low in _SYNONYMS:
        return _SYNONYMS[low]
    for code in (*_LINEAR, *_TEMPERATURE):
        if code.lower() == low:
            return code
    known = ", ".join(sorted((*_LINEAR, *_TEMPERATURE)))
    raise UnitError(f"unknown unit '{unit}' (known UCUM units: {known})")


def convert(value: float, unit: str, target: str) -> float:
    """Convert ``value`` from ``unit`` to the UCUM unit ``target``.

    Parameters
    ----------
    value
        The measured value.
    unit
        Its unit (UCUM code or common spelling).
    target
        The feature's canonical UCUM unit.

    Returns
    -------
    float
        The value in ``target``.

    Raises
    ------
    UnitError
        When either unit is unknown or the dimensions differ (no guessing).
    """
    src = canonical_unit(unit)
    dst = canonical_unit(target)
    if src == dst:
        return float(value)
    if src in _TEMPERATURE and dst in _TEMPERATURE:
        s_scale, s_off = _TEMPERATURE[src]
        d_scale, d_off = _TEMPERATURE[dst]
        celsius = value * s_scale + s_off
        return float((celsius - d_off) / d_scale)
    if src in _LINEAR and dst in _LINEAR:
        s_dim, s_fac = _LINEAR[src]
        d_dim, d_fac = _LINEAR[dst]
        if s_dim == d_dim:
            return float(value * s_fac / d_fac)
    raise UnitError(f"cannot convert '{unit}' to '{target}' (different dimensions)")


def accepts_unitless(target: str) -> bool:
    """Whether a value without a unit may be read as being in the feature's unit ``target``.

    Parameters
    ----------
    target
        The feature's canonical UCUM unit.

    Returns
    -------
    bool
        True for the unity ``1`` and for a UCUM annotation alone (``{score}``, ``{ratio}``):
        a count or a ratio is dimensionless whether or not the unit is written. False for
        everything else, ``%`` included (a bare 0.4 could be a fraction or a percentage).
    """
    t = target.strip()
    return t == "1" or _ANNOTATION.match(t) is not None
