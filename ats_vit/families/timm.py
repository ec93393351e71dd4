"""timm's ``VisionTransformer`` as a family: the only module that imports timm.

Patching (once, when the family is first asked for) replaces each block's ``forward`` with one
that calls timm's own modules (norms, qkv, q/k norms, layer scale, drop path, MLP) through
:func:`ats_vit.attention.sampled_self_attention`. The public front door is :mod:`ats_vit.timm`.
"""

from __future__ import annotations

from typing import Any

from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import Tensor, nn

from ats_vit.attention import sampled_self_attention
from ats_vit.families._patched import PatchedFamily, block_state, patched_family
from ats_vit.flops import ViTCost
from ats_vit.sampling import tokenwise

__all__ = ["MODELS", "TimmFamily", "cost", "family", "model_name"]

MODELS = (VisionTransformer,)


def model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def check_supported(model: Any) -> VisionTransformer:
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"model must be a timm VisionTransformer (or subclass), got {type(model).__name__}")
    name = model_name(model)
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
    return model


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
        mlp_hidden=block.mlp.fc1.out_features,
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
    out, selection = sampled_self_attention(
        self.norm1(x),
        state.padding,
        self.ats,
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
    x = state.follow(x, self.drop_path1(self.ls1(out)), selection)
    del out  # not alive during the MLP, whose hidden activations set the peak memory
    # drop path is per image, so it must see the padded (b, m, c) grid, not packed tokens
    x = x + self.drop_path2(tokenwise(lambda t: self.ls2(self.mlp(self.norm2(t))), x, state.padding))
    state.record(x)
    return x


class TimmFamily(PatchedFamily):
    model: VisionTransformer

    def __init__(self, model: VisionTransformer) -> None:
        patch = model.patch_embed
        super().__init__(
            model,
            model_name(model),
            list(model.blocks),
            cost(model),
            image_size=tuple(patch.img_size),
            patch_size=tuple(patch.patch_size),
            channels=patch.proj.in_channels,
            num_classes=model.num_classes,
        )

    def logits(self, images: Tensor) -> Tensor:
        return self.model(images)


def family(model: VisionTransformer) -> TimmFamily:
    """The family of a timm model, patching it (dense) the first time."""
    found = patched_family(model)
    if isinstance(found, TimmFamily):
        return found
    new = TimmFamily(check_supported(model))
    new.patch(_block_forward)
    return new
