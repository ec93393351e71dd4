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

from collections.abc import Iterable, Sequence

from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import Tensor, nn

from ats_vit import _patch
from ats_vit._patch import ATSInfo
from ats_vit.attention import sampled_self_attention
from ats_vit.flops import TokenTrace, ViTCost
from ats_vit.sampling import Dropped, Sampler, tokenwise

__all__ = ["ATSInfo", "adapter", "apply", "cost", "is_patched", "last_info", "last_trace", "remove"]


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
    state = _patch.block_state(self, x)
    if (replayed := state.skip(self)) is not None:
        return replayed
    attn: Attention = self.attn
    out, selection = sampled_self_attention(
        self.norm1(x),
        state.padding,
        getattr(self, "ats", None),
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
    x = state.select(x, selection) + self.drop_path1(self.ls1(out))
    del out  # not alive during the MLP, whose hidden activations set the peak memory
    # drop path is per image, so it must see the padded (b, m, c) grid, not packed tokens
    x = x + self.drop_path2(tokenwise(lambda t: self.ls2(self.mlp(self.norm2(t))), x, state.padding))
    state.record(x, self, selection)
    return x


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
    state = _patch.PatchState(model.num_prefix_tokens, cost(model), len(model.blocks))
    _patch.patch(
        model,
        model.blocks,
        _block_forward,
        state,
        layers,
        max_tokens,
        sampler=sampler,
        static_shape=static_shape,
        temperature=temperature,
        dropped=dropped,
    )
    return model


def adapter(model: VisionTransformer):
    """The :class:`ats_vit.budget.Adapter` of a timm model (budgets patch it through :func:`apply`)."""
    _check_supported(model)
    return _patch.budget_adapter(model, model.blocks, cost(model), lambda **kw: apply(model, **kw), model)


def is_patched(model: nn.Module) -> bool:
    return hasattr(model, _patch.STATE)


def remove(model: VisionTransformer) -> VisionTransformer:
    """Undo :func:`apply` (a no-op on an unpatched model); returns the model."""
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"model must be a timm VisionTransformer (or subclass), got {type(model).__name__}")
    _patch.unpatch(model, model.blocks)
    return model


def last_trace(model: VisionTransformer) -> TokenTrace:
    """The per-block token trace of the last forward pass (for :func:`ats_vit.flops.gflops`
    with :func:`cost`, and for :mod:`ats_vit.viz`)."""
    return _patch.finished_state(model, _model_name(model), "ats_vit.timm").trace


def last_info(model: VisionTransformer) -> ATSInfo:
    """Token ids, per-layer kept counts and GFLOPs of the last forward pass of a patched model."""
    return _patch.finished_state(model, _model_name(model), "ats_vit.timm").info()
