"""Does fine-tuning learn? Random-weight LiteMedSAM, trained on one CT phantom, judged on another.

The golden random-weight checkpoint's masks are noise. Its decoder is fine-tuned on the large
organs (liver, spleen, kidneys) of ``make_ct_phantom(seed=0)`` and the box-prompt Dice is measured
on the same organs of ``make_ct_phantom(seed=1)`` (a different body: organs moved, other texture
and noise), before and after each epoch; ``--max-slices`` (default 12, evenly spaced) sets the
slices per organ on both sides, ``--val-slices`` can narrow the held-out ones further. Prints per-organ Dice before and
after and the time, as JSON. The time is this machine's (a shared 2-core CPU in the figures of
docs/performance.md); compare runs only within one run or one quiet machine.

    python3 benchmarks/bench_finetune.py [--model lite_medsam] [--checkpoint FILE] [--epochs N] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ORGANS = {1: "liver", 2: "spleen", 3: "right kidney", 4: "left kidney"}
GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lite_medsam")
    parser.add_argument("--checkpoint", default=None, help="default: the golden random-weight file")
    parser.add_argument("--epochs", type=int, default=None, help="default: the engine's")
    parser.add_argument("--max-slices", type=int, default=12, help="training slices per organ (evenly spaced)")
    parser.add_argument("--val-slices", type=int, default=None, help="held-out slices per organ (default: all)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the engine's")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the engine's)")
    parser.add_argument("--prompt-encoder", action=argparse.BooleanOptionalAction, default=None,
                        help="train the prompt encoder too (default: the engine's, yes)")
    parser.add_argument("--clicks", action="store_true",
                        help="train with the engine's default click prompts and corrections too (default: boxes only)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 is much faster on a CPU shared with other jobs)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import os

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from napari_medsam.phantoms import make_ct_phantom
    from napari_medsam.segment.finetune import FinetuneConfig, finetune
    from napari_medsam.segment.model import SamModel

    checkpoint = args.checkpoint or GOLDEN / ("lite_medsam_random.pth" if args.model == "lite_medsam"
                                              else "mobile_sam_random.pt")
    train_volume, train_labels, _ = make_ct_phantom(seed=0)
    val_volume, val_labels, _ = make_ct_phantom(seed=1)
    if args.val_slices is not None:  # keep only evenly spaced held-out slices (quicker evaluation)
        import numpy as np

        keep = np.zeros_like(val_labels)
        for value in ORGANS:
            rows = np.flatnonzero((val_labels == value).any(axis=(1, 2)))
            chosen = rows[np.round(np.linspace(0, len(rows) - 1, min(args.val_slices, len(rows)))).astype(int)]
            keep[chosen] = np.where(val_labels[chosen] == value, value, keep[chosen])
        val_labels = keep
    model = SamModel.from_checkpoint(args.model, checkpoint, device="cpu")
    config = FinetuneConfig(objects=tuple(ORGANS), max_slices=args.max_slices, seed=args.seed)
    if args.epochs:
        config.epochs = args.epochs
    if args.prompt_encoder is not None:
        config.train_prompt_encoder = args.prompt_encoder
    if args.batch_size:
        config.batch_size = args.batch_size
    if args.lr:
        config.learning_rate = args.lr
    if not args.clicks:
        config.point_fraction, config.corrections = 0.0, 0
    load_start = os.getloadavg()
    started = time.perf_counter()

    def progress(epoch: int, step: int, loss: float, dice: float | None) -> None:
        print(f"  epoch {epoch} step {step}: loss {loss:.3f} held-out Dice {dice:.3f} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)

    result = finetune(model, [(train_volume, train_labels)], validation=[(val_volume, val_labels)], config=config,
                      progress=progress)
    print(json.dumps({
        "model": args.model, "checkpoint": str(checkpoint), "epochs": config.epochs, "lr": config.learning_rate,
        "batch_size": config.batch_size, "prompt_encoder": config.train_prompt_encoder,
        "train_samples": result.train_samples, "val_samples": result.val_samples,
        "dice_before": round(result.dice_before, 3), "dice_after": round(result.dice_after, 3),
        "per_organ": {ORGANS[k]: {"before": round(result.per_object_before[k], 3),
                                  "after": round(result.per_object_after[k], 3)} for k in ORGANS},
        "curve": [(r.epoch, None if r.loss is None else round(r.loss, 3), round(r.dice, 3), round(r.seconds))
                  for r in result.curve],
        "seconds": round(result.seconds, 1), "embed_seconds": round(result.embed_seconds, 1),
        "best_epoch": result.best_epoch, "threads": torch.get_num_threads(),
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
    }, indent=2))


if __name__ == "__main__":
    main()
