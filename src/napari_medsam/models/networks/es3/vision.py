"""EfficientSAM3's image side: slice preprocessing, the EfficientViT student, its head and SAM 3's neck.

SAM 3 encodes a 1008 x 1008 image with a large ViT into a 72 x 72 grid of 1024-channel tokens.
EfficientSAM3 replaces that ViT by a small convolutional student whose output imitates it:

1. **Preprocessing** (:func:`preprocess_slice`, the official processor's torchvision-v2 chain): the uint8
   RGB slice is stretched to ``R x R`` (R = 1008) by bilinear interpolation with antialiasing computed
   *on uint8* (so the result is rounded to integers), then multiplied by the float32 constant ``1/255``
   and mapped to [-1, 1] by ``(x - 0.5) / 0.5``. Float slices follow the official convention, intensities
   in [0, 1] turned into uint8 as ``trunc(x * 255.999)``; a CT/MR slice is meant to be windowed to uint8
   by the caller first (e.g. :func:`napari_medsam.models.pipelines.ct_window_uint8`).
2. **EfficientViT trunk** (Cai et al., ICCV 2023; b0: widths 8/16/32/64/128): a stride-2 3x3 conv stem
   with depthwise-separable residual blocks, two stages of inverted-bottleneck (MBConv) blocks, then two
   stages that open with a stride-2 MBConv and continue with EfficientViT blocks. Each EfficientViT block is
   a residual *multi-scale linear attention* (LiteMLA) followed by a residual MBConv. Every conv is followed
   by BatchNorm (eval mode: running statistics) unless noted, activations are hard-swish. Five stride-2
   steps take 1008 to 32 (``ceil`` halving: 504, 252, 126, 63, 32).
3. **LiteMLA**: a 1x1 conv gives q, k, v (``heads`` groups of ``3 * dim`` channels, q/k/v consecutive within a
   group); per extra scale (kernel 5 in b0) a depthwise 5x5 conv plus a grouped 1x1 conv (one group per
   q, k or v of a head) adds another set of heads built from neighbourhoods. Each head computes ReLU linear
   attention over all ``N = H * W`` positions, ``out_n = (sum_m v_m relu(k_m)^T) relu(q_n) /
   (sum_m relu(k_m)^T relu(q_n) + eps)`` (cost linear in N); on maps with ``N <= dim`` the official code
   uses the equivalent quadratic form instead, and so does this one. A 1x1 conv + BN projects the
   concatenated heads back to the block width.
4. **Student head** (``ImageStudentEncoder``): 1x1 conv (no bias), BN, exact GELU, 3x3 conv to the neck
   width (1024, SAM 3's ViT width), then a bilinear resize (align_corners False) of the 32 x 32 map to the
   72 x 72 token grid.
5. **Neck** (SAM 3's ``Sam3DualViTDetNeck``, a ViTDet "simple feature pyramid"): one branch per scale factor,
   4: two stride-2 transposed 2x2 convs with a GELU between (width / 2, then / 4); 2: one transposed conv
   (width / 2); 1: nothing; 0.5: 2x2 max-pooling; each branch ends with a 1x1 and a 3x3 conv to
   ``d_model`` (256). The detector drops the coarsest level (``scalp = 1``): its weights are in the
   checkpoints, but no output depends on it, so it is not computed here. The kept levels are 288², 144²
   and 72² (highest resolution first); each gets the fixed sine position code of its grid
   (:class:`~.position.PositionEmbeddingSine`, ``d_model`` channels).

Module and parameter names equal the official checkpoint keys under ``detector.backbone.vision_backbone.``
(the trunk sits at ``trunk.model.backbone.model.*``, the head at ``trunk.model.head.*``, the neck at
``convs.*``), so that subset loads with ``strict=True`` (:func:`vision_state_dict` extracts it). Only the
EfficientViT students (b0, b1, b2) are implemented; the RepViT and TinyViT students are not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .position import PositionEmbeddingSine
from .text import text_state_dict

__all__ = [
    "EFFICIENTVIT_B0",
    "EFFICIENTVIT_B1",
    "EFFICIENTVIT_B2",
    "ES3_VISION_B0",
    "VISION_PREFIX",
    "EfficientVitBackbone",
    "EfficientVitConfig",
    "ImageStudentEncoder",
    "VisionBackbone",
    "VisionConfig",
    "VisionOutput",
    "build_vision_backbone",
    "infer_vision_config",
    "preprocess_slice",
    "resize_slice_u8",
    "vision_state_dict",
]

VISION_PREFIX = "detector.backbone.vision_backbone."


# --- preprocessing -----------------------------------------------------------------------------------


def _slice_to_u8(image: np.ndarray) -> np.ndarray:
    """A 2-D slice or an (H, W, 1|3) image as uint8 ``(H, W)`` or ``(H, W, 3)``, with clear errors otherwise."""
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3):
        raise ValueError(
            f"expected one slice, (H, W) or an RGB image (H, W, 3), got an array of shape {array.shape}; "
            "pass a single 2-D slice of a volume")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"the slice is empty (shape {array.shape})")
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError("the slice has NaN or infinite values; window it to uint8 first")
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 1.0:
            raise ValueError(
                f"a float slice is read as intensities in [0, 1] (the official processor's convention), got "
                f"values in [{low:.4g}, {high:.4g}]; window CT/MR slices to uint8 first (pipelines.ct_window_uint8)")
        # torchvision's ToDtype(uint8, scale=True) on floats: multiply by 256 - 1e-3 and truncate
        return torch.from_numpy(np.ascontiguousarray(array)).mul(255.999).to(torch.uint8).numpy()
    raise ValueError(f"expected a uint8 (or float in [0, 1]) slice, got dtype {array.dtype}; "
                     "window CT/MR intensities to uint8 first (pipelines.ct_window_uint8)")


def _check_resolution(resolution: int) -> int:
    if int(resolution) != resolution or resolution < 1:
        raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
    return int(resolution)


def _resize_chw_u8(planes: torch.Tensor, resolution: int) -> torch.Tensor:
    """``[C, H, W]`` uint8 -> ``[C, R, R]`` uint8: antialiased bilinear (half-pixel centres) computed on uint8.

    torch's CPU kernel for uint8 works in fixed point and rounds once at the end; it is the kernel
    torchvision v2's ``Resize`` calls for uint8 images on CPU, so the result equals the official one to the bit.
    """
    out = F.interpolate(planes[None], size=(resolution, resolution), mode="bilinear", align_corners=False,
                        antialias=True)
    return out[0]


def resize_slice_u8(image: np.ndarray, resolution: int = 1008) -> np.ndarray:
    """The uint8 stretch of a slice to ``resolution x resolution`` (step 1 of :func:`preprocess_slice`).

    Returns ``(R, R)`` for a 2-D slice (or ``(H, W, 1)``), ``(R, R, 3)`` for an RGB image.
    """
    resolution = _check_resolution(resolution)
    u8 = _slice_to_u8(image)
    planes = torch.from_numpy(np.ascontiguousarray(u8 if u8.ndim == 2 else u8.transpose(2, 0, 1)))
    if u8.ndim == 2:
        return _resize_chw_u8(planes[None], resolution)[0].numpy()
    return _resize_chw_u8(planes, resolution).permute(1, 2, 0).numpy()


def preprocess_slice(image: np.ndarray, resolution: int = 1008) -> torch.Tensor:
    """A slice as the network input ``[1, 3, R, R]`` float32 in [-1, 1], bit-exact to the official processor.

    ``image``: uint8 ``(H, W)`` (grey, repeated on the three channels like a PIL RGB image of it),
    ``(H, W, 1)`` or ``(H, W, 3)`` RGB; float images are read as intensities in [0, 1] and converted to
    uint8 the official way first. Window CT/MR slices to uint8 before calling (values outside [0, 1] in
    a float slice are an error, not clipped). The output is stretched to a square, whatever the aspect
    ratio (the official processor does not pad).
    """
    resolution = _check_resolution(resolution)
    u8 = _slice_to_u8(image)
    planes = torch.from_numpy(np.ascontiguousarray(u8[None] if u8.ndim == 2 else u8.transpose(2, 0, 1)))
    resized = _resize_chw_u8(planes, resolution)  # a grey slice is resized once, then repeated
    # ToDtype(float32, scale=True) multiplies by the float32 1/255 (dividing by 255 differs by 1 ulp at places);
    # Normalize(0.5, 0.5) then subtracts and divides (exact: a division by 0.5)
    x = (resized.float() * (1.0 / 255) - 0.5) / 0.5
    return x.expand(3, -1, -1).contiguous()[None]


# --- EfficientViT trunk ------------------------------------------------------------------------------


def _activation(name: str | None) -> nn.Module | None:
    """The official activation names (EfficientViT's registry); None for no activation."""
    if name is None:
        return None
    table = {"hswish": nn.Hardswish, "relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU}
    if name == "gelu":
        return nn.GELU(approximate="tanh")  # EfficientViT's "gelu" is the tanh approximation
    if name not in table:
        raise ValueError(f"unknown activation {name!r} (expected one of {sorted([*table, 'gelu'])})")
    return table[name]()


class ConvLayer(nn.Module):
    """Conv (``same`` padding for odd kernels), optional BatchNorm, optional activation: children ``conv``,
    ``norm``, ``act`` as in EfficientViT's checkpoints (a missing norm has no keys)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1, bias: bool = False,
                 norm: bool = True, act: str | None = None) -> None:
        super().__init__()
        if kernel % 2 == 0:
            raise ValueError(f"kernel size must be odd, got {kernel}")
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=bias)
        self.norm = nn.BatchNorm2d(cout) if norm else None
        self.act = _activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.act is not None:
            x = self.act(x)
        return x


class DSConv(nn.Module):
    """Depthwise 3x3 conv (with activation) then pointwise conv (no activation)."""

    def __init__(self, cin: int, cout: int, stride: int, act: str, fewer_norm: bool = False) -> None:
        super().__init__()
        self.depth_conv = ConvLayer(cin, cin, 3, stride, groups=cin, bias=fewer_norm, norm=not fewer_norm, act=act)
        self.point_conv = ConvLayer(cin, cout, 1, norm=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.point_conv(self.depth_conv(x))


class MBConv(nn.Module):
    """Inverted bottleneck: 1x1 expansion, depthwise 3x3 (stride), 1x1 projection (BN, no activation).

    ``fewer_norm`` (the blocks of the attention stages): the first two convs carry a bias instead of a BN.
    """

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: float, act: str,
                 fewer_norm: bool = False) -> None:
        super().__init__()
        mid = round(cin * expand_ratio)
        self.inverted_conv = ConvLayer(cin, mid, 1, bias=fewer_norm, norm=not fewer_norm, act=act)
        self.depth_conv = ConvLayer(mid, mid, 3, stride, groups=mid, bias=fewer_norm, norm=not fewer_norm, act=act)
        self.point_conv = ConvLayer(mid, cout, 1, norm=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.point_conv(self.depth_conv(self.inverted_conv(x)))


class LiteMLA(nn.Module):
    """Multi-scale ReLU linear attention (see the module docstring); width kept, ``heads = width // dim``."""

    def __init__(self, channels: int, dim: int, heads_ratio: float = 1.0, scales: Sequence[int] = (5,),
                 eps: float = 1e-15) -> None:
        super().__init__()
        heads = int(channels // dim * heads_ratio)
        total = heads * dim
        self.dim = dim
        self.eps = eps
        self.qkv = ConvLayer(channels, 3 * total, 1, norm=False)
        self.aggreg = nn.ModuleList([
            nn.Sequential(
                nn.Conv2d(3 * total, 3 * total, s, padding=s // 2, groups=3 * total, bias=False),
                nn.Conv2d(3 * total, 3 * total, 1, groups=3 * heads, bias=False),
            )
            for s in scales
        ])
        self.proj = ConvLayer(total * (1 + len(scales)), channels, 1, norm=True)

    def _attend(self, qkv: torch.Tensor) -> torch.Tensor:
        b, _, h, w = qkv.shape
        d = self.dim
        groups = qkv.float().reshape(b, -1, 3 * d, h * w)  # [B, heads, 3 dim, N]
        q = F.relu(groups[:, :, :d])
        k = F.relu(groups[:, :, d:2 * d])
        v = groups[:, :, 2 * d:]
        if h * w > d:  # linear form: a dim x dim summary of all positions, then one product per query
            num = (v @ k.transpose(-1, -2)) @ q
            den = k.sum(dim=-1, keepdim=True).transpose(-1, -2) @ q
            out = num / (den + self.eps)
        else:  # tiny maps: the N x N attention matrix, normalised over the keys
            att = k.transpose(-1, -2) @ q
            out = v @ (att / (att.sum(dim=2, keepdim=True) + self.eps))
        return out.reshape(b, -1, h, w).to(qkv.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)
        qkv = torch.cat([qkv, *(branch(qkv) for branch in self.aggreg)], dim=1)
        return self.proj(self._attend(qkv))


class Residual(nn.Module):
    """``main(x) + x`` (``shortcut``) or ``main(x)`` alone; the main branch's keys read ``main.*``."""

    def __init__(self, main: nn.Module, shortcut: bool) -> None:
        super().__init__()
        self.main = main
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.main(x)
        return y + x if self.shortcut else y


class EfficientVitBlock(nn.Module):
    """Residual LiteMLA (``context_module``), then residual fewer-norm MBConv (``local_module``)."""

    def __init__(self, channels: int, dim: int, expand_ratio: float, act: str, heads_ratio: float = 1.0,
                 scales: Sequence[int] = (5,)) -> None:
        super().__init__()
        self.context_module = Residual(LiteMLA(channels, dim, heads_ratio, scales), shortcut=True)
        self.local_module = Residual(MBConv(channels, channels, 1, expand_ratio, act, fewer_norm=True), shortcut=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.local_module(self.context_module(x))


class OpSequential(nn.Module):
    """Blocks run in order; children under ``op_list`` as in the checkpoints."""

    def __init__(self, ops: Sequence[nn.Module]) -> None:
        super().__init__()
        self.op_list = nn.ModuleList(ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for op in self.op_list:
            x = op(x)
        return x


@dataclass(frozen=True)
class EfficientVitConfig:
    """EfficientViT backbone sizes (defaults: b0). Stage ``i`` has width ``width_list[i]``; the stem and the
    two local stages repeat ``depth_list[i]`` blocks, the attention stages one stride-2 MBConv plus
    ``depth_list[i]`` EfficientViT blocks with ``dim`` channels per attention head."""

    width_list: tuple[int, ...] = (8, 16, 32, 64, 128)
    depth_list: tuple[int, ...] = (1, 2, 2, 2, 2)
    dim: int = 16
    expand_ratio: float = 4.0
    in_channels: int = 3
    act: str = "hswish"
    heads_ratio: float = 1.0
    scales: tuple[int, ...] = (5,)

    def __post_init__(self) -> None:
        if len(self.width_list) != len(self.depth_list) or len(self.width_list) < 3:
            raise ValueError(f"width_list {self.width_list} and depth_list {self.depth_list} must have the same "
                             "length, at least 3")

    @property
    def out_channels(self) -> int:
        return self.width_list[-1]


EFFICIENTVIT_B0 = EfficientVitConfig()
EFFICIENTVIT_B1 = EfficientVitConfig(width_list=(16, 32, 64, 128, 256), depth_list=(1, 2, 3, 3, 4), dim=16)
EFFICIENTVIT_B2 = EfficientVitConfig(width_list=(24, 48, 96, 192, 384), depth_list=(1, 3, 4, 4, 6), dim=32)


def _local_block(cin: int, cout: int, stride: int, expand_ratio: float, act: str,
                 fewer_norm: bool = False) -> nn.Module:
    if expand_ratio == 1:
        return DSConv(cin, cout, stride, act, fewer_norm)
    return MBConv(cin, cout, stride, expand_ratio, act, fewer_norm)


class EfficientVitBackbone(nn.Module):
    """EfficientViT b-series trunk, ``[B, 3, H, W] -> [B, width_list[-1], H / 32, W / 32]`` (sizes rounded up)."""

    def __init__(self, config: EfficientVitConfig = EFFICIENTVIT_B0) -> None:
        super().__init__()
        c = config
        self.config = c
        w0 = c.width_list[0]
        stem: list[nn.Module] = [ConvLayer(c.in_channels, w0, 3, stride=2, act=c.act)]
        stem += [Residual(_local_block(w0, w0, 1, 1, c.act), shortcut=True) for _ in range(c.depth_list[0])]
        self.input_stem = OpSequential(stem)
        stages: list[nn.Module] = []
        cin = w0
        for width, depth in zip(c.width_list[1:3], c.depth_list[1:3]):
            blocks = []
            for i in range(depth):
                stride = 2 if i == 0 else 1
                blocks.append(Residual(_local_block(cin, width, stride, c.expand_ratio, c.act), shortcut=stride == 1))
                cin = width
            stages.append(OpSequential(blocks))
        for width, depth in zip(c.width_list[3:], c.depth_list[3:]):
            blocks = [Residual(_local_block(cin, width, 2, c.expand_ratio, c.act, fewer_norm=True), shortcut=False)]
            cin = width
            blocks += [EfficientVitBlock(width, c.dim, c.expand_ratio, c.act, c.heads_ratio, c.scales)
                       for _ in range(depth)]
            stages.append(OpSequential(blocks))
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_stem(x)
        for stage in self.stages:
            x = stage(x)
        return x


# --- student head and neck ---------------------------------------------------------------------------


class _Holder(nn.Module):
    """A wrapper that only adds ``model.`` to its child's key path (the official trunk wrappers)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class ImageStudentEncoder(nn.Module):
    """The student trunk (``backbone.model``) plus the head to SAM 3's token grid (``head``)."""

    def __init__(self, trunk: EfficientVitConfig = EFFICIENTVIT_B0, embed_dim: int = 1024,
                 embed_size: int = 72) -> None:
        super().__init__()
        self.embed_size = embed_size
        self.backbone = _Holder(EfficientVitBackbone(trunk))
        self.head = nn.Sequential(
            nn.Conv2d(trunk.out_channels, embed_dim, 1, bias=False),
            nn.BatchNorm2d(embed_dim),
            nn.GELU(),
            nn.Conv2d(embed_dim, embed_dim, 3, padding=1),
        )

    def head_forward(self, trunk_out: torch.Tensor) -> torch.Tensor:
        """Head, then bilinear resize (half-pixel centres) to ``embed_size`` squared when the grid differs."""
        y = self.head(trunk_out)
        if y.shape[-2:] != (self.embed_size, self.embed_size):
            y = F.interpolate(y, size=(self.embed_size, self.embed_size), mode="bilinear", align_corners=False)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_forward(self.backbone(x))


def _neck_branch(scale: float, dim: int, d_model: int) -> nn.Sequential:
    branch = nn.Sequential()
    if scale == 4.0:
        branch.add_module("dconv_2x2_0", nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2))
        branch.add_module("gelu", nn.GELU())
        branch.add_module("dconv_2x2_1", nn.ConvTranspose2d(dim // 2, dim // 4, kernel_size=2, stride=2))
        out = dim // 4
    elif scale == 2.0:
        branch.add_module("dconv_2x2", nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2))
        out = dim // 2
    elif scale == 1.0:
        out = dim
    elif scale == 0.5:
        branch.add_module("maxpool_2x2", nn.MaxPool2d(kernel_size=2, stride=2))
        out = dim
    else:
        raise ValueError(f"neck scale factor {scale} is not supported (4, 2, 1 or 0.5)")
    branch.add_module("conv_1x1", nn.Conv2d(out, d_model, kernel_size=1))
    branch.add_module("conv_3x3", nn.Conv2d(d_model, d_model, kernel_size=3, padding=1))
    return branch


@dataclass(frozen=True)
class VisionConfig:
    """EfficientSAM3 image side: student trunk, head width (= neck input), token grid, neck and detector width."""

    trunk: EfficientVitConfig = field(default_factory=EfficientVitConfig)
    embed_dim: int = 1024  # SAM 3's ViT width, imitated by the student head
    embed_size: int = 72  # token grid (1008 / 14)
    image_size: int = 1008
    d_model: int = 256
    scale_factors: tuple[float, ...] = (4.0, 2.0, 1.0, 0.5)
    scalp: int = 1  # coarsest levels dropped by the detector (their weights exist but are not run)

    @property
    def kept_levels(self) -> int:
        return len(self.scale_factors) - self.scalp


ES3_VISION_B0 = VisionConfig()


@dataclass
class VisionOutput:
    """The image features of one batch; :meth:`as_dict` gives the official ``forward_image`` names."""

    fpn: list[torch.Tensor]  # kept neck levels [B, d_model, 4g, 4g], [.., 2g, 2g], [.., g, g] (g = embed_size)
    pos: list[torch.Tensor]  # their sine position codes, same shapes (broadcast views of cached grids: read-only)
    trunk: torch.Tensor | None = None  # EfficientViT output [B, width, ~H/32, ~W/32]
    student: torch.Tensor | None = None  # student head output on the token grid [B, embed_dim, g, g]

    @property
    def vision_features(self) -> torch.Tensor:
        """The lowest-resolution kept level, the fusion encoder's image input."""
        return self.fpn[-1]

    def as_dict(self) -> dict[str, object]:
        return {"vision_features": self.fpn[-1], "vision_pos_enc": self.pos, "backbone_fpn": self.fpn,
                "sam2_backbone_out": None}


class VisionBackbone(nn.Module):
    """``backbone.vision_backbone``: student encoder (``trunk.model``), neck (``convs``) and position codes."""

    def __init__(self, config: VisionConfig = ES3_VISION_B0) -> None:
        super().__init__()
        if not 0 <= config.scalp < len(config.scale_factors):
            raise ValueError(f"scalp {config.scalp} must leave at least one of the {len(config.scale_factors)} levels")
        self.config = config
        self.trunk = _Holder(ImageStudentEncoder(config.trunk, config.embed_dim, config.embed_size))
        self.convs = nn.ModuleList([_neck_branch(s, config.embed_dim, config.d_model) for s in config.scale_factors])
        self.position_encoding = PositionEmbeddingSine(config.d_model)
        # On CPU the neck's (transposed) convolutions run on a channels-last copy of the head output (oneDNN's
        # native layout): measured 1.35x faster for the full-size 288² branch, the largest cost of the image side;
        # the levels are returned in the usual contiguous layout. Same maths; only the summation order differs.
        self.neck_channels_last = True

    @property
    def student(self) -> ImageStudentEncoder:
        return self.trunk.model

    def forward(self, images: torch.Tensor) -> VisionOutput:
        """``images`` ``[B, 3, R, R]`` from :func:`preprocess_slice` -> the kept pyramid levels and their codes."""
        trunk_out = self.student.backbone(images)
        student = self.student.head_forward(trunk_out)
        base = student
        if self.neck_channels_last and student.device.type == "cpu":
            base = student.contiguous(memory_format=torch.channels_last)
        fpn = [self.convs[i](base).contiguous() for i in range(self.config.kept_levels)]
        return VisionOutput(fpn=fpn, pos=[self.position_code(level) for level in fpn], trunk=trunk_out,
                            student=student)

    def position_code(self, level: torch.Tensor) -> torch.Tensor:
        """The sine code of a ``[B, C, H, W]`` level as ``[B, d_model, H, W]``: a broadcast view of the cached
        per-size grid, not a copy (the detector reads only the last level's; the 288² one alone would be 85 MB
        per slice at full size). Do not modify it in place."""
        grid = self.position_encoding.grid(level.shape[-2], level.shape[-1], level.device)
        return grid.to(level.dtype)[None].expand(level.shape[0], -1, -1, -1)


# --- checkpoints -------------------------------------------------------------------------------------


def vision_state_dict(checkpoint: Mapping[str, torch.Tensor], prefix: str = VISION_PREFIX) -> dict[str, torch.Tensor]:
    """The image side's entries of an EfficientSAM3 state dict, prefix removed (``detector.`` optional)."""
    return text_state_dict(checkpoint, prefix)


def _indices(state: Mapping[str, torch.Tensor], prefix: str) -> list[int]:
    """Sorted distinct integers that follow ``prefix`` in the keys (``prefix`` ends with a dot)."""
    found = {k[len(prefix):].split(".", 1)[0] for k in state if k.startswith(prefix)}
    return sorted(int(i) for i in found if i.isdigit())


def infer_vision_config(state: Mapping[str, torch.Tensor]) -> VisionConfig:
    """The :class:`VisionConfig` of an image-side state dict (from :func:`vision_state_dict`).

    Trunk widths and depths, attention head size, expansion ratio, aggregation kernels, head width,
    ``d_model`` and the neck's scale factors are read from the shapes and keys. The token grid (72), the
    image size (1008), the activation (hard-swish) and ``scalp`` leave no trace and keep their defaults.
    """
    t = "trunk.model.backbone.model."
    stem_key = t + "input_stem.op_list.0.conv.weight"
    if stem_key not in state:
        trunk_keys = sorted(k for k in state if k.startswith("trunk.model.backbone."))[:1]
        raise ValueError("not an EfficientViT student (only EfficientViT b0/b1/b2 are implemented): "
                         f"no {stem_key}" + (f", found e.g. {trunk_keys[0]}" if trunk_keys else ""))
    w0 = int(state[stem_key].shape[0])
    widths, depths = [w0], [len(_indices(state, t + "input_stem.op_list.")) - 1]
    stages = _indices(state, t + "stages.")
    dim, expand, scales = 16, 4.0, (5,)
    heads_ratio = 1.0
    for s in stages:
        p = f"{t}stages.{s}.op_list."
        ops = _indices(state, p)
        attention = f"{p}1.context_module.main.qkv.conv.weight" in state
        last = ops[-1]
        if attention:
            widths.append(int(state[f"{p}{last}.local_module.main.point_conv.conv.weight"].shape[0]))
            depths.append(len(ops) - 1)
            qkv = state[f"{p}1.context_module.main.qkv.conv.weight"].shape[0]
            dim = int(state[f"{p}1.context_module.main.aggreg.0.1.weight"].shape[1])
            heads_ratio = qkv / 3 / widths[-1]
            scales = tuple(int(state[f"{p}1.context_module.main.aggreg.{i}.0.weight"].shape[-1])
                           for i in _indices(state, f"{p}1.context_module.main.aggreg."))
        else:
            widths.append(int(state[f"{p}{last}.main.point_conv.conv.weight"].shape[0]))
            depths.append(len(ops))
        first = state.get(f"{p}0.main.inverted_conv.conv.weight")
        if first is not None and s == 0:
            expand = first.shape[0] / first.shape[1]
    trunk = EfficientVitConfig(width_list=tuple(widths), depth_list=tuple(depths), dim=dim, expand_ratio=expand,
                               in_channels=int(state[stem_key].shape[1]), heads_ratio=heads_ratio, scales=scales)
    embed_dim = int(state["trunk.model.head.0.weight"].shape[0])
    d_model = int(state["convs.0.conv_3x3.weight"].shape[0])
    factors = []
    for i in _indices(state, "convs."):
        if f"convs.{i}.dconv_2x2_0.weight" in state:
            factors.append(4.0)
        elif f"convs.{i}.dconv_2x2.weight" in state:
            factors.append(2.0)
        else:  # 1 and 0.5 differ by a max-pooling, which has no weights: SAM 3 lists 1 first
            factors.append(1.0 if 1.0 not in factors else 0.5)
    return VisionConfig(trunk=trunk, embed_dim=embed_dim, d_model=d_model, scale_factors=tuple(factors))


def build_vision_backbone(config: VisionConfig = ES3_VISION_B0,
                          state: Mapping[str, torch.Tensor] | None = None) -> VisionBackbone:
    """An image side in eval mode (BatchNorm on running statistics); ``state`` is loaded with ``strict=True``."""
    model = VisionBackbone(config)
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model.eval()
