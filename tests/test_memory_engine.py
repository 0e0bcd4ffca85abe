"""The memory engine's 3D logic against a tracker that errs the way SAM 2 does.

SAM 2's object score is its only stop in the official flow, and its known weakness in 3D is to
keep saying "present" past an organ's end, following another structure. ``ErringTracker`` has
the memory tracker's interface but answers every slice by prompting the SAM-like stand-in
(tests/sam_like_predictor.py: past the end, the most prominent other structure, confidently;
leaks; dropouts) from the last slice the walk remembers, with a positive object score always.
Official mode (object score only) then runs to the volume's edge; the project's stop rule on top
must stop where the structure ends, drop rejected slices from the walk's memory, and keep the
engine's contract (report with object scores, one undo, key slices kept, corrections).
"""

from __future__ import annotations

import numpy as np
import pytest
from gt_predictor import box_of, dice3d
from sam_like_predictor import SamLikePredictor

from napari_medsam.phantoms import CT_LABELS, make_ct_phantom
from napari_medsam.segment.memory.engine import propagate_memory, repropagate_memory
from napari_medsam.segment.memory.tracker import TrackedSlice
from napari_medsam.segment.predictor import Prompts
from napari_medsam.segment.propagation import StopRule

LABEL = {name: value for value, name in CT_LABELS.items()}


class _ErringWalk:
    def __init__(self, tracker: "ErringTracker", obj: int, step: int) -> None:
        self.tracker, self.obj, self.step = tracker, obj, step
        self.outputs: dict[int, np.ndarray] = {}
        self.forgotten: list[int] = []

    def _remembered(self, index: int) -> np.ndarray:
        keys = self.tracker.keys[self.obj]
        for distance in range(1, self.tracker.n_slices):
            k = index - distance * self.step
            if k in self.outputs:
                return self.outputs[k]
            if k in keys:
                return keys[k]
        return next(iter(keys.values()))

    def track(self, index: int) -> TrackedSlice:
        keys = self.tracker.keys[self.obj]
        if index in keys:
            return self.tracker.slice(index, keys[index], key=True)
        guide = self._remembered(index)
        prompts = Prompts(box=box_of(guide, 2.0)) if guide.any() else Prompts(points=[[0, 0]])
        mask = self.tracker.sam.predict(index, prompts).masks[0]
        self.outputs[index] = mask
        self.tracker.tracked.append(index)
        return self.tracker.slice(index, mask)

    def forget(self, index: int) -> None:
        self.forgotten.append(index)
        self.outputs.pop(index, None)


class ErringTracker:
    """The MemoryTracker interface over the SAM-like stand-in; the object score is always +8."""

    def __init__(self, sam: SamLikePredictor) -> None:
        self.sam = sam
        self.n_slices = sam.n_slices
        self.slice_shape = sam.slice_shape
        self.keys: dict[int, dict[int, np.ndarray]] = {}
        self.walks: list[_ErringWalk] = []
        self.tracked: list[int] = []

    def slice(self, index: int, mask: np.ndarray, key: bool = False) -> TrackedSlice:
        logits = np.where(mask, 8.0, -8.0).astype(np.float32)
        return TrackedSlice(index, mask.copy(), logits, self.sam.to_low_res(mask), 8.0, 0.9, key)

    def add_mask(self, obj: int, index: int, mask: np.ndarray) -> TrackedSlice:
        self.keys.setdefault(obj, {})[index] = np.asarray(mask, bool)
        return self.slice(index, np.asarray(mask, bool), key=True)

    def add_prompts(self, obj, index, points=None, labels=None, box=None, previous_logits=None) -> TrackedSlice:
        x0, y0, x1, y1 = box
        mask = self.sam.predict(index, Prompts(box=[y0, x0, y1, x1])).masks[0]
        return self.add_mask(obj, index, mask)

    def key_slices(self, obj: int) -> list[int]:
        return sorted(self.keys.get(obj, {}))

    def remove_object(self, obj: int) -> None:
        self.keys.pop(obj, None)

    def walk(self, obj: int, step: int) -> _ErringWalk:
        walk = _ErringWalk(self, obj, step)
        self.walks.append(walk)
        return walk


@pytest.fixture(scope="module")
def phantom():
    volume, gt, _ = make_ct_phantom(seed=1)
    return volume, gt


def _setup(phantom, name: str, seed: int = 1):
    volume, gt = phantom
    sam = SamLikePredictor(gt, seed=seed, spacing_mm=volume.spacing_mm, image=volume.array)
    truth = gt == LABEL[name]
    key = int(np.argmax(truth.sum(axis=(1, 2))))
    return sam, truth, key


def _past_end(labels: np.ndarray, truth: np.ndarray, value: int) -> int:
    written = (labels == value).any(axis=(1, 2))
    z = np.flatnonzero(truth.any(axis=(1, 2)))
    return max(int(written[: z[0]].sum()), int(written[z[-1] + 1:].sum()))


@pytest.mark.parametrize("name", ["right kidney", "gallbladder", "vertebra L3", "aorta"])
def test_the_stop_rule_ends_a_confident_wrong_track(phantom, name):
    sam, truth, key = _setup(phantom, name)
    value = LABEL[name]
    official = np.zeros(truth.shape, np.uint8)
    propagate_memory(sam, official, value, {key: truth[key]}, tracker=ErringTracker(sam), official=True,
                     prefetch=False)
    judged = np.zeros(truth.shape, np.uint8)
    tracker = ErringTracker(sam)
    result = propagate_memory(sam, judged, value, {key: truth[key]}, tracker=tracker, prefetch=False)
    assert _past_end(official, truth, value) > 3, "the stand-in should run past the end without a stop rule"
    assert _past_end(judged, truth, value) <= 1, name
    assert dice3d(judged == value, truth) >= 0.8, name
    assert all(r.object_score == 8.0 for r in result.reports if r.kind != "interpolated")
    skipped = {r.index for r in result.reports if r.kind in ("skipped", "stopped") and r.front in ("up", "down")}
    forgotten = {k for w in tracker.walks for k in w.forgotten}
    assert forgotten <= skipped | {r.index for r in result.reports}
    rejected = {r.index for r in result.reports if r.kind == "skipped"}
    assert rejected <= forgotten, "slices the rule rejected must leave the walk's memory"


def test_key_slices_undo_and_corrections(phantom):
    sam, truth, key = _setup(phantom, "right kidney")
    value = LABEL["right kidney"]
    labels = np.zeros(truth.shape, np.uint8)
    labels[truth.shape[0] - 1, :3, :3] = 9  # another object's voxels must survive
    before = labels.copy()
    tracker = ErringTracker(sam)
    result = propagate_memory(sam, labels, value, {key: truth[key]}, tracker=tracker, prefetch=False)
    assert result.reports[0].kind == "key" and result.reports[0].object_score == 8.0
    assert np.array_equal(labels[key] == value, truth[key])
    assert (labels == value).any(axis=(1, 2)).sum() > 5
    # A correction on another slice becomes a key slice and re-tracks only while results change.
    z = np.flatnonzero(truth.any(axis=(1, 2)))
    fix = int(z[1])
    after = labels.copy()
    corrected = truth[fix].copy()
    again = repropagate_memory(sam, labels, value, fix, corrected, tracker=tracker, prefetch=False)
    assert np.array_equal(labels[fix] == value, corrected)
    assert tracker.key_slices(value) == sorted({key, fix})
    assert all(r.index != key or r.kind == "key" for r in again.reports), "the first key slice is never re-tracked"
    again.undo.undo(labels)
    assert np.array_equal(labels, after)
    result.undo.undo(labels)
    assert np.array_equal(labels, before)


def test_errors_are_clear(phantom):
    from napari_medsam.errors import PropagationError

    sam, truth, key = _setup(phantom, "right kidney")
    labels = np.zeros(truth.shape, np.uint8)
    with pytest.raises(PropagationError, match="No key slice"):
        propagate_memory(sam, labels, 3, {}, tracker=ErringTracker(sam))
    with pytest.raises(PropagationError, match="outside"):
        propagate_memory(sam, labels, 3, {999: truth[key]}, tracker=ErringTracker(sam))
    with pytest.raises(PropagationError, match="empty"):
        propagate_memory(sam, labels, 3, {key: np.zeros_like(truth[key])}, tracker=ErringTracker(sam))
    with pytest.raises(PropagationError, match="SAM 2 or MedSAM2"):
        propagate_memory(sam, labels, 3, {key: truth[key]})  # the stand-in holds no SAM 2 network
    assert not labels.any()
    with pytest.raises(ValueError, match="direction"):
        propagate_memory(sam, labels, 3, {key: truth[key]}, tracker=ErringTracker(sam), direction="sideways")
