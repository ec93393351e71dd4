"""The ATS op (Fayyaz et al., ECCV 2022, Sec. 3) as pure tensor functions.

Nothing here knows about models: a layer hands over the attention of its CLS query and its
value vectors, and gets back which tokens survive. Every function is batched and free of
per-sample Python loops; the only host sync is the one that sizes a dynamically padded output
(see :func:`compact`), and ``static_shape=True`` removes it.

Beyond the paper's op, two things a budget can turn (both exact no-ops at their defaults):
``temperature`` reshapes the significance scores before sampling (the cost knob: the
inverse transform keeps more distinct tokens as the scores flatten), and ``dropped`` says what
happens to the tokens a layer does not keep: ``"discard"`` (the paper) or ``"fuse"`` them into
one token (EViT-style). The ``"tome"`` sampler is ToMe's bipartite matching in the same
framework, for comparisons, and ``"pitome"`` PiToMe's energy-protected merging. Fusing and
merging make tokens stand for several patches; their ``size`` then biases attention
(proportional attention; not PiToMe's), see :mod:`ats_vit.attention`.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ats_vit import _validate
from ats_vit.options import MERGING_SAMPLERS, Rule, SamplingOptions

__all__ = [
    "AdaptiveTokenSampling",
    "Buckets",
    "Merge",
    "Padding",
    "TokenSelection",
    "bucket_images",
    "compact",
    "dct_count",
    "dct_reduce",
    "gather_tokens",
    "gumbel_sample",
    "inverse_transform_sample",
    "keep_mask",
    "merge_plan",
    "pitome_plan",
    "random_select",
    "select_tokens",
    "sharpen",
    "significance_scores",
    "tokenwise",
    "topk_select",
]

# Token-wise layers skip padding (pack the real rows, compute, scatter back) only when at least
# this fraction of the grid is padding: the gather/scatter copies cost ~1.5% of a DeiT-S block
# on CPU, so packing a grid that is nearly full loses more than the padded GEMM rows it saves
# (0.2's benchmarks/profile_sampling.py, in git).
PACK_MIN_PADDING = 1 / 32
# Attention on a padded grid runs in buckets of images of similar count, each at its own width
# (:class:`Buckets`): at most MAX_BUCKETS buckets of at least MIN_BUCKET images, only with at
# least MIN_BUCKETS of them (a batch of 32 or more), and only where the buckets' query-key pairs
# are at most BUCKET_MAX_SHARE of the whole grid's. Chosen on glyphs196-s100 (a selection
# seed; 2 CPU threads): ats-fuse at 60% of the GFLOPs ran 1.32x -> 1.45x dense at batch 64 and
# 1.30x -> 1.46x at 128; at batch 16 two buckets lost 2-4% (each bucket's gathers cost more
# than it saves), hence MIN_BUCKETS. Measured on CPU only: other devices attend over the whole
# grid. Nor below MIN_BUCKET_WIDTH tokens: the demo model's budgets (at most 13 tokens after
# sampling, attention a few matmuls) ran 5-7% slower in buckets, where glyphs196's widths of
# 60-200 gained. The reported measurement: benchmarks/bucketed_attention.py.
MAX_BUCKETS = 8
MIN_BUCKET = 8
MIN_BUCKETS = 4
MIN_BUCKET_WIDTH = 64
BUCKET_MAX_SHARE = 0.8
BUCKET_DEVICES = ("cpu",)
# PiToMe's margin in layer i of L is PITOME_MARGIN * (1 - i / L), and its first ceil(L / 2)
# layers match by bipartite halves of the energy order (its authors' patch/timm.py, deit.py)
PITOME_MARGIN = 0.75
# the seed's epsilon inside log(scores) for Gumbel draws
GUMBEL_EPS = 1e-6
# the authors' ATS never keeps fewer than this many tokens (their n_tokens clamp)
OFFICIAL_MIN_TOKENS = 8
# where a layer's attention scores come from: the CLS query's row (the paper: models that
# classify from the CLS token), or the attention each token receives from all queries (models
# that pool every token, by average or by an attention-pool probe: no token reads out alone)
SCORING = ("cls", "received")


class Buckets(NamedTuple):
    """Images of a padded grid in groups of similar count, so that attention runs each group at
    its own width instead of every image at the widest (its cost is quadratic in the width).

    order: (b,) int64 the images by descending count (a stable sort: ties keep batch order).
    groups: ``(start, stop, width)`` per bucket: ``order[start:stop]`` are its images, ``width``
        its widest real count (prefix tokens included), known on the host.
    ranked: ``order`` on the host.
    counts: each image's real tokens (prefix included) in batch order, on the host: what a
        later layer needs to size its keys per bucket when it samples again.
    """

    order: Tensor
    groups: tuple[tuple[int, int, int], ...]
    ranked: tuple[int, ...]
    counts: tuple[int, ...]


class Padding(NamedTuple):
    """Where a padded (b, m) token grid holds real tokens.

    mask: (b, m) bool, True for real tokens.
    rows: (T,) int64 flat positions ``i * m + j`` of the T real tokens, ascending; lets
        token-wise layers (linear, MLP) skip the padding. ``None`` when unknown without a
        host sync (static shapes) or when too little of the grid is padding to be worth
        packing (:data:`PACK_MIN_PADDING`); token-wise layers then run on the whole grid.
    buckets: how attention splits the batch by count (:func:`bucket_images`); ``None``:
        attention runs over the whole grid.
    """

    mask: Tensor
    rows: Tensor | None
    buckets: Buckets | None = None


class Merge(NamedTuple):
    """How the n input tokens of a layer combine into its m output slots.

    dest: (b, n) int64 slot in [0, m] each input token joins; ``m`` means none (discarded
        tokens, padding). weight: (b, n) float, the token's share of its slot (the weights of
        a slot sum to 1), so each slot is the weighted mean of the tokens sent to it.
    fused: (b, 1) int64 the one slot that holds several tokens (``dropped="fuse"``: the fused
        token), -1 where an image fused nothing; every other slot then holds the one token
        the selection's index names, so :func:`select_tokens` gathers rows and adds a single
        weighted sum per image instead of scattering every row. ``None`` for general merges.
    whole: every input token joins a slot (no ``dest == m``: no padding, nothing discarded),
        so :func:`select_tokens` needs no spare row for the tokens that join none (ToMe's
        plan without padding).
    """

    dest: Tensor
    weight: Tensor
    fused: Tensor | None = None
    whole: bool = False


class TokenSelection(NamedTuple):
    """Which tokens a sampling layer keeps.

    index: (b, m) int64 positions in the layer's input token axis, prefix tokens first, then
        kept tokens in ascending original order. Padded slots hold a valid position (so a
        gather never goes out of range) and are marked in ``padding``.
    padding: the padding of the (b, m) output grid; ``None`` when no slot is padding.
    merge: ``None`` when the kept tokens are simply gathered (dropped ones are discarded);
        otherwise how dropped tokens are averaged into kept slots (see :func:`select_tokens`).
    size: (b, m) float, how many patches each output token stands for; ``None`` while every
        token is one patch (nothing was ever merged).
    rule: what the layer ran (a :class:`~ats_vit.options.Rule`, for the trace that costs
        and times a pass); ``None`` when it kept every token.
    received: the layer scored tokens by the attention they receive (every query's logits,
        for models without a CLS readout) rather than by the CLS row (what its FLOPs count).
    late: the selection applies after attention, to the residual stream plus the attention
        output of every token (ToMe); otherwise only the kept tokens get queries.
    """

    index: Tensor  # type: ignore[assignment]  # a field, not tuple.index
    padding: Padding | None
    merge: Merge | None = None
    size: Tensor | None = None
    rule: Rule | None = None
    received: bool = False
    late: bool = False


def significance_scores(cls_attn: Tensor, v: Tensor, valid: Tensor | None = None) -> Tensor:
    """Per-token significance ``S_j ∝ Σ_h A[cls, j] · ||V_j||`` normalised to sum to 1.

    cls_attn: (b, h, n) attention of the CLS query to the n candidate (non-prefix) keys.
    v: (b, h, n, d) the candidates' value vectors. valid: (b, n) bool, False for padding.
    Returns (b, n) float32. Padding scores exactly 0; non-finite scores count as 0, and an
    image whose scores are all 0 falls back to uniform over its valid tokens, so sampling
    stays well defined (a non-finite input still yields non-finite logits downstream).
    """
    # Σ_h as a product and a sum: an einsum would permute into a batched matmul of 1x1 blocks
    # (about twice the time, and four times in training with its backward)
    scores = (_float(cls_attn) * _float(v).norm(dim=-1)).sum(dim=1)
    scores = scores.nan_to_num(0.0, 0.0, 0.0).clamp_min_(0.0)
    uniform: Tensor | float
    if valid is None:
        uniform = 1.0 / scores.shape[-1]
    else:
        scores = scores.masked_fill(~valid, 0.0)
        uniform = valid.float() / valid.sum(dim=-1, keepdim=True).clamp_min(1)
    total = scores.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, scores / total.clamp_min(torch.finfo(scores.dtype).tiny), uniform)


def sharpen(scores: Tensor, temperature: float) -> Tensor:
    """``S^(1/temperature)`` renormalised: the cost knob of a budget.

    scores: (b, n) non-negative, rows with positive mass (as from :func:`significance_scores`).
    A temperature above 1 flattens the scores, so the k evenly spaced points of the inverse
    transform land on more distinct tokens (more kept, more cost); below 1 it concentrates
    them on the most significant tokens. Zeros (padding) stay zero. ``temperature == 1``
    returns ``scores`` itself: the paper's ATS.
    """
    if temperature == 1.0:
        return scores
    logs = scores.log() / temperature  # log-space, so large exponents neither overflow nor underflow
    weights = (logs - logs.amax(dim=-1, keepdim=True)).exp()
    return weights / weights.sum(dim=-1, keepdim=True)


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
    # the first index whose CDF reaches a point (the CDF is non-decreasing)
    if torch.compiler.is_exporting():  # as the number of CDF entries below it: ops ONNX has
        return (cdf.unsqueeze(1) < points.unsqueeze(2)).sum(dim=-1).clamp_max_(n - 1)
    return torch.searchsorted(cdf, points).clamp_max_(n - 1)


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


def head_sum(k: Tensor) -> Tensor:
    """k: (b, h, n, d) -> (b, n, d) summed over heads: ToMe's head-averaged keys up to a factor,
    which cosine similarity (all its comparisons) ignores. Summed by halves (one add per halving)
    rather than by a reduction over the strided head axis, which costs twice as much on CPU."""
    while k.shape[1] > 1 and k.shape[1] % 2 == 0:
        first, second = k.chunk(2, dim=1)
        k = first + second
    return k.squeeze(1) if k.shape[1] == 1 else k.sum(dim=1)


def _unit(metric: Tensor) -> Tensor:
    return metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def official_scores(cls_attn: Tensor, v: Tensor, valid: Tensor | None = None) -> Tensor:
    """The authors' released significance: the CLS attention summed over heads times the norm
    of each token's value over all heads concatenated, normalised to sum to 1.

    cls_attn: (b, h, n), v: (b, h, n, d) over the n candidates; valid: (b, n) bool.
    Returns (b, n) float32 (padding 0). Differs from :func:`significance_scores` (the paper's
    formula as vit-pytorch reads it: the sum over heads of per-head products)."""
    norm = _float(v).transpose(1, 2).flatten(2).norm(dim=-1)  # (b, n): ||V_j|| over h * d
    # (Σ_h A[cls, j]) · ||V_j||, contracted over heads as significance_scores is (same count)
    scores = (_float(cls_attn) * norm[:, None]).sum(dim=1)
    if valid is not None:
        scores = scores.masked_fill(~valid, 0.0)
    return scores / scores.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)


def official_select(scores: Tensor, points: int, valid: Tensor | None = None) -> Tensor:
    """The authors' inverse-transform sampling (adaptivetokensampling/ATS, ``ats_block.py``).

    scores: (b, n) non-negative candidates' significance summing to 1; ``points + 1`` is their
    reference token count (``n_ref``: the model's full token count). The scores are sorted
    ascending, their CDF min-max normalised, and ``points`` evenly spaced values from the first
    non-zero CDF value to 1 each pick the nearest CDF entry. Returns keep: (b, n) bool, True for
    the candidates picked at least once (an adaptive count). valid: (b, n) bool, False for
    padding; padding is left out of the min-max normalisation, so an image keeps the same
    tokens alone as in a padded batch (the authors' code lets padding shift it).
    """
    b, n = scores.shape
    scores = scores if valid is None else scores.masked_fill(~valid, 0.0)
    sorted_scores, sorted_index = torch.sort(scores, dim=1)
    cdf = sorted_scores.cumsum(dim=1)
    if valid is None:
        low = cdf.amin(dim=1, keepdim=True)
    else:  # the first real entry: padding (score 0) sorts first
        low = cdf.gather(1, (~valid).sum(dim=1, keepdim=True).clamp_max(n - 1))
    high = cdf.amax(dim=1, keepdim=True)
    cdf = ((cdf - low) / (high - low).clamp_min(torch.finfo(cdf.dtype).tiny)).clamp_min(0.0)
    # the evenly spaced values, exactly as the authors' create_ys computes them
    ys = torch.linspace(0, 1.0, steps=points, device=scores.device).expand(b, points)
    start = (cdf + (cdf == 0).float() * 1e8).amin(dim=1, keepdim=True)
    steps = torch.arange(points, device=scores.device, dtype=cdf.dtype).expand(b, points)
    ys = start + ((ys * (points - 1)) - start * steps) / max(points - 1, 1)
    # the nearest CDF entry to each value, with the CDF left-padded to `points` entries as the
    # authors pad it when a layer has fewer candidates than the reference (pads never win)
    pad = max(points - n, 0)
    padded = torch.nn.functional.pad(cdf, (pad, 0))
    nearest = (ys[:, :, None] - padded[:, None, :]).abs().min(dim=2).indices - pad  # (b, points)
    nearest = nearest.clamp(0, n - 1)
    picked = torch.zeros(b, n, dtype=torch.bool, device=scores.device).scatter_(1, nearest, True)
    return torch.zeros_like(picked).scatter_(1, sorted_index, picked)  # back to candidate order


def tome_plan(
    metric: Tensor,
    keep_count: int,
    valid: Tensor | None,
    num_prefix: int,
    size: Tensor | None,
    static: bool = False,
) -> TokenSelection:
    """ToMe's bipartite soft matching and merge (Bolya et al., ICLR 2023, ``tome/merge.py``).

    metric: (b, n, d) every token's key averaged over heads, prefix tokens first. Tokens
    alternate into A (even positions) and B (odd) over the whole sequence, as ToMe does;
    prefix tokens and padding never merge and are never merged into. Each A token's match is
    its most similar B token (cosine), and the A tokens with the closest matches merge into
    theirs, as many per image as it has candidates above ``keep_count`` (at most its mergeable
    A tokens). The output is in ToMe's order: prefix tokens, the unmerged A tokens, then the B
    tokens, each in position order (then padding, when images keep different counts); every
    slot is the size-weighted mean of its tokens. Returns the selection (``Rule.TOME``: it
    applies to the residual stream after attention, as ToMe merges). Without padding every image keeps
    as many tokens and no host sync is needed; with padding, ``static`` pads to the widest any
    image can be instead of syncing.
    """
    if valid is None and not torch.compiler.is_exporting():
        return _tome_plan_unpadded(metric, keep_count, num_prefix, size)
    return _tome_plan_general(metric, keep_count, valid, num_prefix, size, static)


def pitome_margin(layer: int, depth: int) -> float:
    """PiToMe's margin in block ``layer`` of ``depth``: tokens more similar than it to many
    others have high energy (they sit in redundant regions) and merge first."""
    return PITOME_MARGIN - PITOME_MARGIN * (layer / depth)


def pitome_energy(sim: Tensor, margin: float) -> Tensor:
    """PiToMe's energy of each token, ``mean_j elu(sim[..., j] - margin)`` over the last axis.

    ``elu(x) = exp(min(x, 0)) - 1 + max(x, 0)`` written out: torch's CPU ``elu`` (an ``expm1``)
    ran about ten times slower than ``exp`` on a (64, 190, 190) similarity and took a fifth of a
    forward pass. The energy only orders the tokens, so it carries no gradient."""
    shifted = sim.detach() - margin
    energy = shifted.clamp(max=0).exp_()
    return energy.add_(shifted.clamp_(min=0)).mean(dim=-1).sub_(1)


def pitome_plan(
    metric: Tensor, keep_count: int, num_prefix: int, size: Tensor | None, *, margin: float, bipartite: bool
) -> TokenSelection:
    """PiToMe's merge (Tran et al., NeurIPS 2024; the authors' ``algo/pitome/merge.py``).

    metric: (b, n, d) every token's key averaged over heads, prefix tokens first (they never
    merge). Each candidate's energy is ``mean_j elu(cos(i, j) - margin)`` over all candidates;
    ``r = n - p - keep_count`` of them merge (at most half). ``bipartite`` (the first half of
    the layers): the candidates in energy order alternate into A and B, each A token's match
    is its most similar B token, and the ``r`` A tokens with the closest matches merge into
    theirs (ToMe's matching on energy-ordered halves). Otherwise the ``2r`` highest-energy
    candidates alternate into A and B and every A token merges into its most similar B token;
    the others are protected. Every slot is the size-weighted mean of its tokens; the output
    is in position order (prefix tokens, then each surviving token where it was). Needs an
    unpadded grid (every image merges ``r``: no host sync)."""
    b, n, _ = metric.shape
    p, t = num_prefix, n - num_prefix
    merges = min(max(t - keep_count, 0), t // 2)
    unit = _unit(_float(metric[:, p:]))
    sim = unit @ unit.transpose(-1, -2)  # (b, t, t)
    energy = pitome_energy(sim, margin)
    order = _descending(energy)  # (b, t)
    if bipartite:
        a, half_b = order[:, ::2], order[:, 1::2]
    else:
        a, half_b = order[:, : 2 * merges : 2], order[:, 1 : 2 * merges : 2]
    pair = sim.gather(1, a[..., None].expand(-1, -1, t)).gather(2, half_b[:, None].expand(-1, a.shape[1], -1))
    best, match = pair.max(dim=-1)  # (b, |A|)
    if bipartite:  # the r A tokens with the closest matches
        edges = _descending(best)[:, :merges]
        src, into = a.gather(1, edges), half_b.gather(1, match.gather(1, edges))
    else:
        src, into = a, half_b.gather(1, match)
    merged = torch.zeros(b, t, dtype=torch.bool, device=metric.device).scatter_(1, src, True)
    slot = p + (~merged).long().cumsum(dim=-1) - 1  # (b, t) each surviving candidate's slot
    target = torch.zeros_like(slot).scatter_(1, src, into)  # merged candidates: their B token
    dest = _after_prefix(torch.where(merged, slot.gather(1, target), slot), p)
    # the surviving candidates' positions, each at its slot (merged ones into a spare column)
    at = torch.where(merged, t - merges, slot - p)
    positions = torch.arange(p, n, device=metric.device).expand(b, t)
    index = _after_prefix(slot.new_zeros(b, t - merges + 1).scatter_(1, at, positions)[:, :-1], p)
    patches = torch.ones(b, n, device=metric.device) if size is None else _float(size)
    total = patches.new_zeros(b, n - merges).scatter_add_(1, dest, patches)
    weight = patches / total.gather(1, dest)
    return TokenSelection(index, None, Merge(dest, weight, whole=True), total, Rule.PITOME, late=True)


def _descending(values: Tensor) -> Tensor:
    """(b, k) positions sorted by value, largest first: ties by position (a stable sort), or,
    in ONNX exports (no stable sort there), in top-k's order."""
    if torch.compiler.is_exporting():
        return values.topk(values.shape[-1], dim=-1).indices
    return torch.sort(values, dim=-1, descending=True, stable=True).indices


def _tome_plan_general(
    metric: Tensor,
    keep_count: int,
    valid: Tensor | None,
    num_prefix: int,
    size: Tensor | None,
    static: bool = False,
) -> TokenSelection:
    """:func:`tome_plan` on any grid, padded or not (and in ONNX exports, which lack a stable
    sort): ranks by counting."""
    b, n, _ = metric.shape
    device = metric.device
    position = torch.arange(n, device=device)
    prefix = position < num_prefix  # (n,)
    real = torch.ones(b, n, dtype=torch.bool, device=device) if valid is None else valid
    mergeable = real & ~prefix  # (b, n)
    unit = _unit(metric.float())
    sim = unit[:, ::2] @ unit[:, 1::2].transpose(-1, -2)  # (b, |A|, |B|)
    sim = sim.masked_fill(~mergeable[:, ::2, None] | ~mergeable[:, None, 1::2], float("-inf"))
    best, match = sim.max(dim=-1)  # (b, |A|)
    can = torch.isfinite(best)
    # each A token's place when sorted by best match, closest first (ties by position)
    above = best[:, None, :] > best[:, :, None]
    before = (best[:, None, :] == best[:, :, None]) & torch.ones_like(above[0]).tril(-1)
    rank = (above | before).sum(dim=-1)
    merges = (mergeable.sum(dim=-1, keepdim=True) - keep_count).clamp_min(0)  # (b, 1)
    merged_a = (rank < merges) & can
    merged = torch.zeros_like(real)
    merged[:, ::2] = merged_a
    is_b = (position % 2 == 1).expand(b, n)
    own = real & ~merged  # tokens with a slot of their own
    # slots: prefix, then unmerged A, then B (ToMe's order), each in position order
    group_a = own & ~prefix & ~is_b
    group_b = own & ~prefix & is_b
    count_a = group_a.sum(dim=-1, keepdim=True)
    slot = torch.where(
        prefix.expand(b, n),
        position.expand(b, n),
        torch.where(
            group_a, num_prefix + group_a.cumsum(-1) - 1, num_prefix + count_a + group_b.cumsum(-1) - 1
        ),
    )
    counts = own.sum(dim=-1)  # (b,)
    # without padding every image merges as many (ToMe's r): the width is known without a sync
    a_mergeable = len(range(num_prefix + num_prefix % 2, n, 2))
    bound = max(num_prefix + keep_count, n - a_mergeable)
    width = bound if valid is None or static else int(counts.max())
    slot = torch.where(own, slot, width)  # merged tokens and padding: no slot of their own
    into = torch.zeros(b, n, dtype=torch.long, device=device)
    into[:, ::2] = 2 * match + 1
    dest = torch.where(merged, slot.gather(1, into), slot)  # merged A tokens join their B's slot
    index = torch.zeros(b, width + 1, dtype=torch.long, device=device)
    index = index.scatter_(1, slot, position.expand(b, n))[:, :width]
    patches = torch.ones(b, n, device=device) if size is None else size.float()
    patches = patches * real
    size_out = patches.new_zeros(b, width + 1).scatter_add_(1, dest, patches)[:, :width]
    padding = None
    if valid is not None:
        padding = Padding(torch.arange(width, device=device) < counts[:, None], None)
    return TokenSelection(index, padding, merge_plan(dest, patches, width), size_out, Rule.TOME, late=True)


def _tome_plan_unpadded(
    metric: Tensor, keep_count: int, num_prefix: int, size: Tensor | None
) -> TokenSelection:
    """:func:`tome_plan` without padding, in a third of its ops (each is a fixed cost that
    dominates at small sizes): every image merges the same number ``r`` of A tokens, known
    here, so every B token's slot is the same in all images and only the A tokens' slots are
    computed. Picks what :func:`tome_plan` picks: the ``r`` A tokens with the closest matches,
    ties by position (a stable sort gives ToMe's ranks; ONNX exports take the general path)."""
    b, n, _ = metric.shape
    device, p = metric.device, num_prefix
    prefix_a, prefix_b = (p + 1) // 2, p // 2  # prefix tokens among A (even positions) and B (odd)
    n_a, n_b = (n + 1) // 2, n // 2
    merges = min(max(n - p - keep_count, 0), n_a - prefix_a) if n_b > prefix_b else 0
    unit = _unit(_float(metric))
    # all of A against all of B, as the general path (and the FLOP count) has it; then the
    # non-prefix rows and columns only
    sim = (unit[:, ::2] @ unit[:, 1::2].transpose(-1, -2))[:, prefix_a:, prefix_b:]  # (b, |A'|, |B'|)
    best, match = sim.max(dim=-1)
    order = torch.sort(best, dim=-1, descending=True, stable=True).indices  # closest first
    merged, rest = order.split((merges, order.shape[1] - merges), dim=1)
    unmerged = rest.sort(dim=-1).values
    first_b = n_a - prefix_a - merges + p  # slots: prefix, unmerged A (position order), B
    width = first_b + n_b - prefix_b
    own_slots, dest_fixed, index_fixed, first_a = _tome_constants(n, p, merges, device)
    dest = dest_fixed.expand(b, n).clone()  # prefix and B tokens: the same slots in every image
    # the non-prefix A tokens' entries, written in place: unmerged ones their own slot,
    # merged ones their B's
    dest_a = dest[:, 2 * prefix_a :: 2]
    dest_a.scatter_(1, unmerged, own_slots.expand(b, -1))
    dest_a.scatter_(1, merged, match.gather(1, merged) + first_b)
    index = index_fixed.expand(b, width).clone()
    if torch.compiler.is_compiling():  # dynamo refuses out= into a view
        index[:, p:first_b] = torch.add(first_a, unmerged, alpha=2)
    else:
        torch.add(first_a, unmerged, alpha=2, out=index[:, p:first_b])  # position 2 * (a + prefix_a)
    patches = torch.ones(b, n, device=device) if size is None else _float(size)
    total = patches.new_zeros(b, width).scatter_add_(1, dest, patches)  # every token has a slot
    weight = patches / total.gather(1, dest)
    return TokenSelection(index, None, Merge(dest, weight, whole=True), total, Rule.TOME, late=True)


_SHAPE_CACHE_SIZE = 256  # entries per cached function: shapes a process sees; cleared when full


def _shape_cached(make: Callable[..., Any]) -> Callable[..., Any]:
    """``make`` (small constant tensors from a shape and a device) cached per argument tuple:
    a few ops fewer per layer. Made outside inference mode, so passes that train can use them;
    made afresh while compiling or tracing, where a cached tensor would become a constant of
    one batch size in the graph. Callers never write into what it returns."""
    cache: dict[tuple[Any, ...], Any] = {}

    @functools.wraps(make)
    def get(*args: Any) -> Any:
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return make(*args)
        hit = cache.get(args)
        if hit is None:  # leaving inference mode costs a few microseconds: only on a miss
            if len(cache) >= _SHAPE_CACHE_SIZE:
                cache.clear()
            with torch.inference_mode(False):
                hit = cache[args] = make(*args)
        return hit

    return get


@_shape_cached
def _tome_constants(
    n: int, p: int, merges: int, device: torch.device
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """What :func:`_tome_plan_unpadded` fills in the same in every image and layer of a shape:
    the slots of the unmerged A tokens (1, |A'| - merges), ``dest`` of the prefix and B tokens
    (1, n; A tokens' entries unspecified), ``index`` of the prefix and B slots (1, width;
    unmerged A slots unspecified) and the position of the first non-prefix A token (1, 1)."""
    prefix_a, prefix_b = (p + 1) // 2, p // 2
    first_b = (n + 1) // 2 - prefix_a - merges + p
    width = first_b + n // 2 - prefix_b
    dest = torch.zeros(1, n, dtype=torch.long, device=device)
    dest[:, :p] = torch.arange(p, device=device)
    dest[:, 2 * prefix_b + 1 :: 2] = torch.arange(first_b, width, device=device)
    index = torch.zeros(1, width, dtype=torch.long, device=device)
    index[:, :p] = torch.arange(p, device=device)
    index[:, first_b:] = torch.arange(2 * prefix_b + 1, n, 2, device=device)
    first_a = torch.full((1, 1), 2 * prefix_a, dtype=torch.long, device=device)
    return torch.arange(p, first_b, device=device)[None], dest, index, first_a


def _float(t: Tensor) -> Tensor:
    """``t.float()`` without the call when it is float32 already (each call is a fixed cost)."""
    return t if t.dtype == torch.float32 else t.float()


@_shape_cached
def _row_offsets(b: int, n: int, device: torch.device) -> Tensor:
    """(b, 1) the first row of each image in a flattened (b n) token axis: ``arange(b) * n``."""
    return torch.arange(b, device=device)[:, None] * n


def dct_count(candidates: int, keep_count: int) -> int:
    """How many patch tokens the cosine transform leaves of ``candidates``: ``keep_count``, but
    at least half (OpenToMe's ``dc_matching`` removes at most ``t // 2`` of ``t``)."""
    return candidates - min(max(candidates - keep_count, 0), candidates // 2)


@_shape_cached
def _dct_matrix(t: int, m: int, device: torch.device) -> Tensor:
    """(m, t) float32: the orthonormal DCT-II of length ``t``, its ``m`` lowest frequencies
    kept, then the inverse transform of length ``m``: ``C_m^T C_t[:m]`` (``C_n[k, j] = s_k
    cos(pi (2j + 1) k / 2n)``, ``s_0 = sqrt(1/n)``, else ``sqrt(2/n)``). Built in float64."""

    def dct(n: int, rows: int) -> Tensor:
        k = torch.arange(rows, dtype=torch.float64)[:, None]
        j = torch.arange(n, dtype=torch.float64)[None]
        scale = torch.full((rows, 1), math.sqrt(2 / n), dtype=torch.float64)
        scale[0] = math.sqrt(1 / n)
        return scale * torch.cos(math.pi * (2 * j + 1) * k / (2 * n))

    return (dct(m, m).T @ dct(t, m)).to(device=device, dtype=torch.float32)


def dct_reduce(x: Tensor, keep_count: int, num_prefix: int) -> Tensor:
    """OpenToMe's DCT token reduction (``opentome/tome/dct.py``, after the Fourier Transformer
    of He et al., ACL 2023), applied to a block's output: the patch tokens (b, t, c), in their
    order, are transformed along the token axis (orthonormal DCT-II), the highest frequencies
    cut to leave :func:`dct_count` of them, and transformed back at that length, so each output
    token is a fixed mix of all input tokens (many-to-many, the same for every image: one
    (m x t) matrix product). Prefix tokens pass unchanged. Computed in float32, as theirs, and
    returned in ``x``'s dtype."""
    p, t = num_prefix, x.shape[1] - num_prefix
    m = dct_count(t, keep_count)
    if m == t:
        return x
    mixed = torch.matmul(_dct_matrix(t, m, x.device), _float(x[:, p:])).to(x.dtype)
    return torch.cat((x[:, :p], mixed), dim=1)


def merge_plan(dest: Tensor, weight: Tensor, num_slots: int) -> Merge:
    """A :class:`Merge` whose weights are normalised per slot.

    dest: (b, n) int64 in [0, num_slots] (``num_slots``: joins no slot); weight: (b, n) >= 0.
    """
    total = weight.new_zeros(weight.shape[0], num_slots + 1).scatter_add_(1, dest, weight)
    return Merge(dest, weight / total.gather(1, dest).clamp_min(torch.finfo(weight.dtype).tiny))


def select_tokens(x: Tensor, selection: TokenSelection) -> Tensor:
    """x: (b, n, ...) a layer's input -> (b, m, ...) its output tokens: the kept rows of x, or,
    when the selection merges, each slot the weighted mean of the rows sent to it."""
    if selection.merge is None:
        return gather_tokens(x, selection.index)
    dest, weight, fused, whole = selection.merge
    b, m = selection.index.shape
    n = x.shape[1]
    if whole:  # every token joins a slot: one index_add_ of the weighted rows, no spare row
        share = weight if weight.dtype == x.dtype else weight.to(x.dtype)
        rows = x.reshape(b * n, -1) * share.view(b * n, 1)
        target = (dest + _row_offsets(b, m, dest.device)).view(-1)
        return rows.new_zeros(b * m, rows.shape[1]).index_add_(0, target, rows).view(b, m, *x.shape[2:])
    if fused is not None:
        # every slot but the fused one is a row of x: gather, then write one weighted sum per
        # image (an image that fused nothing rewrites its first row with itself)
        rows = gather_tokens(x, selection.index).reshape(b * m, -1)
        share = torch.where(dest == fused, weight, 0.0).to(x.dtype)  # (b, n)
        # element-wise, like the index_add below (the cost model counts it as merging, not a GEMM)
        mean = (share.unsqueeze(-1) * x.reshape(b, n, -1)).sum(dim=1)  # (b, c)
        mean = torch.where(fused >= 0, mean, rows[::m])
        at = torch.arange(b, device=dest.device) * m + fused.squeeze(1).clamp_min(0)
        return rows.index_copy_(0, at, mean).view(b, m, *x.shape[2:])
    rows = x.reshape(b * n, -1) * weight.reshape(b * n, 1).to(x.dtype)  # (b n, c)
    return _add_into_slots(rows, dest, m).view(b, m, *x.shape[2:])


def _add_into_slots(rows: Tensor, dest: Tensor, m: int) -> Tensor:
    """rows: (b n', c) weighted token rows in image order; dest: (b, n') the slot in [0, m] each
    joins -> (b m, c) each slot's sum. One flat index_add_ (several times faster than a
    scatter_add_ along the token axis on CPU); rows that join no slot (dest == m) all land in
    one spare row at the end, dropped."""
    b = dest.shape[0]
    target = torch.where(dest < m, dest + _row_offsets(b, m, dest.device), b * m).flatten()
    out = rows.new_zeros(b * m + 1, rows.shape[1]).index_add_(0, target, rows)
    return out[: b * m]


def compact(keep: Tensor, size: int | None = None, num_prefix: int = 0) -> TokenSelection:
    """Positions of the True entries of ``keep``, ascending, after ``num_prefix`` prefix positions.

    keep: (b, n) over the candidates, which sit after the prefix in the token axis. The output
    grid is (b, num_prefix + size). ``size=None`` pads to the largest count in the batch and
    costs one host sync (the only one in the op), which also yields the rows of real tokens
    for packed token-wise compute when at least :data:`PACK_MIN_PADDING` of the grid is
    padding; a fixed ``size`` (at least the largest count) needs no sync.
    """
    b, n = keep.shape
    before = keep.cumsum(dim=-1)  # (b, n) kept candidates up to each position
    counts = before[:, -1]  # (b,)
    total, host = None, None
    if size is None:
        # one sync answers "how wide", "is any row padded", "how many real tokens" and how
        # attention may split the batch by count
        host = counts.tolist()
        smallest, size, total = min(host), max(host), sum(host)
    # kept tokens first, then dropped ones, each in original order (what a stable argsort on
    # "dropped" gives, without a sort: ONNX has no stable sort, and one cumsum is cheaper)
    positions = torch.arange(n, device=keep.device)
    # a dropped token's slot: after every kept one, then the dropped ones before it
    slot = torch.where(keep, before - 1, counts[:, None] + positions - before)
    order = torch.empty_like(slot).scatter_(1, slot, positions.expand(b, n))
    order = order[:, :size]
    index = _after_prefix(order + num_prefix, num_prefix)
    if total is not None and smallest == size:
        return TokenSelection(index, None)
    mask = torch.arange(num_prefix + size, device=keep.device) < (counts + num_prefix)[:, None]
    rows = None
    if total is not None and (b * size - total) >= PACK_MIN_PADDING * b * (num_prefix + size):
        rows = mask.flatten().nonzero().squeeze(1)
    buckets = None if host is None else bucket_images(counts + num_prefix, [c + num_prefix for c in host])
    return TokenSelection(index, Padding(mask, rows, buckets))


def bucket_images(counts: Tensor, host: Sequence[int]) -> Buckets | None:
    """How attention splits a padded batch: images sorted by count, in up to
    :data:`MAX_BUCKETS` equal groups of at least :data:`MIN_BUCKET`, or ``None`` where that
    would not pay (another device than :data:`BUCKET_DEVICES`, fewer than :data:`MIN_BUCKETS`
    groups, a grid narrower than :data:`MIN_BUCKET_WIDTH`, or query-key pairs above
    :data:`BUCKET_MAX_SHARE` of the whole grid's).

    counts: (b,) real tokens per image (prefix included) on the device; host: the same values
    on the host (the caller's one sync). No further sync: the device's stable sort orders the
    images as the host's does.
    """
    b = len(host)
    buckets = min(MAX_BUCKETS, b // MIN_BUCKET)
    if counts.device.type not in BUCKET_DEVICES or buckets < MIN_BUCKETS or max(host) < MIN_BUCKET_WIDTH:
        return None
    ranked = sorted(range(b), key=lambda i: -host[i])  # stable, as the device's sort below
    bounds = [round(i * b / buckets) for i in range(buckets + 1)]
    groups = tuple((start, stop, host[ranked[start]]) for start, stop in itertools.pairwise(bounds))
    pairs = sum((stop - start) * width * width for start, stop, width in groups)
    if pairs > BUCKET_MAX_SHARE * b * max(host) ** 2:
        return None
    order = torch.sort(counts, descending=True, stable=True).indices
    return Buckets(order, groups, tuple(ranked), tuple(host))


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
    if x.dim() == 2:
        return x.gather(1, index)
    b, n = x.shape[:2]
    # rows of the flattened (b n) axis: index_select copies whole rows, several times faster
    # on CPU than a gather with an index expanded over the feature axes
    rows = (index + _row_offsets(b, n, index.device)).view(-1)
    return x.reshape(b * n, *x.shape[2:]).index_select(0, rows).view(b, index.shape[1], *x.shape[2:])


class AdaptiveTokenSampling(nn.Module):
    """Keeps at most ``cap`` non-prefix tokens per image, chosen by significance.

    How it selects is ``options`` (:class:`~ats_vit.options.SamplingOptions`): the paper's
    inverse transform and the seed's Gumbel draws keep an adaptive count (repeated picks are
    kept once); the peers ATS is benchmarked against (top-k, random, ToMe) keep exactly
    ``cap``. Prefix tokens (CLS, distillation, registers: the first
    ``num_prefix_tokens``) are always kept. An image with at most ``cap`` valid
    candidates keeps all of them, so an image is treated the same alone as in any batch.
    ``SamplingOptions()`` is the paper's ATS, bit for bit.

    The module has no parameters; :meth:`configure` changes its cap and options in place,
    which is how budgets and calibration set a model (patch once, then set numbers).

    ``scoring`` is a property of the model, not of a budget: ``"cls"`` scores tokens by the
    attention of the CLS query (the first prefix token, which must exist), ``"received"`` by
    the attention each token receives, averaged over all real queries (for models without a
    CLS readout; see :func:`ats_vit.attention.received_attention`).
    """

    def __init__(
        self,
        cap: int | None = None,
        options: SamplingOptions | None = None,
        *,
        num_prefix_tokens: int = 1,
        scoring: str = "cls",
        max_tokens: int | None = None,
    ) -> None:
        super().__init__()
        self.scoring = _validate.choice("scoring", scoring, SCORING)
        if scoring == "cls":  # the CLS query scores tokens, so it must exist
            self.num_prefix_tokens = _validate.positive_int("num_prefix_tokens", num_prefix_tokens)
        else:
            self.num_prefix_tokens = _validate.non_negative_int("num_prefix_tokens", num_prefix_tokens)
        if max_tokens is not None:
            _validate.deprecated("AdaptiveTokenSampling(max_tokens=)", "AdaptiveTokenSampling(cap=)")
            cap = max_tokens if cap is None else cap
        if cap is None:
            raise TypeError("AdaptiveTokenSampling needs cap: the most non-prefix tokens the layer keeps")
        self.cap = 0
        self.options = SamplingOptions()
        # the model's full token count (prefix included) where a rule needs it (the authors'
        # ATS places as many CDF points in every layer); None: the layer's own count
        self.reference_tokens: int | None = None
        # set by a budget for the layers it leaves whole (before its start layer): then no rule
        # samples, not even the authors' ATS, whose cap only bounds what it keeps
        self.keeps_all = False
        # (block index, depth) of the model this layer sits in, for rules that change with
        # depth (PiToMe's margin and matching); set by the model or family that places it
        self.layer: tuple[int, int] | None = None
        self.configure(cap, options)

    @property
    def max_tokens(self) -> int:
        """0.x's name of :attr:`cap` (deprecated)."""
        _validate.deprecated("AdaptiveTokenSampling.max_tokens", "AdaptiveTokenSampling.cap")
        return self.cap

    def configure(self, cap: int, options: SamplingOptions | None = None) -> None:
        """Set the cap and (unless None) the options, in place."""
        self.cap = _validate.positive_int("cap", cap)
        if options is not None:
            if not isinstance(options, SamplingOptions):
                raise TypeError(
                    f"options must be an ats_vit.SamplingOptions, got {type(options).__name__} ({options!r})"
                )
            self.options = options

    def extra_repr(self) -> str:
        o = self.options
        return (
            f"cap={self.cap}, sampler={o.sampler!r}, scoring={self.scoring!r}, "
            f"num_prefix_tokens={self.num_prefix_tokens}, "
            f"static_shape={o.static_shape}, temperature={o.temperature:g}, dropped={o.dropped!r}"
        )

    @property
    def sampler(self) -> str:
        return self.options.sampler

    @property
    def dropped(self) -> str:
        return str(self.options.dropped)

    @property
    def rule(self) -> Rule:
        """What this layer runs when it samples (for the trace that costs and times a pass)."""
        return Rule.of(self.options)

    @property
    def uses_attention_scores(self) -> bool:
        """Whether the rule needs attention scores (the CLS row or received attention); the
        merging rules compare keys instead, and the cosine transform needs none."""
        return not self.late and not self.after_mlp

    @property
    def after_mlp(self) -> bool:
        """Whether the layer reduces its tokens after the block's MLP instead of in its
        attention (``sampler="dct"``: :meth:`ats_vit.tokens.TokenState.after_mlp`)."""
        return self.options.sampler == "dct"

    @property
    def late(self) -> bool:
        """Whether the selection follows attention over every token (ToMe, PiToMe) instead of
        choosing which tokens get queries."""
        return self.options.sampler in MERGING_SAMPLERS

    @property
    def proportional(self) -> bool:
        """Whether attention adds ``log(size)`` for tokens that stand for several patches: every
        rule but PiToMe, whose authors merge by size without it."""
        return self.options.sampler != "pitome"

    def needed(self, num_tokens: int) -> bool:
        """Whether a layer with ``num_tokens`` tokens (prefix included) samples at all. The
        authors' ATS samples whenever it has more than 8 candidates (its cap only bounds what
        it keeps); every other rule when there are more candidates than the cap; none in a
        layer a schedule leaves whole (``keeps_all``)."""
        candidates = num_tokens - self.num_prefix_tokens
        if self.keeps_all:
            return False
        if self.options.sampler == "official":
            return candidates > OFFICIAL_MIN_TOKENS
        return candidates > self.cap

    def forward(
        self,
        cls_attn: Tensor | None,
        v: Tensor,
        padding: Padding | None = None,
        *,
        k: Tensor | None = None,
        size: Tensor | None = None,
    ) -> TokenSelection:
        """cls_attn: (b, h, n) attention scores of all n tokens (the CLS row, or the received
        attention with ``scoring="received"``; unused, may be None, for the ToMe rules); v, k:
        (b, h, n, d) values and keys (keys are needed to merge); padding of the n input tokens,
        or None; size: (b, n) patches per token, or None (all 1)."""
        p, cap, o = self.num_prefix_tokens, self.cap, self.options
        b, _, n, _ = v.shape
        if self.after_mlp:
            raise ValueError(
                "sampler='dct' reduces a block's output after its MLP, not in its attention: "
                "the block calls TokenState.after_mlp (as ats_vit's models and patches do)"
            )
        if not self.needed(n):
            return TokenSelection(torch.arange(n, device=v.device).expand(b, n), padding, size=size)
        if k is None and self.late:
            raise ValueError(
                f"sampler={o.sampler!r}, dropped={o.dropped!r} needs the keys k to compare tokens"
            )
        valid = None if padding is None else padding.mask[:, p:]
        if o.sampler == "tome":
            metric = head_sum(_required(k))  # (b, n, d): ToMe compares head-averaged keys
            mask = None if padding is None else padding.mask
            return tome_plan(metric, cap, mask, p, size, o.static_shape)
        if o.sampler == "pitome":
            return self._pitome(_required(k), padding, size)
        if o.sampler in ("topk", "random") and valid is None and o.dropped == "discard":
            return self._fixed_count(cls_attn, v, size)
        scores = None
        if o.sampler == "official":
            scores = official_scores(_required(cls_attn)[..., p:], v[..., p:, :], valid)
        elif o.sampler in ("inverse_transform", "gumbel") or o.dropped == "fuse":
            scores = significance_scores(_required(cls_attn)[..., p:], v[..., p:, :], valid)  # (b, n - p)
        if o.sampler == "official":
            points = (self.reference_tokens or n) - p
            keep = official_select(sharpen(_required(scores), o.temperature), points, valid)
            keep = _most_significant(keep, _required(scores), max(cap, min(OFFICIAL_MIN_TOKENS, n - p)))
            if valid is not None:  # images with at most 8 real candidates keep them, as alone
                few = valid.sum(-1, keepdim=True) <= OFFICIAL_MIN_TOKENS
                keep = (few & valid) | (~few & keep)
        else:
            if o.sampler == "topk":
                picks = topk_select(_required(cls_attn)[..., p:], cap, valid)
            elif o.sampler == "random":
                candidates = torch.ones(b, n - p, dtype=torch.bool, device=v.device)
                picks = random_select(candidates if valid is None else valid, cap)
            elif o.sampler == "inverse_transform":
                jitter = self.training and o.jitter
                picks = inverse_transform_sample(
                    sharpen(_required(scores), o.temperature), cap, jitter=jitter
                )
            else:
                picks = gumbel_sample(sharpen(_required(scores), o.temperature), cap, valid, eps=GUMBEL_EPS)
            keep = keep_mask(picks, n - p)
            if valid is not None:
                # images with few enough valid candidates keep them all, as they would alone
                few = valid.sum(-1, keepdim=True) <= cap
                keep = (few & valid) | (~few & keep)
        if valid is not None:
            keep = keep & valid
        dropped = ~keep if valid is None else valid & ~keep
        if o.dropped == "fuse":
            # the fused token takes the slot of the most significant dropped token
            host = _required(scores).masked_fill(~dropped, -1.0).argmax(dim=-1, keepdim=True)  # (b, 1)
            keep = keep.scatter(1, host, dropped.any(dim=-1, keepdim=True) | keep.gather(1, host))
        widest = max(cap, min(OFFICIAL_MIN_TOKENS, n - p)) if o.sampler == "official" else cap
        static = widest + (o.dropped == "fuse") if o.static_shape else None
        selection = compact(keep, static, num_prefix=p)._replace(
            rule=self.rule, received=self.scoring == "received"
        )
        if o.dropped == "discard":
            return (
                selection if size is None else selection._replace(size=gather_tokens(size, selection.index))
            )
        return self._fused(selection, keep, dropped, _required(scores), size)

    def _pitome(self, k: Tensor, padding: Padding | None, size: Tensor | None) -> TokenSelection:
        if padding is not None:
            raise ValueError(
                "sampler='pitome' merges the same count in every image and takes no padded token grid "
                "(an earlier layer kept an adaptive count); use it in every sampling layer, or use 'tome'"
            )
        if self.layer is None:
            raise ValueError(
                "sampler='pitome' needs the layer's place in the model (its margin changes with depth): "
                "set AdaptiveTokenSampling.layer = (index, depth), as ats_vit's models and patches do"
            )
        index, depth = self.layer
        return pitome_plan(
            head_sum(k),
            self.cap,
            self.num_prefix_tokens,
            size,
            margin=pitome_margin(index, depth),
            bipartite=index < -(-depth // 2),
        )

    def _fixed_count(self, cls_attn: Tensor | None, v: Tensor, size: Tensor | None) -> TokenSelection:
        """Top-k or random picks on an unpadded grid: every image keeps exactly the cap, so the
        sorted picks are the output positions (no mask, no host sync)."""
        p, cap = self.num_prefix_tokens, self.cap
        b, _, n, _ = v.shape
        if self.options.sampler == "topk":
            picks = topk_select(_required(cls_attn)[..., p:], cap)
        else:
            picks = random_select(torch.ones(b, n - p, dtype=torch.bool, device=v.device), cap)
        index = _after_prefix(picks.sort(dim=-1).values + p, p)
        return TokenSelection(
            index,
            None,
            size=None if size is None else size.gather(1, index),
            rule=self.rule,
            received=self.scoring == "received",
        )

    def _fused(
        self, selection: TokenSelection, keep: Tensor, dropped: Tensor, scores: Tensor, size: Tensor | None
    ) -> TokenSelection:
        """Add to ``selection`` where the dropped tokens go (``dropped="fuse"``) and the output
        sizes: kept tokens alone in their slots, the dropped ones (the host among them) averaged
        into the host's slot by significance, as EViT weights them by attention. In closed
        form: one slot per image holds several tokens, so no scatter is needed for its weights
        or sizes.

        keep, dropped: (b, n - p) bool over the candidates (the fused token's host is kept
        and dropped: it holds itself and the others); scores: (b, n - p) significance."""
        p, m = self.num_prefix_tokens, selection.index.shape[1]
        slot = p + keep.long().cumsum(dim=-1) - 1  # (b, n - p) output slot of each kept candidate
        host = keep & dropped  # at most one per image
        fused = slot.masked_fill(~host, -1).amax(dim=-1, keepdim=True)  # (b, 1); -1: fused nothing
        dest = _after_prefix(torch.where(dropped, fused, slot.masked_fill(~keep, m)), p)  # padding: no slot
        mass = scores.masked_fill(~dropped, 0.0)
        share = mass / mass.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(mass.dtype).tiny)
        weight = torch.cat((share.new_ones(share.shape[0], p), torch.where(dropped, share, 1.0)), dim=1)
        patches = torch.ones(dest.shape, device=dest.device) if size is None else size.float()
        fused_size = patches[:, p:].masked_fill(~dropped, 0.0).sum(dim=-1, keepdim=True)  # (b, 1)
        size_out = gather_tokens(patches, selection.index)
        size_out = torch.where(torch.arange(m, device=dest.device) == fused, fused_size, size_out)
        if selection.padding is not None:
            size_out = size_out.masked_fill(~selection.padding.mask, 0.0)
        return selection._replace(merge=Merge(dest, weight, fused), size=size_out)


def _after_prefix(t: Tensor, num_prefix: int) -> Tensor:
    """(b, k) positions or slots of candidates -> (b, p + k) with the prefix tokens' own
    positions 0 .. p - 1 first (prefix tokens are always kept, each alone in its slot)."""
    prefix = torch.arange(num_prefix, device=t.device).expand(t.shape[0], num_prefix)
    return torch.cat((prefix, t), dim=1)


def _most_significant(keep: Tensor, scores: Tensor, cap: int) -> Tensor:
    """keep: (b, n) bool limited to the ``cap`` most significant True entries per image."""
    if keep.shape[1] <= cap:
        return keep
    top = scores.masked_fill(~keep, -1.0).topk(cap, dim=-1).indices
    return keep & torch.zeros_like(keep).scatter_(1, top, True)


def _required(t: Tensor | None) -> Tensor:
    """``t``, which the chosen rule guarantees was computed (narrows Optional for the type checker)."""
    if t is None:
        raise RuntimeError("internal error: a tensor this sampling rule needs was not computed")
    return t
