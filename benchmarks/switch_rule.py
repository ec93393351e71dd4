"""How readily `auto` should leave its first member: chosen on held-out checkpoints.

`auto` calibrates each of its members (`ats_vit.calibrate.AUTO`) to the target and keeps the
first one unless another is ahead on the calibration images by more than ``z`` standard errors
of the paired per-image difference (`ats_vit.calibrate.prefer`, ``SWITCH_Z``). With a few
hundred calibration images, "the most accurate member" (``z = 0``) is often ahead by noise and
the switch costs test accuracy; a large ``z`` never switches and loses where another member is
really better. This script measures each member's best budget per target once (calibration
split, then test split) and replays the pick for several ``z``: the chosen member's test
accuracy, its loss to the best member on the test split (paired bootstrap over independent
items) and the mean over all points.

The rule, fixed before any run: run it on the held-out checkpoints only (the seed-1 recipes of
`benchmarks/frontier_checkpoints.py`, never the reported ones) and take the ``z`` with the
highest mean test accuracy over all their points; of equal means, the larger ``z``.

    python benchmarks/frontier_checkpoints.py runs/held --only demo-s1 gap-s1 map-s1 glyphs196-s1
    python benchmarks/switch_rule.py runs/held/{demo,gap,map}-s1/final.safetensors \\
        runs/held/glyphs196-s1/final.safetensors --data demo demo demo glyphs \\
        --calib-images 320 320 320 1000 --json switch_rule.json
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass
from pathlib import Path

from ats_vit._progress import bar as progress_bar
from ats_vit.bench import json_arguments, machine, print_table, write_json
from ats_vit.calibrate import AUTO, Calibration, prefer
from ats_vit.checkpoint import load_model
from ats_vit.data import load_split, source_items, take
from ats_vit.evaluate import measure
from ats_vit.stats import paired_bootstrap


@dataclass
class Config:
    checkpoints: tuple[str, ...]
    data: tuple[str, ...] = ("demo",)
    calib_images: tuple[int, ...] = (320,)
    targets: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    glyph_targets: tuple[float, ...] = (0.4, 0.6, 0.8)  # the 196-token checkpoints: fewer, for time
    zs: tuple[float, ...] = (0.0, 0.5, 1.0, 1.645, 2.0, 3.0, float("inf"))
    seed: int = 0

    def of(self, values: tuple, index: int):  # one value for all checkpoints, or one each
        return values[0] if len(values) == 1 else values[index]


COLUMNS = (
    ("checkpoint", "checkpoint", "<14"),
    ("target", "target", ".2f"),
    ("z", "z", ".3g"),
    ("chosen", "chosen", "<9"),
    ("accuracy_pct", "test %", ".2f"),
    ("best_member", "best on test", "<12"),
    ("loss_pct", "loss", ".2f"),
    ("p", "p", ".3f"),
)
SUMMARY = (
    ("z", "z", ".3g"),
    ("mean_pct", "mean test %", ".3f"),
    ("mean_loss_pct", "mean loss", ".3f"),
    ("significant_losses", "losses p<0.05", "d"),
    ("switches", "left the first", "d"),
    ("points", "points", "d"),
)


def members_at(cfg: Config, index: int) -> list[dict]:
    """Per target, each member's best budget: calibration score, per-image score difference
    to the first member, and its test correctness."""
    checkpoint, data = cfg.checkpoints[index], cfg.of(cfg.data, index)
    model, model_cfg = load_model(checkpoint)
    model.eval()
    size, channels = model_cfg.image_size, model_cfg.channels
    calib_x, calib_y = take(
        load_split(data, "calib", size, channels=channels), cfg.of(cfg.calib_images, index), cfg.seed
    )
    test_x, test_y = take(load_split(data, "test", size, channels=channels))
    items = source_items(data, "test", len(test_y))
    search = Calibration(model, calib_x, calib_y, progress=False)
    targets = cfg.glyph_targets if data == "glyphs" else cfg.targets
    points = []
    for target in progress_bar(iterable=targets, desc=Path(checkpoint).parent.name, unit="target"):
        candidates = search.candidates(target, "auto")
        tests = {}
        for trial in candidates:
            pred, _ = measure(model, test_x, trial.budget)
            tests[trial.budget.method] = pred == test_y
        points.append(
            dict(
                checkpoint=Path(checkpoint).parent.name,
                target=target,
                candidates=candidates,
                tests=tests,
                items=items,
            )
        )
    return points


def replay(points: list[dict], zs: tuple[float, ...]) -> tuple[list[dict], list[dict]]:
    rows = []
    for z in zs:
        for point in points:
            tests = point["tests"]
            chosen = str(prefer(point["candidates"], z).budget.method)
            best = max(tests, key=lambda m: (tests[m].float().mean().item(), m == chosen))
            diff, p = paired_bootstrap(tests[best], tests[chosen], point["items"])
            rows.append(
                dict(
                    checkpoint=point["checkpoint"],
                    target=point["target"],
                    z=z,
                    chosen=chosen,
                    accuracy_pct=100 * tests[chosen].float().mean().item(),
                    best_member=best,
                    loss_pct=100 * diff,
                    p=p if best != chosen else 1.0,
                    first=str(point["candidates"][0].budget.method),
                    calib_pct={str(t.budget.method): 100 * t.score for t in point["candidates"]},
                )
            )
    summary = []
    for z in zs:
        mine = [r for r in rows if r["z"] == z]
        summary.append(
            dict(
                z=z,
                mean_pct=statistics.fmean(r["accuracy_pct"] for r in mine),
                mean_loss_pct=statistics.fmean(r["loss_pct"] for r in mine),
                significant_losses=sum(r["p"] < 0.05 for r in mine),
                switches=sum(r["chosen"] != r["first"] for r in mine),
                points=len(mine),
            )
        )
    return rows, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", help="held-out checkpoints of `ats-vit train`")
    parser.add_argument("--data", nargs="+", default=["demo"], help="one data spec, or one per checkpoint")
    parser.add_argument("--calib-images", type=int, nargs="+", default=[320], help="one count, or one each")
    parser.add_argument("--zs", type=float, nargs="+", help="the z values to replay")
    args = json_arguments(parser, "config, machine, rows and summary")()
    cfg = Config(tuple(args.checkpoints), tuple(args.data), tuple(args.calib_images))
    if args.zs:
        cfg.zs = tuple(args.zs)
    for name, values in (("--data", cfg.data), ("--calib-images", cfg.calib_images)):
        if len(values) not in (1, len(cfg.checkpoints)):
            parser.error(f"{name} takes one value, or one per checkpoint ({len(cfg.checkpoints)})")
    print(f"config: {cfg}\nmachine: {machine()}\nmembers: {AUTO}")
    points = [p for i in range(len(cfg.checkpoints)) for p in members_at(cfg, i)]
    rows, summary = replay(points, cfg.zs)
    print_table(rows, COLUMNS)
    print()
    print_table(summary, SUMMARY)
    write_json(args.json, cfg, [*rows, *({"summary": True, **s} for s in summary)])


if __name__ == "__main__":
    main()
