"""Decoder time depending on which thread ran the encoder before (torch's OpenMP teams).

    python benchmarks/bench_decoder_threads.py [--model mobile_sam] [--repeat 15]

The napari panel embeds slices on a persistent worker thread and decodes on the Qt thread.
This script times the decoder (one click, three candidate masks, 512x512 slice, random
weights) after the encoder ran (a) on the calling thread, (b) on a thread that has ended, and
(c) on a thread that is still alive, as a thread pool's is. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def measure(where: str, model_name: str, repeat: int) -> float:
    """Median decode ms in this process after embedding ``where`` ("main", "ended", "alive")."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import torch

    from napari_medsam.models.networks.sam import build_network
    from napari_medsam.models.registry import get_model
    from napari_medsam.segment.intensity import ct_window
    from napari_medsam.segment.model import SamModel
    from napari_medsam.segment.predictor import Prompts, SlicePredictor

    spec = get_model(model_name)
    torch.manual_seed(0)
    model = SamModel(build_network(spec.architecture, **spec.build_options), spec.pipeline, name=model_name,
                     signature=f"bench-{model_name}")
    volume = np.random.default_rng(0).normal(40, 20, size=(3, 512, 512)).astype(np.int16)
    predictor = SlicePredictor(model, volume, mapping=ct_window("soft tissue"), signature="bench")
    pool = None
    if where == "main":
        predictor.embed(1)
    elif where == "ended":
        thread = threading.Thread(target=predictor.embed, args=(1,))
        thread.start()
        thread.join()
    else:
        pool = ThreadPoolExecutor(1)
        pool.submit(predictor.embed, 1).result()
    time.sleep(0.5)
    click = Prompts(points=np.array([[250.0, 250.0]]), positive=np.array([True]))
    predictor.predict(1, click, multimask=True)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        predictor.predict(1, click, multimask=True)
        times.append((time.perf_counter() - start) * 1000)
    if pool is not None:
        pool.shutdown()
    return statistics.median(times)


def main() -> None:
    """Run each case in its own process and print the medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobile_sam")
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(measure(args.one, args.model, args.repeat))
        return
    print(f"{args.model}, one click -> 3 masks on a 512x512 slice, median of {args.repeat} decodes:")
    for where, text in (("main", "encoder ran on the decoding thread"),
                        ("ended", "encoder ran on a thread that has ended"),
                        ("alive", "encoder ran on a thread that is still alive (a pool's)")):
        out = subprocess.run([sys.executable, __file__, "--one", where, "--model", args.model,
                              "--repeat", str(args.repeat)], capture_output=True, text=True, check=True)
        print(f"  {text}: {float(out.stdout.strip().splitlines()[-1]):.1f} ms")


if __name__ == "__main__":
    main()
