"""Helpers that make small DICOM series for tests: phantoms, acquisitions in any orientation,
edited copies (missing, moved or duplicated slices), non-image objects, RGB, JPEG baseline and
enhanced multi-frame files, plus assertions that a read volume puts source pixels at their world
positions. Other test modules may import them (``from dicom_factory import ...``).
"""

from __future__ import annotations

import io
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    PYDICOM_IMPLEMENTATION_UID,
    generate_uid,
)

from napari_medsam.io.dicom.write import write_dicom_series
from napari_medsam.volume import Volume

# Acquisition frames as Volume.direction columns (slice, row, column axis in LPS).
AXIAL = np.column_stack([[0, 0, 1], [0, 1, 0], [1, 0, 0]]).astype(float)
# Sagittal: columns run anterior->posterior, rows head->feet, slices right->left.
SAGITTAL = np.column_stack([[1, 0, 0], [0, 0, -1], [0, 1, 0]]).astype(float)
# Coronal: columns run right->left, rows head->feet, slices anterior->posterior.
CORONAL = np.column_stack([[0, 1, 0], [0, 0, -1], [1, 0, 0]]).astype(float)


def rotation(axis: str, degrees: float) -> np.ndarray:
    """3x3 rotation about an LPS axis ('x', 'y' or 'z')."""
    a = np.radians(degrees)
    c, s = np.cos(a), np.sin(a)
    i, j = {"x": (1, 2), "y": (2, 0), "z": (0, 1)}[axis]
    m = np.eye(3)
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    return m


def oblique(degrees_x: float = 20.0, degrees_z: float = 12.0) -> np.ndarray:
    """An axial frame tilted about x then turned about z."""
    return rotation("z", degrees_z) @ rotation("x", degrees_x) @ AXIAL


def phantom(shape: tuple[int, int, int] = (12, 40, 48), seed: int = 0) -> np.ndarray:
    """An int16 HU volume: air, a body ellipse of soft tissue, a bright bone and a dark lesion, noise."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    hu = np.full(shape, -1000.0)
    hu[(y / 0.85) ** 2 + (x / 0.9) ** 2 < 1] = 40.0
    hu[(y - 0.3) ** 2 + (x + 0.4) ** 2 < 0.04] = 700.0
    hu[(z * 0.8) ** 2 + (y + 0.2) ** 2 + (x - 0.3) ** 2 < 0.06] = -60.0
    hu += np.round(rng.normal(0, 12, shape))
    # An asymmetric marker so flips and transposes cannot go unnoticed.
    hu[1, 2:5, 3:9] = 1500 + np.arange(6)[None, :]
    return np.clip(hu, -1024, 3071).astype(np.int16)


def make_volume(
    array: np.ndarray,
    direction: np.ndarray = AXIAL,
    spacing: tuple[float, float, float] = (2.5, 0.75, 0.8),
    origin: tuple[float, float, float] = (-20.0, -15.0, 40.0),
) -> Volume:
    """A Volume whose axis 0 becomes the DICOM slices, axis 1 the rows and axis 2 the columns."""
    return Volume(np.asarray(array), spacing, origin, np.asarray(direction, dtype=float))


def write_series(folder: Path, volume: Volume, prefix: str = "", **kwargs) -> list[Path]:
    """Write ``volume`` as a DICOM series into ``folder`` (which may already hold other files)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        written = write_dicom_series(volume, Path(tmp) / "series", **kwargs)
        out = []
        for path in written:
            target = folder / f"{prefix}{path.name}"
            shutil.move(path, target)
            out.append(target)
    return out


def edit(files: list[Path], change: Callable[[Dataset, int], None]) -> None:
    """Load each file, let ``change(ds, index)`` modify it and save it back in place."""
    for index, path in enumerate(files):
        ds = pydicom.dcmread(path)
        change(ds, index)
        ds.save_as(path, enforce_file_format=True)


def shift_position(ds: Dataset, offset: tuple[float, float, float]) -> None:
    """Move an image by ``offset`` mm (LPS) by editing its ImagePositionPatient."""
    ds.ImagePositionPatient = [float(v) + d for v, d in zip(ds.ImagePositionPatient, offset)]


def pixel_world(ds: Dataset, row: float, column: float) -> np.ndarray:
    """LPS position of pixel (row, column) of a single-frame image, from its own header."""
    iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
    row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
    return (
        np.asarray(ds.ImagePositionPatient, dtype=float)
        + iop[:3] * column_spacing * column
        + iop[3:] * row_spacing * row
    )


def _file_meta(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta


def _patient_study(ds: Dataset, modality: str) -> None:
    ds.PatientName, ds.PatientID = "Test^Object", "TEST"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = modality
    ds.SeriesNumber = 9


def write_sr(path: Path) -> Path:
    """A Basic Text SR document (no pixel data)."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    _patient_study(ds, "SR")
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    _file_meta(ds)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_rtstruct(path: Path) -> Path:
    """A skeletal RT Structure Set (no pixel data)."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    _patient_study(ds, "RTSTRUCT")
    ds.StructureSetLabel = "contours"
    ds.StructureSetROISequence = Sequence()
    _file_meta(ds)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_rgb_series(folder: Path, n: int = 3, rows: int = 16, columns: int = 20) -> list[Path]:
    """Secondary-capture RGB images with positions, i.e. a stack that is not greyscale."""
    folder.mkdir(parents=True, exist_ok=True)
    series, study = generate_uid(), generate_uid()
    out = []
    for k in range(n):
        ds = Dataset()
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        _patient_study(ds, "OT")
        ds.SeriesInstanceUID, ds.StudyInstanceUID = series, study
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, 0, 2.0 * k]
        ds.PixelSpacing = [1, 1]
        ds.Rows, ds.Columns = rows, columns
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = np.full((rows, columns, 3), 30 * k, dtype=np.uint8).tobytes()
        _file_meta(ds)
        path = folder / f"rgb{k}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


def write_jpeg_baseline_series(folder: Path, volume: Volume, quality: int = 95) -> list[Path]:
    """Write ``volume`` (values 0..255) as 8-bit MR images compressed with JPEG baseline via Pillow."""
    from PIL import Image

    files = write_series(folder, volume.with_array(volume.array.astype(np.uint16)), modality="MR")

    def to_jpeg(ds: Dataset, _: int) -> None:
        pixels = ds.pixel_array.astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(buffer, format="JPEG", quality=quality)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = encapsulate([buffer.getvalue()])
        ds["PixelData"].VR = "OB"
        ds.LossyImageCompression = "01"
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit

    edit(files, to_jpeg)
    return files


def write_enhanced_ct(path: Path, volume: Volume, frame_order: list[int] | None = None) -> Path:
    """One Enhanced CT Image Storage file holding every slice of ``volume`` as a frame (HU + 1024, uint16)."""
    n, rows, columns = volume.shape
    order = list(range(n)) if frame_order is None else list(frame_order)
    direction = np.asarray(volume.direction, dtype=float)
    spacing, origin = volume.spacing_mm, np.asarray(volume.origin_mm, dtype=float)
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    _patient_study(ds, "CT")
    ds.FrameOfReferenceUID = generate_uid()
    ds.SeriesDescription = "enhanced"
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, columns, len(order)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0

    def item(**values) -> Dataset:
        out = Dataset()
        for key, value in values.items():
            setattr(out, key, value)
        return out

    def group(**values) -> Sequence:
        return Sequence([item(**values)])

    shared = item(
        PlaneOrientationSequence=group(ImageOrientationPatient=[*direction[:, 2], *direction[:, 1]]),
        PixelMeasuresSequence=group(PixelSpacing=[spacing[1], spacing[2]], SliceThickness=spacing[0]),
        PixelValueTransformationSequence=group(RescaleIntercept=-1024, RescaleSlope=1, RescaleType="HU"),
        FrameVOILUTSequence=group(WindowCenter=40, WindowWidth=400),
    )
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    step = direction[:, 0] * spacing[0]
    ds.PerFrameFunctionalGroupsSequence = Sequence(
        [
            item(PlanePositionSequence=group(ImagePositionPatient=list(origin + step * k)))
            for k in order
        ]
    )
    frames = (volume.array[order].astype(np.int32) + 1024).astype(np.uint16)
    ds.PixelData = frames.tobytes()
    _file_meta(ds)
    ds.save_as(path, enforce_file_format=True)
    return path


def assert_display_orientation(volume: Volume) -> None:
    """Slice axis ~S, rows ~P, columns ~L, each pointing the positive way."""
    for axis, world in enumerate((2, 1, 0)):
        assert int(np.argmax(np.abs(volume.direction[:, axis]))) == world
        assert volume.direction[world, axis] > 0


def assert_matches_sources(
    volume: Volume, files: list[Path], samples: tuple = ((0, 0), (3, 7), (39, 47), (20, 11))
) -> None:
    """Pixels of the source files land at the display voxel whose world position they have."""
    for path in files:
        ds = pydicom.dcmread(path)
        slope, intercept = int(ds.get("RescaleSlope", 1)), int(ds.get("RescaleIntercept", 0))
        pixels = ds.pixel_array.astype(np.int64) * slope + intercept
        for row, column in samples:
            world = pixel_world(ds, row, column)
            index = volume.world_to_index(world)[0]
            assert np.allclose(index, np.round(index), atol=1e-4), (path.name, index)
            voxel = tuple(int(v) for v in np.round(index))
            assert np.allclose(volume.index_to_world(voxel)[0], world, atol=1e-4)
            assert volume.array[voxel] == pixels[row, column]


def move_shared_groups_per_frame(path: Path, keywords: tuple[str, ...] = ("PixelMeasuresSequence",)) -> Path:
    """Rewrite an enhanced image so the given functional groups sit in every per-frame item, not the shared one.

    Several scanners (e.g. Siemens XA enhanced MR) write pixel measures and orientation per frame.
    """
    import copy

    ds = pydicom.dcmread(path)
    shared = ds.SharedFunctionalGroupsSequence[0]
    for keyword in keywords:
        for item in ds.PerFrameFunctionalGroupsSequence:
            item[keyword] = copy.deepcopy(shared[keyword])
        del shared[keyword]
    ds.save_as(path, enforce_file_format=True)
    return path
