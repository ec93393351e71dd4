"""timm's ``Eva`` (EVA-02, EVA-CLIP towers, and other rotary-embedding ViTs) as a family.

Eva blocks rotate queries and keys by each patch's grid position (RoPE). A patched block keeps
that exact: every token carries its original position (:class:`~ats_vit.tokens.TokenState`),
and :func:`ats_vit.attention.sampled_self_attention` rotates the keys of the tokens alive and
the queries of the kept ones by those positions, so a kept token attends exactly as it would
in the dense model. A merged token takes the position of the token it was merged into (an
approximation: its patches had several). Prefix tokens (class, registers) are never rotated
and never dropped. Served: ``EvaBlock`` with ``EvaAttention`` (fused or separate q/k/v, q/k
norm, inner norm, layer scale, SwiGLU or plain MLP), pooled by the class token or by the mean
of the patches; not: post-norm blocks, ``AttentionRope`` (grouped-query), per-depth ("mixed")
rotary tables, patch dropout and attention-pool heads (each refused by name).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from timm.layers.pos_embed_sincos import apply_rot_embed_cat
from timm.models.eva import Eva, EvaAttention, EvaBlock
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

__all__ = ["EvaFamily", "family"]

POOLS = ("token", "avg", "")


def check_supported(model: Any) -> Eva:
    name = model_name(model)
    if not isinstance(model, Eva):
        raise TypeError(f"model must be a timm Eva (or subclass), got {type(model).__name__}")
    problems = []
    if model.attn_pool is not None:
        problems.append("an attention-pool head")
    if model.global_pool not in POOLS:
        problems.append(f"global_pool={model.global_pool!r} (supported: {POOLS})")
    if getattr(model, "rope_mixed", False):
        problems.append("per-depth ('mixed') rotary embeddings")
    if model.patch_drop is not None:
        problems.append("patch dropout (create it with patch_drop_rate=0)")
    if problems:
        raise ValueError(f"{name}: ATS does not serve {', '.join(problems)}")
    for i, block in enumerate(model.blocks):
        attn: Any = getattr(block, "attn", None)
        if type(block).forward is not EvaBlock.forward or type(attn).forward is not EvaAttention.forward:
            raise TypeError(
                f"{name}: block {i} is {type(block).__name__} with {type(attn).__name__}; "
                "ATS supports timm's eva.EvaBlock with EvaAttention only"
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
        attn_dim=block.attn.num_heads * block.attn.head_dim,
        mlp_hidden=mlp_width(block.mlp, model.embed_dim),
        patch_dim=proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1],
        num_classes=model.num_classes,
        depth=len(model.blocks),
    )


def rotation(table: Tensor, num_prefix_tokens: int, half: bool) -> Callable[[Tensor, Tensor], Tensor]:
    """RoPE by original position: table (patches, 2 * head_dim) sin|cos rows of the grid;
    (b, h, n, d) queries or keys of tokens at positions (b, n), prefix first, unrotated."""

    def rotate(t: Tensor, positions: Tensor) -> Tensor:
        patch = positions - num_prefix_tokens
        rows = table[patch.clamp_min(0)][:, None]  # (b, 1, n, 2d)
        rotated = apply_rot_embed_cat(t, rows, half=half).type_as(t)
        return torch.where((patch >= 0)[:, None, :, None], rotated, t)

    return rotate


def _block_forward(
    self: Any,
    x: Tensor,
    rope: Tensor | None = None,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
) -> Tensor:
    """EvaBlock.forward with token sampling; bound to patched block instances."""
    if attn_mask is not None or is_causal:
        raise ValueError("ATS-patched blocks do not support attn_mask or is_causal")
    refuse_dct(self, "EVA", "its rotary embeddings need each token's patch")
    state = block_state(self, x)
    skipped = state.skip(self._ats_index)
    if skipped is not None:
        return skipped
    attn: Any = self.attn
    if attn.qkv is not None:
        weight: Any = attn.qkv.weight
        bias: Any = None if attn.q_bias is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    else:
        weight = (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight)
        bias = (attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias)
    gamma1 = self.gamma_1 if self.gamma_1 is not None else 1.0
    gamma2 = self.gamma_2 if self.gamma_2 is not None else 1.0
    parts = AttentionParts(
        weight,
        bias,
        attn.num_heads,
        attn.scale,
        dropout_p=attn.attn_drop.p if self.training else 0.0,
        q_norm=attn.q_norm,
        k_norm=attn.k_norm,
        gate=attn.gate,
        out_norm=attn.norm,
        proj=lambda t: attn.proj_drop(attn.proj(t)),
        rope=None if rope is None else rotation(rope, attn.num_prefix_tokens, attn.rotate_half),
    )
    out, selection = sampled_self_attention(
        self.norm1(x), state.padding, self.ats, parts, size=state.size, positions=state.positions
    )
    x = state.follow(x, self.drop_path1(gamma1 * out), selection)
    del out
    x = x + self.drop_path2(tokenwise(lambda t: gamma2 * self.mlp(self.norm2(t)), x, state.padding))
    state.record(x)
    return x


def _pool(self: Any, x: Tensor, pool_type: str | None = None) -> Tensor:
    """Eva.pool that averages the last pass's patch tokens by their sizes, skipping padding."""
    state = self._ats_family.carrier.state
    pool_type = self.global_pool if pool_type is None else pool_type
    if (
        pool_type == "avg"
        and state is not None
        and tuple(x.shape[:2]) == tuple(state.positions.shape)
        and (state.padding is not None or state.size is not None)
    ):
        return weighted_mean(x, state.padding, state.size, self.num_prefix_tokens)
    return Eva.pool(self, x, pool_type)


class EvaFamily(TimmStyleFamily):
    model: Any
    readout = ("pool", _pool)

    def __init__(self, model: Any) -> None:
        reads_cls = model.global_pool in ("token", "")
        self.scoring = "cls" if model.cls_token is not None and reads_cls else "received"
        super().__init__(model, cost(model))


def family(model: Eva) -> EvaFamily:
    """The family of a timm Eva model, patching it (dense) the first time."""
    return patched_once(model, EvaFamily, check_supported, _block_forward)
