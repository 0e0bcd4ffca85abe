"""Segment descriptions as files: JSON, and the sidecar next to a NIfTI/NRRD/MHA label file.

Every label writer uses segment descriptions (:mod:`.segment_types`: what each label value means,
its name, colour and coded category/type): DICOM-SEG stores them as coded segment descriptions,
and users can edit them as JSON (``napari-medsam export --segments FILE.json``). NIfTI, NRRD and
MHA have no place for names, so a label file may carry a sidecar in the same JSON form next to it:
``organs.nii.gz`` -> ``organs.segments.json`` (see :func:`segments_sidecar_path`).

The public names of :mod:`.segment_types` are re-exported here, so ``from
napari_medsam.io.segments import Segment, default_segment`` keeps working. Only numpy and the
standard library are imported: napari imports this at start-up.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import LabelsWriteError, VolumeReadError
from ._text import short_path, short_text
from .segment_types import (
    ABNORMAL_STRUCTURE,
    ANATOMICAL_STRUCTURE,
    BODY_SUBSTANCE,
    KNOWN_STRUCTURES,
    LEFT,
    MAX_LABEL,
    PALETTE,
    RGB,
    RIGHT,
    TISSUE,
    Code,
    KnownStructure,
    Segment,
    as_color,
    default_segment,
    lookup_structure,
    palette_color,
    present_labels,
    segments_for_labels,
)

__all__ = [
    "ABNORMAL_STRUCTURE", "ANATOMICAL_STRUCTURE", "BODY_SUBSTANCE", "KNOWN_STRUCTURES", "LEFT", "MAX_LABEL",
    "PALETTE", "RGB", "RIGHT", "TISSUE", "Code", "KnownStructure", "Segment", "as_color", "default_segment",
    "lookup_structure", "palette_color", "present_labels", "segments_for_labels",
    "SIDECAR_SUFFIX", "segments_to_json", "segments_from_json", "load_segments_json", "save_segments_json",
    "segments_sidecar_path", "read_segments_sidecar", "save_segments_sidecar",
]


def segments_to_json(segments: list[Segment]) -> str:
    """JSON text: a list of ``{label, name, color, category, type[, type_modifier]}``."""
    return json.dumps([s.to_dict() for s in segments], indent=2) + "\n"


def _code_from(item: Any, where: str) -> Code:
    if not isinstance(item, dict):
        raise ValueError(f"{where} must be an object with value, scheme and meaning")
    try:
        return Code(
            str(item["value"]),
            str(item.get("scheme", item.get("scheme_designator"))),
            str(item["meaning"]),
        )
    except KeyError as exc:
        raise ValueError(f"{where} lacks {exc.args[0]!r}") from None


def segments_from_json(text: str) -> list[Segment]:
    """Parse JSON made by :func:`segments_to_json` (missing codes/colour are filled from the name)."""
    try:
        items = json.loads(text)
        if isinstance(items, dict) and "segments" in items:
            items = items["segments"]
        if not isinstance(items, list):
            raise ValueError("the top level must be a list of segments")
        segments = [_segment_from(item, i) for i, item in enumerate(items)]
    except (ValueError, TypeError) as exc:
        raise LabelsWriteError(
            f"Invalid segment descriptions: {exc}. Expected a JSON list of "
            '{"label": 1, "name": "liver", "color": [r, g, b], "category": {...}, "type": {...}}.'
        ) from exc
    seen: set[int] = set()
    for s in segments:
        if s.label in seen:
            raise LabelsWriteError(f"Invalid segment descriptions: label {s.label} is described twice.")
        seen.add(s.label)
    return sorted(segments, key=lambda s: s.label)


def _segment_from(item: Any, index: int) -> Segment:
    if not isinstance(item, dict) or "label" not in item:
        raise ValueError(f"item {index} must be an object with at least a 'label'")
    base = default_segment(item["label"], item.get("name"), item.get("color"))
    where = f"segment {base.label}"
    category = _code_from(item["category"], f"{where} category") if "category" in item else base.category
    type_ = _code_from(item["type"], f"{where} type") if "type" in item else base.type
    if "type_modifier" in item:
        modifier = None if item["type_modifier"] is None else _code_from(item["type_modifier"], f"{where} modifier")
    else:
        modifier = base.type_modifier if "type" not in item else None
    return Segment(base.label, base.name, base.color, category, type_, modifier)


def load_segments_json(path: str | os.PathLike) -> list[Segment]:
    """Read segment descriptions from a JSON file (LabelsWriteError if unreadable or invalid)."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except OSError as exc:
        raise LabelsWriteError(
            f"Cannot read segment descriptions from {short_path(path)}: {exc.strerror or exc}."
        ) from exc
    return segments_from_json(text)


def save_segments_json(segments: list[Segment], path: str | os.PathLike) -> Path:
    """Write segment descriptions to a JSON file, atomically."""
    from .atomic import atomic_output

    with atomic_output(path) as tmp:
        tmp.write_text(segments_to_json(segments), encoding="utf-8")
    return Path(path).expanduser()


# --- the sidecar of a NIfTI/NRRD/MHA label file ----------------------------------------------

SIDECAR_SUFFIX = ".segments.json"
_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def segments_sidecar_path(labels_path: str | os.PathLike) -> Path:
    """Where the segment descriptions of a label file live: its name with ``.segments.json``.

    ``organs.nii.gz`` -> ``organs.segments.json`` in the same folder (likewise for ``.nii``,
    ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``; any other name just gets the suffix appended).
    """
    path = Path(labels_path).expanduser()
    name = path.name
    for suffix in _IMAGE_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return path.with_name(name[: -len(suffix)] + SIDECAR_SUFFIX)
    return path.with_name(name + SIDECAR_SUFFIX)


def read_segments_sidecar(labels_path: str | os.PathLike) -> list[Segment] | None:
    """The segments described next to a label file, or None when it has no sidecar.

    A sidecar that exists but cannot be read or parsed raises :class:`VolumeReadError` naming it:
    silently dropping the names would write "Segment 1" where the user expects "liver".
    """
    side = segments_sidecar_path(labels_path)
    if not side.is_file():
        return None
    try:
        return load_segments_json(side)
    except LabelsWriteError as exc:
        raise VolumeReadError(
            f"{side.name} (the segment names of {Path(labels_path).name}) is unusable: "
            f"{short_text(str(exc), 110)} Fix or delete it."
        ) from exc


def save_segments_sidecar(segments: list[Segment], labels_path: str | os.PathLike) -> Path:
    """Write ``segments`` as the sidecar of the label file ``labels_path``; return its path."""
    return save_segments_json(segments, segments_sidecar_path(labels_path))
