"""Prompts and keys through napari's real event path: canvas mouse gestures and Qt key events.

Each gesture is one edit: a box drawn, moved or resized, a point dragged, prompts deleted with
the keyboard are predicted once, when the gesture ends, and undone with one Ctrl+Z.
"""

from __future__ import annotations

import numpy as np
import pytest
from canvas_events import click, drag, key


SHAPE = (12, 24, 32)  # (slice, row, column)
SCALE = (2.0, 1.0, 1.0)
PLANES = {"axial": ((0, 1, 2), 0, 5), "coronal": ((1, 0, 2), 1, 11)}  # dims order, axis, slice


@pytest.fixture(scope="module")
def model():
    from test_predictor import tiny_model

    return tiny_model("sam", seed=1)


@pytest.fixture
def scene(make_napari_viewer, model, qtbot):
    from napari_medsam._napari.controller import SegmentationController

    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(900, 700)
    rng = np.random.default_rng(0)
    volume = (rng.normal(size=SHAPE) * 200).astype(np.float32)
    image = viewer.add_image(volume, name="scan", scale=SCALE, contrast_limits=(-100, 200))
    labels = viewer.add_labels(np.zeros(SHAPE, np.uint8), name="seg", scale=SCALE)
    labels.selected_label = 1
    controller = SegmentationController(viewer, image, labels, model)
    yield viewer, controller, labels
    qtbot.waitUntil(lambda: controller.queue.running is None, timeout=30000)
    controller.close()


def show(viewer, controller, plane: str, qtbot) -> tuple[int, int]:
    """Show a plane of the scan, embedded and fitted to the canvas; returns (axis, index)."""
    order, axis, index = PLANES[plane]
    viewer.dims.order = order
    image = controller.image_layer
    viewer.dims.set_point(axis, image.data_to_world([index if a == axis else 0 for a in range(3)])[axis])
    viewer.reset_view()
    qtbot.wait(10)
    settle(qtbot, controller)
    assert controller.current_plane() == (axis, index)
    return axis, index


def settle(qtbot, controller) -> None:
    qtbot.waitUntil(lambda: controller.queue.running is None and not controller.queue.pending, timeout=30000)
    qtbot.wait(20)


def on_plane(axis: int, index: int, row: float, col: float) -> list[float]:
    coord = [row, col]
    coord.insert(axis, index)
    return coord


def box_of(boxes, row: int) -> np.ndarray:
    """(r0, c0, r1, c1) of a box in its plane."""
    axis = int(boxes.features["axis"].iloc[row])
    inplane = np.asarray(boxes.data[row])[:, [a for a in range(3) if a != axis]]
    return np.concatenate([inplane.min(0), inplane.max(0)])


def draw_box(viewer, controller, start, end, qtbot, **kwargs) -> None:
    """Select the boxes layer, press R (add rectangle) and drag from ``start`` to ``end`` (data coordinates)."""
    boxes = controller.boxes_layer
    viewer.layers.selection.active = boxes
    boxes.mode = "add_rectangle"
    drag(viewer, boxes, start, end, qtbot=qtbot, **kwargs)


def undo_depth(controller) -> int:
    """How many Ctrl+Z the active object takes to get back to nothing."""
    session, steps = controller.session, 0
    while session.can_undo():
        session.undo()
        steps += 1
    return steps


@pytest.mark.parametrize("plane", ["axial", "coronal"])
def test_box_drawn_with_the_mouse_is_segmented_once_on_release(scene, qtbot, calls, plane):
    viewer, controller, labels = scene
    axis, index = show(viewer, controller, plane, qtbot)
    boxes = controller.boxes_layer
    calls.clear()
    draw_box(viewer, controller, on_plane(axis, index, 2, 4), on_plane(axis, index, 9, 20), qtbot, steps=10,
             during=lambda: calls_mid.append(len(calls)))
    settle(qtbot, controller)
    assert calls_mid == [0]  # nothing predicted while dragging
    assert len(calls) == 1, calls
    got_axis, got_index, prompts, multimask = calls[0]
    assert (got_axis, got_index, multimask) == (axis, index, False)
    np.testing.assert_allclose(prompts.box, [2, 4, 9, 20], atol=0.6)
    assert boxes.features["axis"].tolist() == [axis] and boxes.features["label"].tolist() == [1]
    written = np.take(labels.data, index, axis=axis) == 1
    np.testing.assert_array_equal(written, controller.last_masks.masks[0])
    assert not np.delete(labels.data, index, axis=axis).any()
    assert undo_depth(controller) == 1


calls_mid: list[int] = []


@pytest.fixture(autouse=True)
def _reset_mid():
    calls_mid.clear()


def test_moving_and_resizing_a_box_resegments_once(scene, qtbot, calls):
    viewer, controller, labels = scene
    axis, index = show(viewer, controller, "axial", qtbot)
    boxes = controller.boxes_layer
    draw_box(viewer, controller, [index, 4, 6], [index, 12, 18], qtbot)
    settle(qtbot, controller)
    before = labels.data[index].copy()
    # Move: select mode, drag the box by its inside.
    boxes.mode = "select"
    calls.clear()
    drag(viewer, boxes, [index, 8, 12], [index, 11, 17], steps=12, qtbot=qtbot,
         during=lambda: calls_mid.append(len(calls)))
    settle(qtbot, controller)
    assert calls_mid == [0] and len(calls) == 1
    np.testing.assert_allclose(calls[0][2].box, [7, 11, 15, 23], atol=0.6)
    np.testing.assert_allclose(box_of(boxes, 0), [7, 11, 15, 23], atol=0.6)
    assert not np.array_equal(before, labels.data[index]) or calls[0][2].box is not None
    # Resize: drag the bottom-right handle of the selected box.
    boxes.selected_data = {0}
    calls.clear()
    drag(viewer, boxes, [index, 15, 23], [index, 20, 28], steps=12, qtbot=qtbot,
         during=lambda: calls_mid.append(len(calls)))
    settle(qtbot, controller)
    assert calls_mid == [0, 0] and len(calls) == 1
    np.testing.assert_allclose(calls[0][2].box, [7, 11, 20, 28], atol=0.6)
    np.testing.assert_array_equal(labels.data[index] == 1, controller.last_masks.masks[0])
    assert undo_depth(controller) == 3  # draw, move, resize


def test_dragging_a_point_predicts_once_and_undoes_in_one_step(scene, qtbot, calls):
    viewer, controller, labels = scene
    axis, index = show(viewer, controller, "axial", qtbot)
    points = controller.points_layer
    viewer.layers.selection.active = points
    points.mode = "add"
    click(viewer, points, [index, 8, 10])
    settle(qtbot, controller)
    assert len(points.data) == 1 and len(calls) == 1
    first_mask = labels.data[index].copy()
    points.mode = "select"
    points.selected_data = {0}
    calls.clear()
    drag(viewer, points, [index, 8, 10], [index, 16, 22], steps=30, qtbot=qtbot,
         during=lambda: calls_mid.append(len(calls)))
    settle(qtbot, controller)
    assert calls_mid == [0] and len(calls) == 1, len(calls)
    np.testing.assert_allclose(calls[0][2].points, [[16, 22]], atol=0.6)
    np.testing.assert_allclose(points.data[0], [index, 16, 22], atol=0.6)
    # One Ctrl+Z takes the whole drag back: the point and its mask.
    key(viewer, _qt().Key_Z, _qt().KeyboardModifier.ControlModifier)
    np.testing.assert_allclose(points.data, [[index, 8, 10]], atol=1e-6)
    np.testing.assert_array_equal(labels.data[index], first_mask)
    assert controller.session.can_undo()  # the click itself is the next step back


def test_right_click_adds_an_exclude_point(scene, qtbot, calls):
    from napari_medsam._napari.keys import key_map_html

    viewer, controller, labels = scene
    axis, index = show(viewer, controller, "axial", qtbot)
    points = controller.points_layer
    viewer.layers.selection.active = points
    points.mode = "add"
    click(viewer, points, [index, 8, 10])  # left: include
    settle(qtbot, controller)
    click(viewer, points, [index, 16, 22], button=2)  # right: exclude
    settle(qtbot, controller)
    assert points.features["positive"].tolist() == [True, False]
    np.testing.assert_allclose(calls[-1][2].points, [[8, 10], [16, 22]], atol=0.6)
    assert calls[-1][2].positive.tolist() == [True, False]
    np.testing.assert_allclose(points.face_color[:, :3], [[0, 1, 0], [1, 0, 0]])
    # The next left-click is an include point again; the key map says so.
    click(viewer, points, [index, 4, 26])
    settle(qtbot, controller)
    assert points.features["positive"].tolist() == [True, False, True]
    assert "right-click" in key_map_html()


def _qt():
    from qtpy.QtCore import Qt

    return Qt


def test_deleting_prompts_with_the_keyboard_repredicts_once(scene, qtbot, calls):
    viewer, controller, labels = scene
    axis, index = show(viewer, controller, "axial", qtbot)
    points, boxes = controller.points_layer, controller.boxes_layer
    viewer.layers.selection.active = points
    click(viewer, points, [index, 8, 10])
    click(viewer, points, [index, 18, 25], modifiers=["Shift"])
    settle(qtbot, controller)
    assert points.features["positive"].tolist() == [True, False]
    points.mode = "select"
    points.selected_data = {1}
    calls.clear()
    key(viewer, _qt().Key_Delete)
    settle(qtbot, controller)
    assert len(points.data) == 1 and len(calls) == 1
    np.testing.assert_allclose(calls[0][2].points, [[8, 10]], atol=0.6)
    # A box deleted with Backspace: its slice is predicted from the remaining point, once.
    draw_box(viewer, controller, [index, 3, 3], [index, 14, 20], qtbot)
    settle(qtbot, controller)
    boxes.mode = "select"
    boxes.selected_data = {0}
    calls.clear()
    key(viewer, _qt().Key_Backspace)
    settle(qtbot, controller)
    assert len(boxes.data) == 0 and len(calls) == 1 and calls[0][2].box is None
    # The last prompt removed with the layer's delete button: the model's mask goes too.
    viewer.layers.selection.active = points
    points.selected_data = {0}
    calls.clear()
    controls = viewer.window._qt_viewer.controls.widgets[points]
    controls.delete_button.click()
    settle(qtbot, controller)
    assert len(points.data) == 0 and not calls and not labels.data.any()


@pytest.mark.parametrize("plane", ["coronal", "axial"])
def test_a_redrawn_box_replaces_the_objects_box_on_that_slice(scene, qtbot, calls, plane):
    viewer, controller, labels = scene
    axis, index = show(viewer, controller, plane, qtbot)
    boxes = controller.boxes_layer
    draw_box(viewer, controller, on_plane(axis, index, 2, 4), on_plane(axis, index, 9, 20), qtbot)
    settle(qtbot, controller)
    calls.clear()
    draw_box(viewer, controller, on_plane(axis, index, 3, 6), on_plane(axis, index, 10, 26), qtbot)
    settle(qtbot, controller)
    assert len(boxes.data) == 1 and len(calls) == 1
    np.testing.assert_allclose(box_of(boxes, 0), [3, 6, 10, 26], atol=0.6)
    np.testing.assert_allclose(calls[0][2].box, [3, 6, 10, 26], atol=0.6)
    # Undo brings the first box back, in the layer and in the labels.
    key(viewer, _qt().Key_Z, _qt().KeyboardModifier.ControlModifier)
    assert len(boxes.data) == 1
    np.testing.assert_allclose(box_of(boxes, 0), [2, 4, 9, 20], atol=0.6)
    # Another object's box on the same slice is kept beside it.
    labels.selected_label = 2
    draw_box(viewer, controller, on_plane(axis, index, 12, 2), on_plane(axis, index, 20, 12), qtbot)
    settle(qtbot, controller)
    assert sorted(boxes.features["label"].tolist()) == [1, 2]


def test_a_coronal_box_is_never_applied_later_from_another_plane(scene, qtbot, calls):
    viewer, controller, labels = scene
    axis, index = show(viewer, controller, "coronal", qtbot)
    points = controller.points_layer
    draw_box(viewer, controller, [2, index, 4], [9, index, 20], qtbot)
    settle(qtbot, controller)
    assert [(a, i) for a, i, _, _ in calls] == [(1, index)]  # segmented at once, on screen
    coronal = labels.data[:, index].copy()
    axial, slice_ = show(viewer, controller, "axial", qtbot)
    viewer.layers.selection.active = points
    points.mode = "add"
    calls.clear()
    click(viewer, points, [slice_, 20, 28])
    settle(qtbot, controller)
    assert [(a, i) for a, i, _, _ in calls] == [(0, slice_)]  # only the axial click's slice
    np.testing.assert_array_equal(labels.data[:, index][np.arange(SHAPE[0]) != slice_],
                                  coronal[np.arange(SHAPE[0]) != slice_])


def test_a_prompt_waiting_for_its_embedding_says_where_it_landed(scene, qtbot, calls):
    viewer, controller, labels = scene
    axis, index = show(viewer, controller, "axial", qtbot)
    other = (index + 3) % SHAPE[0]
    assert not controller.is_embedded(0, other)
    points = controller.points_layer
    controller.points_layer.add([other, 5, 5])  # e.g. a prompt made just before leaving the slice
    assert controller.queue.running == (0, other) or (0, other) in controller.queue.pending
    statuses: list[str] = []
    controller.status_changed.connect(statuses.append)
    settle(qtbot, controller)
    assert calls and calls[-1][:2] == (0, other)
    assert any(f"slice {other} (axial)" in s and "segmented" in s for s in statuses), statuses
    assert len(points.data) == 1


@pytest.mark.parametrize("layer_name", ["scan", "seg", "scan points", "scan boxes", "other image"])
def test_plugin_keys_work_whichever_layer_is_selected(scene, qtbot, layer_name):
    viewer, controller, labels = scene
    viewer.add_image(np.zeros(SHAPE, np.float32), name="other image", scale=SCALE, visible=False,
                     contrast_limits=(0, 1))
    axis, index = show(viewer, controller, "axial", qtbot)
    controller.points_layer.add([index, 8, 10])  # one click: three candidates
    settle(qtbot, controller)
    viewer.layers.selection.active = viewer.layers[layer_name]
    limits = {layer.name: tuple(layer.contrast_limits) for layer in viewer.layers if hasattr(layer, "contrast_limits")}
    Qt = _qt()
    key(viewer, Qt.Key_C)  # next candidate, never the Image layer's auto-contrast
    assert controller.session.candidate(1, 0, index).choice == 1
    assert {layer.name: tuple(layer.contrast_limits) for layer in viewer.layers
            if hasattr(layer, "contrast_limits") and layer.name in limits} == limits
    key(viewer, Qt.Key_M)  # a new object with the next free value, selected
    assert [o.value for o in controller.session.objects] == [1, 2] and controller.session.active == 2
    key(viewer, Qt.Key_N)
    assert controller.session.active == 1
    key(viewer, Qt.Key_N, Qt.KeyboardModifier.ShiftModifier)
    assert controller.session.active == 2
    controller.session.select(1)
    key(viewer, Qt.Key_Z, Qt.KeyboardModifier.ControlModifier)
    assert controller.session.candidate(1, 0, index).choice == 0  # the cycle undone
    key(viewer, Qt.Key_Z, Qt.KeyboardModifier.ControlModifier | Qt.KeyboardModifier.ShiftModifier)
    assert controller.session.candidate(1, 0, index).choice == 1


def test_m_always_makes_a_new_object(scene, qtbot):
    viewer, controller, labels = scene
    session = controller.session
    assert [o.value for o in session.objects] == [1] and not labels.data.any()  # a fresh session
    viewer.layers.selection.active = labels  # napari's own M would say "label 1 is not used" here
    key(viewer, _qt().Key_M)
    assert [o.value for o in session.objects] == [1, 2] and labels.selected_label == 2
    session.add_object(value=3, select=False)  # 2 and 3 exist and are empty
    session.select(1)
    key(viewer, _qt().Key_M)
    assert [o.value for o in session.objects] == [1, 2, 3, 4] and session.active == 4
    assert labels.selected_label == 4


def test_keys_are_given_back_on_close(scene, qtbot):
    from napari.utils.key_bindings import coerce_keybinding

    viewer, controller, labels = scene
    image = controller.image_layer
    assert coerce_keybinding("C") in image.keymap
    controller.close()
    for target in (image, labels, viewer):
        assert coerce_keybinding("C") not in target.keymap and coerce_keybinding("M") not in target.keymap
    viewer.layers.selection.active = image
    key(viewer, _qt().Key_C)  # napari's own auto-contrast again
    assert tuple(image.contrast_limits) != (-100, 200)


@pytest.fixture
def workflow(make_napari_viewer, qtbot, model, sample_dir):
    from conftest import start_workflow, stop_workflow

    viewer = make_napari_viewer(show=True)
    widget, controller = start_workflow(viewer, model, sample_dir, dock=True)
    yield viewer, widget, controller
    stop_workflow(qtbot, widget, controller)


def _focus(qtbot, widget) -> None:
    from qtpy.QtWidgets import QApplication

    window = widget.window()
    window.activateWindow()
    qtbot.waitUntil(lambda: QApplication.activeWindow() is window, timeout=5000)
    widget.setFocus()
    qtbot.waitUntil(lambda: QApplication.focusWidget() is widget, timeout=5000)


def test_keys_reach_the_plugin_from_the_objects_table(workflow, qtbot):
    viewer, widget, controller = workflow
    Qt = _qt()
    table = widget.objects_panel.table
    session = controller.session
    _focus(qtbot, table)
    key(viewer, Qt.Key_M, widget=table)
    assert [o.value for o in session.objects] == [1, 2] and session.active == 2
    assert table.currentRow() == 1
    key(viewer, Qt.Key_N, widget=table)
    assert session.active == 1 and table.currentRow() == 0
    key(viewer, Qt.Key_N, Qt.KeyboardModifier.ShiftModifier, widget=table)
    assert session.active == 2
    session.select(1)
    # C on the table cycles the candidates of the shown slice; Ctrl+Z there undoes it, once.
    middle = controller.image_layer.data.shape[0] // 2
    viewer.dims.set_point(0, controller.image_layer.data_to_world([middle, 0, 0])[0])
    controller.points_layer.add([middle, 84, 84])
    qtbot.waitUntil(lambda: controller.last_masks is not None, timeout=30000)
    _focus(qtbot, table)
    key(viewer, Qt.Key_C, widget=table)
    assert session.candidate(1, 0, middle).choice == 1
    key(viewer, Qt.Key_Z, Qt.KeyboardModifier.ControlModifier, widget=table)
    assert session.candidate(1, 0, middle).choice == 0
    key(viewer, Qt.Key_Z, Qt.KeyboardModifier.ControlModifier | Qt.KeyboardModifier.ShiftModifier, widget=table)
    assert session.candidate(1, 0, middle).choice == 1
    # While a name is edited, the letters go into the name.
    table.editItem(table.item(0, 1))
    editor = QApplicationFocus()
    assert editor is not table
    key(viewer, Qt.Key_A, widget=editor)
    key(viewer, Qt.Key_N, widget=editor)
    typed = editor.currentText() if hasattr(editor, "currentText") else editor.text()  # the name picker
    assert typed == "an" and session.active == 1
    # Enter commits the name (with the name picker's suggestions open, a click elsewhere first
    # closes them, as in any Qt completer).
    key(viewer, Qt.Key_Return, widget=editor)
    qtbot.wait(10)
    assert session.object(1).name.endswith("an") and session.active == 1


def QApplicationFocus():  # noqa: N802
    from qtpy.QtWidgets import QApplication

    return QApplication.focusWidget()


def test_precompute_says_so_at_once_and_lists_the_keys(workflow, qtbot, model, monkeypatch):
    import time

    viewer, widget, controller = workflow
    settle(qtbot, controller)
    panel = widget.segment_panel
    original = model.encode
    monkeypatch.setattr(model, "encode", lambda rgb: (time.sleep(0.3), original(rgb))[1])
    panel.first.setValue(3)
    panel.last.setValue(6)
    panel.precompute_button.click()
    assert panel.state.text() == "Precomputing slices 3-6 (axial)..."  # before any slice is done
    qtbot.waitUntil(lambda: "(1/4)" in panel.state.text(), timeout=20000)
    assert "Precomputing slices 3-6 (axial)" in panel.state.text()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=30000)
    assert "done: 4/4" in panel.state.text()
    # The Keys help lists every binding.
    from napari_medsam._napari.keys import SHORTCUTS, qt_key_sequence

    assert not panel.help.isVisible()
    panel.keys_button.click()
    assert panel.help.isVisible()
    for key_name, (_, text) in SHORTCUTS.items():
        assert qt_key_sequence(key_name) in panel.help.text() and text in panel.help.text()
