"""Sine position encoding of SAM 3 / EfficientSAM3 (image grids, points and boxes).

SAM 3 gives every feature-map cell, and every point or box prompt, a fixed (not learned) code built from
sines and cosines of its normalised coordinates, as in DETR. With ``d`` output channels, ``n = d / 2``
channels describe y and ``n`` describe x. For a coordinate ``t`` in [0, 1] scaled to ``u = 2*pi*t``, the
``k``-th pair of its ``n`` channels is ``(sin(u / f_k), cos(u / f_k))`` with ``f_k = T ** (2 k / n)``,
``T = 10000``, ``k = 0 .. n/2 - 1``; the y channels come first, then the x channels.

Grid coordinates are 1-based cell indices divided by the last index (plus ``1e-6``), so the last row and
column sit at ``t`` just below 1 and nothing sits at 0. The result does not depend on the feature values,
only on the grid size, and is cached per size.

For prompts (used by the geometry encoder) the caller passes coordinates already normalised to [0, 1]:
:meth:`PositionEmbeddingSine.encode_points` appends the point label as one more channel
(``d + 1`` channels), :meth:`PositionEmbeddingSine.encode_boxes` appends the box height and width
(``d + 2`` channels, the centre encoded as above).

The arithmetic (float32 throughout, order of operations) follows the official module so that the codes
agree to the last bit; the module has no parameters, hence no checkpoint keys.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["PositionEmbeddingSine"]


class PositionEmbeddingSine(nn.Module):
    """Fixed 2-D sine/cosine position code with ``num_pos_feats`` output channels (the detector width)."""

    def __init__(
        self,
        num_pos_feats: int = 256,
        temperature: float = 10000.0,
        normalize: bool = True,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        if num_pos_feats % 4:
            raise ValueError(f"num_pos_feats must be a multiple of 4, got {num_pos_feats}")
        if scale is not None and not normalize:
            raise ValueError("a scale needs normalize=True")
        self.num_pos_feats = int(num_pos_feats)
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else float(scale)
        self._cache: dict[tuple[int, int, str], Tensor] = {}

    def _frequencies(self, device: torch.device) -> Tensor:
        """``f_k`` for the ``n/2`` sine/cosine pairs of one axis (float32, as the official ``dim_t[0::2]``)."""
        n = self.num_pos_feats // 2
        # even channel indices 0, 2, 4, ...: 2 * (i // 2) == i, computed in float32 like the reference
        idx = torch.arange(0, n, 2, dtype=torch.float32, device=device)
        return self.temperature ** (idx / n)

    def _sin_cos(self, u: Tensor, freq: Tensor) -> Tensor:
        """``u[..., None] / f`` -> interleaved ``(sin, cos)`` pairs along a new last axis of ``n`` channels."""
        phase = u[..., None] / freq
        return torch.stack((phase.sin(), phase.cos()), dim=-1).flatten(-2)

    def _encode_xy(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Codes of normalised coordinates ``x``, ``y`` (any equal shapes) -> two ``[..., d/2]`` tensors."""
        if x.shape != y.shape:
            raise ValueError(f"x and y shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
        freq = self._frequencies(x.device)
        return self._sin_cos(x * self.scale, freq), self._sin_cos(y * self.scale, freq)

    @torch.no_grad()
    def encode_points(self, x: Tensor, y: Tensor, labels: Tensor) -> Tensor:
        """Points ``[B, N]`` (normalised x, y; labels) -> ``[B, N, d + 1]`` = (y code, x code, label)."""
        if not (x.shape == y.shape == labels.shape) or x.ndim != 2:
            raise ValueError("x, y and labels must all be [B, N]")
        pos_x, pos_y = self._encode_xy(x, y)
        return torch.cat((pos_y, pos_x, labels[..., None].to(pos_x.dtype)), dim=-1)

    @torch.no_grad()
    def encode_boxes(self, x: Tensor, y: Tensor, w: Tensor, h: Tensor) -> Tensor:
        """Boxes ``[N]`` (normalised centre x, y, width, height) -> ``[N, d + 2]`` = (y code, x code, h, w)."""
        if x.ndim != 1:
            raise ValueError("box coordinates must be 1-D [N]")
        pos_x, pos_y = self._encode_xy(x, y)
        return torch.cat((pos_y, pos_x, h[:, None], w[:, None]), dim=1)

    def grid(self, height: int, width: int, device: torch.device | str = "cpu") -> Tensor:
        """Code of an ``height x width`` grid, ``[d, height, width]`` (cached; do not modify in place)."""
        key = (int(height), int(width), str(device))
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        ys = torch.arange(1, height + 1, dtype=torch.float32, device=device)
        xs = torch.arange(1, width + 1, dtype=torch.float32, device=device)
        if self.normalize:
            eps = 1e-6
            ys = ys / (ys[-1:] + eps) * self.scale
            xs = xs / (xs[-1:] + eps) * self.scale
        freq = self._frequencies(ys.device)
        pos_y = self._sin_cos(ys, freq)  # [H, d/2]
        pos_x = self._sin_cos(xs, freq)  # [W, d/2]
        half = pos_y.shape[-1]
        pos = torch.cat(
            (pos_y[:, None, :].expand(height, width, half), pos_x[None, :, :].expand(height, width, half)), dim=-1
        ).permute(2, 0, 1).contiguous()
        if pos.device.type != "meta":
            self._cache[key] = pos
        return pos

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """Feature map ``[B, C, H, W]`` -> its position code ``[B, d, H, W]`` (same for every batch item)."""
        pos = self.grid(x.shape[-2], x.shape[-1], x.device)
        return pos[None].expand(x.shape[0], -1, -1, -1).clone()

    def extra_repr(self) -> str:
        return f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, normalize={self.normalize}"
