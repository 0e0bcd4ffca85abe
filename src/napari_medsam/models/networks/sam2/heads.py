"""SAM 2's mask decoder: SAM's two-way transformer plus high-resolution skips and an object score.

Compared with the SAM-1 decoder (``..mask_decoder``), SAM 2's head

* prepends an *object-score* token to the IoU and mask tokens; a 3-layer MLP on its output says
  whether the object is visible at all (a logit > 0 means present);
* adds the stride-8 and stride-4 features of the image encoder (after ``conv_s1`` / ``conv_s0``,
  which the image encoder applies; they live here because the official checkpoints keep them
  here) to the outputs of the two transposed convolutions that upscale the image tokens;
* squashes the IoU predictions with a sigmoid;
* when one mask is asked for, falls back to the best of the three "ambiguity" masks if the
  single-mask output is unstable (its area changes much between logit thresholds -delta and
  +delta), as the official tracker does at inference;
* returns the mask-token outputs too: the video model turns one of them into the object pointer.

The two-way transformer has SAM-1's structure but is computed here in the reference's order of
operations, with the values of the "math" attention kernel that the official code selects: the
outputs then equal the official ones bit for bit on the CPU (the project's SAM-1 transformer,
which folds the token-image attentions for speed, differs by ~1e-7 relative in the mask tokens,
which the video model feeds back as object pointers; its MLP blocks are also named differently:
SAM 2 has ``mlp.layers.0/1``). At SAM 2's 32x32 image grid the plain form costs a few ms.
Parameter names follow the official checkpoints (``sam_mask_decoder.*``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..mask_decoder import _MLP
from ..mask_decoder import _Attention as _Sam1Attention
from ..vit import LayerNorm2d
from .memory import math_attention

__all__ = ["Sam2MaskDecoder", "stability_scores"]


class _Attention(_Sam1Attention):
    """The SAM 1 decoder's attention (same parameters) computed plainly, in the official order."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = math_attention(self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v)))
        batch, _, tokens, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, -1))


class _TwoWayBlock(nn.Module):
    """Token self-attention, tokens -> image, token MLP, image -> tokens; post-norm residuals."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, downsample: int, first: bool) -> None:
        super().__init__()
        self.first = first  # the first block's self-attention sees the raw tokens, without residual
        self.self_attn = _Attention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = _Attention(dim, num_heads, downsample)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _MLP(dim, mlp_dim, dim, 2)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = _Attention(dim, num_heads, downsample)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor,
                key_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.first:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class _TwoWayTransformer(nn.Module):
    """The two-way transformer of SAM's mask decoder, computed as the reference computes it."""

    def __init__(self, depth: int = 2, dim: int = 256, num_heads: int = 8, mlp_dim: int = 2048,
                 downsample: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_TwoWayBlock(dim, num_heads, mlp_dim, downsample, i == 0) for i in range(depth))
        self.final_attn_token_to_image = _Attention(dim, num_heads, downsample)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, image: torch.Tensor, image_pe: torch.Tensor,
                tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, h, w) image, (B, C, h, w) PE, (B, N, C) tokens -> tokens, (B, h*w, C) image tokens."""
        keys, key_pe = image.flatten(2).permute(0, 2, 1), image_pe.flatten(2).permute(0, 2, 1)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe)
        attn = self.final_attn_token_to_image(queries + tokens, keys + key_pe, keys)
        return self.norm_final_attn(queries + attn), keys


class _ScoreMLP(_MLP):
    """``_MLP`` optionally followed by a sigmoid (SAM 2's IoU head)."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int, num_layers: int, sigmoid: bool = False) -> None:
        super().__init__(dim_in, hidden, dim_out, num_layers)
        self.sigmoid = sigmoid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        return torch.sigmoid(x) if self.sigmoid else x


def stability_scores(mask_logits: torch.Tensor, delta: float) -> torch.Tensor:
    """Area above +delta over area above -delta per mask ((..., H, W) -> (...)); 1 where both are empty."""
    flat = mask_logits.flatten(-2)
    inner = (flat > delta).sum(dim=-1).float()
    outer = (flat > -delta).sum(dim=-1).float()
    return torch.where(outer > 0, inner / outer, 1.0)


class Sam2MaskDecoder(nn.Module):
    """Predict mask logits (4x the embedding grid), IoU scores, mask-token outputs and object scores."""

    def __init__(
        self,
        transformer_dim: int = 256,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        use_high_res_features: bool = True,
        iou_prediction_use_sigmoid: bool = True,
        pred_obj_scores: bool = True,
        pred_obj_scores_mlp: bool = True,
        use_multimask_token_for_obj_ptr: bool = True,
        dynamic_multimask_via_stability: bool = True,
        dynamic_multimask_stability_delta: float = 0.05,
        dynamic_multimask_stability_thresh: float = 0.98,
    ) -> None:
        super().__init__()
        dim = transformer_dim
        self.transformer_dim = dim
        self.num_multimask_outputs = num_multimask_outputs
        self.num_mask_tokens = num_multimask_outputs + 1
        # SAM 2 builds its two-way transformer with these fixed sizes for every model variant.
        self.transformer = _TwoWayTransformer(depth=2, dim=dim, num_heads=8, mlp_dim=2048)
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, dim)
        self.pred_obj_scores = pred_obj_scores
        if pred_obj_scores:
            self.obj_score_token = nn.Embedding(1, dim)
        self.use_multimask_token_for_obj_ptr = use_multimask_token_for_obj_ptr
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.use_high_res_features = use_high_res_features
        if use_high_res_features:
            # Applied by the image encoder to its stride-4 / stride-8 maps (not in this forward).
            self.conv_s0 = nn.Conv2d(dim, dim // 8, kernel_size=1)
            self.conv_s1 = nn.Conv2d(dim, dim // 4, kernel_size=1)
        self.output_hypernetworks_mlps = nn.ModuleList(
            _MLP(dim, dim, dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = _ScoreMLP(
            dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth, sigmoid=iou_prediction_use_sigmoid
        )
        if pred_obj_scores:
            self.pred_obj_score_head = _MLP(dim, dim, 1, 3) if pred_obj_scores_mlp else nn.Linear(dim, 1)
        self.dynamic_multimask_via_stability = dynamic_multimask_via_stability
        self.dynamic_multimask_stability_delta = dynamic_multimask_stability_delta
        self.dynamic_multimask_stability_thresh = dynamic_multimask_stability_thresh

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        repeat_image: bool,
        high_res_features: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (masks, iou_pred, sam_tokens_out, object_score_logits).

        ``image_embeddings`` (B, C, h, w) (or (1, C, h, w) with ``repeat_image``), ``image_pe``
        (1, C, h, w), prompts (B, N, C) and (B, C, h, w), ``high_res_features`` = [stride-4 map
        (B, C/8, 4h, 4w), stride-8 map (B, C/4, 2h, 2w)] when the decoder uses them.

        masks: (B, 3, 4h, 4w) with ``multimask_output``, else (B, 1, 4h, 4w): token 0's mask, or
        (stability fallback, eval mode) the best multimask output where token 0's is unstable;
        iou_pred likewise (B, 3) / (B, 1). sam_tokens_out: the three multimask token outputs
        (B, 3, C) when ``multimask_output`` and ``use_multimask_token_for_obj_ptr``, else token 0's
        (B, 1, C) -- even when the fallback picked another mask. object_score_logits: (B, 1).
        """
        masks, iou_pred, mask_tokens_out, object_score_logits = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, repeat_image,
            high_res_features,
        )
        if multimask_output:
            masks, iou_pred = masks[:, 1:], iou_pred[:, 1:]
        elif self.dynamic_multimask_via_stability and not self.training:
            masks, iou_pred = self._stable_or_best(masks, iou_pred)
        else:
            masks, iou_pred = masks[:, 0:1], iou_pred[:, 0:1]
        if multimask_output and self.use_multimask_token_for_obj_ptr:
            sam_tokens_out = mask_tokens_out[:, 1:]
        else:
            sam_tokens_out = mask_tokens_out[:, 0:1]
        return masks, iou_pred, sam_tokens_out, object_score_logits

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        repeat_image: bool,
        high_res_features: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """All outputs: masks (B, 4, 4h, 4w), IoU (B, 4), mask tokens (B, 4, C), object scores (B, 1)."""
        batch = sparse_prompt_embeddings.shape[0]
        # Output tokens: [object score,] IoU, mask 0..3; ``first`` is the IoU token's index.
        learned = [self.iou_token.weight, self.mask_tokens.weight]
        first = 0
        if self.pred_obj_scores:
            learned.insert(0, self.obj_score_token.weight)
            first = 1
        out_tokens = torch.cat(learned, dim=0)
        tokens = torch.cat((out_tokens.unsqueeze(0).expand(batch, -1, -1), sparse_prompt_embeddings), dim=1)

        if repeat_image:
            image_embeddings = torch.repeat_interleave(image_embeddings, batch, dim=0)
        elif image_embeddings.shape[0] != batch:
            raise ValueError(f"{image_embeddings.shape[0]} image embeddings for {batch} prompts (repeat_image=False)")
        if image_pe.shape[0] != 1:
            raise ValueError("image_pe must have batch size 1 (as from PromptEncoder.get_dense_pe())")
        src = image_embeddings + dense_prompt_embeddings
        _, chans, height, width = src.shape
        hs, keys = self.transformer(src, image_pe.expand(batch, -1, -1, -1), tokens)
        iou_token_out = hs[:, first]
        mask_tokens_out = hs[:, first + 1 : first + 1 + self.num_mask_tokens]

        image = keys.transpose(1, 2).view(batch, chans, height, width)
        up1, norm, act1, up2, act2 = self.output_upscaling
        if self.use_high_res_features:
            if high_res_features is None:
                raise ValueError("this decoder needs high_res_features (stride-4 and stride-8 maps)")
            feat_s0, feat_s1 = high_res_features
            upscaled = act2(up2(act1(norm(up1(image) + feat_s1))) + feat_s0)
        else:
            upscaled = self.output_upscaling(image)

        hyper = torch.stack(
            [mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        b, c, h, w = upscaled.shape
        masks = (hyper @ upscaled.view(b, c, h * w)).view(b, -1, h, w)

        iou_pred = self.iou_prediction_head(iou_token_out)
        if self.pred_obj_scores:
            object_score_logits = self.pred_obj_score_head(hs[:, 0])
        else:
            # Without a score head the object counts as present (sigmoid(10) ~ 1).
            object_score_logits = iou_pred.new_full((iou_pred.shape[0], 1), 10.0)
        return masks, iou_pred, mask_tokens_out, object_score_logits

    def _stable_or_best(self, masks: torch.Tensor, iou_pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token 0's mask where it is stable, else the multimask output with the highest predicted IoU."""
        rows = torch.arange(masks.shape[0], device=masks.device)
        best = torch.argmax(iou_pred[:, 1:], dim=-1) + 1
        stable = stability_scores(masks[:, 0], self.dynamic_multimask_stability_delta)
        stable = stable >= self.dynamic_multimask_stability_thresh  # (B,)
        chosen = torch.where(stable, torch.zeros_like(best), best)
        return masks[rows, chosen].unsqueeze(1), iou_pred[rows, chosen].unsqueeze(1)
