"""DICOM series reading: scan, choice of series, sort by position, geometry in any orientation, codecs.

Problem cases (missing or damaged slices, non-image folders) are in test_dicom_problems.py."""

from __future__ import annotations

import numpy as np
import pydicom
import pydicom.pixels
import pytest
import SimpleITK as sitk
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid

from dicom_factory import (
    assert_display_orientation,
    assert_matches_sources,
    CORONAL,
    SAGITTAL,
    edit,
    make_volume,
    oblique,
    phantom,
    rotation,
    write_enhanced_ct,
    write_jpeg_baseline_series,
    write_series,
    write_sr,
)
from napari_medsam.errors import DicomSeriesError
from napari_medsam.io.dicom.scan import scan_dicom
from napari_medsam.io.dicom.series import read_dicom_series, stack_plane


@pytest.fixture(scope="module")
def ct() -> np.ndarray:
    return phantom((12, 40, 48))


# ---------------------------------------------------------------- round trips and sorting


def test_round_trip_axial_identical(tmp_path, ct):
    source = make_volume(ct)
    files = write_series(tmp_path / "ct", source)
    volume = read_dicom_series(tmp_path / "ct")
    assert volume.array.dtype == np.int16
    np.testing.assert_array_equal(volume.array, ct)
    np.testing.assert_allclose(volume.spacing_mm, source.spacing_mm, atol=1e-4)
    np.testing.assert_allclose(volume.origin_mm, source.origin_mm, atol=1e-4)
    np.testing.assert_allclose(volume.direction, source.direction, atol=1e-6)
    assert volume.modality == "CT" and volume.intensity_unit == "HU" and volume.source_format == "dicom"
    assert volume.file_axis_names == ("column", "row", "slice")
    assert volume.source_path == tmp_path / "ct"
    meta = volume.metadata
    assert meta["warnings"] == [] and meta["missing_slices"] == [] and meta["n_instances"] == 12
    assert meta["window"] == (40.0, 400.0) and meta["dicom_slice_axis_display"] == 0
    headers = {pydicom.dcmread(f).SOPInstanceUID: pydicom.dcmread(f) for f in files}
    assert meta["series_uid"] == next(iter(headers.values())).SeriesInstanceUID
    for k, ds in enumerate(volume.dicom_datasets):
        assert "PixelData" not in ds
        np.testing.assert_array_equal(stack_plane(volume, volume.array, k), ct[k])
        assert float(ds.ImagePositionPatient[2]) == pytest.approx(source.origin_mm[2] + 2.5 * k)


@pytest.mark.parametrize("order", ["shuffled", "descending"])
def test_sorted_by_position_not_instance_number_or_name(tmp_path, ct, order):
    files = write_series(tmp_path / "s", make_volume(ct), instance_order=order)
    # Scramble file names too, so neither names nor InstanceNumber follow the anatomy.
    rng = np.random.default_rng(1)
    for path, new in zip(files, rng.permutation(len(files))):
        path.rename(path.with_name(f"x{new:03d}.tmp"))
    volume = read_dicom_series(tmp_path / "s")
    np.testing.assert_array_equal(volume.array, ct)


@pytest.mark.parametrize(
    "name, direction",
    [
        ("sagittal", SAGITTAL),
        ("coronal", CORONAL),
        ("oblique", oblique()),
        ("oblique-sagittal", rotation("y", 15) @ SAGITTAL),
    ],
)
def test_acquisitions_land_in_display_orientation(tmp_path, ct, name, direction):
    files = write_series(tmp_path / name, make_volume(ct, direction, spacing=(2.0, 0.7, 0.9)))
    volume = read_dicom_series(tmp_path / name)
    assert_display_orientation(volume)
    assert_matches_sources(volume, files[::3])
    assert sorted(volume.shape) == sorted(ct.shape)
    stack_axis = volume.metadata["dicom_slice_axis_display"]
    assert volume.shape[stack_axis] == 12
    # dicom_datasets are in stack order: stack_plane k is exactly that instance's image.
    by_uid = {pydicom.dcmread(f).SOPInstanceUID: pydicom.dcmread(f) for f in files}
    for k in (0, 5, 11):
        ds = by_uid[volume.dicom_datasets[k].SOPInstanceUID]
        np.testing.assert_array_equal(
            stack_plane(volume, volume.array, k), ds.pixel_array.astype(np.int32) - 1024
        )


def test_sagittal_maps_stack_to_columns(tmp_path, ct):
    write_series(tmp_path / "sag", make_volume(ct, SAGITTAL))
    volume = read_dicom_series(tmp_path / "sag")
    # The normal (row cosine A x column cosine I) points to the patient's right, so the stack
    # (sorted along it) starts at the leftmost slice, runs R-ward and so becomes the display
    # column axis (which runs L-ward) flipped.
    assert volume.metadata["dicom_slice_axis_display"] == 2
    assert volume.metadata["dicom_slice_axis_flipped"] is True
    files = sorted((tmp_path / "sag").iterdir())
    leftmost = max(files, key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[0]))
    assert volume.dicom_datasets[0].SOPInstanceUID == pydicom.dcmread(leftmost).SOPInstanceUID
    assert volume.shape == (40, 48, 12)


def test_simpleitk_agrees_on_oblique_geometry(tmp_path, ct):
    folder = tmp_path / "obl"
    write_series(folder, make_volume(ct, oblique(25, 30), spacing=(1.8, 0.6, 0.7)), instance_order="shuffled")
    volume = read_dicom_series(folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    itk_array = sitk.GetArrayFromImage(image)  # (z, y, x)
    assert sorted(np.round(image.GetSpacing(), 4)) == sorted(np.round(volume.spacing_mm, 4))
    size = image.GetSize()
    last = tuple(n - 1 for n in size)
    for xyz in [(0, 0, 0), (last[0], 0, 0), (3, last[1], 7), last, (10, 20, 5)]:
        world = np.asarray(image.TransformIndexToPhysicalPoint(xyz))  # ITK physical space is LPS
        index = volume.world_to_index(world)[0]
        assert np.allclose(index, np.round(index), atol=1e-3)
        voxel = tuple(int(v) for v in np.round(index))
        assert volume.array[voxel] == itk_array[xyz[2], xyz[1], xyz[0]]
    corner = np.asarray(image.TransformIndexToPhysicalPoint((0, 0, 0)))
    corner_index = np.array(np.meshgrid(*[[0, n - 1] for n in volume.shape], indexing="ij")).reshape(3, -1).T
    corners = volume.index_to_world(corner_index)
    assert np.min(np.linalg.norm(corners - corner, axis=1)) < 1e-3


def test_open_one_file_reads_its_series(tmp_path, ct):
    big = write_series(tmp_path / "mixed", make_volume(ct), prefix="a")
    small = write_series(
        tmp_path / "mixed", make_volume(ct[:6] + 5, spacing=(3, 1, 1)), prefix="b", series_number=2
    )
    volume = read_dicom_series(small[2])
    np.testing.assert_array_equal(volume.array, ct[:6] + 5)
    assert volume.metadata["series_uid"] == pydicom.dcmread(small[0]).SeriesInstanceUID
    assert read_dicom_series(big[-1]).shape == ct.shape


def test_two_series_largest_by_default_and_choice(tmp_path, ct):
    folder = tmp_path / "two"
    write_series(folder, make_volume(ct), prefix="a", series_description="AX big")
    small_volume = make_volume(ct[:5], spacing=(3, 1, 1))
    small = write_series(folder, small_volume, prefix="b", series_number=2, series_description="small one")
    small_uid = pydicom.dcmread(small[0]).SeriesInstanceUID
    volume = read_dicom_series(folder)
    assert volume.shape == ct.shape
    (warning,) = volume.metadata["warnings"]
    assert small_uid in warning and "small one" in warning and "5 images" in warning
    assert f"series_uid={small_uid!r}" in warning
    assert {s["series_uid"] for s in volume.metadata["series"]} >= {small_uid, volume.metadata["series_uid"]}
    assert sum(s["selected"] for s in volume.metadata["series"]) == 1
    other = read_dicom_series(folder, series_uid=small_uid)
    np.testing.assert_array_equal(other.array, ct[:5])
    with pytest.raises(DicomSeriesError, match="No image series with UID"):
        read_dicom_series(folder, series_uid="1.2.3.4")


def test_scan_reports_series_skips_other_files(tmp_path, ct):
    folder = tmp_path / "scan"
    write_series(folder / "sub", make_volume(ct[:4]))
    write_sr(folder / "report.dcm")
    (folder / "notes.txt").write_text("not dicom")
    dicomdir = pydicom.dcmread(write_sr(folder / "DICOMDIR"))
    dicomdir.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    dicomdir.save_as(folder / "DICOMDIR")
    scan = scan_dicom(folder)
    assert scan.n_skipped == 1 and scan.n_dicomdir == 1
    images = [s for s in scan if s.has_pixel_data]
    assert len(images) == 1 and images[0].n_instances == 4 and (images[0].rows, images[0].columns) == (40, 48)
    assert [s.modality for s in scan if not s.has_pixel_data] == ["SR"]
    assert read_dicom_series(folder).shape == (4, 40, 48)


def test_series_without_uid_grouped_by_geometry(tmp_path, ct):
    files = write_series(tmp_path / "nouid", make_volume(ct))
    edit(files, lambda ds, _: delattr(ds, "SeriesInstanceUID"))
    scan = scan_dicom(tmp_path / "nouid")
    assert len(scan) == 1 and scan[0].series_uid == "" and scan[0].n_instances == 12
    np.testing.assert_array_equal(read_dicom_series(tmp_path / "nouid").array, ct)


def test_localizer_stacks_in_one_series(tmp_path, ct):
    folder, uid, frame, study = tmp_path / "loc", generate_uid(), generate_uid(), generate_uid()
    common = dict(series_uid=uid, frame_of_reference_uid=frame, study_uid=study)
    write_series(folder, make_volume(ct[:3, :, :40], SAGITTAL), prefix="s", **common)
    coronal = write_series(folder, make_volume(ct[:3], CORONAL), prefix="c", **common)
    with pytest.raises(DicomSeriesError, match="holds 2 stacks of 3 images each") as excinfo:
        read_dicom_series(folder)
    message = str(excinfo.value)
    # One short line that names the series once, each stack by number, and how to choose one.
    assert len(message) <= 220 and message.count(uid) == 1, message
    assert "#1 " in message and "#2 " in message and "--series-uid UID#N" in message
    chosen = read_dicom_series(folder, series_uid=f"{uid}#2")
    assert chosen.shape[chosen.metadata["dicom_slice_axis_display"]] == 3
    write_series(folder, make_volume(ct), prefix="a", **common)
    volume = read_dicom_series(folder)
    np.testing.assert_array_equal(volume.array, ct)
    warnings = volume.metadata["warnings"]
    assert len(warnings) == 2 and all("another orientation" in w for w in warnings)
    assert len([s for s in scan_dicom(folder) if s.series_uid == uid]) == 3
    # One file of the coronal stack opens that stack, not the larger axial one.
    from_file = read_dicom_series(coronal[1])
    assert from_file.shape[from_file.metadata["dicom_slice_axis_display"]] == 3
    assert from_file.shape == (40, 3, 48) and from_file.metadata["warnings"] == []
    (single,) = scan_dicom(coronal[1])
    assert single.n_instances == 1 and single.files == [coronal[1]]


# ---------------------------------------------------------------- intensities and codecs


def test_per_instance_rescale_gives_float32(tmp_path):
    stored = np.arange(6 * 16 * 20, dtype=np.uint16).reshape(6, 16, 20) % 1000
    files = write_series(tmp_path / "mr", make_volume(stored), modality="MR")
    slopes = [0.5 + 0.25 * k for k in range(6)]

    def rescale(ds, k):
        ds.RescaleSlope, ds.RescaleIntercept = slopes[int(ds.InstanceNumber) - 1], -3.5

    edit(files, rescale)
    volume = read_dicom_series(tmp_path / "mr")
    assert volume.array.dtype == np.float32 and volume.modality == "MR" and volume.intensity_unit == ""
    expected = stored * np.asarray(slopes)[:, None, None] - 3.5
    np.testing.assert_allclose(volume.array, expected, rtol=1e-6)


def test_values_beyond_int16_become_float32(tmp_path):
    stored = (np.arange(4 * 16 * 20).reshape(4, 16, 20) * 40).astype(np.uint16)
    assert stored.max() > 32767
    volume = read_dicom_series(write_series(tmp_path / "big", make_volume(stored), modality="MR")[0].parent)
    assert volume.array.dtype == np.float32
    np.testing.assert_array_equal(volume.array, stored.astype(np.float32))


@pytest.mark.parametrize(
    "syntax", [RLELossless, JPEG2000Lossless, JPEGLSLossless], ids=["rle", "j2k", "jpegls"]
)
def test_compressed_round_trip(tmp_path, ct, syntax):
    if not pydicom.pixels.get_encoder(syntax).is_available:
        pytest.skip(f"no encoder installed for {syntax.name} (JPEG-LS needs the test-only package pyjpegls)")
    files = write_series(tmp_path / "c", make_volume(ct, oblique()), transfer_syntax=syntax)
    assert pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID == syntax
    volume = read_dicom_series(tmp_path / "c")
    reference = read_dicom_series(write_series(tmp_path / "plain", make_volume(ct, oblique()))[0].parent)
    np.testing.assert_array_equal(volume.array, reference.array)
    assert volume.same_grid(reference, atol_mm=1e-4)
    assert volume.metadata["transfer_syntax"] == syntax


def test_jpeg_baseline_decodes(tmp_path):
    ramp = np.add.outer(np.arange(40), np.arange(48))[None] * 2 + np.arange(5)[:, None, None] * 10
    smooth = ramp.astype(np.uint8)
    write_jpeg_baseline_series(tmp_path / "jpg", make_volume(smooth))
    volume = read_dicom_series(tmp_path / "jpg")
    assert volume.metadata["transfer_syntax"] == "1.2.840.10008.1.2.4.50"
    assert np.abs(volume.array.astype(int) - smooth).max() <= 6


def test_undecodable_data_names_codec_and_package(tmp_path, ct):
    files = write_series(tmp_path / "bad", make_volume(ct[:3]), transfer_syntax=JPEG2000Lossless)

    def garble(ds, _):
        ds.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 60])

    edit(files[1:2], garble)
    with pytest.raises(DicomSeriesError, match=r"JPEG 2000.*pylibjpeg-openjpeg") as excinfo:
        read_dicom_series(tmp_path / "bad")
    assert files[1].name in str(excinfo.value)


def test_enhanced_multiframe(tmp_path, ct):
    source = make_volume(ct, oblique(10, 5))
    path = write_enhanced_ct(tmp_path / "enh.dcm", source, frame_order=[3, 0, 11, 1, 2, 4, 5, 6, 7, 8, 9, 10])
    volume = read_dicom_series(path)
    np.testing.assert_array_equal(volume.array, ct)
    assert volume.same_grid(source, atol_mm=1e-4)
    assert volume.source_path == path and volume.metadata["window"] == (40.0, 400.0)
    assert volume.metadata["dicom_frame_numbers"][:3] == [2, 4, 5]
    assert all(ds is volume.dicom_datasets[0] for ds in volume.dicom_datasets)
