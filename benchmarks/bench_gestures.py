"""Mouse gestures on the prompt layers in a real napari window: predictions, undo steps, Qt-thread time.

    xvfb-run -a python benchmarks/bench_gestures.py [--model mobile_sam] [--size 512] [--moves 30]

Drives napari's real event path (vispy canvas mouse events, the helpers of tests/canvas_events.py)
with the scan's slice already embedded: a box drawn by press-drag-release, the same box moved
in select mode, and a point dragged with ``--moves`` mouse moves. For each gesture it prints
how many times the decoder ran, how many undo steps the gesture left, the time the Qt thread
spent in the gesture's events and the longest single event. Networks get random weights
(speed does not depend on the values). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    """Build a viewer with a synthetic CT, run the gestures, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobile_sam")
    parser.add_argument("--size", type=int, default=512, help="slice size in pixels (square)")
    parser.add_argument("--moves", type=int, default=30)
    args = parser.parse_args()

    import numpy as np
    import torch
    from bench_interactive import bench_scene
    from canvas_events import canvas_pos, move, press, release
    from qtpy.QtWidgets import QApplication

    from napari_medsam._napari.controller import SegmentationController
    from napari_medsam.segment.predictor import SlicePredictor

    n = args.size
    viewer, image, labels, model = bench_scene(args.model, n, depth=4)
    app = QApplication.instance()
    controller = SegmentationController(viewer, image, labels, model)

    def pump(seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            app.processEvents()
            time.sleep(0.005)

    viewer.dims.set_point(0, 1)
    pump(1.0)
    while controller.queue.running is not None or not controller.is_embedded(0, 1):
        pump(0.05)
    decodes = []
    original = SlicePredictor.predict

    def counted(self, *a, **k):
        decodes.append(1)
        return original(self, *a, **k)

    SlicePredictor.predict = counted

    def gesture(name: str, layer, start, end, moves: int) -> None:
        decodes.clear()
        steps_before = _undo_steps(controller)
        a, b = canvas_pos(viewer, layer, start), canvas_pos(viewer, layer, end)
        busy, longest = 0.0, 0.0

        def timed(function, *fargs):
            nonlocal busy, longest
            t = time.perf_counter()
            out = function(*fargs)
            app.processEvents()
            spent = time.perf_counter() - t
            busy += spent
            longest = max(longest, spent)
            return out

        event = timed(press, viewer, a)
        last = None
        for t in np.linspace(0, 1, moves + 1)[1:]:
            last = timed(move, viewer, a + (b - a) * t, event, (), last)
        timed(release, viewer, b, event)
        pump(0.3)
        print(f"{name:<28} decoder runs {len(decodes):>3}   undo steps {_undo_steps(controller) - steps_before:>3}   "
              f"Qt thread {busy * 1000:7.1f} ms in all, longest event {longest * 1000:6.1f} ms")

    print(f"{args.model}, {n}x{n} slice, {args.moves} mouse moves per drag, torch threads {torch.get_num_threads()}")
    boxes, points = controller.boxes_layer, controller.points_layer
    viewer.layers.selection.active = boxes
    boxes.mode = "add_rectangle"
    gesture("draw a box", boxes, [1, n * 0.3, n * 0.3], [1, n * 0.6, n * 0.7], args.moves)
    boxes.mode = "select"
    gesture("move the box", boxes, [1, n * 0.45, n * 0.5], [1, n * 0.5, n * 0.55], args.moves)
    viewer.layers.selection.active = points
    points.mode = "add"
    labels.selected_label = 2
    points.add([1, n * 0.5, n * 0.5])
    pump(0.3)
    points.mode = "select"
    points.selected_data = {0}
    gesture("drag a point", points, [1, n * 0.5, n * 0.5], [1, n * 0.55, n * 0.6], args.moves)
    controller.close()
    viewer.close()


def _undo_steps(controller) -> int:
    """Undo steps kept for all objects together."""
    session = controller.session
    return sum(len(session.history.undo_steps(obj.value)) for obj in session.objects)


if __name__ == "__main__":
    main()
