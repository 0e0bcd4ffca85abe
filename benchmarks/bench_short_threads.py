"""Decoder calls on a busy CPU: torch's full thread count against ``short_work_threads``, same run.

    python benchmarks/bench_short_threads.py [--model mobile_sam] [--compete 0 2] [--pairs 20]

``SamModel.decode`` runs on no more torch threads than there are cores free of other programs'
runnable tasks (models/device.py, ``short_work_threads``; the adaptation is what
NAPARI_MEDSAM_ADAPTIVE_THREADS switches). This script times ``SlicePredictor.predict`` for a box
on a 512x512 slice, three ways (a prepared slice as the widget's, an unprepared one as
propagation's and the CLI's, and the box with the previous mask as a correction), with the
adaptation off (the caller's full count, as before) and on, alternating call by call, while
``--compete`` single-threaded CPU-heavy processes run (``compare_official.competing``). Random
weights; prints medians and worst calls, asserts nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path


def _competing():
    path = Path(__file__).with_name("compare_official.py")
    spec = importlib.util.spec_from_file_location("compare_official_for_threads", path)
    module = sys.modules.get(spec.name)
    if module is None:
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    return module.competing


def run(model_name: str, compete: int, pairs: int) -> list[tuple[str, str, list[float]]]:
    import numpy as np
    import torch

    from napari_medsam.models import device
    from napari_medsam.models.networks.sam import build_network
    from napari_medsam.models.registry import get_model
    from napari_medsam.segment.intensity import ct_window
    from napari_medsam.segment.model import SamModel
    from napari_medsam.segment.predictor import Prompts, SlicePredictor

    spec = get_model(model_name)
    torch.manual_seed(0)
    model = SamModel(build_network(spec.architecture, **spec.build_options), spec.pipeline, name=model_name,
                     signature=f"bench-{model_name}")
    volume = np.random.default_rng(0).normal(40, 20, size=(2, 512, 512)).astype(np.int16)
    predictor = SlicePredictor(model, volume, mapping=ct_window("soft tissue"), signature="bench-threads")
    box = [180.0, 160.0, 330.0, 350.0]
    predictor.embed(0)
    predictor.embed(1)
    predictor.prepare(0)
    previous = predictor.predict(1, Prompts(box=box)).low_res_logits[0]
    cases = {
        "prepared slice": lambda: predictor.predict(0, Prompts(box=box)),
        "slice not prepared": lambda: predictor.predict(1, Prompts(box=box)),
        "box + previous mask": lambda: predictor.predict(1, Prompts(box=box, mask_logits=previous)),
    }
    rows = []
    saved = os.environ.get(device.ADAPTIVE_ENV)
    try:
        with _competing()(compete):
            for name, call in cases.items():
                times: dict[str, list[float]] = {"0": [], "1": []}
                for value in ("0", "1"):
                    os.environ[device.ADAPTIVE_ENV] = value
                    call()
                for i in range(pairs):
                    for value in ("0", "1") if i % 2 == 0 else ("1", "0"):
                        os.environ[device.ADAPTIVE_ENV] = value
                        start = time.perf_counter()
                        call()
                        times[value].append(time.perf_counter() - start)
                rows.append((name, "full count", times["0"]))
                rows.append((name, "short_work_threads", times["1"]))
    finally:
        if saved is None:
            os.environ.pop(device.ADAPTIVE_ENV, None)
        else:
            os.environ[device.ADAPTIVE_ENV] = saved
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobile_sam")
    parser.add_argument("--compete", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--pairs", type=int, default=20)
    args = parser.parse_args(argv)
    import torch

    print(f"# bench_short_threads: {args.model}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs; load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print("| competing processes | call | threads | median ms | worst ms |")
    print("| --- | --- | --- | ---: | ---: |")
    for compete in args.compete:
        for name, how, times in run(args.model, compete, args.pairs):
            print(f"| {compete} | {name} | {how} | {1000 * statistics.median(times):.1f} | {1000 * max(times):.1f} |",
                  flush=True)
    print(f"# load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
