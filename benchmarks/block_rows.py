"""How fast one plain (dense) transformer block runs on fewer tokens: the ceiling on ATS's
efficiency that the kernels set, before any sampling code runs.

A DeiT-S layer after sampling is a dense block on 109 tokens instead of 197. If that block
alone is less than 197/109 times faster, no sampling implementation can reach the FLOP ideal:
the GEMMs (and attention) simply run at a lower rate on fewer rows. This script times timm's
own `Block` (no ATS code at all) on each token count, interleaved in one run, and prints
its efficiency (measured speed-up / FLOP ratio) against the full-size block.

    python benchmarks/block_rows.py                          # batch 1 and 16, 197 vs 109 tokens
    python benchmarks/block_rows.py --tokens 197 109 112 128 --batch-sizes 1 --json rows.json
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import timm
import torch

from ats_vit._progress import bar as progress_bar
from ats_vit.bench import json_arguments, print_table, use_threads, write_json
from ats_vit.timing import time_round_robin


@dataclass
class Config:
    model: str = "deit_small_patch16_224"
    tokens: tuple[int, ...] = (197, 109)  # the first is the reference
    batch_sizes: tuple[int, ...] = (1, 16)
    warmup: int = 3
    repeats: int = 21
    min_seconds: float = 3.0
    threads: int = torch.get_num_threads()


COLUMNS = (
    ("batch", "batch", ">5"),
    ("tokens", "tokens", ">6"),
    ("ms", "ms / block", ".3f"),
    ("speedup", "speed-up", ".2f"),
    ("ideal", "ideal", ".2f"),
    ("efficiency", "efficiency", ".2f"),
)


def run(cfg: Config) -> list[dict]:
    use_threads(cfg.threads)
    model = timm.create_model(cfg.model, pretrained=False).eval()
    block = model.blocks[0]
    dim, hidden = model.embed_dim, block.mlp.fc1.out_features

    def flops(n: int) -> int:  # multiply-adds: qkv, projection, MLP per token; QK^T and AV
        return n * (4 * dim * dim + 2 * dim * hidden) + 2 * n * n * dim

    rows = []
    for b in cfg.batch_sizes:
        inputs = {n: torch.randn(b, n, dim) for n in cfg.tokens}

        def call(x: torch.Tensor) -> None:
            with torch.inference_mode():
                block(x)

        fns = {n: (lambda x=x: call(x)) for n, x in inputs.items()}
        bar = progress_bar(total=len(fns) * (cfg.warmup + cfg.repeats), desc=f"batch {b}", unit="call")
        times = {
            n: t.median
            for n, t in time_round_robin(
                fns, cfg.warmup, cfg.repeats, progress=bar, min_seconds=cfg.min_seconds
            ).items()
        }
        bar.close()
        ref = cfg.tokens[0]
        for n in cfg.tokens:
            speedup, ideal = times[ref] / times[n], flops(ref) / flops(n)
            rows.append(
                dict(
                    batch=b,
                    tokens=n,
                    ms=1e3 * times[n],
                    speedup=speedup,
                    ideal=ideal,
                    efficiency=speedup / ideal,
                )
            )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=Config.model)
    p.add_argument("--tokens", type=int, nargs="+", default=list(Config.tokens))
    p.add_argument("--batch-sizes", type=int, nargs="+", default=list(Config.batch_sizes))
    p.add_argument("--repeats", type=int, default=Config.repeats)
    p.add_argument("--threads", type=int, default=Config.threads)
    p.add_argument("--min-seconds", type=float, default=Config.min_seconds)
    args = json_arguments(p)()
    if min(args.tokens) < 1 or min(args.batch_sizes) < 1 or args.repeats < 1 or args.threads < 1:
        p.error("--tokens, --batch-sizes, --repeats and --threads must be positive")
    cfg = Config(
        model=args.model,
        tokens=tuple(args.tokens),
        batch_sizes=tuple(args.batch_sizes),
        repeats=args.repeats,
        threads=args.threads,
        min_seconds=args.min_seconds,
    )
    rows = run(cfg)
    print_table(rows, COLUMNS)
    write_json(args.json, cfg, rows)


if __name__ == "__main__":
    main()
