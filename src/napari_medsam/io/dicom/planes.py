"""Image planes of a DICOM stack and their regular grid along the slice normal.

A *plane* is one image: a single-frame file, or one frame of an enhanced multi-frame file, with
its position, pixel spacing and rescale. :func:`collect_planes` gathers them for a scanned stack,
:func:`file_direction` gives the unit vectors of the file axes (row cosine, column cosine,
normal) and :func:`slice_grid` sorts planes along the normal and places each on a regular grid,
allowing whole missing slices but rejecting any other irregular spacing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from ...errors import DicomSeriesError, NotAVolumeError
from .._text import short_text
from .dose import dose_frame_positions, is_dose_grid
from .scan import (
    DicomSeriesInfo,
    functional_group_value,
    header_orientation,
    is_multiframe_with_positions,
)

GRID_TOLERANCE = 0.05  # fraction of the slice spacing a position may miss its grid point by
DUPLICATE_MM = 1e-3  # positions closer than this along the normal are the same slice


@dataclass
class Plane:
    """One image plane: a single-frame file, or one frame of a multi-frame file."""

    path: Path
    frame: int | None
    header: Dataset
    position: np.ndarray
    spacing: tuple[float, float]  # PixelSpacing: (between rows, between columns)
    slope: float
    intercept: float


def _floats(value: object, n: int, what: str, path: Path) -> np.ndarray:
    try:
        out = np.asarray([float(v) for v in value], dtype=float)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        out = np.empty(0)
    if out.shape != (n,) or not np.all(np.isfinite(out)):
        raise DicomSeriesError(
            f"{path.name}: {what} is missing or malformed ({short_text(repr(value), 40)}); the slice cannot be "
            "placed in space."
        )
    return out


def _pair(values: np.ndarray) -> tuple[float, float]:
    return float(values[0]), float(values[1])


def _number(value: object, default: float) -> float:
    return default if value in (None, "") else float(value)  # type: ignore[arg-type]


def _rescale(header: Dataset, frame: int | None) -> tuple[float, float]:
    slope, intercept = header.get("RescaleSlope"), header.get("RescaleIntercept")
    if frame is not None:
        group = "PixelValueTransformationSequence"
        found = functional_group_value(header, frame, group, "RescaleSlope")
        slope = found if found is not None else slope
        found = functional_group_value(header, frame, group, "RescaleIntercept")
        intercept = found if found is not None else intercept
    return _number(slope, 1.0), _number(intercept, 0.0)


def _frame_planes(path: Path, header: Dataset) -> list[Plane]:
    """The frames of an enhanced multi-frame file, each placed by its functional groups."""
    planes = []
    orientation = header_orientation(header)
    for frame in range(int(header.get("NumberOfFrames", 1) or 1)):
        iop = functional_group_value(header, frame, "PlaneOrientationSequence", "ImageOrientationPatient")
        if iop is not None:
            iop = _floats(iop, 6, f"frame {frame + 1} ImageOrientationPatient", path)
        if iop is not None and np.max(np.abs(iop - orientation)) > 1e-3:
            raise DicomSeriesError(
                f"{path.name}: its frames have different orientations; napari-medsam reads one stack of "
                "parallel planes."
            )
        ipp = functional_group_value(header, frame, "PlanePositionSequence", "ImagePositionPatient")
        spacing = functional_group_value(header, frame, "PixelMeasuresSequence", "PixelSpacing")
        position = _floats(ipp, 3, f"frame {frame + 1} ImagePositionPatient", path)
        pixel_spacing = _pair(_floats(spacing, 2, "PixelSpacing", path))
        slope, intercept = _rescale(header, frame)
        planes.append(Plane(path, frame, header, position, pixel_spacing, slope, intercept))
    return planes


def _dose_planes(path: Path, header: Dataset) -> list[Plane]:
    """The frames of an RT Dose grid, placed by :func:`~.dose.dose_frame_positions`."""
    try:
        positions = dose_frame_positions(header)
    except ValueError as exc:
        raise DicomSeriesError(f"{path.name}: {exc}.") from exc
    spacing = _pair(_floats(header.get("PixelSpacing"), 2, "PixelSpacing", path))
    slope = _number(header.get("DoseGridScaling"), 1.0) if "DoseGridScaling" in header else _rescale(header, None)[0]
    intercept = 0.0 if "DoseGridScaling" in header else _rescale(header, None)[1]
    return [Plane(path, k, header, pos, spacing, slope, intercept) for k, pos in enumerate(positions)]


def collect_planes(info: DicomSeriesInfo, warnings: list[str]) -> list[Plane]:
    """Image planes of the chosen stack with position, spacing and rescale, after sanity checks."""
    if info.samples_per_pixel != 1:
        raise NotAVolumeError(
            f"Series {info.label()} holds colour images (SamplesPerPixel {info.samples_per_pixel}); "
            "napari-medsam segments greyscale CT/MR volumes only."
        )
    planes: list[Plane] = []
    guessed_spacing = False
    for path, header in zip(info.files, info.headers):
        if is_multiframe_with_positions(header):
            planes.extend(_frame_planes(path, header))
            continue
        if is_dose_grid(header):
            planes.extend(_dose_planes(path, header))
            continue
        if int(header.get("NumberOfFrames", 1) or 1) > 1:
            raise NotAVolumeError(
                f"{path.name} is a multi-frame image without per-frame positions (e.g. a cine loop); "
                "it is not a 3D volume."
            )
        ipp, spacing = header.get("ImagePositionPatient"), header.get("PixelSpacing")
        if ipp is None and len(info.files) > 1:
            raise DicomSeriesError(
                f"{path.name} has no ImagePositionPatient; the slices of series {info.label()} cannot be "
                "placed in space."
            )
        position = _floats(ipp, 3, "ImagePositionPatient", path) if ipp is not None else np.zeros(3)
        guessed_spacing |= spacing is None
        pixel_spacing = (1.0, 1.0) if spacing is None else _pair(_floats(spacing, 2, "PixelSpacing", path))
        slope, intercept = _rescale(header, None)
        planes.append(Plane(path, None, header, position, pixel_spacing, slope, intercept))
    if len(planes) < 2:
        raise NotAVolumeError(
            f"Series {info.label()} is a single 2D image, not a 3D volume. Open a CT or MR series with "
            "several slices."
        )
    if header_orientation(info.headers[0]) is None:
        raise DicomSeriesError(
            f"Series {info.label()} has no ImageOrientationPatient; its slices cannot be placed in space."
        )
    if guessed_spacing:
        warnings.append(f"Series {info.label()} has no PixelSpacing; 1 mm pixels were assumed.")
    return planes


def file_direction(info: DicomSeriesInfo) -> np.ndarray:
    """Unit vectors (LPS) of the file axes: row cosine, column cosine and the slice normal."""
    iop = header_orientation(info.headers[0])
    row, col = iop[:3], iop[3:]
    norms = (np.linalg.norm(row), np.linalg.norm(col))
    if abs(norms[0] - 1) > 0.01 or abs(norms[1] - 1) > 0.01 or abs(row @ col) > 0.01:
        raise DicomSeriesError(
            f"Series {info.label()} has an invalid ImageOrientationPatient "
            f"[{', '.join(f'{v:.4g}' for v in iop)}]: the cosines are "
            "not orthonormal."
        )
    row = row / norms[0]
    col = col - (col @ row) * row  # remove the rounding error of written cosines
    col = col / np.linalg.norm(col)
    return np.column_stack([row, col, np.cross(row, col)])


def slice_grid(
    planes: list[Plane], normal: np.ndarray, label: str
) -> tuple[list[int], int, float, list[str]]:
    """Sort planes along the normal; return each plane's stack index, the stack size, spacing, warnings."""
    planes.sort(
        key=lambda p: (
            float(p.position @ normal), int(p.header.get("InstanceNumber", 0) or 0), str(p.path), p.frame or 0
        )
    )
    heights = np.array([p.position @ normal for p in planes])
    gaps = np.diff(heights)
    steps = gaps[gaps > DUPLICATE_MM]
    if steps.size == 0:
        raise NotAVolumeError(
            f"All images of series {label} lie at the same position: it is a single 2D image, not a volume."
        )
    # The usual gap is the spacing; the smallest one is tried too, for series missing most slices.
    for base in dict.fromkeys((float(np.median(steps)), float(steps.min()))):
        multiples = np.where(gaps > DUPLICATE_MM, np.maximum(np.round(gaps / base), 1), 0).astype(int)
        index = np.concatenate([[0], np.cumsum(multiples)])
        n_grid = int(index[-1]) + 1
        spacing = float((heights[-1] - heights[0]) / (n_grid - 1))
        if np.abs(heights - heights[0] - index * spacing).max() <= GRID_TOLERANCE * spacing:
            break
    else:
        base = float(np.median(steps))
        multiples = np.where(gaps > DUPLICATE_MM, np.maximum(np.round(gaps / base), 1), 0).astype(int)
        worst = int(np.argmax(np.abs(gaps - multiples * base)))
        raise DicomSeriesError(
            f"Series {label} has irregular slice spacing: the gap between {_plane_name(planes[worst])} and "
            f"{_plane_name(planes[worst + 1])} ({gaps[worst]:.3f} mm) is no whole number of {base:.3f} mm "
            "slices (not a missing slice). napari-medsam does not resample: re-export with even spacing."
        )
    warnings: list[str] = []
    offsets = [p.position - planes[0].position for p in planes]
    drift = max(float(np.linalg.norm(o - (o @ normal) * normal)) for o in offsets)
    if drift > max(0.01, 0.05 * min(planes[0].spacing)):
        warnings.append(
            f"Slices of series {label} shift sideways by up to {drift:.2f} mm (gantry tilt or a sheared "
            "stack); they are placed on an orthogonal grid, so positions can be off by up to that much."
        )
    return [int(i) for i in index], n_grid, spacing, warnings


def _plane_name(plane: Plane) -> str:
    name = short_text(plane.path.name, 40)
    return name if plane.frame is None else f"{name} frame {plane.frame + 1}"
