"""Read a DICOM image series (classic single-frame files or one enhanced multi-frame file).

``read_dicom_series(path)`` takes a folder or any file of a series. Slices are ordered by their
position along the slice normal (row cosine x column cosine, dotted with ImagePositionPatient),
never by InstanceNumber or file name. Each instance's RescaleSlope/Intercept is applied; CT comes
out in HU. The array is int16 when every value fits exactly, float32 otherwise.

Grid: the file grid has axes ``(column, row, slice)``: file axis 0 runs along the row cosine
(ImageOrientationPatient[:3]), axis 1 along the column cosine (IOP[3:]) and axis 2 is the *stack*
index, i.e. the sorted position along the normal. ``volume.axes`` maps that grid to display order.

``volume.dicom_datasets`` is in **stack order**, whatever the display orientation:
``dicom_datasets[k]`` is the header (a pydicom Dataset without pixel data) of the plane at stack
index ``k``, and ``volume.axes.to_file(volume.array)[:, :, k].T`` is that plane's image as
(rows, columns), exactly what a DICOM-SEG writer must encode for it (see :func:`stack_plane`).
A blank slice inserted for a missing instance has ``None``. For an axial acquisition stack order
is display slice order; for sagittal/coronal ones the stack became another display axis, named by
``metadata["dicom_slice_axis_display"]`` (with ``metadata["dicom_slice_axis_flipped"]``). For an
enhanced multi-frame file every entry is the file's one header and
``metadata["dicom_frame_numbers"][k]`` is the 1-based frame number of stack plane ``k``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom.pixels
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from ...errors import DicomSeriesError, MedSamError, NotAVolumeError
from ...volume import Volume, display_grid
from .planes import Plane, collect_planes, file_direction, slice_grid
from .scan import DicomScanResult, DicomSeriesInfo, functional_group_value, scan_dicom

__all__ = ["read_dicom_series", "scan_dicom", "stack_plane", "DicomSeriesInfo", "DicomScanResult"]

_DECODERS = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg-libjpeg (or Pillow)",
    "1.2.840.10008.1.2.4.51": "pylibjpeg-libjpeg (or Pillow)",
    "1.2.840.10008.1.2.4.57": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.70": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.80": "pylibjpeg-libjpeg or pyjpegls",
    "1.2.840.10008.1.2.4.81": "pylibjpeg-libjpeg or pyjpegls",
    "1.2.840.10008.1.2.4.90": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.91": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.201": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.202": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.5": "pylibjpeg-rle (pydicom also decodes it on its own)",
}


def read_dicom_series(path: str | os.PathLike, series_uid: str | None = None) -> Volume:
    """Read the DICOM series of a folder (the largest, unless ``series_uid`` picks) or of one file."""
    target = Path(path).expanduser()
    if not target.exists():
        raise DicomSeriesError(f"{target} does not exist. Check the path.")
    if target.is_file():
        scan = scan_dicom(target.parent, recursive=False)
        info, warnings = choose_series(scan, series_uid, target)
    else:
        scan = scan_dicom(target)
        info, warnings = choose_series(scan, series_uid)
    try:
        planes = collect_planes(info, warnings)
        volume = _build_volume(info, planes, warnings)
    except (ValueError, TypeError, OverflowError) as exc:
        # pydicom hands back a malformed number (e.g. IS "1A") as text; converting it fails here.
        raise DicomSeriesError(_malformed_message(info, exc)) from exc
    volume.metadata["series"] = [dict(i.describe(), selected=i is info) for i in scan]
    one_file = info.multiframe or len(info.files) == 1
    volume.source_path = info.files[0] if one_file else _common_folder(info.files, scan.root)
    return volume


def _malformed_message(info: DicomSeriesInfo, exc: Exception) -> str:
    """One line naming the file and element whose value cannot be converted, when it can be found."""
    for path, header in zip(info.files, info.headers):
        for element in header.iterall():
            if element.VR not in ("IS", "DS") or element.value in (None, ""):
                continue
            values = element.value if element.VM > 1 else [element.value]
            try:
                [float(v) for v in values]
            except (TypeError, ValueError):
                return (
                    f"{path.name}: element {element.keyword or element.tag} holds {str(element.value)[:40]!r}, "
                    f"which is not a valid {element.VR} number; fix or remove the file."
                )
    return f"Series {info.label()[:80]}: a DICOM element cannot be converted ({str(exc)[:80]}); check the files."


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
            listing = "; ".join(i.label() for i in images)
            raise DicomSeriesError(
                f"No image series with UID {series_uid!r} in {where}. Available: {listing}."
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
        f"Series {chosen.series_uid} also holds a stack with another orientation or size: "
        f"{other.label()}; it was not read. Open it with series_uid={other.key!r}."
        for other in stacks[1:]
    ]
    if series_uid is None and file is None:
        warnings += [
            f"{where} also holds image series {other.label()}; it was not read (the largest series is "
            f"opened by default). Open it with series_uid={other.key!r} (CLI: --series-uid), or in "
            f"napari open one of its files, e.g. {Path(str(other.files[0])).name}."
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
            raise DicomSeriesError(f"Cannot read {path}: {reason}. Remove the file or copy the series again.")
    path, reason, _ = scan.damaged[0]
    return [
        f"{len(scan.damaged)} damaged DICOM file(s) that do not belong to this series were skipped, "
        f"e.g. {path} ({reason})."
    ]


def _owner(scan: DicomScanResult, file: Path) -> DicomSeriesInfo:
    """The scanned stack that holds ``file``, which must be an image."""
    wanted = file.resolve()
    owners = [i for i in scan if wanted in {f.resolve() for f in i.files}]
    if not owners:
        for path, reason, _ in scan.damaged:
            if path.resolve() == wanted:
                raise DicomSeriesError(f"Cannot read {file.name}: {reason}.")
        raise DicomSeriesError(_not_dicom_message(file))
    if not owners[0].has_pixel_data:
        raise DicomSeriesError(
            f"{file.name} is a {owners[0].modality or 'DICOM'} object without pixel data: it holds no "
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
            f"{file.name} has no DICOM preamble or file meta header; read without them it holds "
            f"{n_elements} element(s) but no image (no Rows/Columns/Pixel Data), so there is nothing to open."
        )
    return f"{file} is not a DICOM file; choose a file of a DICOM image series or its folder."


def _explain_no_images(scan: DicomScanResult) -> None:
    """Raise the error that says why a folder offers nothing to read."""
    where = scan.root
    if not scan and scan.n_files == 0:
        raise DicomSeriesError(
            f"{where} is empty: there are no files to read. Choose the folder of a DICOM series."
        )
    if not scan:
        examples = ", ".join(p.name for p in scan.skipped_examples)
        raise DicomSeriesError(
            f"{where} holds no DICOM files ({scan.n_skipped} other file(s), e.g. {examples}). "
            "Choose the folder of a DICOM series."
        )
    kinds = ", ".join(sorted({f"{i.modality or '?'} ({_class_name(i.sop_class_uid)})" for i in scan}))
    raise DicomSeriesError(
        f"{where} holds no images, only DICOM objects without pixel data: {kinds}. Such objects (reports, "
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


def stack_plane(volume: Volume, display_array: np.ndarray, k: int) -> np.ndarray:
    """The (rows, columns) image of stack plane ``k`` (``volume.dicom_datasets[k]``) of a display array."""
    return volume.axes.to_file(display_array)[:, :, k].T


def _common_folder(files: list[Path], root: Path) -> Path:
    parents = {f.parent for f in files}
    return parents.pop() if len(parents) == 1 else root


def _decode(plane_group: list[Plane]) -> Iterator[tuple[Plane, np.ndarray]]:
    """Yield (plane, stored pixels) for the planes of one file, naming the file and codec on failure."""
    path = plane_group[0].path
    syntax = _transfer_syntax(plane_group[0].header)
    try:
        if not _has_meta_syntax(plane_group[0].header):
            yield from _decode_without_meta(plane_group, syntax)
        elif plane_group[0].frame is None:
            yield plane_group[0], pydicom.pixels.pixel_array(path)
        else:
            by_frame = {p.frame: p for p in plane_group}
            for frame, pixels in enumerate(pydicom.pixels.iter_pixels(path)):
                if frame in by_frame:
                    yield by_frame[frame], pixels
    except MedSamError:
        raise
    except Exception as exc:  # pydicom raises many types for damaged or undecodable data
        reason = f"{type(exc).__name__}: {exc}"
        if not syntax.is_transfer_syntax:
            raise DicomSeriesError(
                f"Could not read the pixel data of {path}: it has no file meta header and its encoding "
                f"could not be recognised ({reason})."
            ) from exc
        if syntax.is_compressed and str(syntax) in _DECODERS:
            raise DicomSeriesError(
                f"Could not decode {path}: its transfer syntax is {syntax.name} ({syntax}), which needs the "
                f"package {_DECODERS[str(syntax)]}; install it, or check the file ({reason})."
            ) from exc
        if syntax.is_compressed:
            raise DicomSeriesError(
                f"Could not decode {path}: transfer syntax {syntax.name} ({syntax}) is not supported "
                f"({reason})."
            ) from exc
        raise DicomSeriesError(
            f"Could not read the pixel data of {path}: the file is truncated or damaged ({reason}). "
            "Remove it or copy the series again."
        ) from exc


def _values(pixels: np.ndarray, plane: Plane) -> np.ndarray:
    """Modality values (int64 when the rescale keeps integers, float64 otherwise)."""
    if "ModalityLUTSequence" in plane.header and plane.frame is None:
        return np.asarray(pydicom.pixels.apply_modality_lut(pixels, plane.header))
    if plane.slope == int(plane.slope) and plane.intercept == int(plane.intercept):
        return pixels.astype(np.int64) * int(plane.slope) + int(plane.intercept)
    return pixels.astype(np.float64) * plane.slope + plane.intercept


def _fits_int16(values: np.ndarray) -> bool:
    if values.size == 0:
        return True
    if values.min() < -32768 or values.max() > 32767:
        return False
    return bool(np.issubdtype(values.dtype, np.integer) or np.array_equal(values, np.round(values)))


def _build_volume(info: DicomSeriesInfo, planes: list[Plane], warnings: list[str]) -> Volume:
    """Place the planes on the file grid, fill one display-order array and attach the geometry."""
    label = info.label()
    file_axes = file_direction(info)
    normal = file_axes[:, 2]
    stack_index, n_grid, slice_spacing, grid_warnings = slice_grid(planes, normal, label)
    warnings.extend(grid_warnings)
    rows, cols = int(info.rows or 0), int(info.columns or 0)
    spacings = {tuple(float(v) for v in np.round(p.spacing, 4)) for p in planes}
    if len(spacings) > 1:
        raise DicomSeriesError(
            f"Series {label} mixes pixel spacings {sorted(spacings)} mm; it is not one volume."
        )
    row_spacing, col_spacing = planes[0].spacing
    file_shape = (cols, rows, n_grid)
    file_spacing = np.array([col_spacing, row_spacing, slice_spacing])
    grid = display_grid(file_shape, file_spacing, planes[0].position, file_axes)
    axes, spacing, origin, direction = grid.axes, grid.spacing_mm, grid.origin_mm, grid.direction

    integral = all(p.slope == int(p.slope) and p.intercept == int(p.intercept) for p in planes)
    array = np.empty(grid.shape, dtype=np.int16 if integral else np.float32)  # the one big allocation
    grid = axes.to_file(array)  # a view: writing stack plane k fills the display array in place
    datasets: list[Dataset | None] = [None] * n_grid
    frames: list[int | None] = [None] * n_grid
    names: list[str] = [""] * n_grid
    filled_min: float | None = None
    groups: dict[Path, list[Plane]] = {}
    for plane in planes:
        groups.setdefault(plane.path, []).append(plane)
    where = {id(p): k for p, k in zip(planes, stack_index)}
    for group in groups.values():
        for plane, pixels in _decode(group):
            if pixels.shape != (rows, cols):
                raise NotAVolumeError(
                    f"{plane.path.name} decodes to shape {pixels.shape}, not ({rows}, {cols}); it is not a "
                    "greyscale slice."
                )
            values = _values(pixels, plane)
            k = where[id(plane)]
            height = float(plane.position @ normal)
            if datasets[k] is not None:
                if not np.array_equal(grid[:, :, k].T, values):
                    raise DicomSeriesError(
                        f"Series {label} holds two different images at the same position ({height:.3f} mm "
                        f"along the slice normal): {names[k]} and {_frame_name(plane)}. It mixes "
                        "acquisitions (e.g. phases, echoes or repeats); split the series before opening it."
                    )
                warnings.append(
                    f"{_frame_name(plane)} duplicates the image at {height:.3f} mm along the slice normal "
                    f"({names[k]}); it was skipped."
                )
                continue
            if array.dtype == np.int16 and not _fits_int16(values):
                array = array.astype(np.float32)  # rare: values beyond int16, so one re-allocation
                grid = axes.to_file(array)
            grid[:, :, k] = values.T
            datasets[k], names[k] = plane.header, _frame_name(plane)
            frames[k] = None if plane.frame is None else plane.frame + 1
            low = float(values.min())
            filled_min = low if filled_min is None else min(filled_min, low)

    slice_axis = axes.file_axis.index(2)
    flipped = axes.flipped[slice_axis]
    missing = [k for k in range(n_grid) if datasets[k] is None]
    blank = filled_min if filled_min is not None else 0.0
    for k in missing:
        grid[:, :, k] = blank
    display_missing = sorted((n_grid - 1 - k) if flipped else k for k in missing)
    if missing:
        warnings.append(
            f"Series {label} misses {len(missing)} slice(s); blank slices (value {blank:g}) were inserted at "
            f"display index {display_missing} along display axis {slice_axis} so that every slice keeps its "
            "true position."
        )

    first = planes[0].header
    modality = str(first.get("Modality", "") or "OT")
    rescale_type = str(first.get("RescaleType", "") or "").strip()
    unit = "HU" if modality == "CT" else ("" if rescale_type in ("", "US") else rescale_type)
    if modality == "RTDOSE":
        unit = str(first.get("DoseUnits", "") or "").strip()
    metadata = {
        "series_uid": info.series_uid,
        "series_key": info.key,
        "study_uid": str(first.get("StudyInstanceUID", "")),
        "frame_of_reference_uid": str(first.get("FrameOfReferenceUID", "")),
        "n_instances": len(info.files),
        "n_frames": len(planes),
        "series_description": info.description,
        "window": _window(first),
        "warnings": warnings,
        "missing_slices": display_missing,
        "dicom_slice_axis_display": slice_axis,
        "dicom_slice_axis_flipped": bool(flipped),
        "transfer_syntax": str(_transfer_syntax(first)),
    }
    if info.multiframe or any(p.frame is not None for p in planes):
        metadata["dicom_frame_numbers"] = frames
    return Volume(
        array=array, spacing_mm=spacing, origin_mm=origin, direction=direction, modality=modality,
        intensity_unit=unit, source_format="dicom", axes=axes, file_axis_names=("column", "row", "slice"),
        dicom_datasets=datasets, metadata=metadata,
    )


def _frame_name(plane: Plane) -> str:
    return plane.path.name if plane.frame is None else f"{plane.path.name} frame {plane.frame + 1}"


def _has_meta_syntax(header: Dataset) -> bool:
    meta = getattr(header, "file_meta", None)
    return meta is not None and bool(str(meta.get("TransferSyntaxUID", "") or ""))


def _transfer_syntax(header: Dataset) -> UID:
    """The file's transfer syntax; for a bare stream without file meta, the encoding pydicom found."""
    if _has_meta_syntax(header):
        return UID(str(header.file_meta.TransferSyntaxUID))
    implicit, little = getattr(header, "original_encoding", (None, None))
    if implicit is None:
        return UID("")
    if implicit:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def _decode_without_meta(plane_group: list[Plane], syntax: UID) -> Iterator[tuple[Plane, np.ndarray]]:
    """Pixels of a file without file meta (read forced): pydicom needs the syntax it was parsed with."""
    data = pydicom.dcmread(plane_group[0].path, force=True)
    data.file_meta = FileMetaDataset()
    data.file_meta.TransferSyntaxUID = syntax
    pixels = data.pixel_array
    for plane in plane_group:
        yield plane, pixels if plane.frame is None else pixels[plane.frame]


def _first(value: object) -> object:
    return value[0] if isinstance(value, (MultiValue, list, tuple)) and len(value) else value


def _window(header: Dataset) -> tuple[float, float] | None:
    """(center, width) of the first VOI window, from the top level or the shared functional groups."""
    center, width = header.get("WindowCenter"), header.get("WindowWidth")
    if (center is None or width is None) and "SharedFunctionalGroupsSequence" in header:
        center = functional_group_value(header, 0, "FrameVOILUTSequence", "WindowCenter")
        width = functional_group_value(header, 0, "FrameVOILUTSequence", "WindowWidth")
    try:
        if center in (None, "") or width in (None, ""):
            return None
        return float(_first(center)), float(_first(width))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
