"""How the image encoder runs: float32 (exact), bfloat16 or int8 (fast, approximate).

The encoder is the expensive part of every SAM-family model (one run per slice; the decoder
answers clicks in milliseconds), so this is where a faster number format pays. A *backend* is
chosen per model and device:

``float32``
    The networks as written, in float32. Exact: the golden tests (official outputs on seeded
    random weights) pass within their tolerances. The default everywhere.
``bf16``
    The encoder in bfloat16: a converted copy of the SAM 1 family encoders (weights and
    activations in bfloat16; matrix products accumulate in float32), SAM 2 encoders under
    bfloat16 autocast. Only offered where the hardware has
    bfloat16 matrix units (CPUs with AMX or AVX512-BF16, CUDA GPUs that support it): elsewhere
    bfloat16 is emulated and many times slower than float32.
``int8``
    Dynamic int8 quantisation of the encoder's linear layers (weights per channel in int8,
    activations quantised per call), CPU only, SAM 1 family only (ViT and TinyViT encoders).

``bf16`` and ``int8`` change the embedding by about 1% and 3% (relative L2) and move mask edges
(Dice against float32 0.96-1.0 and 0.92-1.0 on random weights); they never pass the golden tests, so ``auto`` never picks them: the user asks for them
(CLI ``--backend``, the panel's model settings). Their fidelity against float32 is measured by
``benchmarks/bench_backends.py`` and given in docs/performance.md. Embeddings of an approximate
backend are cached under their own key (:func:`signature_suffix`), never mixed with exact ones.

Levers that were measured and not kept (figures in docs/performance.md): ONNX Runtime (exact,
1.07-1.32x on TinyViT, but an exported graph to re-verify for every model and torch version)
and ``torch.compile`` (no gain on TinyViT, minutes of compilation on a small CPU).
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DeviceError

__all__ = ["BACKENDS", "Backend", "backend_status", "cpu_bf16_hardware", "make_encoder_runner",
           "resolve_backend", "signature_suffix"]


@dataclass(frozen=True)
class Backend:
    """A way of running the image encoder (the panel's wording is in _napari/model_panel.py)."""

    name: str
    exact: bool  # passes the golden tests (equal to float32 within their tolerances)


BACKENDS: dict[str, Backend] = {
    "float32": Backend("float32", True),
    "bf16": Backend("bf16", False),
    "int8": Backend("int8", False),
}
CHOICES = ("auto", *BACKENDS)  # cli_options.BACKEND_CHOICES repeats them without importing torch


@functools.lru_cache(maxsize=1)
def cpu_bf16_hardware() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (Intel AMX or AVX512-BF16).

    Read from ``/proc/cpuinfo``; False where it cannot be read (then bf16 would be emulated).
    """
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return bool(flags & {"amx_bf16", "avx512_bf16"})
    return False


def _int8_engine() -> str | None:
    engines = getattr(torch.backends.quantized, "supported_engines", [])
    for name in ("x86", "fbgemm", "onednn"):
        if name in engines:
            return name
    return None


def backend_status(name: str, device: str | torch.device, arch: str = "") -> str | None:
    """None when backend ``name`` can run ``arch``'s encoder on ``device``, else why not (a sentence)."""
    device = torch.device(device)
    if name == "float32":
        return None
    if name == "bf16":
        if device.type == "cpu":
            if not cpu_bf16_hardware():
                return ("this CPU has no bfloat16 matrix units (AMX or AVX512-BF16): bf16 would be "
                        "emulated and many times slower than float32")
            return None
        if device.type == "cuda":
            return None if torch.cuda.is_bf16_supported() else "this GPU does not support bfloat16"
        return f"bf16 is not offered on {device.type}"
    if name == "int8":
        if device.type != "cpu":
            return "int8 runs on the CPU only"
        from .registry import SAM2_ARCHITECTURE_NAMES

        if arch in SAM2_ARCHITECTURE_NAMES:
            return f"int8 is offered for the SAM 1 family encoders (ViT, TinyViT), not {arch}"
        if _int8_engine() is None:
            return "this torch build has no int8 kernels for the CPU"
        return None
    raise DeviceError(f"unknown encoder backend {name!r}; choose one of {', '.join(CHOICES)}")


def resolve_backend(name: str | None, device: str | torch.device, arch: str = "") -> str:
    """The backend to use: ``auto``/None -> float32 (the only exact one); others are checked."""
    text = "auto" if name is None else str(name).strip().lower()
    if text in ("auto", "", "fp32", "float"):
        return "float32"
    if text == "bfloat16":
        text = "bf16"
    reason = backend_status(text, device, arch)
    if reason is not None:
        raise DeviceError(f"encoder backend {text!r} is not available: {reason}")
    return text


def signature_suffix(name: str) -> str:
    """Appended to a model's cache signature: approximate embeddings are cached apart."""
    return "" if BACKENDS[name].exact else f":{name}"


def make_encoder_runner(network: torch.nn.Module, name: str, device: torch.device) -> Callable[[torch.Tensor],
                                                                                               torch.Tensor]:
    """A function (B, 3, S, S) image tensor -> the network's float32 ``encode_image`` result under ``name``."""
    if name == "float32":
        return network.encode_image
    if name == "bf16":
        from .networks.sam import SamNetwork

        if isinstance(network, SamNetwork):
            # The whole encoder in bfloat16 (a converted copy): no per-call casts of weights and
            # activations, which under autocast cost more than the products gain on a CPU.
            return _checked(network, copy.deepcopy(network.image_encoder).to(torch.bfloat16), torch.bfloat16)

        def run_autocast(image: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out = network.encode_image(image)
            return out.float()

        return run_autocast
    if name == "int8":
        from .networks.sam import SamNetwork

        if not isinstance(network, SamNetwork):
            raise DeviceError("int8 is offered for the SAM 1 family encoders (ViT, TinyViT) only")
        return _checked(network, _quantised_copy(network.image_encoder), torch.float32)
    raise DeviceError(f"unknown encoder backend {name!r}")


def _checked(network: torch.nn.Module, encoder: torch.nn.Module, dtype: torch.dtype) -> Callable[[torch.Tensor],
                                                                                               torch.Tensor]:
    """``encoder`` (a converted copy of ``network``'s) behind ``encode_image``'s input check, fed ``dtype``."""
    size = int(network.image_size)

    def run(image: torch.Tensor) -> torch.Tensor:
        if image.ndim != 4 or image.shape[1] != 3 or image.shape[-2:] != (size, size):
            raise ValueError(f"expected a (B, 3, {size}, {size}) tensor, got {tuple(image.shape)}")
        return encoder(image.to(dtype)).float()

    return run


def _quantised_copy(encoder: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``encoder`` with every nn.Linear replaced by its dynamic int8 counterpart."""
    engine = _int8_engine()
    if engine is None:
        raise DeviceError("this torch build has no int8 kernels for the CPU")
    torch.backends.quantized.engine = engine
    with warnings.catch_warnings():
        # torch.ao.quantization announces its move to torchao; the eager API still works in 2.13.
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(copy.deepcopy(encoder).eval(), {torch.nn.Linear}, dtype=torch.qint8)
