"""The SAM-family network (image encoder + prompt encoder + mask decoder) and its builders.

Architectures:

* ``vit_b`` / ``vit_l`` / ``vit_h``: SAM (Kirillov et al. 2023) at 1024x1024; MedSAM
  (Ma et al. 2024) is ``vit_b`` with fine-tuned weights. ``depth``, ``global_attn_indexes``,
  ``embed_dim`` and ``num_heads`` may be overridden (e.g. the reduced depth-2 test model).
* ``tiny_vit``: MobileSAM (Zhang et al. 2023), TinyViT-5M at 1024x1024.
* ``lite_tiny_vit``: LiteMedSAM, TinyViT-5M at 256x256 with a 1x1 stem, prompts in a 256 frame.

All take an already normalised and padded (B, 3, S, S) image; the per-pipeline pre- and
post-processing lives in :mod:`napari_medsam.models.pipelines`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ...errors import MedSamError
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .tiny_vit import TinyViTImageEncoder
from .vit import VIT_PRESETS, ViTImageEncoder

__all__ = ["ARCHITECTURES", "SamNetwork", "build_network", "load_network"]

ARCHITECTURES: tuple[str, ...] = ("vit_b", "vit_l", "vit_h", "tiny_vit", "lite_tiny_vit")
_VIT_OVERRIDES = {"depth", "global_attn_indexes", "embed_dim", "num_heads"}


class SamNetwork(nn.Module):
    """Holds ``image_encoder``, ``prompt_encoder`` and ``mask_decoder`` under the official key prefixes."""

    def __init__(
        self,
        image_encoder: nn.Module,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        image_size: int,
        decoder_before_prompt: bool = False,
    ) -> None:
        super().__init__()
        # Registration order only decides the order of state_dict() keys; LiteMedSAM's
        # checkpoints list the decoder before the prompt encoder, SAM's the other way round.
        self.image_encoder = image_encoder
        if decoder_before_prompt:
            self.mask_decoder = mask_decoder
            self.prompt_encoder = prompt_encoder
        else:
            self.prompt_encoder = prompt_encoder
            self.mask_decoder = mask_decoder
        self.image_size = image_size

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised padded image -> (B, 256, 64, 64) image embedding."""
        if image.ndim != 4 or image.shape[1] != 3 or image.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"expected a (B, 3, {self.image_size}, {self.image_size}) tensor, got {tuple(image.shape)}")
        return self.image_encoder(image)

    def decode(
        self,
        image_embedding: torch.Tensor,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts in the model frame -> (B, M, 256, 256) low-res mask logits and (B, M) IoU scores.

        ``point_coords`` (B, N, 2) xy with ``point_labels`` (B, N); ``boxes`` (B, 4) or
        (B, 1, 4); ``mask_input`` (B, 1, 256, 256) logits from an earlier prediction.
        """
        if (point_coords is None) != (point_labels is None):
            raise ValueError("point_coords and point_labels must be given together")
        points = None if point_coords is None else (point_coords, point_labels)
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        return self.mask_decoder(
            image_embeddings=image_embedding,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )


def build_network(arch: str, **overrides: Any) -> SamNetwork:
    """Build an untrained network of ``arch`` (see module docstring) with official parameter names."""
    if arch in VIT_PRESETS:
        unknown = set(overrides) - _VIT_OVERRIDES
        if unknown:
            raise ValueError(f"unknown overrides for {arch}: {sorted(unknown)}; allowed: {sorted(_VIT_OVERRIDES)}")
        embed_dim, depth, heads, globals_ = VIT_PRESETS[arch]
        encoder: nn.Module = ViTImageEncoder(
            embed_dim=overrides.get("embed_dim", embed_dim),
            depth=overrides.get("depth", depth),
            num_heads=overrides.get("num_heads", heads),
            global_attn_indexes=overrides.get("global_attn_indexes", globals_),
        )
        image_size, lite = 1024, False
    elif arch in ("tiny_vit", "lite_tiny_vit"):
        if overrides:
            raise ValueError(f"{arch} takes no overrides, got {sorted(overrides)}")
        lite = arch == "lite_tiny_vit"
        image_size = 256 if lite else 1024
        encoder = TinyViTImageEncoder(img_size=image_size, stem_downsample=not lite, with_head=not lite)
    else:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    prompt_encoder = PromptEncoder(256, (64, 64), (image_size, image_size), 16)
    return SamNetwork(encoder, prompt_encoder, MaskDecoder(), image_size, decoder_before_prompt=lite)


def load_network(arch: str, state_dict: Mapping[str, torch.Tensor], **overrides: Any) -> SamNetwork:
    """Build ``arch`` without allocating random weights and load ``state_dict`` strictly (eval mode).

    Raises :class:`MedSamError` when the weights do not belong to this architecture.
    """
    with torch.device("meta"):
        net = build_network(arch, **overrides)
    # assign=True adopts the given tensors as parameters; float weights are brought to float32
    # because the pipelines feed float32 images.
    tensors = {
        key: (value.float() if value.is_floating_point() else value) for key, value in state_dict.items()
    }
    try:
        net.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else "shape or key mismatch"
        raise MedSamError(
            f"these weights do not fit the {arch!r} network ({first_line}); "
            "choose the model type that matches the checkpoint file"
        ) from exc
    return net.eval()
