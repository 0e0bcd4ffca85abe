"""The machinery of one propagation run: fronts, the write rule, undo, prefetching, progress.

:mod:`.propagation` holds the public entry points; they build a :class:`PropagationRun`, add
fronts to it and run them. A *front* walks from a slice with a known mask in one direction,
prompting each slice from the last slice it accepted, until the stop rule, a key slice, the
other front of a gap, the z-range or the volume's edge ends it.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from ..postprocess import PostProcess, postprocess_mask
from ..predictor import Prompts, SlicePredictorProtocol
from ..prompting import PromptSettings, interpolate_masks, prompts_from_mask
from .evidence import Appearance, Evidence, cosine, measure
from .stop_rules import (STATUS_INTERPOLATED, STATUS_KEY, STATUS_PROPAGATED, STATUS_STOPPED, FrontCounters,
                         SliceReport, StopRule, dice, judge)

ProgressCallback = Callable[[int, int, str], None]
CancelCheck = Callable[[], bool]


@dataclass
class UndoRecord:
    """The content of every slice a run changed, as it was before: undoing restores them all at once."""

    axis: int
    previous: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def slices(self) -> list[int]:
        """Indices of the changed slices, sorted."""
        return sorted(self.previous)

    def keep(self, labels: np.ndarray, index: int) -> None:
        """Remember slice ``index`` of ``labels`` unless it is already remembered."""
        if index not in self.previous:
            self.previous[index] = np.array(labels[slice_index(self.axis, index)], copy=True)

    def undo(self, labels: np.ndarray) -> None:
        """Put every remembered slice back into ``labels``."""
        for index, content in self.previous.items():
            labels[slice_index(self.axis, index)] = content

    def merge(self, later: "UndoRecord") -> None:
        """Add a later run's record: for a slice both touched, this (earlier) content wins."""
        if later.axis != self.axis:
            raise ValueError("cannot merge undo records of different axes")
        for index, content in later.previous.items():
            self.previous.setdefault(index, content)


@dataclass
class PropagationResult:
    """What a propagation did: one report row per slice, why each front ended, and the undo record."""

    object_value: int
    axis: int
    reports: list[SliceReport]
    undo: UndoRecord
    cancelled: bool = False
    stop_reasons: dict[str, str] = field(default_factory=dict)  # front name -> why it ended
    embedded: list[int] = field(default_factory=list)  # slices whose embedding was asked for

    @property
    def written_slices(self) -> list[int]:
        """Indices of the slices whose labels this run changed."""
        return self.undo.slices

    def reports_for(self, index: int) -> list[SliceReport]:
        """Every report row of slice ``index`` (a slice can be visited by two fronts)."""
        return [r for r in self.reports if r.index == index]

    def table(self) -> list[dict]:
        """The report as plain rows (index, status, front, areas, score, overlap, written), sorted by slice."""
        rows = [dict(vars(r)) for r in self.reports]
        return sorted(rows, key=lambda row: row["index"])


def slice_index(axis: int, index: int) -> tuple:
    """The index tuple of slice ``index`` along ``axis`` of a 3D array (a view, not a copy)."""
    return tuple(index if a == axis else slice(None) for a in range(3))


def as_cancel_check(cancel: CancelCheck | threading.Event | None) -> CancelCheck:
    """A no-argument callable from a cancel callable, a threading.Event, or None (never cancelled)."""
    if cancel is None:
        return lambda: False
    if isinstance(cancel, threading.Event):
        return cancel.is_set
    return cancel


class Prefetcher:
    """Embeds the slice ahead of a front in one background thread while the current slice decodes."""

    def __init__(self, predictor: SlicePredictorProtocol, enabled: bool) -> None:
        self.predictor = predictor
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="medsam-prefetch") if enabled else None
        self.futures: dict[int, Future] = {}
        self.ready: set[int] = set()
        self.started: list[int] = []  # list.append is atomic, so the worker may append too

    def _embed(self, index: int) -> None:
        self.started.append(index)
        self.predictor.embed(index)

    def ensure(self, index: int) -> None:
        """Make sure slice ``index`` is embedded (waiting for the background if it is on it)."""
        if index in self.ready:
            return
        future = self.futures.pop(index, None)
        done = False
        if future is not None:
            try:
                future.result()
                done = True
            except Exception:  # embed again here, so the error (if any) surfaces in the caller's thread
                pass
        if not done:
            self._embed(index)
        self.ready.add(index)

    def ahead(self, index: int) -> None:
        """Start embedding slice ``index`` in the background (no-op without a pool or if already asked).

        A predictor with an embedding cache is told at once (``cache.hold()``), so that
        ``cache.flush()`` waits for this slice from the moment it is queued until it is stored or
        cancelled, not only while the worker is inside ``get_or_compute``.
        """
        if self.pool is None or index in self.ready or index in self.futures:
            return
        hold = getattr(getattr(self.predictor, "cache", None), "hold", None)
        release = hold() if callable(hold) else None
        try:
            future = self.pool.submit(self._embed, index)
        except BaseException:
            if release is not None:
                release()
            raise
        if release is not None:
            future.add_done_callback(lambda _future: release())
        self.futures[index] = future

    def close(self) -> None:
        """Drop queued work; a running embedding finishes on its own (it only fills the cache)."""
        for future in self.futures.values():
            future.cancel()
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class Front:
    """One walk through the slices from a known mask in one direction."""

    name: str
    step: int  # +1 (up: increasing index) or -1 (down)
    position: int  # the last slice handled
    mask: np.ndarray  # the last accepted mask, which prompts the next slice
    logits: np.ndarray | None
    mask_index: int  # where that mask lies
    check_unchanged: bool = False  # corrections: end where the new mask matches the old labels
    counters: FrontCounters = field(default_factory=FrontCounters)
    areas: list[int] = field(default_factory=list)  # accepted masks' areas, the start's first
    finished: bool = False
    reason: str = ""

    def end(self, reason: str) -> bool:
        """Mark the front finished (first reason wins); returns False for the caller's loop."""
        if not self.finished:
            self.finished, self.reason = True, reason
        return False

    def __post_init__(self) -> None:
        if not self.areas:
            self.areas.append(int(np.count_nonzero(self.mask)))

    def accept(self, mask: np.ndarray, logits: np.ndarray | None, index: int) -> None:
        """Prompt the next slices from this mask."""
        self.mask, self.logits, self.mask_index = mask, logits, index
        self.areas.append(int(np.count_nonzero(mask)))

    def steady_area(self, slices: int = 4, spread: float = 1.6) -> float | None:
        """The median area of the last ``slices`` accepted masks when they hardly changed (a tube), else None."""
        last = self.areas[-slices:]
        if len(last) < slices or min(last) <= 0 or max(last) / min(last) > spread:
            return None
        return float(np.median(last))


class PropagationRun:
    """State shared by the fronts of one object's propagation on one label volume."""

    def __init__(self, predictor: SlicePredictorProtocol, labels: np.ndarray, value: int, *, stop: StopRule,
                 prompt: PromptSettings, locked: np.ndarray | None, overwrite: bool,
                 cancel: CancelCheck | threading.Event | None, progress: ProgressCallback | None, prefetch: bool,
                 spacing_mm: tuple[float, float, float] | None, reconcile: str = "meet") -> None:
        self.predictor, self.labels, self.value = predictor, labels, value
        self.axis = int(getattr(predictor, "axis", 0))
        self.n = int(labels.shape[self.axis])
        self.stop, self.prompt, self.locked, self.overwrite = stop, prompt, locked, overwrite
        self.reconcile = reconcile
        self._cancel, self._progress = as_cancel_check(cancel), progress
        in_plane = [s for a, s in enumerate(spacing_mm) if a != self.axis] if spacing_mm else None
        self.pixel_mm2 = float(in_plane[0] * in_plane[1]) if in_plane else None
        spacing = spacing_mm or getattr(predictor, "spacing_mm", None)
        self.pixel_mm = tuple(float(s) for a, s in enumerate(spacing) if a != self.axis) if spacing else (1.0, 1.0)
        image = getattr(predictor, "image", None) if stop.use_image else None
        self.image: Callable[[int], np.ndarray] | None = image if callable(image) else None
        self.appearance: Appearance | None = None
        pooled = getattr(predictor, "pooled_embedding", None)
        self.pooled: Callable[[int, np.ndarray], np.ndarray | None] | None = pooled if callable(pooled) else None
        self._key_features: list[np.ndarray] = []
        self._key_feature: np.ndarray | None = None  # their mean, what new masks are compared with
        self._key_views: list[tuple[np.ndarray, np.ndarray]] = []
        self.undo = UndoRecord(self.axis)
        self.reports: list[SliceReport] = []
        self.state: dict[int, str] = {}  # "key", "accepted", "skipped", "interpolated"
        self.scores: dict[int, float] = {}  # score of the prediction a front wrote on the slice
        self.protected: set[int] = set()
        self.fronts: list[Front] = []
        self.cancelled = False
        self.done = 0
        self.fixed_total: int | None = None  # set when the number of slices is known beforehand
        self.extra_reasons: dict[str, str] = {}  # why walks that are not fronts ended
        self.prefetcher = Prefetcher(predictor, prefetch)

    # ------------------------------------------------------------------ labels
    def view(self, index: int) -> np.ndarray:
        """Slice ``index`` of the label volume (a writable view)."""
        return self.labels[slice_index(self.axis, index)]

    def would_write(self, index: int, mask: np.ndarray) -> np.ndarray:
        """The slice's labels after writing ``mask``: own voxels outside it cleared, locked voxels kept."""
        current = self.view(index)
        after = current.copy()
        free = np.ones(mask.shape, bool) if self.locked is None else ~self.locked[slice_index(self.axis, index)]
        after[(current == self.value) & ~mask & free] = 0
        if not self.overwrite:
            free &= (current == 0) | (current == self.value)
        after[mask & free] = self.value
        return after

    def write(self, index: int, mask: np.ndarray) -> bool:
        """Write ``mask`` as this object on slice ``index`` (undo kept); True when labels changed."""
        after = self.would_write(index, mask)
        current = self.view(index)
        if np.array_equal(after, current):
            return False
        self.undo.keep(self.labels, index)
        current[...] = after
        return True

    # ------------------------------------------------------------------ reports and progress
    def report(self, index: int, status: str, front: str, mask: np.ndarray | None = None,
               score: float | None = None, overlap: float | None = None, written: bool = False,
               evidence: Evidence | None = None, object_score: float | None = None) -> SliceReport:
        """Add a report row (areas computed from ``mask``)."""
        area = None if mask is None else int(np.count_nonzero(mask))
        area_mm2 = None if area is None or self.pixel_mm2 is None else area * self.pixel_mm2
        row = SliceReport(index, status, front, area, area_mm2, score, overlap, written, evidence, object_score)
        self.reports.append(row)
        return row

    def remaining_estimate(self) -> int:
        """How many more slices the unfinished fronts may visit (an upper bound)."""
        todo: set[int] = set()
        for f in self.fronts:
            k = f.position + f.step
            while not f.finished and 0 <= k < self.n and self.stop.in_range(k) and k not in self.protected:
                if self.reconcile == "meet" and self.state.get(k) == "accepted":
                    break
                todo.add(k)
                k += f.step
        return len(todo)

    def tick(self, message: str) -> None:
        """One slice done: tell the progress callback."""
        self.done += 1
        if self._progress is not None:
            total = self.fixed_total if self.fixed_total is not None else self.done + self.remaining_estimate()
            self._progress(self.done, max(total, self.done), message)

    def check_cancel(self) -> bool:
        """True (and remembered) once the caller asked to cancel."""
        if not self.cancelled and self._cancel():
            self.cancelled = True
        return self.cancelled

    # ------------------------------------------------------------------ key slices and fronts
    def add_key(self, index: int, mask: np.ndarray, score: float | None, object_score: float | None = None) -> None:
        """Write a key slice (never touched by the fronts afterwards)."""
        written = self.write(index, mask)
        if self.image is not None and np.any(mask):
            # The object's appearance comes from its key slices, which the user prompted and saw.
            self._key_views.append((np.asarray(self.image(index)), np.asarray(mask, bool)))
            images, masks = zip(*self._key_views)
            self.appearance = Appearance.of(list(images), list(masks), str(getattr(self.predictor, "intensity_unit", "")))
        if self.pooled is not None and np.any(mask):
            features = self.pooled(index, np.asarray(mask, bool))
            if features is not None:
                self._key_features.append(np.asarray(features, np.float64))
                self._key_feature = np.mean(self._key_features, axis=0)
        self.protected.add(index)
        self.state[index] = STATUS_KEY
        self.report(index, STATUS_KEY, "key", mask, score, None, written, object_score=object_score)

    def may_visit(self, index: int) -> bool:
        """True when a front could still go to slice ``index``."""
        return (0 <= index < self.n and self.stop.in_range(index) and index not in self.protected
                and not (self.reconcile == "meet" and self.state.get(index) == "accepted"))

    def step(self, front: Front, partner: Front | None = None) -> bool:
        """Advance ``front`` by one slice; False once it has ended."""
        if front.finished:
            return False
        if self.check_cancel():
            return front.end("cancelled")
        k = front.position + front.step
        if not 0 <= k < self.n:
            return front.end("edge of the volume")
        if not self.stop.in_range(k):
            self.report(k, f"{STATUS_STOPPED}: outside the z-range", front.name)
            return front.end("outside the z-range")
        if k in self.protected:
            return front.end(f"reached key slice {k}")
        if self.reconcile == "meet" and self.state.get(k) == "accepted":
            return front.end(f"met the other front at slice {k}")
        joint = (self.reconcile == "meet" and partner is not None and not partner.finished
                 and partner.position + partner.step == k)
        guide, result = self.predict_next(front, partner, k, joint)
        mask = np.asarray(result.masks[0], dtype=bool)
        score = float(result.scores[0])
        front.position = k
        if front.check_unchanged:
            same = dice(self.would_write(k, mask) == self.value, self.view(k) == self.value)
            if same >= self.stop.unchanged_dice:
                self.report(k, f"{STATUS_STOPPED}: unchanged (dice {same:.3f})", front.name, mask, score)
                front.end("unchanged")
                self.tick(f"slice {k}: unchanged")
                return False
        evidence = self.evidence(k, mask, guide, front)
        verdict, overlap = judge(self.stop, mask, score, guide, front.counters, evidence,
                                 self.appearance.unit if self.appearance is not None else "")
        written, status = False, verdict.status
        if verdict.accept:
            prior = self.scores.get(k)
            if prior is not None and prior >= score:
                status = f"outscored: {score:.2f} <= {prior:.2f} from the other front"
            else:
                written = self.write(k, mask)
                self.scores[k], self.state[k] = score, "accepted"
            front.accept(mask, result.low_res_logits[0], k)
        else:
            self.state.setdefault(k, "skipped")
        self.report(k, status, front.name, mask, score, overlap, written, evidence,
                    getattr(result, "object_score", None))
        if joint:
            front.end(f"met the other front at slice {k}")
            partner.end(f"met the other front at slice {k}")  # type: ignore[union-attr]
        if verdict.stop:
            front.end(verdict.reason)
        self.tick(f"slice {k}: {status}")  # after ending fronts, so the last call has done == total
        return not front.finished

    def predict_next(self, front: Front, partner: Front | None, index: int, joint: bool):
        """(guide, prediction) for slice ``index``: prompts from the front's last mask (or, where two
        fronts meet, from both neighbours' masks blended). The guide is what the new mask is judged
        against. Other engines (memory tracking) override this."""
        guide, guide_logits = self._between(front, partner, index) if joint else (front.mask, front.logits)
        prompts = prompts_from_mask(guide, guide_logits, self.prompt)
        return guide, self._predict(index, prompts, index + front.step)

    def evidence(self, index: int, mask: np.ndarray, previous: np.ndarray, front: Front) -> Evidence:
        """Everything the stop rule weighs for ``mask`` on slice ``index``, prompted from ``previous`` by ``front``."""
        use_image = self.image is not None and self.appearance is not None and np.any(mask)
        before = front.mask_index
        evidence = measure(mask, previous, pixel_mm=self.pixel_mm, outside_mm=self.stop.outside_mm,
                           image=self.image(index) if use_image else None,  # type: ignore[misc]
                           appearance=self.appearance, gap=abs(index - before),
                           previous_image=self.image(before) if use_image else None)  # type: ignore[misc]
        changes: dict = {"steady_area": front.steady_area()}
        if self._key_feature is not None and np.any(mask):
            changes["similarity"] = cosine(self.pooled(index, mask), self._key_feature)  # type: ignore[misc]
        if before in self.protected:
            # A key slice may hold a leak the user let pass (a box prompt's answer); the next slice
            # rightly leaves that out, so parts left out are judged against propagated slices only.
            changes["lost"] = None
        return replace(evidence, **changes)

    def _predict(self, index: int, prompts: Prompts, ahead: int):
        self.prefetcher.ensure(index)
        if self.may_visit(ahead):
            self.prefetcher.ahead(ahead)
        return self.predictor.predict(index, prompts, multimask=False)

    def _between(self, front: Front, partner: Front | None, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The guide for the slice where two fronts meet: both neighbours' masks and logits blended."""
        assert partner is not None
        d1, d2 = abs(index - front.mask_index), abs(partner.mask_index - index)
        t = d1 / (d1 + d2)
        mask = interpolate_masks(front.mask, partner.mask, t)
        if not mask.any():
            mask = front.mask if t <= 0.5 else partner.mask
        logits = [lg for lg in (front.logits, partner.logits) if lg is not None]
        if len(logits) == 2:
            return mask, ((1 - t) * front.logits + t * partner.logits).astype(np.float32)  # type: ignore[operator]
        return mask, (logits[0] if logits else None)

    def register(self, *fronts: Front) -> None:
        """Announce fronts before they run, so progress estimates count their slices from the start."""
        self.fronts += [f for f in fronts if f not in self.fronts]

    def run_alone(self, front: Front) -> None:
        """Walk one front to its end."""
        self.register(front)
        while self.step(front):
            pass

    def run_pair(self, lower: Front, upper: Front) -> None:
        """Fill the gap between two key slices from both ends ("meet": alternating; else one after the other)."""
        self.register(lower, upper)
        if self.reconcile == "meet":
            while not (lower.finished and upper.finished):
                self.step(lower, upper)
                self.step(upper, lower)
        else:
            self.run_alone(lower)
            self.run_alone(upper)

    # ------------------------------------------------------------------ after the fronts
    def fill_skipped(self) -> None:
        """Interpolate skipped slices lying between two accepted (or key) slices with masks."""
        def solid(i: int) -> bool:
            return self.state.get(i) in (STATUS_KEY, "accepted") and bool((self.view(i) == self.value).any())

        for k in sorted(i for i, s in self.state.items() if s == "skipped"):
            lo, hi = k - 1, k + 1
            while self.state.get(lo) == "skipped":
                lo -= 1
            while self.state.get(hi) == "skipped":
                hi += 1
            if not (solid(lo) and solid(hi)) or self.check_cancel():
                continue
            mask = interpolate_masks(self.view(lo) == self.value, self.view(hi) == self.value, (k - lo) / (hi - lo))
            written = self.write(k, mask)
            self.state[k] = STATUS_INTERPOLATED
            self.report(k, STATUS_INTERPOLATED, f"between {lo} and {hi}", mask, None, None, written)

    def postprocess(self, settings: PostProcess) -> None:
        """Apply post-processing to the slices this run wrote (key slices excluded)."""
        editable = [k for k in self.undo.slices if k not in self.protected]
        if not settings.active or not editable:
            return
        cleaned = postprocess_mask(self.labels == self.value, settings, self.axis)
        for k in editable:
            self.write(k, cleaned[slice_index(self.axis, k)])

    def result(self) -> PropagationResult:
        """The run's :class:`PropagationResult`."""
        reasons = {f.name: f.reason for f in self.fronts} | self.extra_reasons
        return PropagationResult(self.value, self.axis, self.reports, self.undo, self.cancelled, reasons,
                                 list(dict.fromkeys(self.prefetcher.started)))


__all__ = ["PropagationResult", "PropagationRun", "Front", "UndoRecord", "STATUS_PROPAGATED", "slice_index"]
