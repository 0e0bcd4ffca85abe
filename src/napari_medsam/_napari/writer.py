"""napari writer contribution: Labels layers to NIfTI, DICOM-SEG, NRRD or MHA."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LabelsWriteError, MedSamError


def write_labels(path: str, data: Any, attributes: dict) -> list[str]:
    """Write one Labels layer on the grid of the image it was drawn on.

    What writing had to make up (e.g. new UIDs for a DICOM-SEG whose source has none) is shown
    as a napari warning notification.
    """
    labels = np.asarray(data)
    try:
        like = source_volume_for(labels, attributes)
        segments = _segments(labels, attributes)
        from ..io import save_labels_named

        written, _, messages = save_labels_named(labels, like, path, segments)
    except MedSamError as exc:
        _notify_error(str(exc))
        raise
    notify_warnings(messages)
    return [str(written)]


def notify_warnings(messages: list[str]) -> None:
    """One napari warning notification per message (nothing without napari)."""
    if not messages:
        return
    try:
        from napari.utils.notifications import show_warning
    except Exception:  # noqa: BLE001
        return
    for message in messages:
        show_warning(message)


def source_volume_for(labels: np.ndarray, attributes: dict):
    """The Volume a label layer belongs to: its own metadata, else a matching open image."""
    from .layers import volume_from_layer_geometry, volume_from_layer_meta

    volume = volume_from_layer_meta(attributes.get("metadata") or {})
    if volume is not None:
        return volume
    volume = _matching_open_image(labels, attributes)
    if volume is not None:
        return volume
    if labels.ndim != 3:
        raise LabelsWriteError(
            f"The label layer has {labels.ndim} dimensions; only 3D label volumes can be saved as scans."
        )
    return volume_from_layer_geometry(labels, attributes)


def _matching_open_image(labels: np.ndarray, attributes: dict):
    """An image opened by this plugin in the current viewer with the same grid as the labels."""
    from .layers import geometry_kwargs, volume_from_layer_meta

    try:
        import napari

        viewer = napari.current_viewer()
    except Exception:  # noqa: BLE001 - no viewer (headless writer call)
        return None
    if viewer is None:
        return None
    candidates = []
    for layer in viewer.layers:
        volume = volume_from_layer_meta(getattr(layer, "metadata", {}))
        if volume is None or volume.shape != tuple(labels.shape):
            continue
        expected = geometry_kwargs(volume)
        if "scale" in expected and not np.allclose(attributes.get("scale", (1, 1, 1))[-3:], expected["scale"]):
            continue
        candidates.append(volume)
    return candidates[0] if len(candidates) == 1 else None


def _segments(labels: np.ndarray, attributes: dict):
    """Segment names/colours as Export gives them: the layer's names, else "object N" (never "Segment N")."""
    from .layers import export_naming, export_segments

    return export_segments(labels, export_naming(attributes.get("metadata") or {}, None))


def _notify_error(message: str) -> None:
    try:
        from napari.utils.notifications import show_error

        show_error(message)
    except Exception:  # noqa: BLE001
        pass


def suggested_suffix(volume) -> str:
    """DICOM-SEG for a DICOM series, NIfTI for everything else."""
    return ".dcm" if volume is not None and volume.dicom_datasets else ".nii.gz"


def default_output_path(volume, layer_name: str) -> Path:
    """A file name beside the scan for saving a label layer."""
    folder = Path.home()
    if volume is not None and volume.source_path is not None:
        source = volume.source_path
        folder = source.parent if source.is_file() else source.parent
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in layer_name) or "labels"
    return folder / f"{safe}{suggested_suffix(volume)}"
