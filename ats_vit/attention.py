"""Attention that samples tokens.

The CLS attention row is computed on its own (one query against all keys) to score tokens;
everything else goes through fused ``F.scaled_dot_product_attention`` for only the kept
queries, with a key padding mask once a batch has been padded. The functions here are shared
by our :class:`~ats_vit.vit.ViT` and the timm integration.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ats_vit.sampling import AdaptiveTokenSampling, Padding, Sampler, TokenSelection, gather_tokens, tokenwise

__all__ = ["SamplingAttention", "attend", "cls_attention", "sampled_self_attention"]

TensorFn = Callable[[Tensor], Tensor]


def _identity(t: Tensor) -> Tensor:
    return t


def cls_attention(q_cls: Tensor, k: Tensor, key_mask: Tensor | None, scale: float) -> Tensor:
    """Softmax attention of the CLS query over all keys, in float32.

    q_cls: (b, h, 1, d), k: (b, h, n, d), key_mask: (b, n) bool or None -> (b, h, n).
    """
    logits = (q_cls @ k.transpose(-1, -2)).squeeze(-2).float() * scale
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, :], float("-inf"))
    return logits.softmax(dim=-1)


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_mask: Tensor | None,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> Tensor:
    """Fused attention of queries over keys that are not padding.

    q: (b, h, m, d), k/v: (b, h, n, d), key_mask: (b, n) bool or None -> (b, h, m, d).
    """
    attn_mask = None if key_mask is None else rearrange(key_mask, "b n -> b 1 1 n")
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)


def sampled_self_attention(
    x: Tensor,
    padding: Padding | None,
    ats: AdaptiveTokenSampling | None,
    *,
    qkv_weight: Tensor,
    qkv_bias: Tensor | None,
    heads: int,
    scale: float,
    dropout_p: float = 0.0,
    q_norm: TensorFn = _identity,
    k_norm: TensorFn = _identity,
    gate: TensorFn | None = None,
    out_norm: TensorFn = _identity,
    proj: TensorFn = _identity,
) -> tuple[Tensor, TokenSelection | None]:
    """Self-attention over x (already normalised) that keeps only the tokens ``ats`` samples.

    x: (b, n, c) with its padding -> (b, m, c_out) for the kept tokens (padded slots are
    unspecified and masked downstream) and the selection, or None when the layer kept every
    token. The callables are the model's own
    modules: ``q_norm``/``k_norm`` act per head on (b, h, n, d); ``gate`` (sigmoid gate from
    the input), ``out_norm`` and ``proj`` act per token. Keys and values are computed for all
    tokens; queries only for CLS (to score) and for the kept tokens.
    """
    key_mask = None if padding is None else padding.mask
    if ats is None or not ats.needed(x.shape[1]):
        qkv = tokenwise(lambda t: F.linear(t, qkv_weight, qkv_bias), x, padding)
        q, k, v = rearrange(qkv, "b n (t h d) -> t b h n d", t=3, h=heads)
        q, k = q_norm(q), k_norm(k)
        selection, out_padding, queries = None, padding, x
    else:
        inner = qkv_weight.shape[0] // 3
        w_q, w_kv = qkv_weight.split((inner, 2 * inner))
        b_q, b_kv = (None, None) if qkv_bias is None else qkv_bias.split((inner, 2 * inner))
        kv = tokenwise(lambda t: F.linear(t, w_kv, b_kv), x, padding)
        k, v = rearrange(kv, "b n (t h d) -> t b h n d", t=2, h=heads)
        k = k_norm(k)
        q_cls = q_norm(rearrange(F.linear(x[:, :1], w_q, b_q), "b n (h d) -> b h n d", h=heads))
        selection = ats(cls_attention(q_cls, k, key_mask, scale), v, padding)
        out_padding = selection.padding
        queries = gather_tokens(x, selection.index)
        q = tokenwise(lambda t: F.linear(t, w_q, b_q), queries, out_padding)
        q = q_norm(rearrange(q, "b m (h d) -> b h m d", h=heads))
    out = rearrange(attend(q, k, v, key_mask, dropout_p, scale), "b h m d -> b m (h d)")
    if gate is None:
        return tokenwise(lambda t: proj(out_norm(t)), out, out_padding), selection
    gated = tokenwise(lambda t, t_in: proj(out_norm(t) * gate(t_in).sigmoid()), out, out_padding, queries)
    return gated, selection


class SamplingAttention(nn.Module):
    """Multi-head self-attention (input already normalised) that may drop tokens.

    With ``max_tokens=None``, or when a layer has no more than ``max_tokens`` non-prefix
    tokens, it is plain attention. Otherwise keys and values are computed for all tokens,
    queries only for the CLS token (to score) and for the kept tokens (to produce outputs).
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
        max_tokens: int | None = None,
        sampler: Sampler = "inverse_transform",
        *,
        num_prefix_tokens: int = 1,
        static_shape: bool = False,
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
            None
            if max_tokens is None
            else AdaptiveTokenSampling(
                max_tokens, sampler, num_prefix_tokens=num_prefix_tokens, static_shape=static_shape
            )
        )

    def forward(self, x: Tensor, padding: Padding | None = None) -> tuple[Tensor, TokenSelection | None]:
        """x: (b, n, dim) with its padding -> output (b, m, dim) for the kept tokens (padded
        slots unspecified) and the selection, or None when this layer kept every token."""
        return sampled_self_attention(
            x,
            padding,
            self.ats,
            qkv_weight=self.qkv.weight,
            qkv_bias=self.qkv.bias,
            heads=self.heads,
            scale=self.scale,
            dropout_p=self.dropout if self.training else 0.0,
            proj=lambda t: self.proj_drop(self.proj(t)),
        )
