"""Issue 11: the canvas text out of the toasts' corner, refinement from earlier logits, configurable keys."""

from __future__ import annotations

import numpy as np
import pytest

from test_controller import SCALE, SHAPE, go_to, settle


@pytest.fixture(scope="module")
def model():
    from test_predictor import tiny_model

    return tiny_model("sam", seed=1)


def make_scene(viewer, model, **kwargs):
    from napari_medsam._napari.controller import SegmentationController

    rng = np.random.default_rng(0)
    volume = (rng.normal(size=SHAPE) * 200).astype(np.float32)
    image = viewer.add_image(volume, name="scan", scale=SCALE)
    labels = viewer.add_labels(np.zeros(SHAPE, np.uint8), name="seg", scale=SCALE)
    labels.selected_label = 1
    return SegmentationController(viewer, image, labels, model, **kwargs)


@pytest.fixture
def controller(make_napari_viewer, model, qtbot):
    c = make_scene(make_napari_viewer(), model)
    yield c
    qtbot.waitUntil(lambda: c.queue.running is None, timeout=30000)
    c.close()


# ---------------------------------------------------------------------- canvas text overlay
def _position(overlay) -> str:
    return str(getattr(overlay.position, "value", overlay.position))


def test_canvas_text_is_out_of_the_toasts_corner(controller):
    from napari_medsam._napari.controller import TEXT_OVERLAY_POSITION, canvas_text_overlay, place_text_overlay

    overlay = canvas_text_overlay(controller.viewer)
    assert overlay is controller.viewer.canvas.overlays["text"]
    # napari's toasts (and its default for this overlay) are bottom-right: the plugin's text goes top-left.
    assert TEXT_OVERLAY_POSITION == "top_left"
    assert _position(overlay) == "top_left"
    # A place the user chose is kept.
    overlay.position = "top_center"
    place_text_overlay(controller.viewer)
    assert _position(overlay) == "top_center"


# ---------------------------------------------------------------------- refinement from earlier logits
def shown_logits(controller, axis=0, index=3):
    cand = controller.session.candidate(1, axis, index)
    return np.array(cand.masks.low_res_logits[cand.choice])


def test_refinement_sends_the_shown_masks_logits_and_follows_undo_redo(controller, qtbot, calls):
    from napari_medsam._napari.settings import Settings

    viewer = controller.viewer
    assert controller.refine_from_logits is False  # off by default
    controller.refine_from_logits = True
    assert Settings().get("refine_from_logits") is True  # the choice is kept
    go_to(viewer, controller.image_layer, 0, 3)
    points = controller.points_layer
    points.add([3, 10, 12])
    settle(qtbot, controller)
    assert calls[-1][2].mask_logits is None and calls[-1][3] is True  # nothing to refine yet
    # Cycling picks another candidate: the next click refines the mask on show.
    controller.cycle_mask()
    assert controller.session.current_choice(1, 0, 3) == 1
    first = shown_logits(controller)
    points.add([3, 14, 16])
    settle(qtbot, controller)
    axis, index, prompts, multimask = calls[-1]
    assert (axis, index, multimask) == (0, 3, False)
    np.testing.assert_allclose(prompts.points, [[10, 12], [14, 16]])
    np.testing.assert_array_equal(prompts.mask_logits, first)
    second = shown_logits(controller)
    assert not np.array_equal(second, first)
    points.add([3, 6, 20])
    settle(qtbot, controller)
    np.testing.assert_array_equal(calls[-1][2].mask_logits, second)
    third = shown_logits(controller)
    # Undo restores the earlier prediction exactly, logits and all; refining starts from it.
    controller.undo()
    np.testing.assert_array_equal(shown_logits(controller), second)
    assert len(points.data) == 2
    points.add([3, 18, 8])
    settle(qtbot, controller)
    np.testing.assert_allclose(calls[-1][2].points, [[10, 12], [14, 16], [18, 8]])
    np.testing.assert_array_equal(calls[-1][2].mask_logits, second)
    fourth = shown_logits(controller)
    assert not np.array_equal(fourth, third)
    # Undo then redo: the redone prediction's logits.
    controller.undo()
    controller.redo()
    np.testing.assert_array_equal(shown_logits(controller), fourth)
    points.add([3, 4, 4])
    settle(qtbot, controller)
    np.testing.assert_array_equal(calls[-1][2].mask_logits, fourth)
    # Moving or removing a prompt predicts afresh from the prompts.
    points.selected_data = {len(points.data) - 1}
    points.remove_selected()
    settle(qtbot, controller)
    assert calls[-1][2].mask_logits is None and len(calls[-1][2].points) == 3


def test_refinement_off_sends_no_logits(make_napari_viewer, model, qtbot, calls):
    from napari_medsam._napari.settings import Settings

    Settings().set("refine_from_logits", False)
    controller = make_scene(make_napari_viewer(), model)
    try:
        assert controller.refine_from_logits is False
        go_to(controller.viewer, controller.image_layer, 0, 3)
        for point in ([3, 10, 12], [3, 14, 16], [3, 6, 20]):
            controller.points_layer.add(point)
            settle(qtbot, controller)
        controller.undo()
        controller.points_layer.add([3, 18, 8])
        settle(qtbot, controller)
        assert len(calls) >= 4 and all(prompts.mask_logits is None for _, _, prompts, _ in calls)
    finally:
        qtbot.waitUntil(lambda: controller.queue.running is None, timeout=30000)
        controller.close()


def test_refinement_setting_is_read_by_a_new_controller(make_napari_viewer, model, qtbot, calls):
    from napari_medsam._napari.settings import Settings

    Settings().set("refine_from_logits", True)
    controller = make_scene(make_napari_viewer(), model)
    try:
        assert controller.refine_from_logits is True
        go_to(controller.viewer, controller.image_layer, 0, 2)
        controller.points_layer.add([2, 10, 12])
        settle(qtbot, controller)
        first = shown_logits(controller, 0, 2)
        controller.points_layer.add([2, 12, 18])
        settle(qtbot, controller)
        np.testing.assert_array_equal(calls[-1][2].mask_logits, first)
    finally:
        qtbot.waitUntil(lambda: controller.queue.running is None, timeout=30000)
        controller.close()


# ---------------------------------------------------------------------- configurable keys
@pytest.mark.parametrize("text, expected", [
    ("ctrl+shift+z", "Control-Shift-Z"), ("Shift-Control-Z", "Control-Shift-Z"), ("c", "C"), ("Shift-C", "Shift-C"),
    ("Alt+Control+k", "Control-Alt-K"), ("F5", "F5"), ("pageup", "PageUp"), ("Meta-/", "Meta-/"),
    ("Shift-1", "Shift-1"),
])
def test_keys_are_read_as_napari_names_them(text, expected):
    from napari.utils.key_bindings import coerce_keybinding

    from napari_medsam._napari.keys import normalize_key

    assert normalize_key(text) == expected
    assert coerce_keybinding(expected) == coerce_keybinding(text.replace("ctrl", "Control").replace("+", "-"))


@pytest.mark.parametrize("text, reason", [
    ("", "a key is a text"), (3, "a key is a text"), ("Shift", "a modifier alone"), ("Hyper-K", "not a modifier"),
    ("Control-", "empty part"), ("F13", "not a key"), ("é", "not a key"), ("CC", "not a key"),
])
def test_unreadable_keys_say_why(text, reason):
    from napari_medsam._napari.keys import normalize_key

    with pytest.raises(ValueError, match=reason):
        normalize_key(text)


def test_user_keys_apply_and_bad_ones_fall_back_with_a_warning():
    from napari_medsam._napari.keys import SHORTCUTS, resolve_shortcuts

    keys, warnings = resolve_shortcuts({})
    assert keys == SHORTCUTS and warnings == []
    # A swap is fine: no key is shared at the end.
    keys, warnings = resolve_shortcuts({"cycle_mask": "N", "next_object": "c"})
    assert keys["N"][0] == "cycle_mask" and keys["C"][0] == "next_object" and warnings == []
    assert [method for method, _ in keys.values()] == [method for method, _ in SHORTCUTS.values()]  # same order
    keys, warnings = resolve_shortcuts({"cycle_mask": "N", "undo": "R", "new_object": "Alt-A", "redo": "x-y",
                                        "commit": "K", "previous_object": "Shift-C"})
    methods = {method: key for key, (method, _) in keys.items()}
    assert methods == {"undo": "Control-Z", "redo": "Control-Shift-Z", "next_object": "N",
                       "previous_object": "Shift-C", "new_object": "M", "cycle_mask": "C"}
    text = "\n".join(warnings)
    assert len(warnings) == 5
    assert "cycle_mask = 'N' is also the key of next_object; cycle_mask keeps C" in text
    assert "undo = 'R' is kept for the boxes layer's rectangle tool; undo keeps Ctrl+Z" in text
    assert "new_object = 'Alt-A' is kept for the axial view" in text
    assert "redo = 'x-y' cannot be used" in text and "unknown action 'commit'" in text
    keys, warnings = resolve_shortcuts(["C"])
    assert keys == SHORTCUTS and "expected a mapping" in warnings[0]


def test_keys_from_the_settings_are_bound_shown_and_released(make_napari_viewer, model, qtbot, monkeypatch):
    from napari.utils.key_bindings import KeyBinding
    from qtpy.QtCore import Qt

    from canvas_events import key
    from napari_medsam._napari import controller_input
    from napari_medsam._napari.keys import key_map_html
    from napari_medsam._napari.settings import Settings

    shown = []
    monkeypatch.setattr("napari.utils.notifications.show_warning", shown.append)
    monkeypatch.setattr(controller_input, "_WARNED", set())
    Settings().set("keys", {"cycle_mask": "Shift-C", "new_object": "N"})  # N is next_object's: refused
    viewer = make_napari_viewer()
    controller = make_scene(viewer, model)
    try:
        assert {method: k for k, (method, _) in controller.shortcuts.items()}["cycle_mask"] == "Shift-C"
        assert {method: k for k, (method, _) in controller.shortcuts.items()}["new_object"] == "M"
        assert len(shown) == 1 and "new_object = 'N' is also the key of next_object; new_object keeps M" in shown[0]
        plain_c, shift_c = KeyBinding.from_str("C"), KeyBinding.from_str("Shift-C")
        for layer in (controller.points_layer, controller.labels_layer, controller.image_layer):
            assert shift_c in layer.keymap
        assert plain_c not in controller.points_layer.keymap and plain_c not in viewer.keymap
        # The key does what it is set to, through napari's key dispatch.
        go_to(viewer, controller.image_layer, 0, 3)
        controller.points_layer.add([3, 10, 12])
        settle(qtbot, controller)
        assert controller.session.current_choice(1, 0, 3) == 0
        viewer.layers.selection.active = controller.points_layer
        key(viewer, Qt.Key.Key_C, Qt.KeyboardModifier.ShiftModifier)
        qtbot.wait(20)
        assert controller.session.current_choice(1, 0, 3) == 1
        # The Keys help shows the keys in use and the refused setting.
        html = key_map_html()
        assert "<b>Shift+C</b>&nbsp;&nbsp;</td><td>show the next candidate mask" in html
        assert "<b>C</b>" not in html and "<b>M</b>" in html
        assert "new_object = &#x27;N&#x27;" in html or "new_object = 'N'" in html
        # A second controller (another scan) does not repeat the warning.
        controller.close()
        other = make_scene(make_napari_viewer(), model)
        other.close()
        assert len(shown) == 1
        assert shift_c not in controller.points_layer.keymap  # released on close
    finally:
        qtbot.waitUntil(lambda: controller.queue.running is None, timeout=30000)
        controller.close()


def test_the_segment_panel_check_box_drives_refinement(make_napari_viewer, qtbot, sample_dir):
    from conftest import start_workflow, stop_workflow
    from test_predictor import tiny_model

    viewer = make_napari_viewer()
    widget, controller = start_workflow(viewer, tiny_model("sam", seed=3), sample_dir)
    qtbot.addWidget(widget)
    box = widget.segment_panel.refine
    assert box.isEnabled() and box.isChecked() == bool(controller.refine_from_logits)
    box.setChecked(not box.isChecked())
    assert controller.refine_from_logits == box.isChecked()
    box.setChecked(False)
    assert controller.refine_from_logits is False
    stop_workflow(qtbot, widget, controller)


def test_the_panels_own_shortcuts_follow_the_users_keys(make_napari_viewer, qtbot, tmp_path):
    from napari_medsam._napari.settings import Settings
    from napari_medsam._napari.widget import MedSamWidget

    settings = Settings(tmp_path / "settings.json")
    settings.set("keys", {"cycle_mask": "Shift-C"})
    widget = MedSamWidget(make_napari_viewer(), settings=settings)
    qtbot.addWidget(widget)
    assert "Shift-C" in widget.shortcuts and "C" not in widget.shortcuts
