"""The project's own EfficientSAM3 networks (SAM 3 concept segmentation with distilled students).

EfficientSAM3 (Zeng et al., 2025) distils SAM 3's image and text encoders into small students
(EfficientViT/RepViT/TinyViT images, MobileCLIP text) and keeps SAM 3's detector. Parameter names
equal the official checkpoint keys (``{"model": {"detector.<key>": ...}}`` without the prefix) so
those load with ``strict=True``. The names below are imported when first used, so that the parts can
be imported one by one (the parent package imports torch).
"""

from __future__ import annotations

from ...._lazy import lazy_getattr

_NAMES = {
    **{name: "tokenizer" for name in ("CLIP_VOCAB_SIZE", "ClipTokenizer", "END_OF_TEXT", "START_OF_TEXT")},
    **{name: "text" for name in (
        "CHECKPOINT_PREFIX", "MOBILECLIP_S0", "MobileClipTextConfig", "MobileClipTextTransformer", "TextOutput",
        "TextStudentEncoder", "build_text_encoder", "infer_text_config", "text_state_dict")},
    "PositionEmbeddingSine": "position",
    **{name: "vision" for name in (
        "EFFICIENTVIT_B0", "EFFICIENTVIT_B1", "EFFICIENTVIT_B2", "ES3_VISION_B0", "VISION_PREFIX",
        "EfficientVitBackbone", "EfficientVitConfig", "ImageStudentEncoder", "VisionBackbone", "VisionConfig",
        "VisionOutput", "build_vision_backbone", "infer_vision_config", "preprocess_slice", "resize_slice_u8",
        "vision_state_dict")},
    **{name: "geometry" for name in (
        "GEOMETRY_PREFIX", "GeometryConfig", "GeometryEncoder", "assemble_prompt", "build_geometry_encoder",
        "geometry_state_dict", "infer_geometry_config", "roi_align")},
    **{name: "fusion" for name in (
        "FUSION_PREFIX", "FusionConfig", "FusionEncoder", "FusionOutput", "build_fusion_encoder", "fusion_state_dict",
        "infer_fusion_config")},
    **{name: "decoder" for name in ("DecoderConfig", "DecoderOutput", "Es3Decoder", "infer_decoder_config")},
    **{name: "heads" for name in (
        "DotProductScoring", "HeadsConfig", "PixelDecoder", "SegmentationOutput", "UniversalSegmentationHead",
        "infer_heads_config")},
    **{name: "model" for name in (
        "Detections", "Es3CheckpointError", "Es3Config", "Es3ImageModel", "GroundingOutput", "build_es3_model",
        "infer_es3_config", "load_es3_checkpoint")},
}
__all__ = sorted(_NAMES)

__getattr__ = lazy_getattr(__name__, _NAMES, globals())
