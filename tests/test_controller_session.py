"""Objects, undo/redo, hand paint and clearing through the controller in a real napari viewer."""

from __future__ import annotations

import numpy as np
import pytest
from test_controller import SHAPE, go_to, model, scene, settle  # noqa: F401  (fixtures)


def click(controller, qtbot, where, positive=True):
    points = controller.points_layer
    points.feature_defaults = {"positive": positive, "axis": -1, "label": 0}
    points.add(where)
    points.feature_defaults = {"positive": True, "axis": -1, "label": 0}
    settle(qtbot, controller)


def test_undo_redo_restore_masks_and_prompt_markers(scene, qtbot):
    viewer, controller, labels = scene
    go_to(viewer, controller.image_layer, 0, 3)
    click(controller, qtbot, [3, 10, 12])
    first = labels.data.copy()
    assert first[3].any()
    click(controller, qtbot, [3, 4, 20], positive=False)
    second = labels.data.copy()
    assert len(controller.points_layer.data) == 2
    controller.undo()
    np.testing.assert_array_equal(labels.data, first)
    assert len(controller.points_layer.data) == 1  # the negative point's marker is gone too
    np.testing.assert_allclose(controller.points_layer.data, [[3, 10, 12]])
    controller.undo()
    assert not labels.data.any() and len(controller.points_layer.data) == 0
    controller.redo()
    controller.redo()
    np.testing.assert_array_equal(labels.data, second)
    assert controller.points_layer.features["positive"].tolist() == [True, False]
    assert controller.points_layer.features["axis"].tolist() == [0, 0]
    # Undo/redo did not trigger new predictions: the groups agree with the layers.
    controller.refresh_prompts()
    np.testing.assert_array_equal(labels.data, second)


def test_undo_is_per_object(scene, qtbot):
    viewer, controller, labels = scene
    go_to(viewer, controller.image_layer, 0, 2)
    click(controller, qtbot, [2, 5, 6])
    one = labels.data == 1
    labels.selected_label = 2
    assert controller.session.active == 2
    controller.overwrite = True  # a random network's mask may cover the whole slice
    click(controller, qtbot, [2, 18, 25])
    assert (labels.data == 2).any()
    labels.selected_label = 1
    two = labels.data == 2
    controller.undo()  # undoes object 1 only: its voxels that object 2 took stay object 2's
    assert not (labels.data == 1).any()
    np.testing.assert_array_equal(labels.data == 2, two)
    controller.redo()
    np.testing.assert_array_equal(labels.data == 1, one & ~two)


def test_hand_paint_is_kept_and_undoable(scene, qtbot):
    viewer, controller, labels = scene
    go_to(viewer, controller.image_layer, 0, 4)
    labels.paint((4, 2, 2), 1)  # napari's brush: a paint event
    painted = labels.data == 1
    assert painted.any()
    # A prompt elsewhere on the slice: the model never erases the hand-painted voxels.
    click(controller, qtbot, [4, 18, 26])
    assert np.all(labels.data[painted] == 1)
    assert controller.session.locked_mask()[painted].all()
    controller.undo()  # the prediction
    controller.undo()  # the stroke
    assert not labels.data.any()
    controller.redo()
    np.testing.assert_array_equal(labels.data == 1, painted)


def test_selecting_a_label_in_napari_selects_or_adds_the_object(scene, qtbot):
    viewer, controller, labels = scene
    assert [o.value for o in controller.session.objects] == [1]
    labels.selected_label = 3
    assert [o.value for o in controller.session.objects] == [1, 3] and controller.session.active == 3
    controller.next_object()
    assert controller.session.active == 1 and labels.selected_label == 1
    controller.previous_object()
    assert labels.selected_label == 3
    # The layer shows each object in its table colour.
    colors = labels.colormap.color_dict
    for obj in controller.session.objects:
        np.testing.assert_allclose(colors[obj.value][:3], np.array(obj.color) / 255, atol=1e-6)


def test_clear_accept_and_delete(scene, qtbot):
    viewer, controller, labels = scene
    go_to(viewer, controller.image_layer, 0, 1)
    click(controller, qtbot, [1, 12, 16])
    go_to(viewer, controller.image_layer, 0, 5)
    click(controller, qtbot, [5, 12, 16])
    mask5 = labels.data[5].copy()
    controller.accept_slice()  # markers of slice 5 go, its mask stays
    assert controller.points_layer.data[:, 0].tolist() == [1]
    np.testing.assert_array_equal(labels.data[5], mask5)
    go_to(viewer, controller.image_layer, 0, 1)
    controller.clear_slice()
    assert not labels.data[1].any() and len(controller.points_layer.data) == 0
    controller.undo()
    assert labels.data[1].any() and len(controller.points_layer.data) == 1
    controller.delete_object()
    assert not labels.data.any() and controller.session.objects == []
    controller.session.undo(1)
    assert labels.data[1].any() and labels.data[5].any() and len(controller.points_layer.data) == 1


def test_shortcuts_are_bound_and_released(scene, qtbot):
    viewer, controller, labels = scene
    go_to(viewer, controller.image_layer, 0, 3)
    click(controller, qtbot, [3, 10, 12])
    assert labels.data.any()
    controller.points_layer.keymap  # noqa: B018 (exists)
    from napari.utils.key_bindings import KeyBinding

    key = KeyBinding.from_str("Control-Z")
    for layer in (controller.points_layer, controller.labels_layer, controller.boxes_layer):
        assert key in layer.keymap
    controller.points_layer.keymap[key](controller.points_layer)
    assert not labels.data.any()
    controller.close()
    assert key not in controller.points_layer.keymap


def test_multimask_cycle_is_undoable(scene, qtbot):
    viewer, controller, labels = scene
    go_to(viewer, controller.image_layer, 0, 2)
    click(controller, qtbot, [2, 12, 16])
    best = labels.data.copy()
    iou = controller.cycle_mask()
    assert iou == pytest.approx(float(controller.last_masks.scores[1]))
    controller.undo()
    np.testing.assert_array_equal(labels.data, best)


def test_a_2d_image_segments_like_one_slice(make_napari_viewer, model, qtbot):
    from napari_medsam._napari.controller import SegmentationController

    viewer = make_napari_viewer()
    rng = np.random.default_rng(1)
    image = viewer.add_image((rng.normal(size=(24, 32)) * 200).astype(np.float32), name="xray")
    labels = viewer.add_labels(np.zeros((24, 32), np.uint8), name="seg")
    labels.selected_label = 1
    controller = SegmentationController(viewer, image, labels, model)
    try:
        assert controller.points_layer.ndim == 2 and controller.current_plane() == (0, 0)
        controller.points_layer.add([10, 12])
        settle(qtbot, controller)
        np.testing.assert_array_equal(labels.data == 1, controller.last_masks.masks[0])
        controller.boxes_layer.add_rectangles(np.array([[2, 3], [2, 20], [15, 20], [15, 3]], float))
        settle(qtbot, controller)
        assert controller.boxes_layer.features["axis"].tolist() == [0]
        controller.undo()
        assert len(controller.boxes_layer.data) == 0 and len(controller.points_layer.data) == 1
        labels.paint((1, 1), 1)  # hand paint on a 2D layer is recorded too
        qtbot.wait(20)
        assert controller.session.locked_mask()[0, 1, 1]
    finally:
        qtbot.waitUntil(lambda: controller.queue.running is None, timeout=30000)
        controller.close()


def test_a_negative_point_shrinks_the_mask(make_napari_viewer, model, qtbot):
    """With a predictor that follows the prompts (ground truth; exclude points carve), a Shift-click removes area."""
    from gt_predictor import GroundTruthPredictor

    from napari_medsam._napari.controller import SegmentationController

    viewer = make_napari_viewer()
    truth = np.zeros(SHAPE, np.uint8)
    rows, cols = np.mgrid[: SHAPE[1], : SHAPE[2]]
    truth[2:5][:, (rows - 12) ** 2 + (cols - 16) ** 2 < 8**2] = 1
    image = viewer.add_image(truth.astype(np.float32) * 300, name="scan")
    labels = viewer.add_labels(np.zeros(SHAPE, np.uint8), name="seg")
    labels.selected_label = 1
    controller = SegmentationController(viewer, image, labels, model)
    stand_in = GroundTruthPredictor(truth, boundary_px=0, dropout=0, leak=0)
    stand_in.is_embedded = lambda index: True
    controller.predictor = lambda axis: stand_in
    try:
        go_to(viewer, image, 0, 3)
        settle(qtbot, controller)
        click(controller, qtbot, [3, 12, 16])
        full = int((labels.data[3] == 1).sum())
        assert full == int(truth[3].sum())
        click(controller, qtbot, [3, 12, 20], positive=False)
        smaller = int((labels.data[3] == 1).sum())
        assert 0 < smaller < full and labels.data[3, 12, 20] == 0
        controller.undo()
        assert int((labels.data[3] == 1).sum()) == full
    finally:
        qtbot.waitUntil(lambda: controller.queue.running is None, timeout=30000)
        controller.close()
