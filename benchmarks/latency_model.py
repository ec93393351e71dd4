"""How far the latency model's predictions are from the clock, budget by budget.

Each budget's time as a fraction of the dense model's is predicted by
:class:`ats_vit.latency.LatencyModel` (the cached table of this machine, built if missing) from
the tokens each layer kept on a batch of calibration images, and measured on the same batch,
every budget and the dense model interleaved in one run, ``--runs`` times (the median is the
truth compared against). Budgets come from budget files or from the rows of an
``ats-vit bench frontier`` JSON for one checkpoint (every method's pick at every target).

    python benchmarks/latency_model.py runs/demo/final.safetensors \\
        --frontier benchmarks/results/frontier.json --checkpoint-name demo --runs 3 --json lat.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ats_vit._progress import bar as progress_bar
from ats_vit.bench.common import checkpoint_batch, json_arguments, print_table, write_json
from ats_vit.bench.train import variant_names
from ats_vit.budget import Budget, configure
from ats_vit.evaluate import time_budgets
from ats_vit.families import family_of
from ats_vit.latency import LatencyModel


@dataclass
class Config:
    checkpoint: str
    budgets: tuple[str, ...] = ()
    frontier: str | None = None
    checkpoint_name: str | None = None
    data: str = "demo"
    batch_size: int = 64
    runs: int = 3
    repeats: int = 7


COLUMNS = (
    ("budget", "budget", "<18"),
    ("start_layer", "start", ">5"),
    ("predicted", "predicted", ".3f"),
    ("measured", "measured (median)", ".3f"),
    ("runs", "runs", "<21"),
    ("error_pct", "error %", "+.1f"),
)


def _budgets(cfg: Config) -> dict[str, Budget]:
    if cfg.frontier is None:
        return {name: Budget.load(path) for name, path in variant_names(cfg.budgets).items()}
    rows = json.loads(Path(cfg.frontier).read_text())["rows"]
    mine = [r for r in rows if r["checkpoint"] == cfg.checkpoint_name and r.get("budget")]
    if not mine:
        names = sorted({r["checkpoint"] for r in rows})
        raise ValueError(
            f"--checkpoint-name must be one of {names} (rows with budgets), got {cfg.checkpoint_name!r}"
        )
    return {f"{r['method']}@{r['target']:g}": Budget.from_dict(r["budget"]) for r in mine}


def run(cfg: Config) -> list[dict[str, Any]]:
    model, _, images = checkpoint_batch(cfg.checkpoint, cfg.data, "calib", cfg.batch_size)
    family = family_of(model)
    budgets = _budgets(cfg)
    latency = LatencyModel(family, len(images))
    predicted = {}
    for name, budget in budgets.items():
        configure(family, budget)
        with torch.inference_mode():
            _, state = family.run(images)
        predicted[name] = latency.ratio(state.trace)
    configure(family, None)
    measured: dict[str, list[float]] = {name: [] for name in budgets}
    for _ in progress_bar(iterable=range(cfg.runs), desc="timing runs", unit="run"):
        times = time_budgets(model, [None, *budgets.values()], images, repeats=cfg.repeats)
        for name, timing in zip(budgets, times[1:], strict=True):
            measured[name].append(timing.median / times[0].median)
    rows = []
    for name, budget in budgets.items():
        truth = statistics.median(measured[name])
        rows.append(
            dict(
                budget=name,
                start_layer=budget.start_layer,
                predicted=predicted[name],
                measured=truth,
                runs=", ".join(f"{m:.3f}" for m in measured[name]),
                measured_runs=measured[name],
                error_pct=100 * (predicted[name] / truth - 1),
            )
        )
    return rows


def summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Median, 90th percentile and largest absolute error, in percent."""
    errors = sorted(abs(r["error_pct"]) for r in rows)
    return dict(
        median=statistics.median(errors),
        p90=errors[min(len(errors) - 1, int(0.9 * len(errors)))],
        max=errors[-1],
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="an ats-vit checkpoint (e.g. the demo's final.safetensors)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--budget", nargs="+", help="budget files from `ats-vit calibrate`")
    source.add_argument("--frontier", help="an `ats-vit bench frontier` JSON: its picks for one checkpoint")
    p.add_argument("--checkpoint-name", help="with --frontier: the checkpoint column of the rows to use")
    p.add_argument("--data", default=Config.data, help="demo, glyphs or an image folder (its calib split)")
    p.add_argument("--batch-size", type=int, default=Config.batch_size)
    p.add_argument("--runs", type=int, default=Config.runs)
    p.add_argument("--repeats", type=int, default=Config.repeats)
    args = json_arguments(p)()
    if args.batch_size < 1 or args.runs < 1 or args.repeats < 1:
        p.error("--batch-size, --runs and --repeats must be positive")
    if args.frontier and not args.checkpoint_name:
        p.error("--frontier needs --checkpoint-name")
    cfg = Config(
        checkpoint=args.checkpoint,
        budgets=tuple(args.budget or ()),
        frontier=args.frontier,
        checkpoint_name=args.checkpoint_name,
        data=args.data,
        batch_size=args.batch_size,
        runs=args.runs,
        repeats=args.repeats,
    )
    try:
        rows = run(cfg)
    except ValueError as error:
        p.error(str(error))
    print_table(rows, COLUMNS)
    errors = summary(rows)
    print(
        f"absolute error of the prediction: median {errors['median']:.1f}%, "
        f"90th percentile {errors['p90']:.1f}%, largest {errors['max']:.1f}%"
    )
    write_json(args.json, cfg, rows)


if __name__ == "__main__":
    main()
