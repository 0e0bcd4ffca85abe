"""networks/fused.py: conv/linear + GELU through oneDNN's fused ops or the plain path, same numbers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from napari_medsam.models.networks import fused


def _inputs():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 6, 9, 9, generator=gen).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(12, 6, 3, 3, generator=gen), torch.randn(12, generator=gen)
    tokens, lw, lb = torch.randn(2, 17, 6, generator=gen), torch.randn(10, 6, generator=gen), torch.randn(10, generator=gen)
    return x, w, b, tokens, lw, lb


@pytest.mark.parametrize("linear", [None, True, False])
@pytest.mark.parametrize("enabled", [True, False])
def test_fused_and_plain_paths_give_the_plain_result(monkeypatch, enabled, linear):
    monkeypatch.setattr(fused, "ENABLED", enabled)
    monkeypatch.setattr(fused, "LINEAR", linear)
    x, w, b, tokens, lw, lb = _inputs()
    with torch.inference_mode():
        conv = fused.conv2d_gelu(x, w, b, 1, 1, 1, 1)
        depthwise = fused.conv2d_gelu(x, torch.randn(6, 1, 3, 3), None, (2, 2), (1, 1), (1, 1), 6)
        lin = fused.linear_gelu(tokens, lw, lb)
        torch.testing.assert_close(conv, F.gelu(F.conv2d(x, w, b, 1, 1)), atol=1e-5, rtol=1e-5)
        assert depthwise.shape == (1, 6, 5, 5)
        torch.testing.assert_close(lin, F.gelu(F.linear(tokens, lw, lb)), atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # no_grad (not inference mode): the in-place GELU of the plain path
        torch.testing.assert_close(fused.linear_gelu(tokens, lw, lb), lin)


def test_the_linear_op_follows_the_cpu_unless_forced(monkeypatch):
    calls = []
    real = torch.ops.mkldnn._linear_pointwise

    class Spy:
        def __getattr__(self, name):
            if name == "_linear_pointwise":
                return lambda *a: calls.append(1) or real(*a)
            return getattr(torch.ops.mkldnn, name)

    _, _, _, tokens, lw, lb = _inputs()
    monkeypatch.setattr(fused.torch.ops, "mkldnn", Spy(), raising=False)
    for forced, expect in ((True, fused.fused_available()), (False, False),
                           (None, fused.fused_available() and fused.linear_fusion_pays())):
        calls.clear()
        monkeypatch.setattr(fused, "LINEAR", forced)
        with torch.inference_mode():
            fused.linear_gelu(tokens, lw, lb)
        assert bool(calls) is expect, forced
    assert fused.linear_fusion_pays() is (torch.backends.cpu.get_cpu_capability() == "AVX512")


def test_training_keeps_autograd_and_the_plain_gradient():
    _, _, _, tokens, lw, lb = _inputs()
    lw = lw.clone().requires_grad_(True)
    fused.linear_gelu(tokens, lw, lb).square().sum().backward()
    expected = lw.detach().clone().requires_grad_(True)
    F.gelu(F.linear(tokens, expected, lb)).square().sum().backward()
    torch.testing.assert_close(lw.grad, expected.grad)
    x, w, b, *_ = _inputs()
    w = w.clone().requires_grad_(True)
    out = fused.conv2d_gelu(x, w, b, 1, 1, 1, 1)
    assert out.requires_grad


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_fresh_is_in_place_without_autograd_and_plain_with_it(approximate):
    y = torch.linspace(-4, 4, 101)
    expected = F.gelu(y, approximate=approximate)
    with torch.no_grad():
        fresh = y.clone()
        assert fused.gelu_fresh(fresh, approximate) is fresh
        torch.testing.assert_close(fresh, expected)
    leaf = y.clone().requires_grad_(True)
    out = fused.gelu_fresh(leaf * 1.0, approximate)
    out.sum().backward()
    torch.testing.assert_close(out.detach(), expected)
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
