"""Latency a user feels: "scroll one slice, then click" with and without prefetch, and the decode thread split.

    xvfb-run -a python3 benchmarks/bench_prefetch.py scroll [--trials 6] [--dwell S] [--pause 0.5]
    python3 benchmarks/bench_prefetch.py threads [--decodes 15] [--rounds 3] [--model lite_medsam]

``scroll``: a real napari window and the panel's controller, LiteMedSAM's network with random
weights, the project's CT phantom (napari_medsam.phantoms.make_ct_phantom, 168x168 slices). A
trial lands on a fresh slice, waits until it is embedded and then ``--dwell`` seconds (the user
looks at it; by default long enough for one neighbour to be prefetched at the speed the encoder
has in this trial, so a loaded machine does not just measure its load), scrolls one slice down,
waits ``--pause`` seconds (the hand moves to the spot) and clicks; the time from the click to
the mask being written is the latency. Trials alternate prefetch on and off on fresh slices, so
machine noise falls on both alike.

``threads``: the panel's decode under a busy encoder, without Qt: a background thread embeds
slice after slice with E torch threads (the embedding worker) while this thread decodes one-click
prompts (three candidate masks, SlicePredictor.predict as the controller calls it) with D threads
(the Qt thread, models.device.INTERACTIVE_THREADS). Each split D x E runs in turn, alternating,
idle and then with another process doing numpy matrix products (the CPU-heavy program of the
issue). Prints medians, p90 and encoder seconds per slice.

Every figure line carries os.getloadavg(): on a shared machine only ratios measured in one run
mean anything. Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

COMPETITOR = "import numpy as np; a=np.random.rand(2000,2000); [a@a for _ in range(10**6)]"


def load() -> str:
    return "load average " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def random_model(name: str):
    """The registry model's network with seeded random weights."""
    import torch

    from napari_medsam.models.networks.sam import build_network
    from napari_medsam.models.registry import get_model
    from napari_medsam.segment.model import SamModel

    spec = get_model(name)
    torch.manual_seed(0)
    return SamModel(build_network(spec.architecture, **spec.build_options), spec.pipeline, name=name,
                    signature=f"bench-{name}")


def median_ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.0f}" if values else "-"


# ---------------------------------------------------------------------------------------- scroll
def scroll(args: argparse.Namespace) -> None:
    import napari
    import numpy as np
    from qtpy.QtWidgets import QApplication

    from napari_medsam._napari.controller import SegmentationController
    from napari_medsam._napari.settings import Settings
    from napari_medsam.phantoms import make_ct_phantom
    from napari_medsam.segment.cache import EmbeddingCache, MemoryCache

    volume, _, _ = make_ct_phantom()
    model = random_model(args.model)
    viewer = napari.Viewer(show=True)
    image = viewer.add_image(volume.array, name="ct", scale=volume.spacing_mm, contrast_limits=(-160, 240))
    labels = viewer.add_labels(np.zeros(volume.array.shape, np.uint8), name="labels", scale=volume.spacing_mm)
    labels.selected_label = 1
    app = QApplication.instance()
    settings = Settings(Path(tempfile.mkdtemp(prefix="bench-prefetch-")) / "settings.json")  # not the user's
    controller = SegmentationController(viewer, image, labels, model, cache=EmbeddingCache(MemoryCache()),
                                        settings=settings)
    written: list[tuple[int, int, int]] = []
    controller.mask_written.connect(written.append)

    def idle(seconds: float, until=None) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end and not (until is not None and until()):
            app.processEvents()
            time.sleep(0.002)

    def show(index: int) -> None:
        viewer.dims.set_point(0, image.data_to_world([index, 0, 0])[0])

    rows, cols = volume.array.shape[1:]
    depth = volume.array.shape[0]
    idle(1.0)
    idle(120, until=lambda: controller.queue.running is None)  # the first slice shown (signature, warm-up)
    results: dict[bool, list[float]] = {True: [], False: []}
    loads: list[str] = []
    start = 4
    for trial in range(2 * args.trials):
        prefetch = trial % 2 == 0
        slice_ = start + 4 * trial  # fresh slices: nothing cached around them
        if slice_ + 1 >= depth:
            break
        controller.prefetch = prefetch
        landed = time.perf_counter()
        show(slice_)
        idle(120, until=lambda: controller.is_embedded(0, slice_) and controller.queue.running is None)
        # The user looks at the slice: --dwell s, else long enough for one neighbour to be
        # prefetched on this machine now (the prefetch delay and 1.5 landing embeds).
        dwell = args.dwell or controller.queue.prefetch_delay_ms / 1000 + 1.5 * (time.perf_counter() - landed)
        idle(dwell)
        show(slice_ + 1)
        idle(args.pause)
        written.clear()
        clicked = time.perf_counter()
        controller.points_layer.add([slice_ + 1, rows / 2, cols / 2])
        idle(120, until=lambda: any(w[:2] == (0, slice_ + 1) for w in written))
        results[prefetch].append(time.perf_counter() - clicked)
        loads.append(load())
        print(f"  trial {trial}: prefetch {'on ' if prefetch else 'off'} slice {slice_}->{slice_ + 1}, dwell "
              f"{dwell:.1f} s: {results[prefetch][-1] * 1000:.0f} ms ({loads[-1]})", flush=True)
        idle(30, until=lambda: controller.queue.running is None)  # nothing left over for the next trial
    controller.close()
    print(f"{args.model} (random weights), CT phantom {volume.array.shape}, dwell {args.dwell or 'auto'} s, "
          f"pause {args.pause} s, {os.cpu_count()} CPUs")
    on, off = results[True], results[False]
    print("| prefetch | scroll one slice, click -> mask: median ms | min | max | trials |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, values in (("on", on), ("off", off)):
        print(f"| {name} | {median_ms(values)} | {min(values) * 1000:.0f} | {max(values) * 1000:.0f} | {len(values)} |")
    if on and off:
        print(f"off / on (medians): {statistics.median(off) / statistics.median(on):.1f}x; {load()}")


# --------------------------------------------------------------------------------------- threads
def threads(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from napari_medsam.phantoms import make_ct_phantom
    from napari_medsam.segment.intensity import ct_window
    from napari_medsam.segment.predictor import Prompts, SlicePredictor

    volume, _, _ = make_ct_phantom()
    model = random_model(args.model)
    predictor = SlicePredictor(model, volume.array, mapping=ct_window("soft tissue"),
                               spacing_mm=volume.spacing_mm, signature="bench")
    target = volume.array.shape[0] // 2
    predictor.embed(target)
    rows, cols = volume.array.shape[1:]
    click = Prompts(points=np.array([[rows / 2, cols / 2]]), positive=np.array([True]))
    splits = [tuple(int(v) for v in s.split("x")) for s in args.splits]
    state = {"encode": 1, "stop": False, "next": 0}
    encodes: dict[tuple[int, int], list[float]] = {}

    def encoder() -> None:  # the embedding worker: slice after slice, with the split's thread count
        while not state["stop"]:
            split = (state["decode"], state["encode"])
            torch.set_num_threads(split[1])
            index = state["next"] % volume.array.shape[0]
            state["next"] += 1
            t0 = time.perf_counter()
            model.encode(predictor.model_image(index))  # not cached: the encoder runs every time
            encodes.setdefault(split, []).append(time.perf_counter() - t0)

    for condition in ("idle", "competing process"):
        competitor = None
        if condition != "idle":
            competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR])
            time.sleep(2.0)
        encodes.clear()
        decodes: dict[tuple[int, int], list[float]] = {s: [] for s in splits}
        quiet: dict[tuple[int, int], list[float]] = {s: [] for s in splits}
        state.update(decode=splits[0][0], encode=splits[0][1], stop=False)
        worker = threading.Thread(target=encoder, daemon=True)
        before = load()
        try:
            worker.start()
            for _ in range(args.rounds):
                for split in splits:
                    state["decode"], state["encode"] = split
                    torch.set_num_threads(split[0])
                    time.sleep(1.2)  # the encoder job under way has started with this split's threads
                    for _ in range(args.decodes):
                        t0 = time.perf_counter()
                        predictor.predict(target, click, multimask=True)
                        decodes[split].append(time.perf_counter() - t0)
                        time.sleep(0.05)  # clicks come apart
        finally:
            state["stop"] = True
            worker.join()
        # The same decodes with the encoder stopped: what a click costs on its own.
        for split in splits:
            torch.set_num_threads(split[0])
            for _ in range(max(5, args.decodes // 3)):
                t0 = time.perf_counter()
                predictor.predict(target, click, multimask=True)
                quiet[split].append(time.perf_counter() - t0)
        after = load()
        if competitor is not None:
            competitor.kill()
            competitor.wait()
        print(f"\n{args.model} (random weights), one click -> 3 masks on a {rows}x{cols} phantom slice, "
              f"{condition}, {os.cpu_count()} CPUs; before: {before}; after: {after}")
        print("| decode threads (Qt) | encode threads (worker) | decode ms while encoding: median | p90 | "
              "decode ms, encoder stopped | encoder s/slice (n) |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: |")
        for split in splits:
            d = sorted(decodes[split])
            p90 = d[min(len(d) - 1, int(0.9 * len(d)))] * 1000
            e = encodes.get(split, [])
            print(f"| {split[0]} | {split[1]} | {median_ms(d)} | {p90:.0f} | {median_ms(quiet[split])} | "
                  f"{statistics.median(e) if e else float('nan'):.2f} ({len(e)}) |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    one = sub.add_parser("scroll", help="scroll one slice, then click: prefetch on vs off")
    one.add_argument("--model", default="lite_medsam")
    one.add_argument("--trials", type=int, default=6, help="trials per setting")
    one.add_argument("--dwell", type=float, default=0.0,
                     help="seconds on a slice after it is embedded (0: the prefetch delay + 1.5 x its embed time)")
    one.add_argument("--pause", type=float, default=0.5, help="seconds from the scroll to the click")
    two = sub.add_parser("threads", help="decode latency while the encoder runs, per thread split")
    two.add_argument("--model", default="lite_medsam")
    two.add_argument("--decodes", type=int, default=15, help="decodes per split and round")
    two.add_argument("--rounds", type=int, default=3)
    two.add_argument("--splits", nargs="+", default=["1x1", "1x2", "2x1", "2x2"], help="DECODExENCODE threads")
    args = parser.parse_args()
    print(load(), flush=True)
    scroll(args) if args.what == "scroll" else threads(args)


if __name__ == "__main__":
    main()
