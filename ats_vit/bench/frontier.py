"""Accuracy against GFLOPs and against measured time: every method calibrated to each target on
the calibration split, then measured once on the test split, per checkpoint.

Every accuracy carries a 95% interval from a bootstrap over the test split's independent items
(:func:`ats_vit.data.source_items`: the demo's three placements of one held-out digit are one
item), and every method is compared with the recommended one at the same target by the exact
paired test over the same items (:func:`ats_vit.stats.paired_test`), its p-value also adjusted by
Benjamini-Hochberg over the whole table's comparisons. The chosen budgets of a checkpoint are
timed against its dense model in ``timing_processes`` separate processes, rounds in random order:
a speed-up is the median of the processes' medians with their range, and "not faster" when
that range reaches 1.0.

:func:`pool_seeds` turns the rows of several checkpoints of one recipe (``NAME``, ``NAME-s1``,
``NAME-s2``, ...: the training seed is the unit of evidence) into one row per method and
target: the mean over seeds, the spread across seeds beside the within-checkpoint interval,
and a paired test over seeds x test items.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ats_vit._progress import bar as progress_bar
from ats_vit.bench.common import checkpoint_splits
from ats_vit.budget import Budget, BudgetError
from ats_vit.calibrate import AUTO, METHOD_CHOICES, RECOMMENDED, SWITCH_Z, Calibration
from ats_vit.data import source_items
from ats_vit.evaluate import measure, time_budgets
from ats_vit.stats import adjust_bh, bootstrap_ci95, paired_test
from ats_vit.timing import speedup

__all__ = ["FrontierConfig", "frontier", "pool_seeds"]


@dataclass
class FrontierConfig:
    """Every method calibrated to each GFLOP target on the calibration split (labels: their
    accuracy is maximised), then measured on the test split, for each checkpoint. ``data``:
    one data spec for all checkpoints, or one per checkpoint. ``timing_batch`` test images
    are timed per budget, ``timing_repeats`` rounds in each of ``timing_processes`` separate
    processes (0: rounds in this process, the interquartile range over them;
    ``timing_repeats=0``: no timing)."""

    checkpoints: tuple[str, ...]
    data: tuple[str, ...] = ("demo",)
    methods: tuple[str, ...] = METHOD_CHOICES
    targets: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    calib_images: int | None = None  # None: the whole calibration split
    batch_size: int = 256
    timing_batch: int = 64
    timing_repeats: int = 7
    timing_processes: int = 5
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
        if (
            self.batch_size < 1
            or self.timing_batch < 1
            or min(self.timing_repeats, self.timing_processes) < 0
        ):
            raise ValueError(
                f"batch_size and timing_batch must be >= 1, timing_repeats and timing_processes >= 0, got "
                f"{self.batch_size}, {self.timing_batch}, {self.timing_repeats}, {self.timing_processes}"
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
    ("vs_recommended", "vs auto", "<24"),
    ("speedup_text", "speed-up (range)", "<24"),
    ("calib_score_pct", "calib %", ".2f"),
    ("start_layer", "start", "d"),
    ("kept", "kept (last)", ".1f"),
)


def frontier(cfg: FrontierConfig) -> list[dict[str, Any]]:
    """Test accuracy, GFLOPs and speed-up of every method at every target on every checkpoint.

    Settings are chosen on the calibration split only (:class:`ats_vit.calibrate.Calibration`);
    the test split is measured once per chosen budget. A target a method cannot reach is
    skipped (no row). Dense rows have method ``"dense"``. Each row's ``vs_auto_diff`` and
    ``vs_auto_p`` compare it with the recommended method at its target (exact paired test),
    ``vs_auto_p_adj`` is that p adjusted by Benjamini-Hochberg over every comparison in the
    returned rows (one table, one family); ``hits`` holds which test images it got right
    (:func:`unpack_hits`), so that :func:`pool_seeds` can pool checkpoints.
    """
    rows: list[dict[str, Any]] = []
    bar = progress_bar(
        total=len(cfg.checkpoints) * len(cfg.methods) * len(cfg.targets), desc="frontier", unit="budget"
    )
    for index, checkpoint in enumerate(cfg.checkpoints):
        data = cfg.data_of(index)
        loaded = checkpoint_splits(checkpoint, data, cfg.calib_images, cfg.seed)
        name, model, test_x, test_y, items = (
            loaded.name,
            loaded.model,
            loaded.test_x,
            loaded.test_y,
            loaded.test_items,
        )
        dense_pred, dense_cost = measure(model, test_x, None, batch_size=cfg.batch_size)
        dense_gflops = dense_cost.double().mean().item()
        correct = {("dense", 1.0): dense_pred == test_y}
        mine = [
            _row(name, data, "dense", 1.0, None, dense_gflops, dense_gflops, correct["dense", 1.0], items)
        ]
        search = Calibration(
            model,
            loaded.calib_x,
            loaded.calib_y,
            batch_size=cfg.batch_size,
            progress=False,
            items=loaded.calib_items,
        )
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
                    _row(
                        name,
                        data,
                        method,
                        target,
                        budget,
                        gflops,
                        dense_gflops,
                        correct[method, target],
                        items,
                    )
                )
                budgets.append(budget)
        for row in mine:  # paired with the recommended method at the same target
            reference = correct.get((RECOMMENDED, row["target"]))
            if reference is None or row["method"] in (RECOMMENDED, "dense"):
                row["vs_auto_diff"], row["vs_auto_p"] = math.nan, math.nan
                continue
            row["vs_auto_diff"], row["vs_auto_p"] = paired_test(
                correct[row["method"], row["target"]], reference, items
            )
        _time_rows(cfg, checkpoint, model, test_x, budgets, mine)
        rows += mine
    bar.close()
    _adjust(rows)
    return rows


def _adjust(rows: list[dict[str, Any]]) -> None:
    """Benjamini-Hochberg over the rows' comparisons with `auto` (one family), and the text."""
    for row, adjusted in zip(rows, adjust_bh([r["vs_auto_p"] for r in rows]), strict=True):
        row["vs_auto_p_adj"] = adjusted
        if math.isnan(adjusted):
            row["vs_recommended"] = ""
            continue
        mark = ("▲" if row["vs_auto_diff"] > 0 else "▼") if adjusted < 0.05 else " "
        row["vs_recommended"] = (
            f"{100 * row['vs_auto_diff']:+.2f} {mark} (p={row['vs_auto_p']:.2g}, adj {adjusted:.2g})"
        )


def pack_hits(correct: torch.Tensor) -> str:
    """(N,) bool -> base64 of its bits, 8 images a byte (first image in the high bit)."""
    bits = torch.zeros(-(-correct.numel() // 8) * 8, dtype=torch.uint8)
    bits[: correct.numel()] = correct.flatten().to(torch.uint8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
    packed = (bits.view(-1, 8) * weights).sum(1, dtype=torch.uint8)
    return base64.b64encode(bytes(packed.tolist())).decode("ascii")


def unpack_hits(text: str, count: int) -> torch.Tensor:
    """The (count,) bool tensor :func:`pack_hits` packed."""
    packed = torch.tensor(list(base64.b64decode(text)), dtype=torch.uint8)
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8)
    bits = (packed[:, None] >> shifts) & 1
    if bits.numel() < count:
        raise ValueError(f"hits hold {bits.numel()} images, not {count}")
    return bits.flatten()[:count].bool()


def recipe_of(checkpoint: str) -> str:
    """A checkpoint's recipe: its name without the seed suffix (``glyphs196-s2`` -> ``glyphs196``)."""
    return re.sub(r"-s\d+$", "", checkpoint)


POOLED_COLUMNS = (
    ("recipe", "recipe", "<10"),
    ("method", "method", "<10"),
    ("target", "target", ".2f"),
    ("seeds", "seeds", "d"),
    ("gflops_ratio", "GFLOPs", ".3f"),
    ("accuracy_pct", "accuracy %", ".2f"),
    ("seed_sd_pct", "± seeds", ".2f"),
    ("ci95_pct", "± items", ".2f"),
    ("vs_recommended", "vs auto", "<24"),
    ("speedup_text", "speed-up (range)", "<24"),
)


def pool_seeds(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (recipe, method, target) over the checkpoints (seeds) of each recipe.

    ``accuracy``: the mean over seeds; ``seed_sd``: their standard deviation (NaN for one
    seed); ``ci95``: the mean within-checkpoint interval (the test items' share of the noise);
    ``vs_auto_diff`` / ``vs_auto_p``: the exact paired test against `auto` over every (seed,
    test item) of the seeds that have both, and ``vs_auto_p_adj`` its Benjamini-Hochberg
    adjustment over all pooled comparisons; ``speedup``: the median over seeds of each seed's
    speed-up (itself the median over its timing processes), with the lowest and highest seed
    ("not faster" when that range reaches 1.0). Rows need ``hits`` (written since ats-vit 1.1).
    """
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((recipe_of(row["checkpoint"]), row["method"], row["target"]), []).append(row)
    pooled = []
    for (recipe, method, target), members in groups.items():
        acc = [r["accuracy"] for r in members]
        timed = [r for r in members if not math.isnan(r.get("speedup", math.nan))]
        median = statistics.median(r["speedup"] for r in timed) if timed else math.nan
        low = min((r["speedup"] for r in timed), default=math.nan)
        high = max((r["speedup"] for r in timed), default=math.nan)
        seed_sd = statistics.stdev(acc) if len(acc) > 1 else math.nan
        ci95 = statistics.fmean(r["ci95"] for r in members)
        out: dict[str, Any] = dict(
            recipe=recipe,
            method=method,
            target=target,
            seeds=len(members),
            checkpoints=[r["checkpoint"] for r in members],
            gflops_ratio=statistics.fmean(r["gflops_ratio"] for r in members),
            accuracy=statistics.fmean(acc),
            accuracy_pct=100 * statistics.fmean(acc),
            seed_sd=seed_sd,
            seed_sd_pct=100 * seed_sd,
            ci95=ci95,
            ci95_pct=100 * ci95,
            speedup=median,
            speedup_low=low,
            speedup_high=high,
            speedup_text=_speedup_text(method, median, low, high),
        )
        out["vs_auto_diff"], out["vs_auto_p"] = _pooled_test(
            members, groups.get((recipe, RECOMMENDED, target), [])
        )
        pooled.append(out)
    _adjust(pooled)
    return pooled


def _pooled_test(rows: list[dict[str, Any]], autos: list[dict[str, Any]]) -> tuple[float, float]:
    """Paired test of ``rows`` against `auto` over (seed, item): each seed's items get own ids."""
    if not rows or rows[0]["method"] in (RECOMMENDED, "dense"):
        return math.nan, math.nan
    by_checkpoint = {r["checkpoint"]: r for r in autos}
    mine, theirs, items, offset = [], [], [], 0
    for row in rows:
        auto = by_checkpoint.get(row["checkpoint"])
        if auto is None:
            continue
        if "hits" not in row or "hits" not in auto:
            raise ValueError(
                f"rows of {row['checkpoint']!r} hold no per-image hits (written since ats-vit 1.1): "
                "run the frontier again to pool its seeds"
            )
        n = row["test_images"]
        mine.append(unpack_hits(row["hits"], n))
        theirs.append(unpack_hits(auto["hits"], n))
        seed_items = source_items(row["data"], "test", n)
        items.append(seed_items + offset)
        offset += int(seed_items.max()) + 1
    if not mine:
        return math.nan, math.nan
    return paired_test(torch.cat(mine), torch.cat(theirs), torch.cat(items))


def _row(
    name: str,
    data: str,
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
        data=data,
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
        hits=pack_hits(correct),
        # what `auto` was when this ran (its members and switch threshold change by benchmark)
        **(dict(auto_members="+".join(AUTO), switch_z=SWITCH_Z) if method == RECOMMENDED else {}),
    )


def _time_rows(
    cfg: FrontierConfig,
    checkpoint: str,
    model: Any,
    test_x: torch.Tensor,
    budgets: list[Budget | None],
    rows: list[dict[str, Any]],
) -> None:
    """Speed-ups of every row's budget over dense: the median over ``cfg.timing_processes``
    separate processes (each a median over its shuffled interleaved rounds) and their range;
    with no processes, one interleaved run here and its interquartile range."""
    nan = math.nan
    for row in rows:
        row.update(speedup=nan, speedup_low=nan, speedup_high=nan, speedup_runs=[], speedup_text="")
    if cfg.timing_repeats == 0:
        return
    images = test_x[: cfg.timing_batch]
    if cfg.timing_processes == 0:
        timings = time_budgets(model, budgets, images, repeats=cfg.timing_repeats, shuffle=cfg.seed)
        for row, timing in zip(rows, timings, strict=True):
            up = speedup(timings[0], timing)
            low, high = up.quartiles()
            row.update(speedup=up.median, speedup_low=low, speedup_high=high)
            row["speedup_text"] = _speedup_text(row["method"], up.median, low, high)
        return
    runs = time_in_processes(checkpoint, budgets, images, cfg.timing_repeats, cfg.timing_processes, cfg.seed)
    for i, row in enumerate(rows):
        mine = [run[i] for run in runs]
        row.update(
            speedup=statistics.median(mine), speedup_low=min(mine), speedup_high=max(mine), speedup_runs=mine
        )
        row["speedup_text"] = _speedup_text(row["method"], row["speedup"], min(mine), max(mine))


def _speedup_text(method: str, median: float, low: float, high: float) -> str:
    """``1.38x (1.33-1.42)``; "not faster" when a budget's range reaches 1.0."""
    if math.isnan(median):
        return ""
    spread = f"({low:.2f}-{high:.2f})"
    if method != "dense" and low <= 1.0:
        return f"not faster {spread}"
    return f"{median:.2f}x {spread}"


def time_in_processes(
    checkpoint: str,
    budgets: Sequence[Budget | None],
    images: torch.Tensor,
    repeats: int,
    processes: int,
    seed: int = 0,
) -> list[list[float]]:
    """Per process, the median speed-up of each budget over the first (dense), each process a
    fresh interpreter (its own allocator, caches and clock state) timing ``repeats`` rounds in
    random order (:mod:`ats_vit.bench._timer`). One process at a time, so they never compete."""
    with tempfile.TemporaryDirectory(prefix="ats-vit-timing-") as tmp:
        spec = Path(tmp) / "spec.json"
        torch.save(images.contiguous(), Path(tmp) / "images.pt")
        runs = []
        for process in range(processes):
            spec.write_text(
                json.dumps(
                    dict(
                        checkpoint=str(checkpoint),
                        images=str(Path(tmp) / "images.pt"),
                        budgets=[None if b is None else b.to_dict() for b in budgets],
                        repeats=repeats,
                        shuffle=seed * 1000 + process,
                        threads=torch.get_num_threads(),
                    )
                )
            )
            done = subprocess.run(
                [sys.executable, "-m", "ats_vit.bench._timer", str(spec)],
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONWARNINGS": "ignore"},
                check=False,
            )
            if done.returncode != 0:
                raise RuntimeError(f"timing process {process} failed:\n{done.stderr[-2000:]}")
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return runs
