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
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from ...errors import DicomSeriesError, NotAVolumeError
from ...volume import Volume, display_grid
from .._text import index_ranges, short_path
from .choose import choose_series
from .decode import decode_planes, fits_int16, modality_values, transfer_syntax
from .planes import Plane, collect_planes, file_direction, slice_grid
from .scan import DicomScanResult, DicomSeriesInfo, functional_group_value, scan_dicom

__all__ = [
    "read_dicom_series", "choose_series", "scan_dicom", "stack_plane", "DicomSeriesInfo", "DicomScanResult"
]


def read_dicom_series(path: str | os.PathLike, series_uid: str | None = None) -> Volume:
    """Read the DICOM series of a folder (the largest, unless ``series_uid`` picks) or of one file."""
    target = Path(path).expanduser()
    if not target.exists():
        raise DicomSeriesError(f"{short_path(target)} does not exist. Check the path.")
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


def stack_plane(volume: Volume, display_array: np.ndarray, k: int) -> np.ndarray:
    """The (rows, columns) image of stack plane ``k`` (``volume.dicom_datasets[k]``) of a display array."""
    return volume.axes.to_file(display_array)[:, :, k].T


def _common_folder(files: list[Path], root: Path) -> Path:
    parents = {f.parent for f in files}
    return parents.pop() if len(parents) == 1 else root


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
    duplicates: list[tuple[str, str, float]] = []  # (skipped image, the one kept, mm along the normal)
    for group in groups.values():
        for plane, pixels in decode_planes(group):
            if pixels.shape != (rows, cols):
                raise NotAVolumeError(
                    f"{plane.path.name} decodes to shape {pixels.shape}, not ({rows}, {cols}); it is not a "
                    "greyscale slice."
                )
            values = modality_values(pixels, plane)
            k = where[id(plane)]
            height = float(plane.position @ normal)
            if datasets[k] is not None:
                if not np.array_equal(grid[:, :, k].T, values):
                    raise DicomSeriesError(
                        f"Series {label} holds two different images at the same position ({height:.3f} mm "
                        f"along the slice normal): {names[k]} and {_frame_name(plane)}. It mixes "
                        "acquisitions (e.g. phases, echoes or repeats); split the series before opening it."
                    )
                duplicates.append((_frame_name(plane), names[k], height))
                continue
            if array.dtype == np.int16 and not fits_int16(values):
                array = array.astype(np.float32)  # rare: values beyond int16, so one re-allocation
                grid = axes.to_file(array)
            grid[:, :, k] = values.T
            datasets[k], names[k] = plane.header, _frame_name(plane)
            frames[k] = None if plane.frame is None else plane.frame + 1
            low = float(values.min())
            filled_min = low if filled_min is None else min(filled_min, low)

    if len(duplicates) == 1:
        skipped, kept, height = duplicates[0]
        warnings.append(f"{skipped} duplicates the image at {height:.3f} mm along the slice normal ({kept}); "
                        "it was skipped.")
    elif duplicates:  # one line for all, however many (a series copied twice into one folder)
        warnings.append(f"{len(duplicates)} images duplicate others at the same position with the same pixels "
                        f"(first: {duplicates[0][0]} = {duplicates[0][1]}); they were skipped.")
    slice_axis = axes.file_axis.index(2)
    flipped = axes.flipped[slice_axis]
    missing = [k for k in range(n_grid) if datasets[k] is None]
    blank = filled_min if filled_min is not None else 0.0
    for k in missing:
        grid[:, :, k] = blank
    display_missing = sorted((n_grid - 1 - k) if flipped else k for k in missing)
    if missing:
        warnings.append(
            f"Series {label} misses {len(missing)} slice(s): display slice(s) {index_ranges(display_missing)} of "
            f"axis {slice_axis} are blank (value {blank:g}), so every slice keeps its true position."
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
        "transfer_syntax": str(transfer_syntax(first)),
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
