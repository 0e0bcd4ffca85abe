"""Click-to-mask latency on a busy CPU while the background worker embeds other slices.

    xvfb-run -a python benchmarks/bench_busy_click.py [--load 2] [--clicks 8] [--rounds 2]

A real napari window with a synthetic CT (512x512 slices, MobileSAM's architecture with random
weights). Another process keeps ``--load`` CPU threads busy with numpy matrix products (another
program on the user's machine); meanwhile the controller's background worker embeds other slices
one after another, and clicks are added to the points layer as napari's "add" mode does. A click
is timed from the prompt being added to the mask being in the Labels layer and drawn (a forced
render). Each split of torch threads -- decode on the Qt thread x encode in the worker -- is
measured in turn, alternating, so that the noise of the machine falls on all of them alike.
Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

SPIN = """
import numpy as np, time
a = np.random.default_rng(0).random((700, 700))
while True:
    a = (a @ a) / 700.0
"""


def start_load(threads: int):
    if threads <= 0:
        return None
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    return subprocess.Popen([sys.executable, "-c", SPIN], env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobile_sam")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--load", type=int, default=2, help="CPU threads of the other process (0: none)")
    parser.add_argument("--clicks", type=int, default=8, help="clicks per split and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--splits", nargs="+", default=["1x1", "1x2", "2x1", "2x2"],
                        help="DECODExENCODE torch thread counts")
    args = parser.parse_args()

    sys.path.insert(0, os.path.dirname(__file__))
    import numpy as np
    import torch
    from bench_interactive import bench_scene
    from qtpy.QtWidgets import QApplication

    from napari_medsam._napari.controller import SegmentationController
    from napari_medsam.segment.cache import EmbeddingCache, MemoryCache

    splits = [tuple(int(v) for v in s.split("x")) for s in args.splits]
    depth = 200  # more slices than the run can embed: the worker never runs dry
    viewer, image, labels, model = bench_scene(args.model, args.size, depth=depth)
    app = QApplication.instance()
    controller = SegmentationController(viewer, image, labels, model, cache=EmbeddingCache(MemoryCache()))
    canvas = viewer.window._qt_viewer.canvas
    state = {"decode": 0, "encode": 2, "embedded": []}  # (0: before the runs)
    job = controller.queue._job

    def timed_job(axis, index):  # the worker's job with the split's encoder threads
        split_of_job = (state["decode"], state["encode"])
        torch.set_num_threads(split_of_job[1])
        start = time.perf_counter()
        out = job(axis, index)
        state["embedded"].append((split_of_job, time.perf_counter() - start))
        return out

    controller.queue._job = timed_job

    def idle(seconds, until=None):
        end = time.perf_counter() + seconds
        while time.perf_counter() < end and not (until is not None and until()):
            app.processEvents()
            time.sleep(0.005)

    idle(2.0)
    target = int(viewer.dims.current_step[0])
    idle(120, until=lambda: controller.queue.running is None and controller.is_embedded(0, target))
    load = start_load(args.load)
    try:
        idle(1.0)
        others = iter(i for i in range(depth) if i != target)

        def keep_busy():  # the worker always has the next slice waiting
            while len(controller.queue.pending) < 2:
                controller.queue.request(0, next(others), urgent=True)

        rng = np.random.default_rng(0)
        centre = args.size / 2
        clicks: dict = {s: [] for s in splits}
        encodes: dict = {s: [] for s in splits}
        for _ in range(args.rounds):
            for split in splits:
                decode, encode = split
                torch.set_num_threads(decode)
                state["decode"], state["encode"] = decode, encode
                keep_busy()
                idle(1.5, until=None)  # the encoder job running now started with this split's threads
                for i in range(args.clicks + 1):
                    controller.points_layer.data = np.zeros((0, 3))
                    keep_busy()
                    idle(0.3)
                    row, col = centre + rng.uniform(-args.size / 10, args.size / 10, 2)
                    t0 = time.perf_counter()
                    controller.points_layer.add([target, row, col])
                    canvas._scene_canvas.render()
                    elapsed = (time.perf_counter() - t0) * 1000
                    if i > 0 and controller.queue.running is not None:  # first: warm-up after a change
                        clicks[split].append(elapsed)
    finally:
        if load is not None:
            load.kill()
            load.wait()
    controller.close()
    for split, seconds in state["embedded"]:  # each encoder job ran with the threads of the split it started in
        if split in encodes:
            encodes[split].append(seconds)
    print(f"model {args.model} (random weights), {args.size}x{args.size} slices, {os.cpu_count()} CPUs, "
          f"other process: {args.load} busy thread(s); {args.rounds} rounds x {args.clicks} clicks per split")
    print("| decode threads (Qt) | encode threads (worker) | click -> mask median ms | p90 ms | max ms | "
          "encoder s/slice (median) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for split in splits:
        c = sorted(clicks[split])
        e = encodes[split]
        p90 = c[min(len(c) - 1, int(0.9 * len(c)))] if c else float("nan")
        print(f"| {split[0]} | {split[1]} | {statistics.median(c):.0f} | {p90:.0f} | {max(c):.0f} | "
              f"{statistics.median(e) if e else float('nan'):.2f} (n={len(e)}) |")


if __name__ == "__main__":
    main()
