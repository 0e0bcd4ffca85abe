"""Undo history of an interactive session: label patches, steps, per-object stacks and a byte bound.

A :class:`Patch` holds one box of the label volume before and after a change (and, where the
change made voxels hand-made or released them, the lock flags before and after), cropped to
the changed voxels, so a brush stroke costs bytes, not a volume copy. A :class:`Step` is one
undoable action of one object: its patches plus the prompt and prediction records it
replaced. :class:`History` keeps an undo and a redo stack per object, bounded by bytes.

Undoing a patch restores a voxel only where it still holds what the step wrote: with one
history per object, another object's later edit of the same voxel must survive an undo.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..predictor import SliceMasks
from .state import Candidate, LockMap, Region, SegObject, SlicePrompts, slice_masks_nbytes

DEFAULT_HISTORY_BYTES = 256 * 2**20  # 256 MiB for all objects' undo and redo steps together

Key = tuple[int, int]  # (axis, slice index)


@dataclass
class Patch:
    """One box of the label volume (and of the lock flags) before and after a change."""

    region: Region
    before: np.ndarray | None = None  # labels in the box before (None: the labels did not change)
    after: np.ndarray | None = None
    lock_before: np.ndarray | None = None  # hand-made flags before (None: they did not change)
    lock_after: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        """Bytes held by the patch's arrays."""
        arrays = (self.before, self.after, self.lock_before, self.lock_after)
        return int(sum(a.nbytes for a in arrays if a is not None))

    def replay(self, labels: np.ndarray, locks: LockMap, undo: bool) -> None:
        """Put the box back as it was (``undo``) or as the step left it, voxel by voxel where nothing else changed it."""
        held = None
        if self.before is not None and self.after is not None:
            source, target = (self.after, self.before) if undo else (self.before, self.after)
            current = labels[self.region]
            held = current == source  # nobody changed the voxel since this step (or its undo)
            restored = held & (self.before != self.after)
            current[restored] = target[restored]
        if self.lock_before is not None and self.lock_after is not None:
            source, target = (self.lock_after, self.lock_before) if undo else (self.lock_before, self.lock_after)
            flags = (self.lock_before != self.lock_after) & (locks.get(self.region) == source)
            if held is not None:
                # A voxel someone edited since keeps its lock: the lock belongs to that later edit now.
                flags &= held
            locks.put(self.region, target, where=flags)


@dataclass(eq=False)
class Step:
    """One undoable action of one object: label patches plus the prompt/prediction records before and after."""

    obj: int
    kind: str
    patches: list[Patch] = field(default_factory=list)
    prompts: dict[Key, tuple[SlicePrompts | None, SlicePrompts | None]] = field(default_factory=dict)
    predictions: dict[Key, tuple[Candidate | None, Candidate | None]] = field(default_factory=dict)
    deleted: tuple[SegObject, int] | None = None  # the object this step removed from the table, and where it was
    seq: int = 0

    @property
    def empty(self) -> bool:
        """True when the step changed nothing."""
        return not (self.patches or self.prompts or self.predictions or self.deleted)

    @property
    def regions(self) -> list[Region]:
        """The boxes of the label volume this step changed (what a viewer must refresh)."""
        return [p.region for p in self.patches]

    def slices(self, axis: int = 0) -> list[int]:
        """Indices along ``axis`` of the slices this step's label changes touch, sorted."""
        out: set[int] = set()
        for region in self.regions:
            out.update(range(region[axis].start, region[axis].stop))
        return sorted(out)

    @property
    def prompt_keys(self) -> list[Key]:
        """(axis, index) of the slices whose prompts or prediction records this step changed."""
        return sorted(set(self.prompts) | set(self.predictions))

    def record_prompts(self, key: Key, before: SlicePrompts | None, after: SlicePrompts | None) -> None:
        """Note a prompt change on one slice (the first "before" of a step is kept)."""
        self.prompts[key] = (self.prompts[key][0] if key in self.prompts else before, after)

    def record_prediction(self, key: Key, before: Candidate | None, after: Candidate | None) -> None:
        """Note a prediction-record change on one slice (the first "before" of a step is kept)."""
        self.predictions[key] = (self.predictions[key][0] if key in self.predictions else before, after)

    def merge(self, later: "Step") -> None:
        """Append a later step of the same object, so both undo as one."""
        self.patches += later.patches
        for key, (before, after) in later.prompts.items():
            self.record_prompts(key, before, after)
        for key, (before, after) in later.predictions.items():
            self.record_prediction(key, before, after)
        self.deleted = self.deleted or later.deleted

    @property
    def own_nbytes(self) -> int:
        """Bytes of the patches and prompt records (predictions are counted once per history, see masks())."""
        prompts = sum(p.nbytes() for pair in self.prompts.values() for p in pair if p is not None)
        return sum(p.nbytes for p in self.patches) + prompts + 256

    def masks(self) -> list[SliceMasks]:
        """The predictions this step refers to (each once)."""
        seen: dict[int, SliceMasks] = {}
        for pair in self.predictions.values():
            for cand in pair:
                if cand is not None:
                    seen[id(cand.masks)] = cand.masks
        return list(seen.values())


class History:
    """Undo and redo stacks per object, all together bounded by ``max_bytes`` (oldest steps dropped first).

    The newest step is never dropped, so the last action can always be undone even when it
    alone is larger than the bound.
    """

    def __init__(self, max_bytes: int = DEFAULT_HISTORY_BYTES) -> None:
        if int(max_bytes) < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._undo: dict[int, list[Step]] = {}
        self._redo: dict[int, list[Step]] = {}
        self._own = 0
        self._masks: dict[int, list] = {}  # id -> [reference count, bytes, the SliceMasks (keeps the id valid)]
        self._seq = 0
        self.dropped = 0  # steps dropped to stay within the bound

    # ------------------------------------------------------------------ accounting
    @property
    def nbytes(self) -> int:
        """Bytes held by every step of every object."""
        return self._own + sum(entry[1] for entry in self._masks.values())

    def _count(self, step: Step, sign: int) -> None:
        self._own += sign * step.own_nbytes
        for masks in step.masks():
            entry = self._masks.setdefault(id(masks), [0, slice_masks_nbytes(masks), masks])
            entry[0] += sign
            if entry[0] <= 0:
                del self._masks[id(masks)]

    # ------------------------------------------------------------------ stacks
    def can_undo(self, obj: int) -> bool:
        """True when ``obj`` has a step to undo."""
        return bool(self._undo.get(obj))

    def can_redo(self, obj: int) -> bool:
        """True when ``obj`` has an undone step to redo."""
        return bool(self._redo.get(obj))

    def undo_steps(self, obj: int) -> list[Step]:
        """``obj``'s undo stack, oldest first (read only)."""
        return list(self._undo.get(obj, ()))

    def redo_steps(self, obj: int) -> list[Step]:
        """``obj``'s redo stack, next to redo last (read only)."""
        return list(self._redo.get(obj, ()))

    def push(self, step: Step) -> None:
        """Add a new step: it clears its object's redo stack; old steps are dropped beyond the bound."""
        self.clear_redo(step.obj)
        self._seq += 1
        step.seq = self._seq
        self._undo.setdefault(step.obj, []).append(step)
        self._count(step, +1)
        self._trim(keep=step)

    def clear_redo(self, obj: int) -> None:
        """Forget ``obj``'s undone steps (a new edit makes them meaningless)."""
        for step in self._redo.pop(obj, []):
            self._count(step, -1)

    def pop_undo(self, obj: int) -> Step | None:
        """Take ``obj``'s last step off the undo stack onto the redo stack (the caller replays it)."""
        return self._move(self._undo, self._redo, obj)

    def pop_redo(self, obj: int) -> Step | None:
        """Take ``obj``'s last undone step back onto the undo stack (the caller replays it)."""
        return self._move(self._redo, self._undo, obj)

    @staticmethod
    def _move(source: dict[int, list[Step]], target: dict[int, list[Step]], obj: int) -> Step | None:
        stack = source.get(obj)
        if not stack:
            return None
        step = stack.pop()
        target.setdefault(obj, []).append(step)
        return step

    def forget(self, obj: int) -> None:
        """Drop every step of ``obj`` (its value is reused by a new object)."""
        for step in self._undo.pop(obj, []) + self._redo.pop(obj, []):
            self._count(step, -1)

    def clear(self) -> None:
        """Drop every step of every object."""
        for obj in list(self._undo) + list(self._redo):
            self.forget(obj)

    def _trim(self, keep: Step) -> None:
        while self.nbytes > self.max_bytes:
            # Oldest undo step of any object first; undone steps (farthest from the present) after those.
            oldest = [(s[0].seq, obj) for obj, s in self._undo.items() if s and s[0] is not keep]
            if oldest:
                stack = self._undo[min(oldest)[1]]
            else:
                pending = [(s[0].seq, obj) for obj, s in self._redo.items() if s]
                if not pending:
                    return
                stack = self._redo[min(pending)[1]]
            self._count(stack.pop(0), -1)
            self.dropped += 1
