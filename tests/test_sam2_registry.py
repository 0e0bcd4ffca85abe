"""SAM 2.1 and MedSAM2 in the registry: entries, layouts, loading through load_network, clear refusals."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from napari_medsam.errors import WeightsError
from napari_medsam.models.checkpoint import check_architecture, expected_state, load_network
from napari_medsam.models.registry import (
    ARCHITECTURE_NAMES,
    MODELS,
    PIPELINE_NAMES,
    SAM2_ARCHITECTURE_NAMES,
    get_model,
)
from test_registry import _read_keys  # the official key lists: key<TAB>JSON shape

SAM2_SIZES = {"tiny": "hiera_t", "small": "hiera_s", "base_plus": "hiera_b+", "large": "hiera_l"}
# The reduced official-code variant of sam2.1_hiera_t512 the golden checkpoint was made with
# (shared/golden/sam2/README.md, "The reduced model").
REDUCED_OPTIONS = (("embed_dim", 16), ("stages", (1, 1, 3, 2)), ("global_att_blocks", (4,)),
                   ("memory_layers", 2), ("memory_ffn", 1024))


def reduced_medsam2_spec():
    """MedSAM2's entry with the reduced golden network: its pipeline, the test checkpoint's layout."""
    return dataclasses.replace(MODELS["medsam2"], name="medsam2_reduced", display_name="MedSAM2 (reduced test)",
                               arch_options=REDUCED_OPTIONS)


@pytest.fixture(scope="module")
def sam2_golden(golden_dir) -> Path:
    path = golden_dir / "sam2"
    if not (path / "README.md").is_file():
        pytest.skip(f"SAM 2 golden data not found at {path}")
    return path


# --- entries ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", list(SAM2_SIZES))
def test_sam21_entries_point_at_meta_release(size):
    spec = MODELS[f"sam2.1_hiera_{size}"]
    filename = f"sam2.1_hiera_{size}.pt"
    assert spec.filename == filename
    assert spec.urls[0] == f"https://dl.fbaipublicfiles.com/segment_anything_2/092824/{filename}"
    assert spec.urls[1].startswith("https://huggingface.co/facebook/sam2.1-hiera-") and spec.urls[1].endswith(filename)
    assert (spec.architecture, spec.pipeline, spec.input_size, spec.family) == (SAM2_SIZES[size], "sam2", 1024, "sam2")
    assert spec.sha256 is not None and len(spec.sha256) == 64 and spec.size_bytes > 100_000_000
    assert spec.display_name.startswith("SAM 2.1 ") and spec.notes and not spec.notes.endswith(" ")


def test_medsam2_entry():
    spec = MODELS["medsam2"]
    assert spec.urls == ("https://huggingface.co/wanglab/MedSAM2/resolve/main/MedSAM2_latest.pt",)
    assert (spec.filename, spec.architecture, spec.pipeline, spec.input_size) == (
        "MedSAM2_latest.pt", "hiera_t512", "medsam2", 512)
    assert spec.family == "sam2" and spec.homepage == "https://github.com/bowang-lab/MedSAM2"
    assert spec.sha256 is None and spec.size_bytes is None  # nothing published that we could verify


def test_families_and_names():
    assert set(SAM2_ARCHITECTURE_NAMES) <= set(ARCHITECTURE_NAMES)
    assert {"sam2", "medsam2"} <= set(PIPELINE_NAMES)
    from napari_medsam.models.networks.sam2.model import SAM2_ARCHITECTURES

    assert set(SAM2_ARCHITECTURE_NAMES) == set(SAM2_ARCHITECTURES)
    for spec in MODELS.values():
        assert spec.family == ("sam2" if spec.architecture in SAM2_ARCHITECTURE_NAMES else "sam")
    assert MODELS["medsam"].family == "sam"


def test_sam2_specs_are_validated():
    spec = MODELS["medsam2"]
    with pytest.raises(ValueError, match="512"):
        dataclasses.replace(spec, input_size=1024)
    with pytest.raises(ValueError, match="1024"):
        dataclasses.replace(MODELS["sam2.1_hiera_tiny"], input_size=512)
    with pytest.raises(ValueError, match="does not fit"):
        dataclasses.replace(spec, architecture="vit_b", input_size=1024)  # a SAM 1 network with a SAM 2 pipeline
    with pytest.raises(ValueError, match="does not fit"):
        dataclasses.replace(MODELS["medsam"], pipeline="medsam2")
    reduced = reduced_medsam2_spec()
    assert reduced.build_options["stages"] == (1, 1, 3, 2) and hash(reduced) != hash(spec)
    assert get_model(reduced) is reduced


# --- layouts ----------------------------------------------------------------------------------


def test_expected_layouts_equal_the_official_key_lists(sam2_golden):
    full = _read_keys(sam2_golden / "sam2_hiera_t512_keys.txt")
    assert list(expected_state("hiera_t512").items()) == full  # keys, shapes and order
    reduced = _read_keys(sam2_golden / "sam2_t512_reduced_keys.txt")
    assert list(expected_state("hiera_t512", **dict(REDUCED_OPTIONS)).items()) == reduced
    # SAM 2.1 Tiny at 1024 px and MedSAM2 at 512 px share every weight shape.
    assert expected_state("hiera_t") == expected_state("hiera_t512")
    sizes = [len(expected_state(a)) for a in ("hiera_t", "hiera_s", "hiera_b+", "hiera_l")]
    assert sizes == sorted(sizes) and sizes[0] == 471


def _refusal(found: dict, want: str, name: str) -> str:
    with pytest.raises(WeightsError) as info:
        check_architecture(found, expected_state(want), name)
    return str(info.value)


def test_a_sam1_file_offered_as_medsam2_is_named():
    message = _refusal(expected_state("vit_b"), "hiera_t512", "MedSAM2")
    assert "do not fit MedSAM2" in message and "looks like a SAM ViT-B / MedSAM ViT-B checkpoint" in message


def test_a_medsam2_file_offered_as_a_sam1_model_is_named():
    message = _refusal(expected_state("hiera_t512"), "vit_b", "MedSAM ViT-B")
    assert "looks like a SAM 2.1 Tiny / MedSAM2 checkpoint, not MedSAM ViT-B" in message


def test_a_t512_file_offered_as_sam21_large_is_named(sam2_golden):
    full = dict(_read_keys(sam2_golden / "sam2_hiera_t512_keys.txt"))
    message = _refusal(full, "hiera_l", "SAM 2.1 Large")
    assert "looks like a SAM 2.1 Tiny / MedSAM2 checkpoint, not SAM 2.1 Large" in message
    message = _refusal(expected_state("hiera_s"), "hiera_t512", "MedSAM2")
    assert "looks like a SAM 2.1 Small checkpoint" in message


# --- loading through the project's path ------------------------------------------------------


def test_load_network_dispatches_to_sam2(sam2_golden):
    from napari_medsam.models.networks.sam2.model import Sam2Network

    path = sam2_golden / "sam2_t512_reduced_random.pt"
    net = load_network(reduced_medsam2_spec(), path)
    assert isinstance(net, Sam2Network) and not net.training
    assert (net.image_size, net.low_res_size) == (512, 128)
    official = torch.load(path, map_location="cpu", weights_only=True)["model"]
    state = net.state_dict()
    assert list(state) == list(official)
    assert all(torch.equal(state[k], v) for k, v in official.items())


def test_the_reduced_file_is_refused_as_the_real_medsam2(sam2_golden):
    with pytest.raises(WeightsError) as info:
        load_network("medsam2", sam2_golden / "sam2_t512_reduced_random.pt")
    message = str(info.value)
    assert "do not fit MedSAM2" in message and "wrong shape" in message


def test_a_sam1_checkpoint_file_is_refused_as_medsam2(golden_dir):
    with pytest.raises(WeightsError) as info:
        load_network("medsam2", golden_dir / "sam_vit_b_depth2_random.pth")
    message = str(info.value)
    assert "do not fit MedSAM2" in message and "SAM ViT-B / MedSAM ViT-B" in message
