"""The project's own SAM-family networks (SAM ViT-B/L/H, MedSAM, MobileSAM, LiteMedSAM).

Written from the papers; parameter names equal the official checkpoint keys so those load with
``strict=True``. Importing this package imports torch.
"""

from .mask_decoder import MaskDecoder, TwoWayTransformer
from .prompt_encoder import PromptEncoder
from .sam import ARCHITECTURES, SamNetwork, build_network, load_network
from .tiny_vit import TinyViTImageEncoder
from .vit import VIT_PRESETS, LayerNorm2d, ViTImageEncoder

__all__ = [
    "ARCHITECTURES",
    "LayerNorm2d",
    "MaskDecoder",
    "PromptEncoder",
    "SamNetwork",
    "TinyViTImageEncoder",
    "TwoWayTransformer",
    "VIT_PRESETS",
    "ViTImageEncoder",
    "build_network",
    "load_network",
]
