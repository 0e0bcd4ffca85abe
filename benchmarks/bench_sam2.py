"""Speed of the SAM 2 / MedSAM2 memory engine on this machine, beside the SAM engine's per-slice cost.

    python benchmarks/bench_sam2.py [--runs 3] [--slices 60] [--threads N] [--archs hiera_t512 hiera_t]

Prints Markdown tables for docs/performance.md:

* the Hiera image encoder per slice: MedSAM2 (Hiera-T, 512 px) and SAM 2.1 Tiny (1024 px);
* per propagated slice: memory attention + SAM heads (``track_frame``) and the memory encoder,
  with a full memory bank (one key slice, six previous slices, 16 object pointers);
* a whole propagation of ``--slices`` slices of a CT phantom from one key slice (a mask), cold (every
  slice encoded) and warm (features cached, as after a first run or a prefetch);
* the SAM engine's cost per slice on the same machine in the same run (encoder + one decode of
  MedSAM ViT-B and LiteMedSAM), the unit its slice-by-slice propagation pays per slice.

Networks get random weights (speed does not depend on the values); the memory engine runs with
``official=True`` so that every slice is tracked whatever the random masks look like. Figures are
medians; compare them only with figures from the same run (times drift between hours here).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time


def _median_ms(fn, runs: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def sam2_figures(arch: str, runs: int, slices: int) -> dict:
    import numpy as np
    import torch

    from napari_medsam.models.networks.sam2 import build_sam2
    from napari_medsam.phantoms import make_ct_phantom
    from napari_medsam.segment.memory.engine import propagate_memory, tracker_for
    from napari_medsam.segment.model import SamModel
    from napari_medsam.segment.predictor import SlicePredictor

    torch.manual_seed(0)
    network = build_sam2(arch).eval()
    pipeline = "medsam2" if arch == "hiera_t512" else "sam2"
    model = SamModel(network, pipeline, name=f"bench-{arch}", signature=f"bench-{arch}")
    volume, organs, _ = make_ct_phantom(shape=(slices, 256, 256), spacing_mm=(2.5, 1.4, 1.4))
    sub = np.asarray(volume.array)
    predictor = SlicePredictor(model, volume)
    size = network.image_size
    image = torch.randn(1, 3, size, size)

    with torch.inference_mode():
        encode_ms = _median_ms(lambda: network.encode_frame(image), runs)
        features = network.encode_frame(image)
        coords = torch.tensor([[[size * 0.3, size * 0.3], [size * 0.6, size * 0.6]]])
        labels = torch.tensor([[2, 3]], dtype=torch.int32)
        key = network.prompt_frame(features, coords, labels)
        key_ms = _median_ms(lambda: network.prompt_frame(features, coords, labels), runs * 3)
        key.memory = network.encode_memory(features, key)
        memories = [(0, key.memory)] + [(t, key.memory) for t in range(1, network.config.num_maskmem)]
        pointers = [(1, key.obj_ptr)] + [(d, key.obj_ptr) for d in range(1, 16)]
        track_ms = _median_ms(lambda: network.track_frame(features, memories, pointers, 15), runs * 3)
        out = network.track_frame(features, memories, pointers, 15)
        memory_ms = _median_ms(lambda: network.encode_memory(features, out), runs * 3)

    middle = predictor.n_slices // 2
    key = organs[middle] == 1  # the liver on the middle slice, given as a mask (random weights predict noise)
    with torch.no_grad():  # random weights: make the object "present" so every slice runs the whole path
        network.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(10.0)

    def whole() -> float:
        labels_vol = np.zeros(sub.shape, np.uint8)
        start = time.perf_counter()
        propagate_memory(predictor, labels_vol, 1, {middle: key}, tracker=tracker_for(predictor), official=True,
                         prefetch=False)
        return time.perf_counter() - start

    predictor.cache.clear()
    cold_s = whole()
    warm_s = whole()
    return {"arch": arch, "input": size, "encode_ms": encode_ms, "key_ms": key_ms, "track_ms": track_ms,
            "memory_ms": memory_ms, "slices": predictor.n_slices, "cold_s": cold_s, "warm_s": warm_s}


def sam_figures(name: str, runs: int) -> dict:
    import torch

    from napari_medsam.models.networks.sam import build_network
    from napari_medsam.models.registry import get_model

    spec = get_model(name)
    torch.manual_seed(0)
    network = build_network(spec.architecture, **spec.build_options).eval()
    size = network.image_size
    image = torch.randn(1, 3, size, size)
    with torch.inference_mode():
        encode_ms = _median_ms(lambda: network.encode_image(image), runs)
        emb = network.encode_image(image)
        boxes = torch.tensor([[size * 0.3, size * 0.3, size * 0.6, size * 0.6]])
        decode_ms = _median_ms(lambda: network.decode(emb, boxes=boxes), runs * 3)
    return {"model": name, "input": size, "encode_ms": encode_ms, "decode_ms": decode_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--slices", type=int, default=60)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--archs", nargs="+", default=["hiera_t512", "hiera_t"],
                        help="SAM 2 architectures (hiera_t at 1024 px takes about 10 minutes)")
    parser.add_argument("--skip-sam", action="store_true", help="leave out the SAM-engine rows")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print("| model | input | encoder / slice | key slice (box) | track: memory attention + heads | "
          "memory encoder | whole propagation, cold | warm (features cached) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for arch in args.archs:
        r = sam2_figures(arch, args.runs, args.slices)
        print(f"| {'MedSAM2' if arch == 'hiera_t512' else 'SAM 2.1 Tiny'} ({arch}) | {r['input']} | "
              f"{r['encode_ms']:.0f} ms | {r['key_ms']:.1f} ms | {r['track_ms']:.1f} ms | {r['memory_ms']:.1f} ms | "
              f"{r['cold_s']:.1f} s ({r['slices']} slices) | {r['warm_s']:.1f} s |")
    if not args.skip_sam:
        print("\n| SAM engine model | input | encoder / slice | decode (box) | per propagated slice |")
        print("| --- | --- | --- | --- | --- |")
        for name in ("lite_medsam", "medsam"):
            r = sam_figures(name, args.runs)
            print(f"| {name} | {r['input']} | {r['encode_ms']:.0f} ms | {r['decode_ms']:.1f} ms | "
                  f"{r['encode_ms'] + r['decode_ms']:.0f} ms |")


if __name__ == "__main__":
    main()
