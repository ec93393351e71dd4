"""Throughput of ats_vit.ViT against vit-pytorch's ats_vit.ViT (the seed), same weights and schedule.

Every model runs in the same process, interleaved round-robin over the repeats so machine
noise hits all of them alike; each cell is the median of the repeats. Ratios are against the
seed with the same schedule. Needs `pip install vit-pytorch` (part of the `dev` extra).

    python benchmarks/vit_vs_seed.py                       # DeiT-S sizes, batch 1 and 16
    python benchmarks/vit_vs_seed.py --batch-sizes 16 --repeats 9 --json out.json
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field

import torch
from _common import add_timing_args, machine, parse_timing_args, print_table, time_round_robin, write_json

from ats_vit import ViT, load_vit_pytorch_state_dict


@dataclass
class Config:
    image_size: int = 224
    patch_size: int = 16
    num_classes: int = 1000
    dim: int = 384
    depth: int = 12
    heads: int = 6
    mlp_dim: int = 1536
    schedule: tuple[int, ...] = (196,) * 3 + (108,) * 9
    batch_sizes: tuple[int, ...] = (1, 16)
    warmup: int = 2
    repeats: int = 7
    seed: int = 0
    threads: int = field(default_factory=torch.get_num_threads)


def build_models(cfg: Config) -> dict[str, torch.nn.Module]:
    from vit_pytorch.ats_vit import ViT as SeedViT

    torch.manual_seed(cfg.seed)
    sizes = dict(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        num_classes=cfg.num_classes,
        dim=cfg.dim,
        depth=cfg.depth,
        heads=cfg.heads,
        mlp_dim=cfg.mlp_dim,
    )
    dense_schedule = (cfg.schedule[0],) * cfg.depth
    seed_dense = SeedViT(max_tokens_per_depth=dense_schedule, **sizes)
    weights = seed_dense.state_dict()
    seed_ats = SeedViT(max_tokens_per_depth=cfg.schedule, **sizes)
    seed_ats.load_state_dict(weights)

    def ours(schedule: tuple[int, ...], **kw) -> ViT:
        return load_vit_pytorch_state_dict(ViT(max_tokens_per_depth=schedule, **sizes, **kw), weights)

    models = {
        "seed dense": seed_dense,
        "seed ATS (gumbel)": seed_ats,
        "ours dense": ours(dense_schedule),
        "ours ATS inverse_transform": ours(cfg.schedule),
        "ours ATS gumbel": ours(cfg.schedule, sampler="gumbel"),
        "ours ATS inverse_transform static": ours(cfg.schedule, static_shape=True),
    }
    return {name: m.eval() for name, m in models.items()}


def kept_tokens(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Mean patch tokens alive after the last layer."""
    _, ids = model(x, return_sampled_token_ids=True)
    return (ids >= 0).sum(dim=1).float().mean().item()


def run(cfg: Config) -> list[dict]:
    models = build_models(cfg)
    rows = []
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.inference_mode():
        for b in cfg.batch_sizes:
            x = torch.randn(b, 3, cfg.image_size, cfg.image_size, generator=gen)
            tokens = {name: kept_tokens(m, x) for name, m in models.items()}
            times = time_round_robin(
                {name: (lambda m=m, x=x: m(x)) for name, m in models.items()}, cfg.warmup, cfg.repeats
            )
            base = times["seed ATS (gumbel)"]
            for name, t in times.items():
                rows.append(
                    dict(
                        batch=b,
                        model=name,
                        img_per_s=b / t,
                        ms_per_batch=1e3 * t,
                        kept_tokens=tokens[name],
                        speedup_vs_seed_ats=base / t,
                    )
                )
    return rows


COLUMNS = (
    ("batch", "batch", "d"),
    ("model", "model", "<34"),
    ("img_per_s", "img/s", ".1f"),
    ("ms_per_batch", "ms/batch", ".1f"),
    ("kept_tokens", "kept", ".1f"),
    ("speedup_vs_seed_ats", "vs seed ATS", ".2f"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_timing_args(parser, Config)
    args = parse_timing_args(parser)
    cfg = Config(
        batch_sizes=tuple(args.batch_sizes), repeats=args.repeats, warmup=args.warmup, threads=args.threads
    )
    print(f"config: {asdict(cfg)}\nmachine: {machine()}")
    rows = run(cfg)
    print_table(rows, COLUMNS)
    write_json(args.json, cfg, rows)


if __name__ == "__main__":
    main()
