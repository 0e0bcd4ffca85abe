"""What the stop rule's image evidence costs per propagated slice, next to the prediction it judges.

    python benchmarks/bench_stop_evidence.py [--model lite_medsam] [--size 512] [--repeat 30]

On one synthetic CT slice (a bright organ beside a second one) whose embedding is cached, the
two steps of a propagated slice alternate in one run: ``SlicePredictor.predict`` (prompt
encoder, mask decoder, masks back on the slice grid) and the stop rule's evidence
(``evidence.measure`` with the image, the previous slice and the key slices' appearance, then
``judge``) on an organ-sized mask and on a whole-slice mask; then the image encoder three
times (what each propagated slice also costs). Prints medians and ratios; asserts nothing.
The network has random weights (speed does not depend on them).
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lite_medsam")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()

    import numpy as np
    import torch

    from napari_medsam.models.device import set_cpu_threads
    from napari_medsam.models.networks.sam import build_network
    from napari_medsam.models.registry import get_model
    from napari_medsam.segment.model import SamModel
    from napari_medsam.segment.predictor import Prompts, SlicePredictor
    from napari_medsam.segment.propagation import StopRule
    from napari_medsam.segment.propagation.evidence import Appearance, measure
    from napari_medsam.segment.propagation.stop_rules import FrontCounters, judge
    from napari_medsam.volume import Volume

    set_cpu_threads(None)
    spec = get_model(args.model)
    torch.manual_seed(0)
    model = SamModel(build_network(spec.architecture, **spec.build_options), spec.pipeline, name=args.model,
                     signature=f"bench-{args.model}")
    n = args.size
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:n, :n]
    organ = (yy - n * 0.5) ** 2 + (xx - n * 0.4) ** 2 < (n * 0.18) ** 2
    other = (yy - n * 0.5) ** 2 + (xx - n * 0.72) ** 2 < (n * 0.1) ** 2
    slices = []
    for _ in range(3):
        image = rng.normal(-90, 12, (n, n))
        image[organ], image[other] = rng.normal(60, 12, organ.sum()), rng.normal(150, 12, other.sum())
        slices.append(image)
    volume = Volume(np.stack(slices).astype(np.int16), (2.5, 0.8, 0.8), (0.0, 0.0, 0.0), np.eye(3), modality="CT",
                    intensity_unit="HU")
    predictor = SlicePredictor(model, volume, axis=0)
    predictor.embed(1)
    rr, cc = np.nonzero(organ)
    prompts = Prompts(box=np.array([rr.min(), cc.min(), rr.max(), cc.max()], float))
    look = Appearance.of([predictor.image(0)], [organ], "HU")
    rule = StopRule()

    def predict() -> np.ndarray:
        return predictor.predict(1, prompts).masks[0]

    def evidence(mask: np.ndarray) -> None:
        ev = measure(mask, organ, pixel_mm=(0.8, 0.8), image=predictor.image(1), appearance=look,
                     previous_image=predictor.image(0))
        judge(rule, mask, 0.9, organ, FrontCounters(), ev, "HU")

    # The judged mask: the organ moved a little, as on the next slice (a random network's own
    # answer can cover the whole slice, which is the worst case, timed separately).
    moved = (yy - n * 0.5) ** 2 + (xx - n * 0.41) ** 2 < (n * 0.17) ** 2
    whole = np.ones((n, n), bool)
    predict()
    evidence(moved)  # warm up
    t_predict, t_evidence, t_whole = [], [], []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        predict()
        t1 = time.perf_counter()
        evidence(moved)
        t2 = time.perf_counter()
        evidence(whole)
        t3 = time.perf_counter()
        t_predict.append(t1 - t0)
        t_evidence.append(t2 - t1)
        t_whole.append(t3 - t2)
    t_encode = []
    for _ in range(3):  # what a propagated slice also costs: its embedding (not cached here)
        predictor.cache.memory.clear()
        t0 = time.perf_counter()
        predictor.embed(2)
        t_encode.append(time.perf_counter() - t0)
    p, e, w = (statistics.median(v) * 1e3 for v in (t_predict, t_evidence, t_whole))
    enc = statistics.median(t_encode) * 1e3
    print(f"model {args.model}, slice {n}x{n}, {args.repeat} repeats, {torch.get_num_threads()} torch threads")
    print(f"predict (decoder + masks on the slice grid):        {p:.1f} ms median")
    print(f"stop-rule evidence, organ of {organ.mean():.0%} of the slice: {e:.1f} ms median")
    print(f"stop-rule evidence, a mask over the whole slice:     {w:.1f} ms median")
    print(f"encoder (one slice's embedding, median of 3):       {enc:.0f} ms")
    print(f"evidence / predict: {e / p:.2f} (organ), {w / p:.2f} (whole slice); "
          f"evidence / (encode + predict): {e / (enc + p):.3f} (organ)")


if __name__ == "__main__":
    main()
