"""Helpers for tests and benchmarks that need models which attend like trained ones.

Randomly initialised ViTs attend almost uniformly, so every image keeps the cap and nothing
is adaptive. Scaling the query weights makes attention peaked, as in trained models, so that
images keep different numbers of tokens (no weights are downloaded).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ats_vit.families import family_of

__all__ = ["sharpen_queries"]


@torch.no_grad()
def sharpen_queries(model: nn.Module, factor: float) -> nn.Module:
    """Multiply every block's query projection by ``factor`` (in place); returns the model.
    Works for every family: fused qkv weights (ours, timm) and separate q projections (HF)."""
    for block in family_of(model).blocks:
        parts = getattr(block, "_ats_parts", None)  # Hugging Face layers: the family reads them
        if parts is not None:
            parts(block).q.weight *= factor
            continue
        attn: Any = next(getattr(block, a) for a in ("attn", "attention") if hasattr(block, a))
        attn = getattr(attn, "attention", attn)  # TimeSformer: attention.attention.qkv
        if getattr(attn, "qkv", None) is not None:
            weight = attn.qkv.weight
            weight[: weight.shape[0] // 3] *= factor
        else:
            attn.q_proj.weight *= factor
    return model
