"""Calibration: ask for a cost ("60% of dense GFLOPs") and get the budget that meets it with
the best accuracy found on calibration images.

:func:`calibrate` searches budgets: for every start layer (and cap decay, for the ATS methods)
it turns the method's knob until the mean GFLOPs, counted from the tokens actually kept
(:mod:`ats_vit.flops`), meet the target, and keeps the budget with the best accuracy (or,
without labels, agreement with the dense model's top-1). The model is set once through its
family (:mod:`ats_vit.families`); each trial only sets numbers on its sampling modules.

Method names (what :func:`calibrate` searches):

- ``"ats"``: the paper's inverse-transform sampling with the temperature knob; the cap decays
  geometrically from the start layer and the temperature sets how much of it is used.
- ``"ats-fuse"``, ``"ats-merge"``: the same, with dropped tokens fused into one token or merged
  into their most similar kept token.
- ``"paper"``: the paper's ATS exactly (temperature 1): only the caps move.
- ``"topk"``, ``"evit"`` (top-k with fusion), ``"random"``, ``"tome"`` (ToMe: merging after
  attention), ``"tome-early"`` (ToMe's matching merged before the queries): the peers, each
  keeping a fixed count that decays geometrically from the start layer.
- ``"official"``: the authors' released ATS (adaptive through de-duplication); the caps decay.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from ats_vit import _validate
from ats_vit._progress import bar as progress_bar
from ats_vit.budget import Budget, BudgetError, configure
from ats_vit.families import family_of

__all__ = ["AUTO", "METHODS", "RECOMMENDED", "Calibration", "Method", "Trial", "calibrate", "caps_for"]


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
    "tome-early": Method("tome-early", "merge"),
    "official": Method("official"),
}
# what method="auto" searches: the best ATS variant measured and ToMe-style merging, which is
# stronger at low budgets on the checkpoints we measured (benchmarks/README.md)
AUTO = ("ats-fuse", "tome")
RECOMMENDED = "auto"


# a trial stops on the probe when its cost is this much (and four standard errors) beyond the
# window of candidates; the probe is at least MIN_PROBE images (smaller sets run whole)
PROBE_MARGIN = 0.01
MIN_PROBE = 32


def caps_for(decay: float, num_patches: int, layers: int) -> tuple[int, ...]:
    """``layers`` caps decaying geometrically from ``num_patches``: ``round(n * decay ** (i + 1))``."""
    return tuple(max(1, round(num_patches * decay ** (i + 1))) for i in range(layers))


@dataclass
class Trial:
    """One budget tried on the calibration images.

    A trial first runs on a probe (a strided quarter of the images). When its cost there is
    clearly far from the target (beyond the window of candidates by four standard errors),
    it stops: it cannot be chosen, and which side of the target it lies on is all the search
    needs. Such a trial is ``estimated`` (its score is unknown, -inf)."""

    budget: Budget
    cost: float  # mean GFLOPs as a fraction of dense (on the probe while estimated)
    score: float  # accuracy, or agreement with the dense top-1
    images: int  # how many calibration images it ran on
    key: tuple[str, int, float, float]  # (method, start layer, cap decay, temperature)

    @property
    def estimated(self) -> bool:
        return self.score == -math.inf


class Calibration:
    """Budget search for one model, calibration set and method; :func:`calibrate` in steps.

    ``method="auto"`` searches each method of :data:`AUTO` and keeps the best budget found
    for each target (on a tie, the method listed first). The dense pass (predictions, GFLOPs
    and every block's input) is computed once, so each trial runs only the blocks from its
    start layer on; a trial whose cost on a probe quarter of the images is clearly far from
    the target stops there (:class:`Trial`); and trials are remembered, so calibrating the
    same search for several targets (as ``ats-vit bench frontier`` does) repeats no work.
    ``passes`` counts the work done, in forward passes over all calibration images.
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
        probe: bool = True,
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
        self.family = family_of(model)
        self.depth, self.num_patches = self.family.depth, self.family.num_patches
        layers = list(range(self.depth)) if start_layers is None else sorted(set(start_layers))
        if not layers or any(not _validate.is_int(i) or not 0 <= i < self.depth for i in layers):
            raise ValueError(f"start_layers must hold layer indices in [0, {self.depth}), got {layers}")
        self.layers, self.tolerance, self.steps, self.progress = layers, tolerance, steps, progress
        self.objective = "agreement" if labels is None else "accuracy"
        self.images = len(images)
        self.trials: dict[tuple[str, int, float, float], Trial] = {}
        self.passes = 0.0

        # a strided quarter of the images first (the probe), so that a probe is spread over a
        # folder sorted by class; the order of the images changes no mean
        order = torch.arange(len(images))
        stride = 4 if probe and len(images) >= 4 * MIN_PROBE else 1
        order = torch.cat([order[i::stride] for i in range(stride)])
        images = images[order]
        labels = None if labels is None else labels[order]
        self.probe = len(order[::stride]) if stride > 1 else len(images)
        first, rest = images[: self.probe].split(batch_size), images[self.probe :].split(batch_size)
        self.batches = [*first, *rest] if self.probe < len(images) else list(first)
        self.probe_batches = len(first)
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                configure(self.family, None)
                self.dense = [self.family.capture(batch) for batch in self.batches]
        finally:
            model.train(was_training)
        dense_pred = torch.cat([logits.argmax(dim=-1) for logits, _, _ in self.dense])
        self.reference = dense_pred if labels is None else labels.to(dense_pred.device)
        self.dense_gflops = torch.cat([flops for _, flops, _ in self.dense]).double().mean().item()
        self.dense_score = (dense_pred == self.reference).float().mean().item()
        self._bar: Any = None

    def budget(self, method: str, start: int, decay: float, temperature: float = 1.0) -> Budget:
        spec = METHODS[method]
        return Budget(
            start_layer=start,
            caps=caps_for(decay, self.num_patches, self.depth - start),
            sampler=spec.sampler,
            temperature=temperature,
            dropped=spec.dropped,
            depth=self.depth,
            num_patches=self.num_patches,
            method=method,
        )

    def _far(self, costs: Tensor, target: float) -> bool:
        """Whether the probe's per-image costs put the mean clearly outside the window of
        candidates around ``target`` (four standard errors of the probe's mean beyond it)."""
        n = len(costs)
        if n >= self.images:
            return False
        spread = costs.std().item() / math.sqrt(n) * math.sqrt(1 - n / self.images)
        return abs(costs.mean().item() - target) > self.window(target) + 4 * spread + PROBE_MARGIN

    def window(self, target: float) -> float:
        """How close to the target a budget's cost must be to be a candidate."""
        return max(self.tolerance, 0.01 * target)

    @torch.inference_mode()
    def trial(
        self, method: str, start: int, decay: float, temperature: float = 1.0, target: float | None = None
    ) -> Trial:
        """Cost and score of one budget (remembered). With ``target``, a budget whose probe cost
        is clearly far from it is only estimated (see :class:`Trial`)."""
        key = (method, start, decay, temperature)
        known = self.trials.get(key)
        if known is not None and (
            not known.estimated or (target is not None and self._stays_far(known, target))
        ):
            return known
        b = self.budget(method, start, decay, temperature)
        configure(self.family, b)
        preds, costs = [], []
        for i, (batch, (_, _, inputs)) in enumerate(zip(self.batches, self.dense, strict=True)):
            logits, flops = self.family.forward(batch, start, inputs[start])
            self.passes += len(batch) / self.images
            preds.append(logits.argmax(dim=-1))
            costs.append(flops.double() / self.dense_gflops)
            if i + 1 == self.probe_batches and target is not None and self._far(torch.cat(costs), target):
                cost = torch.cat(costs)
                self.trials[key] = Trial(b, cost.mean().item(), -math.inf, len(cost), key)
                break
        else:
            pred, cost = torch.cat(preds), torch.cat(costs)
            score = (pred == self.reference).float().mean().item()
            self.trials[key] = Trial(b, cost.mean().item(), score, len(cost), key)
        if self._bar is not None and known is None:
            self._bar.update()
        return self.trials[key]

    def _stays_far(self, trial: Trial, target: float) -> bool:
        """An estimated trial can answer for ``target`` too when its probe cost is far from it."""
        return abs(trial.cost - target) > 2 * self.window(target) + 2 * PROBE_MARGIN

    def floor(self, method: str, start: int, target: float | None = None) -> Trial:
        """One token per layer from ``start`` on: the cheapest budget of ``method`` there."""
        temperature = 1e-3 if METHODS[method].knob == "temperature" else 1.0
        return self.trial(method, start, 1e-9, temperature, target)

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
            if self.floor(method, start, target).cost > target + self.tolerance:
                break  # even one token from here on costs too much, and later starts cost more
            if spec.knob == "decay":
                make = partial(self._at_decay, method, start, target)
                found += self._bisect(target, make, 0.0, 1.0)
            else:
                for decay in spec.decays:
                    make = partial(self._at_temperature, method, start, decay, target)
                    found += self._bisect(target, make, 1e-2, 1e2)
        return found

    def _at_decay(self, method: str, start: int, target: float, decay: float) -> Trial:
        return self.trial(method, start, decay, 1.0, target)

    def _at_temperature(
        self, method: str, start: int, decay: float, target: float, temperature: float
    ) -> Trial:
        return self.trial(method, start, decay, temperature, target)

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
            configure(self.family, None)
            raise
        finally:
            if self._bar is not None:
                self._bar.close()
            self._bar = None
            self.model.train(was_training)
        width = self.window(target)
        rank: dict[str | None, int] = {m: i for i, m in enumerate(methods)}
        candidates = [t for trials in found.values() for t in trials]
        near = [t for t in candidates if abs(t.cost - target) <= width and not t.estimated]
        if near:
            best = max(near, key=lambda t: (t.score, -rank[t.budget.method], -t.cost))
        else:
            best = min(candidates, key=lambda t: abs(t.cost - target))
            if best.estimated:  # the closest was only probed: measure it on every image
                best = self.trial(*best.key)
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
                "passes": round(self.passes, 1),
                "searched": method,
            },
        )
        configure(self.family, chosen)
        return chosen


def calibrate(
    model: nn.Module, images: Tensor, target: float, labels: Tensor | None = None, **options: Any
) -> Budget:
    """The budget that costs ``target`` (GFLOPs as a fraction of dense) on ``images`` with the
    best accuracy there (``labels``), or the best agreement with the dense model's own top-1
    when no labels are given; the model is left configured with it.

    images: (N, C, H, W) calibration images (not the ones you report on); labels: (N,) or None.
    ``options`` are :class:`Calibration`'s: ``method`` (default :data:`RECOMMENDED`),
    ``start_layers`` (where selection may start; default all), ``batch_size``, ``tolerance``
    and ``steps`` (of the bisection of each knob), ``probe`` (stop trials that are clearly
    far from the target on a quarter of the images; the same budgets, faster), ``progress``.
    Raises :class:`BudgetError`
    naming the reachable range when ``target`` is out of it.
    """
    return Calibration(model, images, labels, **options)(target)
