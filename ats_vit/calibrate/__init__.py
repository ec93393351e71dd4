"""Calibration: ask for a cost ("60% of dense GFLOPs", "60% of dense time at batch 16 on this
device") and get the budget that meets it with the best accuracy found on calibration images.

:func:`calibrate` searches budgets: for every start layer (and cap decay, for ``ats-fuse``) it
turns the method's knob until the cost meets the target, and keeps the budget with the best
accuracy (or, without labels, agreement with the dense model's top-1). Two costs:

- ``cost="gflops"``: the mean GFLOPs counted from the tokens actually kept (:mod:`ats_vit.flops`);
- ``cost="latency"``: the time of a forward pass at ``timing_batch`` images on the model's
  device, predicted from a table of measured block times (:mod:`ats_vit.latency`), so the search
  ranks budgets by time without timing each; the chosen budget is then timed against the dense
  model, and when that misses the target the search aims again with the prediction corrected.

One job per module: :mod:`~ats_vit.calibrate.methods` (what a method selects and turns),
:mod:`~ats_vit.calibrate.search` (trials and the bisection of each knob),
:mod:`~ats_vit.calibrate.choice` (which budget is kept: ``method="auto"`` keeps its first
member unless another is significantly ahead) and :mod:`~ats_vit.calibrate.verify` (timing a
latency budget). :class:`Calibration` puts them together; the model is set once through its
family (:mod:`ats_vit.families`), and each trial only sets numbers on its sampling modules.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from ats_vit import _validate
from ats_vit._progress import bar as progress_bar
from ats_vit.budget import Budget, BudgetError, configure
from ats_vit.calibrate import choice
from ats_vit.calibrate.choice import SWITCH_Z, choose, each_best, prefer
from ats_vit.calibrate.methods import (
    AUTO,
    METHOD_CHOICES,
    METHODS,
    RECOMMENDED,
    Method,
    caps_for,
    check_method,
    members,
)
from ats_vit.calibrate.search import BudgetSearch, Trial
from ats_vit.calibrate.verify import VERIFY_ATTEMPTS, VERIFY_TOLERANCE, measured_ratio, verify
from ats_vit.latency import LatencyModel

# a budget that costs more than this (a fraction: 0.02 is 2 points) of accuracy, agreement or
# fidelity on the calibration images, against dense, is returned with a warning
COSTLY_DROP = 0.02

__all__ = [
    "AUTO",
    "METHODS",
    "METHOD_CHOICES",
    "RECOMMENDED",
    "SWITCH_Z",
    "VERIFY_ATTEMPTS",
    "VERIFY_TOLERANCE",
    "Calibration",
    "Method",
    "Trial",
    "calibrate",
    "caps_for",
    "prefer",
]


class Calibration:
    """Budget search for one model, calibration set and method; :func:`calibrate` in steps.

    ``method="auto"`` searches each method of :data:`AUTO` and keeps, for each target, the
    first one's best budget unless another's is significantly more accurate
    (:func:`~ats_vit.calibrate.choice.prefer`). ``cost`` is ``"gflops"`` or ``"latency"`` (then
    ``timing_batch`` images per forward pass on the model's device, under autocast to ``dtype``
    when given; ``latency`` passes a :class:`~ats_vit.latency.LatencyModel` already built).
    With a latency model (also for a GFLOPs target given ``timing_batch``), of equally accurate
    budgets near the target the fastest predicted is kept. ``verify``: time a latency budget
    and aim again when it misses (:mod:`~ats_vit.calibrate.verify`). Trials are remembered, so
    calibrating for several targets (as ``ats-vit bench frontier`` does) repeats no work;
    ``passes`` counts the work done, in forward passes over all calibration images.
    ``items`` (N,): the independent source item of each calibration image
    (:func:`ats_vit.data.calibration_items`; None: each image its own), so that `auto`'s
    switch rule counts independent evidence. ``holdout``: the fraction of the images (whole
    items) the search never sees; each chosen budget and the dense model are scored on them
    too, so the budget's record says whether its calibration result holds on images it was
    not chosen on (``holdout_images``, ``holdout_<objective>``, ``holdout_dense_<objective>``).
    """

    def __init__(
        self,
        model: nn.Module,
        images: Tensor,
        labels: Tensor | None = None,
        *,
        method: str = RECOMMENDED,
        cost: str = "gflops",
        timing_batch: int | None = None,
        dtype: torch.dtype | None = None,
        latency: LatencyModel | None = None,
        start_layers: Iterable[int] | None = None,
        batch_size: int = 256,
        tolerance: float = 0.005,
        steps: int = 10,
        probe: bool = True,
        verify: bool = True,
        progress: bool = True,
        memory_limit: float = 8.0,
        items: Tensor | None = None,
        holdout: float = 0.0,
    ) -> None:
        self.method = check_method(method)
        if timing_batch is not None:
            _validate.positive_int("timing_batch", timing_batch)
        held = _holdout_mask(images, items, _validate.probability("holdout", holdout))
        self.check: BudgetSearch | None = None
        if held is not None:
            check_labels = None if labels is None else labels[held]
            self.check = BudgetSearch(
                model,
                images[held],
                check_labels,
                start_layers=start_layers,
                batch_size=batch_size,
                probe=False,
                memory_limit=memory_limit,
            )
            images, labels = images[~held], None if labels is None else labels[~held]
            items = None if items is None else items[~held]
        self.search = BudgetSearch(
            model,
            images,
            labels,
            cost=cost,
            start_layers=start_layers,
            batch_size=batch_size,
            tolerance=tolerance,
            steps=steps,
            probe=probe,
            memory_limit=memory_limit,
            items=items,
        )
        self.model, self.family, self.cost = model, self.search.family, cost
        self.verify, self.dtype, self.progress = verify, dtype, progress
        self.timing_batch = timing_batch or (latency.batch_size if latency is not None else 64)
        if latency is None and (cost == "latency" or timing_batch is not None):
            latency = LatencyModel(self.family, self.timing_batch, dtype=dtype, progress=progress)
        self.latency = self.search.latency = latency
        # the images a latency budget is timed on: one batch of the calibration set
        self.timing_images = self.search.ordered[: self.timing_batch]
        self.timings: list[dict[str, Any]] = []  # every verification of a latency budget

    # what the search knows, for reports
    @property
    def trials(self) -> dict[Any, Trial]:
        return self.search.trials

    @property
    def passes(self) -> float:
        return self.search.passes

    @property
    def objective(self) -> str:
        return self.search.objective

    @property
    def dense_score(self) -> float:
        return self.search.dense_score

    @property
    def images(self) -> int:
        return self.search.images

    @property
    def tolerance(self) -> float:
        return self.search.tolerance

    def trial(
        self, method: str, start: int, knob: float, temperature: float = 1.0, target: float | None = None
    ) -> Trial:
        """Cost and score of one budget of ``method`` (remembered)."""
        return self.search.trial(method, start, knob, temperature, target)

    def candidates(self, target: float, method: str | None = None) -> list[Trial]:
        """Each member's most accurate budget within the window of ``target`` (then the
        cheaper), in the order the members are listed: what ``prefer`` chooses from."""
        methods = members(method or self.method)
        return each_best(self.search.near(methods, target)[1], methods)

    def choose(self, methods: tuple[str, ...], target: float) -> Trial:
        """The search's pick at ``target`` among the budgets within the window of the target
        (:func:`~ats_vit.calibrate.choice.choose`); when none is, the closest one, measured on
        every image."""
        # prefer() never leaves the first member that has a budget near the target when
        # SWITCH_Z is infinite: the others are searched only where the first has none
        # (the same picks in a fifth of the forward passes: benchmarks/calibration_speed.py)
        shortcut = self.latency is None and len(methods) > 1 and math.isinf(choice.SWITCH_Z)
        if shortcut and (first := self.search.near(methods[:1], target)[1]):
            return choose(first, methods[:1], self.images, timed=False, items=self.search.items)
        found, near = self.search.near(methods, target)
        if not near:
            best = min(found, key=lambda t: abs(t.cost - target))
            return self.search.evaluate(best.budget, best.key) if best.estimated else best
        return choose(near, methods, self.images, timed=self.latency is not None, items=self.search.items)

    def measured_ratio(self, budget: Budget, rounds: int = 21) -> float:
        """The time of a forward pass under ``budget`` as a fraction of the dense one, timed
        interleaved (median of ``rounds``) at ``timing_batch`` calibration images."""
        return measured_ratio(self.family, self.timing_images, budget, self.dtype, rounds)

    def __call__(self, target: float, method: str | None = None) -> Budget:
        """The best budget found at ``target`` (for ``method``, default: this search's); the model
        is left configured with it. Searches of several methods share the remembered trials."""
        if not isinstance(target, (int, float)) or isinstance(target, bool):
            raise TypeError(f"target must be a float (a fraction of the dense cost), got {target!r}")
        method = check_method(method or self.method)
        methods = members(method)
        was_training = self.model.training
        self.model.eval()
        bar = progress_bar(
            desc=f"calibrate {method} @ {target:g} ({self.cost})",
            unit="trial",
            disable=not self.progress,
            leave=False,
        )
        self.search.on_new_trial = bar.update
        measured = None
        try:
            cheapest = min(self.search.floor(m, self.search.layers[0]).cost for m in methods)
            if not cheapest < target <= 1.0:
                what = "GFLOPs" if self.cost == "gflops" else f"predicted time at batch {self.timing_batch}"
                raise BudgetError(
                    f"target must be in ({cheapest:.3f}, 1]: the {what} (as a fraction of dense) that "
                    f"method={method!r} reaches on this model starting at layers {self.search.layers}; "
                    f"got {target}"
                )
            best = self.choose(methods, target)
            if self.cost == "latency" and self.verify:
                best, measured, attempts = verify(
                    target, best, lambda aim: self.choose(methods, aim), self.measured_ratio
                )
                self.timings += attempts
        except BaseException:
            configure(self.family, None)
            raise
        finally:
            bar.close()
            self.search.on_new_trial = None
            self.model.train(was_training)
        chosen = replace(best.budget, target=float(target), calibration=self._record(best, method, measured))
        configure(self.family, chosen)
        self._warn_if_costly(chosen, target)
        return chosen

    def _warn_if_costly(self, budget: Budget, target: float) -> None:
        """Say so when a latency budget meets its time only by ruining the accuracy (a GFLOPs
        target names its cut itself), or its timing missed the target: such a budget is
        returned, but not silently."""
        cal, search = budget.calibration, self.search
        drop = cal[f"dense_{search.objective}"] - cal[search.objective]
        if self.cost == "latency" and not search.features and drop > COSTLY_DROP:
            advice = "a larger timing_batch, ats_vit.compile, or a milder target"
            warnings.warn(
                f"the budget for {target:g} of the dense {self.cost} costs {100 * drop:.1f} points of "
                f"{search.objective} on the calibration images ({100 * cal[search.objective]:.1f}% against "
                f"{100 * cal[f'dense_{search.objective}']:.1f}% dense); try {advice}",
                UserWarning,
                stacklevel=3,
            )
        measured = cal.get("measured_latency_ratio")
        if measured is not None and abs(measured / target - 1) > VERIFY_TOLERANCE:
            warnings.warn(
                f"the latency budget for {target:g} of dense time timed at {measured:.3f} "
                f"({100 * (measured / target - 1):+.0f}%) after {len(self.timings)} attempts: this device's "
                "timings did not let the search land closer",
                UserWarning,
                stacklevel=3,
            )

    def _record(self, best: Trial, method: str, measured: float | None) -> dict[str, Any]:
        search = self.search
        record: dict[str, Any] = {
            "cost": self.cost,
            "gflops_ratio": best.gflops,
            search.objective: best.score,
            f"dense_{search.objective}": search.dense_score,
            "images": search.images,
            "dense_gflops": search.dense_gflops,
            "trials": len(search.trials),
            "passes": round(search.passes, 1),
            "searched": method,
            "memory_gib": round(search.memory_gib, 3),
        }
        if self.latency is not None:
            record.update(
                latency_ratio=best.seconds,
                timing_batch=self.timing_batch,
                device=self.latency.key["device"],
                dtype=self.latency.key["dtype"],
            )
        if measured is not None:
            record["measured_latency_ratio"] = measured
        if self.check is not None:  # the same budget on the images the search never saw
            held = self.check.evaluate(best.budget, best.key)
            record.update(
                {
                    "holdout_images": self.check.images,
                    f"holdout_{search.objective}": held.score,
                    f"holdout_dense_{search.objective}": self.check.dense_score,
                    "holdout_gflops_ratio": held.gflops,
                }
            )
        return record


def _holdout_mask(images: Tensor, items: Tensor | None, fraction: float) -> Tensor | None:
    """(N,) bool: the images held out of the search (whole items, drawn with a fixed seed so a
    rerun holds out the same ones), or None for ``fraction == 0``."""
    if fraction == 0:
        return None
    groups = torch.arange(len(images)) if items is None else torch.unique(items.cpu(), return_inverse=True)[1]
    count = int(groups.max()) + 1
    held_groups = round(fraction * count)
    if not 1 <= held_groups < count:
        raise ValueError(
            f"holdout={fraction:g} of {count} independent items holds out {held_groups}: it must leave at "
            "least one item on each side (more calibration images, or another fraction)"
        )
    chosen = torch.randperm(count, generator=torch.Generator().manual_seed(0))[:held_groups]
    return torch.isin(groups, chosen).to(images.device)


def calibrate(
    model: nn.Module, images: Tensor, target: float, labels: Tensor | None = None, **options: Any
) -> Budget:
    """The budget that costs ``target`` (a fraction of the dense model's GFLOPs, or with
    ``cost="latency"`` of its time at ``timing_batch`` images on its device) on ``images``
    with the best accuracy there (``labels``), or the best agreement with the dense model's own
    top-1 when no labels are given, or, for a model without a classifier (a feature tower:
    ``family_of(model).num_classes == 0``), the best fidelity (mean cosine similarity of its
    pooled features to the dense ones); the model is left configured with it.

    images: (N, C, H, W) calibration images, (N, frames, C, H, W) for a video model (not the
    ones you report on); labels: (N,) or None.
    ``options`` are :class:`Calibration`'s: ``method`` (default :data:`RECOMMENDED`), ``cost``,
    ``timing_batch``, ``dtype``, ``start_layers`` (where selection may start; default all),
    ``batch_size``, ``tolerance`` and ``steps`` (of the bisection of each knob), ``probe``
    (stop GFLOPs trials that are clearly far from the target on a quarter of the images; the
    same budgets, faster), ``verify`` (time a latency budget and correct), ``progress``,
    ``items`` (each image's independent source item, for `auto`'s switch rule), ``holdout``
    (a fraction of the images kept from the search to check the chosen budget on).
    Raises :class:`~ats_vit.budget.BudgetError` naming the reachable range when ``target`` is
    out of it.
    """
    return Calibration(model, images, labels, **options)(target)
