"""Prompts for the next slice, derived from the mask found on the previous one.

Propagation walks a volume slice by slice; each new slice is prompted from the previous
slice's result. This module turns a 2D mask (and, where the predictor gave them, its low-res
logits) into :class:`~.predictor.Prompts` under a *prompt mode*: any ``+``-joined combination of

* ``"box"``: the mask's bounding box, widened by a margin (pixels plus a fraction of its size);
* ``"points"``: positive points deep inside the mask (maxima of the distance transform) and
  negative points on a ring a few pixels outside it;
* ``"mask"``: the previous prediction's low-res logits as the mask prompt.

It also holds the shape helpers that propagation shares: interpolation of masks (through signed
distances) and of boxes (linear, for the sparse-marker mode).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .predictor import Prompts

PROMPT_PARTS = ("box", "points", "mask")


def parse_prompt_mode(mode: str) -> frozenset[str]:
    """The parts of a prompt mode such as ``"box+mask"``; raises ValueError for an unknown part."""
    parts = frozenset(p.strip().lower() for p in str(mode).split("+") if p.strip())
    unknown = parts - set(PROMPT_PARTS)
    if not parts or unknown:
        raise ValueError(f"prompt mode {mode!r}: use 'box', 'points', 'mask' or a '+'-joined combination")
    return parts


@dataclass(frozen=True)
class PromptSettings:
    """How the prompt for the next slice is built from the previous slice's mask."""

    mode: str = "box+mask"
    box_margin_px: float = 2.0  # added on every side of the bounding box ...
    box_margin_fraction: float = 0.05  # ... plus this fraction of the box's height/width
    n_positive: int = 3  # interior points, at most (fewer when the mask is thin)
    n_negative: int = 4  # points on the ring outside the mask
    negative_ring_px: float = 5.0  # distance of that ring from the mask's edge

    def __post_init__(self) -> None:
        parse_prompt_mode(self.mode)
        if self.box_margin_px < 0 or self.box_margin_fraction < 0:
            raise ValueError("box margins must be >= 0")
        if self.n_positive < 1 or self.n_negative < 0 or self.negative_ring_px < 1:
            raise ValueError("need n_positive >= 1, n_negative >= 0 and negative_ring_px >= 1")

    @property
    def parts(self) -> frozenset[str]:
        """The parts of :attr:`mode`."""
        return parse_prompt_mode(self.mode)


def mask_box(mask: np.ndarray, margin_px: float = 0.0, margin_fraction: float = 0.0) -> np.ndarray | None:
    """(row0, col0, row1, col1) around ``mask``'s pixel centres plus margins, clipped to the slice."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    r0, r1, c0, c1 = float(rows[0]), float(rows[-1]), float(cols[0]), float(cols[-1])
    mr = margin_px + margin_fraction * (r1 - r0 + 1)
    mc = margin_px + margin_fraction * (c1 - c0 + 1)
    h, w = mask.shape
    return np.array([max(r0 - mr, 0.0), max(c0 - mc, 0.0), min(r1 + mr, h - 1.0), min(c1 + mc, w - 1.0)])


def interior_points(mask: np.ndarray, n: int) -> np.ndarray:
    """Up to ``n`` (row, col) points deep inside ``mask``: greedy maxima of its distance transform.

    After each pick, a disk as wide as the local depth is removed so the next point lands in
    another part of the mask (a second lobe), and points much shallower than the deepest one
    are not taken: near an edge they could fall outside the object on the next slice.
    """
    depth = ndimage.distance_transform_edt(mask)
    work = depth.copy()
    deepest = float(depth.max()) if depth.size else 0.0
    rr, cc = np.ogrid[: mask.shape[0], : mask.shape[1]]
    points: list[tuple[float, float]] = []
    while len(points) < n:
        flat = int(np.argmax(work))
        r, c = divmod(flat, mask.shape[1])
        value = float(work[r, c])
        if value <= 0 or (points and value < 0.5 * deepest):
            break
        points.append((float(r), float(c)))
        radius = max(depth[r, c], 1.5)
        work[(rr - r) ** 2 + (cc - c) ** 2 <= (2 * radius) ** 2] = 0
    return np.array(points, dtype=np.float64).reshape(-1, 2)


def ring_points(mask: np.ndarray, n: int, distance_px: float) -> np.ndarray:
    """Up to ``n`` (row, col) points about ``distance_px`` outside ``mask``, spread by farthest-point sampling."""
    if n <= 0 or mask.all() or not mask.any():
        return np.zeros((0, 2))
    outside = ndimage.distance_transform_edt(~mask)
    ring = np.argwhere((outside >= distance_px - 0.5) & (outside < distance_px + 0.5)).astype(np.float64)
    if len(ring) == 0:  # the mask nearly fills the slice: use whatever lies farthest out
        ring = np.argwhere(outside == outside.max()).astype(np.float64)
    chosen = [0]  # argwhere is row-major, so this is the topmost, leftmost ring pixel: deterministic
    nearest = np.hypot(*(ring - ring[0]).T)
    while len(chosen) < min(n, len(ring)):
        nxt = int(np.argmax(nearest))
        if nearest[nxt] <= 0:
            break
        chosen.append(nxt)
        nearest = np.minimum(nearest, np.hypot(*(ring - ring[nxt]).T))
    return ring[chosen]


def prompts_from_mask(mask: np.ndarray, logits: np.ndarray | None, settings: PromptSettings) -> Prompts:
    """The prompt for the next slice from this slice's ``mask`` (and low-res ``logits``) under ``settings``.

    The ``mask`` part needs logits: where there are none (a key slice given as a painted mask),
    that step uses the mask's box and points instead, the strongest prompt that needs no logits.
    """
    mask = np.asarray(mask, dtype=bool)
    parts = set(settings.parts)
    if "mask" in parts and logits is None:
        parts = (parts - {"mask"}) | {"box", "points"}
    prompts = Prompts()
    if "box" in parts:
        prompts.box = mask_box(mask, settings.box_margin_px, settings.box_margin_fraction)
    if "points" in parts:
        inside = interior_points(mask, settings.n_positive)
        outside = ring_points(mask, settings.n_negative, settings.negative_ring_px)
        points = np.concatenate([inside, outside])
        flags = np.concatenate([np.ones(len(inside), bool), np.zeros(len(outside), bool)])
        prompts = Prompts(points=points, positive=flags, box=prompts.box)
    if "mask" in parts and logits is not None:
        logits = np.asarray(logits, dtype=np.float32)
        side = int(round(np.sqrt(logits.size)))  # 256 (SAM), 128 (MedSAM2)
        prompts.mask_logits = logits.reshape(side, side)
    return prompts


def signed_distance(mask: np.ndarray) -> np.ndarray:
    """Distance to the mask's edge in pixels: positive inside, negative outside."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return np.full(mask.shape, -float(sum(mask.shape)))
    if mask.all():
        return np.full(mask.shape, float(sum(mask.shape)))
    return ndimage.distance_transform_edt(mask) - ndimage.distance_transform_edt(~mask)


def interpolate_masks(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """The shape a fraction ``t`` of the way from mask ``a`` to mask ``b`` (signed-distance blending)."""
    return (1.0 - t) * signed_distance(a) + t * signed_distance(b) > 0


def interpolate_boxes(boxes: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Boxes for every slice from the first to the last marked one, linear between marked slices."""
    if not boxes:
        return {}
    marked = sorted(int(k) for k in boxes)
    values = {k: Prompts(box=boxes[k]).box for k in marked}  # normalises corner order
    out = {marked[0]: values[marked[0]]}
    for lo, hi in zip(marked[:-1], marked[1:]):
        for k in range(lo + 1, hi + 1):
            t = (k - lo) / (hi - lo)
            out[k] = (1.0 - t) * values[lo] + t * values[hi]
    return out
