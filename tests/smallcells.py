"""Checks shared by the disclosure tests: numbers in JSON documents, figures on small cells."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from multimodal_fl.federated.disclosure import small_cells


def json_numbers(doc: Any) -> Iterator[float]:
    """Every number (int or float, not bool) anywhere in a parsed JSON document."""
    if isinstance(doc, bool) or doc is None:
        return
    if isinstance(doc, int | float):
        yield float(doc)
    elif isinstance(doc, dict):
        for value in doc.values():
            yield from json_numbers(value)
    elif isinstance(doc, list):
        for value in doc:
            yield from json_numbers(value)


def small_figures(doc: Any, min_cell: int, path: str = "") -> list[str]:
    """Where a document shows a figure on fewer than ``min_cell`` patients.

    A count in ``(0, min_cell)`` (:func:`~multimodal_fl.federated.disclosure.small_cells`), a
    value whose cell's ``n`` is missing or below ``min_cell``, or a count of positives whose
    complement in its cell is small.
    """
    found = [p for p in small_cells(doc, min_cell, path)]
    if isinstance(doc, dict):
        n = doc.get("n")
        if doc.get("value") is not None and "n" in doc and not (
                isinstance(n, int) and n >= min_cell):
            found.append(f"{path}/value")
        if isinstance(n, int) and isinstance(doc.get("n_pos"), int):
            rest = n - doc["n_pos"]
            if 0 < rest < min_cell:
                found.append(f"{path}/n_pos")
        for key, value in doc.items():
            found += [p for p in small_figures(value, min_cell, f"{path}/{key}")
                      if p not in found]
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            found += small_figures(value, min_cell, f"{path}/{i}")
    return sorted(set(found))
