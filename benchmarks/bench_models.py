"""Speed of the SAM-family engine on this machine: encoder, prompt-to-mask, memory, cache size.

    python benchmarks/bench_models.py [--models mobile_sam lite_medsam sam_vit_b medsam2] [--runs 3] [--threads N]

Prints one Markdown table (put it in docs/performance.md with the machine it came from).
Networks get random weights: speed does not depend on the values. Each model runs in its own
process so that its peak memory is its own.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

DEFAULT_MODELS = ["mobile_sam", "lite_medsam", "sam_vit_b"]


def measure(name: str, runs: int, threads: int | None, device: str) -> dict:
    """Time one model in this process; return the figures as a dict."""
    import numpy as np
    import torch

    from napari_medsam.models.networks.sam import build_network
    from napari_medsam.models.registry import get_model
    from napari_medsam.segment.intensity import ct_window
    from napari_medsam.segment.model import SamModel
    from napari_medsam.segment.predictor import Prompts, SlicePredictor

    if threads:
        torch.set_num_threads(threads)
    spec = get_model(name)
    torch.manual_seed(0)
    if spec.family == "sam2":
        from napari_medsam.models.networks.sam2 import build_sam2

        network = build_sam2(spec.architecture, **spec.build_options)
    else:
        network = build_network(spec.architecture, **spec.build_options)
    model = SamModel(network, spec.pipeline, name=name, signature=f"bench-{name}", device=device)
    rng = np.random.default_rng(0)
    volume = rng.normal(40, 20, size=(max(runs, 1) + 1, 512, 512)).astype(np.int16)
    predictor = SlicePredictor(model, volume, mapping=ct_window("soft tissue"), signature="bench")

    # Encoder: the first call warms up kernels; the median of the next ``runs`` is reported.
    encode_ms = []
    for index in range(runs + 1):
        image = predictor.model_image(index)
        start = time.perf_counter()
        model.encode(image)
        if device != "cpu":
            torch.cuda.synchronize()
        encode_ms.append((time.perf_counter() - start) * 1000)
    encode_ms = encode_ms[1:] if runs else encode_ms
    predictor.embed(0)

    def prompt_ms(prompts: Prompts, repeat: int = 20, **kwargs) -> float:
        predictor.predict(0, prompts, **kwargs)
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            predictor.predict(0, prompts, **kwargs)
            times.append((time.perf_counter() - start) * 1000)
        return statistics.median(times)

    box = Prompts(box=[150, 160, 330, 360])
    points = Prompts(points=[[250, 250], [300, 200], [100, 100]], positive=[True, True, False])
    embedding = predictor.embed(0)
    return {
        "model": name,
        "architecture": spec.architecture,
        "input": spec.input_size,
        "encoder_ms": statistics.median(encode_ms),
        "box_ms": prompt_ms(box),
        "points_ms": prompt_ms(points),
        "points_multimask_ms": prompt_ms(points, multimask=True),
        "box_official_chain_ms": prompt_ms(box, exact=True),
        "cache_bytes_float32": int(embedding.astype("float32").nbytes),
        "cache_bytes_float16": int(embedding.astype("float16").nbytes),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    """Run each model in a subprocess and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--runs", type=int, default=3, help="encoder runs after one warm-up (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.runs, args.threads, args.device)))
        return
    import torch

    rows = []
    for name in args.models:
        command = [sys.executable, __file__, "--one", name, "--runs", str(args.runs), "--device", args.device]
        if args.threads:
            command += ["--threads", str(args.threads)]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, device {args.device}, 512x512 CT slice, random weights")
    print()
    print("| model | encoder ms/slice | box -> mask ms | 3 points -> mask ms | 3 points, 3 masks ms "
          "| box, official resize chain ms | peak RSS MiB | cache KiB/slice f32 / f16 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['model']} ({r['architecture']}, {r['input']}) | {r['encoder_ms']:.0f} | {r['box_ms']:.1f} | "
              f"{r['points_ms']:.1f} | {r['points_multimask_ms']:.1f} | {r['box_official_chain_ms']:.1f} | "
              f"{r['peak_rss_mib']:.0f} | {r['cache_bytes_float32'] / 1024:.0f} / {r['cache_bytes_float16'] / 1024:.0f} |")


if __name__ == "__main__":
    main()
