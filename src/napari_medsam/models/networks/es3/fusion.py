"""SAM 3's fusion encoder: the image tokens of the coarsest kept level attend to the prompt.

Before the DETR decoder looks for objects, SAM 3 lets every image token of the 72 x 72 level (stride 14
at 1008 px) read the prompt (text tokens, geometry tokens, CLS). The encoder is a stack of identical
pre-norm layers; with ``x`` the image tokens, ``p`` their sine position code and ``m`` the prompt:

1. self-attention among the image tokens, position added to queries and keys only:
   ``y = LN1(x)``, ``x <- x + MHA(q = y + p, k = y + p, v = y)``;
2. cross-attention to the prompt (no position code on either side; padded prompt tokens are masked):
   ``x <- x + MHA(q = LN2(x), k = m, v = m)``;
3. feed-forward: ``x <- x + W2 relu(W1 LN3(x))``.

There is no final norm, no level embedding (one feature level) and no pooled-text addition (the official
builder disables it, so ``text_pooling_proj`` does not exist). Dropout is inactive at inference.

The same layer type, with other options, is the geometry encoder's layer (see :mod:`.geometry`): there
the prompt tokens are the queries, self-attention has no position code and the image position code is
added to the cross-attention keys only. :class:`EncoderLayer` covers both.

Module and parameter names equal the official checkpoint keys under ``detector.transformer.encoder.``
(``layers.<i>.self_attn.in_proj_weight``, ``...cross_attn_image...``, ``linear1/2``, ``norm1..3``), so
that subset loads with ``strict=True`` (:func:`fusion_state_dict` extracts it). Attention is torch's
``nn.MultiheadAttention`` with the same packed ``in_proj`` layout as the checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FUSION_PREFIX",
    "EncoderLayer",
    "FusionConfig",
    "FusionEncoder",
    "FusionOutput",
    "build_fusion_encoder",
    "fusion_state_dict",
    "infer_fusion_config",
    "sub_state_dict",
]

FUSION_PREFIX = "detector.transformer.encoder."


def sub_state_dict(checkpoint: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Entries of ``checkpoint`` under ``prefix`` with the prefix removed.

    ``prefix`` starts with ``detector.`` (official layout); a dict whose keys lack ``detector.`` works too.
    """
    if not any(k.startswith(prefix) for k in checkpoint) and prefix.startswith("detector."):
        prefix = prefix[len("detector."):]
    return {k[len(prefix):]: v for k, v in checkpoint.items() if k.startswith(prefix)}


class EncoderLayer(nn.Module):
    """Pre-norm layer: self-attention, cross-attention to a memory, ReLU feed-forward (see module docstring).

    ``pos_at_self_attn``: add ``query_pos`` to the self-attention queries and keys (fusion encoder).
    ``pos_at_cross_keys``: add ``memory_pos`` to the cross-attention keys (geometry encoder).
    ``batch_first``: layout of ``tgt`` / ``memory`` (``[B, L, C]`` if True, else ``[L, B, C]``).
    """

    def __init__(self, d_model: int, num_heads: int, dim_feedforward: int, *, pos_at_self_attn: bool,
                 pos_at_cross_keys: bool, batch_first: bool) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, num_heads, batch_first=batch_first)
        self.cross_attn_image = nn.MultiheadAttention(d_model, num_heads, batch_first=batch_first)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.pos_at_self_attn = pos_at_self_attn
        self.pos_at_cross_keys = pos_at_cross_keys

    def forward(self, tgt: Tensor, memory: Tensor, *, query_pos: Tensor | None = None,
                memory_pos: Tensor | None = None, tgt_key_padding_mask: Tensor | None = None,
                memory_key_padding_mask: Tensor | None = None, ffn_buffer: Tensor | None = None) -> Tensor:
        """``tgt`` attends to itself, then to ``memory``; masks are ``[B, L]`` with True = padding.

        Without autograd the later residual sums and the ReLU are written in place, and the feed-forward
        hidden layer goes to ``ffn_buffer`` (``[B * L, dim_feedforward]``, shared by a stack of layers) when
        given: the same values with fewer fresh ``[B, L, C]`` / ``[B, L, 4 C]`` buffers (at 72 x 72 tokens
        a new 42 MB buffer costs page faults worth more than a ReLU over it). ``tgt`` itself is never modified.
        """
        y = self.norm1(tgt)
        qk = y + query_pos if self.pos_at_self_attn and query_pos is not None else y
        tgt = tgt + self.self_attn(qk, qk, y, key_padding_mask=tgt_key_padding_mask, need_weights=False)[0]
        inplace = not torch.is_grad_enabled()  # tgt is a fresh tensor from here on
        y = self.norm2(tgt)
        key = memory + memory_pos if self.pos_at_cross_keys and memory_pos is not None else memory
        attended = self.cross_attn_image(y, key, memory, key_padding_mask=memory_key_padding_mask,
                                         need_weights=False)[0]
        tgt = tgt.add_(attended) if inplace else tgt + attended
        y = self.norm3(tgt)
        rows = y.shape[0] * y.shape[1]
        if (inplace and ffn_buffer is not None and self.linear1.bias is not None
                and tuple(ffn_buffer.shape) == (rows, self.linear1.out_features)):
            hidden = torch.addmm(self.linear1.bias, y.reshape(-1, y.shape[-1]), self.linear1.weight.t(),
                                 out=ffn_buffer).view(*y.shape[:-1], -1)
        else:
            hidden = self.linear1(y)
        ffn = self.linear2(F.relu(hidden, inplace=True))
        return tgt.add_(ffn) if inplace else tgt + ffn


@dataclass(frozen=True)
class FusionConfig:
    """Hyper-parameters of the fusion encoder (defaults: the official full-size model)."""

    d_model: int = 256
    num_layers: int = 6
    num_heads: int = 8
    dim_feedforward: int = 2048


@dataclass
class FusionOutput:
    """What the fusion encoder hands to the decoder and the segmentation head (seq-first, as official).

    ``memory`` ``[H*W, B, C]`` encoded image tokens (row-major grid); ``pos_embed`` ``[H*W, B, C]`` their
    position code; ``padding_mask`` None (images are never padded here); ``spatial_shapes`` ``[1, 2]``
    int64 ``(H, W)``; ``level_start_index`` ``[1]`` int64 (0); ``valid_ratios`` ``[B, 1, 2]`` ones.
    """

    memory: Tensor
    pos_embed: Tensor
    padding_mask: Tensor | None
    spatial_shapes: Tensor
    level_start_index: Tensor
    valid_ratios: Tensor

    @property
    def feat_size(self) -> tuple[int, int]:
        h, w = self.spatial_shapes[0].tolist()
        return int(h), int(w)

    def memory_map(self) -> Tensor:
        """``memory`` back as an image ``[B, C, H, W]``."""
        h, w = self.feat_size
        n, b, c = self.memory.shape
        return self.memory.permute(1, 2, 0).reshape(b, c, h, w)


class FusionEncoder(nn.Module):
    """Stack of :class:`EncoderLayer` (image queries, prompt memory); keys as ``transformer.encoder.``."""

    def __init__(self, config: FusionConfig = FusionConfig()) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(
            EncoderLayer(config.d_model, config.num_heads, config.dim_feedforward, pos_at_self_attn=True,
                         pos_at_cross_keys=False, batch_first=True)
            for _ in range(config.num_layers))

    def forward(self, image: Tensor, image_pos: Tensor, prompt: Tensor, prompt_mask: Tensor | None) -> FusionOutput:
        """Encode one feature level against the prompt.

        ``image``, ``image_pos``: ``[B, C, H, W]`` (the 72 x 72 neck level and its sine code);
        ``prompt``: ``[L, B, C]`` seq-first; ``prompt_mask``: ``[B, L]`` bool, True = padding (or None).
        """
        b, c, h, w = image.shape
        x = image.flatten(2).transpose(1, 2)  # [B, HW, C]
        pos = image_pos.flatten(2).transpose(1, 2)
        mem = prompt.transpose(0, 1)  # [B, L, C]
        # one hidden-layer buffer for all layers' feed-forward blocks (42 MB at 72 x 72 tokens)
        buffer = None if torch.is_grad_enabled() else x.new_empty(b * h * w, self.config.dim_feedforward)
        for layer in self.layers:
            x = layer(x, mem, query_pos=pos, memory_key_padding_mask=prompt_mask, ffn_buffer=buffer)
        device = image.device
        return FusionOutput(
            memory=x.transpose(0, 1), pos_embed=pos.transpose(0, 1), padding_mask=None,
            spatial_shapes=torch.tensor([[h, w]], dtype=torch.long, device=device),
            level_start_index=torch.zeros(1, dtype=torch.long, device=device),
            valid_ratios=torch.ones(b, 1, 2, device=device))


def fusion_state_dict(checkpoint: Mapping[str, Tensor], prefix: str = FUSION_PREFIX) -> dict[str, Tensor]:
    """The fusion encoder's entries of an EfficientSAM3 state dict (``detector.`` prefix optional), prefix removed."""
    return sub_state_dict(checkpoint, prefix)


def infer_fusion_config(state: Mapping[str, Tensor], num_heads: int = 8) -> FusionConfig:
    """Config of a fusion-encoder state dict (from :func:`fusion_state_dict`); heads leave no trace: give them."""
    if any(k.startswith(("level_embed", "text_pooling_proj")) for k in state):
        raise ValueError("fusion encoder with level embeddings or pooled-text projection is not supported")
    layers = {int(k.split(".")[1]) for k in state if k.startswith("layers.")}
    if layers != set(range(len(layers))) or not layers:
        raise ValueError(f"fusion encoder layers are not numbered 0..n-1: {sorted(layers)}")
    ffn, d_model = state["layers.0.linear1.weight"].shape
    return FusionConfig(d_model=int(d_model), num_layers=len(layers), num_heads=num_heads,
                        dim_feedforward=int(ffn))


def build_fusion_encoder(config: FusionConfig = FusionConfig(),
                         state: Mapping[str, Tensor] | None = None) -> FusionEncoder:
    """A fusion encoder in eval mode; ``state`` (from :func:`fusion_state_dict`) is loaded with ``strict=True``."""
    model = FusionEncoder(config)
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model.eval()
