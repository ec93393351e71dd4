"""Off-the-shelf ATS for Hugging Face ``transformers`` vision transformers, no fine-tuning.

Supported (transformers 5.x): ViT and DeiT models and classifiers, ``ViTMAEModel``, the CLIP
and SigLIP vision towers and image classifiers, DINOv2 with or without registers (models
and classifiers), and the video models VideoMAE and TimeSformer (which keeps or drops whole
space-time tubes); :data:`SUPPORTED` lists the classes. As in :mod:`ats_vit.timm`, ``apply``
patches the layers of one model *instance* (once; later calls set numbers) to call the
model's own modules through :func:`ats_vit.attention.sampled_self_attention`, and ``remove``
restores the class's behaviour. Readouts that average tokens or pool them with an attention
probe heed the padding and token sizes of the pass. Patched layers run PyTorch's fused
attention whatever ``attn_implementation`` the model was loaded with, return no attention
maps, and ``last_hidden_state`` holds only the tokens that the last layer kept (padded per
batch; ``restore`` puts them back on the grid). The implementation is
:mod:`ats_vit.families.hf`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import nn

from ats_vit.families import _patched, restore
from ats_vit.families._patched import is_patched, last_info, last_trace
from ats_vit.families.hf import MODELS, backbone, cost
from ats_vit.families.hf import family as _family
from ats_vit.families.hf_timesformer import MODELS as _DIVIDED
from ats_vit.families.hf_timesformer import family as _divided_family
from ats_vit.options import SamplingOptions
from ats_vit.tokens import ATSInfo

__all__ = [
    "SUPPORTED",
    "ATSInfo",
    "apply",
    "cost",
    "is_patched",
    "last_info",
    "last_trace",
    "remove",
    "restore",
]

SUPPORTED = MODELS


def apply(
    model: nn.Module,
    *,
    caps: int | Sequence[int] | None = _patched._UNSET,
    start_layer: int = 0,
    options: SamplingOptions | None = None,
    layers: Iterable[int] | None = _patched._UNSET,
    max_tokens: int | Sequence[int] = _patched._UNSET,
) -> nn.Module:
    """Make ``model``'s layers from ``start_layer`` on keep at most ``caps`` patch tokens each
    (an int for every such layer, or one cap per layer; a cap of all the patches or more keeps
    all), the layers before it keeping all; ``caps=None`` patches without dropping.
    ``options``: how tokens are selected (default: the paper's ATS). Patches in place and
    returns the model; applying again sets the new numbers. ``layers`` and ``max_tokens`` are
    0.x's names (deprecated): a cap per chosen layer.
    """
    found = _divided_family(model) if isinstance(model, _DIVIDED) else _family(model)
    _patched.apply(found, caps, start_layer, options, layers, max_tokens)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply` (a no-op on an unpatched model); returns the model."""
    backbone(model)  # refuses what ats_vit.hf does not serve
    _patched.remove(model)
    return model
