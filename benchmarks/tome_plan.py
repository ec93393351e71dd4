"""What ToMe's shorter plan buys: each ToMe budget timed with the plan it runs now and with
the general plan (``ats_vit.sampling.TOME_FAST_PATH = False``), against dense, interleaved in
one run, repeated ``--runs`` times; the logits of both plans are checked to be equal.

    python benchmarks/tome_plan.py runs/demo/final.safetensors --budget tome-0.5.json tome-0.7.json \\
        --runs 3 --json results/tome_plan_demo.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
from dataclasses import dataclass
from typing import Any

import torch

import ats_vit.sampling as sampling
from ats_vit._progress import bar as progress_bar
from ats_vit.bench import checkpoint_batch, json_arguments, print_table, write_json
from ats_vit.bench.train import variant_names
from ats_vit.budget import Budget
from ats_vit.timing import speedup, time_round_robin


@dataclass
class Config:
    checkpoint: str
    budgets: tuple[str, ...]
    data: str = "demo"
    batch_size: int = 64
    runs: int = 3
    warmup: int = 3
    repeats: int = 20
    min_seconds: float = 2.0


COLUMNS = (
    ("budget", "budget", "<20"),
    ("general", "speed-up, general plan (runs)", "<24"),
    ("fast", "speed-up, shorter plan (runs)", "<24"),
    ("general_median", "median", ".2f"),
    ("fast_median", "median", ".2f"),
    ("gain", "shorter / general (median)", ".3f"),
)


def run(cfg: Config) -> list[dict[str, Any]]:
    base, _, images = checkpoint_batch(cfg.checkpoint, cfg.data, "test", cfg.batch_size)
    default = sampling.TOME_FAST_PATH

    def call(model: torch.nn.Module, fast: bool) -> Any:
        def forward() -> None:
            sampling.TOME_FAST_PATH = fast
            with torch.inference_mode():
                model(images)

        return forward

    fns = {"dense": call(base, default)}
    names = variant_names(cfg.budgets)
    try:
        for name, path in names.items():
            budget = Budget.load(path)
            if budget.sampler != "tome":
                raise ValueError(f"{path} is a {budget.sampler!r} budget; this benchmark times ToMe budgets")
            model = budget.apply(copy.deepcopy(base))
            with torch.inference_mode():
                sampling.TOME_FAST_PATH = False
                general = model(images)
                sampling.TOME_FAST_PATH = True
                torch.testing.assert_close(model(images), general, atol=0, rtol=0)
            fns[f"{name} general"], fns[f"{name} fast"] = call(model, False), call(model, True)
        ups: dict[str, list[float]] = {key: [] for key in fns if key != "dense"}
        for i in range(cfg.runs):
            bar = progress_bar(
                total=len(fns) * (cfg.warmup + cfg.repeats), desc=f"run {i + 1}/{cfg.runs}", unit="forward"
            )
            times = time_round_robin(fns, cfg.warmup, cfg.repeats, progress=bar, min_seconds=cfg.min_seconds)
            bar.close()
            for key in ups:
                ups[key].append(speedup(times["dense"], times[key]).median)
    finally:
        sampling.TOME_FAST_PATH = default
    rows = []
    for name in names:
        general, fast = ups[f"{name} general"], ups[f"{name} fast"]
        rows.append(
            dict(
                budget=name,
                general=", ".join(f"{u:.2f}" for u in general),
                fast=", ".join(f"{u:.2f}" for u in fast),
                general_median=statistics.median(general),
                fast_median=statistics.median(fast),
                gain=statistics.median(f / g for f, g in zip(fast, general, strict=True)),
                general_runs=general,
                fast_runs=fast,
            )
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="an ats-vit checkpoint (e.g. the demo's final.safetensors)")
    p.add_argument("--budget", nargs="+", required=True, help="ToMe budget files from `ats-vit calibrate`")
    p.add_argument("--data", default=Config.data, help="demo, glyphs or an image folder (its test split)")
    p.add_argument("--batch-size", type=int, default=Config.batch_size)
    p.add_argument("--runs", type=int, default=Config.runs)
    p.add_argument("--repeats", type=int, default=Config.repeats)
    p.add_argument("--min-seconds", type=float, default=Config.min_seconds)
    args = json_arguments(p)()
    if min(args.batch_size, args.runs, args.repeats) < 1 or args.min_seconds < 0:
        p.error("--batch-size, --runs and --repeats must be positive, --min-seconds >= 0")
    try:
        variant_names(tuple(args.budget))
    except ValueError as error:
        p.error(str(error))
    cfg = Config(
        checkpoint=args.checkpoint,
        budgets=tuple(args.budget),
        data=args.data,
        batch_size=args.batch_size,
        runs=args.runs,
        repeats=args.repeats,
        min_seconds=args.min_seconds,
    )
    try:
        rows = run(cfg)
    except ValueError as error:
        p.error(str(error))
    print_table(rows, COLUMNS)
    write_json(args.json, cfg, rows)


if __name__ == "__main__":
    main()
