"""Fixed sine position encodings of the SAM 2 family.

Two kinds are used:

* a 2-D encoding of a feature map (the FPN levels of the image encoder and the memory features):
  half of the channels encode the row, half the column, each as interleaved sin/cos pairs of the
  position normalised to (0, 2*pi] over the map;
* a 1-D encoding of a scalar (the temporal distance of an object pointer), first all sines, then
  all cosines.

Both depend only on shapes, so the 2-D maps are computed once per size and kept. The arithmetic
follows the order of the official implementation (float32 throughout) so that values agree bit
for bit: the golden tests compare them with the official arrays.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["SinePositionEncoding", "sine_1d"]


def _frequencies(count: int, temperature: float, device: torch.device) -> torch.Tensor:
    """``temperature ** (2 * (i // 2) / count)`` for i in 0..count-1 (float32)."""
    index = torch.arange(count, dtype=torch.float32, device=device)
    return temperature ** (2 * (index // 2) / count)


def sine_1d(positions: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """(..., ) positions -> (..., dim) encoding: ``dim // 2`` sines followed by as many cosines."""
    freqs = _frequencies(dim // 2, temperature, positions.device)
    angles = positions.unsqueeze(-1) / freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class SinePositionEncoding(nn.Module):
    """2-D sine encoding with ``num_pos_feats`` channels for a (B, C, H, W) map (values ignored)."""

    def __init__(self, num_pos_feats: int, temperature: float = 10000.0, normalize: bool = True,
                 scale: float | None = None) -> None:
        super().__init__()
        if num_pos_feats % 2:
            raise ValueError(f"num_pos_feats must be even, got {num_pos_feats}")
        if scale is not None and not normalize:
            raise ValueError("a scale needs normalize=True")
        self.half = num_pos_feats // 2
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale
        self._maps: dict[tuple[int, int, str], torch.Tensor] = {}

    def _axis(self, length: int, device: torch.device) -> torch.Tensor:
        """(length, half) encoding of positions 1..length along one axis."""
        pos = torch.arange(1, length + 1, dtype=torch.float32, device=device)
        if self.normalize:
            pos = pos / (pos[-1:] + 1e-6) * self.scale
        angles = pos[:, None] / _frequencies(self.half, self.temperature, device)
        # Interleave sin of the even columns with cos of the odd ones: s0 c1 s2 c3 ...
        return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=2).flatten(1)

    def grid(self, height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """(2 * half, height, width) encoding: rows' channels first, then columns'."""
        device = torch.device(device)
        key = (height, width, str(device))
        cached = self._maps.get(key)
        if cached is None:
            rows = self._axis(height, device)  # (H, half)
            cols = self._axis(width, device)  # (W, half)
            cached = torch.cat((rows[:, None, :].expand(height, width, self.half),
                                cols[None, :, :].expand(height, width, self.half)), dim=2).permute(2, 0, 1)
            cached = cached.contiguous()
            self._maps[key] = cached
        return cached

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The encoding for ``x``'s spatial size, repeated over its batch (B, 2 * half, H, W)."""
        grid = self.grid(x.shape[-2], x.shape[-1], x.device).to(x.dtype)
        return grid[None].expand(x.shape[0], -1, -1, -1)
