"""SAM's prompt encoder: points, boxes and a low-resolution mask -> sparse and dense embeddings.

Points and box corners are encoded with random Fourier features of their normalised position
(Tancik et al. 2020, as used by SAM) plus a learned per-role embedding (negative point,
positive point, box top-left, box bottom-right, padding). A mask prompt is downscaled 4x by a
small conv net into a dense embedding; without one, a learned "no mask" vector is broadcast.
SAM 2 uses the same encoder but gives a box as two points labelled 2 (top-left) and 3
(bottom-right), so they take the points path (with the padding token appended, as for any
points given without a box). Names follow the official checkpoints (``prompt_encoder.*``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .vit import LayerNorm2d

__all__ = ["PromptEncoder", "RandomFourierPositions"]


class RandomFourierPositions(nn.Module):
    """Positional encoding of (x, y) in [0, 1]^2 by sin/cos of a fixed random projection."""

    def __init__(self, num_feats: int = 128, scale: float = 1.0) -> None:
        super().__init__()
        # A persistent buffer: it is part of the official checkpoints, though never trained.
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn(2, num_feats))

    def _encode(self, unit_coords: torch.Tensor) -> torch.Tensor:
        proj = (2 * unit_coords - 1) @ self.positional_encoding_gaussian_matrix
        proj = 2 * math.pi * proj
        return torch.cat((torch.sin(proj), torch.cos(proj)), dim=-1)

    def grid(self, height: int, width: int) -> torch.Tensor:
        """(C, H, W) encoding of the pixel centres of an H x W grid."""
        matrix = self.positional_encoding_gaussian_matrix
        ones = torch.ones((height, width), device=matrix.device, dtype=matrix.dtype)
        ys = (ones.cumsum(dim=0) - 0.5) / height
        xs = (ones.cumsum(dim=1) - 0.5) / width
        return self._encode(torch.stack((xs, ys), dim=-1)).permute(2, 0, 1)

    def at_coords(self, coords: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """(B, N, 2) pixel (x, y) in an image of ``image_size`` = (H, W) -> (B, N, C)."""
        # Division, not multiplication by the reciprocal, to round exactly as the reference does.
        unit = torch.stack((coords[..., 0] / image_size[1], coords[..., 1] / image_size[0]), dim=-1)
        return self._encode(unit.to(torch.float))


class PromptEncoder(nn.Module):
    """Encode SAM prompts given in the model's input frame (pixels of the padded square image)."""

    def __init__(
        self,
        embed_dim: int = 256,
        image_embedding_size: tuple[int, int] = (64, 64),
        input_image_size: tuple[int, int] = (1024, 1024),
        mask_in_chans: int = 16,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = tuple(image_embedding_size)
        self.input_image_size = tuple(input_image_size)
        self.pe_layer = RandomFourierPositions(embed_dim // 2)
        # Roles 0..3: negative point, positive point, box top-left, box bottom-right.
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)
        # (matrix it was made from, grid size, encoding) of get_dense_pe; not a buffer: derived data.
        self._dense_pe_cache: tuple[torch.Tensor, tuple[int, int], torch.Tensor] | None = None

    def get_dense_pe(self) -> torch.Tensor:
        """(1, C, h, w) positional encoding of the image-embedding grid (cached: do not modify it).

        The grid encoding costs ~1-3 ms (4096 sin/cos of 128 features) and is the same for every
        prompt, so it is kept with the Gaussian matrix it was made from; any change of that
        matrix (new weights, another device or dtype) makes a new one.
        """
        matrix = self.pe_layer.positional_encoding_gaussian_matrix
        cached = self._dense_pe_cache
        if (
            cached is None
            or cached[0].device != matrix.device
            or cached[0].dtype != matrix.dtype
            or cached[1] != self.image_embedding_size
            or not torch.equal(cached[0], matrix)
        ):
            # A normal tensor even when first asked for under inference_mode, so that it can
            # also be used where autograd records.
            with torch.inference_mode(False), torch.no_grad():
                grid = self.pe_layer.grid(*self.image_embedding_size).unsqueeze(0)
                cached = (matrix.detach().clone(), self.image_embedding_size, grid)
            self._dense_pe_cache = cached
        return cached[2]

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        coords = coords + 0.5  # pixel index -> pixel centre
        if pad:
            # Without a box, SAM appends one "not a point" token (label -1).
            batch = coords.shape[0]
            coords = torch.cat((coords, coords.new_zeros((batch, 1, 2))), dim=1)
            labels = torch.cat((labels, -labels.new_ones((batch, 1))), dim=1)
        emb = self.pe_layer.at_coords(coords, self.input_image_size)
        # Role vectors by label + 1: padding (-1), negative (0), positive (1), and the box corners
        # top-left (2) and bottom-right (3), which SAM 2 passes as points.
        role = torch.cat([self.not_a_point_embed.weight] + [role_emb.weight for role_emb in self.point_embeddings])
        is_padding = (labels == -1).unsqueeze(-1)
        # Padding tokens get no positional part; labels 0..3 select their role vector and any
        # other label keeps its positional part alone.
        emb = torch.where(is_padding, torch.zeros_like(emb), emb)
        index = (labels.clamp(-1, 3) + 1).long()
        known = (labels >= -1) & (labels <= 3)
        return emb + torch.where(known.unsqueeze(-1), role[index], torch.zeros_like(emb))

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        corners = (boxes + 0.5).reshape(-1, 2, 2)
        emb = self.pe_layer.at_coords(corners, self.input_image_size)
        corner_roles = torch.cat((self.point_embeddings[2].weight, self.point_embeddings[3].weight))
        return emb + corner_roles

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return sparse (B, N, C) and dense (B, C, h, w) prompt embeddings.

        ``points`` = (coords (B, N, 2) float xy, labels (B, N) with 1 positive, 0 negative,
        -1 padding, 2 / 3 box top-left / bottom-right corner as SAM 2 gives boxes); ``boxes``
        (B, 4) or (B, 1, 4) as x0, y0, x1, y1; ``masks`` (B, 1, 4h, 4w) low-resolution logits.
        """
        if points is not None:
            batch = points[0].shape[0]
        elif boxes is not None:
            batch = boxes.shape[0]
        elif masks is not None:
            batch = masks.shape[0]
        else:
            batch = 1
        weight = self.no_mask_embed.weight
        parts = [weight.new_empty((batch, 0, self.embed_dim))]
        if points is not None:
            coords, labels = points
            parts.append(self._embed_points(coords, labels, pad=boxes is None))
        if boxes is not None:
            parts.append(self._embed_boxes(boxes))
        sparse = torch.cat(parts, dim=1)
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            h, w = self.image_embedding_size
            dense = weight.reshape(1, -1, 1, 1).expand(batch, -1, h, w)
        return sparse, dense
