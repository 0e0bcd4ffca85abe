"""EfficientSAM3's text student: the MobileCLIP text transformer plus a projection to the detector width.

SAM 3 encodes a noun phrase with a 24-layer CLIP-style text transformer; EfficientSAM3 replaces it by
a MobileCLIP text encoder (Vasu et al., CVPR 2024) trained to imitate it, followed by a linear
projection from the MobileCLIP width to the detector width ``d_model`` (256). MobileCLIP-S0's text
encoder is the "mct" variant: a RepMixer block (convolutional token mixing along the sequence), a few
pre-norm transformer layers, and a second RepMixer block, all at width 512; larger MobileCLIP variants
("base") are plain transformer stacks.

The flow, for a batch of phrases tokenised to ``context_length`` ids (16 in EfficientSAM3):

1. ``language_embeds`` = token embedding + learnable positional embedding (no embedding scale, no
   dropout at inference). The positional table is stored as ``[1, 1, context, dim]``; EfficientSAM3
   builds it for 77 positions and keeps the first ``context`` before loading.
2. The blocks run on all positions: there is no causal mask and no padding mask, so padding tokens
   (id 0) take part in attention and in the RepMixer convolutions like any other token.
3. A final LayerNorm; then ``projector`` (``Linear(dim, d_model)``) on every token. MobileCLIP's own
   ``projection_layer`` (a bare ``[dim, dim]`` parameter used for CLIP's pooled embedding) is in the
   checkpoint but unused on this path.
4. ``language_features`` is returned sequence-first ``[context, batch, d_model]``, ``language_mask``
   ``[batch, context]`` is True at padding (id 0), ``language_embeds`` is ``[context, batch, dim]``.

RepMixer block (width C, sequence as a ``1 x L`` image, depthwise ``1 x 11`` kernels, padding 5):
``x <- x + s1 * (BN_a(x) + BN_b(dwconv(x)) - BN_c(x))`` (the "mixer" minus the "norm" branch), then
``x <- x + s2 * fc2(GELU(fc1(BN(dwconv(x)))))`` with 1x1 convolutions to and from ``4 C``; ``s1``, ``s2``
are per-channel layer scales. Transformer layer: ``x <- x + MHA(LN(x))``, ``x <- x + FFN(LN(x))`` with
GELU and a hidden width of ``ceil(4 C / 16) * 16``; the LayerNorms compute in float32 (LayerNormFP32).
The attention's fused ``qkv_proj`` output is laid out as ``[3, heads, head_dim]``.

Module and parameter names equal the official checkpoint keys under
``detector.backbone.language_backbone.`` so that subset loads with ``strict=True``
(:func:`text_state_dict` extracts it). The tokenizer is not a module (it has no weights); the
vocabulary file's path is given to :class:`~.tokenizer.ClipTokenizer`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .tokenizer import CLIP_VOCAB_SIZE, ClipTokenizer

__all__ = [
    "CHECKPOINT_PREFIX",
    "MOBILECLIP_S0",
    "MobileClipTextConfig",
    "MobileClipTextTransformer",
    "TextOutput",
    "TextStudentEncoder",
    "build_text_encoder",
    "infer_text_config",
    "text_state_dict",
]

CHECKPOINT_PREFIX = "detector.backbone.language_backbone."


@dataclass(frozen=True)
class MobileClipTextConfig:
    """Hyper-parameters of a MobileCLIP text transformer (defaults: MobileCLIP-S0 as EfficientSAM3 uses it)."""

    dim: int = 512
    n_heads: int = 8
    n_transformer_layers: int = 4
    ffn_multiplier: float = 4.0
    context_length: int = 16  # positions of the learnable positional table as stored in the checkpoint
    vocab_size: int = CLIP_VOCAB_SIZE
    variant: str = "mct"  # "mct": RepMixer + transformers + RepMixer (S0); "base": transformers only
    repmixer_kernel: int = 11
    repmixer_mlp_ratio: float = 4.0
    causal: bool = False  # MobileCLIP-B masks causally; EfficientSAM3's S0/S1 students do not

    @property
    def ffn_dim(self) -> int:
        return int(math.ceil(self.dim * self.ffn_multiplier / 16.0) * 16)


MOBILECLIP_S0 = MobileClipTextConfig()


class _Embedding(nn.Embedding):
    """``nn.Embedding`` whose random initialisation is skipped on the meta device (building the full
    49408 x 512 table there would otherwise go through torch's slow reference decomposition of ``normal_``)."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class LayerNormFP32(nn.LayerNorm):
    """LayerNorm evaluated in float32 whatever the input dtype, the result cast back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class _ConvBN(nn.Sequential):
    """Bias-free (depthwise) conv then BatchNorm; children ``conv`` and ``bn`` as in the checkpoints."""

    def __init__(self, channels: int, kernel: int, groups: int) -> None:
        super().__init__()
        self.add_module("conv", nn.Conv2d(channels, channels, (1, kernel), padding=(0, kernel // 2),
                                          groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(channels))


class _MobileOneBranches(nn.Module):
    """The un-reparameterised MobileOne block as RepMixer uses it: BN identity branch (``rbr_skip``)
    plus, when ``conv``, one depthwise conv+BN branch (``rbr_conv.0``); no activation, no scale branch."""

    def __init__(self, channels: int, kernel: int, conv: bool) -> None:
        super().__init__()
        self.rbr_skip = nn.BatchNorm2d(channels)
        self.rbr_conv = nn.ModuleList([_ConvBN(channels, kernel, channels)]) if conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rbr_skip(x)
        if self.rbr_conv is not None:
            for branch in self.rbr_conv:
                out = out + branch(x)
        return out


class _RepMixer(nn.Module):
    """Token mixing by depthwise convolution: ``x + layer_scale * (mixer(x) - norm(x))``."""

    def __init__(self, dim: int, kernel: int) -> None:
        super().__init__()
        self.norm = _MobileOneBranches(dim, kernel, conv=False)
        self.mixer = _MobileOneBranches(dim, kernel, conv=True)
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), 1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer_scale * (self.mixer(x) - self.norm(x))


class _ConvFFN(nn.Module):
    """Depthwise conv+BN, then a 1x1-conv MLP with GELU."""

    def __init__(self, dim: int, kernel: int, hidden: int) -> None:
        super().__init__()
        self.conv = _ConvBN(dim, kernel, dim)
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.conv(x))))


class RepMixerBlock(nn.Module):
    """RepMixer token mixer + ConvFFN, each with a residual; runs on ``[B, L, C]`` as a ``C x 1 x L`` image."""

    def __init__(self, dim: int, kernel: int = 11, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.token_mixer = _RepMixer(dim, kernel)
        self.convffn = _ConvFFN(dim, kernel, int(dim * mlp_ratio))
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), 1e-5))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        y = x.permute(0, 2, 1).unsqueeze(2)
        y = self.token_mixer(y)
        y = y + self.layer_scale * self.convffn(y)
        return y.squeeze(2).permute(0, 2, 1)


class _SelfAttention(nn.Module):
    """Multi-head self-attention with a fused ``qkv_proj`` (output laid out ``[3, heads, head_dim]``)."""

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"width {dim} is not divisible by {n_heads} heads")
        self.n_heads = n_heads
        self.qkv_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        head_dim = c // self.n_heads
        q, k, v = self.qkv_proj(x).reshape(b, n, 3, self.n_heads, head_dim).permute(2, 0, 3, 1, 4)
        scores = (q * head_dim ** -0.5) @ k.transpose(-1, -2)
        if attn_mask is not None:
            scores = scores + attn_mask
        attn = scores.float().softmax(dim=-1).to(scores.dtype)
        return self.out_proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class TransformerLayer(nn.Module):
    """Pre-norm transformer layer; ``pre_norm_mha`` = (LN, MHA, dropout), ``pre_norm_ffn`` = (LN, Linear,
    GELU, dropout, Linear, dropout), indices as in the checkpoints (dropouts are identity at inference)."""

    def __init__(self, dim: int, n_heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.pre_norm_mha = nn.Sequential(LayerNormFP32(dim), _SelfAttention(dim, n_heads), nn.Dropout(0.0))
        self.pre_norm_ffn = nn.Sequential(LayerNormFP32(dim), nn.Linear(dim, ffn_dim), nn.GELU(), nn.Dropout(0.0),
                                          nn.Linear(ffn_dim, dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        norm, attention, _ = self.pre_norm_mha
        x = x + attention(norm(x), attn_mask)
        return x + self.pre_norm_ffn(x)


class _LearnablePositions(nn.Module):
    """``pos_embed`` ``[1, 1, positions, dim]``; read at another length by bilinear interpolation."""

    def __init__(self, positions: int, dim: int) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.empty(1, 1, positions, dim))
        nn.init.trunc_normal_(self.pos_embed, std=dim ** -0.5)

    def forward(self, length: int) -> torch.Tensor:
        table = self.pos_embed
        if length != table.shape[2]:
            table = F.interpolate(table, size=(length, table.shape[3]), mode="bilinear")
        return table.reshape(1, length, table.shape[3])


class _PositionalEmbedding(nn.Module):
    """Wrapper that only exists for the key path ``positional_embedding.pos_embed.pos_embed``."""

    def __init__(self, positions: int, dim: int) -> None:
        super().__init__()
        self.pos_embed = _LearnablePositions(positions, dim)

    def forward(self, length: int) -> torch.Tensor:
        return self.pos_embed(length)


class MobileClipTextTransformer(nn.Module):
    """MobileCLIP's text transformer, returning every token's state (``[B, L, dim]``)."""

    def __init__(self, config: MobileClipTextConfig = MOBILECLIP_S0) -> None:
        super().__init__()
        c = config
        self.config = c
        self.embedding_layer = _Embedding(c.vocab_size, c.dim)
        self.positional_embedding = _PositionalEmbedding(c.context_length, c.dim)
        layers: list[nn.Module] = [TransformerLayer(c.dim, c.n_heads, c.ffn_dim) for _ in range(c.n_transformer_layers)]
        if c.variant == "mct":
            layers = [RepMixerBlock(c.dim, c.repmixer_kernel, c.repmixer_mlp_ratio), *layers,
                      RepMixerBlock(c.dim, c.repmixer_kernel, c.repmixer_mlp_ratio)]
        elif c.variant != "base":
            raise ValueError(f"unknown MobileCLIP text variant {c.variant!r} (expected 'mct' or 'base')")
        self.transformer = nn.ModuleList(layers)
        self.final_layer_norm = LayerNormFP32(c.dim)
        # CLIP's pooled-embedding projection: in the checkpoints, unused for SAM 3's per-token features.
        self.projection_layer = nn.Parameter(torch.empty(c.dim, c.dim))
        if not self.projection_layer.is_meta:
            nn.init.normal_(self.projection_layer, std=c.dim ** -0.5)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token + positional embedding, ``[B, L] -> [B, L, dim]``."""
        emb = self.embedding_layer(tokens)
        return emb + self.positional_embedding(emb.shape[1]).to(emb.dtype)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        """All blocks and the final norm on embeddings ``[B, L, dim]`` (from :meth:`embed`)."""
        mask = None
        if self.config.causal:
            n = embeds.shape[1]
            mask = torch.full((n, n), float("-inf"), dtype=embeds.dtype, device=embeds.device).triu_(1)
        x = embeds
        for layer in self.transformer:
            x = layer(x, mask)
        return self.final_layer_norm(x)

    def set_context_length(self, length: int) -> None:
        """Keep the first ``length`` rows of the positional table (EfficientSAM3 builds 77, uses 16)."""
        table = self.positional_embedding.pos_embed.pos_embed
        if length > table.shape[2]:
            raise ValueError(f"cannot lengthen the positional table from {table.shape[2]} to {length}")
        if length < table.shape[2]:
            self.positional_embedding.pos_embed.pos_embed = nn.Parameter(table.detach()[:, :, :length].clone())
            self.config = replace(self.config, context_length=length)


@dataclass
class TextOutput:
    """The text side of a SAM 3 prompt, with the official names in :meth:`as_dict`."""

    features: torch.Tensor  # [L, B, d_model] projected per-token states ("language_features")
    mask: torch.Tensor  # [B, L] bool, True at padding ("language_mask")
    embeds: torch.Tensor  # [L, B, dim] token + positional embeddings ("language_embeds")
    tokens: torch.Tensor  # [B, L] int64 BPE ids

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {"language_features": self.features, "language_mask": self.mask, "language_embeds": self.embeds}


class TextStudentEncoder(nn.Module):
    """EfficientSAM3's ``backbone.language_backbone``: MobileCLIP text transformer + ``projector`` to ``d_model``."""

    def __init__(self, config: MobileClipTextConfig = MOBILECLIP_S0, d_model: int = 256,
                 tokenizer: ClipTokenizer | None = None) -> None:
        super().__init__()
        self.encoder = MobileClipTextTransformer(config)
        self.projector = nn.Linear(config.dim, d_model)
        self.tokenizer = tokenizer

    @property
    def context_length(self) -> int:
        return self.encoder.config.context_length

    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        if self.tokenizer is None:
            raise RuntimeError("no tokenizer: pass ClipTokenizer(<path of bpe_simple_vocab_16e6.txt.gz>)")
        return self.tokenizer(texts, context_length=self.context_length).to(self.projector.weight.device)

    def forward_tokens(self, tokens: torch.Tensor) -> TextOutput:
        """Encode BPE ids ``[B, L]`` (start, ids, end, zero padding)."""
        embeds = self.encoder.embed(tokens)
        features = self.projector(self.encoder(embeds))
        return TextOutput(features=features.transpose(0, 1), mask=tokens == 0, embeds=embeds.transpose(0, 1),
                          tokens=tokens)

    def forward(self, texts: str | Sequence[str]) -> TextOutput:
        """Encode phrases (tokenised to the context length with the attached tokenizer)."""
        return self.forward_tokens(self.tokenize(texts))


def text_state_dict(checkpoint: Mapping[str, torch.Tensor], prefix: str = CHECKPOINT_PREFIX) -> dict[str, torch.Tensor]:
    """The text encoder's entries of an EfficientSAM3 state dict, prefix removed.

    ``checkpoint`` is the ``"model"`` dict of an official checkpoint (keys ``detector.<key>``); a dict
    whose keys lack the ``detector.`` prefix works too.
    """
    if not any(k.startswith(prefix) for k in checkpoint) and prefix.startswith("detector."):
        prefix = prefix[len("detector."):]
    return {k[len(prefix):]: v for k, v in checkpoint.items() if k.startswith(prefix)}


def infer_text_config(state: Mapping[str, torch.Tensor], n_heads: int) -> tuple[MobileClipTextConfig, int]:
    """(config, d_model) of a text-encoder state dict (from :func:`text_state_dict`).

    Width, vocabulary, context, layer count, variant, FFN multiplier and ``d_model`` are read from the
    shapes; the number of heads leaves no trace in them and must be given (8 for MobileCLIP-S0).
    """
    vocab, dim = state["encoder.embedding_layer.weight"].shape
    context = state["encoder.positional_embedding.pos_embed.pos_embed"].shape[2]
    attn = sorted({k.split(".")[2] for k in state if k.startswith("encoder.transformer.") and ".pre_norm_mha." in k},
                  key=int)
    mct = "encoder.transformer.0.token_mixer.layer_scale" in state
    ffn = state[f"encoder.transformer.{attn[0]}.pre_norm_ffn.1.weight"].shape[0] if attn else 4 * dim
    mlp = state["encoder.transformer.0.convffn.fc1.weight"].shape[0] / dim if mct else 4.0
    config = MobileClipTextConfig(dim=int(dim), n_heads=n_heads, n_transformer_layers=len(attn),
                                  ffn_multiplier=ffn / dim, context_length=int(context), vocab_size=int(vocab),
                                  variant="mct" if mct else "base", repmixer_mlp_ratio=mlp)
    return config, int(state["projector.weight"].shape[0])


def build_text_encoder(config: MobileClipTextConfig = MOBILECLIP_S0, d_model: int = 256,
                       state: Mapping[str, torch.Tensor] | None = None,
                       tokenizer: ClipTokenizer | None = None) -> TextStudentEncoder:
    """A text student in eval mode; ``state`` (from :func:`text_state_dict`) is loaded with ``strict=True``."""
    model = TextStudentEncoder(config, d_model, tokenizer)
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model.eval()
