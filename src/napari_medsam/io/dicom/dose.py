"""Frame positions of an RT Dose grid: the one place that reads GridFrameOffsetVector.

An RT Dose is a multi-frame image without functional groups: ImagePositionPatient places frame 1,
and GridFrameOffsetVector places every frame along the slice normal. The series reader
(:mod:`.planes`) and the DICOM-SEG writer and reader (:mod:`.seg_geometry`) both place its frames
with :func:`dose_frame_positions`, so a SEG drawn on a dose grid references the frames the reader
showed.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset

from .scan import header_orientation, is_multiframe_with_positions

AXIAL = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])


def is_dose_grid(header: Dataset) -> bool:
    """True for a multi-frame image placed by GridFrameOffsetVector (RT Dose), not by functional groups."""
    try:
        frames = int(header.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return False
    return frames > 1 and "GridFrameOffsetVector" in header and not is_multiframe_with_positions(header)


def _floats(value: object, n: int, what: str) -> np.ndarray:
    try:
        out = np.asarray([float(v) for v in value], dtype=float)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        out = np.empty(0)
    if out.shape != (n,) or not np.all(np.isfinite(out)):
        shown = repr(value)
        shown = shown if len(shown) <= 60 else f"{shown[:57]}..."
        raise ValueError(f"{what} is missing or malformed ({shown}); the dose grid cannot be placed")
    return out


def dose_frame_positions(header: Dataset) -> np.ndarray:
    """ImagePositionPatient of each frame of an RT Dose grid, shape (NumberOfFrames, 3).

    A GridFrameOffsetVector starting with 0 holds offsets from ImagePositionPatient along the
    slice normal (row cosine x column cosine); any other vector, allowed only for an axial grid
    (ImageOrientationPatient 1/0/0/0/1/0), holds the z coordinate of each frame. Raises
    ValueError with a message naming the element that is missing or malformed.
    """
    n_frames = int(header.get("NumberOfFrames", 1) or 1)
    offsets = _floats(header.get("GridFrameOffsetVector"), n_frames, "GridFrameOffsetVector")
    origin = _floats(header.get("ImagePositionPatient"), 3, "ImagePositionPatient")
    orientation = header_orientation(header)
    if orientation is None:
        raise ValueError("ImageOrientationPatient is missing or malformed; the dose grid cannot be placed")
    if offsets[0] == 0:
        normal = np.cross(orientation[:3], orientation[3:])
        return origin[None, :] + offsets[:, None] * normal[None, :]
    if np.allclose(orientation, AXIAL, atol=1e-4):
        return np.column_stack([np.full(n_frames, origin[0]), np.full(n_frames, origin[1]), offsets])
    raise ValueError(
        "GridFrameOffsetVector does not start with 0 (absolute z values) but the grid is not axial; "
        "the frames cannot be placed"
    )
