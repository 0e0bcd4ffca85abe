"""SamModel and SlicePredictor: golden equivalence through the engine, caching, geometry."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from napari_medsam.models import pipelines
from napari_medsam.models.checkpoint import load_network
from napari_medsam.models.registry import MODELS
from napari_medsam.models.networks.sam import build_network
from napari_medsam.segment.intensity import ct_window, data_range_window
from napari_medsam.segment.model import SamModel
from napari_medsam.segment.predictor import Prompts, SlicePredictor


def tiny_model(pipeline: str = "sam", seed: int = 0) -> SamModel:
    """A one-block ViT of the real code with random weights: fast, for mechanics tests."""
    torch.manual_seed(seed)
    net = build_network("vit_b", embed_dim=64, depth=1, num_heads=2, global_attn_indexes=[0])
    return SamModel(net, pipeline, name=f"tiny-{pipeline}", signature=f"tiny-{pipeline}-{seed}")


pytestmark = pytest.mark.usefixtures("two_torch_threads")


@pytest.fixture(scope="module")
def mobile_sam(golden_dir):
    net = load_network("mobile_sam", golden_dir / "mobile_sam_random.pt")
    return SamModel(net, "sam", name="mobile_sam", signature="golden-mobile-sam")


@pytest.fixture(scope="module")
def medsam_vit_b(golden_dir):
    """MedSAM's pipeline on the official ViT-B code with 2 blocks (the golden checkpoint's variant)."""
    spec = dataclasses.replace(MODELS["medsam"], name="medsam_depth2",
                               arch_options=(("depth", 2), ("global_attn_indexes", (1,))))
    net = load_network(spec, golden_dir / "sam_vit_b_depth2_random.pth")
    assert spec.architecture == "vit_b" and spec.pipeline == "medsam"
    return SamModel(net, spec.pipeline, name=spec.name, signature="golden-medsam-depth2")


def _assert_mask(got, expected, score, threshold: float, max_flips: int = 20, margin: float = 1e-5) -> None:
    """Masks agree except at most ``max_flips`` pixels, all with |score - threshold| < margin."""
    flips = np.asarray(got, bool) != np.asarray(expected, bool)
    assert flips.sum() <= max_flips, f"{flips.sum()} mask pixels differ"
    if flips.any():
        assert np.abs(np.asarray(score)[flips] - threshold).max() < margin


def test_engine_reproduces_official_mobile_sam(golden_dir, mobile_sam):
    golden = np.load(golden_dir / "mobile_sam_golden.npz")
    image = golden["image"]
    embedding = mobile_sam.encode(image)
    np.testing.assert_allclose(embedding, golden["image_embedding"], atol=1e-4)
    geometry = mobile_sam.geometry(*image.shape[:2])
    assert geometry.input_size == tuple(golden["input_size"])
    # (a) box, exact official post-processing: the same mask up to pixels on the threshold.
    a = mobile_sam.decode(golden["image_embedding"], geometry, box_xyxy=golden["box"], exact=True, keep_logits=True)
    np.testing.assert_allclose(a.low_res_logits, golden["a_low_res_logits"][0:1], atol=1e-6, rtol=1e-4)
    np.testing.assert_allclose(a.scores, golden["a_iou_predictions"], atol=1e-6)
    flips = a.masks != golden["a_masks"]
    assert flips.sum() <= 20 and np.all(np.abs(golden["a_upscaled_logits"][flips]) < 1e-5)
    # (b) one positive + one negative point, three masks, best first.
    b = mobile_sam.decode(golden["image_embedding"], geometry, points_xy=golden["point_coords"],
                          point_labels=golden["point_labels"], multimask=True, exact=True)
    order = np.argsort(-golden["b_iou_predictions"])
    np.testing.assert_allclose(b.scores, golden["b_iou_predictions"][order], atol=1e-6)
    assert (b.masks != golden["b_masks"][order]).sum() <= 30
    # (c) box + the previous low-res logits as a mask prompt.
    c = mobile_sam.decode(golden["image_embedding"], geometry, box_xyxy=golden["box"],
                          mask_logits=golden["c_mask_input"], exact=True)
    np.testing.assert_allclose(c.low_res_logits, golden["c_low_res_logits"], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("case", ["a", "b", "c"])
def test_fast_upsampling_equals_the_official_chain(golden_dir, mobile_sam, case):
    golden = np.load(golden_dir / "mobile_sam_golden.npz")
    geometry = mobile_sam.geometry(*golden["image"].shape[:2])
    low = torch.as_tensor(golden[f"{case}_low_res_logits"])[None]
    fast = mobile_sam._fast_upsample(low, geometry, geometry.original_size)[0].numpy()
    official = pipelines.sam_postprocess(low, geometry.input_size, geometry.original_size)[0].numpy()
    np.testing.assert_allclose(fast, official, atol=1e-6)
    assert np.array_equal(fast > 0, golden[f"{case}_masks"]) or (
        np.abs(official[(fast > 0) != golden[f"{case}_masks"]]).max() < 1e-6
    )


@pytest.mark.parametrize("pipeline,image_size,input_size,out_size", [
    ("sam", 1024, (1024, 1024), (512, 512)),
    ("sam", 1024, (1024, 731), (700, 500)),  # a crop on one axis, downsized unevenly
    ("sam", 1024, (683, 1024), (2000, 3000)),  # an output larger than the model's grid
    ("medsam", 1024, (1024, 1024), (37, 257)),
    ("lite_medsam", 256, (256, 171), (333, 222)),
])
def test_resize_chain_equals_the_dense_matrix_products(pipeline, image_size, input_size, out_size):
    """The banded row step gives the two dense products' result for every pipeline and odd sizes."""
    from napari_medsam.segment.model import _row_band, chain_matrices, resize_chain

    values = torch.randn(3, 256, 256, generator=torch.Generator().manual_seed(1)) * 10
    rows, cols = chain_matrices(pipeline, image_size, input_size, out_size, torch.device("cpu"), 256)
    dense = torch.matmul(torch.matmul(rows, values), cols.t())
    fast = resize_chain(pipeline, image_size, input_size, out_size, values)
    assert fast.shape == (3, *out_size)
    torch.testing.assert_close(fast, dense, atol=2e-5, rtol=1e-5)
    index, weight = _row_band(rows)
    assert index.shape[1] <= 4  # a bilinear chain mixes a few neighbouring rows only
    with pytest.raises(ValueError, match="not banded"):
        _row_band(torch.tensor([[1.0, 0.0, 0.0, 2.0]]).expand(2, 4))


@pytest.mark.parametrize("pipeline", ["medsam", "lite_medsam"])
def test_fast_upsampling_equals_medsam_chains(golden_dir, pipeline):
    golden = np.load(golden_dir / f"{pipeline}_golden.npz")
    low = torch.as_tensor(golden["low_res_logits"]).reshape(-1, 1, 256, 256)
    shape = golden["image"].shape[:2] if pipeline == "medsam" else golden["hu_slice"].shape
    model = tiny_model(pipeline)
    if pipeline == "lite_medsam":
        model.image_size = 256
    geometry = model.geometry(*shape)
    fast = model._fast_upsample(low.transpose(0, 1), geometry, tuple(shape))[0].numpy()
    if pipeline == "medsam":
        official = pipelines.medsam_postprocess(low, tuple(shape))[:, 0].numpy()
        np.testing.assert_allclose(fast + 0.5, official, atol=1e-7)
        flips = (fast[0] > 0) != golden["medsam_seg"].astype(bool)
        assert flips.sum() <= 20 and np.all(np.abs(official[0][flips] - 0.5) < 1e-6)
    else:
        official = pipelines.lite_medsam_postprocess(low, geometry.input_size, tuple(shape))[:, 0].numpy()
        np.testing.assert_allclose(torch.sigmoid(torch.as_tensor(fast)).numpy(), official, atol=1e-7)
        flips = (fast > 0) != golden["masks"].astype(bool)
        assert flips.sum() <= 20 and np.all(np.abs(official[flips] - 0.5) < 1e-6)


def _volume():
    rng = np.random.default_rng(0)
    vol = rng.normal(40, 10, (6, 48, 40)).astype(np.int16)
    vol[:, 10:30, 12:28] += 200
    return vol


def test_embeddings_are_cached_per_slice_and_mapping(monkeypatch):
    model = tiny_model()
    calls = []
    original = model.encode
    monkeypatch.setattr(model, "encode", lambda rgb: calls.append(rgb.shape) or original(rgb))
    predictor = SlicePredictor(model, _volume(), mapping=ct_window("soft tissue"))
    first = predictor.embed(2)
    again = predictor.embed(2)
    assert len(calls) == 1 and np.array_equal(first, again)
    assert predictor.is_embedded(2) and not predictor.is_embedded(3)
    predictor.set_mapping(ct_window("bone"))
    assert not predictor.is_embedded(2)
    predictor.embed(2)
    assert len(calls) == 2
    predictor.set_mapping(ct_window("soft tissue"))
    assert predictor.is_embedded(2)  # the old window's embedding was kept


def test_predict_returns_masks_on_the_slice_grid_best_first():
    predictor = SlicePredictor(tiny_model(), _volume(), mapping=ct_window("soft tissue"))
    out = predictor.predict(3, Prompts(points=[[20, 20], [5, 5]], positive=[True, False]), multimask=True)
    assert out.masks.shape == (3, 48, 40) and out.masks.dtype == bool
    assert np.all(np.diff(out.scores) <= 0)
    assert out.low_res_logits.shape == (3, 256, 256)
    boxed = predictor.predict(3, Prompts(box=[30, 28, 10, 12]))  # corners in any order
    assert boxed.masks.shape == (1, 48, 40)
    again = predictor.predict(3, Prompts(box=[10, 12, 30, 28], mask_logits=boxed.low_res_logits[0]))
    assert again.masks.shape == (1, 48, 40)
    with pytest.raises(ValueError, match="outside"):
        predictor.predict(3, Prompts(points=[[60, 5]]))
    with pytest.raises(ValueError, match="no prompt"):
        predictor.predict(3, Prompts())
    with pytest.raises(IndexError):
        predictor.embed(6)


def test_anisotropic_planes_are_resampled_to_square_pixels():
    volume = _volume()
    predictor = SlicePredictor(tiny_model(), volume, mapping=ct_window("soft tissue"), axis=1,
                               spacing_mm=(3.0, 0.75, 0.75))
    assert predictor.slice_shape == (6, 40)
    assert predictor.model_image(10).shape == (24, 40, 3)  # 6 slices x 3 mm = 24 px of 0.75 mm
    out = predictor.predict(10, Prompts(points=[[3, 20]]))
    assert out.masks.shape == (1, 6, 40)


@pytest.mark.slow
def test_sam_model_reproduces_official_medsam_vit_b(golden_dir, medsam_vit_b):
    golden = np.load(golden_dir / "medsam_golden.npz")
    image = golden["image"]
    np.testing.assert_allclose(medsam_vit_b.encode(image), golden["image_embedding"], atol=1e-4)
    geometry = medsam_vit_b.geometry(*image.shape[:2])
    assert geometry.input_size == (1024, 1024)  # MedSAM stretches the image: no aspect ratio kept
    # From the official embedding, so the decoder and the post-processing are checked on their own.
    exact = medsam_vit_b.decode(golden["image_embedding"], geometry, box_xyxy=golden["box"][0], exact=True,
                                keep_logits=True)
    np.testing.assert_allclose(exact.low_res_logits, golden["low_res_logits"][0], atol=1e-6, rtol=1e-4)
    np.testing.assert_allclose(exact.scores, golden["iou_predictions"][0], atol=1e-6, rtol=1e-4)
    np.testing.assert_allclose(exact.logits[0], golden["prob_upsampled"], atol=1e-6, rtol=1e-4)
    _assert_mask(exact.masks[0], golden["medsam_seg"], golden["prob_upsampled"], 0.5)
    fast = medsam_vit_b.decode(golden["image_embedding"], geometry, box_xyxy=golden["box"][0], keep_logits=True)
    np.testing.assert_allclose(fast.logits[0] + 0.5, golden["prob_upsampled"], atol=1e-6)
    _assert_mask(fast.masks[0], golden["medsam_seg"], golden["prob_upsampled"], 0.5)


def test_lite_medsam_pipeline_runs_through_the_predictor(golden_dir):
    # The official LiteMedSAM flow end to end through SlicePredictor: the golden CT slice as a
    # one-slice volume, MedSAM's own CT preprocessing as the intensity mapping, boxes as prompts.
    golden = np.load(golden_dir / "lite_medsam_golden.npz")
    net = load_network("lite_medsam", golden_dir / "lite_medsam_random.pth")
    model = SamModel(net, "lite_medsam", name="lite_medsam", signature="golden-lite")
    hu = golden["hu_slice"]
    predictor = SlicePredictor(model, hu[None], mapping=data_range_window(hu, level=40, width=400))
    np.testing.assert_array_equal(predictor.model_image(0), golden["img_3c"])
    np.testing.assert_allclose(predictor.embed(0), golden["image_embedding"], atol=1e-4)
    for i, (x0, y0, x1, y1) in enumerate(golden["boxes"]):
        out = predictor.predict(0, Prompts(box=[y0, x0, y1, x1]), exact=True, keep_logits=True)
        assert out.masks.shape == (1, *hu.shape)
        np.testing.assert_allclose(out.low_res_logits[0], golden["low_res_logits"][i, 0], atol=1e-6, rtol=1e-4)
        np.testing.assert_allclose(out.scores, golden["iou_predictions"][i], atol=1e-6, rtol=1e-4)
        _assert_mask(out.best, golden["masks"][i], golden["prob_upsampled"][i], 0.5)
        fast = predictor.predict(0, Prompts(box=[y0, x0, y1, x1]))  # the default way back to the slice
        _assert_mask(fast.best, golden["masks"][i], golden["prob_upsampled"][i], 0.5)


@pytest.mark.slow
def test_medsam_pipeline_runs_through_the_predictor(golden_dir, medsam_vit_b, monkeypatch):
    # MedSAM's golden input is a colour picture, which no scan mapping produces: the predictor's
    # model image is replaced by it; encoding, prompt mapping and decoding are the predictor's own.
    golden = np.load(golden_dir / "medsam_golden.npz")
    image = golden["image"]
    predictor = SlicePredictor(medsam_vit_b, np.zeros((1, *image.shape[:2]), np.int16), mapping=ct_window("soft tissue"))
    monkeypatch.setattr(predictor, "model_image", lambda index, *mapping_and_axis: image)
    x0, y0, x1, y1 = golden["box"][0]
    out = predictor.predict(0, Prompts(box=[y0, x0, y1, x1]), exact=True, keep_logits=True)
    np.testing.assert_allclose(predictor.embed(0), golden["image_embedding"], atol=1e-4)
    assert out.masks.shape == (1, *image.shape[:2])
    np.testing.assert_allclose(out.low_res_logits[0], golden["low_res_logits"][0, 0], atol=1e-6, rtol=1e-4)
    np.testing.assert_allclose(out.scores, golden["iou_predictions"][0], atol=1e-6, rtol=1e-4)
    _assert_mask(out.best, golden["medsam_seg"], golden["prob_upsampled"], 0.5)
    fast = predictor.predict(0, Prompts(box=[y0, x0, y1, x1]))
    _assert_mask(fast.best, golden["medsam_seg"], golden["prob_upsampled"], 0.5)


def test_from_checkpoint_loads_a_local_weight_file(golden_dir):
    before = torch.get_num_threads()  # 2 in this module: ask for another count to see it applied
    try:
        model = SamModel.from_checkpoint("lite_medsam", weights=golden_dir / "lite_medsam_random.pth", device="cpu",
                                         download=False, threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert model.pipeline == "lite_medsam" and model.image_size == 256
    assert model.signature.startswith("lite_medsam:lite_medsam_random.pth:")
    from napari_medsam.errors import WeightsError

    with pytest.raises(WeightsError, match="LiteMedSAM|MobileSAM"):
        SamModel.from_checkpoint("mobile_sam", weights=golden_dir / "lite_medsam_random.pth", device="cpu",
                                 download=False)


def test_a_mapping_change_during_embedding_cannot_store_under_the_wrong_key(monkeypatch):
    """The window combo may change the mapping while a worker is embedding: the embedding must be
    stored under the key of the mapping it was computed with, never under the new one's."""
    model = tiny_model()
    volume = _volume()
    soft, bone = ct_window("soft tissue"), ct_window("bone")
    predictor = SlicePredictor(model, volume, mapping=soft)
    lookup = predictor.cache.get_or_compute

    def lookup_while_the_user_switches_window(key, compute):
        predictor.set_mapping(bone)  # the UI thread switches the window after the key was made
        return lookup(key, compute)

    monkeypatch.setattr(predictor.cache, "get_or_compute", lookup_while_the_user_switches_window)
    got = predictor.embed(2)
    monkeypatch.setattr(predictor.cache, "get_or_compute", lookup)
    # What each mapping really gives, computed by separate predictors with their own caches.
    expected = {m.signature: SlicePredictor(model, volume, mapping=m).embed(2) for m in (soft, bone)}
    assert not np.allclose(expected[soft.signature], expected[bone.signature])
    np.testing.assert_array_equal(got, expected[soft.signature])
    for m in (soft, bone):
        predictor.set_mapping(m)
        if predictor.is_embedded(2):
            np.testing.assert_array_equal(predictor.cache.get(predictor.key(2)), expected[m.signature])
    predictor.set_mapping(soft)
    assert predictor.is_embedded(2)
