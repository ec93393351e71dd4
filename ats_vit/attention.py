"""Attention that samples tokens.

The CLS attention row is computed on its own (one query against all keys) to score tokens;
models without a CLS readout score by the attention each token receives instead (every query
against all keys, in chunks, never the whole matrix at once). Everything else goes through
fused ``F.scaled_dot_product_attention`` for only the kept queries (on CPU at few keys, two
matmuls and a softmax, which are faster there), with a key padding mask once a batch has been
padded. Once tokens have been merged, each stands for ``size`` patches
and gets ``log(size)`` added to its attention logits (ToMe's proportional attention), so a
merged token draws the attention its patches would have drawn together. The functions here are
shared by our :class:`~ats_vit.vit.ViT` and the timm and Hugging Face integrations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ats_vit.options import SamplingOptions
from ats_vit.sampling import (
    AdaptiveTokenSampling,
    Padding,
    TokenSelection,
    _float,
    select_tokens,
    tokenwise,
)

__all__ = [
    "AttentionParts",
    "SamplingAttention",
    "attend",
    "attend_padded",
    "cls_attention",
    "key_bias",
    "received_attention",
    "sampled_self_attention",
]

# queries per chunk of received_attention: its (b, h, chunk, n) float32 logits stay small
RECEIVED_CHUNK = 256
# On CPU, float32 attention over at most this many keys, unmasked or with a float mask (token
# sizes) and without dropout, runs as two matmuls and a softmax instead of the fused kernel,
# whose cost per (image, head) dominates at few keys: the demo model's ToMe budget at 50% of
# the GFLOPs runs 1.40x -> 1.47x dense with it (layers of 9-30 tokens; dense, at 37 tokens, is
# untouched). In training too (autograd keeps the (b, h, m, n) probabilities, small at this
# many keys): ToMe +1.4-3.2%, ats-fuse +0.9-1.4% per step at 40%. Measured on an AVX-512 CPU.
_CPU_MATMUL_MAX_KEYS = 32
# PyTorch's CPU softmax over a last axis shorter than one vector register (16 floats with
# AVX-512, 8 with AVX2) takes a slow path, ~12x slower per element; below it the logits are
# laid out keys-first and normalised along the second-to-last axis instead
SOFTMAX_ACROSS_BELOW = 16 if torch.backends.cpu.get_cpu_capability() == "AVX512" else 8

TensorFn = Callable[[Tensor], Tensor]


def _identity(t: Tensor) -> Tensor:
    return t


def key_bias(padding: Padding | None, size: Tensor | None) -> Tensor | None:
    """What attention adds per key: None, a (b, n) bool mask (True: attend), or, once tokens
    carry sizes, (b, n) float ``log(size)`` with ``-inf`` at padding."""
    if size is None:
        return None if padding is None else padding.mask
    bias = (size if size.dtype == torch.float32 else size.float()).clamp_min(1.0).log()
    return bias if padding is None else bias.masked_fill(~padding.mask, float("-inf"))


def cls_attention(
    q_cls: Tensor, k: Tensor, bias: Tensor | None, scale: float, pair: Tensor | None = None
) -> Tensor:
    """Softmax attention of the CLS query over all keys, in float32.

    q_cls: (b, h, 1, d), k: (b, h, n, d), bias: from :func:`key_bias` (or None), pair: (b, h,
    1, n) what the model adds to the CLS row's logits (relative position bias) -> (b, h, n).
    """
    # one query: a product and a sum over d, since a matmul would first copy the strided keys
    # into one contiguous batch (2-3% of an `ats-fuse` training step on the demo model); in
    # float32, so low-precision inputs do not round each product (a matmul accumulates wider)
    logits = (_float(q_cls) * _float(k)).sum(dim=-1) * scale  # (b, h, n)
    if pair is not None:
        logits = logits + pair.squeeze(-2).float()
    if bias is not None:
        if bias.dtype == torch.bool:
            logits = logits.masked_fill(~bias[:, None, :], float("-inf"))
        else:
            logits = logits + bias[:, None, :]
    return logits.softmax(dim=-1)


def received_attention(
    q: Tensor,
    k: Tensor,
    bias: Tensor | None,
    scale: float,
    padding: Padding | None,
    pair: Callable[[slice], Tensor] | None = None,
) -> Tensor:
    """The attention each key receives, averaged over the real queries, in float32.

    The significance of a token in a model that pools all tokens (average pooling, an
    attention-pool probe) rather than reading out the CLS token: ATS's reasoning (a token
    matters as much as the attention it draws, times its value's norm) with every query in
    the CLS query's place. q: (b, h, n, d), k: (b, h, n, d), bias: from :func:`key_bias` (or
    None), padding of the n tokens (padded queries do not vote), pair: the (b, h, rows, n)
    logits the model adds for a slice of query rows (relative position bias) -> (b, h, n).
    Computed over chunks of :data:`RECEIVED_CHUNK` queries, so memory is O(chunk * n), not O(n^2).
    """
    n = q.shape[2]
    total = q.new_zeros(q.shape[0], q.shape[1], k.shape[2], dtype=torch.float32)
    for start in range(0, n, RECEIVED_CHUNK):
        rows = slice(start, min(start + RECEIVED_CHUNK, n))
        logits = (q[:, :, rows] @ k.transpose(-1, -2)).float() * scale  # (b, h, chunk, n)
        if pair is not None:
            logits = logits + pair(rows).float()
        if bias is not None:
            if bias.dtype == torch.bool:
                logits = logits.masked_fill(~bias[:, None, None, :], float("-inf"))
            else:
                logits = logits + bias[:, None, None, :]
        attn = logits.softmax(dim=-1)
        if padding is not None:
            attn = attn * padding.mask[:, None, rows, None]
        total = total + attn.sum(dim=2)
    voters = n if padding is None else padding.mask.sum(dim=-1).clamp_min(1)[:, None, None]
    return total / voters


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    pair: Tensor | None = None,
) -> Tensor:
    """Fused attention of queries over keys, skipping padding (and with proportional attention
    once tokens carry sizes); on CPU at few keys, the same as matmuls, which run faster there.

    q: (b, h, m, d), k/v: (b, h, n, d), bias: from :func:`key_bias` (or None), pair: (b, h, m,
    n) logits the model adds per query and key (relative position bias) -> (b, h, m, d).
    """
    attn_mask = None
    if bias is not None:
        if bias.dtype not in (torch.bool, q.dtype):
            bias = bias.to(q.dtype)
        attn_mask = bias[:, None, None, :]  # (b, 1, 1, n)
    if _matmul_attention(q, k, attn_mask, dropout_p):
        return _matmul_attend(q, k, v, attn_mask, pair, q.shape[-1] ** -0.5 if scale is None else scale)
    if pair is not None:
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(
                ~attn_mask, float("-inf")
            )
        attn_mask = pair.to(q.dtype) if attn_mask is None else attn_mask + pair.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)


def attend_padded(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    dropout_p: float,
    scale: float | None,
    pair: Tensor | None,
    q_padding: Padding | None,
    k_padding: Padding | None,
) -> Tensor:
    """:func:`attend` on padded grids, in the buckets of images of similar count that the
    queries' padding names (:class:`~ats_vit.sampling.Buckets`), each at its own width; the
    whole grid at once where it names none.

    q: (b, h, m, d) on the grid of ``q_padding``; k, v: (b, h, n, d) on that of ``k_padding``
    (the same grid, or the layer's input grid when the layer samples). -> (b, h, m, d), whose
    padded query rows are unspecified (finite; always masked downstream).
    """
    buckets = None if q_padding is None else q_padding.buckets
    if buckets is None:
        return attend(q, k, v, bias, dropout_p, scale, pair)
    # (b, tokens, h, d) views: their slices gather into the layout the fused kernel runs fastest on
    q_t, k_t, v_t = (t.transpose(1, 2) for t in (q, k, v))
    out = q_t.new_zeros(q_t.shape)
    key_counts = None if k_padding is None or k_padding.buckets is None else k_padding.buckets.counts
    for start, stop, width in buckets.groups:
        images = buckets.order[start:stop]
        if k_padding is q_padding:
            keys = width
        elif k_padding is None or key_counts is None:
            keys = k.shape[2]
        else:
            keys = max(key_counts[i] for i in buckets.ranked[start:stop])
        group_bias = None if bias is None else bias[:, :keys].index_select(0, images)
        group_pair = None if pair is None else pair[:, :, :width, :keys].index_select(0, images)
        q_g, k_g, v_g = (_bucket(t, rows, images) for t, rows in ((q_t, width), (k_t, keys), (v_t, keys)))
        result = attend(q_g, k_g, v_g, group_bias, dropout_p, scale, group_pair)
        out[:, :width].index_copy_(0, images, result.transpose(1, 2))
    return out.transpose(1, 2)


def _bucket(t: Tensor, rows: int, images: Tensor) -> Tensor:
    """(b, tokens, h, d) -> (images, h, rows, d): a bucket's images and first ``rows`` tokens."""
    return t[:, :rows].index_select(0, images).transpose(1, 2)


def _matmul_attention(q: Tensor, k: Tensor, mask: Tensor | None, dropout_p: float) -> bool:
    """Whether :func:`attend` computes this attention with matmuls (CPU, float32, at most
    ``_CPU_MATMUL_MAX_KEYS`` keys, no boolean mask, no dropout)."""
    return (
        q.device.type == "cpu"
        and q.dtype == torch.float32
        and k.shape[2] <= _CPU_MATMUL_MAX_KEYS
        and (mask is None or mask.dtype != torch.bool)
        and dropout_p == 0.0
    )


def _matmul_attend(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, pair: Tensor | None, scale: float
) -> Tensor:
    """softmax(q k^T * scale + mask + pair) v as matmuls; mask: None or a float (b, 1, 1, n)."""
    if k.shape[2] < SOFTMAX_ACROSS_BELOW and pair is None:
        # keys-first (b, h, n, m): the softmax runs along the second-to-last axis, 3-4x faster here
        logits = _scaled(k @ q.transpose(-1, -2), scale, None if mask is None else mask.transpose(-1, -2))
        return logits.softmax(dim=-2).transpose(-1, -2) @ v
    logits = _scaled(q @ k.transpose(-1, -2), scale, mask)  # (b, h, m, n)
    if pair is not None:
        logits = logits + pair.to(q.dtype)
    return logits.softmax(dim=-1) @ v


def _scaled(logits: Tensor, scale: float, mask: Tensor | None) -> Tensor:
    """logits * scale + mask, in one op when there is a mask."""
    return logits * scale if mask is None else torch.add(mask, logits, alpha=scale)


Projection = tuple[Tensor, Tensor | None, int]  # (weight, bias, heads groups)
# rotary embedding: (b, h, n, d) queries or keys and their tokens' (b, n) original positions
Rotation = Callable[[Tensor, Tensor], Tensor]
# relative position bias: query positions (b, m), key positions (b, n) -> (b, h, m, n) logits
PairBias = Callable[[Tensor, Tensor], Tensor]


def _rows_bias(pair_bias: PairBias, positions: Tensor, rows: slice) -> Tensor:
    """The pair bias of the queries in ``rows`` over every key."""
    return pair_bias(positions[:, rows], positions)


def _kept(positions: Tensor | None, selection: TokenSelection) -> Tensor | None:
    """The original positions of a selection's output tokens (None stays None)."""
    return None if positions is None else positions.gather(1, selection.index)


def _projections(
    qkv_weight: Tensor | Sequence[Tensor], qkv_bias: Tensor | Sequence[Tensor | None] | None
) -> list[Projection]:
    """The (weight, bias, heads groups) GEMMs that make q, k and v: one fused (timm, ours) or
    three."""
    if isinstance(qkv_weight, Tensor):
        return [(qkv_weight, qkv_bias if isinstance(qkv_bias, Tensor) else None, 3)]
    biases = (None, None, None) if qkv_bias is None or isinstance(qkv_bias, Tensor) else qkv_bias
    return [(w, b, 1) for w, b in zip(qkv_weight, biases, strict=True)]


def _split_projections(all_proj: list[Projection]) -> tuple[list[Projection], list[Projection]]:
    """(the GEMMs that make q, those that make k and v): a fused one is split by rows (only
    layers that project queries after selecting need it, so the split is not made otherwise)."""
    if len(all_proj) == 3:
        return all_proj[:1], all_proj[1:]
    weight, bias, _ = all_proj[0]
    inner = weight.shape[0] // 3
    w_q, w_kv = weight.split((inner, 2 * inner))
    b_q, b_kv = (None, None) if bias is None else bias.split((inner, 2 * inner))
    return [(w_q, b_q, 1)], [(w_kv, b_kv, 2)]


def _project(x: Tensor, projections: list[Projection], padding: Padding | None, heads: int) -> list[Tensor]:
    """x: (b, n, c) through each (weight, bias, parts) GEMM, split into its ``parts`` of
    (b, h, n, d) each: [q], [k, v] or [q, k, v]."""
    out: list[Tensor] = []
    for weight, bias, parts in projections:
        y = tokenwise(partial(F.linear, weight=weight, bias=bias), x, padding)
        # (b, n, t h d) -> t of (b, h, n, d); native views (einops' parsing costs as much here)
        out.extend(y.unflatten(-1, (parts, heads, -1)).permute(2, 0, 3, 1, 4).unbind(0))
    return out


class AttentionParts(NamedTuple):
    """What :func:`sampled_self_attention` needs of a model's attention: its weights and its
    own modules, gathered once per call by the family's block (one value instead of a dozen
    arguments).

    ``qkv_weight`` is one fused (3 * inner, c) weight (timm, ours) or separate query, key and
    value weights (Hugging Face); ``qkv_bias`` likewise, or None. ``dropout_p``: attention
    dropout (0 at eval). ``q_norm``/``k_norm`` act per head on (b, h, n, d); ``gate`` (a sigmoid
    gate from the input), ``out_norm`` and ``proj`` act per token. ``rope`` (rotary position
    embeddings, e.g. EVA-02) rotates queries and keys (b, h, n, d), after their norms, by the
    original positions (b, n) of their tokens. ``pair_bias`` (relative position bias, e.g.
    BEiT) gives the (b, h, m, n) logits added for queries at positions (b, m) and keys at
    positions (b, n).
    """

    qkv_weight: Tensor | Sequence[Tensor]
    qkv_bias: Tensor | Sequence[Tensor | None] | None
    heads: int
    scale: float
    dropout_p: float = 0.0
    q_norm: TensorFn = _identity
    k_norm: TensorFn = _identity
    gate: TensorFn | None = None
    out_norm: TensorFn = _identity
    proj: TensorFn = _identity
    rope: Rotation | None = None
    pair_bias: PairBias | None = None


def sampled_self_attention(
    x: Tensor,
    padding: Padding | None,
    ats: AdaptiveTokenSampling | None,
    parts: AttentionParts,
    *,
    size: Tensor | None = None,
    positions: Tensor | None = None,
) -> tuple[Tensor, TokenSelection | None]:
    """Self-attention over x (already normalised) that keeps only the tokens ``ats`` samples.

    x: (b, n, c) with its padding and token sizes (None: one patch each) -> (b, m, c_out) for
    the kept tokens (padded slots are unspecified and masked downstream) and the selection, or
    None when the layer kept every token; the caller takes its residual stream through the
    same selection (:meth:`ats_vit.tokens.TokenState.follow`). A late selection (ToMe) comes
    with the output of every token, which the caller merges after adding it to the residual.
    ``parts``: the model's attention (:class:`AttentionParts`). Keys and values are computed
    for all tokens; queries only for CLS (to score) and for the kept tokens, or, when ``ats``
    scores by received attention, for every token (all of them vote; only the kept ones get
    outputs). ``positions`` (b, n): the original positions of the n input tokens, which rotary
    embeddings and a pair bias need; the kept tokens keep theirs (a merged token takes the
    position of the token it was merged into).
    """
    heads, scale, dropout_p, q_norm, k_norm, gate, out_norm, proj, rope, pair_bias = parts[2:]
    if (rope is not None or pair_bias is not None) and positions is None:
        raise ValueError("rope and pair_bias need the positions of the tokens")

    def rotate(t: Tensor, where: Tensor | None) -> Tensor:
        return t if rope is None or where is None else rope(t, where)

    bias = key_bias(padding, size if ats is None or ats.proportional else None)
    all_proj = _projections(parts.qkv_weight, parts.qkv_bias)
    if ats is None or not ats.needed(x.shape[1]) or ats.late or ats.after_mlp:
        q, k, v = _project(x, all_proj, padding, heads)
        q, k = rotate(q_norm(q), positions), rotate(k_norm(k), positions)
        selection, out_padding, queries, q_positions = None, padding, x, positions
        if ats is not None and ats.late and ats.needed(x.shape[1]):
            # ToMe, PiToMe: every token attends; the merge that follows is planned from the keys
            selection = ats(None, v, padding, k=k, size=size)
    elif ats.scoring == "received" and ats.uses_attention_scores:
        q_raw, k, v = _project(x, all_proj, padding, heads)
        k = rotate(k_norm(k), positions)
        rows = None if pair_bias is None or positions is None else partial(_rows_bias, pair_bias, positions)
        received = received_attention(rotate(q_norm(q_raw), positions), k, bias, scale, padding, rows)
        selection = ats(received, v, padding, k=k, size=size)
        out_padding = selection.padding
        queries = select_tokens(x, selection)
        # the output tokens' queries from those already projected (b, h, n, d) -> (b, h, m, d):
        # the projection is affine, so a merged slot's query is the mean of its tokens' queries
        q_positions = _kept(positions, selection)
        q = rotate(q_norm(select_tokens(q_raw.transpose(1, 2), selection).transpose(1, 2)), q_positions)
    else:
        q_proj, kv_proj = _split_projections(all_proj)
        k, v = _project(x, kv_proj, padding, heads)
        k = rotate(k_norm(k), positions)
        cls_attn = None
        if ats.uses_attention_scores:  # the class token is a prefix token: never rotated
            q_cls = q_norm(_project(x[:, :1], q_proj, None, heads)[0])
            cls_pair = None
            if pair_bias is not None and positions is not None:
                cls_pair = pair_bias(positions[:, :1], positions)
            cls_attn = cls_attention(q_cls, k, bias, scale, cls_pair)
        selection = ats(cls_attn, v, padding, k=k, size=size)
        out_padding = selection.padding
        queries = select_tokens(x, selection)
        q_positions = _kept(positions, selection)
        q = rotate(q_norm(_project(queries, q_proj, out_padding, heads)[0]), q_positions)
    pair = None
    if pair_bias is not None and positions is not None and q_positions is not None:
        pair = pair_bias(q_positions, positions)
    out = attend_padded(q, k, v, bias, dropout_p, scale, pair, out_padding, padding)
    out = out.transpose(1, 2).flatten(2)  # (b, m, h d)
    if gate is None:
        return tokenwise(lambda t: proj(out_norm(t)), out, out_padding), selection
    gated = tokenwise(lambda t, t_in: proj(out_norm(t) * gate(t_in).sigmoid()), out, out_padding, queries)
    return gated, selection


class SamplingAttention(nn.Module):
    """Multi-head self-attention (input already normalised) that may drop tokens.

    With ``cap=None``, or when a layer has no more than ``cap`` non-prefix
    tokens, it is plain attention. Otherwise keys and values are computed for all tokens,
    queries only for the CLS token (to score) and for the kept tokens (to produce outputs);
    ``options`` say how tokens are selected (default: the paper's ATS).
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
        cap: int | None = None,
        options: SamplingOptions | None = None,
        *,
        num_prefix_tokens: int = 1,
    ) -> None:
        super().__init__()
        self.heads = heads
        self.inner_dim = heads * dim_head
        self.scale = dim_head**-0.5
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * self.inner_dim, bias=False)
        self.proj = nn.Linear(self.inner_dim, dim)
        self.proj_drop = nn.Dropout(dropout)
        self.ats = (
            None if cap is None else AdaptiveTokenSampling(cap, options, num_prefix_tokens=num_prefix_tokens)
        )

    def forward(
        self, x: Tensor, padding: Padding | None = None, size: Tensor | None = None
    ) -> tuple[Tensor, TokenSelection | None]:
        """x: (b, n, dim) with its padding and token sizes -> output (b, m, dim) for the kept
        tokens (padded slots unspecified) and the selection, or None when this layer kept
        every token."""
        parts = AttentionParts(
            self.qkv.weight,
            self.qkv.bias,
            self.heads,
            self.scale,
            dropout_p=self.dropout if self.training else 0.0,
            proj=lambda t: self.proj_drop(self.proj(t)),
        )
        return sampled_self_attention(x, padding, self.ats, parts, size=size)
