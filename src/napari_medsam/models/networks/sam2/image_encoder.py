"""SAM 2 image encoder: the Hiera trunk followed by a light FPN neck.

The neck maps every trunk stage to ``d_model`` channels with a 1x1 convolution (``convs.0`` takes
the coarsest stage, ``convs.3`` the finest). Going from coarse to fine, a level listed in
``fpn_top_down_levels`` adds the nearest-neighbour x2 upsampling of the level above it; the other
levels keep their lateral features only (SAM 2.1: levels 2 and 3 fused, levels 0 and 1 lateral).
Each level gets a fixed 2-D sine position encoding. The encoder then drops the ``scalp`` coarsest
levels (SAM 2.1: one), so at 512 px it returns 256-channel maps of 128², 64² and 32²; the last one
is the "vision features" the memory attention and the mask decoder work on.

``HIERA_PRESETS`` lists the trunk settings of the four SAM 2.1 sizes; MedSAM2 uses "tiny" at 512 px.
Parameter names equal the official ``image_encoder.*`` checkpoint keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .hiera import Hiera
from .position import SinePositionEncoding

__all__ = ["HIERA_PRESETS", "FpnNeck", "ImageEncoder", "build_image_encoder"]

# Trunk keyword arguments of the official SAM 2.1 configs (sam2.1_hiera_{t,s,b+,l}.yaml). "tiny" is
# also MedSAM2's trunk (sam2.1_hiera_t512.yaml: the same trunk at image_size 512).
HIERA_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"embed_dim": 96, "num_heads": 1, "stages": (1, 2, 7, 2), "global_att_blocks": (5, 7, 9),
             "window_spec": (8, 4, 14, 7), "window_pos_embed_bkg_spatial_size": (7, 7)},
    "small": {"embed_dim": 96, "num_heads": 1, "stages": (1, 2, 11, 2), "global_att_blocks": (7, 10, 13),
              "window_spec": (8, 4, 14, 7), "window_pos_embed_bkg_spatial_size": (7, 7)},
    "base_plus": {"embed_dim": 112, "num_heads": 2, "stages": (2, 3, 16, 3), "global_att_blocks": (12, 16, 20),
                  "window_spec": (8, 4, 14, 7), "window_pos_embed_bkg_spatial_size": (14, 14)},
    "large": {"embed_dim": 144, "num_heads": 2, "stages": (2, 6, 36, 4), "global_att_blocks": (23, 33, 43),
              "window_spec": (8, 4, 16, 8), "window_pos_embed_bkg_spatial_size": (7, 7)},
}


class _Lateral(nn.Module):
    """Holder of one 1x1 lateral convolution, so its key reads ``convs.K.conv.*`` as in the checkpoints."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class FpnNeck(nn.Module):
    """Feature pyramid over the trunk's stages (nearest upsampling, fused by sum).

    ``backbone_channel_list`` is coarsest first, as the trunk's ``channel_list``; ``forward`` takes
    the stage outputs finest first and returns (features, positions), both finest first.
    """

    def __init__(self, d_model: int = 256, backbone_channel_list: Sequence[int] = (768, 384, 192, 96),
                 fpn_top_down_levels: Sequence[int] = (2, 3),
                 position_encoding: SinePositionEncoding | None = None) -> None:
        super().__init__()
        self.d_model = d_model
        self.backbone_channel_list = [int(c) for c in backbone_channel_list]
        self.fpn_top_down_levels = {int(level) for level in fpn_top_down_levels}
        self.position_encoding = position_encoding if position_encoding is not None else SinePositionEncoding(d_model)
        self.convs = nn.ModuleList([_Lateral(c, d_model) for c in self.backbone_channel_list])

    def forward(self, xs: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        levels = len(self.convs)
        if len(xs) != levels:
            raise ValueError(f"FpnNeck expects {levels} feature maps, got {len(xs)}")
        features: list[torch.Tensor] = [None] * levels  # type: ignore[list-item]
        positions: list[torch.Tensor] = [None] * levels  # type: ignore[list-item]
        above = None
        for level in reversed(range(levels)):
            lateral = self.convs[levels - 1 - level](xs[level])
            if above is not None and level in self.fpn_top_down_levels:
                lateral = lateral + F.interpolate(above.float(), scale_factor=2.0, mode="nearest")
            features[level] = above = lateral
            positions[level] = self.position_encoding(lateral).to(lateral.dtype)
        return features, positions


class ImageEncoder(nn.Module):
    """Hiera trunk + FPN neck; returns the official dict of ``forward_image``'s backbone output."""

    def __init__(self, trunk: Hiera, neck: FpnNeck, scalp: int = 1) -> None:
        super().__init__()
        if list(trunk.channel_list) != list(neck.backbone_channel_list):
            raise ValueError(f"trunk channels {trunk.channel_list} differ from the neck's "
                             f"backbone_channel_list {neck.backbone_channel_list}")
        if not 0 <= scalp < len(neck.backbone_channel_list):
            raise ValueError(f"scalp must be in 0..{len(neck.backbone_channel_list) - 1}, got {scalp}")
        self.trunk = trunk
        self.neck = neck
        self.scalp = scalp

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        """``vision_features`` (the coarsest kept level), ``vision_pos_enc`` and ``backbone_fpn`` (finest first)."""
        features, positions = self.neck(self.trunk(x))
        if self.scalp:
            features, positions = features[: -self.scalp], positions[: -self.scalp]
        return {"vision_features": features[-1], "vision_pos_enc": positions, "backbone_fpn": features}


def build_image_encoder(embed_dim: int = 96, num_heads: int = 1, stages: Sequence[int] = (1, 2, 7, 2),
                        global_att_blocks: Sequence[int] = (5, 7, 9), window_spec: Sequence[int] = (8, 4, 14, 7),
                        window_pos_embed_bkg_spatial_size: Sequence[int] = (7, 7), d_model: int = 256,
                        scalp: int = 1) -> ImageEncoder:
    """The SAM 2.1 image encoder (defaults: Hiera-tiny, MedSAM2's); the neck's channels follow the trunk."""
    trunk = Hiera(embed_dim=embed_dim, num_heads=num_heads, stages=stages, global_att_blocks=global_att_blocks,
                  window_spec=window_spec, window_pos_embed_bkg_spatial_size=window_pos_embed_bkg_spatial_size)
    neck = FpnNeck(d_model=d_model, backbone_channel_list=trunk.channel_list, fpn_top_down_levels=(2, 3),
                   position_encoding=SinePositionEncoding(d_model))
    return ImageEncoder(trunk, neck, scalp=scalp)
