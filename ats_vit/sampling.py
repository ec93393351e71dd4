"""The ATS op (Fayyaz et al., ECCV 2022, Sec. 3) as pure tensor functions.

Nothing here knows about models: a layer hands over the attention of its CLS query and its
value vectors, and gets back which tokens survive. Every function is batched and free of
per-sample Python loops; the only host sync is the one that sizes a dynamically padded output
(see :func:`compact`), and ``static_shape=True`` removes it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from einops import einsum
from torch import Tensor, nn

from ats_vit import _validate

__all__ = [
    "SAMPLERS",
    "AdaptiveTokenSampling",
    "Padding",
    "TokenSelection",
    "compact",
    "gather_tokens",
    "gumbel_sample",
    "inverse_transform_sample",
    "keep_mask",
    "random_select",
    "significance_scores",
    "tokenwise",
    "topk_select",
]

# Token-wise layers skip padding (pack the real rows, compute, scatter back) only when at least
# this fraction of the grid is padding: the gather/scatter copies cost ~1.5% of a DeiT-S block
# on CPU, so packing a grid that is nearly full loses more than the padded GEMM rows it saves
# (benchmarks/profile_sampling.py).
PACK_MIN_PADDING = 1 / 32

Sampler = Literal["inverse_transform", "gumbel", "topk", "random"]
# "topk" and "random" keep a fixed count per image; they are the simple peers ATS is compared to
SAMPLERS: tuple[str, ...] = ("inverse_transform", "gumbel", "topk", "random")


class Padding(NamedTuple):
    """Where a padded (b, m) token grid holds real tokens.

    mask: (b, m) bool, True for real tokens.
    rows: (T,) int64 flat positions ``i * m + j`` of the T real tokens, ascending; lets
        token-wise layers (linear, MLP) skip the padding. ``None`` when unknown without a
        host sync (static shapes) or when too little of the grid is padding to be worth
        packing (:data:`PACK_MIN_PADDING`); token-wise layers then run on the whole grid.
    """

    mask: Tensor
    rows: Tensor | None


class TokenSelection(NamedTuple):
    """Which tokens a sampling layer keeps.

    index: (b, m) int64 positions in the layer's input token axis, prefix tokens first, then
        kept tokens in ascending original order. Padded slots hold a valid position (so a
        gather never goes out of range) and are marked in ``padding``.
    padding: the padding of the (b, m) output grid; ``None`` when no slot is padding.
    """

    index: Tensor
    padding: Padding | None


def significance_scores(cls_attn: Tensor, v: Tensor, valid: Tensor | None = None) -> Tensor:
    """Per-token significance ``S_j ∝ Σ_h A[cls, j] · ||V_j||`` normalised to sum to 1.

    cls_attn: (b, h, n) attention of the CLS query to the n candidate (non-prefix) keys.
    v: (b, h, n, d) the candidates' value vectors. valid: (b, n) bool, False for padding.
    Returns (b, n) float32. Padding scores exactly 0; non-finite scores count as 0, and an
    image whose scores are all 0 falls back to uniform over its valid tokens, so sampling
    stays well defined (a non-finite input still yields non-finite logits downstream).
    """
    scores = einsum(cls_attn.float(), v.float().norm(dim=-1), "b h n, b h n -> b n")
    scores = torch.where(torch.isfinite(scores), scores.clamp_min(0.0), 0.0)
    if valid is None:
        valid = torch.ones_like(scores, dtype=torch.bool)
    scores = scores.masked_fill(~valid, 0.0)
    total = scores.sum(dim=-1, keepdim=True)
    uniform = valid.float() / valid.sum(dim=-1, keepdim=True).clamp_min(1)
    return torch.where(total > 0, scores / total.clamp_min(torch.finfo(scores.dtype).tiny), uniform)


def inverse_transform_sample(
    scores: Tensor, k: int, *, jitter: bool = False, generator: torch.Generator | None = None
) -> Tensor:
    """Pick k tokens by inverse-transform sampling of the CDF of ``scores``.

    scores: (b, n) non-negative, rows summing to 1. Returns (b, k) int64 in [0, n), possibly
    repeated. Without jitter the points are ``(i + 0.5) / k``: deterministic, as the paper uses
    at inference. With jitter each point is drawn uniformly inside its stratum ``(i/k, (i+1)/k]``.
    A picked token always has a positive score: the first index whose CDF reaches a point
    ``p > 0`` is where the CDF steps up.
    """
    b, n = scores.shape
    cdf = scores.cumsum(dim=-1)
    # dividing by the last entry makes it exactly 1.0, so every point <= 1 finds a token
    cdf = cdf / cdf[:, -1:].clamp_min(torch.finfo(cdf.dtype).tiny)
    steps = torch.arange(k, device=scores.device, dtype=cdf.dtype)
    if jitter:
        # 1 - U with U in [0, 1) lies in (0, 1], so no point is 0 (which could pick a zero-mass token)
        offset = 1.0 - torch.rand((b, k), device=scores.device, dtype=cdf.dtype, generator=generator)
    else:
        offset = torch.full((b, k), 0.5, device=scores.device, dtype=cdf.dtype)
    points = (steps + offset) / k
    return torch.searchsorted(cdf, points.contiguous()).clamp_max_(n - 1)


def gumbel_sample(
    scores: Tensor,
    k: int,
    valid: Tensor | None = None,
    *,
    eps: float = 1e-6,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick k tokens by k independent Gumbel-max draws from ``log(scores)`` (the seed's sampler).

    scores: (b, n); valid: (b, n) bool. Returns (b, k) int64. Random at eval too, as in the seed.
    """
    logits = torch.log(scores + eps)
    if valid is not None:
        logits = logits.masked_fill(~valid, float("-inf"))
    u = torch.rand((scores.shape[0], k, scores.shape[1]), device=scores.device, generator=generator)
    tiny = torch.finfo(u.dtype).tiny
    gumbel = -torch.log((-torch.log(u.clamp_min(tiny))).clamp_min(tiny))
    return (logits.unsqueeze(1) + gumbel).argmax(dim=-1)


def topk_select(cls_attn: Tensor, k: int, valid: Tensor | None = None) -> Tensor:
    """The k candidates the CLS token attends to most, averaged over heads (EViT's rule,
    without fusing the dropped tokens into one).

    cls_attn: (b, h, n) over the candidates; valid: (b, n) bool. Returns (b, k) distinct int64
    ids in [0, n); needs k <= n. Padding ranks last, so it is picked only when an image has
    fewer than k valid candidates (callers keep all valid tokens of such images).
    """
    rank = cls_attn.float().mean(dim=1)
    if valid is not None:
        rank = rank.masked_fill(~valid, float("-inf"))
    return rank.topk(k, dim=-1, sorted=False).indices


def random_select(valid: Tensor, k: int, *, generator: torch.Generator | None = None) -> Tensor:
    """k distinct candidates uniformly at random among the valid ones (a score-free baseline).

    valid: (b, n) bool. Returns (b, k) int64 in [0, n); needs k <= n. Random at eval too.
    """
    u = torch.rand(valid.shape, device=valid.device, generator=generator)
    return u.masked_fill(~valid, -1.0).topk(k, dim=-1, sorted=False).indices


def keep_mask(picks: Tensor, num_tokens: int) -> Tensor:
    """De-duplicate picks: (b, k) int64 -> (b, num_tokens) bool, True where picked at least once."""
    keep = torch.zeros((picks.shape[0], num_tokens), dtype=torch.bool, device=picks.device)
    return keep.scatter_(1, picks, True)


def compact(keep: Tensor, size: int | None = None, num_prefix: int = 0) -> TokenSelection:
    """Positions of the True entries of ``keep``, ascending, after ``num_prefix`` prefix positions.

    keep: (b, n) over the candidates, which sit after the prefix in the token axis. The output
    grid is (b, num_prefix + size). ``size=None`` pads to the largest count in the batch and
    costs one host sync (the only one in the op), which also yields the rows of real tokens
    for packed token-wise compute when at least :data:`PACK_MIN_PADDING` of the grid is
    padding; a fixed ``size`` (at least the largest count) needs no sync.
    """
    b = keep.shape[0]
    counts = keep.sum(dim=-1)  # (b,)
    total = None
    if size is None:
        # one sync answers "how wide", "is any row padded" and "how many real tokens"
        smallest, size, total = torch.stack((counts.min(), counts.max(), counts.sum())).tolist()
    # a stable argsort on "dropped" puts kept tokens first, in their original order
    order = torch.argsort((~keep).to(torch.uint8), dim=-1, stable=True)[:, :size]
    prefix = torch.arange(num_prefix, device=keep.device).expand(b, num_prefix)
    index = torch.cat((prefix, order + num_prefix), dim=1)
    if total is not None and smallest == size:
        return TokenSelection(index, None)
    mask = torch.arange(num_prefix + size, device=keep.device) < (counts + num_prefix)[:, None]
    rows = None
    if total is not None and (b * size - total) >= PACK_MIN_PADDING * b * (num_prefix + size):
        flat_dropped = (~mask).flatten().to(torch.uint8)
        rows = torch.argsort(flat_dropped, stable=True)[: total + b * num_prefix]
    return TokenSelection(index, Padding(mask, rows))


def tokenwise(fn: Callable[..., Tensor], x: Tensor, padding: Padding | None, *others: Tensor) -> Tensor:
    """Apply a per-token function to x: (b, m, c) -> (b, m, c'), computing only real tokens.

    ``others`` are further (b, m, ...) tensors on the same grid, passed to ``fn`` after x.
    Padded slots of the result are 0. Without known rows, ``fn`` runs on the whole grid and
    padded slots hold whatever it computes there (finite for finite inputs; always masked).
    """
    if padding is None or padding.rows is None:
        return fn(x, *others)
    packed = (t.flatten(0, 1).index_select(0, padding.rows) for t in (x, *others))
    out = fn(*packed)  # (T, c')
    full = out.new_zeros(x.shape[0] * x.shape[1], out.shape[-1]).index_copy_(0, padding.rows, out)
    return full.view(*x.shape[:2], -1)


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """x: (b, n, ...) , index: (b, m) -> (b, m, ...) rows of x at index."""
    idx = index.reshape(*index.shape, *((1,) * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, idx)


class AdaptiveTokenSampling(nn.Module):
    """Keeps at most ``max_tokens`` non-prefix tokens per image, chosen by significance.

    ``sampler``: ``"inverse_transform"`` (the paper's; deterministic at eval) or ``"gumbel"``
    (the seed's) keep an adaptive count, since repeated picks are kept once. The peers that
    ATS is benchmarked against keep exactly ``max_tokens``: ``"topk"`` (highest head-averaged
    CLS attention, EViT-style without fusion) and ``"random"`` (uniform, random at eval too).
    Prefix tokens (CLS, distillation, registers: the first ``num_prefix_tokens``) are always
    kept. An image with at most ``max_tokens`` valid candidates keeps all of them, so an image
    is treated the same alone as in any batch.
    """

    def __init__(
        self,
        max_tokens: int,
        sampler: Sampler = "inverse_transform",
        *,
        num_prefix_tokens: int = 1,
        static_shape: bool = False,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        # num_prefix_tokens >= 1: tokens are scored by the CLS query, which must exist
        self.max_tokens = _validate.positive_int("max_tokens", max_tokens)
        self.sampler = _validate.choice("sampler", sampler, SAMPLERS)
        self.num_prefix_tokens = _validate.positive_int("num_prefix_tokens", num_prefix_tokens)
        self.static_shape = static_shape
        self.eps = eps

    def extra_repr(self) -> str:
        return (
            f"max_tokens={self.max_tokens}, sampler={self.sampler!r}, "
            f"num_prefix_tokens={self.num_prefix_tokens}, static_shape={self.static_shape}"
        )

    def needed(self, num_tokens: int) -> bool:
        """Whether a layer with ``num_tokens`` tokens (prefix included) samples at all."""
        return num_tokens - self.num_prefix_tokens > self.max_tokens

    def forward(self, cls_attn: Tensor, v: Tensor, padding: Padding | None = None) -> TokenSelection:
        """cls_attn: (b, h, n) CLS attention over all n tokens; v: (b, h, n, d); padding of the
        n input tokens, or None."""
        p, k = self.num_prefix_tokens, self.max_tokens
        b, _, n = cls_attn.shape
        if not self.needed(n):
            return TokenSelection(torch.arange(n, device=cls_attn.device).expand(b, n), padding)
        key_mask = None if padding is None else padding.mask
        valid = None if key_mask is None else key_mask[:, p:]
        if self.sampler == "topk":
            picks = topk_select(cls_attn[..., p:], k, valid)
        elif self.sampler == "random":
            candidates = torch.ones(b, n - p, dtype=torch.bool, device=cls_attn.device)
            picks = random_select(candidates if valid is None else valid, k)
        else:
            scores = significance_scores(cls_attn[..., p:], v[..., p:, :], valid)  # (b, n - p)
            if self.sampler == "inverse_transform":
                picks = inverse_transform_sample(scores, k, jitter=self.training)
            else:
                picks = gumbel_sample(scores, k, valid, eps=self.eps)
        keep = keep_mask(picks, n - p)
        if valid is not None:
            # images with few enough valid candidates keep them all, as they would alone
            keep = torch.where(valid.sum(-1, keepdim=True) <= k, valid, keep)
        return compact(keep, k if self.static_shape else None, num_prefix=p)
