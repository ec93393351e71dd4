"""The tokens of one forward pass, as they go from block to block, for every model family.

A :class:`TokenState` is made at the first block of a pass and carries what the blocks of our
:class:`~ats_vit.vit.ViT`, a patched timm model or a patched Hugging Face model need between
them: the padding of the token grid, how many patches each token stands for (once tokens
merge), where each token came from, and the per-block trace that GFLOPs are counted from. A
block asks it two things: :meth:`TokenState.follow` (the residual stream after its attention
selected tokens) and :meth:`TokenState.record` (its output, for the trace).

For calibration, a pass may start at a later block from that block's dense input
(``resume``): the blocks before it are skipped (:meth:`TokenState.skip`) and traced as dense,
so a search over budgets computes the dense layers once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ats_vit.flops import TokenTrace, ViTCost, gflops
from ats_vit.options import Rule
from ats_vit.sampling import (
    AdaptiveTokenSampling,
    Padding,
    TokenSelection,
    dct_reduce,
    gather_tokens,
    select_tokens,
)

__all__ = ["ATSInfo", "TokenState"]


@dataclass
class ATSInfo:
    """What a forward pass kept.

    token_ids: (b, m) patch indices (0-based, prefix tokens excluded) alive after the last
        block, -1 for padding. kept_per_layer: (b, depth) patch tokens each block output.
    gflops: (b,) analytic GFLOPs per image from the tokens actually kept.
    """

    token_ids: Tensor
    kept_per_layer: Tensor
    gflops: Tensor


class TokenState:
    """Padding, token sizes, original positions and the cost trace of one forward pass.

    x: (b, n, c) the input of the first block (prefix tokens first). ``resume=(layer,
    hidden)``: the pass starts at block ``layer`` from ``hidden``, that block's (b, n, c)
    input in a dense pass; earlier blocks are skipped and traced as dense. ``track``: also
    follow every original token to its slot and keep the last state of those dropped, so
    that :meth:`restore` can give per-patch outputs on the full grid.
    """

    def __init__(
        self, x: Tensor, num_prefix_tokens: int, resume: tuple[int, Tensor] | None = None, track: bool = False
    ) -> None:
        b, n, _ = x.shape
        if resume is not None and resume[1].shape[:2] != (b, n):
            raise ValueError(
                f"the hidden state to resume from must be (b, n, c) = ({b}, {n}, c), "
                f"got {tuple(resume[1].shape)}"
            )
        self.num_prefix_tokens = num_prefix_tokens
        self.padding: Padding | None = None
        self.size: Tensor | None = None  # (b, m) patches per token once tokens merge
        self.positions = torch.arange(n, device=x.device).expand(b, n)  # (b, m) original positions
        self.trace = TokenTrace(n - num_prefix_tokens, num_prefix_tokens)
        self.resume = resume
        self._selection: TokenSelection | None = None  # the block under way's, until it records
        # with ``track`` (SamplingOptions(restorable=True)): where each original token is now
        # (its slot, -1 once dropped) and the last residual state of the dropped ones
        self.slot_of: Tensor | None = self.positions.clone() if track else None
        self.last: Tensor | None = None

    def skip(self, index: int) -> Tensor | None:
        """The output of block ``index`` when the pass resumes at a later block, else None."""
        if self.resume is None or index >= self.resume[0]:
            return None
        hidden = self.resume[1]
        self.trace.record(hidden, None)
        return hidden

    def follow(self, x: Tensor, out: Tensor, selection: TokenSelection | None) -> Tensor:
        """The residual stream after a block's attention: the rows of ``x`` that ``selection``
        keeps (merged where it merges; all of ``x`` when it is None) plus the attention
        output ``out`` of those tokens; or, for a late selection (ToMe), the selected rows of
        ``x + out``, ``out`` covering every token. Takes on the selection's padding, sizes and
        positions."""
        self._selection = selection
        if selection is None:
            return x + out
        self.padding, self.size = selection.padding, selection.size
        self.positions = self.positions.gather(1, selection.index)
        if selection.late:
            merged = x + out
            self._follow_tokens(merged, selection)
            return select_tokens(merged, selection)
        self._follow_tokens(x, selection)
        return select_tokens(x, selection) + out

    def _follow_tokens(self, x: Tensor, selection: TokenSelection) -> None:
        """Move every original token to its slot in the selection's output (merged tokens to
        the slot they joined) and keep the state ``x`` of those it drops."""
        if self.slot_of is None:
            return
        b, n_in = x.shape[:2]
        m = selection.index.shape[1]
        if selection.merge is not None:
            dest = selection.merge.dest  # (b, n_in) in [0, m]; m: dropped
        else:  # each kept input slot goes where the index puts it; padded output slots nowhere
            real = torch.ones_like(selection.index, dtype=torch.bool)
            if selection.padding is not None:
                real = selection.padding.mask
            source = torch.where(real, selection.index, n_in)
            dest = torch.full((b, n_in + 1), m, dtype=torch.long, device=x.device)
            dest = dest.scatter_(1, source, torch.arange(m, device=x.device).expand(b, m))[:, :n_in]
        alive = self.slot_of >= 0
        current = self.slot_of.clamp_min(0)
        new = dest.gather(1, current)
        dropped = alive & (new == m)
        if self.last is None:
            self.last = x.new_zeros(b, self.slot_of.shape[1], x.shape[-1])
        self.last = torch.where(dropped[..., None], gather_tokens(x, current), self.last)
        self.slot_of = torch.where(alive & ~dropped, new, -1)

    def restore(self, tokens: Tensor, norm: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """tokens: (b, m, c) what the last block output (or its normalised form) -> (b, n, c) on
        the full grid, prefix tokens first: each patch gets its token's output (a merged token's
        output goes to every patch it stands for), and a dropped patch its last residual state,
        through ``norm`` when ``tokens`` were normalised (so both are alike)."""
        if self.slot_of is None:
            raise ValueError(
                "this pass did not keep what restore() needs: run the model with "
                "SamplingOptions(restorable=True) (e.g. family_of(model).set_options(restorable=True))"
            )
        full = gather_tokens(tokens, self.slot_of.clamp_min(0))
        if self.last is None:
            return full
        last = self.last if norm is None else norm(self.last)
        return torch.where((self.slot_of < 0)[..., None], last.to(full.dtype), full)

    def after_mlp(self, x: Tensor, ats: AdaptiveTokenSampling | None) -> Tensor:
        """A block's output x: (b, n, c) after its MLP, reduced when ``ats`` does it there
        (``sampler="dct"``: every token attended and went through the MLP; now fewer tokens,
        each a mix of all, :func:`ats_vit.sampling.dct_reduce`); else x unchanged. The mixed
        tokens stand for no one patch: their positions become -1 (no picture, no restore)."""
        if ats is None or not ats.after_mlp or not ats.needed(x.shape[1]):
            return x
        if self.padding is not None:
            raise ValueError(
                "sampler='dct' transforms the same count in every image and takes no padded token grid "
                "(an earlier layer kept an adaptive count); use it in every sampling layer"
            )
        if self.slot_of is not None:
            raise ValueError(
                "sampler='dct' mixes every patch into every token, so restore() has no patch to put "
                "back: run it with restorable=False"
            )
        p = self.num_prefix_tokens
        x = dct_reduce(x, ats.cap, p)
        b, m = x.shape[:2]
        prefix = torch.arange(p, device=x.device).expand(b, p)
        self.positions = torch.cat((prefix, prefix.new_full((b, m - p), -1)), dim=1)
        self._selection = TokenSelection(self.positions, None, rule=Rule.DCT)
        return x

    def record(self, x: Tensor) -> None:
        """Record a block's output x: (b, m, c) in the trace (after :meth:`follow`)."""
        selection, self._selection = self._selection, None
        if selection is None or selection.rule is None:
            self.trace.record(x, self.padding)
            return
        self.trace.record(x, self.padding, selection.rule, self.positions, selection.received)

    def token_ids(self) -> Tensor:
        """(b, m) patch indices alive now (0-based, prefix excluded), -1 for padding and for the
        tokens of a cosine transform (each a mix of all patches)."""
        p = self.num_prefix_tokens
        ids = (self.positions[:, p:] - p).clamp_min(-1)
        return ids if self.padding is None else ids.masked_fill(~self.padding.mask[:, p:], -1)

    def info(self, cost: ViTCost) -> ATSInfo:
        return ATSInfo(self.token_ids(), self.trace.kept_per_layer(), gflops(cost, self.trace))
