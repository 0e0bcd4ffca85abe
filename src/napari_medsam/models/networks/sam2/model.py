"""The SAM 2 family as one network: Hiera image encoder, SAM heads, memory encoder and attention.

``Sam2Network`` holds the parts under the official checkpoint keys (``image_encoder.*``,
``sam_prompt_encoder.*``, ``sam_mask_decoder.*``, ``memory_attention.*``, ``memory_encoder.*``,
``obj_ptr_proj.*``, ``obj_ptr_tpos_proj.*``, ``mask_downsample.*`` and the top-level tensors), so
that SAM 2.1 Tiny/Small/Base+/Large and MedSAM2 checkpoints load strictly. It offers the steps of
video tracking as separate calls, and the memory bank is assembled by the caller
(:mod:`napari_medsam.segment.memory`), which decides which slices are remembered:

* :meth:`encode_frame` - backbone features of one slice (three levels, the two finer ones already
  reduced by the decoder's ``conv_s0``/``conv_s1``);
* :meth:`prompt_frame` - a slice prompted with points/box (and optionally earlier logits), without
  memory: the top level gets ``no_mem_embed``; the mask decoder picks its output as the official
  code does (one mask for boxes and several points, with the fallback to the most confident of
  three when the single mask is unstable);
* :meth:`mask_frame` - a slice given as a mask: the mask itself is the output, the heads run only
  for its object pointer;
* :meth:`encode_memory` - the memory of a slice from its features and output mask;
* :meth:`track_frame` - a slice conditioned on remembered slices and object pointers.

All of it computes in float32; only the memory features are rounded to bfloat16 when stored, as
the official predictors do (the golden tests depend on it). ``encode_image``/``decode`` give the
same interface as the SAM-1 networks (:class:`napari_medsam.models.networks.sam.SamNetwork`) for
single-slice prompting, with all feature levels packed in one flat tensor so that the embedding
cache stores one array per slice.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ....errors import MedSamError
from ..mask_decoder import _MLP
from ..prompt_encoder import PromptEncoder
from .heads import Sam2MaskDecoder
from .image_encoder import build_image_encoder
from .memory import MemoryAttention, MemoryEncoder
from .position import sine_1d

__all__ = [
    "NO_OBJECT_SCORE", "SAM2_ARCHITECTURES", "SAM2_PRESETS", "FrameFeatures", "FrameOutput", "Sam2Config",
    "Sam2Network", "build_sam2", "load_sam2",
]

NO_OBJECT_SCORE = -1024.0  # mask logits of a slice where the object-score head says "absent"
_MEMORY_SCALE, _MEMORY_BIAS = 20.0, -10.0  # mask probabilities -> memory-encoder input
_MASK_OUT_SCALE, _MASK_OUT_BIAS = 20.0, -10.0  # a given mask -> output logits


@dataclass(frozen=True)
class Sam2Config:
    """What differs between the SAM 2 family members (the rest is fixed by the SAM 2.1 configs)."""

    image_size: int = 1024
    embed_dim: int = 96
    num_heads: int = 1
    stages: tuple[int, ...] = (1, 2, 7, 2)
    global_att_blocks: tuple[int, ...] = (5, 7, 9)
    window_spec: tuple[int, ...] = (8, 4, 14, 7)
    window_pos_embed_bkg_spatial_size: tuple[int, int] = (7, 7)
    memory_layers: int = 4
    memory_ffn: int = 2048
    num_maskmem: int = 7  # the prompted slice(s) + 6 previous slices
    max_obj_ptrs: int = 16
    hidden_dim: int = 256
    mem_dim: int = 64

    @property
    def feature_size(self) -> int:
        """Side of the top feature level (stride 16)."""
        return self.image_size // 16


SAM2_PRESETS: dict[str, Sam2Config] = {
    # SAM 2.1 (Meta, configs/sam2.1/sam2.1_hiera_*.yaml)
    "hiera_t": Sam2Config(),
    "hiera_s": Sam2Config(stages=(1, 2, 11, 2), global_att_blocks=(7, 10, 13)),
    "hiera_b+": Sam2Config(embed_dim=112, num_heads=2, stages=(2, 3, 16, 3), global_att_blocks=(12, 16, 20),
                           window_pos_embed_bkg_spatial_size=(14, 14)),
    "hiera_l": Sam2Config(embed_dim=144, num_heads=2, stages=(2, 6, 36, 4), global_att_blocks=(23, 33, 43),
                          window_spec=(8, 4, 16, 8)),
    # MedSAM2 (bowang-lab, sam2.1_hiera_t512.yaml): Hiera-T at 512 px
    "hiera_t512": Sam2Config(image_size=512),
}
SAM2_ARCHITECTURES: tuple[str, ...] = tuple(SAM2_PRESETS)
_OVERRIDES = {"embed_dim", "num_heads", "stages", "global_att_blocks", "window_spec",
              "window_pos_embed_bkg_spatial_size", "memory_layers", "memory_ffn", "image_size"}


@dataclass
class FrameFeatures:
    """Backbone output of one slice (batch 1): two high-resolution levels and the top level."""

    level0: torch.Tensor  # (1, 32, 4s, 4s), after conv_s0
    level1: torch.Tensor  # (1, 64, 2s, 2s), after conv_s1
    top: torch.Tensor  # (1, 256, s, s), the neck's stride-16 output (no memory, no no_mem_embed)

    @property
    def high_res(self) -> list[torch.Tensor]:
        return [self.level0, self.level1]


@dataclass
class FrameOutput:
    """One object on one slice: what the heads said, and (once encoded) its memory."""

    low_res: torch.Tensor  # (1, 1, L, L) mask logits, L = image_size / 4 (NO_OBJECT_SCORE when absent)
    obj_ptr: torch.Tensor  # (1, 256)
    object_score: torch.Tensor  # (1, 1) logit: > 0 = the object is on this slice
    iou: float  # predicted IoU of the chosen mask (1.0 for a given mask)
    from_prompts: bool  # prompted or given by the user (memory of such masks is binarised)
    memory: torch.Tensor | None = field(default=None, repr=False)  # (1, 64, s, s) bfloat16

    @property
    def present(self) -> bool:
        return bool(self.object_score.item() > 0)


class Sam2Network(nn.Module):
    """SAM 2.1 / MedSAM2 with official parameter names; see the module docstring for the calls."""

    def __init__(self, config: Sam2Config) -> None:
        super().__init__()
        c = config
        self.config = c
        self.image_size = c.image_size
        self.low_res_size = c.image_size // 4
        size = c.feature_size
        # Registration order = the official state_dict order.
        self.maskmem_tpos_enc = nn.Parameter(torch.zeros(c.num_maskmem, 1, 1, c.mem_dim))
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, c.hidden_dim))
        self.no_mem_pos_enc = nn.Parameter(torch.zeros(1, 1, c.hidden_dim))
        self.no_obj_ptr = nn.Parameter(torch.zeros(1, c.hidden_dim))
        self.no_obj_embed_spatial = nn.Parameter(torch.zeros(1, c.mem_dim))
        self.image_encoder = build_image_encoder(
            embed_dim=c.embed_dim, num_heads=c.num_heads, stages=c.stages, global_att_blocks=c.global_att_blocks,
            window_spec=c.window_spec, window_pos_embed_bkg_spatial_size=c.window_pos_embed_bkg_spatial_size,
            d_model=c.hidden_dim, scalp=1)
        self.mask_downsample = nn.Conv2d(1, 1, kernel_size=4, stride=4)
        self.memory_attention = MemoryAttention(d_model=c.hidden_dim, num_layers=c.memory_layers,
                                                dim_feedforward=c.memory_ffn, kv_in_dim=c.mem_dim,
                                                feat_sizes=(size, size))
        self.memory_encoder = MemoryEncoder(out_dim=c.mem_dim, in_dim=c.hidden_dim)
        self.sam_prompt_encoder = PromptEncoder(c.hidden_dim, (size, size), (c.image_size, c.image_size), 16)
        self.sam_mask_decoder = Sam2MaskDecoder(transformer_dim=c.hidden_dim)
        self.obj_ptr_proj = _MLP(c.hidden_dim, c.hidden_dim, c.hidden_dim, 3)
        self.obj_ptr_tpos_proj = nn.Linear(c.hidden_dim, c.mem_dim)

    # ------------------------------------------------------------------ features
    def _check_image(self, image: torch.Tensor) -> None:
        size = self.image_size
        if image.ndim != 4 or image.shape[1] != 3 or tuple(image.shape[-2:]) != (size, size):
            raise ValueError(f"expected a (B, 3, {size}, {size}) tensor, got {tuple(image.shape)}")

    def encode_frame(self, image: torch.Tensor) -> FrameFeatures:
        """(1, 3, S, S) normalised slice -> its three feature levels."""
        self._check_image(image)
        out = self.image_encoder(image)
        level0, level1, top = out["backbone_fpn"]
        dec = self.sam_mask_decoder
        return FrameFeatures(dec.conv_s0(level0), dec.conv_s1(level1), top)

    def top_position(self) -> torch.Tensor:
        """(1, 256, s, s) sine encoding of the top level (the same for every slice)."""
        size = self.config.feature_size
        encoding = self.image_encoder.neck.position_encoding
        return encoding.grid(size, size, self.no_mem_embed.device)[None]

    def pack(self, features: FrameFeatures) -> torch.Tensor:
        """The three levels flattened into one (1, P) tensor (for caches that store one array)."""
        return torch.cat([features.level0.flatten(1), features.level1.flatten(1), features.top.flatten(1)], dim=1)

    def unpack(self, packed: torch.Tensor) -> FrameFeatures:
        """Inverse of :meth:`pack`; raises ValueError when the size does not fit this network."""
        s, c = self.config.feature_size, self.config.hidden_dim
        shapes = [(c // 8, 4 * s, 4 * s), (c // 4, 2 * s, 2 * s), (c, s, s)]
        sizes = [a * b * d for a, b, d in shapes]
        flat = packed.reshape(1, -1)
        if flat.shape[1] != sum(sizes):
            raise ValueError(f"packed features of {flat.shape[1]} values do not fit a {self.image_size}-px SAM 2 "
                             f"network ({sum(sizes)} expected)")
        parts = torch.split(flat, sizes, dim=1)
        levels = [part.reshape(1, *shape) for part, shape in zip(parts, shapes)]
        return FrameFeatures(*levels)

    # ------------------------------------------------------------------ heads
    def _heads(self, top: torch.Tensor, features: FrameFeatures, coords: torch.Tensor | None,
               labels: torch.Tensor | None, mask_input: torch.Tensor | None, multimask: bool,
               gate: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """Prompt encoder + mask decoder on ``top`` -> (best low-res logits, all logits, obj_ptr, score, iou)."""
        if coords is None:
            # No prompt: one padding point, as the official heads do.
            coords = torch.zeros(1, 1, 2, device=top.device)
            labels = -torch.ones(1, 1, dtype=torch.int32, device=top.device)
        prompt_encoder = self.sam_prompt_encoder
        if mask_input is not None and tuple(mask_input.shape[-2:]) != prompt_encoder.mask_input_size:
            mask_input = F.interpolate(mask_input.float(), size=prompt_encoder.mask_input_size,
                                       mode="bilinear", align_corners=False, antialias=True)
        sparse, dense = prompt_encoder(points=(coords, labels), boxes=None, masks=mask_input)
        logits, ious, tokens, score = self.sam_mask_decoder(
            image_embeddings=top, image_pe=prompt_encoder.get_dense_pe(), sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense, multimask_output=multimask, repeat_image=False,
            high_res_features=features.high_res)
        present = score > 0
        if gate:
            logits = torch.where(present[:, None, None], logits, torch.full_like(logits, NO_OBJECT_SCORE))
        logits = logits.float()
        token = tokens[:, 0]
        best = 0
        if multimask:
            best = int(torch.argmax(ious[0]).item())
            if tokens.shape[1] > 1:
                token = tokens[:, best]
        ptr = self.obj_ptr_proj(token)
        weight = present.float()
        ptr = weight * ptr + (1 - weight) * self.no_obj_ptr
        return logits[:, best:best + 1], logits, ptr, score, float(ious[0, best])

    @staticmethod
    def _multimask(points: int, initial: bool) -> bool:
        """The official choice: three masks for 0 or 1 point (on tracked slices always)."""
        return 0 <= points <= 1 if initial else True

    def prompt_frame(self, features: FrameFeatures, coords: torch.Tensor, labels: torch.Tensor,
                     previous_logits: torch.Tensor | None = None) -> FrameOutput:
        """A slice prompted with points (labels 0/1; a box as corner points labelled 2 and 3), no memory.

        ``coords`` (1, N, 2) are in the model frame (S x S pixels); ``previous_logits`` (1, 1, L, L)
        are this slice's earlier output when the prompt corrects it (clamped to +-32 like the official).
        """
        top = features.top + self.no_mem_embed.reshape(1, -1, 1, 1)
        mask_input = None if previous_logits is None else previous_logits.clamp(-32.0, 32.0)
        multimask = self._multimask(int(labels.shape[1]), initial=True)
        low_res, _, ptr, score, iou = self._heads(top, features, coords, labels, mask_input, multimask)
        return FrameOutput(low_res, ptr, score, iou, from_prompts=True)

    def mask_frame(self, features: FrameFeatures, mask: torch.Tensor) -> FrameOutput:
        """A slice given as a (1, 1, S, S) binary mask: the mask is the output (logits -10 / +10)."""
        mask = mask.float()
        high = mask * _MASK_OUT_SCALE + _MASK_OUT_BIAS
        low = F.interpolate(high, size=(high.shape[-2] // 4, high.shape[-1] // 4), mode="bilinear",
                            align_corners=False, antialias=True)
        # The heads see the plain features here (no no_mem_embed), as in the official code.
        _, _, ptr, _, _ = self._heads(features.top, features, None, None, self.mask_downsample(mask), multimask=False)
        present = torch.any(mask.flatten(1) > 0, dim=1)[:, None].float()
        score = _MASK_OUT_SCALE * present + _MASK_OUT_BIAS
        ptr = present * ptr + (1 - present) * self.no_obj_ptr
        return FrameOutput(low, ptr, score, 1.0, from_prompts=True)

    # ------------------------------------------------------------------ memory
    def encode_memory(self, features: FrameFeatures, output: FrameOutput) -> torch.Tensor:
        """The (1, 64, s, s) memory of ``output`` on its slice, rounded to bfloat16 as stored officially."""
        high = F.interpolate(output.low_res, size=(self.image_size, self.image_size), mode="bilinear",
                             align_corners=False)
        mask = (high > 0).float() if output.from_prompts else torch.sigmoid(high)
        mask = mask * _MEMORY_SCALE + _MEMORY_BIAS
        memory = self.memory_encoder(features.top, mask, skip_mask_sigmoid=True)["vision_features"]
        absent = (output.object_score <= 0).float()
        memory = memory + absent[..., None, None] * self.no_obj_embed_spatial[..., None, None]
        return memory.to(torch.bfloat16)

    def memory_position(self) -> torch.Tensor:
        """(1, 64, s, s) sine encoding of the memory features (the same for every slice)."""
        size = self.config.feature_size
        return self.memory_encoder.position_encoding.grid(size, size, self.no_mem_embed.device)[None]

    def track_frame(self, features: FrameFeatures, memories: Sequence[tuple[int, torch.Tensor]],
                    pointers: Sequence[tuple[int, torch.Tensor]], max_pointer_distance: int) -> FrameOutput:
        """A slice conditioned on memory: ``memories`` = (t_pos, bf16 memory) with t_pos 0 for prompted
        slices and 1..6 for the previous ones (6 = adjacent); ``pointers`` = (signed distance, obj_ptr);
        ``max_pointer_distance`` normalises the distances (official: min(slices, 16) - 1).
        """
        c = self.config
        if not memories:
            raise ValueError("tracking needs the memory of at least one prompted slice")
        position = self.memory_position().flatten(2).permute(2, 0, 1)  # (s*s, 1, 64)
        tokens, token_pos = [], []
        for t_pos, memory in memories:
            tokens.append(memory.float().flatten(2).permute(2, 0, 1))
            token_pos.append(position + self.maskmem_tpos_enc[c.num_maskmem - t_pos - 1])
        pointer_tokens = 0
        if pointers:
            distances = torch.tensor([float(d) for d, _ in pointers], device=position.device)
            ptrs = torch.stack([p for _, p in pointers], dim=0)  # (P, 1, 256)
            ptr_pos = self.obj_ptr_tpos_proj(sine_1d(distances / max(max_pointer_distance, 1), c.hidden_dim))
            ptr_pos = ptr_pos.unsqueeze(1)  # (P, 1, 64)
            split = c.hidden_dim // c.mem_dim
            # Each 256-d pointer becomes 4 tokens of 64 channels sharing its position.
            ptrs = ptrs.reshape(-1, 1, split, c.mem_dim).permute(0, 2, 1, 3).flatten(0, 1)
            tokens.append(ptrs)
            token_pos.append(ptr_pos.repeat_interleave(split, dim=0))
            pointer_tokens = ptrs.shape[0]
        memory = torch.cat(tokens, dim=0)
        memory_pos = torch.cat(token_pos, dim=0)
        size = c.feature_size
        current = features.top.flatten(2).permute(2, 0, 1)
        current_pos = self.top_position().flatten(2).permute(2, 0, 1)
        conditioned = self.memory_attention(current, memory, current_pos, memory_pos, num_obj_ptr_tokens=pointer_tokens)
        top = conditioned.permute(1, 2, 0).reshape(1, c.hidden_dim, size, size)
        low_res, _, ptr, score, iou = self._heads(top, features, None, None, None, multimask=True)
        return FrameOutput(low_res, ptr, score, iou, from_prompts=False)

    # ------------------------------------------------------------------ SAM-1-style interface
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """(1, 3, S, S) -> packed (1, P) features (see :meth:`pack`)."""
        return self.pack(self.encode_frame(image))

    def decode(self, packed: torch.Tensor, point_coords: torch.Tensor | None = None,
               point_labels: torch.Tensor | None = None, boxes: torch.Tensor | None = None,
               mask_input: torch.Tensor | None = None,
               multimask_output: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Single-slice prompting (the official image predictor): -> (B, M, L, L) logits, (B, M) IoU.

        B prompt sets (points (B, N, 2), boxes (B, 4)) share the one slice's features (broadcast,
        not copied). A box becomes two corner points (labels 2, 3) placed before the clicks.
        """
        if (point_coords is None) != (point_labels is None):
            raise ValueError("point_coords and point_labels must be given together")
        features = self.unpack(packed)
        coords, labels = point_coords, point_labels
        if boxes is not None:
            corners = boxes.reshape(-1, 2, 2).float()
            corner_labels = torch.tensor([[2, 3]], dtype=torch.int32, device=corners.device).expand(len(corners), 2)
            if coords is None:
                coords, labels = corners, corner_labels
            else:
                coords = torch.cat([corners, coords.float()], dim=1)
                labels = torch.cat([corner_labels, labels.to(torch.int32)], dim=1)
        if coords is None and mask_input is None:
            raise ValueError("give at least one point, a box or a previous mask")
        if coords is None:
            coords = torch.zeros(1, 1, 2, device=packed.device)
            labels = -torch.ones(1, 1, dtype=torch.int32, device=packed.device)
        batch = coords.shape[0]
        top = (features.top + self.no_mem_embed.reshape(1, -1, 1, 1)).expand(batch, -1, -1, -1)
        high_res = [level.expand(batch, -1, -1, -1) for level in features.high_res]
        sparse, dense = self.sam_prompt_encoder(points=(coords, labels.to(torch.int32)), boxes=None, masks=mask_input)
        logits, ious, _, _ = self.sam_mask_decoder(
            image_embeddings=top, image_pe=self.sam_prompt_encoder.get_dense_pe(), sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense, multimask_output=multimask_output, repeat_image=False,
            high_res_features=high_res)
        return logits.float().clamp(-32.0, 32.0), ious


def _config(arch: str, overrides: Mapping[str, Any]) -> Sam2Config:
    if arch not in SAM2_PRESETS:
        raise ValueError(f"unknown SAM 2 architecture {arch!r}; choose one of {', '.join(SAM2_ARCHITECTURES)}")
    unknown = set(overrides) - _OVERRIDES
    if unknown:
        raise ValueError(f"unknown overrides for {arch}: {sorted(unknown)}; allowed: {sorted(_OVERRIDES)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return replace(SAM2_PRESETS[arch], **values)


def build_sam2(arch: str, **overrides: Any) -> Sam2Network:
    """An untrained ``arch`` network (``overrides`` for reduced test variants, e.g. embed_dim=16)."""
    return Sam2Network(_config(arch, overrides))


def load_sam2(arch: str, state_dict: Mapping[str, torch.Tensor], **overrides: Any) -> Sam2Network:
    """Build ``arch`` without random weights and load ``state_dict`` (the inner ``['model']``) strictly."""
    config = _config(arch, overrides)
    with torch.device("meta"):
        net = Sam2Network(config)
    tensors = {key: (value.float() if value.is_floating_point() else value) for key, value in state_dict.items()}
    try:
        net.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else "shape or key mismatch")
        raise MedSamError(
            f"these weights do not fit the SAM 2 {arch!r} network ({detail[:300]}); "
            "choose the model type that matches the checkpoint file"
        ) from exc
    return net.eval()
