"""``napari-medsam finetune``: train a model's mask decoder on label volumes and save it as a local model.

Reads each ``--image`` with its ``--labels`` (on the image's grid, any format the plugin reads),
fine-tunes a copy of ``--model``'s decoder (:func:`napari_medsam.segment.finetune.finetune`),
writes ``--out`` in the base checkpoint's layout with its JSON and learning-curve PNG
(:mod:`napari_medsam.segment.finetune_save`), registers it as a local model (``--no-register``:
not), and prints a JSON summary with ``dice_before``/``dice_after`` on the held-out slices.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .cli_options import add_model_options
from .errors import MedSamError

__all__ = ["add_parser", "run"]


def add_parser(sub) -> argparse.ArgumentParser:
    """The ``finetune`` subcommand's parser."""
    p = sub.add_parser(
        "finetune",
        help="fine-tune a model's mask decoder on your label volumes (CPU is enough)",
        description="Train the mask decoder of --model on the objects of label volumes (each --labels belongs to "
        "the --image before it), with prompts simulated from the labels (jittered boxes, clicks, correction "
        "clicks). The image encoder stays frozen. Writes --out in the base checkpoint's layout, OUT.json and "
        "OUT.curve.png beside it, registers it as a local model and prints a JSON summary with the held-out "
        "box-prompt Dice before and after.",
    )
    add_model_options(p, model_help="base model (napari-medsam models); default lite_medsam", device="cpu",
                      device_help="cpu (default), auto, cuda, cuda:N or mps")
    p.add_argument("--image", action="append", required=True, help="a scan (repeat for several scans)")
    p.add_argument("--labels", action="append", required=True, help="its label volume (one per --image)")
    p.add_argument("--out", required=True, help="the tuned checkpoint to write (.pth)")
    p.add_argument("--name", help="the local model's name (default: the --out file name without suffix)")
    p.add_argument("--epochs", type=int, default=None, help="passes over the training samples (default 20)")
    p.add_argument("--val-fraction", type=float, default=0.25,
                   help="share of slice blocks (or scans, with --split scan) held out (default 0.25)")
    p.add_argument("--split", choices=["slice", "scan"], default="slice", help="hold out slices (default) or scans")
    p.add_argument("--objects", nargs="+", help="label values or names to learn (default: every object)")
    p.add_argument("--max-slices", type=int, help="at most this many slices per scan and object (quick runs)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: the engine's)")
    p.add_argument("--prompt-encoder", action=argparse.BooleanOptionalAction, default=None,
                   help="train the prompt encoder with the decoder (default: yes; it learns much faster)")
    p.add_argument("--corrections", type=int, default=None, metavar="N",
                   help="correction clicks on the model's own largest error after each first answer (default 0; "
                   "each costs another decoder pass)")
    p.add_argument("--no-register", action="store_true", help="do not list the result as a local model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    return p


def _objects(wanted: list[str] | None, names: dict[int, str]) -> tuple[int, ...] | None:
    if not wanted:
        return None
    by_name = {v.lower(): k for k, v in names.items()}
    values = []
    for item in wanted:
        if item.isdigit():
            values.append(int(item))
        elif item.lower() in by_name:
            values.append(by_name[item.lower()])
        else:
            known = ", ".join(f"{k}={v}" for k, v in sorted(names.items())) or "none named"
            raise MedSamError(f"--objects {item!r}: not a label value nor a segment name ({known})")
    return tuple(values)


def run(args: argparse.Namespace) -> int:
    """Train, save and print the summary (see the module docstring)."""
    import numpy as np

    from .cli import CHECKPOINT_HINT, _mapping
    from .cli_progress import Progress
    from .io import load_volume, read_labels_and_segments
    from .models.registry import get_model
    from .models.weights import resolve_weights
    from .segment.finetune import FinetuneConfig, finetune
    from .segment.finetune_save import save_finetuned
    from .segment.model import SamModel

    started = time.perf_counter()
    say = Progress("napari-medsam finetune", quiet=args.quiet)
    if len(args.image) != len(args.labels):
        raise MedSamError(f"{len(args.image)} --image but {len(args.labels)} --labels: give one --labels per --image")
    if args.epochs is not None and args.epochs < 1:
        raise MedSamError("--epochs must be at least 1")
    if args.corrections is not None and args.corrections < 0:
        raise MedSamError(f"--corrections {args.corrections}: give 0 or more clicks")
    if not 0.0 < args.val_fraction < 1.0:
        raise MedSamError("--val-fraction must be between 0 and 1")
    spec = get_model(args.model)
    pairs, names = [], {}
    for image, labels_path in zip(args.image, args.labels):
        say.line(f"reading {image} and {labels_path}")
        volume = load_volume(image)
        labels, segments = read_labels_and_segments(labels_path, volume)
        names.update({int(s.label): s.name for s in segments})
        pairs.append((volume, np.asarray(labels)))
    objects = _objects(args.objects, names)
    config = FinetuneConfig(val_fraction=args.val_fraction, split=args.split, objects=objects,
                            max_slices=args.max_slices, batch_size=args.batch_size, seed=args.seed)
    if args.epochs is not None:
        config.epochs = args.epochs
    if args.prompt_encoder is not None:
        config.train_prompt_encoder = args.prompt_encoder
    if args.corrections is not None:
        config.corrections = args.corrections
    if args.lr is not None:
        config.learning_rate = args.lr
    weights = resolve_weights(spec, args.checkpoint, download=True, own_file_hint=CHECKPOINT_HINT)
    say.line(f"loading {spec.name} from {weights}")
    model = SamModel.from_checkpoint(spec.name, weights, device=args.device, threads=args.threads,
                                     backend=args.backend)
    last = [0.0]

    def progress(epoch: int, step: int, loss: float, dice: float | None) -> None:
        if time.perf_counter() - last[0] > 5 or step == 0:
            last[0] = time.perf_counter()
            shown = "" if dice is None else f", held-out Dice {dice:.3f}"
            say.line(f"epoch {epoch} step {step}: loss {loss:.3f}{shown}")

    result = finetune(model, pairs, config=config, mapping=_mapping(args.window, pairs[0][0]), progress=progress,
                      status=say.line)
    used = sorted({int(v) for v in (objects or [])} or {int(v) for _v, lab in pairs for v in np.unique(lab) if v})
    saved = save_finetuned(result, args.out, base_spec=spec, base_checkpoint=weights,
                           data=[f"{i} + {lab}" for i, lab in zip(args.image, args.labels)],
                           objects={v: names.get(v, f"label {v}") for v in used}, epochs=config.epochs,
                           name=args.name, register=not args.no_register)
    summary = {
        "model": saved.name, "base_model": spec.name, "dice_before": round(result.dice_before, 4),
        "dice_after": round(result.dice_after, 4), "best_epoch": result.best_epoch,
        "curve": [{"epoch": r.epoch, "loss": r.loss, "dice": round(r.dice, 4)} for r in result.curve],
        "train_samples": result.train_samples, "val_samples": result.val_samples,
        "seconds": round(time.perf_counter() - started, 1), "checkpoint": str(saved.checkpoint),
        "info": str(saved.info), "curve_png": str(saved.curve),
        "registered": None if saved.registration is None else str(saved.registration),
    }
    print(json.dumps(summary, indent=2))
    return 0 if Path(saved.checkpoint).is_file() else 1
