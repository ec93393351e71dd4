"""How fast calibration searches: trials per second, forward passes and seconds per target.

Runs `ats_vit.calibrate.Calibration` on a checkpoint's calibration split for each target in
three ways, interleaved, several times: as it runs (the probe: trials clearly far from the
target stop on a quarter of the images; and, for `auto` at a GFLOP target, its later members
searched only where the first has no budget near the target), with every member searched
(``SWITCH_Z`` set finite but unreachable: the same pick, found the long way), and with neither
shortcut; prints medians and checks that every way chooses the budget of the last. Nothing
here is asserted as a timing in tests.

    python benchmarks/calibration_speed.py runs/demo/final.safetensors --json calib.json
"""

from __future__ import annotations

import argparse
import math
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


# (name, probe, every member searched)
WAYS = (("as it runs", True, False), ("every member", True, True), ("neither shortcut", False, True))
# a switch threshold no member reaches (the picks of SWITCH_Z = inf) that still searches them all
UNREACHABLE_Z = 1e300

COLUMNS = (
    ("target", "target", ".2f"),
    ("way", "search", "<16"),
    ("trials", "trials", "d"),
    ("passes", "passes", ".1f"),
    ("seconds", "seconds", ".1f"),
    ("trials_per_s", "trials/s", ".2f"),
    ("speedup", "vs neither", ".2f"),
    ("same", "same budget", "<5"),
)


def run(cfg: Config) -> list[dict]:
    import ats_vit.calibrate.choice as choice

    use_threads(cfg.threads)
    model, model_cfg = load_model(cfg.checkpoint)
    model.eval()
    split = load_split(cfg.data, "calib", model_cfg.image_size, channels=model_cfg.channels)
    images, labels = take(split, cfg.images)
    rows = []
    bar = progress_bar(total=len(cfg.targets) * cfg.runs * len(WAYS), desc="calibration", unit="search")
    switch_z = choice.SWITCH_Z
    for target in cfg.targets:
        seconds: dict[str, list[float]] = {way: [] for way, _, _ in WAYS}
        found = {}
        for _ in range(cfg.runs):
            for way, probe, every in WAYS:  # interleaved, so machine load hits them alike
                choice.SWITCH_Z = UNREACHABLE_Z if every and math.isinf(switch_z) else switch_z
                try:
                    search = Calibration(
                        model, images, labels, method=cfg.method, probe=probe, progress=False
                    )
                    start = time.perf_counter()
                    budget = search(target)
                    seconds[way].append(time.perf_counter() - start)
                finally:
                    choice.SWITCH_Z = switch_z
                found[way] = (budget, len(search.trials), search.passes)
                bar.update()
        full = WAYS[-1][0]
        for way, _, _ in WAYS:
            budget, trials, passes = found[way]
            median = statistics.median(seconds[way])
            same = budget.caps == found[full][0].caps and budget.method == found[full][0].method
            rows.append(
                dict(
                    target=target,
                    way=way,
                    trials=trials,
                    passes=passes,
                    seconds=median,
                    trials_per_s=trials / median,
                    speedup=statistics.median(seconds[full]) / median,
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
