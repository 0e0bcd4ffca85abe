"""Label edits of a session: predictions written, hand edits recorded, clearing, propagation runs.

The write rule of a prediction is the one propagation uses (see
:meth:`..propagation.run.PropagationRun.would_write`), applied to one slice: the object's voxels
outside the new mask are cleared, the mask is written where the voxel is free or already the
object's (anywhere with ``overwrite``), and voxels painted or erased by hand are never touched.
Every edit becomes a :class:`~.history.Step` of patches cropped to the changed voxels.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ...errors import SessionError
from ..propagation import ObjectsResult
from ..propagation.run import PropagationResult
from .history import Patch, Step
from .paint import atoms_to_voxels, group_by_plane, per_voxel, voxel_indices
from .prompts import check_masks
from .state import Candidate, LockMap, Region, SegObject, SessionChange, bbox, region_of_slice, shift

Key = tuple[int, int]


class EditsMixin:
    """Label-editing methods of :class:`~.session.SegmentationSession`."""

    labels: np.ndarray
    locks: LockMap
    overwrite: bool
    _objects: dict[int, SegObject]
    _prompts: dict
    _predictions: dict[int, dict[Key, Candidate]]
    _active: int | None

    # ------------------------------------------------------------------ patches
    def _plane_region(self, axis: int, index: int) -> Region:
        rows, cols = (s for a, s in enumerate(self.labels.shape) if a != axis)
        return region_of_slice(axis, index, slice(0, rows), slice(0, cols))

    def _add_patch(self, step: Step, region: Region, before: np.ndarray | None = None,
                   after: np.ndarray | None = None, lock_before: np.ndarray | None = None,
                   lock_after: np.ndarray | None = None, *, write_labels: bool = True) -> None:
        """Crop a change of ``region`` to its changed voxels, apply it (locks always; labels if asked) and keep it."""
        changed = None if before is None else np.asarray(before) != np.asarray(after)
        lock_changed = None if lock_before is None else np.asarray(lock_before) != np.asarray(lock_after)
        parts = [c for c in (changed, lock_changed) if c is not None]
        if not parts:
            return
        box = bbox(parts[0] | parts[1] if len(parts) == 2 else parts[0])
        if box is None:
            return
        where = shift(box, tuple(s.start for s in region))
        patch = Patch(where)
        locks_change = lock_changed is not None and bool(lock_changed[box].any())
        # The labels are kept with a lock change even where they did not change: replay checks them.
        if changed is not None and (changed[box].any() or locks_change):
            patch.before, patch.after = np.array(before[box]), np.array(after[box])  # type: ignore[index]
            if write_labels:
                mask = changed[box]
                view = self.labels[where]
                view[mask] = patch.after[mask]
        if locks_change:
            patch.lock_before, patch.lock_after = np.array(lock_before[box]), np.array(lock_after[box])  # type: ignore[index]
            self.locks.put(where, patch.lock_after, where=lock_changed[box])
        step.patches.append(patch)

    # ------------------------------------------------------------------ predictions
    def apply_prediction(self, obj: int, axis: int, index: int, masks: Any, choice: int = 0, *,
                         overwrite: bool | None = None) -> Step:
        """Write candidate ``choice`` of a prediction as ``obj`` on one slice and keep every candidate for cycling.

        The object's earlier voxels on the slice outside the mask are cleared; other objects'
        voxels are kept unless ``overwrite`` (default: the session's setting); voxels painted
        or erased by hand never change; no other slice changes.
        """
        value = self._live(obj)
        key = self._check_slice(axis, index)
        masks = check_masks(masks, self.slice_shape(key[0]))
        count = len(masks.masks)
        if isinstance(choice, bool) or not isinstance(choice, int | np.integer) or not 0 <= int(choice) < count:
            raise SessionError(f"Candidate {choice!r} does not exist: the prediction has {count} mask(s).")
        step = Step(value, "prediction")
        self._apply(step, value, key, Candidate(masks, int(choice)), overwrite)
        return self._commit(step)

    def cycle_candidate(self, obj: int, axis: int, index: int, *, overwrite: bool | None = None) -> tuple[int, float]:
        """Apply the next candidate mask of the kept prediction on that slice (wrapping); returns (choice, predicted IoU)."""
        value = self._live(obj)
        key = self._check_slice(axis, index)
        cand = self._predictions[value].get(key)
        if cand is None:
            raise SessionError(f"Object {value} has no prediction on slice {index} (axis {axis}) to cycle; "
                               "predict with multimask first.")
        following = Candidate(cand.masks, (cand.choice + 1) % cand.count)
        step = Step(value, "candidate")
        self._apply(step, value, key, following, overwrite)
        self._commit(step)
        return following.choice, following.score

    def _apply(self, step: Step, value: int, key: Key, cand: Candidate, overwrite: bool | None) -> None:
        axis, index = key
        region = self._plane_region(axis, index)
        before = np.array(self.labels[region])
        mask = np.expand_dims(np.asarray(cand.masks.masks[cand.choice], bool), axis)
        free = ~self.locks.get(region)
        own = before == value
        after = before.copy()
        after[own & ~mask & free] = 0
        if not (self.overwrite if overwrite is None else overwrite):
            free &= (before == 0) | own
        after[mask & free] = value
        self._add_patch(step, region, before, after)
        self._put_prediction(step, value, key, cand)

    # ------------------------------------------------------------------ hand edits
    def record_manual_edit(self, indices: Any, old_values: Any, new_value: Any, *, obj: int | None = None) -> Step | None:
        """Record a brush/eraser/fill edit already applied to the labels: its voxels become hand-made, and one undo step.

        ``indices`` is (N, 3) or a tuple of three index arrays, ``old_values`` their values
        before, ``new_value`` the painted value (0 for the eraser) or one value per voxel. The
        step belongs to ``obj``, else to the painted object, else (erasing) to the active one.
        """
        voxels = voxel_indices(indices, self.shape)
        new = per_voxel(new_value, len(voxels), "new values")
        if len(voxels) and np.any(self.labels[tuple(voxels.T)].astype(np.int64) != new.astype(np.int64)):
            raise SessionError("The labels do not hold the new values of this hand edit: record it after it is "
                               "applied (napari's paint event comes after the layer's data changed).")
        return self._record_hand([(voxels, per_voxel(old_values, len(voxels), "old values"), new)], obj)

    def record_paint(self, atoms: Sequence, *, obj: int | None = None) -> Step | None:
        """Record the atoms of a napari Labels ``paint`` event (``event.value``) as one hand edit.

        The labels may hold the edit already (a brush stroke) or not yet (napari emits ``paint``
        before writing a single edit made outside a stroke): the new values are written here too.
        """
        return self._record_hand(atoms_to_voxels(atoms, self.shape), obj)

    def _record_hand(self, parts: list, obj: int | None) -> Step | None:
        if not parts or not sum(len(p[0]) for p in parts):
            return None
        voxels = np.concatenate([p[0] for p in parts])
        old = np.concatenate([p[1] for p in parts]).astype(np.int64)
        new = np.concatenate([p[2] for p in parts]).astype(np.int64)
        top = np.iinfo(self.labels.dtype).max
        if old.min() < 0 or old.max() > top or new.min() < 0 or new.max() > top:
            raise SessionError(f"Hand-edit values must lie in 0..{top} for labels of type {self.labels.dtype}.")
        painted = [int(v) for v in np.unique(new) if v != 0]
        added = [self._insert(v, None, None) for v in painted if v not in self._objects]
        if added:
            was = self._active
            if self._active is None:  # as adopt() does: a session with objects has an active one
                self._active = added[0].value
            self._emit(SessionChange("adopt", None, objects=True, active=self._active != was))
        if obj is not None:
            owner: int | None = self._live(obj)
        elif len(painted) == 1 and not np.any(new == 0):
            owner = painted[0]
        else:
            owner = self._active if self._active is not None else (painted[0] if painted else None)
        step = Step(owner or 0, "manual")
        for z, (rows, cols, first_old, last_new) in group_by_plane(voxels, old, new).items():
            r0, c0 = int(rows.min()), int(cols.min())
            region = (slice(z, z + 1), slice(r0, int(rows.max()) + 1), slice(c0, int(cols.max()) + 1))
            # The new values come from the edit, not the labels: napari emits ``paint`` before it
            # writes the labels for a single edit outside a stroke (data_setitem, paint(), fill()).
            after = np.array(self.labels[region])
            after[0, rows - r0, cols - c0] = last_new
            before = after.copy()
            before[0, rows - r0, cols - c0] = first_old
            lock_before = self.locks.get(region)
            lock_after = lock_before.copy()
            lock_after[0, rows - r0, cols - c0] = True
            self._add_patch(step, region, before, after, lock_before, lock_after)
        if owner is None:  # nobody to give the step to: the voxels are still hand-made
            return None
        return self._commit(step)

    def locked_mask(self) -> np.ndarray:
        """Boolean volume of the hand-made voxels (built on demand; for propagation's ``locked=``)."""
        return self.locks.volume()

    def unlock_slice(self, axis: int, index: int, obj: int | None = None) -> Step | None:
        """Let the model write again over hand-made voxels of one slice (those of ``obj``, or all); undoable."""
        key = self._check_slice(axis, index)
        owner = self._live(obj) if obj is not None else self._active
        region = self._plane_region(*key)
        lock_before = self.locks.get(region)
        release = lock_before if obj is None else lock_before & (self.labels[region] == owner)
        step = Step(owner or 0, "unlock")
        current = np.array(self.labels[region])
        self._add_patch(step, region, current, current, lock_before, lock_before & ~release)
        return None if owner is None else self._commit(step)

    # ------------------------------------------------------------------ clearing
    def clear_slice(self, obj: int, axis: int, index: int, *, manual: bool = False) -> Step:
        """Remove ``obj``'s model-written voxels, prompts and prediction on one slice; ``manual=True`` also its hand-painted voxels."""
        value = self._live(obj)
        key = self._check_slice(axis, index)
        region = self._plane_region(*key)
        before = np.array(self.labels[region])
        lock_before = self.locks.get(region)
        target = (before == value) if manual else (before == value) & ~lock_before
        after = before.copy()
        after[target] = 0
        step = Step(value, "clear")
        if manual:
            self._add_patch(step, region, before, after, lock_before, lock_before & ~target)
        else:
            self._add_patch(step, region, before, after)
        self._put_prompts(step, value, key, None)
        self._put_prediction(step, value, key, None)
        return self._commit(step)

    def clear_object(self, obj: int, *, manual: bool = True) -> Step:
        """Remove all of ``obj``'s voxels (``manual=False``: keep its hand-painted ones), prompts and predictions."""
        value = self._live(obj)
        step = Step(value, "clear")
        self._clear_everywhere(step, value, manual)
        return self._commit(step)

    def delete_object(self, obj: int) -> Step:
        """Remove object ``obj`` from the table with all its voxels and prompts; ``undo(obj)`` brings it back."""
        value = self._live(obj)
        step = Step(value, "delete")
        self._clear_everywhere(step, value, manual=True)
        step.deleted = (self._objects[value], list(self._objects).index(value))
        was = self._active
        self._drop_object(value)
        return self._commit(step, objects=True, active=self._active != was)

    def _clear_everywhere(self, step: Step, value: int, manual: bool) -> None:
        rows, cols = self.labels.shape[1:]
        locked_planes = set(self.locks.slices())
        for z in range(self.labels.shape[0]):
            mine = self.labels[z] == value
            if not manual and z in locked_planes:
                mine &= ~self.locks.get((slice(z, z + 1), slice(0, rows), slice(0, cols)))[0]
            box = bbox(mine)
            if box is None:
                continue
            region = (slice(z, z + 1), *box)
            target = mine[box][None]
            before = np.array(self.labels[region])
            after = np.where(target, 0, before).astype(before.dtype)
            if manual and z in locked_planes:
                lock_before = self.locks.get(region)
                self._add_patch(step, region, before, after, lock_before, lock_before & ~target)
            else:
                self._add_patch(step, region, before, after)
        for key in list(self._prompts[value]):
            self._put_prompts(step, value, key, None)
        for key in list(self._predictions[value]):
            self._put_prediction(step, value, key, None)

    # ------------------------------------------------------------------ propagation
    def push_propagation(self, obj: int, result: PropagationResult) -> Step:
        """Make a finished propagation run of ``obj`` (already written into the labels) one undo step."""
        value = self._live(obj)
        if not isinstance(result, PropagationResult):
            raise SessionError(f"push_propagation takes a PropagationResult, got {type(result).__name__}.")
        if int(result.object_value) != value:
            raise SessionError(f"This propagation wrote object {result.object_value}, not object {value}.")
        step = Step(value, "propagation")
        self._propagation_patches(step, result, {})
        return self._commit(step)

    def push_objects_propagation(self, result: ObjectsResult) -> list[Step]:
        """Make a propagate_objects run one undo step per object."""
        if not isinstance(result, ObjectsResult):
            raise SessionError(f"push_objects_propagation takes an ObjectsResult, got {type(result).__name__}.")
        values = [self._live(v) for v in result.results]
        # Walking the objects backwards, a slice's content after one object's run is the
        # content before the next run that touched it.
        later: dict[Key, np.ndarray] = {}
        steps = {}
        for value in reversed(values):
            steps[value] = Step(value, "propagation")
            self._propagation_patches(steps[value], result.results[value], later)
        return [self._commit(steps[v]) for v in values]

    def _propagation_patches(self, step: Step, result: PropagationResult, later: dict[Key, np.ndarray]) -> None:
        axis = int(result.undo.axis)
        for k in result.undo.slices:
            key = self._check_slice(axis, k)
            region = self._plane_region(*key)
            before = np.expand_dims(np.asarray(result.undo.previous[k]), axis)
            if before.shape != tuple(s.stop - s.start for s in region):
                raise SessionError(f"The propagation's slice {k} is {before.shape[:axis] + before.shape[axis + 1:]}, "
                                   "not a slice of this session's labels.")
            after = later.get(key)
            self._add_patch(step, region, before, np.array(self.labels[region]) if after is None else after,
                            write_labels=False)
            later[key] = before
