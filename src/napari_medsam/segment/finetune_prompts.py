"""Prompts simulated from a label mask, for fine-tuning: jittered boxes, points, correction clicks.

Interactive-segmentation training (SAM, RITM) does not show the network ideal prompts only: a
user's box is a few pixels off, a user's clicks fall anywhere inside (or outside) the object,
and after a first mask the user clicks where it is most wrong. These functions simulate that
from a binary mask, with a seeded ``numpy.random.Generator`` so runs repeat exactly.

Coordinates are the mask's own pixels, (row, column), as :class:`~.predictor.Prompts` takes
them; boxes are (row_min, col_min, row_max, col_max) and always lie inside the image.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["bounding_box", "correction_click", "jittered_box", "sample_points"]


def bounding_box(mask: np.ndarray) -> np.ndarray:
    """The tight (row_min, col_min, row_max, col_max) box of a non-empty mask (float64)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        raise ValueError("the mask is empty: no box")
    return np.array([rows[0], cols[0], rows[-1], cols[-1]], np.float64)


def jittered_box(mask: np.ndarray, rng: np.random.Generator, jitter: float = 0.05) -> np.ndarray:
    """The mask's box with each side moved by up to ``jitter`` x the box size (clipped to the image)."""
    box = bounding_box(mask)
    height, width = box[2] - box[0] + 1, box[3] - box[1] + 1
    scale = np.array([height, width, height, width]) * jitter
    moved = box + rng.uniform(-1.0, 1.0, 4) * scale
    rows, cols = mask.shape
    moved[[0, 2]] = np.clip(moved[[0, 2]], 0, rows - 1)
    moved[[1, 3]] = np.clip(moved[[1, 3]], 0, cols - 1)
    low = np.minimum(moved[:2], moved[2:])
    high = np.maximum(moved[:2], moved[2:])
    return np.concatenate([low, high])


def sample_points(mask: np.ndarray, rng: np.random.Generator, positive: int = 1,
                  negative: int = 0, margin: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """``positive`` points inside the mask and ``negative`` outside it (near it: within ``margin`` px
    of its box, where a user corrects a leak), as ((N, 2) row/column, (N,) bool)."""
    mask = np.asarray(mask, bool)
    inside = np.argwhere(mask)
    if not len(inside):
        raise ValueError("the mask is empty: no positive point")
    chosen = [inside[rng.integers(len(inside), size=positive)]]
    if negative:
        box = bounding_box(mask).astype(int)
        rows, cols = mask.shape
        near = np.zeros_like(mask)
        near[max(box[0] - margin, 0):min(box[2] + margin + 1, rows),
             max(box[1] - margin, 0):min(box[3] + margin + 1, cols)] = True
        outside = np.argwhere(near & ~mask)
        if not len(outside):
            outside = np.argwhere(~mask)
        if len(outside):
            chosen.append(outside[rng.integers(len(outside), size=negative)])
    points = np.concatenate(chosen).astype(np.float64)
    flags = np.zeros(len(points), bool)
    flags[:positive] = True
    return points, flags


def correction_click(predicted: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, bool] | None:
    """Where a user would click next: the point deepest inside the largest error region.

    An error region is a connected part of the missed object (the click is positive) or of the
    false mask (negative); the click goes to its pixel farthest from the region's border, as in
    the iterative training of RITM and SAM. Returns ((row, column), positive), or None when the
    prediction is exact.
    """
    predicted = np.asarray(predicted, bool)
    target = np.asarray(target, bool)
    best: tuple[int, np.ndarray, bool] | None = None
    for region, positive in ((target & ~predicted, True), (predicted & ~target, False)):
        if not region.any():
            continue
        parts, count = ndimage.label(region)
        sizes = np.bincount(parts.ravel(), minlength=count + 1)
        sizes[0] = 0
        largest = int(np.argmax(sizes))
        if best is None or sizes[largest] > best[0]:
            best = (int(sizes[largest]), parts == largest, positive)
    if best is None:
        return None
    # Pad so that a region touching the image edge still has its deepest point inside.
    depth = ndimage.distance_transform_edt(np.pad(best[1], 1))[1:-1, 1:-1]
    row, col = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return np.array([row, col], np.float64), best[2]
