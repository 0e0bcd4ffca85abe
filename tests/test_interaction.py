"""Prompts and keys through napari's real event path: canvas mouse gestures and Qt key events.

Each gesture is one edit: a box drawn, moved or resized, a point dragged, prompts deleted with
the keyboard are predicted once, when the gesture ends, and undone with one Ctrl+Z.
"""

from __future__ import annotations

import numpy as np
import pytest
from canvas_events import canvas_pos, click, drag, key, move, press, release

from napari_medsam.segment.predictor import SlicePredictor

SHAPE = (12, 24, 32)  # (slice, row, column)
SCALE = (2.0, 1.0, 1.0)
PLANES = {"axial": ((0, 1, 2), 0, 5), "coronal": ((1, 0, 2), 1, 11)}  # dims order, axis, slice


@pytest.fixture(scope="module")
def model():
    from test_predictor import tiny_model

    return tiny_model("sam", seed=1)


@pytest.fixture
def calls(monkeypatch):
    """Every SlicePredictor.predict call: (axis, index, Prompts, multimask)."""
    recorded = []
    original = SlicePredictor.predict

    def spy(self, index, prompts, multimask=False, **kwargs):
        recorded.append((self.axis, int(index), prompts, multimask))
        return original(self, index, prompts, multimask, **kwargs)

    monkeypatch.setattr(SlicePredictor, "predict", spy)
    return recorded


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
    viewer.layers.selection.active = boxes
    boxes.mode = "add_rectangle"
    calls.clear()
    drag(viewer, boxes, on_plane(axis, index, 2, 4), on_plane(axis, index, 9, 20), steps=10, qtbot=qtbot,
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
    viewer.layers.selection.active = boxes
    boxes.mode = "add_rectangle"
    drag(viewer, boxes, [index, 4, 6], [index, 12, 18], qtbot=qtbot)
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
