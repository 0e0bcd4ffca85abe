"""The pieces of state an interactive session keeps: objects, per-slice prompts, predictions, hand-made voxels.

Everything here is plain data (numpy and the standard library); :mod:`.session` ties them
together with the label volume and the undo history. Prompt and prediction records are
immutable, so the history can hold the "before" and "after" of a change by reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..predictor import Prompts, SliceMasks

Region = tuple[slice, slice, slice]  # a box of the label volume: start:stop on each display axis


@dataclass(frozen=True)
class SegObject:
    """One object of the session: its label value, its name and its display colour (r, g, b 0-255)."""

    value: int
    name: str
    color: tuple[int, int, int]


@dataclass(frozen=True)
class SlicePrompts:
    """The prompts of one object on one slice: points ``(row, col, positive)`` and at most one box."""

    points: tuple[tuple[float, float, bool], ...] = ()
    box: tuple[float, float, float, float] | None = None  # row0, col0, row1, col1 (row0 <= row1)

    @property
    def empty(self) -> bool:
        """True when the slice has neither points nor a box."""
        return not self.points and self.box is None

    def nbytes(self) -> int:
        """Approximate memory held (for the history's byte count)."""
        return 64 + 32 * len(self.points) + (32 if self.box is not None else 0)

    def to_prompts(self, mask_logits: np.ndarray | None = None) -> Prompts:
        """The predictor's :class:`~.predictor.Prompts` for these prompts (plus an optional mask prompt)."""
        points = positive = None
        if self.points:
            points = np.array([(r, c) for r, c, _ in self.points], float)
            positive = np.array([p for _, _, p in self.points], bool)
        box = None if self.box is None else np.array(self.box, float)
        return Prompts(points=points, positive=positive, box=box, mask_logits=mask_logits)


@dataclass(frozen=True)
class Candidate:
    """A prediction kept for one (object, axis, slice): every mask the model gave, and which one is applied."""

    masks: SliceMasks
    choice: int = 0

    @property
    def count(self) -> int:
        """Number of candidate masks."""
        return int(len(self.masks.masks))

    @property
    def score(self) -> float:
        """Predicted IoU of the applied mask."""
        return float(self.masks.scores[self.choice])


def store(table: dict, key: Any, record: Any) -> None:
    """Put ``record`` in ``table`` under ``key``, or drop the key when ``record`` is None."""
    if record is None:
        table.pop(key, None)
    else:
        table[key] = record


def slice_masks_nbytes(masks: SliceMasks) -> int:
    """Bytes held by a prediction's arrays (masks, scores, logits)."""
    total = masks.masks.nbytes + np.asarray(masks.scores).nbytes + np.asarray(masks.low_res_logits).nbytes
    return int(total + (masks.logits.nbytes if masks.logits is not None else 0))


def bbox(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The tightest box (one slice per axis) around the True voxels of ``mask``; None when there are none."""
    if not mask.any():
        return None
    out = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        out.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(out)


def region_of_slice(axis: int, index: int, rows: slice, cols: slice) -> Region:
    """The 3D region of a 2D box ``rows, cols`` on slice ``index`` along ``axis`` (one voxel thick there)."""
    parts = [rows, cols]
    parts.insert(axis, slice(index, index + 1))
    return tuple(parts)  # type: ignore[return-value]


def shift(region: tuple[slice, ...], offset: tuple[int, ...]) -> Region:
    """``region`` moved by ``offset`` voxels (boxes found in a crop, put back in volume coordinates)."""
    return tuple(slice(s.start + o, s.stop + o) for s, o in zip(region, offset))  # type: ignore[return-value]


class LockMap:
    """Which voxels were painted or erased by hand: per axial slice, a boolean mask cropped to its own box.

    A painted voxel is locked with the value it holds in the labels; an erased voxel is locked
    as 0. Memory grows with the painted area, not with the volume: a few brush strokes on a
    512x512x300 scan hold a few kilobytes, where a full boolean volume would take 75 MB.
    """

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.shape = tuple(int(s) for s in shape)
        self._planes: dict[int, tuple[int, int, np.ndarray]] = {}  # z -> (row0, col0, cropped mask)

    @property
    def nbytes(self) -> int:
        """Bytes held by the cropped masks."""
        return sum(m.nbytes for _, _, m in self._planes.values())

    def count(self) -> int:
        """Number of locked voxels."""
        return int(sum(np.count_nonzero(m) for _, _, m in self._planes.values()))

    def __bool__(self) -> bool:
        return bool(self._planes)

    def slices(self) -> list[int]:
        """Axial slices holding at least one locked voxel, sorted."""
        return sorted(self._planes)

    def get(self, region: Region) -> np.ndarray:
        """The lock flags inside ``region`` (a new boolean array of the region's shape)."""
        zs, rows, cols = (range(*s.indices(n)) for s, n in zip(region, self.shape))
        out = np.zeros((len(zs), len(rows), len(cols)), bool)
        for i, z in enumerate(zs):
            plane = self._planes.get(z)
            if plane is None:
                continue
            r0, c0, mask = plane
            rr = slice(max(rows.start, r0), min(rows.stop, r0 + mask.shape[0]))
            cc = slice(max(cols.start, c0), min(cols.stop, c0 + mask.shape[1]))
            if rr.start < rr.stop and cc.start < cc.stop:
                out[i, rr.start - rows.start:rr.stop - rows.start, cc.start - cols.start:cc.stop - cols.start] = \
                    mask[rr.start - r0:rr.stop - r0, cc.start - c0:cc.stop - c0]
        return out

    def put(self, region: Region, values: np.ndarray, where: np.ndarray | None = None) -> None:
        """Set the lock flags inside ``region`` to ``values`` (only where ``where`` is True, if given)."""
        z_range, rows, cols = (range(*s.indices(n)) for s, n in zip(region, self.shape))
        values = np.broadcast_to(np.asarray(values, bool), (len(z_range), len(rows), len(cols)))
        where = np.ones(values.shape, bool) if where is None else np.asarray(where, bool)
        z0 = z_range.start
        for i in np.flatnonzero(where.any(axis=(1, 2))):
            z = int(z0 + i)
            # Work on the union of the old crop and the edited box, then shrink to what stays locked.
            old = self._planes.get(z)
            r_lo, c_lo = rows.start, cols.start
            r_hi, c_hi = rows.stop, cols.stop
            if old is not None:
                r0, c0, mask = old
                r_lo, c_lo = min(r_lo, r0), min(c_lo, c0)
                r_hi, c_hi = max(r_hi, r0 + mask.shape[0]), max(c_hi, c0 + mask.shape[1])
            work = self.get((slice(z, z + 1), slice(r_lo, r_hi), slice(c_lo, c_hi)))[0]
            view = work[rows.start - r_lo:rows.stop - r_lo, cols.start - c_lo:cols.stop - c_lo]
            view[where[i]] = values[i][where[i]]
            box = bbox(work)
            if box is None:
                self._planes.pop(z, None)
            else:
                self._planes[z] = (r_lo + box[0].start, c_lo + box[1].start, work[box].copy())

    def volume(self) -> np.ndarray:
        """The whole lock volume as a boolean array (built on demand; for propagation's ``locked=``)."""
        out = np.zeros(self.shape, bool)
        for z, (r0, c0, mask) in self._planes.items():
            out[z, r0:r0 + mask.shape[0], c0:c0 + mask.shape[1]] = mask
        return out

    def clear(self) -> None:
        """Forget every lock."""
        self._planes.clear()


@dataclass(frozen=True)
class SessionChange:
    """What one call changed, for observers: label boxes, prompt slices, the object table, the selection, history."""

    reason: str  # "prediction", "candidate", "prompts", "manual", "clear", "delete", "propagation", "undo", ...
    obj: int | None = None
    regions: tuple[Region, ...] = ()  # boxes of the label volume to refresh
    prompts: tuple[tuple[int, int, int], ...] = ()  # (object, axis, index) whose prompts or prediction changed
    objects: bool = False  # the object table (names, colours, order, membership) changed
    active: bool = False  # the active object changed
    history: bool = False  # can_undo / can_redo may have changed

    def slices(self, axis: int = 0) -> list[int]:
        """Indices along ``axis`` of the slices whose labels changed, sorted."""
        return sorted({i for r in self.regions for i in range(r[axis].start, r[axis].stop)})
