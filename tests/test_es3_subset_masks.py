"""EfficientSAM3 detector speed-ups that must not change results: masks for a subset of queries, in-place
fusion-encoder sums.

``Es3ImageModel.ground(..., mask_threshold=t)`` computes masks only for the queries that
``postprocess(..., t)`` keeps and skips the pixel decoder when none passes; ``ConceptModel.detect`` uses it.
These tests run the reduced golden checkpoint on the golden slice (3 detections for "liver", 1 for the
box prompt at the README threshold) and compare the subset path with the all-queries path, which the
golden tests check against the official code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from napari_medsam.models.networks.es3 import load_es3_checkpoint
from napari_medsam.models.networks.es3.fusion import EncoderLayer
from napari_medsam.segment.concept import ConceptModel

pytestmark = pytest.mark.usefixtures("two_torch_threads")


@pytest.fixture(scope="module")
def golden(es3_dir: Path):
    with np.load(es3_dir / "es3_golden_image.npz") as data:
        return {k: data[k] for k in ("image_u8", "threshold", "box_prompt_cxcywh")}


@pytest.fixture(scope="module")
def model(es3_dir: Path):
    return load_es3_checkpoint(es3_dir / "es3_reduced_random.pt", es3_dir / "bpe_simple_vocab_16e6.txt.gz",
                               text_heads=2)


@pytest.fixture(scope="module")
def features(model, golden):
    with torch.inference_mode():
        return model.encode_image(model.preprocess(golden["image_u8"]))


def _prompts(model, golden):
    box = torch.from_numpy(golden["box_prompt_cxcywh"]).view(1, 1, 4)
    return {"text": (model.encode_text(["liver"]), None, None),
            "box": (model.encode_text(["visual"]), box, torch.tensor([[True]]))}


@pytest.mark.parametrize("prompt", ["text", "box"])
def test_subset_masks_equal_the_full_rows(model, features, golden, prompt):
    threshold = float(golden["threshold"])
    hw = golden["image_u8"].shape
    with torch.inference_mode():
        text, box, labels = _prompts(model, golden)[prompt]
        full = model.ground(features, text, box, labels)
        subset = model.ground(features, text, box, labels, mask_threshold=threshold)
        kept_full = model.postprocess(full, hw, threshold)
        kept_subset = model.postprocess(subset, hw, threshold)
    assert full.mask_indices is None
    expected = torch.nonzero(full.scores[0] > threshold).flatten()
    assert subset.mask_indices.tolist() == expected.tolist() and len(expected) == {"text": 3, "box": 1}[prompt]
    assert subset.pred_masks.shape == (1, len(expected), *full.pred_masks.shape[-2:])
    scale = float(full.pred_masks.abs().max())
    assert float((subset.pred_masks[0] - full.pred_masks[0][expected]).abs().max()) <= 1e-5 * scale
    assert torch.equal(kept_subset.indices, kept_full.indices)
    assert torch.equal(kept_subset.scores, kept_full.scores) and torch.equal(kept_subset.boxes, kept_full.boxes)
    assert float((kept_subset.mask_probs - kept_full.mask_probs).abs().max()) <= 1e-5
    assert int((kept_subset.masks != kept_full.masks).sum()) <= kept_full.masks[0].numel() // 1000


def test_nothing_kept_skips_the_pixel_decoder(model, features, golden):
    calls = []
    hook = model.segmentation_head.pixel_decoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        with torch.inference_mode():
            text = model.encode_text(["liver"])
            out = model.ground(features, text, mask_threshold=1.0)
            assert not calls and out.mask_indices.numel() == 0
            assert out.pred_masks.shape == (1, 0, *features.fpn[0].shape[-2:])
            found = model.postprocess(out, (40, 30), threshold=1.0)
            assert found.masks.shape == (0, 40, 30) and found.scores.shape == (0,)
            model.ground(features, text)
            assert calls  # the all-queries path still runs it
            # masks asked for above a threshold cannot serve a lower one
            with pytest.raises(ValueError, match="has no mask"):
                model.postprocess(out, (40, 30), threshold=0.0)
    finally:
        hook.remove()


def test_concept_detect_matches_the_all_queries_path(es3_dir, golden):
    concept = ConceptModel.from_checkpoint(weights=es3_dir / "es3_reduced_random.pt",
                                           vocabulary=es3_dir / "bpe_simple_vocab_16e6.txt.gz", device="cpu")
    image = golden["image_u8"]
    rgb = np.repeat(image[..., None], 3, axis=-1)
    threshold = float(golden["threshold"])
    packed = concept.encode(rgb)
    found = concept.detect(packed, "liver", None, None, image.shape, threshold)
    with torch.inference_mode():
        net = concept.network
        reference = net.postprocess(net.ground(concept.features(packed), concept.text("liver")), image.shape,
                                    threshold)
    assert len(found.scores) == len(reference.scores) > 0
    np.testing.assert_array_equal(found.queries, reference.indices.numpy())
    np.testing.assert_allclose(found.scores, reference.scores.numpy(), rtol=0, atol=1e-6)
    assert int((found.masks != reference.masks.numpy()).sum()) <= found.masks[0].size // 1000


def test_fusion_layer_in_place_sums_match_autograd_path():
    """Under inference mode the layer writes its residual sums in place; values equal the grad-mode path,
    the caller's tensor is untouched, and the grad-mode path still back-propagates."""
    torch.manual_seed(0)
    layer = EncoderLayer(32, 4, 64, pos_at_self_attn=True, pos_at_cross_keys=False, batch_first=True).eval()
    tgt, pos, memory = torch.randn(2, 50, 32), torch.randn(2, 50, 32), torch.randn(2, 7, 32)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 5:] = True
    before = tgt.clone()
    with torch.inference_mode():
        fast = layer(tgt, memory, query_pos=pos, memory_key_padding_mask=padding)
    assert torch.equal(tgt, before)
    x = tgt.clone().requires_grad_(True)
    slow = layer(x, memory, query_pos=pos, memory_key_padding_mask=padding)
    slow.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert torch.allclose(fast, slow.detach(), rtol=0, atol=1e-6)


def test_fusion_encoder_shared_ffn_buffer_matches_autograd_path():
    """The encoder's inference path (in-place sums, one shared feed-forward buffer) equals the grad-mode path."""
    from napari_medsam.models.networks.es3.fusion import FusionConfig, FusionEncoder

    torch.manual_seed(1)
    encoder = FusionEncoder(FusionConfig(d_model=32, num_layers=3, num_heads=4, dim_feedforward=64)).eval()
    image, pos, prompt = torch.randn(1, 32, 6, 5), torch.randn(1, 32, 6, 5), torch.randn(4, 1, 32)
    with torch.inference_mode():
        fast = encoder(image, pos, prompt, None).memory
    slow = encoder(image, pos, prompt, None).memory
    assert slow.requires_grad and fast.shape == (30, 1, 32)
    assert torch.allclose(fast, slow.detach(), rtol=0, atol=1e-5)
