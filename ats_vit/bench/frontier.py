"""Accuracy against GFLOPs and against measured time: every method calibrated to each target on
the calibration split, then measured once on the test split, per checkpoint.

Every accuracy carries a 95% interval from a bootstrap over the test split's independent items
(:func:`ats_vit.data.source_items`: the demo's three placements of one held-out digit are one
item), and every method is compared with the recommended one at the same target by a paired
bootstrap over the same items (the difference and its two-sided p-value). The chosen budgets of
a checkpoint are timed against its dense model in one interleaved run (speed-up: median of the
rounds, with the interquartile range).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ats_vit._progress import bar as progress_bar
from ats_vit.budget import Budget, BudgetError
from ats_vit.calibrate import METHOD_CHOICES, RECOMMENDED, Calibration
from ats_vit.checkpoint import load_model
from ats_vit.data import load_split, source_items, take
from ats_vit.evaluate import measure, time_budgets
from ats_vit.stats import bootstrap_ci95, paired_bootstrap
from ats_vit.timing import speedup

__all__ = ["FrontierConfig", "frontier"]


@dataclass
class FrontierConfig:
    """Every method calibrated to each GFLOP target on the calibration split (labels: their
    accuracy is maximised), then measured on the test split, for each checkpoint. ``data``:
    one data spec for all checkpoints, or one per checkpoint. ``timing_batch`` test images
    are timed per budget (``timing_repeats=0``: no timing)."""

    checkpoints: tuple[str, ...]
    data: tuple[str, ...] = ("demo",)
    methods: tuple[str, ...] = METHOD_CHOICES
    targets: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    calib_images: int | None = None  # None: the whole calibration split
    batch_size: int = 256
    timing_batch: int = 64
    timing_repeats: int = 7
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.checkpoints:
            raise ValueError("checkpoints must name at least one checkpoint")
        if len(self.data) not in (1, len(self.checkpoints)):
            raise ValueError(f"data must name one data set, or one per checkpoint; got {self.data}")
        known = METHOD_CHOICES
        bad = [m for m in self.methods if m not in known]
        if bad or not self.methods:
            raise ValueError(f"methods must be a non-empty subset of {known}, got {self.methods}")
        if not self.targets or not all(0.0 < t <= 1.0 for t in self.targets):
            raise ValueError(f"targets must be GFLOP fractions in (0, 1], got {self.targets}")
        if self.batch_size < 1 or self.timing_batch < 1 or self.timing_repeats < 0:
            raise ValueError(
                f"batch_size and timing_batch must be >= 1 and timing_repeats >= 0, got "
                f"{self.batch_size}, {self.timing_batch}, {self.timing_repeats}"
            )

    def data_of(self, index: int) -> str:
        return self.data[0] if len(self.data) == 1 else self.data[index]


FRONTIER_COLUMNS = (
    ("checkpoint", "checkpoint", "<10"),
    ("method", "method", "<10"),
    ("chosen", "chosen", "<10"),
    ("target", "target", ".2f"),
    ("gflops_ratio", "GFLOPs", ".3f"),
    ("accuracy_pct", "accuracy %", ".2f"),
    ("ci95_pct", "±", ".2f"),
    ("vs_recommended", "vs auto", "<14"),
    ("speedup_text", "speed-up (IQR)", "<18"),
    ("calib_score_pct", "calib %", ".2f"),
    ("start_layer", "start", "d"),
    ("kept", "kept (last)", ".1f"),
)


def frontier(cfg: FrontierConfig) -> list[dict[str, Any]]:
    """Test accuracy, GFLOPs and speed-up of every method at every target on every checkpoint.

    Settings are chosen on the calibration split only (:class:`ats_vit.calibrate.Calibration`);
    the test split is measured once per chosen budget. A target a method cannot reach is
    skipped (no row). Dense rows have method ``"dense"``. Each row's ``vs_auto_diff`` and
    ``vs_auto_p`` compare it with the recommended method at its target (paired bootstrap).
    """
    rows: list[dict[str, Any]] = []
    bar = progress_bar(
        total=len(cfg.checkpoints) * len(cfg.methods) * len(cfg.targets), desc="frontier", unit="budget"
    )
    for index, checkpoint in enumerate(cfg.checkpoints):
        data = cfg.data_of(index)
        name = Path(checkpoint).parent.name or str(checkpoint)
        model, model_cfg = load_model(checkpoint)
        model.eval()
        size, channels = model_cfg.image_size, model_cfg.channels
        calib_x, calib_y = take(
            load_split(data, "calib", size, channels=channels), cfg.calib_images, cfg.seed
        )
        test_x, test_y = take(load_split(data, "test", size, channels=channels))
        items = source_items(data, "test", len(test_y))
        dense_pred, dense_cost = measure(model, test_x, None, batch_size=cfg.batch_size)
        dense_gflops = dense_cost.double().mean().item()
        correct = {("dense", 1.0): dense_pred == test_y}
        mine = [_row(name, "dense", 1.0, None, dense_gflops, dense_gflops, correct["dense", 1.0], items)]
        search = Calibration(model, calib_x, calib_y, batch_size=cfg.batch_size, progress=False)
        budgets: list[Budget | None] = [None]
        for method in cfg.methods:
            for target in cfg.targets:
                torch.manual_seed(cfg.seed)  # the random peers draw at eval too
                bar.set_postfix(checkpoint=name, method=method, target=target, refresh=False)
                bar.update()
                try:
                    budget = search(target, method)
                except BudgetError:
                    continue
                torch.manual_seed(cfg.seed)
                pred, cost = measure(model, test_x, budget, batch_size=cfg.batch_size)
                correct[method, target] = pred == test_y
                gflops = cost.double().mean().item()
                mine.append(
                    _row(name, method, target, budget, gflops, dense_gflops, correct[method, target], items)
                )
                budgets.append(budget)
        for row in mine:  # paired with the recommended method at the same target
            reference = correct.get((RECOMMENDED, row["target"]))
            if reference is None or row["method"] in (RECOMMENDED, "dense"):
                row["vs_auto_diff"], row["vs_auto_p"], row["vs_recommended"] = float("nan"), float("nan"), ""
                continue
            diff, p = paired_bootstrap(correct[row["method"], row["target"]], reference, items)
            row["vs_auto_diff"], row["vs_auto_p"] = diff, p
            row["vs_recommended"] = f"{100 * diff:+.2f} (p={p:.2g})"
        _time_rows(cfg, model, test_x, budgets, mine)
        rows += mine
    bar.close()
    return rows


def _row(
    name: str,
    method: str,
    target: float,
    budget: Budget | None,
    gflops: float,
    dense_gflops: float,
    correct: torch.Tensor,
    items: torch.Tensor,
) -> dict[str, Any]:
    accuracy = correct.float().mean().item()
    ci95 = bootstrap_ci95(correct, items)
    return dict(
        checkpoint=name,
        method=method,
        chosen=method if budget is None else budget.method,
        target=target,
        gflops=gflops,
        gflops_ratio=gflops / dense_gflops,
        accuracy=accuracy,
        ci95=ci95,
        accuracy_pct=100 * accuracy,
        ci95_pct=100 * ci95,
        calib_score=float("nan") if budget is None else budget.calibration["accuracy"],
        calib_score_pct=float("nan") if budget is None else 100 * budget.calibration["accuracy"],
        start_layer=-1 if budget is None else budget.start_layer,
        temperature=1.0 if budget is None else budget.temperature,
        kept=float("nan") if budget is None else float(budget.caps[-1]),
        budget=None if budget is None else budget.to_dict(),
        test_images=len(correct),
        test_items=int(items.unique().numel()),
    )


def _time_rows(
    cfg: FrontierConfig,
    model: Any,
    test_x: torch.Tensor,
    budgets: list[Budget | None],
    rows: list[dict[str, Any]],
) -> None:
    """Speed-ups of every row's budget over dense, timed in one interleaved run."""
    nan = float("nan")
    for row in rows:
        row.update(speedup=nan, speedup_q1=nan, speedup_q3=nan, speedup_text="")
    if cfg.timing_repeats == 0:
        return
    timings = time_budgets(model, budgets, test_x[: cfg.timing_batch], repeats=cfg.timing_repeats)
    for row, timing in zip(rows, timings, strict=True):
        up = speedup(timings[0], timing)
        q1, q3 = up.quartiles()
        row.update(
            speedup=up.median,
            speedup_q1=q1,
            speedup_q3=q3,
            speedup_text=f"{up.median:.2f}x ({q1:.2f}-{q3:.2f})",
        )
