"""Accuracy against GFLOPs: every method calibrated to each target on the calibration split,
then measured once on the test split, per checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ats_vit._progress import bar as progress_bar
from ats_vit.budget import BudgetError
from ats_vit.calibrate import METHODS, Calibration
from ats_vit.checkpoint import load_model
from ats_vit.data import load_split, take
from ats_vit.evaluate import measure
from ats_vit.stats import binomial_ci95

__all__ = ["FRONTIER_COLUMNS", "FrontierConfig", "frontier"]


@dataclass
class FrontierConfig:
    """Every method calibrated to each GFLOP target on the calibration split (labels: their
    accuracy is maximised), then measured on the test split, for each checkpoint."""

    checkpoints: tuple[str, ...]
    data: str = "demo"
    methods: tuple[str, ...] = (
        "auto",
        "paper",
        "ats",
        "ats-fuse",
        "ats-merge",
        "topk",
        "evit",
        "random",
        "tome",
    )
    targets: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
    calib_images: int | None = None  # None: the whole calibration split
    batch_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.checkpoints:
            raise ValueError("checkpoints must name at least one checkpoint")
        known = ("auto", *METHODS)
        bad = [m for m in self.methods if m not in known]
        if bad or not self.methods:
            raise ValueError(f"methods must be a non-empty subset of {known}, got {self.methods}")
        if not self.targets or not all(0.0 < t <= 1.0 for t in self.targets):
            raise ValueError(f"targets must be GFLOP fractions in (0, 1], got {self.targets}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


FRONTIER_COLUMNS = (
    ("checkpoint", "checkpoint", "<12"),
    ("method", "method", "<10"),
    ("chosen", "chosen", "<10"),
    ("target", "target", ".2f"),
    ("gflops_ratio", "GFLOPs", ".3f"),
    ("accuracy_pct", "accuracy %", ".2f"),
    ("ci95_pct", "±", ".2f"),
    ("calib_score_pct", "calib %", ".2f"),
    ("start_layer", "start", "d"),
    ("temperature", "temp", ".3g"),
    ("kept", "kept (last)", ".1f"),
)


def frontier(cfg: FrontierConfig) -> list[dict[str, Any]]:
    """Test accuracy and GFLOPs of every method at every target on every checkpoint.

    Settings are chosen on the calibration split only (:class:`ats_vit.budget.Calibration`);
    the test split is measured once per chosen budget. A target a method cannot reach is
    skipped (no row). Dense rows have method ``"dense"``.
    """

    rows: list[dict[str, Any]] = []
    bar = progress_bar(
        total=len(cfg.checkpoints) * len(cfg.methods) * len(cfg.targets), desc="frontier", unit="budget"
    )
    for checkpoint in cfg.checkpoints:
        name = Path(checkpoint).parent.name or str(checkpoint)
        model, model_cfg = load_model(checkpoint)
        model.eval()
        calib_x, calib_y = take(
            load_split(cfg.data, "calib", model_cfg.image_size), cfg.calib_images, cfg.seed
        )
        test_x, test_y = take(load_split(cfg.data, "test", model_cfg.image_size))
        dense_pred, dense_cost = measure(model, test_x, None, batch_size=cfg.batch_size)
        dense_gflops = dense_cost.double().mean().item()
        accuracy = (dense_pred == test_y).float().mean().item()
        rows.append(
            dict(
                checkpoint=name,
                method="dense",
                chosen="dense",
                target=1.0,
                gflops=dense_gflops,
                gflops_ratio=1.0,
                accuracy=accuracy,
                ci95=binomial_ci95(accuracy, len(test_y)),
                calib_score=float("nan"),
                start_layer=model_cfg.depth,
                temperature=1.0,
                kept=float(model_cfg.num_patches),
                budget=None,
                test_images=len(test_y),
            )
        )
        search = Calibration(model, calib_x, calib_y, batch_size=cfg.batch_size, progress=False)
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
                accuracy = (pred == test_y).float().mean().item()
                rows.append(
                    dict(
                        checkpoint=name,
                        method=method,
                        chosen=budget.method,
                        target=target,
                        gflops=cost.double().mean().item(),
                        gflops_ratio=cost.double().mean().item() / dense_gflops,
                        accuracy=accuracy,
                        ci95=binomial_ci95(accuracy, len(test_y)),
                        calib_score=budget.calibration["accuracy"],
                        start_layer=budget.start_layer,
                        temperature=budget.temperature,
                        kept=float(budget.caps[-1]),
                        budget=budget.to_dict(),
                        test_images=len(test_y),
                    )
                )
    bar.close()
    for r in rows:
        r["accuracy_pct"], r["ci95_pct"] = 100 * r["accuracy"], 100 * r["ci95"]
        r["calib_score_pct"] = 100 * r["calib_score"]
    return rows
