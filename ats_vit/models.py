"""Models that ats-vit trains: their config and how to build them (our ViT or timm's)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ats_vit.budget import Budget
from ats_vit.families import family_of
from ats_vit.vit import ViT

__all__ = ["ModelConfig", "build_model"]


@dataclass
class ModelConfig:
    """A ViT of these sizes, and the token selection it runs with.

    ``arch="ats_vit"`` builds :class:`ats_vit.ViT`; ``arch="timm"`` builds timm's own
    ``VisionTransformer`` with the same sizes (class-token pooling), sampling through
    :mod:`ats_vit.timm`; ``"timm-gap"`` the same without a class token, average-pooled (as
    MAE fine-tunes and GAP ViTs), and ``"timm-map"`` without a class token, with SigLIP's
    attention-pool (MAP) head: both are scored by received attention. timm needs
    ``dim_head * heads == dim``. ``budget`` is a
    :class:`ats_vit.budget.Budget` as a dict (``None``: dense), so a checkpoint carries the
    budget it was trained or fine-tuned with.
    """

    image_size: int = 48
    patch_size: int = 8
    num_classes: int = 10
    channels: int = 1
    dim: int = 96
    depth: int = 8
    heads: int = 4
    dim_head: int = 24
    mlp_dim: int = 192
    dropout: float = 0.0
    emb_dropout: float = 0.0
    arch: str = "ats_vit"
    budget: dict[str, Any] | None = None

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


ARCHS = ("ats_vit", "timm", "timm-gap", "timm-map")
# timm's readout per arch: (class token, global_pool)
_TIMM_POOL: dict[str, tuple[bool, Any]] = {
    "timm": (True, "token"),
    "timm-gap": (False, "avg"),
    "timm-map": (False, "map"),
}


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model of ``cfg`` (random weights), with its budget applied."""
    if cfg.arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {cfg.arch!r}")
    if cfg.arch in _TIMM_POOL:
        model = _build_timm(cfg)
    else:
        model = ViT(
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
            num_classes=cfg.num_classes,
            dim=cfg.dim,
            depth=cfg.depth,
            max_tokens_per_depth=(cfg.num_patches,) * cfg.depth,
            heads=cfg.heads,
            mlp_dim=cfg.mlp_dim,
            channels=cfg.channels,
            dim_head=cfg.dim_head,
            dropout=cfg.dropout,
            emb_dropout=cfg.emb_dropout,
        )
    if cfg.budget is not None:
        Budget.from_dict(cfg.budget).apply(model)
    return model


def _build_timm(cfg: ModelConfig) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    if cfg.dim_head * cfg.heads != cfg.dim:
        raise ValueError(
            f"arch={cfg.arch!r} needs dim_head * heads == dim, got {cfg.dim_head} * {cfg.heads} != {cfg.dim}"
        )
    class_token, pool = _TIMM_POOL[cfg.arch]
    model = VisionTransformer(
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.channels,
        num_classes=cfg.num_classes,
        embed_dim=cfg.dim,
        depth=cfg.depth,
        num_heads=cfg.heads,
        mlp_ratio=cfg.mlp_dim / cfg.dim,
        class_token=class_token,
        global_pool=pool,
        drop_rate=cfg.dropout,
        pos_drop_rate=cfg.emb_dropout,
    )
    family_of(model)  # patched once (dense), so every forward leaves a token trace
    return model
