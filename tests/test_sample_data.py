"""Tests of the generated sample data (multimodal_fl.sample_data), on the tiny profile."""

from __future__ import annotations

import base64
import csv
import gzip
import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from multimodal_fl.sample_data import (
    GENERATOR_VERSION,
    content_hash,
    content_manifest,
    generate,
)
from multimodal_fl.sample_data._cohorts import simulate_site, site_signal
from multimodal_fl.sample_data._sites import sites_for
from tests.scripts import load_script

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    start = time.perf_counter()
    generate(out, seed=0, profile="tiny")
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, f"tiny profile took {elapsed:.1f} s"
    return out


def _resources(site: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in sorted((site / "fhir").rglob("*")):
        if p.suffix == ".ndjson":
            out += [json.loads(line) for line in p.read_text().splitlines() if line]
        elif p.suffix == ".json":
            obj = json.loads(p.read_text())
            out += [e["resource"] for e in obj["entry"]] if obj["resourceType"] == "Bundle" else [
                obj]
    return out


def _dt(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _pid(ref: dict[str, str]) -> str:
    return ref["reference"].split(":")[-1].split("/")[-1]


def test_layout_and_every_route(tiny: Path) -> None:
    covid, ad = tiny / "covid_oxygen", tiny / "alzheimers"
    assert sorted(p.name for p in covid.iterdir()) == ["site_a", "site_b", "site_c"]
    assert sorted(p.name for p in ad.iterdir()) == ["site_a", "site_b", "site_c"]
    assert (tiny / "MANIFEST.json").is_file() and (tiny / "README.md").is_file()
    # Bundles of more than one type, NDJSON, single resources
    types = set()
    for p in tiny.rglob("fhir/*.json"):
        types.add(json.loads(p.read_text())["resourceType"] + ":" +
                  json.loads(p.read_text()).get("type", ""))
    assert {"Bundle:transaction", "Bundle:collection", "Bundle:searchset"} <= types
    assert (covid / "site_b/fhir/Patient.ndjson").is_file()
    assert list((ad / "site_c/fhir/Patient").glob("*.json"))
    # images.csv, ImagingStudy, DICOM PatientID
    assert (covid / "site_c/images.csv").is_file() and (ad / "site_b/images.csv").is_file()
    kinds = {r["resourceType"] for s in (covid / "site_b", ad / "site_a") for r in _resources(s)}
    assert "ImagingStudy" in kinds
    assert list((covid / "site_a/images").glob("*.dcm"))
    # notes: base64 DocumentReference, url DocumentReference, DiagnosticReport, notes.csv
    attachments = [r["content"][0]["attachment"] for r in _resources(covid / "site_a")
                   if r["resourceType"] == "DocumentReference"]
    assert attachments and all("data" in a for a in attachments)
    urls = [r["content"][0]["attachment"]["url"] for r in _resources(covid / "site_b")
            if r["resourceType"] == "DocumentReference"]
    assert urls and all((covid / "site_b" / u).is_file() for u in urls)
    reports = [r for r in _resources(covid / "site_c") if r["resourceType"] == "DiagnosticReport"]
    assert any("presentedForm" in r for r in reports) and any("conclusion" in r for r in reports)
    assert (ad / "site_b/notes.csv").is_file()
    # labels.csv (research cohort) and a site without notes
    assert (ad / "site_c/labels.csv").is_file()
    assert not [r for r in _resources(ad / "site_c")
                if r["resourceType"] in {"DocumentReference", "DiagnosticReport"}]


def test_same_seed_same_content_other_seed_differs(tiny: Path, tmp_path: Path) -> None:
    generate(tmp_path / "again", seed=0, profile="tiny")
    first = content_manifest(tiny)
    assert content_manifest(tmp_path / "again") == first
    recorded = json.loads((tiny / "MANIFEST.json").read_text())
    assert recorded["files"] == first and recorded["generator_version"] == GENERATOR_VERSION
    generate(tmp_path / "other", seed=1, profile="tiny")
    other = content_manifest(tmp_path / "other")
    assert other != first


def test_content_hash_ignores_container_metadata(tiny: Path, tmp_path: Path) -> None:
    png = next((tiny / "covid_oxygen/site_b/images").glob("*.png"))
    copy = tmp_path / png.name
    Image.open(png).save(copy, format="PNG", compress_level=0)
    assert copy.read_bytes() != png.read_bytes()
    assert content_hash(copy) == content_hash(png)
    nii = next((tiny / "alzheimers/site_a/images").glob("*.nii.gz"))
    raw = gzip.decompress(nii.read_bytes())
    other = tmp_path / nii.name
    other.write_bytes(gzip.compress(raw, mtime=12345, compresslevel=1))
    assert other.read_bytes() != nii.read_bytes()
    assert content_hash(other) == content_hash(nii)
    # a changed voxel changes the hash
    img = nib.load(str(nii))
    vol = np.asanyarray(img.dataobj).copy()  # type: ignore[attr-defined]
    vol[0, 0, 0] ^= 1
    changed = tmp_path / "changed.nii.gz"
    nib.save(nib.Nifti1Image(vol, img.affine), str(changed))  # type: ignore[attr-defined]
    assert content_hash(changed) != content_hash(nii)


def test_fhir_parses_with_r4b(tiny: Path) -> None:
    from fhir.resources.R4B import get_fhir_model_class

    n = 0
    for site in sorted(tiny.glob("*/site_*")):
        for res in _resources(site):
            get_fhir_model_class(res["resourceType"]).model_validate(res)
            n += 1
    assert n > 1000


def test_codes_units_and_images(tiny: Path) -> None:
    covid = tiny / "covid_oxygen"
    units: dict[str, set[str]] = {}
    for site in ("site_a", "site_c"):
        for r in _resources(covid / site):
            if r["resourceType"] == "Observation" and "valueQuantity" in r:
                code = r["code"]["coding"][0]["code"]
                units.setdefault(f"{site}:{code}", set()).add(r["valueQuantity"]["code"])
    assert units["site_a:8310-5"] == {"Cel"} and units["site_a:1988-5"] == {"mg/L"}
    assert units["site_c:8331-1"] == {"[degF]"} and units["site_c:1988-5"] == {"mg/dL"}
    temps = [r["valueQuantity"]["value"] for r in _resources(covid / "site_c")
             if r["resourceType"] == "Observation" and r["code"]["coding"][0]["code"] == "8331-1"]
    assert 95.0 < float(np.median(temps)) < 104.0
    patients = {r["id"] for r in _resources(covid / "site_a") if r["resourceType"] == "Patient"}
    for dcm in (covid / "site_a/images").glob("*.dcm"):
        ds = pydicom.dcmread(dcm)
        assert ds.PatientID in patients and ds.pixel_array.dtype == np.uint8
        assert ds.pixel_array.shape == (32, 32)
    vol = nib.load(str(next((tiny / "alzheimers/site_b/images").glob("*.nii.gz"))))
    assert vol.shape == (16, 16, 16)  # type: ignore[attr-defined]
    assert vol.get_data_dtype() == np.uint8  # type: ignore[attr-defined]


def test_covid_timing_boundaries(tiny: Path) -> None:
    """Notes and images are dated at or before the index; oxygen for positives after it."""
    site = tiny / "covid_oxygen/site_a"
    res = _resources(site)
    enc = {r["id"]: _dt(r["period"]["start"]) for r in res if r["resourceType"] == "Encounter"}
    index = {_pid(r["subject"]): enc[_pid(r["encounter"])] for r in res
             if r["resourceType"] == "Condition" and r["code"]["coding"][0]["code"] == "840539006"}
    notes = [r for r in res if r["resourceType"] == "DocumentReference"]
    presentation = [r for r in notes if r["type"]["coding"][0]["code"] == "34111-5"]
    discharge = [r for r in notes if r["type"]["coding"][0]["code"] == "18842-5"]
    assert presentation and discharge
    assert all(_dt(r["date"]) <= index[_pid(r["subject"])] for r in presentation)
    assert all(_dt(r["date"]) > index[_pid(r["subject"])] for r in discharge)
    after = [r["code"]["coding"][0]["code"] for r in res if r["resourceType"] == "Observation"
             and _dt(r["effectiveDateTime"]) > index[_pid(r["subject"])]]
    assert set(after) == {"59408-5"}  # only the repeat SpO2 (a leakage trap) is after the index
    recs = {r.pid: r for r in simulate_site("covid_oxygen", sites_for("covid_oxygen", "tiny")[0],
                                            0, 0)}
    oxygen = [(_pid(r["subject"]), _dt(r["performedPeriod"]["start"])) for r in res
              if r["resourceType"] == "Procedure"]
    for pid, start in oxygen:
        hours = (start - index[pid]).total_seconds() / 3600
        if recs[pid].excluded:
            continue
        assert hours > 0
        if recs[pid].label:
            assert hours <= 24 + 1.5  # ventilation may follow the mask by up to 1.5 h
        else:
            assert 24 < hours <= 72
    for dcm in (site / "images").glob("*.dcm"):
        ds = pydicom.dcmread(dcm, stop_before_pixels=True)
        assert ds.StudyDate <= index[str(ds.PatientID)].strftime("%Y%m%d")


def test_labels_csv_and_notes_csv(tiny: Path) -> None:
    ad = tiny / "alzheimers"
    with (ad / "site_c/labels.csv").open() as fh:
        labels = {row["patient_id"]: int(row["label"]) for row in csv.DictReader(fh)}
    recs = simulate_site("alzheimers", sites_for("alzheimers", "tiny")[2], 0, 2)
    assert labels == {r.pid: r.label for r in recs}
    with (ad / "site_b/notes.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert rows and all(_dt(r["date"]).year < 2020 for r in rows)
    assert not any("alzheimer" in r["text"].lower() or "dementia" in r["text"].lower()
                   for r in rows)


@pytest.mark.parametrize("task", ["covid_oxygen", "alzheimers"])
def test_signal_model(task: str) -> None:
    """Each latent alone is a partial signal; their sum is a strong one (fixed design)."""
    parts = [site_signal(task, spec, 0, k) for k, spec in enumerate(sites_for(task, "default"))]
    zs = np.vstack([p[0] for p in parts])
    ys = np.concatenate([p[1] for p in parts])
    singles = [roc_auc_score(ys, zs[:, k]) for k in range(3)]
    assert all(0.68 < a < 0.82 for a in singles), singles
    assert roc_auc_score(ys, zs.sum(axis=1)) > max(singles) + 0.1


def test_site_signal_matches_simulation() -> None:
    spec = sites_for("alzheimers", "tiny")[1]
    z, labels = site_signal("alzheimers", spec, 4, 1)
    recs = simulate_site("alzheimers", spec, 4, 1)
    assert np.allclose(z, [r.latents for r in recs])
    assert labels.tolist() == [r.label for r in recs]


def test_text_and_image_follow_their_latent() -> None:
    spec = sites_for("covid_oxygen", "default")[0]
    recs = simulate_site("covid_oxygen", spec, 0, 0)
    words = ("breath", "work of breathing", "accessory", "tachypnoeic", "dyspnoea")
    score = [sum(n[0].lower().count(w) for w in words) for r in recs for n in r.notes]
    zt = [r.latents[2] for r in recs for _ in r.notes]
    assert np.corrcoef(score, zt)[0, 1] > 0.3
    with_img = [r for r in recs if r.image is not None]
    centre = [float(r.image[20:52, 8:56].mean()) for r in with_img]  # type: ignore[index]
    assert np.corrcoef(centre, [r.latents[1] for r in with_img])[0, 1] > 0.3


def test_decoded_note_matches_url_note(tiny: Path) -> None:
    site = tiny / "covid_oxygen/site_b"
    notes = [r for r in _resources(site) if r["resourceType"] == "DocumentReference"]
    text = (site / notes[0]["content"][0]["attachment"]["url"]).read_text()
    assert text.startswith("ED assessment:")
    b64 = next(r for r in _resources(tiny / "covid_oxygen/site_a")
               if r["resourceType"] == "DocumentReference")
    assert base64.b64decode(b64["content"][0]["attachment"]["data"]).decode().startswith("ED")


def test_unknown_profile_and_task_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown profile 'huge'"):
        generate(tmp_path, profile="huge")
    with pytest.raises(ValueError, match="unknown sample task"):
        generate(tmp_path, profile="tiny", tasks=("diabetes",))


def test_reader_agrees_with_generator(tiny: Path) -> None:
    """The data layer's cohorts carry the generator's labels and no post-index note."""
    cohort_mod = pytest.importorskip("multimodal_fl.data.cohort")
    from multimodal_fl.config import load_task

    for task_name, folder, key in (("covid_oxygen_24h", "covid_oxygen", "label"),
                                   ("covid_oxygen_72h", "covid_oxygen", "label_72h"),
                                   ("alzheimers", "alzheimers", "label")):
        task = load_task(task_name)
        for k, spec in enumerate(sites_for(folder, "tiny")):
            recs = {r.pid: r for r in simulate_site(folder, spec, 0, k)}
            table = cohort_mod.build_cohort(tiny / folder / spec.name, task).table
            expected = {p for p, r in recs.items() if r.excluded is None}
            assert set(table["patient_id"]) == expected, (task_name, spec.name)
            for pid, label, notes in zip(table["patient_id"], table["label"], table["notes"],
                                         strict=True):
                assert int(label) == int(getattr(recs[pid], key)), (task_name, spec.name, pid)
                assert not any("Discharge summary" in n for n in notes)


def _encounter_auc(root: Path) -> tuple[float, float, float, int]:
    """Pooled AUCs of the index encounter's class (IMP) and stay vs the 72 h task label.

    Reads the generated FHIR files and the package's cohort (covid_oxygen_72h) at each site;
    the index encounter is the patient's encounter that starts at the cohort's index time.
    Returns ``(AUC of class, AUC of stay, share of IMP, patients)``.
    """
    from multimodal_fl.config import load_task
    from multimodal_fl.data.cohort import build_cohort

    task = load_task("covid_oxygen_72h")
    inpatient: list[int] = []
    stay: list[float] = []
    labels: list[int] = []
    for site in sorted((root / "covid_oxygen").iterdir()):
        table = build_cohort(site, task, check_images=False).table
        encounters = {(_pid(r["subject"]), _dt(r["period"]["start"])): r
                      for r in _resources(site) if r["resourceType"] == "Encounter"}
        for pid, index, label in zip(table["patient_id"], table["index_time"], table["label"],
                                     strict=True):
            enc = encounters[(pid, index)]
            inpatient.append(int(enc["class"]["code"] == "IMP"))
            stay.append((_dt(enc["period"]["end"]) - index).total_seconds())
            labels.append(int(label))
    return (float(roc_auc_score(labels, inpatient)), float(roc_auc_score(labels, stay)),
            float(np.mean(inpatient)), len(labels))


@pytest.mark.parametrize("leaky", [False, True])
def test_encounter_class_and_stay_carry_no_label(tmp_path: Path, leaky: bool) -> None:
    """On the default COVID-19 cohort the presentation encounter does not give the label away.

    Generator 1.0 made it class IMP with a 3-12 day stay exactly for the 72 h positives
    (AUC of class alone about 0.95); that is now only the ``leaky_encounters`` negative
    control. Default profile, seed 0, COVID-19 only (about 2.5 s to generate).
    """
    generate(tmp_path, seed=0, profile="default", tasks=("covid_oxygen",),
             leaky_encounters=leaky)
    auc_class, auc_stay, share_imp, n = _encounter_auc(tmp_path)
    assert n > 500
    if leaky:
        assert auc_class > 0.9 and auc_stay > 0.9, (auc_class, auc_stay)
    else:
        assert 0.35 <= auc_class <= 0.65 and 0.35 <= auc_stay <= 0.65, (auc_class, auc_stay)
        assert 0.25 < share_imp < 0.45  # both classes occur (INPATIENT_SHARE = 0.35)
    manifest = json.loads((tmp_path / "MANIFEST.json").read_text())
    assert manifest["leaky_encounters"] is leaky
    assert ("--leaky-encounters" in manifest["command"]) is leaky
    assert ("Negative control" in (tmp_path / "README.md").read_text()) is leaky


def _compare_script() -> Any:
    return load_script(REPO / "scripts" / "compare_sample_cohorts.py")


def test_leaky_option_changes_only_the_covid_encounters(
        tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The encounter fix moved no other value: same images, notes and cohort tables.

    The class and stay come from their own stream, and the 1.0 draw is still taken from the
    patients' stream, so the leaky variant (= generator 1.0) and the default differ only in
    COVID-19 FHIR files (the Encounters and the dates of the discharge notes), and every
    shipped task builds the same cohort table (features, labels, notes, images) from both
    (``scripts/compare_sample_cohorts.py``, which also sees a changed feature value).
    """
    leaky = tmp_path / "leaky"
    generate(leaky, seed=0, profile="tiny", leaky_encounters=True)
    ours, theirs = content_manifest(tiny), content_manifest(leaky)
    assert set(ours) == set(theirs)
    changed = {k for k in ours if ours[k] != theirs[k]}
    assert changed and all(k.startswith("covid_oxygen/") and "/fhir/" in k for k in changed)
    compare = _compare_script()
    assert compare.main([str(tiny), str(leaky)]) == 0, capsys.readouterr().out
    assert "DIFFERENT" not in capsys.readouterr().out
    # the comparison is not blind: one BMI value changed at one Alzheimer's site shows
    bundle = next((leaky / "alzheimers/site_a/fhir").glob("*.json"))
    doc = json.loads(bundle.read_text())
    bmi = next(e["resource"] for e in doc["entry"] if e["resource"]["resourceType"] ==
               "Observation" and e["resource"]["code"]["coding"][0]["code"] == "39156-5")
    bmi["valueQuantity"]["value"] += 5.0
    bundle.write_text(json.dumps(doc))
    args = ("alzheimers", "site_a", "alzheimers")
    assert not compare.comparable_table(tiny, *args).equals(
        compare.comparable_table(leaky, *args))


def test_committed_sample_data_manifest() -> None:
    """The committed sample_data/ was written by this generator version (default, seed 0)."""
    manifest = REPO / "sample_data" / "MANIFEST.json"
    if not manifest.is_file():
        pytest.skip("sample_data/ not generated in this checkout")
    data = json.loads(manifest.read_text())
    assert data["generator_version"] == GENERATOR_VERSION
    assert (data["seed"], data["profile"], data["leaky_encounters"]) == (0, "default", False)
    on_disk = sorted(p.relative_to(REPO / "sample_data").as_posix()
                     for p in (REPO / "sample_data").rglob("*") if p.is_file())
    assert sorted(data["files"]) == sorted(set(on_disk) - {"MANIFEST.json", "README.md"})
    total = sum(p.stat().st_size for p in (REPO / "sample_data").rglob("*") if p.is_file())
    assert total <= 25 * 1024 * 1024


@pytest.mark.slow
def test_regenerating_default_reproduces_committed_data(tmp_path: Path) -> None:
    """Regenerating the default profile gives the committed manifest, file for file."""
    manifest = REPO / "sample_data" / "MANIFEST.json"
    if not manifest.is_file():
        pytest.skip("sample_data/ not generated in this checkout")
    generate(tmp_path, seed=0, profile="default")
    assert content_manifest(tmp_path) == json.loads(manifest.read_text())["files"]


def test_cli_sample_data(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from multimodal_fl.cli import app

    runner = CliRunner()
    done = runner.invoke(app, ["sample-data", str(tmp_path / "out"), "--profile", "tiny",
                               "--seed", "2"])
    assert done.exit_code == 0, done.output
    manifest = json.loads((tmp_path / "out/MANIFEST.json").read_text())
    assert (manifest["seed"], manifest["profile"]) == (2, "tiny")
    leaky = runner.invoke(app, ["sample-data", str(tmp_path / "leaky"), "--profile", "tiny",
                                "--leaky-encounters"])
    assert leaky.exit_code == 0 and "LEAKY ENCOUNTERS" in leaky.output, leaky.output
    assert json.loads((tmp_path / "leaky/MANIFEST.json").read_text())["leaky_encounters"] is True
    bad = runner.invoke(app, ["sample-data", str(tmp_path / "x"), "--profile", "huge"])
    assert bad.exit_code == 2 and "huge" in bad.output


def test_a_second_generation_never_removes_a_users_files(tmp_path: Path) -> None:
    """Regenerating replaces only what an earlier run wrote (MANIFEST.json's files)."""
    generate(tmp_path, seed=0, profile="tiny", tasks=("covid_oxygen",))
    generate(tmp_path, seed=1, profile="tiny", tasks=("covid_oxygen",))  # ours: replaced
    mine = tmp_path / "covid_oxygen" / "precious" / "data.txt"
    mine.parent.mkdir()
    mine.write_text("mine")
    with pytest.raises(ValueError, match=r"holds 1 file\(s\) that no sample-data run wrote"):
        generate(tmp_path, seed=0, profile="tiny", tasks=("covid_oxygen",))
    assert mine.read_text() == "mine"
