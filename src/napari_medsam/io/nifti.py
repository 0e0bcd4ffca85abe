"""NIfTI-1/NIfTI-2 volumes through nibabel.

The original affine (``img.affine``: the sform when set, else the qform) and header are kept
exactly on the Volume, so a label volume is written back on precisely the scan's grid, in the
file's own voxel order (i, j, k as nibabel reports it).
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from ..errors import MultipleVolumesError, NotAVolumeError, VolumeReadError
from ..volume import LPS_TO_RAS, Volume, display_grid
from ._common import checked_labels, guess_modality, split_affine
from ._text import short_text
from .atomic import atomic_output

NIFTI_INTENT_LABEL = 1002


def is_nifti_path(path: str | Path) -> bool:
    """True for ``.nii`` and ``.nii.gz`` names."""
    name = str(path).lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def read_nifti(path: str | Path, *, volume_index: int | None = None) -> Volume:
    """Read a 3D NIfTI file (or one volume of a 4D file) as a display-ordered Volume."""
    import nibabel as nib

    path = Path(path)
    try:
        image = nib.load(str(path))
        if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
            raise VolumeReadError(f"{path.name} is not a NIfTI image.")
        shape = tuple(int(s) for s in image.shape)
        file_array = _select_volume(image, shape, path, volume_index)
    except VolumeReadError:
        raise
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise VolumeReadError(
            f"{path.name} is truncated or its gzip stream is corrupt ({short_text(str(exc), 80)}). "
            "Re-export or re-download the file."
        ) from exc
    except (nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError) as exc:
        raise VolumeReadError(f"{path.name} is not a valid NIfTI file: {short_text(str(exc), 100)}") from exc
    except (OSError, ValueError) as exc:
        raise VolumeReadError(
            f"Could not read {path.name}: {short_text(str(exc), 80)}. The file may be truncated or not a NIfTI image."
        ) from exc

    affine = np.array(image.affine, dtype=float)
    try:
        spacing, origin_ras, direction_ras = split_affine(affine)
    except ValueError as exc:
        raise VolumeReadError(f"{path.name} has an unusable affine: {short_text(str(exc), 100)}.") from exc
    direction_lps = LPS_TO_RAS[:3, :3] @ direction_ras
    origin_lps = LPS_TO_RAS[:3, :3] @ origin_ras
    grid = display_grid(file_array.shape, spacing, origin_lps, direction_lps)
    display = np.ascontiguousarray(grid.axes.to_display(file_array))
    modality, unit = guess_modality(display)
    header = image.header.copy()
    return Volume(
        array=display,
        spacing_mm=grid.spacing_mm,
        origin_mm=grid.origin_mm,
        direction=grid.direction,
        modality=modality,
        intensity_unit=unit,
        source_format="nifti",
        source_path=path,
        axes=grid.axes,
        file_axis_names=("i", "j", "k"),
        nifti_affine=affine,
        nifti_header=header,
        metadata={
            "file_shape": shape,
            "volume_index": volume_index,
            "sform_code": int(header["sform_code"]),
            "qform_code": int(header["qform_code"]),
            "modality_guessed": True,
            "warnings": [],
        },
    )


def _select_volume(image, shape: tuple[int, ...], path: Path, volume_index: int | None) -> np.ndarray:
    """Check dimensionality and return the chosen 3D volume with scaling applied."""
    dtype = image.get_data_dtype()
    if dtype.names is not None or (len(shape) >= 4 and shape[-1] in (3, 4) and dtype == np.uint8):
        raise NotAVolumeError(
            f"{path.name} holds colour (RGB) data; napari-medsam segments greyscale CT/MR volumes."
        )
    if len(shape) < 3 or sum(s > 1 for s in shape[:3]) < 2:
        raise NotAVolumeError(
            f"{path.name} has shape {shape}: a 2D image, not a 3D volume. "
            "Open a 3D scan (several slices)."
        )
    if len(shape) == 3 and shape[2] == 1:
        raise NotAVolumeError(f"{path.name} has a single slice {shape}: a 2D image, not a 3D volume.")
    extra = shape[3:]
    n_volumes = int(np.prod(extra)) if extra else 1
    if len(extra) > 1 and n_volumes > 1:
        raise NotAVolumeError(
            f"{path.name} has shape {shape}: {len(shape)}D data with several non-spatial axes is not supported."
        )
    if n_volumes > 1 and volume_index is None:
        raise MultipleVolumesError(
            f"{path.name} is 4D with {n_volumes} volumes {shape}. Choose one with a volume index "
            f"(0 to {n_volumes - 1}), e.g. load_volume(path, volume_index=0) or --volume-index 0.",
            n_volumes,
        )
    index = 0 if volume_index is None else int(volume_index)
    if not 0 <= index < n_volumes:
        raise MultipleVolumesError(
            f"Volume index {index} is out of range: {path.name} holds {n_volumes} volume(s).",
            n_volumes,
        )
    proxy = image.dataobj
    if extra:
        proxy = proxy[..., index] if len(extra) == 1 else proxy[(..., *([0] * len(extra)))]
    data = np.asanyarray(proxy)
    if data.ndim != 3:
        data = data.reshape(shape[:3])
    return _compact(data)


def _compact(data: np.ndarray) -> np.ndarray:
    """Scaled float data that are whole numbers (CT stored with an intercept) go back to int16."""
    if np.issubdtype(data.dtype, np.floating) and data.size:
        low, high = float(np.nanmin(data)), float(np.nanmax(data))
        if (
            np.isfinite(low)
            and np.isfinite(high)
            and -32768 <= low
            and high <= 32767
            and np.array_equal(data, np.round(data))
        ):
            return data.astype(np.int16)
        return data.astype(np.float32, copy=False)
    return data


def write_nifti_labels(labels: np.ndarray, like: Volume, path: str | Path) -> Path:
    """Write a display-ordered label volume as NIfTI on exactly ``like``'s grid and voxel order."""
    import nibabel as nib

    labels = checked_labels(labels, like)
    file_labels = np.ascontiguousarray(like.axes.to_file(labels))
    image = _image_like(nib, file_labels, like)
    image.header.set_intent(NIFTI_INTENT_LABEL, name="labels")
    image.header["cal_min"] = 0
    image.header["cal_max"] = int(file_labels.max()) if file_labels.size else 0
    return _save(nib, image, path)


def write_nifti_volume(volume: Volume, path: str | Path, *, dtype=None) -> Path:
    """Write a Volume's voxels as NIfTI (file voxel order of the volume, RAS affine)."""
    import nibabel as nib

    data = volume.array if dtype is None else volume.array.astype(dtype)
    file_data = np.ascontiguousarray(volume.axes.to_file(data))
    image = _image_like(nib, file_data, volume)
    return _save(nib, image, path)


def _image_like(nib, file_data: np.ndarray, like: Volume):
    """A Nifti1Image of ``file_data`` carrying ``like``'s affine (and header, when from NIfTI)."""
    affine = like.file_affine_ras()
    source_header = like.nifti_header
    if source_header is not None and isinstance(source_header, nib.Nifti1Header):
        header = source_header.copy()
        image_class = nib.Nifti2Image if isinstance(source_header, nib.Nifti2Header) else nib.Nifti1Image
        image = image_class(file_data, None, header=header)
        image.header.set_data_dtype(file_data.dtype)
        image.header.set_slope_inter(1.0, 0.0)
        # Both forms exactly as in the source, with their codes: same grid in every reader.
        sform, sform_code = source_header.get_sform(coded=True)
        qform, qform_code = source_header.get_qform(coded=True)
        image.set_sform(source_header.get_sform() if sform is None else sform, int(sform_code))
        image.set_qform(source_header.get_qform() if qform is None else qform, int(qform_code))
        if sform is None and qform is None:
            image.set_sform(affine, 2)
    else:
        image = nib.Nifti1Image(file_data, affine)
        image.header.set_data_dtype(file_data.dtype)
        # Scanner-anatomical for both forms so nibabel, ITK and others agree on the grid.
        image.set_sform(affine, 1)
        image.set_qform(affine, 1)
        image.header.set_xyzt_units("mm", "sec")
    return image


def _save(nib, image, path: str | Path) -> Path:
    target = Path(path)
    with atomic_output(target) as tmp:
        nib.save(image, str(tmp))
    return target
