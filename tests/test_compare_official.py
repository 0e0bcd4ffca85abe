"""benchmarks/compare_official.py without the official packages: its table logic and its skip path.

The benchmark itself needs the official SAM/MobileSAM/LiteMedSAM code in a separate environment;
these tests check what must hold everywhere: per-pair ratios and their median (not the ratio of
medians), the alternating order, the seeded random-weight rule, the torchvision stand-in, and
that a figure without its official package is reported as skipped instead of crashing the run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_official.py"


@pytest.fixture(scope="module")
def bench():
    yield from _script_module("compare_official_under_test", SCRIPT)


def _script_module(name, path):
    """Import a benchmark script as module ``name`` for the test, then forget it."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_median_of_pair_ratios_not_ratio_of_medians(bench):
    result = bench.FigureResult("x", "x", official_s=[3.0, 4.0, 10.0], project_s=[1.0, 4.0, 2.0], diff=0.0,
                                diff_unit="px")
    assert result.ratios() == [3.0, 1.0, 5.0]
    row = result.summary()
    assert row["official_median"] == 4.0 and row["project_median"] == 2.0
    assert row["ratio_median"] == 3.0  # the ratio of the medians would be 2.0
    table = bench.format_table([result])
    assert "| 4.00 s | 2.00 s | 3.00 | 3 | 0 px |" in table
    with pytest.raises(ValueError, match="unpaired"):
        bench.pair_ratios([1.0, 2.0], [1.0])


def test_table_formats_times_memory_and_skips(bench):
    fast = bench.FigureResult("box", "box", official_s=[0.060], project_s=[0.020], diff=1.5e-6, diff_unit="abs")
    rss = bench.FigureResult("rss", "rss", official_s=[3200.0], project_s=[1000.0], unit="MiB")
    gone = bench.FigureResult("vit_b", "ViT-B", skipped="segment_anything not importable")
    lines = bench.format_table([fast, rss, gone]).splitlines()
    assert lines[2] == "| box | 60.0 ms | 20.0 ms | 3.00 | 1 | 1.5e-06 |"
    assert lines[3] == "| rss | 3200 MiB | 1000 MiB | 3.20 | 1 | - |"
    assert lines[4].startswith("| ViT-B | skipped (segment_anything not importable) |")
    assert gone.summary() == {"figure": "vit_b", "label": "ViT-B", "unit": "s",
                              "skipped": "segment_anything not importable"}


def test_alternate_flips_the_order_every_pair(bench):
    calls: list[str] = []

    def official():
        calls.append("o")
        return "O"

    def project():
        calls.append("p")
        return "P"

    times_o, times_p, out_o, out_p = bench.alternate(official, project, repeats=3, warmup=1)
    assert "".join(calls) == "op" + "op" + "po" + "op"
    assert len(times_o) == len(times_p) == 3 and (out_o, out_p) == ("O", "P")


def test_figures_without_official_code_are_skipped(bench, tmp_path):
    ctx = bench.Context(repeats=1, golden=tmp_path, src=None, workdir=tmp_path)
    result = bench.run_figure("lite_medsam", ctx)
    assert result.skipped and "golden checkpoint" in result.skipped
    (tmp_path / "lite_medsam_random.pth").write_bytes(b"")
    result = bench.run_figure("box_lite_medsam", ctx)
    assert result.skipped and "--official-src" in result.skipped
    (tmp_path / "mobile_sam_random.pt").write_bytes(b"")
    result = bench.run_figure("mobile_sam", bench.Context(1, tmp_path, tmp_path / "nowhere", tmp_path))
    assert result.skipped and "mobile_sam/__init__.py not found" in result.skipped

    def broken(ctx):
        raise ZeroDivisionError("boom")

    result = bench.run_figure("broken", ctx, builders={"broken": broken})
    assert result.skipped == "failed: ZeroDivisionError: boom"


def test_script_runs_and_reports_skips_without_official_packages(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "NAPARI_MEDSAM_OFFICIAL_SRC"}
    out = tmp_path / "figures.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--figures", "mobile_sam", "lite_medsam", "box_lite_medsam", "--repeats", "1",
         "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "load average before:" in done.stdout and "load average after:" in done.stdout
    assert "torch threads" in done.stdout
    assert done.stdout.count("skipped (") >= 6  # a progress line and a table row per figure
    data = json.loads(out.read_text())
    assert [f["figure"] for f in data["figures"]] == ["mobile_sam", "lite_medsam", "box_lite_medsam"]
    assert all(f["skipped"] for f in data["figures"])
    assert len(data["load_before"]) == 3 and data["threads"] >= 1


def test_random_state_follows_the_golden_rule(bench):
    class LayerNorm2d(torch.nn.Module):  # the official SAM class name: matched by "Norm"
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(4))

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm2d(4), LayerNorm2d())
    state = bench.official_random_state(model, seed=0)
    torch.manual_seed(0)
    draws = [torch.randn(v.shape) for v in model.state_dict().values() if v.is_floating_point()]
    expected = [0.02 * draws[0], 0.02 * draws[1], 1 + 0.02 * draws[2], 0.02 * draws[3], 0.02 * draws[4],
                (0.02 * draws[5]).abs() + 0.5, 1 + 0.02 * draws[6]]
    floats = [k for k, v in state.items() if v.is_floating_point()]
    assert floats == ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var", "2.weight"]
    for key, want in zip(floats, expected):
        assert torch.equal(state[key], want), key
    assert state["1.num_batches_tracked"].item() == 0
    model.load_state_dict(state, strict=True)


def test_torchvision_stand_in(bench):
    if any(name == "torchvision" or name.startswith("torchvision.") for name in sys.modules):
        pytest.skip("torchvision already imported in this process")
    finder = bench._TorchvisionStub()
    sys.meta_path.insert(0, finder)
    try:
        from PIL import Image
        from torchvision.ops.misc import FrozenBatchNorm2d
        from torchvision.transforms.functional import InterpolationMode, resize, to_pil_image
        import torchvision.transforms as transforms

        class Sub(transforms.ToTensor):  # timm subclasses torchvision names at import
            pass

        with pytest.raises(RuntimeError, match="stand-in"):
            FrozenBatchNorm2d(4)
        with pytest.raises(RuntimeError, match="stand-in"):
            Sub()
        assert InterpolationMode.BILINEAR is not None
        with pytest.raises(ImportError):
            import torchvision.models.feature_extraction  # noqa: F401  (timm guards this import)
        rgb = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
        out = np.asarray(resize(to_pil_image(rgb), (70, 101)))
        want = np.asarray(Image.fromarray(rgb).resize((101, 70), Image.BILINEAR))
        assert out.shape == (70, 101, 3) and np.array_equal(out, want)
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]


# ---------------------------------------------------------------------- benchmarks/official_propagation.py
PROPAGATION = SCRIPT.parent / "official_propagation.py"


@pytest.fixture(scope="module")
def prop():
    yield from _script_module("official_propagation_under_test", PROPAGATION)


def test_official_loop_covers_every_slice_once_from_the_middle(prop):
    key, up, down = prop.official_slice_order(60)
    assert key == 29 and up[0] == 29 and up[-1] == 59 and down == list(range(28, -1, -1))
    assert sorted(up + down) == list(range(60))
    key, up, down = prop.official_slice_order(7)
    assert (key, up, down) == (3, [3, 4, 5, 6], [2, 1, 0])


class _NoisyPredictor:
    """Answers every box with a mask of its own (some slices empty) and a negative IoU estimate, like random weights."""

    axis = 0
    slice_shape = (32, 32)

    def __init__(self) -> None:
        self.predicted: list[int] = []

    def embed(self, index):
        return None

    def predict(self, index, prompts, multimask=False):
        from napari_medsam.segment.predictor import SliceMasks

        self.predicted.append(int(index))
        mask = np.zeros((1, 32, 32), bool)
        if index % 4 != 1:  # an empty answer on every fourth slice
            r = 2 + (7 * index) % 12
            mask[0, r:r + 14, 20 - r // 2:30 - r // 2] = True
        return SliceMasks(mask, np.array([-0.3]), np.zeros((1, 256, 256), np.float32), index=index)


def test_accept_all_rule_makes_propagation_visit_every_slice(prop):
    from napari_medsam.segment.predictor import Prompts
    from napari_medsam.segment.propagation import StopRule, propagate

    def run(stop):
        predictor = _NoisyPredictor()
        labels = np.zeros((20, 32, 32), np.uint8)
        propagate(predictor, labels, 1, {10: Prompts(box=[4, 4, 20, 20])}, stop=stop,
                  prompt=prop.project_prompt_settings(), fill_skipped=False)
        return predictor.predicted, labels

    visited, _ = run(StopRule())  # the default rule rejects a negative score and ends both fronts early
    assert len(visited) < 20
    visited, labels = run(prop.accept_all_rule(20))
    assert sorted(visited) == list(range(20))  # each slice predicted exactly once
    written = [z for z in range(20) if labels[z].any()]
    assert written == [z for z in range(20) if z % 4 != 1]  # every non-empty answer kept, nothing interpolated


def test_project_box_in_the_256_frame_and_prompt_margin(prop):
    assert prop.box_256_of_rc([148.0, 80.0, 363.0, 299.0]) == (40, 74, 149, 181)  # (x0, y0, x1, y1), truncated
    assert prop.box_256_of_rc([0.0, 0.0, 511.0, 511.0]) == (0, 0, 255, 255)
    settings = prop.project_prompt_settings()
    assert settings.mode == "box" and settings.box_margin_px == 6.0 and settings.box_margin_fraction == 0.0


def test_rounds_alternate_and_ratio_is_median_of_rounds(prop):
    calls: list[str] = []
    sides = {name: (lambda n=name: calls.append(n) or n) for name in prop.SIDES}
    times, outputs = prop.rounds(sides, repeats=3)
    o, c, w = prop.SIDES
    assert calls == [o, c, w, w, c, o, o, c, w]
    assert outputs == {n: n for n in prop.SIDES} and all(len(t) == 3 for t in times.values())
    figure = prop.PropagationFigure({o: [6.0, 8.0, 30.0], c: [2.0, 8.0, 5.0], w: [1.0, 1.0, 1.0]}, n_slices=2)
    assert figure.ratio(c) == 3.0  # ratios 3, 1, 6; the ratio of the medians would be 8 / 5
    assert "| project cold | 5.00 s | 2500.0 ms | 3.00 | 3 |" in figure.table()


def test_propagation_flag_skips_without_golden_or_official_code(bench, tmp_path, capsys):
    assert bench.main(["--propagation", "--golden", str(tmp_path), "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "load average before:" in out and "skipped (golden checkpoint" in out
    (tmp_path / "lite_medsam_random.pth").write_bytes(b"")
    env_src = os.environ.pop("NAPARI_MEDSAM_OFFICIAL_SRC", None)
    try:
        assert bench.main(["--propagation", "--golden", str(tmp_path), "--repeats", "1"]) == 0
    finally:
        if env_src is not None:
            os.environ["NAPARI_MEDSAM_OFFICIAL_SRC"] = env_src
    assert "skipped (no official sources" in capsys.readouterr().out


def test_running_the_script_in_process_leaves_sys_path_alone(bench, tmp_path):
    before = list(sys.path)
    bench.main(["--propagation", "--golden", str(tmp_path), "--official-src", str(tmp_path)])
    assert sys.path == before  # a stray benchmarks/ entry would leak into subprocess environments


def test_vit_flops_counts_what_the_encoder_computes(bench, monkeypatch):
    """The analytic count against torch's own FLOP counter on the project's encoder (a small ViT)."""
    from napari_medsam.models.networks import fused, vit
    from napari_medsam.models.networks.vit import ViTImageEncoder

    monkeypatch.setattr(fused, "ENABLED", False)  # torch's counter does not see oneDNN's fused linear + GELU
    monkeypatch.setattr(vit, "CPU_ATTENTION", "blocked")  # nor the products inside the fused attention kernel

    # Patch embedding and neck only: the convolutions torch counts for ViT-B (11.27 GFLOP).
    assert bench.vit_flops(depth=0) == 11_274_289_152
    # A 2-block ViT (one windowed, one global block) on a 32x32-token grid: torch counts the linear
    # layers, the convolutions and the batched products (p.v and the relative terms); q.k runs as
    # baddbmm_, which its counter leaves out, so it is added here.
    dim, heads, grid, window = 64, 2, 32, 14
    enc = ViTImageEncoder(embed_dim=dim, depth=2, num_heads=heads, global_attn_indexes=(1,), img_size=grid * 16,
                          window_size=window).eval()
    with torch.inference_mode(), torch.profiler.profile(with_flops=True) as prof:
        enc(torch.zeros(1, 3, grid * 16, grid * 16))
    counted = sum(e.flops for e in prof.key_averages() if e.flops and e.key != "aten::add" and e.key != "aten::mul")
    padded = 42  # 32 -> 3 windows of 14
    qk = heads * (9 * 2.0 * (window * window) ** 2 * (dim // heads) + 2.0 * (grid * grid) ** 2 * (dim // heads))
    expected = bench.vit_flops(dim=dim, depth=2, heads=heads, global_blocks=(1,), grid=grid, window=window)
    assert padded * padded == 9 * window * window
    assert counted + qk == pytest.approx(expected, rel=1e-9)


def test_ceiling_lines_follow_from_the_measured_rate(bench, monkeypatch):
    monkeypatch.setattr(bench, "float32_matmul_rate", lambda repeats=5: (324.0e9, "linear 4096x3072 -> 768"))
    vit = bench.FigureResult("vit_b", "ViT-B", official_s=[9.0, 9.0, 9.0], project_s=[6.0, 6.0, 6.0])
    lines = bench.ceiling_lines(vit)
    floor = bench.vit_flops() / 324.0e9  # 3.00 s
    assert f"{floor:.2f} s per slice" in lines[1] and f"at most {9.0 / floor:.2f}" in lines[1]
    assert f"{100 * bench.vit_flops() / 6.0 / 324.0e9:.0f} % of that rate" in lines[2]
    rate, where = bench.float32_matmul_rate(repeats=1)
    assert rate > 1e9 and where.startswith("linear 4096x")


def test_tinyvit_ceiling_counts_the_project_network(bench, monkeypatch):
    """MobileSAM's line: torch's count of the project's TinyViT (77.5 GFLOP at 1024 px), the same rate for all."""
    from napari_medsam.models.networks import fused, tiny_vit

    rate = (160.0e9, "linear 4096x768 -> 3072")
    mobile = bench.FigureResult("mobile_sam", "MobileSAM", official_s=[1.2, 1.2], project_s=[0.8, 0.8])
    lines = bench.ceiling_lines(mobile, rate)
    rows = tiny_vit._MBCONV_ROWS
    flops = bench.counted_flops("tiny_vit")
    assert fused.ENABLED is True and tiny_vit._MBCONV_ROWS == rows  # restored after counting unfused, in one pass
    assert 77.0e9 < flops < 78.0e9  # the network's own products: no strip's row of context counted
    assert lines[0].startswith("# float32 ceiling, MobileSAM: ") and f"{flops / 1e9:.1f} GFLOP" in lines[0]
    assert f"at most {1.2 / (flops / 160.0e9):.2f}" in lines[1]
    assert f"{100 * flops / 0.8 / 160.0e9:.0f} % of that rate" in lines[2]
