"""What a fast path buys: each budget timed with a fast path on and off, against the dense
model with the same setting, interleaved in one run, repeated ``--runs`` times; the logits are
checked to agree (exactly where the path computes the same float ops).

Paths (``--path``):

- ``tome-plan``: ToMe's shorter plan without padding (``ats_vit.sampling.TOME_FAST_PATH``);
  ToMe budgets only, logits equal bit for bit.
- ``matmul-attention``: attention over few keys as matmuls on CPU
  (``ats_vit.attention.CPU_MATMUL_MAX_KEYS``); any budget, and dense too when its token count
  is that small; logits equal to float tolerance.

    python benchmarks/fast_paths.py runs/demo/final.safetensors --path matmul-attention \\
        --budget budget-0.5.json budget-0.7.json --runs 3 --json matmul_attention.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

import ats_vit.attention as attention
import ats_vit.sampling as sampling
from ats_vit._progress import bar as progress_bar
from ats_vit.bench import checkpoint_batch, checkpoint_budget_arguments, print_table, write_json
from ats_vit.bench.train import variant_names
from ats_vit.budget import Budget
from ats_vit.timing import speedup, time_round_robin


@dataclass(frozen=True)
class FastPath:
    module: ModuleType
    switch: str  # the module attribute that turns it on (its value now) or off (``off``)
    off: Any
    tome_only: bool  # only ToMe budgets take this path
    exact: bool  # the logits are equal bit for bit (else to float tolerance)


PATHS = {
    "tome-plan": FastPath(sampling, "TOME_FAST_PATH", False, tome_only=True, exact=True),
    "matmul-attention": FastPath(attention, "CPU_MATMUL_MAX_KEYS", 0, tome_only=False, exact=False),
}


@dataclass
class Config:
    checkpoint: str
    budgets: tuple[str, ...]
    path: str = "matmul-attention"
    data: str = "demo"
    batch_size: int = 64
    runs: int = 3
    warmup: int = 3
    repeats: int = 20
    min_seconds: float = 2.0


COLUMNS = (
    ("budget", "budget", "<20"),
    ("off", "speed-up, path off (runs)", "<24"),
    ("on", "speed-up, path on (runs)", "<24"),
    ("off_median", "median", ".2f"),
    ("on_median", "median", ".2f"),
    ("gain", "time off / on (median)", ".3f"),
)


def _runs(values: list[float]) -> str:
    return ", ".join(f"{u:.2f}" for u in values)


def run(cfg: Config) -> list[dict[str, Any]]:
    path = PATHS[cfg.path]
    base, _, images = checkpoint_batch(cfg.checkpoint, cfg.data, "test", cfg.batch_size)
    on = getattr(path.module, path.switch)

    def call(model: torch.nn.Module, value: Any) -> Any:
        def forward() -> None:
            setattr(path.module, path.switch, value)
            with torch.inference_mode():
                model(images)

        return forward

    models = {"dense": base}
    names = variant_names(cfg.budgets)
    try:
        for name, file in names.items():
            budget = Budget.load(file)
            if path.tome_only and budget.sampler != "tome":
                raise ValueError(
                    f"{file} is a {budget.sampler!r} budget; --path {cfg.path} times ToMe budgets"
                )
            models[name] = budget.apply(copy.deepcopy(base))
        fns = {}
        with torch.inference_mode():
            for name, model in models.items():
                setattr(path.module, path.switch, path.off)
                without = model(images)
                setattr(path.module, path.switch, on)
                atol, rtol = (0.0, 0.0) if path.exact else (None, None)
                torch.testing.assert_close(model(images), without, atol=atol, rtol=rtol)
                fns[f"{name} off"], fns[f"{name} on"] = call(model, path.off), call(model, on)
        times: dict[str, list[Any]] = {key: [] for key in fns}
        for i in range(cfg.runs):
            bar = progress_bar(
                total=len(fns) * (cfg.warmup + cfg.repeats), desc=f"run {i + 1}/{cfg.runs}", unit="forward"
            )
            timed = time_round_robin(fns, cfg.warmup, cfg.repeats, progress=bar, min_seconds=cfg.min_seconds)
            bar.close()
            for key in fns:
                times[key].append(timed[key])
    finally:
        setattr(path.module, path.switch, on)
    rows = []
    for name in models:
        off = [speedup(d, t).median for d, t in zip(times["dense off"], times[f"{name} off"], strict=True)]
        with_path = [
            speedup(d, t).median for d, t in zip(times["dense on"], times[f"{name} on"], strict=True)
        ]
        gain = [speedup(a, b).median for a, b in zip(times[f"{name} off"], times[f"{name} on"], strict=True)]
        rows.append(
            dict(
                budget=name,
                off=_runs(off),
                on=_runs(with_path),
                off_median=statistics.median(off),
                on_median=statistics.median(with_path),
                gain=statistics.median(gain),
                off_runs=off,
                on_runs=with_path,
                gain_runs=gain,
            )
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--path", choices=tuple(PATHS), default=Config.path, help="the fast path to time")
    p.add_argument("--runs", type=int, default=Config.runs)
    args = checkpoint_budget_arguments(p, Config)()
    if args.runs < 1:
        p.error("--runs must be positive")
    cfg = Config(
        checkpoint=args.checkpoint,
        budgets=tuple(args.budget),
        path=args.path,
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
