"""Prompt-to-mask-on-screen in a real napari window, for a slice whose embedding is cached.

    xvfb-run -a python benchmarks/bench_interactive.py [--model mobile_sam] [--size 512] [--repeat 20]

A click is added to the controller's points layer the way napari's "add" mode adds it; the
clock stops when the mask is in the Labels layer AND the canvas has drawn it (a forced
render of the vispy canvas). Also prints the parts: decoder, session write, layer refresh,
and the largest event-loop gap while a slice is embedded in the background. Networks get
random weights (speed does not depend on the values). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time


def bench_scene(model_name: str, size: int, depth: int):
    """A napari window with a synthetic CT (a bright disc to click on, ``depth`` slices of size x size),
    an empty Labels layer and the registry model's network with random weights: (viewer, image, labels, model)."""
    import napari
    import numpy as np
    import torch

    from napari_medsam.models.networks.sam import build_network
    from napari_medsam.models.registry import get_model
    from napari_medsam.segment.model import SamModel

    spec = get_model(model_name)
    torch.manual_seed(0)
    model = SamModel(build_network(spec.architecture, **spec.build_options), spec.pipeline, name=model_name,
                     signature=f"bench-{model_name}")
    rng = np.random.default_rng(0)
    volume = rng.normal(40, 20, size=(depth, size, size)).astype(np.int16)
    yy, xx = np.mgrid[:size, :size]
    volume[:, (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 5) ** 2] += 120
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1400, 900)
    image = viewer.add_image(volume, name="ct", contrast_limits=(-160, 240))
    labels = viewer.add_labels(np.zeros(volume.shape, np.uint8), name="labels")
    labels.selected_label = 1
    return viewer, image, labels, model


def main() -> None:
    """Build a viewer with a synthetic CT, click repeatedly, print the timings."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobile_sam")
    parser.add_argument("--size", type=int, default=512, help="slice size in pixels (square)")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--expire-ms", type=int, default=None,
                        help="override the thread-pool expiry the plugin sets (ms; Qt default 30000)")
    args = parser.parse_args()

    import numpy as np
    import torch
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from napari_medsam._napari.controller import SegmentationController
    from napari_medsam.segment.predictor import SlicePredictor

    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.size
    viewer, image, labels, model = bench_scene(args.model, n, depth=6)
    rng = np.random.default_rng(0)
    volume = image.data
    app = QApplication.instance()
    if args.expire_ms is not None:  # e.g. 30000 (Qt's default) to see what the plugin's setting saves
        from qtpy.QtCore import QThreadPool

        from napari_medsam._napari import workers

        workers.THREAD_EXPIRY_MS = args.expire_ms
        QThreadPool.globalInstance().setExpiryTimeout(args.expire_ms)
    controller = SegmentationController(viewer, image, labels, model)
    canvas = viewer.window._qt_viewer.canvas

    def wait(condition, timeout=600.0):
        end = time.perf_counter() + timeout
        while not condition() and time.perf_counter() < end:
            app.processEvents()
            time.sleep(0.002)

    end = time.perf_counter() + 2.0  # let the window show and draw its first frames
    while time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.01)
    # Event-loop gaps while the encoder works in its worker thread.
    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    target = (int(viewer.dims.current_step[0]) + 3) % volume.shape[0]  # a slice not embedded yet
    viewer.dims.set_point(0, target)  # landing on it starts its embedding in the background
    start = time.perf_counter()
    wait(lambda: controller.queue.running is None and controller.is_embedded(0, target))
    encode_s = time.perf_counter() - start
    wait(lambda: controller.is_prepared(0, target), timeout=30.0)  # the widget's short "prepare" worker
    timer.stop()
    gap_ms = max(np.diff(ticks)) * 1000 if len(ticks) > 1 else float("nan")

    predictor = controller.predictor(0)
    decode_ms, write_ms, refresh_ms, total_ms = [], [], [], []
    # Clicks alternate between the prepared slice (what the widget does for the slice shown) and the
    # same slice with its prepared decoder work set aside (a slice not prepared yet).
    unprepared_ms: list[float] = []
    prepared_decode_ms: list[float] = []
    unprepared_decode_ms: list[float] = []
    key = predictor.key(target)
    kept = model._prepared.get(key) if getattr(model, "can_prepare", False) else None
    original_predict = SlicePredictor.predict
    original_refresh = labels.refresh

    def timed_predict(self, *a, **k):
        t = time.perf_counter()
        out = original_predict(self, *a, **k)
        decode_ms.append((time.perf_counter() - t) * 1000)
        return out

    def timed_refresh(*a, **k):
        t = time.perf_counter()
        out = original_refresh(*a, **k)
        refresh_ms.append((time.perf_counter() - t) * 1000)
        return out

    SlicePredictor.predict = timed_predict
    labels.refresh = timed_refresh
    centre = n / 2
    for i in range(args.repeat + 1):
        controller.points_layer.data = np.zeros((0, 3))
        settle_until = time.perf_counter() + 0.3  # a user's clicks are far apart: let the redraw finish
        while time.perf_counter() < settle_until:
            app.processEvents()
            time.sleep(0.01)
        row, col = centre + rng.uniform(-n / 10, n / 10, 2)
        set_aside = kept is not None and i % 2 == 1
        if set_aside:
            with model._prepared_lock:
                model._prepared.pop(key, None)
        before = len(decode_ms)
        t0 = time.perf_counter()
        controller.points_layer.add([target, row, col])  # -> prediction -> session -> labels refresh
        t1 = time.perf_counter()
        canvas._scene_canvas.render()  # the frame that shows the mask
        t2 = time.perf_counter()
        if set_aside:
            with model._prepared_lock:
                model._prepared[key] = kept
        if i == 0 or len(decode_ms) == before:
            continue  # warm-up, or no prediction happened
        if set_aside:
            unprepared_ms.append((t2 - t0) * 1000)
            unprepared_decode_ms.append(decode_ms[-1])
            continue
        prepared_decode_ms.append(decode_ms[-1])
        total_ms.append((t2 - t0) * 1000)
        write_ms.append((t1 - t0) * 1000 - decode_ms[-1] - refresh_ms[-1])
    SlicePredictor.predict = original_predict
    assert predictor is not None
    print(f"model {args.model} (random weights), slice {n}x{n}, {torch.get_num_threads()} torch threads")
    print(f"embedding one slice in the background: {encode_s * 1000:.0f} ms; "
          f"largest event-loop gap meanwhile: {gap_ms:.0f} ms")
    print(f"click -> mask drawn on the canvas: median {statistics.median(total_ms):.1f} ms, "
          f"max {max(total_ms):.1f} ms over {len(total_ms)} clicks")
    print(f"  predictions per click: {(len(decode_ms) - 1) / max(len(total_ms) + len(unprepared_ms), 1):.2f}")
    if unprepared_ms:
        print(f"the same clicks, alternating, with the slice's prepared decoder work set aside: median "
              f"{statistics.median(unprepared_ms):.1f} ms over {len(unprepared_ms)} clicks (decoder "
              f"{statistics.median(unprepared_decode_ms):.1f} ms)")
    print(f"  prepared: decoder {statistics.median(prepared_decode_ms):.1f} ms, labels layer refresh "
          f"{statistics.median(refresh_ms[1:]):.1f} ms, layer events + session write "
          f"{statistics.median(write_ms):.1f} ms, canvas render the rest")
    controller.close()
    viewer.close()


if __name__ == "__main__":
    main()
