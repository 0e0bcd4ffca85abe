"""Concept (text) prompts with EfficientSAM3: per-slice costs and "find in N slices" on the CT phantom.

    python benchmarks/bench_concept.py [--golden DIR] [--full b0 b1] [--slices 6] [--repeats 3] [--threads 2]

For each model (the reduced golden checkpoint, and with ``--full`` the official-size EfficientViT-b0/b1 +
MobileCLIP-S0 model with random weights: timing does not depend on the values) it prints the median of
``--repeats`` runs of

* ``image``: the image encoder on one phantom slice (preprocessing to 1008 x 1008 included), i.e. what
  :meth:`ConceptModel.encode` costs on a cache miss;
* ``text``: the text encoder on one phrase (what a new phrase costs; later uses are cached);
* ``detector``: geometry/fusion encoder, decoder, scoring, mask head and post-processing on cached image
  and text features, i.e. what ``find`` costs on a slice already encoded (masks only for the detections
  kept, as :meth:`ConceptModel.detect` asks; the pixel decoder is skipped when none is kept);
* ``detector, masks of all queries``: the same with masks for every query (``ground(masks=True)``, the
  path the golden tests check), for comparison;

then one ``find_in_slices`` over ``--slices`` consecutive liver slices from an empty cache (search of the
whole range, seed, both fronts), with seconds per slice. The phantom is 56 x 168 x 168 (``--depth`` changes
the slice count; any slice size is stretched to 1008 x 1008 by the model; only the final mask resize depends
on it); ``--skip-parts`` runs only the find. The load average is
printed with every figure: on a shared machine compare figures of one run only. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def _load() -> str:
    return "load " + " ".join(f"{v:.2f}" for v in os.getloadavg())


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _models(args):
    import torch

    from napari_medsam.models.networks.es3.model import Es3Config, build_es3_model
    from napari_medsam.models.networks.es3.tokenizer import ClipTokenizer
    from napari_medsam.models.networks.es3.vision import EFFICIENTVIT_B0, EFFICIENTVIT_B1, VisionConfig
    from napari_medsam.segment.concept import ConceptModel

    folder = Path(args.golden) / "efficientsam3"
    vocabulary = folder / "bpe_simple_vocab_16e6.txt.gz"
    yield "reduced golden (b0, d 64)", 0.2552, ConceptModel.from_checkpoint(
        weights=folder / "es3_reduced_random.pt", vocabulary=vocabulary, device="cpu")
    trunks = {"b0": EFFICIENTVIT_B0, "b1": EFFICIENTVIT_B1}
    for name in args.full:
        torch.manual_seed(0)
        config = Es3Config(vision=VisionConfig(trunk=trunks[name]))
        network = build_es3_model(config, tokenizer=ClipTokenizer(vocabulary, config.text.context_length))
        params = sum(p.numel() for p in network.parameters()) / 1e6
        yield f"full-size {name} + MobileCLIP-S0, random ({params:.1f}M)", 0.5, ConceptModel(
            network, name=f"full-{name}", device="cpu")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--golden", default=str(REPO.parent / "shared" / "golden"))
    parser.add_argument("--full", nargs="*", default=[], choices=["b0", "b1"],
                        help="also time official-size models with random weights")
    parser.add_argument("--slices", type=int, default=6, help="slices of the find-in-slices run")
    parser.add_argument("--depth", type=int, default=56,
                        help="slices of the phantom (its default 56; e.g. 64 for a 60-slice run)")
    parser.add_argument("--skip-parts", action="store_true",
                        help="only the find-in-slices run (no per-part timings)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    from napari_medsam.phantoms import make_ct_phantom
    from napari_medsam.segment.concept import ConceptSegmenter
    from napari_medsam.segment.intensity import default_mapping

    torch.set_num_threads(args.threads)
    os.environ.setdefault("NAPARI_MEDSAM_ADAPTIVE_THREADS", "0")
    volume, truth, _ = make_ct_phantom(shape=(args.depth, 168, 168), spacing_mm=(2.8 * 56 / args.depth, 2.1, 2.1))
    liver = np.flatnonzero((truth == 1).any(axis=(1, 2)))
    middle = int(liver[len(liver) // 2])
    first = max(0, middle - args.slices // 2)
    span = range(first, min(volume.shape[0], first + args.slices))
    mapping = default_mapping(volume.array, volume.modality)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; phantom {volume.shape}; {_load()}")
    for label, threshold, model in _models(args):
        seg = ConceptSegmenter(model, volume, mapping=mapping, threshold=threshold)
        if not args.skip_parts:
            rgb = seg.slices.model_image(middle)
            image = _median_time(lambda: model.encode(rgb), args.repeats)
            print(f"[{label}] image encoder {image:.3f} s/slice; {_load()}")
            with torch.inference_mode():
                text = _median_time(lambda: model.network.encode_text(["liver"]), args.repeats)
            print(f"[{label}] text encoder {text * 1000:.1f} ms/phrase; {_load()}")
            packed = seg.embed(middle)
            model.text("liver")
            detector = _median_time(lambda: model.detect(packed, "liver", None, None, seg.slice_shape, threshold),
                                    args.repeats)
            kept = len(model.detect(packed, "liver", None, None, seg.slice_shape, threshold).scores)
            print(f"[{label}] detector + masks {detector:.3f} s/slice (features cached; {kept} kept); {_load()}")
            features, phrase = model.features(packed), model.text("liver")

            def all_queries():
                with torch.inference_mode():
                    outputs = model.network.ground(features, phrase)
                    return model.network.postprocess(outputs, seg.slice_shape, threshold)

            every = _median_time(all_queries, args.repeats)
            print(f"[{label}] detector, masks of all queries {every:.3f} s/slice; {_load()}")
        seg = ConceptSegmenter(model, volume, mapping=mapping, threshold=threshold)  # an empty cache
        start = time.perf_counter()
        track = seg.find_in_slices(span, "liver")
        total = time.perf_counter() - start
        print(f"[{label}] find in {len(span)} slices {total:.2f} s ({total / len(span):.2f} s/slice), "
              f"{len(track.slices)} slice(s) kept, seed {track.seed}; {_load()}")
        seg = model = None  # free this model before the next one is built
    return 0


if __name__ == "__main__":
    sys.exit(main())
