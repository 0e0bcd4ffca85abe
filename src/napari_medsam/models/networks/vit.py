"""SAM's ViT image encoder (Kirillov et al., "Segment Anything", 2023).

A plain ViT over 16x16 patches of a 1024x1024 image (64x64 tokens) with learned absolute
position embeddings and decomposed relative-position terms inside every attention layer. Most
blocks attend inside 14x14 windows (the token grid is zero-padded to a multiple of 14); the
blocks listed in ``global_attn_indexes`` attend over the whole grid. A small convolutional neck
maps the tokens to the 256-channel image embedding shared by all SAM-family decoders.

Parameter names follow the official checkpoints (``image_encoder.*``) so that those load with
``strict=True``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .fused import linear_gelu

__all__ = ["LayerNorm2d", "ViTImageEncoder", "VIT_PRESETS", "make_neck"]

# (embed_dim, depth, num_heads, global_attn_indexes) of the published SAM encoders.
VIT_PRESETS: dict[str, tuple[int, int, int, tuple[int, ...]]] = {
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
}


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of an NCHW tensor (SAM's ``LayerNorm2d``)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise each pixel's channel vector, then scale and shift."""
        # Two-pass mean/variance as in the reference, so results agree to float rounding.
        centred = x - x.mean(dim=1, keepdim=True)
        var = centred.pow(2).mean(dim=1, keepdim=True)
        normed = centred / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * normed + self.bias[:, None, None]


def make_neck(in_channels: int, out_channels: int = 256) -> nn.Sequential:
    """1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d: the encoder-to-embedding neck of SAM."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
        LayerNorm2d(out_channels),
        nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
        LayerNorm2d(out_channels),
    )


class _PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Tokens are kept channels-last (B, H, W, C) through the whole trunk.
        return self.proj(x).permute(0, 2, 3, 1)


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(self.lin1) is nn.Linear:  # not a quantised copy (int8 backend)
            return self.lin2(linear_gelu(x, self.lin1.weight, self.lin1.bias))
        return self.lin2(self.act(self.lin1(x)))


def _gather_rel_pos(table: torch.Tensor, size: int) -> torch.Tensor:
    """(2*size-1, C) table -> (size, size, C) with entry [i, j] = table[i - j + size - 1]."""
    pos = torch.arange(size, device=table.device)
    return table[pos[:, None] - pos[None, :] + (size - 1)]


# Floats in one block of attention scores on the CPU path (16 MB): small enough to stay in
# cache while the relative-position terms are added and the softmax runs.
_SCORE_BLOCK = 1 << 22
# Float32 attention on the CPU: "sdpa" (:func:`_attend_masked`, PyTorch's fused CPU kernel with
# the relative-position terms as an additive mask) or "blocked" (:func:`_attend_blocked`, the
# reference's three passes over each block of scores). Global attention of ViT-B (12 heads x 4096
# tokens, 2 threads, AVX2): 650 ms against 971 ms; windows (300 x 196 tokens): 60 against 71 ms;
# the whole ViT-B 1.18x (benchmarks/bench_encoder_levers.py sdpa_attention, 2026-12-07).
CPU_ATTENTION = "sdpa"


def _softmax_has_out() -> bool:
    """Whether this torch has ``torch.softmax(..., out=)``."""
    try:
        torch.softmax(torch.zeros(1, 2), dim=-1, out=torch.empty(1, 2))
    except TypeError:
        return False
    return True


_SOFTMAX_OUT = _softmax_has_out()


def _attend_blocked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_rows: torch.Tensor, rel_cols: torch.Tensor
) -> torch.Tensor:
    """Exact attention with decomposed relative positions, a block of query rows at a time.

    ``q`` (already scaled), ``k``, ``v``: (BH, N, C); ``rel_rows`` (BH, N, H) and ``rel_cols``
    (BH, N, W) with N = H * W. Scores are ``q.k + rel_rows[key row] + rel_cols[key column]``.

    Per block: the two relative terms are summed into a reused score buffer in one pass, the
    query-key product is accumulated onto it by the matrix kernel itself (``baddbmm_``), and the
    softmax writes into a second reused buffer: three passes over the scores instead of five,
    and no fresh 16 MB allocation (page faults) per block. Same sums as the reference up to the
    order of the additions (float rounding).
    """
    heads_batch, tokens, _ = q.shape
    out = torch.empty_like(v)
    keys_t = k.transpose(1, 2)
    if q.dtype != torch.float32:
        # bfloat16 (the bf16 backend): the reduced-precision batched product copies a transposed
        # or strided operand on every call (48% of the encoder's time); copy it once here instead.
        keys_t, v = keys_t.contiguous(), v.contiguous()
    # Windows (196 tokens, float32): whole rows for a chunk of the (window, head) batch, sized to
    # stay in cache, instead of a few rows for the whole batch: 20 ms against 33 ms per ViT-B
    # windowed attention on 2 cores. Global attention (whole rows do not fit): all heads together,
    # a few query rows per block (a head at a time in 1 MB blocks measured 0.95-1.05x in the
    # whole encoder: not kept).
    if q.dtype == torch.float32 and tokens * tokens <= _WINDOW_SCORES:
        chunk = min(heads_batch, _WINDOW_SCORES // (tokens * tokens))
    else:
        chunk = heads_batch
    step = max(1, min(tokens, _SCORE_BLOCK // (chunk * tokens)))
    scores_buf = torch.empty(chunk * step * tokens, dtype=q.dtype, device=q.device)
    probs_buf = torch.empty(chunk * step * tokens, dtype=q.dtype, device=q.device)
    for first in range(0, heads_batch, chunk):
        last = min(first + chunk, heads_batch)
        _attend_rows(q[first:last], keys_t[first:last], v[first:last], rel_rows[first:last], rel_cols[first:last],
                     out[first:last], step, scores_buf, probs_buf)
    return out


def _attend_fused(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_rows: torch.Tensor, rel_cols: torch.Tensor
) -> torch.Tensor:
    """Same result through ``scaled_dot_product_attention`` without an N x N bias tensor.

    The relative terms are appended to the query and one-hot row/column selectors to the key,
    so one dot product yields the whole score. q, k and v are zero-padded to one width that is
    a multiple of 8, which the fused GPU kernels require.
    """
    heads_batch, tokens, head_dim = q.shape
    height, width = rel_rows.shape[-1], rel_cols.shape[-1]
    eye_h = torch.eye(height, dtype=k.dtype, device=k.device)
    eye_w = torch.eye(width, dtype=k.dtype, device=k.device)
    # Key j = (r, c) selects entry r of the row terms and entry c of the column terms.
    pick_row = eye_h[:, None, :].expand(height, width, height).reshape(tokens, height)
    pick_col = eye_w[None, :, :].expand(height, width, width).reshape(tokens, width)
    query = torch.cat((q, rel_rows, rel_cols), dim=-1)
    key = torch.cat(
        (k, pick_row.expand(heads_batch, -1, -1), pick_col.expand(heads_batch, -1, -1)), dim=-1
    )
    wide = -(-query.shape[-1] // 8) * 8
    query = F.pad(query, (0, wide - query.shape[-1]))
    key = F.pad(key, (0, wide - key.shape[-1]))
    value = F.pad(v, (0, wide - head_dim))
    return F.scaled_dot_product_attention(query, key, value, scale=1.0)[..., :head_dim]


def _attend_masked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_rows: torch.Tensor, rel_cols: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Float32 CPU attention through PyTorch's fused kernel, the relative terms as an additive mask.

    ``q`` (not scaled), ``k``, ``v``: (BH, N, C); ``rel_rows`` (BH, N, H), ``rel_cols`` (BH, N, W)
    as for :func:`_attend_blocked`. The kernel walks key blocks with a running softmax, so the
    scores never leave the cache; only the mask (the two relative terms summed for a chunk of
    query rows) is written out, in chunks of at most ``_WINDOW_SCORES`` floats for windows (a
    chunk of whole (window, head) items) and ``_SCORE_BLOCK`` floats for global attention (one
    head, a block of query rows). The kernel scales the product ``q.k`` by ``scale``; for the
    published encoders (64 channels per head) the scale is 1/8, so this equals the reference's
    product of the pre-scaled query bit for bit.
    """
    heads_batch, tokens, _ = q.shape
    height, width = rel_rows.shape[-1], rel_cols.shape[-1]
    out = torch.empty_like(v)
    if tokens * tokens <= _WINDOW_SCORES:
        chunk, step = min(heads_batch, _WINDOW_SCORES // (tokens * tokens)), tokens
    else:
        chunk, step = 1, max(1, min(tokens, _SCORE_BLOCK // tokens))
    mask_buf = torch.empty(chunk * step * tokens, dtype=q.dtype, device=q.device)
    for first in range(0, heads_batch, chunk):
        last = min(first + chunk, heads_batch)
        for start in range(0, tokens, step):
            stop = min(start + step, tokens)
            heads, rows = last - first, stop - start
            mask = mask_buf[: heads * rows * tokens].view(1, heads, rows, tokens)
            torch.add(rel_rows[first:last, start:stop, :, None], rel_cols[first:last, start:stop, None, :],
                      out=mask.view(heads, rows, height, width))
            out[first:last, start:stop] = F.scaled_dot_product_attention(
                q[None, first:last, start:stop], k[None, first:last], v[None, first:last], attn_mask=mask,
                scale=scale)[0]
    return out


def _attend_rows(
    q: torch.Tensor, keys_t: torch.Tensor, v: torch.Tensor, rel_rows: torch.Tensor, rel_cols: torch.Tensor,
    out: torch.Tensor, step: int, scores_buf: torch.Tensor, probs_buf: torch.Tensor,
) -> None:
    """The row blocks of :func:`_attend_blocked` for one (BH, N, C) batch, written into ``out``."""
    heads_batch, tokens, _ = q.shape
    height, width = rel_rows.shape[-1], rel_cols.shape[-1]
    for start in range(0, tokens, step):
        stop = min(start + step, tokens)
        rows = stop - start
        # Contiguous views of the first rows * N entries of the buffers (the last block may be short).
        scores = scores_buf[: heads_batch * rows * tokens].view(heads_batch, rows, tokens)
        probs = probs_buf[: heads_batch * rows * tokens].view(heads_batch, rows, tokens)
        torch.add(rel_rows[:, start:stop, :, None], rel_cols[:, start:stop, None, :],
                  out=scores.view(heads_batch, rows, height, width))
        scores.baddbmm_(q[:, start:stop], keys_t)
        if _SOFTMAX_OUT:
            torch.softmax(scores, dim=-1, out=probs)
        else:  # torch builds without softmax's out= overload
            probs.copy_(scores.softmax(dim=-1))
        torch.bmm(probs, v, out=out[:, start:stop])


# Scores of one batch chunk of windowed attention (floats; 8 MB: 54 windows x heads of 196 x 196).
_WINDOW_SCORES = 1 << 21


class _RelPosAttention(nn.Module):
    """Multi-head self-attention over a (H, W) token grid with decomposed relative positions.

    The score of query i against key j is ``scale*q_i.k_j + q_i.Rh[row_i,row_j] +
    q_i.Rw[col_i,col_j]`` (Rh, Rw gathered from the learned tables by offset). On the CPU, float32
    runs through PyTorch's fused kernel with the relative terms as a mask (:func:`_attend_masked`,
    ``CPU_ATTENTION``) and other dtypes block by block in the reference's order of operations
    (:func:`_attend_blocked`); elsewhere the fused kernels take the relative terms inside the dot
    product (:func:`_attend_fused`).
    """

    def __init__(self, dim: int, num_heads: int, grid: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by {num_heads} heads")
        head_dim = dim // num_heads
        self.num_heads = num_heads
        self.grid = grid
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * grid - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * grid - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, dim = x.shape
        if height != self.grid or width != self.grid:
            raise ValueError(f"attention built for a {self.grid}x{self.grid} grid got {height}x{width}")
        tokens = height * width
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, batch * self.num_heads, tokens, -1).unbind(0)

        # Relative terms use the unscaled query, as in the reference formulation.
        q_grid = q.reshape(-1, height, width, q.shape[-1])
        rel_rows = torch.einsum("bhwc,hkc->bhwk", q_grid, _gather_rel_pos(self.rel_pos_h, height))
        rel_cols = torch.einsum("bhwc,wkc->bhwk", q_grid, _gather_rel_pos(self.rel_pos_w, width))
        rel_rows, rel_cols = rel_rows.reshape(-1, tokens, height), rel_cols.reshape(-1, tokens, width)
        if x.device.type != "cpu":
            out = _attend_fused(q * self.scale, k, v, rel_rows, rel_cols)
        elif q.dtype == torch.float32 and CPU_ATTENTION == "sdpa":
            out = _attend_masked(q, k, v, rel_rows, rel_cols, self.scale)
        else:
            out = _attend_blocked(q * self.scale, k, v, rel_rows, rel_cols)
        out = out.view(batch, self.num_heads, height, width, -1).permute(0, 2, 3, 1, 4)
        return self.proj(out.reshape(batch, height, width, dim))


def _to_windows(x: torch.Tensor, size: int) -> tuple[torch.Tensor, int, int]:
    """(B, H, W, C) -> (B*nWin, size, size, C), zero-padding H and W up to multiples of size."""
    batch, height, width, chans = x.shape
    pad_h = (size - height % size) % size
    pad_w = (size - width % size) % size
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    rows, cols = (height + pad_h) // size, (width + pad_w) // size
    x = x.view(batch, rows, size, cols, size, chans).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, size, size, chans), rows, cols


def _from_windows(win: torch.Tensor, rows: int, cols: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`_to_windows`, cropping the padding away."""
    size, chans = win.shape[1], win.shape[3]
    batch = win.shape[0] // (rows * cols)
    x = win.view(batch, rows, cols, size, size, chans).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(batch, rows * size, cols * size, chans)
    return x[:, :height, :width, :]


class _Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, window: int, grid: int, mlp_ratio: float) -> None:
        super().__init__()
        self.window = window  # 0 = global attention over the full grid
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _RelPosAttention(dim, num_heads, grid if window == 0 else window)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _MLP(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        if self.window:
            height, width = y.shape[1:3]
            # Padding tokens are zeros after the norm, exactly as in the reference encoder.
            win, rows, cols = _to_windows(y, self.window)
            y = _from_windows(self.attn(win), rows, cols, height, width)
        else:
            y = self.attn(y)
        # Both residual sums go into the block's own fresh outputs where that is the same sum (a
        # 12 MB buffer fewer each for ViT-B; x + y and y + x are the same float sums).
        x = y.add_(x) if _owns_sum(y, x) else x + y
        out = self.mlp(self.norm2(x))
        return out.add_(x) if _owns_sum(out, x) else x + out


def _owns_sum(fresh: torch.Tensor, other: torch.Tensor) -> bool:
    """Whether ``fresh.add_(other)`` may replace ``other + fresh``: no autograd to record it, same
    dtype (no promotion) and shape, and ``fresh`` laid out as that sum would be."""
    return (not torch.is_grad_enabled() and fresh.dtype == other.dtype and fresh.shape == other.shape
            and fresh.is_contiguous())


class ViTImageEncoder(nn.Module):
    """SAM ViT encoder: (B, 3, img, img) normalised image -> (B, 256, img/16, img/16) embedding."""

    def __init__(
        self,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
        img_size: int = 1024,
        patch_size: int = 16,
        window_size: int = 14,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        grid = img_size // patch_size
        globals_ = set(int(i) for i in global_attn_indexes)
        if any(i < 0 or i >= depth for i in globals_):
            raise ValueError(f"global_attn_indexes {sorted(globals_)} out of range for depth {depth}")
        self.img_size = img_size
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.patch_embed = _PatchEmbed(patch_size, in_chans, embed_dim)
        self.blocks = nn.ModuleList(
            _Block(embed_dim, num_heads, 0 if i in globals_ else window_size, grid, mlp_ratio)
            for i in range(depth)
        )
        self.neck = make_neck(embed_dim, out_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode a normalised, padded image batch."""
        tokens = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            tokens = block(tokens)
        # (B, H, W, C) -> NCHW view in channels-last memory; the convs accept it without a copy.
        return self.neck(tokens.permute(0, 3, 1, 2))
