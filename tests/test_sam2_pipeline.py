"""MedSAM2 / SAM 2.1 single-slice path against the official code's golden arrays (shared/golden/sam2).

Step by step as MedSAM2's ``medsam2_infer_3D_CT.py`` does it: CT windowing by the clipped volume's
min/max, Pillow bicubic stretch to 512, float64 normalisation with float32 constants; then the
reduced golden network through ``SamModel.from_checkpoint`` and the slice predictor, decoding the
golden box on the key slice.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_medsam.models import pipelines as P
from napari_medsam.models import registry
from napari_medsam.segment.intensity import (
    IntensityMapping,
    clipped_data_range,
    contrast_limits,
    percentile_mapping,
    pipeline_mapping,
)
from napari_medsam.segment.model import SamModel, _resize_matrix
from napari_medsam.segment.predictor import Prompts, SlicePredictor
from napari_medsam.volume import Volume
from test_sam2_registry import reduced_medsam2_spec

pytestmark = pytest.mark.usefixtures("two_torch_threads")



@pytest.fixture(scope="module")
def sam2_dir(golden_dir):
    path = golden_dir / "sam2"
    if not (path / "sam2_medsam2_golden.npz").is_file():
        pytest.skip(f"SAM 2 golden data not found at {path}")
    return path


@pytest.fixture(scope="module")
def golden(sam2_dir):
    with np.load(sam2_dir / "sam2_medsam2_golden.npz") as data:
        return {k: data[k] for k in data.files if not k.startswith(("fwd_", "rev_", "noobj_", "key2_"))}


def _window(golden) -> IntensityMapping:
    low, high = (float(v) for v in golden["window"])
    return IntensityMapping("window", low, high, name="golden window")


def _ct_volume(golden) -> Volume:
    return Volume(golden["hu_volume"], (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3), modality="CT",
                  intensity_unit="HU")


# --- pre-processing, exact ---------------------------------------------------------------------


def test_medsam2_ct_windowing_reproduces_the_script(golden):
    hu = golden["hu_volume"]
    mapping = pipeline_mapping(_window(golden), "medsam2", "CT", (float(hu.min()), float(hu.max())))
    assert mapping.kind == "window-datarange"
    assert (mapping.low, mapping.high) == (-160.0, 188.0)  # the clipped data's max, not the window's 240
    ours = np.stack([mapping.to_uint8(s) for s in hu])
    assert ours.dtype == np.uint8
    assert np.abs(ours.astype(np.int16) - golden["volume_uint8"]).max() == 0
    # A fixed window would not: the official stretch uses the data range.
    assert not np.array_equal(_window(golden).to_uint8(hu[5]), golden["volume_uint8"][5])


def test_key_slice_resize_and_model_input_are_exact(golden):
    rgb = np.repeat(golden["volume_uint8"][5][:, :, None], 3, axis=2)
    resized = P.sam2_resize(rgb, 512)
    assert resized.shape == (512, 512, 3)
    assert np.abs(resized.transpose(2, 0, 1).astype(np.int16) - golden["key_slice_resized_uint8"]).max() == 0
    prepared = P.prepare_image("medsam2", rgb, 512)
    assert prepared.tensor.dtype == torch.float32 and prepared.input_size == (512, 512)
    assert prepared.original_size == (96, 128)
    assert float((prepared.tensor - torch.from_numpy(golden["key_slice_input"])).abs().max()) == 0.0
    # float32 arithmetic would change the last bit somewhere: the float64 path matters.
    x32 = torch.from_numpy(resized.transpose(2, 0, 1).copy()).float() / 255.0
    mean = torch.tensor(P.SAM2_IMAGE_MEAN).view(3, 1, 1)
    std = torch.tensor(P.SAM2_IMAGE_STD).view(3, 1, 1)
    assert not torch.equal((x32 - mean) / std, prepared.tensor[0])


def test_prompt_scaling_is_the_official_float32_formula(golden):
    box = golden["box"].astype(np.float64)
    h, w = (int(v) for v in golden["video_hw"])
    scaled = P.scale_boxes("medsam2", box, (h, w), 512)
    official = (torch.tensor(box.reshape(2, 2), dtype=torch.float32) / torch.tensor([w, h]) * 512).reshape(1, 4)
    assert scaled.dtype == np.float32 and np.array_equal(scaled, official.numpy())
    points = P.scale_points("sam2", np.array([[10.25, 95.0]]), (h, w), 1024)
    assert np.array_equal(points, np.array([[10.25 / w * 1024, 95.0 / h * 1024]], np.float32))
    with pytest.raises(ValueError, match="unknown pipeline"):
        P.prepare_image("sam3", np.zeros((8, 8, 3), np.uint8))


# --- intensity mapping rules -----------------------------------------------------------------


def test_pipeline_mapping_changes_only_medsam2_on_ct():
    volume = np.array([[[-1000, 0], [50, 3000]]], np.int16)
    window = IntensityMapping("window", -160.0, 240.0)
    data_range = (float(volume.min()), float(volume.max()))
    assert pipeline_mapping(window, "medsam", "CT", data_range) is window
    assert pipeline_mapping(window, "sam2", "CT", data_range) is window
    assert pipeline_mapping(window, "medsam2", "MR", data_range) is window
    mr = percentile_mapping(volume.astype(np.float32) + 1000)
    assert pipeline_mapping(mr, "medsam2", "MR", data_range) is mr
    ct = pipeline_mapping(window, "medsam2", "CT", data_range)
    assert (ct.kind, ct.low, ct.high) == ("window-datarange", -160.0, 240.0)  # data reach both bounds here
    limits = pipeline_mapping(contrast_limits(-100, 100), "medsam2", "ct", (-50.0, 20.0))
    assert (limits.low, limits.high) == (-50.0, 20.0) and limits.signature != window.signature
    # Nothing left to stretch (the whole volume outside the window): a constant 0 image, no division by 0.
    flat = clipped_data_range(-160.0, 240.0, (500.0, 900.0))
    assert np.array_equal(flat.to_uint8(np.array([[500.0, 900.0]])), np.zeros((1, 2), np.uint8))


# --- the reduced golden network through SamModel and the predictor ---------------------------


@pytest.fixture(scope="module")
def reduced_medsam2(sam2_dir):
    """The golden checkpoint, loaded by name like any registry model (the reduced spec registered for the module)."""
    spec = reduced_medsam2_spec()
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(registry.MODELS, spec.name, spec)
        model = SamModel.from_checkpoint("medsam2_reduced", weights=sam2_dir / "sam2_t512_reduced_random.pt",
                                         device="cpu", download=False)
    assert (model.pipeline, model.family, model.image_size, model.low_res) == ("medsam2", "sam2", 512, 128)
    return model


@pytest.fixture(scope="module")
def key_prediction(reduced_medsam2, golden):
    predictor = SlicePredictor(reduced_medsam2, _ct_volume(golden), mapping=_window(golden))
    x0, y0, x1, y1 = (float(v) for v in golden["box"])
    fast = predictor.predict(5, Prompts(box=[y0, x0, y1, x1]), keep_logits=True)
    exact = predictor.predict(5, Prompts(box=[y0, x0, y1, x1]), exact=True, keep_logits=True)
    return predictor, fast, exact


def test_predictor_feeds_medsam2_its_ct_windowing(key_prediction, golden):
    predictor, _, _ = key_prediction
    assert predictor.model_mapping().kind == "window-datarange"
    assert predictor.key(5).mapping_signature == "window-datarange:-160:188"
    image = predictor.model_image(5)
    assert np.array_equal(image[:, :, 0], golden["volume_uint8"][5]) and np.array_equal(image[:, :, 2], image[:, :, 0])


def test_key_slice_box_equals_the_official_logits(key_prediction, golden):
    predictor, fast, exact = key_prediction
    embedding = predictor.embed(5)
    features = predictor.model.network.unpack(torch.as_tensor(embedding))
    np.testing.assert_allclose(features.top.numpy(), golden["key_backbone_fpn2"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(features.level0.numpy(), golden["key_backbone_fpn0"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(features.level1.numpy(), golden["key_backbone_fpn1"], atol=1e-5, rtol=0)
    for result in (fast, exact):
        assert result.low_res_logits.shape == (1, 128, 128)
        np.testing.assert_allclose(result.low_res_logits[0], golden["key_lowres_logits"], atol=1e-6, rtol=0)
        np.testing.assert_allclose(result.logits[0], golden["key_video_logits"], atol=1e-6, rtol=0)
        expected = golden["key_video_logits"] > 0
        flips = result.masks[0] != expected
        assert flips.sum() <= 5, f"{flips.sum()} mask pixels differ"
        if flips.any():
            assert np.abs(golden["key_video_logits"][flips]).max() < 1e-6


def test_fast_resize_equals_torch_bilinear(golden):
    low = torch.from_numpy(golden["key_lowres_logits"])
    for out in ((96, 128), (437, 583), (512, 512), (33, 700)):
        rows = torch.from_numpy(_resize_matrix(128, out[0])).float()
        cols = torch.from_numpy(_resize_matrix(128, out[1])).float()
        fast = rows @ low @ cols.T
        official = P.sam2_postprocess(low[None, None], out)[0, 0]
        assert float((fast - official).abs().max()) < 1e-8


def test_low_res_logits_feed_back_as_a_mask_prompt(key_prediction):
    predictor, fast, _ = key_prediction
    again = predictor.predict(5, Prompts(mask_logits=fast.low_res_logits[0]))
    assert again.low_res_logits.shape == (1, 128, 128) and again.masks.shape == (1, 96, 128)
    with pytest.raises(ValueError, match="square"):
        Prompts(mask_logits=np.zeros((128, 100), np.float32))
    pooled = predictor.pooled_embedding(5, fast.masks[0])
    assert pooled is not None and pooled.shape == (256,) and np.isfinite(pooled).all()


def test_sam2_models_have_no_prepared_path(key_prediction):
    predictor, _, _ = key_prediction
    assert predictor.model.can_prepare is False and predictor.prepare(5) is False
    assert predictor.model.prepared(predictor.key(5)) is None
