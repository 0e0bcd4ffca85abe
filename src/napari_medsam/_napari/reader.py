"""napari reader contribution: NIfTI, DICOM series (folder or file), DICOM-SEG, NRRD, MHA/MHD."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from ..errors import MedSamError, MultipleVolumesError

log = logging.getLogger(__name__)

LABEL_NAME_HINTS = ("label", "labels", "seg", "segmentation", "mask", "masks", "annotation")


def get_reader(path: str | list[str]) -> Callable | None:
    """Return the reader function when napari-medsam can open ``path``, else None."""
    from ..io import source_kind

    if isinstance(path, list):
        # A list of files from one DICOM folder is one series; anything else is not ours.
        if not path:
            return None
        kinds = {source_kind(p) for p in path}
        return read_paths if kinds == {"dicom"} else None
    return read_paths if source_kind(path) != "unknown" else None


def read_paths(path: str | list[str]) -> list[tuple]:
    """Read one volume (or one DICOM series from a list of its files) into napari layer data."""
    from ..io import load_volume

    paths = path if isinstance(path, list) else [path]
    if isinstance(path, list) and len({str(Path(p).parent) for p in paths}) == 1 and len(paths) > 1:
        paths = [paths[0]]  # every file of the series lives in that folder
    layers: list[tuple] = []
    for item in paths:
        try:
            volume = load_volume(item)
        except MultipleVolumesError as exc:
            # A 4D file: open its first volume and say how to pick another.
            _notify(f"{exc} Opened volume 0.", "warning")
            volume = load_volume(item, volume_index=0)
        except MedSamError as exc:
            _notify(str(exc), "error")
            raise
        for message in volume.metadata.get("warnings", []):
            _notify(message, "warning")
        layers.append(_layer_for(volume))
    return layers


def _layer_for(volume) -> tuple:
    from .layers import image_layer_data, labels_layer_data

    if volume.source_format == "dicom-seg":
        segments = volume.metadata.get("segments")
        name = volume.metadata.get("series_description") or (volume.source_path.stem if volume.source_path else "segmentation")
        return labels_layer_data(volume.array, volume, name=name, segments=segments)
    data, kwargs, kind = image_layer_data(volume)
    segments = _sidecar_segments(volume)
    if segments is not None or _looks_like_labels(volume):  # a NAME.segments.json sidecar names labels
        return labels_layer_data(volume.array, volume, name=kwargs["name"], segments=segments or None)
    return data, kwargs, kind


def _sidecar_segments(volume):
    """The segments of the label file's NAME.segments.json sidecar, or None without one."""
    from ..io.segments import read_segments_sidecar

    if volume.source_path is None or volume.source_format not in ("nifti", "nrrd", "metaimage"):
        return None
    return read_segments_sidecar(volume.source_path)


def _looks_like_labels(volume) -> bool:
    """A label map saved as NIfTI/NRRD: integer voxels, small non-negative values, a telling name."""
    import numpy as np

    name = volume.source_path.name.lower() if volume.source_path else ""
    if not any(hint in name for hint in LABEL_NAME_HINTS):
        return False
    array = volume.array
    if not np.issubdtype(array.dtype, np.integer) or array.size == 0:
        return False
    return int(array.min()) >= 0 and int(array.max()) < 65536


def _notify(message: str, level: str) -> None:
    try:
        from napari.utils.notifications import show_error, show_warning

        (show_error if level == "error" else show_warning)(message)
    except Exception:  # noqa: BLE001 - outside napari there is no one to notify
        log.warning(message)
