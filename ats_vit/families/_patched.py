"""What the timm and Hugging Face families share: patching block instances once.

Each block's ``forward`` becomes an instance attribute that runs the model's own modules
through :func:`ats_vit.attention.sampled_self_attention`, and each block gets a parameter-free
:class:`~ats_vit.sampling.AdaptiveTokenSampling` submodule (state dicts are unchanged). The
blocks of one model share a :class:`Carrier`, where the first block puts the
:class:`~ats_vit.tokens.TokenState` of the pass under way and the others find it. Deleting
those attributes restores the class's behaviour; other instances are never touched.
"""

from __future__ import annotations

import types
from abc import abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ats_vit import _validate
from ats_vit.families.base import Family
from ats_vit.flops import TokenTrace, ViTCost
from ats_vit.options import SamplingOptions
from ats_vit.sampling import AdaptiveTokenSampling, Padding
from ats_vit.tokens import ATSInfo, TokenState

# attributes patching adds: on the model, and on each block
FAMILY = "_ats_family"
_BLOCK_ATTRS = ("ats", "_ats_carrier", "_ats_index", "forward")


class Carrier:
    """The token state of one patched model's pass under way, and where a pass resumes."""

    def __init__(self, num_prefix_tokens: int) -> None:
        self.num_prefix_tokens = num_prefix_tokens
        self.state: TokenState | None = None
        self.resume: tuple[int, Tensor] | None = None
        self.user_mask = False  # whether the pass under way was given an attention mask


def block_state(block: Any, x: Tensor) -> TokenState:
    """The token state a patched block works in; the first block starts the pass's."""
    carrier: Carrier = block._ats_carrier
    if block._ats_index == 0:
        track = block.ats.options.restorable
        carrier.state = TokenState(x, carrier.num_prefix_tokens, carrier.resume, track=track)
    if carrier.state is None:
        raise RuntimeError("a patched block ran before the model's first block")
    return carrier.state


def refuse_dct(block: Any, model: str, why: str) -> None:
    """Refuse ``sampler="dct"`` in a family whose blocks need each token's patch: the cosine
    transform's tokens mix all patches."""
    if block.ats.after_mlp:
        raise ValueError(
            f"sampler='dct' is not supported on {model} ({why}; each DCT token mixes all patches): "
            "it runs on ats_vit.ViT, timm VisionTransformer and the Hugging Face image encoders"
        )


class PatchedFamily(Family):
    """A third-party model whose blocks are patched; subclasses say how to get logits."""

    carrier: Carrier

    blocks: Sequence[Any]

    def sampling_layers(self) -> list[AdaptiveTokenSampling]:
        return [block.ats for block in self.blocks]

    @abstractmethod
    def logits(self, images: Tensor) -> Tensor:
        """The model's own forward pass, as logits (b, classes)."""

    def run(self, images: Tensor, start: int = 0, hidden: Tensor | None = None) -> tuple[Tensor, TokenState]:
        self.carrier.resume = None if hidden is None else (start, hidden)
        try:
            logits = self.logits(images)
        finally:
            self.carrier.resume = None
        return logits, self.last_state()

    def _run_block(self, block: nn.Module, x: Tensor, state: TokenState) -> Tensor:
        if getattr(block, "_ats_index", None) == 0:
            raise ValueError("the first block starts every pass's token state: time another block")
        self.carrier.state = state
        return block(x)

    def last_state(self) -> TokenState:
        state = self.carrier.state
        if state is None or len(state.trace.counts) != self.depth:
            raise ValueError(f"{self.name}: no complete forward pass has run since it was patched")
        return state

    def patch(self, forward: Callable[..., Tensor]) -> None:
        """Bind ``forward`` to every block and give each a sampling module that keeps all."""
        self.carrier = Carrier(self.num_prefix_tokens)
        for i, block in enumerate(self.blocks):
            block.ats = AdaptiveTokenSampling(
                self.num_patches, num_prefix_tokens=self.num_prefix_tokens, scoring=self.scoring
            )
            block.ats.reference_tokens = self.num_patches + self.num_prefix_tokens
            block.ats.layer = (i, len(self.blocks))
            block.ats.train(block.training)
            block._ats_carrier = self.carrier
            block._ats_index = i
            block.forward = types.MethodType(forward, block)
        self.model.__dict__[FAMILY] = self

    def unpatch(self) -> None:
        for block in self.blocks:
            for name in _BLOCK_ATTRS:
                if name in block.__dict__ or name in block._modules:
                    delattr(block, name)
        self.model.__dict__.pop(FAMILY, None)


def model_name(model: nn.Module) -> str:
    """What messages call a model: timm's architecture name when it has one, else its class."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def weighted_mean(x: Tensor, padding: Padding | None, size: Tensor | None, start: int = 0) -> Tensor:
    """The mean of x[:, start:] over real tokens, each weighed by the patches it stands for:
    what a readout that averages the dense tokens averages, after tokens were dropped
    (padding) or merged (sizes)."""
    tokens = x[:, start:]
    real = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if padding is None else padding.mask
    weight = real[:, start:].to(x.dtype)
    if size is not None:
        weight = weight * size[:, start:].to(x.dtype)
    return (tokens * weight[..., None]).sum(dim=1) / weight.sum(dim=1, keepdim=True).clamp_min(1e-6)


class TimmStyleFamily(PatchedFamily):
    """A timm model (``patch_embed``, ``blocks``, ``norm``, ``num_classes``): its sizes, logits
    and final norm, and ``readout``, one method of the model (name, replacement) that the
    patch replaces on the instance so that pooling heeds padding and token sizes."""

    readout: tuple[str, Callable[..., Tensor]] | None = None

    def __init__(self, model: Any, cost: ViTCost) -> None:
        patch = model.patch_embed
        super().__init__(
            model,
            model_name(model),
            list(model.blocks),
            cost,
            image_size=tuple(patch.img_size),
            patch_size=tuple(patch.patch_size),
            channels=patch.proj.in_channels,
            num_classes=model.num_classes,
        )

    def logits(self, images: Tensor) -> Tensor:
        return self.model(images)

    def final_norm(self) -> Callable[[Tensor], Tensor] | None:
        norm: Any = self.model.norm  # forward_features ends with it
        return norm

    def patch(self, forward: Callable[..., Tensor]) -> None:
        super().patch(forward)
        if self.readout is not None:
            name, replacement = self.readout
            self.model.__dict__[name] = types.MethodType(replacement, self.model)

    def unpatch(self) -> None:
        if self.readout is not None:
            self.model.__dict__.pop(self.readout[0], None)
        super().unpatch()


def patched_once(
    model: Any, kind: type[PatchedFamily], check: Callable[[Any], Any], forward: Callable[..., Tensor]
) -> Any:
    """The family of ``model`` of class ``kind``: the one it was patched with, or a new one
    (after ``check`` accepts the model) that patches it, dense, with ``forward``."""
    found = patched_family(model)
    if isinstance(found, kind):
        return found
    new = kind(check(model))  # type: ignore[call-arg]
    new.patch(forward)
    return new


def patched_family(model: nn.Module) -> PatchedFamily | None:
    """The family a model was patched with, or None."""
    found = model.__dict__.get(FAMILY)
    return found if isinstance(found, PatchedFamily) and found.model is model else None


_UNSET: Any = object()


def front_door_caps(
    family: Family,
    caps: int | Sequence[int] | None,
    start_layer: int,
    layers: Iterable[int] | None,
    max_tokens: int | Sequence[int] | None,
) -> tuple[int, ...]:
    """One cap per layer from the front doors' arguments: ``caps`` from ``start_layer`` on (an
    int for every such layer, or one per layer), the layers before it keeping all; or 0.x's
    ``layers`` and ``max_tokens`` (deprecated)."""
    depth, n = family.depth, family.num_patches
    if layers is not _UNSET or max_tokens is not _UNSET:
        if caps is not _UNSET:
            raise TypeError("give caps= (and start_layer=), or 0.x's layers= and max_tokens=, not both")
        # warn at the user's call: deprecated <- here <- apply <- ats_vit.timm/hf.apply <- user
        _validate.deprecated("apply(layers=, max_tokens=)", "apply(caps=, start_layer=)", stacklevel=5)
        chosen = None if layers is _UNSET else layers
        return _chosen_caps(family, chosen, 108 if max_tokens is _UNSET or max_tokens is None else max_tokens)
    if caps is _UNSET:
        raise TypeError(
            "apply() needs caps=: the most patch tokens each layer from start_layer on keeps (an int, "
            "or one per layer), or caps=None to patch without dropping (0.x's default of 108 is gone)"
        )
    if not _validate.is_int(start_layer) or not 0 <= start_layer < depth:
        raise ValueError(f"start_layer must be an int in [0, {depth}), got {start_layer!r}")
    if caps is None:
        return (n,) * depth
    if _validate.is_int(caps):
        later = [_validate.positive_int("caps", caps)] * (depth - start_layer)
    elif isinstance(caps, Sequence) and not isinstance(caps, str):
        later = [_validate.positive_int(f"caps[{i}]", c) for i, c in enumerate(caps)]
        if len(later) != depth - start_layer:
            raise ValueError(
                f"caps must have one entry per layer from start_layer={start_layer} on "
                f"({depth - start_layer} for depth {depth}), got {len(later)}: {tuple(caps)}"
            )
    else:
        raise TypeError(f"caps must be an int, a sequence of ints or None, got {caps!r}")
    return (n,) * start_layer + tuple(later)


def _chosen_caps(
    family: Family, layers: Iterable[int] | None, max_tokens: int | Sequence[int]
) -> tuple[int, ...]:
    """0.x's caps: ``max_tokens`` (an int, or one per chosen layer) in ``layers`` (default:
    all), ``num_patches`` (keep all) elsewhere."""
    depth = family.depth
    if layers is None:
        chosen = list(range(depth))
    elif isinstance(layers, int) or not isinstance(layers, Iterable):
        raise TypeError(f"layers must be an iterable of block indices, got {layers!r}")
    else:
        chosen = list(layers)
    for i in chosen:
        if not _validate.is_int(i) or not 0 <= i < depth:
            raise ValueError(f"layers must hold block indices in [0, {depth}), got {i!r} in {chosen}")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"layers must not repeat a block, got {chosen}")
    chosen.sort()
    if _validate.is_int(max_tokens):
        caps = [_validate.positive_int("max_tokens", max_tokens)] * len(chosen)
    elif isinstance(max_tokens, Sequence) and not isinstance(max_tokens, str):
        caps = [_validate.positive_int(f"max_tokens[{i}]", t) for i, t in enumerate(max_tokens)]
        if len(caps) != len(chosen):
            raise ValueError(f"max_tokens has {len(caps)} entries but layers selects {len(chosen)} blocks")
    else:
        raise TypeError(f"max_tokens must be an int or a sequence of ints, got {max_tokens!r}")
    schedule = [family.num_patches] * depth
    for i, cap in zip(chosen, caps, strict=True):
        schedule[i] = cap
    return tuple(schedule)


def apply(
    family: Family,
    caps: Any,
    start_layer: int,
    options: SamplingOptions | None,
    layers: Any = _UNSET,
    max_tokens: Any = _UNSET,
) -> None:
    """The front doors' ``apply``: the caps (:func:`front_door_caps`) and the options (default:
    the paper's ATS), set in place on an already patched model."""
    schedule = front_door_caps(family, caps, start_layer, layers, max_tokens)
    family.set_schedule(schedule, options or SamplingOptions())


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` is patched by :mod:`ats_vit.timm` or :mod:`ats_vit.hf`."""
    return patched_family(model) is not None


def _required(model: nn.Module) -> PatchedFamily:
    found = patched_family(model)
    if found is None:
        raise ValueError(
            f"{type(model).__name__} is not patched: call ats_vit.timm.apply or ats_vit.hf.apply first"
        )
    return found


def last_trace(model: nn.Module) -> TokenTrace:
    """The per-block token trace of a patched model's last forward pass (for
    :func:`ats_vit.flops.gflops` with the family's cost, and for :mod:`ats_vit.viz`)."""
    return _required(model).last_state().trace


def last_info(model: nn.Module) -> ATSInfo:
    """Token ids, per-layer kept counts and GFLOPs of a patched model's last forward pass."""
    return _required(model).last_info()


def remove(model: nn.Module) -> None:
    """Undo the patch (a no-op on an unpatched model)."""
    found = patched_family(model)
    if found is not None:
        found.unpatch()
