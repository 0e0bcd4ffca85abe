"""The SAM 2 family builder: official key layouts, sizes, strict loading, clear errors."""

from __future__ import annotations

import pytest
import torch

from napari_medsam.errors import MedSamError
from napari_medsam.models.networks.sam2 import SAM2_ARCHITECTURES, build_sam2, load_sam2
from test_registry import _read_keys  # the official key lists: key<TAB>JSON shape

REDUCED = dict(embed_dim=16, stages=(1, 1, 3, 2), global_att_blocks=(4,), memory_layers=2, memory_ffn=1024)


def _meta(arch: str, **overrides):
    with torch.device("meta"):
        return build_sam2(arch, **overrides)


@pytest.mark.parametrize("name, arch, overrides", [
    ("sam2_hiera_t512_keys.txt", "hiera_t512", {}),
    ("sam2_t512_reduced_keys.txt", "hiera_t512", REDUCED),
])
def test_state_dict_equals_the_official_key_list(golden_dir, name, arch, overrides):
    expected = _read_keys(golden_dir / "sam2" / name)
    actual = [(k, tuple(v.shape)) for k, v in _meta(arch, **overrides).state_dict().items()]
    assert dict(actual) == dict(expected)
    assert [k for k, _ in actual] == [k for k, _ in expected], "state_dict order differs from the official"


def test_full_t512_loads_a_random_checkpoint_strictly(golden_dir, tmp_path):
    expected = _read_keys(golden_dir / "sam2" / "sam2_hiera_t512_keys.txt")
    gen = torch.Generator().manual_seed(1)
    state = {k: torch.randn(shape, generator=gen) * 0.02 for k, shape in expected}
    path = tmp_path / "MedSAM2_random.pt"
    torch.save({"model": state}, path)
    loaded = torch.load(path, map_location="cpu", weights_only=True)["model"]
    net = load_sam2("hiera_t512", loaded)
    for key, value in net.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert not net.training
    with torch.inference_mode():
        feats = net.encode_frame(torch.zeros(1, 3, 512, 512))
    assert feats.top.shape == (1, 256, 32, 32) and feats.level0.shape == (1, 32, 128, 128)


# Parameter counts published with SAM 2.1 (millions): tiny 38.9, small 46, base+ 80.8, large 224.4.
@pytest.mark.parametrize("arch, millions", [("hiera_t", 38.9), ("hiera_s", 46.0), ("hiera_b+", 80.8),
                                            ("hiera_l", 224.4), ("hiera_t512", 38.9)])
def test_sizes_match_the_published_models(arch, millions):
    count = sum(p.numel() for p in _meta(arch).parameters())
    assert abs(count / 1e6 - millions) < 0.15, f"{arch}: {count / 1e6:.2f} M parameters"


def test_wrong_checkpoints_are_refused_clearly(golden_dir):
    state = torch.load(golden_dir / "sam2" / "sam2_t512_reduced_random.pt", map_location="cpu",
                       weights_only=True)["model"]
    with pytest.raises(MedSamError, match="do not fit the SAM 2 'hiera_t512'"):
        load_sam2("hiera_t512", state)  # the reduced file offered as the full MedSAM2
    with pytest.raises(MedSamError, match="'hiera_l'"):
        load_sam2("hiera_l", state)
    with pytest.raises(ValueError, match="unknown SAM 2 architecture"):
        build_sam2("vit_b")
    with pytest.raises(ValueError, match="unknown overrides"):
        build_sam2("hiera_t", depth=3)
    assert set(SAM2_ARCHITECTURES) == {"hiera_t", "hiera_s", "hiera_b+", "hiera_l", "hiera_t512"}


def test_bad_inputs_get_clear_errors():
    net = build_sam2("hiera_t512", **REDUCED).eval()
    with pytest.raises(ValueError, match=r"\(B, 3, 512, 512\)"):
        net.encode_frame(torch.zeros(1, 3, 1024, 1024))
    with pytest.raises(ValueError, match="do not fit"):
        net.unpack(torch.zeros(1, 100))
    with torch.inference_mode():
        packed = net.encode_image(torch.zeros(1, 3, 512, 512))
        feats = net.unpack(packed)
        assert torch.equal(net.pack(feats), packed)
        with pytest.raises(ValueError, match="at least one point"):
            net.decode(packed)
        with pytest.raises(ValueError, match="memory of at least one"):
            net.track_frame(feats, [], [], 15)
