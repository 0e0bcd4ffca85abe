"""Find the DICOM image series in a folder by reading headers only.

``scan_dicom`` walks a folder (or looks at one file), reads every file's header without its
pixel data, skips files that are not DICOM (and DICOMDIR indexes) and groups the instances:

* by SeriesInstanceUID; instances without one are grouped by geometry instead
  (ImageOrientationPatient, Rows/Columns, FrameOfReferenceUID);
* inside one SeriesInstanceUID, instances that differ in orientation or image size form separate
  *stacks* (scanners store the three planes of a localizer in one series). Each stack is one
  :class:`DicomSeriesInfo`; its ``key`` (the UID, with ``#n`` appended when the series has
  several stacks) is what ``read_dicom_series(..., series_uid=key)`` accepts;
* an enhanced multi-frame file is a stack on its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from ...errors import DicomSeriesError
from .._text import short_path, short_text, short_uid

MEDIA_DIRECTORY_STORAGE = "1.2.840.10008.1.3.10"
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
ORIENTATION_TOLERANCE = 1e-3  # direction cosine difference below which two planes are parallel


@dataclass
class DicomSeriesInfo:
    """One stack of image planes (or one non-image series) found by :func:`scan_dicom`."""

    series_uid: str
    series_number: int | None
    description: str
    modality: str
    sop_class_uid: str
    n_instances: int
    rows: int | None
    columns: int | None
    files: list[Path]
    has_pixel_data: bool
    stack_key: tuple | None = None
    stack_index: int = 0
    n_stacks: int = 1
    n_frames: int = 0
    study_uid: str = ""
    frame_of_reference_uid: str = ""
    samples_per_pixel: int = 1
    multiframe: bool = False
    key: str = ""
    headers: list[Dataset] = field(default_factory=list, repr=False, compare=False)

    def label(self) -> str:
        """Short human description used in messages, e.g. ``1.2.3 'AX T1' (MR, 40 images)``.

        A long UID or description is shortened in its middle (``1.2.826.0.1.36…6789012345678``), so
        a message naming a series stays one short line; ``key`` holds the full UID to select it.
        """
        what = f"{self.n_frames} frames in one file" if self.multiframe else f"{self.n_instances} images"
        if not self.has_pixel_data:
            what = f"{self.n_instances} objects, no images"
        description = f" '{short_text(self.description, 24)}'" if self.description else ""
        uid = short_uid(self.key) if self.key else "(no SeriesInstanceUID)"
        return f"{uid}{description} ({self.modality or 'unknown modality'}, {what})"

    def describe(self) -> dict[str, Any]:
        """Plain JSON-friendly summary (no datasets, no paths beyond the first file)."""
        return {
            "key": self.key,
            "series_uid": self.series_uid,
            "series_number": self.series_number,
            "description": self.description,
            "modality": self.modality,
            "sop_class_uid": self.sop_class_uid,
            "n_instances": self.n_instances,
            "n_frames": self.n_frames,
            "rows": self.rows,
            "columns": self.columns,
            "has_pixel_data": self.has_pixel_data,
            "stack_index": self.stack_index,
            "n_stacks": self.n_stacks,
            "first_file": str(self.files[0]) if self.files else None,
        }


class DicomScanResult(list):
    """The list of :class:`DicomSeriesInfo` plus what was skipped on the way."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root
        self.n_files = 0
        self.n_skipped = 0  # files that are not DICOM
        self.skipped_examples: list[Path] = []
        self.n_dicomdir = 0
        # (file, reason, SeriesInstanceUID when the damaged header still names one)
        self.damaged: list[tuple[Path, str, str]] = []


def scan_dicom(path: str | os.PathLike, *, recursive: bool = True) -> DicomScanResult:
    """Group the DICOM files under ``path`` (a folder, searched recursively, or one file) by series."""
    root = Path(path).expanduser()
    if not root.exists():
        raise DicomSeriesError(f"{short_path(root)} does not exist. Check the path.")
    result = DicomScanResult(root)
    entries: list[tuple[Path, Dataset]] = []
    for file in _iter_files(root, recursive):
        result.n_files += 1
        header, problem = read_header(file)
        if problem is not None:
            result.damaged.append((file, problem, ""))
            continue
        if header is None:
            result.n_skipped += 1
            if len(result.skipped_examples) < 5:
                result.skipped_examples.append(file)
            continue
        if file.name.upper() == "DICOMDIR" or _media_class(header) == MEDIA_DIRECTORY_STORAGE:
            result.n_dicomdir += 1
            continue
        damage = _damage(header)
        if damage:
            result.damaged.append((file, damage, _surviving_series_uid(header)))
            continue
        entries.append((file, header))
    result.extend(_group(entries))
    return result


def _iter_files(root: Path, recursive: bool):
    if root.is_file():
        yield root
        return
    if recursive:
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            for name in sorted(files):
                yield Path(folder) / name
    else:
        for file in sorted(p for p in root.iterdir() if p.is_file()):
            yield file


def read_header(path: Path) -> tuple[Dataset | None, str | None]:
    """(header, None) for DICOM, (None, None) for other files, (None, reason) for damaged DICOM."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True), None
    except InvalidDicomError:
        if not _looks_like_raw_dicom(path):
            return None, None
    except (OSError, ValueError, EOFError, KeyError, TypeError, OverflowError) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    try:
        # A DICOM stream without the 128-byte preamble (older exports) still starts with a group 8 tag.
        return pydicom.dcmread(path, stop_before_pixels=True, force=True), None
    except (OSError, ValueError, EOFError, KeyError, TypeError, OverflowError) as exc:
        return None, f"{type(exc).__name__}: {exc}"


def _looks_like_raw_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            start = handle.read(8)
    except OSError:
        return False
    if len(start) < 8 or start[:2] != b"\x08\x00":
        return False
    # Explicit VR streams carry two capital letters after the tag; implicit ones a 4-byte length.
    return start[4:6].isalpha() or int.from_bytes(start[4:8], "little") < 1 << 16


def _media_class(header: Dataset) -> str:
    meta = getattr(header, "file_meta", None)
    return str(meta.get("MediaStorageSOPClassUID", "")) if meta is not None else ""


def _damage(header: Dataset) -> str | None:
    """Why a header that parsed is still unusable (pydicom stops quietly at a truncation)."""
    sop_class = str(header.get("SOPClassUID", "") or _media_class(header))
    if not sop_class:
        return "the file has a DICOM preamble but no SOP Class UID: it is truncated or damaged"
    name = UID(sop_class).name
    if "Image Storage" in name and ("Rows" not in header or "Columns" not in header):
        return f"the file is a {name} object without Rows/Columns: it is truncated or damaged"
    return None


def _surviving_series_uid(header: Dataset) -> str:
    """SeriesInstanceUID of a truncated header, unless it is the last element (which may be cut short)."""
    tags = list(header.keys())
    if not tags or "SeriesInstanceUID" not in header or tags[-1] == header["SeriesInstanceUID"].tag:
        return ""
    return _text(header, "SeriesInstanceUID")


def _text(header: Dataset, keyword: str) -> str:
    value = header.get(keyword, "")
    return "" if value is None else str(value).strip()


def _int_or_none(header: Dataset, keyword: str) -> int | None:
    value = header.get(keyword)
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def is_multiframe_with_positions(header: Dataset) -> bool:
    """True for enhanced (functional group) multi-frame images."""
    return "PerFrameFunctionalGroupsSequence" in header and "Rows" in header


def header_orientation(header: Dataset) -> np.ndarray | None:
    """ImageOrientationPatient as 6 floats, from the top level or the functional groups."""
    value = header.get("ImageOrientationPatient")
    if value is None and is_multiframe_with_positions(header):
        value = functional_group_value(header, 0, "PlaneOrientationSequence", "ImageOrientationPatient")
    if value is None or len(value) != 6:
        return None
    try:
        return np.asarray([float(v) for v in value])
    except (TypeError, ValueError):
        return None


def functional_group_value(header: Dataset, frame: int, sequence: str, keyword: str) -> Any:
    """An attribute of an enhanced multi-frame image: per-frame group first, then shared."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        items = header.get(groups)
        if not items or index >= len(items):
            continue
        inner = items[index].get(sequence)
        if inner and keyword in inner[0]:
            return inner[0][keyword].value
    return None


def _has_pixels(header: Dataset) -> bool:
    is_segmentation = str(header.get("SOPClassUID", "")) == SEGMENTATION_STORAGE
    return "Rows" in header and "Columns" in header and not is_segmentation


def _geometry_key(header: Dataset) -> tuple:
    return (
        _int_or_none(header, "Rows"),
        _int_or_none(header, "Columns"),
        _text(header, "FrameOfReferenceUID"),
        _int_or_none(header, "SamplesPerPixel") or 1,
    )


def _cluster(members: list[tuple[Path, Dataset]]) -> list[list[tuple[Path, Dataset]]]:
    """Split instances into stacks of equal size and (within tolerance) equal orientation."""
    clusters: list[tuple[tuple, np.ndarray | None, list[tuple[Path, Dataset]]]] = []
    for file, header in members:
        key, iop = _geometry_key(header), header_orientation(header)
        for ckey, ciop, items in clusters:
            same_iop = (iop is None and ciop is None) or (
                iop is not None and ciop is not None and np.max(np.abs(iop - ciop)) <= ORIENTATION_TOLERANCE
            )
            if ckey == key and same_iop:
                items.append((file, header))
                break
        else:
            clusters.append((key, iop, [(file, header)]))
    return [items for _, _, items in clusters]


def _make_info(items: list[tuple[Path, Dataset]], series_uid: str) -> DicomSeriesInfo:
    file, header = items[0]
    iop = header_orientation(header)
    has_pixels = _has_pixels(header)
    return DicomSeriesInfo(
        series_uid=series_uid,
        series_number=_int_or_none(header, "SeriesNumber"),
        description=_text(header, "SeriesDescription"),
        modality=_text(header, "Modality"),
        sop_class_uid=_text(header, "SOPClassUID"),
        n_instances=len(items),
        rows=_int_or_none(header, "Rows"),
        columns=_int_or_none(header, "Columns"),
        files=[f for f, _ in items],
        has_pixel_data=has_pixels,
        stack_key=_stack_key(header, iop) if has_pixels else None,
        n_frames=sum(_frames(h) for _, h in items) if has_pixels else 0,
        study_uid=_text(header, "StudyInstanceUID"),
        frame_of_reference_uid=_text(header, "FrameOfReferenceUID"),
        samples_per_pixel=_int_or_none(header, "SamplesPerPixel") or 1,
        multiframe=has_pixels and len(items) == 1 and is_multiframe_with_positions(header),
        headers=[h for _, h in items],
    )


def _frames(header: Dataset) -> int:
    return _int_or_none(header, "NumberOfFrames") or 1


def _stack_key(header: Dataset, iop: np.ndarray | None) -> tuple:
    orientation = tuple(float(v) for v in np.round(iop, 4)) if iop is not None else None
    return (orientation, *_geometry_key(header))


def _group(entries: list[tuple[Path, Dataset]]) -> list[DicomSeriesInfo]:
    by_uid: dict[str, list[tuple[Path, Dataset]]] = {}
    for file, header in entries:
        by_uid.setdefault(_text(header, "SeriesInstanceUID"), []).append((file, header))
    infos: list[DicomSeriesInfo] = []
    n_anonymous = 0
    for uid, members in by_uid.items():
        images = [(f, h) for f, h in members if _has_pixels(h)]
        others = [(f, h) for f, h in members if not _has_pixels(h)]
        # Each enhanced multi-frame file is a stack of its own.
        single = [[(f, h)] for f, h in images if is_multiframe_with_positions(h)]
        classic = [(f, h) for f, h in images if not is_multiframe_with_positions(h)]
        stacks = sorted(_cluster(classic) + single, key=lambda s: -sum(_frames(h) for _, h in s))
        if not uid:
            for stack in stacks:
                n_anonymous += 1
                info = _make_info(stack, "")
                info.key = f"no-series-uid-{n_anonymous}"
                infos.append(info)
            if others:
                info = _make_info(others, "")
                info.key = "no-series-uid-objects"
                infos.append(info)
            continue
        for index, stack in enumerate(stacks):
            info = _make_info(stack, uid)
            info.stack_index, info.n_stacks = index, len(stacks)
            info.key = uid if len(stacks) == 1 else f"{uid}#{index + 1}"
            infos.append(info)
        if others:
            info = _make_info(others, uid)
            info.key = uid if not stacks else f"{uid}#objects"
            infos.append(info)
    infos.sort(key=lambda i: (i.study_uid, 1 << 30 if i.series_number is None else i.series_number, i.key))
    return infos
