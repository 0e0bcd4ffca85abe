"""The model registry (names, URLs, licences, checksums), expected layouts and device choice."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from urllib.parse import urlparse

import pytest
import torch

from napari_medsam.errors import MedSamError
from napari_medsam.models import networks
from napari_medsam.models.checkpoint import expected_state
from napari_medsam.models.device import DeviceError, available_devices, resolve_device, set_cpu_threads
from napari_medsam.models.registry import (
    ARCHITECTURE_NAMES,
    MODELS,
    PIPELINE_NAMES,
    ModelSpec,
    get_model,
    list_models,
    recommended_model,
)

REQUIRED = {"sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam", "mobile_sam", "lite_medsam"}


def test_registry_has_the_required_models_with_unique_names():
    names = [spec.name for spec in list_models()]
    assert REQUIRED <= set(names)
    assert len(names) == len(set(names))
    assert len({spec.filename for spec in list_models()}) == len(names)
    assert len({spec.display_name for spec in list_models()}) == len(names)


@pytest.mark.parametrize("spec", list_models(), ids=lambda s: s.name)
def test_every_spec_is_complete(spec: ModelSpec):
    assert spec.urls, spec.name
    for url in spec.urls:
        parsed = urlparse(url)
        assert parsed.scheme == "https" and parsed.netloc, url
    assert spec.filename and "/" not in spec.filename
    assert spec.filename.endswith((".pth", ".pt"))
    assert spec.license and spec.citation and spec.homepage.startswith("https://")
    assert spec.pipeline in PIPELINE_NAMES
    assert spec.architecture in ARCHITECTURE_NAMES
    assert spec.notes
    if spec.sha256 is not None:
        assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0
    if spec.size_bytes is not None:
        assert spec.size_bytes > 1_000_000


def test_official_sources_and_families():
    for variant, suffix in (("b", "01ec64"), ("l", "0b3195"), ("h", "4b8939")):
        spec = MODELS[f"sam_vit_{variant}"]
        assert spec.urls[0] == f"https://dl.fbaipublicfiles.com/segment_anything/sam_vit_{variant}_{suffix}.pth"
        assert (spec.architecture, spec.pipeline, spec.input_size) == (f"vit_{variant}", "sam", 1024)
    medsam = MODELS["medsam"]
    assert (medsam.filename, medsam.architecture, medsam.pipeline) == ("medsam_vit_b.pth", "vit_b", "medsam")
    mobile = MODELS["mobile_sam"]
    assert mobile.urls[0].endswith("/weights/mobile_sam.pt") and "ChaoningZhang/MobileSAM" in mobile.urls[0]
    assert (mobile.architecture, mobile.pipeline) == ("tiny_vit", "sam")
    lite = MODELS["lite_medsam"]
    assert (lite.filename, lite.architecture, lite.pipeline, lite.input_size) == (
        "lite_medsam.pth", "lite_tiny_vit", "lite_medsam", 256
    )


def test_meta_file_name_suffix_is_not_used_as_a_checksum_prefix():
    # The 6-hex suffix in Meta's names is not the start of the file's SHA-256.
    for name in ("sam_vit_b", "sam_vit_l", "sam_vit_h"):
        spec = MODELS[name]
        suffix = spec.filename.rsplit("_", 1)[1].split(".")[0]
        assert spec.sha256 is not None and not spec.sha256.startswith(suffix)


def test_get_model_and_unknown_name():
    assert get_model("medsam") is MODELS["medsam"]
    spec = MODELS["mobile_sam"]
    assert get_model(spec) is spec
    with pytest.raises(MedSamError) as info:
        get_model("sam_vit_x")
    message = str(info.value)
    assert "sam_vit_x" in message
    for name in REQUIRED:
        assert name in message


def test_spec_is_frozen_and_validated():
    spec = MODELS["sam_vit_b"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "other"  # type: ignore[misc]
    with pytest.raises(ValueError, match="pipeline"):
        dataclasses.replace(spec, pipeline="unknown")
    with pytest.raises(ValueError, match="architecture"):
        dataclasses.replace(spec, architecture="vit_x")
    with pytest.raises(ValueError, match="256"):
        dataclasses.replace(spec, architecture="lite_tiny_vit")
    with pytest.raises(ValueError, match="sha256"):
        dataclasses.replace(spec, sha256="01ec64")
    with pytest.raises(ValueError, match="URL"):
        dataclasses.replace(spec, urls=())
    variant = dataclasses.replace(spec, name="d2", arch_options=(("depth", 2), ("global_attn_indexes", (1,))))
    assert variant.build_options == {"depth": 2, "global_attn_indexes": (1,)}
    assert hash(variant) != hash(spec)


def test_recommended_model():
    assert recommended_model(has_gpu=False).name == "lite_medsam"
    assert recommended_model(has_gpu=False, medical=False).name == "mobile_sam"
    assert recommended_model(has_gpu=True).name == "medsam"
    assert recommended_model(has_gpu=True, medical=False).name == "sam_vit_h"


def test_registry_and_weights_import_without_torch():
    code = (
        "import sys, napari_medsam.models.registry, napari_medsam.models.weights; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- expected layouts versus the official key lists ---------------------------------------------


def _read_keys(path) -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            key, shape = line.split("\t")
            rows.append((key, tuple(json.loads(shape))))
    return rows


@pytest.mark.parametrize(
    ("arch", "options", "keys_file"),
    [
        ("vit_b", {}, "medsam_vit_b_keys.txt"),
        ("tiny_vit", {}, "mobile_sam_keys.txt"),
        ("lite_tiny_vit", {}, "lite_medsam_keys.txt"),
        ("vit_b", {"depth": 2, "global_attn_indexes": [1]}, "sam_vit_b_depth2_keys.txt"),
    ],
)
def test_expected_state_equals_official_key_lists(golden_dir, arch, options, keys_file):
    official = _read_keys(golden_dir / keys_file)
    ours = list(expected_state(arch, **options).items())
    assert ours == official  # same keys, same shapes, same order


def test_registry_architectures_are_buildable():
    from napari_medsam.models.networks.sam2 import SAM2_ARCHITECTURES

    assert set(ARCHITECTURE_NAMES) == set(networks.ARCHITECTURES) | set(SAM2_ARCHITECTURES)
    sizes = {spec.architecture: len(expected_state(spec.architecture)) for spec in list_models()}
    assert sizes["vit_h"] > sizes["vit_l"] > sizes["vit_b"] == 314
    assert sizes["hiera_t512"] == sizes["hiera_t"] == 471  # MedSAM2 and SAM 2.1 Tiny share a layout


# --- devices ----------------------------------------------------------------------------------


def test_resolve_device_auto_and_explicit():
    auto = resolve_device("auto")
    assert resolve_device(None) == auto
    if torch.cuda.is_available():
        assert auto.type == "cuda"
        assert resolve_device("cuda:0") == torch.device("cuda", 0)
        with pytest.raises(DeviceError, match="does not exist"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
    else:
        assert auto.type in ("mps", "cpu")
        with pytest.raises(DeviceError, match="CUDA is not available"):
            resolve_device("cuda")
    if not torch.backends.mps.is_available():
        with pytest.raises(DeviceError, match="mps"):
            resolve_device("mps")
    assert resolve_device("CPU") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(DeviceError) as info:
        resolve_device("tpu")
    assert "tpu" in str(info.value) and "cpu" in str(info.value)
    assert available_devices()[-1] == "cpu"
    assert isinstance(info.value, MedSamError)


def test_set_cpu_threads():
    before = torch.get_num_threads()
    try:
        assert set_cpu_threads(1) == 1 == torch.get_num_threads()
        assert set_cpu_threads(None) >= 1
        for bad in (0, -2, 1.5, True):
            with pytest.raises(DeviceError):
                set_cpu_threads(bad)  # type: ignore[arg-type]
    finally:
        torch.set_num_threads(before)
