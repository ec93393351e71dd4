"""Off-the-shelf ATS for pretrained timm Vision Transformers: fewer tokens, no fine-tuning.

``apply`` patches one model *instance*: each block's ``forward`` is replaced by an instance
attribute that calls timm's own modules (norms, qkv, q/k norms, layer scale, drop path, MLP)
through :func:`ats_vit.attention.sampled_self_attention`; blocks chosen by ``layers`` also get
an :class:`~ats_vit.sampling.AdaptiveTokenSampling` submodule (no parameters, so state dicts
are unchanged). ``remove`` deletes those attributes, which restores the class's behaviour.
Other instances, and the timm classes, are never touched. This is the only module that
imports timm.
"""

from __future__ import annotations

import types
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import Tensor, nn

from ats_vit import _validate
from ats_vit.attention import sampled_self_attention
from ats_vit.flops import TokenTrace, ViTCost, gflops
from ats_vit.sampling import (
    SAMPLERS,
    AdaptiveTokenSampling,
    Dropped,
    Padding,
    Sampler,
    select_tokens,
    tokenwise,
)

__all__ = ["ATSInfo", "adapter", "apply", "cost", "is_patched", "last_info", "last_trace", "remove"]

_STATE = "_ats_state"


@dataclass
class ATSInfo:
    """What the last forward pass of a patched model kept.

    token_ids: (b, m) patch indices (0-based, prefix tokens excluded) alive after the last
        block, -1 for padding. kept_per_layer: (b, depth) patch tokens each block output.
    gflops: (b,) analytic GFLOPs per image from the tokens actually kept.
    """

    token_ids: Tensor
    kept_per_layer: Tensor
    gflops: Tensor


class _State:
    """Carries padding and bookkeeping from block to block within one forward pass."""

    def __init__(self, model: VisionTransformer) -> None:
        self.num_prefix_tokens = model.num_prefix_tokens
        self.cost = cost(model)
        self.padding: Padding | None = None
        self.size: Tensor | None = None
        self.positions: Tensor | None = None
        self.trace: TokenTrace | None = None

    def start(self, x: Tensor) -> None:
        b, n, _ = x.shape
        self.padding, self.size = None, None
        self.positions = torch.arange(n, device=x.device).expand(b, n)
        self.trace = TokenTrace(n - self.num_prefix_tokens, self.num_prefix_tokens)


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def _check_supported(model: object) -> None:
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"model must be a timm VisionTransformer (or subclass), got {type(model).__name__}")
    name = _model_name(model)
    if model.cls_token is None or model.global_pool != "token" or model.attn_pool is not None:
        raise ValueError(
            f"{name}: ATS scores tokens by the class token's attention and needs a model that "
            f"classifies from that token (class_token=True, global_pool='token'); this one has "
            f"class_token={model.cls_token is not None}, global_pool={model.global_pool!r}"
        )
    for i, block in enumerate(model.blocks):
        # the patched forward replays Block.forward / Attention.forward with the same modules;
        # any other block or attention would be silently changed
        if type(block).forward is not Block.forward or type(block.attn).forward is not Attention.forward:
            raise TypeError(
                f"{name}: block {i} is {type(block).__name__} with {type(block.attn).__name__}; "
                "ATS supports timm's vision_transformer.Block with Attention only"
            )


def cost(model: VisionTransformer) -> ViTCost:
    """The sizes that set ``model``'s FLOPs (for :func:`ats_vit.flops.gflops`)."""
    block = model.blocks[0]
    proj = model.patch_embed.proj
    heads = 2 if getattr(model, "head_dist", None) is not None else 1
    return ViTCost(
        num_patches=model.patch_embed.num_patches,
        num_prefix_tokens=model.num_prefix_tokens,
        dim=model.embed_dim,
        heads=block.attn.num_heads,
        attn_dim=block.attn.num_heads * block.attn.head_dim,
        mlp_hidden=block.mlp.fc1.out_features,
        patch_dim=proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1],
        num_classes=model.num_classes * heads,
        depth=len(model.blocks),
    )


def _block_forward(
    self: Block, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False
) -> Tensor:
    """Block.forward with token sampling; bound to ATS-patched block instances."""
    if attn_mask is not None or is_causal:
        raise ValueError("ATS-patched blocks do not support attn_mask or is_causal")
    state: _State = getattr(self, _STATE)
    if self._ats_first:
        state.start(x)
    attn: Attention = self.attn
    ats = getattr(self, "ats", None)
    out, selection = sampled_self_attention(
        self.norm1(x),
        state.padding,
        ats,
        size=state.size,
        qkv_weight=attn.qkv.weight,
        qkv_bias=attn.qkv.bias,
        heads=attn.num_heads,
        scale=attn.scale,
        dropout_p=attn.attn_drop.p if self.training else 0.0,
        q_norm=attn.q_norm,
        k_norm=attn.k_norm,
        gate=attn.gate,
        out_norm=attn.norm,
        proj=lambda t: attn.proj_drop(attn.proj(t)),
    )
    if selection is not None:
        x = select_tokens(x, selection)
        state.padding, state.size = selection.padding, selection.size
        state.positions = state.positions.gather(1, selection.index)
    x = x + self.drop_path1(self.ls1(out))
    del out  # not alive during the MLP, whose hidden activations set the peak memory
    # drop path is per image, so it must see the padded (b, m, c) grid, not packed tokens
    x = x + self.drop_path2(tokenwise(lambda t: self.ls2(self.mlp(self.norm2(t))), x, state.padding))
    rule = None if selection is None else ats.rule
    state.trace.record(x, state.padding, rule=rule, positions=state.positions)
    return x


def _layers(layers: Iterable[int] | None, depth: int) -> list[int]:
    if layers is None:
        return list(range(depth))
    if isinstance(layers, int) or not isinstance(layers, Iterable):
        raise TypeError(f"layers must be an iterable of block indices, got {layers!r}")
    chosen = list(layers)
    for i in chosen:
        if not _validate.is_int(i) or not 0 <= i < depth:
            raise ValueError(f"layers must hold block indices in [0, {depth}), got {i!r} in {chosen}")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"layers must not repeat a block, got {chosen}")
    return sorted(chosen)


def apply(
    model: VisionTransformer,
    layers: Iterable[int] | None = None,
    max_tokens: int | Sequence[int] = 108,
    *,
    sampler: Sampler = "inverse_transform",
    static_shape: bool = False,
    temperature: float = 1.0,
    dropped: Dropped | None = None,
) -> VisionTransformer:
    """Make ``model``'s blocks in ``layers`` (default: all) keep at most ``max_tokens`` patch
    tokens each (an int, or one per chosen layer, in ``layers`` order after sorting).

    ``sampler``, ``static_shape``, ``temperature`` and ``dropped`` are those of
    :class:`~ats_vit.sampling.AdaptiveTokenSampling` (defaults: the paper's ATS). Prefix
    tokens (class, distillation, registers) are always kept. Patches in place and returns the
    model; applying again replaces the previous patch. See :func:`last_info` for what the
    last forward kept.
    """
    _check_supported(model)
    depth = len(model.blocks)
    chosen = _layers(layers, depth)
    if _validate.is_int(max_tokens):
        caps = [_validate.positive_int("max_tokens", max_tokens)] * len(chosen)
    elif isinstance(max_tokens, Sequence) and not isinstance(max_tokens, str):
        caps = [_validate.positive_int(f"max_tokens[{i}]", t) for i, t in enumerate(max_tokens)]
        if len(caps) != len(chosen):
            raise ValueError(f"max_tokens has {len(caps)} entries but layers selects {len(chosen)} blocks")
    else:
        raise TypeError(f"max_tokens must be an int or a sequence of ints, got {max_tokens!r}")
    _validate.choice("sampler", sampler, SAMPLERS)

    remove(model)
    state = _State(model)
    caps_by_layer = dict(zip(chosen, caps, strict=True))
    for i, block in enumerate(model.blocks):
        if i in caps_by_layer:
            block.ats = AdaptiveTokenSampling(
                caps_by_layer[i],
                sampler,
                num_prefix_tokens=model.num_prefix_tokens,
                static_shape=static_shape,
                temperature=temperature,
                dropped=dropped,
            ).train(block.training)  # new modules default to training mode, which jitters
        setattr(block, _STATE, state)
        block._ats_first = i == 0
        block.forward = types.MethodType(_block_forward, block)
    setattr(model, _STATE, state)
    return model


def adapter(model: VisionTransformer):
    """The :class:`ats_vit.budget.Adapter` of a timm model: budgets patch it through :func:`apply`
    (a dense budget patches no layer, so every forward still leaves a trace of its cost)."""
    from ats_vit.budget import Adapter

    _check_supported(model)
    depth, n = len(model.blocks), model.patch_embed.num_patches

    def configure(budget) -> None:
        if budget is None:
            apply(model, layers=[], max_tokens=1)
            return
        caps = budget.schedule(depth, n)[budget.start_layer :]
        apply(
            model,
            layers=range(budget.start_layer, depth),
            max_tokens=list(caps),
            sampler=budget.sampler,
            temperature=budget.temperature,
            dropped=budget.dropped,
        )

    def run(images: Tensor) -> tuple[Tensor, Tensor]:
        logits = model(images)
        return logits, last_info(model).gflops

    return Adapter(depth, n, configure, run)


def is_patched(model: nn.Module) -> bool:
    return hasattr(model, _STATE)


def remove(model: VisionTransformer) -> VisionTransformer:
    """Undo :func:`apply` (a no-op on an unpatched model); returns the model."""
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"model must be a timm VisionTransformer (or subclass), got {type(model).__name__}")
    for block in model.blocks:
        for name in ("ats", _STATE, "_ats_first", "forward"):
            if name in block.__dict__ or name in block._modules:
                delattr(block, name)
    if _STATE in model.__dict__:
        delattr(model, _STATE)
    return model


def _finished_state(model: VisionTransformer) -> _State:
    state: _State | None = getattr(model, _STATE, None)
    if state is None:
        raise ValueError(f"{_model_name(model)} is not patched with ats_vit.timm.apply")
    if state.trace is None or len(state.trace.counts) != len(model.blocks):
        raise ValueError("no complete forward pass has run since the model was patched")
    return state


def last_trace(model: VisionTransformer) -> TokenTrace:
    """The per-block token trace of the last forward pass (for :func:`ats_vit.flops.gflops`
    with :func:`cost`, and for :mod:`ats_vit.viz`)."""
    return _finished_state(model).trace


def last_info(model: VisionTransformer) -> ATSInfo:
    """Token ids, per-layer kept counts and GFLOPs of the last forward pass of a patched model."""
    state = _finished_state(model)
    p = state.num_prefix_tokens
    ids = state.positions[:, p:] - p
    if state.padding is not None:
        ids = ids.masked_fill(~state.padding.mask[:, p:], -1)
    return ATSInfo(ids, state.trace.kept_per_layer(), gflops(state.cost, state.trace))
