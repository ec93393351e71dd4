"""Off-the-shelf ATS on a timm ViT: GFLOPs and throughput, dense vs patched, in one run.

The dense model and its ATS-patched copy (same weights) run interleaved; each cell is the
median of the repeats. "ideal" is the speed-up the FLOP reduction allows (dense GFLOPs /
ATS GFLOPs, from the tokens actually kept); "efficiency" = measured / ideal.
Random weights by default (no download); `--pretrained` loads timm's weights if reachable.
Random-init models attend almost uniformly, so ATS keeps close to the cap; trained models
keep fewer tokens and gain more.

    python benchmarks/timm_ats.py                              # deit_small, batch 1 and 64
    python benchmarks/timm_ats.py --batch-sizes 64 --repeats 5 --json timm_ats.json
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import asdict, dataclass, field

import torch
from _common import add_timing_args, machine, parse_timing_args, print_table, time_round_robin, write_json

import ats_vit.timm as ats_timm


@dataclass
class Config:
    model: str = "deit_small_patch16_224"
    pretrained: bool = False
    layers: tuple[int, ...] = tuple(range(3, 12))
    max_tokens: int = 108
    samplers: tuple[str, ...] = ("inverse_transform",)
    batch_sizes: tuple[int, ...] = (1, 64)
    warmup: int = 1
    repeats: int = 5
    seed: int = 0
    threads: int = field(default_factory=torch.get_num_threads)


COLUMNS = (
    ("batch", "batch", "d"),
    ("variant", "variant", "<28"),
    ("gflops", "GFLOPs", ".3f"),
    ("kept_last", "kept", ".1f"),
    ("img_per_s", "img/s", ".2f"),
    ("speedup", "speed-up", ".2f"),
    ("ideal", "ideal", ".2f"),
    ("efficiency", "efficiency", ".2f"),
)


def run(cfg: Config) -> list[dict]:
    import timm

    torch.manual_seed(cfg.seed)
    dense = timm.create_model(cfg.model, pretrained=cfg.pretrained).eval()
    # the baseline is timm's own, unpatched model; a patched copy that samples nowhere only
    # counts its FLOPs (identical logits, tested)
    counter = ats_timm.apply(copy.deepcopy(dense), layers=[], max_tokens=1)
    variants = {"dense (timm)": dense}
    for sampler in cfg.samplers:
        variants[f"ATS {sampler}"] = ats_timm.apply(
            copy.deepcopy(dense), layers=cfg.layers, max_tokens=cfg.max_tokens, sampler=sampler
        )
    gen = torch.Generator().manual_seed(cfg.seed)
    rows = []
    with torch.inference_mode():
        for b in cfg.batch_sizes:
            x = torch.randn(b, 3, *dense.patch_embed.img_size, generator=gen)
            cost = {}
            for name, model in variants.items():
                measured = counter if model is dense else model
                measured(x)
                info = ats_timm.last_info(measured)
                cost[name] = (info.gflops.mean().item(), info.kept_per_layer[:, -1].float().mean().item())
            times = time_round_robin(
                {name: (lambda m=m, x=x: m(x)) for name, m in variants.items()}, cfg.warmup, cfg.repeats
            )
            for name, t in times.items():
                speedup = times["dense (timm)"] / t
                ideal = cost["dense (timm)"][0] / cost[name][0]
                rows.append(
                    dict(
                        batch=b,
                        variant=name,
                        gflops=cost[name][0],
                        kept_last=cost[name][1],
                        img_per_s=b / t,
                        speedup=speedup,
                        ideal=ideal,
                        efficiency=speedup / ideal,
                    )
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=Config.model)
    parser.add_argument("--pretrained", action="store_true")
    parser.add_argument("--max-tokens", type=int, default=Config.max_tokens)
    parser.add_argument(
        "--samplers", nargs="+", default=list(Config.samplers), choices=["inverse_transform", "gumbel"]
    )
    add_timing_args(parser, Config)
    args = parse_timing_args(parser)
    if args.max_tokens < 1:
        parser.error("--max-tokens must be >= 1")
    cfg = Config(
        model=args.model,
        pretrained=args.pretrained,
        max_tokens=args.max_tokens,
        samplers=tuple(args.samplers),
        batch_sizes=tuple(args.batch_sizes),
        repeats=args.repeats,
        warmup=args.warmup,
        threads=args.threads,
    )
    print(f"config: {asdict(cfg)}\nmachine: {machine()}")
    rows = run(cfg)
    print_table(rows, COLUMNS)
    write_json(args.json, cfg, rows)


if __name__ == "__main__":
    main()
