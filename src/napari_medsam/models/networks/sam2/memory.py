"""SAM 2's memory: attention of the current frame to past frames, and encoding a frame into memory.

``MemoryAttention`` conditions the current frame's top-level image tokens on the memory bank:
each layer is pre-norm self-attention among the image tokens, cross-attention from them to the
memory tokens (the 64-channel spatial memories of past frames, followed by object-pointer
tokens), and a ReLU feed-forward block. Both attentions use rotary position encoding (RoPE)
over the 2-D token grid: queries and keys are rotated by angles proportional to their column
(first half of the channels) and row (second half), so their dot product depends on relative
position. In cross-attention every memory frame's keys get the same rotations as the query grid;
object-pointer tokens carry no grid position and are left unrotated.

``MemoryEncoder`` fuses a frame's image features with its predicted mask (downsampled 16x by
strided convolutions) through two ConvNeXt blocks, projects to 64 channels and adds a sine
position encoding.

Shapes follow the official call convention (sequence first: (HW, B, C)) so the video model can
follow the reference step by step. Attention gives the values of PyTorch's "math" scaled-dot-
product kernel: the official code forces that kernel (its kernel-selection flags also steer the
CPU dispatcher), and the fused CPU kernel differs by ~1e-7 relative. Inference only: the
training-time dropout of the reference has no counterpart here. RoPE tables depend only on the grid and are
kept per grid size. Parameter names follow the official checkpoints (``memory_attention.*``,
``memory_encoder.*``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..vit import LayerNorm2d
from .position import SinePositionEncoding

__all__ = ["MemoryAttention", "MemoryEncoder", "axial_rotations", "math_attention", "rotate"]


def axial_rotations(dim: int, width: int, height: int, theta: float = 10000.0,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """Complex (width*height, dim/2) unit rotations for a row-major grid of ``height`` rows of ``width``.

    Channel pairs 0..dim/4-1 turn with the column index, the next dim/4 with the row index, at
    frequencies theta^(-4i/dim).
    """
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 4, device=device)[: dim // 4].float() / dim))
    index = torch.arange(width * height, dtype=torch.float32, device=device)
    cols = index % width
    rows = torch.div(index, width, rounding_mode="floor")
    angles = torch.cat((torch.outer(cols, freqs), torch.outer(rows, freqs)), dim=-1)
    return torch.polar(torch.ones_like(angles), angles)


def rotate(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs of x (..., R*N, D) by ``rotations`` (N, D/2), repeated R times."""
    *lead, tokens, dim = x.shape
    count = rotations.shape[0]
    pairs = torch.view_as_complex(x.float().reshape(*lead, tokens // count, count, dim // 2, 2))
    return torch.view_as_real(pairs * rotations).reshape(x.shape).type_as(x)


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v, with the same values as PyTorch's "math" SDPA kernel.

    That kernel scales q and k each by d^-1/4 before their product. Done here directly it is
    ~2x faster on the CPU (no kernel-selection context, no extra passes over the score matrix
    for fully masked rows, which cannot occur without a mask); when d^-1/4 is a power of two
    (d = 16, 256) both scalings are exact, so one scaling of the smaller q gives the same bits.
    """
    scale = math.sqrt(1.0 / math.sqrt(q.shape[-1]))
    if math.frexp(scale)[0] == 0.5:
        scores = torch.matmul(q * (scale * scale), k.transpose(-2, -1))
    else:
        scores = torch.matmul(q * scale, (k * scale).transpose(-2, -1))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


class _RoPEAttention(nn.Module):
    """Attention with RoPE on queries and keys; keys may be several grids long plus unrotated extras."""

    def __init__(self, dim: int, num_heads: int, kv_dim: int, theta: float, feat_sizes: tuple[int, int]) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.theta = theta
        self.feat_sizes = (int(feat_sizes[0]), int(feat_sizes[1]))  # (width, height) of the default grid
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(kv_dim, dim)
        self.v_proj = nn.Linear(kv_dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self._tables: dict[tuple[int, int, str], torch.Tensor] = {}

    def rotations(self, tokens: int, device: torch.device) -> torch.Tensor:
        """The RoPE table for a grid of ``tokens`` queries: the configured grid, else a square one."""
        width, height = self.feat_sizes
        if width * height != tokens:
            # Another input size (e.g. a 1024-px model's 64x64 grid): the grid is taken as square.
            side = math.isqrt(tokens)
            if side * side != tokens:
                raise ValueError(f"{tokens} query tokens are neither the {width}x{height} grid nor a square one")
            width = height = side
        key = (width, height, str(device))
        table = self._tables.get(key)
        if table is None:
            head_dim = self.q_proj.out_features // self.num_heads
            table = axial_rotations(head_dim, width, height, self.theta, device)
            self._tables[key] = table
        return table

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        return x.reshape(batch, tokens, self.num_heads, width // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_k_exclude_rope: int = 0) -> torch.Tensor:
        """(B, Nq, C) queries over (B, Nk, kv) keys/values; the last ``num_k_exclude_rope`` keys stay unrotated."""
        q = self._heads(self.q_proj(q))
        k = self._heads(self.k_proj(k))
        v = self._heads(self.v_proj(v))
        table = self.rotations(q.shape[-2], q.device)
        q = rotate(q, table)
        spatial = k.shape[-2] - num_k_exclude_rope
        if spatial % q.shape[-2]:
            raise ValueError(f"{spatial} rotated keys are not a whole number of {q.shape[-2]}-token grids")
        if spatial == k.shape[-2]:
            k = rotate(k, table)
        elif spatial > 0:
            k = torch.cat((rotate(k[:, :, :spatial], table), k[:, :, spatial:]), dim=2)
        out = math_attention(q, k, v)
        batch, _, tokens, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, -1))


class _MemoryAttentionLayer(nn.Module):
    """Pre-norm self-attention, cross-attention to memory, ReLU feed-forward; each with a residual."""

    def __init__(self, dim: int, dim_feedforward: int, kv_dim: int, num_heads: int, theta: float,
                 feat_sizes: tuple[int, int]) -> None:
        super().__init__()
        self.self_attn = _RoPEAttention(dim, num_heads, dim, theta, feat_sizes)
        self.cross_attn_image = _RoPEAttention(dim, num_heads, kv_dim, theta, feat_sizes)
        self.linear1 = nn.Linear(dim, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, memory_keys: torch.Tensor,
                num_k_exclude_rope: int) -> torch.Tensor:
        """x (B, HW, C); ``memory_keys`` = memory + its position encoding (B, M, kv)."""
        y = self.norm1(x)
        x = x + self.self_attn(y, y, y)
        y = self.norm2(x)
        x = x + self.cross_attn_image(y, memory_keys, memory, num_k_exclude_rope)
        y = self.norm3(x)
        return x + self.linear2(F.relu(self.linear1(y)))


class MemoryAttention(nn.Module):
    """Condition the current frame's image tokens on memory tokens (spatial memories + object pointers)."""

    def __init__(
        self,
        d_model: int = 256,
        num_layers: int = 4,
        dim_feedforward: int = 2048,
        kv_in_dim: int = 64,
        feat_sizes: tuple[int, int] = (32, 32),
        rope_theta: float = 10000.0,
        num_heads: int = 1,
        pos_enc_at_input: bool = True,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.pos_enc_at_input = pos_enc_at_input
        self.layers = nn.ModuleList(
            _MemoryAttentionLayer(d_model, dim_feedforward, kv_in_dim, num_heads, rope_theta, tuple(feat_sizes))
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)

    def forward(
        self,
        curr: torch.Tensor | list[torch.Tensor],
        memory: torch.Tensor,
        curr_pos: torch.Tensor | list[torch.Tensor] | None = None,
        memory_pos: torch.Tensor | None = None,
        num_obj_ptr_tokens: int = 0,
    ) -> torch.Tensor:
        """(HW, B, C) current tokens, (M, B, kv) memory -> (HW, B, C) conditioned tokens.

        The memory is ``frames * HW`` spatial tokens followed by ``num_obj_ptr_tokens`` object-pointer
        tokens; ``curr_pos`` (HW, B, C) enters only at the input (scaled by 0.1), ``memory_pos``
        (M, B, kv) is added to the keys of every cross-attention. Lists of one tensor are accepted
        for ``curr`` / ``curr_pos`` as in the official call.
        """
        if isinstance(curr, list):
            if not isinstance(curr_pos, list) or len(curr) != 1 or len(curr_pos) != 1:
                raise ValueError("curr and curr_pos given as lists must both hold one tensor")
            curr, curr_pos = curr[0], curr_pos[0]
        if curr.shape[1] != memory.shape[1]:
            raise ValueError(f"batch sizes differ: current {curr.shape[1]}, memory {memory.shape[1]}")
        x = curr
        if self.pos_enc_at_input and curr_pos is not None:
            x = x + 0.1 * curr_pos
        x = x.transpose(0, 1)
        keys = memory if memory_pos is None else memory + memory_pos
        memory, keys = memory.transpose(0, 1), keys.transpose(0, 1)
        for layer in self.layers:
            x = layer(x, memory, keys, num_obj_ptr_tokens)
        return self.norm(x).transpose(0, 1)


class _MaskDownSampler(nn.Module):
    """Strided conv + LayerNorm2d + GELU stages down to 1/total_stride, then a 1x1 conv to ``dim``."""

    def __init__(self, dim: int, kernel_size: int, stride: int, padding: int, total_stride: int) -> None:
        super().__init__()
        stages = round(math.log(total_stride, stride))
        if stride**stages != total_stride:
            raise ValueError(f"total stride {total_stride} is not a power of the stride {stride}")
        modules: list[nn.Module] = []
        chans = 1
        for _ in range(stages):
            # Each stage trades spatial size for channels: stride^2 times more of them.
            out = chans * stride**2
            modules += [nn.Conv2d(chans, out, kernel_size, stride, padding), LayerNorm2d(out), nn.GELU()]
            chans = out
        modules.append(nn.Conv2d(chans, dim, kernel_size=1))
        self.encoder = nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


class _ConvNeXtBlock(nn.Module):
    """Depth-wise conv, channel LayerNorm, pointwise MLP (as linear layers), layer scale, residual."""

    def __init__(self, dim: int, kernel_size: int, padding: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=kernel_size, padding=padding, groups=dim)
        self.norm = LayerNorm2d(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dwconv(x)).permute(0, 2, 3, 1)
        y = self.gamma * self.pwconv2(F.gelu(self.pwconv1(y)))
        return x + y.permute(0, 3, 1, 2)


class _Fuser(nn.Module):
    def __init__(self, dim: int, num_layers: int, kernel_size: int, padding: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_ConvNeXtBlock(dim, kernel_size, padding) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class MemoryEncoder(nn.Module):
    """Encode a frame's top-level features (B, in_dim, h, w) and mask (B, 1, 16h, 16w) into memory."""

    def __init__(
        self,
        out_dim: int = 64,
        in_dim: int = 256,
        mask_kernel: int = 3,
        mask_stride: int = 2,
        mask_padding: int = 1,
        total_stride: int = 16,
        fuser_layers: int = 2,
        cx_kernel: int = 7,
        cx_padding: int = 3,
    ) -> None:
        super().__init__()
        self.mask_downsampler = _MaskDownSampler(in_dim, mask_kernel, mask_stride, mask_padding, total_stride)
        self.pix_feat_proj = nn.Conv2d(in_dim, in_dim, kernel_size=1)
        self.fuser = _Fuser(in_dim, fuser_layers, cx_kernel, cx_padding)
        self.out_proj = nn.Conv2d(in_dim, out_dim, kernel_size=1) if out_dim != in_dim else nn.Identity()
        self.position_encoding = SinePositionEncoding(out_dim)

    def forward(self, pix_feat: torch.Tensor, masks: torch.Tensor,
                skip_mask_sigmoid: bool = False) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Return {"vision_features": (B, out_dim, h, w), "vision_pos_enc": [(B, out_dim, h, w)]}.

        ``masks`` are logits (a sigmoid is applied first) unless ``skip_mask_sigmoid``, in which case
        they are used as given (the video model passes scaled probabilities or binarised masks).
        """
        if not skip_mask_sigmoid:
            masks = torch.sigmoid(masks)
        masks = self.mask_downsampler(masks)
        x = self.pix_feat_proj(pix_feat.to(masks.device)) + masks
        x = self.out_proj(self.fuser(x))
        pos = self.position_encoding(x).to(x.dtype)
        return {"vision_features": x, "vision_pos_enc": [pos]}
