"""SAM 3's detector heads: prompt-query scoring and the instance mask head.

**Scoring** (``DotProductScoring``, keys ``detector.dot_prod_scoring.``). A query's class logit says how
well it matches the prompt:

1. every prompt token (text, then geometry tokens; ``[S, B, d]``) goes through ``prompt_mlp``: a
   2-layer ReLU MLP ``d -> hidden -> d`` with a residual connection, then LayerNorm;
2. the tokens are mean-pooled over the *valid* ones (``prompt_mask`` True = padding; at least 1 in the
   denominator);
3. the pooled prompt goes through ``prompt_proj``, every query state (all decoder layers) through
   ``hs_proj`` (both linear ``d -> d_proj``); the logit is their dot product divided by
   ``sqrt(d_proj)``, clamped to +-12.

**Mask head** (``UniversalSegmentationHead``, keys ``detector.segmentation_head.``):

1. the fused image memory ``[HW, B, d]`` attends to the prompt tokens: ``memory + MHA(LN(memory),
   prompt, prompt)`` (``cross_attn_norm``, ``cross_attend_prompt``; padding masked);
2. the pixel decoder rebuilds a high-resolution map from the neck levels (288, 144, 72 cells a side
   at 1008 px input), the coarsest level replaced by that memory: from coarse to fine,
   ``x <- ReLU(GroupNorm_8(conv3x3(level + nearest_upsample(x))))``. The official module is built with
   three conv/norm stages though only two run with three levels; the third is kept for strict loading;
3. ``instance_seg_head`` (1x1 conv) gives per-pixel embeddings ``[B, d, 288, 288]``; ``mask_embed``
   (3-layer MLP) turns the last decoder layer's query states into mask embeddings ``[B, Q, d]``; a
   query's mask logits are the dot product of the two at every pixel (``[B, Q, 288, 288]``);
4. ``semantic_seg_head`` (1x1 conv to one channel) gives a whole-concept mask the image processor
   does not use; it is computed only on request, and is here so that the checkpoints load strictly.

The arithmetic follows the official modules (same torch calls in the same order).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .decoder import MLP

__all__ = [
    "DotProductScoring",
    "HeadsConfig",
    "PixelDecoder",
    "SegmentationOutput",
    "UniversalSegmentationHead",
    "infer_heads_config",
    "mean_pool_prompt",
]


# a subset of at most d / _FOLD_RATIO queries gets its masks without the per-pixel 1x1 projection (see forward)
_FOLD_RATIO = 4


@dataclass(frozen=True)
class HeadsConfig:
    """Sizes of the scoring and mask heads (defaults: SAM 3 / EfficientSAM3 as built officially)."""

    d_model: int = 256
    d_proj: int = 256
    prompt_hidden: int = 2048
    n_heads: int = 8  # prompt cross-attention of the mask head (not visible in the weights)
    upsampling_stages: int = 3
    clamp_logits: float = 12.0


def mean_pool_prompt(prompt: Tensor, prompt_mask: Tensor | None) -> Tensor:
    """Mean of the valid tokens of ``prompt`` ``[S, B, d]`` (``prompt_mask`` ``[B, S]``, True = padding): ``[B, d]``."""
    if prompt_mask is None:
        return prompt.mean(dim=0)
    valid = (~prompt_mask).float().permute(1, 0)[..., None]  # [S, B, 1]
    count = torch.clamp(valid.sum(dim=0), min=1.0)
    return (prompt * valid).sum(dim=0) / count


class DotProductScoring(nn.Module):
    """Class logits of query states ``[L, B, Q, d]`` against a prompt ``[S, B, d]`` -> ``[L, B, Q, 1]``."""

    def __init__(self, d_model: int = 256, d_proj: int = 256, prompt_hidden: int = 2048,
                 clamp_logits: float | None = 12.0) -> None:
        super().__init__()
        self.prompt_mlp = MLP(d_model, prompt_hidden, d_model, 2, residual=True, out_norm=nn.LayerNorm(d_model))
        self.prompt_proj = nn.Linear(d_model, d_proj)
        self.hs_proj = nn.Linear(d_model, d_proj)
        self.scale = 1.0 / math.sqrt(d_proj)
        self.clamp_logits = clamp_logits

    def forward(self, hs: Tensor, prompt: Tensor, prompt_mask: Tensor | None) -> Tensor:
        pooled = mean_pool_prompt(self.prompt_mlp(prompt), prompt_mask)
        scores = torch.matmul(self.hs_proj(hs), self.prompt_proj(pooled).unsqueeze(-1)) * self.scale
        if self.clamp_logits is not None:
            scores = scores.clamp(-self.clamp_logits, self.clamp_logits)
        return scores


class PixelDecoder(nn.Module):
    """Top-down fusion of feature levels ``[B, d, H_i, W_i]`` (finest first) into the finest level's grid."""

    def __init__(self, hidden_dim: int = 256, num_upsampling_stages: int = 3) -> None:
        super().__init__()
        self.conv_layers = nn.ModuleList(nn.Conv2d(hidden_dim, hidden_dim, 3, 1, 1)
                                         for _ in range(num_upsampling_stages))
        self.norms = nn.ModuleList(nn.GroupNorm(8, hidden_dim) for _ in range(num_upsampling_stages))

    def forward(self, levels: Sequence[Tensor]) -> Tensor:
        # without autograd the sum and the ReLU reuse the fresh upsampled / normalised tensors (same values,
        # two fewer 85 MB buffers per stage at 288 x 288)
        inplace = not torch.is_grad_enabled()
        x = levels[-1]
        for i, level in enumerate(reversed(levels[:-1])):
            up = F.interpolate(x, size=level.shape[-2:], mode="nearest")
            x = up.add_(level) if inplace and up.shape == level.shape else level + up
            x = F.relu(self.norms[i](self.conv_layers[i](x)), inplace=inplace)
        return x


class _MaskPredictor(nn.Module):
    """Only for the key path ``mask_predictor.mask_embed.*``."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.mask_embed = MLP(d_model, d_model, d_model, 3)


@dataclass
class SegmentationOutput:
    pred_masks: Tensor  # [B, Q, H0, W0] mask logits at the finest neck level (288 x 288 for 1008 px)
    semantic_seg: Tensor | None  # [B, 1, H0, W0] when asked for


class UniversalSegmentationHead(nn.Module):
    """``detector.segmentation_head``: prompt cross-attention, pixel decoder, instance masks (see module doc)."""

    def __init__(self, d_model: int = 256, n_heads: int = 8, upsampling_stages: int = 3) -> None:
        super().__init__()
        self.pixel_decoder = PixelDecoder(d_model, upsampling_stages)
        self.mask_predictor = _MaskPredictor(d_model)
        self.cross_attend_prompt = nn.MultiheadAttention(d_model, n_heads)
        self.cross_attn_norm = nn.LayerNorm(d_model)
        self.semantic_seg_head = nn.Conv2d(d_model, 1, kernel_size=1)
        self.instance_seg_head = nn.Conv2d(d_model, d_model, kernel_size=1)

    def pixel_embeddings(self, fpn: Sequence[Tensor], memory: Tensor, prompt: Tensor,
                         prompt_mask: Tensor | None) -> Tensor:
        """Pixel-decoder output ``[B, d, H0, W0]`` from the neck levels (finest first) and the memory ``[HW, B, d]``
        of the coarsest level's grid."""
        attended = self.cross_attend_prompt(self.cross_attn_norm(memory), prompt, prompt,
                                            key_padding_mask=prompt_mask, need_weights=False)[0]
        memory = attended + memory
        coarse = fpn[-1]
        # contiguous NCHW (the permuted view is channels-last strided): the same values, a faster pixel decoder
        grid = memory.permute(1, 2, 0).reshape(-1, *coarse.shape[1:]).contiguous()
        return self.pixel_decoder([*fpn[:-1], grid])

    def forward(self, fpn: Sequence[Tensor], memory: Tensor, queries: Tensor, prompt: Tensor,
                prompt_mask: Tensor | None, semantic: bool = False,
                query_index: Tensor | None = None) -> SegmentationOutput:
        """Mask logits of the query states ``queries`` (``[B, Q, d]``, or ``[L, B, Q, d]``: the last layer is used).

        ``query_index`` (1-D, optional): only those queries get masks (``[B, len(query_index), H0, W0]``);
        a query's mask does not depend on the others, so the rows equal the full result's rows. With an
        empty index and ``semantic=False`` the pixel decoder (most of the head's cost) is skipped.
        """
        if queries.dim() == 4:
            queries = queries[-1]
        if query_index is not None:
            queries = queries[:, query_index.to(queries.device)]
            if not queries.shape[1] and not semantic:
                finest = fpn[0]
                empty = finest.new_zeros((finest.shape[0], 0, *finest.shape[-2:]))
                return SegmentationOutput(pred_masks=empty, semantic_seg=None)
        pixels = self.pixel_embeddings(fpn, memory, prompt, prompt_mask)
        embed = self.mask_predictor.mask_embed(queries)
        if query_index is not None and embed.shape[1] * _FOLD_RATIO <= embed.shape[2]:
            # few queries: fold the 1x1 ``instance_seg_head`` into their embeddings (e W) . p + e . b instead
            # of running it over every pixel; the same sums, added in another order
            weight = self.instance_seg_head.weight.flatten(1)  # [d_out, d_in]
            masks = torch.einsum("bqc,bchw->bqhw", embed @ weight, pixels)
            if self.instance_seg_head.bias is not None:
                masks = masks + (embed @ self.instance_seg_head.bias)[..., None, None]
        else:
            instance = self.instance_seg_head(pixels)
            masks = torch.einsum("bqc,bchw->bqhw", embed, instance)
        return SegmentationOutput(pred_masks=masks, semantic_seg=self.semantic_seg_head(pixels) if semantic else None)


def infer_heads_config(scoring: Mapping[str, Tensor], segmentation: Mapping[str, Tensor],
                       n_heads: int = 8) -> HeadsConfig:
    """Sizes from the scoring and mask-head state dicts (prefixes ``dot_prod_scoring.`` and
    ``segmentation_head.`` removed); the mask head's attention head count leaves no trace and is given."""
    hidden, d_model = scoring["prompt_mlp.layers.0.weight"].shape
    stages = len({k.split(".")[2] for k in segmentation if k.startswith("pixel_decoder.conv_layers.")})
    return HeadsConfig(d_model=int(d_model), d_proj=int(scoring["prompt_proj.weight"].shape[0]),
                       prompt_hidden=int(hidden), n_heads=n_heads, upsampling_stages=stages)
