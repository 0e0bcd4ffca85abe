"""Time per slice of "segment everything": encoder, decoding, post-processing; reference vs fast decoder.

    python benchmarks/bench_everything.py [--models mobile_sam lite_medsam] [--points-per-side 32]
                                          [--batches 64] [--rounds 1] [--paths reference fast]
                                          [--threads N] [--loose]

Random weights (the speed does not depend on their values) on a 512x512 CT-like slice; SAM's
default thresholds. Each round runs the paths one after the other on the same slice, in turn
first and second (reference, fast; then fast, reference; ...), so that both see the same load on a
shared machine; compare figures of the same run only. "reference" decodes with ``network.decode``
(every mask of every point to logits), "fast" with ``MaskDecoder.decode_points`` (shared first-block
work, logits for the masks above the IoU threshold only; SAM-1 family). The slice is encoded once
before the rounds (the embedding cache serves every run), so "encoder" is a cache hit. Random
networks let few masks pass the filters, so the post-processing figure is a lower bound;
``--loose`` switches the filters off (every mask upsampled, the worst case). Prints figures with
the load average; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mobile_sam", "lite_medsam"])
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--batches", nargs="+", type=int, default=[64])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--paths", nargs="+", choices=["reference", "fast"], default=["reference", "fast"])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--loose", action="store_true", help="no IoU/stability filter (worst-case post-processing)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import numpy as np
    import torch

    from napari_medsam.models.networks.sam import build_network
    from napari_medsam.models.registry import get_model
    from napari_medsam.segment.everything import EverythingSettings, segment_everything
    from napari_medsam.segment.intensity import ct_window
    from napari_medsam.segment.model import SamModel
    from napari_medsam.segment.predictor import SlicePredictor

    if args.threads:
        torch.set_num_threads(args.threads)
    volume = np.random.default_rng(0).normal(40, 20, size=(3, args.size, args.size)).astype(np.int16)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
          f"{args.points_per_side}x{args.points_per_side} points, {args.size}x{args.size} slice")
    print("| model | path | batch | encoder s | decoding s | post-processing s | total s | candidates | load avg |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.models:
        spec = get_model(name)
        torch.manual_seed(0)
        model = SamModel(build_network(spec.architecture, **spec.build_options), spec.pipeline, name=name,
                         signature=f"bench-{name}", device=args.device)
        predictor = SlicePredictor(model, volume, mapping=ct_window("soft tissue"), signature=f"bench-{name}")
        start = time.perf_counter()
        predictor.embed(1)
        print(f"| {name} | encoder | - | {time.perf_counter() - start:.2f} | | | | | "
              f"{os.getloadavg()[0]:.2f} |", flush=True)
        for batch in args.batches:
            settings = EverythingSettings(points_per_side=args.points_per_side, points_per_batch=batch,
                                          **({"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
                                             if args.loose else {}))
            for round_ in range(args.rounds):
                paths = args.paths if round_ % 2 == 0 else args.paths[::-1]
                for path in paths:
                    start = time.perf_counter()
                    result = segment_everything(predictor, 1, settings, reference=path == "reference")
                    total = time.perf_counter() - start
                    s = result.seconds
                    print(f"| {name} | {path} | {batch} | {s['encoder']:.2f} | {s['decoder']:.2f} | "
                          f"{s['postprocess']:.2f} | {total:.2f} | {len(result.candidates)} | "
                          f"{os.getloadavg()[0]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
