"""SAM 3's geometry encoder (point and box prompts) and the prompt assembly before the fusion encoder.

SAM 3 turns every point or box prompt into one token of width ``d`` (the detector width) and appends a
learned CLS token, so the prompt sequence is never empty. Coordinates are normalised to [0, 1]: points as
``(x, y)``, boxes as ``(cx, cy, w, h)``. A token is the sum of

* a direct projection of the raw coordinates (``Linear(2, d)`` / ``Linear(4, d)``);
* pooled image features: the 72 x 72 neck level is layer-normalised over channels, then a point reads it
  by bilinear ``grid_sample`` (``align_corners=False``, zeros outside) followed by ``Linear(d, d)``, and a
  box by 7 x 7 RoI-align (:func:`roi_align`) followed by a ``7 x 7`` convolution without padding, i.e. a
  linear map of the whole 7 x 7 x d patch to d;
* a projection of the sine code of the position (:class:`~.position.PositionEmbeddingSine`): points use
  ``(x code, y code)`` (``Linear(d, d)``), boxes the centre's ``(y code, x code, h, w)`` (``Linear(d + 2, d)``);
* a label embedding (``Embedding(2, d)``: 0 negative, 1 positive).

Points come first, then boxes, then CLS; each group is right-padded per batch item and the groups are
joined so that the valid tokens stay contiguous (:func:`concat_padded`). The sequence then goes through
``LayerNorm(final_proj(.))``, ``num_layers`` pre-norm layers (:class:`~.fusion.EncoderLayer`: self-attention
over the prompt tokens with their padding mask, cross-attention to the *raw* (not normalised) 72 x 72 image
tokens with the image position code added to the keys, ReLU feed-forward) and a last LayerNorm
(``encode_norm``). Without any point or box the result is the encoded CLS token alone.

The prompt given to the fusion encoder is ``[text tokens; geometry tokens]`` (:func:`assemble_prompt`) with
the masks joined the same way (plain concatenation: the text part keeps its padding in the middle). A
box-only prompt still carries text: the official processor encodes the dummy phrase ``"visual"``.

RoI-align follows torchvision's pure-PyTorch ``_roi_align`` (which the official code falls back to on CPU):
boxes in pixels of the feature map, ``aligned=False`` (no half-pixel shift, box sides clamped to >= 1),
adaptive sampling ``ceil(side / 7)`` points per bin and axis, sample coordinates clamped at 0 and at the
last row/column (no zeroing outside the map). Bilinear weights are separable, so the pooling is written
as two small matrix products per box, ``A_y F A_x^T``, instead of gathering every sample.

Module and parameter names equal the official checkpoint keys under ``detector.geometry_encoder.`` so that
subset loads with ``strict=True`` (:func:`geometry_state_dict` extracts it). Sequence tensors are
seq-first ``[L, B, C]``; masks are ``[B, L]`` with True = padding, as in the official code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fusion import EncoderLayer, sub_state_dict
from .position import PositionEmbeddingSine

__all__ = [
    "GEOMETRY_PREFIX",
    "GeometryConfig",
    "GeometryEncoder",
    "assemble_prompt",
    "box_cxcywh_to_xyxy",
    "build_geometry_encoder",
    "concat_padded",
    "geometry_state_dict",
    "infer_geometry_config",
    "roi_align",
]

GEOMETRY_PREFIX = "detector.geometry_encoder."


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``[..., 4]`` centre/size boxes -> corner boxes ``(x0, y0, x1, y1)``."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def _axis_weights(start: Tensor, bin_size: Tensor, grid: Tensor, pooled: int, size: int) -> Tensor:
    """Per box, the averaged bilinear weights of one axis: ``[K, pooled, size]`` (row ``p`` sums to 1 or 0).

    Sample ``i`` of bin ``p`` sits at ``start + p * bin + (i + 0.5) * bin / grid`` for ``i < grid``;
    coordinates are clamped at 0, and from the last cell on both neighbours are the last cell.
    """
    k = start.shape[0]
    device = start.device
    n_max = min(int(grid.max().item()), size) if k else 0  # the reference never takes more than `size` samples
    out = torch.zeros(k, pooled, size, dtype=start.dtype, device=device)
    if n_max == 0:
        return out
    p = torch.arange(pooled, device=device)
    i = torch.arange(n_max, device=device)
    coord = (start[:, None, None] + p[None, :, None] * bin_size[:, None, None]
             + (i[None, None, :] + 0.5).to(start.dtype) * (bin_size / grid)[:, None, None])  # [K, P, I]
    valid = (i[None, :] < grid[:, None])[:, None, :].expand_as(coord)
    coord = coord.clamp(min=0)
    low = coord.to(torch.int64)  # truncation == floor for coord >= 0
    last = low >= size - 1
    high = torch.where(last, size - 1, low + 1)
    low = torch.where(last, size - 1, low)
    frac = coord - low.to(coord.dtype)
    w_low = (1.0 - frac) * valid
    w_high = frac * valid
    out.scatter_add_(2, low, w_low)
    out.scatter_add_(2, high, w_high)
    return out / grid.clamp(min=1)[:, None, None]


def roi_align(features: Tensor, rois: Tensor, output_size: int | tuple[int, int], spatial_scale: float = 1.0,
              sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """Average RoI-align of ``features`` ``[N, C, H, W]`` for ``rois`` ``[K, 5]`` = (batch index, x0, y0, x1, y1).

    Semantics of torchvision's pure-PyTorch implementation (see the module docstring); returns
    ``[K, C, out_h, out_w]``. ``sampling_ratio > 0`` fixes the samples per bin and axis.
    """
    out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else output_size
    _, _, height, width = features.shape
    rois = rois.to(features.dtype)
    offset = 0.5 if aligned else 0.0
    x0 = rois[:, 1] * spatial_scale - offset
    y0 = rois[:, 2] * spatial_scale - offset
    x1 = rois[:, 3] * spatial_scale - offset
    y1 = rois[:, 4] * spatial_scale - offset
    roi_w = x1 - x0
    roi_h = y1 - y0
    if not aligned:
        roi_w = roi_w.clamp(min=1.0)
        roi_h = roi_h.clamp(min=1.0)
    bin_h = roi_h / out_h
    bin_w = roi_w / out_w
    if sampling_ratio > 0:
        grid_h = torch.full_like(roi_h, float(sampling_ratio))
        grid_w = torch.full_like(roi_w, float(sampling_ratio))
    else:
        grid_h = torch.ceil(roi_h / out_h)
        grid_w = torch.ceil(roi_w / out_w)
    a_y = _axis_weights(y0, bin_h, grid_h, out_h, height)  # [K, out_h, H]
    a_x = _axis_weights(x0, bin_w, grid_w, out_w, width)  # [K, out_w, W]
    batch = rois[:, 0].to(torch.int64)
    feats = features[batch]  # [K, C, H, W]
    return a_y[:, None] @ feats @ a_x[:, None].transpose(-1, -2)


def concat_padded(seq1: Tensor, mask1: Tensor, seq2: Tensor, mask2: Tensor) -> tuple[Tensor, Tensor]:
    """Join two right-padded seq-first sequences so that each batch item's valid tokens stay contiguous.

    ``seq*``: ``[L*, B, C]``; ``mask*``: ``[B, L*]`` (True = padding, padding only at the end). Item ``b``
    gets ``seq1[:, b]`` at positions ``0..L1-1`` and ``seq2[:, b]`` from position ``n1_b`` (its count of
    valid ``seq1`` tokens) on; the joined mask is True from ``n1_b + n2_b`` on.
    """
    l1, batch, dim = seq1.shape
    l2 = seq2.shape[0]
    n1 = (~mask1).sum(dim=1)
    n2 = (~mask2).sum(dim=1)
    mask = torch.arange(l1 + l2, device=seq2.device)[None, :] >= (n1 + n2)[:, None]
    out = torch.zeros(l1 + l2, batch, dim, dtype=seq2.dtype, device=seq2.device)
    out[:l1] = seq1
    index = (torch.arange(l2, device=seq2.device)[:, None] + n1[None, :])[..., None].expand(l2, batch, dim)
    return out.scatter(0, index, seq2), mask


def assemble_prompt(text_features: Tensor, text_mask: Tensor, geo_tokens: Tensor,
                    geo_mask: Tensor) -> tuple[Tensor, Tensor]:
    """The fusion encoder's prompt: ``[T + G, B, C]`` text then geometry tokens, mask ``[B, T + G]``."""
    return torch.cat((text_features, geo_tokens), dim=0), torch.cat((text_mask, geo_mask), dim=1)


@dataclass(frozen=True)
class GeometryConfig:
    """Hyper-parameters of the geometry encoder (defaults: the official full-size model)."""

    d_model: int = 256
    num_layers: int = 3
    num_heads: int = 8
    dim_feedforward: int = 2048
    roi_size: int = 7


class GeometryEncoder(nn.Module):
    """Points/boxes + CLS -> encoded prompt tokens (see the module docstring); keys as ``geometry_encoder.``."""

    def __init__(self, config: GeometryConfig = GeometryConfig()) -> None:
        super().__init__()
        d = config.d_model
        self.config = config
        self.d_model = d
        self.roi_size = config.roi_size
        self.pos_enc = PositionEmbeddingSine(d)
        self.label_embed = nn.Embedding(2, d)
        self.cls_embed = nn.Embedding(1, d)
        self.points_direct_project = nn.Linear(2, d)
        self.points_pool_project = nn.Linear(d, d)
        self.points_pos_enc_project = nn.Linear(d, d)
        self.boxes_direct_project = nn.Linear(4, d)
        self.boxes_pool_project = nn.Conv2d(d, d, config.roi_size)
        self.boxes_pos_enc_project = nn.Linear(d + 2, d)
        self.final_proj = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.img_pre_norm = nn.LayerNorm(d)
        self.encode = nn.ModuleList(
            EncoderLayer(d, config.num_heads, config.dim_feedforward, pos_at_self_attn=False,
                         pos_at_cross_keys=True, batch_first=False)
            for _ in range(config.num_layers))
        self.encode_norm = nn.LayerNorm(d)

    def _encode_points(self, points: Tensor, labels: Tensor, image: Tensor) -> Tensor:
        n, b = points.shape[:2]
        embed = self.points_direct_project(points)
        grid = points.transpose(0, 1).unsqueeze(2) * 2 - 1  # [B, N, 1, 2] in [-1, 1]
        sampled = F.grid_sample(image, grid, align_corners=False)  # [B, C, N, 1]
        embed = embed + self.points_pool_project(sampled.squeeze(-1).permute(2, 0, 1))
        x, y = points.unbind(-1)
        enc_x, enc_y = self.pos_enc._encode_xy(x.flatten(), y.flatten())
        enc = torch.cat((enc_x.view(n, b, enc_x.shape[-1]), enc_y.view(n, b, enc_y.shape[-1])), dim=-1)
        embed = embed + self.points_pos_enc_project(enc)
        return self.label_embed(labels.long()) + embed

    def _encode_boxes(self, boxes: Tensor, labels: Tensor, image: Tensor) -> Tensor:
        n, b = boxes.shape[:2]
        embed = self.boxes_direct_project(boxes)
        h, w = image.shape[-2:]
        scale = torch.tensor([w, h, w, h], dtype=boxes.dtype, device=boxes.device)
        xyxy = (box_cxcywh_to_xyxy(boxes) * scale).float().transpose(0, 1).reshape(b * n, 4)  # batch-major
        batch_idx = torch.arange(b, device=boxes.device, dtype=xyxy.dtype).repeat_interleave(n)
        pooled = roi_align(image, torch.cat((batch_idx[:, None], xyxy), dim=1), self.roi_size)
        embed = embed + self.boxes_pool_project(pooled).view(b, n, self.d_model).transpose(0, 1)
        cx, cy, bw, bh = boxes.unbind(-1)
        enc = self.pos_enc.encode_boxes(cx.flatten(), cy.flatten(), bw.flatten(), bh.flatten())
        embed = embed + self.boxes_pos_enc_project(enc.view(n, b, enc.shape[-1]))
        return self.label_embed(labels.long()) + embed

    def forward(self, image: Tensor, image_pos: Tensor, *, boxes: Tensor | None = None,
                box_labels: Tensor | None = None, box_mask: Tensor | None = None, points: Tensor | None = None,
                point_labels: Tensor | None = None, point_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Encode the geometric prompt of each image of the batch.

        ``image``, ``image_pos``: ``[B, C, H, W]`` (the 72 x 72 neck level, raw, and its sine code).
        ``boxes``: ``[Nb, B, 4]`` normalised cx, cy, w, h; ``points``: ``[Np, B, 2]`` normalised x, y;
        ``*_labels``: ``[N, B]`` (bool or int: 1 positive, 0 negative; default positive);
        ``*_mask``: ``[B, N]`` bool, True = padding (default none). Missing groups count as empty.
        Returns ``(tokens [Np + Nb + 1, B, C], mask [B, Np + Nb + 1])``, valid tokens first, CLS last.
        """
        b, c = image.shape[:2]
        device, dtype = image.device, image.dtype
        if points is None:
            points = torch.zeros(0, b, 2, device=device, dtype=dtype)
        if boxes is None:
            boxes = torch.zeros(0, b, 4, device=device, dtype=dtype)
        if point_labels is None:
            point_labels = torch.ones(points.shape[:2], dtype=torch.long, device=device)
        if box_labels is None:
            box_labels = torch.ones(boxes.shape[:2], dtype=torch.long, device=device)
        if point_mask is None:
            point_mask = torch.zeros(b, points.shape[0], dtype=torch.bool, device=device)
        if box_mask is None:
            box_mask = torch.zeros(b, boxes.shape[0], dtype=torch.bool, device=device)

        memory = image.flatten(2).permute(2, 0, 1)  # [HW, B, C] raw tokens for cross-attention
        memory_pos = image_pos.flatten(2).permute(2, 0, 1)
        normed = self.img_pre_norm(memory).permute(1, 2, 0).reshape(image.shape)  # pooling source

        tokens = self._encode_points(points, point_labels, normed)
        tokens, mask = concat_padded(tokens, point_mask, self._encode_boxes(boxes, box_labels, normed), box_mask)
        cls = self.cls_embed.weight.view(1, 1, self.d_model).expand(1, b, self.d_model)
        tokens, mask = concat_padded(tokens, mask, cls, torch.zeros(b, 1, dtype=torch.bool, device=device))
        tokens = self.norm(self.final_proj(tokens))
        for layer in self.encode:
            tokens = layer(tokens, memory, memory_pos=memory_pos, tgt_key_padding_mask=mask)
        return self.encode_norm(tokens), mask

    def encode_prompt(self, text_features: Tensor, text_mask: Tensor, image: Tensor, image_pos: Tensor,
                      **geometry: Tensor | None) -> tuple[Tensor, Tensor]:
        """Text tokens ``[T, B, C]`` / mask ``[B, T]`` + this encoder's tokens -> the fusion encoder's prompt."""
        geo_tokens, geo_mask = self(image, image_pos, **geometry)
        return assemble_prompt(text_features, text_mask, geo_tokens, geo_mask)


def geometry_state_dict(checkpoint: Mapping[str, Tensor], prefix: str = GEOMETRY_PREFIX) -> dict[str, Tensor]:
    """The geometry encoder's entries of an EfficientSAM3 state dict (``detector.`` prefix optional), prefix removed."""
    return sub_state_dict(checkpoint, prefix)


def infer_geometry_config(state: Mapping[str, Tensor], num_heads: int = 8) -> GeometryConfig:
    """Config of a geometry-encoder state dict (from :func:`geometry_state_dict`); heads must be given."""
    layers = {int(k.split(".")[1]) for k in state if k.startswith("encode.")}
    if layers != set(range(len(layers))):
        raise ValueError(f"geometry encoder layers are not numbered 0..n-1: {sorted(layers)}")
    if state["label_embed.weight"].shape[0] != 2:
        raise ValueError("geometry encoders that encode boxes as points (6 labels) are not supported")
    d_model = int(state["cls_embed.weight"].shape[1])
    ffn = int(state["encode.0.linear1.weight"].shape[0]) if layers else 4 * d_model
    roi = int(state["boxes_pool_project.weight"].shape[-1])
    if d_model % num_heads:
        raise ValueError(f"d_model {d_model} is not divisible by {num_heads} heads")
    return GeometryConfig(d_model=d_model, num_layers=len(layers), num_heads=num_heads, dim_feedforward=ffn,
                          roi_size=roi)


def build_geometry_encoder(config: GeometryConfig = GeometryConfig(),
                           state: Mapping[str, Tensor] | None = None) -> GeometryEncoder:
    """A geometry encoder in eval mode; ``state`` (from :func:`geometry_state_dict`) is loaded with ``strict=True``."""
    model = GeometryEncoder(config)
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model.eval()
