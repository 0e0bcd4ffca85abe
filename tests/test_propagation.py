"""Propagation through a CT phantom, driven by a predictor made from the phantom's ground truth."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from scipy import ndimage

from gt_predictor import GroundTruthPredictor, box_of, dice3d, key_from_box
from napari_medsam.errors import PropagationError
from napari_medsam.phantoms import CT_VERTEBRAE, make_ct_phantom
from napari_medsam.segment.postprocess import PostProcess, fill_holes_per_slice, largest_component_3d
from napari_medsam.segment.predictor import Prompts, SliceMasks
from napari_medsam.segment.prompting import (PromptSettings, interior_points, interpolate_boxes, mask_box,
                                             parse_prompt_mode, prompts_from_mask, ring_points)
from napari_medsam.segment.propagation import (propagate, propagate_objects, repropagate, segment_boxes)
from napari_medsam.segment.propagation.stop_rules import FrontCounters, StopRule, judge

SHAPE, SPACING = (40, 96, 96), (4.0, 3.6, 3.6)
ORGANS = {1: "liver", 2: "spleen", 3: "right kidney", 4: "left kidney"}


@pytest.fixture(scope="module")
def phantom():
    volume, gt, names = make_ct_phantom(shape=SHAPE, spacing_mm=SPACING, seed=0)
    for organ in ORGANS:  # the tests rely on every organ starting and ending inside the volume
        z = np.flatnonzero((gt == organ).any(axis=(1, 2)))
        assert 0 < z[0] and z[-1] < SHAPE[0] - 1
    return volume, gt


def extent(mask: np.ndarray, axis: int = 0) -> tuple[int, int]:
    other = tuple(a for a in range(3) if a != axis)
    z = np.flatnonzero(mask.any(axis=other))
    return int(z[0]), int(z[-1])


def middle(gt: np.ndarray, organ: int, axis: int = 0) -> int:
    lo, hi = extent(gt == organ, axis)
    return (lo + hi) // 2


class Tampered:
    """A predictor that edits another predictor's answers: ``edit(index, prompts, SliceMasks) -> SliceMasks``."""

    def __init__(self, inner: GroundTruthPredictor, edit) -> None:
        self.inner, self.edit = inner, edit
        self.axis, self.spacing_mm, self.slice_shape = inner.axis, inner.spacing_mm, inner.slice_shape
        self.prompts: dict[int, list[Prompts]] = {}

    def embed(self, index: int) -> np.ndarray:
        return self.inner.embed(index)

    def predict(self, index: int, prompts: Prompts, multimask: bool = False) -> SliceMasks:
        self.prompts.setdefault(index, []).append(prompts)
        return self.edit(index, prompts, self.inner.predict(index, prompts, multimask))


def with_mask(result: SliceMasks, mask: np.ndarray, score: float | None = None) -> SliceMasks:
    scores = result.scores.copy()
    if score is not None:
        scores[0] = score
    return SliceMasks(mask[None], scores[:1], result.low_res_logits[:1], result.index, result.axis)


# ---------------------------------------------------------------------- quality on the phantom
@pytest.mark.parametrize("organ", sorted(ORGANS))
def test_one_box_on_the_middle_slice_segments_the_organ(phantom, organ):
    volume, gt = phantom
    predictor = GroundTruthPredictor(gt, spacing_mm=volume.spacing_mm, seed=0)
    k, key = key_from_box(predictor, gt, organ, middle(gt, organ))
    labels = np.zeros(gt.shape, np.uint8)
    result = propagate(predictor, labels, organ, {k: key})
    assert set(np.unique(labels)) <= {0, organ}
    assert dice3d(labels == organ, gt == organ) >= 0.85
    true_lo, true_hi = extent(gt == organ)
    lo, hi = extent(labels == organ)
    assert true_lo - 2 <= lo <= true_lo + 2 and true_hi - 2 <= hi <= true_hi + 2  # no overshoot, full reach
    assert "edge of the volume" not in result.stop_reasons.values()  # the stop rule ended both fronts
    assert not result.cancelled


def test_report_rows_explain_every_slice(phantom):
    volume, gt = phantom
    predictor = GroundTruthPredictor(gt, spacing_mm=volume.spacing_mm, seed=0)
    k, key = key_from_box(predictor, gt, 3, middle(gt, 3))
    labels = np.zeros(gt.shape, np.uint8)
    calls = []
    result = propagate(predictor, labels, 3, {k: key}, progress=lambda d, t, m: calls.append((d, t, m)))
    rows = result.reports
    assert [r.status for r in rows].count("key") == 1 and rows[0].index == k and rows[0].score is not None
    for r in rows:
        if r.area_px is not None:
            assert r.area_mm2 == pytest.approx(r.area_px * 3.6 * 3.6)
        if r.kind == "propagated":
            assert r.written and r.score >= 0.5 and r.overlap is not None
    # Each front ends on a "stopped" row whose reason is the front's stop reason.
    for name in ("down", "up"):
        last = [r for r in rows if r.front == name][-1]
        assert last.kind == "stopped" and last.reason == result.stop_reasons[name]
    # Every written slice has a row that wrote it; labels changed only there.
    assert set(result.written_slices) == {r.index for r in rows if r.written}
    assert set(np.flatnonzero(labels.any(axis=(1, 2)))) <= set(result.written_slices)
    # Progress: one call per visited slice, counting up, with a total that is never below done.
    assert [c[0] for c in calls] == list(range(1, len(calls) + 1))
    assert all(t >= d for d, t, _ in calls) and calls[-1][0] == calls[-1][1]
    assert len(result.table()) == len(rows) and result.table()[0]["index"] <= result.table()[-1]["index"]


def test_stop_reasons_score_overlap_and_area(phantom):
    volume, gt = phantom
    base = GroundTruthPredictor(gt, spacing_mm=volume.spacing_mm, seed=0, dropout=0.0, leak=0.0)
    k = middle(gt, 1)
    key = base.predict(k, Prompts(box=box_of(gt[k] == 1)))

    def low_score(index, prompts, result):  # the model loses confidence 3 slices above the key
        return with_mask(result, result.masks[0], 0.3) if index >= k + 3 else result

    def other_organ(index, prompts, result):  # ... or jumps to the spine below the key
        return with_mask(result, np.isin(gt[index], [v for _, v in CT_VERTEBRAE])) if index <= k - 2 else result

    def explode(index, prompts, result):  # ... or floods the slice
        return with_mask(result, np.ones_like(result.masks[0])) if index >= k + 2 else result

    rule = StopRule(max_rejected_slices=1)
    for edit, front, reason in ((low_score, "up", "score 0.30 < 0.50"), (other_organ, "down", "dice"),
                                (explode, "up", "area exploded")):
        labels = np.zeros(gt.shape, np.uint8)
        result = propagate(Tampered(base, edit), labels, 1, {k: key}, stop=rule)
        assert reason in result.stop_reasons[front]
        stopped = [r for r in result.reports if r.front == front][-1]
        assert stopped.kind == "stopped" and not stopped.written
        bound = {"score": k + 2, "dice": k - 1, "area": k + 1}[reason.split()[0]]
        written = result.written_slices
        assert (max(written) == bound) if front == "up" else (min(written) == bound)


def test_judge_reasons_and_misses_in_a_row():
    rule = StopRule()
    prev = np.zeros((40, 40), bool)
    prev[10:30, 10:30] = True
    shifted = np.roll(prev, 15, axis=1)
    tiny = np.zeros_like(prev)
    tiny[12:15, 12:15] = True
    counters = FrontCounters()
    assert judge(rule, prev, 0.9, prev, counters)[0].accept
    assert judge(rule, prev, 0.2, prev, counters)[0].reason == "score 0.20 < 0.50"
    assert judge(rule, shifted, 0.9, prev, FrontCounters())[0].reason.startswith("dice 0.25")
    assert "area collapsed" in judge(rule, tiny, 0.9, prev, FrontCounters())[0].reason
    assert "area exploded" in judge(rule, np.ones_like(prev), 0.9, prev, FrontCounters())[0].reason
    iou_rule = StopRule(overlap_metric="iou", min_overlap=0.5)
    assert judge(iou_rule, shifted, 0.9, prev, FrontCounters())[0].reason.startswith("iou 0.14")
    # Small previous masks are not judged on overlap: they move a lot between slices.
    assert judge(rule, np.roll(tiny, 5, axis=0), 0.9, tiny, FrontCounters())[0].accept
    # Misses in a row: two rejections stop; an empty slice after one rejection does not (limit 3).
    counters = FrontCounters()
    first = judge(rule, shifted, 0.9, prev, counters)[0]
    assert not first.accept and not first.stop and first.status.startswith("skipped: dice")
    assert not judge(rule, np.zeros_like(prev), 0.9, prev, counters)[0].stop
    assert judge(rule, np.zeros_like(prev), 0.9, prev, counters)[0].status.startswith("stopped: empty (3 missed")
    with pytest.raises(ValueError):
        StopRule(z_range=(10, 5))
    with pytest.raises(ValueError):
        StopRule(overlap_metric="hausdorff")


def test_z_range_bounds_every_front(phantom):
    volume, gt = phantom
    predictor = GroundTruthPredictor(gt, spacing_mm=volume.spacing_mm, seed=0)
    k, key = key_from_box(predictor, gt, 1, middle(gt, 1))
    labels = np.zeros(gt.shape, np.uint8)
    result = propagate(predictor, labels, 1, {k: key}, stop=StopRule(z_range=(k - 3, k + 4)))
    assert extent(labels == 1) == (k - 3, k + 4)
    assert result.stop_reasons == {"down": "outside the z-range", "up": "outside the z-range"}
    assert {r.index for r in result.reports if r.kind == "stopped"} == {k - 4, k + 5}
    assert set(predictor.embed_calls) <= set(range(k - 3, k + 5))  # never embeds outside the range
    assert set(predictor.predict_calls) - {k} == set(range(k - 3, k + 5)) - {k}


def test_direction_up_only(phantom):
    volume, gt = phantom
    predictor = GroundTruthPredictor(gt, spacing_mm=volume.spacing_mm, seed=0)
    k, key = key_from_box(predictor, gt, 2, middle(gt, 2))
    labels = np.zeros(gt.shape, np.uint8)
    result = propagate(predictor, labels, 2, {k: key}, direction="up")
    assert extent(labels == 2)[0] == k and extent(labels == 2)[1] > k + 3
    assert list(result.stop_reasons) == ["up"]


# ---------------------------------------------------------------------- several key slices
@pytest.mark.parametrize("reconcile", ["meet", "best_score"])
def test_key_slices_fill_between_and_stay_untouched(phantom, reconcile):
    volume, gt = phantom
    predictor = GroundTruthPredictor(gt, spacing_mm=volume.spacing_mm, seed=0)
    lo, hi = extent(gt == 1)
    a, b = lo + 6, hi - 6
    keys = {a: gt[a] == 1, b: np.roll(gt[b] == 1, 2, axis=1)}  # the second key is a hand-shifted mask
    labels = np.zeros(gt.shape, np.uint8)
    result = propagate(predictor, labels, 1, keys, reconcile=reconcile)
    for index, mask in keys.items():  # key slices exactly as given
        np.testing.assert_array_equal(labels[index] == 1, mask)
    assert all((labels[z] == 1).any() for z in range(a, b + 1))  # the gap is filled
    assert dice3d(labels == 1, gt == 1) >= 0.85
    fronts = [f"fill {a}-{b} up", f"fill {a}-{b} down"]
    assert set(fronts) <= set(result.stop_reasons)
    if reconcile == "meet":
        # The fronts alternate and meet in the middle; each gap slice is predicted once.
        meet = result.stop_reasons[fronts[0]]
        assert meet.startswith("met the other front") and meet == result.stop_reasons[fronts[1]]
        gap_rows = [r for r in result.reports if a < r.index < b and r.front in fronts]
        assert sorted(r.index for r in gap_rows) == list(range(a + 1, b))
    else:
        # Both fronts cross the whole gap; the better-scored result is what was written.
        both = 0
        for z in range(a + 1, b):
            rows = [r for r in result.reports if r.index == z and r.front in fronts]
            assert len(rows) == 2  # one per front
            first, later = rows
            if {first.kind, later.kind} <= {"propagated", "outscored"}:
                both += 1  # the later front replaces the earlier result only with a better score
                assert (later.kind == "outscored") == (later.score <= first.score)
        assert both >= (b - a) // 2
        for name in fronts:
            assert result.stop_reasons[name].startswith("reached key slice")


def test_meeting_slice_is_prompted_from_both_neighbours(phantom):
    volume, gt = phantom
    base = GroundTruthPredictor(gt, spacing_mm=volume.spacing_mm, seed=0, dropout=0.0)
    predictor = Tampered(base, lambda i, p, r: r)
    a, b = 14, 18
    keys = {a: gt[a] == 1, b: np.roll(gt[b] == 1, 6, axis=1)}  # two quite different neighbours
    propagate(predictor, np.zeros(gt.shape, np.uint8), 1, keys, prompt_mode="box", stop=StopRule(z_range=(a, b)))
    # Slices 15 and 17 come from one neighbour each; 16 (the meeting slice) from the blend of both.
    assert sorted(predictor.prompts) == [15, 16, 17]
    box15, box16, box17 = (predictor.prompts[z][0].box for z in (15, 16, 17))
    assert not np.allclose(box16, box15) and not np.allclose(box16, box17)


# ---------------------------------------------------------------------- sparse boxes, corrections
def test_sparse_boxes_are_interpolated_and_segmented(phantom):
    volume, gt = phantom
    predictor = Tampered(GroundTruthPredictor(gt, spacing_mm=volume.spacing_mm, seed=0), lambda i, p, r: r)
    lo, hi = extent(gt == 4)
    marked = list(range(lo + 1, hi, 6))
    boxes = {z: box_of(gt[z] == 4) for z in marked}
    labels = np.zeros(gt.shape, np.uint8)
    result = segment_boxes(predictor, labels, 4, boxes)
    assert sorted(predictor.prompts) == list(range(marked[0], marked[-1] + 1))
    a, b = marked[0], marked[1]
    mid = (a + b) // 2
    expected = boxes[a] + (boxes[b] - boxes[a]) * (mid - a) / (b - a)
    np.testing.assert_allclose(predictor.prompts[mid][0].box, expected)
    assert {r.index for r in result.reports if r.status == "key"} == set(marked)
    inside = slice(marked[0], marked[-1] + 1)
    assert dice3d(labels[inside] == 4, gt[inside] == 4) >= 0.85
    assert not labels[: marked[0]].any() and not labels[marked[-1] + 1:].any()


def test_interpolate_boxes_is_linear_between_marks():
    boxes = interpolate_boxes({2: [0, 0, 10, 10], 6: [4, 8, 14, 30]})
    assert sorted(boxes) == [2, 3, 4, 5, 6]
    np.testing.assert_allclose(boxes[4], [2, 4, 12, 20])
    np.testing.assert_allclose(interpolate_boxes({3: [10, 10, 0, 0]})[3], [0, 0, 10, 10])


def test_correction_repropagates_only_while_the_result_changes(phantom):
    volume, gt = phantom
    predictor = GroundTruthPredictor(gt, spacing_mm=volume.spacing_mm, seed=0, dropout=0.0)
    blob = np.zeros((96, 96), bool)
    lo, hi = extent(gt == 1)
    k = (lo + hi) // 2
    rows, cols = np.flatnonzero((gt[k] == 1).any(1)), np.flatnonzero((gt[k] == 1).any(0))
    blob[rows[0] - 8: rows[0] - 2, cols[0]: cols[0] + 10] = True  # a patch of fat just outside the liver

    def sticky_leak(index, prompts, result):  # a leak that follows the prompt once the prompt covers it
        if prompts.box is not None and prompts.box[0] <= rows[0] - 6 and index <= hi:
            return with_mask(result, result.masks[0] | blob)
        return result

    leaky = Tampered(predictor, sticky_leak)
    labels = np.zeros(gt.shape, np.uint8)
    propagate(leaky, labels, 1, {k: (gt[k] == 1) | blob})
    polluted = [z for z in range(k + 1, hi + 1) if (labels[z][blob] == 1).any()]
    assert len(polluted) >= 5
    # The user fixes slice k + 3: everything above it is re-segmented without the leak.
    fix = k + 3
    before = labels.copy()
    leaky.prompts.clear()
    result = repropagate(leaky, labels, 1, fix, gt[fix] == 1, other_keys=[k])
    assert not (labels[fix:hi + 1][:, blob] == 1).any()
    assert result.stop_reasons["correction down"] == f"reached key slice {k}"
    np.testing.assert_array_equal(labels[k], before[k])
    # Going up, the front stops once the new masks equal the old ones (past the organ's end).
    assert result.stop_reasons["correction up"] == "unchanged"
    # A correction that changes nothing stops right away on both sides.
    leaky.prompts.clear()
    again = repropagate(leaky, labels, 1, fix, labels[fix] == 1, other_keys=[k])
    assert again.written_slices == [] and sorted(leaky.prompts) == [fix - 1, fix + 1]
    assert again.stop_reasons == {"correction down": "unchanged", "correction up": "unchanged"}


# ---------------------------------------------------------------------- ownership, locks, undo
def test_locked_voxels_are_never_changed(phantom):
    volume, gt = phantom
    predictor = GroundTruthPredictor(gt, spacing_mm=volume.spacing_mm, seed=0)
    k, key = key_from_box(predictor, gt, 1, middle(gt, 1))
    labels = np.zeros(gt.shape, np.uint8)
    locked = np.zeros(gt.shape, bool)
    locked[k - 6: k + 6, 40:50, :] = True  # a band across the liver, locked as background ...
    labels[k + 2, 5:8, 5:8] = 1  # ... and a few hand-painted liver voxels far from it
    locked[k + 2, 5:8, 5:8] = True
    before = labels.copy()
    propagate(predictor, labels, 1, {k: key}, locked=locked)
    np.testing.assert_array_equal(labels[locked], before[locked])
    assert (labels == 1).sum() > 0.8 * (gt == 1).sum() - locked.sum()


def test_keys_as_prompts_and_locked_voxels_as_indices(phantom):
    volume, gt = phantom
    predictor = GroundTruthPredictor(gt, spacing_mm=volume.spacing_mm, seed=0)
    k = middle(gt, 3)
    kidney = np.argwhere(gt == 3)
    # The user painted the front half of the kidney on three slices as background, by hand.
    painted = kidney[(kidney[:, 0] >= k + 2) & (kidney[:, 0] <= k + 4) & (kidney[:, 1] < np.median(kidney[:, 1]))]
    labels = np.zeros(gt.shape, np.uint8)
    result = propagate(predictor, labels, 3, {k: Prompts(box=box_of(gt[k] == 3))}, locked=painted)
    assert result.reports[0].status == "key" and result.reports[0].score is not None
    assert not labels[tuple(painted.T)].any()
    reachable = gt == 3
    reachable[tuple(painted.T)] = False
    assert dice3d(labels == 3, reachable) >= 0.85
    with pytest.raises(PropagationError, match="outside"):
        propagate(predictor, labels, 3, {k: gt[k] == 3}, locked=np.array([[99, 0, 0]]))


def test_objects_do_not_overwrite_each_other(phantom):
    volume, gt = phantom
    # Leaks everywhere, so liver and right kidney compete for voxels.
    predictor = GroundTruthPredictor(gt, spacing_mm=volume.spacing_mm, seed=0, leak=1.0, leak_px=3)
    objects = {}
    for organ in (1, 3):
        k, key = key_from_box(predictor, gt, organ, middle(gt, organ))
        objects[organ] = {k: key}
    alone = np.zeros(gt.shape, np.uint8)
    propagate(predictor, alone, 1, objects[1])
    together = np.zeros(gt.shape, np.uint8)
    result = propagate_objects(predictor, together, objects)
    assert set(result.results) == {1, 3} and not result.cancelled
    assert all(r.reports for r in result.results.values())
    (kidney_key, kidney_result), = objects[3].items()
    (liver_key, liver_result), = objects[1].items()
    lost = (alone == 1) & (together != 1)  # liver voxels the kidney took: only its own key slice's voxels
    assert not lost[np.arange(gt.shape[0]) != kidney_key].any()
    kidney_only = kidney_result.masks[0] & ~(liver_result.masks[0] if liver_key == kidney_key else False)
    assert (together[kidney_key][kidney_only] == 3).all()  # the liver's propagation did not take them
    contested = (together == 1) & (gt == 3)
    assert contested.sum() > 0  # the leak gave kidney voxels to the liver, and the kidney respected that
    over = np.zeros(gt.shape, np.uint8)
    result_over = propagate_objects(predictor, over, objects, overwrite=True)
    assert ((over == 3) & (together == 1)).sum() > 0  # with overwrite the kidney takes its voxels back
    # Key slices of each object survive the other one (where two keys overlap, the later object wins).
    assert (over[liver_key][liver_result.masks[0] & ~kidney_result.masks[0]] == 1).all()
    assert (over[kidney_key][kidney_result.masks[0]] == 3).all()
    result_over.undo.undo(over)
    assert not over.any()


def test_cancel_keeps_finished_slices_and_undo_restores(phantom):
    volume, gt = phantom
    predictor = GroundTruthPredictor(gt, spacing_mm=volume.spacing_mm, seed=0)
    k, key = key_from_box(predictor, gt, 1, middle(gt, 1))
    labels = np.zeros(gt.shape, np.uint8)
    labels[gt == 3] = 3  # another object already there
    labels[k + 5, :10, :10] = 1  # and earlier liver work
    before = labels.copy()
    stop = threading.Event()

    def progress(done, total, message):
        if done == 6:
            stop.set()

    result = propagate(predictor, labels, 1, {k: key}, cancel=stop, progress=progress)
    assert result.cancelled and "cancelled" in result.stop_reasons.values()
    visited = [r for r in result.reports if r.kind != "key"]
    assert len(visited) == 6  # checked between slices: the sixth slice finished, nothing after it
    changed = set(np.flatnonzero((labels != before).any(axis=(1, 2))))
    assert changed == set(result.written_slices) == {r.index for r in result.reports if r.written}
    assert (labels[gt == 3] == 3).all()
    result.undo.undo(labels)
    np.testing.assert_array_equal(labels, before)


def test_failed_run_leaves_labels_unchanged(phantom):
    volume, gt = phantom
    base = GroundTruthPredictor(gt, spacing_mm=volume.spacing_mm, seed=0)
    k = middle(gt, 1)

    def broken(index, prompts, result):
        if index == k + 4:
            raise RuntimeError("out of memory")
        return result

    labels = np.zeros(gt.shape, np.uint8)
    with pytest.raises(RuntimeError):
        propagate(Tampered(base, broken), labels, 1, {k: gt[k] == 1})
    assert not labels.any()


# ---------------------------------------------------------------------- gaps, post-processing
def test_a_dropout_slice_is_bridged_and_interpolated(phantom):
    volume, gt = phantom
    base = GroundTruthPredictor(gt, spacing_mm=volume.spacing_mm, seed=0, dropout=0.0)
    k = middle(gt, 2)

    def drop(index, prompts, result):
        return with_mask(result, np.zeros_like(result.masks[0]), 0.1) if index == k + 2 else result

    for fill in (True, False):
        labels = np.zeros(gt.shape, np.uint8)
        result = propagate(Tampered(base, drop), labels, 2, {k: gt[k] == 2}, fill_skipped=fill)
        statuses = [r.status for r in result.reports_for(k + 2)]
        assert statuses[0] == "skipped: empty"
        assert (labels[k + 3] == 2).any()  # the front went on past the dropout
        if fill:
            assert statuses[1] == "interpolated" and dice3d(labels[k + 2] == 2, gt[k + 2] == 2) > 0.8
        else:
            assert not (labels[k + 2] == 2).any()


def test_postprocess_removes_islands_and_fills_holes(phantom):
    volume, gt = phantom
    base = GroundTruthPredictor(gt, spacing_mm=volume.spacing_mm, seed=0, dropout=0.0, leak=0.0)
    k = middle(gt, 1)

    hole = {}

    def noisy(index, prompts, result):
        mask = result.masks[0].copy()
        if index == k + 2:
            mask[2:5, 2:5] = True  # an island far from the liver
        if index == k - 2:
            depth = ndimage.distance_transform_edt(mask)
            r, c = np.unravel_index(np.argmax(depth), mask.shape)
            hole["at"] = (slice(r - 1, r + 2), slice(c - 1, c + 2))
            mask[hole["at"]] = False  # a hole deep inside it
        return with_mask(result, mask)

    predictor = Tampered(base, noisy)
    plain = np.zeros(gt.shape, np.uint8)
    propagate(predictor, plain, 1, {k: gt[k] == 1})
    assert plain[k + 2, 3, 3] == 1
    cleaned = np.zeros(gt.shape, np.uint8)
    propagate(predictor, cleaned, 1, {k: gt[k] == 1}, postprocess=PostProcess(largest_component=True, fill_holes=True))
    assert cleaned[k + 2, 3, 3] == 0
    assert (plain[k - 2][hole["at"]] == 0).all() and (cleaned[k - 2][hole["at"]] == 1).all()
    removed = (plain == 1) & (cleaned != 1)
    assert removed[k + 2, 2:5, 2:5].all() and removed.sum() < 0.01 * (plain == 1).sum()  # islands only


def test_postprocess_functions():
    mask = np.zeros((5, 12, 12), bool)
    mask[1:4, 2:8, 2:8] = True
    mask[1:4, 4:6, 4:6] = False  # a tube: a hole in each slice
    mask[2, 10, 10] = True  # an island
    big = largest_component_3d(mask)
    assert not big[2, 10, 10] and big[1, 2, 2]
    filled = fill_holes_per_slice(big, axis=0)
    assert filled[1:4, 4:6, 4:6].all() and filled.sum() == big.sum() + 12
    side = fill_holes_per_slice(big, axis=1)  # along rows the tube's hole is open at both ends
    assert not side[2, 4, 4]


# ---------------------------------------------------------------------- prompts
def test_prompt_derivation():
    mask = np.zeros((60, 60), bool)
    mask[10:30, 10:30] = True
    mask[40:50, 40:50] = True
    assert parse_prompt_mode("Box + mask") == {"box", "mask"}
    with pytest.raises(ValueError):
        parse_prompt_mode("box+scribble")
    np.testing.assert_allclose(mask_box(mask, 2, 0.0), [8, 8, 51, 51])
    np.testing.assert_allclose(mask_box(mask, 0, 0.1), [6, 6, 53, 53])  # 10% of 40 rows
    inside = interior_points(mask, 3)
    assert len(inside) == 2 and all(mask[int(r), int(c)] for r, c in inside)  # one per blob, deep inside
    ring = ring_points(mask, 4, 5.0)
    assert len(ring) == 4 and not any(mask[int(r), int(c)] for r, c in ring)
    logits = np.zeros((256, 256), np.float32)
    p = prompts_from_mask(mask, logits, PromptSettings(mode="box+points+mask"))
    assert p.box is not None and p.mask_logits is not None and p.positive.sum() == 2 and (~p.positive).sum() == 4
    # Without logits the mask part falls back to box and points.
    p = prompts_from_mask(mask, None, PromptSettings(mode="mask"))
    assert p.mask_logits is None and p.box is not None and p.points is not None


# ---------------------------------------------------------------------- embeddings, axes, errors
@pytest.mark.parametrize("prefetch", [False, True])
def test_embeddings_only_for_reached_slices(phantom, prefetch):
    volume, gt = phantom
    predictor = GroundTruthPredictor(gt, spacing_mm=volume.spacing_mm, seed=0)
    k, key = key_from_box(predictor, gt, 2, middle(gt, 2))
    predictor.embed_calls.clear()
    predictor.predict_calls.clear()
    result = propagate(predictor, np.zeros(gt.shape, np.uint8), 2, {k: key}, prefetch=prefetch)
    reached = set(predictor.predict_calls)
    embedded = predictor.embed_calls
    assert len(embedded) == len(set(embedded))  # never twice
    assert reached <= set(embedded)
    extra = set(embedded) - reached
    if prefetch:
        assert len(extra) <= 2  # at most the one slice ahead of each of the two fronts
        assert all(min(abs(e - r) for r in reached) == 1 for e in extra)
    else:
        assert not extra
    assert set(result.embedded) == set(embedded)
    lo, hi = extent(gt == 2)
    assert lo - 4 <= min(reached) and max(reached) <= hi + 4  # the organ plus the misses that end a front


def test_propagation_along_axis_1(phantom):
    volume, gt = phantom
    predictor = GroundTruthPredictor(gt, axis=1, spacing_mm=volume.spacing_mm, seed=0)
    k, key = key_from_box(predictor, gt, 1, middle(gt, 1, axis=1))
    labels = np.zeros(gt.shape, np.uint8)
    result = propagate(predictor, labels, 1, {k: key})
    assert result.axis == 1
    assert dice3d(labels == 1, gt == 1) >= 0.85
    lo, hi = extent(labels == 1, axis=1)
    true_lo, true_hi = extent(gt == 1, axis=1)
    assert true_lo - 2 <= lo and hi <= true_hi + 2
    assert all(r.front in ("key", "up", "down") or r.kind == "interpolated" for r in result.reports)
    assert result.reports[0].area_mm2 == pytest.approx(result.reports[0].area_px * 4.0 * 3.6)
    result.undo.undo(labels)
    assert not labels.any()


def test_user_errors_raise_propagation_error(phantom):
    volume, gt = phantom
    predictor = GroundTruthPredictor(gt, spacing_mm=volume.spacing_mm, seed=0)
    labels = np.zeros(gt.shape, np.uint8)
    mask = gt[20] == 1
    with pytest.raises(PropagationError, match="No key slice"):
        propagate(predictor, labels, 1, {})
    with pytest.raises(PropagationError, match="empty"):
        propagate(predictor, labels, 1, {20: np.zeros_like(mask)})
    with pytest.raises(PropagationError, match="outside"):
        propagate(predictor, labels, 1, {99: mask})
    with pytest.raises(PropagationError, match="shape"):
        propagate(predictor, np.zeros((40, 96, 95), np.uint8), 1, {20: mask})
    with pytest.raises(PropagationError, match="does not fit"):
        propagate(predictor, labels, 300, {20: mask})
    with pytest.raises(PropagationError, match="integer"):
        propagate(predictor, labels.astype(float), 1, {20: mask})
    readonly = labels.copy()
    readonly.flags.writeable = False
    with pytest.raises(PropagationError, match="read-only"):
        propagate(predictor, readonly, 1, {20: mask})
    with pytest.raises(PropagationError, match="Locked voxels"):
        propagate(predictor, labels, 1, {20: mask}, locked=np.zeros((2, 2), bool))
    with pytest.raises(ValueError):
        propagate(predictor, labels, 1, {20: mask}, direction="sideways")
    with pytest.raises(ValueError):
        propagate(predictor, labels, 1, {20: mask}, prompt_mode="lasso")
    assert not labels.any()


# ---------------------------------------------------------------------- the real predictor
def test_real_slice_predictor_end_to_end():
    from test_predictor import tiny_model

    from napari_medsam.segment.predictor import SlicePredictor

    volume, gt, _ = make_ct_phantom(shape=(8, 48, 48), spacing_mm=(12.0, 7.0, 7.0), seed=0)
    predictor = SlicePredictor(tiny_model("sam"), volume, axis=0)
    labels = np.zeros(gt.shape, np.uint8)
    k = 4
    key = predictor.predict(k, Prompts(box=[10, 10, 30, 30]))
    keys = {k: key if key.masks[0].any() else (gt[k] == 1)}
    loose = StopRule(min_score=-1e9, min_overlap=0.0, min_area_ratio=0.0, max_area_ratio=1e9, max_empty_slices=99,
                     max_outside_fraction=1.0, max_centroid_shift=1e9, use_image=False)
    ticks = []
    result = propagate(predictor, labels, 5, keys, stop=loose, progress=lambda d, t, m: ticks.append(d))
    assert set(np.unique(labels)) <= {0, 5}
    assert set(result.written_slices) <= set(range(8))
    # With a rule that accepts everything, both fronts walk to the volume's edges: every slice reported.
    assert {r.index for r in result.reports} == set(range(8))
    assert result.stop_reasons == {"down": "edge of the volume", "up": "edge of the volume"}
    assert all(predictor.is_embedded(z) for z in range(8))
    assert ticks == list(range(1, 8))
    assert all(r.area_mm2 == pytest.approx(r.area_px * 49.0) for r in result.reports if r.area_px is not None)
