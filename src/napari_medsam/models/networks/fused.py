"""A convolution or linear layer followed by GELU, as one oneDNN call where torch has it (CPU inference).

GELU after a convolution or a matrix product is a full extra pass over a large tensor (in
TinyViT a fifth of the encoder's time: 23 calls on 1-17 M values). oneDNN applies it to the
product's output tiles while they are still in cache ("post-op"): torch exposes that as
``torch.ops.mkldnn._convolution_pointwise`` and ``torch.ops.mkldnn._linear_pointwise`` (the ops
its own compiler emits for these patterns). oneDNN's exact (erf) GELU agrees with torch's to
float rounding; the golden tests run through these calls.

Used only where it is exact and supported: float32 tensors on the CPU, no autograd (training and
other devices take the plain two-step path), a torch build whose oneDNN ops exist and pass a
one-time self-check against the plain computation. ``ENABLED`` switches the fused path off (tests
and benchmarks compare both).

The linear + GELU op pays only where oneDNN's float32 matrix kernels are its AVX-512 ones: on an
AVX2 CPU (AMD EPYC, 2026-12-07) ``_linear_pointwise`` took 1.3-1.6x the time of torch's own
``F.linear`` followed by GELU (ViT-B's MLP: 204-222 ms against 137-162 ms), while the convolution
op still won there (1x1 64->256 on 256x256: 21 ms against 29 ms; depthwise 3x3: 20 ms against
29 ms). So ``LINEAR`` follows the CPU (``linear_fusion_pays``), and where the plain path runs
without autograd its GELU is applied in place: no second large buffer to allocate and fault in.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

__all__ = ["ENABLED", "LINEAR", "conv2d_gelu", "fused_available", "gelu_fresh", "linear_fusion_pays", "linear_gelu"]

ENABLED = True
#: The fused linear + GELU: None follows ``linear_fusion_pays()``; True or False forces it.
LINEAR: bool | None = None


def linear_fusion_pays() -> bool:
    """Whether torch dispatches this CPU's float32 kernels at the AVX-512 level (where the fused op won)."""
    try:
        return torch.backends.cpu.get_cpu_capability() == "AVX512"
    except (AttributeError, RuntimeError):
        return False


@functools.lru_cache(maxsize=1)
def fused_available() -> bool:
    """Whether this torch has the oneDNN conv/linear + GELU ops and they agree with the plain path."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        ops = torch.ops.mkldnn
        gen = torch.Generator().manual_seed(0)
        with torch.inference_mode():
            x = torch.randn(1, 8, 6, 6, generator=gen).contiguous(memory_format=torch.channels_last)
            w, b = torch.randn(16, 8, 3, 3, generator=gen), torch.randn(16, generator=gen)
            conv = ops._convolution_pointwise(x, w, b, [1, 1], [1, 1], [1, 1], 1, "gelu", [], "none")
            tokens, lw, lb = torch.randn(5, 8, generator=gen), torch.randn(12, 8, generator=gen), torch.randn(12)
            lin = ops._linear_pointwise(tokens, lw, lb, "gelu", [], "none")
            return bool(torch.allclose(conv, F.gelu(F.conv2d(x, w, b, 1, 1)), atol=1e-5, rtol=1e-5)
                        and torch.allclose(lin, F.gelu(F.linear(tokens, lw, lb)), atol=1e-5, rtol=1e-5))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def _fusable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (ENABLED and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not torch.is_grad_enabled() and fused_available())


def _pair(value) -> list[int]:
    """A conv2d size argument (int or pair) as the two-element list oneDNN's op takes."""
    return [int(value)] * 2 if isinstance(value, int) else [int(v) for v in value]


def conv2d_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation,
                groups: int) -> torch.Tensor:
    """``F.gelu(F.conv2d(x, weight, bias, stride, padding, dilation, groups))``."""
    if _fusable(x, weight):
        return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, _pair(padding), _pair(stride),
                                                      _pair(dilation), int(groups), "gelu", [], "none")
    return gelu_fresh(F.conv2d(x, weight, bias, stride, padding, dilation, groups))


def gelu_fresh(y: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU of a tensor nobody else holds (a fresh product): in place where no backward pass records it."""
    if torch.is_grad_enabled() and y.requires_grad:
        return F.gelu(y, approximate=approximate)
    return torch.ops.aten.gelu_(y, approximate=approximate)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.gelu(F.linear(x, weight, bias))``."""
    fuse = linear_fusion_pays() if LINEAR is None else LINEAR
    if fuse and _fusable(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "none")
    return gelu_fresh(F.linear(x, weight, bias))
