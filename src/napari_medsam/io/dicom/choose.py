"""Which stack of a scanned folder to read, and why a folder or file offers none.

:func:`choose_series` picks the stack a path names (a file names its own stack, ``series_uid``
picks one, otherwise the largest series) and returns warnings about what was left out; the
helpers raise the one-line :class:`~napari_medsam.errors.DicomSeriesError` that says why nothing
can be read (empty folder, no DICOM, no images, a damaged file of the chosen series).
"""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.uid import UID

from ...errors import DicomSeriesError
from .._text import short_path, short_text, short_uid
from .scan import DicomScanResult, DicomSeriesInfo

__all__ = ["choose_series"]


def choose_series(
    scan: DicomScanResult, series_uid: str | None = None, file: Path | None = None
) -> tuple[DicomSeriesInfo, list[str]]:
    """Pick the stack to read: the one ``series_uid`` (or ``file``) names, else the largest; plus warnings."""
    where = scan.root
    owner = _owner(scan, file) if file is not None and series_uid is None else None
    images = [i for i in scan if i.has_pixel_data]
    if not images:
        _check_damaged(scan, None, file is None)
        _explain_no_images(scan)
    if series_uid is not None:
        candidates = [i for i in images if series_uid in (i.key, i.series_uid)]
        if not candidates:
            listing = "; ".join(i.label() for i in images[:2]) + ("; ..." if len(images) > 2 else "")
            raise DicomSeriesError(
                f"No image series with UID {short_uid(series_uid)!r} in {short_path(where)} (it holds {listing}); "
                "`napari-medsam info FOLDER` lists their UIDs."
            )
    elif owner is not None:
        candidates = [owner]  # the file names its own stack
    else:
        candidates = images

    group = _largest_group(candidates)
    stacks = sorted((i for i in candidates if _group_id(i) == group), key=lambda i: -i.n_frames)
    chosen = stacks[0]
    if len(stacks) > 1 and stacks[1].n_frames == chosen.n_frames:
        tied = [i for i in stacks if i.n_frames == chosen.n_frames]
        # One short line: the UID once, each stack by its number and image size (the full keys
        # are listed by `napari-medsam info` on any one file of a stack, under series_in_folder).
        parts = ", ".join(f"#{i.stack_index + 1} {i.rows}x{i.columns}" for i in tied[:4])
        raise DicomSeriesError(
            f"Series {chosen.series_uid} holds {len(tied)} stacks of {chosen.n_frames} images each "
            f"({parts}; other orientation or size). Choose one with --series-uid UID#N "
            "(series_uid= in Python)."
        )
    warnings = _check_damaged(scan, chosen, file is None)
    warnings += [
        f"Not read: a stack of this series with another orientation or size ({other.rows}x{other.columns}, "
        f"{other.n_frames} images); open it with series_uid={other.key!r} (--series-uid)."
        for other in stacks[1:]
    ]
    if series_uid is None and file is None:
        warnings += [
            f"Not read: series {_described(other)}({other.modality or '?'}, {other.n_frames} images) of the same "
            f"folder; open it with series_uid={other.key!r} (--series-uid) or its file {_name(other.files[0])}."
            for other in images
            if _group_id(other) != group
        ]
    return chosen, warnings


def _check_damaged(scan: DicomScanResult, chosen: DicomSeriesInfo | None, whole_folder: bool) -> list[str]:
    """Raise for a damaged file that may belong to ``chosen``; return a warning about the others.

    A damaged file belongs to the series its header still names. One whose header is too short to
    name a series is blamed on the series read from its folder, but not when the user opened one
    particular file (then the folder is only searched for that file's series).
    """
    if not scan.damaged:
        return []
    folders = {f.parent for f in chosen.files} if chosen is not None else set()
    for path, reason, uid in scan.damaged:
        unnamed_here = whole_folder and path.parent in folders
        ours = chosen is None or (uid == chosen.series_uid if uid else unnamed_here)
        if ours:
            raise DicomSeriesError(
                f"Cannot read {short_path(path)}: {short_text(reason, 100)}. Remove the file or copy the series again."
            )
    path, reason, _ = scan.damaged[0]
    return [
        f"{len(scan.damaged)} damaged DICOM file(s) that do not belong to this series were skipped, "
        f"e.g. {short_path(path)} ({short_text(reason, 60)})."
    ]


def _owner(scan: DicomScanResult, file: Path) -> DicomSeriesInfo:
    """The scanned stack that holds ``file``, which must be an image."""
    wanted = file.resolve()
    owners = [i for i in scan if wanted in {f.resolve() for f in i.files}]
    if not owners:
        for path, reason, _ in scan.damaged:
            if path.resolve() == wanted:
                raise DicomSeriesError(f"Cannot read {_name(file)}: {short_text(reason, 120)}.")
        raise DicomSeriesError(_not_dicom_message(file))
    if not owners[0].has_pixel_data:
        raise DicomSeriesError(
            f"{_name(file)} is a {owners[0].modality or 'DICOM'} object without pixel data: it holds no "
            "images to open."
        )
    return owners[0]


def _not_dicom_message(file: Path) -> str:
    """Why a file is not read: not DICOM at all, or a bare data set (no preamble or meta header) without an image."""
    try:
        data = pydicom.dcmread(file, stop_before_pixels=True, force=True)
        n_elements = len(data)
    except Exception:  # noqa: BLE001 - anything pydicom cannot parse even when forced is not DICOM
        n_elements = 0
    if n_elements and "Rows" not in data:
        return (
            f"{_name(file)} has no DICOM preamble or file meta header; read without them it holds "
            f"{n_elements} element(s) but no image (no Rows/Columns/Pixel Data), so there is nothing to open."
        )
    return f"{short_path(file)} is not a DICOM file; choose a file of a DICOM image series or its folder."


def _explain_no_images(scan: DicomScanResult) -> None:
    """Raise the error that says why a folder offers nothing to read."""
    where = scan.root
    if not scan and scan.n_files == 0:
        raise DicomSeriesError(
            f"{short_path(where)} is empty: there are no files to read. Choose the folder of a DICOM series."
        )
    if not scan:
        examples = ", ".join(_name(p) for p in scan.skipped_examples[:3])
        raise DicomSeriesError(
            f"{short_path(where)} holds no DICOM files ({scan.n_skipped} other file(s), e.g. {examples}). "
            "Choose the folder of a DICOM series."
        )
    kinds = ", ".join(sorted({f"{i.modality or '?'} ({_class_name(i.sop_class_uid)})" for i in scan}))
    raise DicomSeriesError(
        f"{short_path(where)} holds no images, only DICOM objects without pixel data: {kinds}. Such objects (reports, "
        "structure sets, segmentations) carry no pixel volume; open the image series they refer to instead."
    )


def _group_id(info: DicomSeriesInfo) -> str:
    return info.series_uid or info.key


def _largest_group(candidates: list[DicomSeriesInfo]) -> str:
    """The series (UID, or key when it has none) with the most image planes; first in scan order on a tie."""
    totals: dict[str, int] = {}
    for info in candidates:
        totals[_group_id(info)] = totals.get(_group_id(info), 0) + info.n_frames
    return max(totals, key=lambda g: totals[g])


def _class_name(sop_class_uid: str) -> str:
    return UID(sop_class_uid).name if sop_class_uid else "unknown SOP class"


def _name(path: Path | str) -> str:
    """A file's name for a message whose folder is named elsewhere (long names cut in the middle)."""
    return short_text(Path(str(path)).name, 60)


def _described(info: DicomSeriesInfo) -> str:
    return f"'{short_text(info.description, 24)}' " if info.description else ""
