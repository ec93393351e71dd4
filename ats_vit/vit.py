"""A Vision Transformer whose layers keep an adaptive number of tokens per image.

Same constructor arguments and forward contract as vit-pytorch's ``ats_vit.ViT`` (plus
``sampler`` and ``options``); module names follow timm's. Checkpoints of the vit-pytorch
model load through :func:`load_vit_pytorch_state_dict`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from einops import rearrange
from torch import Tensor, nn

from ats_vit import _validate
from ats_vit.attention import SamplingAttention
from ats_vit.flops import ViTCost
from ats_vit.options import Sampler, SamplingOptions
from ats_vit.sampling import AdaptiveTokenSampling, tokenwise
from ats_vit.tokens import TokenState

__all__ = ["Block", "FeedForward", "PatchEmbed", "ViT", "load_vit_pytorch_state_dict"]


class PatchEmbed(nn.Module):
    """Non-overlapping patches, flattened as ``(p1 p2 c)``, LayerNorm -> Linear -> LayerNorm."""

    def __init__(self, patch_size: tuple[int, int], channels: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        patch_dim = channels * patch_size[0] * patch_size[1]
        self.norm_in = nn.LayerNorm(patch_dim)
        self.proj = nn.Linear(patch_dim, dim)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, img: Tensor) -> Tensor:
        """img: (b, c, H, W) -> (b, n, dim)."""
        p1, p2 = self.patch_size
        x = rearrange(img, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p1, p2=p2)
        return self.norm_out(self.proj(self.norm_in(x)))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block; when its attention samples, the residual stream follows."""

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        mlp_dim: int,
        dropout: float = 0.0,
        cap: int | None = None,
        options: SamplingOptions | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SamplingAttention(dim, heads, dim_head, dropout, cap, options)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, mlp_dim, dropout)

    def forward(self, x: Tensor, state: TokenState | None = None) -> Tensor:
        """x: (b, n, dim) -> (b, m, dim), the tokens this block kept; ``state`` carries the
        padding and sizes of x in and takes on those of the output (a new one: x is whole)."""
        state = TokenState(x, 1) if state is None else state
        out, selection = self.attn(self.norm1(x), state.padding, state.size)
        x = state.follow(x, out, selection)
        del out  # not alive during the MLP, whose hidden activations set the peak memory
        x = x + tokenwise(lambda t: self.mlp(self.norm2(t)), x, state.padding)
        x = state.after_mlp(x, self.attn.ats)
        state.record(x)
        return x


class ViT(nn.Module):
    """ViT with Adaptive Token Sampling.

    ``max_tokens_per_depth[i]`` caps the patch tokens (CLS excluded) that layer ``i`` keeps;
    a layer samples only when it has more than that. ``sampler`` is ``"inverse_transform"``
    (the paper's; deterministic at eval) or ``"gumbel"`` (the seed's); ``"topk"``,
    ``"random"``, ``"tome"`` and ``"pitome"`` are fixed-count peers for comparisons. ``options``
    (:class:`~ats_vit.options.SamplingOptions`) sets everything else a layer can do
    (temperature, fusing or merging what it drops, static shapes); give ``sampler`` or
    ``options``, not both. :mod:`ats_vit.budget` changes the caps and options in place.
    """

    def __init__(
        self,
        *,
        image_size: int | tuple[int, int],
        patch_size: int | tuple[int, int],
        num_classes: int,
        dim: int,
        depth: int,
        max_tokens_per_depth: Sequence[int],
        heads: int,
        mlp_dim: int,
        channels: int = 3,
        dim_head: int = 64,
        dropout: float = 0.0,
        emb_dropout: float = 0.0,
        sampler: Sampler | None = None,
        options: SamplingOptions | None = None,
    ) -> None:
        super().__init__()
        image_hw = _validate.pair("image_size", image_size)
        patch_hw = _validate.pair("patch_size", patch_size)
        if image_hw[0] % patch_hw[0] or image_hw[1] % patch_hw[1]:
            raise ValueError(
                f"image_size {image_hw} must be divisible by patch_size {patch_hw} in both dimensions"
            )
        for name, value in (
            ("num_classes", num_classes),
            ("dim", dim),
            ("heads", heads),
            ("mlp_dim", mlp_dim),
            ("channels", channels),
            ("dim_head", dim_head),
        ):
            _validate.positive_int(name, value)
        depth = _validate.positive_int("depth", depth)
        _validate.probability("dropout", dropout)
        _validate.probability("emb_dropout", emb_dropout)
        if sampler is not None and options is not None:
            raise ValueError("give sampler or options (SamplingOptions(sampler=...)), not both")
        options = options if options is not None else SamplingOptions(sampler=sampler or "inverse_transform")
        schedule = _validate.schedule(max_tokens_per_depth, depth)

        self.image_size = image_hw
        self.patch_size = patch_hw
        self.channels = channels
        self.cost = ViTCost(
            num_patches=(image_hw[0] // patch_hw[0]) * (image_hw[1] // patch_hw[1]),
            num_prefix_tokens=1,
            dim=dim,
            heads=heads,
            attn_dim=heads * dim_head,
            mlp_hidden=mlp_dim,
            patch_dim=channels * patch_hw[0] * patch_hw[1],
            num_classes=num_classes,
            depth=depth,
        )
        self.num_patches = self.cost.num_patches
        self.patch_embed = PatchEmbed(patch_hw, channels, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, dim))
        self.emb_drop = nn.Dropout(emb_dropout)
        self.blocks = nn.ModuleList(
            Block(dim, heads, dim_head, mlp_dim, dropout, cap, options) for cap in schedule
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for i, (ats, cap) in enumerate(zip(self.sampling_layers(), schedule, strict=True)):
            ats.reference_tokens = self.num_patches + 1  # the full grid and CLS
            ats.layer = (i, depth)
            ats.keeps_all = cap >= self.num_patches  # as a budget's whole layers, for every rule
        # the token state of the last forward pass (see ats_vit.families.last_info)
        self.last_state: TokenState | None = None

    def sampling_layers(self) -> list[AdaptiveTokenSampling]:
        """Each block's sampling module (parameter-free; configured in place)."""
        return [_required_ats(block) for block in self.blocks]

    @property
    def max_tokens_per_depth(self) -> tuple[int, ...]:
        return tuple(ats.cap for ats in self.sampling_layers())

    @property
    def options(self) -> SamplingOptions:
        return self.sampling_layers()[0].options

    @property
    def sampler(self) -> str:
        return self.options.sampler

    def set_sampling(
        self, max_tokens_per_depth: Sequence[int], options: SamplingOptions | None = None
    ) -> ViT:
        """Give every layer a new token cap and (unless None) new sampling options, in place;
        weights are untouched. Returns the model."""
        schedule = _validate.schedule(max_tokens_per_depth, len(self.blocks))
        for ats, cap in zip(self.sampling_layers(), schedule, strict=True):
            ats.configure(cap, options)
            ats.keeps_all = cap >= self.num_patches
        return self

    def forward_tokens(
        self, img: Tensor, *, resume: tuple[int, Tensor] | None = None
    ) -> tuple[Tensor, TokenState]:
        """img: (b, c, H, W) -> tokens (b, m, dim) after the last block and the pass's
        :class:`~ats_vit.tokens.TokenState` (padding, positions, trace for
        :func:`ats_vit.flops.gflops` with ``self.cost``).

        ``resume=(layer, hidden)`` starts at block ``layer`` from ``hidden``, the (b, n + 1,
        dim) input that block gets in a dense pass; the skipped blocks are traced as dense.
        Budget calibration uses it to compute the dense layers once.
        """
        img = _validate.images(img, self.channels, self.image_size, self.cls_token.dtype)
        if resume is None:
            x = self.patch_embed(img)
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
            x = self.emb_drop(x)
        else:
            x = resume[1]
        state = TokenState(x, 1, resume, track=self.options.restorable)
        for i, block in enumerate(self.blocks):
            skipped = state.skip(i)
            x = block(x, state) if skipped is None else skipped
        return x, state

    def forward_features(self, img: Tensor) -> Tensor:
        """img: (b, c, H, W) -> tokens (b, m, dim) that the last block kept (padded per batch;
        see ``last_state``)."""
        x, self.last_state = self.forward_tokens(img)
        return x

    def forward_head(self, x: Tensor) -> Tensor:
        """x: (b, m, dim) -> logits (b, num_classes) from the CLS token."""
        return self.head(self.norm(x[:, 0]))

    def forward(self, img: Tensor, return_sampled_token_ids: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Logits (b, num_classes); with ``return_sampled_token_ids`` also (b, m) ids of the
        patches alive after the last layer (0-based, CLS excluded, -1 for padding)."""
        x, state = self.forward_tokens(img)
        self.last_state = state
        logits = self.forward_head(x)
        return (logits, state.token_ids()) if return_sampled_token_ids else logits


def _required_ats(block: nn.Module) -> AdaptiveTokenSampling:
    ats = getattr(getattr(block, "attn", None), "ats", None)
    if not isinstance(ats, AdaptiveTokenSampling):
        raise RuntimeError("every block of an ats_vit.ViT has a sampling module")
    return ats


# vit-pytorch's ats_vit.ViT parameter names -> ours
_VIT_PYTORCH_KEYS = (
    (r"^to_patch_embedding\.1\.", "patch_embed.norm_in."),
    (r"^to_patch_embedding\.2\.", "patch_embed.proj."),
    (r"^to_patch_embedding\.3\.", "patch_embed.norm_out."),
    (r"^pos_embedding$", "pos_embed"),
    (r"^transformer\.layers\.(\d+)\.0\.norm\.", r"blocks.\1.norm1."),
    (r"^transformer\.layers\.(\d+)\.0\.to_qkv\.", r"blocks.\1.attn.qkv."),
    (r"^transformer\.layers\.(\d+)\.0\.to_out\.0\.", r"blocks.\1.attn.proj."),
    (r"^transformer\.layers\.(\d+)\.1\.net\.0\.", r"blocks.\1.norm2."),
    (r"^transformer\.layers\.(\d+)\.1\.net\.1\.", r"blocks.\1.mlp.fc1."),
    (r"^transformer\.layers\.(\d+)\.1\.net\.4\.", r"blocks.\1.mlp.fc2."),
    (r"^mlp_head\.0\.", "norm."),
    (r"^mlp_head\.1\.", "head."),
)


def convert_vit_pytorch_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename the keys of a vit-pytorch ``ats_vit.ViT`` state dict to ours."""
    converted = {}
    for key, value in state_dict.items():
        new_key = key
        for pattern, replacement in _VIT_PYTORCH_KEYS:
            new_key, hits = re.subn(pattern, replacement, key)
            if hits:
                break
        converted[new_key] = value
    return converted


def load_vit_pytorch_state_dict(model: ViT, state_dict: Mapping[str, Tensor]) -> ViT:
    """Load a checkpoint of vit-pytorch's ``ats_vit.ViT`` into ``model`` (strictly) and return it.

    Raises ValueError naming missing, unexpected or mis-shaped parameters.
    """
    if not isinstance(model, ViT):
        raise TypeError(f"model must be an ats_vit.ViT, got {type(model).__name__}")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    converted = convert_vit_pytorch_state_dict(state_dict)
    problem = _validate.state_dict_mismatch(model.state_dict(), converted)
    if problem:
        raise ValueError(
            "state_dict does not fit this model (is it a vit-pytorch ats_vit.ViT of the same sizes?): "
            f"{problem}"
        )
    model.load_state_dict(converted)
    return model
