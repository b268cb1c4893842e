"""Image transforms: readers, channel conversion, 3D reorientation, errors, augmentation."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from multimodal_fl.encoders import ImageReadError, ImageTransformSpec, load_image


@pytest.mark.parametrize(
    "key", ["grey_png", "rgb_jpg", "rgba_png", "palette_png", "grey16_png", "dicom"]
)
def test_2d_formats_give_one_channel_resized_minmax(image_files: dict[str, Path], key: str) -> None:
    x = load_image(image_files[key], spatial_dims=2, size=24)
    assert x.shape == (1, 24, 24) and x.dtype == torch.float32
    assert float(x.min()) == pytest.approx(0.0, abs=1e-6)
    assert float(x.max()) == pytest.approx(1.0, abs=1e-6)


def test_rgb_is_converted_by_luminance(tmp_path: Path) -> None:
    from PIL import Image

    arr = np.zeros((8, 8, 3), dtype=np.uint8)
    arr[:, :4] = (255, 0, 0)  # red half
    arr[:, 4:] = (0, 255, 0)  # green half: brighter in luminance
    Image.fromarray(arr).save(tmp_path / "rg.png")
    x = load_image(tmp_path / "rg.png", spatial_dims=2, size=8)
    # PILReader swaps axes: columns of the PNG are the first spatial axis
    assert float(x[0, :4].mean()) < float(x[0, 4:].mean())
    rgb = load_image(tmp_path / "rg.png", spatial_dims=2, size=8, channels=3)
    assert rgb.shape == (3, 8, 8) and not torch.equal(rgb[0], rgb[1])  # colour kept


def test_grey_repeated_to_three_channels(image_files: dict[str, Path]) -> None:
    three = load_image(image_files["grey_png"], spatial_dims=2, size=8, channels=3)
    assert three.shape == (3, 8, 8)
    assert torch.equal(three[0], three[1]) and torch.equal(three[0], three[2])


def test_3d_nifti_zscore_and_resize(image_files: dict[str, Path]) -> None:
    x = load_image(image_files["nifti"], spatial_dims=3, size=12)
    assert x.shape == (1, 12, 12, 12)
    assert float(x.mean()) == pytest.approx(0.0, abs=1e-3)
    assert float(x.std()) == pytest.approx(1.0, abs=2e-2)
    y = load_image(
        image_files["nifti"], spec=ImageTransformSpec(spatial_dims=3, size=12, pixdim=3.0)
    )
    assert y.shape == (1, 12, 12, 12)
    assert not torch.allclose(x, y)  # resampling by spacing differs from plain resizing


def test_3d_reorientation_to_ras(tmp_path: Path) -> None:
    """A volume stored left-right flipped (LAS affine) comes out like its RAS twin."""
    rng = np.random.default_rng(1)
    vol = rng.random((10, 12, 14)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "ras.nii.gz"))
    las = np.diag([-1.0, 1.0, 1.0, 1.0])
    nib.save(nib.Nifti1Image(vol[::-1].copy(), las), str(tmp_path / "las.nii.gz"))
    spec = ImageTransformSpec(spatial_dims=3, size=10, normalize="minmax")
    a = load_image(tmp_path / "ras.nii.gz", spec=spec)
    b = load_image(tmp_path / "las.nii.gz", spec=spec)
    assert torch.allclose(a, b, atol=1e-5)


def test_training_augmentation_is_seeded_and_random(image_files: dict[str, Path]) -> None:
    f = image_files["grey_png"]
    a = load_image(f, spatial_dims=2, size=24, train=True, seed=3)
    b = load_image(f, spatial_dims=2, size=24, train=True, seed=3)
    evals = load_image(f, spatial_dims=2, size=24)
    assert torch.equal(a, b)
    outs = [load_image(f, spatial_dims=2, size=24, train=True, seed=s) for s in range(6)]
    assert any(not torch.allclose(o, evals) for o in outs)
    vol = load_image(image_files["nifti"], spatial_dims=3, size=8, train=True, seed=0)
    assert vol.shape == (1, 8, 8, 8)


def test_errors_name_the_file(image_files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match=r"corrupt\.png.*PILReader"):
        load_image(image_files["corrupt_png"], spatial_dims=2, size=8)
    with pytest.raises(ImageReadError, match=r"missing\.png.*does not exist"):
        load_image(tmp_path / "missing.png", spatial_dims=2, size=8)
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    with pytest.raises(ImageReadError, match=r"notes\.txt.*accepted suffixes"):
        load_image(notes, spatial_dims=2, size=8)
    with pytest.raises(ImageReadError, match=r"brain\.nii\.gz.*3 spatial axes"):
        load_image(image_files["nifti"], spatial_dims=2, size=8)
    with pytest.raises(ImageReadError, match=r"grey\.png.*spatial_dims=3"):
        load_image(image_files["grey_png"], spatial_dims=3, size=8)


def test_spec_validation_and_description() -> None:
    with pytest.raises(ValueError, match="spatial_dims"):
        ImageTransformSpec(spatial_dims=4)
    with pytest.raises(ValueError, match="channels"):
        ImageTransformSpec(channels=2)
    a, b = ImageTransformSpec(size=32), ImageTransformSpec(size=64)
    assert a.describe() != b.describe()
    assert a.describe() == ImageTransformSpec(size=32).describe()
    assert ImageTransformSpec(spatial_dims=3).norm == "zscore"


def test_dicom_series_folder_is_a_3d_volume(tmp_path: Path) -> None:
    import pydicom

    from tests.encoders.conftest import write_dicom

    series = tmp_path / "series"
    series.mkdir()
    rng = np.random.default_rng(0)
    for z in range(5):
        path = write_dicom(series / f"slice{z}.dcm", rng.random((20, 24)) * 1000)
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient = [0.0, 0.0, float(z)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [1.0, 1.0]
        ds.InstanceNumber = z + 1
        ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1"
        ds.save_as(path)
    x = load_image(series, spatial_dims=3, size=8)
    assert x.shape == (1, 8, 8, 8) and torch.isfinite(x).all()


@pytest.mark.parametrize("frames", [2, 3, 4])
def test_4d_nifti_frames_are_refused_not_mixed_as_colour(tmp_path: Path, frames: int) -> None:
    vol = np.stack([np.full((8, 8, 8), k + 1.0, np.float32) for k in range(frames)], -1)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "dwi.nii.gz"))
    shape = rf"\({frames}, 8, 8, 8\)"
    with pytest.raises(ImageReadError, match=rf"dwi\.nii\.gz.*{frames} channels.*{shape}"):
        load_image(tmp_path / "dwi.nii.gz", spatial_dims=3, size=8)
    # a singleton 4th axis is one volume: read as the plain 3D file
    nib.save(nib.Nifti1Image(vol[..., :1], np.eye(4)), str(tmp_path / "one.nii.gz"))
    nib.save(nib.Nifti1Image(vol[..., 0], np.eye(4)), str(tmp_path / "plain.nii.gz"))
    assert torch.equal(load_image(tmp_path / "one.nii.gz", spatial_dims=3, size=8),
                       load_image(tmp_path / "plain.nii.gz", spatial_dims=3, size=8))


def test_2d_colour_channels_still_mix_by_luminance(tmp_path: Path) -> None:
    from PIL import Image

    rgb = (np.random.default_rng(3).random((12, 10, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgb).convert("LA").save(tmp_path / "la.png")
    for name in ("rgba.png", "la.png"):
        assert load_image(tmp_path / name, spatial_dims=2, size=8).shape == (1, 8, 8)


def _radiograph() -> np.ndarray:
    """A 2D picture with structure (a gradient and a bright square), values 0..255."""
    yy, xx = np.mgrid[0:30, 0:26]
    img = (xx * 6 + yy * 2).astype(np.float64)
    img[8:16, 10:20] = 255
    return np.clip(img, 0, 255)


def test_monochrome1_dicom_loads_like_its_monochrome2_twin(tmp_path: Path) -> None:
    """MONOCHROME1 (low value = bright, common for CR/DX) is inverted on reading."""
    from tests.encoders.conftest import write_dicom

    img = _radiograph()
    m2 = write_dicom(tmp_path / "m2.dcm", img * 100)
    m1 = write_dicom(tmp_path / "m1.dcm", (255 - img) * 100, photometric="MONOCHROME1")
    a = load_image(m2, spatial_dims=2, size=16, notes=[])
    b = load_image(m1, spatial_dims=2, size=16, notes=[])
    assert float(a.std()) > 0.1
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)  # float32 rounding only


def test_monochrome1_dicom_series_folder_is_inverted(tmp_path: Path) -> None:
    import pydicom

    from tests.encoders.conftest import write_dicom

    rng = np.random.default_rng(2)
    vols = rng.random((4, 12, 10)) * 1000 + 10
    for photometric, stored in (("MONOCHROME2", vols), ("MONOCHROME1", 1010 - vols)):
        (tmp_path / photometric).mkdir()
        for z in range(len(vols)):
            path = write_dicom(tmp_path / photometric / f"s{z}.dcm", stored[z],
                               photometric=photometric)
            ds = pydicom.dcmread(path)
            ds.ImagePositionPatient = [0.0, 0.0, float(z)]
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.InstanceNumber = z + 1
            ds.save_as(path)
    spec = ImageTransformSpec(spatial_dims=3, size=6, normalize="minmax")
    a = load_image(tmp_path / "MONOCHROME2", spec=spec)
    b = load_image(tmp_path / "MONOCHROME1", spec=spec)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_rgba_to_three_channels_keeps_colour_like_rgb(tmp_path: Path) -> None:
    """channels=3: RGBA drops its alpha and keeps its colours, as RGB does (not grey x3)."""
    from PIL import Image

    rgb = (np.random.default_rng(1).random((30, 30, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    rgba = np.concatenate([rgb, np.full((30, 30, 1), 128, np.uint8)], -1)  # half transparent
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    x = load_image(tmp_path / "rgb.png", spatial_dims=2, size=32, channels=3)
    y = load_image(tmp_path / "rgba.png", spatial_dims=2, size=32, channels=3)
    assert not torch.equal(y[0], y[1])
    torch.testing.assert_close(x, y, atol=0, rtol=0)
    # greyscale + alpha has no colour: its luminance is repeated
    Image.fromarray(rgb).convert("LA").save(tmp_path / "la.png")
    z = load_image(tmp_path / "la.png", spatial_dims=2, size=8, channels=3)
    assert torch.equal(z[0], z[1]) and torch.equal(z[0], z[2])


@pytest.mark.parametrize("key", ["grey_png", "dicom"])
def test_reading_shows_no_gpu_dicom_decoder_warning(image_files: dict[str, Path],
                                                     key: str) -> None:
    """MONAI's "nvImageCodec ... did not register" (an optional extra) is not shown."""
    import warnings

    for notes in (None, []):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            load_image(image_files[key], spatial_dims=2, size=8, notes=notes)
        shown = [str(w.message) for w in caught]
        assert not [m for m in shown if "nvImageCodec" in m], shown
