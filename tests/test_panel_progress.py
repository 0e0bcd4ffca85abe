"""Precompute and propagation show their progress inside the panel: slices done of the total, time left, Cancel.

Through the real dock widget in a napari window, with a slow stand-in (a slow encoder for
precompute, a slow ground-truth predictor for propagation) so the bar is seen mid-run: it
appears right above the Cancel button when a run starts, says "slice N of M - about S s left",
says when a cancel is on its way, and is gone when the run ends.
"""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
from gt_predictor import box_of
from test_propagate_panel import ExactPredictor
from test_widget import model, settle, show_slice  # noqa: F401  (fixtures)

from napari_medsam._napari.messages import RunProgress, time_left_text
from napari_medsam.segment.predictor import Prompts

MIDRUN = re.compile(r"^slice (\d+) of (\d+) - about (\d+) (s|min) left$")


@pytest.fixture
def docked(make_napari_viewer, qtbot, model, sample_dir):  # noqa: F811
    from conftest import start_workflow, stop_workflow

    viewer = make_napari_viewer(show=True)
    widget, controller = start_workflow(viewer, model, sample_dir, dock=True)
    yield viewer, widget, controller
    qtbot.waitUntil(lambda: not widget.propagate_panel.busy, timeout=30000)
    stop_workflow(qtbot, widget, controller)


def above(bar, button) -> bool:
    """``bar`` lies right above ``button`` (no more than a row of buttons between them), overlapping it sideways."""
    top = button.mapTo(button.window(), button.rect().topLeft())
    low = bar.mapTo(bar.window(), bar.rect().bottomLeft())
    right = bar.mapTo(bar.window(), bar.rect().bottomRight())
    return 0 <= top.y() - low.y() <= 2 * button.height() and low.x() <= top.x() + 5 and right.x() > top.x()


def test_time_left_is_the_mean_time_per_slice_times_the_slices_left(qtbot, monkeypatch):
    bar = RunProgress()
    qtbot.addWidget(bar)
    now = [100.0]
    monkeypatch.setattr(RunProgress, "clock", staticmethod(lambda: now[0]))
    assert not bar.isVisible() and bar.isHidden()
    bar.start(40)
    assert not bar.isHidden() and bar.message() == "slice 0 of 40 - estimating time left"
    now[0] += 12 * 0.25  # 12 slices in 3 s: 0.25 s each, 28 to go
    bar.step(12)
    assert bar.message() == "slice 12 of 40 - about 7 s left" and (bar.value(), bar.maximum()) == (12, 40)
    now[0] += 3 * 60 - 3  # 15 slices in 3 min: 12 s each, 25 to go
    bar.step(15)
    assert bar.message() == "slice 15 of 40 - about 5 min left"
    bar.note("cancelling after this slice")
    assert bar.message() == "slice 15 of 40 - cancelling after this slice"
    bar.step(41, 40)  # a total that grows: never "41 of 40"
    assert bar.message() == "slice 41 of 41 - finishing"
    bar.stop()
    assert bar.isHidden()
    assert [time_left_text(s) for s in (0.2, 8.4, 89, 600, 3 * 3600)] == [
        "about 1 s", "about 8 s", "about 89 s", "about 10 min", "about 3.0 h"]


def test_precompute_shows_slices_done_and_time_left_above_cancel(docked, qtbot, model, monkeypatch):  # noqa: F811
    viewer, widget, controller = docked
    settle(qtbot, controller)
    panel = widget.segment_panel
    assert panel.progress.isHidden()
    original = model.encode
    monkeypatch.setattr(model, "encode", lambda rgb: (time.sleep(0.15), original(rgb))[1])
    panel.first.setValue(10)
    panel.last.setValue(40)
    panel.precompute_button.click()
    assert not panel.progress.isHidden() and panel.cancel_button.isEnabled()
    assert panel.progress.message() == "slice 0 of 31 - estimating time left"
    qtbot.waitUntil(lambda: MIDRUN.match(panel.progress.message()) is not None, timeout=20000)
    done, total = (int(v) for v in MIDRUN.match(panel.progress.message()).groups()[:2])
    assert 1 <= done < total == 31 and panel.progress.value() == done and panel.progress.maximum() == 31
    assert panel.progress.isVisible() and above(panel.progress, panel.cancel_button)
    panel.cancel_button.click()
    assert panel.progress.message().endswith("cancelling after this slice")
    qtbot.waitUntil(lambda: panel.worker is None, timeout=30000)
    assert panel.progress.isHidden() and "cancelled" in panel.state.text()


def test_propagation_shows_slices_done_and_time_left_above_cancel(docked, qtbot):
    viewer, widget, controller = docked
    image = controller.image_layer
    shape = image.data.shape
    middle = shape[0] // 2
    gt = np.zeros(shape, np.uint8)  # a cylinder through the whole scan: a long run
    rr, cc = np.ogrid[: shape[1], : shape[2]]
    gt[:, (rr - shape[1] // 2) ** 2 + (cc - shape[2] // 2) ** 2 <= (min(shape[1:]) // 6) ** 2] = 1
    exact = ExactPredictor(gt, delay=0.1)
    controller.predictor = lambda axis: exact
    show_slice(viewer, image, middle)
    settle(qtbot, controller)
    controller.session.apply_prediction(1, 0, middle, exact.predict(middle, Prompts(box=box_of(gt[middle] == 1))))
    panel = widget.propagate_panel
    assert panel.progress.isHidden()
    panel.both_button.click()
    assert panel.busy and not panel.progress.isHidden()
    qtbot.waitUntil(lambda: (m := MIDRUN.match(panel.progress.message())) is not None and int(m.group(1)) >= 3,
                    timeout=20000)
    done, total = (int(v) for v in MIDRUN.match(panel.progress.message()).groups()[:2])
    assert 3 <= done < total <= shape[0] and panel.progress.value() == done
    assert panel.progress.isVisible() and above(panel.progress, panel.cancel_button)
    panel.cancel_button.click()
    assert panel.progress.message().endswith("cancelling after this slice")
    qtbot.waitUntil(lambda: not panel.busy, timeout=30000)
    assert panel.progress.isHidden() and panel.last_result.cancelled
