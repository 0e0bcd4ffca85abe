"""Status that matches the screen: the IoU label, the propagation summary and the embedding order."""

from __future__ import annotations

import numpy as np
import pytest


from test_widget import model, settle, show_slice, workflow  # noqa: F401 (shared fixtures and helpers)


def test_iou_label_shows_the_active_objects_prediction_on_the_slice_shown(workflow, qtbot):
    viewer, widget, controller = workflow
    image, session = controller.image_layer, controller.session
    label = widget.segment_panel.iou
    middle = image.data.shape[0] // 2
    show_slice(viewer, image, middle)
    settle(qtbot, controller)
    assert "IoU: -" in label.text()  # nothing predicted yet
    controller.points_layer.add([middle, 84, 84])
    settle(qtbot, controller)
    first = session.predicted_iou(1, 0, middle)
    assert label.text().startswith(f"predicted IoU {first:.2f} (3 masks)")
    # A new prediction on another slice: its value while it is shown...
    show_slice(viewer, image, middle + 2)
    assert "IoU: -" in label.text()  # scrolled away: no stale value from the other slice
    settle(qtbot, controller)
    controller.points_layer.add([middle + 2, 60, 60])
    controller.points_layer.add([middle + 2, 90, 90])
    settle(qtbot, controller)
    second = session.predicted_iou(1, 0, middle + 2)
    assert label.text().startswith(f"predicted IoU {second:.2f} (1 mask)")
    # ...and the first slice's again when the user scrolls back.
    show_slice(viewer, image, middle)
    assert label.text().startswith(f"predicted IoU {first:.2f} (3 masks)")
    # Another object has no prediction here: "-" rather than object 1's value; back to object 1.
    widget.objects_panel.add_object()
    assert session.active == 2 and "IoU: -" in label.text()
    session.select(1)
    assert label.text().startswith(f"predicted IoU {first:.2f}")
    # Cycling shows the next candidate's value.
    widget.segment_panel.cycle_button.click()
    cycled = session.predicted_iou(1, 0, middle)
    assert label.text().startswith(f"predicted IoU {cycled:.2f}")
    np.testing.assert_allclose(cycled, session.candidate(1, 0, middle).masks.scores[1])


@pytest.fixture
def tall_scene(make_napari_viewer, model, qtbot, monkeypatch):
    """A 32-slice scan whose encoder is slow (a stand-in for a CPU encoder); records the slices embedded."""
    import time

    from napari_medsam._napari.controller import SegmentationController

    viewer = make_napari_viewer()
    volume = (np.random.default_rng(0).normal(size=(32, 24, 32)) * 200).astype(np.float32)
    image = viewer.add_image(volume, name="scan")
    labels = viewer.add_labels(np.zeros(volume.shape, np.uint8), name="seg")
    labels.selected_label = 1
    controller = SegmentationController(viewer, image, labels, model)
    settle(qtbot, controller)  # the slice shown first
    embedded: list[int] = []
    original = controller.embed_slices

    def slow_embed(axis, indices):
        for index in indices:
            embedded.append(int(index))
            time.sleep(0.3)
            yield from original(axis, [index])

    monkeypatch.setattr(controller, "embed_slices", slow_embed)
    yield viewer, controller, embedded
    qtbot.waitUntil(lambda: controller.queue.running is None, timeout=30000)
    controller.close()


def scroll(viewer, qtbot, indices) -> None:
    """Wheel steps through ``indices``, a few ms apart."""
    for index in indices:
        viewer.dims.set_point(0, index)
        qtbot.wait(15)


def test_the_slice_the_user_stops_on_is_embedded_first(tall_scene, qtbot):
    viewer, controller, embedded = tall_scene
    scroll(viewer, qtbot, [*range(21, 27), *range(25, 20, -1)])  # 21 -> 26 -> 21
    assert controller.current_plane() == (0, 21)
    qtbot.waitUntil(lambda: controller.queue.running is not None, timeout=5000)
    assert controller.queue.running == (0, 21) and controller.status == "embedding slice 21 (axial)..."
    settle(qtbot, controller)
    assert embedded == [21]  # the slices scrolled past were never embedded
    assert controller.is_embedded(0, 21) and not any(controller.is_embedded(0, i) for i in range(22, 27))
    assert controller.status == "ready"


def test_back_on_the_slice_being_embedded_drops_the_slices_scrolled_past(tall_scene, qtbot):
    viewer, controller, embedded = tall_scene
    scroll(viewer, qtbot, [21])
    qtbot.waitUntil(lambda: controller.queue.running == (0, 21), timeout=5000)
    scroll(viewer, qtbot, [22, 23, 24, 23, 22, 21])  # away and back while 21 is embedded
    assert controller.queue.running == (0, 21) and controller.queue.pending == []
    settle(qtbot, controller)
    assert embedded == [21]


def test_status_names_the_slice_embedded_while_another_is_shown(tall_scene, qtbot):
    viewer, controller, embedded = tall_scene
    scroll(viewer, qtbot, [26])
    qtbot.waitUntil(lambda: controller.queue.running == (0, 26), timeout=5000)
    scroll(viewer, qtbot, [21])  # the encoder cannot be interrupted: 26 ends first, then 21
    assert controller.status == "embedding slice 26 (axial), left earlier; slice 21 (shown) next..."
    assert controller.queue.pending == [(0, 21)]
    qtbot.waitUntil(lambda: controller.queue.running == (0, 21), timeout=10000)
    assert controller.status == "embedding slice 21 (axial)..."
    settle(qtbot, controller)
    assert embedded == [26, 21] and controller.status == "ready"
