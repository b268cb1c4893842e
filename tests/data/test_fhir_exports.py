"""FHIR as hospitals export it: large NDJSON files, nested Bundles, transaction entries
without ids, and notes in another character set.

Each case is one the reader met in real exports: a Bulk Data NDJSON file of hundreds of MB
(read whole, it took 2.5 times its size in memory), a collection of transaction Bundles (a
Bundle whose entries are Bundles), transaction entries that carry no ``id`` but a
``fullUrl: urn:uuid:...`` that the other entries reference, and a note declared
``text/plain; charset=latin-1``.
"""

from __future__ import annotations

import base64
import json
import tracemalloc
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pandas as pd
import pytest

from multimodal_fl.config import DataConfig, TaskSpec, load_task
from multimodal_fl.data import DataError, build_cohort
from multimodal_fl.data.cohort import SiteCohort, build_cohort_from_resources
from multimodal_fl.data.errors import ErrorSink
from multimodal_fl.data.fhir import FHIRReader
from multimodal_fl.data.fhir_json import MAX_BUNDLE_DEPTH, iter_file_resources
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


# --------------------------------------------------------------------------- nested Bundles


def _nested(resources: list[dict[str, Any]], levels: int) -> dict[str, Any]:
    """``resources`` in a Bundle inside ``levels - 1`` collection Bundles (one entry each)."""
    inner = f.bundle(resources, kind="transaction", urn=True)
    for _ in range(levels - 1):
        inner = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": inner}]}
    return inner


@pytest.mark.parametrize("validation", ["task", "all"])
def test_a_collection_of_transaction_bundles_is_read(tmp_path: Path, covid_task: TaskSpec,
                                                     validation: str) -> None:
    """A Bundle whose entries are Bundles: every inner entry is read, with its fullUrl."""
    outer = {"resourceType": "Bundle", "type": "collection", "entry": [
        {"resource": f.bundle(f.covid_patient("a", oxygen_at="2020-03-01T12:00:00Z"),
                              kind="transaction", urn=True)},
        {"resource": f.bundle(f.covid_patient("b"), kind="transaction", urn=True)},
        {"resource": _nested([*f.covid_patient("c")], 3)}]}
    root = tmp_path / "site"
    f.write_json(root / "fhir" / "export.json", outer)
    cohort = build_cohort(root, covid_task, data=DataConfig(validation=validation))  # type: ignore[arg-type]
    assert cohort.skipped == []
    assert sorted(cohort.table.patient_id) == ["a", "b", "c"]
    assert _row(cohort, "a")["label"] == 1 and _row(cohort, "b")["label"] == 0
    assert _row(cohort, "c")["heart_rate"] == 80.0
    assert _row(cohort, "a")["index_time"] == pd.Timestamp("2020-03-01T10:00:00Z")


def test_bundles_nested_too_deep_are_named_and_the_rest_is_read(tmp_path: Path,
                                                                covid_task: TaskSpec) -> None:
    deepest = _nested(f.covid_patient("deep"), MAX_BUNDLE_DEPTH)  # in `outer`: one too deep
    ok = _nested(f.covid_patient("ok"), MAX_BUNDLE_DEPTH - 1)
    bad_entry = {"resourceType": "Bundle", "id": "inner", "type": "collection", "entry": [
        {"fullUrl": "urn:uuid:nothing"}]}
    outer = {"resourceType": "Bundle", "type": "collection",
             "entry": [{"resource": deepest}, {"resource": ok}, {"resource": bad_entry}]}
    cohort = build_cohort_from_resources([(outer, "export.json")], covid_task)
    assert list(cohort.table.patient_id) == ["ok"]
    path = ".".join(["entry[0].resource"] * (MAX_BUNDLE_DEPTH - 1)) + ".entry[0]"
    assert [(s.file, s.resource_id, s.field, s.reason) for s in cohort.skipped] == [
        ("export.json", path, "entry.resource", "bundle_too_deep"),
        ("export.json", "entry[2].resource.entry[0]", "entry.resource.resourceType",
         "not_fhir")]
    assert f"nested {MAX_BUNDLE_DEPTH + 1} levels deep" in cohort.skipped[0].detail
    with pytest.raises(DataError, match=r"export.json: resource 'entry\[0\]\.resource\..*', "
                                        r"field 'entry.resource': a Bundle nested"):
        build_cohort_from_resources([(outer, "export.json")], covid_task,
                                    data=DataConfig(on_error="fail"))


# --------------------------------------------------------------------------- transactions

PATIENT_UUID = "6f1e4c1a-3d2b-4f5e-9a7c-0b1d2e3f4a5b"
ENCOUNTER_UUID = "9c8b7a6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"


def _transaction_without_ids() -> dict[str, Any]:
    """A transaction Bundle as a client POSTs it: no resource has an id; each entry has a
    ``fullUrl: urn:uuid:...`` and the others reference it by that."""
    res = f.covid_patient("p", oxygen_at="2020-03-01T12:00:00Z")
    uuids = {"p": PATIENT_UUID, "p-enc": ENCOUNTER_UUID}
    entries = []
    for i, r in enumerate(res):
        uuid = uuids.get(r["id"], f"00000000-0000-4000-8000-00000000000{i}")
        r = {k: v for k, v in r.items() if k != "id"}
        for key in ("subject", "patient"):
            if key in r:
                r[key] = {"reference": f"urn:uuid:{PATIENT_UUID}"}
        if "encounter" in r:
            r["encounter"] = {"reference": f"urn:uuid:{ENCOUNTER_UUID}"}
        entries.append({"fullUrl": f"urn:uuid:{uuid}", "resource": r,
                        "request": {"method": "POST", "url": r["resourceType"]}})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


@pytest.mark.parametrize("validation", ["task", "all"])
def test_transaction_entries_without_ids_take_them_from_their_urn_uuid(
        covid_task: TaskSpec, validation: str) -> None:
    """The fullUrl names the resource for the references of the Bundle: the patient is the
    uuid, its Condition finds its Encounter, its label and features reach it."""
    cohort = build_cohort_from_resources(
        [(_transaction_without_ids(), "tx.json")], covid_task,
        data=DataConfig(validation=validation))  # type: ignore[arg-type]
    assert cohort.skipped == []
    row = _row(cohort, PATIENT_UUID)
    assert row["label"] == 1 and row["heart_rate"] == 80.0
    assert row["index_time"] == pd.Timestamp("2020-03-01T10:00:00Z")


def test_an_entry_without_an_id_or_a_fullurl_naming_one_is_still_reported(
        covid_task: TaskSpec) -> None:
    """A Patient with no id and no fullUrl, or a fullUrl naming another type, stays
    ``no_id``."""
    bundle = _transaction_without_ids()
    del bundle["entry"][0]["fullUrl"]
    cohort = build_cohort_from_resources([(bundle, "tx.json")], covid_task)
    assert cohort.counts["skipped_by_reason"]["no_id"] == 1
    assert cohort.table.empty
    bundle["entry"][0]["fullUrl"] = f"https://ehr.example.org/fhir/Group/{PATIENT_UUID}"
    cohort = build_cohort_from_resources([(bundle, "tx.json")], covid_task)
    assert cohort.counts["skipped_by_reason"]["no_id"] == 1


BASE = "https://ehr.example.org/fhir"


def _searchset_without_ids(*, history: bool) -> dict[str, Any]:
    """A searchset as a server returns it, entries without ``id`` beside their RESTful
    fullUrl (``BASE/Type/id``, version-specific when ``history``); the Encounter is
    referenced by that absolute URL, the Patient as ``Patient/id``."""
    entries = []
    for r in f.covid_patient("p 1", oxygen_at="2020-03-01T12:00:00Z"):
        rid = r.pop("id")
        for key in ("subject", "patient"):
            if key in r:
                r[key] = {"reference": "Patient/p%201"}
        if "encounter" in r:
            r["encounter"] = {"reference": f"{BASE}/Encounter/p-enc"}
        version = "/_history/2" if history else ""
        entries.append({"fullUrl": f"{BASE}/{r['resourceType']}/{quote(rid, safe='')}{version}",
                        "resource": r, "search": {"mode": "match"}})
    return {"resourceType": "Bundle", "type": "searchset", "entry": entries}


@pytest.mark.parametrize("history", [False, True])
def test_searchset_entries_without_ids_take_them_from_their_restful_fullurl(
        covid_task: TaskSpec, history: bool) -> None:
    """``https://host/fhir/Patient/p%201`` names Patient ``p 1``: it is joined, and its
    Condition finds its Encounter through the absolute reference."""
    cohort = build_cohort_from_resources(
        [(_searchset_without_ids(history=history), "search.json")], covid_task)
    assert cohort.counts["skipped_by_reason"].get("no_id", 0) == 0
    row = _row(cohort, "p 1")
    assert row["label"] == 1 and row["heart_rate"] == 80.0
    assert row["index_time"] == pd.Timestamp("2020-03-01T10:00:00Z")


# --------------------------------------------------------------------------- charsets

FRENCH = "Patiente fébrile, toux sèche depuis trois jours, à surveiller"


def _latin1_site(tmp_path: Path, content_type: str, *, text: str = FRENCH) -> Path:
    """A patient with a base64 note, a note file and a report, all in ``content_type``."""
    root = tmp_path / "site"
    data = base64.b64encode(text.encode("latin-1")).decode()
    doc = f.document("n1", "p", None, "2020-03-01T09:00:00Z")
    doc["content"] = [{"attachment": {"contentType": content_type, "data": data}},
                      {"attachment": {"contentType": content_type, "url": "notes/p.txt"}}]
    report = f.report("r1", "p", "", "2020-03-01T09:30:00Z")
    del report["conclusion"]
    report["presentedForm"] = [{"contentType": content_type, "data": data}]
    f.write_json(root / "fhir" / "p.json", f.bundle(f.covid_patient("p", extra=[doc, report])))
    (root / "notes").mkdir()
    (root / "notes" / "p.txt").write_bytes(("file: " + text).encode("latin-1"))
    return root


@pytest.mark.parametrize("content_type", ["text/plain; charset=latin-1",
                                          'text/plain; charset="ISO-8859-1"',
                                          "text/plain;charset=windows-1252"])
def test_a_note_is_decoded_in_its_declared_charset(tmp_path: Path, covid_task: TaskSpec,
                                                   content_type: str) -> None:
    cohort = build_cohort(_latin1_site(tmp_path, content_type), covid_task)
    assert cohort.skipped == []
    assert sorted(_row(cohort, "p")["notes"]) == sorted([FRENCH, FRENCH, "file: " + FRENCH])


def test_a_note_without_a_charset_is_utf8(tmp_path: Path, covid_task: TaskSpec) -> None:
    """Latin-1 bytes declared as nothing are not UTF-8: reported as before, never guessed."""
    cohort = build_cohort(_latin1_site(tmp_path, "text/plain"), covid_task)
    assert _row(cohort, "p")["notes"] == []
    assert [(s.resource_id, s.field, s.reason) for s in cohort.skipped] == [
        ("n1", "content[0].attachment.data", "bad_attachment"),
        ("r1", "presentedForm[0].data", "bad_attachment"),
        ("n1", "content.attachment.url", "unreadable_file")]
    assert "base64-encoded UTF-8 text" in cohort.skipped[0].detail
    root = _latin1_site(tmp_path / "utf8", "text/plain", text="plain ascii")
    assert len(_row(build_cohort(root, covid_task), "p")["notes"]) == 3


@pytest.mark.parametrize("charset", ["klingon", "rot13", ""])
def test_an_unknown_charset_is_named_and_the_rest_is_read(tmp_path: Path, covid_task: TaskSpec,
                                                          charset: str) -> None:
    root = _latin1_site(tmp_path, f"text/plain; charset={charset}")
    cohort = build_cohort(root, covid_task)
    row = _row(cohort, "p")
    assert row["notes"] == [] and row["heart_rate"] == 80.0
    assert [(s.file, s.resource_id, s.field, s.reason) for s in cohort.skipped] == [
        ("fhir/p.json", "n1", "content[0].attachment.contentType", "unknown_charset"),
        ("fhir/p.json", "n1", "content[1].attachment.contentType", "unknown_charset"),
        ("fhir/p.json", "r1", "presentedForm[0].contentType", "unknown_charset")]
    assert f"charset '{charset}'" in cohort.skipped[0].detail
    with pytest.raises(DataError, match=r"fhir/p.json: resource 'n1', field "
                                        r"'content\[0\].attachment.contentType': .*charset"):
        build_cohort(root, covid_task, data=DataConfig(on_error="fail"))
