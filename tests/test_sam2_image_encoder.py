"""The SAM 2 image encoder (Hiera trunk + FPN neck) against the official key lists and golden outputs.

The golden folder ``sam2/`` (see its README.md) holds a seeded random checkpoint of a reduced
``sam2.1_hiera_t512`` (Hiera embed_dim 16, stages [1, 1, 3, 2], global block 4; every block type of
Hiera-tiny occurs, window padding included) and the official ``forward_image`` outputs for one
slice, where levels 0/1 went on through the mask decoder's ``conv_s0`` / ``conv_s1``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import golden_path
from napari_medsam.models.networks.sam2.hiera import Hiera
from napari_medsam.models.networks.sam2.image_encoder import (
    HIERA_PRESETS,
    FpnNeck,
    ImageEncoder,
    build_image_encoder,
)

GOLDEN = golden_path() / "sam2"
needs_golden = pytest.mark.usefixtures("golden_dir")
REDUCED = {"embed_dim": 16, "stages": (1, 1, 3, 2), "global_att_blocks": (4,)}
PREFIX = "image_encoder."
FEATURE_ATOL = 1e-5

pytestmark = pytest.mark.usefixtures("two_torch_threads")


def _encoder_keys(name: str) -> list[tuple[str, tuple[int, ...]]]:
    rows = (GOLDEN / name).read_text().splitlines()
    pairs = (row.split("\t") for row in rows if row)
    return [(key[len(PREFIX):], tuple(json.loads(shape))) for key, shape in pairs if key.startswith(PREFIX)]


def _own_keys(encoder: ImageEncoder) -> list[tuple[str, tuple[int, ...]]]:
    return [(key, tuple(value.shape)) for key, value in encoder.state_dict().items()]


@needs_golden
@pytest.mark.parametrize(("keys_file", "kwargs"), [
    ("sam2_hiera_t512_keys.txt", HIERA_PRESETS["tiny"]),
    ("sam2_t512_reduced_keys.txt", REDUCED),
])
def test_state_dict_equals_official_keys(keys_file, kwargs):
    expected = _encoder_keys(keys_file)
    assert expected, keys_file
    with torch.device("meta"):  # names and shapes only: no memory, no random init
        encoder = build_image_encoder(**kwargs)
    assert _own_keys(encoder) == expected


def test_presets_give_official_channel_lists():
    expected = {"tiny": [768, 384, 192, 96], "small": [768, 384, 192, 96], "base_plus": [896, 448, 224, 112],
                "large": [1152, 576, 288, 144]}
    for name, channels in expected.items():
        with torch.device("meta"):
            trunk = Hiera(**HIERA_PRESETS[name])
        assert trunk.channel_list == channels, name
        assert len(trunk.blocks) == sum(HIERA_PRESETS[name]["stages"])


@pytest.fixture(scope="module")
def golden_run(golden_dir):
    """The reduced encoder with the golden weights (strict load) run once on the golden key slice."""
    state = torch.load(GOLDEN / "sam2_t512_reduced_random.pt", map_location="cpu", weights_only=True)["model"]
    encoder = build_image_encoder(**REDUCED).eval()
    encoder.load_state_dict({k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}, strict=True)
    arrays = np.load(GOLDEN / "sam2_medsam2_golden.npz")
    with torch.inference_mode():
        out = encoder(torch.from_numpy(arrays["key_slice_input"]))
    return encoder, state, arrays, out


def test_reduced_encoder_matches_golden_features(golden_run):
    _, state, arrays, out = golden_run
    fpn = out["backbone_fpn"]
    assert [tuple(f.shape) for f in fpn] == [(1, 256, 128, 128), (1, 256, 64, 64), (1, 256, 32, 32)]
    assert out["vision_features"] is fpn[-1]
    # forward_image sends levels 0 and 1 through the mask decoder's 1x1 convs before storing them.
    level0 = F.conv2d(fpn[0], state["sam_mask_decoder.conv_s0.weight"], state["sam_mask_decoder.conv_s0.bias"])
    level1 = F.conv2d(fpn[1], state["sam_mask_decoder.conv_s1.weight"], state["sam_mask_decoder.conv_s1.bias"])
    for index, got in enumerate((level0, level1, fpn[2])):
        expected = arrays[f"key_backbone_fpn{index}"]
        np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=FEATURE_ATOL, err_msg=f"level {index}")


def test_reduced_encoder_position_encodings(golden_run):
    _, _, arrays, out = golden_run
    pos = out["vision_pos_enc"]
    assert [tuple(p.shape) for p in pos] == [(1, 256, 128, 128), (1, 256, 64, 64), (1, 256, 32, 32)]
    np.testing.assert_allclose(pos[2].numpy(), arrays["key_vision_pos_enc2"], rtol=0, atol=1e-6)


def test_position_embedding_follows_new_weights():
    torch.manual_seed(0)
    trunk = Hiera(**REDUCED, window_pos_embed_bkg_spatial_size=(7, 7)).eval()
    with torch.no_grad():
        first = trunk._position_embedding(32, 32).clone()
        assert trunk._position_embedding(32, 32) is trunk._position_embedding(32, 32)  # cached per size
        trunk.load_state_dict({**trunk.state_dict(), "pos_embed_window": torch.ones_like(trunk.pos_embed_window)})
        second = trunk._position_embedding(32, 32)
    assert not torch.equal(first, second)
    assert torch.equal(second - F.interpolate(trunk.pos_embed, size=(32, 32), mode="bicubic").permute(0, 2, 3, 1),
                       torch.ones_like(second))


def test_windowed_padding_equals_explicit_zero_padding():
    """Padding with the qkv bias (our shortcut) equals projecting zero-padded tokens (the official way)."""
    torch.manual_seed(1)
    trunk = Hiera(**REDUCED).eval()
    block = trunk.blocks[3]  # window 14 on a 20x20 grid: padded to 28
    assert block.window == 14
    x = torch.randn(2, 20, 20, block.dim)
    with torch.no_grad():
        got = block._attend(x, 20, 20)
        padded = F.pad(x, (0, 0, 0, 8, 0, 8))
        windows = padded.view(2, 2, 14, 2, 14, -1).transpose(2, 3).reshape(8, 196, -1)
        q, k, v = block.attn.qkv(windows).view(8, 196, 3, block.attn.num_heads, -1).unbind(2)
        att = torch.softmax(q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2) / q.shape[-1] ** 0.5, -1)
        out = (att @ v.transpose(1, 2)).transpose(1, 2).reshape(2, 2, 2, 14, 14, -1).transpose(2, 3)
        expected = block.attn.proj(out.reshape(2, 28, 28, -1)[:, :20, :20])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 3, 500, 512), (1, 1, 512, 512), (3, 512, 512), (1, 3, 0, 64)])
def test_bad_input_shape_is_a_clear_error(shape):
    encoder = build_image_encoder(**REDUCED)
    with pytest.raises(ValueError, match="Hiera"):
        encoder(torch.zeros(shape))


def test_trunk_and_neck_channels_must_agree():
    with pytest.raises(ValueError, match="channel"):
        ImageEncoder(Hiera(**REDUCED), FpnNeck(backbone_channel_list=(768, 384, 192, 96)))


def test_batch_and_non_square_inputs():
    torch.manual_seed(2)
    encoder = build_image_encoder(**REDUCED).eval()
    x = torch.randn(2, 3, 256, 320)
    with torch.inference_mode():
        both = encoder(x)
        single = encoder(x[1:])
    assert [tuple(f.shape) for f in both["backbone_fpn"]] == [(2, 256, 64, 80), (2, 256, 32, 40), (2, 256, 16, 20)]
    for a, b in zip(both["backbone_fpn"], single["backbone_fpn"]):
        torch.testing.assert_close(a[1:], b, rtol=1e-5, atol=1e-5)
