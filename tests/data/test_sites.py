"""Site discovery and the path policy (nothing outside the site is read)."""

from __future__ import annotations

from pathlib import Path

import pytest

from multimodal_fl.config import load_task
from multimodal_fl.data import DataError, build_cohort
from multimodal_fl.data.errors import ErrorSink
from multimodal_fl.data.sites import discover_site, resolve_inside


def test_missing_site_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        build_cohort(tmp_path / "nope", load_task("covid_oxygen_24h"))


def test_empty_site_directory(tmp_path: Path) -> None:
    (tmp_path / "site" / "fhir").mkdir(parents=True)
    with pytest.raises(DataError, match="site directory is empty"):
        build_cohort(tmp_path / "site", load_task("covid_oxygen_24h"))


def test_site_path_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        discover_site(tmp_path / "file")


def test_discovery_lists_contract_files(tmp_path: Path) -> None:
    root = tmp_path / "s"
    (root / "fhir" / "sub").mkdir(parents=True)
    (root / "fhir" / "a.json").write_text("{}")
    (root / "fhir" / "sub" / "b.ndjson").write_text("")
    (root / "fhir" / "readme.txt").write_text("")
    (root / "images" / "x").mkdir(parents=True)
    for name in ("a.dcm", "b.nii.gz", "c.PNG", "d.jpeg", "e.txt"):
        (root / "images" / "x" / name).write_bytes(b"")
    (root / "labels.csv").write_text("patient_id,label\n")
    site = discover_site(root)
    assert [p.name for p in site.fhir_files] == ["a.json", "b.ndjson"]
    assert [p.name for p in site.image_files] == ["a.dcm", "b.nii.gz", "c.PNG", "d.jpeg"]
    assert site.labels_csv == root.resolve() / "labels.csv" and site.notes_csv is None


@pytest.mark.parametrize("ref", ["../x.png", "/etc/passwd", "images/../../x.png",
                                 "https://example.org/x.png"])
def test_paths_outside_are_refused(tmp_path: Path, ref: str) -> None:
    sink = ErrorSink()
    assert resolve_inside(tmp_path, ref, file="images.csv", row="row 1", field="path",
                          sink=sink) is None
    assert [s.reason for s in sink.skipped] == ["path_outside_site"]
    assert sink.skipped[0].file == "images.csv" and sink.skipped[0].field == "path"


def test_relative_and_file_url_paths_are_accepted(tmp_path: Path) -> None:
    sink = ErrorSink()
    root = tmp_path.resolve()
    assert resolve_inside(root, "images/a.png", file="f", row="r", field="p",
                          sink=sink) == root / "images" / "a.png"
    assert resolve_inside(root, "file:notes/a.txt", file="f", row="r", field="p",
                          sink=sink) == root / "notes" / "a.txt"
    assert sink.skipped == []
