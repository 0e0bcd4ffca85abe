"""Concept (text) prompts on a scan: segment/concept.py with stand-in models and the real EfficientSAM3 network.

The stand-in models decide from the image alone, as a detector does. The unkind one gives a confident mask
of *another* place on every slice past the organ's end (what SAM-family detectors do): following through
slices must stop there, not walk off with it. The real network is the reduced golden checkpoint
(random weights, threshold 0.2552): on the golden slice the product layer must give the official
processor's detections for the text prompt "liver" and for the box prompt.
"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest

from napari_medsam.errors import MedSamError, WeightsError
from napari_medsam.models.registry import (CLIP_VOCABULARY, CONCEPT_MODELS, DEFAULT_CONCEPT_MODEL, MODELS,
                                           get_concept_model, list_concept_models, list_models)
from napari_medsam.models.weights import resolve_file
from napari_medsam.segment.concept import Candidates, ConceptModel, ConceptSegmenter, Detected
from napari_medsam.segment.intensity import contrast_limits
from napari_medsam.segment.propagation import PropagationResult

GOLDEN_THRESHOLD = 0.2552
ORGAN_SLICES = range(3, 9)  # the stand-in organ's slices


# --- stand-in models ---------------------------------------------------------------------------------


def _organ(index: int) -> np.ndarray:
    yy, xx = np.mgrid[0:64, 0:64]
    cy, cx = 30 + (index - 5), 28 + 0.5 * (index - 5)
    return ((yy - cy) / 12.0) ** 2 + ((xx - cx) / 15.0) ** 2 < 1


def _scan(dropout: int | None = None) -> np.ndarray:
    """12 slices of 64 x 64: background 20, a bright organ (250) on slices 3-8."""
    array = np.full((12, 64, 64), 20, np.int16)
    for z in ORGAN_SLICES:
        if z != dropout:
            array[z][_organ(z)] = 250
    return array


DISTRACTOR = (slice(50, 62), slice(48, 62))  # a corner far from the organ


class StandIn:
    """A concept model that sees the bright organ; past its end it gives a confident mask elsewhere (kind=False)."""

    pipeline = "es3"
    signature = "stand-in"

    def __init__(self, kind: bool = False) -> None:
        self.kind = kind
        self.encoded = 0
        self.calls: list[tuple] = []

    def encode(self, rgb: np.ndarray) -> np.ndarray:
        self.encoded += 1
        return rgb[..., 0].astype(np.float32)

    def detect(self, embedding, phrase, boxes, box_labels, out_hw, threshold) -> Detected:
        self.calls.append((phrase, None if boxes is None else np.array(boxes), box_labels, threshold))
        grey = np.asarray(embedding).reshape(out_hw)
        organ = grey > 200
        other = np.zeros(out_hw, bool)
        other[DISTRACTOR] = True
        if organ.any():
            masks, scores = [other, organ], [0.6, 0.9]
        elif self.kind:
            masks, scores = [], []
        else:
            masks, scores = [other], [0.95]  # confident, and wrong
        keep = [k for k, s in enumerate(scores) if s > threshold]
        masks = np.array([masks[k] for k in keep], bool).reshape(-1, *out_hw)
        boxes_xyxy = np.array([_box(m) for m in masks]).reshape(-1, 4)
        return Detected(np.array([scores[k] for k in keep]), boxes_xyxy, masks, np.array(keep, np.int64))


def _box(mask: np.ndarray) -> list[float]:
    rows, cols = np.nonzero(mask)
    return [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]


def _segmenter(model, dropout=None, **kwargs) -> ConceptSegmenter:
    return ConceptSegmenter(model, _scan(dropout), mapping=contrast_limits(0, 255), spacing_mm=(2.0, 1.0, 1.0),
                            **kwargs)


def test_find_gives_candidates_best_first_and_caches_the_image_features():
    model = StandIn()
    seg = _segmenter(model)
    found = seg.find(5, "  liver ")
    assert isinstance(found, Candidates) and found.phrase == "liver" and found.index == 5 and len(found) == 2
    assert found.scores.tolist() == [0.9, 0.6]
    np.testing.assert_array_equal(found.best, _organ(5))
    np.testing.assert_array_equal(found.boxes[0], _box(_organ(5)))
    assert found.queries.tolist() == [1, 0]
    assert len(seg.find(5, "kidney", threshold=0.7)) == 1  # another phrase and threshold, same features
    assert model.encoded == 1 and seg.is_embedded(5) and not seg.is_embedded(6)
    assert model.calls[-1][3] == 0.7 and model.calls[0][3] == 0.5


def test_exemplar_boxes_are_normalised_and_checked():
    model = StandIn()
    seg = _segmenter(model)
    seg.find(5, None, boxes=[[48, 40, 16, 8]])  # corners in any order; a box alone needs no phrase
    phrase, boxes, labels, _ = model.calls[-1]
    assert phrase is None and labels is None
    np.testing.assert_allclose(boxes, [[32 / 64, 24 / 64, 32 / 64, 32 / 64]])
    seg.find(5, "liver", boxes=[[0, 0, 64, 64], [1, 1, 5, 5]], box_labels=[True, False])
    assert model.calls[-1][2].tolist() == [True, False]
    with pytest.raises(MedSamError, match="inside the 64 x 64 slice"):
        seg.find(5, "liver", boxes=[[10, 10, 70, 20]])
    with pytest.raises(MedSamError, match="no area"):
        seg.find(5, "liver", boxes=[[10, 10, 10, 20]])
    for empty in ("", "   ", None):
        with pytest.raises(MedSamError, match="phrase is empty"):
            seg.find(5, empty)


def test_following_stops_where_a_confident_wrong_mask_appears():
    seg = _segmenter(StandIn(kind=False))
    seed = seg.find(5, "liver")
    track = seg.find_in_slices(range(12), "liver", seed=(5, seed.masks[0]))
    assert track.slices == list(ORGAN_SLICES)
    assert track.chosen[4] == 0 and track.chosen[8] == 0  # the organ, not the distractor, on every slice
    assert "overlaps" in track.stop_reasons["down"] and "overlaps" in track.stop_reasons["up"]
    assert sorted(track.candidates) == [1, 2, 3, 4, 6, 7, 8, 9, 10]  # two misses in a row end each front
    labels = np.zeros((12, 64, 64), np.uint8)
    labels[0, :5, :5] = 7  # another object, kept
    before = labels.copy()
    result = track.write(labels, 3, spacing_mm=(2.0, 1.0, 1.0))
    assert isinstance(result, PropagationResult)
    expected = np.zeros_like(labels, bool)
    for z in ORGAN_SLICES:
        expected[z] = _organ(z)
    np.testing.assert_array_equal(labels == 3, expected)  # nothing of the distractor was written
    assert (labels == 7).sum() == 25
    rows = {(r["index"], r["status"].split(":")[0]) for r in result.table()}
    assert (5, "key") in rows and (4, "propagated") in rows and (9, "skipped") in rows and (10, "stopped") in rows
    assert result.written_slices == list(ORGAN_SLICES)
    result.undo.undo(labels)
    np.testing.assert_array_equal(labels, before)
    np.testing.assert_array_equal(track.to_volume(labels.shape), expected)


def test_without_a_seed_the_best_candidate_of_the_range_seeds_the_walk():
    seg = _segmenter(StandIn(kind=True))
    seen = []
    track = seg.find_in_slices(range(2, 11), "liver", progress=lambda done, total, msg: seen.append((done, total)))
    assert track.seed in ORGAN_SLICES and track.slices == list(ORGAN_SLICES)
    assert seen[-1] == (9, 9) and len(seen) == 9  # every slice searched once
    assert "nothing scored" in track.stop_reasons["up"]
    nothing = _segmenter(StandIn(kind=True)).find_in_slices([0, 1, 2], "liver")
    assert not nothing.found and "nothing scored above 0.5" in nothing.stop_reasons["search"]
    assert nothing.write(np.zeros((12, 64, 64), np.uint8), 1).written_slices == []


def test_a_one_slice_dropout_is_bridged_and_interpolated():
    seg = _segmenter(StandIn(kind=True), dropout=6)
    track = seg.find_in_slices(range(12), "liver", seed=(4, _organ(4)))
    assert track.slices == [3, 4, 5, 7, 8]
    labels = np.zeros((12, 64, 64), np.uint8)
    result = track.write(labels, 1)
    assert [r.status for r in result.reports_for(6)][-1] == "interpolated" and labels[6].any()
    strict = seg.find_in_slices(range(12), "liver", seed=(4, _organ(4)), max_misses=0)
    assert strict.slices == [3, 4, 5] and "slice 6" in strict.stop_reasons["up"]


def test_iou_metric_overlap_threshold_and_cancel():
    seg = _segmenter(StandIn())
    shifted = np.roll(_organ(5), 9, axis=1)  # a seed that only half covers the organ
    assert seg.find_in_slices(range(12), "liver", seed=(5, shifted), min_overlap=0.4).slices != [5]
    assert seg.find_in_slices(range(12), "liver", seed=(5, shifted), metric="iou", min_overlap=0.6).slices == [5]
    stop = threading.Event()
    calls = []

    def progress(done, total, message):
        calls.append(done)
        if done == 2:
            stop.set()

    track = seg.find_in_slices(range(12), "liver", seed=(5, _organ(5)), progress=progress, cancel=stop)
    assert track.cancelled and len(track.candidates) == 2
    assert track.write(np.zeros((12, 64, 64), np.uint8), 1).cancelled
    with pytest.raises(MedSamError, match="outside 0..11"):
        seg.find_in_slices(range(5, 14), "liver")
    with pytest.raises(MedSamError, match="shape"):
        seg.find_in_slices(range(12), "liver", seed=(5, np.ones((3, 3), bool)))


# --- registry and files ------------------------------------------------------------------------------


def test_concept_models_stay_out_of_the_point_box_chooser():
    assert DEFAULT_CONCEPT_MODEL in CONCEPT_MODELS
    assert not set(CONCEPT_MODELS) & set(MODELS)
    assert all(spec.name not in CONCEPT_MODELS for spec in list_models())
    spec = list_concept_models()[0]
    assert spec.family == "es3" and spec.threshold == 0.5 and spec.sha256 is None and spec.size_bytes is None
    assert spec.urls[0].startswith("https://huggingface.co/Simon7108528/EfficientSAM3/")
    with pytest.raises(MedSamError, match="point/box model"):
        get_concept_model("lite_medsam")
    with pytest.raises(MedSamError, match="unknown concept model"):
        get_concept_model("nope")


def test_vocabulary_download_is_checked(golden_dir, tmp_path):
    source = golden_dir / "efficientsam3" / "bpe_simple_vocab_16e6.txt.gz"
    spec = dataclasses.replace(CLIP_VOCABULARY, urls=(source.as_uri(),))
    path = resolve_file(spec, cache_dir=tmp_path / "cache", checkpoint=False)
    assert path.read_bytes() == source.read_bytes() and path.parent == tmp_path / "cache"
    assert resolve_file(spec, cache_dir=tmp_path / "cache", download=False, checkpoint=False) == path
    wrong = tmp_path / "wrong.gz"
    wrong.write_bytes(source.read_bytes()[:-1] + b"x")
    bad = dataclasses.replace(CLIP_VOCABULARY, urls=(wrong.as_uri(),))
    with pytest.raises(WeightsError, match="checksum mismatch"):
        resolve_file(bad, cache_dir=tmp_path / "other", checkpoint=False)
    with pytest.raises(WeightsError, match="downloading is switched off"):
        resolve_file(CLIP_VOCABULARY, cache_dir=tmp_path / "empty", download=False, checkpoint=False)
    offline = dataclasses.replace(CLIP_VOCABULARY, urls=("http://127.0.0.1:9/bpe.txt.gz",))
    with pytest.raises(WeightsError, match="put it at"):
        resolve_file(offline, cache_dir=tmp_path / "offline", checkpoint=False, timeout=2)


# --- the real network (reduced golden checkpoint) ----------------------------------------------------


@pytest.fixture(scope="module")
def es3(golden_dir) -> ConceptModel:
    folder = golden_dir / "efficientsam3"
    return ConceptModel.from_checkpoint(weights=folder / "es3_reduced_random.pt",
                                        vocabulary=folder / "bpe_simple_vocab_16e6.txt.gz", device="cpu")


def test_golden_slice_text_and_box_prompts_match_the_official_processor(es3, golden_dir):
    golden = np.load(golden_dir / "efficientsam3" / "es3_golden_image.npz")
    volume = golden["image_u8"][None].astype(np.int16)  # uint8 grey mapped by identity: the golden input
    seg = ConceptSegmenter(es3, volume, mapping=contrast_limits(0, 255), threshold=GOLDEN_THRESHOLD)
    for phrase, boxes, name in (("liver", None, "text"), (None, [[28, 55, 148, 145]], "box")):
        found = seg.find(0, phrase, boxes=boxes)
        order = np.argsort(-golden[f"{name}_final_scores"], kind="stable")
        assert len(found) == len(order)
        np.testing.assert_allclose(found.scores, golden[f"{name}_final_scores"][order], atol=1e-5)
        np.testing.assert_allclose(found.boxes, golden[f"{name}_final_boxes_xyxy"][order], atol=1e-3)
        differ = np.mean(found.masks != golden[f"{name}_final_masks"][order])
        assert differ <= 1e-3, (name, differ)
    assert es3.text("liver") is es3.text("liver")  # kept per phrase


def test_phantom_find_in_slices_with_the_real_network(es3):
    from napari_medsam.phantoms import make_ct_phantom

    volume, _, _ = make_ct_phantom()
    seg = ConceptSegmenter(es3, volume, threshold=GOLDEN_THRESHOLD)
    found = seg.find(28, "liver")
    assert len(found) >= 1 and found.masks.shape[1:] == volume.shape[1:]
    assert np.all(np.diff(found.scores) <= 0) and np.all(found.scores > GOLDEN_THRESHOLD)
    track = seg.find_in_slices(range(27, 30), "liver", seed=(28, found.masks[0]))
    assert set(track.candidates) == {27, 29} and seg.is_embedded(27)
    labels = np.zeros(volume.shape, np.uint8)
    result = track.write(labels, 1, spacing_mm=volume.spacing_mm)
    assert set(result.written_slices) == set(track.slices) and 28 in track.slices
    np.testing.assert_array_equal(labels == 1, track.to_volume(volume.shape))


def test_wrong_checkpoints_and_vocabularies_are_named(golden_dir, tmp_path):
    folder = golden_dir / "efficientsam3"
    with pytest.raises(WeightsError, match="SAM-family"):
        ConceptModel.from_checkpoint(weights=golden_dir / "mobile_sam_random.pt",
                                     vocabulary=folder / "bpe_simple_vocab_16e6.txt.gz")
    text = tmp_path / "vocab.txt.gz"
    text.write_text("not gzip")
    with pytest.raises(WeightsError, match="CLIP vocabulary"):
        ConceptModel.from_checkpoint(weights=folder / "es3_reduced_random.pt", vocabulary=text)
    with pytest.raises(WeightsError, match="does not exist"):
        ConceptModel.from_checkpoint(weights=tmp_path / "missing.pt", vocabulary=text)
    import torch

    state = torch.load(folder / "es3_reduced_random.pt", weights_only=True)["model"]
    cut = {k: v for k, v in state.items() if not k.startswith("detector.segmentation_head.instance_seg_head")}
    torch.save({"model": cut}, tmp_path / "cut.pt")
    with pytest.raises(WeightsError, match="cut.pt cannot be loaded as an EfficientSAM3.*instance_seg_head"):
        ConceptModel.from_checkpoint(weights=tmp_path / "cut.pt", vocabulary=folder / "bpe_simple_vocab_16e6.txt.gz")
