"""NRRD and MetaImage (MHA/MHD) volumes through SimpleITK.

ITK stores geometry in LPS with index order (x, y, z); the file voxel axes here are those
(named i, j, k), and the display order follows the convention in volume.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import MultipleVolumesError, NotAVolumeError, VolumeReadError
from ..volume import Volume, display_grid
from ._common import checked_labels, file_affine_lps, guess_modality, split_affine
from .atomic import atomic_output

ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")


def is_itk_path(path: str | Path) -> bool:
    """True for NRRD and MetaImage names."""
    return str(path).lower().endswith(ITK_SUFFIXES)


def read_itk(path: str | Path, *, volume_index: int | None = None) -> Volume:
    """Read an NRRD/MHA/MHD scalar 3D image as a display-ordered Volume."""
    import SimpleITK as sitk

    path = Path(path)
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        image = reader.Execute()
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown error"
        raise VolumeReadError(
            f"Could not read {path.name}: the file is corrupt, truncated or not a "
            f"{path.suffix.lstrip('.').upper()} image ({first_line})."
        ) from exc
    if image.GetNumberOfComponentsPerPixel() > 1:
        raise NotAVolumeError(
            f"{path.name} has {image.GetNumberOfComponentsPerPixel()} components per voxel (colour "
            "or vector data); napari-medsam segments greyscale CT/MR volumes."
        )
    dimension = image.GetDimension()
    if dimension == 2 or (dimension == 3 and 1 in image.GetSize()[:3] and sorted(image.GetSize())[1] == 1):
        raise NotAVolumeError(f"{path.name} is a 2D image {image.GetSize()}, not a 3D volume.")
    if dimension == 4:
        image = _pick_volume(sitk, image, path, volume_index)
    elif dimension != 3:
        raise NotAVolumeError(f"{path.name} is {dimension}D; only 3D volumes (or one volume of 4D) are supported.")
    if image.GetSize()[2] == 1:
        raise NotAVolumeError(f"{path.name} has a single slice {image.GetSize()}: a 2D image, not a 3D volume.")

    # GetArrayViewFromImage is (z, y, x); the file's own index order is (x, y, z).
    file_array = np.asarray(sitk.GetArrayFromImage(image)).transpose(2, 1, 0)
    spacing = np.array(image.GetSpacing(), dtype=float)
    origin = np.array(image.GetOrigin(), dtype=float)
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    grid = display_grid(file_array.shape, spacing, origin, direction)
    display = np.ascontiguousarray(grid.axes.to_display(file_array))
    modality, unit = _modality(reader, display)
    return Volume(
        array=display,
        spacing_mm=grid.spacing_mm,
        origin_mm=grid.origin_mm,
        direction=grid.direction,
        modality=modality,
        intensity_unit=unit,
        source_format="nrrd" if path.suffix.lower() in (".nrrd", ".nhdr") else "metaimage",
        source_path=path,
        axes=grid.axes,
        file_axis_names=("i", "j", "k"),
        metadata={"file_shape": tuple(int(s) for s in file_array.shape), "volume_index": volume_index, "warnings": []},
    )


def _pick_volume(sitk, image, path: Path, volume_index: int | None):
    n_volumes = int(image.GetSize()[3])
    if n_volumes > 1 and volume_index is None:
        raise MultipleVolumesError(
            f"{path.name} is 4D with {n_volumes} volumes. Choose one with a volume index "
            f"(0 to {n_volumes - 1}), e.g. load_volume(path, volume_index=0) or --volume-index 0.",
            n_volumes,
        )
    index = volume_index or 0
    if not 0 <= index < n_volumes:
        raise MultipleVolumesError(f"Volume index {index} is out of range: {path.name} holds {n_volumes}.", n_volumes)
    size = list(image.GetSize())
    size[3] = 0
    return sitk.Extract(image, size, [0, 0, 0, index])


def _modality(reader, array: np.ndarray) -> tuple[str, str]:
    keys = set(reader.GetMetaDataKeys())
    for key in ("Modality", "modality"):
        if key in keys:
            value = reader.GetMetaData(key).upper()
            if "CT" in value:
                return "CT", "HU"
            if "MR" in value:
                return "MR", ""
    return guess_modality(array)


def write_itk_labels(labels: np.ndarray, like: Volume, path: str | Path) -> Path:
    """Write a display-ordered label volume as NRRD/MHA on ``like``'s grid, in its file voxel order."""
    import SimpleITK as sitk

    labels = checked_labels(labels, like)
    file_labels = like.axes.to_file(labels)
    image = sitk.GetImageFromArray(np.ascontiguousarray(file_labels.transpose(2, 1, 0)))
    spacing, origin, direction = split_affine(file_affine_lps(like))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in origin])
    image.SetDirection([float(v) for v in direction.reshape(-1)])
    target = Path(path)
    if target.suffix.lower() in (".mhd", ".nhdr"):
        raise ValueError("write a single-file format (.nrrd or .mha); .mhd/.nhdr split data into two files")
    with atomic_output(target) as tmp:
        writer = sitk.ImageFileWriter()
        writer.SetFileName(str(tmp))
        writer.SetImageIO("NrrdImageIO" if target.suffix.lower() == ".nrrd" else "MetaImageIO")
        writer.UseCompressionOn()
        try:
            writer.Execute(image)
        except RuntimeError as exc:
            raise OSError(str(exc)) from exc
    return target
