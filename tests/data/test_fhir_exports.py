"""FHIR as hospitals export it: large NDJSON files, nested Bundles, transaction entries
without ids, and notes in another character set.

Each case is one the reader met in real exports: a Bulk Data NDJSON file of hundreds of MB
(read whole, it took 2.5 times its size in memory), a collection of transaction Bundles (a
Bundle whose entries are Bundles), transaction entries that carry no ``id`` but a
``fullUrl: urn:uuid:...`` that the other entries reference, and a note declared
``text/plain; charset=latin-1``.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pandas as pd
import pytest

from multimodal_fl.config import TaskSpec, load_task
from multimodal_fl.data.cohort import SiteCohort
from multimodal_fl.data.errors import ErrorSink
from multimodal_fl.data.fhir import FHIRReader
from multimodal_fl.data.fhir_json import iter_file_resources
from tests.data import factory as f


@pytest.fixture(scope="module")
def covid_task() -> TaskSpec:
    return load_task("covid_oxygen_24h")


def _row(cohort: SiteCohort, pid: str) -> pd.Series:
    rows = cohort.table[cohort.table.patient_id == pid]
    assert len(rows) == 1, f"patient {pid!r} not in the cohort: {list(cohort.table.patient_id)}"
    return rows.iloc[0]


# --------------------------------------------------------------------------- NDJSON


def _unused_lines(n: int) -> list[bytes]:
    """``n`` NDJSON lines of Observations the COVID-19 task does not use (a step count)."""
    return [json.dumps(f.observation(f"steps-{i}", "p", "55423-8", 9000.0 + i, "{steps}",
                                     "2020-03-01T09:00:00Z")).encode() for i in range(n)]


def test_ndjson_is_read_a_line_at_a_time(tmp_path: Path, covid_task: TaskSpec) -> None:
    """The reader's peak memory is a small part of the file, not 2.5 times it."""
    path = tmp_path / "Observation.ndjson"
    path.write_bytes(b"\n".join(_unused_lines(12_000)) + b"\n")
    size = path.stat().st_size
    assert size > 4_000_000
    reader = FHIRReader(covid_task, ErrorSink())
    tracemalloc.start()
    try:
        reader.read_file(path, "Observation.ndjson")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reader.records.counts["resources_read"] == 12_000
    assert reader.records.counts["resources_not_used"] == 12_000
    # read whole, the bytes alone are the file's size; a line at a time, a few kB
    assert peak < size / 10, f"peak {peak} bytes reading a {size}-byte NDJSON file"


def test_ndjson_lines_keep_their_numbers_and_endings(tmp_path: Path) -> None:
    """Read a line at a time, the lines and their numbers are those of the whole file:
    ``\\r\\n`` and a lone ``\\r`` end a line, blank lines count, a bad line is named."""
    obs = [json.dumps(f.observation(f"o{i}", "p", "8867-4", 80.0, "/min",
                                    "2020-03-01T09:00:00Z")).encode() for i in range(4)]
    path = tmp_path / "o.ndjson"
    path.write_bytes(obs[0] + b"\r\n\n" + obs[1] + b"\r" + b'{"resourceType": "Obs\n'
                     + b"   \n" + obs[2] + b"\n" + b"[1, 2]\n" + obs[3])
    sink = ErrorSink()
    got = [res["id"] for res, _ in iter_file_resources(path, "o.ndjson", sink)]
    assert got == ["o0", "o1", "o2", "o3"]
    assert [(s.resource_id, s.field, s.reason) for s in sink.skipped] == [
        ("line 4", "<json>", "invalid_json"), ("line 7", "resourceType", "not_fhir")]
    assert sink.skipped[0].detail.startswith("line 4 is not valid JSON (")
