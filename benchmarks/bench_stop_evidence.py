"""What the stop rule's image evidence costs per propagated slice, next to the prediction it judges.

    python benchmarks/bench_stop_evidence.py [--model lite_medsam] [--size 512] [--repeat 30]

On one synthetic CT slice (a bright organ beside a second one) whose embedding is cached, the
two steps of a propagated slice alternate in one run: ``SlicePredictor.predict`` (prompt
encoder, mask decoder, masks back on the slice grid) and the stop rule's evidence
(``evidence.measure`` with the image, the previous slice and the key slices' appearance, then
``judge``). Prints medians and their ratio; asserts nothing. The network has random weights
(speed does not depend on them); the encoder is not timed (a propagation prefetches it).
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

    mask = predict()
    evidence(organ)  # warm up both
    t_predict, t_evidence = [], []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        mask = predict()
        t1 = time.perf_counter()
        evidence(organ if not mask.any() else mask)
        t2 = time.perf_counter()
        t_predict.append(t1 - t0)
        t_evidence.append(t2 - t1)
    p, e = statistics.median(t_predict) * 1e3, statistics.median(t_evidence) * 1e3
    print(f"model {args.model}, slice {n}x{n}, {args.repeat} repeats, {torch.get_num_threads()} torch threads")
    print(f"predict (decoder + masks on the slice grid): {p:.1f} ms median")
    print(f"stop-rule evidence (measure + judge):         {e:.1f} ms median")
    print(f"evidence / predict: {e / p:.2f}")


if __name__ == "__main__":
    main()
