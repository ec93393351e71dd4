"""ats-vit: Adaptive Token Sampling for Vision Transformers (Fayyaz et al., ECCV 2022)."""

from ats_vit.attention import SamplingAttention
from ats_vit.sampling import AdaptiveTokenSampling, TokenSelection
from ats_vit.vit import ViT, load_vit_pytorch_state_dict

__version__ = "0.1.0"

__all__ = [
    "AdaptiveTokenSampling",
    "SamplingAttention",
    "TokenSelection",
    "ViT",
    "__version__",
    "load_vit_pytorch_state_dict",
]
