"""The Propagate panel in a real napari viewer: runs in a worker on a snapshot, lands as one undo step."""

from __future__ import annotations

import time

import numpy as np
import pytest
from gt_predictor import GroundTruthPredictor, box_of, dice3d
from test_controller import go_to, model, settle  # noqa: F401  (fixtures)

from napari_medsam._napari import propagate_panel as panel_module
from napari_medsam._napari import propagate_run
from napari_medsam.segment import propagation as engine
from napari_medsam.segment.predictor import Prompts

SHAPE = (20, 32, 32)
FIRST, LAST, KEY = 3, 12, 7  # the blob spans slices 3-12; the key slice is in its middle


def blob() -> np.ndarray:
    """A ball-like blob (label 1) on slices 3-12, its radius swelling towards the middle."""
    gt = np.zeros(SHAPE, np.uint8)
    rr, cc = np.ogrid[: SHAPE[1], : SHAPE[2]]
    for z in range(FIRST, LAST + 1):
        radius = 4.5 + 2.5 * np.sin(np.pi * (z - FIRST + 0.5) / (LAST - FIRST + 1))
        gt[z][(rr - 16) ** 2 + (cc - 15 - 0.2 * z) ** 2 <= radius**2] = 1
    return gt


class ExactPredictor(GroundTruthPredictor):
    """The ground truth itself (no noise, no dropouts, no leaks), optionally slow or failing."""

    def __init__(self, gt: np.ndarray, delay: float = 0.0, fail_at: int | None = None) -> None:
        super().__init__(gt, boundary_px=0, dropout=0, leak=0)
        self.delay, self.fail_at = delay, fail_at

    def is_embedded(self, index: int) -> bool:
        return True

    def predict(self, index, prompts, multimask=False):
        time.sleep(self.delay)
        if index == self.fail_at:
            raise RuntimeError("out of GPU memory")
        return super().predict(index, prompts, multimask)


@pytest.fixture
def scene(make_napari_viewer, model, qtbot, monkeypatch):  # noqa: F811
    from napari_medsam._napari.controller import SegmentationController
    from napari_medsam._napari.propagate_panel import PropagatePanel

    viewer = make_napari_viewer()
    gt = blob()
    volume = (gt * 300.0 + np.random.default_rng(0).normal(size=SHAPE) * 20).astype(np.float32)
    image = viewer.add_image(volume, name="scan")
    labels = viewer.add_labels(np.zeros(SHAPE, np.uint8), name="seg")
    labels.selected_label = 1
    controller = SegmentationController(viewer, image, labels, model)
    exact = ExactPredictor(gt)
    controller.predictor = lambda axis: exact
    notes: list[tuple[str, str]] = []
    monkeypatch.setattr(panel_module, "_notify", lambda level, message: notes.append((level, message)))
    panel = PropagatePanel()
    qtbot.addWidget(panel)
    panel.set_controller(controller)
    go_to(viewer, image, 0, KEY)
    settle(qtbot, controller)
    key = exact.predict(KEY, Prompts(box=box_of(gt[KEY] == 1)))
    controller.session.apply_prediction(1, 0, KEY, key)
    yield viewer, controller, panel, gt, exact, notes
    qtbot.waitUntil(lambda: not panel.busy, timeout=30000)
    panel.set_controller(None)
    qtbot.waitUntil(lambda: controller.queue.running is None, timeout=30000)
    controller.close()


def run(qtbot, panel, button) -> None:
    button.click()
    qtbot.waitUntil(lambda: not panel.busy, timeout=30000)


def reach(labels: np.ndarray, value: int = 1) -> list[int]:
    return np.flatnonzero((labels == value).any(axis=(1, 2))).tolist()


def test_both_reaches_the_blob_reports_and_undoes_in_one_step(scene, qtbot):
    viewer, controller, panel, gt, _, notes = scene
    labels = controller.labels_layer
    before = labels.data.copy()
    assert panel.both_button.isEnabled() and not panel.cancel_button.isEnabled()
    run(qtbot, panel, panel.both_button)
    assert not notes
    assert dice3d(labels.data == 1, gt == 1) > 0.97
    assert reach(labels.data) == list(range(FIRST, LAST + 1))
    result = panel.last_result
    assert not result.cancelled and result.written_slices == [k for k in range(FIRST, LAST + 1) if k != KEY]
    # The undo record holds the live slices before the run.
    for k in result.written_slices:
        np.testing.assert_array_equal(result.undo.previous[k], before[k])
    # The fronts stop a few empty slices past the blob's ends.
    ends = {r.front: r.index for r in result.reports}
    assert LAST < ends["up"] <= LAST + 3 and FIRST - 3 <= ends["down"] < FIRST
    # The report: one row per visited slice, the key slice in bold, the summary line.
    table = panel.table
    assert table.rowCount() == len(result.reports)
    kinds = {int(table.item(i, 0).text()): table.item(i, 1) for i in range(table.rowCount())}
    assert kinds[KEY].text() == "key" and kinds[KEY].font().bold()
    assert kinds[KEY + 1].text() == "propagated" and not kinds[KEY + 1].font().bold()
    assert panel.summary.text().startswith(f"propagated over slices {FIRST}-{LAST}, stopped ")
    assert "up: empty x3 at" in panel.summary.text()
    # Clicking a row moves the view there; the overlay says what the slice is.
    row = next(i for i in range(table.rowCount()) if table.item(i, 0).text() == str(LAST))
    panel.table.cellClicked.emit(row, 0)
    assert controller.current_plane() == (0, LAST)
    overlay = panel_module._text_overlay(viewer)
    assert overlay.visible and overlay.text == "object 1: propagated"
    go_to(viewer, controller.image_layer, 0, KEY)
    assert overlay.text == "object 1: key slice"
    go_to(viewer, controller.image_layer, 0, 18)
    assert not overlay.visible
    controller.undo()  # one step removes the whole run, the key slice stays
    np.testing.assert_array_equal(labels.data, before)
    controller.redo()
    assert reach(labels.data) == list(range(FIRST, LAST + 1))


def test_status_says_what_the_run_did_to_the_labels(scene, qtbot):
    _, controller, panel, _, _, _ = scene
    run(qtbot, panel, panel.both_button)
    written = len(panel.last_result.written_slices)
    assert written == LAST - FIRST
    status = panel.status_label.text()
    assert f"propagated over slices {FIRST}-{LAST}" in status and f"{written} slices written" in status, status
    assert "0 slice" not in status
    # The same run again finds the labels already equal to its result: it says so, not "0 slices changed".
    run(qtbot, panel, panel.both_button)
    assert panel.last_result.written_slices == []
    status = panel.status_label.text()
    assert f"propagated over slices {FIRST}-{LAST}" in status, status
    assert "nothing changed: the labels there were already this result" in status and "written" not in status


def test_up_down_fill_and_z_range(scene, qtbot):
    viewer, controller, panel, gt, _, _ = scene
    data = controller.labels_layer.data
    run(qtbot, panel, panel.up_button)
    assert reach(data) == list(range(KEY, LAST + 1))
    controller.undo()
    run(qtbot, panel, panel.down_button)
    assert reach(data) == list(range(FIRST, KEY + 1))
    controller.undo()
    assert panel.range_slider.value() == (0, SHAPE[0] - 1)
    panel.range_slider.setValue((5, 9))
    panel.limit_check.setChecked(True)
    assert panel.stop_rule().z_range == (5, 9)
    run(qtbot, panel, panel.both_button)
    assert reach(data) == list(range(5, 10))
    assert any("outside the z-range" in r.status for r in panel.last_result.reports)
    controller.undo()
    # Fill between keys: only the gap between two key slices.
    panel.limit_check.setChecked(False)
    exact = controller.predictor(0)
    controller.session.apply_prediction(1, 0, 11, exact.predict(11, Prompts(box=box_of(gt[11] == 1))))
    run(qtbot, panel, panel.fill_button)
    assert reach(data) == list(range(KEY, 12))
    assert dice3d(data == 1, (gt == 1) & (np.arange(SHAPE[0]) >= KEY)[:, None, None]
                  & (np.arange(SHAPE[0]) <= 11)[:, None, None]) > 0.97


def test_settings_reach_the_engine(scene, qtbot, monkeypatch):
    _, controller, panel, _, _, _ = scene
    seen = {}
    original = engine.propagate

    def spy(predictor, labels, value, keys, **options):
        seen.update(options, keys=sorted(keys), labels=labels)
        return original(predictor, labels, value, keys, **options)

    monkeypatch.setattr(engine, "propagate", spy)
    panel.stop_spins["min_score"].setValue(0.3)
    panel.stop_spins["min_overlap"].setValue(0.4)
    panel.stop_spins["max_empty_slices"].setValue(2)
    panel.prompt_combo.setCurrentText("points")
    controller.overwrite = True
    run(qtbot, panel, panel.down_button)
    rule = seen["stop"]
    assert (rule.min_score, rule.min_overlap, rule.max_empty_slices) == (0.3, 0.4, 2)
    assert seen["prompt"].mode == "points" and seen["direction"] == "down" and seen["overwrite"] is True
    assert seen["keys"] == [KEY] and seen["locked"].shape == SHAPE and seen["cancel"] is not None
    assert seen["labels"] is not controller.labels_layer.data  # the worker wrote a snapshot


def test_cancel_keeps_finished_slices(scene, qtbot):
    _, controller, panel, gt, exact, _ = scene
    data = controller.labels_layer.data
    exact.delay = 0.15
    panel.both_button.click()
    assert panel.busy and panel.cancel_button.isEnabled() and not panel.both_button.isEnabled()
    qtbot.waitUntil(lambda: data[KEY - 2].any(), timeout=20000)  # the mask grows on screen
    panel.cancel_button.click()
    qtbot.waitUntil(lambda: not panel.busy, timeout=20000)
    result = panel.last_result
    assert result.cancelled and panel.summary.text().startswith("cancelled")
    written = result.written_slices
    assert written and max(written) < KEY  # the up front never started
    assert reach(data) == sorted({KEY, *written})
    for k in written:  # finished slices are whole
        np.testing.assert_array_equal(data[k] == 1, gt[k] == 1)
    controller.undo()
    assert reach(data) == [KEY]


def test_hand_edits_are_respected(scene, qtbot):
    viewer, controller, panel, gt, exact, _ = scene
    labels = controller.labels_layer
    labels.brush_size = 1
    go_to(viewer, controller.image_layer, 0, 9)
    labels.paint((9, 16, 17), 2)  # another object, painted by hand
    qtbot.wait(20)
    go_to(viewer, controller.image_layer, 0, KEY)
    run(qtbot, panel, panel.both_button)
    assert labels.data[9, 16, 17] == 2
    labels.paint((10, 16, 17), 0)  # erase one voxel of the object by hand: hand-made background
    qtbot.wait(20)
    run(qtbot, panel, panel.both_button)
    assert labels.data[10, 16, 17] == 0 and labels.data[10, 16, 18] == 1
    # An edit made while the worker runs is not overwritten by the run either.
    controller.undo()
    exact.delay = 0.05
    panel.both_button.click()
    labels.paint((11, 16, 16), 3)
    qtbot.waitUntil(lambda: not panel.busy, timeout=20000)
    assert labels.data[11, 16, 16] == 3 and labels.data[11, 16, 15] == 1
    controller.undo()  # the run only: the stroke stays
    assert labels.data[11, 16, 16] == 3 and not (labels.data[11] == 1).any()


def test_hand_painted_slice_is_a_key(scene, qtbot):
    viewer, controller, panel, gt, _, _ = scene
    labels = controller.labels_layer
    go_to(viewer, controller.image_layer, 0, 9)
    labels.brush_size = 9
    labels.paint((9, 16, 17), 2)  # object 2 exists only as a hand-painted disk
    qtbot.wait(20)
    controller.session.select(2)
    assert list(propagate_run.key_masks(controller.session, 2, 0, 9)) == [9]
    run(qtbot, panel, panel.both_button)
    assert reach(labels.data, 2) == [k for k in range(FIRST, LAST + 1) if k != KEY]  # object 1 keeps its key slice
    assert panel.last_result.reports_for(9)[0].kind == "key"


def test_correction_repropagates_nearby(scene, qtbot):
    viewer, controller, panel, gt, _, _ = scene
    data = controller.labels_layer.data
    run(qtbot, panel, panel.both_button)
    first = panel.last_result
    after = data.copy()
    go_to(viewer, controller.image_layer, 0, 10)
    # A box cutting off the blob's right edge on slice 10: the controller predicts, the panel re-propagates.
    controller.boxes_layer.add_rectangles(np.array([[10, 8, 8], [10, 8, 18], [10, 24, 18], [10, 24, 8]], float))
    qtbot.waitUntil(lambda: panel.last_result is not first and not panel.busy, timeout=20000)
    fronts = {r.front for r in panel.last_result.reports}
    assert {"correction up", "correction down"} <= fronts
    changed = [k for k in range(SHAPE[0]) if not np.array_equal(data[k], after[k])]
    assert changed and set(changed) <= set(range(KEY + 1, LAST + 1)) and 10 in changed
    np.testing.assert_array_equal(data[: KEY + 1], after[: KEY + 1])  # the key slice bounds it
    for k in changed:  # the cut reached the slices next to it, and stopped where nothing changed
        assert ((data[k] == 1) <= (after[k] == 1)).all() and (data[k] != after[k]).any()
    controller.undo()  # the re-propagation
    assert [k for k in range(SHAPE[0]) if not np.array_equal(data[k], after[k])] == [10]
    controller.undo()  # the correction
    np.testing.assert_array_equal(data, after)


def test_errors_are_reported_and_lose_nothing(scene, qtbot):
    viewer, controller, panel, gt, exact, notes = scene
    data = controller.labels_layer.data
    before = data.copy()
    panel.fill_button.click()
    assert not panel.busy and "two key slices" in notes[-1][1]
    exact.fail_at = 10  # the down front finishes, the up front fails on its third slice
    run(qtbot, panel, panel.both_button)
    assert notes and notes[-1][0] == "error" and "out of GPU memory" in notes[-1][1]
    assert "failed" in panel.status_label.text()
    np.testing.assert_array_equal(data, before)
    controller.undo()  # the key slice's prediction: the failed run left no step
    assert not data.any()
    assert not panel.propagate("both") and "no voxels" in notes[-1][1]
    viewer.dims.ndisplay = 3
    assert not panel.propagate("both") and "3D view" in notes[-1][1]
    viewer.dims.ndisplay = 2
    controller.session.delete_object(1)
    assert not panel.propagate("both") and "No object" in notes[-1][1]
    panel.set_controller(None)
    assert not panel.both_button.isEnabled() and not panel.range_slider.isEnabled()
