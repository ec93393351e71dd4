"""timm's ``VisionTransformer`` as a family: the only module that imports timm.

Patching (once, when the family is first asked for) replaces each block's ``forward`` with one
that calls timm's own modules (norms, qkv, q/k norms, layer scale, drop path, MLP) through
:func:`ats_vit.attention.sampled_self_attention`. The public front door is :mod:`ats_vit.timm`.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models.beit import Beit
from timm.models.eva import Eva
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import Tensor

from ats_vit.attention import AttentionParts, key_bias, sampled_self_attention
from ats_vit.families import timm_beit, timm_eva
from ats_vit.families._patched import (
    PatchedFamily,
    TimmStyleFamily,
    block_state,
    model_name,
    patched_once,
    weighted_mean,
)
from ats_vit.flops import ViTCost, mlp_width
from ats_vit.sampling import tokenwise

__all__ = ["TimmFamily", "family"]

MODELS = (VisionTransformer, Eva, Beit)


# the readouts the patched model serves: the CLS token (scored by its attention, the paper),
# no pooling (features per token, restore() for the full grid), and the pooled heads, which
# are scored by received attention and pool with padding and token sizes in mind
POOLS = ("token", "", "avg", "avgmax", "max", "map")


def scoring(model: VisionTransformer) -> str:
    """How ``model``'s tokens are scored: by the CLS query when a CLS token is read out (or
    the features are per token and a CLS token exists), else by received attention."""
    reads_cls = model.attn_pool is None and model.global_pool in ("token", "")
    return "cls" if model.cls_token is not None and reads_cls else "received"


def check_supported(model: Any) -> VisionTransformer:
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"model must be a timm VisionTransformer (or subclass), got {type(model).__name__}")
    name = model_name(model)
    pool = "map" if model.attn_pool is not None else model.global_pool
    if pool not in POOLS:
        raise ValueError(f"{name}: global_pool={pool!r} is not supported; supported: {POOLS}")
    if type(model).pool is not VisionTransformer.pool:
        raise TypeError(f"{name}: {type(model).__name__} overrides VisionTransformer.pool, which ATS patches")
    blocks: list[Any] = list(model.blocks)
    for i, block in enumerate(blocks):
        # the patched forward replays Block.forward / Attention.forward with the same modules;
        # any other block or attention would be silently changed
        attn: Any = getattr(block, "attn", None)
        if type(block).forward is not Block.forward or type(attn).forward is not Attention.forward:
            raise TypeError(
                f"{name}: block {i} is {type(block).__name__} with {type(attn).__name__}; "
                "ATS supports timm's vision_transformer.Block with Attention only"
            )
    return model


def _pool(self: Any, x: Tensor, pool_type: str | None = None) -> Tensor:
    """VisionTransformer.pool that knows the last pass's padding and token sizes: averages
    weigh each token by the patches it stands for and skip padding, max skips padding, and an
    attention-pool probe gets the same key bias as the blocks (padding masked, ``log(size)``
    added). Features the last pass did not shape (or a pass that kept every token) pool as
    timm pools them."""
    state = self._ats_family.carrier.state
    padding = size = None
    if state is not None and tuple(x.shape[:2]) == tuple(state.positions.shape):
        padding, size = state.padding, state.size
    if padding is None and size is None:
        return VisionTransformer.pool(self, x, pool_type)
    start = 0 if self.pool_include_prefix else self.num_prefix_tokens
    if self.attn_pool is not None:
        bias = key_bias(padding, size)
        if bias is not None and bias.dtype == torch.bool:
            bias = torch.zeros(bias.shape, device=x.device).masked_fill(~bias, float("-inf"))
        mask = None if bias is None else bias[:, None, None, start:].to(x.dtype)
        return self.attn_pool(x[:, start:], attn_mask=mask)
    pool_type = self.global_pool if pool_type is None else pool_type
    if pool_type in ("token", ""):
        return VisionTransformer.pool(self, x, pool_type)
    mean = weighted_mean(x, padding, size, start)
    if pool_type == "avg":
        return mean
    real = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if padding is None else padding.mask
    peak = x[:, start:].masked_fill(~real[:, start:, None], float("-inf")).amax(dim=1)
    return peak if pool_type == "max" else 0.5 * (peak + mean)


def cost(model: Any) -> ViTCost:
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
        mlp_hidden=mlp_width(block.mlp, model.embed_dim),
        patch_dim=proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1],
        num_classes=model.num_classes * heads,
        depth=len(model.blocks),
    )


def _block_forward(self: Any, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
    """Block.forward with token sampling; bound to patched block instances."""
    if attn_mask is not None or is_causal:
        raise ValueError("ATS-patched blocks do not support attn_mask or is_causal")
    state = block_state(self, x)
    skipped = state.skip(self._ats_index)
    if skipped is not None:
        return skipped
    attn: Any = self.attn
    parts = AttentionParts(
        attn.qkv.weight,
        attn.qkv.bias,
        attn.num_heads,
        attn.scale,
        dropout_p=attn.attn_drop.p if self.training else 0.0,
        q_norm=attn.q_norm,
        k_norm=attn.k_norm,
        gate=attn.gate,
        out_norm=attn.norm,
        proj=lambda t: attn.proj_drop(attn.proj(t)),
    )
    out, selection = sampled_self_attention(self.norm1(x), state.padding, self.ats, parts, size=state.size)
    x = state.follow(x, self.drop_path1(self.ls1(out)), selection)
    del out  # not alive during the MLP, whose hidden activations set the peak memory
    # drop path is per image, so it must see the padded (b, m, c) grid, not packed tokens
    x = x + self.drop_path2(tokenwise(lambda t: self.ls2(self.mlp(self.norm2(t))), x, state.padding))
    x = state.after_mlp(x, self.ats)
    state.record(x)
    return x


class TimmFamily(TimmStyleFamily):
    model: Any
    readout = ("pool", _pool)

    def __init__(self, model: Any) -> None:
        self.scoring = scoring(model)
        super().__init__(model, cost(model))


def family(model: Any) -> PatchedFamily:
    """The family of a timm model (``VisionTransformer``, ``Eva`` or ``Beit``), patching it
    (dense) the first time."""
    if isinstance(model, Eva):
        return timm_eva.family(model)
    if isinstance(model, Beit):
        return timm_beit.family(model)
    return patched_once(model, TimmFamily, check_supported, _block_forward)
