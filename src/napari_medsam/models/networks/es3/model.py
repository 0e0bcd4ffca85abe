"""The EfficientSAM3 image model: concept segmentation of one slice from a text phrase and/or boxes.

SAM 3's detector finds *every* instance of a prompted concept. EfficientSAM3 keeps that detector and
swaps its two big encoders for distilled students. The parts, with their checkpoint key prefixes
(``detector.`` in the files, removed here):

* ``backbone.vision_backbone``: EfficientViT student + SAM 3 neck (:mod:`.vision`); one 1008 x 1008
  image -> three feature levels (288, 144, 72 cells a side, ``d_model`` channels) + sine codes;
* ``backbone.language_backbone``: MobileCLIP text student (:mod:`.text`); a phrase -> 16 token
  features ``[16, B, d]`` and a padding mask;
* ``geometry_encoder`` (:mod:`.geometry`): box prompts (normalised cxcywh, label) -> prompt tokens,
  always followed by a learned CLS token;
* ``transformer.encoder`` (:mod:`.fusion`): the 72 x 72 image tokens read the prompt;
* ``transformer.decoder`` (:mod:`.decoder`): 200 object queries + presence token -> per-layer query
  states ``hs``, boxes and the presence logit;
* ``dot_prod_scoring`` and ``segmentation_head`` (:mod:`.heads`): class logit per query, mask logits
  per query at 288 x 288.

The prompt is ``[text tokens; geometry tokens]`` with one padding mask (True = padding). A box-only
prompt still carries a text part: the official processor encodes the phrase ``"visual"`` then.

Post-processing (the official ``Sam3Processor``): a query's score is ``sigmoid(class logit) *
sigmoid(presence logit)``; queries scoring above the threshold are kept *in query order*; boxes go from
normalised cxcywh to xyxy pixels of the original slice; mask logits are resized bilinearly
(``align_corners=False``) to the original size, squashed with a sigmoid and thresholded at 0.5.

:func:`load_es3_checkpoint` reads an official-layout file (``{"model": {"detector.<key>": ...}}``, or a
bare state dict with or without the ``detector.`` prefix; ``tracker.*`` entries of combined files and
the unused SAM 2 neck copy are ignored), infers every size from the tensors and loads with strict key and
shape checks: a file of another architecture fails with an error that names the missing and unexpected keys.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ....errors import WeightsError
from .decoder import DecoderConfig, DecoderOutput, Es3Decoder, box_cxcywh_to_xyxy, infer_decoder_config
from .fusion import FusionConfig, FusionEncoder, FusionOutput, infer_fusion_config
from .geometry import GeometryConfig, GeometryEncoder, infer_geometry_config
from .heads import DotProductScoring, HeadsConfig, UniversalSegmentationHead, infer_heads_config
from .text import MOBILECLIP_S0, MobileClipTextConfig, TextOutput, TextStudentEncoder, infer_text_config
from .tokenizer import ClipTokenizer
from .vision import VisionBackbone, VisionConfig, VisionOutput, infer_vision_config, preprocess_slice

__all__ = [
    "Detections",
    "Es3CheckpointError",
    "Es3Config",
    "Es3ImageModel",
    "GroundingOutput",
    "build_es3_model",
    "infer_es3_config",
    "load_es3_checkpoint",
]

DETECTOR_PREFIX = "detector."
# key prefixes every EfficientSAM3 image-model state dict has (a quick architecture check)
_PARTS = ("backbone.vision_backbone.", "backbone.language_backbone.", "geometry_encoder.", "transformer.encoder.",
          "transformer.decoder.", "dot_prod_scoring.", "segmentation_head.")
_UNUSED = ("backbone.vision_backbone.sam2_convs.", "inst_interactive_predictor.")  # see _strip
_SHOW = 8  # keys listed in an error message


class Es3CheckpointError(WeightsError, ValueError):
    """A state dict that does not fit the EfficientSAM3 image model (wrong architecture or sizes)."""


@dataclass(frozen=True)
class Es3Config:
    """Sizes of every part (defaults: the official EfficientViT-B0 + MobileCLIP-S0 model at d_model 256)."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: MobileClipTextConfig = MOBILECLIP_S0
    geometry: GeometryConfig = field(default_factory=GeometryConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    d_model: int = 256
    resolution: int = 1008


class _Backbone(nn.Module):
    """``backbone``: the image and text students (keys ``vision_backbone.*``, ``language_backbone.*``)."""

    def __init__(self, config: Es3Config, tokenizer: ClipTokenizer | None) -> None:
        super().__init__()
        self.vision_backbone = VisionBackbone(config.vision)
        self.language_backbone = TextStudentEncoder(config.text, config.d_model, tokenizer)


class _Transformer(nn.Module):
    """``transformer``: fusion encoder and decoder."""

    def __init__(self, config: Es3Config) -> None:
        super().__init__()
        self.encoder = FusionEncoder(config.fusion)
        self.decoder = Es3Decoder(config.decoder)


@dataclass
class GroundingOutput:
    """The detector's raw outputs for one prompt (batch-first; ``B`` images, ``Q`` queries)."""

    pred_logits: Tensor  # [B, Q] class logits (last decoder layer)
    pred_boxes: Tensor  # [B, Q, 4] cxcywh, normalised to [0, 1]
    presence_logit: Tensor  # [B] presence logit (last decoder layer)
    pred_masks: Tensor | None  # [B, Q, 288, 288] mask logits (None when masks were not asked for)
    hs: Tensor  # [L, B, Q, d] query states of every decoder layer
    prompt: Tensor  # [S, B, d] prompt tokens (text, geometry, CLS)
    prompt_mask: Tensor  # [B, S] True = padding
    encoder: FusionOutput
    decoder: DecoderOutput
    # query index of each row of pred_masks when masks were computed for a subset (``mask_threshold``);
    # None = one row per query
    mask_indices: Tensor | None = None

    @property
    def scores(self) -> Tensor:
        """``sigmoid(pred_logits) * sigmoid(presence_logit)``, ``[B, Q]``."""
        return (self.pred_logits[..., None].sigmoid() * self.presence_logit.sigmoid()[:, None, None]).squeeze(-1)


@dataclass
class Detections:
    """Kept detections of one image, in query order (as the official processor returns them)."""

    scores: Tensor  # [N]
    boxes: Tensor  # [N, 4] xyxy in pixels of the original image
    masks: Tensor  # [N, H, W] bool
    mask_probs: Tensor  # [N, H, W] sigmoid of the resized mask logits
    indices: Tensor  # [N] query indices


class Es3ImageModel(nn.Module):
    """EfficientSAM3's image detector with submodules named like the checkpoint (see the module docstring)."""

    def __init__(self, config: Es3Config = Es3Config(), tokenizer: ClipTokenizer | None = None) -> None:
        super().__init__()
        self.config = config
        h = config.heads
        self.backbone = _Backbone(config, tokenizer)
        self.geometry_encoder = GeometryEncoder(config.geometry)
        self.transformer = _Transformer(config)
        self.dot_prod_scoring = DotProductScoring(h.d_model, h.d_proj, h.prompt_hidden, h.clamp_logits)
        self.segmentation_head = UniversalSegmentationHead(h.d_model, h.n_heads, h.upsampling_stages)

    @property
    def tokenizer(self) -> ClipTokenizer | None:
        return self.backbone.language_backbone.tokenizer

    @tokenizer.setter
    def tokenizer(self, value: ClipTokenizer | None) -> None:
        self.backbone.language_backbone.tokenizer = value

    # --- encoders --------------------------------------------------------------------------------

    def preprocess(self, image: np.ndarray) -> Tensor:
        """uint8 slice (``H x W`` or ``H x W x 3``) -> ``[1, 3, R, R]`` network input, as the official processor."""
        return preprocess_slice(image, self.config.resolution).to(self._device())

    def encode_image(self, x: Tensor) -> VisionOutput:
        """Network input ``[B, 3, R, R]`` -> the three kept neck levels and their sine codes."""
        return self.backbone.vision_backbone(x)

    def encode_text(self, phrases: str | Sequence[str]) -> TextOutput:
        """Phrases -> token features ``[16, B, d]`` and padding mask (needs the tokenizer)."""
        return self.backbone.language_backbone(phrases)

    # --- detector --------------------------------------------------------------------------------

    def _device(self) -> torch.device:
        return self.dot_prod_scoring.hs_proj.weight.device

    def encode_prompt(self, features: VisionOutput, text: TextOutput, boxes: Tensor | None = None,
                      box_labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``[text tokens; geometry tokens]`` ``[S, B, d]`` and its padding mask ``[B, S]``.

        ``boxes``: ``[B, N, 4]`` (or ``[N, 4]`` for one image) normalised cxcywh; ``box_labels`` ``[B, N]``
        bool (True = positive; default all positive).
        """
        coarse, coarse_pos = features.fpn[-1], features.pos[-1]
        batch = coarse.shape[0]
        device = coarse.device
        if boxes is None:
            boxes = torch.zeros(batch, 0, 4, device=device)
        boxes = torch.as_tensor(boxes, dtype=torch.float32, device=device)
        if boxes.dim() == 2:
            boxes = boxes[None]
        if box_labels is None:
            box_labels = torch.ones(boxes.shape[:2], dtype=torch.bool, device=device)
        box_labels = torch.as_tensor(box_labels, device=device).reshape(boxes.shape[:2]).bool()
        features_t, mask_t = text.features, text.mask.to(device)
        if features_t.shape[1] != batch:
            if features_t.shape[1] != 1:
                raise ValueError(f"{features_t.shape[1]} phrases for {batch} images: give one, or one per image")
            features_t, mask_t = features_t.expand(-1, batch, -1), mask_t.expand(batch, -1)
        geo, geo_mask = self.geometry_encoder(coarse, coarse_pos, boxes=boxes.transpose(0, 1),
                                              box_labels=box_labels.transpose(0, 1))
        prompt = torch.cat((features_t, geo), dim=0)
        prompt_mask = torch.cat((mask_t, geo_mask), dim=1)
        return prompt, prompt_mask

    def ground(self, features: VisionOutput, text: TextOutput, boxes: Tensor | None = None,
               box_labels: Tensor | None = None, masks: bool = True,
               mask_threshold: float | None = None) -> GroundingOutput:
        """Run the detector on encoded image(s) and a prompt (the official ``forward_grounding``).

        ``text`` holds one phrase per image, or one for all. ``masks=False`` skips the mask head.
        ``mask_threshold``: compute masks only for the queries scoring above it in some image (what
        :meth:`postprocess` keeps at that threshold); ``mask_indices`` of the result names their rows. When
        no query passes, the pixel decoder is skipped: on a slice without the concept that is most of the
        mask head's time.
        """
        prompt, prompt_mask = self.encode_prompt(features, text, boxes, box_labels)
        encoded = self.transformer.encoder(features.fpn[-1], features.pos[-1], prompt, prompt_mask)
        decoded = self.transformer.decoder(encoded.memory, encoded.pos_embed, encoded.feat_size, prompt, prompt_mask)
        logits = self.dot_prod_scoring(decoded.hs, prompt, prompt_mask)  # [L, B, Q, 1]
        out = GroundingOutput(
            pred_logits=logits[-1, ..., 0], pred_boxes=decoded.boxes[-1],
            presence_logit=decoded.presence_logits[-1, :, 0], pred_masks=None, hs=decoded.hs, prompt=prompt,
            prompt_mask=prompt_mask, encoder=encoded, decoder=decoded)
        if masks:
            if mask_threshold is not None:
                out.mask_indices = torch.nonzero((out.scores > mask_threshold).any(dim=0)).flatten()
            out.pred_masks = self.segmentation_head(features.fpn, encoded.memory, decoded.hs, prompt, prompt_mask,
                                                    query_index=out.mask_indices).pred_masks
        return out

    @staticmethod
    def postprocess(outputs: GroundingOutput, orig_hw: tuple[int, int], threshold: float = 0.5,
                    index: int = 0) -> Detections:
        """Detections of image ``index`` scoring above ``threshold`` (the official processor's steps)."""
        if outputs.pred_masks is None:
            raise ValueError("the outputs hold no masks: call ground(..., masks=True)")
        height, width = (int(v) for v in orig_hw)
        scores = outputs.scores[index]
        keep = scores > threshold
        idx = torch.nonzero(keep).flatten()
        boxes = box_cxcywh_to_xyxy(outputs.pred_boxes[index][keep])
        scale = torch.tensor([width, height, width, height], device=boxes.device)
        boxes = boxes * scale[None, :]
        logits = outputs.pred_masks[index]
        if outputs.mask_indices is None:
            logits = logits[keep]
        else:  # masks of a subset of the queries: pick the rows of the kept ones
            subset = outputs.mask_indices.to(logits.device)
            row = torch.full((scores.shape[0],), -1, dtype=torch.long, device=logits.device)
            row[subset] = torch.arange(len(subset), device=logits.device)
            rows = row[idx.to(logits.device)]
            if bool((rows < 0).any()):
                raise ValueError("a kept query has no mask: ground(..., mask_threshold=) was above this threshold")
            logits = logits[rows]
        if logits.shape[0]:
            probs = F.interpolate(logits[:, None], size=(height, width), mode="bilinear",
                                  align_corners=False).sigmoid()[:, 0]
        else:
            probs = logits.new_zeros((0, height, width))
        return Detections(scores=scores[keep], boxes=boxes, masks=probs > 0.5, mask_probs=probs, indices=idx)

    @torch.inference_mode()
    def predict(self, image: np.ndarray, text: str | None = None, boxes: Sequence[Sequence[float]] | None = None,
                box_labels: Sequence[bool] | None = None, threshold: float = 0.5) -> Detections:
        """One uint8 slice + a phrase and/or boxes (normalised cxcywh) -> detections, like the official
        ``Sam3Processor`` (a box-only prompt uses the phrase ``"visual"``)."""
        if text is None and boxes is None:
            raise ValueError("give a text phrase, boxes or both")
        phrase = text if text is not None else "visual"
        features = self.encode_image(self.preprocess(image))
        box_tensor = None if boxes is None else torch.as_tensor(boxes, dtype=torch.float32).reshape(1, -1, 4)
        label_tensor = None if box_labels is None else torch.as_tensor(box_labels, dtype=torch.bool).reshape(1, -1)
        outputs = self.ground(features, self.encode_text([phrase]), box_tensor, label_tensor)
        return self.postprocess(outputs, np.asarray(image).shape[:2], threshold)


# --- configuration and loading -------------------------------------------------------------------


def _strip(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The image model's entries, keys as this module names them.

    As the official loader does: the ``detector.`` prefix is removed when the file has it (entries outside it,
    e.g. ``tracker.*``, are dropped) and a ``student_trunk.`` wrapper level is removed. Entries of parts the
    image model does not run are dropped too: the SAM 2 neck copy ``backbone.vision_backbone.sam2_convs.*``
    and ``inst_interactive_predictor.*`` (both only serve SAM 1-style interactive prompting).
    """
    if any(k.startswith(DETECTOR_PREFIX) for k in state):
        state = {k[len(DETECTOR_PREFIX):]: v for k, v in state.items() if k.startswith(DETECTOR_PREFIX)}
    return {k.replace("student_trunk.", ""): v for k, v in state.items() if not k.startswith(_UNUSED)}


def _sub(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _keys_sample(keys: Sequence[str]) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:_SHOW]) + (f", ... ({len(keys)} in all)" if len(keys) > _SHOW else "")


def infer_es3_config(state: Mapping[str, Tensor], n_heads: int = 8, text_heads: int = 8) -> Es3Config:
    """Sizes of an EfficientSAM3 image-model state dict (``detector.`` prefix optional).

    Attention head counts leave no trace in the tensors (except the decoder's) and are given: 8 in the
    detector and in MobileCLIP-S0's text transformer.
    """
    state = _strip(state)
    absent = [p.rstrip(".") for p in _PARTS if not any(k.startswith(p) for k in state)]
    if absent:
        raise Es3CheckpointError(
            f"not an EfficientSAM3 image-model state dict: no entries for {', '.join(absent)} "
            f"(found e.g. {_keys_sample(list(state)[:_SHOW])})")
    try:
        text, d_model = infer_text_config(_sub(state, "backbone.language_backbone."), n_heads=text_heads)
        decoder = infer_decoder_config(_sub(state, "transformer.decoder."))
        return Es3Config(
            vision=infer_vision_config(_sub(state, "backbone.vision_backbone.")),
            text=text,
            geometry=infer_geometry_config(_sub(state, "geometry_encoder."), num_heads=n_heads),
            fusion=infer_fusion_config(_sub(state, "transformer.encoder."), num_heads=n_heads),
            decoder=decoder,
            heads=infer_heads_config(_sub(state, "dot_prod_scoring."), _sub(state, "segmentation_head."),
                                     n_heads=n_heads),
            d_model=d_model,
        )
    except KeyError as exc:
        raise Es3CheckpointError(f"EfficientSAM3 state dict without the expected entry {exc}") from exc


def build_es3_model(config: Es3Config = Es3Config(), state: Mapping[str, Tensor] | None = None,
                    tokenizer: ClipTokenizer | None = None) -> Es3ImageModel:
    """An image model in eval mode; with ``state`` (``detector.`` prefix optional) it is built without
    random initialisation and loaded strictly (keys and shapes), else initialised randomly."""
    if state is None:
        return Es3ImageModel(config, tokenizer).eval()
    state = _strip(state)
    with torch.device("meta"):
        model = Es3ImageModel(config, tokenizer)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys: {_keys_sample(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_keys_sample(unexpected)}")
        if wrong:
            parts.append(f"wrong shapes: {'; '.join(wrong[:_SHOW])}")
        raise Es3CheckpointError("the weights do not fit the EfficientSAM3 image model: " + "; ".join(parts))
    tensors = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:  # pragma: no cover - a module with non-persistent buffers would need materialising here
        raise RuntimeError(f"tensors left on the meta device: {leftover[:_SHOW]}")
    return model.eval()


def load_es3_checkpoint(path: str | Path, bpe_path: str | Path | None = None, device: torch.device | str = "cpu",
                        n_heads: int = 8, text_heads: int = 8) -> Es3ImageModel:
    """Load an EfficientSAM3 image model from a checkpoint (``weights_only=True``), strictly.

    ``bpe_path``: the CLIP vocabulary ``bpe_simple_vocab_16e6.txt.gz`` for text prompts (without it,
    :meth:`Es3ImageModel.encode_text` needs a tokenizer set later). ``n_heads`` / ``text_heads``: attention
    heads of the detector and of the text transformer (8 and 8 in the official models; not stored in the
    weights). Raises :class:`Es3CheckpointError` (a ``ValueError``) naming the missing / unexpected keys for a
    file of another architecture.
    """
    from ...checkpoint import load_state_dict

    state = load_state_dict(path)
    config = infer_es3_config(state, n_heads=n_heads, text_heads=text_heads)
    tokenizer = None
    if bpe_path is not None:
        tokenizer = ClipTokenizer(bpe_path, context_length=config.text.context_length)
    return build_es3_model(config, state, tokenizer).to(device)
