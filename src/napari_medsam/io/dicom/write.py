"""Write a :class:`~napari_medsam.volume.Volume` as a classic DICOM image series (CT or MR).

One single-frame CT Image Storage (or MR Image Storage) instance is written per slice of the
volume's display array (axis 0). Image geometry comes from the volume: the DICOM row cosine is
the direction of the display *column* axis, the column cosine the direction of the display *row*
axis, and ImagePositionPatient is the world position of voxel ``(s, 0, 0)``. The volume's
direction need not follow the display convention, which lets tests write sagittal, coronal and
oblique acquisitions by handing in a volume whose axes point wherever the acquisition did.

Pixel storage: integer CT data are stored as ``HU + 1024`` (RescaleIntercept -1024, slope 1) in
uint16 or, when values below -1024 occur, int16. Integer MR data are stored as they are. Data that
are not whole numbers are quantised to 16 bits with a RescaleSlope/Intercept (lossy, documented by
a Derivation Description).

The files carry every Type 1 and Type 2 attribute of the CT/MR Image IODs so ``dciodvfy`` reports
no errors. UIDs derive from ``uid_seed`` when given so a seeded sample-data run is reproducible
byte for byte (the content date is then fixed as well).
"""

from __future__ import annotations

import datetime as _dt
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    generate_uid,
)

from ...errors import DicomWriteError
from ...volume import Volume
from .._text import short_path, short_text

CT_INTERCEPT = -1024.0
_UNCOMPRESSED = {ExplicitVRLittleEndian, ImplicitVRLittleEndian}


def write_dicom_series(
    volume: Volume,
    out_dir: str | os.PathLike,
    *,
    modality: str = "CT",
    series_description: str = "napari-medsam synthetic series",
    patient_name: str = "Phantom^Abdomen",
    patient_id: str = "MEDSAM-PHANTOM",
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    series_number: int = 1,
    transfer_syntax: str = ExplicitVRLittleEndian,
    instance_order: Literal["ascending", "descending", "shuffled"] = "ascending",
    uid_seed: str | None = None,
    window: tuple[float, float] | None = None,
    content_datetime: _dt.datetime | None = None,
) -> list[Path]:
    """Write one CT/MR Image Storage file per display slice into the new folder ``out_dir``.

    Returns the file paths in display slice order (``paths[s]`` holds slice ``s``), whatever
    ``instance_order`` did to InstanceNumber and the file names.
    """
    modality = modality.upper()
    if modality not in ("CT", "MR"):
        raise DicomWriteError(f"Cannot write modality {modality!r}: choose 'CT' or 'MR'.")
    if instance_order not in ("ascending", "descending", "shuffled"):
        raise DicomWriteError(
            f"Unknown instance_order {instance_order!r}: use 'ascending', 'descending' or 'shuffled'."
        )
    array = np.asarray(volume.array)
    if array.ndim != 3 or array.size == 0:
        raise DicomWriteError(
            f"Cannot write an array of shape {array.shape}: a non-empty 3D volume is needed."
        )
    transfer_syntax = UID(transfer_syntax)
    if transfer_syntax not in _UNCOMPRESSED and str(transfer_syntax) not in _ENCODER_PACKAGES:
        raise DicomWriteError(
            f"Cannot write transfer syntax {transfer_syntax.name} ({transfer_syntax}): choose Explicit or "
            "Implicit VR Little Endian, RLE Lossless, JPEG 2000 Lossless or JPEG-LS Lossless."
        )
    target = Path(out_dir).expanduser()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise DicomWriteError(
            f"Cannot write the DICOM series into {short_path(target)}: it exists and is not an empty folder. "
            "Choose a new folder."
        )
    parent = target.parent
    if not parent.is_dir():
        raise DicomWriteError(f"Cannot write into {target.name}: the folder {short_path(parent)} does not exist.")

    uids = _UidSource(uid_seed)
    study_uid = study_uid or uids.make("study")
    series_uid = series_uid or uids.make(f"series-{series_number}-{series_description}")
    frame_uid = frame_of_reference_uid or uids.make("frame-of-reference")
    if content_datetime is None:
        content_datetime = _dt.datetime(2000, 1, 1, 12, 0, 0) if uid_seed is not None else _dt.datetime.now()

    stored, slope, intercept, signed = _to_stored(array, modality)
    if window is None:
        window = _default_window(array, modality)

    n = array.shape[0]
    numbers = list(range(1, n + 1))
    if instance_order == "descending":
        numbers.reverse()
    elif instance_order == "shuffled":
        random.Random(uid_seed or "shuffle").shuffle(numbers)

    base = _base_dataset(
        volume, modality, series_description, patient_name, patient_id, study_uid, series_uid,
        frame_uid, series_number, content_datetime, window, slope, intercept, signed, stored.shape,
        lossy=not _is_integral(array),
    )
    direction = np.asarray(volume.direction, dtype=float)
    spacing = np.asarray(volume.spacing_mm, dtype=float)
    origin = np.asarray(volume.origin_mm, dtype=float)
    normal = np.cross(direction[:, 2], direction[:, 1])

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=parent))
    try:
        written: list[str] = []
        for s in range(n):
            ds = _slice_dataset(base, uids, series_uid, s, numbers[s])
            position = origin + direction[:, 0] * spacing[0] * s
            ds.ImagePositionPatient = [_ds_number(v) for v in position]
            ds.SliceLocation = _ds_number(float(position @ normal))
            ds.PixelData = np.ascontiguousarray(stored[s]).tobytes()
            _finish_file_meta(ds, transfer_syntax)
            if transfer_syntax not in _UNCOMPRESSED:
                _compress(ds, transfer_syntax, stored[s])
            name = f"IM{numbers[s]:05d}.dcm"
            ds.save_as(tmp / name, enforce_file_format=True)
            written.append(name)
        # mkdtemp makes a private folder; give the series the permissions a new folder would get.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        if target.exists():
            target.rmdir()
        os.replace(tmp, target)
    except DicomWriteError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DicomWriteError(
            f"Could not write the DICOM series into {short_path(target)}: {short_text(str(exc.strerror or exc), 80)}. "
            "Nothing was written."
        ) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [target / name for name in written]


class _UidSource:
    """UIDs that are random, or derived from a seed so that repeated runs give the same ones."""

    def __init__(self, seed: str | None) -> None:
        self.seed = seed

    def make(self, purpose: str) -> str:
        if self.seed is None:
            return str(generate_uid())
        return str(generate_uid(entropy_srcs=[self.seed, purpose]))


def _is_integral(array: np.ndarray) -> bool:
    if np.issubdtype(array.dtype, np.integer) or array.dtype == bool:
        return True
    return bool(np.all(np.isfinite(array)) and np.all(array == np.round(array)))


def _to_stored(array: np.ndarray, modality: str) -> tuple[np.ndarray, float, float, bool]:
    """Stored 16-bit pixel values, rescale slope, intercept and signedness for ``array``."""
    if not np.all(np.isfinite(array)):
        raise DicomWriteError("Cannot write a volume with NaN or infinite values to DICOM.")
    lo, hi = float(array.min()), float(array.max())
    if _is_integral(array):
        intercept = CT_INTERCEPT if modality == "CT" else 0.0
        values = array.astype(np.int64) - int(intercept)
        vlo, vhi = lo - intercept, hi - intercept
        if vlo >= 0 and vhi <= 65535:
            return values.astype(np.uint16), 1.0, intercept, False
        if vlo >= -32768 and vhi <= 32767:
            return values.astype(np.int16), 1.0, intercept, True
    # Not whole numbers, or outside 16 bits: quantise onto 0..65535 with a linear rescale.
    slope = (hi - lo) / 65535.0 if hi > lo else 1.0
    stored = np.round((array.astype(np.float64) - lo) / slope)
    return np.clip(stored, 0, 65535).astype(np.uint16), slope, lo, False


def _default_window(array: np.ndarray, modality: str) -> tuple[float, float]:
    if modality == "CT":
        return 40.0, 400.0
    lo, hi = np.percentile(array, [1.0, 99.0])
    width = max(float(hi - lo), 1.0)
    return float(lo) + width / 2.0, width


def _ds_number(value: float) -> str:
    """A Decimal String of at most 16 characters that keeps as many digits as fit."""
    value = 0.0 if abs(value) < 1e-12 else float(value)
    for digits in range(12, 0, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            return text
    raise DicomWriteError(f"The number {value} cannot be written as a DICOM decimal string.")


def _base_dataset(
    volume: Volume, modality: str, description: str, patient_name: str, patient_id: str,
    study_uid: str, series_uid: str, frame_uid: str, series_number: int,
    when: _dt.datetime, window: tuple[float, float], slope: float, intercept: float,
    signed: bool, shape: tuple[int, ...], lossy: bool,
) -> Dataset:
    """Attributes shared by every instance of the series."""
    ds = Dataset()
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage if modality == "CT" else MRImageStorage
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL" if modality == "CT" else "OTHER"]
    # Patient module
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    # General Study module
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = time
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.StudyDescription = "napari-medsam synthetic study"
    # General Series module
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    ds.PatientPosition = "HFS"
    # An unpaired body part makes the Type 2C Laterality not applicable (dciodvfy wants it absent).
    ds.BodyPartExamined = "ABDOMEN"
    # Frame of Reference module
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    # General Equipment module
    ds.Manufacturer = "napari-medsam"
    ds.ManufacturerModelName = "synthetic"
    ds.SoftwareVersions = "napari-medsam"
    # General Image / Acquisition
    ds.AcquisitionNumber = 1
    ds.PatientOrientation = ""
    if lossy:
        ds.DerivationDescription = "Floating point values quantised to 16 bits with a linear rescale"
        ds.LossyImageCompression = "01"
    # Image Plane module
    direction = np.asarray(volume.direction, dtype=float)
    row_cosine, column_cosine = direction[:, 2], direction[:, 1]
    ds.ImageOrientationPatient = [_ds_number(v) for v in (*row_cosine, *column_cosine)]
    spacing = volume.spacing_mm
    ds.PixelSpacing = [_ds_number(spacing[1]), _ds_number(spacing[2])]
    ds.SliceThickness = _ds_number(spacing[0])
    ds.SpacingBetweenSlices = _ds_number(spacing[0])
    # Image Pixel module
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(shape[1]), int(shape[2])
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if signed else 0
    # Modality-specific modules
    if modality == "CT":
        ds.KVP = "120"
        ds.RescaleType = "HU"
    else:
        ds.ScanningSequence = "GR"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "3D"
        ds.RepetitionTime = "10"
        ds.EchoTime = "4"
        ds.EchoTrainLength = "1"
        ds.MagneticFieldStrength = "3"
    if modality == "CT" or slope != 1.0 or intercept != 0.0:
        ds.RescaleIntercept = _ds_number(intercept)
        ds.RescaleSlope = _ds_number(slope)
    ds.WindowCenter = _ds_number(window[0])
    ds.WindowWidth = _ds_number(max(window[1], 1.0))
    return ds


def _slice_dataset(base: Dataset, uids: _UidSource, series_uid: str, index: int, number: int) -> Dataset:
    ds = Dataset()
    ds.update(base)
    ds.SOPInstanceUID = uids.make(f"{series_uid}-instance-{index}")
    ds.InstanceNumber = number
    return ds


def _finish_file_meta(ds: Dataset, transfer_syntax: UID) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    # Compressed data are encoded later by Dataset.compress, which sets the final syntax.
    meta.TransferSyntaxUID = transfer_syntax if transfer_syntax in _UNCOMPRESSED else ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "NAPARI_MEDSAM"
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128


_ENCODER_PACKAGES = {
    "1.2.840.10008.1.2.5": "pydicom (built in) or pylibjpeg-rle",
    "1.2.840.10008.1.2.4.90": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.80": "pyjpegls",
}


def _compress(ds: Dataset, transfer_syntax: UID, pixels: np.ndarray) -> None:
    """Compress the slice in place; only lossless syntaxes are offered so values survive exactly."""
    try:
        ds.compress(transfer_syntax, np.ascontiguousarray(pixels), generate_instance_uid=False)
    except (RuntimeError, ValueError, ImportError) as exc:
        raise DicomWriteError(
            f"Could not compress with {transfer_syntax.name} ({transfer_syntax}): {exc}. "
            f"It needs the package {_ENCODER_PACKAGES[str(transfer_syntax)]}."
        ) from exc
    if ds.get("LossyImageCompression") != "01":
        ds.LossyImageCompression = "00"
