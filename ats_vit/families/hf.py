"""Hugging Face ``transformers`` ViT and DeiT as a family: the only module that imports it.

Served (transformers 5.x): ``ViTModel``, ``ViTForImageClassification``, ``DeiTModel``,
``DeiTForImageClassification`` and ``DeiTForImageClassificationWithTeacher``. Patching (once)
replaces each layer's ``forward`` with one that calls the model's own modules (layer norms,
q/k/v/o projections, dropout, MLP) through :func:`ats_vit.attention.sampled_self_attention`.
Patched layers run PyTorch's fused attention whatever ``attn_implementation`` the model was
loaded with (the logits equal the unpatched model's when nothing is dropped), return no
attention maps, and ``last_hidden_state`` holds only the tokens the last layer kept (padded
per batch). The class token (and DeiT's distillation token) are never dropped. The public
front door is :mod:`ats_vit.hf`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

try:
    from transformers.models.deit.modeling_deit import (
        DeiTAttention,
        DeiTForImageClassification,
        DeiTForImageClassificationWithTeacher,
        DeiTLayer,
        DeiTModel,
    )
    from transformers.models.vit.modeling_vit import (
        ViTAttention,
        ViTForImageClassification,
        ViTLayer,
        ViTModel,
    )
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("ats_vit.hf needs Hugging Face transformers: pip install 'ats-vit[hf]'") from exc

from ats_vit.attention import sampled_self_attention
from ats_vit.families._patched import PatchedFamily, block_state, patched_family
from ats_vit.flops import ViTCost
from ats_vit.sampling import tokenwise

__all__ = ["MODELS", "HFFamily", "backbone", "cost", "family"]

MODELS = (
    ViTModel,
    ViTForImageClassification,
    DeiTModel,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
)
CLASSIFIERS = (ViTForImageClassification, DeiTForImageClassification, DeiTForImageClassificationWithTeacher)
_LAYERS = {ViTLayer: ViTAttention, DeiTLayer: DeiTAttention}


def backbone(model: Any) -> Any:
    if not isinstance(model, MODELS):
        names = ", ".join(cls.__name__ for cls in MODELS)
        raise TypeError(f"ats_vit.hf supports {names}; got {type(model).__name__}")
    if isinstance(model, (ViTModel, DeiTModel)):
        return model
    return model.vit if isinstance(model, ViTForImageClassification) else model.deit


def check_supported(model: Any) -> Any:
    found = backbone(model)
    name = type(model).__name__
    for i, layer in enumerate(found.layers):
        # the patched forward replays the layer's and the attention's forward with the same
        # modules; a subclass that changed either would be silently altered
        attention = _LAYERS.get(type(layer))
        if attention is None or type(layer.attention) is not attention:
            raise TypeError(
                f"{name}: layer {i} is {type(layer).__name__} with {type(layer.attention).__name__}; "
                "ats_vit.hf supports the ViTLayer/DeiTLayer of transformers' ViT and DeiT models only"
            )
    return found


def cost(model: Any) -> ViTCost:
    """The sizes that set ``model``'s FLOPs (for :func:`ats_vit.flops.gflops`)."""
    base = backbone(model)
    config = base.config
    attention = base.layers[0].attention
    proj = base.embeddings.patch_embeddings.projection
    heads = [
        getattr(model, name, None) for name in ("classifier", "cls_classifier", "distillation_classifier")
    ]
    if base.pooler is not None:
        heads.append(base.pooler.dense)
    outputs = sum(h.out_features for h in heads if isinstance(h, nn.Linear))
    return ViTCost(
        num_patches=base.embeddings.patch_embeddings.num_patches,
        num_prefix_tokens=2 if isinstance(base, DeiTModel) else 1,
        dim=config.hidden_size,
        heads=attention.num_attention_heads,
        attn_dim=attention.num_attention_heads * attention.head_dim,
        mlp_hidden=base.layers[0].mlp.fc1.out_features,
        patch_dim=proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1],
        num_classes=outputs,
        depth=len(base.layers),
    )


def _layer_forward(
    self: Any, hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs: Any
) -> Tensor:
    """ViTLayer.forward / DeiTLayer.forward with token sampling; bound to patched layers."""
    if attention_mask is not None:
        raise ValueError("ATS-patched layers do not support an attention_mask")
    state = block_state(self, hidden_states)
    skipped = state.skip(self._ats_index)
    if skipped is not None:
        return skipped
    attn = self.attention
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    out, selection = sampled_self_attention(
        self.layernorm_before(hidden_states),
        state.padding,
        self.ats,
        size=state.size,
        qkv_weight=(q.weight, k.weight, v.weight),
        qkv_bias=(q.bias, k.bias, v.bias),
        heads=attn.num_attention_heads,
        scale=attn.scaling,
        dropout_p=attn.attention_dropout if self.training else 0.0,
        proj=lambda t: self.dropout(attn.o_proj(t)),
    )
    x = state.follow(hidden_states, out, selection)
    del out  # not alive during the MLP, whose hidden activations set the peak memory
    x = x + tokenwise(lambda t: self.dropout(self.mlp(self.layernorm_after(t))), x, state.padding)
    state.record(x)
    return x


class HFFamily(PatchedFamily):
    def __init__(self, model: nn.Module) -> None:
        base = check_supported(model)
        config = base.config
        super().__init__(
            model,
            type(model).__name__,
            list(base.layers),
            cost(model),
            image_size=_pair(config.image_size),
            patch_size=_pair(config.patch_size),
            channels=config.num_channels,
            num_classes=int(config.num_labels or 0) if isinstance(model, CLASSIFIERS) else 0,
        )

    def final_norm(self) -> Callable[[Tensor], Tensor] | None:
        return backbone(self.model).layernorm  # last_hidden_state comes after it

    def logits(self, images: Tensor) -> Tensor:
        if not isinstance(self.model, CLASSIFIERS):
            raise TypeError(
                f"{self.name} has no classification head; calibration and evaluation need one "
                f"({', '.join(c.__name__ for c in CLASSIFIERS)})"
            )
        return self.model(pixel_values=images).logits


def _pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def family(model: nn.Module) -> HFFamily:
    """The family of a Hugging Face model, patching it (dense) the first time."""
    found = patched_family(model)
    if isinstance(found, HFFamily):
        return found
    new = HFFamily(model)
    new.patch(_layer_forward)
    return new
