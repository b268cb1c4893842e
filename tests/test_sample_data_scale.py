"""The ``scale`` profile of the sample-data generator: size, determinism, images, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import pydicom
import pytest
from PIL import Image
from typer.testing import CliRunner

from multimodal_fl.cli import app
from multimodal_fl.sample_data import content_manifest, generate
from multimodal_fl.sample_data._cohorts import simulate_site
from multimodal_fl.sample_data._sites import SCALE_IMAGE_SIZE, sites_for


def _manifest(root: Path) -> dict:
    return json.loads((root / "MANIFEST.json").read_text())


def test_scale_profile_spreads_patients_over_sites(tmp_path: Path) -> None:
    summaries = generate(tmp_path, profile="scale", patients=30, sites=4, workers=1)
    for task in ("covid_oxygen", "alzheimers"):
        mine = [s for s in summaries if s.task == task]
        assert [s.site for s in mine] == ["site_001", "site_002", "site_003", "site_004"]
        assert [s.patients for s in mine] == [8, 8, 7, 7]
        assert sorted(p.name for p in (tmp_path / task).iterdir()) == [s.site for s in mine]
        assert all(0 < s.positives < s.patients and s.images > 0 for s in mine)
    manifest = _manifest(tmp_path)
    assert (manifest["profile"], manifest["patients_per_task"], manifest["sites_per_task"]) == (
        "scale", 30, 4)
    assert "--profile scale --patients 30 --sites 4" in manifest["command"]
    # the hashes written from the pool's sites are those of the files on disk
    assert manifest["files"] == content_manifest(tmp_path)
    # every route of the default sites, at the scale sizes
    dcm = next((tmp_path / "covid_oxygen" / "site_001" / "images").glob("*.dcm"))
    assert pydicom.dcmread(dcm).pixel_array.shape == (128, 128)
    with Image.open(next((tmp_path / "covid_oxygen" / "site_002" / "images").glob("*.png"))) as im:
        assert im.size == (SCALE_IMAGE_SIZE["covid_oxygen"],) * 2
    nii = next((tmp_path / "alzheimers" / "site_003" / "images").glob("*.nii.gz"))
    assert nib.load(nii).shape == (48, 48, 48)
    assert (tmp_path / "alzheimers" / "site_003" / "labels.csv").is_file()


def test_scale_profile_is_deterministic_by_seed_and_pool(tmp_path: Path) -> None:
    generate(tmp_path / "one", profile="scale", patients=12, sites=3, seed=3, workers=1,
             tasks=("covid_oxygen",))
    generate(tmp_path / "pool", profile="scale", patients=12, sites=3, seed=3, workers=2,
             tasks=("covid_oxygen",))
    generate(tmp_path / "other", profile="scale", patients=12, sites=3, seed=4, workers=1,
             tasks=("covid_oxygen",))
    one, pool, other = (_manifest(tmp_path / n) for n in ("one", "pool", "other"))
    assert one["files"] and one["files"] == pool["files"] and one["digest"] == pool["digest"]
    assert [s["patients"] for s in one["sites"]] == [s["patients"] for s in other["sites"]]
    assert one["digest"] != other["digest"]


def test_scale_ids_are_unique_across_sites() -> None:
    specs = sites_for("alzheimers", "scale", patients=40, sites=12)
    ids = [r.pid for k in (1, 11) for r in simulate_site("alzheimers", specs[k], 0, k)]
    assert len(ids) == len(set(ids)) == 4 + 3  # site_002 and site_012 end in the same digit


def test_scale_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="for the scale profile, not 'tiny'"):
        generate(tmp_path, profile="tiny", patients=10)
    with pytest.raises(ValueError, match="fewer than --sites 5"):
        generate(tmp_path, profile="scale", patients=4, sites=5)
    runner = CliRunner()
    bad = runner.invoke(app, ["sample-data", str(tmp_path / "x"), "--profile", "scale",
                              "--patients", "3", "--sites", "4"])
    assert bad.exit_code == 2 and "fewer than --sites 4" in bad.stderr
    assert "Traceback" not in bad.output
    done = runner.invoke(app, ["sample-data", str(tmp_path / "ok"), "--profile", "scale",
                               "--patients", "4", "--sites", "2"])
    assert done.exit_code == 0, done.output
    assert _manifest(tmp_path / "ok")["sites_per_task"] == 2
