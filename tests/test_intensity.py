"""Intensity mapping from scan values to the model's 8-bit input."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medsam.segment.intensity import (
    contrast_limits,
    ct_window,
    data_range_window,
    default_mapping,
    percentile_mapping,
    window_level_width,
)
from napari_medsam.windows import CT_WINDOWS


@pytest.mark.parametrize("name", list(CT_WINDOWS))
def test_window_presets_map_their_bounds(name):
    level, width = CT_WINDOWS[name]
    mapping = ct_window(name)
    hu = np.array([[level - width / 2 - 100, level - width / 2, level, level + width / 2, level + width]], np.int16)
    out = mapping.to_uint8(hu)
    assert out.dtype == np.uint8
    assert out[0, 0] == 0 and out[0, 1] == 0
    assert out[0, 2] in (127, 128)
    assert out[0, 3] == 255 and out[0, 4] == 255


def test_soft_tissue_and_abdomen_are_w400_l40():
    assert (ct_window("abdomen").low, ct_window("abdomen").high) == (-160.0, 240.0)
    assert ct_window("soft tissue") == window_level_width(40, 400).__class__("window", -160.0, 240.0, "soft tissue")
    with pytest.raises(ValueError, match="unknown CT window"):
        ct_window("kidney stones")


def test_mapping_never_touches_the_scan():
    hu = np.random.default_rng(0).integers(-1000, 1000, (32, 32)).astype(np.int16)
    copy = hu.copy()
    rgb = ct_window("lung").to_rgb(hu)
    np.testing.assert_array_equal(hu, copy)
    assert rgb.shape == (32, 32, 3) and np.all(rgb[..., 0] == rgb[..., 2])


def test_mr_percentiles_are_per_volume_and_ignore_background():
    rng = np.random.default_rng(1)
    volume = np.zeros((10, 40, 40), np.float32)
    volume[:, 10:30, 10:30] = rng.normal(500, 50, (10, 20, 20))
    volume[9, 10:30, 10:30] *= 2  # one bright slice must not get its own scaling
    mapping = percentile_mapping(volume)
    nonzero = volume[volume != 0]
    assert mapping.low == pytest.approx(np.percentile(nonzero, 0.5))
    assert mapping.high == pytest.approx(np.percentile(nonzero, 99.5))
    assert default_mapping(volume, "MR") == mapping
    assert default_mapping(volume, "CT").kind == "window"


def test_signature_changes_with_the_window():
    assert ct_window("lung").signature != ct_window("bone").signature
    assert contrast_limits(-160, 240).signature != ct_window("soft tissue").signature  # other origin
    with pytest.raises(ValueError):
        contrast_limits(10, 10)


def test_data_range_window_matches_medsam_preprocessing(golden_dir):
    golden = np.load(golden_dir / "lite_medsam_golden.npz")
    hu = golden["hu_slice"]
    mapping = data_range_window(hu, level=40, width=400)
    np.testing.assert_array_equal(mapping.to_uint8(hu), golden["img_uint8"])
    np.testing.assert_array_equal(mapping.to_rgb(hu), golden["img_3c"])
