"""Fixtures for the encoder tests: tiny text model, small image files of every format."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)

VOCAB = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
    *"the patient has fever cough oxygen chest pain no yes and of a to was on air room".split(),
    *"saturation low high day admitted discharged x ray shows opacity mild severe".split(),
    "##s", "##ed", "##ing", ".", ",",
]  # fmt: skip


def make_tiny_text_model(folder: Path, *, seed: int = 0, max_len: int = 64) -> Path:
    """Save a random 2-layer BERT and a WordPiece tokenizer to ``folder`` (offline)."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    tok = BertTokenizer(  # transformers 5: the tokenizers-backed (fast) class
        vocab=str(vocab), model_max_length=max_len
    )
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=max_len,
    )
    BertModel(cfg).eval().save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_text_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with a tiny random BERT + tokenizer (session-wide, read-only by convention)."""
    return make_tiny_text_model(tmp_path_factory.mktemp("tiny_bert"))


def write_dicom(path: Path, array: np.ndarray, *, photometric: str = "MONOCHROME2") -> Path:
    """Write a 2D uint16 greyscale DICOM file (``photometric``: its PhotometricInterpretation)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = "p1"
    ds.Modality = "DX"
    arr = array.astype(np.uint16)
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = arr.tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


@pytest.fixture(scope="session")
def image_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small images: grey/RGB/RGBA/palette/16-bit PNG, JPEG, DICOM, NIfTI volume, a corrupt PNG."""
    import nibabel as nib
    from PIL import Image

    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    grey = (rng.random((40, 50)) * 255).astype(np.uint8)
    files = {
        "grey_png": d / "grey.png",
        "rgb_jpg": d / "rgb.jpg",
        "rgba_png": d / "rgba.png",
        "palette_png": d / "palette.png",
        "grey16_png": d / "grey16.png",
        "dicom": d / "xray.dcm",
        "nifti": d / "brain.nii.gz",
        "corrupt_png": d / "corrupt.png",
    }
    Image.fromarray(grey).save(files["grey_png"])
    Image.fromarray((rng.random((40, 50, 3)) * 255).astype(np.uint8)).save(files["rgb_jpg"])
    Image.fromarray((rng.random((40, 50, 4)) * 255).astype(np.uint8), "RGBA").save(
        files["rgba_png"]
    )
    Image.fromarray(grey).convert("P").save(files["palette_png"])
    Image.fromarray((rng.random((40, 50)) * 65535).astype(np.uint16)).save(files["grey16_png"])
    write_dicom(files["dicom"], rng.random((40, 50)) * 4000)
    vol = rng.random((20, 24, 18)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.diag([1.5, 1.0, 1.0, 1.0])), str(files["nifti"]))
    files["corrupt_png"].write_bytes(b"this is not a png")
    return files
