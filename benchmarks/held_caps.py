"""Held caps in a timed search: what the search picks with and without them, and what that
costs in accuracy and buys in time.

With ``Calibration(hold=2)``, a calibration with a latency model (``cost="latency"``, or a
GFLOPs target given ``timing_batch``, as the demo calibrates) also tries, for methods whose
caps decay (ToMe), each cap held for two layers: a layer whose input fits its cap runs no
selection, so the schedule pays half as many sampling layers' fixed ops at about the same
GFLOPs; of the equally accurate budgets near the target the search keeps the fastest
predicted. (Off by default: on the held-out checkpoint it never chose a faster budget.)

This script calibrates each target twice on a checkpoint's calibration split
(``hold=1``: decaying caps only, and ``hold=2``), then reports each pick's test accuracy, the
paired bootstrap of the difference over independent items, and the speed-up over dense at
``--timing-batch`` test images (interleaved, median of ``--runs`` runs; both picks and dense
in every run, separate model copies).

The rule, fixed before any run: judge on held-out checkpoints (the demo's seed 1), report on
the demo checkpoint as well.

    ats-vit demo --seed 1 --out runs/demo-s1
    python benchmarks/held_caps.py runs/demo-s1/final.safetensors --targets 0.5 0.6 0.7 0.8 \\
        --json held_caps_s1.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ats_vit._progress import bar as progress_bar
from ats_vit.bench import json_arguments, machine, print_table, write_json
from ats_vit.budget import Budget, configure
from ats_vit.calibrate import Calibration
from ats_vit.checkpoint import load_model
from ats_vit.data import load_split, source_items, take
from ats_vit.families import family_of
from ats_vit.stats import paired_bootstrap
from ats_vit.timing import speedup, time_round_robin

HOLD = 2  # the held search's ``Calibration(hold=)``


@dataclass
class Config:
    checkpoint: str
    data: str = "demo"
    targets: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8)
    calib_images: int = 512  # as `ats-vit calibrate` and the demo
    timing_batch: int = 64
    runs: int = 3
    warmup: int = 3
    repeats: int = 20
    min_seconds: float = 2.0
    seed: int = 0


COLUMNS = (
    ("target", "target", ".2f"),
    ("search", "search", "<9"),
    ("pick", "pick", "<40"),
    ("gflops", "GFLOPs", ".3f"),
    ("calib_pct", "calib %", ".2f"),
    ("predicted", "pred. time", ".3f"),
    ("test_pct", "test %", ".2f"),
    ("vs_decaying_pct", "vs decaying", "+.2f"),
    ("p", "p", ".3f"),
    ("speedup", "speed-up", ".3f"),
    ("runs", "runs", "<18"),
)


def _pick(budget: Budget) -> str:
    return f"{budget.method} from {budget.start_layer}, caps {list(budget.caps)}"


def run(cfg: Config) -> list[dict[str, Any]]:
    model, model_cfg = load_model(cfg.checkpoint)
    model.eval()
    size, channels = model_cfg.image_size, model_cfg.channels
    calib_x, calib_y = take(
        load_split(cfg.data, "calib", size, channels=channels), cfg.calib_images, cfg.seed
    )
    test_x, test_y = take(load_split(cfg.data, "test", size, channels=channels))
    items = source_items(cfg.data, "test", len(test_y))
    picks: dict[int, list[Budget]] = {}
    for hold in (1, HOLD):
        search = Calibration(
            model, calib_x, calib_y, timing_batch=cfg.timing_batch, hold=hold, progress=False
        )
        picks[hold] = [search(t) for t in cfg.targets]
    configure(family_of(model), None)  # a search leaves the model set to its last pick

    @torch.inference_mode()
    def correct(m: torch.nn.Module) -> torch.Tensor:
        return torch.cat([m(x).argmax(-1) for x in test_x.split(256)]) == test_y

    x = test_x[: cfg.timing_batch]
    rows = []
    bar = progress_bar(
        iterable=list(enumerate(cfg.targets)), desc=Path(cfg.checkpoint).parent.name, unit="target"
    )
    for i, target in bar:
        budgets = {"decaying": picks[1][i], "held": picks[HOLD][i]}
        models = {name: b.apply(copy.deepcopy(model)).eval() for name, b in budgets.items()}
        hits = {name: correct(m) for name, m in models.items()}
        fns = {name: (lambda m=m: m(x)) for name, m in {"dense": model, **models}.items()}
        ups: dict[str, list[float]] = {name: [] for name in models}
        with torch.inference_mode():
            for _ in range(cfg.runs):
                times = time_round_robin(fns, cfg.warmup, cfg.repeats, min_seconds=cfg.min_seconds)
                for name in ups:
                    ups[name].append(speedup(times["dense"], times[name]).median)
        for name, budget in budgets.items():
            diff, p = paired_bootstrap(hits[name], hits["decaying"], items)
            cal = budget.calibration
            rows.append(
                dict(
                    target=target,
                    search=name,
                    pick=_pick(budget),
                    budget=budget.to_dict(),
                    gflops=cal["gflops_ratio"],
                    calib_pct=100 * cal["accuracy"],
                    predicted=cal["latency_ratio"],
                    test_pct=100 * hits[name].float().mean().item(),
                    vs_decaying_pct=100 * diff,
                    p=p,
                    speedup=statistics.median(ups[name]),
                    speedups=ups[name],
                    runs=", ".join(f"{u:.2f}" for u in ups[name]),
                )
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a checkpoint of `ats-vit train` / `ats-vit demo`")
    parser.add_argument("--data", default="demo", help="its data spec (default: demo)")
    parser.add_argument(
        "--targets", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8], help="GFLOPs fractions"
    )
    parser.add_argument("--runs", type=int, default=3, help="interleaved timing runs (default: 3)")
    parser.add_argument("--calib-images", type=int, default=512, help="calibration images (default: 512)")
    parser.add_argument("--timing-batch", type=int, default=64, help="images per timed pass (default: 64)")
    parser.add_argument("--repeats", type=int, default=20, help="interleaved rounds per run, at least")
    parser.add_argument(
        "--min-seconds", type=float, default=2.0, help="seconds per variant per run, at least"
    )
    args = json_arguments(parser, "config, machine and rows")()
    if min(args.runs, args.calib_images, args.timing_batch, args.repeats) < 1 or args.min_seconds < 0:
        parser.error(
            "--runs, --calib-images, --timing-batch and --repeats must be positive, --min-seconds >= 0"
        )
    cfg = Config(
        args.checkpoint,
        args.data,
        tuple(args.targets),
        calib_images=args.calib_images,
        timing_batch=args.timing_batch,
        runs=args.runs,
        repeats=args.repeats,
        min_seconds=args.min_seconds,
    )
    print(f"config: {cfg}\nmachine: {machine()}")
    rows = run(cfg)
    print_table(rows, COLUMNS)
    write_json(args.json, cfg, rows)


if __name__ == "__main__":
    main()
