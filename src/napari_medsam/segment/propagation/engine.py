"""3D propagation: from prompted key slices to a whole object, slice by slice.

Entry points (all take any predictor with ``embed(index)`` and ``predict(index, prompts)``, and
write into a label volume in place, returning a :class:`PropagationResult` whose ``undo``
restores the labels as they were):

* :func:`propagate` - one object from one or more key slices, outward and between them;
* :func:`propagate_objects` - several objects, each with its own key slices and report;
* :func:`repropagate` - after a correction on one slice, only as far as the result changes;
* :func:`segment_boxes` - sparse-marker mode: boxes on a few slices, interpolated in between.

Slices are taken along the predictor's ``axis`` (0 when it has none): slice ``k`` of the
labels is ``labels[k]`` for axis 0, ``labels[:, k]`` for axis 1, ``labels[:, :, k]`` for axis 2.
See docs/propagation.md for the algorithm, the settings and the measurements behind the defaults.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from ...errors import PropagationError
from ..postprocess import PostProcess
from ..predictor import Prompts, SliceMasks, SlicePredictorProtocol
from ..prompting import PromptSettings, interpolate_boxes
from .run import (CancelCheck, Front, ProgressCallback, PropagationResult, PropagationRun, UndoRecord,
                              slice_index)
from .stop_rules import FrontCounters, SliceReport, StopRule, judge

KeySlice = SliceMasks | np.ndarray | Prompts  # a prediction, a mask, or prompts to predict it from
DIRECTIONS = ("both", "up", "down")
RECONCILE_MODES = ("meet", "best_score")

__all__ = [
    "ObjectsResult", "PostProcess", "PromptSettings", "PropagationResult", "SliceReport", "StopRule",
    "UndoRecord", "locked_mask", "propagate", "propagate_objects", "repropagate", "segment_boxes",
]


def _key_mask(key: KeySlice) -> tuple[np.ndarray, np.ndarray | None, float | None]:
    """(mask, low-res logits or None, score or None) of a key slice given as SliceMasks or a mask."""
    if isinstance(key, SliceMasks):
        return np.asarray(key.masks[0], bool), np.asarray(key.low_res_logits[0], np.float32), float(key.scores[0])
    return np.asarray(key).astype(bool), None, None


def locked_mask(shape: tuple[int, int, int], voxels: np.ndarray) -> np.ndarray:
    """A boolean ``shape`` mask from (N, 3) voxel indices, e.g. the voxels a user painted by hand."""
    voxels = np.asarray(voxels, dtype=np.int64).reshape(-1, 3)
    if len(voxels) and (voxels.min() < 0 or np.any(voxels.max(axis=0) >= np.array(shape))):
        raise PropagationError(f"Locked voxels lie outside the label volume {tuple(shape)}.")
    mask = np.zeros(shape, bool)
    mask[tuple(voxels.T)] = True
    return mask


def _check_labels(predictor: SlicePredictorProtocol, labels: np.ndarray, value: int,
                  locked: np.ndarray | None) -> tuple[int, np.ndarray | None]:
    """Raise PropagationError for labels, object value or locked voxels that do not fit.

    Returns the axis and the locked voxels as a boolean mask (``locked`` may be one already, or
    (N, 3) voxel indices).
    """
    axis = int(getattr(predictor, "axis", 0))
    if not isinstance(labels, np.ndarray) or labels.ndim != 3:
        raise PropagationError(f"The labels must be a 3D array, got {getattr(labels, 'shape', type(labels))}; "
                               "use a label layer with the image's shape.")
    if not np.issubdtype(labels.dtype, np.integer):
        raise PropagationError(f"The labels must have an integer type, not {labels.dtype}; convert the layer first.")
    if not labels.flags.writeable:
        raise PropagationError("The labels array is read-only; propagation writes into it. Pass a writable copy.")
    info = np.iinfo(labels.dtype)
    if not 0 < int(value) <= info.max:
        raise PropagationError(f"Object value {value} does not fit labels of type {labels.dtype} "
                               f"(1..{info.max}); choose another label value.")
    slice_shape = tuple(s for a, s in enumerate(labels.shape) if a != axis)
    expected = getattr(predictor, "slice_shape", None)
    if expected is not None and tuple(expected) != slice_shape:
        raise PropagationError(f"The labels' slices are {slice_shape} along axis {axis} but the image's are "
                               f"{tuple(expected)}; the label layer must have the image's shape.")
    if locked is not None:
        locked = np.asarray(locked)
        if locked.dtype != bool and locked.ndim == 2 and locked.shape[1] == 3:
            locked = locked_mask(labels.shape, locked)
        elif locked.shape != labels.shape or locked.dtype != bool:
            raise PropagationError(f"Locked voxels must be a boolean array of shape {labels.shape} or (N, 3) "
                                   f"voxel indices, got {locked.dtype} {locked.shape}.")
    return axis, locked


def _predict_keys(predictor: SlicePredictorProtocol, keys: Mapping[int, KeySlice],
                  n: int) -> dict[int, SliceMasks | np.ndarray]:
    """Key slices with those given as prompts predicted (indices checked first)."""
    if not keys:
        raise PropagationError("No key slice: prompt the object on at least one slice before propagating.")
    axis = int(getattr(predictor, "axis", 0))
    bad = [int(k) for k in keys if not 0 <= int(k) < n]
    if bad:
        raise PropagationError(f"Key slice {bad[0]} is outside 0..{n - 1} along axis {axis}.")
    return {int(k): predictor.predict(int(k), v) if isinstance(v, Prompts) else v for k, v in keys.items()}


def _check_keys(keys: Mapping[int, SliceMasks | np.ndarray], labels: np.ndarray, axis: int) -> dict[int, tuple]:
    """Key slices as {index: (mask, logits, score)}, checked against the labels' slices."""
    if not keys:
        raise PropagationError("No key slice: prompt the object on at least one slice before propagating.")
    n = labels.shape[axis]
    shape = tuple(s for a, s in enumerate(labels.shape) if a != axis)
    out = {}
    for index, key in keys.items():
        if not 0 <= int(index) < n:
            raise PropagationError(f"Key slice {index} is outside 0..{n - 1} along axis {axis}.")
        mask, logits, score = _key_mask(key)
        if mask.shape != shape:
            raise PropagationError(f"The mask of key slice {index} is {mask.shape}, but slices along axis "
                                   f"{axis} are {shape}.")
        out[int(index)] = (mask, logits, score)
    if not any(m.any() for m, _, _ in out.values()):
        raise PropagationError("Every key slice is empty: nothing to propagate. Segment the object on a slice first.")
    return out


def _new_run(predictor, labels, value, locked, **options) -> PropagationRun:
    spacing = options.pop("spacing_mm", None) or getattr(predictor, "spacing_mm", None)
    return PropagationRun(predictor, labels, int(value), locked=locked, spacing_mm=spacing, **options)


def _finish(run: PropagationRun, fill_skipped: bool, postprocess: PostProcess | None) -> PropagationResult:
    if fill_skipped and not run.cancelled:
        run.fill_skipped()
    if postprocess is not None and not run.cancelled:
        run.postprocess(postprocess)
    return run.result()


def propagate(
    predictor: SlicePredictorProtocol,
    labels: np.ndarray,
    object_value: int,
    key_slices: Mapping[int, KeySlice],
    *,
    direction: str = "both",
    stop: StopRule | None = None,
    prompt: PromptSettings | None = None,
    prompt_mode: str | None = None,
    reconcile: str = "meet",
    locked: np.ndarray | None = None,
    overwrite: bool = False,
    cancel: CancelCheck | threading.Event | None = None,
    progress: ProgressCallback | None = None,
    prefetch: bool = True,
    fill_skipped: bool = True,
    postprocess: PostProcess | None = None,
    spacing_mm: tuple[float, float, float] | None = None,
) -> PropagationResult:
    """Segment ``object_value`` through the volume from its key slices, writing into ``labels`` in place."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
    if reconcile not in RECONCILE_MODES:
        raise ValueError(f"reconcile must be one of {RECONCILE_MODES}, not {reconcile!r}")
    prompt = prompt or PromptSettings()
    if prompt_mode is not None:
        prompt = PromptSettings(**{**vars(prompt), "mode": prompt_mode})
    axis, locked = _check_labels(predictor, labels, object_value, locked)
    keys = _check_keys(_predict_keys(predictor, key_slices, labels.shape[axis]), labels, axis)
    run = _new_run(predictor, labels, object_value, locked, stop=stop or StopRule(), prompt=prompt,
                   overwrite=overwrite, cancel=cancel, progress=progress, prefetch=prefetch,
                   spacing_mm=spacing_mm, reconcile=reconcile)
    try:
        for index in sorted(keys):
            mask, _, score = keys[index]
            run.add_key(index, mask, score)
        def front(name: str, start: int, step: int) -> Front:
            mask, logits, _ = keys[start]
            return Front(name, step, start, mask, logits, start)

        run_fronts(run, front_tasks(keys, lambda k: bool(keys[k][0].any()), direction, front))
        return _finish(run, fill_skipped, postprocess)
    except BaseException:
        run.undo.undo(labels)  # a failed run leaves the labels as they were
        raise
    finally:
        run.prefetcher.close()


def front_tasks(keys, solid: Callable[[int], bool], direction: str,
                front: Callable[[str, int, int], Front]) -> list[list[Front]]:
    """The fronts of a run from its key slices: one walking down from the first key, pairs filling
    each gap between keys from both ends, one walking up from the last (only from keys with a mask:
    empty key slices only bound the object)."""
    order = sorted(keys)
    up, down = direction in ("both", "up"), direction in ("both", "down")
    tasks: list[list[Front]] = []  # one front walks alone; two fill a gap together
    if down and solid(order[0]):
        tasks.append([front("down", order[0], -1)])
    for lo, hi in zip(order[:-1], order[1:]):
        pair = [front(f"fill {lo}-{hi} up", lo, +1)] if up and solid(lo) else []
        pair += [front(f"fill {lo}-{hi} down", hi, -1)] if down and solid(hi) else []
        if hi - lo > 1 and pair:
            tasks.append(pair)
    if up and solid(order[-1]):
        tasks.append([front("up", order[-1], +1)])
    return tasks


def run_fronts(run: PropagationRun, tasks: list[list[Front]]) -> None:
    """Announce every front (for progress), then walk them: alone, or two towards each other."""
    for task in tasks:
        run.register(*task)
    for task in tasks:
        if len(task) == 2:
            run.run_pair(*task)
        else:
            run.run_alone(task[0])


def repropagate(
    predictor: SlicePredictorProtocol,
    labels: np.ndarray,
    object_value: int,
    index: int,
    key: KeySlice,
    *,
    other_keys: tuple[int, ...] | list[int] | set[int] = (),
    direction: str = "both",
    stop: StopRule | None = None,
    prompt: PromptSettings | None = None,
    locked: np.ndarray | None = None,
    overwrite: bool = False,
    cancel: CancelCheck | threading.Event | None = None,
    progress: ProgressCallback | None = None,
    prefetch: bool = True,
    spacing_mm: tuple[float, float, float] | None = None,
) -> PropagationResult:
    """After a correction on slice ``index``, write it and re-propagate outward while the result changes.

    Each front stops at the first slice whose new mask matches the labels already there
    (Dice >= ``stop.unchanged_dice``), at a slice in ``other_keys`` (never overwritten), or by
    the stop rule.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
    axis, locked = _check_labels(predictor, labels, object_value, locked)
    mask, logits, score = _check_keys(_predict_keys(predictor, {index: key}, labels.shape[axis]), labels,
                                      axis)[int(index)]
    run = _new_run(predictor, labels, object_value, locked, stop=stop or StopRule(), prompt=prompt or PromptSettings(),
                   overwrite=overwrite, cancel=cancel, progress=progress, prefetch=prefetch,
                   spacing_mm=spacing_mm)
    try:
        run.protected.update(int(k) for k in other_keys)
        run.add_key(int(index), mask, score)
        for name, step in (("correction down", -1), ("correction up", +1)):
            if direction in ("both", name.split()[1]):
                run.run_alone(Front(name, step, int(index), mask, logits, int(index), check_unchanged=True))
        return run.result()
    except BaseException:
        run.undo.undo(labels)
        raise
    finally:
        run.prefetcher.close()


def segment_boxes(
    predictor: SlicePredictorProtocol,
    labels: np.ndarray,
    object_value: int,
    boxes: Mapping[int, np.ndarray | list[float]],
    *,
    stop: StopRule | None = None,
    locked: np.ndarray | None = None,
    overwrite: bool = False,
    cancel: CancelCheck | threading.Event | None = None,
    progress: ProgressCallback | None = None,
    prefetch: bool = True,
    fill_skipped: bool = True,
    postprocess: PostProcess | None = None,
    spacing_mm: tuple[float, float, float] | None = None,
) -> PropagationResult:
    """Sparse-marker mode: boxes (row0, col0, row1, col1) on a few slices, linear in between, one prediction per slice.

    Marked slices are key slices. Every other slice is judged by the stop rule against the
    previous accepted slice, but nothing stops the walk: the boxes say where the object is, so a
    failing slice is skipped (and interpolated if ``fill_skipped``).
    """
    axis, locked = _check_labels(predictor, labels, object_value, locked)
    if not boxes:
        raise PropagationError("No box: draw the object's box on at least one slice.")
    n = labels.shape[axis]
    bad = [k for k in boxes if not 0 <= int(k) < n]
    if bad:
        raise PropagationError(f"Box slices {bad} are outside 0..{n - 1} along axis {axis}.")
    per_slice = interpolate_boxes({int(k): np.asarray(b, float) for k, b in boxes.items()})
    rule = stop or StopRule()
    run = _new_run(predictor, labels, object_value, locked, stop=rule, prompt=PromptSettings(),
                   overwrite=overwrite, cancel=cancel, progress=progress, prefetch=prefetch,
                   spacing_mm=spacing_mm)
    marked = {int(k) for k in boxes}
    todo = [k for k in sorted(per_slice) if rule.in_range(k) or k in marked]
    run.fixed_total = len(todo)
    try:
        previous: np.ndarray | None = None
        for i, k in enumerate(todo):
            if run.check_cancel():
                break
            run.prefetcher.ensure(k)
            if i + 1 < len(todo):
                run.prefetcher.ahead(todo[i + 1])
            result = predictor.predict(k, Prompts(box=per_slice[k]), multimask=False)
            mask, score = np.asarray(result.masks[0], bool), float(result.scores[0])
            if k in marked:
                run.add_key(k, mask, score)
                previous = mask
            else:
                # A fresh counter per slice: the rule may reject a slice but never ends the walk.
                verdict, overlap = judge(rule, mask, score, previous if previous is not None else mask,
                                         FrontCounters())
                written = run.write(k, mask) if verdict.accept else False
                run.state[k] = "accepted" if verdict.accept else "skipped"
                status = verdict.status if verdict.accept else f"skipped: {verdict.reason}"
                run.report(k, status, "boxes", mask, score, overlap, written)
                previous = mask if verdict.accept else previous
            run.tick(f"slice {k}: {run.reports[-1].status}")
        run.extra_reasons["boxes"] = "cancelled" if run.cancelled else f"last box (slice {todo[-1]})"
        return _finish(run, fill_skipped, postprocess)
    except BaseException:
        run.undo.undo(labels)
        raise
    finally:
        run.prefetcher.close()


@dataclass
class ObjectsResult:
    """Several objects' propagations: one result per object and one undo record for all of them."""

    results: dict[int, PropagationResult]
    undo: UndoRecord
    cancelled: bool = False
    not_started: list[int] = field(default_factory=list)  # objects left out after a cancel


def propagate_objects(
    predictor: SlicePredictorProtocol,
    labels: np.ndarray,
    objects: Mapping[int, Mapping[int, KeySlice]],
    *,
    locked: np.ndarray | None = None,
    overwrite: bool = False,
    cancel: CancelCheck | threading.Event | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    **options,
) -> ObjectsResult:
    """Propagate several objects ({value: key slices}) one after the other; each keeps its report.

    Every object's key-slice voxels are locked for the other objects, so no propagation
    overwrites another object's key slice; elsewhere a voxel already owned by another object
    stays with it unless ``overwrite=True`` (then the later object in ``objects`` wins).
    """
    if not objects:
        raise PropagationError("No object to propagate: prompt at least one object first.")
    axis, locked = _check_labels(predictor, labels, next(iter(objects)), locked)
    objects = {value: _predict_keys(predictor, keys, labels.shape[axis]) for value, keys in objects.items()}
    key_voxels = np.zeros(labels.shape, bool)
    for keys in objects.values():
        for index, key in _check_keys(keys, labels, axis).items():
            key_voxels[slice_index(axis, index)] |= key[0]
    undo = UndoRecord(axis)
    results: dict[int, PropagationResult] = {}
    check = cancel.is_set if isinstance(cancel, threading.Event) else cancel
    values = list(objects)
    try:
        for n, value in enumerate(values):
            if check is not None and check():
                return ObjectsResult(results, undo, True, values[n:])
            own = np.zeros(labels.shape, bool)
            for index, key in _check_keys(objects[value], labels, axis).items():
                own[slice_index(axis, index)] = key[0]
            others = key_voxels & ~own
            lock = others if locked is None else (locked | others)

            def report(done: int, total: int, message: str, _value: int = value) -> None:
                if progress is not None:
                    progress(done, total, f"object {_value}: {message}")

            result = propagate(predictor, labels, value, objects[value], locked=lock, overwrite=overwrite,
                               cancel=cancel, progress=report, **options)
            results[value] = result
            undo.merge(result.undo)
            if result.cancelled:
                return ObjectsResult(results, undo, True, values[n + 1:])
    except BaseException:
        undo.undo(labels)
        raise
    return ObjectsResult(results, undo, False, [])
