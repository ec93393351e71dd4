"""Hugging Face ``transformers`` vision transformers as a family (with
:mod:`ats_vit.families.hf_timesformer`, the only modules that import it).

Served (transformers 5.x), each through one description of its layer (which norm, which q/k/v
projections, layer scale, drop path, MLP: :data:`LAYERS`) and one of the model (where its
backbone, layers, patch embedding and final norm are, how many prefix tokens it has, how it
reads out: :data:`KINDS`):

- ViT and DeiT models and classifiers, ``ViTMAEModel`` (class token read out);
- ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection`` (class token) and
  ``CLIPForImageClassification`` (averages the patch tokens);
- ``SiglipVisionModel`` (no class token; attention-pool head) and
  ``SiglipForImageClassification`` (averages the tokens);
- ``Dinov2Model`` / ``Dinov2WithRegistersModel`` (class token; registers are prefix tokens,
  never dropped) and their classifiers (class token next to the mean of the patches);
- ``VideoMAEModel`` and ``VideoMAEForVideoClassification`` (video: no class token, the mean
  of the space-time tokens; ATS samples across space and time at once);
- ``TimesformerModel`` and ``TimesformerForVideoClassification`` (divided space-time
  attention: ATS keeps or drops whole tubes, a patch position in every frame; see
  :mod:`ats_vit.families.hf_timesformer`, which runs their layers).

Patching (once) replaces each layer's ``forward`` with one that calls the model's own modules
through :func:`ats_vit.attention.sampled_self_attention`; readouts that average tokens or pool
them with an attention probe are replaced by ones that skip padding and weigh a merged token by
the patches it stands for. Models that read out the class token alone are scored by its
attention (the paper); models that pool all tokens by the attention each token receives.
Patched layers run PyTorch's fused attention whatever ``attn_implementation`` the model was
loaded with (equal outputs when nothing is dropped), return no attention maps, and
``last_hidden_state`` holds only the tokens the last layer kept (padded per batch;
:func:`ats_vit.families.restore` puts them back on the grid). The public front door is
:mod:`ats_vit.hf`.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

try:
    from transformers.modeling_outputs import ImageClassifierOutput
    from transformers.models.clip.modeling_clip import (
        CLIPAttention,
        CLIPEncoderLayer,
        CLIPForImageClassification,
        CLIPVisionModel,
        CLIPVisionModelWithProjection,
    )
    from transformers.models.deit.modeling_deit import (
        DeiTAttention,
        DeiTForImageClassification,
        DeiTForImageClassificationWithTeacher,
        DeiTLayer,
        DeiTModel,
    )
    from transformers.models.dinov2.modeling_dinov2 import (
        Dinov2Attention,
        Dinov2ForImageClassification,
        Dinov2Layer,
        Dinov2Model,
    )
    from transformers.models.dinov2_with_registers.modeling_dinov2_with_registers import (
        Dinov2WithRegistersAttention,
        Dinov2WithRegistersForImageClassification,
        Dinov2WithRegistersLayer,
        Dinov2WithRegistersModel,
    )
    from transformers.models.siglip.modeling_siglip import (
        SiglipAttention,
        SiglipEncoderLayer,
        SiglipForImageClassification,
        SiglipMultiheadAttentionPoolingHead,
        SiglipVisionModel,
    )
    from transformers.models.timesformer.modeling_timesformer import (
        TimeSformerAttention,
        TimesformerForVideoClassification,
        TimesformerLayer,
        TimesformerModel,
    )
    from transformers.models.videomae.modeling_videomae import (
        VideoMAEAttention,
        VideoMAEForVideoClassification,
        VideoMAELayer,
        VideoMAEModel,
    )
    from transformers.models.vit.modeling_vit import (
        ViTAttention,
        ViTForImageClassification,
        ViTLayer,
        ViTModel,
    )
    from transformers.models.vit_mae.modeling_vit_mae import ViTMAEAttention, ViTMAELayer, ViTMAEModel
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("ats_vit.hf needs Hugging Face transformers>=5.24: pip install 'ats-vit[hf]'") from exc

from ats_vit.attention import AttentionParts, key_bias, sampled_self_attention
from ats_vit.families._patched import PatchedFamily, block_state, patched_once, weighted_mean
from ats_vit.flops import ViTCost, mlp_width
from ats_vit.sampling import tokenwise
from ats_vit.tokens import TokenState

__all__ = ["HFFamily", "family"]

TensorFn = Callable[[Tensor], Tensor]


def _identity(t: Tensor) -> Tensor:
    return t


class LayerParts(NamedTuple):
    """One encoder layer's modules, in the order a pre-norm block uses them."""

    norm1: TensorFn
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    heads: int
    scale: float
    dropout: float  # attention dropout probability (training)
    proj: TensorFn  # per token: output projection (and its dropout)
    residual1: TensorFn  # on the (b, m, c) grid before the first residual: layer scale, drop path
    norm2: TensorFn
    mlp: TensorFn  # per token: the MLP (and its dropout / layer scale)
    residual2: TensorFn  # on the grid before the second residual: drop path


def _vit_parts(layer: Any) -> LayerParts:
    """ViTLayer, DeiTLayer, ViTMAELayer."""
    attn = layer.attention
    return LayerParts(
        layer.layernorm_before,
        attn.q_proj,
        attn.k_proj,
        attn.v_proj,
        attn.num_attention_heads,
        attn.scaling,
        attn.attention_dropout,
        lambda t: layer.dropout(attn.o_proj(t)),
        _identity,
        layer.layernorm_after,
        lambda t: layer.dropout(layer.mlp(t)),
        _identity,
    )


def _clip_parts(layer: Any) -> LayerParts:
    """CLIPEncoderLayer, SiglipEncoderLayer."""
    attn = layer.self_attn
    return LayerParts(
        layer.layer_norm1,
        attn.q_proj,
        attn.k_proj,
        attn.v_proj,
        attn.num_heads,
        attn.scale,
        attn.dropout,
        attn.out_proj,
        _identity,
        layer.layer_norm2,
        layer.mlp,
        _identity,
    )


def _dinov2_parts(layer: Any) -> LayerParts:
    """Dinov2Layer, Dinov2WithRegistersLayer: layer scale on both branches, one drop path."""
    attn = layer.attention
    return LayerParts(
        layer.norm1,
        attn.q_proj,
        attn.k_proj,
        attn.v_proj,
        attn.num_attention_heads,
        attn.scaling,
        attn.attention_dropout,
        attn.o_proj,
        lambda t: layer.drop_path(layer.layer_scale1(t)),
        layer.norm2,
        lambda t: layer.layer_scale2(layer.mlp(t)),
        layer.drop_path,
    )


def _videomae_parts(layer: Any) -> LayerParts:
    """VideoMAELayer: ViT's layout with the older module names (key without bias)."""
    attn, out = layer.attention.attention, layer.attention.output
    return LayerParts(
        layer.layernorm_before,
        attn.query,
        attn.key,
        attn.value,
        attn.num_attention_heads,
        attn.scaling,
        attn.dropout_prob,
        lambda t: out.dropout(out.dense(t)),
        _identity,
        layer.layernorm_after,
        lambda t: layer.output.dropout(layer.output.dense(layer.intermediate(t))),
        _identity,
    )


# layer class -> (the attention class it must hold, how to read its parts)
LAYERS: dict[type, tuple[type, Callable[[Any], LayerParts]]] = {
    ViTLayer: (ViTAttention, _vit_parts),
    DeiTLayer: (DeiTAttention, _vit_parts),
    ViTMAELayer: (ViTMAEAttention, _vit_parts),
    CLIPEncoderLayer: (CLIPAttention, _clip_parts),
    SiglipEncoderLayer: (SiglipAttention, _clip_parts),
    Dinov2Layer: (Dinov2Attention, _dinov2_parts),
    Dinov2WithRegistersLayer: (Dinov2WithRegistersAttention, _dinov2_parts),
    VideoMAELayer: (VideoMAEAttention, _videomae_parts),
}
# layers that ats_vit.families.hf_timesformer runs with its own forward (tubes, divided attention)
DIVIDED_LAYERS: dict[type, type] = {TimesformerLayer: TimeSformerAttention}
_ATTENTION_OF = ("self_attn", "attention")


@dataclass(frozen=True)
class Kind:
    """Where one model class keeps what a family needs, and how it reads out.

    backbone: the module with the embeddings and the layers; layers: its encoder layers;
    prefix: its prefix tokens (class, distillation, registers); final_norm: the norm between
    the last layer and ``last_hidden_state`` (None: none); scoring: ``"cls"`` when only the
    class token is read out, ``"received"`` when the readout pools all tokens;
    readout: a padding- and size-aware ``forward`` that replaces the model's, for readouts
    that average tokens (None: the model's own forward is right as it is); heads: the linear
    layers after the backbone (for FLOPs); classifier: whether it has logits.
    """

    backbone: Callable[[Any], Any]
    layers: Callable[[Any], Sequence[nn.Module]]
    prefix: Callable[[Any], int]
    final_norm: Callable[[Any], TensorFn | None]
    scoring: str = "cls"
    readout: Callable[..., Any] | None = None
    heads: Callable[[Any], Sequence[Any]] = lambda model: ()
    classifier: bool = False


def _pooled(tokens: Tensor, family: HFFamily, start: int) -> Tensor:
    """The mean of tokens[:, start:] that skips padding and weighs each token by its patches,
    when ``tokens`` are the last pass's (else the plain mean)."""
    state = _state_of(family, tokens)
    if state is None:
        return tokens[:, start:].mean(dim=1)
    return weighted_mean(tokens, state.padding, state.size, start)


def _state_of(family: HFFamily, tokens: Tensor) -> TokenState | None:
    state = family.carrier.state
    if state is None or tuple(tokens.shape[:2]) != tuple(state.positions.shape):
        return None
    return state if state.padding is not None or state.size is not None else None


def _classifier_output(self: Any, pooled: Tensor, labels: Tensor | None, outputs: Any) -> Any:
    logits = self.classifier(pooled)
    loss = None if labels is None else self.loss_function(labels, logits, self.config)
    return ImageClassifierOutput(
        loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
    )


def _clip_classify(
    self: Any, pixel_values: Tensor | None = None, labels: Tensor | None = None, **kw: Any
) -> Any:
    """CLIPForImageClassification.forward: mean of the patch tokens, padding and sizes heeded."""
    outputs = self.vision_model(pixel_values, **kw)
    return _classifier_output(self, _pooled(outputs.last_hidden_state, self._ats_family, 1), labels, outputs)


def _siglip_classify(
    self: Any, pixel_values: Tensor | None = None, labels: Tensor | None = None, **kw: Any
) -> Any:
    """SiglipForImageClassification.forward: mean of all tokens, padding and sizes heeded."""
    outputs = self.vision_model(pixel_values, **kw)
    return _classifier_output(self, _pooled(outputs.last_hidden_state, self._ats_family, 0), labels, outputs)


def _dinov2_classify(
    self: Any, pixel_values: Tensor | None = None, labels: Tensor | None = None, **kw: Any
) -> Any:
    """Dinov2(WithRegisters)ForImageClassification.forward: the class token next to the mean
    of the patch tokens (registers excluded), padding and sizes heeded."""
    family: HFFamily = self._ats_family
    outputs = backbone(self)(pixel_values, **kw)
    tokens = outputs.last_hidden_state
    pooled = torch.cat([tokens[:, 0], _pooled(tokens, family, family.num_prefix_tokens)], dim=1)
    return _classifier_output(self, pooled, labels, outputs)


def _videomae_classify(
    self: Any, pixel_values: Tensor | None = None, labels: Tensor | None = None, **kw: Any
) -> Any:
    """VideoMAEForVideoClassification.forward (mean pooling): the mean of the space-time
    tokens, padding and sizes heeded, then ``fc_norm``."""
    outputs = self.videomae(pixel_values, **kw)
    pooled = self.fc_norm(_pooled(outputs.last_hidden_state, self._ats_family, 0))
    return _classifier_output(self, pooled, labels, outputs)


def _probe_forward(self: Any, hidden_state: Tensor) -> Tensor:
    """SiglipMultiheadAttentionPoolingHead.forward with the blocks' key bias: padding masked,
    ``log(size)`` added for merged tokens (bound to the head of a patched model)."""
    state = _state_of(self._ats_family, hidden_state)
    if state is None:
        return SiglipMultiheadAttentionPoolingHead.forward(self, hidden_state)
    bias = key_bias(state.padding, state.size)
    if bias is not None and bias.dtype == torch.bool:
        bias = torch.zeros(bias.shape, device=bias.device).masked_fill(~bias, float("-inf"))
    probe = self.probe.expand(hidden_state.shape[0], -1, -1)
    mask = None if bias is None else bias.to(hidden_state.dtype)
    out = self.attention(probe, hidden_state, hidden_state, key_padding_mask=mask, need_weights=False)[0]
    out = out + self.mlp(self.layernorm(out))
    return out[:, 0]


def _vit_backbone(model: Any) -> Any:
    if isinstance(model, (ViTModel, DeiTModel)):
        return model
    return model.vit if isinstance(model, ViTForImageClassification) else model.deit


def _dinov2_backbone(model: Any) -> Any:
    for name in ("dinov2", "dinov2_with_registers"):
        if isinstance(getattr(model, name, None), (Dinov2Model, Dinov2WithRegistersModel)):
            return getattr(model, name)
    return model


def _registers(base: Any) -> int:
    return 1 + int(getattr(base.config, "num_register_tokens", 0) or 0)


def _one(value: Any) -> Sequence[Any]:
    return (value,)


_VIT = Kind(
    backbone=_vit_backbone,
    layers=lambda base: base.layers,
    prefix=lambda base: 2 if isinstance(base, DeiTModel) else 1,
    final_norm=lambda base: base.layernorm,
    heads=lambda model: (
        [getattr(model, n, None) for n in ("classifier", "cls_classifier", "distillation_classifier")]
        + [getattr(_vit_backbone(model).pooler, "dense", None)]
    ),
)
_CLIP_TOWER = Kind(
    backbone=lambda model: getattr(model, "vision_model", model),
    layers=lambda base: base.encoder.layers,
    prefix=lambda base: 1,
    final_norm=lambda base: None,  # CLIP normalises only the pooled class token
    heads=lambda model: _one(getattr(model, "visual_projection", None)),
)
_SIGLIP_TOWER = Kind(
    backbone=lambda model: getattr(model, "vision_model", model),
    layers=lambda base: base.encoder.layers,
    prefix=lambda base: 0,
    final_norm=lambda base: base.post_layernorm,
    scoring="received",
)
_DINOV2 = Kind(
    backbone=_dinov2_backbone,
    layers=lambda base: base.encoder.layer,
    prefix=_registers,
    final_norm=lambda base: base.layernorm,
)

_VIDEOMAE = Kind(
    backbone=lambda model: getattr(model, "videomae", model),
    layers=lambda base: base.encoder.layer,
    prefix=lambda base: 0,
    final_norm=lambda base: base.layernorm,
    scoring="received",
)

_TIMESFORMER = Kind(
    backbone=lambda model: getattr(model, "timesformer", model),
    layers=lambda base: base.encoder.layer,
    prefix=lambda base: 1,
    final_norm=lambda base: base.layernorm,
)

_DINOV2_CLASSIFIER = replace(
    _DINOV2,
    scoring="received",
    readout=_dinov2_classify,
    heads=lambda model: _one(model.classifier),
    classifier=True,
)

# model class -> its kind; the classifiers that average tokens get a readout that heeds padding
KINDS: dict[type, Kind] = {
    ViTModel: _VIT,
    DeiTModel: _VIT,
    ViTForImageClassification: replace(_VIT, classifier=True),
    DeiTForImageClassification: replace(_VIT, classifier=True),
    DeiTForImageClassificationWithTeacher: replace(_VIT, classifier=True),
    ViTMAEModel: Kind(
        backbone=lambda model: model,
        layers=lambda base: base.layers,
        prefix=lambda base: 1,
        final_norm=lambda base: base.layernorm,
    ),
    CLIPVisionModel: _CLIP_TOWER,
    CLIPVisionModelWithProjection: _CLIP_TOWER,
    CLIPForImageClassification: replace(
        _CLIP_TOWER,
        scoring="received",
        readout=_clip_classify,
        heads=lambda model: _one(model.classifier),
        classifier=True,
    ),
    SiglipVisionModel: _SIGLIP_TOWER,
    SiglipForImageClassification: replace(
        _SIGLIP_TOWER,
        readout=_siglip_classify,
        heads=lambda model: _one(model.classifier),
        classifier=True,
    ),
    Dinov2Model: _DINOV2,
    Dinov2WithRegistersModel: _DINOV2,
    Dinov2ForImageClassification: _DINOV2_CLASSIFIER,
    Dinov2WithRegistersForImageClassification: _DINOV2_CLASSIFIER,
    VideoMAEModel: _VIDEOMAE,
    VideoMAEForVideoClassification: replace(
        _VIDEOMAE,
        readout=_videomae_classify,
        heads=lambda model: _one(model.classifier),
        classifier=True,
    ),
    TimesformerModel: _TIMESFORMER,
    TimesformerForVideoClassification: replace(
        _TIMESFORMER, heads=lambda model: _one(model.classifier), classifier=True
    ),
}
MODELS = tuple(KINDS)


def kind_of(model: Any) -> Kind:
    kind = KINDS.get(type(model))
    if kind is None:
        names = ", ".join(cls.__name__ for cls in MODELS)
        raise TypeError(f"ats_vit.hf supports {names}; got {type(model).__name__}")
    return kind


def backbone(model: Any) -> Any:
    """The module of ``model`` that holds its embeddings and encoder layers."""
    return kind_of(model).backbone(model)


def _embeddings(base: Any) -> tuple[Any, Any]:
    """(embeddings module, patch projection) of a backbone."""
    emb = base.embeddings
    conv = getattr(emb, "patch_embedding", None)
    if conv is None:
        conv = emb.patch_embeddings.projection
    return emb, conv


def num_patches(base: Any) -> int:
    emb, _ = _embeddings(base)
    found = getattr(emb, "num_patches", None)
    return int(found if found is not None else emb.patch_embeddings.num_patches)


def check_supported(model: Any) -> Any:
    """The backbone of a model ats_vit.hf serves; TypeError / ValueError naming what is not."""
    kind = kind_of(model)
    base = kind.backbone(model)
    name = type(model).__name__
    for i, layer in enumerate(kind.layers(base)):
        # the patched forward replays the layer's and the attention's forward with the same
        # modules; a subclass that changed either would be silently altered
        known = LAYERS[type(layer)][0] if type(layer) in LAYERS else DIVIDED_LAYERS.get(type(layer))
        attn = next((getattr(layer, a) for a in _ATTENTION_OF if hasattr(layer, a)), None)
        if known is None or type(attn) is not known:
            raise TypeError(
                f"{name}: layer {i} is {type(layer).__name__} with {type(attn).__name__}; "
                f"ats_vit.hf supports the encoder layers of {', '.join(c.__name__ for c in MODELS)} only"
            )
    if isinstance(model, VideoMAEForVideoClassification) and model.fc_norm is None:
        raise ValueError(
            f"{name}: config.use_mean_pooling=False reads out the first space-time patch, which "
            "ATS may drop; ATS serves VideoMAE classifiers that average their tokens"
        )
    if isinstance(base, TimesformerModel) and base.config.attention_type != "divided_space_time":
        raise ValueError(
            f"{name}: attention_type={base.config.attention_type!r}; ats-vit serves TimeSformer's "
            "divided space-time attention (attention_type='divided_space_time') only"
        )
    if isinstance(base, ViTMAEModel) and float(base.config.mask_ratio) != 0.0:
        raise ValueError(
            f"{name}: config.mask_ratio={base.config.mask_ratio} masks patches at random; for "
            "inference with ATS set model.config.mask_ratio = 0.0 (and pass noise=torch.arange(n) "
            "per image to keep the patches in grid order)"
        )
    return base


def _mlp(layer: Any) -> nn.Module:
    """A layer's MLP as one module (VideoMAE splits it into ``intermediate`` and ``output``)."""
    if isinstance(layer, (VideoMAELayer, TimesformerLayer)):
        return nn.ModuleList([layer.intermediate, layer.output])
    return layer.mlp


def cost(model: Any) -> ViTCost:
    """The sizes that set ``model``'s FLOPs (for :func:`ats_vit.flops.gflops`).

    A SwiGLU MLP counts by its weights (:func:`ats_vit.flops.mlp_width`); a head's FLOPs are
    its weight's size, counted as ``dim`` x outputs.
    """
    kind = kind_of(model)
    base = kind.backbone(model)
    dim = base.config.hidden_size
    first: Any = kind.layers(base)[0]
    if isinstance(first, TimesformerLayer):  # fused qkv; tokens are tubes of num_frames frames
        heads, attn_dim, frames = first.attention.attention.num_heads, dim, int(base.config.num_frames)
    else:
        parts = LAYERS[type(first)][1](first)
        heads, attn_dim, frames = parts.heads, parts.q.out_features, 1
    _, conv = _embeddings(base)
    head_weights = sum(h.weight.numel() for h in kind.heads(model) if isinstance(h, nn.Linear))
    return ViTCost(
        num_patches=num_patches(base),
        num_prefix_tokens=kind.prefix(base),
        dim=dim,
        heads=heads,
        attn_dim=attn_dim,
        mlp_hidden=mlp_width(_mlp(first), dim),
        patch_dim=conv.weight[0].numel(),  # channels x kernel (x tubelet for videos)
        num_classes=-(-head_weights // dim),
        depth=len(kind.layers(base)),
        frames=frames,
    )


def _layer_forward(
    self: Any, hidden_states: Tensor, attention_mask: Tensor | None = None, *args: Any, **kw: Any
) -> Tensor:
    """A served encoder layer's forward with token sampling; bound to patched layers."""
    if attention_mask is not None and self._ats_carrier.user_mask:
        raise ValueError("ATS-patched layers do not support an attention_mask")
    # otherwise a mask is the all-attend one the model builds for itself when traced (compile,
    # export): padding is handled by the token state
    state = block_state(self, hidden_states)
    skipped = state.skip(self._ats_index)
    if skipped is not None:
        return skipped
    p: LayerParts = self._ats_parts(self)
    parts = AttentionParts(
        (p.q.weight, p.k.weight, p.v.weight),
        (p.q.bias, p.k.bias, p.v.bias),
        p.heads,
        p.scale,
        dropout_p=p.dropout if self.training else 0.0,
        proj=p.proj,
    )
    out, selection = sampled_self_attention(
        p.norm1(hidden_states), state.padding, self.ats, parts, size=state.size
    )
    x = state.follow(hidden_states, p.residual1(out), selection)
    del out  # not alive during the MLP, whose hidden activations set the peak memory
    # drop path is per image, so it must see the padded (b, m, c) grid, not packed tokens
    x = x + p.residual2(tokenwise(lambda t: p.mlp(p.norm2(t)), x, state.padding))
    x = state.after_mlp(x, self.ats)
    state.record(x)
    return x


class HFFamily(PatchedFamily):
    def __init__(self, model: Any) -> None:
        base = check_supported(model)
        self.kind = kind_of(model)
        self.scoring = self.kind.scoring
        config = base.config
        _, conv = _embeddings(base)
        video = isinstance(conv, nn.Conv3d)  # (tubelet, h, w) kernels over (frames, h, w)
        super().__init__(
            model,
            type(model).__name__,
            list(self.kind.layers(base)),
            cost(model),
            image_size=_pair(config.image_size),
            patch_size=_pair(conv.kernel_size[1:] if video else conv.kernel_size),
            channels=conv.in_channels,
            num_classes=int(model.config.num_labels or 0) if self.kind.classifier else 0,
            frames=int(config.num_frames) if video else 1,
        )

    def final_norm(self) -> Callable[[Tensor], Tensor] | None:
        return self.kind.final_norm(backbone(self.model))

    def logits(self, images: Tensor) -> Tensor:
        """A classifier's logits; a tower's pooled features (b, d): its projected or pooled
        output, else its class token, else the mean of its tokens (num_classes is then 0)."""
        out = self.model(pixel_values=images)
        if self.kind.classifier:
            return out.logits
        for key in ("image_embeds", "pooler_output"):
            if getattr(out, key, None) is not None:
                pooled: Tensor = out[key]
                return pooled
        tokens = out.last_hidden_state
        return tokens[:, 0] if self.num_prefix_tokens else _pooled(tokens, self, 0)

    def patch(self, forward: Callable[..., Tensor]) -> None:
        super().patch(forward)
        self.carrier.user_mask = False
        base = backbone(self.model)
        names = list(inspect.signature(type(base).forward).parameters)[1:]  # without self
        at = names.index("attention_mask") if "attention_mask" in names else None

        def note_user_mask(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            given = kwargs.get("attention_mask")
            if given is None and at is not None and len(args) > at:
                given = args[at]
            self.carrier.user_mask = given is not None

        self._mask_hook = base.register_forward_pre_hook(note_user_mask, with_kwargs=True)
        for block in self.blocks:
            if type(block) in LAYERS:  # TimeSformer's layers read their own modules
                block._ats_parts = LAYERS[type(block)][1]
        if self.kind.readout is not None:
            self.model.forward = types.MethodType(self.kind.readout, self.model)
        head = getattr(backbone(self.model), "head", None)
        if isinstance(head, SiglipMultiheadAttentionPoolingHead):
            head.forward = types.MethodType(_probe_forward, head)  # type: ignore[method-assign]
            head.__dict__["_ats_family"] = self

    def unpatch(self) -> None:
        self._mask_hook.remove()
        for block in self.blocks:
            block.__dict__.pop("_ats_parts", None)
        self.model.__dict__.pop("forward", None)
        head = getattr(backbone(self.model), "head", None)
        if isinstance(head, nn.Module):
            head.__dict__.pop("forward", None)
            head.__dict__.pop("_ats_family", None)
        super().unpatch()


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def family(model: nn.Module) -> HFFamily:
    """The family of a Hugging Face model, patching it (dense) the first time."""
    if isinstance(model, (TimesformerModel, TimesformerForVideoClassification)):
        raise TypeError(
            f"{type(model).__name__} is served by ats_vit.families.hf_timesformer (family_of or "
            "ats_vit.hf.apply pick it)"
        )
    return patched_once(model, HFFamily, lambda m: m, _layer_forward)
