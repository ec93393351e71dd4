"""How fast calibration searches: trials per second, forward passes and seconds per target.

Runs `ats_vit.calibrate.Calibration` on a checkpoint's calibration split for each target,
with the probe (trials clearly far from the target stop on a quarter of the images) and
without, interleaved, several times; prints medians and checks that both choose the same
budget. Nothing here is asserted as a timing in tests.

    python benchmarks/calibration_speed.py runs/demo/final.safetensors --json calib.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch

from ats_vit._progress import bar as progress_bar
from ats_vit.bench.common import json_arguments, machine, print_table, use_threads, write_json
from ats_vit.calibrate import RECOMMENDED, Calibration
from ats_vit.checkpoint import load_model
from ats_vit.data import load_split, take


@dataclass
class Config:
    checkpoint: str
    data: str = "demo"
    method: str = RECOMMENDED
    targets: tuple[float, ...] = (0.5,)
    images: int | None = None  # None: the whole calibration split
    runs: int = 3
    threads: int = torch.get_num_threads()


COLUMNS = (
    ("target", "target", ".2f"),
    ("probe", "probe", "<5"),
    ("trials", "trials", "d"),
    ("passes", "passes", ".1f"),
    ("seconds", "seconds", ".1f"),
    ("trials_per_s", "trials/s", ".2f"),
    ("speedup", "vs no probe", ".2f"),
    ("same", "same budget", "<5"),
)


def run(cfg: Config) -> list[dict]:
    use_threads(cfg.threads)
    model, model_cfg = load_model(cfg.checkpoint)
    model.eval()
    split = load_split(cfg.data, "calib", model_cfg.image_size, channels=model_cfg.channels)
    images, labels = take(split, cfg.images)
    rows = []
    bar = progress_bar(total=len(cfg.targets) * cfg.runs * 2, desc="calibration", unit="search")
    for target in cfg.targets:
        seconds: dict[bool, list[float]] = {True: [], False: []}
        found = {}
        for _ in range(cfg.runs):
            for probe in (True, False):  # interleaved, so machine load hits both alike
                search = Calibration(model, images, labels, method=cfg.method, probe=probe, progress=False)
                start = time.perf_counter()
                budget = search(target)
                seconds[probe].append(time.perf_counter() - start)
                found[probe] = (budget, len(search.trials), search.passes)
                bar.update()
        same = found[True][0].caps == found[False][0].caps and found[True][0].method == found[False][0].method
        for probe in (True, False):
            budget, trials, passes = found[probe]
            median = statistics.median(seconds[probe])
            rows.append(
                dict(
                    target=target,
                    probe=str(probe),
                    trials=trials,
                    passes=passes,
                    seconds=median,
                    trials_per_s=trials / median,
                    speedup=statistics.median(seconds[False]) / median,
                    same=str(same),
                    method=budget.method,
                    caps=list(budget.caps),
                )
            )
    bar.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a checkpoint of `ats-vit train`")
    parser.add_argument("--data", default="demo", help="'demo' or an ImageFolder root")
    parser.add_argument("--method", default=RECOMMENDED, help="what to calibrate")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5], help="GFLOPs fractions")
    parser.add_argument("--calib-images", type=int, help="calibration images (default: the whole split)")
    parser.add_argument("--runs", type=int, default=3, help="interleaved runs of each search")
    args = json_arguments(parser)()
    cfg = Config(args.checkpoint, args.data, args.method, tuple(args.targets), args.calib_images, args.runs)
    print(f"config: {cfg}\nmachine: {machine()}")
    rows = run(cfg)
    print_table(rows, COLUMNS)
    write_json(args.json, cfg, rows)


if __name__ == "__main__":
    main()
