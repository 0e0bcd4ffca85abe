"""The Qt-free half of the propagation panel: key slices, the run's snapshot/merge bookkeeping, summaries.

See :mod:`.propagate_panel`. A :class:`Run` holds the snapshot of the labels the worker writes
into and merges each finished slice into the live labels, only where the user has not changed a
voxel since; :class:`Recorder` wraps the predictor to note which slice the worker is on.
"""

from __future__ import annotations

import re
import threading
from typing import Any

import numpy as np

from ..segment.propagation.run import PropagationResult, UndoRecord, slice_index

KEPT = ("key", "propagated", "interpolated")


def key_masks(session: Any, obj: int, axis: int, current: int | None = None) -> dict[int, np.ndarray]:
    """The object's key slices along ``axis`` as {index: its voxels there, hand corrections included}.

    Slices with a kept prediction that still hold the object; else slices where it has
    hand-painted voxels; else the slice ``current`` if it holds the object; else its largest slice.
    """
    labels, others = session.labels, tuple(a for a in range(3) if a != axis)

    def mask(k: int) -> np.ndarray:
        return labels[slice_index(axis, int(k))] == obj

    keys = {k: m for k in session.predicted_slices(obj, axis) if (m := mask(k)).any()}
    if keys:
        return keys
    own = labels == obj
    painted = np.flatnonzero((own & session.locked_mask()).any(axis=others))
    if painted.size:
        return {int(k): mask(k) for k in painted}
    area = own.sum(axis=others)
    best = int(current) if current is not None and area[current] else int(np.argmax(area))
    return {best: mask(best)} if area.any() else {}


def summarize(result: PropagationResult) -> str:
    """One line: the slices reached, and why and where each outward front stopped."""
    kept = sorted({r.index for r in result.reports if r.kind in KEPT})
    text = f"propagated over slices {kept[0]}-{kept[-1]}" if kept else "no slice kept"
    ends = []
    for name, reason in result.stop_reasons.items():
        if not name.startswith("fill"):
            rows = [r.index for r in result.reports if r.front == name]
            reason = re.sub(r"empty \((\d+) missed slices? in a row\)", r"empty x\1", reason)
            ends.append(f"{name.replace('correction ', '')}: {reason}" + (f" at {rows[-1]}" if rows else ""))
    gaps = {name.split()[1] for name in result.stop_reasons if name.startswith("fill")}
    text += (", stopped " + "; ".join(ends) if ends else "") + (f"; {len(gaps)} gap(s) filled" if gaps else "")
    return ("cancelled, " if result.cancelled else "") + text


def written_text(result: PropagationResult) -> str:
    """What the run did to the labels, in words that agree with :func:`summarize`."""
    count = len(result.written_slices)
    if count:
        return f"{count} slice{'s' if count > 1 else ''} written; Ctrl+Z undoes the run"
    if any(r.kind in KEPT for r in result.reports):
        return "nothing changed: the labels there were already this result"
    return "nothing written"


class Run:
    """One run: the snapshot the worker writes, and the bookkeeping that merges it into the live labels."""

    def __init__(self, controller: Any, obj: int, axis: int, keys: set[int], what: str) -> None:
        self.controller, self.obj, self.axis, self.keys, self.what = controller, obj, axis, keys, what
        self.live = controller.session.labels
        self.snapshot = np.array(self.live, copy=True)
        self.cancel = threading.Event()
        self.last: int | None = None  # the slice the worker predicted last
        self.base: dict[int, np.ndarray] = {}  # worker side: snapshot slices before the engine wrote them
        self.expected: dict[int, np.ndarray] = {}  # engine content last merged into each live slice
        self.before: dict[int, np.ndarray] = {}  # live slices before the first merge
        self.bar: Any = None

    def view(self, k: int, live: bool = False) -> np.ndarray:
        """Slice ``k`` of the snapshot (or of the live labels)."""
        return (self.live if live else self.snapshot)[slice_index(self.axis, k)]

    def merge(self, k: int, base: np.ndarray | None, new: np.ndarray) -> bool:
        """Copy engine slice ``new`` into the live slice where the user changed nothing since; True if it wrote."""
        expected = self.expected.get(k, base)
        if expected is None:
            return False
        live = self.view(k, live=True)
        self.before.setdefault(k, live.copy())
        take = (live == expected) & (live != new)
        live[take] = new[take]
        self.expected[k] = new
        return bool(take.any())

    def undo_record(self) -> UndoRecord:
        """The live slices before this run's voxels (the user's own later edits left as they are now)."""
        previous = {}
        for k, orig in self.before.items():
            live = self.view(k, live=True)
            before = np.where(live == self.expected[k], orig, live).astype(live.dtype)
            if not np.array_equal(before, live):
                previous[k] = before
        return UndoRecord(self.axis, previous)


class Recorder:
    """Wraps the predictor to note which slice the worker is on and keep that slice's content before it."""

    def __init__(self, predictor: Any, run: Run) -> None:
        self._predictor, self._run = predictor, run

    def __getattr__(self, name: str) -> Any:
        return getattr(self._predictor, name)

    def predict(self, index: int, prompts: Any, multimask: bool = False) -> Any:
        """Predict through the wrapped predictor, noting the slice first."""
        self._run.base.setdefault(int(index), self._run.view(int(index)).copy())
        self._run.last = int(index)
        return self._predictor.predict(index, prompts, multimask=multimask)
