"""Helpers shared by the readers and writers: label checks, modality guess, file grids."""

from __future__ import annotations

import numpy as np

from ..errors import LabelsMismatchError
from ..volume import LPS_TO_RAS, Volume

# Label values each output type can hold.
LABEL_DTYPES = (np.uint8, np.uint16, np.int32)


def guess_modality(array: np.ndarray) -> tuple[str, str]:
    """Guess (modality, intensity unit) for formats that do not record it (NIfTI, NRRD, MHA).

    CT in Hounsfield units has air at about -1000; MR and other images have no such values.
    """
    if array.size == 0:
        return "OT", ""
    # A strided sample keeps this cheap on big volumes; air fills a large part of any CT.
    sample = array.reshape(-1)[:: max(1, array.size // 200_000)]
    low = float(np.min(sample))
    if low <= -500:
        return "CT", "HU"
    return "MR", ""


def checked_labels(labels: np.ndarray, like: Volume, *, max_value: int = 2**31 - 1) -> np.ndarray:
    """Validate a label volume for ``like`` and return it in the smallest fitting integer type."""
    labels = np.asarray(labels)
    if labels.ndim != 3 or tuple(labels.shape) != like.shape:
        raise LabelsMismatchError(
            f"The label volume has shape {tuple(labels.shape)} but the image "
            f"{like.source_path.name if like.source_path else ''} has shape {like.shape} "
            "(slice, row, column). Labels must be drawn on the image's own grid."
        )
    if labels.dtype == bool:
        labels = labels.astype(np.uint8)
    if not (np.issubdtype(labels.dtype, np.integer)):
        if not np.issubdtype(labels.dtype, np.floating):
            raise LabelsMismatchError(f"Label values must be integers, got dtype {labels.dtype}.")
        if not np.all(np.isfinite(labels)) or not np.array_equal(labels, np.round(labels)):
            raise LabelsMismatchError(
                "Label values must be whole numbers; the label volume holds fractional or NaN values."
            )
    if labels.size == 0:
        return labels.astype(np.uint8)
    low, high = labels.min(), labels.max()
    if low < 0:
        raise LabelsMismatchError(
            f"Label values must be 0 (background) or positive; found {int(low)}."
        )
    if high > max_value:
        raise LabelsMismatchError(
            f"Label value {int(high)} does not fit this output format (largest allowed: {max_value})."
        )
    for dtype in LABEL_DTYPES:
        if high <= np.iinfo(dtype).max:
            return labels.astype(dtype, copy=False)
    raise LabelsMismatchError(f"Label value {int(high)} is too large to store.")


def file_affine_lps(volume: Volume) -> np.ndarray:
    """4x4 matrix: file voxel index -> LPS millimetres."""
    return LPS_TO_RAS @ volume.file_affine_ras()


def split_affine(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(spacing, origin, unit direction columns) of a 4x4 index-to-world matrix."""
    matrix = np.asarray(affine, dtype=float)[:3, :3]
    spacing = np.linalg.norm(matrix, axis=0)
    if np.any(spacing <= 0) or not np.all(np.isfinite(matrix)):
        raise ValueError("degenerate voxel-to-world matrix (a zero or non-finite voxel size)")
    return spacing, np.asarray(affine, dtype=float)[:3, 3].copy(), matrix / spacing[None, :]
