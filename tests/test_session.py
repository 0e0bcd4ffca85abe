"""The interactive-segmentation session engine: objects, prompts, predictions, hand edits, per-object undo.

Everything runs on small numpy label volumes with hand-made SliceMasks (no model, no napari);
the propagation tests drive the real propagation with the ground-truth predictor of
tests/gt_predictor.py on a small two-blob phantom.
"""

from __future__ import annotations

import numpy as np
import pytest

from gt_predictor import GroundTruthPredictor, key_from_box
from napari_medsam.errors import SessionError
from napari_medsam.segment.predictor import Prompts, SliceMasks
from napari_medsam.segment.propagation import propagate, propagate_objects
from napari_medsam.segment.session import SegmentationSession, SessionChange

SHAPE = (5, 16, 20)  # (slice, row, column): a different size on each axis


# ---------------------------------------------------------------------- helpers
def plane_shape(axis: int) -> tuple[int, int]:
    return tuple(s for a, s in enumerate(SHAPE) if a != axis)  # type: ignore[return-value]


def rect(shape: tuple[int, int], r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[r0:r1, c0:c1] = True
    return mask


def plane(axis: int, index: int) -> tuple:
    return tuple(index if a == axis else slice(None) for a in range(3))


def masks_of(*planes: np.ndarray, scores=None, axis: int = 0, index: int = 0) -> SliceMasks:
    """A prediction with the given candidate masks (best first) and distinct constant logits per candidate."""
    stack = np.stack([np.asarray(p, bool) for p in planes])
    k = len(stack)
    scores = np.array([0.9 - 0.1 * i for i in range(k)] if scores is None else scores, np.float32)
    logits = np.stack([np.full((256, 256), float(i + 1), np.float32) for i in range(k)])
    return SliceMasks(stack, scores, logits, index=index, axis=axis)


def expected_after(labels: np.ndarray, where: tuple, value: int) -> np.ndarray:
    out = labels.copy()
    out[where] = value
    return out


@pytest.fixture
def labels() -> np.ndarray:
    return np.zeros(SHAPE, np.uint8)


@pytest.fixture
def two(labels) -> SegmentationSession:
    """A session with objects 1 ("liver") and 2 ("spleen"), 1 active."""
    s = SegmentationSession(labels)
    s.add_object("liver")
    s.add_object("spleen", select=False)
    return s


@pytest.fixture
def changes(two) -> list[SessionChange]:
    seen: list[SessionChange] = []
    two.on_change(seen.append)
    return seen


# ---------------------------------------------------------------------- the label volume
@pytest.mark.parametrize("bad, words", [
    (np.zeros(SHAPE, np.float32), "integer type"),
    (np.zeros(SHAPE, bool), "integer type"),
    (np.zeros(SHAPE[1:], np.uint8), "3D label array"),
    ([[[0]]], "3D label array"),
])
def test_labels_must_be_a_3d_integer_array(bad, words):
    with pytest.raises(SessionError, match=words):
        SegmentationSession(bad)


def test_read_only_labels_are_refused():
    labels = np.zeros(SHAPE, np.uint8)
    labels.flags.writeable = False
    with pytest.raises(SessionError, match="read-only"):
        SegmentationSession(labels)


def test_negative_history_bound_is_refused(labels):
    with pytest.raises(SessionError, match="max_history_bytes"):
        SegmentationSession(labels, max_history_bytes=-1)


def test_session_edits_the_array_it_was_given(labels):
    s = SegmentationSession(labels)
    assert s.labels is labels and s.shape == SHAPE
    s.add_object()
    s.apply_prediction(1, 0, 0, masks_of(rect(SHAPE[1:], 0, 1, 0, 1)))
    assert labels[0, 0, 0] == 1 and np.count_nonzero(labels) == 1


# ---------------------------------------------------------------------- objects
def test_existing_labels_are_adopted_with_names_and_colours():
    labels = np.zeros(SHAPE, np.uint16)
    labels[1, 2:4, 2:4] = 3
    labels[2, 5:6, 5:9] = 7
    s = SegmentationSession(labels, names={3: "liver"}, colors={7: "#102030"})
    assert [o.value for o in s.objects] == [3, 7]
    assert s.object(3).name == "liver" and s.object(7).name == "object 7"
    assert s.object(7).color == (16, 32, 48)
    assert s.active == 3
    assert not s.locks and not s.can_undo(3)  # adopting is not an edit


def test_adopt_can_lock_the_existing_voxels():
    labels = np.zeros(SHAPE, np.uint8)
    labels[1, 2:4, 2:4] = 1
    labels[3, 0, 0:5] = 2
    s = SegmentationSession(labels, lock_existing=True)
    np.testing.assert_array_equal(s.locked_mask(), labels > 0)
    assert s.locks.count() == 9 and s.locks.slices() == [1, 3]
    # A prediction can no longer touch them, even with overwrite.
    s.apply_prediction(1, 0, 3, masks_of(np.zeros(SHAPE[1:], bool)))
    s.apply_prediction(1, 0, 3, masks_of(np.ones(SHAPE[1:], bool)), overwrite=True)
    assert np.count_nonzero(labels[3] == 2) == 5 and np.count_nonzero(labels[3] == 1) == 16 * 20 - 5
    s.apply_prediction(1, 0, 1, masks_of(np.zeros(SHAPE[1:], bool)))
    assert np.count_nonzero(labels[1] == 1) == 4  # its own locked voxels stay too


def test_adopt_later_finds_new_values(labels):
    s = SegmentationSession(labels)
    assert s.objects == [] and s.active is None
    labels[0, 0, 0] = 9
    seen = []
    s.on_change(seen.append)
    added = s.adopt(names={9: "kidney"})
    assert [o.value for o in added] == [9] and s.object(9).name == "kidney" and s.active == 9
    assert seen[-1].reason == "adopt" and seen[-1].objects and seen[-1].active
    assert s.adopt() == [] and len(seen) == 1  # nothing new: no notification


def test_add_object_values_names_colours_and_selection(labels):
    s = SegmentationSession(labels)
    a = s.add_object()
    assert (a.value, a.name) == (1, "object 1") and s.active == 1
    b = s.add_object("  spleen ", (10, 20, 30), select=False)
    assert (b.value, b.name, b.color) == (2, "spleen", (10, 20, 30)) and s.active == 1
    c = s.add_object("x", "#FF8000", value=9)
    assert c.value == 9 and c.color == (255, 128, 0) and s.active == 9
    assert s.add_object().value == 3  # the lowest free value
    assert [o.value for o in s.objects] == [1, 2, 9, 3]
    assert 9 in s and 4 not in s and "9" not in s
    assert s.add_object(color=(1.0, 0.5, 0.0, 1.0), value=4).color == (255, 128, 0)  # napari RGBA floats
    assert s.add_object(color=np.array([0, 0, 255])).color == (0, 0, 255)
    assert all(len(o.color) == 3 for o in s.objects)


@pytest.mark.parametrize("color", ["red", "#12345", "#gg0000", (1, 2), (256, 0, 0), (-1, 0, 0), (0.5, 0.2, 0.1), 5])
def test_bad_colours_are_refused(labels, color):
    s = SegmentationSession(labels)
    s.add_object()
    with pytest.raises(SessionError, match="[Cc]olour"):
        s.recolor(1, color)


def test_add_object_errors(labels):
    s = SegmentationSession(labels)
    s.add_object()
    with pytest.raises(SessionError, match="taken"):
        s.add_object(value=1)
    with pytest.raises(SessionError, match="taken or not an integer"):
        s.add_object(value=2.0)
    with pytest.raises(SessionError, match="does not fit labels of type uint8"):
        s.add_object(value=256)
    with pytest.raises(SessionError, match="does not fit"):
        s.add_object(value=0)


def test_rename_recolor_select_and_next_object(two, changes):
    assert two.rename(2, " big spleen ").name == "big spleen"
    assert two.object(2).name == "big spleen"
    assert changes[-1] == SessionChange("object", 2, objects=True)
    assert two.recolor(2, "#000010").color == (0, 0, 16)
    with pytest.raises(SessionError, match="empty"):
        two.rename(2, "   ")
    with pytest.raises(SessionError, match="no object 5"):
        two.rename(5, "x")
    with pytest.raises(SessionError, match="integer"):
        two.select("1")
    two.add_object(select=False)  # 3
    assert two.active == 1
    assert two.next_object().value == 2 and changes[-1] == SessionChange("select", 2, active=True)
    assert two.next_object().value == 3
    assert two.next_object().value == 1  # wraps
    assert two.next_object(-1).value == 3  # and backwards
    n = len(changes)
    two.select(3)
    assert len(changes) == n  # selecting the active object changes nothing
    assert SegmentationSession(np.zeros(SHAPE, np.uint8)).next_object() is None


def test_delete_and_undo_restores_the_object_its_voxels_prompts_and_locks(two, labels):
    two.add_object("third", select=False)  # 3
    m = rect(SHAPE[1:], 2, 6, 3, 8)
    two.select(2)
    two.set_box(2, 0, 1, (2, 3, 5, 7))
    two.apply_prediction(2, 0, 1, masks_of(m))
    labels[3, 0, 0:3] = 2
    two.record_manual_edit((np.array([3, 3, 3]), np.array([0, 0, 0]), np.array([0, 1, 2])), 0, 2)
    two.apply_prediction(1, 0, 1, masks_of(rect(SHAPE[1:], 0, 2, 0, 20)))
    before = labels.copy()
    assert two.locks.count() == 3
    two.delete_object(2)
    assert 2 not in two and [o.value for o in two.objects] == [1, 3]
    assert two.active == 3  # the next object in the table took its place
    assert not np.any(labels == 2) and two.locks.count() == 0
    np.testing.assert_array_equal(labels[labels == 1], before[before == 1])
    assert two.deleted_objects == [2] and two.can_undo(2)
    assert two.add_object(select=False).value == 4  # a restorable value is not reused
    with pytest.raises(SessionError, match="no object 2"):
        two.slice_prompts(2, 0, 1)
    step = two.undo(2)
    assert step is not None and step.kind == "delete"
    assert [o.value for o in two.objects] == [1, 2, 3, 4] and two.object(2).name == "spleen"
    assert two.active == 2
    np.testing.assert_array_equal(labels, before)
    assert two.locks.count() == 3
    assert two.slice_prompts(2, 0, 1).box == (2.0, 3.0, 5.0, 7.0)
    assert two.current_choice(2, 0, 1) == 0
    assert two.deleted_objects == []
    two.redo(2)
    assert 2 not in two and not np.any(labels == 2) and two.deleted_objects == [2]
    two.undo(2)
    np.testing.assert_array_equal(labels, before)


def test_reusing_a_deleted_value_forgets_the_deleted_object(two, labels):
    two.apply_prediction(2, 0, 0, masks_of(rect(SHAPE[1:], 0, 3, 0, 3)))
    two.delete_object(2)
    new = two.add_object("new", value=2)
    assert new.name == "new" and not two.can_undo(2) and two.deleted_objects == []
    assert not np.any(labels == 2)


def test_deleting_the_last_object_leaves_none_active(labels):
    s = SegmentationSession(labels)
    s.add_object()
    s.delete_object(1)
    assert s.active is None and s.objects == [] and s.undo() is None
    s.undo(1)
    assert s.active == 1


# ---------------------------------------------------------------------- predictions
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_prediction_writes_only_its_slice_and_clears_the_object_elsewhere_on_it(two, labels, axis):
    shape = plane_shape(axis)
    index = 2
    neighbour = plane(axis, index + 1)
    labels[neighbour] = 1  # the object on the next slice: must stay
    labels[plane(axis, index)][0:2, 0:2] = 1  # the object's old voxels on the slice, outside the new mask
    labels[plane(axis, 0)][3, 3] = 2  # another object elsewhere
    mask = rect(shape, 1, 4, 2, 7)
    expected = labels.copy()
    expected[plane(axis, index)] = np.where(mask, 1, 0)
    step = two.apply_prediction(1, axis, index, masks_of(mask, axis=axis, index=index))
    np.testing.assert_array_equal(labels, expected)
    assert step.kind == "prediction" and step.obj == 1
    assert step.slices(axis) == [index]
    # The same prediction through the session's candidate record
    assert two.current_choice(1, axis, index) == 0
    assert two.predicted_iou(1, axis, index) == pytest.approx(0.9)
    assert two.predicted_slices(1, axis) == [index]
    assert two.predicted_slices(1, (axis + 1) % 3) == []
    two.undo(1)
    expected[plane(axis, index)] = 0
    expected[plane(axis, index)][0:2, 0:2] = 1
    expected[neighbour] = 1
    np.testing.assert_array_equal(labels, expected)
    assert two.candidate(1, axis, index) is None


def test_prediction_keeps_other_objects_unless_overwrite(two, labels):
    labels[2, 0:4, 0:4] = 2
    mask = rect(SHAPE[1:], 2, 6, 2, 6)
    two.apply_prediction(1, 0, 2, masks_of(mask))
    expected = np.zeros(SHAPE[1:], np.uint8)
    expected[0:4, 0:4] = 2
    expected[mask & (expected == 0)] = 1
    np.testing.assert_array_equal(labels[2], expected)
    assert np.count_nonzero(labels[2] == 1) == 16 - 4
    two.apply_prediction(1, 0, 2, masks_of(mask), overwrite=True)
    expected[mask] = 1
    np.testing.assert_array_equal(labels[2], expected)
    assert np.count_nonzero(labels[2] == 2) == 12
    # The session's setting is the default.
    labels[2] = 0
    labels[2, 0:4, 0:4] = 2
    two.overwrite = True
    two.apply_prediction(1, 0, 2, masks_of(mask))
    np.testing.assert_array_equal(labels[2], expected)
    two.apply_prediction(1, 0, 2, masks_of(mask), overwrite=False)  # explicit False beats the setting
    np.testing.assert_array_equal(labels[2], expected)  # nothing to take back: 2's voxels were taken


def test_prediction_never_touches_hand_edited_voxels(two, labels):
    first = rect(SHAPE[1:], 4, 8, 4, 8)
    two.apply_prediction(1, 0, 2, masks_of(first))
    # Paint object 1 outside the mask, erase a voxel inside it, and paint object 2 somewhere.
    labels[2, 0, 0:3] = 1
    two.record_manual_edit((np.full(3, 2), np.zeros(3, int), np.arange(3)), 0, 1)
    labels[2, 5, 5] = 0
    two.record_manual_edit(np.array([[2, 5, 5]]), 1, 0, obj=1)
    labels[2, 10, 10:12] = 2
    two.record_manual_edit(np.array([[2, 10, 10], [2, 10, 11]]), [0, 0], 2)
    assert two.locks.count() == 6
    locked = two.locked_mask()
    assert locked[2, 0, 0:3].all() and locked[2, 5, 5] and locked[2, 10, 10:12].all() and locked.sum() == 6
    everything = np.ones(SHAPE[1:], bool)
    for overwrite in (False, True):
        two.apply_prediction(1, 0, 2, masks_of(everything), overwrite=overwrite)
        assert labels[2, 5, 5] == 0 and (labels[2, 10, 10:12] == 2).all() and (labels[2, 0, 0:3] == 1).all()
    assert np.count_nonzero(labels[2] == 1) == 16 * 20 - 3  # all but the erased and object 2's painted voxels
    nothing = np.zeros(SHAPE[1:], bool)
    two.apply_prediction(1, 0, 2, masks_of(nothing))
    assert np.count_nonzero(labels[2] == 1) == 3 and (labels[2, 0, 0:3] == 1).all()  # painted voxels survive
    two.apply_prediction(2, 0, 2, masks_of(nothing))
    assert (labels[2, 10, 10:12] == 2).all()


def test_candidates_cycle_wrapping_and_report_predicted_iou(two, labels):
    m0, m1, m2 = (rect(SHAPE[1:], 2, 8, 2, 8), rect(SHAPE[1:], 3, 7, 3, 7), rect(SHAPE[1:], 0, 12, 0, 12))
    prediction = masks_of(m0, m1, m2, scores=[0.95, 0.75, 0.5])
    two.apply_prediction(1, 0, 3, prediction)
    assert two.candidate(1, 0, 3).count == 3 and two.candidate(1, 0, 3).masks is prediction
    results = []
    for expected, mask in ((1, m1), (2, m2), (0, m0), (1, m1)):
        choice, iou = two.cycle_candidate(1, 0, 3)
        results.append((choice, round(iou, 2)))
        assert choice == expected == two.current_choice(1, 0, 3)
        np.testing.assert_array_equal(labels[3], np.where(mask, 1, 0))
        assert not labels[[0, 1, 2, 4]].any()
    assert results == [(1, 0.75), (2, 0.5), (0, 0.95), (1, 0.75)]
    assert two.predicted_iou(1, 0, 3) == pytest.approx(0.75)
    # Each cycle is an undo step.
    two.undo(1)
    assert two.current_choice(1, 0, 3) == 0
    np.testing.assert_array_equal(labels[3], np.where(m0, 1, 0))
    # apply_prediction can pick a candidate directly
    two.apply_prediction(1, 0, 3, prediction, choice=2)
    np.testing.assert_array_equal(labels[3], np.where(m2, 1, 0))
    assert two.predicted_iou(1, 0, 3) == pytest.approx(0.5)


def test_cycle_without_a_prediction_is_an_error(two):
    with pytest.raises(SessionError, match="no prediction on slice 3"):
        two.cycle_candidate(1, 0, 3)


def test_prediction_errors(two):
    good = rect(SHAPE[1:], 0, 2, 0, 2)
    with pytest.raises(SessionError, match="SliceMasks"):
        two.apply_prediction(1, 0, 1, good)
    with pytest.raises(SessionError, match=r"\(1, 16, 20\), but the slice is \(5, 20\)"):
        two.apply_prediction(1, 1, 1, masks_of(good))
    with pytest.raises(SessionError, match="Candidate 1 does not exist: the prediction has 1 mask"):
        two.apply_prediction(1, 0, 1, masks_of(good), choice=1)
    with pytest.raises(SessionError, match="Candidate True"):
        two.apply_prediction(1, 0, 1, masks_of(good), choice=True)
    with pytest.raises(SessionError, match="no object 7"):
        two.apply_prediction(7, 0, 1, masks_of(good))
    with pytest.raises(SessionError, match="axis must be 0, 1 or 2"):
        two.apply_prediction(1, 3, 1, masks_of(good))
    with pytest.raises(SessionError, match=r"Slice 5 is outside 0..4 along axis 0"):
        two.apply_prediction(1, 0, 5, masks_of(good))
    with pytest.raises(SessionError, match="2 masks but 1 scores"):
        two.apply_prediction(1, 0, 1, SliceMasks(np.stack([good, good]), np.ones(1), np.zeros((2, 256, 256))))
    with pytest.raises(SessionError, match="2 masks but 1 low-res logits"):
        two.apply_prediction(1, 0, 1, SliceMasks(np.stack([good, good]), np.ones(2), np.zeros((1, 256, 256))))
    assert not two.labels.any() and not two.can_undo(1)


# ---------------------------------------------------------------------- hand edits
def test_record_manual_edit_locks_voxels_and_undoes(two, labels):
    labels[1, 2:4, 2:4] = 2
    labels[1, 2, 2] = 0
    step = two.record_manual_edit(np.argwhere(labels > 0), 0, 2)
    assert step.obj == 2 and step.kind == "manual" and two.can_undo(2) and not two.can_undo(1)
    assert two.locks.count() == 3
    labels[1, 2, 2] = 1
    two.record_manual_edit(np.array([[1, 2, 2]]), 0, 1)
    assert two.locks.count() == 4
    two.undo(2)
    expected = np.zeros(SHAPE, np.uint8)
    expected[1, 2, 2] = 1
    np.testing.assert_array_equal(labels, expected)
    np.testing.assert_array_equal(two.locked_mask(), expected > 0)
    two.redo(2)
    expected[1, 2:4, 2:4] = 2
    expected[1, 2, 2] = 1
    np.testing.assert_array_equal(labels, expected)
    assert two.locks.count() == 4


def test_record_manual_edit_errors(two, labels):
    with pytest.raises(SessionError, match="do not hold the new values"):
        two.record_manual_edit(np.array([[0, 0, 0]]), 0, 1)
    with pytest.raises(SessionError, match="outside the label volume"):
        two.record_manual_edit(np.array([[5, 0, 0]]), 0, 0)
    with pytest.raises(SessionError, match=r"\(N, 3\)"):
        two.record_manual_edit(np.array([[0, 0]]), 0, 0)
    with pytest.raises(SessionError, match="2 old values for 1"):
        two.record_manual_edit(np.array([[0, 0, 0]]), [0, 0], 0)
    assert two.record_manual_edit(np.zeros((0, 3), int), [], 1) is None
    assert not two.locks


def test_record_paint_reads_napari_atoms(two, labels):
    # A data_setitem atom: (indices tuple, old values, new value) ...
    labels[2, 3, 4:6] = 2
    idx = (np.array([2, 2]), np.array([3, 3]), np.array([4, 5]))
    # ... and a masked atom: (slice_key, mask, old values under the mask, new value), painted after it.
    key = (slice(2, 3), slice(3, 5), slice(5, 8))
    mask = np.zeros((1, 2, 3), bool)
    mask[0, 0, :] = True
    mask[0, 1, 1] = True
    old_box = labels[key].copy()
    old = old_box[mask]  # [2, 0, 0, 0]: the first voxel was painted by the first atom
    labels[key][mask] = 2
    step = two.record_paint([(idx, np.array([0, 0], np.uint8), np.uint8(2)), (key, mask, old, 2)])
    assert step.obj == 2 and two.active == 1
    expected = np.zeros(SHAPE, np.uint8)
    expected[2, 3, 4:8] = 2
    expected[2, 4, 6] = 2
    np.testing.assert_array_equal(labels, expected)  # recording does not edit the labels
    np.testing.assert_array_equal(two.locked_mask(), expected > 0)
    two.undo(2)
    assert not labels.any() and not two.locks  # the first old value of a voxel painted twice wins
    two.redo(2)
    np.testing.assert_array_equal(labels, expected)


def test_record_paint_masked_atom_without_mask_is_a_full_box(two, labels):
    labels[1, 0:2, 0:2] = 1
    labels[1, 1, 1] = 2
    key = (slice(1, 2), slice(0, 2), slice(0, 3))
    snapshot = labels[key].copy()
    labels[key] = 0  # the eraser over the whole box
    two.select(2)
    step = two.record_paint([(key, None, snapshot, 0)])
    assert step.obj == 2  # erasing: the active object's step
    assert two.locks.count() == 6 and not labels.any()
    two.undo()
    assert np.count_nonzero(labels == 1) == 3 and labels[1, 1, 1] == 2 and not two.locks


def test_painting_a_new_value_adds_the_object(labels):
    s = SegmentationSession(labels)
    seen = []
    s.on_change(seen.append)
    labels[0, 0, 0] = 5
    step = s.record_paint([((np.array([0]), np.array([0]), np.array([0])), np.array([0]), 5)])
    assert 5 in s and step.obj == 5 and s.active == 5
    assert [c.reason for c in seen] == ["adopt", "manual"] and seen[0].objects and seen[0].active
    with pytest.raises(SessionError, match="Unrecognised paint atom of length 2"):
        s.record_paint([(1, 2)])
    with pytest.raises(SessionError, match="0..255"):
        s.record_paint([((np.array([0]), np.array([0]), np.array([1])), np.array([0]), 300)])


def test_unlock_slice_lets_the_model_write_again(two, labels):
    labels[2, 0, 0:2] = 1
    two.record_manual_edit(np.array([[2, 0, 0], [2, 0, 1]]), 0, 1)
    labels[2, 1, 0] = 2
    two.record_manual_edit(np.array([[2, 1, 0]]), 0, 2)
    labels[3, 0, 0] = 1
    two.record_manual_edit(np.array([[3, 0, 0]]), 0, 1)
    two.unlock_slice(0, 2, obj=1)
    assert two.locks.count() == 2 and two.locked_mask()[2, 1, 0] and two.locked_mask()[3, 0, 0]
    two.apply_prediction(1, 0, 2, masks_of(np.zeros(SHAPE[1:], bool)))
    assert not np.any(labels[2] == 1) and labels[2, 1, 0] == 2
    two.undo(1)  # the prediction
    two.undo(1)  # the unlock
    assert two.locks.count() == 4
    two.unlock_slice(0, 2)  # all locks of the slice
    assert two.locks.slices() == [3]


def test_record_paint_writes_an_edit_the_labels_do_not_hold_yet(two, labels):
    # napari emits ``paint`` before writing a single edit made outside a stroke (data_setitem, fill).
    idx = (np.array([1, 1, 1]), np.array([2, 2, 3]), np.array([4, 5, 4]))
    step = two.record_paint([(idx, np.zeros(3, np.uint8), np.uint8(2))])
    assert step.obj == 2
    expected = np.zeros(SHAPE, np.uint8)
    expected[idx] = 2
    np.testing.assert_array_equal(labels, expected)
    labels[idx] = 2  # napari writes them now: nothing changes
    two.undo(2)
    assert not labels.any() and not two.locks


def test_paint_events_of_a_real_napari_labels_layer(labels):
    from napari.layers import Labels  # napari is a test dependency; imported here, where it is used

    layer = Labels(labels)
    assert layer.data is labels
    s = SegmentationSession(labels)
    s.add_object()
    s.add_object(select=False)
    layer.events.paint.connect(lambda event: s.record_paint(event.value))
    layer.brush_size = 3
    layer.paint((2, 5, 5), 2)  # emitted before napari writes the labels
    assert np.count_nonzero(labels == 2) == 9 and s.locks.count() == 9
    layer.fill((2, 0, 0), 1)  # the rest of slice 2 (4-connected to the corner)
    assert np.count_nonzero(labels[2] == 1) == 16 * 20 - 9 and s.locks.count() == 16 * 20
    with layer.block_history():  # a stroke: one event after the writes, with both atoms
        layer.paint((4, 5, 5), 2)
        layer.paint((4, 10, 10), 2)
    assert np.count_nonzero(labels[4] == 2) == 18 and len(s.history.undo_steps(2)) == 2
    layer.data_setitem((np.array([3, 3]), np.array([1, 2]), np.array([1, 1])), 1)
    assert labels[3, 1, 1] == labels[3, 2, 1] == 1 and s.locks.count() == 16 * 20 + 18 + 2
    s.undo(1)
    assert not labels[3].any() and s.locks.count() == 16 * 20 + 18
    s.undo(2)
    assert not labels[4].any()
    s.undo(1)
    assert np.count_nonzero(labels) == np.count_nonzero(labels[2] == 2) == 9 and s.locks.count() == 9
    s.undo(2)
    assert not labels.any() and not s.locks
    s.redo(2)
    s.redo(1)
    assert np.count_nonzero(labels[2] == 1) == 16 * 20 - 9 and s.locks.count() == 16 * 20
    # The model writes around hand paint: a prediction of object 1 cannot take object 2's brush mark.
    s.apply_prediction(1, 0, 2, masks_of(np.ones(SHAPE[1:], bool)), overwrite=True)
    assert np.count_nonzero(labels[2] == 2) == 9


def test_undoing_an_unlock_does_not_lock_a_voxel_another_object_took(two, labels):
    labels[2, 0, 0] = 1
    two.record_manual_edit(np.array([[2, 0, 0]]), 0, 1)
    two.unlock_slice(0, 2, obj=1)
    two.apply_prediction(2, 0, 2, masks_of(rect(SHAPE[1:], 0, 1, 0, 1)), overwrite=True)
    assert labels[2, 0, 0] == 2 and not two.locks
    two.undo(1)  # the unlock: the voxel is object 2's model output now, it stays free
    assert labels[2, 0, 0] == 2 and not two.locks
    two.undo(2)  # object 2 gives it back ...
    assert labels[2, 0, 0] == 1
    two.redo(1)
    two.undo(1)  # ... and then the unlock can be undone for real
    assert two.locked_mask()[2, 0, 0] and two.locks.count() == 1


# ---------------------------------------------------------------------- undo / redo
def test_undo_is_per_object_multi_level_and_redo_is_cleared_by_a_new_edit(two, labels):
    a, b, c = (rect(SHAPE[1:], 0, 4, 0, 4), rect(SHAPE[1:], 2, 6, 2, 6), rect(SHAPE[1:], 8, 10, 8, 10))
    two.apply_prediction(1, 0, 1, masks_of(a))
    two.apply_prediction(2, 0, 3, masks_of(c))
    two.apply_prediction(1, 0, 1, masks_of(b))
    two.apply_prediction(1, 0, 4, masks_of(a))
    after_all = labels.copy()
    assert len(two.history.undo_steps(1)) == 3 and len(two.history.undo_steps(2)) == 1
    two.undo(2)
    assert not np.any(labels == 2)
    np.testing.assert_array_equal(labels == 1, after_all == 1)  # object 1 untouched
    assert two.can_redo(2) and not two.can_undo(2) and two.undo(2) is None
    assert two.undo().obj == 1  # the active object by default
    assert not labels[4].any()
    two.undo(1)
    np.testing.assert_array_equal(labels[1], np.where(a, 1, 0))
    two.undo(1)
    assert not labels.any() and not two.can_undo(1) and two.undo(1) is None
    two.redo(1)
    two.redo(1)
    np.testing.assert_array_equal(labels[1], np.where(b, 1, 0))
    assert two.can_redo(1)
    two.apply_prediction(1, 0, 0, masks_of(c))  # a new edit drops the redo of object 1 ...
    assert not two.can_redo(1) and two.redo(1) is None
    assert two.can_redo(2)  # ... but not object 2's
    two.redo(2)
    expected = np.zeros(SHAPE, np.uint8)
    expected[0][c] = 1
    expected[1][b] = 1
    expected[3][c] = 2
    np.testing.assert_array_equal(labels, expected)


def test_undo_keeps_what_another_object_did_later(two, labels):
    m1, m2 = rect(SHAPE[1:], 0, 6, 0, 6), rect(SHAPE[1:], 3, 9, 3, 9)
    two.apply_prediction(1, 0, 2, masks_of(m1))
    two.apply_prediction(2, 0, 2, masks_of(m2), overwrite=True)
    two.undo(1)  # object 1's voxels go, except those object 2 has taken since
    np.testing.assert_array_equal(labels[2], np.where(m2, 2, 0))
    two.redo(1)
    expected = np.where(m2, 2, np.where(m1, 1, 0))
    np.testing.assert_array_equal(labels[2], expected)
    two.undo(2)  # object 2 gives back the voxels it took
    np.testing.assert_array_equal(labels[2], np.where(m1, 1, 0))


def test_group_makes_a_prompt_change_and_its_prediction_one_step(two, labels, changes):
    m = rect(SHAPE[1:], 1, 5, 1, 5)
    with two.group():
        two.set_prompts(1, 0, 2, [(3, 3)], [True], (1, 1, 4, 4))
        two.apply_prediction(1, 0, 2, masks_of(m))
        assert two.can_undo(1)
    assert len(two.history.undo_steps(1)) == 1
    assert [c.reason for c in changes] == ["prompts", "prediction", "group"]
    assert changes[-1].history and changes[-1].obj is None
    with two.group():
        two.add_point(1, 0, 2, 4, 4, positive=False)
        two.apply_prediction(1, 0, 2, masks_of(rect(SHAPE[1:], 1, 3, 1, 3)))
        with two.group():  # nested groups join the outer one
            two.apply_prediction(2, 0, 4, masks_of(m))
    assert len(two.history.undo_steps(1)) == 2 and len(two.history.undo_steps(2)) == 1
    two.undo(1)
    np.testing.assert_array_equal(labels[2], np.where(m, 1, 0))
    assert two.slice_prompts(1, 0, 2).points == ((3.0, 3.0, True),)
    step = two.undo(1)
    assert step.kind == "prompts" and set(step.prompt_keys) == {(0, 2)}
    assert not np.any(labels == 1)
    assert two.slice_prompts(1, 0, 2).empty and two.candidate(1, 0, 2) is None
    assert np.count_nonzero(labels == 2) == m.sum()


def test_a_value_deleted_inside_a_group_is_not_reused(two):
    with two.group():
        two.delete_object(2)
        assert two.deleted_objects == [2] and two.can_undo(2)
        assert two.add_object(select=False).value == 3
        again = two.add_object("again", value=2)  # explicit reuse: the pending delete is forgotten
    assert again.name == "again" and not two.can_undo(2) and two.deleted_objects == []
    assert [o.value for o in two.objects] == [1, 3, 2]


def test_undo_inside_a_group_closes_the_pending_step(two, labels):
    m = rect(SHAPE[1:], 0, 3, 0, 3)
    with two.group():
        two.apply_prediction(1, 0, 0, masks_of(m))
        two.undo(1)
        assert not labels.any() and two.can_redo(1)
        two.apply_prediction(1, 0, 1, masks_of(m))
    assert len(two.history.undo_steps(1)) == 1 and not two.can_redo(1)
    np.testing.assert_array_equal(labels[1], np.where(m, 1, 0))


def test_a_failing_call_inside_a_group_keeps_what_was_done(two, labels):
    with pytest.raises(SessionError):
        with two.group():
            two.add_point(1, 0, 0, 1, 1)
            two.apply_prediction(1, 0, 0, masks_of(rect(SHAPE[1:], 0, 2, 0, 2)))
            two.apply_prediction(1, 0, 9, masks_of(rect(SHAPE[1:], 0, 2, 0, 2)))
    assert len(two.history.undo_steps(1)) == 1 and np.count_nonzero(labels) == 4
    two.undo(1)
    assert not labels.any() and two.slice_prompts(1, 0, 0).empty


def test_clear_slice_keeps_hand_paint_unless_manual(two, labels):
    m = rect(SHAPE[1:], 2, 6, 2, 6)
    two.add_point(1, 0, 2, 3, 3)
    two.apply_prediction(1, 0, 2, masks_of(m))
    two.apply_prediction(1, 0, 3, masks_of(m))
    labels[2, 10, 0:4] = 1
    two.record_manual_edit(np.array([[2, 10, c] for c in range(4)]), 0, 1)
    labels[2, 12, 0] = 2
    two.record_manual_edit(np.array([[2, 12, 0]]), 0, 2)
    before = labels.copy()
    two.clear_slice(1, 0, 2)
    expected = before.copy()
    expected[2][m] = 0
    np.testing.assert_array_equal(labels, expected)
    assert two.slice_prompts(1, 0, 2).empty and two.candidate(1, 0, 2) is None
    assert two.candidate(1, 0, 3) is not None and two.locks.count() == 5
    two.clear_slice(1, 0, 2, manual=True)
    expected[2, 10, 0:4] = 0
    np.testing.assert_array_equal(labels, expected)
    assert two.locks.count() == 1 and two.locked_mask()[2, 12, 0]
    two.undo(1)
    two.undo(1)
    np.testing.assert_array_equal(labels, before)
    assert two.locks.count() == 5 and two.slice_prompts(1, 0, 2).points == ((3.0, 3.0, True),)


@pytest.mark.parametrize("axis", [1, 2])
def test_clear_slice_on_other_axes(two, labels, axis):
    labels[:] = 1
    before = labels.copy()
    two.clear_slice(1, axis, 3)
    expected = before.copy()
    expected[plane(axis, 3)] = 0
    np.testing.assert_array_equal(labels, expected)


def test_clear_object_with_and_without_manual(two, labels):
    m = rect(SHAPE[1:], 2, 6, 2, 6)
    for z in (0, 2, 4):
        two.apply_prediction(1, 0, z, masks_of(m))
    two.apply_prediction(2, 0, 1, masks_of(m))
    labels[3, 0, 0:2] = 1
    two.record_manual_edit(np.array([[3, 0, 0], [3, 0, 1]]), 0, 1)
    before = labels.copy()
    two.clear_object(1, manual=False)
    expected = np.zeros(SHAPE, np.uint8)
    expected[1][m] = 2
    expected[3, 0, 0:2] = 1
    np.testing.assert_array_equal(labels, expected)
    assert two.predicted_slices(1, 0) == [] and two.locks.count() == 2
    two.clear_object(1)
    expected[3, 0, 0:2] = 0
    np.testing.assert_array_equal(labels, expected)
    assert not two.locks and 1 in two
    two.undo(1)
    two.undo(1)
    np.testing.assert_array_equal(labels, before)
    assert two.predicted_slices(1, 0) == [0, 2, 4] and two.locks.count() == 2


# ---------------------------------------------------------------------- prompts
def test_prompts_belong_to_one_object_axis_and_slice(two):
    assert two.add_point(1, 0, 2, 3, 4) == 0
    assert two.add_point(1, 0, 2, 5.5, 6.25, positive=False) == 1
    two.add_point(2, 0, 2, 1, 1)
    two.add_point(1, 1, 2, 1, 1)
    assert two.slice_prompts(1, 0, 2).points == ((3.0, 4.0, True), (5.5, 6.25, False))
    assert two.slice_prompts(1, 0, 3).empty and two.slice_prompts(1, 2, 2).empty
    assert two.slice_prompts(2, 0, 2).points == ((1.0, 1.0, True),)
    assert two.prompted_slices(1, 0) == [2] and two.prompted_slices(1, 1) == [2] and two.prompted_slices(1, 2) == []
    two.move_point(1, 0, 2, 1, 7, 8)
    assert two.slice_prompts(1, 0, 2).points[1] == (7.0, 8.0, False)  # the sign stays
    two.remove_point(1, 0, 2, -1)
    assert two.slice_prompts(1, 0, 2).points == ((3.0, 4.0, True),)
    two.set_box(1, 0, 2, (9, 10, 1, 2))  # corners in any order
    assert two.slice_prompts(1, 0, 2).box == (1.0, 2.0, 9.0, 10.0)
    two.set_box(1, 0, 2, np.array([0, 0, 3, 3]))  # replaces
    assert two.slice_prompts(1, 0, 2).box == (0.0, 0.0, 3.0, 3.0)
    two.clear_box(1, 0, 2)
    assert two.slice_prompts(1, 0, 2).box is None and len(two.slice_prompts(1, 0, 2).points) == 1
    two.set_prompts(1, 0, 2, [[1, 2], [3, 4]], [True, False], [4, 4, 0, 0])
    record = two.slice_prompts(1, 0, 2)
    assert record.points == ((1.0, 2.0, True), (3.0, 4.0, False)) and record.box == (0.0, 0.0, 4.0, 4.0)
    two.set_prompts(1, 0, 2, [[1, 2]])  # signs default to positive, no box
    assert two.slice_prompts(1, 0, 2).points == ((1.0, 2.0, True),) and two.slice_prompts(1, 0, 2).box is None
    two.clear_prompts(1, 0, 2)
    assert two.slice_prompts(1, 0, 2).empty and two.prompted_slices(1, 0) == []
    # Every change is an undo step of its object.
    two.undo(1)
    assert two.slice_prompts(1, 0, 2).points == ((1.0, 2.0, True),)
    two.undo(1)
    assert two.slice_prompts(1, 0, 2).points == ((1.0, 2.0, True), (3.0, 4.0, False))
    assert two.slice_prompts(2, 0, 2).points == ((1.0, 1.0, True),)


def test_unchanged_prompts_make_no_step(two, changes):
    two.clear_prompts(1, 0, 0)
    two.set_prompts(1, 0, 0, None)
    assert not two.can_undo(1) and changes == []


def test_prompts_for_builds_predictor_prompts_with_refine_logits(two):
    assert two.prompts_for(1, 0, 2) is None
    two.set_prompts(1, 0, 2, [[3, 4], [5, 6]], [True, False], (1, 1, 8, 9))
    p = two.prompts_for(1, 0, 2)
    assert isinstance(p, Prompts)
    np.testing.assert_array_equal(p.points, [[3, 4], [5, 6]])
    np.testing.assert_array_equal(p.positive, [True, False])
    np.testing.assert_array_equal(p.box, [1, 1, 8, 9])
    assert p.mask_logits is None
    assert two.prompts_for(1, 0, 2, refine=True).mask_logits is None  # nothing predicted yet
    two.apply_prediction(1, 0, 2, masks_of(rect(SHAPE[1:], 0, 2, 0, 2), rect(SHAPE[1:], 0, 3, 0, 3)))
    two.cycle_candidate(1, 0, 2)
    refined = two.prompts_for(1, 0, 2, refine=True)
    assert refined.mask_logits.shape == (256, 256) and np.all(refined.mask_logits == 2.0)  # the applied candidate's
    two.set_box(1, 1, 0, (0, 0, 2, 2))
    p = two.prompts_for(1, 1, 0)
    assert p.points is None and p.positive is None
    np.testing.assert_array_equal(p.box, [0, 0, 2, 2])


@pytest.mark.parametrize("call, words", [
    (lambda s: s.add_point(1, 3, 0, 1, 1), "axis must be 0, 1 or 2, got 3"),
    (lambda s: s.add_point(1, -1, 0, 1, 1), "axis must be 0, 1 or 2"),
    (lambda s: s.add_point(1, True, 0, 1, 1), "axis must be 0, 1 or 2"),
    (lambda s: s.add_point(1, "0", 0, 1, 1), "axis must be 0, 1 or 2"),
    (lambda s: s.add_point(1, 0, 5, 1, 1), r"Slice 5 is outside 0..4 along axis 0"),
    (lambda s: s.add_point(1, 1, 16, 1, 1), r"Slice 16 is outside 0..15 along axis 1"),
    (lambda s: s.add_point(1, 0, 1.0, 1, 1), "Slice 1.0 is outside"),
    (lambda s: s.add_point(1, 0, 0, 16, 1), r"Point \(16, 1\) lies outside the 16x20 slice"),
    (lambda s: s.add_point(1, 2, 0, 1, 16), r"lies outside the 5x16 slice"),
    (lambda s: s.add_point(1, 0, 0, -1, 1), "lies outside"),
    (lambda s: s.add_point(1, 0, 0, float("nan"), 1), "lies outside"),
    (lambda s: s.add_point(1, 0, 0, "a", 1), "numeric"),
    (lambda s: s.add_point(9, 0, 0, 1, 1), "no object 9"),
    (lambda s: s.move_point(1, 0, 0, 0, 1, 1), "Point 0 does not exist: slice 0 \\(axis 0\\) has 0 point"),
    (lambda s: s.move_point(1, 4, 0, 0, 1, 1), "axis must be 0, 1 or 2"),
    (lambda s: s.remove_point(1, 0, 0, 0), "Point 0 does not exist"),
    (lambda s: s.set_box(1, 0, 0, (1, 2, 3)), "A box is \\(row0, col0, row1, col1\\)"),
    (lambda s: s.set_box(1, 0, 0, "abcd"), "A box is"),
    (lambda s: s.set_box(1, 0, 0, (0, 0, 30, 3)), "lies outside"),
    (lambda s: s.set_box(1, 5, 0, (0, 0, 3, 3)), "axis must be 0, 1 or 2"),
    (lambda s: s.set_prompts(1, 0, 0, [[1, 1]], [True, False]), "1 points but 2 positive/negative flags"),
    (lambda s: s.set_prompts(1, 0, 0, [1, 2, 3]), "points"),
    (lambda s: s.set_prompts(1, 0, 0, [["a", "b"]]), "points"),
    (lambda s: s.set_prompts(1, 9, 0, [[1, 1]]), "axis must be 0, 1 or 2"),
    (lambda s: s.prompted_slices(1, 3), "axis must be 0, 1 or 2"),
    (lambda s: s.prompted_slices(1, "x"), "axis must be 0, 1 or 2"),
    (lambda s: s.predicted_slices(1, 3), "axis must be 0, 1 or 2"),
    (lambda s: s.prompts_for(1, 0, 7), "Slice 7 is outside"),
    (lambda s: s.clear_slice(1, 0, -1), "Slice -1 is outside"),
    (lambda s: s.unlock_slice(0, 5), "Slice 5 is outside"),
    (lambda s: s.undo("one"), "no object|integer"),
    (lambda s: s.can_undo(12), "no object 12"),
])
def test_bad_requests_raise_session_errors(two, call, words):
    with pytest.raises(SessionError, match=words):
        call(two)
    assert not two.can_undo(1) and not two.labels.any()


def test_points_on_the_slice_edge_are_accepted(two):
    two.add_point(1, 0, 0, -0.5, 19.5)
    two.add_point(1, 1, 15, 4.4, 0)
    assert two.slice_prompts(1, 0, 0).points == ((-0.5, 19.5, True),)


# ---------------------------------------------------------------------- notifications
def test_notifications_carry_regions_prompts_and_flags(two, changes, labels):
    m = rect(SHAPE[1:], 1, 4, 2, 7)
    two.add_point(1, 0, 2, 2, 3)
    assert changes[-1] == SessionChange("prompts", 1, (), ((1, 0, 2),), history=True)
    two.apply_prediction(1, 0, 2, masks_of(m))
    c = changes[-1]
    assert (c.reason, c.obj, c.prompts) == ("prediction", 1, ((1, 0, 2),))
    assert c.history and not c.objects and not c.active
    assert c.regions == ((slice(2, 3), slice(1, 4), slice(2, 7)),)
    assert c.slices() == [2] and c.slices(2) == [2, 3, 4, 5, 6]
    two.apply_prediction(1, 1, 5, masks_of(rect((5, 20), 0, 5, 0, 1)))
    assert changes[-1].regions == ((slice(0, 5), slice(5, 6), slice(0, 1)),)
    assert changes[-1].slices() == [0, 1, 2, 3, 4] and changes[-1].slices(1) == [5]
    assert changes[-1].prompts == ((1, 1, 5),)
    # On row 3 (axis 1), the object's voxels drawn on axial slice 2 lie outside the new mask: they go.
    two.apply_prediction(1, 1, 3, masks_of(rect((5, 20), 0, 5, 0, 1)))
    assert changes[-1].regions == ((slice(0, 5), slice(3, 4), slice(0, 7)),)
    assert np.count_nonzero(labels[2] == 1) == 15 - 5 + 2 and labels[2, 3, 0] == 1 and not labels[2, 3, 2:7].any()
    labels[4, 7, 8] = 2
    two.record_manual_edit(np.array([[4, 7, 8]]), 0, 2)
    assert changes[-1] == SessionChange("manual", 2, ((slice(4, 5), slice(7, 8), slice(8, 9)),), history=True)
    two.undo(2)
    assert changes[-1] == SessionChange("undo", 2, ((slice(4, 5), slice(7, 8), slice(8, 9)),), history=True)
    two.redo(2)
    assert changes[-1].reason == "redo"
    two.select(2)
    assert changes[-1] == SessionChange("select", 2, active=True)
    two.add_object(select=False)
    assert changes[-1] == SessionChange("add_object", 3, objects=True)
    two.delete_object(2)
    c = changes[-1]
    assert (c.reason, c.obj, c.objects, c.active, c.history) == ("delete", 2, True, True, True)
    assert c.regions == ((slice(4, 5), slice(7, 8), slice(8, 9)),)
    two.undo(2)
    assert changes[-1].reason == "undo" and changes[-1].objects and changes[-1].active
    n = len(changes)
    assert two.undo(3) is None and len(changes) == n  # nothing to undo: no notification


def test_unsubscribe(two):
    seen = []
    stop = two.on_change(seen.append)
    two.add_point(1, 0, 0, 1, 1)
    stop()
    stop()  # twice is harmless
    two.add_point(1, 0, 0, 2, 2)
    assert len(seen) == 1


# ---------------------------------------------------------------------- the history's memory bound
def test_history_is_bounded_in_bytes(labels):
    one = masks_of(rect(SHAPE[1:], 0, 2, 0, 2)).low_res_logits.nbytes  # 256 KiB per prediction
    s = SegmentationSession(labels, max_history_bytes=int(2.5 * one))
    s.add_object()
    s.add_object(select=False)
    s.apply_prediction(2, 0, 0, masks_of(rect(SHAPE[1:], 5, 9, 5, 9)))
    for z in range(5):
        s.apply_prediction(1, 0, z, masks_of(rect(SHAPE[1:], 0, 2 + z, 0, 3)))
        assert s.history_bytes <= s.history.max_bytes
    assert s.history.dropped == 4
    assert not s.can_undo(2) and np.count_nonzero(labels == 2) == 16  # its step is gone, its voxels stay
    assert len(s.history.undo_steps(1)) == 2
    assert s.undo(1) is not None and s.undo(1) is not None
    assert not s.can_undo(1) and s.undo(1) is None
    expected = np.zeros(SHAPE, np.uint8)
    expected[0, 5:9, 5:9] = 2
    for z in range(3):
        expected[z, 0:2 + z, 0:3] = 1
    np.testing.assert_array_equal(labels, expected)
    s.redo(1)
    s.redo(1)
    for z in (3, 4):
        expected[z, 0:2 + z, 0:3] = 1
    np.testing.assert_array_equal(labels, expected)


def test_the_newest_step_survives_a_zero_bound(labels):
    s = SegmentationSession(labels, max_history_bytes=0)
    s.add_object()
    for z in range(3):
        s.apply_prediction(1, 0, z, masks_of(rect(SHAPE[1:], 0, 2, 0, 2)))
        assert s.can_undo(1) and len(s.history.undo_steps(1)) == 1
    s.undo(1)
    assert not s.can_undo(1) and labels[:2].sum() == 8 and not labels[2].any()


def test_shared_predictions_are_counted_once(two):
    prediction = masks_of(rect(SHAPE[1:], 0, 2, 0, 2), rect(SHAPE[1:], 0, 3, 0, 3), rect(SHAPE[1:], 0, 4, 0, 4))
    two.apply_prediction(1, 0, 0, prediction)
    size = two.history_bytes
    for _ in range(5):
        two.cycle_candidate(1, 0, 0)
    assert two.history_bytes < size + 5 * 2000  # the cycles share one prediction's logits
    assert prediction.low_res_logits.nbytes < size


# ---------------------------------------------------------------------- propagation runs as undo steps
PSHAPE = (12, 32, 36)


@pytest.fixture(scope="module")
def blobs() -> np.ndarray:
    """Two ellipsoids (1 and 2) side by side over the same slices, 0 at both ends."""
    z, r, c = np.ogrid[:PSHAPE[0], :PSHAPE[1], :PSHAPE[2]]
    gt = np.zeros(PSHAPE, np.uint8)
    gt[((z - 6) / 4.5) ** 2 + ((r - 15) / 9) ** 2 + ((c - 10) / 7) ** 2 <= 1] = 1
    gt[((z - 5) / 3.5) ** 2 + ((r - 16) / 7) ** 2 + ((c - 26) / 6) ** 2 <= 1] = 2
    return gt


def predictor_for(gt: np.ndarray) -> GroundTruthPredictor:
    return GroundTruthPredictor(gt, seed=0, dropout=0.0, leak=0.0)


def test_propagation_is_one_undo_step(blobs):
    predictor = predictor_for(blobs)
    labels = np.zeros(PSHAPE, np.uint8)
    s = SegmentationSession(labels)
    s.add_object("liver")
    k, key = key_from_box(predictor, blobs, 1, 6)
    s.apply_prediction(1, 0, k, key)
    labels[2, 15, 10] = 0  # nothing to erase there: just lock the voxel as "hand-made 0"
    s.record_manual_edit(np.array([[2, 15, 10]]), 0, 0, obj=1)
    after_key = labels.copy()
    result = propagate(predictor, labels, 1, {k: key}, locked=s.locked_mask())
    after_run = labels.copy()
    assert len(result.written_slices) >= 6 and after_run[2, 15, 10] == 0  # the lock held
    assert set(np.unique(after_run)) == {0, 1}
    step = s.push_propagation(1, result)
    assert step.kind == "propagation" and step.slices() == sorted(set(result.written_slices))
    np.testing.assert_array_equal(labels, after_run)  # pushing does not change the labels
    assert len(s.history.undo_steps(1)) == 3
    s.undo(1)
    np.testing.assert_array_equal(labels, after_key)
    s.redo(1)
    np.testing.assert_array_equal(labels, after_run)
    s.undo(1)
    s.undo(1)  # the lock
    s.undo(1)  # the key prediction
    assert not labels.any()
    for _ in range(3):
        s.redo(1)
    np.testing.assert_array_equal(labels, after_run)


@pytest.mark.parametrize("axis", [1, 2])
def test_propagation_along_other_axes(blobs, axis):
    predictor = GroundTruthPredictor(blobs, axis=axis, seed=0, dropout=0.0, leak=0.0)
    labels = np.zeros(PSHAPE, np.uint8)
    s = SegmentationSession(labels)
    s.add_object()
    middle = 15 if axis == 1 else 10
    k, key = key_from_box(predictor, blobs, 1, middle)
    result = propagate(predictor, labels, 1, {k: key})
    after = labels.copy()
    assert np.count_nonzero(after) > 100
    s.push_propagation(1, result)
    s.undo(1)
    assert not labels.any()
    s.redo(1)
    np.testing.assert_array_equal(labels, after)


def test_push_propagation_errors(blobs):
    predictor = predictor_for(blobs)
    labels = np.zeros(PSHAPE, np.uint8)
    s = SegmentationSession(labels)
    s.add_object()
    s.add_object()
    k, key = key_from_box(predictor, blobs, 1, 6)
    result = propagate(predictor, labels, 1, {k: key})
    with pytest.raises(SessionError, match="wrote object 1, not object 2"):
        s.push_propagation(2, result)
    with pytest.raises(SessionError, match="PropagationResult"):
        s.push_propagation(1, "result")
    with pytest.raises(SessionError, match="ObjectsResult"):
        s.push_objects_propagation(result)
    small = SegmentationSession(np.zeros((12, 32, 30), np.uint8))
    small.add_object()
    with pytest.raises(SessionError, match="not a slice of this session's labels"):
        small.push_propagation(1, result)
    assert not small.can_undo(1)


def test_objects_propagation_is_one_step_per_object(blobs):
    predictor = predictor_for(blobs)
    labels = np.zeros(PSHAPE, np.uint8)
    s = SegmentationSession(labels)
    s.add_object("a")
    s.add_object("b")
    k1, key1 = key_from_box(predictor, blobs, 1, 6)
    k2, key2 = key_from_box(predictor, blobs, 2, 5)
    result = propagate_objects(predictor, labels, {1: {k1: key1}, 2: {k2: key2}}, overwrite=True)
    after = labels.copy()
    shared = set(result.results[1].written_slices) & set(result.results[2].written_slices)
    assert len(shared) >= 4  # both runs wrote the same slices
    steps = s.push_objects_propagation(result)
    assert [st.obj for st in steps] == [1, 2] and all(st.kind == "propagation" for st in steps)
    assert len(s.history.undo_steps(1)) == 1 and len(s.history.undo_steps(2)) == 1
    s.undo(1)
    np.testing.assert_array_equal(labels == 2, after == 2)  # object 2 keeps all its voxels
    assert not np.any(labels == 1)
    s.redo(1)
    np.testing.assert_array_equal(labels, after)
    s.undo(2)
    np.testing.assert_array_equal(labels == 1, after == 1)
    assert not np.any(labels == 2)
    s.undo(1)
    assert not labels.any()
    s.redo(2)
    s.redo(1)
    np.testing.assert_array_equal(labels, after)


def test_objects_propagation_with_an_unknown_object_changes_nothing(blobs):
    predictor = predictor_for(blobs)
    labels = np.zeros(PSHAPE, np.uint8)
    s = SegmentationSession(labels)
    s.add_object()
    k1, key1 = key_from_box(predictor, blobs, 1, 6)
    k2, key2 = key_from_box(predictor, blobs, 2, 5)
    result = propagate_objects(predictor, labels, {1: {k1: key1}, 2: {k2: key2}})
    with pytest.raises(SessionError, match="no object 2"):
        s.push_objects_propagation(result)
    assert not s.can_undo(1)


# ---------------------------------------------------------------------- random edits
@pytest.mark.parametrize("seed", range(20))
def test_random_edits_undo_and_redo_in_reverse_order(seed):
    """Any mix of edits of three objects, undone newest first across objects, retraces every state exactly."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(SHAPE, np.uint8)
    s = SegmentationSession(labels)
    for _ in range(3):
        s.add_object(select=False)

    def state():
        records = {o.value: ({(a, i): s.slice_prompts(o.value, a, i) for a in range(3)
                              for i in s.prompted_slices(o.value, a)},
                             {(a, i): s.candidate(o.value, a, i) for a in range(3)
                              for i in s.predicted_slices(o.value, a)}) for o in s.objects}
        return labels.copy(), s.locked_mask(), records, [o.value for o in s.objects]

    def all_steps():
        values = {o.value for o in s.objects} | {2, 3}
        return sorted((st for v in values for st in s.history.undo_steps(v)), key=lambda st: st.seq)

    states = [state()]
    for _ in range(50):
        live = [o.value for o in s.objects]
        obj = int(rng.choice(live))
        axis = int(rng.integers(3))
        shape, index = plane_shape(axis), int(rng.integers(SHAPE[axis]))
        count = len(all_steps())

        def prediction():
            planes = []
            for _ in range(int(rng.integers(1, 4))):
                r0, c0 = rng.integers(shape[0]), rng.integers(shape[1])
                planes.append(rect(shape, r0, r0 + rng.integers(1, 8), c0, c0 + rng.integers(1, 8)))
            return masks_of(*planes, axis=axis, index=index)

        op = rng.choice(["predict", "predict", "cycle", "paint", "paint", "clear", "clear_object", "delete",
                         "prompt", "unlock", "group"])
        if op == "predict":
            m = prediction()
            s.apply_prediction(obj, axis, index, m, int(rng.integers(len(m.masks))), overwrite=bool(rng.integers(2)))
        elif op == "cycle" and s.candidate(obj, axis, index) is not None:
            s.cycle_candidate(obj, axis, index, overwrite=bool(rng.integers(2)))
        elif op == "paint":
            s.select(obj)
            value = int(rng.choice([0] + live))
            z, r0, c0 = rng.integers(SHAPE[0]), rng.integers(16), rng.integers(20)
            box = np.zeros(SHAPE, bool)
            box[z, r0:r0 + rng.integers(1, 6), c0:c0 + rng.integers(1, 6)] = True
            idx = np.nonzero(box & (labels != value))  # napari reports changed voxels only
            if len(idx[0]):
                old = labels[idx].copy()
                labels[idx] = value
                s.record_paint([(idx, old, np.uint8(value))])
        elif op == "clear":
            s.clear_slice(obj, axis, index, manual=bool(rng.integers(2)))
        elif op == "clear_object":
            s.clear_object(obj, manual=bool(rng.integers(2)))
        elif op == "delete" and len(live) > 1 and obj != 1:
            s.delete_object(obj)
        elif op == "prompt":
            s.add_point(obj, axis, index, int(rng.integers(shape[0])), int(rng.integers(shape[1])))
        elif op == "unlock":
            s.unlock_slice(axis, index, obj if rng.integers(2) else None)
        elif op == "group":
            with s.group():
                s.set_box(obj, axis, index, (0, 0, shape[0] - 1, 2))
                s.apply_prediction(obj, axis, index, prediction())
        now = state()
        if len(all_steps()) == count:  # no step: nothing changed
            assert np.array_equal(now[0], states[-1][0]) and np.array_equal(now[1], states[-1][1])
        else:
            assert len(all_steps()) == count + 1
            states.append(now)
    steps = all_steps()
    assert len(steps) == len(states) - 1
    for k in reversed(range(len(steps))):
        assert s.undo(steps[k].obj) is steps[k]
        got = state()
        np.testing.assert_array_equal(got[0], states[k][0])
        np.testing.assert_array_equal(got[1], states[k][1])
        assert got[2:] == states[k][2:]
    for k in range(len(steps)):
        assert s.redo(steps[k].obj) is steps[k]
        got = state()
        np.testing.assert_array_equal(got[0], states[k + 1][0])
        np.testing.assert_array_equal(got[1], states[k + 1][1])
        assert got[2:] == states[k + 1][2:]
