"""Analytic FLOPs of a ViT forward pass from the tokens each image actually kept.

Convention: one multiply-add counts as one FLOP (fvcore's, used by DeiT and the ATS paper;
DeiT-S dense = 4.6 GFLOPs). Counted: patch embedding, qkv, the CLS scoring row, attention
(QKᵀ and AV), the significance scores (heads * candidates), output projection, MLP and
head. Norms, softmax, GELU and the sort/search steps of sampling are ignored, as fvcore
ignores such element-wise work. Only real tokens are counted: token-wise layers run on packed
real tokens whenever at least 1/32 of the batch grid is padding (below that they run on the
grid, and up to 1/32 more rows are computed than counted), and attention is counted over
real queries and real keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ats_vit.sampling import Padding

__all__ = ["TokenTrace", "ViTCost", "gflops"]


@dataclass(frozen=True)
class ViTCost:
    """The sizes that set a ViT's FLOPs."""

    num_patches: int
    num_prefix_tokens: int
    dim: int
    heads: int
    attn_dim: int  # heads * head_dim
    mlp_hidden: int
    patch_dim: int  # channels * patch_h * patch_w
    num_classes: int
    depth: int


@dataclass
class TokenTrace:
    """How many tokens each block handled in one forward pass.

    counts[i]: (b,) non-prefix tokens block i outputs per image. sampled[i]: whether block i
    scored and sampled (its queries were split from its keys), whatever each image kept.
    positions[i]: for sampling blocks, (b, m) original token positions (prefix included)
    alive after the block, -1 at padding; for pictures of what was kept.
    """

    num_patches: int
    num_prefix_tokens: int
    counts: list[Tensor] = field(default_factory=list)
    sampled: list[bool] = field(default_factory=list)
    positions: dict[int, Tensor] = field(default_factory=dict)

    def record(
        self, x: Tensor, padding: Padding | None, sampled: bool, positions: Tensor | None = None
    ) -> None:
        """Record a block's output x: (b, m, c), its padding and (if it sampled) positions (b, m)."""
        if sampled and positions is not None:
            alive = positions if padding is None else positions.masked_fill(~padding.mask, -1)
            self.positions[len(self.counts)] = alive
        if padding is None:
            count = torch.full((x.shape[0],), x.shape[1] - self.num_prefix_tokens, device=x.device)
        else:
            count = padding.mask.sum(dim=1) - self.num_prefix_tokens
        self.counts.append(count)
        self.sampled.append(sampled)

    def kept_per_layer(self) -> Tensor:
        """(b, depth) non-prefix tokens each block outputs, per image."""
        return torch.stack(self.counts, dim=1)


def gflops(cost: ViTCost, trace: TokenTrace) -> Tensor:
    """(b,) GFLOPs per image of the forward pass that ``trace`` recorded."""
    if len(trace.counts) != cost.depth:
        raise ValueError(f"trace has {len(trace.counts)} blocks but the model has depth={cost.depth}")
    p, d, a, hidden = cost.num_prefix_tokens, cost.dim, cost.attn_dim, cost.mlp_hidden
    kept = trace.kept_per_layer().double() + p  # (b, depth) tokens out of each block
    b = kept.shape[0]
    # the trace knows the patch count of this input (timm models may take several image sizes)
    first = torch.full((b, 1), float(trace.num_patches + p), dtype=kept.dtype, device=kept.device)
    n_in = torch.cat((first, kept[:, :-1]), dim=1)
    sampled = torch.tensor(trace.sampled, dtype=torch.bool, device=kept.device)
    n_out = kept
    qkv = torch.where(
        sampled,
        # k, v of all; q of CLS and kept; the CLS row; significance Σ_h A·||V||
        n_in * d * 2 * a + (n_out + 1) * d * a + n_in * a + (n_in - p) * cost.heads,
        n_in * d * 3 * a,
    )
    attention = 2 * n_out * n_in * a
    rest = n_out * a * d + 2 * n_out * d * hidden  # projection and MLP
    blocks = (qkv + attention + rest).sum(dim=1)
    stem = trace.num_patches * cost.patch_dim * d + d * cost.num_classes
    return ((blocks + stem) / 1e9).float()
