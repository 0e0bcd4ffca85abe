"""EfficientSAM3 position encoding, geometry encoder (prompt assembly) and fusion encoder.

Golden tests compare with the official EfficientSAM3 code's outputs for the reduced random-weight model
(``efficientsam3/`` in the golden folder; README flow steps 3 and 4-5): each part gets the golden inputs of
its step, so a failure points at that part. RoI-align is checked against a sample-by-sample loop written
from torchvision's documented pure-PyTorch semantics, and the padding logic against single-item runs.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_medsam.models.networks.es3 import (
    FusionConfig,
    FusionEncoder,
    GeometryConfig,
    GeometryEncoder,
    PositionEmbeddingSine,
    assemble_prompt,
    build_fusion_encoder,
    build_geometry_encoder,
    fusion_state_dict,
    geometry_state_dict,
    infer_fusion_config,
    infer_geometry_config,
    roi_align,
)
from napari_medsam.models.networks.es3.geometry import concat_padded

pytestmark = pytest.mark.usefixtures("two_torch_threads")

D = 64  # reduced detector width
CROP = slice(18, 30)  # README: crops of the 72 x 72 level are rows/cols [18:30]


@pytest.fixture(scope="module")
def checkpoint(es3_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(es3_dir / "es3_reduced_random.pt", map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="module")
def golden(es3_dir: Path):
    return dict(np.load(es3_dir / "es3_golden_image.npz"))


@pytest.fixture(scope="module")
def geometry(checkpoint) -> GeometryEncoder:
    state = geometry_state_dict(checkpoint)
    config = infer_geometry_config(state)
    assert config == GeometryConfig(d_model=D, num_layers=1, num_heads=8, dim_feedforward=256, roi_size=7)
    return build_geometry_encoder(config, state)


@pytest.fixture(scope="module")
def fusion(checkpoint) -> FusionEncoder:
    state = fusion_state_dict(checkpoint)
    config = infer_fusion_config(state)
    assert config == FusionConfig(d_model=D, num_layers=1, num_heads=8, dim_feedforward=256)
    return build_fusion_encoder(config, state)


@pytest.fixture(scope="module")
def image(golden) -> tuple[torch.Tensor, torch.Tensor]:
    """The golden 72 x 72 neck level and this module's sine code of it."""
    feats = torch.from_numpy(golden["fpn2_72_full"])
    return feats, PositionEmbeddingSine(D)(feats)


def _close(actual: torch.Tensor, expected: np.ndarray, rel: float = 1e-4) -> None:
    assert tuple(actual.shape) == expected.shape
    scale = float(np.abs(expected).max())
    assert scale > 0
    err = float(np.abs(actual.detach().numpy().astype(np.float64) - expected).max())
    assert err <= rel * scale, f"max |diff| {err:.3g} > {rel} * {scale:.3g}"


def _chstats(x: torch.Tensor) -> np.ndarray:
    flat = x.double().flatten(1)
    return torch.stack((flat.sum(1), (flat * flat).sum(1))).numpy()


def _full_size_keys(es3_dir: Path, prefix: str) -> dict[str, list[int]]:
    expected = {}
    for line in (es3_dir / "keys_es3_full_b0_mclipS0.tsv").read_text().splitlines():
        if line.startswith(prefix):
            key, shape, dtype = line.split("\t")
            assert dtype == "float32"
            expected[key[len(prefix):]] = [int(s) for s in shape.strip("[]").split(",") if s.strip()]
    assert expected
    return expected


# --- position encoding ------------------------------------------------------------------------------


def test_golden_pos72(golden, image):
    _, pos = image
    assert pos.shape == (1, D, 72, 72)
    _close(pos[:, :, CROP, CROP], golden["pos72_crop"], rel=1e-6)


def test_position_layout():
    pe = PositionEmbeddingSine(8)
    grid = pe(torch.zeros(2, 3, 4, 5))
    assert grid.shape == (2, 8, 4, 5) and torch.equal(grid[0], grid[1])
    # channel 0: sin of the y phase, channel 1: cos of it; channel 2/3: slower y pair; channels 4-7: x
    y = torch.arange(1, 5, dtype=torch.float32) / (4 + 1e-6) * 2 * math.pi
    x = torch.arange(1, 6, dtype=torch.float32) / (5 + 1e-6) * 2 * math.pi
    torch.testing.assert_close(grid[0, 0], y.sin()[:, None].expand(4, 5))
    torch.testing.assert_close(grid[0, 1], y.cos()[:, None].expand(4, 5))
    torch.testing.assert_close(grid[0, 3], (y / 100.0).cos()[:, None].expand(4, 5))
    torch.testing.assert_close(grid[0, 4], x.sin()[None, :].expand(4, 5))
    torch.testing.assert_close(grid[0, 6], (x / 100.0).sin()[None, :].expand(4, 5))
    # prompts: points (y code, x code, label), boxes (y code, x code, h, w) at the same frequencies
    xs, ys = torch.tensor([[0.2, 0.7]]), torch.tensor([[0.5, 0.1]])
    pts = pe.encode_points(xs, ys, torch.tensor([[1, 0]]))
    assert pts.shape == (1, 2, 9) and pts[0, :, 8].tolist() == [1.0, 0.0]
    torch.testing.assert_close(pts[0, 0, 0], torch.sin(torch.tensor(0.5 * 2 * math.pi)))
    torch.testing.assert_close(pts[0, 1, 5], torch.cos(torch.tensor(0.7 * 2 * math.pi)))
    boxes = pe.encode_boxes(xs[0], ys[0], torch.tensor([0.3, 0.4]), torch.tensor([0.6, 0.8]))
    assert boxes.shape == (2, 10)
    torch.testing.assert_close(boxes[:, :8], pts[0, :, :8])
    assert boxes[:, 8].tolist() == pytest.approx([0.6, 0.8]) and boxes[:, 9].tolist() == pytest.approx([0.3, 0.4])
    with pytest.raises(ValueError):
        PositionEmbeddingSine(6)


# --- RoI align --------------------------------------------------------------------------------------


def _roi_align_loop(feats: torch.Tensor, roi: list[float], out: int, scale: float, ratio: int,
                    aligned: bool) -> torch.Tensor:
    """One RoI, sample by sample, following torchvision's pure-PyTorch ``_roi_align`` rules."""
    _, c, h, w = feats.shape
    b, x0, y0, x1, y1 = roi
    off = 0.5 if aligned else 0.0
    x0, y0, x1, y1 = (v * scale - off for v in (x0, y0, x1, y1))
    rw, rh = x1 - x0, y1 - y0
    if not aligned:
        rw, rh = max(rw, 1.0), max(rh, 1.0)
    gh = ratio if ratio > 0 else math.ceil(rh / out)
    gw = ratio if ratio > 0 else math.ceil(rw / out)
    f = feats[int(b)].double()

    def sample(y: float, x: float) -> torch.Tensor:
        y, x = max(y, 0.0), max(x, 0.0)
        yl, xl = int(y), int(x)
        yh = h - 1 if yl >= h - 1 else yl + 1
        yl = min(yl, h - 1)
        xh = w - 1 if xl >= w - 1 else xl + 1
        xl = min(xl, w - 1)
        ly, lx = y - yl, x - xl
        return ((1 - ly) * (1 - lx) * f[:, yl, xl] + (1 - ly) * lx * f[:, yl, xh]
                + ly * (1 - lx) * f[:, yh, xl] + ly * lx * f[:, yh, xh])

    result = torch.zeros(c, out, out, dtype=torch.float64)
    for p in range(out):
        for q in range(out):
            acc = torch.zeros(c, dtype=torch.float64)
            for i in range(min(gh, h)):
                for j in range(min(gw, w)):
                    acc += sample(y0 + p * rh / out + (i + 0.5) * rh / out / gh,
                                  x0 + q * rw / out + (j + 0.5) * rw / out / gw)
            result[:, p, q] = acc / max(gh * gw, 1)
    return result


@pytest.mark.parametrize(("scale", "ratio", "aligned"), [(1.0, -1, False), (0.5, 2, False), (1.0, -1, True)])
def test_roi_align_matches_sample_loop(scale, ratio, aligned):
    gen = torch.Generator().manual_seed(3)
    feats = torch.randn(2, 3, 11, 13, generator=gen)
    rois = [
        [0, 1.3, 2.2, 9.7, 8.1],  # inside
        [1, -2.0, -1.5, 6.0, 4.0],  # over the top-left border
        [1, 7.5, 5.0, 15.0, 12.9],  # over the bottom-right border (clamped to the last row/column)
        [0, 4.0, 4.0, 4.2, 4.1],  # tiny: sides clamped to 1 unless aligned
        [0, 0.0, 0.0, 13.0 / scale, 11.0 / scale],  # the whole map
    ]
    got = roi_align(feats, torch.tensor(rois), 3, spatial_scale=scale, sampling_ratio=ratio, aligned=aligned)
    assert got.shape == (5, 3, 3, 3)
    for k, roi in enumerate(rois):
        want = _roi_align_loop(feats, roi, 3, scale, ratio, aligned)
        torch.testing.assert_close(got[k].double(), want, atol=1e-5, rtol=1e-5)
    assert roi_align(feats, torch.zeros(0, 5), 7).shape == (0, 3, 7, 7)


# --- geometry encoder and prompt assembly ------------------------------------------------------------


def test_geometry_strict_keys(checkpoint, geometry):
    prefix = "detector.geometry_encoder."
    assert {prefix + k for k in geometry.state_dict()} == {k for k in checkpoint if k.startswith(prefix)}
    broken = dict(geometry_state_dict(checkpoint))
    broken.pop("cls_embed.weight")
    with pytest.raises(RuntimeError, match="cls_embed"):
        GeometryEncoder(geometry.config).load_state_dict(broken, strict=True)


def test_geometry_full_size_keys_and_shapes(es3_dir):
    expected = _full_size_keys(es3_dir, "geometry_encoder.")
    with torch.device("meta"):
        model = GeometryEncoder(GeometryConfig())
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == expected
    meta_state = {k: torch.empty(shape, device="meta") for k, shape in expected.items()}
    assert infer_geometry_config(meta_state) == GeometryConfig()


def test_golden_text_prompt(geometry, golden, image):
    """Prompt (a): 16 "liver" text tokens + the geometry encoder's CLS token (no point, no box)."""
    feats, pos = image
    with torch.no_grad():
        tokens, mask = geometry(feats, pos)
        prompt, prompt_mask = assemble_prompt(torch.from_numpy(golden["text_liver_features"]),
                                              torch.from_numpy(golden["text_liver_mask"]), tokens, mask)
    assert tokens.shape == (1, 1, D) and mask.tolist() == [[False]]
    _close(prompt, golden["text_prompt"])
    assert prompt_mask.tolist() == golden["text_prompt_mask"].tolist()


def test_golden_box_prompt(geometry, golden, image):
    """Prompt (b): 16 "visual" text tokens + box token (projection, RoI pooling, sine code, label) + CLS."""
    feats, pos = image
    visual_mask = torch.from_numpy(golden["text_visual_tokens"] == 0)
    box = torch.from_numpy(golden["box_prompt_cxcywh"]).view(1, 1, 4)
    with torch.no_grad():
        prompt, prompt_mask = geometry.encode_prompt(
            torch.from_numpy(golden["text_visual_features"]), visual_mask, feats, pos,
            boxes=box, box_labels=torch.ones(1, 1, dtype=torch.bool))
    _close(prompt, golden["box_prompt"])
    assert prompt_mask.tolist() == golden["box_prompt_mask"].tolist()
    # the RoI pooling is part of what is compared: a box on another region gives other tokens
    with torch.no_grad():
        moved, _ = geometry(feats, pos, boxes=box + torch.tensor([0.3, 0.2, 0.0, 0.0]))
    assert float((moved[0] - prompt[16]).abs().max()) > 1e-3


def test_prompt_position_code_layouts():
    """Official layouts, read from its geometry encoder: points add Linear(x code, y code), boxes
    Linear(y code, x code, h, w) (no golden data covers points, so the layout is pinned here)."""
    model = GeometryEncoder(GeometryConfig(d_model=8, num_layers=0, num_heads=2, dim_feedforward=16))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.points_pos_enc_project.weight.copy_(torch.eye(8))
        model.boxes_pos_enc_project.weight.copy_(torch.eye(8, 10))
    feats = torch.randn(1, 8, 6, 6)
    pe = PositionEmbeddingSine(8)
    x, y = torch.tensor([0.25]), torch.tensor([0.75])
    with torch.no_grad():
        point = model._encode_points(torch.stack((x, y), -1)[:, None], torch.ones(1, 1), feats)
        box = model._encode_boxes(torch.tensor([[[0.25, 0.75, 0.5, 0.25]]]), torch.ones(1, 1), feats)
    code = pe.encode_points(x[None], y[None], torch.zeros(1, 1))[0, 0, :8]  # (y code, x code)
    torch.testing.assert_close(point[0, 0], torch.cat((code[4:], code[:4])))
    torch.testing.assert_close(box[0, 0], code)


def test_concat_padded():
    seq1 = torch.tensor([[1.0, 5.0], [2.0, 6.0], [3.0, 7.0]])[..., None]  # [3, B=2, 1]
    mask1 = torch.tensor([[False, False, True], [False, True, True]])
    seq2 = torch.tensor([[10.0, 20.0], [11.0, 21.0]])[..., None]
    mask2 = torch.tensor([[False, False], [False, True]])
    out, mask = concat_padded(seq1, mask1, seq2, mask2)
    assert out[:4, 0, 0].tolist() == [1.0, 2.0, 10.0, 11.0]
    assert out[:2, 1, 0].tolist() == [5.0, 20.0]
    assert mask.tolist() == [[False] * 4 + [True], [False, False, True, True, True]]


def test_geometry_padding_matches_single_items(geometry, image):
    """Batch of 2 with padded points/boxes: each item's valid tokens equal its own unpadded run."""
    feats, pos = image
    feats2, pos2 = torch.cat((feats, feats.flip(-1))), torch.cat((pos, pos))
    boxes = torch.tensor([[[0.3, 0.4, 0.2, 0.3], [0.6, 0.5, 0.3, 0.2]],
                          [[0.5, 0.5, 0.4, 0.4], [0.0, 0.0, 0.0, 0.0]]])  # [Nb=2, B=2, 4]
    box_mask = torch.tensor([[False, False], [False, True]])
    points = torch.tensor([[[0.2, 0.3], [0.7, 0.6]]])  # [Np=1, B=2, 2]
    point_labels = torch.tensor([[1, 0]])
    box_labels = torch.tensor([[1, 0], [0, 1]])
    with torch.no_grad():
        tokens, mask = geometry(feats2, pos2, boxes=boxes, box_labels=box_labels, box_mask=box_mask,
                                points=points, point_labels=point_labels)
        assert tokens.shape == (4, 2, D)
        assert mask.tolist() == [[False] * 4, [False, False, False, True]]
        for b, n_boxes in ((0, 2), (1, 1)):
            single, single_mask = geometry(
                feats2[b:b + 1], pos2[b:b + 1], boxes=boxes[:n_boxes, b:b + 1],
                box_labels=box_labels[:n_boxes, b:b + 1], points=points[:, b:b + 1],
                point_labels=point_labels[:, b:b + 1])
            assert not single_mask.any()
            torch.testing.assert_close(tokens[:2 + n_boxes, b], single[:, 0], atol=1e-5, rtol=1e-5)


# --- fusion encoder ---------------------------------------------------------------------------------


def test_fusion_strict_keys(checkpoint, fusion):
    prefix = "detector.transformer.encoder."
    assert {prefix + k for k in fusion.state_dict()} == {k for k in checkpoint if k.startswith(prefix)}


def test_fusion_full_size_keys_and_shapes(es3_dir):
    expected = _full_size_keys(es3_dir, "transformer.encoder.")
    with torch.device("meta"):
        model = FusionEncoder(FusionConfig())
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == expected
    meta_state = {k: torch.empty(shape, device="meta") for k, shape in expected.items()}
    assert infer_fusion_config(meta_state) == FusionConfig()


@pytest.mark.parametrize("prompt_name", ["text", "box"])
def test_golden_fusion_encoder(fusion, golden, image, prompt_name):
    feats, pos = image
    prompt = torch.from_numpy(golden[f"{prompt_name}_prompt"])
    prompt_mask = torch.from_numpy(golden[f"{prompt_name}_prompt_mask"])
    with torch.no_grad():
        out = fusion(feats, pos, prompt, prompt_mask)
    assert out.memory.shape == (72 * 72, 1, D) and out.padding_mask is None
    assert out.spatial_shapes.tolist() == [[72, 72]] and out.level_start_index.tolist() == [0]
    torch.testing.assert_close(out.pos_embed, pos.flatten(2).permute(2, 0, 1))
    encoded = out.memory_map()[0]
    _close(encoded[:, CROP, CROP], golden[f"{prompt_name}_encoder_crop"])
    _close(torch.from_numpy(_chstats(encoded)), golden[f"{prompt_name}_encoder_chstats"])


def test_fusion_ignores_padded_prompt_tokens(fusion, golden, image):
    feats, pos = image
    prompt = torch.from_numpy(golden["text_prompt"]).clone()
    mask = torch.from_numpy(golden["text_prompt_mask"])
    assert mask.any()
    with torch.no_grad():
        ref = fusion(feats, pos, prompt, mask).memory
        prompt[mask[0]] = 5.0
        changed = fusion(feats, pos, prompt, mask).memory
        unmasked = fusion(feats, pos, prompt, torch.zeros_like(mask)).memory
    torch.testing.assert_close(changed, ref, atol=1e-6, rtol=1e-6)
    assert float((unmasked - ref).abs().max()) > 1e-4
