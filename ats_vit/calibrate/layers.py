"""Per-layer caps found greedily: the search behind ``tome-layers``.

A method's knob turns every layer's cap together (a geometric decay from a start layer). A
per-layer method (knob ``"layers"``) instead starts dense and repeatedly cuts the one layer
whose cut costs the least divergence from the dense model per unit of cost saved:
``LAYER_STEP`` of that layer's cap (at least one token; later layers never keep more than an
earlier one), until the cost meets the target. The divergence is the KL divergence of the
model's predictions from the dense ones (a feature tower: one minus the cosine similarity of
its pooled features), which every image informs, unlike a top-1 hit. Moves are ranked on the
first ``RANK_IMAGES`` calibration images (in trial order, spread over the set); the budget a
target gets is then scored on every calibration image like any other trial, and, with
``holdout``, on images the search never saw (:class:`~ats_vit.calibrate.Calibration`).

One greedy path serves every target: it is remembered per method, continued when a lower
target is asked for, and each target's budget is the step that crosses it, its last cut
shortened (in whole tokens) to land as close to the target as the window allows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from ats_vit.budget import Budget, configure
from ats_vit.flops import gflops

__all__ = ["LAYER_STEP", "RANK_IMAGES", "GreedyPath"]

# the share of a layer's cap one move cuts (at least one token)
LAYER_STEP = 0.1
# moves are ranked on this many calibration images (all of them when there are fewer)
RANK_IMAGES = 256


@dataclass
class Step:
    """One point of a greedy path: the caps (every layer), their cost on the ranking images
    and their divergence from dense there."""

    caps: tuple[int, ...]
    cost: float
    divergence: float


@dataclass
class GreedyPath:
    """The greedy cuts of one method on one search, from dense down to the lowest target
    asked for so far."""

    method: str
    steps: list[Step] = field(default_factory=list)


class BudgetSearch(Protocol):
    """What the greedy search reads of :class:`ats_vit.calibrate.search.BudgetSearch` (which
    runs it, so this module cannot import it): the calibration images in batches, their dense
    outputs and the search's settings."""

    family: Any
    depth: int
    num_patches: int
    layers: list[int]
    cost: str
    latency: Any
    features: bool
    images: int
    batches: list[Tensor]
    dense: list[tuple[Tensor, Tensor, dict[int, Tensor]]]
    dense_gflops: float
    passes: float
    on_new_trial: Callable[[], None] | None
    greedy_paths: dict[str, GreedyPath]

    def window(self, target: float) -> float: ...


def _budget(search: BudgetSearch, method: str, caps: tuple[int, ...]) -> Budget:
    """The budget of per-layer ``caps``, starting at the first layer that cuts (the search
    keeps the dense input of its start layers, so a later start runs fewer blocks)."""
    from ats_vit.calibrate.methods import METHODS

    spec, n = METHODS[method], search.num_patches
    start = next((i for i, c in enumerate(caps) if c < n), len(caps) - 1)
    usable = [s for s in search.layers if s <= start]
    start = max(usable) if usable else 0
    return Budget(
        start_layer=start,
        caps=caps[start:],
        sampler=spec.sampler,
        dropped=spec.dropped,
        depth=search.depth,
        num_patches=n,
        method=method,
        cost=search.cost,
    )


def _rank_batches(search: BudgetSearch) -> int:
    """How many of the search's batches (in trial order) the moves are ranked on."""
    seen, count = 0, 0
    for batch in search.batches:
        if seen >= RANK_IMAGES:
            break
        seen += len(batch)
        count += 1
    return count


def _divergence(search: BudgetSearch, dense: Tensor, outputs: Tensor) -> Tensor:
    """Per image: KL(dense || budget) of the predictions, or 1 - cosine of a tower's features."""
    if search.features:
        dense_flat, flat = dense.flatten(1).float(), outputs.flatten(1).float()
        return 1 - torch.nn.functional.cosine_similarity(dense_flat, flat, dim=1)
    log_dense = dense.float().log_softmax(dim=-1)
    log_ours = outputs.float().log_softmax(dim=-1)
    return (log_dense.exp() * (log_dense - log_ours)).sum(dim=-1)


@torch.inference_mode()
def _rank(search: BudgetSearch, budget: Budget) -> tuple[float, float]:
    """(cost, divergence) of ``budget`` on the ranking images."""
    configure(search.family, budget)
    costs, divergences, counts = [], [], []
    rules: list[Any] = []
    start = budget.start_layer
    for i in range(_rank_batches(search)):
        dense_logits, _, inputs = search.dense[i]
        outputs, state = search.family.run(search.batches[i], start, inputs[start])
        search.passes += len(outputs) / search.images
        costs.append(gflops(search.family.cost, state.trace).double() / search.dense_gflops)
        divergences.append(_divergence(search, dense_logits, outputs))
        counts.append(state.trace.kept_per_layer())
        rules = state.trace.rules
    latency = search.latency
    if search.on_new_trial is not None:  # each ranked cut is a trial (on fewer images)
        search.on_new_trial()
    if search.cost == "latency" and latency is not None:
        cost = latency.seconds(torch.cat(counts), rules) / latency.dense_seconds()
    else:
        cost = torch.cat(costs).mean().item()
    return float(cost), torch.cat(divergences).double().mean().item()


def _cut(caps: tuple[int, ...], layer: int, tokens: int) -> tuple[int, ...]:
    """``caps`` with ``layer``'s cap ``tokens`` lower and no later layer above it."""
    new = list(caps)
    new[layer] -= tokens
    for j in range(layer + 1, len(new)):
        new[j] = min(new[j], new[layer])
    return tuple(new)


def _extend(search: BudgetSearch, path: GreedyPath, target: float) -> None:
    """Cut until the path's last step costs at most ``target`` minus the window (or nothing
    is left to cut)."""
    if not path.steps:
        path.steps.append(Step((search.num_patches,) * search.depth, 1.0, 0.0))
    low = target - search.window(target)
    while path.steps[-1].cost > low:
        here = path.steps[-1]
        best: tuple[float, Step] | None = None
        for layer, cap in enumerate(here.caps):
            if cap <= 1:
                continue
            caps = _cut(here.caps, layer, max(1, round(LAYER_STEP * cap)))
            cost, divergence = _rank(search, _budget(search, path.method, caps))
            saved = here.cost - cost
            if saved <= 0:
                continue
            rate = (divergence - here.divergence) / saved
            if best is None or rate < best[0]:
                best = (rate, Step(caps, cost, divergence))
        if best is None:
            return  # one token everywhere: nothing cheaper to try
        path.steps.append(best[1])


def _landing(search: BudgetSearch, path: GreedyPath, target: float) -> Step:
    """The step whose cost is nearest ``target``: where a cut crosses the window, that cut
    shortened by whole tokens (bisection) towards the target."""
    window = search.window(target)
    steps = path.steps
    after = next((i for i, s in enumerate(steps) if s.cost <= target + window), len(steps) - 1)
    crossing = steps[after]
    if abs(crossing.cost - target) <= window or after == 0:
        return crossing
    before = steps[after - 1]
    layer = next(i for i, (a, b) in enumerate(zip(before.caps, crossing.caps, strict=True)) if a != b)
    lo, hi = 0, before.caps[layer] - crossing.caps[layer]  # tokens cut: 0 is before, hi crossing
    best = min((before, crossing), key=lambda s: abs(s.cost - target))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        caps = _cut(before.caps, layer, mid)
        cost, divergence = _rank(search, _budget(search, path.method, caps))
        step = Step(caps, cost, divergence)
        if abs(cost - target) < abs(best.cost - target):
            best = step
        if abs(cost - target) <= window:
            return step
        lo, hi = (mid, hi) if cost > target else (lo, mid)
    return best


def greedy_budget(search: BudgetSearch, method: str, target: float) -> tuple[Budget, tuple[Any, ...]]:
    """The per-layer budget of ``method`` at ``target`` and its trial key (the search scores it
    on every calibration image)."""
    path = search.greedy_paths.setdefault(method, GreedyPath(method))
    if not path.steps or path.steps[-1].cost > target - search.window(target):
        _extend(search, path, target)
    step = _landing(search, path, target)
    budget = _budget(search, method, step.caps)
    return budget, (method, budget.start_layer, step.caps, 1.0)
