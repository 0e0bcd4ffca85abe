"""Reading volumes and writing label volumes: one entry point each, dispatching on the path.

``load_volume(path)`` reads NIfTI, a DICOM series (a folder or any file of it), DICOM-SEG,
NRRD and MetaImage. ``save_labels(labels, like=volume, path=...)`` writes a label volume on
the grid of the image it was drawn on: NIfTI, DICOM-SEG (for DICOM sources), NRRD or MHA.
Heavy libraries are imported inside the functions so importing this package stays cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import LabelsMismatchError, LabelsWriteError, MedSamError, UnsupportedFormatError, VolumeReadError
from ._text import short_path

if TYPE_CHECKING:
    from ..volume import Volume

READ_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm", ".dicom", ".ima")
WRITE_SUFFIXES = (".nii.gz", ".nii", ".dcm", ".nrrd", ".mha")


def is_dicom_file(path: str | Path) -> bool:
    """True when the file carries the DICOM preamble (b'DICM' at byte 128)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def is_dicom_seg_file(path: str | Path) -> bool:
    """True when the file is a DICOM Segmentation object."""
    if not is_dicom_file(path):
        return False
    import pydicom

    try:
        header = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except Exception:  # noqa: BLE001 - unreadable means "not a SEG" here; the reader reports it
        return False
    # Segmentation Storage (BINARY/FRACTIONAL) and Label Map Segmentation Storage.
    return str(header.get("SOPClassUID", "")) in ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")


def source_kind(path: str | Path) -> str:
    """'nifti', 'itk', 'dicom', 'dicom-seg' or 'unknown' for a path, without reading voxels."""
    from .itk import is_itk_path
    from .nifti import is_nifti_path

    path = Path(path)
    if path.is_dir():
        return "dicom"
    if is_nifti_path(path):
        return "nifti"
    if is_itk_path(path):
        return "itk"
    if is_dicom_seg_file(path):
        return "dicom-seg"
    if path.suffix.lower() in (".dcm", ".dicom", ".ima") or is_dicom_file(path):
        return "dicom"
    return "unknown"


MODALITIES = ("CT", "MR", "OT")


def load_volume(
    path: str | Path,
    *,
    series_uid: str | None = None,
    volume_index: int | None = None,
    modality: str | None = None,
) -> "Volume":
    """Read a 3D scan (or a DICOM-SEG label volume) from ``path`` into a display-ordered Volume.

    ``modality`` ("CT", "MR" or "OT") overrides what the file says or what was guessed from the
    values (NIfTI, NRRD and MHA record no modality); CT then means values in HU.
    """
    if modality is not None:
        _check_modality(modality)  # before minutes of reading
    volume = _load_volume(Path(path).expanduser(), series_uid, volume_index)
    if modality is not None:
        override_modality(volume, modality)
    return volume


def _check_modality(modality: str) -> str:
    if modality.upper() not in MODALITIES:
        raise VolumeReadError(f"Unknown modality {modality!r}; use one of {', '.join(MODALITIES)}.")
    return modality.upper()


def override_modality(volume: "Volume", modality: str) -> None:
    """Make ``volume`` a scan of ``modality`` ("CT", "MR", "OT") whatever the file said; CT means HU."""
    modality = _check_modality(modality)
    if modality != volume.modality:
        volume.intensity_unit = "HU" if modality == "CT" else ""
    volume.modality = modality
    volume.metadata["modality_from"] = "user"


def _load_volume(path: Path, series_uid: str | None, volume_index: int | None) -> "Volume":
    if not path.exists():
        raise VolumeReadError(f"{short_path(path)} does not exist.")
    kind = source_kind(path)
    if kind == "nifti":
        from .nifti import read_nifti

        return read_nifti(path, volume_index=volume_index)
    if kind == "itk":
        from .itk import read_itk

        return read_itk(path, volume_index=volume_index)
    if kind == "dicom":
        from .dicom.series import read_dicom_series

        return read_dicom_series(path, series_uid=series_uid)
    if kind == "dicom-seg":
        from .dicom.seg_read import load_dicom_seg_volume

        volume, segments = load_dicom_seg_volume(path)
        volume.metadata["segments"] = segments
        return volume
    raise UnsupportedFormatError(
        f"{path.name} is not a format napari-medsam reads. Supported: NIfTI (.nii, .nii.gz), a DICOM "
        "series (a folder or any of its files), DICOM-SEG, NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd)."
    )


def labels_format(path: str | Path) -> str:
    """The label format a file name asks for: 'nifti', 'dicom-seg', 'nrrd' or 'metaimage'."""
    name = str(path).lower()
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith(".dcm"):
        return "dicom-seg"
    if name.endswith(".nrrd"):
        return "nrrd"
    if name.endswith(".mha"):
        return "metaimage"
    raise LabelsWriteError(
        f"Cannot save labels as {Path(path).name}: use one of {', '.join(WRITE_SUFFIXES)} "
        "(.dcm writes DICOM-SEG)."
    )


def require_dicom_source(like: "Volume", path: str | Path) -> None:
    """Refuse DICOM-SEG output for a scan that did not come from a DICOM series."""
    if not like.dicom_datasets:
        stem = Path(path).name[: -len(".dcm")] if str(path).lower().endswith(".dcm") else Path(path).stem
        raise LabelsWriteError(
            f"DICOM-SEG must reference a DICOM series, but this image came from "
            f"{like.source_format or 'a non-DICOM source'}"
            f"{' (' + like.source_path.name + ')' if like.source_path else ''}. "
            f"Save as NIfTI instead, e.g. {stem}.nii.gz."
        )


def save_labels(labels: np.ndarray, like: "Volume", path: str | Path, *, segments=None,
                segmentation_type: str = "binary") -> Path:
    """Write ``labels`` (display order, ``like.shape``) next to the scan ``like`` was read from.

    ``segmentation_type`` is the DICOM-SEG encoding ("binary" or "labelmap"); other formats ignore it.
    """
    fmt = labels_format(path)
    if fmt == "nifti":
        from .nifti import write_nifti_labels

        return write_nifti_labels(labels, like, path)
    if fmt == "dicom-seg":
        require_dicom_source(like, path)
        from .dicom.seg_write import write_dicom_seg

        return write_dicom_seg(labels, like, path, segments=segments, segmentation_type=segmentation_type)
    from .itk import write_itk_labels

    return write_itk_labels(labels, like, path)


def save_labels_named(labels: np.ndarray, like: "Volume", path: str | Path, segments: list, *,
                      segmentation_type: str = "binary") -> tuple[Path, Path | None, list[str]]:
    """:func:`save_labels`, keeping the segments' names: in the DICOM-SEG, or for NIfTI/NRRD/MHA
    (which hold numbers only) in the ``NAME.segments.json`` sidecar beside the file, where the
    readers look for them. Returns (labels path, sidecar path or None, what writing had to make
    up: the UserWarnings it raised, e.g. new UIDs for a DICOM-SEG whose source has none, one line
    each, for the caller to show)."""
    import warnings

    from .atomic import check_writable_target
    from .segments import save_segments_sidecar, segments_sidecar_path

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        sidecar = None
        if labels_format(path) == "dicom-seg" or not segments:
            out = save_labels(labels, like, path, segments=segments, segmentation_type=segmentation_type)
        else:
            check_writable_target(segments_sidecar_path(path))
            out = save_labels(labels, like, path, segments=segments)
            try:
                sidecar = save_segments_sidecar(segments, out)
            except MedSamError:
                out.unlink(missing_ok=True)  # no labels without their names
                raise
    messages = []
    for item in caught:
        if issubclass(item.category, UserWarning):
            messages.append(" ".join(str(item.message).split()))
        else:  # a library's deprecation or similar: passed on as it would be without us
            warnings.warn_explicit(item.message, item.category, item.filename, item.lineno)
    return Path(out), sidecar, messages


def read_labels(path: str | Path, like: "Volume") -> np.ndarray:
    """Read a label file (NIfTI, NRRD/MHA or DICOM-SEG) onto ``like``'s display grid."""
    return read_labels_and_segments(path, like)[0]


def read_labels_and_segments(path: str | Path, like: "Volume") -> tuple[np.ndarray, list]:
    """A label file on ``like``'s display grid and the segments it describes.

    The segments (:class:`~napari_medsam.io.segments.Segment`) come from the DICOM-SEG itself, or
    for NIfTI/NRRD/MHA from the ``NAME.segments.json`` sidecar next to the file; the list is
    empty when the file names nothing.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise VolumeReadError(f"{short_path(path)} does not exist.")
    if source_kind(path) == "dicom-seg":
        from .dicom.seg_read import read_dicom_seg

        labels, segments = read_dicom_seg(path, like=like)
        return labels, list(segments)
    from .segments import read_segments_sidecar

    segments = read_segments_sidecar(path) or []
    return _labels_on_grid(path, like), segments


def _labels_on_grid(path: Path, like: "Volume") -> np.ndarray:
    volume = load_volume(path)
    if not volume.same_grid(like, atol_mm=1e-2):
        raise LabelsMismatchError(
            f"{path.name} is not on the grid of {like.source_path.name if like.source_path else 'the image'}: "
            f"shape {volume.shape} vs {like.shape}, voxel-to-world matrices differ by up to "
            f"{np.abs(volume.affine_lps() - like.affine_lps()).max() if volume.shape == like.shape else 'n/a'} mm."
        )
    if not np.issubdtype(volume.array.dtype, np.integer):
        if not np.array_equal(volume.array, np.round(volume.array)):
            raise LabelsMismatchError(f"{path.name} holds fractional values; it is not a label volume.")
        return volume.array.astype(np.int32)
    return volume.array


def describe_volume(volume: "Volume") -> dict:
    """The facts `napari-medsam info` prints: shape, geometry, modality, axis mapping, source."""
    info = {
        "path": str(volume.source_path) if volume.source_path else None,
        "source_format": volume.source_format,
        "shape": list(volume.shape),
        "axes": ["slice", "row", "column"],
        "dtype": str(volume.array.dtype),
        "spacing_mm": [round(v, 6) for v in volume.spacing_mm],
        "origin_mm": [round(v, 6) for v in volume.origin_mm],
        "direction": [[round(float(v), 6) for v in row] for row in volume.direction],
        "coordinate_system": "LPS (DICOM patient), millimetres; direction[:, a] is display axis a",
        "modality": volume.modality,
        "intensity_unit": volume.intensity_unit,
        "oblique": volume.is_oblique(),
        "file_shape": list(volume.file_shape),
        "file_axes": list(volume.file_axis_names),
        "file_to_display": volume.axes.describe(volume.file_axis_names),
        "display_axis_from_file_axis": [volume.file_axis_names[a] for a in volume.axes.file_axis],
        "display_axis_flipped": list(volume.axes.flipped),
        "affine_ras_file_order": [[round(float(v), 6) for v in row] for row in volume.file_affine_ras()],
        "intensity_range": [float(np.min(volume.array)), float(np.max(volume.array))]
        if volume.array.size
        else None,
    }
    meta = volume.metadata
    # Metadata under the names `info` prints: DICOM UIDs as the standard's attribute names
    # (SeriesInstanceUID -> series_instance_uid), each fact once.
    for key, shown in _INFO_KEYS:
        if meta.get(key) is not None:
            value = meta[key]
            info[shown] = list(value) if isinstance(value, tuple) else value
    if meta.get("series"):
        info["series_in_folder"] = [_renamed(entry) for entry in meta["series"]]
    info["warnings"] = [str(w) for w in meta.get("warnings") or []]
    return info


# (Volume.metadata key, key printed by describe_volume)
_INFO_KEYS = (
    ("series_uid", "series_instance_uid"),
    ("study_uid", "study_instance_uid"),
    ("frame_of_reference_uid", "frame_of_reference_uid"),
    ("n_instances", "number_of_instances"),
    ("series_description", "series_description"),
    ("missing_slices", "missing_slices"),
    ("volume_index", "volume_index"),
    ("file_shape", "file_shape"),  # for a 4D file: the whole file, volumes included
    ("window", "window"),
    ("segmentation_type", "segmentation_type"),
    ("referenced_series_uids", "referenced_series_instance_uids"),
)


def _renamed(entry: dict) -> dict:
    """One `series_in_folder` entry with the same key names as the top level of `info`."""
    names = dict(_INFO_KEYS)
    return {names.get(key, key): value for key, value in entry.items()}
