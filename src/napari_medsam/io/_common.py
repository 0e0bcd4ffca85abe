"""Helpers shared by the readers and writers: label checks, modality guess, file grids."""

from __future__ import annotations

import numpy as np

from ..errors import LabelsMismatchError
from ..volume import LPS_TO_RAS, Volume

# Label values each output type can hold.
LABEL_DTYPES = (np.uint8, np.uint16, np.int32)


CT_RANGE_HU = (-1024, 3071)  # what a 12-bit CT detector stores after the usual -1024 intercept
FAT_HU = (-190, -30)  # adipose tissue, present in every scan of the trunk or limbs


def guess_modality(array: np.ndarray) -> tuple[str, str]:
    """Guess (modality, intensity unit) for formats that do not record it (NIfTI, NRRD, MHA).

    CT in Hounsfield units is recognised by either of two signs. Air (about -1000) anywhere in the
    volume, as in nearly every uncropped CT. Or, for a CT cropped to the body, whole-number values
    that lie (almost) all within the CT range, go below 0, and put a visible share of voxels in the
    fat band: MR magnitude images are never negative, and signed MR data (phase maps, normalised
    floats) are fractional or spread far outside that range. Everything else is called MR.
    """
    if array.size == 0:
        return "OT", ""
    # A strided sample keeps this cheap on big volumes.
    sample = np.asarray(array.reshape(-1)[:: max(1, array.size // 200_000)], dtype=np.float64)
    low = float(np.min(sample))
    if low <= -500 and _share_in_ct_range(sample, low) >= 0.95:
        return "CT", "HU"
    if low < 0 and _looks_like_cropped_ct(sample):
        return "CT", "HU"
    return "MR", ""


def _share_in_ct_range(sample: np.ndarray, low: float) -> float:
    """Share of voxels within the CT range, not counting a padding value below it (-2048, -3024)."""
    if low < CT_RANGE_HU[0]:
        sample = sample[sample != low]
    if sample.size == 0:
        return 1.0
    return float(np.mean((sample >= CT_RANGE_HU[0]) & (sample <= CT_RANGE_HU[1])))


def _looks_like_cropped_ct(sample: np.ndarray) -> bool:
    if not np.array_equal(sample, np.round(sample)):
        return False
    in_range = _share_in_ct_range(sample, float(np.min(sample)))
    fat = np.mean((sample >= FAT_HU[0]) & (sample <= FAT_HU[1]))
    return bool(in_range >= 0.99 and fat >= 0.02)


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
