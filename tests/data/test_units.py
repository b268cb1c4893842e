"""Unit normalisation: conversions between the units labs report, and refusals."""

from __future__ import annotations

import pytest

from multimodal_fl.data.units import UnitError, canonical_unit, convert


@pytest.mark.parametrize(
    ("value", "unit", "target", "expected"),
    [
        (98.6, "[degF]", "Cel", 37.0),
        (98.6, "°F", "Cel", 37.0),
        (37.0, "Cel", "[degF]", 98.6),
        (1.2, "mg/dL", "mg/L", 12.0),  # CRP
        (12.0, "mg/L", "mg/dL", 1.2),
        (7.5, "10*3/uL", "10*9/L", 7.5),
        (7.5, "K/uL", "10*3/uL", 7.5),
        (350.0, "ng/mL", "ug/L", 350.0),  # ferritin
        (0.5, "ug/mL", "mg/L", 0.5),  # D-dimer
        (500.0, "ng/mL", "ug/mL", 0.5),
        (12.0, "pg/mL", "ng/L", 12.0),  # troponin
        (0.012, "ng/mL", "pg/mL", 12.0),
        (13.3322, "kPa", "mm[Hg]", 100.0),
        (88.0, "beats/min", "/min", 88.0),
        (0.97, "1", "%", 97.0),
        (250.0, "cm3", "mL", 250.0),
        (250.0, "cc", "L", 0.25),
        (1.5, "dL", "mL", 150.0),
        (90.0, "fL", "fL", 90.0),  # MCV
        (30.0, "pg", "pg", 30.0),  # MCH
        (250.0, "mg", "g", 0.25),
        (2.0, "L/min", "mL/min", 2000.0),  # oxygen flow
        (2.0, "lpm", "L/min", 2.0),
        (60.0, "mL/h", "mL/min", 1.0),  # urine output
        (75.0, "mL/min/1.73m2", "mL/min/{1.73_m2}", 75.0),  # eGFR
    ],
)
def test_conversions(value: float, unit: str, target: str, expected: float) -> None:
    assert convert(value, unit, target) == pytest.approx(expected, rel=1e-4)


def test_unknown_unit_is_named() -> None:
    with pytest.raises(UnitError, match="unknown unit 'furlongs'"):
        convert(1.0, "furlongs", "mg/L")


@pytest.mark.parametrize(("unit", "target"), [("mmol/L", "mg/dL"), ("mg/dL", "Cel"),
                                              ("10*3/uL", "%"), ("mL", "mL/min"),
                                              ("mL/min", "mL/min/{1.73_m2}"), ("mg", "mL")])
def test_unconvertible_units_are_refused(unit: str, target: str) -> None:
    with pytest.raises(UnitError, match="cannot convert"):
        convert(1.0, unit, target)


def test_canonical_unit_spellings() -> None:
    assert canonical_unit("mmHg") == "mm[Hg]"
    assert canonical_unit(" MG/DL ") == "mg/dL"
