"""Several scans in one viewer: a session per scan (labels, prompt layers, objects, history, report, export).

Through napari's real layers and the real dock widget: two scans of the same shape (the sample CT
as NIfTI and as a DICOM series) and two of different shapes (the sample CT and the MR phantom).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest


@pytest.fixture(scope="module")
def model():
    from test_predictor import tiny_model

    return tiny_model("sam", seed=3)


@pytest.fixture
def errors(monkeypatch, caplog):
    """Every error napari or the plugin reported (notifications and ERROR log records) during the test."""
    import napari.utils.notifications as notifications

    shown: list[str] = []
    monkeypatch.setattr(notifications, "show_error", lambda message, *a, **k: shown.append(str(message)))
    caplog.set_level(logging.WARNING)
    before = len(notifications.notification_manager.records)

    def collect() -> list[str]:
        records = notifications.notification_manager.records[before:]
        found = [str(r.message) for r in records if str(getattr(r.severity, "value", r.severity)) == "error"]
        found += [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        return shown + found

    return collect


def settle(qtbot, widget):
    def idle():
        c = widget.controller
        return c is None or (c.queue.running is None and not c.queue.pending)

    qtbot.waitUntil(idle, timeout=30000)
    qtbot.wait(20)


def show_slice(viewer, image, index):
    viewer.dims.set_point(0, image.data_to_world([index, 0, 0])[0])


def click(qtbot, widget, index, row=84, col=84):
    """A prompt on axial slice ``index`` of the current scan, predicted and written."""
    viewer, controller = widget.viewer, widget.controller
    show_slice(viewer, controller.image_layer, index)
    settle(qtbot, widget)
    controller.points_layer.add([index, row, col])
    settle(qtbot, widget)


def pick(widget, image):
    """The user picks ``image`` in the Scan picker."""
    widget.image_combo.setCurrentText(image.name)
    assert widget.image_layer is image


def names(viewer):
    return [layer.name for layer in viewer.layers]


def start(make_napari_viewer, qtbot, model, first_path, plugin="napari-medsam"):
    from napari_medsam._napari.widget import MedSamWidget
    from napari_medsam.segment.cache import EmbeddingCache, MemoryCache

    viewer = make_napari_viewer()
    viewer.open(str(first_path), plugin=plugin)
    widget = MedSamWidget(viewer)
    qtbot.addWidget(widget)
    widget.cache = EmbeddingCache(MemoryCache())
    widget.model_panel.set_model(model, "mobile_sam")
    assert widget.controller is not None, widget.status.text()
    return viewer, widget


@pytest.fixture
def same_shape(make_napari_viewer, qtbot, model, sample_dir):
    """The sample CT as NIfTI (A, segmented first) and as a DICOM series (B, opened second): the same shape."""
    viewer, widget = start(make_napari_viewer, qtbot, model, sample_dir / "ct_phantom.nii.gz")
    a = widget.image_layer
    yield viewer, widget, a
    settle(qtbot, widget)
    widget.stop_segmentation()


def test_same_shape_scans_keep_their_own_labels_prompts_and_history(same_shape, qtbot, sample_dir, errors):
    viewer, widget, a = same_shape
    middle = a.data.shape[0] // 2
    click(qtbot, widget, middle)
    a_labels, a_points, a_boxes = widget.controller.labels_layer, widget.controller.points_layer, widget.controller.boxes_layer
    assert (a_labels.data[middle] == 1).any()

    # Opening a second scan of the same shape makes it current with its own layers.
    b = viewer.open(str(sample_dir / "ct_phantom_dicom"), plugin="napari-medsam")[0]
    assert b.data.shape == a.data.shape
    assert widget.image_layer is b and widget.controller is not None and widget.controller.image_layer is b
    b_labels = widget.controller.labels_layer
    assert b_labels is not a_labels and b_labels.name == f"{b.name} labels"
    assert widget.labels_layer is b_labels
    assert [widget.labels_combo.itemText(i) for i in range(widget.labels_combo.count())] == [b_labels.name]
    assert not a_points.visible and not a_boxes.visible and widget.controller.points_layer.visible
    assert a_labels.visible  # the other scan's labels stay as they are
    click(qtbot, widget, middle + 6)
    assert (b_labels.data[middle + 6] == 1).any() and not np.delete(b_labels.data, middle + 6, axis=0).any()
    assert not np.delete(a_labels.data, middle, axis=0).any(), "scan B's click wrote into scan A's labels"
    b_points = widget.controller.points_layer

    # Back to A: its labels, prompt layers and session come back; B's prompt layers hide.
    pick(widget, a)
    controller = widget.controller
    assert controller.image_layer is a and controller.labels_layer is a_labels
    assert controller.points_layer is a_points and controller.boxes_layer is a_boxes
    assert a_points.visible and not b_points.visible
    assert len(a_points.data) == 1 and len(b_points.data) == 1
    assert widget.labels_layer is a_labels
    assert not any("[1]" in name for name in names(viewer)), names(viewer)
    assert widget.objects_panel.table.rowCount() == 1
    # A's own layers are drawn above B's.
    order = names(viewer)
    assert order.index(a.name) > order.index(b.name) and order.index(a_points.name) == len(order) - 1

    # Undo on A after working on B undoes A's click, and nothing of B.
    b_before = b_labels.data.copy()
    widget.segment_panel.undo_button.click()
    assert not a_labels.data.any() and len(a_points.data) == 0
    np.testing.assert_array_equal(b_labels.data, b_before)
    widget.segment_panel.redo_button.click()
    assert (a_labels.data[middle] == 1).any()

    # A second click on A goes into A's labels, B's stay.
    click(qtbot, widget, middle - 4)
    assert (a_labels.data[middle - 4] == 1).any()
    np.testing.assert_array_equal(b_labels.data, b_before)
    # Switching again and again never piles up layers.
    count = len(viewer.layers)
    for image in (b, a, b, a):
        pick(widget, image)
        settle(qtbot, widget)
    assert len(viewer.layers) == count and not any("[1]" in name for name in names(viewer))
    assert errors() == []


def test_export_follows_the_current_scan(same_shape, qtbot, sample_dir, tmp_path, errors):
    import pydicom

    viewer, widget, a = same_shape
    middle = a.data.shape[0] // 2
    click(qtbot, widget, middle)
    b = viewer.open(str(sample_dir / "ct_phantom_dicom"), plugin="napari-medsam")[0]
    click(qtbot, widget, middle + 3)
    pick(widget, a)
    pick(widget, b)
    # B's suggestion: a DICOM-SEG named after B's labels, beside B's series.
    suggested = widget.export_suggestion()
    assert suggested.suffix == ".dcm" and suggested.name.startswith(b.name.split(" ")[0])
    out = tmp_path / "b.dcm"
    widget.export_labels(out)
    qtbot.waitUntil(lambda: widget.last_saved == out, timeout=30000)
    seg = pydicom.dcmread(str(out))
    series = pydicom.dcmread(str(sorted((sample_dir / "ct_phantom_dicom").glob("*.dcm"))[0])).SeriesInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series
    assert widget.export_suggestion() == out  # remembered for B
    # A's: NIfTI beside the NIfTI, named after A's labels, with A's voxels.
    pick(widget, a)
    suggested = widget.export_suggestion()
    assert suggested.name == "ct_phantom_labels.nii.gz" and suggested.parent == sample_dir
    widget.last_saved = None
    out_a = tmp_path / "a.nii.gz"
    widget.export_labels(out_a)
    qtbot.waitUntil(lambda: widget.last_saved == out_a, timeout=30000)
    from napari_medsam.io import read_labels, load_volume

    back = read_labels(out_a, like=load_volume(sample_dir / "ct_phantom.nii.gz"))
    np.testing.assert_array_equal(back, widget.labels_layer.data)
    assert back[middle].any() and not back[middle + 3].any()
    assert errors() == []


def test_propagation_report_follows_the_scan(same_shape, qtbot, sample_dir, errors):
    viewer, widget, a = same_shape
    middle = a.data.shape[0] // 2
    click(qtbot, widget, middle)
    panel = widget.propagate_panel
    panel.limit_check.setChecked(True)
    panel.range_slider.setValue((middle - 2, middle + 2))
    assert panel.propagate("both")
    qtbot.waitUntil(lambda: not panel.busy, timeout=60000)
    rows, summary = panel.table.rowCount(), panel.summary.text()
    assert rows > 0 and summary
    b = viewer.open(str(sample_dir / "ct_phantom_dicom"), plugin="napari-medsam")[0]
    assert widget.image_layer is b
    assert panel.table.rowCount() == 0 and panel.summary.text() == "" and panel.last_result is None
    pick(widget, a)
    assert panel.table.rowCount() == rows and panel.summary.text() == summary
    assert panel.last_result is not None and panel.controller is widget.controller
    assert errors() == []


def test_scans_of_different_shapes(make_napari_viewer, qtbot, model, sample_dir, errors):
    viewer, widget = start(make_napari_viewer, qtbot, model, sample_dir / "ct_phantom.nii.gz")
    ct = widget.image_layer
    ct_labels = widget.controller.labels_layer
    click(qtbot, widget, 20)
    mr, truth = viewer.open_sample("napari-medsam", "mr_phantom")
    assert mr.data.shape != ct.data.shape
    assert widget.image_layer is mr and widget.controller.image_layer is mr
    mr_labels = widget.controller.labels_layer
    # The MR's own new layer: not the CT's labels (another grid), not the hidden ground truth.
    assert mr_labels is not truth and mr_labels is not ct_labels and mr_labels.data.shape == mr.data.shape
    offered = [widget.labels_combo.itemText(i) for i in range(widget.labels_combo.count())]
    assert ct_labels.name not in offered and truth.name in offered
    click(qtbot, widget, 24, 80, 80)
    assert (mr_labels.data[24] > 0).any() and not np.delete(mr_labels.data, 24, axis=0).any()
    assert not truth.visible and truth.data.max() > 0  # the ground truth untouched
    pick(widget, ct)
    assert widget.controller.labels_layer is ct_labels and widget.labels_layer is ct_labels
    assert not np.delete(ct_labels.data, 20, axis=0).any() and (ct_labels.data[20] == 1).any()
    widget.segment_panel.undo_button.click()
    assert not ct_labels.data.any() and (mr_labels.data[24] > 0).any()
    pick(widget, mr)
    assert widget.controller.labels_layer is mr_labels and widget.objects_panel.table.rowCount() == 1
    assert not any("[1]" in name for name in names(viewer)), names(viewer)
    settle(qtbot, widget)
    widget.stop_segmentation()
    assert errors() == []


def _closed_cleanly(controller):
    assert controller._closed, "not closed"
    assert not controller._connections, controller._connections
    assert not controller._bound, controller._bound
    return True


def test_removing_the_other_scan_keeps_the_current_one_working(same_shape, qtbot, sample_dir, errors):
    viewer, widget, a = same_shape
    middle = a.data.shape[0] // 2
    click(qtbot, widget, middle)
    a_controller, a_labels = widget.controller, widget.controller.labels_layer
    b = viewer.open(str(sample_dir / "ct_phantom_dicom"), plugin="napari-medsam")[0]
    b_controller = widget.controller
    assert _closed_cleanly(a_controller)
    viewer.layers.remove(a)
    qtbot.waitUntil(lambda: f"{a.name} points" not in names(viewer), timeout=5000)
    assert f"{a.name} boxes" not in names(viewer) and a_labels in viewer.layers  # the labels stay
    assert a not in widget.sessions and widget.image_layer is b and widget.controller is b_controller
    assert [widget.image_combo.itemText(i) for i in range(widget.image_combo.count())] == [b.name]
    click(qtbot, widget, middle + 2)
    assert (widget.controller.labels_layer.data[middle + 2] == 1).any()
    np.testing.assert_array_equal(a_labels.data[middle + 2], 0)
    # Moving through slices after the removal calls nothing of the removed scan.
    show_slice(viewer, b, 5)
    settle(qtbot, widget)
    assert errors() == []


def test_removing_the_current_scan_switches_to_the_other(same_shape, qtbot, sample_dir, errors):
    viewer, widget, a = same_shape
    middle = a.data.shape[0] // 2
    b = viewer.open(str(sample_dir / "ct_phantom_dicom"), plugin="napari-medsam")[0]
    click(qtbot, widget, middle)
    b_labels = widget.controller.labels_layer
    pick(widget, a)
    click(qtbot, widget, middle + 1)
    a_controller = widget.controller
    viewer.layers.remove(a)
    assert _closed_cleanly(a_controller)
    # The other scan becomes current and resumes its session (its labels, prompts and history).
    qtbot.waitUntil(lambda: widget.controller is not None, timeout=5000)
    assert widget.image_layer is b and widget.controller.image_layer is b
    assert widget.controller.labels_layer is b_labels and widget.controller.points_layer.visible
    assert f"{a.name} points" not in names(viewer)
    assert widget.segment_panel.undo_button.isEnabled()
    widget.segment_panel.undo_button.click()
    assert not b_labels.data.any()
    # Removing the last scan leaves the "no scan" state.
    b_controller = widget.controller
    viewer.layers.remove(b)
    qtbot.waitUntil(lambda: f"{b.name} points" not in names(viewer), timeout=5000)
    assert widget.controller is None and widget.image_layer is None and _closed_cleanly(b_controller)
    assert "Open a CT or MR scan" in widget.info.text()
    assert not widget.segment_panel.undo_button.isEnabled()
    qtbot.wait(50)
    # A new scan starts afresh.
    c = viewer.open(str(sample_dir / "ct_phantom.nii.gz"), plugin="napari-medsam")[0]
    assert widget.controller is not None and widget.controller.image_layer is c
    settle(qtbot, widget)
    viewer.layers.clear()
    qtbot.wait(50)
    assert widget.controller is None and len(viewer.layers) == 0
    assert errors() == []


def test_docked_through_napari_the_layers_are_the_viewers_own(make_napari_viewer, qtbot, model, sample_dir, errors):
    """napari gives plugin widgets a proxy of the viewer: the sessions must still hold the real layers."""
    from napari_medsam.segment.cache import EmbeddingCache, MemoryCache

    viewer = make_napari_viewer()
    a = viewer.open(str(sample_dir / "ct_phantom.nii.gz"), plugin="napari-medsam")[0]
    _, widget = viewer.window.add_plugin_dock_widget("napari-medsam", "MedSAM")
    widget.cache = EmbeddingCache(MemoryCache())
    widget.model_panel.set_model(model, "mobile_sam")
    assert widget.viewer is viewer and widget.image_layer is a and widget.controller.image_layer is a
    b = viewer.open(str(sample_dir / "ct_phantom_dicom"), plugin="napari-medsam")[0]
    assert widget.controller.image_layer is b
    for image in (a, b, a):
        pick(widget, image)
        settle(qtbot, widget)
    assert widget.controller.image_layer is a and set(widget.sessions) == {a, b}
    assert not any("[1]" in name for name in names(viewer)), names(viewer)
    assert names(viewer)[-1] == f"{a.name} points"  # the current scan's layers on top
    widget.stop_segmentation()
    assert errors() == []


def test_prompt_layers_are_drawn_above_the_labels(make_napari_viewer, qtbot, sample_dir):
    """However the layers came about (prepared at opening, made at the start), points stay visible on top."""
    from conftest import start_workflow, stop_workflow
    from test_predictor import tiny_model

    viewer = make_napari_viewer()
    widget, controller = start_workflow(viewer, tiny_model("sam", seed=3), sample_dir)
    qtbot.addWidget(widget)
    layers = list(viewer.layers)
    assert layers.index(controller.points_layer) > layers.index(controller.labels_layer)
    assert layers.index(controller.boxes_layer) > layers.index(controller.labels_layer)
    stop_workflow(qtbot, widget, controller)
