"""NIfTI reading and label writing: geometry kept exactly, checked with nibabel and SimpleITK."""

from __future__ import annotations

import errno
import gzip

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from napari_medsam.errors import (
    LabelsMismatchError,
    LabelsWriteError,
    MultipleVolumesError,
    NotAVolumeError,
    VolumeReadError,
)
from napari_medsam.io import load_volume, read_labels, save_labels


def _rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    r = np.eye(3)
    i, j = [a for a in range(3) if a != axis]
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def _write(tmp_path, data, affine, name="scan.nii.gz", sform_code=1, qform_code=1):
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, sform_code)
    img.set_qform(affine, qform_code)
    path = tmp_path / name
    nib.save(img, str(path))
    return path


AFFINES = {
    "ras": np.diag([0.8, 0.9, 2.5, 1.0]) + np.array([[0, 0, 0, -90], [0, 0, 0, -100], [0, 0, 0, 30], [0, 0, 0, 0]]),
    "las": np.diag([-0.7, 0.7, 3.0, 1.0]),
    "lps_permuted": np.array([[0, 0, -2.0, 10], [-1.0, 0, 0, 20], [0, 1.2, 0, -5], [0, 0, 0, 1]]),
    "sagittal": np.array([[0, 0, 3.0, -40], [1.0, 0, 0, -120], [0, 1.0, 0, -80], [0, 0, 0, 1]]),
}


def _ct(shape=(20, 24, 12), seed=0):
    rng = np.random.default_rng(seed)
    data = rng.integers(-1024, 1500, size=shape).astype(np.int16)
    return data


@pytest.mark.parametrize("name", list(AFFINES))
def test_display_order_and_world_positions_match_nibabel(tmp_path, name):
    affine = AFFINES[name]
    data = _ct()
    path = _write(tmp_path, data, affine)
    vol = load_volume(path)
    assert vol.source_format == "nifti"
    assert vol.modality == "CT" and vol.intensity_unit == "HU"
    # Every display voxel lies at the world position nibabel gives for its file voxel.
    rng = np.random.default_rng(1)
    display_idx = np.stack([rng.integers(0, n, 25) for n in vol.shape], axis=1)
    file_idx = vol.axes.display_index_to_file(display_idx, vol.shape).astype(int)
    world_ras = nib.affines.apply_affine(affine, file_idx)
    world_lps = world_ras * np.array([-1, -1, 1])
    np.testing.assert_allclose(vol.index_to_world(display_idx), world_lps, atol=1e-6)
    for d, f in zip(display_idx, file_idx):
        assert vol.array[tuple(d)] == data[tuple(f)]
    # Display orientation: slices toward S, rows toward P, columns toward L.
    assert vol.direction[2, 0] > 0.7 and vol.direction[1, 1] > 0.7 and vol.direction[0, 2] > 0.7


@pytest.mark.parametrize("name", list(AFFINES))
def test_labels_written_on_exact_grid_and_voxel_order(tmp_path, name):
    affine = AFFINES[name]
    data = _ct()
    src = _write(tmp_path, data, affine, sform_code=2, qform_code=1)
    vol = load_volume(src)
    labels = np.zeros(vol.shape, np.uint8)
    labels[3:9, 4:10, 2:5] = 1
    labels[10:12, 0:3, 7:9] = 7
    out = save_labels(labels, vol, tmp_path / "labels.nii.gz")
    written = nib.load(str(out))
    assert written.shape == data.shape
    np.testing.assert_array_equal(written.affine, nib.load(str(src)).affine)
    assert int(written.header["sform_code"]) == 2 and int(written.header["qform_code"]) == 1
    assert np.issubdtype(written.get_data_dtype(), np.integer)
    file_labels = np.asarray(written.dataobj)
    np.testing.assert_array_equal(file_labels, vol.axes.to_file(labels))
    # SimpleITK agrees on the grid: same origin/spacing/direction as the source.
    s_src, s_out = sitk.ReadImage(str(src)), sitk.ReadImage(str(out))
    np.testing.assert_allclose(s_out.GetOrigin(), s_src.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(s_out.GetSpacing(), s_src.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(s_out.GetDirection(), s_src.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(s_out).transpose(2, 1, 0), file_labels)
    # And our own reader puts the labels back where they were drawn.
    np.testing.assert_array_equal(read_labels(out, vol), labels)


def test_oblique_affine_kept_exactly(tmp_path):
    rot = _rotation(0, 12.0) @ _rotation(2, -7.0)
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.75, 0.75, 2.0])
    affine[:3, 3] = [-80.5, -95.25, 12.0]
    src = _write(tmp_path, _ct(), affine)
    vol = load_volume(src)
    assert vol.is_oblique()
    # The napari affine carries the rotation; world positions follow the exact affine.
    idx = np.array([[0, 0, 0], [5, 7, 3], [vol.shape[0] - 1, vol.shape[1] - 1, vol.shape[2] - 1]])
    file_idx = vol.axes.display_index_to_file(idx, vol.shape)
    expected = nib.affines.apply_affine(affine, file_idx) * np.array([-1, -1, 1])
    np.testing.assert_allclose(vol.index_to_world(idx), expected, atol=1e-6)
    out = save_labels(np.ones(vol.shape, np.uint8), vol, tmp_path / "l.nii")
    np.testing.assert_array_equal(nib.load(str(out)).affine, nib.load(str(src)).affine)


def test_scaled_ct_keeps_hu_integers(tmp_path):
    stored = np.random.default_rng(2).integers(0, 3000, size=(10, 11, 6)).astype(np.uint16)
    img = nib.Nifti1Image(stored, np.eye(4))
    img.header.set_slope_inter(1.0, -1024.0)
    path = tmp_path / "scaled.nii"
    nib.save(img, str(path))
    vol = load_volume(path)
    assert vol.array.dtype == np.int16
    assert int(vol.array.min()) == int(stored.min()) - 1024


def test_float_mr_volume(tmp_path):
    data = np.random.default_rng(3).random((16, 16, 8)).astype(np.float32) * 800
    vol = load_volume(_write(tmp_path, data, np.eye(4), name="mr.nii.gz"))
    assert vol.modality == "MR" and vol.array.dtype == np.float32


def test_4d_needs_a_volume_index(tmp_path):
    data = np.stack([_ct(seed=s) for s in range(3)], axis=-1)
    path = _write(tmp_path, data, np.eye(4), name="dwi.nii.gz")
    with pytest.raises(MultipleVolumesError, match="3 volumes") as info:
        load_volume(path)
    assert info.value.n_volumes == 3
    vol = load_volume(path, volume_index=2)
    np.testing.assert_array_equal(vol.axes.to_file(vol.array), data[..., 2])
    with pytest.raises(MultipleVolumesError, match="out of range"):
        load_volume(path, volume_index=3)
    # A 4D file with a single volume is simply 3D.
    single = _write(tmp_path, data[..., :1], np.eye(4), name="one.nii.gz")
    assert load_volume(single).shape == (20, 24, 12)[::-1]


def test_2d_and_rgb_are_refused(tmp_path):
    with pytest.raises(NotAVolumeError, match="2D"):
        load_volume(_write(tmp_path, np.zeros((32, 32), np.int16), np.eye(4), name="flat.nii"))
    with pytest.raises(NotAVolumeError, match="2D"):
        load_volume(_write(tmp_path, np.zeros((32, 32, 1), np.int16), np.eye(4), name="one.nii"))
    rgb = np.zeros((8, 8, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb_path = tmp_path / "rgb.nii"
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), str(rgb_path))
    with pytest.raises(NotAVolumeError, match="RGB"):
        load_volume(rgb_path)


def test_truncated_and_corrupt_files(tmp_path):
    good = _write(tmp_path, _ct(), np.eye(4), name="good.nii.gz")
    raw = good.read_bytes()
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(VolumeReadError, match="truncated"):
        load_volume(truncated)
    not_gzip = tmp_path / "fake.nii.gz"
    not_gzip.write_bytes(b"this is not gzip at all" * 20)
    with pytest.raises(VolumeReadError):
        load_volume(not_gzip)
    text = tmp_path / "notes.nii"
    text.write_text("hello, I am not an image\n" * 30)
    with pytest.raises(VolumeReadError):
        load_volume(text)
    plain = _write(tmp_path, _ct(), np.eye(4), name="plain.nii")
    cut = tmp_path / "cut.nii"
    cut.write_bytes(plain.read_bytes()[:600])
    with pytest.raises(VolumeReadError):
        load_volume(cut)
    header_only = tmp_path / "header_only.nii.gz"
    header_only.write_bytes(gzip.compress(plain.read_bytes()[:348]))
    with pytest.raises(VolumeReadError):
        load_volume(header_only)
    with pytest.raises(VolumeReadError, match="does not exist"):
        load_volume(tmp_path / "missing.nii.gz")


def test_label_volume_checks(tmp_path):
    vol = load_volume(_write(tmp_path, _ct(), np.eye(4)))
    target = tmp_path / "out.nii.gz"
    with pytest.raises(LabelsMismatchError, match="shape"):
        save_labels(np.zeros((3, 4, 5), np.uint8), vol, target)
    with pytest.raises(LabelsMismatchError, match="positive"):
        save_labels(np.full(vol.shape, -1, np.int16), vol, target)
    with pytest.raises(LabelsMismatchError, match="whole numbers"):
        save_labels(np.full(vol.shape, 0.5, np.float32), vol, target)
    with pytest.raises(LabelsMismatchError, match="does not fit"):
        save_labels(np.full(vol.shape, 2**40, np.int64), vol, target)
    assert not target.exists()
    # Large label values pick a wider type rather than wrapping around.
    big = np.zeros(vol.shape, np.int64)
    big[0, 0, 0] = 70000
    out = save_labels(big, vol, target)
    assert np.asarray(nib.load(str(out)).dataobj).max() == 70000
    with pytest.raises(LabelsWriteError, match="use one of"):
        save_labels(np.zeros(vol.shape, np.uint8), vol, tmp_path / "labels.png")
    with pytest.raises(LabelsWriteError, match="DICOM-SEG must reference a DICOM series"):
        save_labels(np.zeros(vol.shape, np.uint8), vol, tmp_path / "labels.dcm")


def test_unwritable_path_and_full_disk_lose_nothing(tmp_path, monkeypatch):
    vol = load_volume(_write(tmp_path, _ct(), np.eye(4)))
    labels = np.ones(vol.shape, np.uint8)
    with pytest.raises(LabelsWriteError, match="does not exist"):
        save_labels(labels, vol, tmp_path / "no" / "such" / "dir" / "l.nii.gz")
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o500)
    try:
        import os

        if os.geteuid() != 0:  # root ignores directory permissions
            with pytest.raises(LabelsWriteError, match="permission"):
                save_labels(labels, vol, readonly / "l.nii.gz")
    finally:
        readonly.chmod(0o700)
    a_file = tmp_path / "scan.nii.gz"
    with pytest.raises(LabelsWriteError, match="is a file, not a folder"):
        save_labels(labels, vol, a_file / "l.nii.gz")

    def no_permission(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    import tempfile

    with monkeypatch.context() as patch:
        patch.setattr(tempfile, "mkstemp", no_permission)
        with pytest.raises(LabelsWriteError, match="permission denied"):
            save_labels(labels, vol, tmp_path / "denied.nii.gz")
    assert not (tmp_path / "denied.nii.gz").exists()
    existing = tmp_path / "existing.nii.gz"
    existing.write_bytes(b"previous content")

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(nib, "save", disk_full)
    with pytest.raises(LabelsWriteError, match="disk is full"):
        save_labels(labels, vol, existing)
    assert existing.read_bytes() == b"previous content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.nii.gz", "ro", "scan.nii.gz"]
