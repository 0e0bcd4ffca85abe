"""Prompts and kept predictions of a session, per (object, axis, slice index).

Prompts belong to the slice they were drawn on: a point on axial slice 40 of the liver is
stored under (liver, 0, 40) and never shows on slice 41. Coordinates are the slice's own
pixels ``(row, column)`` as in :mod:`.predictor`. Every change is one undo step of its object.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Sequence

import numpy as np

from ...errors import SessionError
from ..predictor import Prompts, SliceMasks
from .history import Step
from .state import Candidate, SlicePrompts, store

Key = tuple[int, int]


class PromptsMixin:
    """Prompt and prediction-record methods of :class:`~.session.SegmentationSession`."""

    labels: np.ndarray
    _prompts: dict[int, dict[Key, SlicePrompts]]
    _predictions: dict[int, dict[Key, Candidate]]

    # ------------------------------------------------------------------ checks
    @staticmethod
    def _check_axis(axis: Any) -> int:
        if isinstance(axis, bool) or not isinstance(axis, int | np.integer) or int(axis) not in (0, 1, 2):
            raise SessionError(f"axis must be 0, 1 or 2, got {axis!r}.")
        return int(axis)

    def _check_slice(self, axis: Any, index: Any) -> Key:
        axis = self._check_axis(axis)
        n = self.labels.shape[axis]
        if isinstance(index, bool) or not isinstance(index, int | np.integer) or not 0 <= int(index) < n:
            raise SessionError(f"Slice {index!r} is outside 0..{n - 1} along axis {axis}.")
        return int(axis), int(index)

    def slice_shape(self, axis: int) -> tuple[int, int]:
        """(rows, columns) of a slice along ``axis``."""
        return tuple(s for a, s in enumerate(self.labels.shape) if a != axis)  # type: ignore[return-value]

    def _check_point(self, axis: int, row: Any, col: Any) -> tuple[float, float]:
        rows, cols = self.slice_shape(axis)
        try:
            r, c = float(row), float(col)
        except (TypeError, ValueError):
            raise SessionError(f"A point needs numeric (row, column), got ({row!r}, {col!r}).") from None
        if not (math.isfinite(r) and math.isfinite(c)) or not (-0.5 <= r <= rows - 0.5 and -0.5 <= c <= cols - 0.5):
            raise SessionError(f"Point ({row}, {col}) lies outside the {rows}x{cols} slice.")
        return r, c

    def _check_box(self, axis: int, box: Any) -> tuple[float, float, float, float]:
        try:
            values = np.asarray(box, dtype=float).reshape(-1) if box is not None else np.zeros(0)
        except (TypeError, ValueError):
            values = np.zeros(0)
        if values.size != 4:
            raise SessionError(f"A box is (row0, col0, row1, col1), got {box!r}.")
        r0, c0 = self._check_point(axis, values[0], values[1])
        r1, c1 = self._check_point(axis, values[2], values[3])
        # Corners may come in any order (a box dragged up-left).
        return min(r0, r1), min(c0, c1), max(r0, r1), max(c0, c1)

    # ------------------------------------------------------------------ reading
    def slice_prompts(self, obj: int, axis: int, index: int) -> SlicePrompts:
        """The prompts of ``obj`` on one slice (empty when there are none)."""
        return self._prompts[self._live(obj)].get(self._check_slice(axis, index), SlicePrompts())

    def prompts_for(self, obj: int, axis: int, index: int, *, refine: bool = False) -> Prompts | None:
        """The predictor's Prompts for ``obj`` on one slice, or None when it has none.

        ``refine=True`` adds the low-resolution logits of the mask applied there before, so a
        new click refines the previous answer (SAM's usual interactive loop).
        """
        record = self.slice_prompts(obj, axis, index)
        if record.empty:
            return None
        logits = None
        if refine:
            cand = self._predictions[self._live(obj)].get((int(axis), int(index)))
            logits = None if cand is None else cand.masks.low_res_logits[cand.choice]
        return record.to_prompts(logits)

    def prompted_slices(self, obj: int, axis: int) -> list[int]:
        """Indices of the slices along ``axis`` where ``obj`` has prompts, sorted."""
        axis = self._check_axis(axis)
        return sorted(i for a, i in self._prompts[self._live(obj)] if a == axis)

    def candidate(self, obj: int, axis: int, index: int) -> Candidate | None:
        """The kept prediction of ``obj`` on one slice (all candidates, which one is applied), or None."""
        return self._predictions[self._live(obj)].get(self._check_slice(axis, index))

    def current_choice(self, obj: int, axis: int, index: int) -> int | None:
        """Which candidate mask is applied on that slice (0 = best), or None without a prediction."""
        cand = self.candidate(obj, axis, index)
        return None if cand is None else cand.choice

    def predicted_iou(self, obj: int, axis: int, index: int) -> float | None:
        """The model's predicted IoU of the applied candidate on that slice, or None."""
        cand = self.candidate(obj, axis, index)
        return None if cand is None else cand.score

    def predicted_slices(self, obj: int, axis: int) -> list[int]:
        """Indices of the slices along ``axis`` where ``obj`` has a kept prediction, sorted."""
        axis = self._check_axis(axis)
        return sorted(i for a, i in self._predictions[self._live(obj)] if a == axis)

    # ------------------------------------------------------------------ changing prompts
    def _put_prompts(self, step: Step, value: int, key: Key, record: SlicePrompts | None) -> None:
        table = self._prompts[value]
        old = table.get(key)
        new = None if record is None or record.empty else record
        if old == new:
            return
        store(table, key, new)
        step.record_prompts(key, old, new)

    def _put_prediction(self, step: Step, value: int, key: Key, cand: Candidate | None) -> None:
        table = self._predictions[value]
        old = table.get(key)
        if old is cand or (old is not None and cand is not None and old.masks is cand.masks
                           and old.choice == cand.choice):
            return
        store(table, key, cand)
        step.record_prediction(key, old, cand)

    def _edit_prompts(self, obj: int, axis: int, index: int, edit) -> Step:
        value = self._live(obj)
        key = self._check_slice(axis, index)
        record = self._prompts[value].get(key, SlicePrompts())
        step = Step(value, "prompts")
        self._put_prompts(step, value, key, edit(record))
        return self._commit(step)

    def _target(self, obj: Any, axis: Any, index: Any) -> int:
        """Check the object and the slice before a prompt's coordinates (they depend on the axis); returns the axis."""
        self._live(obj)
        return self._check_slice(axis, index)[0]

    def add_point(self, obj: int, axis: int, index: int, row: float, col: float, positive: bool = True) -> int:
        """Add a positive (include) or negative (exclude) point on one slice; returns its position in the list."""
        r, c = self._check_point(self._target(obj, axis, index), row, col)
        self._edit_prompts(obj, axis, index, lambda p: SlicePrompts(p.points + ((r, c, bool(positive)),), p.box))
        return len(self.slice_prompts(obj, axis, index).points) - 1

    def move_point(self, obj: int, axis: int, index: int, i: int, row: float, col: float) -> None:
        """Move point ``i`` of that slice to (row, col), keeping its sign."""
        r, c = self._check_point(self._target(obj, axis, index), row, col)
        i = self._point_index(obj, axis, index, i)
        self._edit_prompts(obj, axis, index, lambda p: SlicePrompts(
            p.points[:i] + ((r, c, p.points[i][2]),) + p.points[i + 1:], p.box))

    def remove_point(self, obj: int, axis: int, index: int, i: int) -> None:
        """Remove point ``i`` of that slice."""
        i = self._point_index(obj, axis, index, i)
        self._edit_prompts(obj, axis, index, lambda p: SlicePrompts(p.points[:i] + p.points[i + 1:], p.box))

    def _point_index(self, obj: int, axis: int, index: int, i: Any) -> int:
        n = len(self.slice_prompts(obj, axis, index).points)
        if isinstance(i, bool) or not isinstance(i, int | np.integer) or not -n <= int(i) < n:
            raise SessionError(f"Point {i!r} does not exist: slice {index} (axis {axis}) has {n} point(s).")
        return int(i) % n

    def set_box(self, obj: int, axis: int, index: int, box: Sequence[float]) -> None:
        """Set the box (row0, col0, row1, col1) of that slice, replacing any earlier box."""
        corners = self._check_box(self._target(obj, axis, index), box)
        self._edit_prompts(obj, axis, index, lambda p: SlicePrompts(p.points, corners))

    def clear_box(self, obj: int, axis: int, index: int) -> None:
        """Remove the box of that slice (points stay)."""
        self._edit_prompts(obj, axis, index, lambda p: SlicePrompts(p.points, None))

    def set_prompts(self, obj: int, axis: int, index: int, points: Any = None, positive: Any = None,
                    box: Any = None) -> None:
        """Replace all prompts of that slice at once (e.g. synced from a Points and a Shapes layer)."""
        axis_i = self._target(obj, axis, index)
        try:
            pts = np.zeros((0, 2)) if points is None else np.asarray(points, float).reshape(-1, 2)
        except (TypeError, ValueError):
            raise SessionError(f"The points must be (row, column) pairs of numbers, got {points!r}.") from None
        signs = np.ones(len(pts), bool) if positive is None else np.asarray(positive, bool).reshape(-1)
        if len(signs) != len(pts):
            raise SessionError(f"{len(pts)} points but {len(signs)} positive/negative flags.")
        checked = tuple((*self._check_point(axis_i, r, c), bool(s)) for (r, c), s in zip(pts, signs))
        corners = None if box is None else self._check_box(axis_i, box)
        self._edit_prompts(obj, axis, index, lambda p: SlicePrompts(checked, corners))

    def clear_prompts(self, obj: int, axis: int, index: int) -> None:
        """Remove every prompt of that slice (the labels stay; see clear_slice to remove both)."""
        self._edit_prompts(obj, axis, index, lambda p: SlicePrompts())


def check_masks(masks: Any, slice_shape: tuple[int, int]) -> SliceMasks:
    """``masks`` as a SliceMasks whose (K, H, W) masks fit ``slice_shape`` (SessionError otherwise)."""
    if not isinstance(masks, SliceMasks):
        raise SessionError(f"A prediction must be a SliceMasks (from SlicePredictor.predict), got {type(masks).__name__}.")
    array = np.asarray(masks.masks)
    if array.ndim != 3 or array.shape[0] == 0 or array.shape[1:] != tuple(slice_shape):
        raise SessionError(f"The prediction's masks are {array.shape}, but the slice is {tuple(slice_shape)}: "
                           "predict on the same plane of the same volume.")
    if len(np.asarray(masks.scores).reshape(-1)) != array.shape[0]:
        raise SessionError(f"The prediction has {array.shape[0]} masks but {len(np.asarray(masks.scores).reshape(-1))} "
                           "scores.")
    logits = np.asarray(masks.low_res_logits)
    if logits.ndim != 3 or logits.shape[0] != array.shape[0]:
        raise SessionError(f"The prediction has {array.shape[0]} masks but {logits.shape[0] if logits.ndim else 0} "
                           "low-res logits; each candidate needs its low-res logits.")
    if not all(isinstance(a, np.ndarray) for a in (masks.masks, masks.scores, masks.low_res_logits)):
        masks = replace(masks, masks=array, scores=np.asarray(masks.scores).reshape(-1), low_res_logits=logits)
    return masks
