"""Plane geometry shared by the DICOM-SEG writer and reader.

A source image (or one frame of a multi-frame image) is a :class:`Plane` in patient space;
:func:`fit_plane` matches its pixels to the voxels of a display-order :class:`~napari_medsam.volume.Volume`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...volume import Volume
from .dose import dose_frame_positions, is_dose_grid
from .scan import functional_group_value

SEG_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation Storage",
    "1.2.840.10008.5.1.4.1.1.66.7": "Label Map Segmentation Storage",
}


# Largest distance (in voxels) between a source pixel centre and the display voxel it is matched
# to. Generous along the stack so rounded ImagePositionPatient values still match their slice.
FIT_TOLERANCE = 0.25


@dataclass(frozen=True)
class Plane:
    """One image plane: pixel (r, c) lies at ``origin + r*dy*column_cosine + c*dx*row_cosine``."""

    origin: np.ndarray
    row_cosine: np.ndarray
    column_cosine: np.ndarray
    pixel_spacing: tuple[float, float]  # (between rows, between columns), as PixelSpacing
    rows: int
    columns: int
    sop_instance_uid: str = ""
    frame_number: int | None = None


@dataclass(frozen=True)
class PlaneFit:
    """Where a plane sits in a display-order array: ``array[index]`` is its (rows, columns) image."""

    index: tuple
    stack_axis: int
    stack_index: int
    full: bool  # the plane covers the whole display slice


def plane_from_values(position, orientation, spacing, rows: int, columns: int, uid: str = "", frame=None) -> Plane:
    """A :class:`Plane` from ImagePositionPatient, ImageOrientationPatient and PixelSpacing values."""
    if position is None or orientation is None or spacing is None:
        raise ValueError(f"image {uid or '?'} has no ImagePositionPatient/ImageOrientationPatient/PixelSpacing")
    position = np.asarray([float(v) for v in position])
    orientation = np.asarray([float(v) for v in orientation])
    spacing = tuple(float(v) for v in spacing)
    if position.shape != (3,) or orientation.shape != (6,) or len(spacing) != 2 or min(spacing) <= 0:
        raise ValueError(f"image {uid or '?'} has malformed plane geometry")
    return Plane(
        position, orientation[:3], orientation[3:], spacing, int(rows), int(columns), uid, frame  # type: ignore[arg-type]
    )


FILE_META_UIDS = {"SOPInstanceUID": "MediaStorageSOPInstanceUID", "SOPClassUID": "MediaStorageSOPClassUID"}


def source_uid(ds, keyword: str = "SOPInstanceUID") -> str:
    """SOPInstanceUID or SOPClassUID of a source header; from its file meta when the data set's is empty.

    Anonymisers often blank these two in the data set and leave them in the file meta information
    (MediaStorageSOPInstanceUID / MediaStorageSOPClassUID), which names the same instance.
    """
    value = str(ds.get(keyword, "") or "").strip()
    if not value:
        meta = getattr(ds, "file_meta", None)
        if meta is not None:
            value = str(meta.get(FILE_META_UIDS[keyword], "") or "").strip()
    return value


def dataset_planes(ds) -> list[Plane]:
    """The image planes of one source header: one for a classic image, one per frame otherwise."""
    uid = source_uid(ds)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if is_dose_grid(ds):
        orientation, spacing = ds.get("ImageOrientationPatient"), ds.get("PixelSpacing")
        return [
            plane_from_values(position, orientation, spacing, ds.Rows, ds.Columns, uid, f + 1)
            for f, position in enumerate(dose_frame_positions(ds))
        ]
    if "PerFrameFunctionalGroupsSequence" not in ds:
        if frames > 1:
            raise ValueError(f"multi-frame image {uid} has no per-frame plane positions")
        geometry = (ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient"), ds.get("PixelSpacing"))
        return [plane_from_values(*geometry, ds.Rows, ds.Columns, uid)]
    return [
        plane_from_values(
            functional_group_value(ds, f, "PlanePositionSequence", "ImagePositionPatient"),
            functional_group_value(ds, f, "PlaneOrientationSequence", "ImageOrientationPatient"),
            functional_group_value(ds, f, "PixelMeasuresSequence", "PixelSpacing"),
            ds.Rows, ds.Columns, uid, f + 1,
        )
        for f in range(frames)
    ]


def _snap(step: np.ndarray) -> tuple[int, int]:
    axis = int(np.argmax(np.abs(step)))
    return axis, (1 if step[axis] > 0 else -1)


def fit_plane(plane: Plane, like: Volume, tolerance: float = FIT_TOLERANCE) -> PlaneFit | None:
    """Match every pixel of ``plane`` to a voxel of ``like``'s display grid; None if it does not fit."""
    start = like.world_to_index(plane.origin)[0]
    row_step = like.world_to_index(plane.origin + plane.column_cosine * plane.pixel_spacing[0])[0] - start
    col_step = like.world_to_index(plane.origin + plane.row_cosine * plane.pixel_spacing[1])[0] - start
    (row_axis, row_sign), (col_axis, col_sign) = _snap(row_step), _snap(col_step)
    if row_axis == col_axis:
        return None
    base = np.rint(start)
    unit_r, unit_c = np.zeros(3), np.zeros(3)
    unit_r[row_axis], unit_c[col_axis] = row_sign, col_sign
    shape = np.asarray(like.shape)
    for i in (0, plane.rows - 1):
        for j in (0, plane.columns - 1):
            exact = start + i * row_step + j * col_step
            snapped = base + i * unit_r + j * unit_c
            if np.abs(exact - snapped).max() > tolerance or np.any(snapped < 0) or np.any(snapped >= shape):
                return None
    stack_axis = 3 - row_axis - col_axis
    index: list = [0, 0, 0]
    index[row_axis] = int(base[row_axis]) + row_sign * np.arange(plane.rows)[:, None]
    index[col_axis] = int(base[col_axis]) + col_sign * np.arange(plane.columns)[None, :]
    index[stack_axis] = int(base[stack_axis])
    full = plane.rows == like.shape[row_axis] and plane.columns == like.shape[col_axis]
    return PlaneFit(tuple(index), stack_axis, int(base[stack_axis]), full)


def add_dose_functional_groups(ds) -> None:
    """Give an RT Dose header the functional groups that describe its frames, in place.

    highdicom reads the geometry of any multi-frame source from Shared / Per-frame Functional
    Groups, which an RT Dose does not have (its frames are placed by GridFrameOffsetVector). The
    groups made here hold the same planes as :func:`dataset_planes`: pixel measures and
    orientation shared, one plane position per frame. The slice thickness, Type 2 and often
    empty in an RT Dose, is the grid spacing.
    """
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    planes = dataset_planes(ds)
    normal = np.cross(planes[0].row_cosine, planes[0].column_cosine)
    heights = sorted(float(p.origin @ normal) for p in planes)
    steps = [b - a for a, b in zip(heights, heights[1:]) if b - a > 1e-6]
    thickness = ds.get("SliceThickness")
    if thickness in (None, "") and steps:
        thickness = min(steps)
    measures = Dataset()
    measures.PixelSpacing = [_ds(v) for v in planes[0].pixel_spacing]
    if thickness not in (None, ""):
        measures.SliceThickness = _ds(float(thickness))
    orientation = Dataset()
    orientation.ImageOrientationPatient = [_ds(v) for v in ds.ImageOrientationPatient]
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PlaneOrientationSequence = Sequence([orientation])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for plane in planes:
        position = Dataset()
        position.ImagePositionPatient = [_ds(v) for v in plane.origin]
        item = Dataset()
        item.PlanePositionSequence = Sequence([position])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)


def _ds(value: float) -> str:
    """A decimal string (at most 16 characters) for ``value``."""
    from pydicom.valuerep import format_number_as_ds

    return format_number_as_ds(float(value))
