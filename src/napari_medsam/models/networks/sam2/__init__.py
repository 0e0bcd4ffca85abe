"""The project's own SAM 2 family networks (SAM 2.1 Tiny/Small/Base+/Large, MedSAM2).

Written from the SAM 2 paper and the official configurations; parameter names equal the official
checkpoint keys so those load with ``strict=True``. ``model`` assembles the parts; the memory bank
(which slices are remembered) lives in :mod:`napari_medsam.segment.memory`. Importing this package
imports torch; the names below are imported when first used, so that the parts can be imported
one by one.
"""

from __future__ import annotations

from ...._lazy import lazy_getattr

_NAMES = {name: "model" for name in (
    "FrameFeatures", "FrameOutput", "NO_OBJECT_SCORE", "SAM2_ARCHITECTURES", "SAM2_PRESETS", "Sam2Config",
    "Sam2Network", "build_sam2", "load_sam2")}
__all__ = sorted(_NAMES)

__getattr__ = lazy_getattr(__name__, _NAMES, globals())
