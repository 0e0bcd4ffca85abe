"""Official pre- and post-processing of each SAM-family pipeline, as pure functions.

Each pipeline turns an (H, W, 3) uint8 image into the encoder input, maps prompts from image
pixels into the model's frame, and turns low-resolution mask logits back into a full-size
mask. They differ in ways that change results, so each is reproduced step by step with the
libraries the official code used:

* ``"sam"`` / ``"mobile_sam"`` (Meta's and MobileSAM's ``SamPredictor``): resize the longest
  side to 1024 with PIL bilinear, normalise with ImageNet mean/std, zero-pad to 1024x1024;
  logits -> bilinear to 1024 -> crop -> bilinear to (H, W) -> ``> 0``.
* ``"medsam"`` (``MedSAM_Inference.py``): stretch to 1024x1024 with scikit-image (bicubic,
  anti-aliased), truncate to uint8, min-max to [0, 1], no padding; sigmoid *then* bilinear to
  (H, W) -> ``> 0.5``.
* ``"lite_medsam"`` (``CVPR24_LiteMedSAM_infer.py``): OpenCV INTER_AREA to longest side 256,
  min-max, zero-pad to 256x256; boxes truncated to integers; crop -> bilinear to (H, W) ->
  sigmoid -> ``> 0.5``.
* ``"sam2"`` / ``"medsam2"`` (SAM 2.1's video predictor frame loading; MedSAM2's
  ``medsam2_infer_3D_CT.py``): stretch to S x S (1024, or 512 for MedSAM2) with Pillow's default
  bicubic filter (aspect ratio not kept), ``/255`` and ImageNet mean/std in float64 with the
  constants rounded to float32, then float32; prompts ``x * S / W``, ``y * S / H`` in float32;
  the (S/4)^2 logits -> bilinear straight to (H, W) -> ``> 0``. The two differ only in how a
  volume becomes 8-bit grey (MedSAM2's CT windowing, :mod:`napari_medsam.segment.intensity`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "PIPELINES",
    "PreparedImage",
    "ct_window_uint8",
    "lite_medsam_postprocess",
    "lite_medsam_preprocess",
    "lite_medsam_resize",
    "lite_medsam_scale_boxes",
    "logits_to_mask",
    "medsam_postprocess",
    "medsam_preprocess",
    "medsam_resize",
    "medsam_scale_boxes",
    "prepare_image",
    "resized_shape",
    "sam2_postprocess",
    "sam2_preprocess",
    "sam2_resize",
    "sam2_scale_coords",
    "sam_apply_boxes",
    "sam_apply_coords",
    "sam_postprocess",
    "sam_preprocess",
    "sam_resize",
    "scale_boxes",
    "scale_points",
]

PIPELINES: tuple[str, ...] = ("sam", "mobile_sam", "medsam", "lite_medsam", "sam2", "medsam2")
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
# SAM 2's normalisation of [0, 1] images; the official code holds them in float32 tensors.
SAM2_IMAGE_MEAN = (0.485, 0.456, 0.406)
SAM2_IMAGE_STD = (0.229, 0.224, 0.225)
# The pipelines whose network is a SAM 2 (Hiera) model: same pre- and post-processing.
SAM2_PIPELINES: tuple[str, ...] = ("sam2", "medsam2")


@dataclass(frozen=True)
class PreparedImage:
    """Encoder input plus the sizes needed to map prompts in and masks back out."""

    tensor: torch.Tensor  # (1, 3, S, S) float32
    original_size: tuple[int, int]  # (H, W) of the image the user sees
    input_size: tuple[int, int]  # (h, w) of the resized image inside the S x S input


def _check_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    return image


def resized_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(h, w) after scaling the longest side to ``long_side``, rounded half up as the official code."""
    scale = long_side * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def _minmax(image: np.ndarray) -> np.ndarray:
    # uint8 - uint8 cannot underflow here (min is the minimum); the divisor promotes to float64.
    low, high = image.min(), image.max()
    return (image - low) / np.clip(high - low, a_min=1e-8, a_max=None)


def _to_chw_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image)).float().permute(2, 0, 1).unsqueeze(0).contiguous()


# --- SAM / MobileSAM (SamPredictor) ------------------------------------------------------------


def sam_resize(image: np.ndarray, long_side: int = 1024) -> np.ndarray:
    """ResizeLongestSide: PIL bilinear (with PIL's own antialiasing) to ``long_side``."""
    from PIL import Image

    image = _check_rgb(image)
    h, w = resized_shape(image.shape[0], image.shape[1], long_side)
    return np.array(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def sam_preprocess(image: np.ndarray, long_side: int = 1024) -> PreparedImage:
    """Resize, normalise by SAM's pixel mean/std and zero-pad bottom/right to a square."""
    image = _check_rgb(image)
    resized = sam_resize(image, long_side)
    x = torch.from_numpy(np.ascontiguousarray(resized)).permute(2, 0, 1).unsqueeze(0)
    mean = torch.tensor(SAM_PIXEL_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(SAM_PIXEL_STD, dtype=torch.float32).view(1, 3, 1, 1)
    x = (x - mean) / std
    h, w = resized.shape[:2]
    x = F.pad(x, (0, long_side - w, 0, long_side - h))
    return PreparedImage(x.contiguous(), (image.shape[0], image.shape[1]), (h, w))


def sam_apply_coords(coords: np.ndarray, original_size: tuple[int, int], long_side: int = 1024) -> np.ndarray:
    """(..., 2) xy in original pixels -> float32 xy in the resized frame (x by w/W, y by h/H)."""
    old_h, old_w = original_size
    new_h, new_w = resized_shape(old_h, old_w, long_side)
    out = np.array(coords, dtype=np.float64, copy=True)
    out[..., 0] = out[..., 0] * (new_w / old_w)
    out[..., 1] = out[..., 1] * (new_h / old_h)
    return out.astype(np.float32)


def sam_apply_boxes(boxes: np.ndarray, original_size: tuple[int, int], long_side: int = 1024) -> np.ndarray:
    """(..., 4) x0, y0, x1, y1 boxes -> (N, 4) float32 in the resized frame."""
    corners = np.asarray(boxes).reshape(-1, 2, 2)
    return sam_apply_coords(corners, original_size, long_side).reshape(-1, 4)


def sam_postprocess(
    low_res_logits: torch.Tensor,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
    image_size: int = 1024,
) -> torch.Tensor:
    """(B, M, 256, 256) logits -> (B, M, H, W) logits; threshold at 0 for the mask."""
    x = F.interpolate(low_res_logits, (image_size, image_size), mode="bilinear", align_corners=False)
    x = x[..., : input_size[0], : input_size[1]]
    return F.interpolate(x, tuple(original_size), mode="bilinear", align_corners=False)


# --- MedSAM (MedSAM_Inference.py) -------------------------------------------------------------


def medsam_resize(image: np.ndarray, size: int = 1024) -> np.ndarray:
    """Stretch to size x size with skimage (order 3, anti-aliased, range kept), truncated to uint8."""
    from skimage.transform import resize

    image = _check_rgb(image)
    out = resize(image, (size, size), order=3, preserve_range=True, anti_aliasing=True)
    return out.astype(np.uint8)


def medsam_preprocess(image: np.ndarray, size: int = 1024) -> PreparedImage:
    """skimage resize, min-max to [0, 1] (float64, then float32), CHW; no mean/std, no padding."""
    image = _check_rgb(image)
    resized = medsam_resize(image, size)
    return PreparedImage(_to_chw_tensor(_minmax(resized)), (image.shape[0], image.shape[1]), (size, size))


def medsam_scale_boxes(boxes: np.ndarray, original_size: tuple[int, int], size: int = 1024) -> np.ndarray:
    """(N, 4) boxes in original pixels -> float64 boxes in the stretched size x size frame."""
    h, w = original_size
    return np.asarray(boxes).reshape(-1, 4) / np.array([w, h, w, h]) * size


def medsam_postprocess(low_res_logits: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
    """(B, M, 256, 256) logits -> (B, M, H, W) probabilities: sigmoid first, then bilinear."""
    prob = torch.sigmoid(low_res_logits)
    return F.interpolate(prob, tuple(original_size), mode="bilinear", align_corners=False)


# --- LiteMedSAM (CVPR24_LiteMedSAM_infer.py) --------------------------------------------------


def lite_medsam_resize(image: np.ndarray, long_side: int = 256) -> np.ndarray:
    """OpenCV INTER_AREA resize of the longest side to ``long_side``."""
    import cv2

    image = _check_rgb(image)
    h, w = resized_shape(image.shape[0], image.shape[1], long_side)
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)


def lite_medsam_preprocess(image: np.ndarray, long_side: int = 256) -> PreparedImage:
    """INTER_AREA resize, min-max to [0, 1] (float64), zero-pad bottom/right, float32 CHW."""
    image = _check_rgb(image)
    resized = lite_medsam_resize(image, long_side)
    h, w = resized.shape[:2]
    padded = np.pad(_minmax(resized), ((0, long_side - h), (0, long_side - w), (0, 0)))
    return PreparedImage(_to_chw_tensor(padded), (image.shape[0], image.shape[1]), (h, w))


def lite_medsam_scale_boxes(boxes: np.ndarray, original_size: tuple[int, int], long_side: int = 256) -> np.ndarray:
    """(N, 4) boxes -> int64 boxes in the 256 frame, each coordinate truncated toward zero."""
    ratio = long_side / max(original_size)
    scaled = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * ratio
    return np.trunc(scaled).astype(np.int64)


def lite_medsam_postprocess(
    low_res_logits: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int]
) -> torch.Tensor:
    """(B, M, 256, 256) logits -> (B, M, H, W) probabilities: crop, bilinear, then sigmoid."""
    x = low_res_logits[..., : input_size[0], : input_size[1]]
    x = F.interpolate(x, tuple(original_size), mode="bilinear", align_corners=False)
    return torch.sigmoid(x)


# --- SAM 2.1 / MedSAM2 (video predictor frame loading, medsam2_infer_3D_CT.py) -----------------


def sam2_resize(image: np.ndarray, size: int = 1024) -> np.ndarray:
    """Stretch to size x size with Pillow's default filter for ``resize`` (bicubic); aspect not kept."""
    from PIL import Image

    image = _check_rgb(image)
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))


def sam2_preprocess(image: np.ndarray, size: int = 1024) -> PreparedImage:
    """Bicubic stretch, ``/255``, ImageNet mean/std, float32 (1, 3, S, S).

    The official code divides a float64 array by 255 and subtracts float32 mean/std tensors from
    it, which torch does in float64 with the float32-rounded constants; the frame is cast to float32
    only before the encoder. Doing the same here reproduces its input bit for bit (float32
    arithmetic would differ in the last bit). As the input is 8-bit, the 256 possible results per
    channel are computed once that way and looked up.
    """
    image = _check_rgb(image)
    resized = sam2_resize(image, size)
    x = np.empty((3, size, size), dtype=np.float32)
    for channel in range(3):
        np.take(_sam2_levels()[channel], resized[:, :, channel], out=x[channel])
    return PreparedImage(torch.from_numpy(x).unsqueeze(0), (image.shape[0], image.shape[1]), (size, size))


@lru_cache(maxsize=1)
def _sam2_levels() -> np.ndarray:
    """(3, 256) float32: each grey level normalised per channel exactly as the official float64 chain."""
    levels = np.arange(256, dtype=np.float64)[None, :] / 255.0
    mean = np.asarray(SAM2_IMAGE_MEAN, dtype=np.float32).astype(np.float64)[:, None]
    std = np.asarray(SAM2_IMAGE_STD, dtype=np.float32).astype(np.float64)[:, None]
    return ((levels - mean) / std).astype(np.float32)


def sam2_scale_coords(coords: np.ndarray, original_size: tuple[int, int], size: int = 1024) -> np.ndarray:
    """(..., 2) xy in original pixels -> float32 xy in the S x S frame: ``xy / [W, H] * S`` in float32.

    Boxes are two such points (corners), as SAM 2's predictors treat them.
    """
    h, w = original_size
    xy = np.asarray(coords, dtype=np.float64).astype(np.float32)
    return xy / np.array([w, h], dtype=np.float32) * np.float32(size)


def sam2_postprocess(low_res_logits: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
    """(B, M, L, L) logits -> (B, M, H, W) logits (bilinear, no crop); threshold at 0."""
    return F.interpolate(low_res_logits, tuple(original_size), mode="bilinear", align_corners=False)


# --- CT windowing used to make LiteMedSAM / MedSAM inputs (pre_CT_MR.py) -----------------------


def ct_window_uint8(hu: np.ndarray, level: float = 40.0, width: float = 400.0) -> np.ndarray:
    """Clip HU to the window, then min-max the *clipped data* (not the window) to 0..255, truncated."""
    x = np.clip(hu, level - width / 2, level + width / 2)
    span = x.max() - x.min()
    if span == 0:
        return np.zeros(x.shape, dtype=np.uint8)
    return ((x - x.min()) / span * 255.0).astype(np.uint8)


# --- pipeline-agnostic helpers -----------------------------------------------------------------


def _check_pipeline(pipeline: str) -> str:
    if pipeline not in PIPELINES:
        raise ValueError(f"unknown pipeline {pipeline!r}; choose one of {', '.join(PIPELINES)}")
    if pipeline == "mobile_sam":
        return "sam"
    return "sam2" if pipeline in SAM2_PIPELINES else pipeline


def prepare_image(pipeline: str, image: np.ndarray, size: int | None = None) -> PreparedImage:
    """Run ``pipeline``'s image preprocessing on an (H, W, 3) uint8 image.

    ``size`` is the model's input side for the SAM 2 pipelines (1024; 512 for MedSAM2); the SAM 1
    pipelines have fixed sizes and ignore it.
    """
    kind = _check_pipeline(pipeline)
    if kind == "sam2":
        return sam2_preprocess(image, size or 1024)
    if kind == "sam":
        return sam_preprocess(image)
    if kind == "medsam":
        return medsam_preprocess(image)
    return lite_medsam_preprocess(image)


def scale_boxes(pipeline: str, boxes: np.ndarray, original_size: tuple[int, int],
                size: int | None = None) -> np.ndarray:
    """(N, 4) boxes in original pixels -> float32 (N, 4) boxes in the model frame."""
    kind = _check_pipeline(pipeline)
    if kind == "sam2":
        corners = np.asarray(boxes, dtype=np.float64).reshape(-1, 2, 2)
        return sam2_scale_coords(corners, original_size, size or 1024).reshape(-1, 4)
    if kind == "sam":
        return sam_apply_boxes(boxes, original_size)
    if kind == "medsam":
        return medsam_scale_boxes(boxes, original_size).astype(np.float32)
    return lite_medsam_scale_boxes(boxes, original_size).astype(np.float32)


def scale_points(pipeline: str, coords: np.ndarray, original_size: tuple[int, int],
                 size: int | None = None) -> np.ndarray:
    """(..., 2) xy in original pixels -> float32 xy in the model frame.

    The MedSAM scripts take only boxes; points get the same scaling as their boxes (without
    LiteMedSAM's integer truncation).
    """
    kind = _check_pipeline(pipeline)
    if kind == "sam2":
        return sam2_scale_coords(coords, original_size, size or 1024)
    if kind == "sam":
        return sam_apply_coords(coords, original_size)
    h, w = original_size
    coords = np.asarray(coords, dtype=np.float64)
    if kind == "medsam":
        return (coords / np.array([w, h]) * 1024).astype(np.float32)
    return (coords * (256 / max(h, w))).astype(np.float32)


def logits_to_mask(
    pipeline: str, low_res_logits: torch.Tensor, prepared: PreparedImage
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, M, L, L) logits -> (full-size scores, boolean masks) with the pipeline's threshold.

    Scores are logits for ``"sam"``/``"mobile_sam"`` and the SAM 2 pipelines (mask = score > 0)
    and probabilities for the MedSAM 1 pipelines (mask = score > 0.5).
    """
    kind = _check_pipeline(pipeline)
    if kind == "sam2":
        scores = sam2_postprocess(low_res_logits, prepared.original_size)
        return scores, scores > 0.0
    if kind == "sam":
        scores = sam_postprocess(low_res_logits, prepared.input_size, prepared.original_size)
        return scores, scores > 0.0
    if kind == "medsam":
        scores = medsam_postprocess(low_res_logits, prepared.original_size)
    else:
        scores = lite_medsam_postprocess(low_res_logits, prepared.input_size, prepared.original_size)
    return scores, scores > 0.5
