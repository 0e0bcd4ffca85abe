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
}
__all__ = sorted(_NAMES)

__getattr__ = lazy_getattr(__name__, _NAMES, globals())
