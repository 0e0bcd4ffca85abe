"""The stop rule's image and shape evidence (segment/propagation/evidence.py) on drawn slices."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medsam.segment.predictor import Prompts, SliceMasks
from napari_medsam.segment.propagation import StopRule, propagate
from napari_medsam.segment.propagation.evidence import Appearance, _core, measure
from napari_medsam.segment.propagation.stop_rules import FrontCounters, judge

SHAPE = (96, 96)


def disk(center, radius, shape=SHAPE) -> np.ndarray:
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    return (rr - center[0]) ** 2 + (cc - center[1]) ** 2 <= radius**2


def ct_slice(*regions: tuple[np.ndarray, float], seed: int = 0) -> np.ndarray:
    """Fat background (-100 HU) with the given (mask, HU) regions and 10 HU of noise."""
    image = np.full(SHAPE, -100.0, np.float32)
    for mask, hu in regions:
        image[mask] = hu
    return image + np.random.default_rng(seed).normal(0, 10, SHAPE).astype(np.float32)


LIVER = disk((48, 40), 20)
KIDNEY = disk((48, 70), 12)  # touches the liver's right edge


def liver_appearance() -> Appearance:
    return Appearance.of([ct_slice((LIVER, 100.0), (KIDNEY, 180.0))], [LIVER], "HU")


def test_the_appearance_holds_the_object_and_not_its_neighbours():
    look = liver_appearance()
    image = ct_slice((LIVER, 100.0), (KIDNEY, 180.0), seed=1)
    assert look.inside(image[LIVER]) > 0.95
    assert look.inside(image[KIDNEY & ~LIVER]) < 0.05
    assert look.unit == "HU" and abs(look.mean - 100) < 5
    assert look.looks(image)[LIVER].mean() > 0.95 and not look.looks(image)[0, 0]  # fat is not liver
    # An MR in arbitrary units: the bins scale with the image (no fixed HU anywhere).
    scaled = Appearance.of([image * 37.0 + 5000], [LIVER])
    assert scaled.inside(image[LIVER] * 37.0 + 5000) > 0.95
    assert scaled.inside(image[KIDNEY & ~LIVER] * 37.0 + 5000) < 0.05
    assert Appearance.of([image], [np.zeros(SHAPE, bool)]) is None


def test_a_mixture_stays_a_mixture_and_a_leaky_key_does_not_hide_a_disc():
    """A vertebra (cortex and marrow) keeps both; the disc's soft tissue is not the vertebra."""
    body = disk((48, 48), 18)
    marrow = disk((48, 48), 13)
    vertebra = ct_slice((body, 700.0), (marrow, 400.0))
    look = Appearance.of([vertebra], [body], "HU")
    endplate = ct_slice((body, 700.0), seed=1)  # the next slice is all cortex: still the vertebra
    assert look.inside(endplate[_core(body)]) > 0.9
    disc = ct_slice((body, 90.0), seed=2)
    assert look.inside(disc[_core(body)]) < 0.05
    # A key that leaked into soft tissue next to the vertebra makes 90 HU "the object's"; the
    # previous accepted slice (no leak) still tells the disc apart.
    leak = disk((48, 75), 10)
    leaky_key = Appearance.of([ct_slice((body, 700.0), (marrow, 400.0), (leak, 90.0))], [body | leak], "HU")
    evidence = measure(body, body, image=disc, appearance=leaky_key, previous_image=vertebra)
    assert evidence.match > 0.5 and evidence.previous_match < 0.05
    verdict, _ = judge(StopRule(), body, 0.9, body, FrontCounters(), evidence, "HU")
    assert "intensity differs from the previous slice: mean 90 vs" in verdict.reason
    assert not verdict.reason.startswith("leak")  # the disc is another structure, not a leak


def test_another_structure_past_the_end_is_rejected_and_ends_the_front():
    """Past the liver's end the model answers the kidney in the same box, with a confident score."""
    look, rule, counters = liver_appearance(), StopRule(), FrontCounters()
    previous = disk((48, 55), 8)  # the liver's thin tip, next to the kidney
    image = ct_slice((KIDNEY, 180.0), seed=2)
    answer = KIDNEY & disk((48, 58), 11)  # the kidney, clipped by the box around the tip
    evidence = measure(answer, previous, image=image, appearance=look)
    assert evidence.match is not None and evidence.match < 0.2
    verdict, _ = judge(rule, answer, 0.8, previous, counters, evidence, look.unit)
    assert not verdict.accept and not verdict.stop
    assert "intensity differs from key slices: mean 181 vs 101 HU (0% in range)" in verdict.reason
    assert not verdict.reason.startswith("leak")
    verdict, _ = judge(rule, answer, 0.8, previous, counters, evidence, look.unit)
    assert verdict.stop and "2 missed slices in a row" in verdict.reason
    # Without the image only the shape speaks (here it is enough: the answer moved off the tip).
    verdict, _ = judge(rule, answer, 0.8, previous, FrontCounters(), measure(answer, previous))
    assert not verdict.accept and "intensity" not in verdict.reason and "centre moved" in verdict.reason


def test_a_leak_is_skipped_but_the_front_goes_on():
    look, rule, counters = liver_appearance(), StopRule(), FrontCounters()
    image = ct_slice((LIVER, 100.0), (KIDNEY, 180.0), seed=3)
    before = ct_slice((LIVER, 100.0), (KIDNEY, 180.0), seed=9)  # the previous slice
    leaked = LIVER | KIDNEY  # the liver plus the whole touching kidney
    evidence = measure(leaked, LIVER, image=image, appearance=look, previous_image=before)
    assert evidence.kept == 1.0 and evidence.core_match > 0.95
    assert 0.5 < evidence.match < 0.9 and 0.5 < evidence.previous_match < 0.9  # mostly liver: not another organ
    for n in range(1, rule.max_leak_slices):
        verdict, _ = judge(rule, leaked, 0.8, LIVER, counters, evidence, look.unit)
        assert not verdict.accept and not verdict.stop and verdict.reason.startswith("leak: "), n
        assert "of it lies over 5 mm beyond the previous mask" in verdict.reason
    verdict, _ = judge(rule, leaked, 0.8, LIVER, counters, evidence, look.unit)
    assert verdict.stop  # a leak on every slice for max_leak_slices slices ends it
    # The liver itself is accepted and resets the count.
    ok, _ = judge(rule, LIVER, 0.9, LIVER, FrontCounters(), measure(LIVER, LIVER, image=image, appearance=look))
    assert ok.accept


def test_a_vessel_that_divides_is_not_followed_into_one_branch():
    """The aorta's last slice is two merged circles; below, the model answers one iliac artery."""
    aorta = disk((48, 42), 9) | disk((48, 54), 9)
    right, left = disk((48, 40), 6), disk((48, 56), 6)
    key_image = ct_slice((aorta, 250.0))
    look = Appearance.of([key_image], [aorta], "HU")
    image = ct_slice((right, 250.0), (left, 250.0), seed=4)
    evidence = measure(right, aorta, image=image, appearance=look)
    assert evidence.match > 0.9  # the same contrast: intensity cannot tell
    assert evidence.lost is not None and evidence.lost > StopRule().max_lost_fraction
    verdict, _ = judge(StopRule(), right, 0.8, aorta, FrontCounters(), evidence, look.unit)
    assert not verdict.accept and "leaves out" in verdict.reason and not verdict.reason.startswith("leak")
    # Both branches together leave nothing out (an organ splitting into lobes is kept).
    both = measure(right | left, aorta, image=image, appearance=look)
    assert both.lost < 0.05


def test_an_organ_shrinking_towards_its_tip_passes():
    look = liver_appearance()
    rule = StopRule()
    previous = LIVER
    for radius, seed in ((17, 5), (13, 6), (9, 7), (6, 8)):
        tip = disk((50, 42), radius)
        image = ct_slice((tip, 100.0), (KIDNEY, 180.0), seed=seed)
        evidence = measure(tip, previous, image=image, appearance=look)
        verdict, _ = judge(rule, tip, 0.8, previous, FrontCounters(), evidence, look.unit)
        assert verdict.accept, (radius, verdict.reason)
        previous = tip


def test_a_jump_and_a_reach_beyond_the_previous_mask_are_named():
    rule = StopRule()
    previous = disk((30, 30), 10)
    jumped = disk((30, 52), 10)  # same size, moved two radii
    verdict, _ = judge(rule, jumped, 0.9, previous, FrontCounters(), measure(jumped, previous))
    assert "centre moved 2.2 radii" in verdict.reason
    grown = disk((30, 36), 14)
    verdict, _ = judge(rule, grown, 0.9, previous, FrontCounters(), measure(grown, previous, outside_mm=3))
    assert "beyond the previous mask" in verdict.reason


class ImageStandIn:
    """A predictor over a drawn volume: slices 0-5 liver, 6-9 only the kidney, which it answers."""

    axis = 0
    intensity_unit = "HU"

    def __init__(self, with_image: bool) -> None:
        self.volume = np.stack([ct_slice((LIVER, 100.0), (KIDNEY, 180.0), seed=i) if i < 6
                                else ct_slice((KIDNEY, 180.0), seed=i) for i in range(10)])
        if with_image:
            self.image = lambda index: self.volume[index]

    def embed(self, index: int) -> np.ndarray:
        return np.zeros(1)

    def predict(self, index: int, prompts: Prompts, multimask: bool = False) -> SliceMasks:
        mask = LIVER if index < 6 else KIDNEY | disk((48, 52), 14)
        logits = np.where(mask, 5.0, -5.0).astype(np.float32)[None]
        return SliceMasks(mask[None], np.array([0.85]), np.resize(logits, (1, 256, 256)), index, 0)


@pytest.mark.parametrize("with_image", [True, False])
def test_propagation_uses_the_image_when_the_predictor_offers_it(with_image):
    labels = np.zeros((10, *SHAPE), np.uint8)
    result = propagate(ImageStandIn(with_image), labels, 1, {2: LIVER}, direction="up", fill_skipped=False)
    rows = {r.index: r for r in result.reports}
    if with_image:
        assert not labels[6:].any()  # nothing written past the liver's end
        assert "intensity differs from key slices" in rows[6].status and "HU" in rows[6].status
        assert rows[7].kind == "stopped"
    else:  # shapes only: the predictor lacks image(); the run still works
        assert all("intensity" not in r.status for r in result.reports)
    assert labels[2:6].all(axis=(1, 2)).sum() == 0 and (labels[2:6] == 1).any(axis=(1, 2)).all()


def test_mask_pooled_embeddings_are_reported_and_can_reject():
    """With a real network: the new mask's pooled embedding against the key slices' (report; opt-in rule)."""
    from test_predictor import tiny_model

    from napari_medsam.segment.predictor import SlicePredictor
    from napari_medsam.volume import Volume

    slices = [ct_slice((LIVER, 100.0), (KIDNEY, 180.0), seed=i) for i in range(4)]
    volume = Volume(np.stack(slices).astype(np.int16), (5.0, 1.0, 2.0), (0.0, 0.0, 0.0), np.eye(3), modality="CT")
    predictor = SlicePredictor(tiny_model("sam"), volume, axis=0)  # anisotropic pixels: 1 x 2 mm
    embedding = predictor.embed(1)[0]
    # By hand: slice (96, 96) at 1 x 2 mm -> square pixels (96, 192) -> resized into the 1024 square
    # (512 x 1024) -> 64 x 64 cells of which the top 32 rows are image.
    mask = np.zeros(SHAPE, bool)
    mask[0:3, 0:3] = True  # rows 0-2 land in cell row 0 or 1, columns 0-2 in cell column 0-1
    rows = ((np.arange(96) + 0.5) * 32 / 96).astype(int)
    cols = ((np.arange(96) + 0.5) * 64 / 96).astype(int)
    weights = np.zeros((64, 64))
    for r in range(3):
        for c in range(3):
            weights[rows[r], cols[c]] += 1
    expected = (embedding * weights).sum(axis=(1, 2)) / 9
    np.testing.assert_allclose(predictor.pooled_embedding(1, mask), expected, rtol=1e-5)
    assert predictor.pooled_embedding(1, np.zeros(SHAPE, bool)) is None

    labels = np.zeros((4, *SHAPE), np.uint8)
    result = propagate(predictor, labels, 1, {1: LIVER}, direction="up", fill_skipped=False,
                       stop=StopRule(min_score=-1.0, min_overlap=0.0, min_area_ratio=0.0, max_area_ratio=1e9,
                                     max_outside_fraction=1.0, max_centroid_shift=1e9, use_image=False))
    rows_ = [r for r in result.reports if r.front == "up"]
    assert rows_ and all(r.evidence is not None and r.evidence.similarity is not None for r in rows_)
    assert all(-1.0 <= r.evidence.similarity <= 1.0 for r in rows_)
    # Opt-in: a similarity demanded above what the masks reach rejects the slice and names it.
    labels[:] = 0
    strict = StopRule(min_score=-1.0, min_overlap=0.0, min_area_ratio=0.0, max_area_ratio=1e9,
                      max_outside_fraction=1.0, max_centroid_shift=1e9, use_image=False,
                      min_embedding_similarity=1.01)
    result = propagate(predictor, labels, 1, {1: LIVER}, direction="up", fill_skipped=False, stop=strict)
    first = [r for r in result.reports if r.front == "up"][0]
    assert "image features differ from key slices: similarity" in first.status


def test_a_tube_that_suddenly_changes_size_is_where_it_divides_or_joins():
    from napari_medsam.segment.propagation.evidence import Evidence

    rule = StopRule()
    previous = disk((40, 40), 3)  # an artery, 29 px, steady over the last slices
    joined = disk((40, 42), 4) | disk((40, 46), 4)  # it meets a larger vessel
    steady = Evidence(kept=1.0, outside=0.0, shift=0.2, steady_area=29.0)
    verdict, _ = judge(rule, joined, 0.8, previous, FrontCounters(), steady)
    assert "after slices of steady size" in verdict.reason
    # an organ whose size was not steady is judged on the usual checks only
    verdict, _ = judge(rule, joined, 0.8, previous, FrontCounters(), Evidence(kept=1.0, outside=0.0, shift=0.2))
    assert "steady" not in verdict.reason
    # the front measures it: four accepted masks within 1.6x of each other
    from napari_medsam.segment.propagation.run import Front
    front = Front("up", 1, 0, previous, None, 0)
    assert front.steady_area() is None
    for area_mask in (disk((40, 40), 3), disk((40, 40), 3), disk((40, 40), 3)):
        front.accept(area_mask, None, 0)
    assert front.steady_area() == pytest.approx(29.0)
    front.accept(disk((40, 40), 8), None, 0)
    assert front.steady_area() is None
