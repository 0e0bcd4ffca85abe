"""The Qt-free half of the propagation panel: key slices, the run's snapshot/merge bookkeeping, summaries.

See :mod:`.propagate_panel`. A :class:`Run` holds the snapshot of the labels the worker writes
into and merges each finished slice into the live labels, only where the user has not changed a
voxel since; :class:`Recorder` wraps the predictor to note which slice the worker is on.

The memory engine (SAM 2 / MedSAM2, :mod:`napari_medsam.segment.memory`) never calls the
predictor's ``predict``: it asks its :class:`MemoryTracker` for each slice's features. A scan's
trackers (one per axis, kept in :class:`MemoryTrackers` with the scan's report, so a correction
after switching scans still finds the object's key slices) read them through a
:class:`FeatureTap`, which tells the run in flight which slice the engine is on.
"""

from __future__ import annotations

import re
import threading
from contextlib import contextmanager
from typing import Any, Iterator

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
        self.engine = "slice"  # "memory": SAM 2 tracking (see the panel's ENGINES)
        self.trackers: MemoryTrackers | None = None  # the scan's memory trackers, for its report

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

    @property
    def wrapped(self) -> Any:
        """The predictor this one records."""
        return self._predictor

    def note(self, index: int) -> None:
        """The worker is on slice ``index``: keep its content before the engine writes it."""
        self._run.base.setdefault(int(index), self._run.view(int(index)).copy())
        self._run.last = int(index)

    def predict(self, index: int, prompts: Any, multimask: bool = False) -> Any:
        """Predict through the wrapped predictor, noting the slice first."""
        self.note(index)
        return self._predictor.predict(index, prompts, multimask=multimask)


class FeatureTap:
    """A predictor as a memory tracker sees it: ``embed`` also notes the slice for the run in flight."""

    def __init__(self, predictor: Any) -> None:
        self._predictor = predictor
        self.recorder: Recorder | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._predictor, name)

    def embed(self, index: int) -> Any:
        """The slice's features from the predictor (and its cache); the recorder, if any, notes the slice."""
        recorder = self.recorder
        if recorder is not None:
            recorder.note(index)
        return self._predictor.embed(index)


class MemoryTrackers:
    """One scan's memory trackers, one per axis, each valid for one model and input mapping.

    A tracker keeps each object's key slices, which a later correction re-propagates from
    (``repropagate_memory``). One made with another model or mapping than the controller's
    current ones is dropped when next asked for.
    """

    def __init__(self) -> None:
        self._items: dict[int, tuple[Any, str, Any, FeatureTap]] = {}  # axis -> (network, mapping, tracker, tap)

    @staticmethod
    def _valid(controller: Any, item: tuple) -> bool:
        network, mapping, _, _ = item
        return network is getattr(controller.model, "network", None) and mapping == controller.mapping.signature

    def find(self, controller: Any, axis: int, obj: int | None = None) -> Any:
        """The axis's tracker if it fits the controller's model and mapping (and knows ``obj``), else None."""
        item = self._items.get(int(axis))
        if item is None or not self._valid(controller, item):
            return None
        tracker = item[2]
        return tracker if obj is None or tracker.key_slices(int(obj)) else None

    @contextmanager
    def use(self, controller: Any, axis: int, recorder: Recorder) -> Iterator[Any]:
        """The axis's tracker (made over ``recorder``'s predictor when missing or stale); ``recorder`` notes its slices."""
        from ..segment.memory.engine import tracker_for

        item = self._items.get(int(axis))
        if item is None or not self._valid(controller, item):
            tap = FeatureTap(recorder.wrapped)
            item = (controller.model.network, controller.mapping.signature, tracker_for(tap), tap)
            self._items[int(axis)] = item
        tap = item[3]
        tap.recorder = recorder
        try:
            yield item[2]
        finally:
            tap.recorder = None

    def clear(self) -> None:
        """Forget every tracker (their objects' key slices with them)."""
        self._items.clear()
