"""Hiera trunk of the SAM 2 / SAM 2.1 image encoder (Ryali et al., ICML 2023; "Hiera-det" variant).

Hiera is a four-stage hierarchical vision transformer working on a (B, H, W, C) token map:

* a 7x7 stride-4 convolution turns the image into tokens (512 px -> 128x128);
* an absolute position embedding is added: a small learned "background" map bicubically resized to
  the token grid plus a learned window-sized map tiled over it (Bolya et al., 2023);
* blocks of pre-norm attention + MLP. The first block of stages 2-4 halves the grid by max-pooling
  its queries (2x2), doubles the channels (a linear projection of the shortcut, pooled as well) and
  doubles the heads. Attention is local in non-overlapping windows whose size is set per stage,
  except in a few "global" blocks that attend over the whole map;
* the output of every stage is returned (finest first) for the FPN neck.

Two details decide the numbers and are kept exactly as in the official network:

* the window size "lags one block": the first block of a stage still uses the window of the previous
  stage (measured on its input grid); with q-pooling that window shrinks by the pooling stride for
  the queries, so e.g. 14x14 key windows meet 7x7 query windows;
* a grid that is not a multiple of the window is zero-padded *after* ``norm1``, and the padding
  tokens take part in the attention as keys and values (their projection is the ``qkv`` bias).

This implementation projects q/k/v on the real tokens only and fills the padded positions with the
bias (the same values, without the matmul on padding), and applies the output projection after the
padding has been cut away again; windows are formed by reshapes and one permute. The position
embedding at a given grid size is computed once and reused while the parameters are unchanged.

Parameter names equal the official checkpoint keys (``patch_embed.proj``, ``pos_embed``,
``pos_embed_window``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.layers.K,proj}``), so official
weights load with ``strict=True``. Inference only: stochastic depth is not implemented.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Hiera"]


class _PatchEmbed(nn.Module):
    """7x7 stride-4 convolution from the image to (B, H/4, W/4, C) tokens (channels last, a view)."""

    def __init__(self, embed_dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=7, stride=4, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class _Mlp(nn.Module):
    """Linear - GELU - Linear; the linears live in ``layers`` as in the official checkpoints."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(dim, hidden), nn.Linear(hidden, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[1](F.gelu(self.layers[0](x)))


def _max_pool_tokens(x: torch.Tensor, stride: tuple[int, int]) -> torch.Tensor:
    """Non-overlapping max pooling of (N, h, w, C) tokens by ``stride`` (a trailing remainder is dropped)."""
    sh, sw = stride
    h, w = x.shape[1] // sh * sh, x.shape[2] // sw * sw
    # Elementwise maxima of strided views: exact like MaxPool2d, and much faster than amax over
    # reshaped dimensions for channels-last tokens.
    out = None
    for i in range(sh):
        for j in range(sw):
            part = x[:, i:h:sh, j:w:sw]
            out = part if out is None else torch.maximum(out, part)
    return out


def _windows(x: torch.Tensor, win: int) -> torch.Tensor:
    """(B, H, W, C) with H, W multiples of ``win`` -> (B * H/win * W/win, win, win, C), row-major windows."""
    b, h, w, c = x.shape
    x = x.view(b, h // win, win, w // win, win, c).transpose(2, 3)
    return x.reshape(-1, win, win, c)


class _Attention(nn.Module):
    """Multi-head self-attention of a block (windowing and q-pooling are steered by the block)."""

    def __init__(self, dim: int, dim_out: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim_out)
        self.proj = nn.Linear(dim_out, dim_out)


class _Block(nn.Module):
    """One Hiera block: norm1 - (windowed, optionally q-pooled) attention - residual - norm2 - MLP - residual."""

    def __init__(self, dim: int, dim_out: int, num_heads: int, window: int, q_stride: tuple[int, int] | None,
                 mlp_ratio: float) -> None:
        super().__init__()
        self.dim, self.dim_out = dim, dim_out
        self.window = window
        self.q_stride = q_stride
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, dim_out, num_heads)
        self.norm2 = nn.LayerNorm(dim_out, eps=1e-6)
        self.mlp = _Mlp(dim_out, int(dim_out * mlp_ratio))
        if dim != dim_out:
            self.proj = nn.Linear(dim, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = self.norm1(x)
        if self.dim != self.dim_out:
            shortcut = self.proj(normed)
            if self.q_stride is not None:
                shortcut = _max_pool_tokens(shortcut, self.q_stride)
        else:
            shortcut = x
        x = shortcut + self._attend(normed, shortcut.shape[1], shortcut.shape[2])
        return x + self.mlp(self.norm2(x))

    def _attend(self, x: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
        """Attention of normed tokens (B, H, W, C) -> projected output (B, out_h, out_w, dim_out)."""
        attn = self.attn
        b, h, w, _ = x.shape
        heads, dim_out = attn.num_heads, self.dim_out
        win = self.window
        if win > 0:
            ph, pw = -h % win, -w % win
            rows, cols = (h + ph) // win, (w + pw) // win
            if ph or pw:
                # The official network projects zero-padded tokens, whose q/k/v are exactly the bias:
                # project the real tokens only and write the bias into the padding.
                qkv = attn.qkv(x)
                padded = attn.qkv.bias.expand(b, h + ph, w + pw, 3 * dim_out).clone()
                padded[:, :h, :w] = qkv
                qkv = _windows(padded, win)
            else:
                qkv = attn.qkv(_windows(x, win))  # windows of the narrower input: the cheaper copy
            wh = ww = win
        else:
            qkv = attn.qkv(x)
            rows = cols = 1
            wh, ww = h, w
        n = qkv.shape[0]
        q, k, v = qkv.view(n, wh * ww, 3, heads, dim_out // heads).unbind(2)  # each (n, tokens, heads, hd)
        if self.q_stride is not None:
            q = _max_pool_tokens(q.reshape(n, wh, ww, dim_out), self.q_stride)
            wh, ww = q.shape[1], q.shape[2]
            q = q.reshape(n, wh * ww, heads, dim_out // heads)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out.transpose(1, 2)  # (n, tokens, heads, hd)
        if rows * cols > 1:
            out = out.reshape(b, rows, cols, wh, ww, dim_out).transpose(2, 3)
        out = out.reshape(b, rows * wh, cols * ww, dim_out)
        if out.shape[1] != out_h or out.shape[2] != out_w:
            # Cut the padding away before projecting; a contiguous copy keeps the linear on the same
            # kernel path as the official one (a strided input changes the last bits).
            out = out[:, :out_h, :out_w].contiguous()
        return attn.proj(out)


class Hiera(nn.Module):
    """The Hiera trunk; ``forward`` returns the four stage outputs (B, C_i, H_i, W_i), finest first.

    ``channel_list`` holds the stage widths coarsest first (the FPN neck's ``backbone_channel_list``).
    The defaults are the official class's (Hiera-B+ block layout); SAM 2.1 configs override them.
    """

    def __init__(self, embed_dim: int = 96, num_heads: int = 1, stages: Sequence[int] = (2, 3, 16, 3),
                 q_pool: int = 3, q_stride: Sequence[int] = (2, 2), window_spec: Sequence[int] = (8, 4, 14, 7),
                 global_att_blocks: Sequence[int] = (12, 16, 20),
                 window_pos_embed_bkg_spatial_size: Sequence[int] = (14, 14),
                 dim_mul: float = 2.0, head_mul: float = 2.0, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        stages, window_spec = tuple(int(s) for s in stages), tuple(int(s) for s in window_spec)
        if len(stages) != len(window_spec):
            raise ValueError(f"stages {stages} and window_spec {window_spec} must have the same length")
        if not 0 <= q_pool < len(stages):
            raise ValueError(f"q_pool must be in 0..{len(stages) - 1}, got {q_pool}")
        self.q_stride = (int(q_stride[0]), int(q_stride[1]))
        self.stage_ends = [sum(stages[: i + 1]) - 1 for i in range(len(stages))]
        pool_blocks = {end + 1 for end in self.stage_ends[:-1][:q_pool]}
        global_blocks = set(int(i) for i in global_att_blocks)
        self._grid_multiple = math.lcm(window_spec[0], self.q_stride[0] ** q_pool, self.q_stride[1] ** q_pool)

        self.patch_embed = _PatchEmbed(embed_dim)
        # Registered before the blocks, in the official order (state-dict keys and their order match).
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_dim, *window_pos_embed_bkg_spatial_size))
        self.pos_embed_window = nn.Parameter(torch.zeros(1, embed_dim, window_spec[0], window_spec[0]))

        self.blocks = nn.ModuleList()
        dim, stage = embed_dim, 0
        for i in range(sum(stages)):
            # The window of the stage the block's input comes from ("lags one block").
            window = 0 if i in global_blocks else window_spec[stage]
            dim_out = dim
            if i - 1 in self.stage_ends:
                dim_out = int(dim * dim_mul)
                num_heads = int(num_heads * head_mul)
                stage += 1
            self.blocks.append(_Block(dim, dim_out, num_heads, window,
                                      self.q_stride if i in pool_blocks else None, mlp_ratio))
            dim = dim_out
        self.channel_list = [self.blocks[end].dim_out for end in reversed(self.stage_ends)]
        self._pos_cache: tuple[tuple, torch.Tensor] | None = None

    def _position_embedding(self, h: int, w: int) -> torch.Tensor:
        """(1, h, w, C) embedding for an h x w token grid; cached while the parameters are unchanged."""
        bkg, win = self.pos_embed, self.pos_embed_window
        key = (h, w, bkg.device, bkg.dtype, bkg.data_ptr(), bkg._version, win.data_ptr(), win._version)
        cacheable = not (torch.is_grad_enabled() and (bkg.requires_grad or win.requires_grad))
        if cacheable and self._pos_cache is not None and self._pos_cache[0] == key:
            return self._pos_cache[1]
        with torch.set_grad_enabled(not cacheable and torch.is_grad_enabled()):
            pos = F.interpolate(bkg, size=(h, w), mode="bicubic")
            pos = pos + win.tile(1, 1, h // win.shape[2], w // win.shape[3])
            pos = pos.permute(0, 2, 3, 1)
        if cacheable:
            self._pos_cache = (key, pos)
        return pos

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.patch_embed.proj.in_channels:
            raise ValueError(f"Hiera expects a (B, {self.patch_embed.proj.in_channels}, H, W) image batch, "
                             f"got shape {tuple(x.shape)}")
        step = 4 * self._grid_multiple
        if x.shape[2] % step or x.shape[3] % step or x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f"Hiera needs an image height and width that are positive multiples of {step} "
                             f"(token grid divisible by the first window and the pooling), got "
                             f"{x.shape[2]}x{x.shape[3]}")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        self._check_input(x)
        x = self.patch_embed(x)  # (B, H, W, C)
        x = x + self._position_embedding(x.shape[1], x.shape[2])
        outputs = []
        ends = set(self.stage_ends)
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in ends:
                outputs.append(x.permute(0, 3, 1, 2))
        return outputs
