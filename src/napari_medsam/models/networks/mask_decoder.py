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

Many prompts on one embedding (SAM's automatic mask generator): ``share_image`` once per
embedding, then ``decode_points`` per batch of single-point prompts. The first block's image-side
projections are shared by all prompts; with SAM's two blocks the image tokens are never formed per
prompt at all (they stay "shared tokens + a rank-56 update" through both LayerNorms, see
``_share_factors``), and only the masks whose predicted IoU passes a threshold are upscaled.
``forward`` does not use this path; interactive prompts take it on a slice the app has prepared
(``SamModel.prepare_prompts``: ``share_image`` once per slice, then ``decode_points`` per prompt).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .fused import gelu_fresh
from .vit import _SOFTMAX_OUT, LayerNorm2d

__all__ = ["MaskDecoder", "PointMasks", "SharedImage", "TwoWayTransformer"]

_BLOCK = 512  # image tokens per block of the per-token steps (512 measured best on 2 cores)
_GROUP = 4  # prompts decoded together by ``decode_points`` (they share each read of the shared factors)


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


@dataclass
class SharedImage:
    """What every prompt on one image embedding shares: made once by :meth:`MaskDecoder.share_image`.

    In the first transformer block the image tokens (embedding + the no-mask dense embedding) and
    their positional encoding are the same for every prompt, so the image-side projections of its
    two cross attentions are computed once here; per prompt only the head-sized products remain.
    """

    keys: torch.Tensor  # (1, T, C) image tokens + dense embedding
    key_pe: torch.Tensor  # (1, T, C)
    keys_out: torch.Tensor  # (T, C) keys + the first block's image-to-token output bias
    t2i_keys: torch.Tensor  # (heads, d, T) first token-to-image keys, projected
    t2i_values: torch.Tensor  # (heads, T, d) first token-to-image values, projected
    i2t_queries: torch.Tensor  # (heads, T, d) first image-to-token queries, projected and scaled
    height: int
    width: int
    factors: dict[str, torch.Tensor] | None = None  # shared terms of the low-rank path (two blocks)


@dataclass
class PointMasks:
    """Result of :meth:`MaskDecoder.decode_points`: every prompt's IoU, logits of the survivors only."""

    iou: torch.Tensor  # (B, M) predicted IoU of every mask of every prompt
    keep: torch.Tensor  # (K,) int64 flat indices into iou.reshape(-1) of the masks decoded to logits
    logits: torch.Tensor  # (K, 4h, 4w) mask logits of those masks


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

    # ------------------------------------------------------------------ many prompts on one image
    @torch.no_grad()
    def share_image(
        self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, dense_prompt_embeddings: torch.Tensor
    ) -> SharedImage:
        """Prepare one (1, C, h, w) embedding for :meth:`decode_points` (dense: the no-mask embedding, broadcast)."""
        if image_embeddings.shape[0] != 1:
            raise ValueError("share_image takes one image embedding")
        height, width = image_embeddings.shape[-2:]
        keys = _tokens((image_embeddings + dense_prompt_embeddings[:1]).contiguous(), own=True)
        key_pe = _tokens(image_pe).contiguous()
        first = self.transformer.layers[0]
        t2i, i2t = first.cross_attn_token_to_image, first.cross_attn_image_to_token
        heads = t2i.num_heads
        with_pe = keys[0] + key_pe[0]

        def split(x: torch.Tensor) -> torch.Tensor:  # (T, width) -> (heads, T, d)
            return x.view(x.shape[0], heads, -1).transpose(0, 1).contiguous()

        head_dim = i2t.q_proj.out_features // heads
        i2t_queries = split(i2t.q_proj(with_pe) * head_dim**-0.5)
        factors = None
        if len(self.transformer.layers) == 2:
            factors = self._share_factors(keys[0], key_pe[0])
            factors["i2t_queries"] = i2t_queries.transpose(1, 2).contiguous()
        return SharedImage(
            keys=keys, key_pe=key_pe, keys_out=keys[0] + i2t.out_proj.bias,
            t2i_keys=split(t2i.k_proj(with_pe)).transpose(1, 2).contiguous(),
            t2i_values=split(t2i.v_proj(keys[0])),
            i2t_queries=i2t_queries, height=int(height), width=int(width), factors=factors,
        )

    def _share_factors(self, keys: torch.Tensor, key_pe: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-embedding terms of the low-rank path (see ``_decode_low_rank``); (T, C) image tokens and PE.

        After the first block an image token is LN(x_i + bo + P_i S): a shared vector plus a rank-56
        update (P_i: the token's attention over the 8 heads x 7 prompt tokens, S: their values
        through the output projection). Every later use of the image tokens is a product with few
        vectors per head, so it splits into shared (T, 16)-per-head products computed here, small
        (T, 56) products per prompt, and the LayerNorm's per-token mean and scale, which follow from
        the same pieces (the Gram matrices of the updates). The image tokens themselves are never
        formed, except for the masks that are upscaled.
        """
        first, second = self.transformer.layers
        final = self.transformer.final_attn_token_to_image
        heads = first.cross_attn_image_to_token.num_heads

        def center(x: torch.Tensor) -> torch.Tensor:
            return x - x.mean(-1, keepdim=True)

        def by_head(x: torch.Tensor) -> torch.Tensor:  # (T, heads*d) -> (heads, d, T)
            return x.view(x.shape[0], heads, -1).permute(1, 2, 0).contiguous()

        def per_head(x: torch.Tensor) -> torch.Tensor:  # (T, heads*d) -> (heads, T, d)
            return x.view(x.shape[0], heads, -1).transpose(0, 1).contiguous()

        i2t0 = first.cross_attn_image_to_token
        t2i, i2t = second.cross_attn_token_to_image, second.cross_attn_image_to_token
        out1 = i2t0.out_proj.weight  # (C, width)
        g1, b1, g2, b2 = first.norm4.weight, first.norm4.bias, second.norm4.weight, second.norm4.bias
        xc = center(keys + i2t0.out_proj.bias)  # block 1's pre-norm tokens before the update, centred
        a = g1 * xc
        ac = center(a)
        c0 = center(b1 + i2t.out_proj.bias)
        # R_hn = (S_hn - mean) * g1 = W'_h v_hn: the update's rows in block 2's frame.
        w_prime = g1[:, None] * (out1 - out1.mean(0, keepdim=True))
        b1pe, b2pe = key_pe + b1, key_pe + b2
        g2ac = g2 * ac
        return {
            "xx": (xc * xc).sum(-1), "xc_out1": by_head(xc @ out1),
            "ak": by_head(a @ t2i.k_proj.weight.t()), "bk": by_head(b1pe @ t2i.k_proj.weight.t()),
            "av": per_head(a @ t2i.v_proj.weight.t()),
            "aq": by_head(a @ i2t.q_proj.weight.t()),
            "bq": by_head(torch.addmm(i2t.q_proj.bias, b1pe, i2t.q_proj.weight.t())),
            "aa": (ac * ac).sum(-1), "ac_w": by_head(ac @ w_prime), "ac_out2": by_head(ac @ i2t.out_proj.weight),
            "ac_c0": ac @ c0, "c0": c0,
            "ak3": by_head(g2ac @ final.k_proj.weight.t()), "bk3": by_head(b2pe @ final.k_proj.weight.t()),
            "av3": per_head(g2ac @ final.v_proj.weight.t()),
            # The image tokens are only formed to be upscaled, and the first transposed convolution
            # is linear: its product with the shared part is shared too (see ``_decode_low_rank``).
            "g2ac_up1": g2ac @ self._upscale_weights()[0],
        }

    @torch.no_grad()
    def decode_points(
        self, shared: SharedImage, sparse_prompt_embeddings: torch.Tensor, multimask_output: bool = True,
        iou_threshold: float | None = None,
    ) -> PointMasks:
        """Many prompts (B, N, C) on one shared embedding, no dense (mask) prompt: SAM's automatic generator.

        Equals ``forward`` (up to float rounding) for the masks it returns, but the image-side work of
        the first block is shared (see :class:`SharedImage`) and the costly part of the output, the
        upscaling of the image tokens and the hypernetworks, runs only for the masks whose predicted
        IoU exceeds ``iou_threshold`` (all masks when it is None); the prompts run in groups of
        ``_GROUP`` (one at a time without the low-rank factors), so no temporary grows with the batch.
        """
        chosen = slice(1, self.num_mask_tokens) if multimask_output else slice(0, 1)
        batch = sparse_prompt_embeddings.shape[0]
        out_tokens = torch.cat((self.iou_token.weight, self.mask_tokens.weight), dim=0)
        # The final attention needs the IoU token and the chosen mask tokens only.
        final = torch.tensor([0] + [1 + i for i in range(chosen.start, chosen.stop)], device=out_tokens.device)
        ious, keeps, logits = [], [], []
        work = torch.empty_like(shared.keys)
        step = _GROUP if shared.factors is not None else 1
        for first in range(0, batch, step):
            tokens = torch.cat((out_tokens.expand(min(step, batch - first), -1, -1),
                                sparse_prompt_embeddings[first:first + step]), dim=1)
            if shared.factors is not None:
                hs, image_tokens = self._decode_low_rank(shared, tokens, final)
            else:
                hs, image_tokens = self._decode_dense(shared, tokens, final, work)
            group_iou = self.iou_prediction_head(hs[:, 0])[:, chosen]
            for j, iou in enumerate(group_iou):
                ious.append(iou)
                alive = torch.arange(iou.shape[0], device=iou.device)
                if iou_threshold is not None:
                    alive = alive[iou > iou_threshold]
                if alive.numel():
                    hyper = torch.stack(
                        [self.output_hypernetworks_mlps[chosen.start + int(i)](hs[j, 1 + int(i)]) for i in alive]
                    ).unsqueeze(0)
                    logits.append(self._masks(image_tokens(j), hyper, shared.height, shared.width)[0])
                    keeps.append(alive + (first + j) * iou.shape[0])
        size = (4 * shared.height, 4 * shared.width)
        return PointMasks(
            iou=torch.stack(ious) if ious else out_tokens.new_empty((0, chosen.stop - chosen.start)),
            keep=torch.cat(keeps) if keeps else torch.zeros(0, dtype=torch.int64, device=out_tokens.device),
            logits=torch.cat(logits) if logits else out_tokens.new_empty((0, *size)),
        )

    def _decode_dense(self, shared: SharedImage, tokens: torch.Tensor, final: torch.Tensor, work: torch.Tensor):
        """One prompt through the transformer with the image tokens formed: (hs of ``final``, image tokens getter)."""
        queries, keys = self._first_block(shared, tokens, work)
        for layer in self.transformer.layers[1:]:
            queries, keys = layer(queries, keys, tokens, shared.key_pe)
        queries, pe = queries[:, final], tokens[:, final]
        attn = self.transformer.final_attn_token_to_image.tokens_to_image(queries + pe, keys, shared.key_pe, keys)
        return self.transformer.norm_final_attn(queries + attn), lambda j: keys

    def _decode_low_rank(self, shared: SharedImage, tokens: torch.Tensor, final: torch.Tensor):
        """G prompts (G, N, C) through a two-block transformer without forming image tokens (``_share_factors``).

        Notation per image token i: after block 1 the tokens are r_i (A_i + a_i R) + b1 with A the
        shared (gain-scaled, centred) tokens, r_i the LayerNorm's 1/std, a_i = r_i P1_i with P1_i
        the token's attention over the 56 (head, prompt token) pairs, R their updates; after block
        2's image-to-token attention the centred pre-norm tokens are r_i Ac_i + [a_i, b_i] Y0 + c0
        (b_i = P2_i, Y0 = [Rc; S2c]). The G prompts share each product with a shared factor (one
        read of it for all). Returns the (G, M, C) outputs of the tokens ``final`` and a function
        giving prompt j's image tokens through the first upscaling product for a slice of token rows
        (what ``_masks`` takes instead of tokens).
        """
        f = shared.factors
        first, second = self.transformer.layers
        last = self.transformer.final_attn_token_to_image
        heads = first.cross_attn_image_to_token.num_heads
        group, count, dim = tokens.shape
        pairs, size = heads * count, f["xx"].shape[0]

        def split(x: torch.Tensor) -> torch.Tensor:  # (G, n, width) -> (G, heads, n, d)
            return x.view(group, x.shape[1], heads, -1).transpose(1, 2)

        def with_shared(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
            """(G, heads, n, d) by a shared (heads, d, T) factor -> (G, heads*n, T)."""
            n, d = x.shape[2], x.shape[3]
            out = torch.bmm(x.transpose(0, 1).reshape(heads, group * n, d), factor)
            return out.view(heads, group, n, size).transpose(0, 1).reshape(group, heads * n, size)

        def mix(weights: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
            """(G, heads*n, T) weights over a shared (heads, T, d) factor -> (G, heads, n, d)."""
            n = weights.shape[1] // heads
            out = torch.bmm(weights.view(group, heads, n, size).transpose(0, 1).reshape(heads, group * n, size), factor)
            return out.view(heads, group, n, -1).transpose(0, 1)

        def fold(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:  # (G, heads, n, d) -> (G, heads*n, C)
            return torch.matmul(x, linear.weight.view(heads, -1, dim)).reshape(group, -1, dim)

        def spread(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:  # values through the output projection
            return torch.matmul(x, linear.weight.view(dim, heads, -1).permute(1, 2, 0)).reshape(group, -1, dim)

        def head_blocks(x: torch.Tensor, rows: int) -> torch.Tensor:  # (G, heads*n, heads*d) -> (G, heads, n, d)
            return x.view(group, heads, rows, heads, -1).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)

        def scale(attn: _Attention) -> float:
            return (attn.q_proj.out_features // heads) ** -0.5

        def t(x: torch.Tensor) -> torch.Tensor:
            return x.transpose(1, 2)

        # Block 1, token side (as _first_block), then its image-to-token attention P1 (G, pairs, T).
        queries = first.norm1(first.self_attn(tokens, tokens, tokens))
        t2i0, i2t0 = first.cross_attn_token_to_image, first.cross_attn_image_to_token
        query = split(t2i0.q_proj(queries + tokens)) * scale(t2i0)
        probs = torch.softmax(with_shared(query, shared.t2i_keys), dim=-1)
        mixed = mix(probs, shared.t2i_values).transpose(1, 2).reshape(group, count, -1)
        queries = first.norm2(queries + t2i0.out_proj(mixed))
        queries = first.norm3(queries + first.mlp(queries))
        key = split(i2t0.k_proj(queries + tokens))
        p1 = torch.softmax(with_shared(key, f["i2t_queries"]).view(group, heads, count, size), dim=2)
        p1 = p1.reshape(group, pairs, size)
        value1 = split(i2t0.v_proj(queries))
        s1c = spread(value1, i2t0.out_proj)
        s1c = s1c - s1c.mean(-1, keepdim=True)
        # |Xc_i + P1_i S1c|^2 = |Xc_i|^2 + P1_i . (2 S1 Xc_i + (S1c S1c^T) P1_i)
        terms = with_shared(value1, f["xc_out1"]).mul_(2).baddbmm_(s1c @ t(s1c), p1)
        r = torch.rsqrt(terms.mul_(p1).sum(1).add_(f["xx"]).div_(dim).add_(first.norm4.eps))  # (G, T)
        r_col = r.unsqueeze(1)
        rows = s1c * first.norm4.weight  # R
        # The coefficients [a, b] of the updates (G, 2 * pairs, T): a = r P1 now, b = P2 below.
        coeffs = p1.new_empty((group, 2 * pairs, size))
        a = torch.mul(p1, r_col, out=coeffs[:, :pairs])

        def scores_of(query: torch.Tensor, shared_a: torch.Tensor, shared_b: torch.Tensor, folded: torch.Tensor):
            """query . (W (r (A + a R) + b1 + pe)) for (G, heads, n, d) queries; ``folded`` = W-folded queries."""
            out = with_shared(query, shared_b).baddbmm_(folded @ t(rows), a)
            return out.addcmul_(with_shared(query, shared_a), r_col)

        # Block 2: self-attention, token-to-image over the implicit image tokens.
        q = queries + tokens
        queries = second.norm1(queries + second.self_attn(q, q, queries))
        t2i, i2t = second.cross_attn_token_to_image, second.cross_attn_image_to_token
        query = split(t2i.q_proj(queries + tokens)) * scale(t2i)
        weights = torch.softmax(scores_of(query, f["ak"], f["bk"], fold(query, t2i.k_proj)), dim=-1)
        mixed = head_blocks((weights @ t(a)) @ (rows @ t2i.v_proj.weight.t()), count)
        mixed = mixed + mix(weights * r_col, f["av"])
        mixed = mixed + torch.addmv(t2i.v_proj.bias, t2i.v_proj.weight, first.norm4.bias).view(heads, 1, -1)
        queries = second.norm2(queries + t2i.out_proj(mixed.transpose(1, 2).reshape(group, count, -1)))
        queries = second.norm3(queries + second.mlp(queries))

        # Block 2, image-to-token: P2 (G, pairs, T), softmax over each head's prompt tokens.
        key = split(i2t.k_proj(queries + tokens)) * scale(i2t)
        scores = scores_of(key, f["aq"], f["bq"], fold(key, i2t.q_proj))
        scores = scores.view(group, heads, count, size)
        if _SOFTMAX_OUT:
            torch.softmax(scores, dim=2, out=coeffs[:, pairs:].view(group, heads, count, size))
        else:  # torch builds without softmax's out= overload
            coeffs[:, pairs:] = torch.softmax(scores, dim=2).reshape(group, pairs, size)
        value2 = split(i2t.v_proj(queries))
        s2c = spread(value2, i2t.out_proj)
        s2c = s2c - s2c.mean(-1, keepdim=True)
        rows_c = rows - rows.mean(-1, keepdim=True)
        c0, norm = f["c0"], second.norm4
        # |r Ac + [a, b] Y0 + c0|^2 per token, with coefficients [a, b] (G, 2 * pairs, T):
        # r^2 |Ac|^2 + 2 r Ac.c0 + |c0|^2 + [a, b] . (2 r Y0 Ac + Y0 Y0^T [a, b] + 2 Y0 c0).
        basis0 = torch.cat((rows_c, s2c), dim=1)
        terms = torch.cat((with_shared(value1, f["ac_w"]), with_shared(value2, f["ac_out2"])), dim=1)
        terms.mul_(2 * r_col).baddbmm_(basis0 @ t(basis0), coeffs).add_(2 * (basis0 @ c0).unsqueeze(-1))
        square = terms.mul_(coeffs).sum(1).add_(r * (r * f["aa"] + 2 * f["ac_c0"])).add_((c0 * c0).sum())
        s = torch.rsqrt(square.div_(dim).add_(norm.eps))  # (G, T)
        s_col = s.unsqueeze(1)

        # Final token-to-image attention over LN(...) = s * (r g2 Ac + [a, b] Y + g2 c0) + b2.
        queries, pe = queries[:, final], tokens[:, final]
        chosen = queries.shape[1]
        query = split(last.q_proj(queries + pe)) * scale(last)
        basis = basis0 * norm.weight  # Y (G, 2 * pairs, C)
        shift = norm.weight * c0
        folded = fold(query, last.k_proj)
        inner = with_shared(query, f["ak3"]).mul_(r_col).baddbmm_(folded @ t(basis), coeffs)
        inner.add_((folded @ shift).unsqueeze(-1))
        scores = with_shared(query, f["bk3"]).addcmul_(inner, s_col)
        weights = torch.softmax(scores, dim=-1).mul_(s_col)
        mixed = mix(weights * r_col, f["av3"])
        mixed = mixed + head_blocks((weights @ t(coeffs)) @ (basis @ last.v_proj.weight.t()), chosen)
        mixed = mixed + weights.sum(-1).view(group, heads, chosen, 1) * (last.v_proj.weight @ shift).view(heads, 1, -1)
        mixed = mixed + torch.addmv(last.v_proj.bias, last.v_proj.weight, norm.bias).view(heads, 1, -1)
        attn = last.out_proj(mixed.transpose(1, 2).reshape(group, chosen, -1))

        weight1, bias1 = self._upscale_weights()
        bias_up = torch.addmv(bias1, weight1.t(), norm.bias)

        def image_up1(j: int) -> Callable[[slice], torch.Tensor]:
            """Prompt j's image tokens s (coeffs^T Y + g2 c0 + r g2 Ac) + b2 through the first upscaling
            product, by rows.

            Written (s coeffs, s)^T (Y W1; g2 c0 W1) + (s r) (g2 Ac W1) + (b2 W1 + bias): one product
            and one scaled sum per block of rows.
            """
            # (2 * pairs + 1, T), filled row by row without a cat; the products read it transposed
            # (a strided read of the (T, 2 * pairs) coefficients cost ~1 ms per mask).
            scaled = coeffs.new_empty((coeffs.shape[1] + 1, size))
            torch.mul(coeffs[j], s[j], out=scaled[:-1])
            scaled[-1] = s[j]
            basis1 = torch.cat((basis[j], shift.unsqueeze(0)), dim=0) @ weight1
            shared_scale = (s[j] * r[j]).unsqueeze(-1)

            def rows(part: slice, out: torch.Tensor | None = None) -> torch.Tensor:
                got = torch.addmm(bias_up, scaled[:, part].t(), basis1, out=out)
                return got.addcmul_(f["g2ac_up1"][part], shared_scale[part])

            return rows

        return self.transformer.norm_final_attn(queries + attn), image_up1

    def _first_block(
        self, shared: SharedImage, tokens: torch.Tensor, work: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first two-way block for one prompt's (1, N, C) tokens, with the shared image projections.

        The updated image tokens are written into ``work`` (1, T, C) and returned.
        """
        layer = self.transformer.layers[0]
        t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
        heads = t2i.num_heads
        count = tokens.shape[1]
        queries = layer.norm1(layer.self_attn(tokens, tokens, tokens))

        # token -> image: projected queries over the shared projected keys and values.
        head_dim = t2i.q_proj.out_features // heads
        query = t2i.q_proj(queries + tokens)[0].view(count, heads, -1).transpose(0, 1) * head_dim**-0.5
        probs = torch.softmax(torch.bmm(query, shared.t2i_keys), dim=-1)  # (heads, N, T)
        mixed = torch.bmm(probs, shared.t2i_values).transpose(0, 1).reshape(1, count, -1)
        queries = layer.norm2(queries + t2i.out_proj(mixed))
        queries = layer.norm3(queries + layer.mlp(queries))

        # image -> token: shared image queries against the prompt's keys; the output projection
        # is folded into the values (see ``_Attention.fold_tokens``).
        key = i2t.k_proj(queries + tokens)[0].view(count, heads, -1)  # (N, heads, d)
        out_weight = i2t.out_proj.weight.view(-1, heads, key.shape[-1])
        spread = torch.einsum("nhd,chd->hnc", i2t.v_proj(queries)[0].view(count, heads, -1), out_weight)
        spread = spread.reshape(heads * count, -1)
        key = key.permute(1, 2, 0)  # (heads, d, N)
        dim = shared.keys.shape[-1]
        for part in _blocks(shared.keys.shape[1], shared.keys.device):
            scores = torch.bmm(shared.i2t_queries[:, part], key)  # (heads, n, N)
            probs = torch.softmax(scores, dim=-1).transpose(0, 1).reshape(-1, heads * count)
            out = torch.addmm(shared.keys_out[part], probs, spread)
            work[0, part] = F.layer_norm(out, (dim,), layer.norm4.weight, layer.norm4.bias, layer.norm4.eps)
        return queries, work

    def _upscale_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The first transposed convolution as a (C, 4 * C/4) matrix and its (4 * C/4,) bias (see ``_masks``)."""
        up1 = self.output_upscaling[0]
        return up1.weight.permute(0, 2, 3, 1).reshape(up1.in_channels, 4 * up1.out_channels), up1.bias.repeat(4)

    def _masks(self, keys: torch.Tensor | Callable[[slice], torch.Tensor], hyper: torch.Tensor, height: int,
               width: int) -> torch.Tensor:
        """(B, h*w, C) image tokens and (B, K, C/8) mask vectors -> (B, K, 4h, 4w) logits.

        ``keys`` may instead be a function giving one image's tokens through the first transposed
        convolution for a slice of token rows, (n, 4 * C/4), written into the optional buffer it is
        given (B = 1; the low-rank path forms them so).

        A 2x2 stride-2 transposed convolution turns each input pixel into its own 2x2 block, so
        it is one matrix product per pixel; rows stay pixels (in token order) and the output
        columns are (row offset, column offset, channel), which keeps LayerNorm2d's channels
        contiguous. Only the final logits are rearranged into image order.
        """
        up1, norm, act1, up2, act2 = self.output_upscaling
        projected = callable(keys)
        batch, count = (1, height * width) if projected else keys.shape[:2]
        mid, low = up1.out_channels, up2.out_channels
        weight1, bias1 = self._upscale_weights()
        weight2, bias2 = up2.weight.permute(0, 2, 3, 1).reshape(mid, 4 * low), up2.bias.repeat(4)
        masks = hyper.shape[1]
        logits = hyper.new_empty((batch, count * 16, masks))
        # Without autograd, each block's products write into buffers reused across blocks and the
        # GELUs run in place. Where malloc is not tuned (models.device.tune_allocator: macOS,
        # Windows, NAPARI_MEDSAM_MALLOC_TUNING=0) every fresh 0.5-1 MB output is a fresh memory
        # map: the upscaling of one mask took 23.4 ms with fresh outputs against 8.6 ms with these
        # buffers (2 threads, untuned glibc); with the tuning both took ~8.8 ms.
        reuse = not torch.is_grad_enabled()
        block = max((part.stop - part.start for part in _blocks(count, hyper.device)), default=0)
        up_buf = hyper.new_empty((block, 4 * mid)) if reuse else None
        mid_buf = hyper.new_empty((4 * block, 4 * low)) if reuse else None
        for b in range(batch):
            vectors = hyper[b].t()
            for part in _blocks(count, hyper.device):
                n = part.stop - part.start
                up = up_buf[:n] if reuse else None  # None: a fresh output (autograd records it)
                x = keys(part, up) if projected else torch.addmm(bias1, keys[b, part], weight1, out=up)
                x = F.layer_norm(x.view(-1, mid), (mid,), norm.weight, norm.bias, norm.eps)
                x = gelu_fresh(x, approximate=act1.approximate)
                x = torch.addmm(bias2, x, weight2, out=mid_buf[: 4 * n] if reuse else None)
                x = gelu_fresh(x, approximate=act2.approximate).view(-1, low)
                target = logits[b, 16 * part.start : 16 * part.stop]
                if reuse:
                    torch.mm(x, vectors, out=target)
                else:  # out= is refused for tensors that autograd records
                    target.copy_(x @ vectors)
        # (B, row, col, dy1, dx1, dy2, dx2, K) -> (B, K, row, dy1, dy2, col, dx1, dx2)
        logits = logits.view(batch, height, width, 2, 2, 2, 2, masks).permute(0, 7, 1, 3, 5, 2, 4, 6)
        return logits.reshape(batch, masks, 4 * height, 4 * width)
