"""SAM's mask decoder: a two-way transformer between prompt tokens and image tokens.

Output tokens (one IoU token, four mask tokens) are concatenated with the sparse prompt
embeddings. Two transformer blocks let tokens attend to themselves, tokens attend to the image,
and the image attend to the tokens; a final token-to-image attention follows. The image tokens
are upscaled 4x by transposed convolutions, and each mask token, passed through its own MLP,
gives per-pixel mask logits by a dot product with the upscaled features. Names follow the
official checkpoints (``mask_decoder.*``).

Speed (CPU, one prompt): the attentions between the few prompt tokens and the h*w image tokens
fold the image-side projections into the token side (the same sums, grouped differently, so
results agree to float rounding); the final attention and the hypernetworks run only for the
tokens whose output is returned; the 2x2 stride-2 transposed convolutions run as matrix products
on the token layout. Image tokens stay (B, h*w, C) contiguous and, on the CPU, every per-token
step runs in blocks of image tokens: whole-image temporaries (4-8 MB each) cost thousands of
page faults per call, while block-sized ones stay in cache and their memory is reused. Measured
on 2 CPU cores: ~45 ms -> ~16 ms per single-mask call with a 64x64 embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .vit import LayerNorm2d

__all__ = ["MaskDecoder", "TwoWayTransformer"]

_BLOCK = 512  # image tokens per block of the per-token steps (512 measured best on 2 cores)


def _tokens(image: torch.Tensor, own: bool = False) -> torch.Tensor:
    """(B, C, h, w) -> contiguous (B, h*w, C); a view for a channels-last tensor unless ``own``."""
    tokens = image.flatten(2).transpose(1, 2)
    if tokens.is_contiguous():
        return tokens.clone() if own else tokens
    batch, chans = image.shape[:2]
    out = torch.empty(tokens.shape, dtype=image.dtype, device=image.device)
    for i in range(batch):
        # A 2-D transposed copy takes torch's blocked-transpose path (~3x faster than 3-D).
        out[i].copy_(image[i].reshape(chans, -1).t())
    return out


def _blocks(count: int, device: torch.device):
    """Slices of at most ``_BLOCK`` image tokens covering 0..count; one slice off the CPU."""
    # Blocks serve CPU caches and malloc; on a GPU they would only multiply kernel launches. Under
    # autograd (decoder fine-tuning) each block's backward fills and copies a whole-size gradient:
    # measured ~4x slower steps on 2 cores, so training runs one block (the same arithmetic).
    size = _BLOCK if device.type == "cpu" and not torch.is_grad_enabled() else max(count, 1)
    return (slice(start, min(start + size, count)) for start in range(0, count, size))


class _Attention(nn.Module):
    """Multi-head attention with separate q/k/v projections, optionally to a narrower width.

    Besides the plain ``forward`` (used among the prompt tokens), two folded forms serve the
    attentions between a few tokens and the many image tokens without projecting the image
    tokens: ``tokens_to_image`` and ``fold_tokens`` + ``image_to_tokens``.
    """

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
        """Plain attention: (B, Nq, C) queries over (B, Nk, C) keys/values -> (B, Nq, C)."""
        out = F.scaled_dot_product_attention(
            self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        )
        batch, _, tokens, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, -1))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, width) -> (B, N, heads, head_dim)."""
        return x.view(x.shape[0], x.shape[1], self.num_heads, -1)

    def _head_weights(self, linear: nn.Linear) -> torch.Tensor:
        """(heads, head_dim, C) view of a projection to the attention width."""
        return linear.weight.view(self.num_heads, -1, linear.in_features)

    def tokens_to_image(
        self, q: torch.Tensor, image: torch.Tensor, image_pe: torch.Tensor, values: torch.Tensor
    ) -> torch.Tensor:
        """``forward(q, image + image_pe, values)`` for few queries (B, N, C) over (B, T, C), T >> N.

        Per head, q.(Wk y + bk) = (Wk^T q).y + q.bk, and q.bk is the same for every key, so
        softmax ignores it; the weights sum to one, so sum_j p_j (Wv y_j + bv) = Wv (sum_j p_j y_j)
        + bv. Two (heads*N x C x T) products thus replace two (T x C x width) projections.
        """
        batch, count, dim = q.shape
        head_dim = self.q_proj.out_features // self.num_heads
        query = self._split(self.q_proj(q)) * head_dim**-0.5
        folded = torch.einsum("bnhd,hdc->bhnc", query, self._head_weights(self.k_proj)).reshape(batch, -1, dim)
        scores = q.new_empty((batch, folded.shape[1], image.shape[1]))
        for part in _blocks(image.shape[1], image.device):
            scores[:, :, part] = torch.matmul(folded, (image[:, part] + image_pe[:, part]).transpose(1, 2))
        mixed = torch.matmul(torch.softmax(scores, dim=-1), values).view(batch, self.num_heads, count, -1)
        out = torch.einsum("bhnc,hdc->bnhd", mixed, self._head_weights(self.v_proj))
        return self.out_proj(out.reshape(batch, count, -1) + self.v_proj.bias)

    def fold_tokens(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Few keys/values (B, N, C) -> what ``image_to_tokens`` needs: (B, hN, C), (B, hN, 1), (B, hN, C).

        Per head, (Wq x + bq).k = x.(Wq^T k) + bq.k, and the output projection distributes over
        the softmax-weighted sum of values: Wo [sum_n p_hn v_hn]_h = sum_hn p_hn (Wo_h v_hn).
        """
        batch, _, dim = k.shape
        head_dim = self.q_proj.out_features // self.num_heads
        key = self._split(self.k_proj(k)) * head_dim**-0.5
        folded = torch.einsum("bnhd,hdc->bhnc", key, self._head_weights(self.q_proj)).reshape(batch, -1, dim)
        offset = torch.einsum("bnhd,hd->bhn", key, self.q_proj.bias.view(self.num_heads, -1)).reshape(batch, -1, 1)
        out_weight = self.out_proj.weight.view(dim, self.num_heads, -1)
        spread = torch.einsum("bnhd,chd->bhnc", self._split(self.v_proj(v)), out_weight).reshape(batch, -1, dim)
        return folded, offset, spread

    def image_to_tokens(self, q: torch.Tensor, folded: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``forward(q, k, v)`` for image queries (B, n, C), given ``folded = fold_tokens(k, v)``."""
        keys, offset, spread = folded
        scores = torch.baddbmm(offset, keys, q.transpose(1, 2))  # (B, heads*N, n)
        # Softmax over the N keys of each head: a reduction across rows, contiguous along n.
        probs = torch.softmax(scores.view(q.shape[0], self.num_heads, -1, q.shape[1]), dim=2)
        return torch.baddbmm(self.out_proj.bias, probs.view(scores.shape).transpose(1, 2), spread)


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

        q = queries + query_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image.tokens_to_image(q, keys, key_pe, keys))
        queries = self.norm3(queries + self.mlp(queries))

        folded = self.cross_attn_image_to_token.fold_tokens(queries + query_pe, queries)
        # Without autograd the image tokens are updated in place (block by block; each block
        # reads only itself): a fresh 4 MB buffer per layer costs ~1000 page faults.
        updated = keys if not torch.is_grad_enabled() else torch.empty_like(keys)
        for part in _blocks(keys.shape[1], keys.device):
            image = keys[:, part]
            attn = self.cross_attn_image_to_token.image_to_tokens(image + key_pe[:, part], folded)
            updated[:, part] = self.norm4(attn.add_(image))
        return queries, updated


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
        return self.run_tokens(_tokens(image_embedding, own=True), _tokens(image_pe), point_embedding)

    def run_tokens(
        self, keys: torch.Tensor, key_pe: torch.Tensor, point_embedding: torch.Tensor, keep: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` on (B, h*w, C) image tokens; ``keep`` = only the first ``keep`` tokens' outputs.

        Without autograd ``keys`` is overwritten (it becomes the returned image tokens).
        """
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        if keep is not None:
            # Token outputs are independent in the last attention: skip the unused ones.
            queries, point_embedding = queries[:, :keep], point_embedding[:, :keep]
        attn = self.final_attn_token_to_image.tokens_to_image(queries + point_embedding, keys, key_pe, keys)
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
        # Multimask mode returns the three "ambiguity" masks; single mode the first token's mask.
        chosen = slice(1, self.num_mask_tokens) if multimask_output else slice(0, 1)
        return self._predict(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, chosen)

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All mask-token outputs: (B, 4, 4h, 4w) logits and (B, 4) IoU predictions."""
        return self._predict(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
            slice(0, self.num_mask_tokens),
        )

    def _predict(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        chosen: slice,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and IoU predictions of the mask tokens ``chosen`` (a slice of 0..3)."""
        batch = sparse_prompt_embeddings.shape[0]
        out_tokens = torch.cat((self.iou_token.weight, self.mask_tokens.weight), dim=0)
        tokens = torch.cat((out_tokens.unsqueeze(0).expand(batch, -1, -1), sparse_prompt_embeddings), dim=1)

        # One image embedding serves a whole batch of prompts: broadcast instead of copying it.
        if image_embeddings.shape[0] not in (1, batch):
            raise ValueError(
                f"{image_embeddings.shape[0]} image embeddings for {batch} prompts; "
                "give one embedding or one per prompt"
            )
        dense = dense_prompt_embeddings
        height, width = image_embeddings.shape[-2:]
        if dense.shape[-2:] == (height, width) and dense.stride(-1) == dense.stride(-2) == 0:
            # A dense prompt constant over the grid (the broadcast no-mask embedding) is added
            # after the change of layout: one pass over the image tokens instead of two.
            keys = _tokens(image_embeddings.expand(batch, -1, -1, -1), own=True)
            keys += dense[:, :, 0, 0].unsqueeze(1)
        else:
            src = image_embeddings + dense  # a fresh tensor: the transformer may update it in place
            keys = _tokens(src.expand(batch, -1, -1, -1))
        hs, keys = self.transformer.run_tokens(keys, _tokens(image_pe), tokens, keep=1 + chosen.stop)

        iou = self.iou_prediction_head(hs[:, 0, :])
        hyper = torch.stack(
            [self.output_hypernetworks_mlps[i](hs[:, 1 + i, :]) for i in range(chosen.start, chosen.stop)], dim=1
        )
        return self._masks(keys, hyper, height, width), iou[:, chosen]

    def _masks(self, keys: torch.Tensor, hyper: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, h*w, C) image tokens and (B, K, C/8) mask vectors -> (B, K, 4h, 4w) logits.

        A 2x2 stride-2 transposed convolution turns each input pixel into its own 2x2 block, so
        it is one matrix product per pixel; rows stay pixels (in token order) and the output
        columns are (row offset, column offset, channel), which keeps LayerNorm2d's channels
        contiguous. Only the final logits are rearranged into image order.
        """
        up1, norm, act1, up2, act2 = self.output_upscaling
        batch, count, chans = keys.shape
        mid, low = up1.out_channels, up2.out_channels
        weight1, bias1 = up1.weight.permute(0, 2, 3, 1).reshape(chans, 4 * mid), up1.bias.repeat(4)
        weight2, bias2 = up2.weight.permute(0, 2, 3, 1).reshape(mid, 4 * low), up2.bias.repeat(4)
        masks = hyper.shape[1]
        logits = keys.new_empty((batch, count * 16, masks))
        for b in range(batch):
            vectors = hyper[b].t()
            for part in _blocks(count, keys.device):
                x = torch.addmm(bias1, keys[b, part], weight1).view(-1, mid)
                x = F.gelu(F.layer_norm(x, (mid,), norm.weight, norm.bias, norm.eps), approximate=act1.approximate)
                x = F.gelu(torch.addmm(bias2, x, weight2), approximate=act2.approximate)
                logits[b, 16 * part.start : 16 * part.stop] = x.view(-1, low) @ vectors
        # (B, row, col, dy1, dx1, dy2, dx2, K) -> (B, K, row, dy1, dy2, col, dx1, dx2)
        logits = logits.view(batch, height, width, 2, 2, 2, 2, masks).permute(0, 7, 1, 3, 5, 2, 4, 6)
        return logits.reshape(batch, masks, 4 * height, 4 * width)
