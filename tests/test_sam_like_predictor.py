"""The SAM-like stand-in (tests/sam_like_predictor.py) has every behaviour its docstring promises."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from gt_predictor import GroundTruthPredictor, box_of
from sam_like_predictor import SamLikePredictor

from napari_medsam.phantoms import make_ct_phantom
from napari_medsam.segment.predictor import Prompts

SHAPE, SPACING = (40, 96, 96), (4.0, 3.6, 3.6)


@pytest.fixture(scope="module")
def ct():
    volume, gt, names = make_ct_phantom(shape=SHAPE, spacing_mm=SPACING, seed=0)
    return volume, gt, {v: k for k, v in names.items()}


def _largest_slice(gt: np.ndarray, label: int) -> int:
    return int(np.argmax((gt == label).sum(axis=(1, 2))))


def _main_label(mask: np.ndarray, truth: np.ndarray) -> int:
    values, counts = np.unique(truth[mask], return_counts=True)
    keep = values != 0
    return int(values[keep][np.argmax(counts[keep])]) if keep.any() else 0


def test_past_the_end_answers_another_structure_confidently(ct):
    volume, gt, label = ct
    aorta, liver = label["aorta"], label["liver"]
    predictor = SamLikePredictor(gt, seed=0, boundary_px=0.0)
    # The aorta's box from its largest slice, on slices below the bifurcation (no aorta there).
    box = box_of(gt[_largest_slice(gt, aorta)] == aorta)
    below = [k for k in range(gt.shape[0]) if not (gt[k] == aorta).any()]
    assert below
    answered = 0
    for k in below:
        result = predictor.predict(k, Prompts(box=box))
        kind, target, other = predictor.events[-1][1:]
        if kind == "past_end":
            assert other != aorta and result.scores[0] >= 0.65
            assert _main_label(result.masks[0], gt[k]) == other
            answered += 1
    # A liver box on a slice far above the liver: the lungs or the spleen, with a confident score.
    liver_z = np.flatnonzero((gt == liver).any(axis=(1, 2)))
    box = box_of(gt[_largest_slice(gt, liver)] == liver)
    for k in range(liver_z.max() + 2, gt.shape[0]):
        result = predictor.predict(k, Prompts(box=box))
        assert result.masks[0].any()
        assert _main_label(result.masks[0], gt[k]) not in (0, liver)
        assert 0.65 <= result.scores[0] <= 0.85
        answered += 1
    assert answered >= 3
    # Nothing labelled in the box: an empty mask with a low score.
    result = predictor.predict(20, Prompts(box=np.array([0, 0, 6, 6])))
    assert not result.masks[0].any() and result.scores[0] < 0.5


def _rates(gt: np.ndarray, seeds=range(4)) -> tuple[float, float, int, int]:
    """Leak rate over slices with a touching neighbour, dropout rate over slices with the structure."""
    leaks = touching = drops = present = 0
    spilled = []
    for seed in seeds:
        predictor = SamLikePredictor(gt, seed=seed, boundary_px=0.0)
        for value in (v for v in np.unique(gt) if v):
            for k in np.flatnonzero((gt == value).any(axis=(1, 2))):
                truth = gt[k] == value
                if truth.sum() < 20:
                    continue
                result = predictor.predict(int(k), Prompts(box=box_of(truth)))
                kind, target = predictor.events[-1][1:3]
                if target != value:
                    continue
                present += 1
                drops += kind == "dropout"
                mask = result.masks[0]
                if kind == "dropout":
                    assert not (mask & truth).sum() > 0.5 * truth.sum()  # not the structure
                    continue
                if predictor._touching(gt[k], truth, value, np.ones_like(truth)):
                    touching += 1
                    foreign = mask & (gt[k] != value) & (gt[k] != 0)
                    if kind == "leak":
                        # A confident score, and foreign pixels (few only where little of the neighbour is in the box).
                        assert foreign.any() and result.scores[0] >= 0.5
                        spilled.append(int(foreign.sum()))
                        leaks += 1
                    else:
                        assert not foreign.any()
    # A sizeable part of the neighbour, not a thin band of a pixel or two.
    assert np.median(spilled) >= 10
    return leaks / touching, drops / present, touching, present


def test_leak_and_dropout_rates(ct):
    volume, gt, label = ct
    leak_rate, drop_rate, touching, present = _rates(gt)
    assert touching > 400 and present > 600
    assert 0.10 <= leak_rate <= 0.20  # nominal 0.15
    assert 0.01 <= drop_rate <= 0.06  # nominal 0.03


def test_rates_follow_the_parameters(ct):
    volume, gt, label = ct
    predictor = SamLikePredictor(gt, seed=0, leak=0.0, dropout=0.0)
    for k in range(5, 35):
        predictor.predict(k, Prompts(box=box_of(gt[k] == label["liver"]))) if (gt[k] == label["liver"]).any() else None
    assert {e[1] for e in predictor.events} <= {"normal"}
    predictor = SamLikePredictor(gt, seed=0, leak=1.0, dropout=0.0)
    k = _largest_slice(gt, label["pancreas"])
    predictor.predict(k, Prompts(box=box_of(gt[k] == label["pancreas"])))
    assert predictor.events[-1][1] == "leak"


def test_reproducible_and_seed_dependent(ct):
    volume, gt, label = ct
    prompts = [(k, Prompts(box=box_of(gt[k] == label["liver"]))) for k in range(8, 30, 2)]

    def run(seed):
        predictor = SamLikePredictor(gt, seed=seed)
        return [predictor.predict(k, p, multimask=True) for k, p in prompts]

    a, b, c = run(3), run(3), run(4)
    for x, y in zip(a, b):
        assert np.array_equal(x.masks, y.masks) and np.array_equal(x.scores, y.scores)
    assert any(not np.array_equal(x.masks, z.masks) for x, z in zip(a, c))
    # Thread-safe: the same answers when predicted concurrently, in any order.
    predictor = SamLikePredictor(gt, seed=3)
    out: dict[int, np.ndarray] = {}

    def work(i):
        k, p = prompts[i]
        out[i] = predictor.predict(k, p, multimask=True).masks

    threads = [threading.Thread(target=work, args=(i,)) for i in reversed(range(len(prompts)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(out[i], a[i].masks) for i in range(len(prompts)))
    assert sorted(predictor.predict_calls) == sorted(k for k, _ in prompts)


def test_boundary_noise_moves_the_edge(ct):
    volume, gt, label = ct
    k = _largest_slice(gt, label["liver"])
    truth = gt[k] == label["liver"]
    noisy = SamLikePredictor(gt, seed=0, leak=0.0, dropout=0.0).predict(k, Prompts(box=box_of(truth))).masks[0]
    clean = SamLikePredictor(gt, seed=0, leak=0.0, dropout=0.0, boundary_px=0.0).predict(
        k, Prompts(box=box_of(truth))).masks[0]
    assert np.array_equal(clean, truth)
    assert 0 < np.count_nonzero(noisy ^ truth) < 0.2 * truth.sum()


def test_multimask_gives_three_candidates_best_first(ct):
    volume, gt, label = ct
    predictor = SamLikePredictor(gt, seed=0, leak=1.0, dropout=0.0, boundary_px=0.0)
    k = _largest_slice(gt, label["pancreas"])
    truth = gt[k] == label["pancreas"]
    result = predictor.predict(k, Prompts(box=box_of(truth)), multimask=True)
    assert result.masks.shape == (3, *gt.shape[1:]) and result.scores.shape == (3,)
    assert result.low_res_logits.shape == (3, 256, 256)
    assert np.all(np.diff(result.scores) < 0)  # best first
    # On a leak slice, a weaker candidate is the answer without the leak.
    assert (result.masks[0] & ~truth).any() and np.array_equal(result.masks[1], truth)
    single = predictor.predict(k, Prompts(box=box_of(truth)))
    assert single.masks.shape == (1, *gt.shape[1:]) and np.array_equal(single.masks[0], result.masks[0])
    # Past the end, no candidate is the (absent) structure; the best is still the confident other one.
    aorta = label["aorta"]
    box = box_of(gt[_largest_slice(gt, aorta)] == aorta)
    result = predictor.predict(0, Prompts(box=box), multimask=True)
    assert not any((m & (gt[0] == aorta)).any() for m in result.masks)
    assert np.all(np.diff(result.scores) < 0)


def test_image_method_only_when_given(ct):
    volume, gt, label = ct
    for cls in (SamLikePredictor, GroundTruthPredictor):
        assert getattr(cls(gt), "image", None) is None
        predictor = cls(gt, image=volume.array)
        for k in (0, 17, gt.shape[0] - 1):
            img = predictor.image(k)
            assert img.dtype == np.float32 and np.array_equal(img, volume.array[k].astype(np.float32))
        with pytest.raises(ValueError, match="shape"):
            cls(gt, image=volume.array[:-1])
    predictor = SamLikePredictor(gt[:, :, :50].swapaxes(0, 1), axis=1, image=volume.array[:, :, :50].swapaxes(0, 1))
    assert np.array_equal(predictor.image(3), volume.array[3, :, :50].astype(np.float32))
