"""The model options every model-running subcommand takes (segment, everything, finetune, batch).

One definition, so that ``--model``, ``--checkpoint``/``--weights``, ``--device``, ``--threads``
and ``--window`` keep the same names, destinations and defaults across commands; each command
only words the help where its meaning differs (a batch's weight file must be readable by every
worker, fine-tuning defaults to the CPU).
"""

from __future__ import annotations

import argparse

WINDOW_HELP = "CT window preset, LEVEL/WIDTH in HU, or 'percentile' (as for segment)"


def add_model_options(
    parser: argparse.ArgumentParser,
    *,
    model_help: str = "model name (napari-medsam models); default lite_medsam",
    checkpoint_help: str = "a local weight file for --model (otherwise the cache/download)",
    device: str = "auto",
    device_help: str = "auto, cpu, cuda, cuda:N or mps (default auto)",
    threads_help: str = "CPU threads for torch",
    window_help: str = WINDOW_HELP,
) -> None:
    """Add --model, --checkpoint (alias --weights), --device, --threads and --window to ``parser``."""
    parser.add_argument("--model", default="lite_medsam", help=model_help)
    parser.add_argument("--checkpoint", "--weights", dest="checkpoint", metavar="FILE", help=checkpoint_help)
    parser.add_argument("--device", default=device, help=device_help)
    parser.add_argument("--threads", type=int, help=threads_help)
    parser.add_argument("--window", help=window_help)
