"""Off-the-shelf ATS for pretrained timm Vision Transformers: fewer tokens, no fine-tuning.

Served: ``VisionTransformer`` (ViT, DeiT, DeiT-III, CLIP, SigLIP, DINOv2, MAE and their
subclasses with its blocks), ``Eva`` (EVA-02, EVA-CLIP: rotary embeddings, by original
position) and ``Beit`` (BEiT, BEiT v2: relative position bias gathered for the kept tokens).

``apply`` patches one model *instance* (once; later calls only set numbers): each block's
``forward`` becomes one that calls timm's own modules through
:func:`ats_vit.attention.sampled_self_attention`, and each block gets a parameter-free
:class:`~ats_vit.sampling.AdaptiveTokenSampling` submodule, so state dicts are unchanged.
``remove`` restores the class's behaviour. Other instances, and the timm classes, are never
touched. The implementation is :mod:`ats_vit.families.timm`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from timm.models.beit import Beit
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer

from ats_vit.families import _patched, restore
from ats_vit.families._patched import is_patched, last_info, last_trace
from ats_vit.families.timm import cost, family
from ats_vit.options import SamplingOptions
from ats_vit.tokens import ATSInfo

__all__ = ["ATSInfo", "apply", "cost", "is_patched", "last_info", "last_trace", "remove", "restore"]


def apply(
    model: VisionTransformer | Eva | Beit,
    *,
    caps: int | Sequence[int] | None = _patched._UNSET,
    start_layer: int = 0,
    options: SamplingOptions | None = None,
    layers: Iterable[int] | None = _patched._UNSET,
    max_tokens: int | Sequence[int] = _patched._UNSET,
) -> VisionTransformer | Eva | Beit:
    """Make ``model``'s blocks from ``start_layer`` on keep at most ``caps`` patch tokens each
    (an int for every such block, or one cap per block; a cap of all the patches or more keeps
    all), the blocks before it keeping all; ``caps=None`` patches without dropping.
    ``options``: how tokens are selected (default: the paper's ATS). Prefix tokens (class,
    distillation, registers) are always kept. Patches in place and returns the model;
    applying again sets the new numbers. See :func:`last_info` for what the last forward kept.
    ``layers`` and ``max_tokens`` are 0.x's names (deprecated): a cap per chosen block.
    """
    _patched.apply(family(model), caps, start_layer, options, layers, max_tokens)
    return model


def remove(model: VisionTransformer | Eva | Beit) -> VisionTransformer | Eva | Beit:
    """Undo :func:`apply` (a no-op on an unpatched model); returns the model."""
    if not isinstance(model, (VisionTransformer, Eva, Beit)):
        raise TypeError(
            f"model must be a timm VisionTransformer, Eva or Beit (or subclass), got {type(model).__name__}"
        )
    _patched.remove(model)
    return model
