"""The memory engine: 3D propagation with SAM 2 / MedSAM2 memory tracking, under the project's stop rule.

Same entry points and results as the slice engine (:mod:`napari_medsam.segment.propagation`):
``propagate_memory`` and ``repropagate_memory`` write into a label volume in place and return a
:class:`PropagationResult` (report, undo, front end reasons), so the panel, the CLI, undo, locks,
key slices and cancel treat both engines alike. What differs is how a front predicts its next
slice: instead of prompting it from the previous mask, it asks its :class:`Walk` to track the
object there with the memory bank (key slices, the last 6 slices, object pointers).

The official SAM 2 flow ends an object only through its object score (absent slices get empty
masks). Here every tracked slice also goes through the stop rule (overlap, area, intensities,
leaks, lost parts; docs/propagation.md), and the report gives each slice's object score. A slice
the stop rule rejects is dropped from the walk's memory, so a leak the rule caught does not steer
the next slices. With ``stop=None`` and ``official=True`` nothing is judged (the object score
alone decides, as in MedSAM2's script): the golden tests use this to compare whole volumes.

Key slices come as :class:`Prompts` (points and/or a box: the model's own prompted output, as
MedSAM2 does it) or as masks (the user's mask is the output, the model adds its pointer).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from ...errors import PropagationError
from ..postprocess import PostProcess
from ..predictor import Prompts, SliceMasks
from ..propagation.engine import DIRECTIONS, _check_labels, front_tasks, run_fronts
from ..propagation.run import CancelCheck, Front, ProgressCallback, PropagationResult, PropagationRun
from ..propagation.stop_rules import StopRule
from .tracker import MemoryTracker, TrackedSlice, Walk

__all__ = ["MemoryRun", "MemorySliceMasks", "key_from_prompts", "propagate_memory", "repropagate_memory",
           "tracker_for"]


@dataclass
class MemorySliceMasks(SliceMasks):
    """A tracked slice in the form the propagation run judges, with the object score."""

    object_score: float | None = None


def tracker_for(predictor) -> MemoryTracker:
    """A :class:`MemoryTracker` over a :class:`SlicePredictor` whose model is a SAM 2 network.

    Slice features come from the predictor's ``embed`` (and so from its embedding cache).
    """
    network = getattr(getattr(predictor, "model", None), "network", None)
    if network is None or not hasattr(network, "track_frame"):
        raise PropagationError("The memory engine needs a SAM 2 or MedSAM2 model; load one, "
                               "or choose the slice-prompt engine.")
    return MemoryTracker(network, predictor.embed, predictor.n_slices, predictor.slice_shape,
                         predictor.model.device)


def key_from_prompts(tracker: MemoryTracker, obj: int, index: int, prompts: Prompts) -> TrackedSlice:
    """Prompt ``obj`` on key slice ``index`` from project :class:`Prompts` (rows/columns -> x/y)."""
    points = labels = box = None
    if prompts.points is not None:
        points = np.asarray(prompts.points, np.float64)[:, ::-1]
        labels = np.asarray(prompts.positive, bool).astype(np.int32)
    if prompts.box is not None:
        r0, c0, r1, c1 = np.asarray(prompts.box, np.float64)
        box = np.array([c0, r0, c1, r1])
    if points is None and box is None:
        raise PropagationError(f"Key slice {index} has no point or box: the memory engine needs one, or a mask.")
    return tracker.add_prompts(obj, index, points, labels, box)


def _add_key(tracker: MemoryTracker, obj: int, index: int, key) -> TrackedSlice:
    if isinstance(key, Prompts):
        return key_from_prompts(tracker, obj, index, key)
    mask = np.asarray(key.masks[0] if isinstance(key, SliceMasks) else key).astype(bool)
    if mask.shape != tracker.slice_shape:
        raise PropagationError(f"The mask of key slice {index} is {mask.shape}, but slices are {tracker.slice_shape}.")
    out = tracker.add_mask(obj, index, mask)
    out.mask = mask  # the user's own mask is written, not its resampled copy
    return out


class MemoryRun(PropagationRun):
    """A propagation run whose fronts track with SAM 2 memory walks instead of re-prompting."""

    def __init__(self, predictor, labels: np.ndarray, value: int, *, tracker: MemoryTracker, obj: int,
                 judge: bool = True, **options) -> None:
        super().__init__(predictor, labels, value, **options)
        self.tracker, self.obj, self.judging = tracker, int(obj), judge
        self.walks: dict[str, Walk] = {}

    def predict_next(self, front: Front, partner: Front | None, index: int, joint: bool):
        walk = self.walks.get(front.name)
        if walk is None:
            walk = self.walks[front.name] = self.tracker.walk(self.obj, front.step)
        self.prefetcher.ensure(index)
        if self.may_visit(index + front.step):
            self.prefetcher.ahead(index + front.step)
        tracked = walk.track(index)
        result = MemorySliceMasks(tracked.mask[None], np.array([tracked.iou], np.float32),
                                  tracked.low_res_logits[None], index=index, axis=self.axis,
                                  object_score=tracked.object_score)
        return front.mask, result

    def step(self, front: Front, partner: Front | None = None) -> bool:
        k = front.position + front.step
        if not self.judging:
            return self._step_unjudged(front, k)
        alive = super().step(front, partner)
        walk = self.walks.get(front.name)
        if walk is not None and self.state.get(k) == "skipped":
            walk.forget(k)
        return alive

    def _step_unjudged(self, front: Front, k: int) -> bool:
        """The official flow: write every tracked slice (empty where the object score says absent)."""
        if front.finished:
            return False
        if self.check_cancel():
            return front.end("cancelled")
        if not 0 <= k < self.n or not self.stop.in_range(k):
            return front.end("edge of the volume" if not 0 <= k < self.n else "outside the z-range")
        if k in self.protected:
            front.position = k  # walk through key slices, as the official propagation does
            return True
        _, result = self.predict_next(front, None, k, False)
        mask = np.asarray(result.masks[0], bool)
        front.position = k
        written = self.write(k, mask)
        if mask.any():
            self.state[k] = "accepted"
        front.accept(mask, result.low_res_logits[0], k)
        self.report(k, "propagated" if mask.any() else "propagated: object absent", front.name, mask,
                    float(result.scores[0]), None, written, None, result.object_score)
        self.tick(f"slice {k}")
        return True

    def postprocess(self, settings: PostProcess) -> None:
        if self.judging:
            return super().postprocess(settings)
        # Official flow: MedSAM2's script cleans the whole result, key slices included.
        from ..postprocess import postprocess_mask

        if not settings.active:
            return
        cleaned = postprocess_mask(self.labels == self.value, settings, self.axis)
        self.judging = True  # plain writes from here on (no union with what is there)
        try:
            for k in self.undo.slices:
                super().write(k, cleaned[self._index(k)])
        finally:
            self.judging = False

    def _index(self, k: int):
        from ..propagation.run import slice_index

        return slice_index(self.axis, k)

    def write(self, index: int, mask: np.ndarray) -> bool:
        if not self.judging:
            # Official flow: the union of what both walks found (a slice written twice keeps both).
            mask = mask | (self.view(index) == self.value)
        return super().write(index, mask)


def _run_keys(tracker: MemoryTracker, obj: int, key_slices: Mapping[int, object], n: int) -> dict[int, TrackedSlice]:
    if not key_slices:
        raise PropagationError("No key slice: prompt the object on at least one slice before propagating.")
    bad = [int(k) for k in key_slices if not 0 <= int(k) < n]
    if bad:
        raise PropagationError(f"Key slice {bad[0]} is outside 0..{n - 1}.")
    return {int(k): _add_key(tracker, obj, int(k), key_slices[k]) for k in sorted(key_slices, key=int)}


def propagate_memory(
    predictor,
    labels: np.ndarray,
    object_value: int,
    key_slices: Mapping[int, object],
    *,
    tracker: MemoryTracker | None = None,
    direction: str = "both",
    stop: StopRule | None = None,
    official: bool = False,
    locked: np.ndarray | None = None,
    overwrite: bool = False,
    cancel: CancelCheck | threading.Event | None = None,
    progress: ProgressCallback | None = None,
    prefetch: bool = True,
    fill_skipped: bool = True,
    postprocess: PostProcess | None = None,
    spacing_mm: tuple[float, float, float] | None = None,
) -> PropagationResult:
    """Track ``object_value`` from its key slices through the volume with the memory bank.

    ``tracker`` keeps the object's key slices for later corrections (:func:`repropagate_memory`);
    without one a new tracker is made. The object's earlier key slices in ``tracker`` are replaced
    by ``key_slices``. ``official=True`` skips the stop rule (only the object score decides).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
    tracker = tracker or tracker_for(predictor)
    axis, locked = _check_labels(predictor, labels, object_value, locked)
    if axis != 0 and getattr(predictor, "axis", 0) != axis:
        raise PropagationError("The memory engine tracks along the predictor's axis only.")
    tracker.remove_object(object_value)
    keys = _run_keys(tracker, object_value, key_slices, labels.shape[axis])
    if not any(k.mask.any() for k in keys.values()):
        tracker.remove_object(object_value)
        raise PropagationError("Every key slice is empty: nothing to propagate. Segment the object on a slice first.")
    run = _new_memory_run(predictor, labels, object_value, tracker, judge=not official, stop=stop, locked=locked,
                          overwrite=overwrite, cancel=cancel, progress=progress, prefetch=prefetch,
                          spacing_mm=spacing_mm)
    try:
        for index, key in keys.items():
            run.add_key(index, key.mask, key.iou, key.object_score)
        def front(name: str, start: int, step: int) -> Front:
            return Front(name, step, start, keys[start].mask, keys[start].low_res_logits, start)

        if official:
            # MedSAM2's script: one forward walk from the first key slice to the end, one reverse
            # walk from the last to the start, through the other key slices.
            order = sorted(keys)
            tasks = ([[front("up", order[0], +1)]] if direction in ("both", "up") else []) + \
                    ([[front("down", order[-1], -1)]] if direction in ("both", "down") else [])
        else:
            tasks = front_tasks(keys, lambda k: bool(keys[k].mask.any()), direction, front)
        run_fronts(run, tasks)
        if fill_skipped and not run.cancelled and not official:
            run.fill_skipped()
        if postprocess is not None and not run.cancelled:
            run.postprocess(postprocess)
        return run.result()
    except BaseException:
        run.undo.undo(labels)
        raise
    finally:
        run.prefetcher.close()


def repropagate_memory(
    predictor,
    labels: np.ndarray,
    object_value: int,
    index: int,
    key,
    *,
    tracker: MemoryTracker,
    other_keys: tuple[int, ...] | list[int] | set[int] = (),
    direction: str = "both",
    stop: StopRule | None = None,
    locked: np.ndarray | None = None,
    overwrite: bool = False,
    cancel: CancelCheck | threading.Event | None = None,
    progress: ProgressCallback | None = None,
    prefetch: bool = True,
    spacing_mm: tuple[float, float, float] | None = None,
) -> PropagationResult:
    """After a correction on slice ``index``: make it a key slice of the object and re-track outward
    while the result changes (each front ends at the first slice whose new mask matches the labels
    there, at another key slice, or by the stop rule). The object's other key slices stay in memory.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
    axis, locked = _check_labels(predictor, labels, object_value, locked)
    tracked = _run_keys(tracker, object_value, {int(index): key}, labels.shape[axis])[int(index)]
    run = _new_memory_run(predictor, labels, object_value, tracker, judge=True, stop=stop, locked=locked,
                          overwrite=overwrite, cancel=cancel, progress=progress, prefetch=prefetch,
                          spacing_mm=spacing_mm)
    try:
        run.protected.update(int(k) for k in other_keys)
        run.protected.update(k for k in tracker.key_slices(object_value) if k != int(index))
        run.add_key(int(index), tracked.mask, tracked.iou, tracked.object_score)
        for name, step in (("correction down", -1), ("correction up", +1)):
            if direction in ("both", name.split()[1]):
                run.run_alone(Front(name, step, int(index), tracked.mask, tracked.low_res_logits, int(index),
                                    check_unchanged=True))
        return run.result()
    except BaseException:
        run.undo.undo(labels)
        raise
    finally:
        run.prefetcher.close()


def _new_memory_run(predictor, labels: np.ndarray, value: int, tracker: MemoryTracker, *, judge: bool,
                    stop: StopRule | None, spacing_mm, **options) -> MemoryRun:
    from ..prompting import PromptSettings  # unused by memory walks; the run's constructor wants one

    spacing = spacing_mm or getattr(predictor, "spacing_mm", None)
    return MemoryRun(predictor, labels, int(value), tracker=tracker, obj=value, judge=judge, stop=stop or StopRule(),
                     prompt=PromptSettings(), spacing_mm=spacing, **options)
