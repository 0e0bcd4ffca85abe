"""EfficientSAM3 image model: detector decoder, heads, whole-model assembly, strict loading, post-processing.

Golden tests run the whole model from the slice ``image_u8`` (preprocessing, image and text students,
geometry and fusion encoders, decoder, heads, the processor's post-processing) and compare with the
official EfficientSAM3 code's arrays for the reduced random-weight model (``efficientsam3/`` in the golden
folder; README flow steps 4 and 5): prompt (a) the phrase "liver", prompt (b) a box with the dummy
phrase "visual". Tolerances are the README's: features/logits/states ``<= 1e-4 * max|golden|``, scores and
(normalised) boxes ``<= 1e-5`` absolute, top-k indices and detection counts exact, final masks ``<= 0.1 %``
of pixels. The model runs once per module. Unit tests check the decoder's pieces against direct
formulas written independently of the module.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_medsam.models.networks.es3 import (
    DecoderConfig,
    DotProductScoring,
    Es3CheckpointError,
    Es3Config,
    Es3Decoder,
    Es3ImageModel,
    HeadsConfig,
    build_es3_model,
    infer_es3_config,
    load_es3_checkpoint,
)
from napari_medsam.models.networks.es3.decoder import inverse_sigmoid, sine_embed_boxes

pytestmark = pytest.mark.usefixtures("two_torch_threads")

PROMPTS = ("text", "box")


@pytest.fixture(scope="module")
def golden(es3_dir: Path):
    with np.load(es3_dir / "es3_golden_image.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def checkpoint(es3_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(es3_dir / "es3_reduced_random.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def model(es3_dir: Path) -> Es3ImageModel:
    # the reduced text transformer has 2 heads (README); the detector keeps 8
    return load_es3_checkpoint(es3_dir / "es3_reduced_random.pt", es3_dir / "bpe_simple_vocab_16e6.txt.gz",
                               text_heads=2)


@pytest.fixture(scope="module")
def runs(model, golden):
    """The official flow once per prompt: one image encoding, then (a) "liver", (b) box + "visual"."""
    with torch.inference_mode():
        features = model.encode_image(model.preprocess(golden["image_u8"]))
        out = {"text": model.ground(features, model.encode_text(["liver"]))}
        box = torch.from_numpy(golden["box_prompt_cxcywh"]).view(1, 1, 4)
        out["box"] = model.ground(features, model.encode_text(["visual"]), box, torch.tensor([[True]]))
        threshold = float(golden["threshold"])
        hw = golden["image_u8"].shape
        final = {p: model.postprocess(out[p], hw, threshold) for p in PROMPTS}
    return features, out, final


def _close(actual: torch.Tensor, expected: np.ndarray, rel: float = 1e-4, name: str = "") -> None:
    actual = actual.detach().cpu().numpy().astype(np.float64)
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    scale = float(np.abs(expected).max())
    err = float(np.abs(actual - expected).max())
    assert err <= rel * scale, f"{name}: max |diff| {err:.3g} > {rel} * {scale:.3g}"


def _abs_close(actual: torch.Tensor, expected: np.ndarray, tol: float = 1e-5, name: str = "") -> None:
    actual = actual.detach().cpu().numpy().astype(np.float64)
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    err = float(np.abs(actual - expected).max()) if actual.size else 0.0
    assert err <= tol, f"{name}: max |diff| {err:.3g} > {tol}"


# --- golden: the whole model -------------------------------------------------------------------------


@pytest.mark.parametrize("p", PROMPTS)
def test_golden_prompt_tokens(runs, golden, p):
    out = runs[1][p]
    _close(out.prompt, golden[f"{p}_prompt"], name=f"{p}_prompt")
    assert out.prompt_mask.tolist() == golden[f"{p}_prompt_mask"].tolist()


@pytest.mark.parametrize("p", PROMPTS)
def test_golden_decoder_and_scores(runs, golden, p):
    out = runs[1][p]
    _close(out.hs, golden[f"{p}_decoder_hs"], name="decoder_hs")
    _close(out.pred_logits[0], golden[f"{p}_pred_logits"], name="pred_logits")
    _close(out.presence_logit, golden[f"{p}_presence_logit"], name="presence_logit")
    _abs_close(out.pred_boxes[0], golden[f"{p}_pred_boxes"], name="pred_boxes")
    _abs_close(out.scores[0], golden[f"{p}_scores"], name="scores")
    # the encoder output handed to the decoder: crop and per-channel sums (README layout: [64, 72, 72])
    grid = out.encoder.memory[:, 0].T.reshape(-1, 72, 72).double()
    _close(grid[:, 18:30, 18:30], golden[f"{p}_encoder_crop"], name="encoder_crop")
    stats = torch.stack((grid.sum((1, 2)), (grid * grid).sum((1, 2))))
    _close(stats, golden[f"{p}_encoder_chstats"], name="encoder_chstats")


@pytest.mark.parametrize("p", PROMPTS)
def test_golden_topk_and_masks(runs, golden, p):
    out = runs[1][p]
    scores = out.scores[0]
    order = torch.sort(scores, descending=True, stable=True).indices[:5]
    assert order.tolist() == golden[f"{p}_topk_idx"].tolist()
    _abs_close(scores[order], golden[f"{p}_topk_scores"], name="topk_scores")
    _abs_close(out.pred_boxes[0][order], golden[f"{p}_topk_boxes_cxcywh"], name="topk_boxes")
    assert out.pred_masks.shape == (1, 200, 288, 288)
    _close(out.pred_masks[0][order], golden[f"{p}_topk_mask_logits"], name="topk_mask_logits")


@pytest.mark.parametrize("p", PROMPTS)
def test_golden_final_detections(runs, golden, p):
    det = runs[2][p]
    n = len(golden[f"{p}_final_scores"])
    assert len(det.scores) == n == (3 if p == "text" else 1)
    assert det.indices.tolist() == sorted(det.indices.tolist())  # query order, not score order
    _abs_close(det.scores, golden[f"{p}_final_scores"], name="final_scores")
    h, w = golden["image_u8"].shape
    scale = np.array([w, h, w, h], dtype=np.float64)
    _abs_close(det.boxes / torch.tensor(scale), golden[f"{p}_final_boxes_xyxy"] / scale, name="final_boxes")
    assert det.masks.dtype == torch.bool and det.masks.shape == (n, h, w)
    differ = int((det.masks.numpy() != golden[f"{p}_final_masks"]).sum())
    assert differ <= 0.001 * det.masks.numel(), f"{differ} mask pixels differ"
    assert torch.equal(det.masks, det.mask_probs > 0.5)


def test_predict_box_only_matches_processor(model, golden, runs):
    """``predict`` (uint8 slice in, detections out) = the processor path, "visual" used for a box-only prompt."""
    det = model.predict(golden["image_u8"], boxes=[golden["box_prompt_cxcywh"].tolist()],
                        threshold=float(golden["threshold"]))
    ref = runs[2]["box"]
    assert det.indices.tolist() == ref.indices.tolist()
    assert torch.allclose(det.scores, ref.scores, atol=1e-6, rtol=0)
    assert torch.allclose(det.boxes, ref.boxes, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="text phrase, boxes or both"):
        model.predict(golden["image_u8"])


def test_batch_of_two_images(model, runs, golden):
    """Two images with different prompts in one batch give each one's single-image results."""
    features = runs[0]
    pair = type(features)(fpn=[torch.cat([f, f]) for f in features.fpn], pos=[torch.cat([p, p]) for p in features.pos])
    with torch.inference_mode():
        text = model.encode_text(["liver", "visual"])
        box = torch.tensor([[[0.5, 0.5, 0.2, 0.2]], [golden["box_prompt_cxcywh"].tolist()]])
        labels = torch.tensor([[True], [True]])
        # image 0: phrase "liver" with an extra box (a new case); image 1: the golden box prompt
        both = model.ground(features=pair, text=text, boxes=box, box_labels=labels, masks=False)
    assert both.pred_masks is None and both.hs.shape == (2, 2, 200, 64)
    with torch.inference_mode():  # one phrase serves every image
        shared = model.ground(pair, model.encode_text(["visual"]), box, labels, masks=False)
    assert shared.prompt.shape[1] == 2 and torch.equal(shared.prompt[:16, 0], shared.prompt[:16, 1])
    _abs_close(shared.scores[1], golden["box_scores"], name="shared-phrase scores")
    _close(both.hs[:, 1], golden["box_decoder_hs"][:, 0], name="batch hs")
    _abs_close(both.scores[1], golden["box_scores"], name="batch scores")
    assert not torch.allclose(both.scores[0], torch.from_numpy(golden["text_scores"]))  # the box changed it


def test_postprocess_empty_and_threshold(runs, golden):
    out = runs[1]["text"]
    none = Es3ImageModel.postprocess(out, (50, 60), threshold=1.0)
    assert none.scores.shape == (0,) and none.boxes.shape == (0, 4) and none.masks.shape == (0, 50, 60)
    everything = Es3ImageModel.postprocess(out, (50, 60), threshold=0.0)
    assert everything.indices.tolist() == list(range(200)) and everything.masks.shape == (200, 50, 60)


# --- strict loading ----------------------------------------------------------------------------------


def test_strict_load_covers_every_key(model, checkpoint):
    assert {f"detector.{k}" for k in model.state_dict()} == set(checkpoint)
    assert all(not t.is_meta for t in model.state_dict().values())
    bare = build_es3_model(infer_es3_config(checkpoint, text_heads=2),
                           {k.removeprefix("detector."): v for k, v in checkpoint.items()})
    for key, value in bare.state_dict().items():
        assert torch.equal(value, checkpoint[f"detector.{key}"]), key


def test_other_architecture_is_refused(golden_dir, tmp_path):
    with pytest.raises(Es3CheckpointError, match="not an EfficientSAM3 image-model state dict") as info:
        load_es3_checkpoint(golden_dir / "sam_vit_b_depth2_random.pth")
    assert isinstance(info.value, ValueError) and "transformer.decoder" in str(info.value)


def test_missing_unexpected_and_misshaped_keys(checkpoint, es3_dir, tmp_path):
    config = infer_es3_config(checkpoint, text_heads=2)
    missing = dict(checkpoint)
    del missing["detector.transformer.decoder.presence_token.weight"]
    with pytest.raises(ValueError, match=r"missing keys: transformer\.decoder\.presence_token\.weight"):
        build_es3_model(config, missing)
    extra = {**checkpoint, "detector.segmentation_head.extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"unexpected keys: segmentation_head\.extra\.weight"):
        build_es3_model(config, extra)
    wrong = {**checkpoint, "detector.dot_prod_scoring.hs_proj.bias": torch.zeros(65)}
    with pytest.raises(ValueError, match=r"wrong shapes: dot_prod_scoring\.hs_proj\.bias \(65,\)"):
        build_es3_model(config, wrong)
    # the same through a file: a truncated official-layout checkpoint
    path = tmp_path / "cut.pt"
    torch.save({"model": missing}, path)
    with pytest.raises(Es3CheckpointError, match="presence_token"):
        load_es3_checkpoint(path, text_heads=2)


def test_official_loader_conventions(checkpoint, model, tmp_path):
    """Tracker entries, the unused SAM 2 neck copy and a ``student_trunk.`` wrapper level are handled as the
    official loader does; the result equals the plain load."""
    renamed = {k.replace("trunk.model.head.", "trunk.model.student_trunk.head."): v for k, v in checkpoint.items()}
    assert renamed != checkpoint
    path = tmp_path / "combined.pt"
    torch.save({"model": {**renamed, "tracker.maskmem_tpos_enc": torch.zeros(7, 1, 1, 64),
                          "detector.backbone.vision_backbone.sam2_convs.0.conv_1x1.weight": torch.zeros(64, 64, 1, 1)}},
               path)
    loaded = load_es3_checkpoint(path, text_heads=2)
    reference = model.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in loaded.state_dict().items())


def test_infer_config_of_the_reduced_model(checkpoint):
    config = infer_es3_config(checkpoint, text_heads=2)
    assert config.decoder == DecoderConfig(d_model=64, n_heads=8, ffn_dim=256, num_layers=2, num_queries=200)
    assert config.heads == HeadsConfig(d_model=64, d_proj=64, prompt_hidden=256, n_heads=8, upsampling_stages=3)
    assert config.d_model == 64 and config.fusion.num_layers == 1 and config.geometry.num_layers == 1


def test_full_size_keys_and_shapes(es3_dir):
    """The official full-size model (EfficientViT-B0 + MobileCLIP-S0, d_model 256): all 724 keys and shapes."""
    expected = {}
    for line in (es3_dir / "keys_es3_full_b0_mclipS0.tsv").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, dtype = line.split("\t")
        expected[key] = ([int(s) for s in shape.strip("[]").split(",") if s.strip()], dtype)
    assert len(expected) == 724
    with torch.device("meta"):
        model = Es3ImageModel(Es3Config())
    built = {k: (list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()}
    assert sorted(set(built) - set(expected)) == [] and sorted(set(expected) - set(built)) == []
    assert built == expected
    meta_state = {k: torch.empty(shape, device="meta") for k, (shape, _) in expected.items()}
    assert infer_es3_config(meta_state) == Es3Config()


# --- decoder and heads: pieces against direct formulas -----------------------------------------------


def test_sine_embedding_of_boxes():
    boxes = torch.tensor([[[0.3, 0.6, 0.2, 0.1]]])
    d = 16
    code = sine_embed_boxes(boxes, d)[0, 0]
    assert code.shape == (2 * d,)
    n = d // 2
    expected = []
    for t in (0.6, 0.3, 0.2, 0.1):  # y, x, w, h
        for i in range(n):
            phase = 2 * math.pi * t / 10000 ** (2 * (i // 2) / n)
            expected.append(math.sin(phase) if i % 2 == 0 else math.cos(phase))
    assert torch.allclose(code.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6)


def test_inverse_sigmoid_clamps():
    x = torch.tensor([0.0, 1e-4, 0.25, 0.5, 0.9, 1.0, 1.5])
    y = inverse_sigmoid(x)
    assert torch.allclose(y[2:5].sigmoid(), x[2:5], atol=1e-6)
    assert y[0] == pytest.approx(math.log(1e-3)) and y[1] == pytest.approx(math.log(1e-3 / (1 - 1e-4)))
    assert y[5] == y[6] == pytest.approx(math.log(1 / 1e-3), rel=1e-6)


def test_box_bias_matches_direct_formula():
    torch.manual_seed(0)
    dec = Es3Decoder(DecoderConfig(d_model=16, n_heads=2, ffn_dim=32, num_layers=1, num_queries=3)).eval()
    boxes = torch.tensor([[[0.5, 0.4, 0.3, 0.2]], [[0.2, 0.7, 0.1, 0.4]], [[0.9, 0.1, 0.5, 0.5]]])  # [Q, B, 4]
    h, w = 5, 7
    with torch.no_grad():
        bias = dec.box_bias(boxes, h, w)  # [B * heads, 1 + Q, HW], presence row first
    assert bias.shape == (2, 4, h * w) and not bias[:, 0].any()

    def squash(v: float) -> float:
        return math.copysign(math.log2(abs(8 * v) + 1), v) / 3

    q, i, j = 1, 3, 5
    cx, cy, bw, bh = boxes[q, 0].tolist()
    dy = torch.tensor([squash(i / h - (cy - bh / 2)), squash(i / h - (cy + bh / 2))])
    dx = torch.tensor([squash(j / w - (cx - bw / 2)), squash(j / w - (cx + bw / 2))])
    with torch.no_grad():
        expected = dec.boxRPB_embed_y(dy) + dec.boxRPB_embed_x(dx)  # [heads]
    assert torch.allclose(bias[:, 1 + q, i * w + j], expected, atol=1e-5)


def test_decoder_shapes_refinement_and_presence():
    torch.manual_seed(1)
    dec = Es3Decoder(DecoderConfig(d_model=16, n_heads=2, ffn_dim=32, num_layers=2, num_queries=5)).eval()
    memory, pos = torch.randn(12, 2, 16), torch.randn(12, 2, 16)
    prompt = torch.randn(4, 2, 16)
    mask = torch.tensor([[False, False, True, True], [False, False, False, True]])
    with torch.no_grad():
        out = dec(memory, pos, (3, 4), prompt, mask)
        # padded prompt tokens do not matter
        changed = prompt.clone()
        changed[2:, 0] = 100.0
        again = dec(memory, pos, (3, 4), changed, mask)
    assert out.hs.shape == (2, 2, 5, 16) and out.boxes.shape == (2, 2, 5, 4)
    assert out.presence_logits.shape == (2, 2, 1) and out.presence_feats.shape == (1, 2, 16)
    assert torch.allclose(out.reference_boxes[0, 0], dec.reference_points.weight.sigmoid())
    assert torch.equal(out.reference_boxes[1], out.boxes[0])  # layer 2 starts from layer 1's boxes
    assert torch.allclose(again.hs, out.hs, atol=1e-6) and torch.allclose(again.boxes, out.boxes, atol=1e-6)


def test_scoring_pools_valid_prompt_tokens_only():
    torch.manual_seed(2)
    scoring = DotProductScoring(d_model=8, d_proj=4, prompt_hidden=16).eval()
    hs = torch.randn(1, 1, 3, 8)
    prompt = torch.randn(5, 1, 8)
    mask = torch.tensor([[False, True, False, True, True]])
    with torch.no_grad():
        logits = scoring(hs, prompt, mask)
        kept = scoring(hs, prompt[[0, 2]], torch.zeros(1, 2, dtype=torch.bool))
        pooled = scoring.prompt_mlp(prompt[[0, 2]]).mean(0)
        direct = (scoring.hs_proj(hs) @ scoring.prompt_proj(pooled)[0]) / 2.0
    assert logits.shape == (1, 1, 3, 1)
    assert torch.allclose(logits, kept, atol=1e-6)
    assert torch.allclose(logits[..., 0], direct, atol=1e-6)
