"""ats-vit: Adaptive Token Sampling for Vision Transformers (Fayyaz et al., ECCV 2022)."""

from ats_vit.attention import SamplingAttention
from ats_vit.deploy import compile
from ats_vit.families import family_of, last_info, restore
from ats_vit.options import SamplingOptions
from ats_vit.sampling import AdaptiveTokenSampling, TokenSelection
from ats_vit.tokens import TokenState
from ats_vit.vit import ViT, load_vit_pytorch_state_dict

__version__ = "1.0.0"

__all__ = [
    "AdaptiveTokenSampling",
    "SamplingAttention",
    "SamplingOptions",
    "TokenSelection",
    "TokenState",
    "ViT",
    "__version__",
    "compile",
    "family_of",
    "last_info",
    "load_vit_pytorch_state_dict",
    "restore",
]
