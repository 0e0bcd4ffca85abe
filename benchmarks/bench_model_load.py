"""How long the napari window freezes when a model has finished loading (the Qt event loop's gaps).

    xvfb-run -a python benchmarks/bench_model_load.py [--model mobile_sam] [--runs 3] [--no-prepare]

A real napari window (1600x1000) with the MedSAM panel docked opens the sample CT ("CT phantom")
and idles; then the panel gets a model with random weights of the registry's architecture, the
way the loading worker hands it over (``model_panel.set_model`` from the event loop). A QTimer
ticking every 10 ms records the event loop's turns from that moment until the panel is idle
(the controller's first slice embedded and 1 s more): the longest gap between two ticks is the
freeze the user sees. ``--no-prepare`` turns off the panel's preparing of the scan's layers when
the scan is opened (the behaviour before), for a before/after comparison in one run
(``--runs`` alternates both variants, each in a fresh window). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time


def build_model(model_name: str):
    import torch

    from napari_medsam.models.networks.sam import build_network
    from napari_medsam.models.registry import get_model
    from napari_medsam.segment.model import SamModel

    spec = get_model(model_name)
    torch.manual_seed(0)
    return SamModel(build_network(spec.architecture, **spec.build_options), spec.pipeline, name=model_name,
                    signature=f"bench-{model_name}")


def measure(model, model_name: str, prepare: bool) -> dict:
    """One fresh window: open the sample, idle, hand over the model; the event loop's gaps in ms."""
    import napari
    import numpy as np
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from napari_medsam._napari import widget as widget_module
    from napari_medsam.segment.cache import EmbeddingCache, MemoryCache

    app = QApplication.instance() or QApplication([])
    widget_module.MedSamWidget.PREPARE_LAYERS = prepare
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1600, 1000)
    _, widget = viewer.window.add_plugin_dock_widget("napari-medsam", "MedSAM")
    widget.cache = EmbeddingCache(MemoryCache())  # no disk cache: the first slice is really embedded

    def idle(seconds: float, until=None) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end and not (until is not None and until()):
            app.processEvents()
            time.sleep(0.005)

    viewer.open_sample("napari-medsam", "ct_phantom")
    idle(4.0)  # the window shows the scan (and the panel prepares its layers, when it does)
    layers_before = len(viewer.layers)
    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    call: dict = {}

    def hand_over():
        call["start"] = time.perf_counter()
        widget.model_panel.set_model(model, model_name)
        call["end"] = time.perf_counter()

    timer.start()
    idle(0.2)
    QTimer.singleShot(0, hand_over)
    idle(0.5, until=lambda: "end" in call)
    controller = widget.controller
    idle(60.0, until=lambda: controller is not None and controller.queue.running is None
         and not controller.queue.pending)
    done = time.perf_counter()
    idle(1.0)
    timer.stop()
    start = call["start"]
    times = np.array([start] + [t for t in ticks if t > start])
    gaps = np.diff(times) * 1000
    result = {
        "longest gap ms": float(gaps.max()),
        "set_model call ms": (call["end"] - start) * 1000,
        "gaps > 100 ms": int((gaps > 100).sum()),
        "until idle ms": (done - start) * 1000,
        "layers added": len(viewer.layers) - layers_before,
    }
    widget.stop_segmentation()
    viewer.close()
    idle(0.5)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobile_sam")
    parser.add_argument("--runs", type=int, default=3, help="runs per variant (alternating)")
    parser.add_argument("--no-prepare", action="store_true", help="only the behaviour before (layers made on load)")
    args = parser.parse_args()

    model = build_model(args.model)
    variants = [False] if args.no_prepare else [False, True]
    results: dict[bool, list[dict]] = {v: [] for v in variants}
    for _ in range(args.runs):
        for prepare in variants:
            results[prepare].append(measure(model, args.model, prepare))
    print(f"model {args.model} (random weights), sample CT, {args.runs} run(s) per variant, alternating")
    keys = list(results[variants[0]][0])
    print("| variant | " + " | ".join(keys) + " |")
    print("| --- |" + " ---: |" * len(keys))
    for prepare in variants:
        name = "layers prepared when the scan opens" if prepare else "layers made when the model loads (before)"
        cells = []
        for key in keys:
            values = [r[key] for r in results[prepare]]
            cells.append(f"{statistics.median(values):.0f} ({', '.join(f'{v:.0f}' for v in values)})")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
