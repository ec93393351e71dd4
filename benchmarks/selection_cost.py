"""What choosing the tokens costs at inference, and what is left when it costs nothing.

Each budget is timed as it runs, and again with every sampling layer's selection replayed from
a first pass on the same images (the sampling op: scores, sampling, compaction, merge plan,
costs nothing; the CLS attention row is still computed), both against the dense model in one
interleaved run. The replayed speed-up is what the kept tokens' own work allows on this
machine (GEMMs on fewer rows, attention over a padded grid, packing); the gap between the two
is the price of selecting. The replayed logits are checked to equal the live ones.

    python benchmarks/selection_cost.py runs/demo/final.safetensors \\
        --budget runs/demo/budget-0.5.json runs/demo/budget-0.7.json --json cost.json
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ats_vit._progress import bar as progress_bar
from ats_vit.bench import checkpoint_batch, checkpoint_budget_arguments, print_table, write_json
from ats_vit.bench.train import variant_names
from ats_vit.budget import Budget
from ats_vit.families import family_of
from ats_vit.flops import gflops
from ats_vit.sampling import AdaptiveTokenSampling
from ats_vit.timing import speedup, time_round_robin


@dataclass
class Config:
    checkpoint: str
    budgets: tuple[str, ...]
    data: str = "demo"
    batch_size: int = 64
    warmup: int = 3
    repeats: int = 15
    min_seconds: float = 3.0


COLUMNS = (
    ("budget", "budget", "<24"),
    ("gflops_ratio", "GFLOPs vs dense", ".3f"),
    ("ideal", "ideal", ".2f"),
    ("speedup", "speed-up", ".2f"),
    ("speedup_iqr", "(IQR)", "<11"),
    ("efficiency", "efficiency", ".2f"),
    ("replayed", "replayed speed-up", ".2f"),
    ("replayed_efficiency", "replayed efficiency", ".2f"),
)


def replaying(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """A copy of ``model`` whose sampling layers return, without computing anything, the
    selections they made on ``images`` in a first pass."""
    model = copy.deepcopy(model)
    samplers = [m for m in model.modules() if isinstance(m, AdaptiveTokenSampling)]
    made: dict[nn.Module, list[Any]] = {m: [] for m in samplers}
    handles = [m.register_forward_hook(lambda m, _args, out: made[m].append(out)) for m in samplers]
    with torch.inference_mode():
        model(images)
    for handle in handles:
        handle.remove()
    for module, outputs in made.items():
        if len(outputs) > 1:
            raise RuntimeError("a sampling layer ran twice in one pass: replay needs one call per layer")
        if outputs:  # an instance attribute: nn.Module.__call__ runs it instead of the class's forward
            module.forward = lambda *_args, _chosen=outputs[0], **_kwargs: _chosen  # type: ignore[method-assign]
    return model


def run(cfg: Config) -> list[dict[str, Any]]:
    base, _, images = checkpoint_batch(cfg.checkpoint, cfg.data, "test", cfg.batch_size)
    fns: dict[str, Any] = {}
    costs: dict[str, float] = {}

    def call(model: nn.Module) -> Any:
        def forward() -> None:
            with torch.inference_mode():
                model(images)

        return forward

    fns["dense"] = call(base)
    names = {path: name for name, path in variant_names(cfg.budgets).items()}
    for path, name in names.items():
        live = Budget.load(path).apply(copy.deepcopy(base))
        replay = replaying(live, images)
        with torch.inference_mode():
            torch.testing.assert_close(replay(images), live(images))
            _, state = family_of(live).run(images)
            costs[name] = gflops(family_of(live).cost, state.trace).double().mean().item()
        fns[name], fns[name + " replayed"] = call(live), call(replay)
    with torch.inference_mode():
        _, state = family_of(base).run(images)
        dense_cost = gflops(family_of(base).cost, state.trace).double().mean().item()
    bar = progress_bar(total=len(fns) * (cfg.warmup + cfg.repeats), desc="selection cost", unit="forward")
    times = time_round_robin(fns, cfg.warmup, cfg.repeats, progress=bar, min_seconds=cfg.min_seconds)
    bar.close()
    rows = []
    for name in names.values():
        up, again = speedup(times["dense"], times[name]), speedup(times["dense"], times[name + " replayed"])
        q1, q3 = up.quartiles()
        ideal = dense_cost / costs[name]
        rows.append(
            dict(
                budget=name,
                gflops_ratio=costs[name] / dense_cost,
                ideal=ideal,
                speedup=up.median,
                speedup_iqr=f"{q1:.2f}-{q3:.2f}",
                efficiency=up.median / ideal,
                replayed=again.median,
                replayed_efficiency=again.median / ideal,
            )
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    args = checkpoint_budget_arguments(p, Config)()
    cfg = Config(
        checkpoint=args.checkpoint,
        budgets=tuple(args.budget),
        data=args.data,
        batch_size=args.batch_size,
        repeats=args.repeats,
        min_seconds=args.min_seconds,
    )
    rows = run(cfg)
    print_table(rows, COLUMNS)
    write_json(args.json, cfg, rows)


if __name__ == "__main__":
    main()
