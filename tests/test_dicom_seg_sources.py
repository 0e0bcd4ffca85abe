"""DICOM-SEG export from the kinds of source series real data brings (issue 9).

Sources are pydicom's shipped CT series (``dicomdirtests/98892001``, real files from another tool)
and series written by the test factory, each edited to carry one defect found in real data:
anonymised UIDs kept only in the file meta, an empty SpecificCharacterSet, per-frame functional
groups in an enhanced image, files of one series with different study UIDs. Every SEG written
here must pass dciodvfy without errors and read back onto the same voxels, with the same
segment names, both with our reader and with highdicom's.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_factory import edit, make_volume, move_shared_groups_per_frame, phantom, write_enhanced_ct, write_series
from dicom_validation import DCIODVFY, dciodvfy_report

from napari_medsam.errors import LabelsWriteError
from napari_medsam.io.dicom import dataset_planes, fit_plane, read_dicom_seg, source_uid, write_dicom_seg
from napari_medsam.io.dicom.series import read_dicom_series
from napari_medsam.io.segments import default_segment
from napari_medsam.volume import Volume

SEG_TYPES = ["binary", "labelmap"]
SHAPE = (6, 24, 28)
NAMES = ("liver", "left kidney", "tumour")


def pydicom_ct_series() -> Path:
    """A real five-image axial CT series shipped with pydicom (16 x 16 pixels, ISO_IR 100)."""
    from pydicom.data import get_testdata_file

    folder = Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests" / "98892001" / "CT5N"
    if not folder.is_dir():
        pytest.skip("pydicom's dicomdirtests CT series is not installed")
    return folder


def copy_real_series(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "real"
    shutil.copytree(pydicom_ct_series(), folder)
    return sorted(p for p in folder.rglob("*") if p.is_file())


def factory_series(tmp_path: Path) -> list[Path]:
    return write_series(tmp_path / "series", make_volume(phantom(SHAPE)))


def labels_for(like: Volume) -> np.ndarray:
    """Three labelled regions on different display slices, values 1..3 (no renumbering in BINARY)."""
    s, r, c = like.shape
    labels = np.zeros(like.shape, np.uint8)
    labels[0 : max(1, s // 2), r // 4 : r // 2, c // 4 : c // 2] = 1
    labels[s // 2, r // 2 : r - 1, c // 2 : c - 1] = 2
    labels[s - 1, 1 : r // 3, c - c // 3 : c - 1] = 3
    return labels


def assert_valid_seg(path: Path, like: Volume, labels: np.ndarray) -> None:
    """dciodvfy finds no error; our reader and highdicom both give back ``labels`` and the names."""
    import highdicom as hd

    if DCIODVFY is not None:
        errors, _ = dciodvfy_report(path)
        assert errors == [], errors
    back, segments = read_dicom_seg(path, like)
    np.testing.assert_array_equal(back, labels)
    assert [s.name for s in segments] == list(NAMES)

    seg = hd.seg.segread(path)
    assert [seg.get_segment_description(n).SegmentLabel for n in seg.segment_numbers] == list(NAMES)
    for ds in {id(d): d for d in like.dicom_datasets if d is not None}.values():
        uid = source_uid(ds)
        for plane in dataset_planes(ds):
            fit = fit_plane(plane, like)
            assert fit is not None
            expected = labels[fit.index]
            if plane.frame_number is None:
                got = seg.get_pixels_by_source_instance([uid], combine_segments=True, skip_overlap_checks=True,
                    assert_missing_frames_are_empty=True,
                )[0]
            else:
                got = seg.get_pixels_by_source_frame(
                    uid, [plane.frame_number], combine_segments=True, skip_overlap_checks=True,
                    assert_missing_frames_are_empty=True,
                )[0]
            np.testing.assert_array_equal(got, expected)


def write_checked(tmp_path: Path, like: Volume, seg_type: str, name: str = "seg.dcm") -> Path:
    labels = labels_for(like)
    segments = [default_segment(i + 1, n) for i, n in enumerate(NAMES)]
    path = write_dicom_seg(labels, like, tmp_path / name, segments, segmentation_type=seg_type)
    assert_valid_seg(path, like, labels)
    return path


# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seg_type", SEG_TYPES)
def test_real_pydicom_ct_series(tmp_path, seg_type):
    like = read_dicom_series(pydicom_ct_series())
    path = write_checked(tmp_path, like, seg_type)
    assert pydicom.dcmread(path).SegmentationType == seg_type.upper()


def test_default_encoding_is_binary(tmp_path):
    like = read_dicom_series(factory_series(tmp_path)[0].parent)
    path = write_dicom_seg(labels_for(like), like, tmp_path / "seg.dcm")
    ds = pydicom.dcmread(path)
    assert ds.SegmentationType == "BINARY" and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"


def _anonymise(ds: pydicom.Dataset, _index: int) -> None:
    ds.SOPInstanceUID = ""
    ds.SOPClassUID = ""


@pytest.mark.parametrize("seg_type", SEG_TYPES)
@pytest.mark.parametrize("source", ["real", "factory"])
def test_sop_uids_only_in_file_meta(tmp_path, seg_type, source):
    files = copy_real_series(tmp_path) if source == "real" else factory_series(tmp_path)
    meta_uids = {str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID) for f in files}
    edit(files, _anonymise)
    assert pydicom.dcmread(files[0], stop_before_pixels=True).SOPInstanceUID == ""
    like = read_dicom_series(files[0].parent)
    path = write_checked(tmp_path, like, seg_type)
    ds = pydicom.dcmread(path)
    referenced = {str(i.ReferencedSOPInstanceUID) for i in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced and referenced <= meta_uids
    classes = {str(i.ReferencedSOPClassUID) for i in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert classes == {str(pydicom.dcmread(files[0], stop_before_pixels=True).file_meta.MediaStorageSOPClassUID)}


def test_sop_uid_missing_everywhere_is_a_clear_error(tmp_path):
    files = factory_series(tmp_path)

    for path in files:  # pydicom's own writer refuses this, so save without its checks
        ds = pydicom.dcmread(path)
        _anonymise(ds, 0)
        ds.file_meta.MediaStorageSOPInstanceUID = ""
        ds.save_as(path, enforce_file_format=False)
    like = read_dicom_series(files[0].parent)
    with pytest.raises(LabelsWriteError, match="no SOPInstanceUID"):
        write_dicom_seg(labels_for(like), like, tmp_path / "seg.dcm")


@pytest.mark.parametrize("seg_type", SEG_TYPES)
def test_empty_study_and_series_uids_get_new_ones_with_a_warning(tmp_path, seg_type):
    files = copy_real_series(tmp_path)

    def blank(ds, index):
        _anonymise(ds, index)
        ds.StudyInstanceUID = ""
        ds.SeriesInstanceUID = ""

    edit(files, blank)
    like = read_dicom_series(files[0].parent)
    with pytest.warns(UserWarning) as caught:
        path = write_checked(tmp_path, like, seg_type)
    messages = " ".join(str(w.message) for w in caught)
    assert "StudyInstanceUID" in messages and "SeriesInstanceUID" in messages
    ds = pydicom.dcmread(path)
    assert ds.StudyInstanceUID and ds.ReferencedSeriesSequence[0].SeriesInstanceUID
    assert ds.SeriesInstanceUID != ds.ReferencedSeriesSequence[0].SeriesInstanceUID
    # The source headers of the open volume are left as they were.
    assert all(str(d.get("StudyInstanceUID", "")) == "" for d in like.dicom_datasets if d is not None)


def test_complete_uids_give_no_warning(tmp_path):
    like = read_dicom_series(pydicom_ct_series())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        write_dicom_seg(labels_for(like), like, tmp_path / "seg.dcm")


@pytest.mark.parametrize("seg_type", SEG_TYPES)
def test_empty_specific_character_set(tmp_path, seg_type):
    files = copy_real_series(tmp_path)

    def empty_charset(ds, _index):
        ds.SpecificCharacterSet = ""

    edit(files, empty_charset)
    like = read_dicom_series(files[0].parent)
    assert like.dicom_datasets[0].SpecificCharacterSet == ""
    path = write_checked(tmp_path, like, seg_type)
    assert pydicom.dcmread(path).get("SpecificCharacterSet", "ISO_IR 6") in ("", "ISO_IR 6")


@pytest.mark.parametrize("seg_type", SEG_TYPES)
@pytest.mark.parametrize(
    "per_frame", [(), ("PixelMeasuresSequence",), ("PixelMeasuresSequence", "PlaneOrientationSequence")],
    ids=["shared", "measures-per-frame", "measures-and-orientation-per-frame"],
)
def test_enhanced_source_functional_groups(tmp_path, seg_type, per_frame):
    path = write_enhanced_ct(tmp_path / "enhanced.dcm", make_volume(phantom(SHAPE)), frame_order=[2, 0, 1, 5, 3, 4])
    if per_frame:
        move_shared_groups_per_frame(path, per_frame)
        shared = pydicom.dcmread(path, stop_before_pixels=True).SharedFunctionalGroupsSequence[0]
        assert all(k not in shared for k in per_frame)
    like = read_dicom_series(path)
    write_checked(tmp_path, like, seg_type)


def test_enhanced_source_with_varying_pixel_spacing_is_refused(tmp_path):
    path = write_enhanced_ct(tmp_path / "enhanced.dcm", make_volume(phantom(SHAPE)))
    move_shared_groups_per_frame(path)
    like = read_dicom_series(path)
    ds = like.dicom_datasets[0]
    item = ds.PerFrameFunctionalGroupsSequence[1].PixelMeasuresSequence[0]
    item.PixelSpacing = [float(v) * 2 for v in item.PixelSpacing]
    with pytest.raises(LabelsWriteError, match="differ in pixel spacing"):
        write_dicom_seg(labels_for(like), like, tmp_path / "seg.dcm")


def _rt_dose(tmp_path: Path, offsets: str) -> Path:
    """pydicom's RT Dose grid (15 frames of 10 x 10) with valid UIDs; GridFrameOffsetVector either
    relative to ImagePositionPatient (as shipped) or absolute z values in descending order."""
    from pydicom.data import get_testdata_file

    path = tmp_path / "dose" / "rtdose.dcm"
    path.parent.mkdir()
    shutil.copy(get_testdata_file("rtdose.dcm"), path)

    def change(ds: pydicom.Dataset, _index: int) -> None:
        # The shipped UIDs have roots dciodvfy rejects (the conformance test documents that).
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
            setattr(ds, keyword, pydicom.uid.generate_uid())
        if offsets == "absolute":
            relative = [float(v) for v in ds.GridFrameOffsetVector]
            z = float(ds.ImagePositionPatient[2]) + max(relative) - np.asarray(relative)
            ds.GridFrameOffsetVector = [float(v) for v in z]
            ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(z[0])]

    edit([path], change)
    return path


@pytest.mark.parametrize("seg_type", SEG_TYPES)
@pytest.mark.parametrize("offsets", ["relative", "absolute"])
def test_rt_dose_grid_source(tmp_path, seg_type, offsets):
    """A SEG of an RT Dose references each labelled frame by number, at the frame's own position."""
    from napari_medsam.io.dicom.dose import dose_frame_positions

    path = _rt_dose(tmp_path, offsets)
    like = read_dicom_series(path)
    source = like.dicom_datasets[0]
    positions = dose_frame_positions(source)
    z = np.asarray([float(v) for v in source.GridFrameOffsetVector])
    np.testing.assert_allclose(positions[:, 2], z if offsets == "absolute" else z + positions[0, 2])
    # The reader and the SEG geometry place every frame on the same display slice.
    planes = dataset_planes(source)
    assert [p.frame_number for p in planes] == list(range(1, 16))
    np.testing.assert_allclose([p.origin for p in planes], positions)
    seg_path = write_checked(tmp_path, like, seg_type)  # dciodvfy 0 errors; frames read back by number
    seg = pydicom.dcmread(seg_path)
    uid = str(source.SOPInstanceUID)
    for item in seg.PerFrameFunctionalGroupsSequence:
        reference = item.DerivationImageSequence[0].SourceImageSequence[0]
        assert str(reference.ReferencedSOPInstanceUID) == uid
        frame = int(reference.ReferencedFrameNumber)
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(position, positions[frame - 1], atol=1e-4)


def _assert_names_the_inconsistency(tmp_path: Path, like: Volume, keyword: str) -> None:
    with pytest.raises(LabelsWriteError) as raised:
        write_dicom_seg(labels_for(like), like, tmp_path / "seg.dcm")
    message = str(raised.value)
    assert f"2 different {keyword}s" in message and "same series" not in message
    assert "\n" not in message and len(message) <= 220, message
    assert not (tmp_path / "seg.dcm").exists()


def test_files_of_one_series_with_different_study_uids(tmp_path):
    files = copy_real_series(tmp_path)
    other = pydicom.uid.generate_uid()

    def split(ds, index):
        if index % 2:
            ds.StudyInstanceUID = other

    edit(files, split)
    like = read_dicom_series(files[0].parent)
    assert like.shape[0] == len(files)  # the reader keeps them together as one stack
    _assert_names_the_inconsistency(tmp_path, like, "StudyInstanceUID")


@pytest.mark.parametrize("keyword", ["SeriesInstanceUID", "FrameOfReferenceUID"])
def test_headers_that_disagree_are_named(tmp_path, keyword):
    # The reader splits files by series and frame of reference; a Volume built otherwise
    # (e.g. by a plugin) may still mix them, and the writer says which attribute differs.
    like = read_dicom_series(pydicom_ct_series())
    setattr(like.dicom_datasets[1], keyword, pydicom.uid.generate_uid())
    _assert_names_the_inconsistency(tmp_path, like, keyword)


# --------------------------------------------------------------------------------------------
# Coded segment category and type from the name (expected codes from pydicom's code dictionary)

_NAMED = [
    # name, category, type, laterality (keywords of pydicom.sr.codedict.codes.SCT)
    ("liver", "AnatomicalStructure", "Liver", None),
    ("LIVERS", "AnatomicalStructure", "Liver", None),
    ("Spleen", "AnatomicalStructure", "Spleen", None),
    ("spleens", "AnatomicalStructure", "Spleen", None),
    ("kidney", "AnatomicalStructure", "Kidney", None),
    ("Left Kidneys", "AnatomicalStructure", "Kidney", "Left"),
    ("Kidney_R", "AnatomicalStructure", "Kidney", "Right"),
    ("rt kidney", "AnatomicalStructure", "Kidney", "Right"),
    ("aorta", "AnatomicalStructure", "Aorta", None),
    ("abdominal aorta", "AnatomicalStructure", "Aorta", None),
    ("lungs", "AnatomicalStructure", "Lung", None),
    ("Lungs left", "AnatomicalStructure", "Lung", "Left"),
    ("right-lung", "AnatomicalStructure", "Lung", "Right"),
    ("vertebra", "AnatomicalStructure", "Vertebra", None),
    ("Vertebrae", "AnatomicalStructure", "Vertebra", None),
    ("vertebral body", "AnatomicalStructure", "Vertebra", None),
    ("L1 vertebra", "AnatomicalStructure", "Vertebra", None),
    ("left adrenal gland", "AnatomicalStructure", "AdrenalGland", "Left"),
    ("ribs", "AnatomicalStructure", "Rib", None),
    ("tumour", "MorphologicallyAbnormalStructure", "Neoplasm", None),
    ("Tumors", "MorphologicallyAbnormalStructure", "Neoplasm", None),
    ("liver tumour", "MorphologicallyAbnormalStructure", "Neoplasm", None),
    ("renal carcinoma", "MorphologicallyAbnormalStructure", "Neoplasm", None),
    ("lesion", "MorphologicallyAbnormalStructure", "Lesion", None),
    ("Hepatic lesions", "MorphologicallyAbnormalStructure", "Lesion", None),
    ("mass", "MorphologicallyAbnormalStructure", "Mass", None),
    ("lung nodules", "MorphologicallyAbnormalStructure", "Nodule", None),
    ("kidney cyst", "MorphologicallyAbnormalStructure", "Cyst", None),
    ("thingamajig", "Tissue", "Tissue", None),
    ("left thingamajig", "Tissue", "Tissue", None),
    ("L", "Tissue", "Tissue", None),
]


@pytest.mark.parametrize("name, category, type_, side", _NAMED, ids=[n for n, *_ in _NAMED])
def test_segment_codes_from_names(name, category, type_, side):
    from pydicom.sr.codedict import codes

    segment = default_segment(1, name)
    assert segment.name == name
    for code, keyword in ((segment.category, category), (segment.type, type_)):
        expected = getattr(codes.SCT, keyword)
        assert (code.value, code.scheme_designator) == (expected.value, "SCT"), (name, code)
        assert code.meaning.lower() == expected.meaning.lower()
    if side is None:
        assert segment.type_modifier is None
    else:
        assert segment.type_modifier is not None and segment.type_modifier.value == getattr(codes.SCT, side).value


@pytest.mark.parametrize("seg_type", SEG_TYPES)
def test_coded_names_in_the_written_seg(tmp_path, seg_type):
    from pydicom.sr.codedict import codes

    like = read_dicom_series(pydicom_ct_series())
    path = write_checked(tmp_path, like, seg_type)
    ds = pydicom.dcmread(path)
    items = {int(i.SegmentNumber): i for i in ds.SegmentSequence}
    if seg_type == "labelmap":  # highdicom's background segment 0, which the Label Map IOD allows
        assert items.pop(0).SegmentLabel == "Background"
    assert sorted(items) == [1, 2, 3]
    types = [items[n].SegmentedPropertyTypeCodeSequence[0] for n in (1, 2, 3)]
    assert [t.CodeValue for t in types] == [codes.SCT.Liver.value, codes.SCT.Kidney.value, codes.SCT.Neoplasm.value]
    modifier = types[1].SegmentedPropertyTypeModifierCodeSequence[0]
    assert modifier.CodeValue == codes.SCT.Left.value
