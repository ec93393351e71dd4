"""Budgets: ask for a cost ("60% of dense GFLOPs") and get it, with the best accuracy found.

A :class:`Budget` is one plain, JSON-able object: the layer where selection starts, a token
cap per layer from there on, the sampler, the temperature knob and what happens to dropped
tokens. It only sets the :class:`~ats_vit.sampling.AdaptiveTokenSampling` modules of a model
(ours, an ATS-patched timm model or a Hugging Face one); it never forks block code.

:func:`calibrate` searches budgets on calibration images: for every start layer (and cap
decay, for the ATS methods) it turns the method's knob until the mean GFLOPs, counted from
the tokens actually kept (:mod:`ats_vit.flops`), meet the target, and keeps the budget with
the best accuracy (or, without labels, agreement with the dense model's top-1).

Method names (what :func:`calibrate` searches):

- ``"ats"``: the paper's inverse-transform sampling with the temperature knob; the cap decays
  geometrically from the start layer and the temperature sets how much of it is used.
- ``"ats-fuse"``, ``"ats-merge"``: the same, with dropped tokens fused into one token or merged
  into their most similar kept token.
- ``"paper"``: the paper's ATS exactly (temperature 1): only the caps move.
- ``"topk"``, ``"evit"`` (top-k with fusion), ``"random"``, ``"tome"``: the peers, each keeping
  a fixed count that decays geometrically from the start layer.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from ats_vit import _validate
from ats_vit._progress import bar as progress_bar
from ats_vit.flops import TokenTrace, ViTCost, gflops
from ats_vit.sampling import DROPPED, SAMPLERS

__all__ = [
    "AUTO",
    "METHODS",
    "RECOMMENDED",
    "Budget",
    "BudgetError",
    "Calibration",
    "Method",
    "Trial",
    "calibrate",
    "measure",
]

FORMAT = "ats-vit-budget/1"


class BudgetError(ValueError):
    """A budget that does not fit a model, a target that cannot be reached, or a bad file."""


@dataclass(frozen=True)
class Budget:
    """Token selection for every layer of a model.

    Layers before ``start_layer`` keep every token; layer ``start_layer + i`` keeps at most
    ``max_tokens[i]`` patch tokens. ``sampler``, ``temperature`` and ``dropped`` are those of
    :class:`~ats_vit.sampling.AdaptiveTokenSampling`; the defaults are the paper's ATS.
    ``depth`` and ``num_patches`` record the model it was made for (``apply`` refuses another);
    ``target`` and ``calibration`` record how :func:`calibrate` chose it.
    """

    start_layer: int
    max_tokens: tuple[int, ...]
    sampler: str = "inverse_transform"
    temperature: float = 1.0
    dropped: str = "discard"
    depth: int | None = None
    num_patches: int | None = None
    method: str | None = None
    target: float | None = None
    calibration: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _validate.is_int(self.start_layer) or self.start_layer < 0:
            raise BudgetError(f"start_layer must be an int >= 0, got {self.start_layer!r}")
        caps = tuple(self.max_tokens) if isinstance(self.max_tokens, Sequence) else None
        if not caps:
            raise BudgetError(f"max_tokens must be a non-empty sequence of ints, got {self.max_tokens!r}")
        object.__setattr__(self, "max_tokens", caps)
        for i, cap in enumerate(caps):
            _validate.positive_int(f"max_tokens[{i}]", cap)
        if any(later > earlier for earlier, later in itertools.pairwise(caps)):
            raise BudgetError(f"max_tokens must be non-increasing, got {caps}")
        _validate.choice("sampler", self.sampler, SAMPLERS)
        _validate.choice("dropped", self.dropped, DROPPED)
        if self.sampler == "tome" and self.dropped != "merge":
            raise BudgetError("sampler='tome' merges the tokens it drops; dropped must be 'merge'")
        object.__setattr__(self, "temperature", _validate.positive_float("temperature", self.temperature))
        if self.depth is not None and self.start_layer + len(caps) != self.depth:
            raise BudgetError(
                f"start_layer + len(max_tokens) must equal depth: {self.start_layer} + {len(caps)} "
                f"!= {self.depth}"
            )

    def schedule(self, depth: int, num_patches: int) -> tuple[int, ...]:
        """One cap per layer of a model with ``depth`` layers and ``num_patches`` patches."""
        if self.start_layer + len(self.max_tokens) != depth:
            raise BudgetError(
                f"this budget covers {self.start_layer + len(self.max_tokens)} layers "
                f"(start_layer={self.start_layer}, {len(self.max_tokens)} caps); the model has {depth}"
            )
        return (num_patches,) * self.start_layer + tuple(min(c, num_patches) for c in self.max_tokens)

    def apply(self, model: nn.Module) -> nn.Module:
        """Set ``model``'s token selection to this budget (in place) and return it.

        ``model``: an :class:`ats_vit.ViT`, a timm ``VisionTransformer`` (patched through
        :mod:`ats_vit.timm`) or a Hugging Face ViT/DeiT (through :mod:`ats_vit.hf`).
        """
        adapter = adapt(model)
        for name, mine in (("depth", self.depth), ("num_patches", self.num_patches)):
            theirs = getattr(adapter, name)
            if mine is not None and mine != theirs:
                raise BudgetError(
                    f"this budget was made for a model with {name}={mine}; this one has {theirs}"
                )
        adapter.configure(self)
        return model

    def to_dict(self) -> dict[str, object]:
        return {"format": FORMAT, **asdict(self), "max_tokens": list(self.max_tokens)}

    @classmethod
    def from_dict(cls, raw: dict[str, object]) -> Budget:
        if raw.get("format") != FORMAT:
            raise BudgetError(f"not an ats-vit budget (format {raw.get('format')!r}, expected {FORMAT!r})")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known - {"format"})
        if unknown:
            raise BudgetError(f"budget has unknown fields {unknown}")
        return cls(**{k: v for k, v in raw.items() if k in known})

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

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
        try:
            return cls.from_dict(raw)
        except TypeError as exc:
            raise BudgetError(f"budget file {str(path)!r}: {exc}") from exc


# ---------------------------------------------------------------- model adapters


@dataclass
class Adapter:
    """What budgets need of a model family: its sizes, a way to set a budget (``None``:
    dense), its blocks, and a forward pass that also returns the GFLOPs of each image.

    ``run(images, start, hidden)`` -> (logits (b, classes), the pass's :class:`TokenTrace`);
    with ``hidden``, the blocks before ``start`` are skipped (traced as dense) and block
    ``start`` gets ``hidden``, its input in a dense pass, so a search over budgets computes the
    dense layers once. ``cost`` turns a trace into GFLOPs (:func:`ats_vit.flops.gflops`).
    """

    depth: int
    num_patches: int
    configure: Callable[[Budget | None], None]
    run: Callable[..., tuple[Tensor, TokenTrace]]
    blocks: Sequence[nn.Module]
    cost: ViTCost

    def forward(self, images: Tensor, start: int = 0, hidden: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Logits and GFLOPs per image (b,) of one pass."""
        logits, trace = self.run(images, start, hidden)
        return logits, gflops(self.cost, trace)

    def capture(self, images: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Dense logits, GFLOPs, and the input of every block, from one dense pass."""
        self.configure(None)
        inputs: list[Tensor] = []
        hooks = [b.register_forward_pre_hook(lambda _m, args: inputs.append(args[0])) for b in self.blocks]
        try:
            logits, flops = self.forward(images)
        finally:
            for hook in hooks:
                hook.remove()
        return logits, flops, inputs


def adapt(model: nn.Module) -> Adapter:
    """The :class:`Adapter` of an ``ats_vit.ViT``, a timm or a Hugging Face ViT."""
    from ats_vit.vit import ViT

    if isinstance(model, ViT):
        return _adapt_vit(model)
    family = type(model).__module__.split(".")[0]
    if family == "timm":
        import ats_vit.timm as ats_timm

        return ats_timm.adapter(model)
    if family == "transformers":
        import ats_vit.hf as ats_hf

        return ats_hf.adapter(model)
    raise TypeError(
        f"budgets apply to ats_vit.ViT, timm VisionTransformer and Hugging Face ViT/DeiT models, "
        f"got {type(model).__name__}"
    )


def _adapt_vit(model: nn.Module) -> Adapter:
    depth, n = len(model.blocks), model.num_patches

    def configure(budget: Budget | None) -> None:
        if budget is None:
            model.set_sampling((n,) * depth)
            return
        model.set_sampling(
            budget.schedule(depth, n),
            sampler=budget.sampler,
            temperature=budget.temperature,
            dropped=budget.dropped,
            static_shape=model.static_shape,
        )

    def run(images: Tensor, start: int = 0, hidden: Tensor | None = None) -> tuple[Tensor, TokenTrace]:
        resume = None if hidden is None else (start, hidden)
        feats, _, _, trace = model.forward_features(images, resume=resume)
        return model.forward_head(feats), trace

    return Adapter(depth, n, configure, run, model.blocks, model.cost)


# ---------------------------------------------------------------- calibration


@dataclass(frozen=True)
class Method:
    """A way of selecting tokens and the knob :func:`calibrate` turns to meet a cost.

    ``knob="temperature"``: the ATS temperature, for each cap decay in ``decays``;
    ``knob="decay"``: the cap decay itself (caps ``round(n * decay ** (l - start + 1))``).
    """

    sampler: str
    dropped: str = "discard"
    knob: str = "decay"
    decays: tuple[float, ...] = ()


_ATS_DECAYS = (0.5, 0.7, 0.85, 0.95)
METHODS: dict[str, Method] = {
    "ats": Method("inverse_transform", "discard", "temperature", _ATS_DECAYS),
    "ats-fuse": Method("inverse_transform", "fuse", "temperature", _ATS_DECAYS),
    "ats-merge": Method("inverse_transform", "merge", "temperature", _ATS_DECAYS),
    "paper": Method("inverse_transform"),
    "topk": Method("topk"),
    "evit": Method("topk", "fuse"),
    "random": Method("random"),
    "tome": Method("tome", "merge"),
}
# what method="auto" searches: the best ATS variant measured and ToMe-style merging, which is
# stronger at low budgets on the checkpoints we measured (benchmarks/README.md)
AUTO = ("ats-fuse", "tome")
RECOMMENDED = "auto"


def caps_for(decay: float, num_patches: int, layers: int) -> tuple[int, ...]:
    """``layers`` caps decaying geometrically from ``num_patches``: ``round(n * decay ** (i + 1))``."""
    return tuple(max(1, round(num_patches * decay ** (i + 1))) for i in range(layers))


@torch.inference_mode()
def measure(
    model: nn.Module,
    images: Tensor,
    budget: Budget | None,
    *,
    batch_size: int = 256,
    adapter: Adapter | None = None,
) -> tuple[Tensor, Tensor]:
    """Top-1 predictions (N,) and GFLOPs per image (N,) of ``model`` under ``budget`` (``None``:
    dense), in eval mode, batch by batch."""
    adapter = adapter or adapt(model)
    adapter.configure(budget)
    was_training = model.training
    model.eval()
    preds, costs = [], []
    for batch in images.split(batch_size):
        logits, flops = adapter.forward(batch)
        preds.append(logits.argmax(dim=-1))
        costs.append(flops)
    model.train(was_training)
    return torch.cat(preds), torch.cat(costs)


@dataclass
class Trial:
    """One budget tried on the calibration images."""

    budget: Budget
    cost: float  # mean GFLOPs as a fraction of dense
    score: float  # accuracy, or agreement with the dense top-1


class Calibration:
    """Budget search for one model, calibration set and method; :func:`calibrate` in steps.

    ``method="auto"`` searches each method of :data:`AUTO` and keeps the best budget found
    for each target (on a tie, the method listed first). The dense pass (predictions, GFLOPs
    and every block's input) is computed once, so each trial runs only the blocks from its
    start layer on, and trials are remembered, so calibrating the same search for several
    targets (as ``ats-vit bench frontier`` does) repeats no work.
    """

    def __init__(
        self,
        model: nn.Module,
        images: Tensor,
        labels: Tensor | None = None,
        *,
        method: str = RECOMMENDED,
        start_layers: Iterable[int] | None = None,
        batch_size: int = 256,
        tolerance: float = 0.005,
        steps: int = 10,
        progress: bool = True,
    ) -> None:
        if method != "auto" and method not in METHODS:
            raise ValueError(f"method must be 'auto' or one of {tuple(METHODS)}, got {method!r}")
        if not isinstance(images, Tensor) or images.dim() != 4 or len(images) == 0:
            raise ValueError(
                f"images must be a non-empty (N, C, H, W) tensor, got {getattr(images, 'shape', images)}"
            )
        if labels is not None and (not isinstance(labels, Tensor) or labels.shape != images.shape[:1]):
            raise ValueError(
                f"labels must be a (N,) tensor matching images, got {getattr(labels, 'shape', labels)}"
            )
        self.model, self.method = model, method
        self.adapter = adapt(model)
        self.depth, self.num_patches = self.adapter.depth, self.adapter.num_patches
        layers = list(range(self.depth)) if start_layers is None else sorted(set(start_layers))
        if not layers or any(not _validate.is_int(i) or not 0 <= i < self.depth for i in layers):
            raise ValueError(f"start_layers must hold layer indices in [0, {self.depth}), got {layers}")
        self.layers, self.tolerance, self.steps, self.progress = layers, tolerance, steps, progress
        self.objective = "agreement" if labels is None else "accuracy"
        self.images = len(images)
        self.trials: dict[tuple[str, int, float, float], Trial] = {}

        was_training = model.training
        model.eval()
        self.batches = images.split(batch_size)
        try:
            with torch.inference_mode():
                self.dense = [self.adapter.capture(batch) for batch in self.batches]
        finally:
            model.train(was_training)
        dense_pred = torch.cat([logits.argmax(dim=-1) for logits, _, _ in self.dense])
        self.reference = dense_pred if labels is None else labels.to(dense_pred.device)
        self.dense_gflops = torch.cat([flops for _, flops, _ in self.dense]).double().mean().item()
        self.dense_score = (dense_pred == self.reference).float().mean().item()
        self._bar = None

    def budget(self, method: str, start: int, decay: float, temperature: float = 1.0) -> Budget:
        spec = METHODS[method]
        return Budget(
            start_layer=start,
            max_tokens=caps_for(decay, self.num_patches, self.depth - start),
            sampler=spec.sampler,
            temperature=temperature,
            dropped=spec.dropped,
            depth=self.depth,
            num_patches=self.num_patches,
            method=method,
        )

    @torch.inference_mode()
    def trial(self, method: str, start: int, decay: float, temperature: float = 1.0) -> Trial:
        """Cost and score of one budget (remembered)."""
        key = (method, start, decay, temperature)
        if key not in self.trials:
            b = self.budget(method, start, decay, temperature)
            self.adapter.configure(b)
            preds, costs = [], []
            for batch, (_, _, inputs) in zip(self.batches, self.dense, strict=True):
                logits, flops = self.adapter.forward(batch, start, inputs[start])
                preds.append(logits.argmax(dim=-1))
                costs.append(flops)
            pred, cost = torch.cat(preds), torch.cat(costs).double().mean().item()
            score = (pred == self.reference).float().mean().item()
            self.trials[key] = Trial(b, cost / self.dense_gflops, score)
            if self._bar is not None:
                self._bar.update()
        return self.trials[key]

    def floor(self, method: str, start: int) -> Trial:
        """One token per layer from ``start`` on: the cheapest budget of ``method`` there."""
        return self.trial(method, start, 1e-9, 1e-3 if METHODS[method].knob == "temperature" else 1.0)

    def _bisect(self, target: float, make: Callable[[float], Trial], low: float, high: float) -> list[Trial]:
        """Trials along a knob whose cost grows from ``low`` to ``high`` (log-space if positive)."""
        log = low > 0
        lo, hi = (math.log(low), math.log(high)) if log else (low, high)
        tried = []
        for _ in range(self.steps):
            mid = (lo + hi) / 2
            t = make(math.exp(mid) if log else mid)
            tried.append(t)
            if abs(t.cost - target) <= self.tolerance:
                break
            lo, hi = (mid, hi) if t.cost < target else (lo, mid)
        return tried

    def _search(self, method: str, target: float) -> list[Trial]:
        found: list[Trial] = []
        spec = METHODS[method]
        for start in self.layers:
            if self.floor(method, start).cost > target + self.tolerance:
                break  # even one token from here on costs too much, and later starts cost more
            if spec.knob == "decay":
                found += self._bisect(target, partial(self.trial, method, start), 0.0, 1.0)
            else:
                for decay in spec.decays:
                    found += self._bisect(target, partial(self.trial, method, start, decay), 1e-2, 1e2)
        return found

    def __call__(self, target: float, method: str | None = None) -> Budget:
        """The best budget found at ``target`` (for ``method``, default: this search's); the model
        is left configured with it. Searches of several methods share the remembered trials."""
        if not isinstance(target, (int, float)) or isinstance(target, bool):
            raise TypeError(f"target must be a float (GFLOPs as a fraction of dense), got {target!r}")
        method = method or self.method
        if method != "auto" and method not in METHODS:
            raise ValueError(f"method must be 'auto' or one of {tuple(METHODS)}, got {method!r}")
        methods = AUTO if method == "auto" else (method,)
        was_training = self.model.training
        self.model.eval()
        self._bar = progress_bar(
            desc=f"calibrate {method} @ {target:g}", unit="trial", disable=not self.progress, leave=False
        )
        try:
            cheapest = min(self.floor(m, self.layers[0]).cost for m in methods)
            if not cheapest < target <= 1.0:
                raise BudgetError(
                    f"target must be in ({cheapest:.3f}, 1]: the GFLOPs (as a fraction of dense) that "
                    f"method={method!r} reaches on this model starting at layers {self.layers}; "
                    f"got {target}"
                )
            found = {m: self._search(m, target) for m in methods}
        except BaseException:
            self.adapter.configure(None)
            raise
        finally:
            self._bar.close()
            self._bar = None
            self.model.train(was_training)
        width = max(self.tolerance, 0.01 * target)
        rank = {m: i for i, m in enumerate(methods)}
        candidates = [t for trials in found.values() for t in trials]
        near = [t for t in candidates if abs(t.cost - target) <= width]
        if near:
            best = max(near, key=lambda t: (t.score, -rank[t.budget.method], -t.cost))
        else:
            best = min(candidates, key=lambda t: abs(t.cost - target))
        chosen = replace(
            best.budget,
            target=float(target),
            calibration={
                "gflops_ratio": best.cost,
                self.objective: best.score,
                f"dense_{self.objective}": self.dense_score,
                "images": self.images,
                "dense_gflops": self.dense_gflops,
                "trials": len(self.trials),
                "searched": method,
            },
        )
        self.adapter.configure(chosen)
        return chosen


def calibrate(
    model: nn.Module, images: Tensor, target: float, labels: Tensor | None = None, **options
) -> Budget:
    """The budget that costs ``target`` (GFLOPs as a fraction of dense) on ``images`` with the
    best accuracy there (``labels``), or the best agreement with the dense model's own top-1
    when no labels are given; the model is left configured with it.

    images: (N, C, H, W) calibration images (not the ones you report on); labels: (N,) or None.
    ``options`` are :class:`Calibration`'s: ``method`` (default :data:`RECOMMENDED`),
    ``start_layers`` (where selection may start; default all), ``batch_size``, ``tolerance``
    and ``steps`` (of the bisection of each knob), ``progress``. Raises :class:`BudgetError`
    naming the reachable range when ``target`` is out of it.
    """
    return Calibration(model, images, labels, **options)(target)
