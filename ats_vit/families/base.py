"""The family interface: what budgets, calibration and evaluation need of a model.

A :class:`Family` wraps one model of one library (our :class:`~ats_vit.vit.ViT`, a timm or a
Hugging Face ViT) and answers, the same way for all of them: its sizes (depth, patches, patch
and image size, prefix tokens, the FLOP cost model), its per-block
:class:`~ats_vit.sampling.AdaptiveTokenSampling` modules, and a forward pass that also hands
back the pass's :class:`~ats_vit.tokens.TokenState` (what was kept, for GFLOPs). Patching a
third-party model happens once, when its family is first asked for; after that,
:meth:`Family.set_schedule` only sets numbers on the sampling modules, in place.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from torch import Tensor, nn

from ats_vit import _validate
from ats_vit.flops import ViTCost, gflops
from ats_vit.options import SamplingOptions
from ats_vit.sampling import AdaptiveTokenSampling, Padding
from ats_vit.tokens import ATSInfo, TokenState

__all__ = ["Family"]


class Family(ABC):
    """One model seen through the interface every library shares.

    model: the model itself; name: what messages call it; blocks: its transformer blocks in
    order; cost: the sizes that set its FLOPs; image_size, patch_size: (h, w) in pixels;
    channels: input channels; num_classes: the classes its logits score (0: no classifier);
    frames: input frames of a video model (its input is (b, frames, channels, h, w); 1: images).
    ``scoring``: where its sampling layers' significance comes from (``"cls"``: the CLS
    query's attention, for models that read out the CLS token; ``"received"``: the attention
    each token receives, for models that pool all tokens).
    """

    scoring: str = "cls"

    def __init__(
        self,
        model: nn.Module,
        name: str,
        blocks: Sequence[nn.Module],
        cost: ViTCost,
        *,
        image_size: tuple[int, int],
        patch_size: tuple[int, int],
        channels: int,
        num_classes: int,
        frames: int = 1,
    ) -> None:
        self.model = model
        self.name = name
        self.blocks = blocks
        self.cost = cost
        self.image_size = image_size
        self.patch_size = patch_size
        self.channels = channels
        self.num_classes = num_classes
        self.frames = frames

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One input's shape: (channels, h, w) for images, (frames, channels, h, w) for videos."""
        image = (self.channels, *self.image_size)
        return image if self.frames == 1 else (self.frames, *image)

    @property
    def depth(self) -> int:
        return self.cost.depth

    @property
    def num_patches(self) -> int:
        return self.cost.num_patches

    @property
    def num_prefix_tokens(self) -> int:
        return self.cost.num_prefix_tokens

    @abstractmethod
    def sampling_layers(self) -> list[AdaptiveTokenSampling]:
        """One sampling module per block, in block order."""

    @abstractmethod
    def run(self, images: Tensor, start: int = 0, hidden: Tensor | None = None) -> tuple[Tensor, TokenState]:
        """Logits (b, classes) of ``images`` (a model without a classifier, ``num_classes ==
        0``: its pooled features (b, d)) and the pass's token state. With ``hidden``, the
        blocks before ``start`` are skipped (traced as dense) and block ``start`` gets
        ``hidden``, its input in a dense pass (calibration computes the dense layers once)."""

    def run_block(
        self, block: nn.Module, x: Tensor, *, padding: Padding | None = None, size: Tensor | None = None
    ) -> Tensor:
        """One of this model's blocks alone on tokens x: (b, n, c) with this padding and these
        token sizes (for timing a block, as :mod:`ats_vit.latency` does)."""
        state = TokenState(x, self.num_prefix_tokens)
        state.padding, state.size = padding, size
        return self._run_block(block, x, state)

    @abstractmethod
    def _run_block(self, block: nn.Module, x: Tensor, state: TokenState) -> Tensor:
        """Run ``block`` on x in ``state``."""

    @abstractmethod
    def last_state(self) -> TokenState:
        """The token state of the model's last forward pass (raises ValueError if none ran)."""

    def restore(self, tokens: Tensor) -> Tensor:
        """tokens: (b, m, c) the model's features after its last pass (its ``forward_features``,
        or ``last_hidden_state``) -> (b, prefix + patches, c) on the full grid: kept tokens
        where their patches are, a merged token's features on every patch it stands for, a
        dropped patch its last state (through the model's final norm when the features had
        it). Needs the pass to have run with ``SamplingOptions(restorable=True)``; with
        nothing dropped it is the dense features."""
        return self.last_state().restore(tokens, self.final_norm())

    def final_norm(self) -> Callable[[Tensor], Tensor] | None:
        """The norm between the last block and the features :meth:`restore` receives (None:
        the features are the last block's output)."""
        return None

    def caps(self) -> tuple[int, ...]:
        """The token cap of every layer now."""
        return tuple(ats.cap for ats in self.sampling_layers())

    def options(self) -> SamplingOptions:
        """The sampling options of the last layer now: how the model runs (static shapes,
        jitter; every layer shares those) and the rule of its last layers."""
        return self.sampling_layers()[-1].options

    def layer_options(self) -> tuple[SamplingOptions, ...]:
        """The sampling options of every layer now."""
        return tuple(ats.options for ats in self.sampling_layers())

    def set_schedule(
        self, caps: Sequence[int] | None, options: SamplingOptions | Sequence[SamplingOptions] | None = None
    ) -> None:
        """Set each layer's cap (``None``: every layer keeps all its tokens) and, unless None,
        the options of every layer (one for all, or one per layer), in place. A cap of
        ``num_patches`` or more never samples."""
        schedule = (self.num_patches,) * self.depth if caps is None else _caps(caps, self.depth)
        if not isinstance(options, (list, tuple)):  # one for all (a wrong type is refused below)
            per_layer: Sequence[Any] = (options,) * self.depth
        elif len(options) != self.depth:
            raise ValueError(
                f"options must be one SamplingOptions or one per layer ({self.depth}), got {len(options)}"
            )
        else:
            per_layer = options
        for ats, cap, layer_options in zip(self.sampling_layers(), schedule, per_layer, strict=True):
            ats.configure(cap, layer_options)
            ats.keeps_all = cap >= self.num_patches

    def set_options(self, **changes: Any) -> None:
        """Change some options of every layer (e.g. ``static_shape=True``), keeping the caps
        and each layer's rule."""
        self.set_schedule(self.caps(), [replace(o, **changes) for o in self.layer_options()])

    def last_info(self) -> ATSInfo:
        """Token ids, per-layer kept counts and GFLOPs of the last forward pass."""
        return self.last_state().info(self.cost)

    def forward(self, images: Tensor, start: int = 0, hidden: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Logits and GFLOPs per image (b,) of one pass (see :meth:`run`)."""
        logits, state = self.run(images, start, hidden)
        return logits, gflops(self.cost, state.trace)

    def capture(self, images: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Logits, GFLOPs and the input of every block, from one pass as the model is set."""
        inputs: list[Tensor] = []
        hooks = [b.register_forward_pre_hook(lambda _m, args: inputs.append(args[0])) for b in self.blocks]
        try:
            logits, flops = self.forward(images)
        finally:
            for hook in hooks:
                hook.remove()
        return logits, flops, inputs


def _caps(caps: Sequence[int], depth: int) -> tuple[int, ...]:
    if not isinstance(caps, Sequence) or isinstance(caps, str):
        raise TypeError(f"caps must be a sequence of ints (one per layer), got {caps!r}")
    if len(caps) != depth:
        raise ValueError(
            f"caps must have one entry per layer (depth={depth}), got {len(caps)}: {tuple(caps)}"
        )
    return tuple(_validate.positive_int(f"caps[{i}]", c) for i, c in enumerate(caps))
