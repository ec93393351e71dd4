"""The README's table: `ats-vit demo`, then its budgets timed again in separate processes.

Runs `ats-vit demo --out OUT` (train, calibrate 50% and 70% of the GFLOPs, evaluate next to
the paper's ATS, draw), then `ats-vit eval` of the same budgets `--runs - 1` more times, each
in a fresh process, so every speed-up has a run-to-run range and not only the spread of one
run's rounds. Accuracy, its interval, the paired test against dense, GFLOPs and kept tokens
come from the demo's own evaluation; they do not depend on timing.

    python benchmarks/demo.py --out runs/demo-bench --json benchmarks/results/demo.json
    python benchmarks/tables.py          # README.md and docs/ from the JSON
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ats_vit.bench.common import json_arguments, print_table, write_json

# the demo's own settings (ats_vit.cli.cmd_demo): the same rows are timed again
TIMING_BATCH = 64
COLUMNS = (
    ("label", "budget", "<18"),
    ("method", "method", "<9"),
    ("accuracy_pct", "accuracy %", ".2f"),
    ("gflops_ratio", "GFLOPs vs dense", ".3f"),
    ("speedup", "speed-up", ".2f"),
    ("speedup_runs_text", "runs", "<20"),
)


@dataclass
class Config:
    out: str
    runs: int = 3
    epochs: int = 10
    seed: int = 0
    timing_repeats: int = 5  # as the demo's own eval step (the eval default)


def _ats_vit(*argv: str) -> None:
    """One ats-vit command in a fresh process (its own allocator state and warm-up)."""
    command = [sys.executable, "-m", "ats_vit.cli", *argv]
    print(f"$ ats-vit {' '.join(argv)}", file=sys.stderr, flush=True)
    subprocess.run(command, check=True)


def run(cfg: Config) -> list[dict]:
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty: choose a new --out (a benchmark starts from a fresh demo run)")
    _ats_vit("demo", "--out", str(out), "--epochs", str(cfg.epochs), "--seed", str(cfg.seed))
    first = json.loads((out / "eval.json").read_text())["rows"]
    ckpt = str(out / "final.safetensors")
    budgets = sorted(str(p) for p in out.glob("budget-*.json"))
    runs = [first]
    for i in range(1, cfg.runs):
        again = out / f"eval-run{i + 1}"
        _ats_vit(
            "eval",
            ckpt,
            "--keep",
            "0.5",
            "--budget",
            *budgets,
            "--timing-batch",
            str(TIMING_BATCH),
            "--timing-repeats",
            str(cfg.timing_repeats),
            "--out",
            str(again),
        )
        runs.append(json.loads((again / "eval.json").read_text())["rows"])
    rows = []
    for i, row in enumerate(first):
        speedups = [run[i]["speedup"] for run in runs]
        if any(run[i]["label"] != row["label"] for run in runs):
            raise RuntimeError("the eval runs list their rows in another order")
        budget = row["budget"] or {}
        rows.append(
            dict(
                row,
                method=budget.get("method") or "dense",
                accuracy_pct=100 * row["accuracy"],
                speedup=statistics.median(speedups),
                speedup_runs=speedups,
                speedup_runs_text=", ".join(f"{s:.2f}" for s in speedups),
            )
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="a new folder for the demo run")
    p.add_argument("--runs", type=int, default=Config.runs, help="timing runs, each in its own process")
    p.add_argument("--epochs", type=int, default=Config.epochs)
    p.add_argument("--seed", type=int, default=Config.seed)
    p.add_argument("--timing-repeats", type=int, default=Config.timing_repeats, help="rounds per eval run")
    args = json_arguments(p)()
    if args.runs < 1 or args.epochs < 1 or args.timing_repeats < 1:
        p.error("--runs, --epochs and --timing-repeats must be positive")
    cfg = Config(args.out, args.runs, args.epochs, args.seed, args.timing_repeats)
    rows = run(cfg)
    print_table(rows, COLUMNS)
    write_json(args.json, cfg, rows)


if __name__ == "__main__":
    main()
