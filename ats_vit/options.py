"""How a sampling layer selects tokens: one frozen, validated value instead of five arguments.

Every signature that takes sampling options (:class:`~ats_vit.sampling.AdaptiveTokenSampling`,
:class:`~ats_vit.vit.ViT`, ``ats_vit.timm.apply``, ``ats_vit.hf.apply``, the family interface)
takes one :class:`SamplingOptions`, checked once when it is made. Three of its fields are the
*rule* a budget chooses (``sampler``, ``temperature``, ``dropped``); the others are how the
model *runs* (``static_shape`` for compilation and export, ``jitter`` for training,
``restorable`` for dense outputs), which a budget keeps as the model has them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from enum import Enum
from typing import Any, Literal

from ats_vit import _validate

__all__ = ["DROPPED", "SAMPLERS", "Dropped", "Rule", "Sampler", "SamplingOptions"]

Sampler = Literal["inverse_transform", "official", "gumbel", "topk", "random", "tome", "pitome", "dct"]
# "topk", "random", "tome", "pitome" and "dct" keep a fixed count per image: the peers ATS is
# compared to; "official" is the authors' released selection
SAMPLERS: tuple[str, ...] = (
    "inverse_transform",
    "official",
    "gumbel",
    "topk",
    "random",
    "tome",
    "pitome",
    "dct",
)
Dropped = Literal["discard", "fuse", "merge"]
DROPPED: tuple[str, ...] = ("discard", "fuse", "merge")
# the samplers that merge what they drop: "merge" is their only (and default) choice of
# `dropped`, and no other sampler's (1.0 removed merging into the nearest kept token, which
# measured no better than fusing: CHANGELOG.md)
MERGING_SAMPLERS = ("tome", "pitome")


@dataclass(frozen=True)
class SamplingOptions:
    """How a sampling layer selects and what becomes of the tokens it drops.

    sampler: ``"inverse_transform"`` (the paper's op as vit-pytorch reads it; deterministic at
        eval), ``"official"`` (the authors' released code: head-summed scores sorted, the
        nearest CDF entry to evenly spaced values, at least 8 tokens), ``"gumbel"`` (the seed's
        draws), or a fixed-count peer: ``"topk"`` (EViT's CLS attention), ``"random"``,
        ``"tome"`` (ToMe: attention for all tokens, then the closest pairs merge), ``"pitome"``
        (PiToMe: as ToMe, but tokens in dense, redundant regions merge first and the distinct
        ones are protected; no proportional attention, as in its authors' code), ``"dct"``
        (many-to-many: after the block's MLP the patch tokens, in patch order, are low-passed
        by a discrete cosine transform to fewer tokens, each a mix of all; OpenToMe's DCT).
    temperature: scores reshaped as ``S^(1/temperature)`` before the ATS samplers draw (the
        cost knob of a budget); 1 is the paper's op.
    dropped: ``"discard"`` (the paper) or ``"fuse"`` (EViT-style: one token, the
        significance-weighted mean of the dropped ones); ``"merge"`` is ToMe's and PiToMe's,
        and only theirs. ``None`` means the sampler's own: ``"merge"`` for those, else
        ``"discard"``.
    static_shape: pad each sampling layer's output to its cap instead of the batch's largest
        count: no host sync (whole-graph compile, export), some padded compute.
    jitter: in training, draw the inverse-transform points inside their strata (at eval they
        are always fixed).
    restorable: keep where every patch went and the last state of those dropped, so that
        ``restore()`` can give per-patch outputs on the full grid (a little work per sampling
        layer; off by default).
    """

    sampler: Sampler = "inverse_transform"
    temperature: float = 1.0
    dropped: Dropped | None = None
    static_shape: bool = False
    jitter: bool = True
    restorable: bool = False

    def __post_init__(self) -> None:
        _validate.choice("sampler", self.sampler, SAMPLERS)
        default = "merge" if self.sampler in MERGING_SAMPLERS else "discard"
        dropped = _validate.choice("dropped", default if self.dropped is None else self.dropped, DROPPED)
        if self.sampler in MERGING_SAMPLERS and dropped != "merge":
            raise ValueError(
                f"sampler={self.sampler!r} merges the tokens it drops; dropped must be 'merge', "
                f"got {dropped!r}"
            )
        if dropped == "merge" and self.sampler not in MERGING_SAMPLERS:
            raise ValueError(
                f"dropped='merge' belongs to sampler='tome' or 'pitome'; with sampler={self.sampler!r} "
                "dropped must be 'discard' or 'fuse' (merging into the nearest kept token was removed "
                "in 1.0)"
            )
        if self.sampler == "dct" and dropped != "discard":
            raise ValueError(
                f"sampler='dct' discards the high frequencies of the token sequence; dropped must be "
                f"'discard', got {dropped!r}"
            )
        object.__setattr__(self, "dropped", dropped)
        object.__setattr__(self, "temperature", _validate.positive_float("temperature", self.temperature))
        for name in ("static_shape", "jitter", "restorable"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")

    def with_rule(self, sampler: str, temperature: float, dropped: str | None) -> SamplingOptions:
        """These options with another rule; how the model runs (static shape, jitter) is kept."""
        return replace(self, sampler=sampler, temperature=temperature, dropped=dropped)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Rule(str, Enum):
    """What a sampling layer ran, as the trace of a pass records it: the one name that
    sampling (:class:`~ats_vit.sampling.AdaptiveTokenSampling`), the cost count
    (:mod:`ats_vit.flops`) and the latency table (:mod:`ats_vit.latency`) share.

    Rules of equal FLOPs can run different ops, so they are told apart by what runs:
    ``SCORE`` the paper's sampling (or the seed's Gumbel draws) of an adaptive count from the
    significance scores, dropped tokens discarded; ``OFFICIAL`` the authors' selection (its own
    scores and de-duplication); ``FIXED`` top-k or random picks of a fixed count, discarded;
    ``FUSE`` any scored selection whose dropped tokens fuse into one token; ``TOME`` ToMe
    (attention for every token, then merging); ``PITOME`` PiToMe (as ToMe, plus every pair of
    tokens compared for their energy); ``DCT`` the cosine transform after the MLP (every token
    attends and goes through the MLP; then fewer tokens, each a mix of all). ``SCORE`` and
    ``OFFICIAL`` count the same FLOPs; ``FIXED`` computes no significance scores.
    """

    SCORE = "score"
    OFFICIAL = "official"
    FIXED = "fixed"
    FUSE = "fuse"
    TOME = "tome"
    PITOME = "pitome"
    DCT = "dct"

    @classmethod
    def of(cls, options: SamplingOptions) -> Rule:
        """The rule that ``options`` run."""
        if options.sampler == "tome":
            return cls.TOME
        if options.sampler == "pitome":
            return cls.PITOME
        if options.sampler == "dct":
            return cls.DCT
        if options.dropped == "fuse":
            return cls.FUSE
        if options.sampler == "official":
            return cls.OFFICIAL
        if options.sampler in ("topk", "random"):
            return cls.FIXED
        return cls.SCORE

    @property
    def merges(self) -> bool:
        """Whether its output tokens carry sizes (a later merge weights by them; later attention
        adds ``log(size)`` unless the rule is PiToMe, which its authors run without)."""
        return self in (Rule.FUSE, Rule.TOME, Rule.PITOME)

    @property
    def late(self) -> bool:
        """Whether it selects after attention over every token (the merging rules)."""
        return self in (Rule.TOME, Rule.PITOME)

    @property
    def whole_block(self) -> bool:
        """Whether every token attends and goes through the MLP, the tokens reduced only
        after (the cosine transform)."""
        return self is Rule.DCT

    @property
    def attends_all(self) -> bool:
        """Whether every token gets a query (no scores choose which)."""
        return self.late or self.whole_block
