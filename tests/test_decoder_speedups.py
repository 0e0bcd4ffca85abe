"""The fast mask-decoder path against a plain, unfolded computation of the same network.

The decoder folds the image-side projections of the token/image attentions into the token side,
runs the transposed convolutions as per-pixel matrix products in blocks of image tokens, updates
the image tokens in place when autograd is off, and computes only the outputs it returns. The
reference below does none of that: it projects every image token, calls the attention modules'
plain ``forward``, the ``output_upscaling`` modules themselves and every hypernetwork. Default
PyTorch initialisation gives logits of about 0.3-0.6 (not ~0.01 as with the golden 0.02-scale
weights), so the tolerances are relative to real values.
"""

from __future__ import annotations

import pytest
import torch

from napari_medsam.models.networks import mask_decoder as md_module
from napari_medsam.models.networks.mask_decoder import MaskDecoder, TwoWayTransformer
from napari_medsam.models.networks.prompt_encoder import PromptEncoder

TOL = {"atol": 2e-6, "rtol": 1e-5}  # observed differences: <= 3.2e-7 on logits up to 0.6


def _reference_transformer(tr: TwoWayTransformer, src: torch.Tensor, pos: torch.Tensor, tokens: torch.Tensor):
    """SAM's two-way transformer written out with the plain attention of every module."""
    keys = src.flatten(2).transpose(1, 2)
    key_pe = pos.flatten(2).transpose(1, 2)
    queries = tokens
    for layer in tr.layers:
        if layer.first:
            queries = layer.self_attn(queries, queries, queries)
        else:
            q = queries + tokens
            queries = queries + layer.self_attn(q, q, queries)
        queries = layer.norm1(queries)
        q, k = queries + tokens, keys + key_pe
        queries = layer.norm2(queries + layer.cross_attn_token_to_image(q, k, keys))
        queries = layer.norm3(queries + layer.mlp(queries))
        q, k = queries + tokens, keys + key_pe
        keys = layer.norm4(keys + layer.cross_attn_image_to_token(k, q, queries))
    attn = tr.final_attn_token_to_image(queries + tokens, keys + key_pe, keys)
    return tr.norm_final_attn(queries + attn), keys


def _reference_decode(dec: MaskDecoder, emb, pe, sparse, dense, multimask: bool):
    """All four masks through the upscaling modules, then the official selection."""
    batch = sparse.shape[0]
    out_tokens = torch.cat((dec.iou_token.weight, dec.mask_tokens.weight), dim=0)
    tokens = torch.cat((out_tokens.unsqueeze(0).expand(batch, -1, -1), sparse), dim=1)
    src = emb.expand(batch, -1, -1, -1) + dense
    _, chans, height, width = src.shape
    hs, keys = _reference_transformer(dec.transformer, src, pe.expand(batch, -1, -1, -1), tokens)
    upscaled = dec.output_upscaling(keys.transpose(1, 2).reshape(batch, chans, height, width))
    hyper = torch.stack([mlp(hs[:, 1 + i]) for i, mlp in enumerate(dec.output_hypernetworks_mlps)], dim=1)
    masks = (hyper @ upscaled.flatten(2)).view(batch, -1, 4 * height, 4 * width)
    iou = dec.iou_prediction_head(hs[:, 0])
    chosen = slice(1, None) if multimask else slice(0, 1)
    return masks[:, chosen], iou[:, chosen]


def _inputs(grid=(64, 64), batch=1, tokens=2, mask_prompt=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(1, 256, *grid, generator=gen)
    pe = torch.randn(1, 256, *grid, generator=gen)
    sparse = torch.randn(batch, tokens, 256, generator=gen)
    if mask_prompt:
        dense = torch.randn(batch, 256, *grid, generator=gen)
    else:  # the prompt encoder's no-mask embedding: one vector broadcast over the grid
        dense = torch.randn(1, 256, 1, 1, generator=gen).expand(batch, -1, *grid)
    return emb, pe, sparse, dense


@pytest.fixture(scope="module")
def decoder() -> MaskDecoder:
    torch.manual_seed(1)
    dec = MaskDecoder().eval()
    with torch.no_grad():  # LayerNorm defaults (1, 0) would hide a mixed-up weight and bias
        for module in dec.modules():
            if isinstance(module, torch.nn.LayerNorm) or type(module).__name__ == "LayerNorm2d":
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
    return dec


@pytest.mark.parametrize(
    ("grid", "batch", "tokens", "mask_prompt", "multimask"),
    [
        ((64, 64), 1, 2, False, False),  # a box
        ((64, 64), 1, 4, False, True),  # three points + padding, three masks
        ((64, 64), 1, 2, True, False),  # box + previous mask
        ((64, 64), 3, 2, False, True),  # a batch of boxes on one embedding
        ((40, 23), 2, 3, True, False),  # a grid that ends in a partial block of tokens
    ],
)
def test_fast_decoder_equals_plain_computation(decoder, grid, batch, tokens, mask_prompt, multimask):
    emb, pe, sparse, dense = _inputs(grid, batch, tokens, mask_prompt)
    with torch.inference_mode():
        logits, iou = decoder(emb, pe, sparse, dense, multimask)
        ref_logits, ref_iou = _reference_decode(decoder, emb, pe, sparse, dense, multimask)
    masks = 3 if multimask else 1
    assert logits.shape == (batch, masks, 4 * grid[0], 4 * grid[1]) and iou.shape == (batch, masks)
    assert ref_logits.abs().max() > 0.2  # real magnitudes, so the tolerance means something
    torch.testing.assert_close(logits, ref_logits, **TOL)
    torch.testing.assert_close(iou, ref_iou, **TOL)


def test_predict_masks_holds_every_token_and_forward_selects(decoder):
    emb, pe, sparse, dense = _inputs(tokens=3, seed=2)
    with torch.inference_mode():
        every, every_iou = decoder.predict_masks(emb, pe, sparse, dense)
        single, single_iou = decoder(emb, pe, sparse, dense, False)
        multi, multi_iou = decoder(emb, pe, sparse, dense, True)
    assert every.shape == (1, 4, 256, 256) and every_iou.shape == (1, 4)
    torch.testing.assert_close(single, every[:, :1], **TOL)
    torch.testing.assert_close(multi, every[:, 1:], **TOL)
    torch.testing.assert_close(torch.cat((single_iou, multi_iou), 1), every_iou, **TOL)


@pytest.mark.parametrize("channels_last", [False, True])
def test_inputs_are_left_untouched_and_calls_repeat_exactly(decoder, channels_last):
    emb, pe, sparse, dense = _inputs(seed=3)
    if channels_last:
        emb = emb.contiguous(memory_format=torch.channels_last)
        pe = pe.contiguous(memory_format=torch.channels_last)
    before = (emb.clone(), pe.clone())
    with torch.inference_mode():
        first = decoder(emb, pe, sparse, dense, False)
        second = decoder(emb, pe, sparse, dense, False)
        image_tokens = decoder.transformer(emb, pe, torch.cat((decoder.mask_tokens.weight[None], sparse), 1))[1]
    assert torch.equal(emb, before[0]) and torch.equal(pe, before[1])
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert image_tokens.shape == (1, 64 * 64, 256)


@pytest.mark.parametrize("block", [300, 1 << 20])  # 13 full blocks + a ragged one; one block (as on a GPU)
def test_block_size_does_not_change_results(decoder, monkeypatch, block):
    emb, pe, sparse, dense = _inputs(batch=2, seed=4)
    with torch.inference_mode():
        default = decoder(emb, pe, sparse, dense, True)
        monkeypatch.setattr(md_module, "_BLOCK", block)
        other = decoder(emb, pe, sparse, dense, True)
    torch.testing.assert_close(other[0], default[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(other[1], default[1], atol=1e-6, rtol=1e-6)


def test_broadcast_and_materialised_no_mask_prompts_agree(decoder):
    emb, pe, sparse, dense = _inputs(seed=5)
    with torch.inference_mode():
        broadcast = decoder(emb, pe, sparse, dense, False)
        materialised = decoder(emb, pe, sparse, dense.contiguous(), False)
    torch.testing.assert_close(broadcast[0], materialised[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(broadcast[1], materialised[1], atol=1e-6, rtol=1e-6)


def test_gradients_flow_as_in_the_plain_computation(decoder):
    # With autograd on, nothing is updated in place; gradients match the reference's.
    emb, pe, sparse, dense = _inputs(grid=(16, 16), tokens=2, seed=6)
    grads = []
    for run in (decoder, lambda *a: _reference_decode(decoder, *a)):
        leaf = emb.clone().requires_grad_(True)
        logits, iou = run(leaf, pe, sparse, dense, False)
        (logits.square().mean() + iou.sum()).backward()
        grads.append(leaf.grad)
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_dense_pe_is_cached_and_follows_the_gaussian_matrix():
    torch.manual_seed(7)
    enc = PromptEncoder(embed_dim=32, image_embedding_size=(8, 12), input_image_size=(32, 48))
    with torch.inference_mode():
        first = enc.get_dense_pe()
    assert not first.is_inference()  # usable outside inference mode too
    assert enc.get_dense_pe() is first
    fresh = enc.pe_layer.grid(8, 12).unsqueeze(0)
    assert first.shape == (1, 32, 8, 12) and torch.equal(first, fresh)
    # New weights (in place, as load_state_dict does) give a new encoding.
    state = {k: v.clone() for k, v in enc.state_dict().items()}
    state["pe_layer.positional_encoding_gaussian_matrix"] = torch.randn(2, 16)
    enc.load_state_dict(state)
    second = enc.get_dense_pe()
    assert second is not first and torch.equal(second, enc.pe_layer.grid(8, 12).unsqueeze(0))
    assert not torch.equal(second, first)
    with torch.no_grad():
        enc.pe_layer.positional_encoding_gaussian_matrix.mul_(2.0)
    assert torch.equal(enc.get_dense_pe(), enc.pe_layer.grid(8, 12).unsqueeze(0))
    # The cache is derived data, not part of the checkpoint.
    assert set(enc.state_dict()) == set(state)
