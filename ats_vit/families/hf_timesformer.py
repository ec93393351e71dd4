"""Hugging Face TimeSformer (divided space-time attention) with ATS over space-time tubes.

A TimeSformer layer attends in time within each patch position (a *tube* of T frames), then in
space within each frame (the class token copied into every frame, its outputs averaged), then
runs the MLP on every token. Dropping single space-time tokens would break both groupings, so
here the unit a layer keeps or drops is the tube: a patch position in all frames at once.

- **Significance of a tube**: the paper's score of its position in each frame (the class
  query's spatial attention times the value's norm, per head), averaged over the frames. The
  rules see a (b, heads, tubes) attention map, the frame mean of the class row, and a value
  norm per tube that makes their product that mean score; top-k / EViT rank by the frame mean
  of the class attention, ToMe compares the frame mean of the keys.
- **Where it selects**: after the spatial attention. A discarding rule gives queries only to the
  kept tubes (each query's row does not depend on the others, so the kept tubes get exactly
  what they get in a dense layer); a merging rule (ToMe, fuse, merge) lets every token attend
  and averages whole tubes frame by frame afterwards, as ToMe merges after attention.
- Time attention and the MLP run on the real tubes only (padding packed away); the class token
  is one token (its MLP runs once, as in the model).

The layers of the model pass Hugging Face's (b, 1 + tubes x T, c) position-major tokens between
them; the token state (:class:`~ats_vit.tokens.TokenState`) works on tubes: (b, 1 + tubes, T x c)
rows whose first row holds the class token T times. Token ids, traces, pictures and
:meth:`TimesformerFamily.restore` therefore speak of patch positions. Served: the default
``attention_type="divided_space_time"``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from einops import rearrange
from torch import Tensor
from torch.nn.functional import linear

from ats_vit.attention import attend, cls_attention, key_bias
from ats_vit.families._patched import block_state, patched_once, refuse_dct
from ats_vit.families.hf import HFFamily
from ats_vit.sampling import Padding, TokenSelection, gather_tokens, tokenwise
from ats_vit.tokens import TokenState

__all__ = ["TimesformerFamily", "family"]


def to_tubes(tokens: Tensor, frames: int) -> Tensor:
    """(b, 1 + k x T, c) position-major tokens -> (b, 1 + k, T x c) tubes (the class token
    repeated in the first row)."""
    b, n, c = tokens.shape
    cls = tokens[:, :1].repeat(1, 1, frames)
    return torch.cat((cls, tokens[:, 1:].reshape(b, (n - 1) // frames, frames * c)), dim=1)


def to_tokens(tubes: Tensor, frames: int) -> Tensor:
    """The inverse of :func:`to_tubes`."""
    b, m, width = tubes.shape
    c = width // frames
    return torch.cat((tubes[:, :1, :c], tubes[:, 1:].reshape(b, (m - 1) * frames, c)), dim=1)


def _patch_padding(padding: Padding | None) -> Padding | None:
    """The padding of a tube grid without its first (class) row: (b, m) -> (b, m - 1)."""
    if padding is None:
        return None
    mask = padding.mask[:, 1:]
    rows = padding.rows
    if rows is not None:
        m = padding.mask.shape[1]
        # every image's class row is real: drop those b rows (moved last by a stable sort, no sync)
        order = torch.argsort((rows % m == 0).to(torch.int8), stable=True)[: rows.numel() - mask.shape[0]]
        rows = rows[order]
        rows = rows - rows // m - 1  # row i*m + j (j >= 1) of (b, m) is row i*(m-1) + j-1 of (b, m-1)
    return Padding(mask, rows)


def _frame_padding(padding: Padding | None, frames: int) -> Padding | None:
    """The padding of (b x T, m) per-frame token grids from that of the (b, m) tube grid."""
    if padding is None:
        return None
    m = padding.mask.shape[1]
    rows = padding.rows
    if rows is not None:
        image = rows // m
        shift = torch.arange(frames, device=rows.device) * m
        rows = (rows + image * (frames - 1) * m)[:, None] + shift  # (real, T): row of each frame
        rows = rows.flatten()
    return Padding(padding.mask.repeat_interleave(frames, dim=0), rows)


def _split_heads(y: Tensor, heads: int) -> tuple[Tensor, ...]:
    """(b, n, 3 h d) fused q, k, v -> three (b, h, n, d)."""
    return tuple(rearrange(y, "b n (t h d) -> t b h n d", t=3, h=heads).unbind(0))


def _heads(y: Tensor, heads: int) -> Tensor:
    return rearrange(y, "b n (h d) -> b h n d", h=heads)


def _layer_forward(
    self: Any, hidden_states: Tensor, output_attentions: bool = False, *a: Any, **kw: Any
) -> Any:
    """TimesformerLayer.forward (divided space-time) with tube sampling; bound to patched layers."""
    if output_attentions:
        raise ValueError("ATS-patched TimeSformer layers return no attention maps (output_attentions=True)")
    frames = self._ats_frames
    state = block_state(self, to_tubes(hidden_states, frames))
    skipped = state.skip(self._ats_index)
    if skipped is not None:
        return (to_tokens(skipped, frames),)
    b, c = hidden_states.shape[0], hidden_states.shape[-1]
    m = state.positions.shape[1]  # tubes, class row included
    padding, size = state.padding, state.size
    cls, tubes = hidden_states[:, :1], hidden_states[:, 1:].reshape(b, m - 1, frames * c)
    time, space = self.temporal_attention, self.attention

    def time_branch(t: Tensor) -> Tensor:  # (N, T c) real tubes -> (N, T c)
        x = self.temporal_layernorm(t.reshape(-1, frames, c))
        q, k, v = _split_heads(time.attention.qkv(x), time.attention.num_heads)
        drop = time.attention.attn_drop.p if self.training else 0.0
        y = attend(q, k, v, None, drop, time.attention.scale)
        y = time.output(rearrange(y, "n h t d -> n t (h d)"))
        return self.temporal_dense(self.drop_path(y)).reshape(*t.shape)

    tubes = tubes + tokenwise(time_branch, tubes, _patch_padding(padding))
    # space: the class token and every tube's token of one frame, frame by frame
    inner, heads = space.attention, space.attention.num_heads
    x = torch.cat((cls.expand(b, frames, c)[:, :, None], tubes.view(b, m - 1, frames, c).transpose(1, 2)), 2)
    normed = self.layernorm_before(x.reshape(b * frames, m, c))  # (b T, m, c)
    frame_pad = _frame_padding(padding, frames)
    w_q, w_kv = inner.qkv.weight.split((c, 2 * c))
    b_q, b_kv = (None, None) if inner.qkv.bias is None else inner.qkv.bias.split((c, 2 * c))
    bias = key_bias(padding, size if self.ats.proportional else None)
    frame_bias = None if bias is None else bias.repeat_interleave(frames, dim=0)
    selection: TokenSelection | None = None
    refuse_dct(self, "TimeSformer", "its tubes are counted and timed per patch position")
    if self.ats.needed(m):
        kv = tokenwise(partial(linear, weight=w_kv, bias=b_kv), normed, frame_pad)
        k, v = rearrange(kv, "b n (t h d) -> t b h n d", t=2, h=heads).unbind(0)

        def per_frame(t: Tensor) -> Tensor:  # (b T, ...) -> (b, T, ...)
            return t.view(b, frames, *t.shape[1:])

        k_mean = per_frame(k).mean(dim=1)  # (b, h, m, d): ToMe's metric of a tube
        cls_attn = None
        v_norm = v.new_ones(b, heads, m, 1)
        if self.ats.uses_attention_scores:
            # the class token's query: one per clip (its input is the same in every frame)
            q_cls = linear(normed.view(b, frames, m, c)[:, 0, :1], w_q, b_q)
            q_cls = rearrange(q_cls, "b n (h d) -> b h n d", h=heads).repeat_interleave(frames, dim=0)
            frame_attn = per_frame(cls_attention(q_cls, k, frame_bias, inner.scale))  # (b, T, h, m)
            cls_attn = frame_attn.mean(dim=1)
            score = (frame_attn * per_frame(v.float().norm(dim=-1))).mean(dim=1)
            # a value norm per tube that makes cls_attn x norm the frame mean of the scores
            v_norm = (score / cls_attn.clamp_min(torch.finfo(score.dtype).tiny))[..., None]
        selection = self.ats(cls_attn, v_norm, padding, k=k_mean, size=size)
    drop = inner.attn_drop.p if self.training else 0.0
    if selection is not None and selection.merge is None:  # discard: queries of the kept tubes only
        out_pad = _frame_padding(selection.padding, frames)
        kept = gather_tokens(normed.view(b, frames, m, c).transpose(1, 2), selection.index)
        queries = kept.transpose(1, 2).reshape(b * frames, -1, c)
        q = _heads(tokenwise(partial(linear, weight=w_q, bias=b_q), queries, out_pad), heads)
    else:
        out_pad = frame_pad
        if selection is None:
            q, k, v = _split_heads(tokenwise(inner.qkv, normed, frame_pad), heads)
        else:  # a merging rule: every token attends, whole tubes merge after (as ToMe)
            q = _heads(tokenwise(partial(linear, weight=w_q, bias=b_q), normed, frame_pad), heads)
            selection = selection._replace(late=True)
    y = rearrange(attend(q, k, v, frame_bias, drop, inner.scale), "b h n d -> b n (h d)")
    y = self.drop_path(tokenwise(space.output, y, out_pad))  # (b T, m_out, c)
    y = y.view(b, frames, -1, c)
    out = torch.cat(
        (y[:, :, :1].mean(dim=1).repeat(1, 1, frames), y[:, :, 1:].transpose(1, 2).flatten(2)), dim=1
    )
    before = torch.cat((cls.repeat(1, 1, frames), tubes), dim=1)
    residual = state.follow(before, out, selection)  # (b, m_out, T c)
    state.record(residual)
    tokens = to_tokens(residual, frames)
    mlp_pad = _patch_padding(state.padding)

    def mlp(t: Tensor) -> Tensor:
        return self.output(self.intermediate(self.layernorm_after(t)))

    mlp_out = torch.cat(
        (
            mlp(tokens[:, :1]),
            tokenwise(
                lambda t: mlp(t.unflatten(-1, (frames, c))).flatten(-2), residual[:, 1:], mlp_pad
            ).reshape(b, -1, c),
        ),
        dim=1,
    )
    return (tokens + self.drop_path(mlp_out),)


class TimesformerFamily(HFFamily):
    """A ``TimesformerModel`` or ``TimesformerForVideoClassification``; its tokens are tubes
    (this module's docstring), ``num_patches`` counts patch positions and ``frames`` frames."""

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        self.frames = self.cost.frames

    def patch(self, forward: Callable[..., Tensor]) -> None:
        super().patch(forward)
        for block in self.blocks:
            block._ats_frames = self.frames

    def unpatch(self) -> None:
        for block in self.blocks:
            block.__dict__.pop("_ats_frames", None)
        super().unpatch()

    def run(self, images: Tensor, start: int = 0, hidden: Tensor | None = None) -> tuple[Tensor, TokenState]:
        return super().run(images, start, None if hidden is None else to_tubes(hidden, self.frames))

    def run_block(
        self, block: Any, x: Tensor, *, padding: Padding | None = None, size: Tensor | None = None
    ) -> Tensor:
        """x: (b, n, c), one token per tube (class token first), copied into every frame."""
        tokens = torch.cat((x[:, :1], x[:, 1:].repeat_interleave(self.frames, dim=1)), dim=1)
        state = TokenState(to_tubes(tokens, self.frames), self.num_prefix_tokens)
        state.padding, state.size = padding, size
        out: Tensor = self._run_block(block, tokens, state)[0]  # the layer returns a tuple
        return out

    def restore(self, tokens: Tensor) -> Tensor:
        """(b, 1 + kept tubes x T, c) ``last_hidden_state`` -> (b, 1 + patches x T, c)."""
        norm, frames = self.final_norm(), self.frames

        def tube_norm(t: Tensor) -> Tensor:
            return t if norm is None else norm(t.unflatten(-1, (frames, -1))).flatten(-2)

        return to_tokens(self.last_state().restore(to_tubes(tokens, frames), tube_norm), frames)


def _models() -> tuple[type, ...]:
    from transformers.models.timesformer.modeling_timesformer import (
        TimesformerForVideoClassification,
        TimesformerModel,
    )

    return (TimesformerModel, TimesformerForVideoClassification)


MODELS = _models()


def family(model: Any) -> TimesformerFamily:
    """The family of a Hugging Face TimeSformer, patching it (dense) the first time."""
    return patched_once(model, TimesformerFamily, lambda m: m, _layer_forward)
