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
    before, before_kernel = vit._WINDOW_SCORES, vit.CPU_ATTENTION
    row = bench.ab_lever("window_chunks", "vit_b", pairs=2)  # in the blocked kernel, held meanwhile
    assert row["lever"] == "window_chunks" and row["off_s"] > 0 and row["on_s"] > 0 and row["ratio"] > 0
    assert row["max_abs_diff"] == 0.0  # the same sums in another grouping of the loops
    row = bench.ab_lever("sdpa_attention", "vit_b", pairs=2)
    assert row["off_s"] > 0 and row["on_s"] > 0 and row["ratio"] > 0
    assert 0.0 < row["max_abs_diff"] < 1e-4  # another kernel: float rounding, not the same sums
    assert vit._WINDOW_SCORES == before and vit.CPU_ATTENTION == before_kernel == "sdpa"


def test_fused_gelu_lever_is_restored_and_close(bench):
    from napari_medsam.models.networks import fused

    row = bench.ab_lever("fused_gelu", "lite_tiny_vit", pairs=1)
    assert fused.ENABLED is True
    assert row["max_abs_diff"] < 1e-3  # random PyTorch-initialised weights amplify rounding; golden tests pin it


def test_fused_linear_lever_restores_the_cpu_choice(bench, monkeypatch):
    from napari_medsam.models.networks import fused

    def small(arch):  # two TinyViT-style MLP layers are enough to time the op choice
        torch.manual_seed(0)
        mlp = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Linear(64, 16))
        return (lambda x: mlp[1](fused.linear_gelu(x, mlp[0].weight, mlp[0].bias))), torch.randn(1, 300, 16)

    monkeypatch.setattr(bench, "_encoder", small)
    row = bench.ab_lever("fused_linear", "tiny_vit", pairs=2)
    assert fused.LINEAR is None
    assert row["off_s"] > 0 and row["on_s"] > 0 and row["max_abs_diff"] < 1e-5


def test_allocator_child_reports_huge_pages_and_tuning_on_a_worker_thread(tmp_path):
    import json
    import os
    import subprocess

    for value, expect in (("1", True), ("0", False)):
        env = dict(os.environ, NAPARI_MEDSAM_MALLOC_TUNING=value)
        env.pop("THP_MEM_ALLOC_ENABLE", None)
        done = subprocess.run([sys.executable, str(SCRIPT), "--allocator-child", "lite_tiny_vit", "--runs", "1",
                               "--where", "thread"], env=env, capture_output=True, text=True, check=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        assert row["huge_pages"] is expect and row["s"] > 0 and row["faults"] >= 0
        if sys.platform.startswith("linux"):
            assert row["applied"] is expect
