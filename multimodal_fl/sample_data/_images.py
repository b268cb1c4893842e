"""Synthetic chest X-rays (2D) and brain MRIs (3D), and their file writers.

Images are built in floating point on [0, 1], then an acquisition model of the site
(gain, offset, gamma, noise, bias field) is applied and they are quantised to uint8.
The label-linked structure is driven by the patient's image latent only (see
``docs/sample-data.md``): lung opacities for the CXR, ventricle size and cortical
atrophy for the MRI.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from scipy.ndimage import gaussian_filter, zoom

# Pillow, nibabel and pydicom are heavy to import: imported inside the functions that use them

__all__ = ["Acquisition", "brain_mri", "chest_xray", "write_dicom", "write_nifti", "write_png"]

FloatArray = NDArray[np.float64]
ByteArray = NDArray[np.uint8]


@dataclass(frozen=True)
class Acquisition:
    """A site's acquisition model: ``out = (gain * img ** gamma + offset) + noise``.

    Parameters
    ----------
    gain, offset, gamma
        Contrast, brightness and non-linearity of the scanner/processing chain.
    noise
        Standard deviation of additive Gaussian noise (on the [0, 1] scale).
    bias
        Strength of a smooth multiplicative bias field (MRI) or a vertical gradient (CXR).
    """

    gain: float = 1.0
    offset: float = 0.0
    gamma: float = 1.0
    noise: float = 0.03
    bias: float = 0.0


def _grid(size: int, ndim: int) -> list[FloatArray]:
    axis = np.linspace(-1.0, 1.0, size)
    return list(np.meshgrid(*([axis] * ndim), indexing="ij"))


def _acquire(img: FloatArray, acq: Acquisition, rng: np.random.Generator,
             mask: NDArray[np.bool_] | None, bias_field: FloatArray) -> ByteArray:
    out = np.clip(img, 0.0, 1.0) ** acq.gamma
    out = out * (1.0 + acq.bias * bias_field)
    out = acq.gain * out + acq.offset
    out = out + acq.noise * rng.standard_normal(img.shape)
    if mask is not None:
        out = np.where(mask, out, 0.0)
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def chest_xray(severity: float, rng: np.random.Generator, size: int,
               acq: Acquisition) -> ByteArray:
    """A frontal chest-X-ray-like image whose lung opacities grow with ``severity``.

    Parameters
    ----------
    severity
        The patient's observed image latent (standard-normal scale).
    rng
        Random source (anatomy, opacity placement, noise).
    size
        Side length in pixels.
    acq
        The site's acquisition model.

    Returns
    -------
    numpy.ndarray
        ``(size, size)`` uint8 image (bright = dense, as a radiograph is displayed).
    """
    yy, xx = _grid(size, 2)  # yy: rows (top = -1), xx: columns
    cx = rng.normal(0.0, 0.03)
    cy = rng.normal(0.0, 0.03)
    body = ((xx - cx) / 0.92) ** 2 + ((yy - cy) / 1.05) ** 2 < 1.0
    img = np.where(body, 0.55, 0.05)
    lung_w = rng.normal(0.30, 0.025)
    lung_h = rng.normal(0.62, 0.04)
    lungs = np.zeros_like(img, dtype=bool)
    for side in (-1.0, 1.0):
        lx = cx + side * rng.normal(0.36, 0.02)
        ly = cy + rng.normal(-0.02, 0.03)
        lungs |= ((xx - lx) / lung_w) ** 2 + ((yy - ly) / lung_h) ** 2 < 1.0
    img = np.where(lungs, 0.20, img)
    # ribs: faint periodic bands over the lungs
    ribs = 0.05 * (0.5 + 0.5 * np.sin((yy - cy) * rng.normal(22.0, 1.5) + rng.uniform(0, 6.3)))
    img = img + np.where(lungs, ribs, 0.0)
    # heart and mediastinum
    heart = ((xx - cx - 0.08) / rng.normal(0.24, 0.02)) ** 2 + ((yy - cy - 0.25) / 0.30) ** 2 < 1.0
    medi = (np.abs(xx - cx) < 0.09) & (yy < cy + 0.2)
    img = np.where(heart | medi, 0.62, img)
    # opacities: patchy, peripheral and lower-zone, amount rising with severity
    amount = max(0.0, 0.55 + 0.45 * severity)
    opacity = np.zeros_like(img)
    n_patches = 2 + int(rng.integers(0, 3))
    for _ in range(n_patches):
        side = 1.0 if rng.random() < 0.5 else -1.0
        px = cx + side * rng.normal(0.42, 0.06)
        py = cy + rng.normal(0.18, 0.15)
        r = rng.uniform(0.10, 0.20)
        opacity += np.exp(-(((xx - px) ** 2 + (yy - py) ** 2) / (2 * r * r)))
    opacity = opacity / n_patches * 2.0
    img = img + np.where(lungs, 0.22 * amount * opacity, 0.0)
    img = gaussian_filter(img, sigma=size / 64.0)
    return _acquire(img, acq, rng, None, yy)


def brain_mri(severity: float, rng: np.random.Generator, size: int,
              acq: Acquisition) -> ByteArray:
    """A T1-like brain volume whose ventricles and sulcal CSF grow with ``severity``.

    Parameters
    ----------
    severity
        The patient's observed image latent (standard-normal scale).
    rng
        Random source (anatomy, noise).
    size
        Side length in voxels (the volume is ``size**3``).
    acq
        The site's acquisition model.

    Returns
    -------
    numpy.ndarray
        ``(size, size, size)`` uint8 volume; zero outside the head.
    """
    x, y, z = _grid(size, 3)
    head_r = np.array([0.80, 0.92, 0.78]) * rng.normal(1.0, 0.025)
    head = (x / head_r[0]) ** 2 + (y / head_r[1]) ** 2 + (z / head_r[2]) ** 2
    atrophy = float(np.clip(0.06 + 0.035 * severity, 0.0, 0.18))
    brain_r = head_r * (0.86 - atrophy)
    brain = (x / brain_r[0]) ** 2 + (y / brain_r[1]) ** 2 + (z / brain_r[2]) ** 2
    img = np.where(head < 1.0, 0.15, 0.0)  # CSF between skull and brain: dark in T1
    img = np.where((head < 1.0) & (head > 0.86), 0.75, img)  # scalp / skull marrow: bright
    # grey/white matter texture
    tex = gaussian_filter(rng.standard_normal((size,) * 3), sigma=size / 12.0)
    tex = tex / (np.abs(tex).max() + 1e-9)
    white = brain < 0.55
    img = np.where(brain < 1.0, 0.45 + 0.05 * tex, img)
    img = np.where(white, 0.68 + 0.04 * tex, img)
    # lateral ventricles: two ellipsoids beside the midline
    scale = float(np.clip(1.0 + 0.22 * severity, 0.55, 1.9))
    for side in (-1.0, 1.0):
        vx, vy, vz = side * 0.10 * scale, rng.normal(0.02, 0.02), rng.normal(0.05, 0.02)
        ventricle = (((x - vx) / (0.07 * scale)) ** 2 + ((y - vy) / (0.26 * scale)) ** 2
                     + ((z - vz) / (0.10 * scale)) ** 2)
        img = np.where(ventricle < 1.0, 0.12, img)
    img = gaussian_filter(img, sigma=size / 48.0)
    bias_field = 0.5 * (x * rng.normal(0.0, 1.0) + y * rng.normal(0.0, 1.0))
    return _acquire(img, acq, rng, head < 1.0, bias_field)


def downsample(img: ByteArray, size: int) -> ByteArray:
    """Resize an image or volume to ``size`` per side (linear interpolation)."""
    factors = [size / s for s in img.shape]
    out = zoom(img.astype(np.float64), factors, order=1)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- writers


def write_png(path: Path, img: ByteArray) -> None:
    """Write a 2D uint8 image as an 8-bit greyscale PNG."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img, mode="L").save(path, format="PNG", optimize=True)


def write_nifti(path: Path, vol: ByteArray, voxel_mm: float) -> None:
    """Write a 3D uint8 volume as ``.nii.gz`` with an isotropic RAS affine."""
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    affine[:3, 3] = -voxel_mm * (np.array(vol.shape) - 1) / 2.0
    image = nib.Nifti1Image(vol, affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, str(path))


def write_dicom(path: Path, img: ByteArray, *, patient_id: str, study_date: datetime,
                uid_seed: str, pixel_mm: float, tz_hours: int = 0) -> None:
    """Write a 2D uint8 image as a small, valid DICOM file (CR, explicit VR little endian).

    Parameters
    ----------
    path
        Output ``.dcm`` file.
    img
        The ``(rows, cols)`` uint8 image.
    patient_id
        PatientID (0010,0020): the FHIR ``Patient.id`` the image belongs to.
    study_date
        StudyDate / AcquisitionDate and StudyTime / AcquisitionTime (the site's local time).
    tz_hours
        The site's offset from UTC (TimezoneOffsetFromUTC).
    uid_seed
        Deterministic seed for the study, series and instance UIDs.
    pixel_mm
        PixelSpacing in mm.
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import (
        PYDICOM_IMPLEMENTATION_UID,
        UID,
        ExplicitVRLittleEndian,
        generate_uid,
    )

    cr_storage = UID("1.2.840.10008.5.1.4.1.1.1")
    sop_uid = generate_uid(entropy_srcs=[uid_seed, "instance"])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = cr_storage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = cr_storage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[uid_seed, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[uid_seed, "series"])
    ds.PatientID = patient_id
    ds.PatientName = "Sample^Generated"
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.StudyDate = ds.AcquisitionDate = study_date.strftime("%Y%m%d")
    # the time too: a date alone is known only at the end of that day (docs/data-contract.md)
    ds.StudyTime = ds.AcquisitionTime = study_date.strftime("%H%M%S")
    ds.TimezoneOffsetFromUTC = f"{'-' if tz_hours < 0 else '+'}{abs(tz_hours):02d}00"
    ds.Rows, ds.Columns = int(img.shape[0]), int(img.shape[1])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [pixel_mm, pixel_mm]
    ds.PixelData = np.ascontiguousarray(img, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)
