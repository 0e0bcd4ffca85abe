"""Prepared slices: the decoder's prompt-independent work done once per slice (SamModel.prepare_prompts).

The prepared path must give what the plain decoder gives (golden equality is checked in
test_networks.py), stay out of the way of mask prompts, never serve a changed decoder, and keep a
bounded number of slices.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_medsam.segment import model as model_module
from napari_medsam.segment.predictor import Prompts, SlicePredictor
from test_predictor import tiny_model

pytestmark = pytest.mark.usefixtures("two_torch_threads")

PROMPTS = {
    "box": Prompts(box=[8.0, 10.0, 40.0, 44.0]),
    "click": Prompts(points=np.array([[20.0, 25.0]]), positive=np.array([True])),
    "clicks": Prompts(points=np.array([[20.0, 25.0], [50.0, 12.0], [30.0, 30.0]]),
                      positive=np.array([True, False, True])),
    "box+clicks": Prompts(points=np.array([[20.0, 25.0], [5.0, 5.0]]), positive=np.array([True, False]),
                          box=[8.0, 10.0, 40.0, 44.0]),
}


def _volume(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vol = rng.normal(0.0, 30.0, (5, 64, 72)).astype(np.float32)
    vol[:, 15:45, 18:50] += 200.0  # a bright block: masks with edges
    return vol


@pytest.fixture()
def pair():
    """Two predictors on one tiny model and volume: one prepares its slices, one never does."""
    model = tiny_model()
    plain_model = tiny_model()  # the same seed: the same weights, its own prepared store
    vol = _volume()
    return SlicePredictor(model, vol), SlicePredictor(plain_model, vol)


@pytest.mark.parametrize("multimask", [False, True])
@pytest.mark.parametrize("name", list(PROMPTS))
def test_prepared_slice_predicts_what_the_plain_decoder_does(pair, name, multimask):
    prepared, plain = pair
    assert prepared.prepare(2) is True
    assert prepared.model.prepared(prepared.key(2)) is not None
    got = prepared.predict(2, PROMPTS[name], multimask=multimask, keep_logits=True)
    want = plain.predict(2, PROMPTS[name], multimask=multimask, keep_logits=True)
    assert got.masks.shape == want.masks.shape == ((3 if multimask else 1), 64, 72)
    np.testing.assert_allclose(got.low_res_logits, want.low_res_logits, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(got.scores, want.scores, atol=2e-6, rtol=1e-5)
    flips = got.masks != want.masks
    assert flips.sum() <= 3 and (not flips.any() or np.abs(want.logits[flips]).max() < 1e-4)
    assert want.masks.any() and (~want.masks).any()  # a real mask with edges, not a trivial one


def test_prepared_slice_does_not_read_the_embedding_for_points_and_boxes(pair, monkeypatch):
    prepared, _ = pair
    prepared.prepare(1)
    reads = []
    original = prepared.embed
    monkeypatch.setattr(prepared, "embed", lambda index: reads.append(index) or original(index))
    first = prepared.predict(1, PROMPTS["box"])
    assert reads == []
    # A previous mask as a prompt makes the image side prompt-dependent: the plain path, with the embedding.
    refine = Prompts(box=[8.0, 10.0, 40.0, 44.0], mask_logits=first.low_res_logits[0])
    prepared.predict(1, refine)
    assert reads == [1]


def test_mask_prompts_give_exactly_the_plain_result(pair):
    prepared, plain = pair
    prepared.prepare(3)
    logits = plain.predict(3, PROMPTS["box"]).low_res_logits[0]
    refine = Prompts(points=np.array([[20.0, 25.0]]), positive=np.array([True]), mask_logits=logits)
    got, want = prepared.predict(3, refine, keep_logits=True), plain.predict(3, refine, keep_logits=True)
    np.testing.assert_array_equal(got.low_res_logits, want.low_res_logits)
    np.testing.assert_array_equal(got.masks, want.masks)


def test_a_changed_decoder_is_never_served_stale_work(pair):
    prepared, plain = pair
    prepared.prepare(0)
    key = prepared.key(0)
    assert prepared.model.prepared(key) is not None
    # Fine-tuning changes the decoder in place (optimizer steps, load_state_dict): the work is stale.
    for model in (prepared.model, plain.model):
        with torch.no_grad():
            model.network.mask_decoder.transformer.layers[0].cross_attn_token_to_image.k_proj.weight.mul_(1.5)
    assert prepared.model.prepared(key) is None
    got = prepared.predict(0, PROMPTS["box"], keep_logits=True)
    want = plain.predict(0, PROMPTS["box"], keep_logits=True)
    np.testing.assert_array_equal(got.low_res_logits, want.low_res_logits)  # the plain path, same weights
    # The prompt encoder too (its no-mask embedding enters the shared image tokens).
    prepared.prepare(0)
    with torch.no_grad():
        prepared.model.network.prompt_encoder.no_mask_embed.weight.add_(0.1)
    assert prepared.model.prepared(key) is None
    # A replaced decoder module as well.
    prepared.prepare(0)
    import copy

    prepared.model.network.mask_decoder = copy.deepcopy(prepared.model.network.mask_decoder)
    assert prepared.model.prepared(key) is None


def test_only_the_last_few_slices_are_kept(pair, monkeypatch):
    prepared, _ = pair
    monkeypatch.setattr(model_module, "PREPARED_SLICES", 2)
    keep = 2
    for index in range(keep + 2):
        prepared.prepare(index)
    kept = [i for i in range(keep + 2) if prepared.model.prepared(prepared.key(i)) is not None]
    assert kept == list(range(2, keep + 2))
    prepared.prepare(2)  # used again: the newest now, so the next one pushes out slice 3 instead
    prepared.prepare(0)
    assert prepared.model.prepared(prepared.key(2)) is not None
    assert prepared.model.prepared(prepared.key(keep + 1)) is None


def test_decode_without_an_embedding_needs_a_prepared_slice():
    model = tiny_model()
    geometry = model.geometry(64, 64)
    with pytest.raises(ValueError, match="embedding is needed"):
        model.decode(None, geometry, box_xyxy=np.array([5.0, 5.0, 30.0, 30.0]))


def test_segment_everything_reuses_the_prepared_work_of_its_slice(pair, monkeypatch):
    from napari_medsam.segment.everything import EverythingSettings, segment_everything

    prepared, plain = pair
    settings = EverythingSettings(points_per_side=6, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    want = segment_everything(plain, 2, settings)
    prepared.prepare(2)
    decoder = prepared.model.network.mask_decoder
    calls = []
    original = decoder.share_image
    monkeypatch.setattr(decoder, "share_image", lambda *a, **k: calls.append(1) or original(*a, **k))
    got = segment_everything(prepared, 2, settings)
    assert calls == []  # the slice's own shared work came from prepare
    assert len(got.candidates) == len(want.candidates) > 0
    for a, b in zip(got.candidates, want.candidates):
        assert np.count_nonzero(a.mask != b.mask) <= 3
    segment_everything(prepared, 3, settings)  # another slice, not prepared: computed as before
    assert calls == [1]
