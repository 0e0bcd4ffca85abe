"""SAM 3's DETR-style detector decoder: object queries that find every instance of the prompted concept.

The decoder refines ``num_queries`` (200) object queries over ``num_layers`` (6) layers. Each query owns
a learned content vector (``query_embed``) and a learned anchor box (``reference_points``, a logit; the
sigmoid gives a normalised ``(cx, cy, w, h)``). One extra learned *presence token* travels with the
queries and answers "is the concept in the image at all?"; the final score of a detection is
``sigmoid(class logit) * sigmoid(presence logit)``.

One layer (post-norm residuals, ReLU FFN), queries ``q``, position codes ``p``:

1. self-attention over ``[presence; queries]`` with ``q + p`` as query and key (the presence token's
   position code is zero), ``q`` as value; then ``norm2``;
2. cross-attention to the prompt tokens (text + geometry, padding masked) with query ``q + p``;
   then ``catext_norm``;
3. cross-attention to the fused image memory (72 x 72 tokens, key = memory + its sine code) with
   query ``q + p`` and an additive *box relative position bias* (below); then ``norm1``;
4. FFN (``linear1`` - ReLU - ``linear2``) with residual; then ``norm3``.

Before each layer the anchor boxes give the query position code: the box's four coordinates are
encoded with sines (``d/2`` channels each, in the order y, x, w, h; frequencies ``10000 ** (2 floor(i/2)
/ (d/2))``, phase ``2 pi t``, channel pairs (sin, cos)) and ``ref_point_head`` (2-layer MLP, ``2 d -> d``)
maps the ``2 d`` channels to ``d``.

Box relative position bias ("boxRPB", mode "log"): for every query, head and image cell, the attention
logit gets ``f_y(dy) + f_x(dx)``. ``dx`` are the two offsets ``j / W - x0`` and ``j / W - x1`` from the
column ``j``'s left edge to the box's left and right sides (normalised units), squashed as
``sign(8 d) * log2(|8 d| + 1) / 3``; ``f_x`` = ``boxRPB_embed_x``, a 2-layer MLP from these 2 numbers to
one value per head (``f_y`` likewise for rows). The presence token's bias row is zero.

After each layer: ``hs = norm(q)`` is that layer's output (the heads read it), the box head
``bbox_embed`` (3-layer MLP) predicts a correction in logit space, ``box <- sigmoid(logit(box) + delta)``
(``logit`` clamped to ``eps = 1e-3``), which becomes the next layer's anchor (iterative refinement),
and the presence logit is ``presence_token_head(presence_token_out_norm(presence))`` (the official code
computes a clamp to +-10 but discards the result, so no clamp applies).

Training-only parts of the official module are left out: "DAC" (a duplicated set of one-to-many queries
without self-attention, off in evaluation), activation checkpointing, dropout. With a single unpadded
image level the official "valid ratios" are ones and drop out. Arithmetic follows the official order
(``nn.MultiheadAttention`` called the same way), so results agree to float rounding. Parameter names
equal the checkpoint keys under ``detector.transformer.decoder.``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DecoderConfig",
    "DecoderOutput",
    "Es3Decoder",
    "Es3DecoderLayer",
    "MLP",
    "box_cxcywh_to_xyxy",
    "infer_decoder_config",
    "inverse_sigmoid",
    "sine_embed_boxes",
]


@dataclass(frozen=True)
class DecoderConfig:
    """Hyper-parameters of the detector decoder (defaults: SAM 3 / EfficientSAM3 as built officially)."""

    d_model: int = 256
    n_heads: int = 8
    ffn_dim: int = 2048
    num_layers: int = 6
    num_queries: int = 200


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``(cx, cy, w, h)`` -> ``(x0, y0, x1, y1)`` along the last axis."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def inverse_sigmoid(x: Tensor, eps: float = 1e-3) -> Tensor:
    """``log(x / (1 - x))`` with ``x`` clipped to [0, 1] and both terms to at least ``eps``."""
    x = x.clamp(0.0, 1.0)
    return torch.log(x.clamp(min=eps) / (1.0 - x).clamp(min=eps))


def _box_frequencies(d_model: int, device: torch.device) -> Tensor:
    n = d_model // 2  # channels per coordinate
    idx = torch.arange(n, dtype=torch.float32, device=device)
    return 10000 ** (2 * torch.div(idx, 2, rounding_mode="floor") / n)


def sine_embed_boxes(boxes: Tensor, d_model: int, freq: Tensor | None = None) -> Tensor:
    """Sine code of boxes ``[..., 4]`` (normalised cx, cy, w, h) -> ``[..., 2 * d_model]`` (y, x, w, h codes).

    The four coordinates are coded in one pass (the same element-wise operations as coding each alone);
    ``freq`` (the ``d_model / 2`` frequencies) may be passed in to skip recomputing them.
    """
    if freq is None:
        freq = _box_frequencies(d_model, boxes.device)
    coords = boxes[..., [1, 0, 2, 3]]  # output order: y, x, w, h
    phase = (coords * (2 * math.pi))[..., None] / freq  # [..., 4, n]
    code = torch.stack((phase[..., 0::2].sin(), phase[..., 1::2].cos()), dim=-1)  # [..., 4, n/2, 2]
    return code.flatten(-3)


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them; optional residual and output norm.

    Keys ``layers.<i>.*`` (and ``out_norm.*``) as in the official ``MLP``.
    """

    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_layers: int, residual: bool = False,
                 out_norm: nn.Module | None = None) -> None:
        super().__init__()
        dims = [in_dim] + [hidden] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        if residual and in_dim != out_dim:
            raise ValueError("a residual MLP needs equal input and output widths")
        self.residual = residual
        self.out_norm = out_norm if out_norm is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = x
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            y = layer(y)
            if i < last:
                y = F.relu(y)
        if self.residual:
            y = y + x
        return self.out_norm(y)


class Es3DecoderLayer(nn.Module):
    """One decoder layer (sequence-first tensors); see the module docstring for the order of operations."""

    def __init__(self, d_model: int, n_heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.cross_attn = nn.MultiheadAttention(d_model, n_heads)
        self.norm1 = nn.LayerNorm(d_model)
        self.ca_text = nn.MultiheadAttention(d_model, n_heads)
        self.catext_norm = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, queries: Tensor, query_pos: Tensor, presence: Tensor, memory: Tensor, memory_pos: Tensor,
                prompt: Tensor, prompt_mask: Tensor | None, image_bias: Tensor | None,
                memory_key: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Queries ``[Q, B, d]`` (+ codes), presence ``[1, B, d]``, memory ``[HW, B, d]``, prompt ``[S, B, d]``,
        ``prompt_mask`` ``[B, S]`` (True = padding), ``image_bias`` ``[B * heads, 1 + Q, HW]`` (presence row
        first) or None.

        ``memory_key`` (optional) is ``memory + memory_pos`` computed once by the caller for all layers.

        Returns the updated (queries, presence).
        """
        tgt = torch.cat((presence, queries), dim=0)
        pos = torch.cat((torch.zeros_like(presence), query_pos), dim=0)
        q = tgt + pos
        tgt = self.norm2(tgt + self.self_attn(q, q, tgt)[0])
        tgt = self.catext_norm(tgt + self.ca_text(tgt + pos, prompt, prompt, key_padding_mask=prompt_mask)[0])
        key = memory + memory_pos if memory_key is None else memory_key
        attended = self.cross_attn(tgt + pos, key, memory, attn_mask=image_bias, need_weights=False)[0]
        tgt = self.norm1(tgt + attended)
        tgt = self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))
        return tgt[1:], tgt[:1]


@dataclass
class DecoderOutput:
    """Per-layer decoder results, batch-first (``L`` layers, ``B`` images, ``Q`` queries)."""

    hs: Tensor  # [L, B, Q, d] query states after the output norm
    reference_boxes: Tensor  # [L, B, Q, 4] anchor boxes (cxcywh) each layer started from
    boxes: Tensor  # [L, B, Q, 4] refined boxes (cxcywh, normalised) predicted by each layer
    presence_logits: Tensor  # [L, B, 1]
    presence_feats: Tensor  # [1, B, d] presence token after the last layer (before its output norm)


class Es3Decoder(nn.Module):
    """``detector.transformer.decoder``: 200 queries, presence token, boxRPB "log", box refinement."""

    def __init__(self, config: DecoderConfig = DecoderConfig()) -> None:
        super().__init__()
        c = config
        self.config = c
        d = c.d_model
        self.layers = nn.ModuleList(Es3DecoderLayer(d, c.n_heads, c.ffn_dim) for _ in range(c.num_layers))
        self.norm = nn.LayerNorm(d)
        self.bbox_embed = MLP(d, d, 4, 3)
        self.query_embed = nn.Embedding(c.num_queries, d)
        self.reference_points = nn.Embedding(c.num_queries, 4)
        self.boxRPB_embed_x = MLP(2, d, c.n_heads, 2)
        self.boxRPB_embed_y = MLP(2, d, c.n_heads, 2)
        self.presence_token = nn.Embedding(1, d)
        self.presence_token_head = MLP(d, d, 1, 3)
        self.presence_token_out_norm = nn.LayerNorm(d)
        self.ref_point_head = MLP(2 * d, d, d, 2)

    @staticmethod
    def _log_offsets(offsets: Tensor) -> Tensor:
        scaled = offsets * 8
        return torch.sign(scaled) * torch.log2(torch.abs(scaled) + 1.0) / 3.0

    def box_bias(self, boxes: Tensor, height: int, width: int, out: Tensor | None = None) -> Tensor:
        """Attention bias ``[B * heads, 1 + Q, H * W]`` of anchor boxes ``[Q, B, 4]`` (cxcywh) over an H x W grid.

        Row 0 (the presence token's) is zero. The sum is written straight into its final layout (one pass
        over the largest tensor of the decoder: heads x queries x cells). ``out``: an earlier result of
        this size to overwrite (the layers reuse one buffer: 33 MB at full size, a fresh one each layer
        costs page faults).
        """
        xyxy = box_cxcywh_to_xyxy(boxes).transpose(0, 1)  # [B, Q, 4]
        rows = torch.arange(height, dtype=torch.float32, device=boxes.device) / height
        cols = torch.arange(width, dtype=torch.float32, device=boxes.device) / width
        dy = rows[None, None, :, None] - xyxy[:, :, None, 1::2]  # [B, Q, H, 2]
        dx = cols[None, None, :, None] - xyxy[:, :, None, 0::2]  # [B, Q, W, 2]
        by = self.boxRPB_embed_y(self._log_offsets(dy)).permute(0, 3, 1, 2)  # [B, heads, Q, H]
        bx = self.boxRPB_embed_x(self._log_offsets(dx)).permute(0, 3, 1, 2)  # [B, heads, Q, W]
        batch, heads, queries = by.shape[:3]
        shape = (batch, heads, 1 + queries, height, width)
        if out is not None and out.numel() == math.prod(shape) and out.dtype == by.dtype and out.is_contiguous():
            bias = out.view(shape)  # row 0 is still zero: only rows 1.. are ever written
        else:
            bias = by.new_empty(shape)
            bias[:, :, 0] = 0.0  # only the presence row needs zeroing: the sum overwrites the others
        torch.add(by[..., None], bx[..., None, :], out=bias[:, :, 1:])
        return bias.view(batch * heads, 1 + queries, height * width)

    def forward(self, memory: Tensor, memory_pos: Tensor, spatial_shape: tuple[int, int], prompt: Tensor,
                prompt_mask: Tensor | None) -> DecoderOutput:
        """Decode fused image memory ``[H*W, B, d]`` (+ sine codes) with the prompt ``[S, B, d]``.

        ``spatial_shape`` = ``(H, W)`` of the memory grid; ``prompt_mask`` ``[B, S]`` is True at padding.
        """
        batch = memory.shape[1]
        height, width = (int(s) for s in spatial_shape)
        queries = self.query_embed.weight[:, None].repeat(1, batch, 1)
        boxes = self.reference_points.weight[:, None].repeat(1, batch, 1).sigmoid()
        presence = self.presence_token.weight[None].expand(1, batch, -1)
        freq = _box_frequencies(self.config.d_model, memory.device)
        memory_key = memory + memory_pos  # the image keys of every layer's cross-attention
        hs, refs, refined, presence_logits = [], [], [], []
        bias = None
        for layer in self.layers:
            query_pos = self.ref_point_head(sine_embed_boxes(boxes, self.config.d_model, freq))
            # reuse the previous layer's bias buffer unless autograd may have saved it for backward
            bias = self.box_bias(boxes, height, width, out=None if torch.is_grad_enabled() else bias)
            queries, presence = layer(queries, query_pos, presence, memory, memory_pos, prompt, prompt_mask, bias,
                                      memory_key=memory_key)
            normed = self.norm(queries)
            new_boxes = (inverse_sigmoid(boxes) + self.bbox_embed(normed)).sigmoid()
            hs.append(normed)
            refs.append(boxes)
            refined.append(new_boxes)
            presence_logits.append(self.presence_token_head(self.presence_token_out_norm(presence)).squeeze(-1))
            boxes = new_boxes
        return DecoderOutput(
            hs=torch.stack(hs).transpose(1, 2),
            reference_boxes=torch.stack(refs).transpose(1, 2),
            boxes=torch.stack(refined).transpose(1, 2),
            presence_logits=torch.stack(presence_logits).transpose(1, 2),
            presence_feats=presence,
        )


def infer_decoder_config(state: Mapping[str, Tensor]) -> DecoderConfig:
    """Sizes of a decoder state dict (keys without ``transformer.decoder.``); the head count is the
    output width of ``boxRPB_embed_x`` (one bias per head)."""
    layers = {int(k.split(".")[1]) for k in state if k.startswith("layers.")}
    num_queries, d_model = state["query_embed.weight"].shape
    return DecoderConfig(
        d_model=int(d_model),
        n_heads=int(state["boxRPB_embed_x.layers.1.weight"].shape[0]),
        ffn_dim=int(state["layers.0.linear1.weight"].shape[0]),
        num_layers=len(layers),
        num_queries=int(num_queries),
    )
