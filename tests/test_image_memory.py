"""Images in memory: held at the configured size (never the source's), and a frozen image
encoder holds a chunk of pixels at a time, only their embeddings after."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from multimodal_fl.config import ExperimentConfig, load_task
from multimodal_fl.encoders.transforms import load_image
from multimodal_fl.training import prepare
from multimodal_fl.training.prepare import IMAGE_CHUNK, FrozenEncoders, prepare_site_data


class Cohort:
    """A site's cohort table with images only (what prepare_site_data reads)."""

    def __init__(self, table: pd.DataFrame) -> None:
        self.table = table
        self.feature_names: list[str] = []
        self.site = "site_a"


def _volumes(root: Path, n: int, size: int) -> Cohort:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = root / f"v{i:03d}.nii.gz"
        vol = rng.integers(0, 255, (size,) * 3, dtype=np.uint8)
        nib.save(nib.Nifti1Image(vol, np.eye(4)), str(path))
        paths.append(str(path))
    paths.append(str(root / "missing.nii.gz"))  # a path whose file is gone
    return Cohort(pd.DataFrame({
        "patient_id": [f"p{i:03d}" for i in range(n + 1)], "label": [i % 2 for i in range(n + 1)],
        "image_path": paths, "has_image": True, "has_text": False, "has_tabular": False}))


def _config(frozen: bool) -> ExperimentConfig:
    return ExperimentConfig.model_validate({
        "task": load_task("alzheimers"), "sites": [{"name": "site_a", "path": "."}],
        "modalities": {"image": {"encoder": "tinycnn", "spatial_dims": 3, "size": 8,
                                 "embed_dim": 4, "frozen": frozen},
                       "tabular": {"enabled": False}, "text": {"enabled": False}},
    })


def test_image_cache_stores_the_configured_size_not_the_source(tmp_path: Path) -> None:
    cohort = _volumes(tmp_path, 5, size=24)
    cfg = _config(frozen=False)
    sd = prepare_site_data(cohort, cfg, cache=tmp_path / "cache")
    assert sd.dataset.inputs["image"].shape == (5, 1, 8, 8, 8)  # 24^3 on disk
    (shard,) = (tmp_path / "cache").glob("*/shard-*.npz")  # the cache is the site's own folder
    with np.load(shard) as data:
        assert data["emb"].shape == (5, 8**3) and data["emb"].dtype == np.float32
    assert list(sd.image_errors) == ["p005"] and len(sd.dataset) == 5


@pytest.mark.filterwarnings("ignore:.*nvImageCodec")  # MONAI's reader, on import
def test_frozen_image_encoder_holds_a_chunk_of_pixels_at_a_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    n = IMAGE_CHUNK + 6
    cohort = _volumes(tmp_path, n, size=10)
    cfg = _config(frozen=True)
    events: list[Any] = []
    apply = prepare.apply_transform

    def reading(*args: Any, **kwargs: Any) -> torch.Tensor:
        events.append("read")
        return apply(*args, **kwargs)

    monkeypatch.setattr(prepare, "apply_transform", reading)
    frozen = FrozenEncoders(cfg)
    frozen.image.register_forward_pre_hook(lambda _, x: events.append(len(x[0])))
    sd = prepare_site_data(cohort, cfg, cache=None, frozen=frozen)

    held, most = 0, 0  # images read and not yet embedded
    for e in events:
        held = held + 1 if e == "read" else held - e
        most = max(most, held)
    assert events.count("read") == n and most == IMAGE_CHUNK
    assert [e for e in events if e != "read"] == [IMAGE_CHUNK, 6]
    width = frozen.image.output_dim
    assert sd.dataset.precomputed == ("image",) and sd.dataset.inputs["image"].shape == (n, width)
    assert list(sd.image_errors) == [f"p{n:03d}"]

    # the same embeddings as one batch per chunk of the whole stack would give
    pixels = torch.stack([load_image(p, spec=frozen.image_spec)
                          for p in cohort.table["image_path"][:n]])
    with torch.no_grad():
        whole = torch.cat([frozen.image(pixels[:IMAGE_CHUNK]), frozen.image(pixels[IMAGE_CHUNK:])])
    torch.testing.assert_close(sd.dataset.inputs["image"], whole, rtol=0, atol=0)


def test_training_data_reads_monochrome1_dicom_like_monochrome2(tmp_path: Path) -> None:
    """The site data the models train on reads DICOM as load_image does: MONOCHROME1 inverted."""
    from tests.encoders.conftest import write_dicom

    img = np.random.default_rng(4).integers(0, 256, (20, 18)).astype(np.float64)
    write_dicom(tmp_path / "m2.dcm", img * 100)
    write_dicom(tmp_path / "m1.dcm", (255 - img) * 100, photometric="MONOCHROME1")
    cohort = Cohort(pd.DataFrame({
        "patient_id": ["p0", "p1"], "label": [0, 1],
        "image_path": [str(tmp_path / "m2.dcm"), str(tmp_path / "m1.dcm")],
        "has_image": True, "has_text": False, "has_tabular": False}))
    cfg = ExperimentConfig.model_validate({
        "task": load_task("covid_oxygen_24h"), "sites": [{"name": "site_a", "path": "."}],
        "modalities": {"image": {"encoder": "tinycnn", "spatial_dims": 2, "size": 8,
                                 "embed_dim": 4, "frozen": False},
                       "tabular": {"enabled": False}, "text": {"enabled": False}},
    })
    pixels = prepare_site_data(cohort, cfg, cache=None).dataset.inputs["image"]
    assert pixels.shape == (2, 1, 8, 8) and float(pixels[0].std()) > 0.1
    torch.testing.assert_close(pixels[0], pixels[1], atol=1e-5, rtol=0)


def test_training_data_takes_pd_na_image_path_as_no_image(tmp_path: Path) -> None:
    """A "string" column's pd.NA is a patient without an image, not a file named '<NA>'."""
    from PIL import Image

    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(tmp_path / "a.png")
    cohort = Cohort(pd.DataFrame({
        "patient_id": ["p0", "p1"], "label": [0, 1],
        "image_path": pd.Series([str(tmp_path / "a.png"), None], dtype="string"),
        "has_image": True, "has_text": False, "has_tabular": False}))
    cfg = ExperimentConfig.model_validate({
        "task": load_task("covid_oxygen_24h"), "sites": [{"name": "site_a", "path": "."}],
        "modalities": {"image": {"encoder": "tinycnn", "spatial_dims": 2, "size": 8,
                                 "embed_dim": 4, "frozen": False},
                       "tabular": {"enabled": False}, "text": {"enabled": False}},
    })
    sd = prepare_site_data(cohort, cfg, cache=None)
    assert sd.image_errors == {}  # not "'<NA>': image file does not exist"
    assert list(sd.dropped) == ["p1"] and "no usable modality" in sd.dropped["p1"]
