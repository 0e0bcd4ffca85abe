"""TinyViT-5M image encoder as used by MobileSAM and LiteMedSAM.

TinyViT (Wu et al., ECCV 2022) is a four-stage hierarchical network: a convolutional stem, one
stage of MBConv blocks, then three stages of windowed attention blocks with a depthwise "local"
convolution between attention and MLP. MobileSAM (Zhang et al., 2023) distilled SAM's ViT-H into
TinyViT-5M at 1024x1024 input, and changed the last patch-merging step to stride 1 so the output
grid stays 64x64; a 256-channel neck as in SAM follows. LiteMedSAM (MedSAM team, CVPR 2024
challenge) runs the same network at 256x256 input, with a stem of two 1x1 stride-1 convolutions
instead of two 3x3 stride-2 ones, and without the (unused) classification head.

Parameter names follow the official checkpoints. The attention-bias lookup (a gather from
``attention_biases``) is recomputed on every forward call, so no cached copy can go stale after
``load_state_dict`` and nothing beyond the official keys appears in ``state_dict()``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .fused import conv2d_gelu, linear_gelu
from .vit import make_neck

__all__ = ["TinyViTImageEncoder"]


class _ConvBN(nn.Sequential):
    """Bias-free conv followed by BatchNorm; children named ``c`` and ``bn`` as in the checkpoints."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout))

    def _folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The conv weight and bias with the (eval-mode) BatchNorm folded in."""
        conv, bn = self.c, self.bn
        # Recomputed per call from the live parameters, so loading new weights can never leave a
        # stale fused copy behind; the cost is negligible next to the convolution.
        gain = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        return conv.weight * gain.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Conv + BN; in eval mode the BN is folded into the conv weights (one pass, not two)."""
        if self.training:
            return super().forward(x)
        conv = self.c
        weight, bias = self._folded()
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    def forward_gelu(self, x: torch.Tensor) -> torch.Tensor:
        """GELU(conv + BN): in eval mode one oneDNN call where torch has it (fused.py)."""
        if self.training:
            return F.gelu(super().forward(x))
        conv = self.c
        weight, bias = self._folded()
        return conv2d_gelu(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class _Stem(nn.Module):
    def __init__(self, in_chans: int, dim: int, downsample: bool) -> None:
        super().__init__()
        # MobileSAM: two 3x3 stride-2 convs (1024 -> 256). LiteMedSAM: two 1x1 stride-1 convs.
        kernel, stride = (3, 2) if downsample else (1, 1)
        self.seq = nn.Sequential(
            _ConvBN(in_chans, dim // 2, kernel, stride),
            nn.GELU(),
            _ConvBN(dim // 2, dim, kernel, stride),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq[2](self.seq[0].forward_gelu(x))


# Image rows per strip of an inverted-residual block on the CPU (``_MBConv._forward_in_strips``);
# None: the whole map in one pass.
_MBCONV_ROWS: int | None = 16


class _MBConv(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project, residual, GELU."""

    def __init__(self, dim: int, expand: float) -> None:
        super().__init__()
        hidden = int(dim * expand)
        self.conv1 = _ConvBN(dim, hidden)
        self.conv2 = _ConvBN(hidden, hidden, 3, groups=hidden)
        self.conv3 = _ConvBN(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _MBCONV_ROWS
        if (rows is None or self.training or torch.is_grad_enabled() or x.device.type != "cpu"
                or x.shape[2] < 2 * rows or not x.is_contiguous(memory_format=torch.channels_last)):
            y = self.conv2.forward_gelu(self.conv1.forward_gelu(x))
            return self.act(self.conv3(y) + x)
        return self._forward_in_strips(x, rows)

    def _forward_in_strips(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        """``forward`` a strip of ``rows`` image rows at a time (CPU inference, NHWC input).

        On MobileSAM's and LiteMedSAM's first stage each step reads and writes 16-64 MB maps (256 x
        256 pixels x 64-256 channels), far more than the caches hold. A strip's expanded maps stay
        in cache through all three convolutions; the depthwise 3x3 convolution takes one row of
        context above and below (its outputs on those rows are dropped). Every output pixel is the
        same sum as in one pass (tests compare both); in NHWC a strip of rows is one contiguous
        block, so no input is copied.
        """
        height = x.shape[2]
        expand, depthwise, project = self.conv1, self.conv2, self.conv3
        w1, b1 = expand._folded()
        w2, b2 = depthwise._folded()
        w3, b3 = project._folded()
        dw = depthwise.c
        out = torch.empty_like(x, memory_format=torch.channels_last)
        for top in range(0, height, rows):
            bottom = min(top + rows, height)
            above, below = max(top - 1, 0), min(bottom + 1, height)
            y = conv2d_gelu(x[:, :, above:below], w1, b1, 1, 0, 1, 1)
            y = conv2d_gelu(y, w2, b2, dw.stride, dw.padding, dw.dilation, dw.groups)
            y = F.conv2d(y[:, :, top - above:bottom - above], w3, b3)
            y += x[:, :, top:bottom]
            out[:, :, top:bottom] = F.gelu(y, approximate=self.act.approximate)
        return out


class _PatchMerging(nn.Module):
    """Token grid (B, H*W, C) or NCHW map -> (B, H'*W', C_out) via 1x1, depthwise 3x3, 1x1 convs."""

    def __init__(self, resolution: int, dim: int, out_dim: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.conv1 = _ConvBN(dim, out_dim)
        # MobileSAM keeps the last stage at the same grid; its released models use these widths.
        stride = 1 if out_dim in (320, 448, 576) else 2
        self.conv2 = _ConvBN(out_dim, out_dim, 3, stride, groups=out_dim)
        self.conv3 = _ConvBN(out_dim, out_dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            side = self.resolution
            x = x.view(x.shape[0], side, side, -1).permute(0, 3, 1, 2)
        x = self.conv3(self.conv2.forward_gelu(self.conv1.forward_gelu(x)))
        return x.flatten(2).transpose(1, 2)


class _ConvStage(nn.Module):
    def __init__(self, dim: int, out_dim: int, resolution: int, depth: int, expand: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_MBConv(dim, expand) for _ in range(depth))
        self.downsample = _PatchMerging(resolution, dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x)


class _WindowAttention(nn.Module):
    """LeViT-style attention over one square window with a learned bias per (|dy|, |dx|) offset."""

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window = window
        self.scale = self.head_dim**-0.5
        self._offset_cache: dict[torch.device, torch.Tensor] = {}
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        # One bias per head and per distinct offset; offsets are numbered |dy| * window + |dx|,
        # which is the order in which the reference enumerates them.
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window * window))

    def _offset_index(self, device: torch.device) -> torch.Tensor:
        # A constant of the window size, cached per device as a plain attribute: it is not a
        # buffer, so it never enters state_dict() and is never left uninitialised by to_empty().
        index = self._offset_cache.get(device)
        if index is None:
            pos = torch.arange(self.window, device=device)
            rows = pos.repeat_interleave(self.window)
            cols = pos.repeat(self.window)
            index = (rows[:, None] - rows[None, :]).abs() * self.window + (cols[:, None] - cols[None, :]).abs()
            self._offset_cache[device] = index
        return index

    def bias_matrix(self) -> torch.Tensor:
        """(heads, N, N) additive attention bias, gathered from the live ``attention_biases``."""
        return self.attention_biases[:, self._offset_index(self.attention_biases.device)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(self.norm(x)).view(batch, tokens, self.num_heads, 3 * self.head_dim)
        q, k, v = qkv.permute(0, 2, 1, 3).split(self.head_dim, dim=3)
        # Explicit softmax attention in the reference's order of operations. For these small
        # windows it measured a few per cent faster than SDPA with a float mask, which on the CPU
        # takes the unfused path and copies q/k/v.
        scores = torch.matmul(q, k.transpose(-2, -1)).mul_(self.scale).add_(self.bias_matrix())
        out = torch.matmul(scores.softmax(dim=-1), v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class _TokenMLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(self.fc1) is nn.Linear:  # not a quantised copy (int8 backend)
            return self.fc2(linear_gelu(self.norm(x), self.fc1.weight, self.fc1.bias))
        return self.fc2(self.act(self.fc1(self.norm(x))))


class _TinyViTBlock(nn.Module):
    def __init__(self, dim: int, resolution: int, num_heads: int, window: int, mlp_ratio: float) -> None:
        super().__init__()
        self.resolution = resolution
        self.window = window
        self.attn = _WindowAttention(dim, num_heads, window)
        self.mlp = _TokenMLP(dim, int(dim * mlp_ratio))
        self.local_conv = _ConvBN(dim, dim, 3, groups=dim)

    def _windowed_attention(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, chans = x.shape
        side, win = self.resolution, self.window
        if side == win:
            return self.attn(x)
        pad = (win - side % win) % win
        grid = x.view(batch, side, side, chans)
        if pad:
            # Zero tokens enter the attention (normalised there) exactly as in the reference.
            grid = F.pad(grid, (0, 0, 0, pad, 0, pad))
        n = (side + pad) // win
        wins = grid.view(batch, n, win, n, win, chans).transpose(2, 3).reshape(-1, win * win, chans)
        out = self.attn(wins).view(batch, n, n, win, win, chans).transpose(2, 3)
        out = out.reshape(batch, n * win, n * win, chans)[:, :side, :side]
        return out.reshape(batch, side * side, chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, chans = x.shape
        side = self.resolution
        x = x + self._windowed_attention(x)
        # (B, L, C) is already channels-last memory for an NCHW view; no transpose copy needed.
        fmap = x.view(batch, side, side, chans).permute(0, 3, 1, 2)
        x = self.local_conv(fmap).permute(0, 2, 3, 1).reshape(batch, tokens, chans)
        return x + self.mlp(x)


class _AttentionStage(nn.Module):
    def __init__(
        self,
        dim: int,
        out_dim: int | None,
        resolution: int,
        depth: int,
        num_heads: int,
        window: int,
        mlp_ratio: float,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            _TinyViTBlock(dim, resolution, num_heads, window, mlp_ratio) for _ in range(depth)
        )
        self.downsample = None if out_dim is None else _PatchMerging(resolution, dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class TinyViTImageEncoder(nn.Module):
    """TinyViT encoder + SAM neck: (B, 3, img, img) -> (B, 256, 64, 64) image embedding."""

    def __init__(
        self,
        img_size: int = 1024,
        stem_downsample: bool = True,
        with_head: bool = True,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        num_classes: int = 1000,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        grid = img_size // 4 if stem_downsample else img_size
        self.patch_embed = _Stem(in_chans, embed_dims[0], stem_downsample)
        stages: list[nn.Module] = []
        resolution = grid
        for i, dim in enumerate(embed_dims):
            last = i == len(embed_dims) - 1
            out_dim = None if last else embed_dims[i + 1]
            if i == 0:
                stages.append(_ConvStage(dim, embed_dims[1], resolution, depths[0], mbconv_expand_ratio))
            else:
                stages.append(
                    _AttentionStage(dim, out_dim, resolution, depths[i], num_heads[i], window_sizes[i], mlp_ratio)
                )
            if out_dim is not None and out_dim not in (320, 448, 576):
                resolution //= 2
        self.layers = nn.ModuleList(stages)
        self.out_grid = resolution
        if with_head:
            # Classification head of the ImageNet TinyViT: unused here, kept so MobileSAM loads strictly.
            self.norm_head = nn.LayerNorm(embed_dims[-1])
            self.head = nn.Linear(embed_dims[-1], num_classes)
        self.neck = make_neck(embed_dims[-1], 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode a normalised, padded image batch."""
        # oneDNN convolutions run markedly faster on NHWC; the token stages are NHWC-shaped anyway.
        x = self.patch_embed(x.contiguous(memory_format=torch.channels_last))
        for stage in self.layers:
            x = stage(x)
        batch, _, chans = x.shape
        fmap = x.view(batch, self.out_grid, self.out_grid, chans).permute(0, 3, 1, 2)
        return self.neck(fmap)
