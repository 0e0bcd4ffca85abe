"""The "Segment everything" group in a real napari viewer: candidates layer, click to accept, accept all, undo.

The controller's predictor is the ground-truth stand-in on a CT phantom, so the candidates are
the phantom's organs and acceptance can be checked against the truth.
"""

from __future__ import annotations

import numpy as np
import pytest
from canvas_events import click
from test_controller import go_to, model, settle  # noqa: F401  (fixtures)
from test_everything import SharpStandIn

from napari_medsam._napari.propagate_run import key_masks
from napari_medsam.phantoms import make_ct_phantom

INDEX = 10


@pytest.fixture
def scene(make_napari_viewer, model, qtbot):  # noqa: F811
    from napari_medsam._napari.controller import SegmentationController
    from napari_medsam._napari.everything_panel import EverythingPanel

    viewer = make_napari_viewer(show=True)
    volume, gt, _ = make_ct_phantom(shape=(20, 96, 96), spacing_mm=(4.0, 3.6, 3.6), seed=0)
    image = viewer.add_image(volume.array.astype(np.float32), name="scan", scale=volume.spacing_mm)
    labels = viewer.add_labels(np.zeros(gt.shape, np.uint8), name="seg", scale=volume.spacing_mm)
    controller = SegmentationController(viewer, image, labels, model)
    stand_in = SharpStandIn(gt, spacing_mm=volume.spacing_mm, dropout=0.0, leak=0.0, boundary_px=0.5)
    controller.predictor = lambda axis: stand_in
    panel = EverythingPanel()
    qtbot.addWidget(panel)
    panel.set_controller(controller)
    panel.points.setValue(12)
    go_to(viewer, image, 0, INDEX)
    settle(qtbot, controller)
    yield viewer, controller, panel, gt
    qtbot.waitUntil(lambda: panel.worker is None, timeout=30000)
    panel.set_controller(None)
    qtbot.waitUntil(lambda: controller.queue.running is None, timeout=30000)
    controller.close()


def _run(qtbot, panel) -> None:
    steps = []
    panel.progressed.connect(lambda done, total: steps.append((done, total)))
    panel.run_button.click()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=60000)
    assert steps and steps[-1] == (144, 144)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return np.count_nonzero(a & b) / max(np.count_nonzero(a | b), 1)


def test_candidates_layer_shows_the_organs_and_leaves_the_labels_alone(scene, qtbot):
    viewer, controller, panel, gt = scene
    before = [o.value for o in controller.session.objects]  # the controller starts with an empty object
    _run(qtbot, panel)
    layer = viewer.layers["candidates"]
    assert layer is panel.layer and layer.data.shape == (1, 96, 96)
    # on the slice it came from: the world position of its pixel is the scan's slice INDEX
    np.testing.assert_allclose(layer.data_to_world([0, 5, 7]), controller.image_layer.data_to_world([INDEX, 5, 7]))
    assert not controller.labels_layer.data.any() and [o.value for o in controller.session.objects] == before
    np.testing.assert_array_equal(layer.data[0], panel.result.label_image())  # smaller candidates on top
    truth = gt[INDEX]
    for organ in (1, 2, 3, 4):  # liver, spleen, kidneys: each is a candidate
        best = max(_iou(c.mask, truth == organ) for c in panel.result.candidates)
        assert best > 0.8, (organ, best)
    assert "candidate(s)" in panel.state.text() and panel.accept_all_button.isEnabled()


def test_click_accepts_a_candidate_as_an_object_propagation_can_start_from(scene, qtbot):
    viewer, controller, panel, gt = scene
    before = len(controller.session.objects)
    _run(qtbot, panel)
    layer = panel.layer
    rows, cols = np.nonzero(gt[INDEX] == 1)  # a pixel deep inside the liver
    inside = np.argmax(np.minimum.reduce([rows - rows.min(), rows.max() - rows, cols - cols.min(), cols.max() - cols]))
    label = int(layer.data[0, rows[inside], cols[inside]])
    assert label
    click(viewer, layer, [0, rows[inside], cols[inside]])
    qtbot.wait(50)
    session = controller.session
    assert len(session.objects) == before + 1 and panel.accepted == {label: session.objects[-1].value}
    value = session.objects[-1].value
    assert session.active == value
    written = controller.labels_layer.data[INDEX] == value
    assert _iou(written, gt[INDEX] == 1) > 0.8
    assert not controller.labels_layer.data[INDEX + 1].any()  # one slice only
    assert not (layer.data == label).any()  # gone from the candidates
    assert session.predicted_slices(value, 0) == [INDEX]
    keys = key_masks(session, value, 0)
    assert list(keys) == [INDEX] and (keys[INDEX] == written).all()
    session.undo(value)  # acceptance is one undo step
    assert not controller.labels_layer.data.any()


def test_accept_all_adds_each_candidate_and_clear_removes_the_layer(scene, qtbot):
    viewer, controller, panel, gt = scene
    before = len(controller.session.objects)
    _run(qtbot, panel)
    count = len(panel.result.candidates)
    values = panel.accept_all()
    assert len(values) == count == len(controller.session.objects) - before
    written = controller.labels_layer.data[INDEX]
    assert set(np.unique(written)) - {0} <= set(values)
    # each object takes the voxels no earlier (larger) object took: together they cover every candidate
    union = np.logical_or.reduce([c.mask for c in panel.result.candidates]) if count else np.zeros_like(written, bool)
    assert ((written > 0) == union).all()
    assert all(controller.session.predicted_slices(v, 0) == [INDEX] for v in values)
    assert not panel.accept_all_button.isEnabled()
    panel.clear_button.click()
    assert "candidates" not in [layer.name for layer in viewer.layers] and panel.layer is None
    assert len(controller.session.objects) == before + count  # accepted objects stay


def test_cancel_stops_the_run_and_the_dock_widget_holds_the_group(scene, qtbot, make_napari_viewer):
    viewer, controller, panel, gt = scene
    panel.progressed.connect(lambda done, total: panel.cancel())
    panel.run_button.click()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=60000)
    assert panel.result is not None and panel.result.cancelled and panel.result.n_points == 144
    assert panel.state.text().startswith("cancelled")

    from napari_medsam._napari.widget import MedSamWidget

    widget = MedSamWidget(make_napari_viewer())
    qtbot.addWidget(widget)
    assert widget.everything_panel.parent() is widget.propagate_panel.parent()
    assert not widget.everything_panel.run_button.isEnabled()  # no scan, no model
