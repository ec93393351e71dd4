"""Off-the-shelf ATS for Hugging Face ``transformers`` ViT and DeiT models, no fine-tuning.

Supported: ``ViTModel``, ``ViTForImageClassification``, ``DeiTModel``,
``DeiTForImageClassification`` and ``DeiTForImageClassificationWithTeacher`` (transformers
5.x). As in :mod:`ats_vit.timm`, ``apply`` patches the layers of one model *instance*: each
layer's ``forward`` calls the model's own modules (layer norms, q/k/v/o projections,
dropout, MLP) through :func:`ats_vit.attention.sampled_self_attention`, and the chosen layers
get an :class:`~ats_vit.sampling.AdaptiveTokenSampling` submodule (no parameters: state dicts
are unchanged). ``remove`` restores the class's behaviour. The class token (and DeiT's
distillation token) are never dropped.

Patched layers run PyTorch's fused attention whatever ``attn_implementation`` the model was
loaded with (the logits equal the unpatched model's, eager or SDPA, when nothing is dropped),
they return no attention maps, and ``last_hidden_state`` holds only the tokens that the last
layer kept (padded per batch). This is the only module that imports ``transformers``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

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

from ats_vit import _patch
from ats_vit._patch import ATSInfo
from ats_vit.attention import sampled_self_attention
from ats_vit.flops import TokenTrace, ViTCost
from ats_vit.sampling import Dropped, Sampler, tokenwise

__all__ = [
    "SUPPORTED",
    "ATSInfo",
    "adapter",
    "apply",
    "cost",
    "is_patched",
    "last_info",
    "last_trace",
    "remove",
]

CLASSIFIERS = (ViTForImageClassification, DeiTForImageClassification, DeiTForImageClassificationWithTeacher)
SUPPORTED = (
    ViTModel,
    ViTForImageClassification,
    DeiTModel,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
)
_LAYERS = {ViTLayer: ViTAttention, DeiTLayer: DeiTAttention}


def _backbone(model: nn.Module) -> ViTModel | DeiTModel:
    if not isinstance(model, SUPPORTED):
        names = ", ".join(cls.__name__ for cls in SUPPORTED)
        raise TypeError(f"ats_vit.hf supports {names}; got {type(model).__name__}")
    if isinstance(model, (ViTModel, DeiTModel)):
        return model
    return model.vit if isinstance(model, ViTForImageClassification) else model.deit


def _check_supported(model: nn.Module) -> ViTModel | DeiTModel:
    backbone = _backbone(model)
    name = type(model).__name__
    for i, layer in enumerate(backbone.layers):
        # the patched forward replays the layer's and the attention's forward with the same
        # modules; a subclass that changed either would be silently altered
        kind = type(layer)
        attention = _LAYERS.get(kind) if kind in _LAYERS else None
        if attention is None or type(layer.attention) is not attention:
            raise TypeError(
                f"{name}: layer {i} is {kind.__name__} with {type(layer.attention).__name__}; "
                "ats_vit.hf supports the ViTLayer/DeiTLayer of transformers' ViT and DeiT models only"
            )
    return backbone


def _num_prefix_tokens(backbone: nn.Module) -> int:
    return 2 if isinstance(backbone, DeiTModel) else 1


def cost(model: nn.Module) -> ViTCost:
    """The sizes that set ``model``'s FLOPs (for :func:`ats_vit.flops.gflops`)."""
    backbone = _backbone(model)
    config = backbone.config
    attention = backbone.layers[0].attention
    proj = backbone.embeddings.patch_embeddings.projection
    heads = [
        getattr(model, name, None) for name in ("classifier", "cls_classifier", "distillation_classifier")
    ]
    if backbone.pooler is not None:
        heads.append(backbone.pooler.dense)
    outputs = sum(h.out_features for h in heads if isinstance(h, nn.Linear))
    return ViTCost(
        num_patches=backbone.embeddings.patch_embeddings.num_patches,
        num_prefix_tokens=_num_prefix_tokens(backbone),
        dim=config.hidden_size,
        heads=attention.num_attention_heads,
        attn_dim=attention.num_attention_heads * attention.head_dim,
        mlp_hidden=backbone.layers[0].mlp.fc1.out_features,
        patch_dim=proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1],
        num_classes=outputs,
        depth=len(backbone.layers),
    )


def _layer_forward(
    self: ViTLayer, hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs
) -> Tensor:
    """ViTLayer.forward / DeiTLayer.forward with token sampling; bound to patched layers."""
    if attention_mask is not None:
        raise ValueError("ATS-patched layers do not support an attention_mask")
    state = _patch.block_state(self, hidden_states)
    if (replayed := state.skip(self)) is not None:
        return replayed
    attn = self.attention
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    out, selection = sampled_self_attention(
        self.layernorm_before(hidden_states),
        state.padding,
        getattr(self, "ats", None),
        size=state.size,
        qkv_weight=(q.weight, k.weight, v.weight),
        qkv_bias=(q.bias, k.bias, v.bias),
        heads=attn.num_attention_heads,
        scale=attn.scaling,
        dropout_p=attn.attention_dropout if self.training else 0.0,
        proj=lambda t: self.dropout(attn.o_proj(t)),
    )
    x = state.select(hidden_states, selection) + out
    del out  # not alive during the MLP, whose hidden activations set the peak memory
    x = x + tokenwise(lambda t: self.dropout(self.mlp(self.layernorm_after(t))), x, state.padding)
    state.record(x, self, selection)
    return x


def apply(
    model: nn.Module,
    layers: Iterable[int] | None = None,
    max_tokens: int | Sequence[int] = 108,
    *,
    sampler: Sampler = "inverse_transform",
    static_shape: bool = False,
    temperature: float = 1.0,
    dropped: Dropped | None = None,
) -> nn.Module:
    """Make ``model``'s layers in ``layers`` (default: all) keep at most ``max_tokens`` patch
    tokens each (an int, or one per chosen layer, in ``layers`` order after sorting).

    The options are those of :class:`~ats_vit.sampling.AdaptiveTokenSampling` (defaults: the
    paper's ATS). Patches in place and returns the model; applying again replaces the
    previous patch. See :func:`last_info` for what the last forward kept.
    """
    backbone = _check_supported(model)
    state = _patch.PatchState(_num_prefix_tokens(backbone), cost(model), len(backbone.layers))
    _patch.patch(
        model,
        backbone.layers,
        _layer_forward,
        state,
        layers,
        max_tokens,
        sampler=sampler,
        static_shape=static_shape,
        temperature=temperature,
        dropped=dropped,
    )
    return model


def adapter(model: nn.Module):
    """The :class:`ats_vit.budget.Adapter` of a Hugging Face model (budgets go through :func:`apply`)."""
    backbone = _check_supported(model)
    if not isinstance(
        model, (ViTForImageClassification, DeiTForImageClassification, DeiTForImageClassificationWithTeacher)
    ):
        raise TypeError(f"budgets need a model with a classification head, got {type(model).__name__}")

    return _patch.budget_adapter(
        model,
        backbone.layers,
        cost(model),
        lambda **kw: apply(model, **kw),
        lambda images: model(pixel_values=images).logits,
    )


def is_patched(model: nn.Module) -> bool:
    return hasattr(model, _patch.STATE)


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply` (a no-op on an unpatched model); returns the model."""
    _patch.unpatch(model, _backbone(model).layers)
    return model


def last_trace(model: nn.Module) -> TokenTrace:
    """The per-layer token trace of the last forward pass (for :func:`ats_vit.flops.gflops`
    with :func:`cost`, and for :mod:`ats_vit.viz`)."""
    return _patch.finished_state(model, type(model).__name__, "ats_vit.hf").trace


def last_info(model: nn.Module) -> ATSInfo:
    """Token ids, per-layer kept counts and GFLOPs of the last forward pass of a patched model."""
    return _patch.finished_state(model, type(model).__name__, "ats_vit.hf").info()
