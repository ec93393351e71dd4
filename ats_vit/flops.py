"""Analytic FLOPs of a ViT forward pass from the tokens each image actually kept.

Convention: one multiply-add counts as one FLOP (fvcore's, used by DeiT and the ATS paper;
DeiT-S dense = 4.6 GFLOPs). Counted: patch embedding, qkv, the CLS scoring row (or, scoring by
received attention, every query's logits), attention (QKᵀ and AV), the significance scores
(heads * candidates), output projection, MLP and head, and in layers that fuse or merge, the
weighted merging itself (and ToMe's token similarities), and the cosine transform's token mix.
Norms, softmax, GELU and the sort/search steps of sampling are ignored, as fvcore ignores such
element-wise work. Only real tokens are counted:
token-wise layers run on packed real tokens whenever at least 1/32 of the batch grid is padding
(below that they run on the grid, and up to 1/32 more rows are computed than counted), and
attention is counted over real queries and real keys.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ats_vit.options import Rule
from ats_vit.sampling import Padding, _shape_cached

__all__ = ["TokenTrace", "ViTCost", "flops", "gflops"]


@dataclass(frozen=True)
class ViTCost:
    """The sizes that set a ViT's FLOPs."""

    num_patches: int
    num_prefix_tokens: int
    dim: int
    heads: int
    attn_dim: int  # heads * head_dim
    mlp_hidden: float  # a two-matrix MLP's width with the same multiply-adds (see mlp_width)
    patch_dim: int  # channels * patch_h * patch_w
    num_classes: int
    depth: int
    # > 1: each token is a tube of this many frames at one patch position, and a block attends
    # in time within each tube, then in space within each frame (TimeSformer's divided
    # space-time attention, which also projects the time branch: one more dim x dim matrix)
    frames: int = 1


def mlp_width(mlp: nn.Module, dim: int) -> float:
    """The hidden width of a two-matrix MLP with the multiply-adds of ``mlp`` (per token):
    its linear layers' weights over 2 x dim. A plain MLP gives its hidden width; a gated one
    (SwiGLU: three matrices of width h) gives 1.5 h."""
    weights = sum(m.weight.numel() for m in mlp.modules() if isinstance(m, nn.Linear))
    if weights == 0:
        raise TypeError(f"{type(mlp).__name__} has no linear layers to count")
    return weights / (2 * dim)


@_shape_cached
def _same_count(b: int, count: int, device: torch.device) -> Tensor:
    """(b,) tokens of an unpadded grid (all images alike), made once per shape."""
    return torch.full((b,), count, device=device)


@dataclass
class TokenTrace:
    """How many tokens each block handled in one forward pass.

    counts[i]: (b,) non-prefix tokens block i outputs per image. rules[i]: ``None`` for a
    block that kept every token, else what it ran (a :class:`~ats_vit.options.Rule`; what
    its FLOPs and its time depend on), whatever each image kept. received[i]: whether it
    scored tokens by the attention they receive (every query's logits) rather than the CLS row.
    positions[i]: for sampling blocks, (b, m) original token positions (prefix included)
    alive after the block, -1 at padding; for pictures of what was kept.
    """

    num_patches: int
    num_prefix_tokens: int
    counts: list[Tensor] = field(default_factory=list)
    rules: list[Rule | None] = field(default_factory=list)
    received: list[bool] = field(default_factory=list)
    positions: dict[int, Tensor] = field(default_factory=dict)

    def record(
        self,
        x: Tensor,
        padding: Padding | None,
        rule: Rule | None = None,
        positions: Tensor | None = None,
        received: bool = False,
    ) -> None:
        """Record a block's output x: (b, m, c), its padding, what it ran (None: it kept every
        token), whether it scored by received attention and, if it selected, positions (b, m)."""
        if rule is not None and not isinstance(rule, Rule):
            raise TypeError(f"rule must be None or an ats_vit.options.Rule, got {rule!r}")
        if rule is not None and positions is not None:
            alive = positions if padding is None else positions.masked_fill(~padding.mask, -1)
            self.positions[len(self.counts)] = alive
        if padding is None:
            count = _same_count(x.shape[0], x.shape[1] - self.num_prefix_tokens, x.device)
        else:
            count = padding.mask.sum(dim=1) - self.num_prefix_tokens
        self.counts.append(count)
        self.rules.append(rule)
        self.received.append(rule is not None and received)

    def kept_per_layer(self) -> Tensor:
        """(b, depth) non-prefix tokens each block outputs, per image."""
        return torch.stack(self.counts, dim=1)


def gflops(cost: ViTCost, trace: TokenTrace) -> Tensor:
    """(b,) GFLOPs per image (float32) of the forward pass that ``trace`` recorded."""
    return (flops(cost, trace) / 1e9).float()


def _in_out(cost: ViTCost, trace: TokenTrace) -> tuple[Tensor, Tensor]:
    """(b, depth) tokens into and out of each block, prefix included, as float64."""
    kept = trace.kept_per_layer().double() + cost.num_prefix_tokens
    # the trace knows the patch count of this input (timm models may take several image sizes)
    first = torch.full(
        (kept.shape[0], 1),
        float(trace.num_patches + cost.num_prefix_tokens),
        dtype=kept.dtype,
        device=kept.device,
    )
    return torch.cat((first, kept[:, :-1]), dim=1), kept


def _layers(trace: TokenTrace, device: torch.device, keep: Callable[[Rule, bool], bool]) -> Tensor:
    """(depth,) whether each block selected, with a rule and scoring that ``keep`` accepts."""
    flags = [r is not None and keep(r, rec) for r, rec in zip(trace.rules, trace.received, strict=True)]
    return torch.tensor(flags, dtype=torch.bool, device=device)


def _divided_flops(cost: ViTCost, trace: TokenTrace) -> Tensor:
    """Multiply-adds of a TimeSformer-style model whose tokens are tubes of ``cost.frames``
    frames (see ats_vit.families.hf_timesformer). Per block, with n tubes in (prefix
    included; the class token is one token, copied into each frame for the spatial step):
    time attention within each patch tube (qkv, T x T logits and outputs, projection and the
    time branch's dense layer), space attention within each frame over the n tubes' tokens (keys
    and values of all; queries of the kept tubes when a rule discards, of all when it fuses or
    merges, since those rules select after attention), the class row per frame, the tube
    scores, merging, and the MLP of the class token and of every frame of each kept tube."""
    t, p, d, a, hidden = cost.frames, cost.num_prefix_tokens, cost.dim, cost.attn_dim, cost.mlp_hidden
    head_dim = a / cost.heads
    n_in, n_out = _in_out(cost, trace)
    device = n_in.device
    discards = _layers(trace, device, lambda r, _: not r.merges)
    scored = _layers(trace, device, lambda r, rec: not r.late and not rec)
    merges = _layers(trace, device, lambda r, _: r.merges)

    tubes = n_in - p
    time = tubes * t * (3 * d * a + 2 * t * a + a * d + d * d)
    queries = torch.where(discards, n_out, n_in)
    space = t * ((2 * n_in + queries) * d * a + 2 * queries * n_in * a + queries * a * d)
    # the class token's query is the same in every frame (once), its logits are per frame; the
    # score of a tube, Σ_h A·||V|| of its frame means, once (the frame means are element-wise)
    significance = _layers(trace, device, lambda r, rec: not r.late and r is not Rule.FIXED and not rec)
    scoring = torch.where(scored, d * a + t * n_in * a, 0.0) + torch.where(
        significance, tubes * cost.heads, 0.0
    )
    merging = torch.where(merges, n_in * t * d, 0.0)
    similarity = _similarity(trace, n_in, n_out, p, head_dim)
    mlp = (p + (n_out - p) * t) * 2 * d * hidden
    blocks = (time + space + scoring + merging + similarity + mlp).sum(dim=1)
    return blocks + trace.num_patches * t * cost.patch_dim * d + d * cost.num_classes


def _similarity(trace: TokenTrace, n_in: Tensor, n_out: Tensor, p: int, head_dim: float) -> Tensor:
    """(b, depth) the key comparisons of the merging rules: ToMe's bipartite split over every
    token, prefix included (|A| x |B| dot products); PiToMe's energy over every pair of its
    candidates (its matches read that matrix, no new products)."""
    tome = _layers(trace, n_in.device, lambda r, _: r is Rule.TOME)
    pitome = _layers(trace, n_in.device, lambda r, _: r is Rule.PITOME)
    halves = torch.where(tome, torch.ceil(n_in / 2) * torch.floor(n_in / 2) * head_dim, 0.0)
    energy = torch.where(pitome, (n_in - p) ** 2 * head_dim, 0.0)
    return halves + energy


def flops(cost: ViTCost, trace: TokenTrace) -> Tensor:
    """(b,) multiply-adds per image as float64 integers (exact: sums over many images do not
    depend on their order, so a split evaluation adds up to the same number)."""
    if len(trace.counts) != cost.depth:
        raise ValueError(f"trace has {len(trace.counts)} blocks but the model has depth={cost.depth}")
    if cost.frames > 1:
        return _divided_flops(cost, trace)
    p, d, a, hidden = cost.num_prefix_tokens, cost.dim, cost.attn_dim, cost.mlp_hidden
    head_dim = a / cost.heads
    n_in, n_out = _in_out(cost, trace)
    device = n_in.device
    early = _layers(trace, device, lambda r, _: not r.attends_all)  # only the kept tokens get outputs
    received = _layers(trace, device, lambda r, rec: not r.attends_all and rec)
    cls_row = _layers(trace, device, lambda r, rec: not r.attends_all and not rec)
    fuse = _layers(trace, device, lambda r, rec: r is Rule.FUSE and not rec)
    fuse_received = _layers(trace, device, lambda r, rec: r is Rule.FUSE and rec)
    late = _layers(trace, device, lambda r, _: r.late)
    queries = torch.where(early, n_out, n_in)
    candidates = n_in - p
    # k, v of all tokens; q of those that get outputs (of all, when all of them score)
    qkv = n_in * d * 2 * a + torch.where(received, n_in, queries) * d * a
    # the CLS query and its attention row (or every query's logits), and Σ_h A·||V|| (not
    # computed by top-k or random picks, which keep a fixed count)
    scoring = torch.where(cls_row, d * a + n_in * a, 0.0)
    scoring = scoring + torch.where(received, n_in * n_in * a, 0.0)
    significance = _layers(trace, device, lambda r, _: not r.attends_all and r is not Rule.FIXED)
    scoring = scoring + torch.where(significance, candidates * cost.heads, 0.0)
    # fusing averages the residual stream and the normalised input (received: the queries,
    # already projected) into the kept slots; ToMe and PiToMe average the residual stream
    merging = torch.where(fuse, 2 * n_in * d, 0.0)
    merging = merging + torch.where(fuse_received, n_in * (d + a), 0.0)
    merging = merging + torch.where(late, n_in * d, 0.0)
    similarity = _similarity(trace, n_in, n_out, p, head_dim)
    # the cosine transform: every token through the MLP, then one (m x t) mix of the patches
    whole = _layers(trace, device, lambda r, _: r.whole_block)
    merging = merging + torch.where(whole, (n_out - p) * (n_in - p) * d, 0.0)
    attention = 2 * queries * n_in * a
    rest = queries * a * d + 2 * torch.where(whole, n_in, n_out) * d * hidden  # output projection, MLP
    blocks = (qkv + scoring + merging + similarity + attention + rest).sum(dim=1)
    stem = trace.num_patches * cost.patch_dim * d + d * cost.num_classes
    return blocks + stem
