"""The plugin inside napari: manifest, reader, writers, sample data and the dock widget."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import nibabel as nib
import numpy as np
import pytest

from napari_medsam.io import load_volume
from napari_medsam.phantoms import CT_LABELS


@pytest.fixture
def ct_nifti(tmp_path):
    """A small LAS-oriented CT NIfTI with a bright block."""
    data = np.full((40, 36, 12), -1000, np.int16)
    data[10:30, 8:28, 3:9] = 60
    affine = np.array([[-0.8, 0, 0, 30.0], [0, 0.8, 0, -40.0], [0, 0, 2.5, 12.0], [0, 0, 0, 1]])
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def test_manifest_is_valid():
    import npe2

    manifest = npe2.PluginManifest.from_distribution("napari-medsam")
    assert manifest.name == "napari-medsam"
    assert {w.display_name for w in manifest.contributions.widgets} == {"MedSAM"}
    extensions = {e for w in manifest.contributions.writers for e in w.filename_extensions}
    assert {".nii.gz", ".nii", ".dcm"} <= extensions


def test_open_through_napari_gives_physical_proportions(make_napari_viewer, ct_nifti):
    viewer = make_napari_viewer()
    layers = viewer.open(str(ct_nifti), plugin="napari-medsam")
    assert len(layers) == 1
    layer = layers[0]
    volume = load_volume(ct_nifti)
    np.testing.assert_array_equal(layer.data, volume.array)
    np.testing.assert_allclose(layer.scale, volume.spacing_mm)
    # CT opens in a soft-tissue window while the voxels keep their HU.
    assert tuple(layer.contrast_limits) == (-160.0, 240.0)
    assert layer.data.min() == -1000
    # World coordinates are LPS millimetres (z, y, x): voxel centres land where the affine says.
    corner = layer.data_to_world([3, 5, 7])
    expected = volume.index_to_world([3, 5, 7])[0][::-1]
    np.testing.assert_allclose(corner, expected, atol=1e-6)


def test_label_layer_saves_on_scan_grid_through_napari(make_napari_viewer, ct_nifti, tmp_path):
    viewer = make_napari_viewer()
    viewer.open(str(ct_nifti), plugin="napari-medsam")
    widget = _add_widget(viewer)
    labels_layer = widget.add_labels_layer()
    labels_layer.data[2:6, 10:20, 5:15] = 1
    out = tmp_path / "seg.nii.gz"
    labels_layer.save(str(out), plugin="napari-medsam")
    written = nib.load(str(out))
    source = nib.load(str(ct_nifti))
    assert written.shape == source.shape
    np.testing.assert_array_equal(written.affine, source.affine)
    volume = load_volume(ct_nifti)
    np.testing.assert_array_equal(np.asarray(written.dataobj), volume.axes.to_file(labels_layer.data))
    # An unnamed painted value is saved with the name the panel would show, as Export does.
    labels_layer.data[2:4, 30:34, 5:9] = 7
    labels_layer.save(str(out), plugin="napari-medsam")
    from napari_medsam.io import read_labels_and_segments

    _, segments = read_labels_and_segments(out, volume)
    assert {s.label: s.name for s in segments}[7] == "object 7"


def test_hand_made_label_layer_finds_its_scan(make_napari_viewer, ct_nifti, tmp_path):
    viewer = make_napari_viewer()
    image = viewer.open(str(ct_nifti), plugin="napari-medsam")[0]
    labels = viewer.add_labels(np.zeros(image.data.shape, np.uint8), scale=image.scale, translate=image.translate)
    labels.data[1, 1, 1] = 4
    out = tmp_path / "hand.nii"
    labels.save(str(out), plugin="napari-medsam")
    np.testing.assert_array_equal(nib.load(str(out)).affine, nib.load(str(ct_nifti)).affine)


def test_reader_refuses_unknown_files(tmp_path):
    from napari_medsam._napari.reader import get_reader

    png = tmp_path / "photo.png"
    png.write_bytes(b"\x89PNG\r\n")
    assert get_reader(str(png)) is None
    assert get_reader(str(tmp_path / "scan.nii.gz")) is not None


def test_widget_exports_in_background(make_napari_viewer, ct_nifti, tmp_path, qtbot):
    viewer = make_napari_viewer()
    viewer.open(str(ct_nifti), plugin="napari-medsam")
    widget = _add_widget(viewer)
    assert "CT" in widget.info.text()
    widget.apply_window("lung")
    assert tuple(viewer.layers[0].contrast_limits) == (-1350.0, 150.0)
    layer = widget.add_labels_layer("organ")
    layer.data[5, 5:10, 5:10] = 2
    out = tmp_path / "organ.nii.gz"
    worker = widget.export_labels(out)
    with qtbot.waitSignal(worker.finished, timeout=20000):
        pass
    assert widget.last_saved == out
    assert np.asarray(nib.load(str(out)).dataobj).max() == 2


def _add_widget(viewer):
    _, widget = viewer.window.add_plugin_dock_widget("napari-medsam", "MedSAM")
    return widget


def test_napari_start_with_plugin_does_not_import_torch(ct_nifti):
    # A fresh interpreter: napari discovers the plugin, opens a scan and docks the widget.
    code = textwrap.dedent(
        f"""
        import sys, napari
        viewer = napari.Viewer(show=False)
        viewer.open({str(ct_nifti)!r}, plugin="napari-medsam")
        viewer.window.add_plugin_dock_widget("napari-medsam", "MedSAM")
        # napari itself imports skimage; torch, OpenCV and highdicom must stay out until used.
        heavy = sorted(m for m in ("torch", "cv2", "highdicom") if m in sys.modules)
        print("HEAVY", heavy)
        viewer.close()
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180,
                            env={**os.environ})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "HEAVY []" in result.stdout, result.stdout


def test_sample_data_opens_with_ground_truth(make_napari_viewer):
    viewer = make_napari_viewer()
    layers = viewer.open_sample("napari-medsam", "ct_phantom")
    image, truth = layers
    assert image._type_string == "image" and truth._type_string == "labels"
    assert image.data.shape == truth.data.shape
    assert tuple(image.scale) == tuple(truth.scale)
    assert set(np.unique(truth.data)) == {0, *CT_LABELS}
    mr = viewer.open_sample("napari-medsam", "mr_phantom")
    assert mr[0].data.ndim == 3


def test_dicom_series_to_dicom_seg_and_back_through_napari(make_napari_viewer, sample_dir, tmp_path):
    from dicom_validation import DCIODVFY, dciodvfy_report

    viewer = make_napari_viewer()
    image = viewer.open(str(sample_dir / "ct_phantom_dicom"), plugin="napari-medsam")[0]
    volume = load_volume(sample_dir / "ct_phantom_dicom")
    assert image.data.shape == volume.shape and volume.source_format == "dicom"
    truth = load_volume(sample_dir / "ct_phantom_labels.nii.gz")
    assert truth.same_grid(volume, atol_mm=1e-3)
    widget = _add_widget(viewer)
    layer = widget.add_labels_layer("organs")
    layer.data = truth.array.astype(np.uint16)
    layer.metadata["napari_medsam"]["names"] = dict(CT_LABELS)
    out = tmp_path / "organs.dcm"
    layer.save(str(out), plugin="napari-medsam")
    if DCIODVFY:
        errors, _ = dciodvfy_report(out)
        assert errors == []
    back = viewer.open(str(out), plugin="napari-medsam")[0]
    assert back._type_string == "labels"
    from napari_medsam.io import read_labels

    np.testing.assert_array_equal(read_labels(out, like=volume), truth.array)


def test_bad_file_in_napari_gives_a_clear_notification(make_napari_viewer, tmp_path):
    from napari.utils.notifications import notification_manager

    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00" + b"garbage" * 50)
    viewer = make_napari_viewer()
    before = len(notification_manager.records)
    with pytest.raises(Exception):
        viewer.open(str(bad), plugin="napari-medsam")
    messages = [str(n.message) for n in notification_manager.records[before:]]
    assert any("broken.nii.gz" in m and ("corrupt" in m or "truncated" in m) for m in messages), messages
    assert len(viewer.layers) == 0


def test_download_progress_shows_a_napari_progress_bar(make_napari_viewer):
    from napari.utils import progress

    from napari_medsam._napari.progress import download_progress

    make_napari_viewer()
    callback = download_progress("downloading lite_medsam")
    callback(0, 1000)
    bar = callback._bar
    assert isinstance(bar, progress) and bar.total == 1000
    callback(400, 1000)
    assert bar.n == 400
    callback(1000, 1000)  # complete: the bar closes itself
    assert bar.n == 1000


def test_label_names_travel_with_nifti_through_napari(make_napari_viewer, sample_dir, tmp_path):
    import json

    viewer = make_napari_viewer()
    viewer.open(str(sample_dir / "ct_phantom.nii.gz"), plugin="napari-medsam")
    # The sample labels' names come from their NAME.segments.json sidecar.
    (labels,) = viewer.open(str(sample_dir / "ct_phantom_labels.nii.gz"), plugin="napari-medsam")
    assert labels.__class__.__name__ == "Labels"
    names = {s.label: s.name for s in labels.metadata["napari_medsam"]["segments"]}
    assert names[1] == "liver" and names[2] == "spleen"
    # Saved as NIfTI through napari's writer: the sidecar goes beside it and is read back.
    out = tmp_path / "organs.nii.gz"
    assert labels.save(str(out), plugin="napari-medsam")
    side = json.loads((tmp_path / "organs.segments.json").read_text())
    assert {s["label"]: s["name"] for s in side}[1] == "liver"
    (again,) = viewer.open(str(out), plugin="napari-medsam")
    assert {s.label: s.name for s in again.metadata["napari_medsam"]["segments"]}[2] == "spleen"
    np.testing.assert_array_equal(again.data, labels.data)
    # A file whose name does not say "labels" is still opened as labels when a sidecar names it.
    plain = tmp_path / "study7.nii.gz"
    plain.write_bytes(out.read_bytes())
    (tmp_path / "study7.segments.json").write_text(json.dumps(side))
    (layer,) = viewer.open(str(plain), plugin="napari-medsam")
    assert layer.__class__.__name__ == "Labels"
