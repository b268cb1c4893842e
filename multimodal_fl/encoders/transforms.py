"""MONAI transform pipelines for the image encoder: read, convert, resize, normalise, augment.

Two pipelines from one spec (:class:`ImageTransformSpec`):

* 2D (e.g. chest X-ray, PNG/JPEG/DICOM): read -> channel first -> greyscale (RGB/RGBA/LA
  converted by luminance) -> resize to ``size x size`` -> min-max intensity to [0, 1].
* 3D (e.g. brain MRI, NIfTI or a DICOM series folder): read -> channel first -> reorient
  to RAS -> optional resampling to ``pixdim`` mm -> resize (or pad/crop after resampling)
  to ``size`` cubed -> z-score intensity over non-zero voxels.

Reading inverts a MONOCHROME1 DICOM (low value = bright) to MONOCHROME2, as every other
file is stored. Training adds small random rotations, flips and intensity scale/shift.
MONAI is imported when a pipeline is built, not when this module is imported.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

# monai is heavy to import: imported inside the functions that use it

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageReadError",
    "ImageTransformSpec",
    "apply_transform",
    "build_transform",
    "load_image",
    "reader_for",
]

#: File suffixes the readers accept, by reader.
IMAGE_SUFFIXES: dict[str, tuple[str, ...]] = {
    "PILReader": (".png", ".jpg", ".jpeg", ".bmp"),
    "PydicomReader": (".dcm", ".dicom"),
    "NibabelReader": (".nii", ".nii.gz"),
}

#: Enters ``ImageTransformSpec.describe()`` and so every cache fingerprint: bumped when the
#: same file loads differently (2: MONOCHROME1 DICOM inverted; RGBA to 3 channels keeps
#: its colour).
_TRANSFORM_VERSION = "2"

#: How MONAI's ``PydicomReader`` warns, once per file, that a DICOM file has no
#: ImageOrientationPatient / ImagePositionPatient (usual for 2D radiographs).
_MISSING_GEOMETRY = "PydicomReader: ImageOrientationPatient (0020,0037) and/or"
#: How MONAI warns, each time a ``LoadImage`` is created (it creates every reader it knows,
#: a PNG's included), that the optional GPU DICOM decoder (nvImageCodec) is not installed.
_NO_NVIMGCODEC = r"NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register"
#: Registry of the warnings re-emitted by :func:`_noting_missing_geometry` ("default" filters
#: then show each once per location, as for a direct warning).
_REEMITTED: dict[Any, Any] = {}


class ImageReadError(ValueError):
    """An image file could not be read or converted; the message names the file."""


@dataclass(frozen=True)
class ImageTransformSpec:
    """Everything that decides how an image file becomes a tensor (hashable, JSON-describable).

    Parameters
    ----------
    spatial_dims : int, default 2
        2 or 3.
    size : int, default 64
        Output side length (``size``, ``size x size`` or ``size`` cubed).
    channels : int, default 1
        Output channels: 1 (greyscale; colour is converted by luminance) or 3 (RGB kept,
        RGBA's alpha dropped; a greyscale image repeated).
    pixdim : float or None, default None
        3D only: resample to this isotropic spacing (mm) before padding/cropping to ``size``
        cubed; ``None`` resizes the whole volume to ``size`` cubed.
    orientation : str, default "RAS"
        3D only: axis codes to reorient to.
    normalize : {"minmax", "zscore", None}, default None
        Intensity normalisation; ``None`` picks ``minmax`` in 2D and ``zscore`` in 3D.
    rotate_deg : float, default 10.0
        Training: maximum absolute random rotation (degrees, each axis).
    flip_prob : float, default 0.5
        Training: probability of a flip along the first spatial axis.
    intensity : float, default 0.1
        Training: random intensity scale factor and shift range.
    """

    spatial_dims: int = 2
    size: int = 64
    channels: int = 1
    pixdim: float | None = None
    orientation: str = "RAS"
    normalize: Literal["minmax", "zscore"] | None = None
    rotate_deg: float = 10.0
    flip_prob: float = 0.5
    intensity: float = 0.1

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims!r}")
        if int(self.size) < 1:
            raise ValueError(f"size must be a positive integer, got {self.size!r}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels!r}")
        if self.normalize not in (None, "minmax", "zscore"):
            raise ValueError(
                f"normalize must be 'minmax', 'zscore' or None, got {self.normalize!r}"
            )

    @property
    def norm(self) -> str:
        """The normalisation in effect (``normalize`` or the per-dimension default)."""
        return self.normalize or ("minmax" if self.spatial_dims == 2 else "zscore")

    def describe(self, *, train: bool = False) -> str:
        """Return a stable JSON description (for encoder fingerprints and caches)."""
        d: dict[str, Any] = asdict(self)
        d.update(normalize=self.norm, train=train, version=_TRANSFORM_VERSION)
        if not train:
            for k in ("rotate_deg", "flip_prob", "intensity"):
                d.pop(k)
        return json.dumps(d, sort_keys=True)


def _pil_converter(image: Any) -> Any:
    """Convert PIL modes MONAI would read wrongly (palette, CMYK, 1-bit) to RGB/L."""
    if image.mode in ("P", "PA", "CMYK", "YCbCr", "HSV", "LAB"):
        return image.convert("RGBA" if "A" in image.mode or "transparency" in image.info else "RGB")
    if image.mode == "1":
        return image.convert("L")
    return image


@contextmanager
def _without_nvimgcodec_warning() -> Iterator[None]:
    """Silence MONAI's warning that the optional GPU DICOM decoder is absent (only that one).

    The decoder is an optional extra; without it pydicom decodes, as this package expects.
    """
    # MONAI also logs it on every PydicomReader
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_NVIMGCODEC, category=UserWarning)
        yield


def reader_for(path: str | os.PathLike[str]) -> Any:
    """Return a MONAI reader instance for a file (or DICOM series folder) by its suffix.

    Parameters
    ----------
    path : path-like
        ``.png/.jpg/.jpeg/.bmp`` -> ``PILReader``; ``.dcm/.dicom`` or a folder ->
        ``PydicomReader``; ``.nii/.nii.gz`` -> ``NibabelReader``.

    Raises
    ------
    ImageReadError
        For another suffix.
    """
    with _without_nvimgcodec_warning():
        from monai.data import NibabelReader, PILReader, PydicomReader

        p = Path(path)
        name = p.name.lower()
        if p.is_dir() or name.endswith(IMAGE_SUFFIXES["PydicomReader"]):
            return PydicomReader()
        if name.endswith(IMAGE_SUFFIXES["NibabelReader"]):
            return NibabelReader()
        if name.endswith(IMAGE_SUFFIXES["PILReader"]):
            return PILReader(converter=_pil_converter)
    accepted = sorted(s for v in IMAGE_SUFFIXES.values() for s in v)
    raise ImageReadError(
        f"{str(p)!r}: unsupported image file type; accepted suffixes: {accepted} "
        "(or a folder holding one DICOM series)"
    )


class _ToSpatialDims:
    """Drop singleton spatial axes beyond ``spatial_dims`` or fail with the file's shape."""

    def __init__(self, spatial_dims: int) -> None:
        self.spatial_dims = spatial_dims

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        while img.ndim - 1 > self.spatial_dims and img.shape[-1] == 1:
            img = img[..., 0]
        if img.ndim - 1 != self.spatial_dims:
            raise ValueError(
                f"image has {img.ndim - 1} spatial axes (shape {tuple(img.shape[1:])}) but the "
                f"pipeline expects spatial_dims={self.spatial_dims}"
            )
        return img

    def __repr__(self) -> str:
        return f"_ToSpatialDims({self.spatial_dims})"


class _ToChannels:
    """Convert channel-first images to 1 (luminance) or 3 channels.

    To 3 channels, RGB passes unchanged and RGBA drops its alpha (colour kept either way);
    greyscale (and LA's luminance) is repeated.
    """

    _LUMA = (0.299, 0.587, 0.114)

    def __init__(self, channels: int) -> None:
        self.channels = channels

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        c = img.shape[0]
        if c == self.channels:
            return img
        if c == 4 and self.channels == 3:  # RGBA: alpha dropped, colour kept as for RGB
            return img[:3]
        if c in (3, 4):  # RGB / RGBA: alpha dropped
            w = torch.tensor(self._LUMA, dtype=img.dtype, device=img.device)
            grey = (img[:3] * w.view(3, *([1] * (img.ndim - 1)))).sum(0, keepdim=True)
        elif c == 2:  # LA: luminance + alpha
            grey = img[:1]
        else:
            grey = img.mean(0, keepdim=True)
        return grey if self.channels == 1 else grey.repeat(self.channels, *([1] * (img.ndim - 1)))

    def __repr__(self) -> str:
        return f"_ToChannels({self.channels})"


class _VolumeChannels:
    """Refuse a 3D image whose several channels would be mixed: they are frames, not colours.

    A 4-D NIfTI (time points, echoes, diffusion directions) or a multi-channel DICOM
    series loads channel first; :class:`_ToChannels` would read 3 or 4 of them as RGB(A).
    A volume with exactly ``channels`` channels passes unchanged.
    """

    def __init__(self, channels: int) -> None:
        self.channels = channels

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        c = img.shape[0]
        if c > 1 and c != self.channels:
            meta = getattr(img, "meta", None)
            name = meta.get("filename_or_obj") if isinstance(meta, dict) else None
            where = f"{str(name)!r}: " if name else ""
            raise ImageReadError(
                f"{where}3D image has {c} channels (channel-first shape {tuple(img.shape)}), "
                f"e.g. time or echo frames, which are not mixed into {self.channels}; "
                "select one frame or volume before loading"
            )
        return img

    def __repr__(self) -> str:
        return f"_VolumeChannels({self.channels})"


def build_transform(
    spec: ImageTransformSpec, *, train: bool = False, load: bool = True
) -> Callable[[Any], torch.Tensor]:
    """Build the MONAI ``Compose`` for a spec.

    Parameters
    ----------
    spec : ImageTransformSpec
        The preprocessing description.
    train : bool, default False
        Add random augmentation (rotation, flip, intensity scale/shift).
    load : bool, default True
        Start with ``LoadImage`` (the input is then a path, read by the reader for its
        suffix). With ``load=False`` the input is a channel-first array/tensor.

    Returns
    -------
    monai.transforms.Compose
        Call it on a path (or array) to get ``Tensor[channels, *spatial]`` (float32).
    """
    from monai import transforms as mt

    d = spec.spatial_dims
    steps: list[Any] = []
    if load:
        steps.append(_Load())
    steps.append(_ToSpatialDims(d))
    if d == 3:
        steps.append(_VolumeChannels(spec.channels))
    steps.append(_ToChannels(spec.channels))
    if d == 3:
        steps.append(
            mt.Orientation(axcodes=spec.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S")))
        )
        if spec.pixdim is not None:
            steps.append(mt.Spacing(pixdim=(float(spec.pixdim),) * 3, mode="bilinear"))
            steps.append(mt.ResizeWithPadOrCrop(spatial_size=(spec.size,) * 3))
        else:
            steps.append(mt.Resize(spatial_size=(spec.size,) * 3, mode="trilinear"))
    else:
        steps.append(mt.Resize(spatial_size=(spec.size,) * 2, mode="bilinear"))
    if spec.norm == "minmax":
        steps.append(mt.ScaleIntensity(minv=0.0, maxv=1.0))
    else:
        steps.append(mt.NormalizeIntensity(nonzero=True))
    if train:
        rad = math.radians(spec.rotate_deg)
        rng = (-rad, rad)
        if d == 2:
            steps.append(mt.RandRotate(range_x=rng, prob=0.5, keep_size=True, padding_mode="zeros"))
        else:
            steps.append(
                mt.RandRotate(range_x=rng, range_y=rng, range_z=rng, prob=0.5, keep_size=True)
            )
        steps.append(mt.RandFlip(prob=spec.flip_prob, spatial_axis=0))
        steps.append(mt.RandScaleIntensity(factors=spec.intensity, prob=0.5))
        steps.append(mt.RandShiftIntensity(offsets=spec.intensity, prob=0.5))
    steps.append(mt.EnsureType(data_type="tensor", dtype=torch.float32, track_meta=False))
    return mt.Compose(steps)


def _dicom_photometric(path: Path) -> str | None:
    """The PhotometricInterpretation of a DICOM file (or a series folder's first file).

    Read from the header alone; ``None`` when there is none or the header is unreadable
    (the pixels were read, so the image is used as stored).
    """
    import pydicom
    import pydicom.misc

    if path.is_dir():  # the files MONAI's PydicomReader reads from a folder
        files = [f for f in sorted(path.iterdir()) if f.is_file() and pydicom.misc.is_dicom(f)]
        if not files:
            return None
        path = files[0]
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True,
                             specific_tags=["PhotometricInterpretation"])
    except Exception:  # pydicom raises many kinds on a damaged header
        return None
    value = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    return value or None


def _invert(img: torch.Tensor) -> torch.Tensor:
    """Map a MONOCHROME1 image (low value = bright) to MONOCHROME2: ``max + min - x``.

    The value range is kept, so the same picture stored either way loads the same after
    min-max scaling.
    """
    return img.max() + img.min() - img


class _Load:
    """``LoadImage`` with the reader for the path's suffix and an error naming the file.

    A DICOM image whose PhotometricInterpretation is MONOCHROME1 (low value = bright, as
    many CR/DX radiographs are stored) is inverted to MONOCHROME2 (low value = dark), the
    way every other file is read.
    """

    def __init__(self) -> None:
        self._loader: Any = None
        self._readers: dict[str, Any] = {}

    def __call__(self, path: str | os.PathLike[str]) -> torch.Tensor:
        p = Path(path)
        kind = "dir" if p.is_dir() else "".join(p.suffixes[-2:]).lower() or p.name
        if kind not in self._readers:
            self._readers[kind] = reader_for(p)  # raises on an unsupported suffix
        reader = self._readers[kind]
        if not p.exists():
            raise ImageReadError(f"{str(p)!r}: image file does not exist")
        if self._loader is None:
            from monai.transforms import LoadImage

            with _without_nvimgcodec_warning():  # LoadImage creates every MONAI reader
                self._loader = LoadImage(image_only=True, ensure_channel_first=True)
        try:
            img: torch.Tensor = self._loader(str(p), reader=reader)
        except Exception as exc:
            raise ImageReadError(
                f"{str(p)!r}: could not be read by MONAI {type(reader).__name__} "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        if not torch.isfinite(torch.as_tensor(img)).all():
            raise ImageReadError(f"{str(p)!r}: image contains NaN or infinite values")
        dicom = p.is_dir() or p.name.lower().endswith(IMAGE_SUFFIXES["PydicomReader"])
        if dicom and _dicom_photometric(p) == "MONOCHROME1":
            img = _invert(img)
        return img

    def __getstate__(self) -> dict[str, Any]:
        return {}  # readers are rebuilt lazily (picklable for DataLoader workers)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]

    def __repr__(self) -> str:
        return "_Load()"


def load_image(
    path: str | os.PathLike[str],
    *,
    spatial_dims: int = 2,
    size: int = 64,
    channels: int = 1,
    train: bool = False,
    seed: int | None = None,
    spec: ImageTransformSpec | None = None,
    notes: list[str] | None = None,
) -> torch.Tensor:
    """Read one image file and preprocess it like the encoder's pipeline does.

    Parameters
    ----------
    path : path-like
        A PNG/JPEG/BMP, DICOM (``.dcm``), NIfTI (``.nii``/``.nii.gz``) file or a DICOM folder.
    spatial_dims, size, channels : int
        See :class:`ImageTransformSpec` (ignored when ``spec`` is given).
    train : bool, default False
        Apply the random training augmentation.
    seed : int or None
        Seed for the augmentation's random state (reproducible augmentation).
    spec : ImageTransformSpec or None
        Full preprocessing spec; overrides ``spatial_dims``, ``size`` and ``channels``.
    notes : list of str or None
        See :func:`apply_transform`: DICOM files without orientation tags are listed here
        instead of MONAI warning about each.

    Returns
    -------
    Tensor[channels, *spatial]
        float32.

    Raises
    ------
    ImageReadError
        When the file is missing, of an unsupported type, unreadable, has the wrong
        number of spatial axes, or is a 3D image with several channels (a 4-D NIfTI's
        frames; unless ``channels`` of them); the message names the file.
    """
    spec = spec or ImageTransformSpec(spatial_dims=spatial_dims, size=size, channels=channels)
    pipeline: Any = build_transform(spec, train=train)
    if seed is not None:
        pipeline.set_random_state(seed=seed)
    return apply_transform(pipeline, path, notes=notes)


@contextmanager
def _noting_missing_geometry(path: str | os.PathLike[str], notes: list[str]) -> Iterator[None]:
    """Record MONAI's missing-orientation warning as a note on ``path``; re-emit the others."""
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        missing = False
        for w in caught:
            if str(w.message).startswith(_MISSING_GEOMETRY):
                missing = True
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno,
                                       registry=_REEMITTED)
        if missing:
            notes.append(str(path))


def apply_transform(
    pipeline: Callable[[Any], torch.Tensor], path: str | os.PathLike[str], *,
    notes: list[str] | None = None,
) -> torch.Tensor:
    """Run a pipeline from :func:`build_transform` on a path, raising :class:`ImageReadError`.

    Parameters
    ----------
    pipeline : callable
        Built by :func:`build_transform` (``load=True``).
    path : path-like
        The image file.
    notes : list of str or None
        When given, a DICOM file without ImageOrientationPatient / ImagePositionPatient
        (usual for 2D radiographs; MONAI then assumes an identity orientation, which only a
        3D volume's reorientation depends on) is appended here instead of MONAI warning
        about it; other warnings pass unchanged. ``None``: MONAI's warning is shown.

    Returns
    -------
    Tensor[channels, *spatial]
    """
    try:
        if notes is None:
            out: torch.Tensor = pipeline(path)
        else:
            with _noting_missing_geometry(path, notes):
                out = pipeline(path)
    except ImageReadError:
        raise
    except Exception as exc:
        cause: BaseException = exc
        while True:
            if isinstance(cause, ImageReadError):
                raise cause from exc
            if cause.__cause__ is None:
                break
            cause = cause.__cause__
        raise ImageReadError(f"{str(path)!r}: preprocessing failed: {cause}") from exc
    return out
