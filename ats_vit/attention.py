"""Attention that samples tokens.

The CLS attention row is computed on its own (one query against all keys) to score tokens;
everything else goes through fused ``F.scaled_dot_product_attention`` for only the kept
queries, with a key padding mask once a batch has been padded. The functions here are shared
by our :class:`~ats_vit.vit.ViT` and the timm integration.
"""

from __future__ import annotations

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ats_vit.sampling import AdaptiveTokenSampling, Padding, Sampler, TokenSelection, gather_tokens, tokenwise

__all__ = ["SamplingAttention", "attend", "cls_attention"]


def cls_attention(q_cls: Tensor, k: Tensor, key_mask: Tensor | None, scale: float) -> Tensor:
    """Softmax attention of the CLS query over all keys, in float32.

    q_cls: (b, h, 1, d), k: (b, h, n, d), key_mask: (b, n) bool or None -> (b, h, n).
    """
    logits = (q_cls @ k.transpose(-1, -2)).squeeze(-2).float() * scale
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, :], float("-inf"))
    return logits.softmax(dim=-1)


def attend(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, dropout_p: float = 0.0) -> Tensor:
    """Fused attention of queries over keys that are not padding.

    q: (b, h, m, d), k/v: (b, h, n, d), key_mask: (b, n) bool or None -> (b, h, m, d).
    The scale is SDPA's default ``d ** -0.5``.
    """
    attn_mask = None if key_mask is None else rearrange(key_mask, "b n -> b 1 1 n")
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)


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
        """x: (b, n, dim) with its padding -> output (b, m, dim) for the kept tokens (0 at
        padded slots) and the selection, or None when this layer kept every token."""
        h = self.heads
        key_mask = None if padding is None else padding.mask
        dropout_p = self.dropout if self.training else 0.0
        if self.ats is None or not self.ats.needed(x.shape[1]):
            q, k, v = rearrange(tokenwise(self.qkv, x, padding), "b n (t h d) -> t b h n d", t=3, h=h)
            selection, out_padding = None, padding
        else:
            w_q, w_kv = self.qkv.weight.split((self.inner_dim, 2 * self.inner_dim))
            kv = tokenwise(lambda t: F.linear(t, w_kv), x, padding)
            k, v = rearrange(kv, "b n (t h d) -> t b h n d", t=2, h=h)
            q_cls = rearrange(F.linear(x[:, :1], w_q), "b n (h d) -> b h n d", h=h)
            selection = self.ats(cls_attention(q_cls, k, key_mask, self.scale), v, padding)
            out_padding = selection.padding
            kept = gather_tokens(x, selection.index)
            q = tokenwise(lambda t: F.linear(t, w_q), kept, out_padding)
            q = rearrange(q, "b m (h d) -> b h m d", h=h)
        out = rearrange(attend(q, k, v, key_mask, dropout_p), "b h m d -> b m (h d)")
        return tokenwise(lambda t: self.proj_drop(self.proj(t)), out, out_padding), selection
