"""timm's ``Beit`` (BEiT, BEiT v2: relative position bias) as a family.

A BEiT block adds a learned bias to every query-key logit, indexed by the two tokens' relative
grid position (per layer, or shared by all layers). A patched block gathers that bias for the
tokens actually alive: every token carries its original position
(:class:`~ats_vit.tokens.TokenState`), and the (heads, N, N) table of the dense model is
indexed by the kept queries' and the alive keys' positions, so a kept token attends exactly as
in the dense model; a merged token takes the position of the token it was merged into. The
class token's row scores tokens (the paper) when the model reads out the class token; an
average-pooled BEiT (timm's default, ``global_pool='avg'``) is scored by received attention,
and its head averages the kept tokens by their sizes, skipping padding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from timm.models.beit import Attention, Beit, Block
from torch import Tensor

from ats_vit.attention import AttentionParts, sampled_self_attention
from ats_vit.families._patched import (
    TimmStyleFamily,
    block_state,
    model_name,
    patched_once,
    refuse_dct,
    weighted_mean,
)
from ats_vit.flops import ViTCost, mlp_width
from ats_vit.sampling import tokenwise

__all__ = ["BeitFamily", "family"]


def check_supported(model: Any) -> Beit:
    if not isinstance(model, Beit):
        raise TypeError(f"model must be a timm Beit (or subclass), got {type(model).__name__}")
    name = model_name(model)
    if model.global_pool not in ("avg", "token", ""):
        raise ValueError(f"{name}: global_pool={model.global_pool!r} is not supported; supported: avg, token")
    for i, block in enumerate(model.blocks):
        attn: Any = getattr(block, "attn", None)
        if type(block).forward is not Block.forward or type(attn).forward is not Attention.forward:
            raise TypeError(
                f"{name}: block {i} is {type(block).__name__} with {type(attn).__name__}; "
                "ATS supports timm's beit.Block with beit.Attention only"
            )
    return model


def cost(model: Any) -> ViTCost:
    """The sizes that set ``model``'s FLOPs (for :func:`ats_vit.flops.gflops`)."""
    block = model.blocks[0]
    proj = model.patch_embed.proj
    return ViTCost(
        num_patches=model.patch_embed.num_patches,
        num_prefix_tokens=model.num_prefix_tokens,
        dim=model.embed_dim,
        heads=block.attn.num_heads,
        attn_dim=block.attn.qkv.weight.shape[0] // 3,
        mlp_hidden=mlp_width(block.mlp, model.embed_dim),
        patch_dim=proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1],
        num_classes=model.num_classes,
        depth=len(model.blocks),
    )


def pair_bias(table: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """The relative position bias of tokens at original positions: table (1, h, N, N) the
    dense model's bias (N = prefix + patches); queries at (b, m), keys at (b, n) ->
    (b, h, m, n)."""
    heads, n = table.shape[1], table.shape[-1]
    flat = table.reshape(heads, n * n)

    def gather(q_positions: Tensor, k_positions: Tensor) -> Tensor:
        index = q_positions[:, :, None] * n + k_positions[:, None, :]  # (b, m, n)
        return flat[:, index].transpose(0, 1)

    return gather


def _dense_bias(attn: Any, shared: Tensor | None) -> Tensor | None:
    """What timm's Attention adds to its logits, (1, h, N, N): its own table and/or the shared
    one (which comes without the leading 1)."""
    own = attn._get_rel_pos_bias() if attn.relative_position_bias_table is not None else None
    if shared is not None and shared.dim() == 3:
        shared = shared[None]
    if own is None:
        return shared
    return own if shared is None else own + shared


def _block_forward(self: Any, x: Tensor, shared_rel_pos_bias: Tensor | None = None) -> Tensor:
    """beit.Block.forward with token sampling; bound to patched block instances."""
    refuse_dct(self, "BEiT", "its relative position bias needs each token's patch")
    state = block_state(self, x)
    skipped = state.skip(self._ats_index)
    if skipped is not None:
        return skipped
    attn: Any = self.attn
    bias = None if attn.q_bias is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    table = _dense_bias(attn, shared_rel_pos_bias)
    gamma1 = self.gamma_1 if self.gamma_1 is not None else 1.0
    gamma2 = self.gamma_2 if self.gamma_2 is not None else 1.0
    parts = AttentionParts(
        attn.qkv.weight,
        bias,
        attn.num_heads,
        attn.scale,
        dropout_p=attn.attn_drop.p if self.training else 0.0,
        proj=lambda t: attn.proj_drop(attn.proj(t)),
        pair_bias=None if table is None else pair_bias(table),
    )
    out, selection = sampled_self_attention(
        self.norm1(x), state.padding, self.ats, parts, size=state.size, positions=state.positions
    )
    x = state.follow(x, self.drop_path1(gamma1 * out), selection)
    del out
    x = x + self.drop_path2(tokenwise(lambda t: gamma2 * self.mlp(self.norm2(t)), x, state.padding))
    state.record(x)
    return x


def _forward_head(self: Any, x: Tensor, pre_logits: bool = False) -> Tensor:
    """Beit.forward_head whose average weighs the last pass's tokens by their sizes and skips
    padding (bound to a patched model)."""
    state = self._ats_family.carrier.state
    if (
        self.global_pool == "avg"
        and state is not None
        and tuple(x.shape[:2]) == tuple(state.positions.shape)
        and (state.padding is not None or state.size is not None)
    ):
        x = self.head_drop(self.fc_norm(weighted_mean(x, state.padding, state.size, self.num_prefix_tokens)))
        return x if pre_logits else self.head(x)
    return Beit.forward_head(self, x, pre_logits)


class BeitFamily(TimmStyleFamily):
    model: Any
    readout = ("forward_head", _forward_head)

    def __init__(self, model: Any) -> None:
        self.scoring = "received" if model.global_pool == "avg" else "cls"
        super().__init__(model, cost(model))


def family(model: Beit) -> BeitFamily:
    """The family of a timm Beit model, patching it (dense) the first time."""
    return patched_once(model, BeitFamily, check_supported, _block_forward)
