"""The dock widget fits napari's dock, says what to do next, and shows the planes in one step.

Through the real panel in a napari window: its least width (every group's, and the whole panel's
with its vertical scroll bar) before a scan, with a scan, and with a model; the "what to do next"
line in every state; controls that would show meaningless values stay hidden until a scan is
segmented; the plane buttons and Alt-A / Alt-C / Alt-S keys give the plane.
"""

from __future__ import annotations

import numpy as np
import pytest

MAX_PANEL = 380  # napari's default dock is about 398 px wide
MAX_GROUP = 370


@pytest.fixture(scope="module")
def model():
    from test_predictor import tiny_model

    return tiny_model("sam", seed=3)


@pytest.fixture
def docked(make_napari_viewer, qtbot):
    from napari_medsam._napari.widget import MedSamWidget
    from napari_medsam.segment.cache import EmbeddingCache, MemoryCache

    viewer = make_napari_viewer(show=True)
    widget = MedSamWidget(viewer)
    widget.cache = EmbeddingCache(MemoryCache())
    viewer.window.add_dock_widget(widget, name="MedSAM")  # napari's style sheet applies: real sizes
    yield viewer, widget
    controller = widget.controller
    if controller is not None:
        qtbot.waitUntil(lambda: controller.queue.running is None and not widget.propagate_panel.busy, timeout=30000)
    widget.stop_segmentation()


def widths(widget) -> dict:
    from qtpy.QtWidgets import QApplication, QGroupBox

    QApplication.processEvents()
    content = widget.scroll.widget()
    groups = {box.title(): box.minimumSizeHint().width() for box in content.findChildren(QGroupBox)
              if box.parent() is content}
    return {"panel": widget.minimumSizeHint().width(), **groups}


def assert_fits(widget) -> None:
    sizes = widths(widget)
    assert sizes["panel"] <= MAX_PANEL, sizes
    assert set(sizes) >= {"Scan", "Model", "Labels", "Objects", "Segment", "Propagate"}, sizes
    assert all(width <= MAX_GROUP for width in sizes.values()), sizes
    # The panel's least width covers its content and the vertical scroll bar: no sideways scrolling.
    content = widget.scroll.widget().minimumSizeHint().width()
    assert sizes["panel"] >= content + widget.scroll.verticalScrollBar().sizeHint().width()


def next_step(widget) -> str:
    text = widget.next_step_label.text()
    assert text.startswith("Next: ")
    return text[len("Next: "):]


def test_panel_fits_the_dock_and_says_what_to_do_next(docked, qtbot, model):
    from napari_medsam._napari.widget import NEXT_STEPS

    viewer, widget = docked
    assert_fits(widget)
    assert next_step(widget) == NEXT_STEPS["no scan"] == "Open a CT or MR scan (File > Open)."
    # Nothing meaningless before a model: no "0 to 0" slices, no 0-99 slider.
    assert widget.segment_panel.precompute_box.isHidden()
    assert widget.propagate_panel.range_slider.isHidden()

    viewer.open_sample("napari-medsam", "ct_phantom")
    assert_fits(widget)
    assert next_step(widget) == NEXT_STEPS["no model"] == "Load a model in the Model box."
    assert widget.segment_panel.precompute_box.isHidden() and widget.propagate_panel.range_slider.isHidden()

    widget.model_panel.set_model(model, "tiny-sam")
    controller = widget.controller
    assert controller is not None
    assert_fits(widget)
    assert next_step(widget) == "Click a structure on the image, or draw a box (R)."
    depth = controller.shape[0]
    panel = widget.segment_panel
    assert not panel.precompute_box.isHidden() and (panel.first.maximum(), panel.last.value()) == (depth - 1, depth - 1)
    assert not widget.propagate_panel.range_slider.isHidden()
    assert tuple(widget.propagate_panel.range_slider.value()) == (0, depth - 1)

    image = controller.image_layer
    middle = image.data.shape[0] // 2
    viewer.dims.set_point(0, image.data_to_world([middle, 0, 0])[0])
    qtbot.waitUntil(lambda: controller.queue.running is None and not controller.queue.pending, timeout=30000)
    controller.points_layer.add([middle, 84, 84])
    qtbot.waitUntil(lambda: (controller.labels_layer.data[middle] == 1).any(), timeout=30000)
    qtbot.waitUntil(lambda: next_step(widget) == NEXT_STEPS["object"], timeout=5000)
    assert next_step(widget) == "Propagate to segment it through the volume, or click more to refine."

    propagate = widget.propagate_panel
    propagate.stop_spins["max_empty_slices"].setValue(1)
    propagate.range_slider.setValue((middle - 2, middle + 2))
    propagate.limit_check.setChecked(True)
    assert not propagate.report_button.isEnabled()
    propagate.both_button.click()
    qtbot.waitUntil(lambda: not propagate.busy, timeout=60000)
    assert propagate.last_result is not None, propagate.status_label.text()
    assert next_step(widget) == "Check the report, correct a slice, then Export."
    assert_fits(widget)
    # The report opens larger, in a window of its own, with the same rows.
    assert propagate.report_button.isEnabled()
    window = propagate.open_report()
    assert window.isVisible() and window.table.rowCount() == propagate.table.rowCount() > 0
    assert window.table.item(0, 0).text() == propagate.table.item(0, 0).text()
    window.close()

    # Unloading the model goes back a step.
    widget.model_panel.set_model(None, "tiny-sam")
    assert next_step(widget) == NEXT_STEPS["no model"]


def test_long_messages_wrap_and_keep_the_whole_text(docked):
    viewer, widget = docked
    before = widths(widget)["panel"]
    message = "could not download the weights from " + "https://example.org/" + "x" * 300 + " " + "word " * 80
    widget.status.setText(message)
    assert widths(widget)["panel"] == before  # a long URL never widens the panel
    assert widget.status.text() == message and widget.status.toolTip() == message
    assert "…" in super(type(widget.status), widget.status).text()  # shown shortened


PLANE_KEYS = {"axial": "A", "coronal": "C", "sagittal": "S"}


def test_plane_buttons_and_keys(docked, qtbot):
    from qtpy.QtCore import Qt

    from canvas_events import key
    from napari_medsam._napari.keys import VIEW_KEYS, key_map_html
    from napari_medsam._napari.planes import current_plane

    viewer, widget = docked
    viewer.open_sample("napari-medsam", "ct_phantom")
    assert current_plane(viewer) == "axial"
    for plane in ("coronal", "sagittal", "axial"):
        button = getattr(widget, f"{plane}_button")
        assert button.isEnabled()
        button.click()
        assert current_plane(viewer) == plane
    # The keys on the canvas (napari's key map), whatever layer is selected.
    for plane in ("sagittal", "coronal", "axial"):
        key(viewer, getattr(Qt.Key, f"Key_{PLANE_KEYS[plane]}"), Qt.KeyboardModifier.AltModifier)
        assert current_plane(viewer) == plane
    # The head is up in coronal view, after the key as after the button.
    key(viewer, Qt.Key.Key_C, Qt.KeyboardModifier.AltModifier)
    assert str(getattr(viewer.camera.orientation2d[0], "value", viewer.camera.orientation2d[0])) == "up"
    # And in the panel (the focus on one of its buttons).
    widget.coronal_button.setFocus()
    key(viewer, Qt.Key.Key_S, Qt.KeyboardModifier.AltModifier, widget=widget.coronal_button)
    assert current_plane(viewer) == "sagittal"
    # The key map lists them.
    html = key_map_html()
    for name, (plane, text) in VIEW_KEYS.items():
        assert name.replace("-", "+") in html and text in html
    # Closing the panel gives the keys back.
    widget.close()
    view_order = tuple(viewer.dims.order)
    key(viewer, Qt.Key.Key_A, Qt.KeyboardModifier.AltModifier)
    assert tuple(viewer.dims.order) == view_order


def test_plane_buttons_disabled_without_a_scan(docked):
    viewer, widget = docked
    assert not any(button.isEnabled() for button in widget.plane_buttons.values())
    viewer.add_image(np.zeros((4, 5, 6), np.float32))
    assert all(button.isEnabled() for button in widget.plane_buttons.values())
