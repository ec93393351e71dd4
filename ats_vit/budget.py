"""Budgets: where selection starts, a token cap per layer, and the rule that selects.

A :class:`Budget` is one plain, JSON-able value. It only sets the
:class:`~ats_vit.sampling.AdaptiveTokenSampling` modules of a model through its family
(:mod:`ats_vit.families`); it never forks block code. Every consumer (``Budget.apply``,
evaluation, calibration, measuring) goes through :func:`configure`, which first checks the
budget against the model, so a budget made for another depth or image size is refused on
every path. :mod:`ats_vit.calibrate` searches budgets for a cost target.
"""

from __future__ import annotations

import itertools
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from torch import nn

from ats_vit import _validate
from ats_vit._io import write_text_atomic
from ats_vit.families import Family, family_of
from ats_vit.options import SamplingOptions

__all__ = ["Budget", "BudgetError", "configure"]

FORMAT = "ats-vit-budget/2"
# what a budget's target is a fraction of: counted GFLOPs, or measured time on a device
COST_KINDS = ("gflops", "latency")


class BudgetError(ValueError):
    """A budget that does not fit a model, a target that cannot be reached, or a bad file."""


@dataclass(frozen=True)
class Budget:
    """Token selection for every layer of a model.

    Layers before ``start_layer`` keep every token; layer ``start_layer + i`` keeps at most
    ``caps[i]`` patch tokens. ``sampler``, ``temperature`` and ``dropped`` are the rule
    (:class:`~ats_vit.options.SamplingOptions`; the defaults are the paper's ATS). ``depth``
    and ``num_patches`` record the model it was made for (every path refuses another);
    ``method``, ``target``, ``cost`` and ``calibration`` record how
    :func:`ats_vit.calibrate.calibrate` chose it. ``source`` names the file it was loaded from
    (for messages; not saved, not compared).
    """

    start_layer: int
    caps: tuple[int, ...]
    sampler: str = "inverse_transform"
    temperature: float = 1.0
    dropped: str | None = None  # None: the sampler's own ("merge" for ToMe, else "discard")
    depth: int | None = None
    num_patches: int | None = None
    method: str | None = None
    target: float | None = None
    cost: str = "gflops"
    calibration: dict[str, Any] = field(default_factory=dict)
    source: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not _validate.is_int(self.start_layer) or self.start_layer < 0:
            raise BudgetError(f"start_layer must be an int >= 0, got {self.start_layer!r}")
        caps = tuple(self.caps) if isinstance(self.caps, Sequence) and not isinstance(self.caps, str) else ()
        if not caps:
            raise BudgetError(f"caps must be a non-empty sequence of ints, got {self.caps!r}")
        object.__setattr__(self, "caps", caps)
        for i, cap in enumerate(caps):
            _validate.positive_int(f"caps[{i}]", cap)
        if any(later > earlier for earlier, later in itertools.pairwise(caps)):
            raise BudgetError(f"caps must be non-increasing, got {caps}")
        try:
            rule = SamplingOptions(self.sampler, self.temperature, self.dropped)  # type: ignore[arg-type]
        except (TypeError, ValueError) as exc:
            raise BudgetError(str(exc)) from exc
        object.__setattr__(self, "temperature", rule.temperature)
        object.__setattr__(self, "dropped", rule.dropped)
        _validate.choice("cost", self.cost, COST_KINDS)
        for name in ("depth", "num_patches"):
            value = getattr(self, name)
            if value is not None:
                _validate.positive_int(name, value)
        if self.depth is not None and self.start_layer + len(caps) != self.depth:
            raise BudgetError(
                f"start_layer + len(caps) must equal depth: {self.start_layer} + {len(caps)} != {self.depth}"
            )
        if self.method is not None and not isinstance(self.method, str):
            raise BudgetError(f"method must be a string or None, got {self.method!r}")
        target = self.target
        if target is not None and (
            isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 < target <= 1.0
        ):
            raise BudgetError(
                f"target must be None or a fraction of the dense cost in (0, 1], got {target!r}"
            )
        if not isinstance(self.calibration, Mapping):
            raise BudgetError(
                f"calibration must be a mapping (what calibrate measured), got {self.calibration!r}"
            )
        object.__setattr__(self, "calibration", dict(self.calibration))

    @classmethod
    def paper(
        cls, keep: float, start_layer: int, depth: int, num_patches: int, sampler: str = "inverse_transform"
    ) -> Budget:
        """The paper's budget: ``round(keep * num_patches)`` patch tokens per layer from
        ``start_layer`` on (the ATS paper's DeiT-S setting is ``keep=0.55, start_layer=3``)."""
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < keep <= 1.0:
            raise BudgetError(f"keep must be a ratio in (0, 1], got {keep!r}")
        if not _validate.is_int(start_layer) or not 0 <= start_layer < depth:
            raise BudgetError(f"start_layer must be in [0, {depth}), got {start_layer!r}")
        cap = max(1, round(keep * num_patches))
        return cls(
            start_layer,
            (cap,) * (depth - start_layer),
            sampler=sampler,
            depth=depth,
            num_patches=num_patches,
            method="paper",
        )

    @classmethod
    def tome(
        cls,
        r: int | Sequence[int] | tuple[int, float],
        depth: int,
        num_patches: int,
        num_prefix_tokens: int = 1,
    ) -> Budget:
        """ToMe's schedule as caps: ``r`` tokens merged in every layer (an int), per layer (a
        list), or ToMe's ``(r, inflection)`` (``(r, -1)``: the paper's decreasing schedule), each
        layer merging at most half its mergeable tokens, as ToMe's ``parse_r`` and
        ``bipartite_soft_matching`` do."""
        rates = tome_rates(r, depth)
        tokens, caps = num_patches + num_prefix_tokens, []
        for rate in rates:
            tokens -= max(0, min(rate, (tokens - num_prefix_tokens) // 2))
            caps.append(tokens - num_prefix_tokens)
        return cls(0, tuple(caps), sampler="tome", depth=depth, num_patches=num_patches, method="tome")

    @classmethod
    def pitome(cls, ratio: float, depth: int, num_patches: int) -> Budget:
        """PiToMe's schedule as caps: every layer keeps ``ratio`` of its patch tokens, merging
        ``floor(T - T * ratio)`` of its ``T`` (at most half), as its authors' ``pitome_vision``
        counts them (``ratio`` 0.9 to 0.95 are their DeiT settings)."""
        if not isinstance(ratio, (int, float)) or isinstance(ratio, bool):
            raise TypeError(f"ratio must be a float, got {type(ratio).__name__} ({ratio!r})")
        if not 0.5 <= ratio <= 1.0:
            raise ValueError(f"ratio must be in [0.5, 1] (PiToMe merges at most half), got {ratio}")
        tokens, caps = num_patches, []
        for _ in range(depth):
            tokens -= min(math.floor(tokens - tokens * ratio), tokens // 2)
            caps.append(tokens)
        return cls(0, tuple(caps), sampler="pitome", depth=depth, num_patches=num_patches, method="pitome")

    @classmethod
    def dct(cls, r: int | Sequence[int] | tuple[int, float], depth: int, num_patches: int) -> Budget:
        """OpenToMe's DCT schedule as caps: after every block's MLP ``r`` patch tokens fewer (an
        int; a per-layer list or ToMe's ``(r, inflection)`` as :meth:`tome` takes them), at most
        half of them, as its ``parse_r`` and ``dc_matching`` count them."""
        tokens, caps = num_patches, []
        for rate in tome_rates(r, depth):
            tokens -= max(0, min(rate, tokens // 2))
            caps.append(tokens)
        return cls(0, tuple(caps), sampler="dct", depth=depth, num_patches=num_patches, method="dct")

    def options(self, runtime: SamplingOptions | None = None) -> SamplingOptions:
        """This budget's rule on ``runtime``'s static shape and jitter (how the model runs)."""
        return (runtime or SamplingOptions()).with_rule(self.sampler, self.temperature, self.dropped)

    def _where(self) -> str:
        return f"budget file {self.source!r}" if self.source else "this budget"

    def schedule(self, depth: int, num_patches: int) -> tuple[int, ...]:
        """One cap per layer of a model with ``depth`` layers and ``num_patches`` patches."""
        if self.start_layer + len(self.caps) != depth:
            raise BudgetError(
                f"{self._where()} covers {self.start_layer + len(self.caps)} layers "
                f"(start_layer={self.start_layer}, {len(self.caps)} caps); the model has {depth}"
            )
        above = [self.start_layer + i for i, c in enumerate(self.caps) if c > num_patches]
        if above:  # only a budget that records no num_patches gets here (check_sizes refuses others)
            every = " (every layer: it drops nothing here)" if len(above) == len(self.caps) else ""
            warnings.warn(
                f"{self._where()} caps layers {above} above the model's {num_patches} patches: those layers "
                f"keep all their tokens{every}",
                UserWarning,
                stacklevel=3,
            )
        return (num_patches,) * self.start_layer + tuple(min(c, num_patches) for c in self.caps)

    def check(self, family: Family) -> None:
        """Raise :class:`BudgetError` unless this budget was made for a model like ``family``'s."""
        self.check_sizes(family.depth, family.num_patches, family.name)

    def check_sizes(self, depth: int, num_patches: int, model: str = "the model") -> None:
        """Raise :class:`BudgetError` unless this budget fits a model of these sizes."""
        for name, mine, theirs in (
            ("depth", self.depth, depth),
            ("num_patches", self.num_patches, num_patches),
        ):
            if mine is not None and mine != theirs:
                hint = " (another image or patch size?)" if name == "num_patches" else ""
                raise BudgetError(
                    f"{self._where()} was made for a model with {name}={mine}; "
                    f"{model} has {name}={theirs}{hint}"
                )
        self.schedule(depth, num_patches)

    def apply(self, model: nn.Module, *, static_shape: bool | None = None) -> nn.Module:
        """Set ``model``'s token selection to this budget (in place) and return it.

        ``model``: an :class:`ats_vit.ViT`, a timm ``VisionTransformer`` or a Hugging Face
        ViT/DeiT (patched on first use). The model keeps how it runs (static shapes, jitter)
        unless ``static_shape`` says otherwise.
        """
        family = family_of(model)
        configure(family, self)
        if static_shape is not None:
            family.set_options(static_shape=static_shape)
        return model

    def to_dict(self) -> dict[str, Any]:
        raw = asdict(self)
        raw.pop("source")
        return {"format": FORMAT, **raw, "caps": list(self.caps)}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str | None = None) -> Budget:
        where = f"budget file {source!r}" if source else "budget"
        raw = dict(raw)
        if raw.get("format") == "ats-vit-budget/1":  # 0.1's files: the caps were called max_tokens
            raw["format"], raw["caps"] = FORMAT, raw.pop("max_tokens", None)
        # 0.2's files carry the fields of hybrid budgets (removed in 1.0), empty unless hybrid
        early = {k: raw.pop(k) for k in ("early_layers", "early_sampler", "early_dropped") if k in raw}
        if early.get("early_layers"):
            raise BudgetError(
                f"{where} is a hybrid budget (early_layers={early['early_layers']}), which 1.0 no longer "
                "runs (it measured worse than 'auto'): calibrate a new one"
            )
        if raw.get("format") != FORMAT:
            raise BudgetError(
                f"{where}: not an ats-vit budget (format {raw.get('format')!r}, expected {FORMAT!r})"
            )
        known = {f.name for f in fields(cls)} - {"source"}
        unknown = sorted(set(raw) - known - {"format"})
        if unknown:
            raise BudgetError(f"{where} has unknown fields {unknown}")
        try:
            budget = cls(**{k: v for k, v in raw.items() if k in known}, source=source)
        except (TypeError, ValueError) as exc:
            raise BudgetError(f"{where}: {exc}") from exc
        unrecorded = [name for name in ("depth", "num_patches") if raw.get(name) is None]
        if unrecorded and source is not None:
            warnings.warn(
                f"{where} records no {' and no '.join(unrecorded)}: it is checked against a model by its "
                "length alone (budget files written by calibrate record both)",
                UserWarning,
                stacklevel=3,
            )
        return budget

    def save(self, path: str | Path) -> Path:
        """Write the budget as JSON, atomically (a failed write leaves the old file)."""
        return write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Budget:
        path = Path(path)
        if not path.is_file():
            raise BudgetError(f"budget file {str(path)!r} does not exist or is not a file")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BudgetError(f"budget file {str(path)!r} is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise BudgetError(f"budget file {str(path)!r} does not hold a JSON object")
        return cls.from_dict(raw, source=str(path))


def tome_rates(r: int | Sequence[int] | tuple[int, float], depth: int) -> list[int]:
    """Tokens merged per layer, as ToMe's ``parse_r``: a constant int, a list (padded with
    zeros), or ``(r, inflection)`` with inflection in [-1, 1] (-1: decreasing)."""
    if isinstance(r, list):
        rates = [_validate_rate(x) for x in r]
        if len(rates) > depth:
            raise BudgetError(f"r has {len(rates)} entries but the model has {depth} layers")
        return rates + [0] * (depth - len(rates))
    inflect = 0.0
    if isinstance(r, tuple):
        r, inflect = r
        if not -1.0 <= float(inflect) <= 1.0:
            raise BudgetError(f"the inflection of r must be in [-1, 1], got {inflect}")
    rate = _validate_rate(r)
    low = int(rate * (1.0 - inflect))
    step = (2 * rate - 2 * low) / max(depth - 1, 1)
    return [int(low + step * i) for i in range(depth)]


def _validate_rate(r: object) -> int:
    if not _validate.is_int(r) or r < 0:
        raise BudgetError(f"r (tokens merged per layer) must be an int >= 0, got {r!r}")
    return r


def configure(family: Family, budget: Budget | None) -> None:
    """Set ``family``'s model to ``budget`` (``None``: dense) after checking that it fits; the
    one path every consumer takes. How the model runs (static shapes, jitter) is kept."""
    runtime = family.options()
    if budget is None:  # every layer keeps all: the paper's rule, which then never samples
        family.set_schedule(None, runtime.with_rule("inverse_transform", 1.0, None))
        return
    budget.check(family)
    family.set_schedule(budget.schedule(family.depth, family.num_patches), budget.options(runtime))
