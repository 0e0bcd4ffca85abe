"""Segment everything (the automatic mask generator): its parts on hand cases, and whole runs.

Parts: box NMS, the stability score, the filters, small-region removal, crop boxes; batched
decoding equals prompting each point alone on a real (random-weight) network; on a phantom slice
with the ground-truth stand-in, every large organ is recovered by some candidate.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from gt_predictor import GroundTruthPredictor

from napari_medsam.phantoms import make_ct_phantom
from napari_medsam.segment.everything import (
    EverythingSettings,
    box_iou,
    box_nms,
    crop_boxes,
    mask_boxes,
    point_grid,
    remove_small_regions,
    segment_everything,
    stability_score,
)

# ---------------------------------------------------------------------- suppression


def test_nms_drops_overlapping_lower_scores_and_keeps_separate_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 5]], float)
    scores = np.array([0.8, 0.9, 0.5, 0.7])
    # IoU(0, 1) = 81 / 119 = 0.68; IoU(1, 3) = 36 / 114; IoU(0, 3) = 0.5
    assert box_iou(boxes[:1], boxes[1:2])[0, 0] == pytest.approx(81 / 119)
    assert box_nms(boxes, scores, 0.7).tolist() == [1, 0, 3, 2]
    assert box_nms(boxes, scores, 0.6).tolist() == [1, 3, 2]  # 0 goes with 1 (0.68 > 0.6)
    assert box_nms(boxes, scores, 0.4).tolist() == [1, 3, 2]  # 3 survives 1 (0.32) and 0 is gone


def test_nms_is_greedy_a_suppressed_box_suppresses_nothing():
    # a chain: 0 suppresses 1, and 1 would suppress 2, but 1 is gone, so 2 stays
    boxes = np.array([[0, 0, 10, 10], [3, 0, 13, 10], [6, 0, 16, 10]], float)
    assert box_nms(boxes, np.array([0.9, 0.8, 0.7]), 0.5).tolist() == [0, 2]
    assert box_nms(np.zeros((0, 4)), np.zeros(0), 0.5).tolist() == []


def test_mask_boxes_are_inclusive_pixel_extents():
    masks = np.zeros((2, 8, 10), bool)
    masks[0, 2:5, 3:9] = True
    assert mask_boxes(masks).tolist() == [[3, 2, 8, 4], [0, 0, 0, 0]]


# ---------------------------------------------------------------------- scores and filters


def test_stability_score_on_known_logits():
    logits = np.zeros((2, 10, 10), np.float32)
    logits[0] = -5.0
    logits[0, :, :6] = 0.5  # 60 pixels above -1, none above +1
    logits[0, :, :3] = 3.0  # 30 pixels above +1
    logits[1] = 4.0
    score = stability_score(logits, 1.0)
    assert score[0] == pytest.approx(30 / 60)
    assert score[1] == pytest.approx(1.0)
    assert stability_score(np.full((1, 4, 4), -9.0), 1.0)[0] == 0.0  # empty: 0, not NaN


def test_grid_and_crop_boxes_follow_the_published_layout():
    grid = point_grid(4)
    assert grid.shape == (16, 2) and grid.min() == pytest.approx(0.125) and grid.max() == pytest.approx(0.875)
    boxes = crop_boxes(100, 200, 1, 0.5)
    assert boxes[0] == ((0, 0, 200, 100), 0)
    layer1 = [b for b, layer in boxes if layer == 1]
    assert len(layer1) == 4
    # overlap = int(0.5 * 100 * 2 / 2) = 50; crops of ceil((50 + 200) / 2) x ceil((50 + 100) / 2)
    assert layer1[0] == (0, 0, 125, 75) and layer1[-1] == (75, 25, 200, 100)


def test_small_holes_filled_and_small_islands_dropped():
    mask = np.zeros((40, 40), bool)
    mask[5:30, 5:30] = True
    mask[10:12, 10:12] = False  # a 4-pixel hole
    mask[35:37, 35:37] = True  # a 4-pixel island
    filled, changed = remove_small_regions(mask, 10, "holes")
    assert changed and filled[10:12, 10:12].all() and filled[35:37, 35:37].all()
    cleaned, changed = remove_small_regions(filled, 10, "islands")
    assert changed and not cleaned[35:37, 35:37].any() and cleaned[5:30, 5:30].all()
    same, changed = remove_small_regions(cleaned, 10, "islands")
    assert not changed and (same == cleaned).all()
    # every island small: the largest stays
    tiny = np.zeros((10, 10), bool)
    tiny[0, 0] = True
    tiny[5:7, 5:7] = True
    kept, _ = remove_small_regions(tiny, 10, "islands")
    assert kept.sum() == 4 and kept[5:7, 5:7].all()


class _FixedPredictor:
    """Two prompts' worth of answers, whatever the point: a big stable mask and a small shaky one."""

    slice_shape = (64, 64)
    axis = 0
    spacing_mm = (3.0, 0.5, 0.5)

    def embed(self, index):
        return np.zeros(1)

    def predict(self, index, prompts, multimask=False):
        from napari_medsam.segment.predictor import SliceMasks

        big = np.full((64, 64), -6.0, np.float32)
        big[10:40, 10:40] = 6.0
        shaky = np.full((64, 64), -0.5, np.float32)
        shaky[50:54, 50:60] = 0.5
        island = big.copy()
        island[60:62, 0:2] = 6.0  # the big square with a 4-pixel island
        logits = np.stack([big, shaky, island])
        return SliceMasks(logits > 0, np.array([0.95, 0.97, 0.8], np.float32), logits, logits=logits)


def test_filters_by_predicted_iou_and_stability_then_nms():
    settings = EverythingSettings(points_per_side=2)
    result = segment_everything(_FixedPredictor(), 0, settings)
    # shaky fails stability (0 inside +1), island fails predicted IoU; the 4 copies of big are one
    assert len(result.candidates) == 1
    cand = result.candidates[0]
    assert cand.area_px == 900 and cand.area_mm2 == pytest.approx(900 * 0.25)
    assert cand.bbox == (10, 10, 39, 39) and cand.predicted_iou == pytest.approx(0.95)
    assert cand.stability == pytest.approx(1.0)
    loose = segment_everything(_FixedPredictor(), 0, EverythingSettings(points_per_side=2, pred_iou_thresh=0.5,
                                                                        stability_score_thresh=0.0))
    # shaky now passes; big+island's box (rows 10-61, columns 0-39) overlaps big's by IoU 0.42 only
    assert sorted(c.area_px for c in loose.candidates) == [40, 900, 904]


def test_min_region_removes_islands_and_recounts_areas():
    settings = EverythingSettings(points_per_side=1, pred_iou_thresh=0.5, stability_score_thresh=0.9,
                                  min_region_mm2=2.0)  # 8 pixels of 0.25 mm²
    result = segment_everything(_FixedPredictor(), 0, settings)
    # big and big+island become the same mask; the unchanged one wins the second suppression
    assert [c.area_px for c in result.candidates] == [900]
    assert result.candidates[0].predicted_iou == pytest.approx(0.95)


def test_cancel_returns_what_was_found():
    stop = threading.Event()
    stop.set()
    result = segment_everything(_FixedPredictor(), 0, EverythingSettings(points_per_side=2), cancel=stop)
    assert result.cancelled and result.candidates == []


# ---------------------------------------------------------------------- real networks


@pytest.fixture(scope="module")
def lite_model(golden_dir):
    from napari_medsam.segment.model import SamModel

    return SamModel.from_checkpoint("lite_medsam", weights=golden_dir / "lite_medsam_random.pth", device="cpu")


def test_batched_decoding_equals_one_point_at_a_time(lite_model):
    import torch

    from napari_medsam.segment.everything import _network_decode

    rng = np.random.default_rng(0)
    embedding = lite_model.encode(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8))
    coords = torch.as_tensor(rng.uniform(0, 256, (4, 1, 2)), dtype=torch.float32)
    labels = torch.ones((4, 1), dtype=torch.int64)
    with torch.inference_mode():
        logits, iou = _network_decode(lite_model, embedding, coords, labels)
        assert logits.shape[:2] == (4, 3)
        for i in range(4):
            one, one_iou = lite_model.network.decode(torch.as_tensor(embedding), coords[i:i + 1], labels[i:i + 1],
                                                     None, None, multimask_output=True)
            assert torch.allclose(logits[i], one[0], atol=1e-4)
            assert torch.allclose(iou[i], one_iou[0], atol=1e-5)


def test_model_path_runs_with_crops_and_thresholds(lite_model):
    from napari_medsam.segment.predictor import SlicePredictor

    volume, _, _ = make_ct_phantom(shape=(8, 96, 96), seed=1)
    predictor = SlicePredictor(lite_model, volume)
    steps = []
    loose = EverythingSettings(points_per_side=2, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                               crop_n_layers=1, crop_n_points_downscale_factor=2)
    result = segment_everything(predictor, 3, loose, progress=lambda done, total: steps.append((done, total)))
    assert result.n_points == 4 + 4 * 1 and steps[-1] == (8, 8)
    assert {c.crop for c in result.candidates} >= {(0, 0, 96, 96)}
    assert result.candidates and all(c.mask.shape == (96, 96) and c.mask.any() for c in result.candidates)
    areas = [c.area_px for c in result.candidates]
    assert areas == sorted(areas, reverse=True)
    strict = segment_everything(predictor, 3, EverythingSettings(points_per_side=2, pred_iou_thresh=0.999))
    assert all(c.predicted_iou > 0.999 for c in strict.candidates)
    assert len(strict.candidates) <= len(result.candidates)


class SharpStandIn(GroundTruthPredictor):
    """The ground-truth stand-in with logits as steep as a trained SAM's (32 per pixel of distance, to +-32)."""

    def to_low_res(self, mask: np.ndarray) -> np.ndarray:
        return np.clip(32.0 * super().to_low_res(mask), -32, 32)


def test_phantom_organs_are_each_recovered_by_a_candidate():
    volume, gt, names = make_ct_phantom(shape=(20, 96, 96), spacing_mm=(4.0, 3.6, 3.6), seed=0)
    predictor = SharpStandIn(gt, spacing_mm=volume.spacing_mm, dropout=0.0, leak=0.0, boundary_px=0.5)
    index = 10
    truth = gt[index]
    result = segment_everything(predictor, index, EverythingSettings(points_per_side=12))  # published thresholds
    large = [v for v in np.unique(truth) if v and np.count_nonzero(truth == v) >= 100]
    assert len(large) >= 2
    for organ in large:
        region = truth == organ
        best = max(np.count_nonzero(c.mask & region) / np.count_nonzero(c.mask | region) for c in result.candidates)
        assert best > 0.8, f"{names[organ]} recovered with IoU {best:.2f} only"
    # every candidate is a structure, not noise; the three variants of a large organ leave at most two
    structures = [truth == v for v in np.unique(truth) if v]
    for c in result.candidates:
        assert max(np.count_nonzero(c.mask & s) / np.count_nonzero(c.mask | s) for s in structures) > 0.5
    for organ in large:
        assert sum(np.count_nonzero(c.mask & (truth == organ)) > 0.5 * c.area_px for c in result.candidates) <= 2
    assert all(c.area_mm2 == pytest.approx(c.area_px * 3.6 * 3.6) for c in result.candidates)


def test_sam2_family_batched_decoding_and_a_run(golden_dir):
    """SAM 2 (the reduced MedSAM2): the batch path equals the network's own one-prompt decode."""
    import torch
    from test_sam2_ui import reduced_spec

    from napari_medsam.models.registry import MODELS
    from napari_medsam.segment.everything import _network_decode
    from napari_medsam.segment.model import SamModel
    from napari_medsam.segment.predictor import SlicePredictor

    path = golden_dir / "sam2" / "sam2_t512_reduced_random.pt"
    if not path.is_file():
        pytest.skip(f"the reduced SAM 2 golden checkpoint is missing: {path}")
    spec = reduced_spec()
    added = spec.name not in MODELS
    MODELS.setdefault(spec.name, spec)
    try:
        model = SamModel.from_checkpoint(spec.name, path, device="cpu", download=False)
    finally:
        if added:
            MODELS.pop(spec.name, None)
    assert model.family == "sam2"
    rng = np.random.default_rng(0)
    embedding = model.encode(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    coords = torch.as_tensor(rng.uniform(0, model.image_size, (3, 1, 2)), dtype=torch.float32)
    labels = torch.ones((3, 1), dtype=torch.int64)
    with torch.inference_mode():
        logits, iou = _network_decode(model, embedding, coords, labels)
        for i in range(3):
            one, one_iou = model.network.decode(torch.as_tensor(embedding), coords[i:i + 1],
                                                labels[i:i + 1].to(torch.int32), None, None, multimask_output=True)
            assert torch.allclose(logits[i], one[0], atol=1e-4) and torch.allclose(iou[i], one_iou[0], atol=1e-5)
    volume, _, _ = make_ct_phantom(shape=(8, 64, 64), seed=0)
    result = segment_everything(SlicePredictor(model, volume), 4, EverythingSettings(
        points_per_side=3, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0))
    assert result.candidates and all(c.mask.shape == (64, 64) for c in result.candidates)
