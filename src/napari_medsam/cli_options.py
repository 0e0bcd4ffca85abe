"""The model options every model-running subcommand takes (segment, everything, finetune, batch).

One definition, so that ``--model``, ``--checkpoint``/``--weights``, ``--device``, ``--threads``,
``--backend`` and ``--window`` keep the same names, destinations and defaults across commands; each command
only words the help where its meaning differs (a batch's weight file must be readable by every
worker, fine-tuning defaults to the CPU).
"""

from __future__ import annotations

import argparse

BACKEND_CHOICES = ("auto", "float32", "bf16", "int8")  # models/backends.py (not imported: it imports torch)
BACKEND_HELP = ("how the image encoder runs: auto/float32 (exact), bf16 (bfloat16, on CPUs with AMX or "
                "AVX512-BF16 and GPUs), int8 (dynamic int8 linears, CPU, SAM 1 family); bf16 and int8 are "
                "faster but approximate (docs/performance.md)")
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
    """Add --model, --checkpoint (alias --weights), --device, --threads, --backend and --window to ``parser``."""
    parser.add_argument("--model", default="lite_medsam", help=model_help)
    parser.add_argument("--checkpoint", "--weights", dest="checkpoint", metavar="FILE", help=checkpoint_help)
    parser.add_argument("--device", default=device, help=device_help)
    parser.add_argument("--threads", type=int, help=threads_help)
    parser.add_argument("--backend", default="auto", choices=BACKEND_CHOICES, help=BACKEND_HELP)
    parser.add_argument("--window", help=window_help)
