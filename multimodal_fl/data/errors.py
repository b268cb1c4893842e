"""Errors and skip records of the data layer.

A bad file or record is either skipped and counted (``on_error: skip``) or stops the run
with a :class:`DataError` (``on_error: fail``). Both name the file, the resource id and the
field, and say what would have been accepted.

A *note* is a record that was kept although it bends the standard in a way the reader
knows how to read (an id outside FHIR's id pattern, a dimensionless value written without
a unit): it is counted and listed like a skip, under either policy, and never stops a run.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["DataError", "ErrorSink", "Skip"]


@dataclass(frozen=True)
class Skip:
    """One skipped file or record.

    Parameters
    ----------
    file
        The file it came from (site-relative where possible).
    resource_id
        The FHIR resource id (or CSV row / image path), ``""`` when unknown.
    field
        The offending field (``"subject"``, ``"valueQuantity.unit"``, ``"<file>"`` ...).
    reason
        A short category used for counting (``"invalid_json"``, ``"unknown_unit"`` ...).
    detail
        The human-readable message.
    """

    file: str
    resource_id: str
    field: str
    reason: str
    detail: str = ""

    def message(self) -> str:
        """The one-line message naming file, resource id and field."""
        rid = self.resource_id or "-"
        return f"{self.file}: resource '{rid}', field '{self.field}': {self.detail or self.reason}"

    def to_dict(self) -> dict[str, str]:
        """JSON-ready mapping."""
        return asdict(self)


class DataError(Exception):
    """Bad site data with ``on_error: fail`` (or a site that cannot be read at all).

    Parameters
    ----------
    message
        What was wrong and what would be accepted.
    skip
        The structured record (file, resource id, field, reason), when there is one.
    """

    def __init__(self, message: str, skip: Skip | None = None) -> None:
        super().__init__(message)
        self.skip = skip

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle with the skip record (a pool worker's error reaches the caller whole)."""
        return type(self), (str(self), self.skip)

    @classmethod
    def from_skip(cls, skip: Skip) -> DataError:
        """Build the error raised for ``skip`` under ``on_error: fail``."""
        return cls(skip.message(), skip)


@dataclass
class ErrorSink:
    """Collects skips under the site's error policy.

    Parameters
    ----------
    on_error
        ``"skip"``: record and go on; ``"fail"``: raise :class:`DataError` at once.
    """

    on_error: Literal["skip", "fail"] = "skip"
    skipped: list[Skip] = field(default_factory=list)
    by_reason: Counter[str] = field(default_factory=Counter)
    noted: list[Skip] = field(default_factory=list)
    noted_by_reason: Counter[str] = field(default_factory=Counter)

    def report(
        self, file: str, resource_id: str, field: str, reason: str, detail: str = ""
    ) -> None:
        """Record a skip, or raise under ``on_error: fail``."""
        skip = Skip(file, resource_id, field, reason, detail)
        if self.on_error == "fail":
            raise DataError.from_skip(skip)
        self.skipped.append(skip)
        self.by_reason[reason] += 1

    def note(
        self, file: str, resource_id: str, field: str, reason: str, detail: str = ""
    ) -> None:
        """Record a kept record that needed a lenient reading; never raises.

        Parameters
        ----------
        file, resource_id, field, reason, detail
            As for :meth:`report`; ``reason`` names the leniency (``"nonconforming_id"``,
            ``"unitless_value"``).
        """
        self.noted.append(Skip(file, resource_id, field, reason, detail))
        self.noted_by_reason[reason] += 1

    def summary(self) -> dict[str, Any]:
        """Counts by reason and the list of skips, then of notes (JSON-ready)."""
        return {
            "by_reason": dict(sorted(self.by_reason.items())),
            "records": [s.to_dict() for s in self.skipped],
            "noted_by_reason": dict(sorted(self.noted_by_reason.items())),
            "noted": [s.to_dict() for s in self.noted],
        }
