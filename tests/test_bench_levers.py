"""benchmarks/bench_encoder_levers.py: each lever is switched off and on, compared, and restored."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_encoder_levers.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_encoder_levers_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_attention_levers_are_exact_and_restored(bench, monkeypatch):
    from napari_medsam.models.networks import vit

    def small(arch):  # a 2-block ViT: one windowed block (9 windows x 4 heads), one global block
        torch.manual_seed(0)
        enc = vit.ViTImageEncoder(embed_dim=64, depth=2, num_heads=4, global_attn_indexes=(1,), img_size=512).eval()
        return enc, torch.randn(1, 3, 512, 512)

    monkeypatch.setattr(bench, "_encoder", small)
    monkeypatch.setattr(vit, "_WINDOW_SCORES", 8 * 196 * 196)  # ragged chunks of the 36 windows x heads
    before = vit._WINDOW_SCORES
    for lever in ("window_chunks",):
        row = bench.ab_lever(lever, "vit_b", pairs=2)
        assert row["lever"] == lever and row["off_s"] > 0 and row["on_s"] > 0 and row["ratio"] > 0
        assert row["max_abs_diff"] == 0.0  # the same sums in another grouping of the loops
    assert vit._WINDOW_SCORES == before


def test_fused_gelu_lever_is_restored_and_close(bench):
    from napari_medsam.models.networks import fused

    row = bench.ab_lever("fused_gelu", "lite_tiny_vit", pairs=1)
    assert fused.ENABLED is True
    assert row["max_abs_diff"] < 1e-3  # random PyTorch-initialised weights amplify rounding; golden tests pin it
