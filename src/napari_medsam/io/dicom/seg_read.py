"""Reading DICOM-SEG files: segment descriptions, frames and their placement on a grid.

Entry points: :func:`read_dicom_seg` and :func:`load_dicom_seg_volume`. Frames are painted in ascending
segment number, so where BINARY segments overlap the higher segment number wins.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.multival import MultiValue

from ...errors import LabelsMismatchError, VolumeReadError
from ...volume import Volume, display_grid
from .._text import short_path, short_text
from ..segments import Code, Segment, default_segment, palette_color
from .scan import functional_group_value
from .seg_geometry import SEG_SOP_CLASSES, Plane, dataset_planes, fit_plane, plane_from_values

_POSITION_TOLERANCE_MM = 1e-2


@dataclass
class _Frame:
    index: int
    segment: int | None  # None for LABELMAP frames (pixel value = segment number)
    references: list[tuple[str, int | None]]
    plane: Plane | None


@dataclass
class SegFile:
    """A parsed DICOM-SEG: its segments, frames and (lazily decoded) pixels."""

    path: Path
    dataset: object
    segmentation_type: str
    segments: list[Segment]
    frames: list[_Frame]
    _pixels: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "SegFile":
        """Read and check the header of a DICOM-SEG (VolumeReadError when it is not one)."""
        import pydicom
        from pydicom.errors import InvalidDicomError

        path = Path(path).expanduser()
        try:
            ds = pydicom.dcmread(path)
        except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, KeyError) as exc:
            raise VolumeReadError(
                f"Cannot read {short_path(path)} as DICOM: {short_text(str(exc), 80)}. Is it a DICOM-SEG file?"
            ) from exc
        sop_class = str(ds.get("SOPClassUID", ""))
        if sop_class not in SEG_SOP_CLASSES:
            raise VolumeReadError(
                f"{path.name} is not a DICOM segmentation (its SOP class is {sop_class or 'missing'}, "
                f"modality {ds.get('Modality', '?')}). Open it as an image instead."
            )
        try:
            seg_type = str(ds.SegmentationType).upper()
            segments = _segments(ds, seg_type)
            frames = _frames(ds, seg_type)
        except (AttributeError, KeyError, IndexError, TypeError, ValueError, OSError, EOFError) as exc:
            # pydicom parses sequences lazily, so a truncated file may only fail here.
            raise VolumeReadError(f"{path.name} is a damaged DICOM-SEG: {short_text(str(exc), 100)}.") from exc
        return cls(path, ds, seg_type, segments, frames)

    def pixels(self) -> np.ndarray:
        """All frames as (frames, rows, columns) segment masks or label values."""
        if self._pixels is None:
            try:
                data = np.asarray(self.dataset.pixel_array)  # type: ignore[attr-defined]
            except Exception as exc:  # pydicom raises many types for bad or truncated pixel data
                raise VolumeReadError(
                    f"Cannot decode the pixel data of {self.path.name}: {short_text(str(exc), 100)}."
                ) from exc
            self._pixels = data.reshape(len(self.frames), *data.shape[-2:])
        return self._pixels

    def _values(self, frame: _Frame) -> np.ndarray:
        pixels = self.pixels()[frame.index]
        if frame.segment is None:
            return pixels
        if self.segmentation_type == "FRACTIONAL":
            limit = float(self.dataset.get("MaximumFractionalValue", 255))  # type: ignore[attr-defined]
            mask = pixels >= limit / 2.0
        else:
            mask = pixels > 0
        return np.where(mask, frame.segment, 0)

    def _dtype(self) -> type:
        numbers = [s.label for s in self.segments] + [f.segment or 0 for f in self.frames]
        high = max(numbers, default=0)
        if self.segmentation_type == "LABELMAP" and self.frames:
            high = max(high, int(self.pixels().max()))
        return np.uint8 if high <= 255 else np.uint16

    def _paint(self, out: np.ndarray, grid: Volume, placed: list[tuple[_Frame, Plane]]) -> np.ndarray:
        # Ascending segment number: the higher number wins where BINARY segments overlap.
        for frame, plane in sorted(placed, key=lambda item: item[0].segment or 0):
            fit = fit_plane(plane, grid)
            if fit is None:
                raise LabelsMismatchError(
                    f"Frame {frame.index + 1} of {self.path.name} does not lie on the image grid: "
                    "the segmentation was made on another image. Open it with its own series."
                )
            values = self._values(frame)
            out[fit.index] = np.where(values != 0, values, out[fit.index])
        return out

    def labels_on(self, like: Volume) -> np.ndarray:
        """The label array on ``like``'s display grid (LabelsMismatchError if it does not fit)."""
        sources: dict[tuple[str, int | None], Plane] = {}
        frame_of_reference = ""
        for ds in like.dicom_datasets or []:
            if ds is None:
                continue
            frame_of_reference = frame_of_reference or str(ds.get("FrameOfReferenceUID", ""))
            try:
                for plane in dataset_planes(ds):
                    sources[(plane.sop_instance_uid, plane.frame_number)] = plane
            except ValueError:
                continue
        seg_frame_of_reference = str(self.dataset.get("FrameOfReferenceUID", ""))  # type: ignore[attr-defined]
        placed = []
        for frame in self.frames:
            plane = _referenced_plane(frame, sources, self.pixels().shape[1:])
            if plane is None:
                if frame.plane is None or (
                    frame_of_reference and seg_frame_of_reference and frame_of_reference != seg_frame_of_reference
                ):
                    raise LabelsMismatchError(
                        f"{self.path.name} does not belong to this image: its frames reference other "
                        "images and it has another frame of reference. Open the series it was made on."
                    )
                plane = frame.plane
            placed.append((frame, plane))
        return self._paint(np.zeros(like.shape, dtype=self._dtype()), like, placed)

    def to_volume(self) -> Volume:
        """A labels Volume on the SEG's own grid, reoriented for display like any image."""
        if not self.frames:
            raise VolumeReadError(f"{self.path.name} holds no frames: the segmentation is empty.")
        if any(f.plane is None for f in self.frames):
            raise VolumeReadError(
                f"{self.path.name} has no plane positions, so it can only be opened on top of its source series."
            )
        planes = [f.plane for f in self.frames]
        grid = _grid_for(planes, self.dataset, self.path)  # type: ignore[arg-type]
        array = self._paint(np.zeros(grid.shape, dtype=self._dtype()), grid, list(zip(self.frames, planes)))
        ds = self.dataset
        get = ds.get  # type: ignore[attr-defined]
        metadata = {
            "segmentation_type": self.segmentation_type,
            "series_description": str(get("SeriesDescription", "")),
            "frame_of_reference_uid": str(get("FrameOfReferenceUID", "")),
            "referenced_series_uids": [str(item.SeriesInstanceUID) for item in get("ReferencedSeriesSequence", [])],
        }
        return grid.with_array(array, metadata=metadata)


def _referenced_plane(frame: _Frame, sources: dict, frame_shape: tuple[int, ...]) -> Plane | None:
    for uid, number in frame.references:
        plane = sources.get((uid, number)) or (sources.get((uid, None)) if number in (None, 1) else None)
        if plane is not None and (plane.rows, plane.columns) == tuple(frame_shape):
            return plane
    return None


def _code(item, fallback: Code) -> Code:
    if item is None:
        return fallback
    value = item.get("CodeValue") or item.get("LongCodeValue") or item.get("URNCodeValue")
    if not value:
        return fallback
    return Code(str(value), str(item.get("CodingSchemeDesignator", "")), str(item.get("CodeMeaning", "")))


def _first(sequence):
    return sequence[0] if sequence else None


def _segments(ds, seg_type: str) -> list[Segment]:
    from highdicom.color import CIELabColor

    out = []
    for item in ds.SegmentSequence:
        number = int(item.SegmentNumber)
        if number == 0:  # LABELMAP background
            continue
        name = str(item.get("SegmentLabel", "") or f"Segment {number}")
        guess = default_segment(number, name)
        lab = item.get("RecommendedDisplayCIELabValue")
        if lab:
            color = tuple(CIELabColor.from_dicom_value(tuple(int(v) for v in lab)).to_rgb())
        else:
            color = palette_color(number)
        type_item = _first(item.get("SegmentedPropertyTypeCodeSequence"))
        modifier_item = _first(type_item.get("SegmentedPropertyTypeModifierCodeSequence")) if type_item else None
        out.append(
            Segment(
                number, name, color,  # type: ignore[arg-type]
                _code(_first(item.get("SegmentedPropertyCategoryCodeSequence")), guess.category),
                _code(type_item, guess.type),
                _code(modifier_item, guess.type_modifier) if modifier_item is not None else (
                    guess.type_modifier if type_item is None else None
                ),
            )
        )
    return sorted(out, key=lambda s: s.label)


def _first_int(value) -> int | None:
    if isinstance(value, (list, tuple, MultiValue)):
        value = value[0] if len(value) else None
    return None if value is None or value == "" else int(value)


def _frames(ds, seg_type: str) -> list[_Frame]:
    n = int(ds.get("NumberOfFrames", 1) or 1)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    frames = []
    for f in range(n):
        segment = None
        if seg_type != "LABELMAP":
            segment = int(functional_group_value(ds, f, "SegmentIdentificationSequence", "ReferencedSegmentNumber"))
        references = []
        item = per_frame[f] if f < len(per_frame) else None
        for derivation in (item.get("DerivationImageSequence", []) if item is not None else []):
            for source in derivation.get("SourceImageSequence", []):
                number = _first_int(source.get("ReferencedFrameNumber"))
                references.append((str(source.ReferencedSOPInstanceUID), number))
        position = functional_group_value(ds, f, "PlanePositionSequence", "ImagePositionPatient")
        orientation = functional_group_value(ds, f, "PlaneOrientationSequence", "ImageOrientationPatient")
        spacing = functional_group_value(ds, f, "PixelMeasuresSequence", "PixelSpacing")
        plane = None
        if position is not None and orientation is not None and spacing is not None:
            plane = plane_from_values(position, orientation, spacing, ds.Rows, ds.Columns)
        frames.append(_Frame(f, segment, references, plane))
    return frames


def _grid_for(planes: list[Plane], ds, path: Path) -> Volume:
    """The smallest regular grid holding every frame (slices only where the SEG has frames)."""
    first = planes[0]
    for plane in planes:
        if (
            np.abs(plane.row_cosine - first.row_cosine).max() > 1e-4
            or np.abs(plane.column_cosine - first.column_cosine).max() > 1e-4
            or not np.allclose(plane.pixel_spacing, first.pixel_spacing, rtol=1e-4)
        ):
            raise VolumeReadError(f"{path.name} mixes frames of different orientation or pixel size.")
    normal = np.cross(first.row_cosine, first.column_cosine)
    along = np.array([p.origin @ normal for p in planes])
    in_plane = np.array([[p.origin @ first.row_cosine, p.origin @ first.column_cosine] for p in planes])
    if np.abs(in_plane - in_plane[0]).max() > _POSITION_TOLERANCE_MM * 10:
        raise VolumeReadError(f"{path.name}: frames are shifted within their plane; not a regular 3D grid.")
    ordered = np.sort(along)
    positions = ordered[np.concatenate([[True], np.diff(ordered) > _POSITION_TOLERANCE_MM])]
    spacing = functional_group_value(ds, 0, "PixelMeasuresSequence", "SpacingBetweenSlices")
    step = float(spacing) if spacing else (float(np.diff(positions).min()) if len(positions) > 1 else 0.0)
    if step <= 0:
        thickness = functional_group_value(ds, 0, "PixelMeasuresSequence", "SliceThickness")
        step = float(thickness) if thickness and float(thickness) > 0 else 1.0
    k = (positions - positions[0]) / step
    if np.abs(k - np.rint(k)).max() > 0.1:
        raise VolumeReadError(f"{path.name}: frame positions are not evenly spaced; cannot build a 3D grid.")
    # The same file grid as read_dicom_series: axes (column, row, slice).
    file_shape = (first.columns, first.rows, int(np.rint(k[-1])) + 1)
    file_direction = np.column_stack([first.row_cosine, first.column_cosine, normal])
    file_spacing = np.array([first.pixel_spacing[1], first.pixel_spacing[0], step])
    origin = first.origin + (positions[0] - along[0]) * normal
    grid = display_grid(file_shape, file_spacing, origin, file_direction)
    return Volume(
        np.zeros(grid.shape, dtype=np.uint8), grid.spacing_mm, grid.origin_mm, grid.direction, modality="SEG",
        source_format="dicom-seg", source_path=path, axes=grid.axes, file_axis_names=("column", "row", "slice"),
    )


def read_dicom_seg(path: str | os.PathLike, like: Volume | None = None) -> tuple[np.ndarray, list[Segment]]:
    """Label array (display order) and segments of a DICOM-SEG, on ``like``'s grid when given.

    Frames are placed by their referenced SOP Instance UIDs; frames whose references are not in
    ``like`` are placed by their plane position instead (a SEG made by another tool in the same
    frame of reference). Overlapping BINARY segments: the higher segment number wins. Without
    ``like`` the grid is the SEG's own (see :func:`load_dicom_seg_volume`).
    """
    seg = SegFile.open(path)
    if like is None:
        volume = seg.to_volume()
        return volume.array, seg.segments
    return seg.labels_on(like), seg.segments


def load_dicom_seg_volume(path: str | os.PathLike) -> tuple[Volume, list[Segment]]:
    """A labels Volume on the SEG's own grid (display orientation) and its segments."""
    seg = SegFile.open(path)
    return seg.to_volume(), seg.segments
