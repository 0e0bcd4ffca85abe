"""SAM 2 heads and memory modules: checkpoint layout, prompt labels, RoPE, mask selection, golden values.

The golden folder ``sam2/`` (see its README.md) holds a seeded random checkpoint of a reduced
``sam2.1_hiera_t512`` in the official format, the key list of the full model and the arrays of
the official MedSAM2 3-D flow. The end-to-end comparison lives with the video model; here each
module is checked on its own.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from conftest import golden_path
from napari_medsam.models.networks.prompt_encoder import PromptEncoder
from napari_medsam.models.networks.sam2.heads import Sam2MaskDecoder, stability_scores
from napari_medsam.models.networks.sam2.memory import (
    MemoryAttention,
    MemoryEncoder,
    axial_rotations,
    math_attention,
    rotate,
)

GOLDEN = golden_path() / "sam2"
needs_golden = pytest.mark.usefixtures("golden_dir")
pytestmark = pytest.mark.usefixtures("two_torch_threads")


def _require_sam2_golden() -> None:
    if not (GOLDEN / "README.md").is_file():
        pytest.skip(f"SAM 2 golden data not found at {GOLDEN}")


def _prompt_encoder() -> PromptEncoder:
    return PromptEncoder(embed_dim=256, image_embedding_size=(32, 32), input_image_size=(512, 512), mask_in_chans=16)


def _reduced_modules() -> dict[str, torch.nn.Module]:
    """The modules of the reduced golden model, by checkpoint prefix."""
    return {
        "sam_prompt_encoder.": _prompt_encoder(),
        "sam_mask_decoder.": Sam2MaskDecoder(),
        "memory_attention.": MemoryAttention(num_layers=2, dim_feedforward=1024),
        "memory_encoder.": MemoryEncoder(),
    }


def _sub(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


@pytest.fixture(scope="module")
def reduced_state(golden_dir) -> dict[str, torch.Tensor]:
    _require_sam2_golden()
    return torch.load(GOLDEN / "sam2_t512_reduced_random.pt", map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="module")
def loaded(reduced_state) -> dict[str, torch.nn.Module]:
    modules = _reduced_modules()
    for prefix, module in modules.items():
        module.load_state_dict(_sub(reduced_state, prefix))  # strict
        module.eval()
    return modules


# --- checkpoint layout -------------------------------------------------------------------------


@needs_golden
def test_reduced_checkpoint_sub_dicts_load_strictly(reduced_state):
    for prefix, module in _reduced_modules().items():
        part = _sub(reduced_state, prefix)
        assert part, prefix
        result = module.load_state_dict(part, strict=True)
        assert not result.missing_keys and not result.unexpected_keys
        for key, value in module.state_dict().items():
            assert torch.equal(value, part[key]), prefix + key


@needs_golden
def test_full_t512_key_names_and_shapes():
    _require_sam2_golden()
    rows = (GOLDEN / "sam2_hiera_t512_keys.txt").read_text().splitlines()
    official = dict((key, tuple(json.loads(shape))) for key, shape in (row.split("\t") for row in rows if row))
    full = {
        "sam_prompt_encoder.": _prompt_encoder(),
        "sam_mask_decoder.": Sam2MaskDecoder(),
        "memory_attention.": MemoryAttention(),  # defaults: 4 layers, feed-forward 2048
        "memory_encoder.": MemoryEncoder(),
    }
    for prefix, module in full.items():
        ours = {prefix + key: tuple(value.shape) for key, value in module.state_dict().items()}
        theirs = {key: shape for key, shape in official.items() if key.startswith(prefix)}
        assert ours == theirs, prefix


# --- prompt encoder: SAM 2's box corners as points ---------------------------------------------


def test_box_corner_labels_equal_the_box_path():
    torch.manual_seed(0)
    encoder = _prompt_encoder()
    box = torch.tensor([[31.0, 47.5, 300.25, 411.0]])
    as_box, _ = encoder(None, box, None)
    as_points, _ = encoder((box.reshape(1, 2, 2), torch.tensor([[2, 3]], dtype=torch.int32)), None, None)
    # Points without a box get the padding token appended, which has no positional part.
    assert as_points.shape == (1, 3, 256)
    torch.testing.assert_close(as_points[:, :2], as_box, rtol=0, atol=0)
    torch.testing.assert_close(as_points[0, 2], encoder.not_a_point_embed.weight[0], rtol=0, atol=0)


def test_point_labels_select_their_roles():
    torch.manual_seed(1)
    encoder = _prompt_encoder()
    coords = torch.tensor([[[10.0, 20.0], [100.0, 5.0], [7.0, 400.0], [250.0, 250.0], [3.0, 3.0], [60.0, 90.0]]])
    labels = torch.tensor([[0, 1, 2, 3, -1, 7]])
    sparse, _ = encoder((coords, labels), None, None)
    positional = encoder.pe_layer.at_coords(coords + 0.5, (512, 512))
    roles = [encoder.point_embeddings[i].weight[0] for i in range(4)]
    for i in range(4):
        torch.testing.assert_close(sparse[0, i], positional[0, i] + roles[i], rtol=0, atol=0)
    torch.testing.assert_close(sparse[0, 4], encoder.not_a_point_embed.weight[0], rtol=0, atol=0)
    torch.testing.assert_close(sparse[0, 5], positional[0, 5], rtol=0, atol=0)  # unknown label: position only
    torch.testing.assert_close(sparse[0, 6], encoder.not_a_point_embed.weight[0], rtol=0, atol=0)


# --- RoPE and attention ------------------------------------------------------------------------


def test_axial_rotations_table():
    table = axial_rotations(256, width=5, height=3)
    assert table.shape == (15, 128) and table.dtype == torch.complex64
    torch.testing.assert_close(table.abs(), torch.ones(15, 128))
    # Token t = 5 * row + col; channel pair 0 turns with the column, pair 64 with the row (frequency 1),
    # pairs 1 and 65 at theta^(-4/256).
    cols = torch.tensor([float(t % 5) for t in range(15)])
    rows = torch.tensor([float(t // 5) for t in range(15)])
    slow = 10000.0 ** (-4 / 256)
    for pair, angle in ((0, cols), (64, rows), (1, cols * slow), (65, rows * slow)):
        torch.testing.assert_close(table[:, pair], torch.polar(torch.ones(15), angle), atol=1e-6, rtol=0)
    assert torch.all(table[0] == 1)


def test_rotation_keeps_pair_norms_and_relative_products():
    torch.manual_seed(2)
    table = axial_rotations(16, width=4, height=4)
    x = torch.randn(2, 1, 3 * 16, 16)  # three grids of keys
    y = rotate(x, table)
    pair_norm = lambda t: t.reshape(*t.shape[:-1], -1, 2).norm(dim=-1)  # noqa: E731
    torch.testing.assert_close(pair_norm(y), pair_norm(x))
    assert not torch.allclose(y[:, :, 1:16], x[:, :, 1:16])
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])  # position (0, 0) is not turned
    # Every grid repeat gets the same rotations.
    torch.testing.assert_close(y[:, :, 16:32], rotate(x[:, :, 16:32], table))
    # q.k after rotation depends on the offset only: same vectors at (r, c)/(r', c') and shifted by one.
    q, k = torch.randn(16), torch.randn(16)
    grid = lambda v, t: rotate(v.expand(16, 16).clone(), table)[t]  # noqa: E731
    dot_a = grid(q, 5) @ grid(k, 10)  # (1, 1) and (2, 2)
    dot_b = grid(q, 0) @ grid(k, 5)  # (0, 0) and (1, 1)
    torch.testing.assert_close(dot_a, dot_b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head_dim", [16, 32, 256])
def test_math_attention_equals_the_math_kernel(head_dim):
    torch.manual_seed(3)
    q, k, v = torch.randn(1, 2, 40, head_dim), torch.randn(1, 2, 70, head_dim), torch.randn(1, 2, 70, head_dim)
    with sdpa_kernel([SDPBackend.MATH]):
        expected = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(math_attention(q, k, v), expected)


def _small_memory_attention() -> MemoryAttention:
    torch.manual_seed(4)
    module = MemoryAttention(d_model=32, num_layers=1, dim_feedforward=64, kv_in_dim=16, feat_sizes=(4, 4)).eval()
    with torch.no_grad():
        for param in module.parameters():
            param.add_(0.3 * torch.randn_like(param))  # break LayerNorm's unit/zero init
    return module


def test_pointer_tokens_are_not_rotated_but_spatial_memory_is():
    module = _small_memory_attention()
    torch.manual_seed(5)
    curr, pos = torch.randn(16, 1, 32), torch.randn(16, 1, 32)
    memory, memory_pos = torch.randn(2 * 16 + 6, 1, 16), torch.randn(2 * 16 + 6, 1, 16)
    with torch.no_grad():
        base = module(curr, memory, pos, memory_pos, num_obj_ptr_tokens=6)
        # Unrotated keys carry no position: reordering the pointer tokens changes nothing.
        order = torch.cat((torch.arange(32), 32 + torch.tensor([5, 3, 0, 1, 4, 2])))
        torch.testing.assert_close(module(curr, memory[order], pos, memory_pos[order], num_obj_ptr_tokens=6), base)
        # Rotated keys do: reordering tokens inside a memory frame changes the output...
        order = torch.cat((torch.arange(16).flip(0), torch.arange(16, 38)))
        moved = module(curr, memory[order], pos, memory_pos[order], num_obj_ptr_tokens=6)
        assert (moved - base).abs().max() > 1e-4
        # ...and so does treating the pointer tokens as a third grid would (it is not one: rejected).
        with pytest.raises(ValueError):
            module(curr, memory, pos, memory_pos, num_obj_ptr_tokens=0)


def test_rope_grid_follows_the_token_count():
    module = _small_memory_attention()
    torch.manual_seed(6)
    with torch.no_grad():
        out = module(torch.randn(64, 2, 32), torch.randn(64, 2, 16), torch.randn(64, 2, 32), torch.randn(64, 2, 16))
        assert out.shape == (64, 2, 32)  # an 8x8 grid instead of the configured 4x4
        attn = module.layers[0].self_attn
        assert torch.equal(attn.rotations(64, torch.device("cpu")), axial_rotations(32, 8, 8))
        with pytest.raises(ValueError):
            module(torch.randn(24, 1, 32), torch.randn(24, 1, 16), torch.randn(24, 1, 32), torch.randn(24, 1, 16))


# --- mask decoder: output selection ------------------------------------------------------------


def _decoder_with(masks: torch.Tensor, iou: torch.Tensor) -> Sam2MaskDecoder:
    decoder = Sam2MaskDecoder().eval()
    tokens = torch.arange(masks.shape[0] * 4 * 256, dtype=torch.float32).reshape(masks.shape[0], 4, 256)
    score = torch.ones(masks.shape[0], 1)
    decoder.predict_masks = lambda *args, **kwargs: (masks, iou, tokens, score)
    return decoder


def _call(decoder: Sam2MaskDecoder, multimask: bool):
    dummy = torch.zeros(1)
    return decoder(dummy, dummy, dummy, dummy, multimask_output=multimask, repeat_image=False, high_res_features=None)


def test_unstable_single_mask_falls_back_to_best_multimask_output():
    masks = torch.randn(2, 4, 8, 8)
    masks[0, 0] = 0.01 * torch.sign(torch.randn(8, 8))  # |logits| < delta: stability 0
    masks[1, 0] = 3 * torch.sign(torch.randn(8, 8))  # far from the thresholds: stability 1
    iou = torch.tensor([[0.9, 0.2, 0.7, 0.4], [0.1, 0.9, 0.8, 0.7]])
    decoder = _decoder_with(masks, iou)
    out, scores, tokens, _ = _call(decoder, multimask=False)
    assert out.shape == (2, 1, 8, 8) and scores.shape == (2, 1)
    assert torch.equal(out[0, 0], masks[0, 2]) and scores[0, 0] == 0.7  # best of tokens 1..3
    assert torch.equal(out[1, 0], masks[1, 0]) and scores[1, 0] == 0.1  # stable: token 0 kept
    # The pointer token is token 0 whenever one mask is asked for, whichever mask was chosen.
    assert tokens.shape == (2, 1, 256) and torch.equal(tokens[0, 0], torch.arange(256.0))
    # Training mode does not fall back.
    decoder.train()
    out, scores, _, _ = _call(decoder, multimask=False)
    assert torch.equal(out, masks[:, :1]) and torch.equal(scores, iou[:, :1])


def test_multimask_output_returns_tokens_one_to_three():
    masks, iou = torch.randn(1, 4, 8, 8), torch.rand(1, 4)
    out, scores, tokens, _ = _call(_decoder_with(masks, iou), multimask=True)
    assert torch.equal(out, masks[:, 1:]) and torch.equal(scores, iou[:, 1:])
    assert tokens.shape == (1, 3, 256) and torch.equal(tokens[0, 0], torch.arange(256.0, 512.0))
    decoder = _decoder_with(masks, iou)
    decoder.use_multimask_token_for_obj_ptr = False
    assert _call(decoder, multimask=True)[2].shape == (1, 1, 256)


def test_stability_scores():
    logits = torch.tensor([[[0.1, 0.02], [-0.02, -1.0]], [[-1.0, -1.0], [-1.0, -1.0]]])
    torch.testing.assert_close(stability_scores(logits, 0.05), torch.tensor([1 / 3, 1.0]))


# --- golden values -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def golden_arrays(golden_dir):
    _require_sam2_golden()
    return np.load(GOLDEN / "sam2_medsam2_golden.npz")


@needs_golden
def test_key_slice_decoder_equals_official(loaded, reduced_state, golden_arrays):
    """The key slice's box prompt through our prompt encoder and decoder (README: flow step 6)."""
    g = golden_arrays
    feat = torch.from_numpy(g["key_backbone_fpn2"]) + reduced_state["no_mem_embed"].view(1, -1, 1, 1)
    high_res = [torch.from_numpy(g["key_backbone_fpn0"]), torch.from_numpy(g["key_backbone_fpn1"])]
    height, width = (int(v) for v in g["video_hw"])
    corners = torch.tensor(g["box"], dtype=torch.float32).reshape(1, 2, 2) / torch.tensor([width, height]) * 512
    encoder, decoder = loaded["sam_prompt_encoder."], loaded["sam_mask_decoder."]
    with torch.inference_mode():
        sparse, dense = encoder((corners, torch.tensor([[2, 3]], dtype=torch.int32)), None, None)
        masks, iou, tokens, score = decoder(feat, encoder.get_dense_pe(), sparse, dense, multimask_output=False,
                                            repeat_image=False, high_res_features=high_res)
    assert masks.shape == (1, 1, 128, 128) and tokens.shape == (1, 1, 256)
    # Random weights: token 0 is unstable, so the mask is multimask output #1 (IoU 0.5068).
    assert abs(iou.item() - 0.5068) < 1e-4
    np.testing.assert_allclose(masks[0, 0].numpy(), g["key_lowres_logits"], atol=1e-6, rtol=1e-4)
    np.testing.assert_allclose(score.reshape(()).numpy(), g["key_object_score_logits"], atol=1e-6)


@needs_golden
def test_key_slice_memory_equals_official(loaded, golden_arrays):
    """The key slice's memory (README: flow step 7; stored as bfloat16) and its position encoding."""
    g = golden_arrays
    low = torch.from_numpy(g["key_lowres_logits"])[None, None]
    mask = (F.interpolate(low, size=(512, 512), mode="bilinear", align_corners=False) > 0).float() * 20 - 10
    with torch.inference_mode():
        out = loaded["memory_encoder."](torch.from_numpy(g["key_backbone_fpn2"]), mask, skip_mask_sigmoid=True)
    feats = out["vision_features"][0]
    expected = torch.from_numpy(g["fwd_maskmem_features"][0])
    assert torch.equal(out["vision_pos_enc"][0][0], torch.from_numpy(g["fwd_maskmem_pos_enc"]))
    # fp32 features within a bf16 rounding step of the stored ones; after rounding, a few flips by one ulp.
    assert torch.all((feats - expected).abs() <= expected.abs() * 2.0**-8 + 1e-6)
    flips = feats.to(torch.bfloat16).float() != expected
    assert flips.float().mean() < 0.005
