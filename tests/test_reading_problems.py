"""Reading problems end in one short error line or in named warnings, never in a traceback or silence.

Built on real third-party files where they exist (pydicom's shipped test data: badVR.dcm,
rtdose.dcm, no_meta.dcm) and on series written by tests/dicom_factory.py where a defect has to
be made on purpose (a deleted, duplicated or resized slice).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from dicom_factory import edit, make_volume, phantom, write_series
from napari_medsam.cli import main
from napari_medsam.errors import DicomSeriesError, LabelsWriteError, VolumeReadError
from napari_medsam.io import load_volume, save_labels
from napari_medsam.io._common import file_affine_lps
from napari_medsam.io.nifti import write_nifti_volume
from napari_medsam.phantoms import make_ct_phantom, make_mr_phantom
from napari_medsam.volume import Volume


def _copy(name: str, folder) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    return str(shutil.copy(get_testdata_file(name), folder / name))


def _error_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


# --- malformed elements -------------------------------------------------------------------------


def test_bad_numeric_element_is_one_line_error(tmp_path, capsys):
    # badVR.dcm is pydicom's RT Dose with NumberOfFrames = "1A".
    assert str(pydicom.dcmread(get_testdata_file("badVR.dcm")).NumberOfFrames) == "1A"
    for path in (get_testdata_file("badVR.dcm"), _copy("badVR.dcm", tmp_path / "bad")):
        line = _error_line(capsys, ["info", path])
        assert line.startswith("napari-medsam info: error: badVR.dcm") and "NumberOfFrames" in line, line
        assert "'1A'" in line and len(line) <= 220
    with pytest.raises(DicomSeriesError, match="NumberOfFrames holds '1A'"):
        load_volume(tmp_path / "bad" / "badVR.dcm")


# --- gaps, duplicates, odd slices: read, but never silently --------------------------------------


@pytest.fixture
def series(tmp_path):
    ct = phantom((8, 20, 24))
    files = write_series(tmp_path / "series", make_volume(ct))
    return tmp_path / "series", files, ct


def _info(capsys, path) -> tuple[dict, list[str]]:
    assert main(["info", str(path)]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out), [line for line in captured.err.splitlines() if line.strip()]


def test_missing_slice_is_filled_and_reported(series, capsys, tmp_path):
    folder, files, ct = series
    files[3].unlink()
    volume = load_volume(folder)
    assert volume.shape == ct.shape and volume.metadata["missing_slices"] == [3]
    (warning,) = volume.metadata["warnings"]
    assert "misses 1 slice" in warning and "slice(s) 3 of axis" in warning
    np.testing.assert_array_equal(np.delete(volume.array, 3, axis=0), np.delete(ct, 3, axis=0))

    facts, err = _info(capsys, folder)
    assert facts["warnings"] == [warning]
    assert err == [f"napari-medsam info: warning: {warning}"]

    labels = tmp_path / "labels.nii.gz"
    save_labels(np.zeros(volume.shape, np.uint8), volume, labels)
    assert main(["export", str(labels), "--source", str(folder), "--out", str(tmp_path / "out.nii.gz")]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [f"napari-medsam export: warning: {warning}"]


def test_duplicate_position_is_skipped_and_reported(series, capsys):
    folder, files, ct = series
    copy = folder / "copy_of_slice_5.dcm"
    shutil.copy(files[5], copy)
    edit([copy], lambda ds, _: setattr(ds, "SOPInstanceUID", generate_uid()))
    volume = load_volume(folder)
    np.testing.assert_array_equal(volume.array, ct)
    (warning,) = volume.metadata["warnings"]
    assert "duplicates" in warning and "skipped" in warning
    assert {files[5].name, copy.name} <= set(warning.replace("(", " ").replace(")", " ").split())
    facts, err = _info(capsys, folder)
    assert facts["warnings"] == [warning] and err == [f"napari-medsam info: warning: {warning}"]


def test_a_series_copied_twice_gives_one_short_line(series, capsys):
    folder, files, ct = series
    for f in files:
        copy = folder / f"copy_{f.name}"
        shutil.copy(f, copy)
        edit([copy], lambda ds, _: setattr(ds, "SOPInstanceUID", generate_uid()))
    volume = load_volume(folder)
    np.testing.assert_array_equal(volume.array, ct)
    (warning,) = volume.metadata["warnings"]
    assert warning.startswith(f"{len(files)} images duplicate others") and "skipped" in warning
    assert len(warning) < 200
    _, err = _info(capsys, folder)
    assert len(err) == 1


def test_slice_of_another_size_is_left_out_and_reported(series, capsys):
    folder, files, ct = series

    def shrink(ds, _):
        pixels = ds.pixel_array[:-2]
        ds.Rows = pixels.shape[0]
        ds.PixelData = pixels.tobytes()

    edit([files[2]], shrink)
    volume = load_volume(folder)
    assert volume.shape == ct.shape and volume.metadata["missing_slices"] == [2]
    warnings = volume.metadata["warnings"]
    assert len(warnings) == 2
    assert any("another orientation or size" in w for w in warnings)
    assert any("misses 1 slice" in w and "slice(s) 2 of axis" in w for w in warnings)
    _, err = _info(capsys, folder)
    assert err == [f"napari-medsam info: warning: {w}" for w in warnings]


def test_napari_reader_notifies_gap_fill(series, monkeypatch):
    import napari.utils.notifications as notifications

    from napari_medsam._napari.reader import read_paths

    folder, files, _ = series
    files[4].unlink()
    shown: list[str] = []
    monkeypatch.setattr(notifications, "show_warning", shown.append)
    layers = read_paths(str(folder))
    assert len(layers) == 1
    assert len(shown) == 1 and "misses 1 slice" in shown[0] and "slice(s) 4 of axis" in shown[0]


def test_clean_series_prints_no_warning(series, capsys):
    facts, err = _info(capsys, series[0])
    assert facts["warnings"] == [] and err == []


# --- short lines: long paths and long index lists stay about 200 characters ----------------------

SHORT_LINE = 200
# A folder deep in a long path, as a PACS export or a cloud-drive mount makes them.
DEEP = [f"level_{k}_" + "patient_study_series_export" for k in range(8)]


def test_many_missing_slices_give_one_short_warning(tmp_path, capsys):
    """pydicom's real CT2 series: 4 images spread over 165 planes, so 161 planes are filled."""
    source = Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests" / "77654033" / "CT2"
    folder = tmp_path.joinpath(*DEEP) / "CT2"
    shutil.copytree(source, folder)
    volume = load_volume(folder)
    (warning,) = volume.metadata["warnings"]
    assert len(volume.metadata["missing_slices"]) == 161
    assert "misses 161 slice(s)" in warning and "(161 in all)" in warning
    assert len(warning) < SHORT_LINE and "\n" not in warning, warning
    _, err = _info(capsys, folder)
    assert err == [f"napari-medsam info: warning: {warning}"]


def test_scattered_missing_slices_are_ranges(series):
    folder, files, _ = series
    for k in (1, 2, 3, 5):
        files[k].unlink()
    (warning,) = load_volume(folder).metadata["warnings"]
    assert "slice(s) 1-3, 5 (4 in all) of axis 0" in warning, warning


def test_errors_deep_in_a_long_path_stay_short(tmp_path, capsys, series):
    deep = tmp_path.joinpath(*DEEP)
    deep.mkdir(parents=True)
    assert len(str(deep)) > 250
    not_dicom = deep / "notes_about_this_export.dcm"
    not_dicom.write_text("not an image")
    truncated = deep / "series" / "IM00003.dcm"
    truncated.parent.mkdir()
    truncated.write_bytes(series[1][3].read_bytes()[:400])
    cases = [
        (deep / "missing.nii.gz", "does not exist"),
        (not_dicom, "notes_about_this_export.dcm"),
        (truncated.parent, "IM00003.dcm"),
        (deep / "empty", "is empty"),
    ]
    (deep / "empty").mkdir()
    for path, expected in cases:
        with pytest.raises(VolumeReadError) as caught:
            load_volume(path)
        message = str(caught.value)
        assert expected in message and len(message) < SHORT_LINE, message
        line = _error_line(capsys, ["info", str(path)])
        assert len(line) < SHORT_LINE + len("napari-medsam info: error: "), line
    volume = load_volume(series[0])
    with pytest.raises(LabelsWriteError) as caught:
        save_labels(np.zeros(volume.shape, np.uint8), volume, deep / "no_such_folder" / "labels.nii.gz")
    message = str(caught.value)
    assert "labels.nii.gz" in message and "does not exist" in message and len(message) < SHORT_LINE, message


def test_short_text_helpers():
    from napari_medsam.io._text import index_ranges, short_path, short_uid

    assert index_ranges([*range(3, 41), 52, *range(60, 182)]) == "3-40, 52, 60-181 (161 in all)"
    assert index_ranges([4]) == "4" and index_ranges([1, 5]) == "1, 5"
    assert index_ranges(range(0, 100, 2)) == "0, 2, 4, 6, …, 98 (50 in all)"
    long = "/data/" + "/".join(DEEP) + "/series_3/IM0001.dcm"
    shown = short_path(long)
    assert len(shown) <= 64 and shown.startswith("/data") and shown.endswith("series_3/IM0001.dcm")
    uid = "1.2.826.0.1.3680043.8.498.12345678901234567890123456789012345678"
    assert len(short_uid(uid)) <= 28 and short_uid(uid).startswith("1.2.826.") and short_uid("1.2.3") == "1.2.3"


# --- RT Dose and files without a meta header ------------------------------------------------------


@pytest.mark.parametrize("name", ["rtdose.dcm", "rtdose_expb.dcm"])
def test_rt_dose_grid_is_read(tmp_path, name):
    path = _copy(name, tmp_path / "dose")
    ds = pydicom.dcmread(path)
    volume = load_volume(path)
    assert volume.modality == "RTDOSE" and volume.intensity_unit == str(ds.DoseUnits)
    # Every frame, read by pydicom and scaled by DoseGridScaling, sits at IPP + offset * normal.
    iop = np.array(ds.ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    offsets = np.array(ds.GridFrameOffsetVector, float)
    assert offsets[0] == 0
    affine = file_affine_lps(volume)
    file_array = volume.axes.to_file(volume.array)
    assert file_array.shape == (ds.Columns, ds.Rows, ds.NumberOfFrames)
    order = np.argsort(offsets)
    for k, frame in enumerate(order):
        expected = np.array(ds.ImagePositionPatient, float) + offsets[frame] * normal
        np.testing.assert_allclose(affine[:3] @ [0, 0, k, 1], expected, atol=1e-4)
        np.testing.assert_allclose(
            file_array[:, :, k].T, ds.pixel_array[frame] * float(ds.DoseGridScaling), rtol=1e-6
        )
    np.testing.assert_allclose(affine[:3, 0], iop[:3] * float(ds.PixelSpacing[1]), atol=1e-6)
    np.testing.assert_allclose(affine[:3, 1], iop[3:] * float(ds.PixelSpacing[0]), atol=1e-6)


def test_rt_dose_geometry_matches_simpleitk(tmp_path):
    import SimpleITK as sitk

    path = _copy("rtdose.dcm", tmp_path / "dose")
    image = sitk.ReadImage(path)
    volume = load_volume(path)
    affine = file_affine_lps(volume)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(affine[:3, :3], direction * np.array(image.GetSpacing()), atol=1e-6)
    np.testing.assert_allclose(affine[:3, 3], image.GetOrigin(), atol=1e-4)
    # SimpleITK leaves the stored values unscaled; the volume holds them times DoseGridScaling.
    stored = np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0))
    scale = float(pydicom.dcmread(path, stop_before_pixels=True).DoseGridScaling)
    np.testing.assert_allclose(volume.axes.to_file(volume.array), stored * scale, rtol=1e-6)


def test_data_set_without_meta_header_names_the_real_problem(tmp_path, capsys):
    path = _copy("no_meta.dcm", tmp_path / "nometa")
    assert len(pydicom.dcmread(path, force=True)) > 0  # pydicom reads it when forced
    line = _error_line(capsys, ["info", path])
    assert "no DICOM preamble or file meta header" in line and "no image" in line and len(line) <= 220
    truncated = _copy("no_meta_group_length.dcm", tmp_path / "short")
    line = _error_line(capsys, ["info", truncated])
    assert "not a DICOM file" not in line and "truncated or damaged" in line


@pytest.mark.parametrize("implicit", [True, False])
def test_image_series_without_meta_header_is_read(series, implicit):
    # pydicom's shipped bare streams hold no image, so this one is written here: every file of a
    # series saved without preamble and file meta, as old exporters do.
    folder, files, ct = series
    for path in files:
        ds = pydicom.dcmread(path)
        del ds.file_meta
        ds.preamble = None
        ds.save_as(path, implicit_vr=implicit, little_endian=True, enforce_file_format=False)
    assert open(files[0], "rb").read(4)[:2] == b"\x08\x00"  # no preamble: starts with group 0008
    for source in (folder, files[2]):
        volume = load_volume(source)
        np.testing.assert_array_equal(volume.array, ct)
        assert volume.metadata["warnings"] == []
        assert volume.metadata["transfer_syntax"] == ("1.2.840.10008.1.2" if implicit else "1.2.840.10008.1.2.1")


# --- modality -------------------------------------------------------------------------------------


def _cropped_ct() -> Volume:
    """The CT phantom cut to a block inside the body that contains no air, lung or bowel gas."""
    ct = make_ct_phantom()[0]
    inside = np.argwhere(ct.array > -500)
    low, high = inside.min(axis=0), inside.max(axis=0) + 1
    block = ct.array[35:43, low[1] + 32 : high[1] - 32, low[2] + 32 : high[2] - 32]
    return Volume(block, ct.spacing_mm, ct.origin_mm, ct.direction)


def test_body_cropped_ct_is_still_ct(tmp_path, capsys):
    crop = _cropped_ct()
    assert crop.array.min() > -500  # the old rule (minimum below -500) would call this MR
    path = write_nifti_volume(crop, tmp_path / "cropped_ct.nii.gz")
    volume = load_volume(path)
    assert (volume.modality, volume.intensity_unit) == ("CT", "HU")
    assert main(["info", str(path), "--modality", "mr"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["modality"] == "MR"
    overridden = load_volume(path, modality="OT")
    assert (overridden.modality, overridden.intensity_unit) == ("OT", "")


def test_mr_stays_mr_and_can_be_overridden(tmp_path):
    mr = make_mr_phantom()[0]
    path = write_nifti_volume(mr, tmp_path / "mr.nii.gz")
    assert load_volume(path).modality == "MR"
    forced = load_volume(path, modality="CT")
    assert (forced.modality, forced.intensity_unit) == ("CT", "HU")
    with pytest.raises(VolumeReadError, match="Unknown modality"):
        load_volume(path, modality="PET")


def test_signed_non_ct_data_is_not_ct(tmp_path):
    # Signed integers spread far beyond the CT range (a phase map) and z-scored floats are not HU.
    rng = np.random.default_rng(1)
    phase = Volume(rng.integers(-4096, 4096, (6, 16, 16)).astype(np.int16), (1, 1, 1), (0, 0, 0), np.eye(3))
    scores = Volume(rng.normal(size=(6, 16, 16)).astype(np.float32), (1, 1, 1), (0, 0, 0), np.eye(3))
    for name, volume in (("phase", phase), ("scores", scores)):
        assert load_volume(write_nifti_volume(volume, tmp_path / f"{name}.nii.gz")).modality == "MR"


def test_dicom_modality_is_used_and_override_reaches_cli(series, capsys):
    folder = series[0]
    edit(sorted(folder.iterdir()), lambda ds, _: setattr(ds, "Modality", "MR"))
    assert load_volume(folder).modality == "MR"  # the header wins over CT-looking values
    assert main(["info", str(folder), "--modality", "CT"]) == 0
    assert json.loads(capsys.readouterr().out)["modality"] == "CT"
