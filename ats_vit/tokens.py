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

from dataclasses import dataclass

import torch
from torch import Tensor

from ats_vit.flops import TokenTrace, ViTCost, gflops
from ats_vit.sampling import Padding, TokenSelection, select_tokens

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
    input in a dense pass; earlier blocks are skipped and traced as dense.
    """

    def __init__(self, x: Tensor, num_prefix_tokens: int, resume: tuple[int, Tensor] | None = None) -> None:
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
        self._rule: str | None = None  # how the block under way selected, until it records

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
        if selection is None:
            self._rule = None
            return x + out
        self.padding, self.size, self._rule = selection.padding, selection.size, selection.rule
        self.positions = self.positions.gather(1, selection.index)
        if selection.late:
            return select_tokens(x + out, selection)
        return select_tokens(x, selection) + out

    def record(self, x: Tensor) -> None:
        """Record a block's output x: (b, m, c) in the trace (after :meth:`follow`)."""
        rule = self._rule
        self.trace.record(x, self.padding, rule=rule, positions=self.positions if rule else None)
        self._rule = None

    def token_ids(self) -> Tensor:
        """(b, m) patch indices alive now (0-based, prefix excluded), -1 for padding."""
        p = self.num_prefix_tokens
        ids = self.positions[:, p:] - p
        return ids if self.padding is None else ids.masked_fill(~self.padding.mask[:, p:], -1)

    def info(self, cost: ViTCost) -> ATSInfo:
        return ATSInfo(self.token_ids(), self.trace.kept_per_layer(), gflops(cost, self.trace))
