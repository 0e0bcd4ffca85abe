"""Segment everything on one slice: SAM's automatic mask generator, on the project's predictor.

The algorithm of the SAM paper (section "automatic mask generation") with its published defaults:

1. a regular grid of ``points_per_side`` x ``points_per_side`` single positive point prompts over
   the image (and over each crop of the optional crop layers, with fewer points per layer);
2. each point decoded with multimask output (3 masks), the points in batches sharing one image
   embedding: the decoder runs once per batch, with no per-point Python work;
3. masks kept when their predicted IoU exceeds ``pred_iou_thresh`` and their stability score, the
   IoU of the logits thresholded at ``+offset`` and at ``-offset`` (computed on the logits
   upsampled to the image, as the official generator does), reaches ``stability_score_thresh``;
4. duplicates removed by greedy box non-maximum suppression (own implementation: torchvision does
   not load beside the CPU torch wheel), per crop by predicted IoU, across crops preferring the
   smaller crop;
5. optionally, holes and islands smaller than ``min_region_mm2`` removed (8-connected regions),
   then suppression once more, preferring the masks this step left unchanged.

Only the predicted IoU filter runs on all 3 x N masks; the upsampling to the image is done for the
survivors only, which gives the same result as upsampling all. For the SAM-1 family (SAM, MedSAM,
MobileSAM, LiteMedSAM) the decoder itself works that way too (``MaskDecoder.decode_points``): the
image-side work is shared by every point of the slice (each point's image tokens stay "shared
tokens + a low-rank update" and are never formed), and the decoder's own upscaling to
low-resolution logits and its hypernetworks run only for masks that pass the IoU filter; the
survivors and their logits equal those of ``network.decode`` up to float rounding.
SAM 2 decodes through ``network.decode`` (its decoder adds high-resolution features per mask).

The work is done in the frame of the image the model sees (square pixels); masks are brought back
to the slice's own grid at the end, where areas are counted and converted to mm². A predictor
without a SAM model (a stand-in following the predictor protocol) is prompted point by point,
through its ``predict``; crop layers need the model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

ProgressCallback = Callable[[int, int], None]  # (points decoded, points in all)


@dataclass(frozen=True)
class EverythingSettings:
    """Settings of the automatic mask generator; the defaults are SAM's published ones.

    ``min_region_mm2`` replaces the official ``min_mask_region_area`` (pixels) with an area in
    mm² on the slice, so the same setting means the same anatomy at any resolution.
    """

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    min_region_mm2: float = 0.0

    def __post_init__(self) -> None:
        if self.points_per_side < 1 or self.points_per_batch < 1:
            raise ValueError("points_per_side and points_per_batch must be at least 1")
        if self.crop_n_layers < 0 or self.crop_n_points_downscale_factor < 1:
            raise ValueError("crop_n_layers must be >= 0 and crop_n_points_downscale_factor >= 1")
        for name in ("box_nms_thresh", "crop_nms_thresh"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1]")
        if self.min_region_mm2 < 0:
            raise ValueError("min_region_mm2 must be >= 0")


@dataclass
class MaskCandidate:
    """One mask the generator proposes, on the slice's grid."""

    mask: np.ndarray  # (H, W) bool
    area_px: int
    area_mm2: float
    predicted_iou: float
    stability: float
    bbox: tuple[int, int, int, int]  # row0, col0, row1, col1 (inclusive)
    point: tuple[float, float]  # the (row, column) prompt that produced it
    crop: tuple[int, int, int, int]  # row0, col0, row1, col1 (exclusive) of the crop it came from
    low_res_logits: np.ndarray | None = field(default=None, repr=False)  # (L, L) for a whole-slice candidate

    def summary(self, label: int | None = None) -> dict:
        """JSON-ready numbers (no mask)."""
        out = {"area_px": self.area_px, "area_mm2": round(self.area_mm2, 3),
               "predicted_iou": round(self.predicted_iou, 4), "stability": round(self.stability, 4),
               "bbox": [int(v) for v in self.bbox], "point": [round(float(v), 2) for v in self.point]}
        return out if label is None else {"label": int(label), **out}


@dataclass
class EverythingResult:
    """All candidates of one slice (largest first) and where the time went."""

    index: int
    axis: int
    slice_shape: tuple[int, int]
    candidates: list[MaskCandidate]
    settings: EverythingSettings
    seconds: dict[str, float] = field(default_factory=dict)  # encoder, decoder, postprocess, total
    n_points: int = 0
    cancelled: bool = False

    def label_image(self) -> np.ndarray:
        """(H, W) int32: candidate i (0-based) painted as i + 1, larger ones first, so smaller ones stay visible."""
        out = np.zeros(self.slice_shape, np.int32)
        for i, cand in enumerate(self.candidates):
            out[cand.mask] = i + 1
        return out

    def summary(self) -> dict:
        """JSON-ready description (labels are those of :meth:`label_image`)."""
        return {"slice": self.index, "axis": self.axis, "points": self.n_points, "cancelled": self.cancelled,
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
                "candidates": [c.summary(i + 1) for i, c in enumerate(self.candidates)]}


# ---------------------------------------------------------------------- geometry of points and crops
def point_grid(n_per_side: int) -> np.ndarray:
    """(n², 2) points (x, y) in [0, 1], at the centres of an n x n grid of equal cells."""
    offset = 1.0 / (2 * n_per_side)
    side = np.linspace(offset, 1.0 - offset, n_per_side)
    xs, ys = np.meshgrid(side, side)
    return np.stack([xs.reshape(-1), ys.reshape(-1)], axis=1)


CropBox = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive) in the image


def crop_boxes(height: int, width: int, n_layers: int, overlap_ratio: float) -> list[tuple[CropBox, int]]:
    """[(x0, y0, x1, y1), layer]: the whole image, then 2^i x 2^i overlapping crops for layer i."""
    boxes = [((0, 0, width, height), 0)]
    short = min(height, width)
    for layer in range(1, n_layers + 1):
        per_side = 2 ** layer
        overlap = int(overlap_ratio * short * (2 / per_side))
        crop_w = int(math.ceil((overlap * (per_side - 1) + width) / per_side))
        crop_h = int(math.ceil((overlap * (per_side - 1) + height) / per_side))
        for y0 in (int((crop_h - overlap) * i) for i in range(per_side)):
            for x0 in (int((crop_w - overlap) * i) for i in range(per_side)):
                boxes.append(((x0, y0, min(x0 + crop_w, width), min(y0 + crop_h, height)), layer))
    return boxes


# ---------------------------------------------------------------------- scores, boxes, suppression
def stability_score(logits: Any, offset: float, threshold: float = 0.0) -> np.ndarray:
    """IoU of ``logits > threshold + offset`` with ``logits > threshold - offset`` per mask (..., H, W)."""
    import torch

    values = torch.as_tensor(logits)
    inner = (values > threshold + offset).flatten(-2).sum(-1, dtype=torch.int64)
    outer = (values > threshold - offset).flatten(-2).sum(-1, dtype=torch.int64)
    score = inner.double() / outer.clamp(min=1).double()
    return score.masked_fill(outer == 0, 0.0).numpy()


def mask_boxes(masks: Any) -> np.ndarray:
    """(N, 4) boxes (x0, y0, x1, y1), inclusive pixel indices, of (N, H, W) masks; zeros for an empty mask."""
    import torch

    masks = torch.as_tensor(masks)
    if masks.shape[0] == 0:
        return np.zeros((0, 4), np.int64)
    height, width = masks.shape[-2:]
    cols, rows = masks.any(dim=-2), masks.any(dim=-1)  # (N, W), (N, H)

    def extent(hits: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(size)
        first = torch.where(hits, positions, size).amin(-1)
        last = torch.where(hits, positions, -1).amax(-1)
        return first, last

    x0, x1 = extent(cols, width)
    y0, y1 = extent(rows, height)
    boxes = torch.stack([x0, y0, x1, y1], -1)
    return torch.where(rows.any(-1, keepdim=True), boxes, 0).numpy().astype(np.int64)


def box_iou(boxes: np.ndarray, others: np.ndarray) -> np.ndarray:
    """(N, M) IoU of (x0, y0, x1, y1) boxes, areas as (x1 - x0) * (y1 - y0) (the torchvision convention)."""
    a, b = np.asarray(boxes, np.float64), np.asarray(others, np.float64)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    left_top = np.maximum(a[:, None, :2], b[None, :, :2])
    right_bottom = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(right_bottom - left_top, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def box_nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression, highest score first.

    A box is dropped when its IoU with an already kept, higher-scoring box exceeds ``threshold``;
    ties in score keep the earlier box.
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    scores = np.asarray(scores, np.float64).reshape(-1)
    order = np.argsort(-scores, kind="stable")
    if len(order) == 0:
        return order.astype(np.int64)
    iou = box_iou(boxes[order], boxes[order])
    alive = np.ones(len(order), bool)
    keep = []
    for i in range(len(order)):
        if not alive[i]:
            continue
        keep.append(i)
        alive[i + 1:] &= iou[i, i + 1:] <= threshold
    return order[np.array(keep, np.int64)]


def remove_small_regions(mask: np.ndarray, min_pixels: float, mode: str) -> tuple[np.ndarray, bool]:
    """Fill holes (``mode="holes"``) or drop islands (``"islands"``) under ``min_pixels``; (mask, changed).

    Regions are 8-connected. When every island is small, the largest one stays.
    """
    from scipy import ndimage

    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', not {mode!r}")
    holes = mode == "holes"
    regions, count = ndimage.label(~mask if holes else mask, structure=np.ones((3, 3), bool))
    if count == 0:
        return mask, False
    sizes = np.bincount(regions.reshape(-1), minlength=count + 1)[1:]
    small = np.flatnonzero(sizes < min_pixels) + 1
    if small.size == 0:
        return mask, False
    if holes:
        return mask | np.isin(regions, small), True
    big = np.flatnonzero(sizes >= min_pixels) + 1
    if big.size == 0:
        big = np.array([int(np.argmax(sizes)) + 1])
    return np.isin(regions, big), True


# ---------------------------------------------------------------------- the generator
@dataclass
class _Kept:
    """Survivors of one crop, in the model image's frame."""

    masks: list[np.ndarray] = field(default_factory=list)  # (h, w) bool crops of the model image
    boxes: list[np.ndarray] = field(default_factory=list)  # (4,) x0, y0, x1, y1 in the model image
    ious: list[float] = field(default_factory=list)
    stability: list[float] = field(default_factory=list)
    points: list[np.ndarray] = field(default_factory=list)  # (x, y) in the model image
    crops: list[tuple[int, int, int, int]] = field(default_factory=list)
    logits: list[np.ndarray | None] = field(default_factory=list)

    def extend(self, other: "_Kept", keep: np.ndarray | None = None) -> None:
        items = range(len(other.ious)) if keep is None else keep
        for i in items:
            for name in ("masks", "boxes", "ious", "stability", "points", "crops", "logits"):
                getattr(self, name).append(getattr(other, name)[int(i)])


def _has_model(predictor: Any) -> bool:
    model = getattr(predictor, "model", None)
    return model is not None and hasattr(model, "network") and callable(getattr(predictor, "model_image", None))


def segment_everything(predictor: Any, index: int, settings: EverythingSettings | None = None, *,
                       cancel: Any = None, progress: ProgressCallback | None = None,
                       reference: bool = False) -> EverythingResult:
    """All candidate masks of slice ``index`` (along the predictor's axis), largest first.

    ``cancel`` (a callable or threading.Event) is checked between batches: a cancelled run returns
    the candidates found so far with ``cancelled=True``. ``progress(done, total)`` after each batch.
    ``reference=True`` decodes every batch with the network's plain ``decode`` (all masks to
    logits), the slower path the fast one is tested and benchmarked against.
    """
    from .propagation.run import as_cancel_check

    settings = settings or EverythingSettings()
    stop = as_cancel_check(cancel)
    axis = int(getattr(predictor, "axis", 0))
    rows, cols = (int(v) for v in predictor.slice_shape)
    start = time.perf_counter()
    clock = {"encoder": 0.0, "decoder": 0.0, "postprocess": 0.0}
    if _has_model(predictor):
        kept, n_points, cancelled, frame = _run_model(predictor, int(index), settings, stop, progress, clock,
                                                      reference)
    else:
        if settings.crop_n_layers:
            raise ValueError("crop layers need a SAM model predictor (they encode each crop)")
        kept, n_points, cancelled = _run_protocol(predictor, int(index), settings, stop, progress, clock)
        frame = (rows, cols)
    tick = time.perf_counter()
    candidates = _finish(predictor, kept, frame, (rows, cols), settings)
    clock["postprocess"] += time.perf_counter() - tick
    clock["total"] = time.perf_counter() - start
    return EverythingResult(int(index), axis, (rows, cols), candidates, settings, clock, n_points, cancelled)


def _run_model(predictor: Any, index: int, settings: EverythingSettings, stop, progress, clock,
               reference: bool = False):
    """The batched path: encoder once per crop, decoder once per batch of points."""
    import torch

    model = predictor.model
    fast = not reference and _has_point_decoder(model)
    tick = time.perf_counter()
    image = predictor.model_image(index)
    full_embedding = predictor.embed(index)  # cached like any other slice
    clock["encoder"] += time.perf_counter() - tick
    height, width = image.shape[:2]
    boxes = crop_boxes(height, width, settings.crop_n_layers, settings.crop_overlap_ratio)
    grids = [point_grid(max(1, int(settings.points_per_side / settings.crop_n_points_downscale_factor ** layer)))
             for layer in range(settings.crop_n_layers + 1)]
    total = sum(len(grids[layer]) for _, layer in boxes)
    done, cancelled = 0, False
    kept = _Kept()
    for crop, layer in boxes:
        if stop():
            cancelled = True
            break
        x0, y0, x1, y1 = crop
        tick = time.perf_counter()
        if layer == 0:
            embedding = full_embedding
        else:
            embedding = model.encode(np.ascontiguousarray(image[y0:y1, x0:x1]))
        clock["encoder"] += time.perf_counter() - tick
        points = grids[layer] * np.array([x1 - x0, y1 - y0], np.float64)
        here = _Kept()
        with torch.inference_mode():
            tick = time.perf_counter()
            shared = None
            if fast and layer == 0:  # the slice itself: the work the widget prepared for prompting, if any
                prepared = getattr(model, "prepared", None)
                shared = prepared(predictor.key(index)) if callable(prepared) else None
            if fast and shared is None:
                shared = _share_embedding(model, embedding)
            clock["decoder"] += time.perf_counter() - tick
            for first in range(0, len(points), settings.points_per_batch):
                if stop():
                    cancelled = True
                    break
                batch = points[first:first + settings.points_per_batch]
                _decode_batch(model, embedding, batch, crop, (height, width), settings, here, clock,
                              keep_logits=layer == 0, shared=shared)
                done += len(batch)
                if progress is not None:
                    progress(done, total)
        tick = time.perf_counter()
        if here.ious:
            local = np.stack(here.boxes) - np.array([x0, y0, x0, y0])
            keep = box_nms(local, np.array(here.ious), settings.box_nms_thresh)
            kept.extend(here, keep)
        clock["postprocess"] += time.perf_counter() - tick
        if cancelled:
            break
    return kept, total, cancelled, (height, width)


def _network_decode(model: Any, embedding: Any, coords: Any, labels: Any):
    """(B, 3, L, L) low-res logits and (B, 3) predicted IoU for B single-point prompts on one embedding."""
    import torch

    network = model.network
    emb = torch.as_tensor(np.asarray(embedding), dtype=torch.float32, device=model.device)
    return network.decode(emb, coords, labels, None, None, multimask_output=True)  # both families take a batch


def _has_point_decoder(model: Any) -> bool:
    """Whether the network is of the SAM-1 family, whose decoder has the many-prompt path ``decode_points``."""
    network = getattr(model, "network", None)
    decoder = getattr(network, "mask_decoder", None)
    return callable(getattr(decoder, "decode_points", None)) and hasattr(network, "prompt_encoder")


def _share_embedding(model: Any, embedding: Any) -> Any:
    """The decoder's shared first-block work for one embedding (``MaskDecoder.share_image``)."""
    import torch

    network = model.network
    emb = torch.as_tensor(np.asarray(embedding), dtype=torch.float32, device=model.device)
    prompts = network.prompt_encoder
    dense = prompts.no_mask_embed.weight.reshape(1, -1, 1, 1)
    return network.mask_decoder.share_image(emb, prompts.get_dense_pe(), dense)


def _points_decode(model: Any, shared: Any, coords: Any, labels: Any, threshold: float | None) -> Any:
    """``PointMasks`` (IoU of all 3 x B masks, logits of those above ``threshold``) of B single-point prompts."""
    network = model.network
    sparse, _ = network.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    return network.mask_decoder.decode_points(shared, sparse, multimask_output=True, iou_threshold=threshold)


def _decode_batch(model: Any, embedding: Any, points: np.ndarray, crop: tuple[int, int, int, int],
                  image_size: tuple[int, int], settings: EverythingSettings, out: _Kept, clock: dict,
                  keep_logits: bool, shared: Any = None) -> None:
    """Decode one batch of points of one crop and keep the masks that pass the filters.

    With ``shared`` (a SAM-1 decoder's ``SharedImage``) only the masks above the IoU threshold are
    decoded to logits; without it every mask is, by ``network.decode``.
    """
    import torch

    from ..models import pipelines
    from .model import resize_chain

    x0, y0, x1, y1 = crop
    crop_h, crop_w = y1 - y0, x1 - x0
    tick = time.perf_counter()
    geometry = model.geometry(crop_h, crop_w)
    scaled = pipelines.scale_points(model.pipeline, points, geometry.original_size, model.image_size)
    coords = torch.as_tensor(scaled, dtype=torch.float32, device=model.device)[:, None, :]
    labels = torch.ones((len(points), 1), dtype=torch.int64, device=model.device)
    threshold = settings.pred_iou_thresh if settings.pred_iou_thresh > 0 else None
    if shared is not None:
        decoded = _points_decode(model, shared, coords, labels, threshold)
        n_masks = decoded.iou.shape[1]
        iou, keep, low_res = decoded.iou.reshape(-1).float(), decoded.keep, decoded.logits.float()
    else:
        low_res, iou = _network_decode(model, embedding, coords, labels)
        n_masks = low_res.shape[1]
        low_res = low_res.reshape(-1, *low_res.shape[-2:]).float()
        iou = iou.reshape(-1).float()
        keep = torch.nonzero(iou > threshold).reshape(-1) if threshold is not None \
            else torch.arange(len(iou), device=iou.device)
        low_res = low_res[keep]  # from here on, row j of low_res is mask keep[j]
    clock["decoder"] += time.perf_counter() - tick
    tick = time.perf_counter()
    owner = torch.arange(len(points), device=iou.device).repeat_interleave(n_masks)
    if keep.numel():
        # The official resize chain to the crop's size, on the survivors only (raw logits: the
        # stability offsets are in logit units for every pipeline).
        full = resize_chain(model.pipeline, model.image_size, geometry.input_size, (crop_h, crop_w), low_res)
        stable = torch.as_tensor(stability_score(full, settings.stability_score_offset))
        good = stable >= settings.stability_score_thresh
        keep, full, stable, low_res = keep[good], full[good], stable[good], low_res[good]
        masks = full > 0.0
        boxes = mask_boxes(masks)
        near_edge = _near_crop_edge(boxes, crop, image_size)
        for j in np.flatnonzero(~near_edge):
            k = int(keep[j])
            out.masks.append(masks[j].cpu().numpy())
            out.boxes.append(boxes[j] + np.array([x0, y0, x0, y0]))
            out.ious.append(float(iou[k]))
            out.stability.append(float(stable[j]))
            out.points.append(points[int(owner[k])] + np.array([x0, y0]))
            out.crops.append(crop)
            out.logits.append(low_res[j].cpu().numpy() if keep_logits else None)
    clock["postprocess"] += time.perf_counter() - tick


def _near_crop_edge(boxes: np.ndarray, crop: tuple[int, int, int, int], image_size: tuple[int, int],
                    tolerance: float = 20.0) -> np.ndarray:
    """Boxes (crop frame) touching a crop edge that is not an image edge: cut-off objects the crop cannot judge."""
    if len(boxes) == 0:
        return np.zeros(0, bool)
    x0, y0, x1, y1 = crop
    height, width = image_size
    placed = boxes.astype(np.float64) + np.array([x0, y0, x0, y0])
    near_crop = np.abs(placed - np.array([x0, y0, x1, y1], np.float64)) <= tolerance
    near_image = np.abs(placed - np.array([0, 0, width, height], np.float64)) <= tolerance
    return np.any(near_crop & ~near_image, axis=1)


def _run_protocol(predictor: Any, index: int, settings: EverythingSettings, stop, progress, clock):
    """A stand-in predictor: one ``predict`` per point with multimask output (no crops)."""
    from .predictor import Prompts

    rows, cols = (int(v) for v in predictor.slice_shape)
    tick = time.perf_counter()
    predictor.embed(index)
    clock["encoder"] += time.perf_counter() - tick
    points = point_grid(settings.points_per_side) * np.array([cols, rows], np.float64) - 0.5
    kept, cancelled = _Kept(), False
    crop = (0, 0, cols, rows)
    for i, (x, y) in enumerate(points):
        if stop():
            cancelled = True
            break
        tick = time.perf_counter()
        result = predictor.predict(index, Prompts(points=np.array([[y, x]])), multimask=True)
        clock["decoder"] += time.perf_counter() - tick
        tick = time.perf_counter()
        logits = result.logits if getattr(result, "logits", None) is not None else None
        for m in range(len(result.masks)):
            if settings.pred_iou_thresh > 0 and not float(result.scores[m]) > settings.pred_iou_thresh:
                continue
            mask = np.asarray(result.masks[m], bool)
            field_ = logits[m] if logits is not None else result.low_res_logits[m]
            stable = float(stability_score(np.asarray(field_, np.float32)[None], settings.stability_score_offset)[0])
            if stable < settings.stability_score_thresh or not mask.any():
                continue
            kept.masks.append(mask)
            kept.boxes.append(mask_boxes(mask[None])[0])
            kept.ious.append(float(result.scores[m]))
            kept.stability.append(stable)
            kept.points.append(np.array([x, y]))
            kept.crops.append(crop)
            kept.logits.append(np.asarray(result.low_res_logits[m], np.float32))
        clock["postprocess"] += time.perf_counter() - tick
        if progress is not None and ((i + 1) % settings.points_per_batch == 0 or i + 1 == len(points)):
            progress(i + 1, len(points))
    if kept.ious:
        keep = box_nms(np.stack(kept.boxes), np.array(kept.ious), settings.box_nms_thresh)
        final = _Kept()
        final.extend(kept, keep)
        kept = final
    return kept, len(points), cancelled


def _finish(predictor: Any, kept: _Kept, frame: tuple[int, int], shape: tuple[int, int],
            settings: EverythingSettings) -> list[MaskCandidate]:
    """Across-crop suppression, masks to the slice grid, small regions, areas; largest first."""
    n = len(kept.ious)
    if n == 0:
        return []
    order = np.arange(n)
    crops = {c for c in kept.crops}
    if len(crops) > 1:  # the same object from several crops: prefer the smallest crop
        areas = np.array([(c[2] - c[0]) * (c[3] - c[1]) for c in kept.crops], np.float64)
        order = box_nms(np.stack(kept.boxes), 1.0 / areas, settings.crop_nms_thresh)
    height, width = frame
    rows, cols = shape
    masks, points = [], []
    for i in order:
        x0, y0, x1, y1 = kept.crops[i]
        full = np.zeros(frame, bool)
        full[y0:y1, x0:x1] = kept.masks[i]
        if (height, width) != (rows, cols):
            full = _resample_mask(full, shape)
        masks.append(full)
        x, y = kept.points[i]
        points.append(((y + 0.5) * rows / height - 0.5, (x + 0.5) * cols / width - 0.5))
    ious = np.array([kept.ious[i] for i in order])
    stability = np.array([kept.stability[i] for i in order])
    logits = [kept.logits[i] for i in order]
    crops_kept = [kept.crops[i] for i in order]
    pixel_mm2 = _pixel_area(predictor)
    if settings.min_region_mm2 > 0 and masks:
        min_px = settings.min_region_mm2 / pixel_mm2
        changed = np.zeros(len(masks), bool)
        for i, mask in enumerate(masks):
            mask, holes = remove_small_regions(mask, min_px, "holes")
            mask, islands = remove_small_regions(mask, min_px, "islands")
            masks[i], changed[i] = mask, holes or islands
        # Suppress again, preferring masks the clean-up left alone.
        keep = box_nms(mask_boxes(np.stack(masks)), (~changed).astype(np.float64), settings.box_nms_thresh)
        keep = np.sort(keep)
        masks = [masks[i] for i in keep]
        points = [points[i] for i in keep]
        ious, stability = ious[keep], stability[keep]
        logits = [None if changed[i] else logits[i] for i in keep]
        crops_kept = [crops_kept[i] for i in keep]
    out = []
    for i, mask in enumerate(masks):
        area = int(np.count_nonzero(mask))
        if area == 0:
            continue
        x0, y0, x1, y1 = (int(v) for v in mask_boxes(mask[None])[0])
        c = crops_kept[i]
        crop = (int(c[1] * rows / height), int(c[0] * cols / width), int(round(c[3] * rows / height)),
                int(round(c[2] * cols / width)))
        out.append(MaskCandidate(mask, area, area * pixel_mm2, float(ious[i]), float(stability[i]),
                                 (y0, x0, y1, x1), (float(points[i][0]), float(points[i][1])), crop, logits[i]))
    out.sort(key=lambda c: (-c.area_px, -c.predicted_iou))
    return out


def _pixel_area(predictor: Any) -> float:
    """mm² of one slice pixel (1 without spacing)."""
    spacing = getattr(predictor, "spacing_mm", None)
    if spacing is None:
        return 1.0
    axis = int(getattr(predictor, "axis", 0))
    in_plane = [float(s) for a, s in enumerate(spacing) if a != axis]
    return in_plane[0] * in_plane[1]


def _resample_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A mask of the square-pixel model image back on the slice grid (pixel centres to pixel centres)."""
    import cv2

    resized = cv2.resize(mask.astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    return resized.astype(bool)


def sign_logits(mask: np.ndarray, side: int = 256) -> np.ndarray:
    """A (side, side) low-res logit field with the mask's sign (+8 inside, -8 outside), for a mask made
    without SAM logits (a cleaned-up or concept-model mask) that the session keeps as a prediction."""
    import cv2

    field_ = cv2.resize(np.asarray(mask, np.float32), (side, side), interpolation=cv2.INTER_LINEAR)
    return np.where(field_ > 0.5, 8.0, -8.0).astype(np.float32)


def candidate_masks(candidate: MaskCandidate, low_res: int = 256) -> Any:
    """A one-mask ``SliceMasks`` of a candidate, as the session keeps predictions (logits made up if missing)."""
    from .predictor import SliceMasks

    logits = candidate.low_res_logits
    if logits is None:  # a crop or cleaned-up candidate: a coarse field with the mask's sign
        logits = sign_logits(candidate.mask, low_res)
    return SliceMasks(candidate.mask[None].copy(), np.array([candidate.predicted_iou], np.float32),
                      np.asarray(logits, np.float32)[None])
