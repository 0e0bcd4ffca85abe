"""The interactive-segmentation session: what the napari panel drives, with no napari or Qt in it.

A :class:`SegmentationSession` owns nothing but references: the label volume it edits in place
(the napari Labels layer's data, in display order), a table of objects, per-slice prompts and
predictions, the voxels the user painted or erased by hand, and a per-object undo history.
The panel turns clicks, boxes and paint strokes into calls here and subscribes with
:meth:`~SegmentationSession.on_change` to refresh exactly what changed. See docs/session.md.

The methods are split over mixins by topic: objects and history here, prompts and
predictions in :mod:`.prompts`, label edits (predictions written, hand edits,
clearing, propagation runs) in :mod:`.edits`; the undo history in :mod:`.history`, the
object and prompt records in :mod:`.state`, paint-stroke geometry in :mod:`.paint`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from ...errors import SessionError
from ...io.segments import MAX_LABEL, as_color, default_segment, palette_color, present_labels
from .edits import EditsMixin
from .history import DEFAULT_HISTORY_BYTES, History, Step
from .prompts import PromptsMixin
from .state import Candidate, LockMap, SegObject, SessionChange, SlicePrompts, store

__all__ = ["DEFAULT_HISTORY_BYTES", "SegObject", "SegmentationSession", "SessionChange", "SlicePrompts", "Step"]


def _check_labels(labels: Any) -> np.ndarray:
    if not isinstance(labels, np.ndarray) or labels.ndim != 3:
        raise SessionError(f"The session needs a 3D label array, got {getattr(labels, 'shape', type(labels))}; "
                           "use a label layer with the image's shape.")
    if labels.dtype == bool or not np.issubdtype(labels.dtype, np.integer):
        raise SessionError(f"The labels must have an integer type, not {labels.dtype}; convert the layer first.")
    if not labels.flags.writeable:
        raise SessionError("The labels array is read-only; the session edits it in place. Pass a writable array.")
    return labels


def _check_color(color: Any) -> tuple[int, int, int]:
    if not isinstance(color, str):
        try:
            parts = [float(p) for p in color]
        except (TypeError, ValueError):
            parts = []
        if len(parts) == 4:  # RGBA: napari gives floats 0-1
            color = [round(p * 255) for p in parts[:3]] if all(0 <= p <= 1 for p in parts[:3]) else parts[:3]
    try:
        return as_color(color)
    except (TypeError, ValueError):
        raise SessionError(f"Colour must be (r, g, b) integers 0-255, RGBA floats 0-1 or '#rrggbb', "
                           f"got {color!r}.") from None


class SegmentationSession(PromptsMixin, EditsMixin):
    """Objects, prompts, predictions, hand edits and per-object undo over one label volume, edited in place."""

    def __init__(self, labels: np.ndarray, *, names: Mapping[int, str] | None = None,
                 colors: Mapping[int, Any] | None = None, overwrite: bool = False, lock_existing: bool = False,
                 max_history_bytes: int = DEFAULT_HISTORY_BYTES) -> None:
        self.labels = _check_labels(labels)
        if isinstance(max_history_bytes, bool) or not isinstance(max_history_bytes, int | np.integer) \
                or max_history_bytes < 0:
            raise SessionError(f"max_history_bytes must be a whole number of bytes >= 0, got {max_history_bytes!r}.")
        self.overwrite = bool(overwrite)  # model predictions may take other objects' voxels
        self.locks = LockMap(labels.shape)
        self.history = History(max_history_bytes)
        self._objects: dict[int, SegObject] = {}  # insertion order is the table order
        self._prompts: dict[int, dict[tuple[int, int], SlicePrompts]] = {}
        self._predictions: dict[int, dict[tuple[int, int], Candidate]] = {}
        self._deleted: set[int] = set()  # deleted values whose delete step may still be undone
        self._active: int | None = None
        self._listeners: list[Callable[[SessionChange], None]] = []
        self._group_depth = 0
        self._pending: dict[int, Step] = {}
        self.adopt(names, colors, lock=lock_existing)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape of the label volume (slice, row, column)."""
        return tuple(self.labels.shape)  # type: ignore[return-value]

    # ------------------------------------------------------------------ observers
    def on_change(self, callback: Callable[[SessionChange], None]) -> Callable[[], None]:
        """Call ``callback(change)`` after every change; returns a function that unsubscribes it."""
        self._listeners.append(callback)

        def unsubscribe() -> None:
            if callback in self._listeners:
                self._listeners.remove(callback)

        return unsubscribe

    def _emit(self, change: SessionChange) -> None:
        for callback in list(self._listeners):
            callback(change)

    # ------------------------------------------------------------------ objects
    @property
    def objects(self) -> list[SegObject]:
        """The objects in table order."""
        return list(self._objects.values())

    def object(self, value: int) -> SegObject:
        """The object with label ``value`` (SessionError if there is none)."""
        return self._objects[self._live(value)]

    def __contains__(self, value: object) -> bool:
        return isinstance(value, int | np.integer) and int(value) in self._objects

    @property
    def active(self) -> int | None:
        """Label value of the active object (None when there is no object)."""
        return self._active

    @property
    def deleted_objects(self) -> list[int]:
        """Values of deleted objects whose deletion can still be undone (``undo(value)``)."""
        return sorted(v for v in self._deleted if self.can_undo(v))

    def _live(self, value: Any) -> int:
        if isinstance(value, SegObject):
            value = value.value
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise SessionError(f"An object is given by its label value (an integer), not {value!r}.")
        if int(value) not in self._objects:
            known = ", ".join(str(v) for v in self._objects) or "none"
            raise SessionError(f"There is no object {value} in the session (objects: {known}); add it first.")
        return int(value)

    def _free_value(self) -> int:
        taken = set(self._objects) | set(self.deleted_objects)
        value = 1
        while value in taken:
            value += 1
        return value

    def _insert(self, value: int, name: str | None, color: Any, position: int | None = None) -> SegObject:
        info = np.iinfo(self.labels.dtype)
        if not 1 <= value <= info.max:
            raise SessionError(f"Label value {value} does not fit labels of type {self.labels.dtype} (1..{info.max}); "
                               "convert the label layer to a wider type for more objects.")
        if value in self._deleted:  # the value is reused: the old object can no longer be restored
            self._deleted.discard(value)
            self.history.forget(value)
            self._pending.pop(value, None)  # its delete may still wait for the end of a group
        name = str(name).strip() if name is not None and str(name).strip() else f"object {value}"
        if color is None:
            color = default_segment(value, name).color if value <= MAX_LABEL else palette_color(value)
        obj = SegObject(value, name, _check_color(color))
        items = list(self._objects.items())
        position = len(items) if position is None else min(position, len(items))
        items.insert(position, (value, obj))
        self._objects = dict(items)
        self._prompts.setdefault(value, {})
        self._predictions.setdefault(value, {})
        return obj

    def add_object(self, name: str | None = None, color: Any = None, *, value: int | None = None,
                   select: bool = True) -> SegObject:
        """Add an object with the next free label value (or ``value``); its colour from the palette unless given."""
        if value is None:
            value = self._free_value()
        elif isinstance(value, bool) or not isinstance(value, int | np.integer) or int(value) in self._objects:
            raise SessionError(f"Label value {value!r} is taken or not an integer; choose another value.")
        obj = self._insert(int(value), name, color)
        was = self._active
        if select or self._active is None:
            self._active = obj.value
        self._emit(SessionChange("add_object", obj.value, objects=True, active=self._active != was))
        return obj

    def adopt(self, names: Mapping[int, str] | None = None, colors: Mapping[int, Any] | None = None, *,
              lock: bool = False) -> list[SegObject]:
        """Add an object for each value present in the labels but not in the table ("object N" unless named)."""
        names, colors = dict(names or {}), dict(colors or {})
        new = [v for v in present_labels(self.labels) if v not in self._objects]
        added = [self._insert(v, names.get(v), colors.get(v)) for v in new]
        if lock and added:
            values = np.array([o.value for o in added])
            for z in range(self.shape[0]):
                plane = np.isin(self.labels[z], values)
                if plane.any():
                    self.locks.put((slice(z, z + 1), slice(0, self.shape[1]), slice(0, self.shape[2])),
                                   plane[None], where=plane[None])
        was = self._active
        if self._active is None and self._objects:
            self._active = next(iter(self._objects))
        if added:
            self._emit(SessionChange("adopt", None, objects=True, active=self._active != was))
        return added

    def rename(self, value: int, name: str) -> SegObject:
        """Give object ``value`` a new (non-empty) name."""
        value = self._live(value)
        if not str(name).strip():
            raise SessionError("An object's name cannot be empty.")
        return self._replace(value, name=str(name).strip())

    def recolor(self, value: int, color: Any) -> SegObject:
        """Give object ``value`` a new colour ((r, g, b) 0-255, RGBA 0-1 or '#rrggbb')."""
        return self._replace(self._live(value), color=_check_color(color))

    def _replace(self, value: int, **changes: Any) -> SegObject:
        old = self._objects[value]
        self._objects[value] = SegObject(value, changes.get("name", old.name), changes.get("color", old.color))
        self._emit(SessionChange("object", value, objects=True))
        return self._objects[value]

    def select(self, value: int) -> SegObject:
        """Make object ``value`` the active one (the one undo, the shortcuts and painting act on)."""
        value = self._live(value)
        if value != self._active:
            self._active = value
            self._emit(SessionChange("select", value, active=True))
        return self._objects[value]

    def next_object(self, step: int = 1) -> SegObject | None:
        """Select the next object in table order (wrapping round; ``step=-1`` for the previous one)."""
        if not self._objects:
            return None
        order = list(self._objects)
        here = order.index(self._active) if self._active in self._objects else -step
        return self.select(order[(here + step) % len(order)])

    def _drop_object(self, value: int) -> None:
        order = list(self._objects)
        position = order.index(value)
        del self._objects[value]
        self._prompts.pop(value, None)
        self._predictions.pop(value, None)
        self._deleted.add(value)
        if self._active == value:
            rest = order[:position] + order[position + 1:]
            self._active = rest[min(position, len(rest) - 1)] if rest else None

    # ------------------------------------------------------------------ history
    @contextmanager
    def group(self) -> Iterator[None]:
        """Make everything done inside one undo step per object (e.g. a click and the prediction it starts)."""
        self._group_depth += 1
        try:
            yield
        finally:
            self._group_depth -= 1
            if self._group_depth == 0:
                self._flush()

    def _flush(self) -> None:
        pending, self._pending = self._pending, {}
        for step in pending.values():
            self.history.push(step)
        if pending:
            self._emit(SessionChange("group", None, history=True))

    def _commit(self, step: Step, reason: str | None = None, **flags: bool) -> Step:
        """Keep a finished step in its object's history and tell the observers."""
        if step.empty:
            return step
        if self._group_depth:
            self.history.clear_redo(step.obj)
            if step.obj in self._pending:
                self._pending[step.obj].merge(step)
            else:
                self._pending[step.obj] = step
        else:
            self.history.push(step)
        self._emit(self._change(reason or step.kind, step, **flags))
        return step

    def _change(self, reason: str, step: Step, **flags: bool) -> SessionChange:
        prompts = tuple((step.obj, axis, index) for axis, index in step.prompt_keys)
        return SessionChange(reason, step.obj, tuple(step.regions), prompts, history=True, **flags)

    def _owner(self, obj: int | None) -> int | None:
        if obj is None:
            return self._active
        value = obj.value if isinstance(obj, SegObject) else obj
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise SessionError(f"An object is given by its label value (an integer), not {obj!r}.")
        value = int(value)
        if value not in self._objects and value not in self._deleted:
            raise SessionError(f"There is no object {value} in the session (nor a deleted one to restore).")
        return value

    def can_undo(self, obj: int | None = None) -> bool:
        """True when ``obj`` (default: the active object) has a step to undo."""
        value = self._owner(obj)
        return value is not None and (value in self._pending or self.history.can_undo(value))

    def can_redo(self, obj: int | None = None) -> bool:
        """True when ``obj`` (default: the active object) has an undone step to redo."""
        value = self._owner(obj)
        return value is not None and self.history.can_redo(value)

    def undo(self, obj: int | None = None) -> Step | None:
        """Undo the last step of ``obj`` (default: the active object); returns it (its regions changed) or None."""
        return self._travel(obj, undo=True)

    def redo(self, obj: int | None = None) -> Step | None:
        """Redo the last undone step of ``obj`` (default: the active object); returns it or None."""
        return self._travel(obj, undo=False)

    def _travel(self, obj: int | None, undo: bool) -> Step | None:
        self._flush()
        value = self._owner(obj)
        if value is None:
            return None
        step = self.history.pop_undo(value) if undo else self.history.pop_redo(value)
        if step is None:
            return None
        restore = step.deleted is not None and undo
        if restore:
            obj_record, position = step.deleted  # type: ignore[misc]
            self._deleted.discard(value)
            self._insert(value, obj_record.name, obj_record.color, position)
        for patch in (reversed(step.patches) if undo else step.patches):
            patch.replay(self.labels, self.locks, undo)
        if value in self._objects:
            for key, (before, after) in step.prompts.items():
                store(self._prompts[value], key, before if undo else after)
            for key, (before, after) in step.predictions.items():
                store(self._predictions[value], key, before if undo else after)
        was = self._active
        if restore:
            self._active = value
        elif step.deleted is not None:
            self._drop_object(value)
        self._emit(self._change("undo" if undo else "redo", step, objects=step.deleted is not None,
                                active=self._active != was))
        return step

    @property
    def history_bytes(self) -> int:
        """Bytes the undo history holds now (bounded by ``history.max_bytes``)."""
        return self.history.nbytes
