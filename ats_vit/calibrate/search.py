"""The search: budgets tried on calibration images, each method's knob bisected to a cost.

A :class:`BudgetSearch` computes the dense pass once (predictions, GFLOPs and every block's
input), so each trial runs only the blocks from its start layer on; a GFLOPs trial whose cost
on a probe quarter of the images is clearly far from the target stops there; and trials are
remembered, so searching several targets (or several methods) repeats no work. Which of the
budgets near a target is kept is :mod:`ats_vit.calibrate.choice`'s job; timing a latency
budget, :mod:`ats_vit.calibrate.verify`'s.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ats_vit import _validate
from ats_vit.budget import COST_KINDS, Budget, BudgetError, configure
from ats_vit.calibrate.methods import METHODS
from ats_vit.families import family_of
from ats_vit.flops import gflops
from ats_vit.latency import LatencyModel

__all__ = ["BudgetSearch", "Trial"]

# a trial stops on the probe when its cost is this much (and four standard errors) beyond the
# window of candidates; the probe is at least MIN_PROBE images (smaller sets run whole)
PROBE_MARGIN = 0.01
MIN_PROBE = 32

# (method, start layer, knob: the cap decay or keep ratio, temperature)
TrialKey = tuple[str, int, float, float]


@dataclass
class Trial:
    """One budget tried on the calibration images.

    ``cost`` is what the search meets (the GFLOPs ratio, or the predicted time ratio);
    ``gflops`` and ``seconds`` are both ratios to dense (``seconds`` None without a latency
    model). A trial first runs on a probe (a strided quarter of the images). When its GFLOPs
    there are clearly far from the target (beyond the window of candidates by four standard
    errors), it stops: it cannot be chosen, and which side of the target it lies on is all the
    search needs. Such a trial is ``estimated`` (its score is unknown, -inf)."""

    budget: Budget
    cost: float
    score: float  # accuracy, agreement with the dense top-1, or (feature models) fidelity
    images: int  # how many calibration images it ran on
    key: TrialKey
    gflops: float
    seconds: float | None = None
    # each calibration image's score (what a paired comparison of two trials needs)
    per_image: Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def estimated(self) -> bool:
        return self.score == -math.inf


class BudgetSearch:
    """Trials of budgets on one model and calibration set (see the module docstring).

    ``cost`` is ``"gflops"`` or ``"latency"`` (then ``latency``, a
    :class:`~ats_vit.latency.LatencyModel`, predicts each trial's time). A model without a
    classifier (a feature tower) is scored by how close its pooled features stay to the dense
    ones (mean cosine similarity); a classifier by accuracy against ``labels``, or without
    them by agreement with the dense model's top-1. ``passes`` counts the work done, in
    forward passes over all calibration images. ``items`` (N,): the independent source item
    of each image (:func:`ats_vit.data.source_items`; None: each image is its own), so that
    comparisons of two trials count items, not images.
    """

    def __init__(
        self,
        model: nn.Module,
        images: Tensor,
        labels: Tensor | None = None,
        *,
        cost: str = "gflops",
        latency: LatencyModel | None = None,
        start_layers: Iterable[int] | None = None,
        batch_size: int = 256,
        tolerance: float = 0.005,
        steps: int = 10,
        probe: bool = True,
        memory_limit: float = 8.0,
        items: Tensor | None = None,
    ) -> None:
        _validate.choice("cost", cost, COST_KINDS)
        if not isinstance(images, Tensor) or images.dim() not in (4, 5) or len(images) == 0:
            raise ValueError(
                "images must be a non-empty (N, C, H, W) tensor (videos: (N, frames, C, H, W)), "
                f"got {getattr(images, 'shape', images)}"
            )
        if labels is not None and (not isinstance(labels, Tensor) or labels.shape != images.shape[:1]):
            raise ValueError(
                f"labels must be a (N,) tensor matching images, got {getattr(labels, 'shape', labels)}"
            )
        if items is not None and (not isinstance(items, Tensor) or items.shape != images.shape[:1]):
            raise ValueError(
                f"items must be a (N,) tensor matching images, got {getattr(items, 'shape', items)}"
            )
        _validate.finite_images(images, "calibration images")
        self.model, self.cost, self.latency = model, cost, latency
        self.family = family_of(model)
        self.depth, self.num_patches = self.family.depth, self.family.num_patches
        layers = list(range(self.depth)) if start_layers is None else sorted(set(start_layers))
        if not layers or any(not _validate.is_int(i) or not 0 <= i < self.depth for i in layers):
            raise ValueError(f"start_layers must hold layer indices in [0, {self.depth}), got {layers}")
        self.layers, self.tolerance, self.steps = layers, tolerance, steps
        # each start layer's dense input is kept for every image, so trials start there
        cost_ = self.family.cost
        element = next(model.parameters()).element_size()
        tokens = (self.num_patches + cost_.num_prefix_tokens) * cost_.frames
        self.memory_gib = len(images) * len(layers) * tokens * cost_.dim * element / 2**30
        if self.memory_gib > memory_limit:
            raise BudgetError(
                f"calibration keeps the dense input of every start layer for every image: "
                f"{self.memory_gib:.1f} GiB here ({len(images)} images x {len(layers)} start layers x "
                f"{tokens} tokens x {cost_.dim} channels), above memory_limit={memory_limit:g} GiB; give "
                "fewer images, fewer start_layers, or a higher memory_limit"
            )
        self.features = self.family.num_classes == 0
        if self.features and labels is not None:
            raise ValueError(
                f"{self.family.name} has no classifier, so labels cannot score it: pass labels=None "
                "(it is then calibrated for the cosine similarity of its features to the dense ones)"
            )
        self.objective = "fidelity" if self.features else "agreement" if labels is None else "accuracy"
        if labels is not None:
            _validate.class_labels(labels, self.family.num_classes, "calibration labels")
        self.images = len(images)
        self.trials: dict[TrialKey, Trial] = {}
        self.passes = 0.0
        self.on_new_trial: Callable[[], None] | None = None  # e.g. a progress bar's update

        device = next(model.parameters()).device
        images = images.to(device)
        # a strided quarter of the images first (the probe), so that a probe is spread over a
        # folder sorted by class; the order of the images changes no mean
        order = torch.arange(len(images), device=device)
        stride = 4 if probe and cost == "gflops" and len(images) >= 4 * MIN_PROBE else 1
        order = torch.cat([order[i::stride] for i in range(stride)])
        self.ordered = images[order]
        # the independent item each image (in trial order) comes from: None, each its own
        self.items = None if items is None else items.to(device)[order]
        labels = None if labels is None else labels.to(device)[order]
        self.probe = len(order[::stride]) if stride > 1 else len(images)
        first = self.ordered[: self.probe].split(batch_size)
        rest = self.ordered[self.probe :].split(batch_size)
        self.batches = [*first, *rest] if self.probe < len(images) else list(first)
        self.probe_batches = len(first)
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                configure(self.family, None)
                self.dense: list[tuple[Tensor, Tensor, dict[int, Tensor]]] = []
                for batch in self.batches:
                    logits, flops, inputs = self.family.capture(batch)
                    kept = {i: inputs[i] for i in layers}  # only the start layers' inputs are needed
                    self.dense.append((logits, flops, kept))
        finally:
            model.train(was_training)
        dense_pred = torch.cat([logits.argmax(dim=-1) for logits, _, _ in self.dense])
        self.reference = dense_pred if labels is None else labels
        self.dense_gflops = torch.cat([flops for _, flops, _ in self.dense]).double().mean().item()
        self.dense_score = 1.0 if self.features else (dense_pred == self.reference).float().mean().item()

    def _scores(self, outputs: Tensor, batch: int) -> Tensor:
        """Per-image scores of one calibration batch's outputs: 1.0 / 0.0 for a correct /
        wrong top-1 (against the labels, or the dense top-1), or a feature model's cosine
        similarity to its dense features."""
        if self.features:
            return _cosine(self.dense[batch][0], outputs)
        start = sum(len(b) for b in self.batches[:batch])
        reference = self.reference[start : start + len(outputs)]
        return (outputs.argmax(dim=-1) == reference).float()

    def budget(self, method: str, start: int, knob: float, temperature: float = 1.0) -> Budget:
        """The budget of a trial."""
        return METHODS[method].budget(
            method, start, knob, temperature, depth=self.depth, num_patches=self.num_patches, cost=self.cost
        )

    def window(self, target: float) -> float:
        """How close to the target a budget's cost must be to be a candidate."""
        return max(self.tolerance, 0.01 * target)

    def _far(self, costs: Tensor, target: float) -> bool:
        """Whether the probe's per-image costs put the mean clearly outside the window of
        candidates around ``target`` (four standard errors of the probe's mean beyond it)."""
        n = len(costs)
        if n >= self.images:
            return False
        spread = costs.std().item() / math.sqrt(n) * math.sqrt(1 - n / self.images)
        return abs(costs.mean().item() - target) > self.window(target) + 4 * spread + PROBE_MARGIN

    def _stays_far(self, trial: Trial, target: float) -> bool:
        """An estimated trial can answer for ``target`` too when its probe cost is far from it."""
        return abs(trial.cost - target) > 2 * self.window(target) + 2 * PROBE_MARGIN

    @torch.inference_mode()
    def trial(
        self, method: str, start: int, knob: float, temperature: float = 1.0, target: float | None = None
    ) -> Trial:
        """Cost and score of one budget (remembered). With ``target``, a GFLOPs budget whose
        probe cost is clearly far from it is only estimated (see :class:`Trial`)."""
        key = (method, start, knob, temperature)
        known = self.trials.get(key)
        if known is not None and (
            not known.estimated or (target is not None and self._stays_far(known, target))
        ):
            return known
        budget = self.budget(method, start, knob, temperature)
        self._run(budget, key, target)
        if self.on_new_trial is not None and known is None:
            self.on_new_trial()
        return self.trials[key]

    @torch.inference_mode()
    def evaluate(self, budget: Budget, key: TrialKey) -> Trial:
        """Cost and score of a budget on every image (an estimated trial measured in full, or
        a chosen budget on the held-out images), kept under ``key`` (remembered)."""
        known = self.trials.get(key)
        if known is not None and not known.estimated:
            return known
        self._run(budget, key, None)
        if self.on_new_trial is not None and known is None:
            self.on_new_trial()
        return self.trials[key]

    def _run(self, budget: Budget, key: TrialKey, target: float | None) -> None:
        """Run ``budget`` over the images and remember its trial under ``key`` (with
        ``target``: only estimated when its probe cost is clearly far from it)."""
        start = budget.start_layer
        configure(self.family, budget)
        scores, costs, counts = [], [], []
        rules: list[Any] = []
        for i, (batch, (_, _, inputs)) in enumerate(zip(self.batches, self.dense, strict=True)):
            logits, state = self.family.run(batch, start, inputs[start])
            self.passes += len(batch) / self.images
            scores.append(self._scores(logits, i))
            costs.append(gflops(self.family.cost, state.trace).double() / self.dense_gflops)
            counts.append(state.trace.kept_per_layer())
            rules = state.trace.rules
            probe_done = i + 1 == self.probe_batches and self.cost == "gflops"
            if probe_done and target is not None and self._far(torch.cat(costs), target):
                cost = torch.cat(costs).mean().item()
                self.trials[key] = Trial(budget, cost, -math.inf, len(torch.cat(costs)), key, cost)
                break
        else:
            ratio = torch.cat(costs).mean().item()
            score = torch.cat(scores).mean().item()
            seconds = None
            if self.latency is not None:
                seconds = self.latency.seconds(torch.cat(counts), rules) / self.latency.dense_seconds()
            cost = ratio if self.cost == "gflops" else float(seconds)  # type: ignore[arg-type]
            self.trials[key] = Trial(budget, cost, score, self.images, key, ratio, seconds, torch.cat(scores))

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

    def search(self, method: str, target: float) -> list[Trial]:
        """Every trial the bisection of ``method``'s knob at ``target`` runs, from each start layer
        whose cheapest budget can still meet the target."""
        spec = METHODS[method]
        found: list[Trial] = []
        for start in self.layers:
            if self.floor(method, start, target).cost > target + self.tolerance:
                break  # even one token from here on costs too much, and later starts cost more
            if spec.knob == "temperature":
                for decay in spec.decays:

                    def at_temperature(temperature: float, decay: float = decay, start: int = start) -> Trial:
                        return self.trial(method, start, decay, temperature, target)

                    found += self._bisect(target, at_temperature, 1e-2, 1e2)
            else:

                def at_knob(knob: float, start: int = start) -> Trial:
                    return self.trial(method, start, knob, 1.0, target)

                found += self._bisect(target, at_knob, 0.0, 1.0)
        return found

    def near(self, methods: tuple[str, ...], target: float) -> tuple[list[Trial], list[Trial]]:
        """(every trial the searches of ``methods`` ran at ``target``, those measured on every
        image within the window of the target)."""
        found = [t for m in methods for t in self.search(m, target)]
        return found, [t for t in found if abs(t.cost - target) <= self.window(target) and not t.estimated]


def _cosine(dense: Tensor, features: Tensor) -> Tensor:
    """Cosine similarity per image of (b, ...) features to the dense ones."""
    return torch.nn.functional.cosine_similarity(dense.flatten(1).float(), features.flatten(1).float(), dim=1)
