"""SAM's mask decoder: a two-way transformer between prompt tokens and image tokens.

Output tokens (one IoU token, four mask tokens) are concatenated with the sparse prompt
embeddings. Two transformer blocks let tokens attend to themselves, tokens attend to the image,
and the image attend to the tokens; a final token-to-image attention follows. The image tokens
are upscaled 4x by transposed convolutions, and each mask token, passed through its own MLP,
gives per-pixel mask logits by a dot product with the upscaled features. Names follow the
official checkpoints (``mask_decoder.*``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .vit import LayerNorm2d

__all__ = ["MaskDecoder", "TwoWayTransformer"]


class _Attention(nn.Module):
    """Multi-head attention with separate q/k/v projections, optionally to a narrower width."""

    def __init__(self, dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        inner = dim // downsample_rate
        if inner % num_heads:
            raise ValueError(f"attention width {inner} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, inner)
        self.k_proj = nn.Linear(dim, inner)
        self.v_proj = nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        return x.reshape(batch, tokens, self.num_heads, width // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = F.scaled_dot_product_attention(
            self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        )
        batch, _, tokens, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, -1))


class _MLPBlock(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class _TwoWayBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_dim: int, downsample: int, first: bool) -> None:
        super().__init__()
        self.first = first  # the first block sees raw tokens (no PE, no residual) in self-attention
        self.self_attn = _Attention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = _Attention(dim, num_heads, downsample)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _MLPBlock(dim, mlp_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = _Attention(dim, num_heads, downsample)

    def forward(
        self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor, key_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.first:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        keys_pe = keys + key_pe
        q = queries + query_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, keys_pe, keys))
        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(keys_pe, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """Token <-> image transformer of the SAM mask decoder."""

    def __init__(
        self, depth: int = 2, embedding_dim: int = 256, num_heads: int = 8, mlp_dim: int = 2048,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            _TwoWayBlock(embedding_dim, num_heads, mlp_dim, attention_downsample_rate, first=i == 0)
            for i in range(depth)
        )
        self.final_attn_token_to_image = _Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(
        self, image_embedding: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, h, w) image, (B, C, h, w) PE, (B, N, C) tokens -> updated tokens and image tokens."""
        keys = image_embedding.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        attn = self.final_attn_token_to_image(queries + point_embedding, keys + key_pe, keys)
        return self.norm_final_attn(queries + attn), keys


class _MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (SAM's hypernetwork / IoU head MLP)."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int, num_layers: int) -> None:
        super().__init__()
        widths = [dim_in] + [hidden] * (num_layers - 1) + [dim_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = F.relu(x)
        return x


class MaskDecoder(nn.Module):
    """Predict mask logits (at 4x the embedding grid) and IoU scores from embeddings and prompts."""

    def __init__(
        self,
        transformer_dim: int = 256,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        transformer_depth: int = 2,
        transformer_heads: int = 8,
        transformer_mlp_dim: int = 2048,
    ) -> None:
        super().__init__()
        self.num_mask_tokens = num_multimask_outputs + 1
        self.transformer = TwoWayTransformer(
            transformer_depth, transformer_dim, transformer_heads, transformer_mlp_dim
        )
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            _MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = _MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (B, M, 4h, 4w) mask logits and (B, M) IoU predictions; M = 3 or 1."""
        masks, iou = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        # Multimask mode returns the three "ambiguity" masks; single mode the first token's mask.
        chosen = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, chosen], iou[:, chosen]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All mask-token outputs: (B, 4, 4h, 4w) logits and (B, 4) IoU predictions."""
        batch = sparse_prompt_embeddings.shape[0]
        out_tokens = torch.cat((self.iou_token.weight, self.mask_tokens.weight), dim=0)
        tokens = torch.cat((out_tokens.unsqueeze(0).expand(batch, -1, -1), sparse_prompt_embeddings), dim=1)

        # One image embedding serves a whole batch of prompts: broadcast instead of copying it.
        if image_embeddings.shape[0] != batch:
            if image_embeddings.shape[0] != 1:
                raise ValueError(
                    f"{image_embeddings.shape[0]} image embeddings for {batch} prompts; "
                    "give one embedding or one per prompt"
                )
            image_embeddings = image_embeddings.expand(batch, -1, -1, -1)
        src = image_embeddings + dense_prompt_embeddings
        pos = image_pe.expand(batch, -1, -1, -1)
        _, chans, height, width = src.shape

        hs, src_tokens = self.transformer(src, pos, tokens)
        iou_out = hs[:, 0, :]
        mask_out = hs[:, 1 : 1 + self.num_mask_tokens, :]

        fmap = src_tokens.transpose(1, 2).reshape(batch, chans, height, width)
        upscaled = self.output_upscaling(fmap)
        hyper = torch.stack(
            [mlp(mask_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        b, c, h, w = upscaled.shape
        masks = (hyper @ upscaled.reshape(b, c, h * w)).view(b, -1, h, w)
        return masks, self.iou_prediction_head(iou_out)
