"""What the timm and Hugging Face integrations share.

Both patch block *instances* of a pretrained model: each block's ``forward`` becomes an
instance attribute that calls :func:`ats_vit.attention.sampled_self_attention` with the
model's own modules, and the chosen blocks get an
:class:`~ats_vit.sampling.AdaptiveTokenSampling` submodule (no parameters, so state dicts are
unchanged). Deleting those attributes restores the class's behaviour. A :class:`PatchState`
shared by the blocks of one model carries the padding, token sizes, positions and the cost
trace from block to block within a forward pass.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ats_vit import _validate
from ats_vit.flops import TokenTrace, ViTCost, gflops
from ats_vit.sampling import SAMPLERS, AdaptiveTokenSampling, Padding, TokenSelection, select_tokens

STATE = "_ats_state"
_BLOCK_ATTRS = ("ats", STATE, "_ats_index", "forward")


@dataclass
class ATSInfo:
    """What the last forward pass of a patched model kept.

    token_ids: (b, m) patch indices (0-based, prefix tokens excluded) alive after the last
        block, -1 for padding. kept_per_layer: (b, depth) patch tokens each block output.
    gflops: (b,) analytic GFLOPs per image from the tokens actually kept.
    """

    token_ids: Tensor
    kept_per_layer: Tensor
    gflops: Tensor


class PatchState:
    """Carries padding, token sizes and bookkeeping from block to block in one forward pass."""

    def __init__(self, num_prefix_tokens: int, cost: ViTCost, depth: int) -> None:
        self.num_prefix_tokens = num_prefix_tokens
        self.cost = cost
        self.depth = depth
        self.padding: Padding | None = None
        self.size: Tensor | None = None
        self.positions: Tensor | None = None
        self.trace: TokenTrace | None = None
        # (layer, hidden): blocks before `layer` are skipped and hand on `hidden`, the dense
        # input of that block (budget calibration computes the dense layers once)
        self.replay: tuple[int, Tensor] | None = None

    def start(self, x: Tensor) -> None:
        b, n, _ = x.shape
        self.padding, self.size = None, None
        self.positions = torch.arange(n, device=x.device).expand(b, n)
        self.trace = TokenTrace(n - self.num_prefix_tokens, self.num_prefix_tokens)

    def skip(self, block: nn.Module) -> Tensor | None:
        """The replayed output of ``block`` when it comes before the replay layer, else None."""
        if self.replay is None or block._ats_index >= self.replay[0]:
            return None
        hidden = self.replay[1]
        self.trace.record(hidden, None)
        return hidden

    def select(self, x: Tensor, selection: TokenSelection | None) -> Tensor:
        """The residual stream after a block's selection (x itself when it kept everything)."""
        if selection is None:
            return x
        self.padding, self.size = selection.padding, selection.size
        self.positions = self.positions.gather(1, selection.index)
        return select_tokens(x, selection)

    def record(self, x: Tensor, block: nn.Module, selection: TokenSelection | None) -> None:
        rule = None if selection is None else block.ats.rule
        self.trace.record(x, self.padding, rule=rule, positions=self.positions)

    def info(self) -> ATSInfo:
        p = self.num_prefix_tokens
        ids = self.positions[:, p:] - p
        if self.padding is not None:
            ids = ids.masked_fill(~self.padding.mask[:, p:], -1)
        return ATSInfo(ids, self.trace.kept_per_layer(), gflops(self.cost, self.trace))


def block_state(block: nn.Module, x: Tensor) -> PatchState:
    """The state of a patched block's model; the first block starts a new forward pass."""
    state: PatchState = getattr(block, STATE)
    if block._ats_index == 0:
        state.start(x)
    return state


@contextmanager
def replaying(model: nn.Module, layer: int, hidden: Tensor) -> Iterator[None]:
    """Within the block, forward passes of a patched ``model`` skip the blocks before
    ``layer`` and feed it ``hidden`` (its input in a dense pass); they are traced as dense."""
    state: PatchState = getattr(model, STATE)
    state.replay = (layer, hidden)
    try:
        yield
    finally:
        state.replay = None


def chosen_layers(layers: Iterable[int] | None, depth: int) -> list[int]:
    if layers is None:
        return list(range(depth))
    if isinstance(layers, int) or not isinstance(layers, Iterable):
        raise TypeError(f"layers must be an iterable of block indices, got {layers!r}")
    chosen = list(layers)
    for i in chosen:
        if not _validate.is_int(i) or not 0 <= i < depth:
            raise ValueError(f"layers must hold block indices in [0, {depth}), got {i!r} in {chosen}")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"layers must not repeat a block, got {chosen}")
    return sorted(chosen)


def layer_caps(max_tokens: int | Sequence[int], count: int) -> list[int]:
    """``max_tokens`` (an int, or one per chosen layer) as a list of ``count`` caps."""
    if _validate.is_int(max_tokens):
        return [_validate.positive_int("max_tokens", max_tokens)] * count
    if isinstance(max_tokens, Sequence) and not isinstance(max_tokens, str):
        caps = [_validate.positive_int(f"max_tokens[{i}]", t) for i, t in enumerate(max_tokens)]
        if len(caps) != count:
            raise ValueError(f"max_tokens has {len(caps)} entries but layers selects {count} blocks")
        return caps
    raise TypeError(f"max_tokens must be an int or a sequence of ints, got {max_tokens!r}")


def patch(
    model: nn.Module,
    blocks: Sequence[nn.Module],
    forward: Callable[..., Tensor],
    state: PatchState,
    layers: Iterable[int] | None,
    max_tokens: int | Sequence[int],
    **ats_options,
) -> None:
    """Bind ``forward`` to every block and give the chosen ones a sampling module."""
    chosen = chosen_layers(layers, len(blocks))
    caps = dict(zip(chosen, layer_caps(max_tokens, len(chosen)), strict=True))
    _validate.choice("sampler", ats_options.get("sampler", "inverse_transform"), SAMPLERS)
    unpatch(model, blocks)
    for i, block in enumerate(blocks):
        if i in caps:
            block.ats = AdaptiveTokenSampling(
                caps[i], num_prefix_tokens=state.num_prefix_tokens, **ats_options
            ).train(block.training)  # new modules default to training mode, which jitters
        setattr(block, STATE, state)
        block._ats_index = i
        block.forward = types.MethodType(forward, block)
    setattr(model, STATE, state)


def unpatch(model: nn.Module, blocks: Sequence[nn.Module]) -> None:
    for block in blocks:
        for name in _BLOCK_ATTRS:
            if name in block.__dict__ or name in block._modules:
                delattr(block, name)
    if STATE in model.__dict__:
        delattr(model, STATE)


def finished_state(model: nn.Module, name: str, module: str) -> PatchState:
    state: PatchState | None = getattr(model, STATE, None)
    if state is None:
        raise ValueError(f"{name} is not patched with {module}.apply")
    if state.trace is None or len(state.trace.counts) != state.depth:
        raise ValueError("no complete forward pass has run since the model was patched")
    return state


def budget_adapter(
    model: nn.Module,
    blocks: Sequence[nn.Module],
    cost: ViTCost,
    apply: Callable[..., nn.Module],
    logits: Callable[[Tensor], Tensor],
):
    """The :class:`ats_vit.budget.Adapter` of a patched family: budgets go through ``apply``
    (a dense budget patches no layer, so every forward still leaves a trace of its cost; an
    unpatched model is patched so); ``logits`` runs the model on images."""
    from ats_vit.budget import Adapter

    depth, num_patches = len(blocks), cost.num_patches
    if not hasattr(model, STATE):
        apply(layers=[], max_tokens=1)

    def run(images: Tensor, start: int = 0, hidden: Tensor | None = None) -> tuple[Tensor, TokenTrace]:
        if hidden is None:
            out = logits(images)
        else:
            with replaying(model, start, hidden):
                out = logits(images)
        return out, finished_state(model, type(model).__name__, "ats_vit").trace

    def configure(budget) -> None:
        if budget is None:
            apply(layers=[], max_tokens=1)
            return
        caps = budget.schedule(depth, num_patches)[budget.start_layer :]
        apply(
            layers=range(budget.start_layer, depth),
            max_tokens=list(caps),
            sampler=budget.sampler,
            temperature=budget.temperature,
            dropped=budget.dropped,
        )

    return Adapter(depth, num_patches, configure, run, blocks, cost)
