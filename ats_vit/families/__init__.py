"""Model families behind one interface (:class:`~ats_vit.families.base.Family`), and the
registry that picks a model's family by ``isinstance``.

Each family module names the classes it serves (``MODELS``) and builds a family for one
model (``family``). Third-party families are only looked at when their library has been
imported: a model of a library nobody imported cannot be an instance of its classes, and
``family_of`` on our own ViT never imports timm or transformers.
"""

from __future__ import annotations

import importlib
import sys

from torch import Tensor, nn

from ats_vit.families.base import Family
from ats_vit.tokens import ATSInfo

__all__ = ["SUPPORTED", "Family", "family_of", "last_info", "restore"]

# (library that must already be imported, or None; module with MODELS and family(model))
_REGISTRY = (
    (None, "ats_vit.families.vit"),
    ("timm", "ats_vit.families.timm"),
    ("transformers", "ats_vit.families.hf_timesformer"),  # before hf, whose KINDS list them too
    ("transformers", "ats_vit.families.hf"),
)
# for messages and `ats-vit --help`: what the registry serves
SUPPORTED = (
    "ats_vit.ViT; timm VisionTransformer (ViT, DeiT, DeiT-III, CLIP, SigLIP, DINOv2, MAE and "
    "subclasses with its blocks), Eva (EVA-02, EVA-CLIP) and Beit (BEiT, BEiT v2); Hugging Face "
    "ViT/DeiT models and classifiers, ViTMAEModel, CLIPVisionModel(WithProjection), "
    "CLIPForImageClassification, SiglipVisionModel, SiglipForImageClassification, "
    "Dinov2(WithRegisters)Model, Dinov2(WithRegisters)ForImageClassification, VideoMAEModel, "
    "VideoMAEForVideoClassification, TimesformerModel and TimesformerForVideoClassification"
)


def family_of(model: object) -> Family:
    """The family of ``model``; a timm or Hugging Face model is patched (once, dense) here.

    Raises TypeError naming the model when no family serves it, or what it lacks when one
    nearly does (e.g. a timm ViT without a class token).
    """
    for library, module_name in _REGISTRY:
        if library is not None and library not in sys.modules:
            continue
        module = importlib.import_module(module_name)
        if isinstance(model, module.MODELS):
            return module.family(model)
    raise TypeError(f"ats-vit serves {SUPPORTED}; got {type(model).__name__}")


def last_info(model: nn.Module) -> ATSInfo:
    """Token ids, per-layer kept counts and GFLOPs of ``model``'s last forward pass."""
    return family_of(model).last_info()


def restore(model: nn.Module, tokens: Tensor) -> Tensor:
    """Per-patch features on the full grid after a budgeted pass (see :meth:`Family.restore`):
    ``restore(model, model.forward_features(x))`` for timm and ours,
    ``restore(model, out.last_hidden_state)`` for Hugging Face models."""
    return family_of(model).restore(tokens)
