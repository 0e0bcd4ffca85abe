"""The interactive controller in a real napari viewer, with a tiny random SAM network."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from napari_medsam.errors import LabelsMismatchError

SHAPE = (6, 24, 32)  # (slice, row, column): a different size on each axis
SCALE = (2.0, 1.0, 1.0)


@pytest.fixture(scope="module")
def model():
    from test_predictor import tiny_model

    return tiny_model("sam", seed=1)


@pytest.fixture
def scene(make_napari_viewer, model, qtbot):
    from napari_medsam._napari.controller import SegmentationController

    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    volume = (rng.normal(size=SHAPE) * 200).astype(np.float32)
    image = viewer.add_image(volume, name="scan", scale=SCALE, translate=(5.0, -3.0, 2.0))
    labels = viewer.add_labels(np.zeros(SHAPE, np.uint8), name="seg", scale=SCALE, translate=(5.0, -3.0, 2.0))
    labels.selected_label = 1
    controller = SegmentationController(viewer, image, labels, model)
    yield viewer, controller, labels
    qtbot.waitUntil(lambda: controller.queue.running is None, timeout=30000)
    controller.close()


def go_to(viewer, image, axis: int, index: int) -> None:
    """Put the view on slice ``index`` along data axis ``axis``."""
    point = list(viewer.dims.point)
    point[axis] = image.data_to_world([index if a == axis else 0 for a in range(3)])[axis]
    viewer.dims.set_point(axis, point[axis])


def settle(qtbot, controller) -> None:
    qtbot.waitUntil(lambda: controller.queue.running is None and not controller.queue.pending, timeout=30000)
    qtbot.wait(20)


def test_prompt_layers_share_the_scan_grid(scene):
    viewer, controller, _ = scene
    image = controller.image_layer
    for layer in (controller.points_layer, controller.boxes_layer):
        assert layer.ndim == 3
        np.testing.assert_allclose(layer.scale, image.scale)
        np.testing.assert_allclose(layer.translate, image.translate)
        np.testing.assert_allclose(layer.affine.affine_matrix, image.affine.affine_matrix)
    assert controller.points_layer.name == "scan points" and controller.boxes_layer.name == "scan boxes"
    assert controller.points_layer.mode == "add"


def test_points_write_only_their_slice_with_the_right_prompts(scene, qtbot, calls):
    viewer, controller, labels = scene
    go_to(viewer, controller.image_layer, 0, 3)
    assert controller.current_plane() == (0, 3)
    controller.points_layer.add([3, 10, 12])
    settle(qtbot, controller)
    assert calls and calls[-1][:2] == (0, 3)
    prompts = calls[-1][2]
    np.testing.assert_allclose(prompts.points, [[10, 12]])
    assert prompts.positive.tolist() == [True] and prompts.box is None
    assert calls[-1][3] is True  # one click: ambiguous, multimask
    written = controller.last_masks.masks[0]
    np.testing.assert_array_equal(labels.data[3] == 1, written)
    assert not np.any(np.delete(labels.data, 3, axis=0))
    # A negative point (feature set through the layer's defaults, as a Shift-click does).
    controller.points_layer.feature_defaults = {"positive": False, "axis": -1, "label": 0}
    controller.points_layer.add([3, 4, 20])
    settle(qtbot, controller)
    axis, index, prompts, multimask = calls[-1]
    assert (axis, index, multimask) == (0, 3, False)
    np.testing.assert_allclose(prompts.points, [[10, 12], [4, 20]])
    assert prompts.positive.tolist() == [True, False]
    np.testing.assert_array_equal(labels.data[3] == 1, controller.last_masks.masks[0])
    # Moving a point re-prompts; deleting all prompts of the slice removes its mask.
    data = controller.points_layer.data.copy()
    data[0, 1:] = [11, 13]
    controller.points_layer.data = data
    np.testing.assert_allclose(calls[-1][2].points, [[11, 13], [4, 20]])
    controller.points_layer.selected_data = {0, 1}
    controller.points_layer.remove_selected()
    assert not np.any(labels.data)


def test_box_drawn_through_the_shapes_api(scene, qtbot, calls):
    viewer, controller, labels = scene
    go_to(viewer, controller.image_layer, 0, 2)
    controller.boxes_layer.add_rectangles(np.array([[2, 15, 20], [2, 15, 4], [2, 5, 4], [2, 5, 20]], float))
    settle(qtbot, controller)
    axis, index, prompts, multimask = calls[-1]
    assert (axis, index, multimask) == (0, 2, False)
    np.testing.assert_allclose(prompts.box, [5, 4, 15, 20])
    assert prompts.points is None
    np.testing.assert_array_equal(labels.data[2] == 1, controller.last_masks.masks[0])
    assert controller.boxes_layer.features["axis"].tolist() == [0]


def test_other_planes_follow_the_displayed_axes(scene, qtbot, calls):
    viewer, controller, labels = scene
    image = controller.image_layer
    viewer.dims.order = (1, 0, 2)  # coronal: rows of the scan are the slices
    go_to(viewer, image, 1, 9)
    assert controller.current_plane() == (1, 9)
    controller.points_layer.add([4, 9, 17])
    settle(qtbot, controller)
    axis, index, prompts, _ = calls[-1]
    assert (axis, index) == (1, 9)
    np.testing.assert_allclose(prompts.points, [[4, 17]])  # (slice, column) in the coronal slice
    np.testing.assert_array_equal(labels.data[:, 9] == 1, controller.last_masks.masks[0])
    assert not np.any(np.delete(labels.data, 9, axis=1))
    viewer.dims.order = (2, 0, 1)  # sagittal
    go_to(viewer, image, 2, 30)
    controller.points_layer.add([1, 20, 30])
    settle(qtbot, controller)
    axis, index, prompts, _ = calls[-1]
    assert (axis, index) == (2, 30)
    np.testing.assert_allclose(prompts.points, [[1, 20]])
    assert controller.points_layer.features["axis"].tolist() == [1, 2]
    np.testing.assert_array_equal(labels.data[:, :, 30] == 1, controller.last_masks.masks[0])


def test_landing_on_a_slice_embeds_it_in_the_background(scene, qtbot):
    viewer, controller, _ = scene
    settle(qtbot, controller)
    statuses = []
    controller.status_changed.connect(statuses.append)
    go_to(viewer, controller.image_layer, 0, 4)
    assert controller.queue.pending == [(0, 4)]  # starts once the view has stayed there a moment
    qtbot.waitUntil(lambda: controller.queue.running == (0, 4), timeout=5000)
    assert controller.status == "embedding slice 4 (axial)..."
    settle(qtbot, controller)
    assert controller.status == "ready"
    assert controller.is_embedded(0, 4)
    assert statuses[0] == "embedding slice 4 (axial)..." and statuses[-1] == "ready"


def test_newer_landing_request_supersedes_queued_one(scene, qtbot):
    viewer, controller, _ = scene
    settle(qtbot, controller)
    image = controller.image_layer
    first, skipped, last = [i for i in range(SHAPE[0]) if not controller.is_embedded(0, i)][:3]
    go_to(viewer, image, 0, first)
    qtbot.waitUntil(lambda: controller.queue.running == (0, first), timeout=5000)  # the view stayed: it runs
    go_to(viewer, image, 0, skipped)  # queued...
    go_to(viewer, image, 0, last)  # ...and replaced
    assert controller.queue.running == (0, first)
    assert controller.queue.pending == [(0, last)]
    settle(qtbot, controller)
    assert controller.is_embedded(0, first) and controller.is_embedded(0, last)
    assert not controller.is_embedded(0, skipped)


def test_objects_keep_their_own_label_value(scene, qtbot):
    viewer, controller, labels = scene
    go_to(viewer, controller.image_layer, 0, 3)
    controller.points_layer.add([3, 6, 6])
    settle(qtbot, controller)
    first = labels.data[3] == 1
    assert first.any()
    labels.selected_label = 2
    controller.points_layer.feature_defaults = {"positive": True, "axis": -1, "label": 0}
    controller.points_layer.add([3, 18, 25])
    settle(qtbot, controller)
    assert controller.points_layer.features["label"].tolist() == [1, 2]
    second = controller.last_masks.masks[0]
    np.testing.assert_array_equal(labels.data[3] == 1, first)  # label 1 untouched
    np.testing.assert_array_equal(labels.data[3] == 2, second & ~first)
    # With overwrite, label 2 takes the pixels it predicts even where label 1 was.
    controller.overwrite = True
    controller.points_layer.add([3, 17, 24])
    settle(qtbot, controller)
    np.testing.assert_array_equal(labels.data[3] == 2, controller.last_masks.masks[0])


def test_cycle_mask_shows_the_other_candidates(scene, qtbot):
    viewer, controller, labels = scene
    go_to(viewer, controller.image_layer, 0, 1)
    controller.points_layer.add([1, 12, 16])
    settle(qtbot, controller)
    masks = controller.last_masks
    assert len(masks.scores) == 3 and controller.current_iou == pytest.approx(float(masks.scores[0]))
    iou = controller.cycle_mask()
    assert iou == pytest.approx(float(masks.scores[1])) and controller.current_iou == iou
    np.testing.assert_array_equal(labels.data[1] == 1, masks.masks[1])
    controller.cycle_mask()
    assert controller.cycle_mask() == pytest.approx(float(masks.scores[0]))  # wraps around
    np.testing.assert_array_equal(labels.data[1] == 1, masks.masks[0])
    # A single-mask prediction (two points) gains the multimask candidates when cycled.
    controller.points_layer.add([1, 3, 3])
    settle(qtbot, controller)
    assert len(controller.last_masks.scores) == 1
    controller.cycle_mask()
    assert len(controller.last_masks.scores) == 4


def test_fake_mouse_clicks_make_positive_and_negative_points(scene, qtbot, calls):
    from napari.utils._test_utils import read_only_mouse_event
    from napari.utils.interactions import mouse_press_callbacks, mouse_release_callbacks

    viewer, controller, _ = scene
    image, points = controller.image_layer, controller.points_layer
    go_to(viewer, image, 0, 2)
    for where, modifiers in (([2, 8, 9], []), ([2, 14, 21], ["Shift"])):
        world = tuple(image.data_to_world(where))
        for kind in ("mouse_press", "mouse_release"):
            event = read_only_mouse_event(type=kind, position=world, modifiers=modifiers, dims_displayed=[1, 2])
            (mouse_press_callbacks if kind == "mouse_press" else mouse_release_callbacks)(points, event)
        qtbot.wait(10)
        settle(qtbot, controller)
    assert points.features["positive"].tolist() == [True, False]
    assert points.feature_defaults["positive"][0]  # a plain click after a Shift-click is positive again
    np.testing.assert_allclose(calls[-1][2].points, [[8, 9], [14, 21]])
    assert calls[-1][2].positive.tolist() == [True, False]
    np.testing.assert_allclose(points.face_color[:, :3], [[0, 1, 0], [1, 0, 0]])


def test_canvas_click_goes_through_napari(scene, qtbot, calls):
    viewer, controller, labels = scene
    image = controller.image_layer
    go_to(viewer, image, 0, 4)
    settle(qtbot, controller)
    canvas = viewer.window._qt_viewer.canvas
    view = canvas.view
    transform = view.transform * view.scene.transform
    world = image.data_to_world([4, 12, 16])
    pos = transform.map([world[2], world[1]])[:2]
    canvas._scene_canvas.events.mouse_press(pos=pos, modifiers=(), button=1)
    canvas._scene_canvas.events.mouse_release(pos=pos, modifiers=(), button=1)
    settle(qtbot, controller)
    assert len(controller.points_layer.data) == 1
    axis, index, prompts, _ = calls[-1]
    assert (axis, index) == (0, 4)
    np.testing.assert_allclose(prompts.points, [[12, 16]], atol=0.5)
    assert (labels.data[4] == 1).sum() == controller.last_masks.masks[0].sum()


def test_encoder_never_blocks_the_event_loop(scene, qtbot, model, monkeypatch):
    # No clock here (a busy machine may stretch any gap; the largest gap is a benchmark figure,
    # benchmarks/bench_interactive.py). Instead: the encoder must run off the Qt thread, and the
    # Qt event loop must go on dispatching timer ticks while it runs. The slowed encoder does not
    # sleep for a fixed time: it waits until the event loop has delivered TICKS timer ticks
    # since it started. Run on the Qt thread, it would hold back those very ticks: the wait then
    # ends only at its deadlock guard (60 s, far beyond any load), and the assertions below fail.
    from qtpy.QtCore import QTimer

    TICKS = 5
    viewer, controller, _ = scene
    settle(qtbot, controller)
    original = model.encode
    main_thread = threading.get_ident()
    encoder_threads: list[int] = []
    inside = threading.Event()
    enough = threading.Event()
    ticks_inside: list[int] = []
    released: list[bool] = []  # per encode: did the ticks, not the guard, let it go on?

    def slow_encode(rgb):
        encoder_threads.append(threading.get_ident())
        inside.set()
        try:
            released.append(enough.wait(timeout=60))  # the timeout only guards against a deadlock
            return original(rgb)
        finally:
            inside.clear()

    def tick():
        if inside.is_set():
            ticks_inside.append(1)
            if len(ticks_inside) >= TICKS:
                enough.set()

    monkeypatch.setattr(model, "encode", slow_encode)
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(tick)
    timer.start()
    try:
        go_to(viewer, controller.image_layer, 0, 0)
        controller.points_layer.add([0, 5, 5])  # a prompt waiting for that embedding
        assert controller.queue.running == (0, 0)
        settle(qtbot, controller)
    finally:
        timer.stop()
        enough.set()
    assert encoder_threads and main_thread not in encoder_threads
    assert released and all(released) and len(ticks_inside) >= TICKS  # ticks counted only during an encode
    assert controller.last_masks is not None


def test_close_disconnects_and_keeps_layers(scene, qtbot, calls):
    viewer, controller, labels = scene
    settle(qtbot, controller)
    controller.close()
    names = [layer.name for layer in viewer.layers]
    assert names == ["scan", "seg", "scan boxes", "scan points"]
    controller.points_layer.add([0, 3, 3])
    viewer.dims.set_point(0, controller.image_layer.data_to_world([3, 0, 0])[0])
    qtbot.wait(50)
    assert not calls and not np.any(labels.data) and controller.queue.running is None


def test_labels_must_fit_the_scan(make_napari_viewer, model):
    from napari_medsam._napari.controller import SegmentationController

    viewer = make_napari_viewer()
    image = viewer.add_image(np.zeros(SHAPE, np.float32))
    labels = viewer.add_labels(np.zeros((6, 24, 31), np.uint8))
    with pytest.raises(LabelsMismatchError, match="new label layer"):
        SegmentationController(viewer, image, labels, model)


def test_signature_and_predictors_are_made_once_under_concurrent_callers(scene, qtbot, monkeypatch):
    """Embedding workers and the Qt thread call scan_signature()/predictor() at the same time."""
    import time

    from napari_medsam._napari import controller as controller_module

    viewer, controller, labels = scene
    settle(qtbot, controller)
    controller._signature = None  # back to a scan nobody has hashed yet
    controller._predictors.clear()
    hashing, release, hashed = threading.Event(), threading.Event(), threading.Event()
    hashes = []
    real_signature = controller_module.volume_signature

    def slow_signature(array, spacing):
        hashes.append(threading.current_thread().name)
        hashing.set()
        release.wait(10)  # a big scan: the hash runs until the test lets it end
        hashed.set()
        return real_signature(array, spacing)

    monkeypatch.setattr(controller_module, "volume_signature", slow_signature)
    results = []
    workers = [threading.Thread(target=lambda: results.append(controller.scan_signature())) for _ in range(2)]
    for worker in workers:
        worker.start()
    assert hashing.wait(5)
    # Meanwhile the Qt thread is not kept waiting for the hash: it is told there is no signature yet.
    with pytest.raises(RuntimeError, match="no slice embedded yet"):
        controller.predictor(0)
    assert not hashed.is_set()  # answered while the hash was still running (no clock involved)
    release.set()
    for worker in workers:
        worker.join(10)
    assert len(hashes) == 1 and len(results) == 2 and results[0] == results[1] is not None

    made = []
    make = controller._make_predictor

    def slow_make(axis, signature):
        made.append(axis)
        time.sleep(0.1)
        return make(axis, signature)

    monkeypatch.setattr(controller, "_make_predictor", slow_make)
    got = []
    workers = [threading.Thread(target=lambda: got.append(controller.predictor(1))) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(10)
    assert made == [1] and len(got) == 2 and got[0] is got[1] is controller.predictor(1)
