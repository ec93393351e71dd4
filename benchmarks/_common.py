"""Timing and reporting shared by the benchmark scripts."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict

import torch


def time_round_robin(fns: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds per call of each function; calls are interleaved across functions so
    that machine noise hits all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def machine() -> dict[str, object]:
    return dict(
        torch=torch.__version__,
        python=platform.python_version(),
        cpu=platform.processor() or platform.machine(),
        threads=torch.get_num_threads(),
        device="cpu",
    )


def print_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> None:
    """columns: (key, header, format spec) per column."""
    widths = [max(len(header), *(len(format(r[key], spec)) for r in rows)) for key, header, spec in columns]
    heads = (
        header.ljust(w) if spec.startswith("<") else header.rjust(w)
        for (_, header, spec), w in zip(columns, widths, strict=True)
    )
    print("  ".join(heads))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        cells = (format(r[key], spec).rjust(w) for (key, _, spec), w in zip(columns, widths, strict=True))
        print("  ".join(cells))


def write_json(path: str | None, config: object, rows: Sequence[dict]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(dict(config=asdict(config), machine=machine(), rows=list(rows)), f, indent=2)
        print(f"wrote {path}")


def add_timing_args(parser: argparse.ArgumentParser, config: object) -> None:
    """--batch-sizes, --repeats, --warmup, --threads, --json, defaulting to ``config``'s."""
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(config.batch_sizes))
    parser.add_argument("--repeats", type=int, default=config.repeats)
    parser.add_argument("--warmup", type=int, default=config.warmup)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", help="also write config, machine and rows to this JSON file")


def parse_timing_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse, reject non-positive timing values, and set the thread count."""
    args = parser.parse_args()
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1 or min(args.batch_sizes) < 1:
        parser.error("--repeats, --threads and --batch-sizes must be >= 1, --warmup >= 0")
    torch.set_num_threads(args.threads)
    return args
