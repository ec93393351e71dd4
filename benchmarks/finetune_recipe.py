"""Does fine-tuning recover the dense accuracy, and at which learning rate: the recipe of
`ats-vit finetune`, measured on the selection seeds.

For every checkpoint: calibrate ``ats-fuse`` to the target on its calibration split, fine-tune
it for 3 epochs with that budget active at each candidate peak learning rate (the rest as
`ats-vit finetune`: AdamW, cosine, 20 warm-up steps, batch 64), calibrate again on the
fine-tuned weights (the recipe: the kept counts drift while the attention sharpens), and
score on the test split: dense, the calibrated budget without fine-tuning, and each
fine-tuned model. The checkpoints are pooled (each checkpoint's items their own ids): mean
accuracy, the difference to dense and to the recipe's learning rate, exact paired p-values
(`ats_vit.stats.paired_test`) with the Benjamini-Hochberg adjustment over the table.

The rule, fixed before the run: run it on the held-out seeds only (`frontier_checkpoints.py
--held-out`: seeds 100 and 101 of ``demo`` and ``gap``, in no reported table) and keep the
recipe (:data:`RECIPE_METHOD` at :data:`RECIPE_LR`) unless another method or learning rate is
ahead of it with an adjusted p < 0.05. ``--methods`` fine-tunes with other selection methods'
budgets as well (each calibrated to the same target, before and after fine-tuning, as the
recipe's):

    python benchmarks/finetune_recipe.py runs/held/{demo,gap}-s{100,101}/final.safetensors \\
        --data demo@100 demo@101 demo@100 demo@101 --lrs 5e-4 --methods ats-fuse tome \\
        --work runs/ft-methods --json finetune_methods.json

    python benchmarks/frontier_checkpoints.py runs/held --only demo gap --held-out
    python benchmarks/finetune_recipe.py runs/held/{demo,gap}-s{100,101}/final.safetensors \\
        --data demo@100 demo@101 demo@100 demo@101 --work runs/ft-recipe --json finetune_recipe.json

Distillation from the dense model was measured by this script at commit 9b88893 (``--lrs 5e-4
--distill 0.5``, ``finetune_distill.json``) and, no better than the recipe, removed.

``--report`` then measures the kept recipe alone (its learning rate only, no pick) on the
reported seeds, whose data and weights the choice never saw:

    python benchmarks/frontier_checkpoints.py runs/frontier --only demo gap
    python benchmarks/finetune_recipe.py runs/frontier/{demo,gap}-s{1,2,3,4,5}/final.safetensors \\
        --data demo@{1,2,3,4,5} demo@{1,2,3,4,5} --report --work runs/ft-report \\
        --json finetune_seeds.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ats_vit._io import write_atomic, write_text_atomic
from ats_vit.bench.common import checkpoint_splits, json_arguments, machine, print_table
from ats_vit.calibrate import METHODS, calibrate
from ats_vit.checkpoint import load_model
from ats_vit.evaluate import measure
from ats_vit.stats import adjust_bh, paired_test
from ats_vit.train import TrainConfig, train

RECIPE_LR = 5e-4  # `ats-vit finetune`'s default peak learning rate
RECIPE_METHOD = "ats-fuse"  # the method the recipe calibrates (docs/guides/training.md)


@dataclass
class Config:
    checkpoints: tuple[str, ...]
    data: tuple[str, ...] = ("demo",)
    target: float = 0.4
    lrs: tuple[float, ...] = (RECIPE_LR, 1e-4, 1e-3)
    methods: tuple[str, ...] = (RECIPE_METHOD,)
    epochs: int = 3
    calib_images: int = 512  # `ats-vit calibrate`'s default
    seed: int = 0
    report: bool = False  # the recipe alone on the reported seeds (no learning rate is chosen)

    def data_of(self, index: int) -> str:
        return self.data[0] if len(self.data) == 1 else self.data[index]


def measure_checkpoint(cfg: Config, index: int, work: Path, progress: bool) -> dict[str, Any]:
    """Test-split hits of dense, the calibrated budget and each fine-tuned model, and the test
    items, for one checkpoint. Kept in ``work``: a killed run resumes at the next checkpoint."""
    from ats_vit import data as datasets  # looked up when called (tests put tiny data in its place)

    path, data = cfg.checkpoints[index], cfg.data_of(index)
    done = work / f"{index}-{Path(path).parent.name}.pt"
    # what the hits were measured with: a --resume with other settings, or after the checkpoint
    # was trained again (its size and modification time), would mix two experiments
    stat = Path(path).stat()
    settings = dict(checkpoint=path, size=stat.st_size, mtime_ns=stat.st_mtime_ns, data=data)
    settings.update(target=cfg.target, epochs=cfg.epochs, seed=cfg.seed, calib_images=cfg.calib_images)
    if done.exists():
        kept = torch.load(done)
        wanted = [key_of(m, lr) for m in cfg.methods for lr in (None, *cfg.lrs)]
        missing = [k for k in wanted if k not in kept]
        if kept.get("settings") != settings or missing:
            raise ValueError(
                f"{done} was measured with {kept.get('settings')}"
                + (f" and lacks {missing}" if missing else "")
                + f", not {settings}: resume with the same settings, or choose another --work"
            )
        return kept
    loaded = checkpoint_splits(path, data, cfg.calib_images, cfg.seed)
    model, test_x, test_y = loaded.model, loaded.test_x, loaded.test_y

    def budget_of(net: torch.nn.Module, method: str) -> Any:
        torch.manual_seed(cfg.seed)
        return calibrate(
            net, loaded.calib_x, cfg.target, loaded.calib_y, method=method, items=loaded.calib_items
        )

    hits: dict[str, Any] = dict(items=loaded.test_items, dense=measure(model, test_x, None)[0] == test_y)
    hits["settings"] = settings
    model_cfg = load_model(path)[1]
    train_data = datasets.load_split(data, "train", model_cfg.image_size, channels=model_cfg.channels)
    for method in cfg.methods:
        budget = budget_of(model, method)
        hits[key_of(method)] = measure(model, test_x, budget)[0] == test_y
        for lr in cfg.lrs:
            run = TrainConfig(
                model=replace(model_cfg, budget=budget.to_dict()),
                epochs=cfg.epochs,
                lr=lr,
                warmup_steps=20,
                seed=cfg.seed,
                out_dir=str(work / f"{index}-{method}-lr{lr:g}"),
                init_from=path,
                data=data,
            )
            tuned, _ = load_model(train(run, train_data, overwrite=True, progress=progress))
            hits[key_of(method, lr)] = measure(tuned, test_x, budget_of(tuned, method))[0] == test_y
    write_atomic(done, lambda f: torch.save(hits, f), binary=True)
    return hits


def key_of(method: str, lr: float | None = None) -> str:
    """A row's key: ``before``/``lr 0.0005`` for the recipe's method (the keys of the runs
    before ``--methods``), ``tome before``/``tome lr 0.0005`` for another."""
    key = "before" if lr is None else f"lr {lr:g}"
    return key if method == RECIPE_METHOD else f"{method} {key}"


def pooled(measured: list[dict[str, Any]], key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``key``'s hits over every checkpoint and the items, each checkpoint's items their own ids."""
    hits, items, offset = [], [], 0
    for m in measured:
        hits.append(m[key])
        items.append(m["items"] + offset)
        offset += int(m["items"].max()) + 1
    return torch.cat(hits), torch.cat(items)


def table(measured: list[dict[str, Any]], cfg: Config) -> list[dict[str, Any]]:
    dense, items = pooled(measured, "dense")
    recipe = pooled(measured, key_of(RECIPE_METHOD, RECIPE_LR))[0]
    rows = []
    variants = [("dense", "dense", None)]
    for method in cfg.methods:
        variants += [(key_of(method), method, None), *((key_of(method, lr), method, lr) for lr in cfg.lrs)]
    for key, method, lr in variants:
        hits = pooled(measured, key)[0]
        vs_dense, p_dense = paired_test(hits, dense, items)
        vs_recipe, p_recipe = paired_test(hits, recipe, items)
        rows.append(
            dict(
                model="dense"
                if key == "dense"
                else f"{method} {cfg.target:g}, "
                + ("calibrated, not fine-tuned" if lr is None else f"fine-tuned at lr {lr:g}"),
                key=key,
                accuracy_pct=100 * hits.float().mean().item(),
                per_checkpoint_pct=[100 * m[key].float().mean().item() for m in measured],
                spread_pct=statistics.pstdev(100 * m[key].float().mean().item() for m in measured),
                vs_dense_pct=100 * vs_dense,
                vs_dense_p=p_dense,
                vs_recipe_pct=100 * vs_recipe,
                vs_recipe_p=p_recipe,
            )
        )
    for name in ("vs_dense", "vs_recipe"):
        for row, adjusted in zip(rows, adjust_bh([r[f"{name}_p"] for r in rows]), strict=True):
            row[f"{name}_p_adj"] = adjusted
    return rows


def pick(rows: list[dict[str, Any]]) -> str:
    """The rule of the module docstring: the recipe (its method at its learning rate) unless
    another fine-tuned model is ahead of it with an adjusted p < 0.05 (the best such one)."""
    ahead = [
        r for r in rows if " lr " in f" {r['key']}" and r["vs_recipe_pct"] > 0 and r["vs_recipe_p_adj"] < 0.05
    ]
    return max(ahead, key=lambda r: r["accuracy_pct"])["key"] if ahead else key_of(RECIPE_METHOD, RECIPE_LR)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "checkpoints", nargs="+", help="held-out checkpoints (frontier_checkpoints.py --held-out)"
    )
    parser.add_argument("--data", nargs="+", default=["demo"], help="one data spec, or one per checkpoint")
    parser.add_argument("--target", type=float, default=Config.target, help="fraction of the dense GFLOPs")
    parser.add_argument(
        "--lrs",
        type=float,
        nargs="+",
        help="peak learning rates (default: "
        + " ".join(f"{lr:g}" for lr in Config.lrs)
        + f"; with --report: {RECIPE_LR:g})",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(Config.methods),
        choices=list(METHODS),
        help=f"selection methods to calibrate and fine-tune with (including the recipe's, {RECIPE_METHOD})",
    )
    parser.add_argument("--epochs", type=int, default=Config.epochs, help="fine-tuning epochs")
    parser.add_argument(
        "--work", required=True, help="folder for the fine-tuned runs and each checkpoint's hits"
    )
    parser.add_argument("--resume", action="store_true", help="reuse the checkpoints measured in --work")
    parser.add_argument(
        "--report",
        action="store_true",
        help=f"measure the recipe alone (--lrs {RECIPE_LR:g}) on reported seeds: no learning rate is chosen",
    )
    args = json_arguments(parser, "config, machine, rows and the pick")()
    if args.lrs is None:
        args.lrs = [RECIPE_LR] if args.report else list(Config.lrs)
    if len(args.data) not in (1, len(args.checkpoints)):
        parser.error(
            f"--data takes one value or one per checkpoint ({len(args.checkpoints)}), got {len(args.data)}"
        )
    if RECIPE_LR not in args.lrs:
        parser.error(f"--lrs must include the recipe's learning rate {RECIPE_LR:g}, got {args.lrs}")
    if RECIPE_METHOD not in args.methods:
        parser.error(f"--methods must include the recipe's method {RECIPE_METHOD}, got {args.methods}")
    if args.report and (args.lrs != [RECIPE_LR] or args.methods != [RECIPE_METHOD]):
        parser.error(
            f"--report measures the recipe alone: --lrs must be {RECIPE_LR:g} and --methods {RECIPE_METHOD} "
            f"(or left out), got {args.lrs} and {args.methods}"
        )
    work = Path(args.work)
    if work.exists() and any(work.iterdir()) and not args.resume:
        parser.error(f"{work} is not empty: pass --resume to reuse what it holds, or choose another --work")
    work.mkdir(parents=True, exist_ok=True)
    cfg = Config(
        tuple(args.checkpoints),
        tuple(args.data),
        args.target,
        tuple(args.lrs),
        tuple(args.methods),
        args.epochs,
        report=args.report,
    )
    measured = []
    for index in range(len(cfg.checkpoints)):
        measured.append(measure_checkpoint(cfg, index, work, progress=True))
        print(f"measured {cfg.checkpoints[index]} ({index + 1} of {len(cfg.checkpoints)})", flush=True)
    rows = table(measured, cfg)
    print_table(
        rows,
        (
            ("model", "model", "<44"),
            ("accuracy_pct", "test %", ".2f"),
            ("spread_pct", "across checkpoints ±", ".2f"),
            ("vs_dense_pct", "vs dense", "+.2f"),
            ("vs_dense_p_adj", "p (adj.)", ".3f"),
            ("vs_recipe_pct", "vs the recipe", "+.2f"),
            ("vs_recipe_p_adj", "p (adj.)", ".3f"),
        ),
    )
    chosen = None if cfg.report else pick(rows)
    if chosen is not None:
        print(f"the rule keeps: {chosen} (the recipe: {RECIPE_METHOD} at lr {RECIPE_LR:g})")
    if args.json:
        recipe = key_of(RECIPE_METHOD, RECIPE_LR)
        record = dict(config=asdict(cfg), machine=machine("cpu"), rows=rows, recipe=recipe, pick=chosen)
        write_text_atomic(args.json, json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
