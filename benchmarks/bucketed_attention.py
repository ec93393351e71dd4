"""Attention in buckets: how much faster adaptive counts run when attention splits a padded
batch into groups of images of similar count (`ats_vit.sampling.Buckets`), each at its own
width, than when every image attends at the widest count of the batch.

ATS keeps a different number of tokens in each image; a batch is padded to its largest count.
Token-wise layers skip the padding, but attention costs the square of the padded width. For
each checkpoint, method and GFLOPs target: calibrate the budget (`ats_vit.calibrate`), then in
each of ``--processes`` fresh processes time, at each batch size, dense, the budget with
buckets and the same budget over the whole padded grid, interleaved in random order for
``--repeats`` rounds. A cell: the median speed-up over dense across processes and its range
(a range that reaches 1.0 is "not faster"), the FLOP ideal (dense GFLOPs over the budget's, on
the timed images) and the efficiency (speed-up / ideal). The padding column is the share of
the sampled layers' token slots that were padding.

The bucket rule (:data:`ats_vit.sampling.MAX_BUCKETS`, ``MIN_BUCKET``, ``BUCKET_MAX_SHARE``)
was chosen on glyphs196-s100, a selection seed; the reported run uses the reported seeds:

    python benchmarks/bucketed_attention.py \\
        benchmarks/checkpoints/glyphs196-s{1,2,3}/final.safetensors --data glyphs@1 glyphs@2 glyphs@3 \\
        --json benchmarks/results/bucketed_attention.json
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

import torch

from ats_vit._progress import bar
from ats_vit.bench.common import checkpoint_splits, json_arguments, print_table, write_json
from ats_vit.budget import Budget

COLUMNS = (
    ("checkpoint", "checkpoint", "<14"),
    ("method", "method", "<9"),
    ("target", "target", ".1f"),
    ("batch", "batch", "d"),
    ("padding_pct", "padding %", ".0f"),
    ("ideal", "FLOP ideal", ".2f"),
    ("buckets_text", "in buckets", "<18"),
    ("whole_text", "whole grid", "<18"),
    ("efficiency_buckets", "eff. buckets", ".2f"),
    ("efficiency_whole", "eff. whole", ".2f"),
    ("gain", "buckets / whole", ".2f"),
)


@dataclass
class Config:
    checkpoints: tuple[str, ...]
    data: tuple[str, ...]
    methods: tuple[str, ...] = ("ats-fuse", "paper")
    targets: tuple[float, ...] = (0.4, 0.6, 0.8)
    batch_sizes: tuple[int, ...] = (16, 64)
    calib_images: int = 256
    processes: int = 5
    repeats: int = 10
    seed: int = 0


def _speed_text(runs: list[float]) -> str:
    low, high, mid = min(runs), max(runs), statistics.median(runs)
    if low <= 1.0:
        return f"not faster ({low:.2f}-{high:.2f})"
    return f"{mid:.2f}x ({low:.2f}-{high:.2f})"


def _child(spec_path: str) -> None:
    """One timing process: dense, the budget in buckets and over the whole grid, per batch size;
    prints each batch size's two speed-ups over dense (medians of the rounds) as one JSON line."""
    import ats_vit.sampling as sampling
    from ats_vit.budget import configure
    from ats_vit.checkpoint import load_model
    from ats_vit.families import family_of
    from ats_vit.timing import speedup, time_round_robin

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    model, _ = load_model(spec["checkpoint"])
    model.eval()
    family = family_of(model)
    images = torch.load(spec["images"], weights_only=True)
    budget = Budget.from_dict(spec["budget"])
    devices = sampling.BUCKET_DEVICES

    def setting(chosen: Budget | None, buckets: bool) -> Any:
        def apply() -> None:
            sampling.BUCKET_DEVICES = devices if buckets else ()
            configure(family, chosen)

        return apply

    setup = {"dense": setting(None, True), "buckets": setting(budget, True), "whole": setting(budget, False)}
    out = {}
    for batch in spec["batch_sizes"]:
        x = images[:batch]

        @torch.inference_mode()
        def run(x: torch.Tensor = x) -> None:
            family.run(x)

        times = time_round_robin(
            {name: run for name in setup}, 2, spec["repeats"], setup=setup, shuffle=spec["shuffle"]
        )
        out[str(batch)] = [speedup(times["dense"], times[name]).median for name in ("buckets", "whole")]
    print(json.dumps(out))


def _padding_share(model: torch.nn.Module, budget: Budget, images: torch.Tensor) -> tuple[float, float]:
    """(padding share of the sampled layers' slots, GFLOPs ratio) of one forward pass."""
    from ats_vit import last_info
    from ats_vit.budget import configure
    from ats_vit.families import family_of

    family = family_of(model)
    with torch.inference_mode():
        configure(family, None)
        family.run(images)
        dense = last_info(model)
        configure(family, budget)
        family.run(images)
    info = last_info(model)
    kept = info.kept_per_layer.float()  # (b, depth)
    widest = kept.max(dim=0).values  # each layer's padded width (patch tokens)
    sampled = widest < dense.kept_per_layer[0].float()
    real, slots = kept[:, sampled].sum().item(), kept.shape[0] * widest[sampled].sum().item()
    return (1 - real / slots if slots else 0.0), info.gflops.mean().item() / dense.gflops.mean().item()


def measure(cfg: Config, progress: bool = True) -> list[dict[str, Any]]:
    from ats_vit.calibrate import calibrate

    rows = []
    cells = len(cfg.checkpoints) * len(cfg.methods) * len(cfg.targets)
    with bar(total=cells, desc="bucketed attention", unit="cell", disable=not progress) as done:
        for path, data in zip(cfg.checkpoints, cfg.data, strict=True):
            loaded = checkpoint_splits(path, data, cfg.calib_images, cfg.seed)
            images = loaded.test_x[: max(cfg.batch_sizes)]
            if len(images) < max(cfg.batch_sizes):
                raise ValueError(
                    f"{data}'s test split has {len(images)} images, "
                    f"fewer than --batch-sizes {max(cfg.batch_sizes)}"
                )
            name = Path(path).parent.name
            for method in cfg.methods:
                for target in cfg.targets:
                    torch.manual_seed(cfg.seed)
                    budget = calibrate(
                        loaded.model, loaded.calib_x, target, loaded.calib_y, method=method, progress=False
                    )
                    runs = _time(path, budget, images, cfg)
                    for batch in cfg.batch_sizes:
                        padding, ratio = _padding_share(loaded.model, budget, images[:batch])
                        buckets = [r[str(batch)][0] for r in runs]
                        whole = [r[str(batch)][1] for r in runs]
                        ideal = 1 / ratio
                        rows.append(
                            dict(
                                checkpoint=name,
                                method=method,
                                target=target,
                                batch=batch,
                                gflops_ratio=ratio,
                                padding_pct=100 * padding,
                                ideal=ideal,
                                buckets_runs=buckets,
                                whole_runs=whole,
                                buckets=statistics.median(buckets),
                                whole=statistics.median(whole),
                                buckets_text=_speed_text(buckets),
                                whole_text=_speed_text(whole),
                                efficiency_buckets=statistics.median(buckets) / ideal,
                                efficiency_whole=statistics.median(whole) / ideal,
                                gain=statistics.median(b / w for b, w in zip(buckets, whole, strict=True)),
                                budget=budget.to_dict(),
                            )
                        )
                    done.update()
    return rows


def _time(path: str, budget: Budget, images: torch.Tensor, cfg: Config) -> list[dict[str, list[float]]]:
    """Per process, each batch size's [in buckets, whole grid] speed-ups over dense. One process
    at a time, each a fresh interpreter, so they never compete."""
    runs = []
    with tempfile.TemporaryDirectory(prefix="ats-vit-buckets-") as tmp:
        torch.save(images.contiguous(), Path(tmp) / "images.pt")
        spec = Path(tmp) / "spec.json"
        for process in range(cfg.processes):
            spec.write_text(
                json.dumps(
                    dict(
                        checkpoint=str(path),
                        images=str(Path(tmp) / "images.pt"),
                        budget=budget.to_dict(),
                        batch_sizes=list(cfg.batch_sizes),
                        repeats=cfg.repeats,
                        shuffle=cfg.seed * 1000 + process,
                        threads=torch.get_num_threads(),
                    )
                )
            )
            done = subprocess.run(
                [sys.executable, __file__, "--child", str(spec)], capture_output=True, text=True, check=False
            )
            if done.returncode != 0:
                raise RuntimeError(f"timing process {process} failed:\n{done.stderr[-2000:]}")
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return runs


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        _child(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", help="checkpoints written by `ats-vit train`")
    parser.add_argument("--data", nargs="+", required=True, help="each checkpoint's data (NAME@SEED)")
    parser.add_argument(
        "--methods", nargs="+", default=list(Config.methods), help="methods with adaptive counts"
    )
    parser.add_argument(
        "--targets", type=float, nargs="+", default=list(Config.targets), help="GFLOPs fractions"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(Config.batch_sizes))
    parser.add_argument("--calib-images", type=int, default=Config.calib_images)
    parser.add_argument("--processes", type=int, default=Config.processes, help="timing processes per cell")
    parser.add_argument("--repeats", type=int, default=Config.repeats, help="timed rounds per process")
    args = json_arguments(parser, "config, machine and rows")()
    if len(args.data) != len(args.checkpoints):
        parser.error(f"--data takes one value per checkpoint ({len(args.checkpoints)}), got {len(args.data)}")
    if args.processes < 1 or args.repeats < 1:
        parser.error(f"--processes and --repeats must be at least 1, got {args.processes} and {args.repeats}")
    cfg = Config(
        tuple(args.checkpoints),
        tuple(args.data),
        tuple(args.methods),
        tuple(args.targets),
        tuple(args.batch_sizes),
        args.calib_images,
        args.processes,
        args.repeats,
    )
    rows = measure(cfg)
    print_table(rows, COLUMNS)
    if args.json:
        write_json(args.json, cfg, rows)


if __name__ == "__main__":
    main()
