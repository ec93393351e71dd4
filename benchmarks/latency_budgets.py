"""Budgets in time: does a latency budget run as fast as asked, timed afterwards?

For each case (a model, a target fraction of dense time, a batch size) this runs
`ats-vit calibrate --cost latency` (which builds or reuses the latency table, searches, and
times its pick against dense, aiming again when it misses), then times the chosen budget with
`ats-vit eval` `--runs` times, each in a fresh process, as a user would. A row: the speed-up
asked (1 / target), the calibration's own timed ratio, and the median and range of the eval
runs.

Cases (`--cases`): `demo-0.6`, `demo-0.8` (the demo checkpoint `CKPT`, batch 64) and
`deit-s-0.7` (timm's DeiT-S with random weights: no download, random images in a folder made
here; batch 16).

    python benchmarks/latency_budgets.py runs/demo/final.safetensors \
        --json benchmarks/results/latency_budgets.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ats_vit.bench.common import json_arguments, print_table, write_json

# name: (model arguments, or None for the checkpoint; target; timing batch; data)
CASES: dict[str, tuple[tuple[str, ...] | None, float, int]] = {
    "demo-0.6": (None, 0.6, 64),
    "demo-0.8": (None, 0.8, 64),
    "deit-s-0.7": (("--timm", "deit_small_patch16_224"), 0.7, 16),
}
COLUMNS = (
    ("case", "case", "<11"),
    ("asked", "asked", ".2f"),
    ("method", "method", "<9"),
    ("gflops_ratio", "GFLOPs", ".3f"),
    ("calibration_speedup", "calibration timed", ".2f"),
    ("speedup", "eval (median)", ".2f"),
    ("runs_text", "eval runs", "<18"),
    ("off_pct", "off %", "+.1f"),
)


@dataclass
class Config:
    checkpoint: str
    data: str = "demo"  # the checkpoint's data (its calib and test splits)
    cases: tuple[str, ...] = tuple(CASES)
    runs: int = 3
    timing_repeats: int = 20
    calib_images: int = 512
    deit_images: int = 32  # calibration images of the random-weight DeiT-S (agreement only)


def _ats_vit(*argv: str) -> None:
    print(f"$ ats-vit {' '.join(argv)}", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "ats_vit.cli", *argv], check=True)


def _random_folder(root: Path, images: int) -> Path:
    """train/ and val/ of random 224 px RGB images in two classes (what DeiT-S is timed on)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for k in range(2):
            folder = root / split / f"class{k}"
            folder.mkdir(parents=True)
            for i in range(images // 2):
                pixels = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def run(cfg: Config) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in cfg.cases:
            source, target, batch = CASES[name]
            model = [cfg.checkpoint] if source is None else list(source)
            data = ["--data", cfg.data]
            images = cfg.calib_images
            if source is not None:
                images = max(cfg.deit_images, batch)
                data = ["--data", str(_random_folder(work / name, images))]
            budget = work / f"{name}.json"
            # random images have no classes: calibrate for agreement with the dense model
            labels = ["--no-labels"] if source is not None else []
            _ats_vit(
                "calibrate",
                *model,
                *data,
                *labels,
                "--target",
                str(target),
                "--cost",
                "latency",
                "--timing-batch",
                str(batch),
                "--calib-images",
                str(images),
                "--out",
                str(budget),
            )
            chosen = json.loads(budget.read_text())
            speedups = []
            for i in range(cfg.runs):
                out = work / f"{name}-eval{i}"
                _ats_vit(
                    "eval",
                    *model,
                    *data,
                    "--budget",
                    str(budget),
                    "--timing-batch",
                    str(batch),
                    "--timing-repeats",
                    str(cfg.timing_repeats),
                    "--out",
                    str(out),
                )
                speedups.append(json.loads((out / "eval.json").read_text())["rows"][1]["speedup"])
            median = statistics.median(speedups)
            calibration = chosen["calibration"]
            rows.append(
                dict(
                    case=name,
                    target=target,
                    timing_batch=batch,
                    asked=1 / target,
                    method=chosen["method"],
                    budget=chosen,
                    gflops_ratio=calibration["gflops_ratio"],
                    predicted_ratio=calibration["latency_ratio"],
                    calibration_speedup=1 / calibration["measured_latency_ratio"],
                    speedup=median,
                    speedup_runs=speedups,
                    runs_text=", ".join(f"{s:.2f}" for s in speedups),
                    off_pct=100 * (median * target - 1),
                )
            )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="the demo checkpoint (runs/demo/final.safetensors)")
    p.add_argument("--data", default=Config.data, help="the checkpoint's data: 'demo' or an ImageFolder root")
    p.add_argument("--cases", nargs="+", choices=tuple(CASES), default=list(CASES))
    p.add_argument("--runs", type=int, default=Config.runs, help="eval runs per case, each its own process")
    p.add_argument("--timing-repeats", type=int, default=Config.timing_repeats)
    p.add_argument("--calib-images", type=int, default=Config.calib_images)
    args = json_arguments(p)()
    if args.runs < 1 or args.timing_repeats < 1 or args.calib_images < 1:
        p.error("--runs, --timing-repeats and --calib-images must be positive")
    cfg = Config(
        args.checkpoint, args.data, tuple(args.cases), args.runs, args.timing_repeats, args.calib_images
    )
    rows = run(cfg)
    print_table(rows, COLUMNS)
    write_json(args.json, cfg, rows)


if __name__ == "__main__":
    main()
