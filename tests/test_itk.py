"""NRRD and MetaImage volumes through SimpleITK."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from napari_medsam.errors import MultipleVolumesError, NotAVolumeError, VolumeReadError
from napari_medsam.io import load_volume, read_labels, save_labels


def _image(direction, shape_xyz=(14, 12, 9), spacing=(0.7, 0.8, 2.5), origin=(-50.0, 20.0, 100.0)):
    data = np.random.default_rng(0).integers(-1000, 1000, size=shape_xyz[::-1]).astype(np.int16)
    image = sitk.GetImageFromArray(data)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection([float(v) for v in np.asarray(direction).reshape(-1)])
    return image, data


DIRECTIONS = {
    "identity": np.eye(3),
    "flipped_lr": np.diag([-1.0, 1.0, 1.0]),
    "coronal": np.array([[1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]]),
    "oblique": np.array(
        [[np.cos(0.2), -np.sin(0.2), 0], [np.sin(0.2), np.cos(0.2), 0], [0, 0, 1.0]]
    ),
}


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_world_positions_follow_itk(tmp_path, suffix, name):
    image, _ = _image(DIRECTIONS[name])
    path = tmp_path / f"scan{suffix}"
    sitk.WriteImage(image, str(path))
    vol = load_volume(path)
    assert vol.source_format == ("nrrd" if suffix == ".nrrd" else "metaimage")
    assert vol.modality == "CT"
    rng = np.random.default_rng(3)
    display_idx = np.stack([rng.integers(0, n, 20) for n in vol.shape], axis=1)
    file_idx = vol.axes.display_index_to_file(display_idx, vol.shape).astype(int)
    expected = np.array([image.TransformIndexToPhysicalPoint([int(v) for v in f]) for f in file_idx])
    np.testing.assert_allclose(vol.index_to_world(display_idx), expected, atol=1e-6)
    for d, f in zip(display_idx, file_idx):
        assert vol.array[tuple(d)] == image[[int(v) for v in f]]

    labels = np.zeros(vol.shape, np.uint8)
    labels[2:5, 3:8, 1:6] = 3
    out = save_labels(labels, vol, tmp_path / f"labels{suffix}")
    written = sitk.ReadImage(str(out))
    assert written.GetSize() == image.GetSize()
    np.testing.assert_allclose(written.GetOrigin(), image.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(written.GetDirection(), image.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(read_labels(out, vol), labels)
    # The same labels as NIfTI land on the same world grid.
    nii = save_labels(labels, vol, tmp_path / "labels.nii.gz")
    np.testing.assert_array_equal(read_labels(nii, vol), labels)
    as_itk = sitk.ReadImage(str(nii))
    np.testing.assert_allclose(as_itk.GetOrigin(), image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(as_itk.GetDirection(), image.GetDirection(), atol=1e-5)


def test_bad_itk_inputs(tmp_path):
    corrupt = tmp_path / "bad.nrrd"
    corrupt.write_text("NRRD0004\ntype: short\ndimension: 3\nsizes: 10 10 10\nencoding: raw\n\nshort")
    with pytest.raises(VolumeReadError):
        load_volume(corrupt)
    flat = sitk.GetImageFromArray(np.zeros((20, 30), np.int16))
    sitk.WriteImage(flat, str(tmp_path / "flat.mha"))
    with pytest.raises(NotAVolumeError, match="2D"):
        load_volume(tmp_path / "flat.mha")
    rgb = sitk.GetImageFromArray(np.zeros((4, 20, 30, 3), np.uint8), isVector=True)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.mha"))
    with pytest.raises(NotAVolumeError, match="components"):
        load_volume(tmp_path / "rgb.mha")
    four = sitk.JoinSeries([sitk.GetImageFromArray(np.full((5, 6, 7), v, np.int16)) for v in range(3)])
    sitk.WriteImage(four, str(tmp_path / "four.nrrd"))
    with pytest.raises(MultipleVolumesError, match="3 volumes"):
        load_volume(tmp_path / "four.nrrd")
    picked = load_volume(tmp_path / "four.nrrd", volume_index=1)
    assert picked.shape == (5, 6, 7) and np.all(picked.array == 1)
