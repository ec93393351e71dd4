"""Where the time of an ATS-patched timm ViT goes, and what packing padded tokens buys.

1. A torch.profiler table of one forward, ops grouped by role: GEMMs, fused attention, the
   sampling op itself (scores, CDF search, de-duplication, compaction), packing (gathering
   real tokens and scattering results back), and everything else.
2. An interleaved A/B/C of token-wise packing: never packed, always packed (threshold 0), and
   the default (`ats_vit.sampling.PACK_MIN_PADDING`: pack only grids at least 1/32 padding).

Random-init models attend almost uniformly and keep the cap in every image, so there is no
padding; `--sharpen` scales the query weights to make CLS attention peaked, as in trained
models, so that images keep different counts and the batch gets padded.

    python benchmarks/profile_sampling.py --batch-size 16 --sharpen 4 --json profile.json
    python benchmarks/profile_sampling.py --batch-size 16 --sharpen 30   # much padding
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from dataclasses import asdict, dataclass

import timm
import torch
from torch.profiler import ProfilerActivity, profile

import ats_vit.sampling as sampling
import ats_vit.timm as ats_timm
from ats_vit._progress import bar as progress_bar
from ats_vit.bench import json_arguments, machine, print_table, write_json
from ats_vit.testing import sharpen_queries
from ats_vit.timing import describe, speedup, time_round_robin

ROLES = {
    "GEMM": ("aten::addmm", "aten::mm", "aten::bmm", "aten::linear", "aten::matmul"),
    "attention": ("aten::_scaled_dot_product", "aten::scaled_dot_product_attention"),
    "element-wise": ("aten::gelu", "aten::native_layer_norm", "aten::layer_norm", "aten::add", "aten::mul"),
    # mostly addmm's bias broadcast into its output, which timm's dense model pays alike
    "copies": ("aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy", "aten::cat"),
    "patch embedding": ("aten::mkldnn_convolution", "aten::convolution", "aten::_convolution"),
    "sampling op": (
        "aten::linalg_vector_norm",
        "aten::einsum",
        "aten::cumsum",
        "aten::lt",
        "aten::sum",
        "aten::scatter",
        "aten::topk",
        "aten::softmax",
        "aten::_softmax",
        "aten::gather",
    ),
    "packing": ("aten::index_select", "aten::index_copy", "aten::new_zeros", "aten::nonzero"),
}


@dataclass
class Config:
    model: str = "deit_small_patch16_224"
    start_layer: int = 3
    max_tokens: int = 108
    batch_size: int = 16
    sharpen: float = 4.0
    repeats: int = 11
    seed: int = 0
    img_size: int = 0  # 0: the model's own

    def model_kwargs(self) -> dict:
        return {} if not self.img_size else dict(img_size=self.img_size)


def role(name: str) -> str:
    for group, prefixes in ROLES.items():
        if name.startswith(prefixes):
            return group
    return "other"


def build(cfg: Config) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)
    model = sharpen_queries(timm.create_model(cfg.model, **cfg.model_kwargs()).eval(), cfg.sharpen)
    depth = len(model.blocks)
    return ats_timm.apply(model, layers=range(cfg.start_layer, depth), max_tokens=cfg.max_tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in Config.__dataclass_fields__.values():
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    args = json_arguments(parser)()
    cfg = Config(**{k: v for k, v in vars(args).items() if k not in ("json", "overwrite")})
    print(f"config: {asdict(cfg)}\nmachine: {machine()}")
    model = build(cfg)
    x = torch.randn(
        cfg.batch_size, 3, *model.patch_embed.img_size, generator=torch.Generator().manual_seed(0)
    )
    with torch.inference_mode():
        model(x)
        kept = ats_timm.last_info(model).kept_per_layer[:, -1]
        grid = kept.numel() * int(kept.max())
        print(
            f"kept after the last block: {kept.float().mean():.1f} (min {kept.min()}, max {kept.max()}); "
            f"padding {1 - kept.sum().item() / grid:.2%} of the grid"
        )
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                model(x)
    per_role: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        per_role[role(event.key)] += event.self_cpu_time_total / 3 / 1e3  # ms per forward
    total = sum(per_role.values())
    rows = [dict(role=r, ms=ms, share=ms / total) for r, ms in sorted(per_role.items(), key=lambda t: -t[1])]
    print("\nself CPU time per forward, by role")
    print_table(rows, (("role", "role", "<12"), ("ms", "ms", ".1f"), ("share", "share", ".1%")))

    default = sampling.PACK_MIN_PADDING
    thresholds = {
        "never pack": float("inf"),
        "always pack": 0.0,
        f"pack if >= {default:.3g} padding": default,
    }

    def forward_with(threshold: float):
        def fn():
            sampling.PACK_MIN_PADDING = threshold
            model(x)

        return fn

    bar = progress_bar(total=len(thresholds) * (1 + cfg.repeats), desc="packing A/B", unit="forward")
    try:
        with torch.inference_mode():
            times = time_round_robin(
                {k: forward_with(v) for k, v in thresholds.items()}, 1, cfg.repeats, progress=bar
            )
    finally:
        sampling.PACK_MIN_PADDING = default
        bar.close()
    base = times["never pack"]
    ab = [
        dict(
            variant=k,
            ms=1e3 * t.median,
            speedup=speedup(base, t).median,
            iqr=describe(speedup(base, t), ".3f"),
        )
        for k, t in times.items()
    ]
    print(f"\npacking A/B (median of {cfg.repeats} interleaved rounds)")
    print_table(
        ab,
        (
            ("variant", "variant", "<28"),
            ("ms", "ms/batch", ".1f"),
            ("speedup", "speed-up", ".3f"),
            ("iqr", "(IQR)", "<22"),
        ),
    )
    write_json(
        args.json, cfg, [*({"table": "roles", **r} for r in rows), *({"table": "packing", **r} for r in ab)]
    )


if __name__ == "__main__":
    main()
