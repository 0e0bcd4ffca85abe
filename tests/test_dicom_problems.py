"""DICOM series reading when something is wrong: missing, moved, duplicated or damaged slices,
folders without images, 2D and colour images."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from dicom_factory import (
    assert_display_orientation,
    assert_matches_sources,
    edit,
    make_volume,
    phantom,
    shift_position,
    write_rgb_series,
    write_rtstruct,
    write_series,
    write_sr,
)
from napari_medsam.errors import DicomSeriesError, MedSamError, NotAVolumeError
from napari_medsam.io.dicom.series import read_dicom_series


@pytest.fixture(scope="module")
def ct() -> np.ndarray:
    return phantom((12, 40, 48))


def test_missing_slice_inserts_blank_at_true_position(tmp_path, ct):
    source = make_volume(ct)
    files = write_series(tmp_path / "gap", source)
    files[5].unlink()
    files[8].unlink()
    files[9].unlink()
    volume = read_dicom_series(tmp_path / "gap")
    assert volume.shape == ct.shape and volume.same_grid(source, atol_mm=1e-4)
    assert volume.metadata["missing_slices"] == [5, 8, 9]
    kept = [k for k in range(12) if k not in (5, 8, 9)]
    np.testing.assert_array_equal(volume.array[kept], ct[kept])
    assert np.all(volume.array[[5, 8, 9]] == ct[kept].min())
    assert [ds is None for ds in volume.dicom_datasets].count(True) == 3 and volume.dicom_datasets[5] is None
    assert any("misses 3 slice" in w for w in volume.metadata["warnings"])


def test_missing_slice_in_flipped_stack_reports_display_index(tmp_path, ct):
    # Row cosine -x turns the normal to -S, so the stack runs feet-ward and display flips it.
    direction = np.column_stack([[0, 0, -1], [0, 1, 0], [-1, 0, 0]]).astype(float)
    files = write_series(tmp_path / "flip", make_volume(ct, direction))
    files[2].unlink()  # display slice 12 - 1 - 2 = 9 after the flip to head-ward
    volume = read_dicom_series(tmp_path / "flip")
    assert volume.metadata["dicom_slice_axis_flipped"] is True
    assert volume.metadata["missing_slices"] == [9]
    assert_display_orientation(volume)
    assert_matches_sources(volume, files[:2] + files[3:6])


def test_series_missing_most_slices_keeps_positions(tmp_path, ct):
    files = write_series(tmp_path / "sparse", make_volume(ct))
    for k in (1, 3, 7, 9):
        files[k].unlink()  # most gaps are now two slices wide
    volume = read_dicom_series(tmp_path / "sparse")
    assert volume.shape == ct.shape and volume.metadata["missing_slices"] == [1, 3, 7, 9]
    assert volume.spacing_mm[0] == pytest.approx(2.5)


def test_sheared_stack_warns(tmp_path, ct):
    files = write_series(tmp_path / "tilt", make_volume(ct))
    edit(files, lambda ds, k: shift_position(ds, (0.0, 0.4 * k, 0.0)))
    volume = read_dicom_series(tmp_path / "tilt")
    assert any("shift sideways by up to 4.40 mm" in w for w in volume.metadata["warnings"])


def test_irregular_spacing_is_an_error(tmp_path, ct):
    files = write_series(tmp_path / "irr", make_volume(ct))
    edit(files[6:7], lambda ds, _: shift_position(ds, (0.0, 0.0, 1.0)))
    with pytest.raises(DicomSeriesError, match="irregular slice spacing"):
        read_dicom_series(tmp_path / "irr")


def test_identical_duplicate_is_dropped(tmp_path, ct):
    files = write_series(tmp_path / "dup", make_volume(ct))
    ds = pydicom.dcmread(files[4])
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(tmp_path / "dup" / "copy.dcm")
    volume = read_dicom_series(tmp_path / "dup")
    np.testing.assert_array_equal(volume.array, ct)
    (warning,) = volume.metadata["warnings"]
    assert "copy.dcm duplicates the image" in warning  # ties keep InstanceNumber, then name order
    assert volume.dicom_datasets[4].SOPInstanceUID == pydicom.dcmread(files[4]).SOPInstanceUID


def test_different_images_at_one_position_are_an_error(tmp_path, ct):
    files = write_series(tmp_path / "mix", make_volume(ct))
    ds = pydicom.dcmread(files[4])
    ds.SOPInstanceUID = generate_uid()
    ds.PixelData = (ds.pixel_array + 7).astype(ds.pixel_array.dtype).tobytes()
    ds.save_as(tmp_path / "mix" / "phase2.dcm")
    z = float(ds.ImagePositionPatient[2])
    with pytest.raises(DicomSeriesError, match=rf"two different images at the same position \({z:.3f} mm"):
        read_dicom_series(tmp_path / "mix")


def test_empty_folder(tmp_path):
    with pytest.raises(DicomSeriesError, match="is empty"):
        read_dicom_series(tmp_path)


def test_folder_without_dicom(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    with pytest.raises(DicomSeriesError, match=r"no DICOM files \(2 other file"):
        read_dicom_series(tmp_path)


@pytest.mark.parametrize("writer", [write_sr, write_rtstruct], ids=["sr", "rtstruct"])
def test_objects_without_pixels(tmp_path, writer):
    path = writer(tmp_path / "object.dcm")
    with pytest.raises(DicomSeriesError, match="no images"):
        read_dicom_series(tmp_path)
    with pytest.raises(DicomSeriesError, match="holds no images"):
        read_dicom_series(path)


def test_single_image_is_not_a_volume(tmp_path, ct):
    write_series(tmp_path / "one", make_volume(ct[:1]))
    with pytest.raises(NotAVolumeError, match="single 2D image"):
        read_dicom_series(tmp_path / "one")


def test_rgb_is_not_a_volume(tmp_path):
    write_rgb_series(tmp_path / "rgb")
    with pytest.raises(NotAVolumeError, match="colour"):
        read_dicom_series(tmp_path / "rgb")


def test_mixed_pixel_spacing_is_an_error(tmp_path, ct):
    files = write_series(tmp_path / "ps", make_volume(ct))
    edit(files[3:4], lambda ds, _: setattr(ds, "PixelSpacing", [0.5, 0.5]))
    with pytest.raises(DicomSeriesError, match="mixes pixel spacings"):
        read_dicom_series(tmp_path / "ps")


@pytest.mark.parametrize("keep", [0.05, 0.2, 0.98], ids=["cut-in-meta", "cut-in-header", "cut-in-pixels"])
def test_truncated_file_is_named(tmp_path, ct, keep):
    files = write_series(tmp_path / "trunc", make_volume(ct[:4]))
    data = files[2].read_bytes()
    files[2].write_bytes(data[: max(140, int(len(data) * keep))])
    with pytest.raises(DicomSeriesError, match=files[2].name):
        read_dicom_series(tmp_path / "trunc")


def test_damaged_file_of_another_series_only_warns(tmp_path, ct):
    folder = tmp_path / "two"
    write_series(folder, make_volume(ct), prefix="a")
    other = write_series(folder, make_volume(ct[:4]), prefix="b", series_number=2)
    edit(other[1:2], lambda ds, _: delattr(ds, "Rows"))
    volume = read_dicom_series(folder)
    np.testing.assert_array_equal(volume.array, ct)
    assert any("damaged" in w and other[1].name in w for w in volume.metadata["warnings"])
    with pytest.raises(DicomSeriesError, match=f"{other[1].name}.*without Rows/Columns"):
        read_dicom_series(folder, series_uid=pydicom.dcmread(other[0]).SeriesInstanceUID)


def test_missing_path(tmp_path):
    with pytest.raises(MedSamError, match="does not exist"):
        read_dicom_series(tmp_path / "nowhere")
