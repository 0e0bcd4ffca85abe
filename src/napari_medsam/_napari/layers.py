"""Volume <-> napari layer data: geometry, contrast and the metadata writers rely on.

A layer made by this plugin carries ``metadata["napari_medsam"] = {"volume": Volume}``: the
source volume (its voxels are the layer's data, not a copy), which the writers use to put a
label layer back on the scan's exact grid and to reference a DICOM series.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..volume import Volume

META_KEY = "napari_medsam"

# Soft-tissue window for CT: the usual starting view for abdominal and thoracic scans.
DEFAULT_CT_WINDOW = (40.0, 400.0)


def geometry_kwargs(volume: Volume) -> dict[str, Any]:
    """scale/translate for axis-aligned volumes, a full affine for oblique ones."""
    affine = volume.napari_affine()
    linear = affine[:3, :3]
    if np.allclose(linear, np.diag(np.diag(linear)), atol=1e-9) and np.all(np.diag(linear) > 0):
        return {"scale": tuple(float(v) for v in np.diag(linear)), "translate": tuple(float(v) for v in affine[:3, 3])}
    return {"affine": affine}


def contrast_limits(volume: Volume) -> tuple[float, float]:
    """A sensible first window: soft tissue for CT, robust percentiles otherwise."""
    if volume.modality == "CT" and volume.intensity_unit == "HU":
        window = volume.metadata.get("window")
        level, width = DEFAULT_CT_WINDOW
        if window and 50 <= float(window[1]) <= 4000:
            level, width = float(window[0]), float(window[1])
        return (level - width / 2.0, level + width / 2.0)
    data = volume.array
    sample = data.reshape(-1)[:: max(1, data.size // 500_000)].astype(np.float32)
    nonzero = sample[sample != 0]
    if nonzero.size == 0:
        return (0.0, 1.0)
    low, high = np.percentile(nonzero, [0.5, 99.5])
    if high <= low:
        high = low + 1.0
    return (float(low), float(high))


def image_layer_data(volume: Volume, name: str | None = None) -> tuple:
    """(data, kwargs, 'image') for a napari reader/sample function."""
    kwargs = {
        "name": name or _default_name(volume),
        "colormap": "gray",
        "contrast_limits": contrast_limits(volume),
        "metadata": {META_KEY: {"volume": volume}},
        "interpolation2d": "linear" if volume.modality != "CT" else "nearest",
        **geometry_kwargs(volume),
    }
    return (volume.array, kwargs, "image")


def labels_layer_data(labels: np.ndarray, like: Volume, name: str, segments=None) -> tuple:
    """(data, kwargs, 'labels') on ``like``'s grid, remembering the source for the writers."""
    meta: dict[str, Any] = {"volume": like}
    if segments:
        meta["segments"] = list(segments)
    kwargs = {"name": name, "metadata": {META_KEY: meta}, "opacity": 0.5, **geometry_kwargs(like)}
    return (labels, kwargs, "labels")


def _default_name(volume: Volume) -> str:
    if volume.source_path is None:
        return "volume"
    name = volume.source_path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    if volume.source_format == "dicom":
        description = volume.metadata.get("series_description")
        if description:
            return f"{volume.source_path.name} ({description})"
    return name


def volume_from_layer_meta(meta: dict[str, Any]) -> Volume | None:
    """The source Volume stored in a layer's metadata dict, if any."""
    entry = (meta or {}).get(META_KEY) or {}
    volume = entry.get("volume")
    return volume if isinstance(volume, Volume) else None


def volume_from_layer_geometry(data: np.ndarray, attributes: dict[str, Any]) -> Volume:
    """A Volume for a layer the plugin did not make, from its napari world transform.

    napari world coordinates are read as LPS (z, y, x) millimetres, the convention of layers
    this plugin opens, so labels drawn over one of its images land on the right grid.
    """
    ndim = 3
    affine = np.asarray(attributes.get("affine", np.eye(ndim + 1)), dtype=float)
    if affine.shape != (4, 4):
        affine = np.eye(4)
    scale = np.asarray(attributes.get("scale", (1.0, 1.0, 1.0)), dtype=float)[-3:]
    translate = np.asarray(attributes.get("translate", (0.0, 0.0, 0.0)), dtype=float)[-3:]
    data_to_world = affine.copy()
    step = np.eye(4)
    step[:3, :3] = np.diag(scale)
    step[:3, 3] = translate
    data_to_world = affine @ step
    zyx_to_xyz = np.eye(4)[[2, 1, 0, 3]]
    lps = zyx_to_xyz @ data_to_world
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    return Volume(
        array=np.zeros(data.shape[-3:], dtype=np.uint8),
        spacing_mm=tuple(spacing),
        origin_mm=tuple(lps[:3, 3]),
        direction=lps[:3, :3] / spacing[None, :],
        source_format="napari-layer",
    )


def known_segments(metadata: Any) -> tuple[dict[int, str], dict[int, Any]]:
    """Names and colours a label layer already carries (e.g. read from a DICOM-SEG)."""
    meta = (metadata or {}).get(META_KEY) or {}
    names = {int(k): str(v) for k, v in (meta.get("names") or {}).items()}
    colors = {}
    for segment in meta.get("segments") or []:
        names.setdefault(int(segment.label), segment.name)
        colors[int(segment.label)] = segment.color
    return names, colors


def export_naming(metadata: dict, objects: list | None) -> tuple[dict[int, str], dict[int, object], dict[int, tuple]]:
    """What Export names segments after, taken on the Qt thread: (layer names, layer segments, objects).

    ``objects`` are the scan's segmentation session's objects (the objects table) when the layer
    is that session's; their names and colours come first.
    """
    names, _ = known_segments(metadata)
    given = {int(s.label): s for s in ((metadata or {}).get(META_KEY) or {}).get("segments") or []}
    shown = {int(o.value): (str(o.name), o.color) for o in objects or []}
    return names, given, shown


def export_segments(labels: np.ndarray, naming: tuple) -> list:
    """One segment per value present in ``labels``, named as the objects table shows it, never empty or made up.

    An object of the session: its name in the table (and its colour). Another value: the name the
    layer carries, or "object N" (what the session calls an object it names itself) when that is empty.
    """
    from dataclasses import replace

    from ..io.segment_types import present_labels
    from ..io.segments import default_segment

    names, given, shown = naming
    segments = []
    for value in present_labels(labels):
        segment = given.get(value)
        if value in shown and shown[value][0].strip():
            name, color = shown[value][0].strip(), shown[value][1]
            if segment is None or segment.name != name:
                segment = default_segment(value, name, color)
        else:
            name = (names.get(value) or "").strip() or f"object {value}"
            if segment is None:
                segment = default_segment(value, name)
            elif not str(segment.name).strip():
                segment = replace(segment, name=name)
        segments.append(segment)
    return segments
