"""The SAM 2 network and the memory tracker against the official MedSAM2 code, step by step.

``../shared/golden/sam2`` holds a reduced SAM 2.1 t512 model with seeded random weights in the
official checkpoint format and every array the official MedSAM2 3D-CT flow computed from it
(see its README): the key slice prompted with a box, a forward pass, a reset, a reverse pass,
and the same with the object judged absent on every tracked slice ("noobj"). Tolerances are the
README's: logits and pointers 1e-6, object scores 1e-6, memory features one bfloat16 step on a
small fraction of elements (the rounding to bfloat16 flips where the float32 value moves by
~1e-8), masks a few flips where |logit| < 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_medsam.models.networks.sam2 import load_sam2
from napari_medsam.segment.memory.tracker import MemoryTracker

REDUCED = dict(embed_dim=16, stages=(1, 1, 3, 2), global_att_blocks=(4,), memory_layers=2, memory_ffn=1024)
NOOBJ_BIAS = "sam_mask_decoder.pred_obj_score_head.layers.2.bias"


@pytest.fixture(scope="module")
def gold(golden_dir):
    with np.load(golden_dir / "sam2" / "sam2_medsam2_golden.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def state(golden_dir):
    return torch.load(golden_dir / "sam2" / "sam2_t512_reduced_random.pt", map_location="cpu",
                      weights_only=True)["model"]


def model_input(volume_uint8: np.ndarray, index: int) -> torch.Tensor:
    """MedSAM2's slice input, from the project's pipeline."""
    from napari_medsam.models import pipelines

    rgb = np.repeat(volume_uint8[index][..., None], 3, axis=2)
    return pipelines.prepare_image("medsam2", rgb, 512).tensor


_FEATURES: dict[int, object] = {}  # slice features, shared by the tests (the object-score bias does not change them)


def _tracker(state, gold, bias: np.ndarray | None = None):
    sd = dict(state)
    if bias is not None:
        sd[NOOBJ_BIAS] = torch.as_tensor(bias)
    net = load_sam2("hiera_t512", sd, **REDUCED)
    cache = _FEATURES

    def features(index: int):
        if index not in cache:
            with torch.inference_mode():
                cache[index] = net.encode_frame(model_input(gold["volume_uint8"], index))
        return cache[index]

    volume = gold["volume_uint8"]
    return MemoryTracker(net, features, volume.shape[0], volume.shape[1:]), cache


def _box(gold) -> np.ndarray:
    return gold["box"].astype(np.float32)


def close(actual, expected, atol: float, what: str) -> None:
    actual = np.asarray(actual, np.float32)
    diff = float(np.max(np.abs(actual - expected))) if actual.size else 0.0
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert diff <= atol, f"{what}: max abs diff {diff:.3g} > {atol}"


def bf16_close(actual: torch.Tensor, expected: np.ndarray, what: str) -> None:
    """Memory features: equal, except one bfloat16 step (or 1e-6) on at most 0.5% of the elements."""
    a = actual.float().cpu().numpy().reshape(expected.shape)
    diff = np.abs(a - expected)
    # One bf16 step is 2**-7 .. 2**-8 of |x|; a value may cross to the next power of two.
    # Near zero the float32 values before rounding (~1e-7 apart, like the other features) decide.
    step = np.maximum(np.maximum(np.abs(expected), np.abs(a)) * 2.0 ** -7, 1e-6)
    assert np.all(diff <= step), f"{what}: a difference beyond one bfloat16 step (max {diff.max():.3g})"
    assert np.mean(diff > 0) <= 0.005, f"{what}: {np.mean(diff > 0):.2%} of the elements differ"


def masks_close(actual: np.ndarray, expected: np.ndarray, logits: np.ndarray, what: str) -> None:
    wrong = actual.astype(bool) != expected.astype(bool)
    assert not np.any(wrong & (np.abs(logits) > 1e-5)), f"{what}: masks differ where |logit| > 1e-5"
    assert wrong.sum() <= 20, f"{what}: {wrong.sum()} pixels differ"


def test_backbone_and_input(state, gold):
    net = load_sam2("hiera_t512", state, **REDUCED)
    x = model_input(gold["volume_uint8"], int(gold["key_slice_idx"]))
    close(x.numpy(), gold["key_slice_input"], 0.0, "model input")
    with torch.inference_mode():
        feats = net.encode_frame(x)
    close(feats.level0.numpy(), gold["key_backbone_fpn0"], 1e-5, "backbone level 0")
    close(feats.level1.numpy(), gold["key_backbone_fpn1"], 1e-5, "backbone level 1")
    close(feats.top.numpy(), gold["key_backbone_fpn2"], 1e-5, "backbone level 2")
    close(net.top_position().numpy(), gold["key_vision_pos_enc2"], 1e-6, "top-level position encoding")
    close(net.memory_position()[0].numpy(), gold["fwd_maskmem_pos_enc"], 1e-6, "memory position encoding")


@pytest.mark.parametrize("scenario", ["", "noobj_"])
def test_key_slice_and_both_passes(state, gold, scenario):
    bias = gold[f"{scenario}obj_score_head_bias"] if scenario else None
    tracker, _ = _tracker(state, gold, bias)
    key = int(gold["key_slice_idx"])
    out = tracker.add_prompts(1, key, box_xyxy=_box(gold))
    g = lambda name: gold[f"{scenario}{name}"]  # noqa: E731
    close(out.low_res_logits, g("key_lowres_logits"), 1e-6, "key low-res logits")
    close(out.logits, g("key_video_logits"), 1e-6, "key video-res logits")
    close(out.object_score, g("key_object_score_logits"), 1e-6, "key object score")
    close(tracker._objects[1].keys[key].obj_ptr[0].numpy(), g("key_obj_ptr"), 1e-6, "key object pointer")
    union = np.zeros(gold["volume_uint8"].shape, bool)
    for name, step in (("fwd", +1), ("rev", -1)):
        walk = tracker.walk(1, step)
        for row, index in enumerate(g(f"{name}_frame_idx")):
            index = int(index)
            result = walk.track(index)
            what = f"{scenario}{name} slice {index}"
            close(result.low_res_logits, g(f"{name}_lowres_logits")[row], 1e-6, f"{what} low-res logits")
            close(result.logits, g(f"{name}_video_logits")[row], 1e-6, f"{what} video-res logits")
            close(result.object_score, g(f"{name}_object_score_logits")[row], 1e-6, f"{what} object score")
            output = walk.outputs.get(index) or tracker._objects[1].keys[index]
            close(output.obj_ptr[0].numpy(), g(f"{name}_obj_ptr")[row], 1e-6, f"{what} object pointer")
            memory = output.memory if index != key else tracker.key_memory(1, key)
            bf16_close(memory, g(f"{name}_maskmem_features")[row], f"{what} memory")
            assert memory.dtype == torch.bfloat16
            masks_close(result.mask, g(f"{name}_masks")[row], result.logits, f"{what} mask")
            union[index] |= result.mask
    wrong = union != g("segs_3D_union").astype(bool)
    assert wrong.sum() <= 40, f"{scenario}union: {wrong.sum()} voxels differ"


def test_absent_slices_store_the_no_object_pointer_and_masks(state, gold):
    tracker, _ = _tracker(state, gold, gold["noobj_obj_score_head_bias"])
    tracker.add_prompts(1, 5, box_xyxy=_box(gold))
    walk = tracker.walk(1, +1)
    out = walk.track(6)
    assert not out.present and not out.mask.any()
    assert np.all(out.low_res_logits == -1024.0)
    assert torch.equal(walk.outputs[6].obj_ptr, tracker.network.no_obj_ptr)


class _Slices:
    """The few predictor attributes a propagation run reads, over golden-model features."""

    axis = 0
    spacing_mm = (1.0, 1.0, 1.0)

    def __init__(self, gold, cache, tracker):
        self.gold, self.cache, self.tracker = gold, cache, tracker
        self.n_slices = gold["volume_uint8"].shape[0]
        self.slice_shape = gold["volume_uint8"].shape[1:]

    def embed(self, index):
        return self.tracker.features(index)

    def image(self, index):
        return self.gold["hu_volume"][index]


@pytest.mark.parametrize("scenario", ["", "noobj_"])
def test_official_flow_gives_medsam2s_volume(state, gold, scenario):
    """Box on slice 5, both passes, union, largest 26-connected component: MedSAM2's segs_3D."""
    from napari_medsam.segment.memory.engine import propagate_memory
    from napari_medsam.segment.postprocess import PostProcess
    from napari_medsam.segment.predictor import Prompts

    bias = gold[f"{scenario}obj_score_head_bias"] if scenario else None
    tracker, cache = _tracker(state, gold, bias)
    labels = np.zeros(gold["volume_uint8"].shape, np.uint8)
    x0, y0, x1, y1 = gold["box"]
    result = propagate_memory(_Slices(gold, cache, tracker), labels, 1, {5: Prompts(box=[y0, x0, y1, x1])},
                              tracker=tracker, official=True, prefetch=False,
                              postprocess=PostProcess(largest_component=True, connectivity=3))
    expected = gold[f"{scenario}segs_3D"].astype(bool)
    wrong = (labels == 1) != expected
    assert wrong.sum() <= 40, f"{wrong.sum()} voxels differ from MedSAM2's result"
    scores = {r.index: r.object_score for r in result.reports if r.object_score is not None}
    assert sorted(scores) == list(range(12))
    assert scores[5] == pytest.approx(float(gold[f"{scenario}key_object_score_logits"]), abs=1e-6)
    assert scores[11] == pytest.approx(float(gold[f"{scenario}fwd_object_score_logits"][-1]), abs=1e-6)
    result.undo.undo(labels)
    assert not labels.any()


def test_memory_engine_through_the_slice_predictor_and_its_caches(state, gold, tmp_path):
    """The real path of the panel and the CLI: SamModel + SlicePredictor (MedSAM2's CT windowing from
    the scan's window, features from the memory and disk caches) -> MedSAM2's volume; a second run
    reads every slice's features back from the disk cache and gives the same labels."""
    from napari_medsam.segment.cache import DiskCache, EmbeddingCache, MemoryCache
    from napari_medsam.segment.intensity import IntensityMapping
    from napari_medsam.segment.memory.engine import propagate_memory, tracker_for
    from napari_medsam.segment.model import SamModel
    from napari_medsam.segment.postprocess import PostProcess
    from napari_medsam.segment.predictor import Prompts, SlicePredictor
    from napari_medsam.volume import Volume

    volume = Volume(gold["hu_volume"], (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3), modality="CT",
                    intensity_unit="HU")
    window = IntensityMapping("window", *(float(v) for v in gold["window"]))
    x0, y0, x1, y1 = (float(v) for v in gold["box"])
    runs = []
    for _ in range(2):
        model = SamModel(load_sam2("hiera_t512", state, **REDUCED), "medsam2", name="medsam2-golden",
                         signature="medsam2-golden:1")
        cache = EmbeddingCache(MemoryCache(), DiskCache(tmp_path / "cache"))
        predictor = SlicePredictor(model, volume, mapping=window, cache=cache)
        labels = np.zeros(volume.array.shape, np.uint8)
        result = propagate_memory(predictor, labels, 1, {5: Prompts(box=[y0, x0, y1, x1])},
                                  tracker=tracker_for(predictor), official=True,
                                  postprocess=PostProcess(largest_component=True, connectivity=3))
        assert cache.flush(30)
        runs.append((labels, result, predictor))
    expected = gold["segs_3D"].astype(bool)
    for labels, result, _ in runs:
        wrong = (labels == 1) != expected
        assert wrong.sum() <= 40, f"{wrong.sum()} voxels differ from MedSAM2's result"
    assert np.array_equal(runs[0][0], runs[1][0])
    assert runs[1][2].cache.disk is not None and len(runs[1][2].cache.cached_indices(runs[1][2].key(0))) == 12


def test_objects_are_tracked_independently_and_reset(state, gold):
    """A second object (a mask on another slice) does not change the first one's track; reset forgets all."""
    tracker, _ = _tracker(state, gold)
    other = np.zeros(gold["volume_uint8"].shape[1:], bool)
    other[60:80, 10:40] = True
    tracker.add_mask(2, 7, other)
    tracker.add_prompts(1, 5, box_xyxy=_box(gold))
    assert tracker.objects == [1, 2] and tracker.key_slices(2) == [7]
    walk2 = tracker.walk(2, -1)
    for index in (6, 5, 4):
        walk2.track(index)
    walk1 = tracker.walk(1, +1)
    for row, index in enumerate(gold["fwd_frame_idx"][1:4], start=1):
        out = walk1.track(int(index))
        close(out.low_res_logits, gold["fwd_lowres_logits"][row], 1e-6, f"object 1 slice {index}")
    key2 = tracker.add_mask(2, 7, other)
    assert key2.key and key2.object_score == 10.0 and key2.iou == 1.0
    empty = tracker.add_mask(3, 2, np.zeros_like(other))
    assert empty.object_score == -10.0 and not empty.mask.any()
    with pytest.raises(ValueError, match="slices are"):
        tracker.add_mask(2, 7, other[:10])
    with pytest.raises(IndexError):
        tracker.add_prompts(1, 12, box_xyxy=_box(gold))
    tracker.reset()
    assert tracker.objects == []
    with pytest.raises(ValueError, match="no key slice"):
        tracker.walk(1, +1)
