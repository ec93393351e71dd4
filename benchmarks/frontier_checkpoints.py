"""Train the checkpoints that `ats-vit bench frontier` is reported on (docs/results.md).

All dense (ATS is applied afterwards, without fine-tuning), each reproducible from its seed:

- ``demo``: the demo's own model and recipe (`ats-vit demo` trains the same), 36 tokens;
- ``timm``: timm's ``VisionTransformer`` of the same sizes (``--arch timm``);
- ``p6``: a shallower, wider ViT on a finer grid (6x6-pixel patches: 64 tokens, which no
  longer line up with where the digits sit; depth 6, dim 128), trained longer at a lower rate;
- ``gap`` and ``map``: timm's ``VisionTransformer`` of the demo's sizes with no class token,
  average-pooled (``--arch timm-gap``) or with SigLIP's attention-pool head (``--arch
  timm-map``): the CLS-free families, scored by received attention;
- ``glyphs196``: the harder task at DeiT's token count and depth (``ats_vit.glyphs``: a
  distorted digit among letters, 56 x 56 pixels in 4 x 4 patches, 196 tokens; 10,000
  independent test images): timm's ``VisionTransformer``, depth 12, width 64, 9 epochs of
  32,000 images at batch 32 (about 45 minutes on 2 CPU cores). 0.2's depth-6 ``ats_vit.ViT``
  sat near chance for ~500 steps; with timm's initialisation the loss leaves chance after
  ~250 (measured on the selection seed 100's data). Three epochs were not enough: validation
  accuracy still rose 8 points in the third (66.7, 84.5, 92.6% on seed 1).

Every run validates on its calibration split after each epoch (``epochs.csv``); ``--json``
writes each checkpoint's loss and validation curves and its attention entropy per layer
(``ats_vit.evaluate.attention_entropy``), which ``benchmarks/tables.py`` renders.

Seeds are the unit of evidence: seed ``s`` of a recipe (the checkpoint ``NAME-sS``; seed 0 is
plain ``NAME``) draws its weights *and* its data from ``s`` (``demo@S`` / ``glyphs@S``, see
:func:`ats_vit.data.bundled`), and ``ats-vit bench frontier`` pools the seeds of a recipe
(mean over seeds, spread across seeds, paired test over seeds x test items). Seeds 1-5 (1-3
for ``glyphs196``) are reported; seed 0's data (the plain ``demo`` and ``glyphs``) is where
0.2 chose ``auto``'s members and ``calibrate.SWITCH_Z``, so it is not reported; seeds 100 and
101 (``--held-out``) are for choosing settings from now on and appear in no reported table.
Glyph seeds are fresh images; demo seeds re-partition the same 1,797 handwritten digits, so a
demo seed's test digits can be another seed's training or calibration digits.

    python benchmarks/frontier_checkpoints.py runs/frontier                 # every recipe, reported seeds
    python benchmarks/frontier_checkpoints.py runs/frontier --only demo gap --seeds 1 2 3 4 5
    python benchmarks/frontier_checkpoints.py runs/held-out --held-out     # the selection seeds
    python benchmarks/frontier_checkpoints.py runs/frontier --only glyphs196 --json curves.json

It ends by printing the `benchmarks/frontier.py` command for the checkpoints it trained, with
each one's own data.
"""

import argparse
import csv
import itertools
import json
import statistics
from dataclasses import asdict, replace
from pathlib import Path

from torch.utils.data import Subset

from ats_vit._io import write_text_atomic
from ats_vit.bench.common import machine
from ats_vit.checkpoint import load_model
from ats_vit.data import load_split, take
from ats_vit.evaluate import attention_entropy
from ats_vit.models import ModelConfig
from ats_vit.train import TrainConfig, saved_config, train

# DeiT's 196 tokens at DeiT's depth, narrow enough for 2 CPU cores (0.4 s a step at batch 32);
# timm's VisionTransformer, so the model is initialised as DeiT is
GLYPHS = ModelConfig(
    arch="timm",
    image_size=56,
    patch_size=4,
    num_classes=10,
    channels=1,
    dim=64,
    depth=12,
    heads=4,
    dim_head=16,
    mlp_dim=128,
)
RECIPES = {
    "demo": ("demo", TrainConfig()),
    "timm": ("demo", TrainConfig(model=ModelConfig(arch="timm"))),
    "gap": ("demo", TrainConfig(model=ModelConfig(arch="timm-gap"))),
    # lr 1e-3, not 2e-3 (the recipe until 2026-12-07): at 2e-3 the attention-pool head sat at
    # chance on selection seed 100 (and reported seeds 1-2 stalled: 53% validation, chance);
    # the rule, fixed before the selection run (`--only map --held-out --lr X`): keep 2e-3
    # unless another rate's final validation accuracy, averaged over seeds 100 and 101, is more
    # than 1 point higher, then the highest. 2e-3: 8.9 / 82.6%, 1e-3: 75.0 / 78.7%, 5e-4:
    # 67.0 / 83.1% (checkpoints_heldout_map.json). Then, by a second rule fixed before its run
    # (20 epochs instead of 10 if their mean final validation is more than 1 point higher): at
    # 1e-3, 20 epochs end at 91.5 / 90.7% with the loss flat (0.556 -> 0.555 on seed 100)
    "map": ("demo", TrainConfig(model=ModelConfig(arch="timm-map"), lr=1e-3, epochs=20)),
    "p6": (
        "demo",
        TrainConfig(
            model=ModelConfig(patch_size=6, depth=6, dim=128, heads=4, dim_head=32, mlp_dim=256),
            epochs=12,
            lr=1.5e-3,
        ),
    ),
    # lr 5e-4, not 1e-3 (the recipe of glyphs196-s1 until 2026-12-07): at 1e-3 the selection seed
    # 100 stayed at chance for 1,150 steps and ended at 66.7% validation; at 5e-4 both selection
    # seeds leave chance by step ~400 and end at 96.6% and 96.1% validation (last epoch +0.3 and
    # +0.05 points; seed 101 left chance at 1e-3 too).
    # 9 epochs, not 6 (the recipe until 2026-12-07): at 6, reported seed 3 learnt about an epoch
    # behind the others and still rose 0.8 points of validation in its last epoch (91.3 -> 92.1%,
    # checkpoints_glyphs196.json), so it was not converged. 9 is the most whole epochs that fit
    # the evidence issue's 45 minutes a checkpoint at the pace of selection seed 100 (4.8 min an
    # epoch on 2 CPU cores); no accuracy comparison chose it, and every seed gets it.
    "glyphs196": ("glyphs", TrainConfig(model=GLYPHS, epochs=9, batch_size=32, lr=5e-4, warmup_steps=100)),
}
# the seeds reported (docs/results.md) and the seeds every choice is made on, never reported
REPORTED_SEEDS = {name: (1, 2, 3) if name == "glyphs196" else (1, 2, 3, 4, 5) for name in RECIPES}
HELD_OUT_SEEDS = (100, 101)
# calibration images the attention entropy is measured on
ENTROPY_IMAGES = 512


def checkpoint_name(recipe: str, seed: int) -> str:
    """``demo`` for seed 0, ``demo-s3`` for seed 3: what `bench frontier` pools by."""
    return recipe if seed == 0 else f"{recipe}-s{seed}"


def _csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def report(run: Path, recipe: str, seed: int) -> dict:
    """What a reviewer checks of one trained checkpoint: the mean logged loss and the
    validation accuracy of every epoch (converged: flat over the last ones), the training
    time, and the attention entropy per layer on calibration images."""
    spec = RECIPES[recipe][0]
    cfg = saved_config(run) or RECIPES[recipe][1]  # as the run was trained (--epochs may differ)
    model, _ = load_model(run / "final.safetensors")
    data_spec = f"{spec}@{seed}"
    calib = load_split(data_spec, "calib", cfg.model.image_size, channels=cfg.model.channels)
    images, _ = take(calib, ENTROPY_IMAGES, seed=0)
    logged, epochs = _csv(run / "metrics.csv"), _csv(run / "epochs.csv")
    if epochs:
        loss = [float(r["train_loss"]) for r in epochs]
    else:  # a run from before epochs.csv: the mean of its loss logged every 20 steps, per epoch
        by_epoch: dict[int, list[float]] = {}
        for r in logged:
            by_epoch.setdefault(int(r["epoch"]), []).append(float(r["loss"]))
        loss = [sum(v) / len(v) for _, v in sorted(by_epoch.items())]
    steps = [int(r["step"]) for r in logged]
    times = [float(r["time"]) for r in logged]
    ends = [float(r["time"]) for r in epochs]
    if len(ends) > 2:  # the median epoch (with its validation), so a pause or a busy machine counts once
        minutes = statistics.median(b - a for a, b in itertools.pairwise(ends)) * len(ends) / 60
    elif len(logged) > 1:  # the run's pace between its first and last logged steps, over all its steps
        minutes = (times[-1] - times[0]) / max(1, steps[-1] - steps[0]) * steps[-1] / 60
    else:
        minutes = None
    return dict(
        checkpoint=run.name,
        recipe=recipe,
        seed=seed,
        data=data_spec,
        model=asdict(cfg.model),
        epochs=cfg.epochs,
        lr=cfg.lr,
        steps=steps[-1] if steps else 0,
        train_minutes=minutes,
        loss_per_epoch=loss,
        val_accuracy_per_epoch=[float(r["val_accuracy"]) for r in epochs if r["val_accuracy"]],
        loss_sampled=not epochs,
        attention_entropy=attention_entropy(model, images),
        entropy_images=len(images),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="runs/frontier", help="one sub-folder per checkpoint")
    parser.add_argument("--only", nargs="+", choices=sorted(RECIPES), help="train only these")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", type=int, nargs="+", help="these seeds (default: the reported ones)")
    seeds.add_argument("--held-out", action="store_true", help=f"the selection seeds {HELD_OUT_SEEDS}")
    parser.add_argument(
        "--epochs",
        type=int,
        help="override every recipe's epochs, its warm-up kept (to choose them on --held-out)",
    )
    parser.add_argument(
        "--lr", type=float, help="override every recipe's peak learning rate (to choose one on --held-out)"
    )
    parser.add_argument(
        "--train-images", type=int, help="train on the first N images only, warm-up 1 step (smoke tests)"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the runs in OUT (a finished run is kept), start the others",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace runs already in OUT, and --json")
    parser.add_argument(
        "--json", help="write each checkpoint's loss and validation curves and attention entropy here"
    )
    args = parser.parse_args()
    if args.lr is not None and not args.lr > 0:
        parser.error(f"--lr must be a positive learning rate, got {args.lr}")
    if args.seeds and min(args.seeds) < 0:
        parser.error(f"--seeds must be non-negative integers, got {args.seeds}")
    if args.json and Path(args.json).exists() and not args.overwrite:
        parser.error(f"{args.json} already exists: pass --overwrite to replace it, or choose another --json")
    trained, data_specs, rows = [], [], []
    for recipe in args.only or RECIPES:
        spec, base = RECIPES[recipe]
        for seed in args.seeds or (HELD_OUT_SEEDS if args.held_out else REPORTED_SEEDS[recipe]):
            name, data_spec = checkpoint_name(recipe, seed), f"{spec}@{seed}"
            data = load_split(data_spec, "train", base.model.image_size, channels=base.model.channels)
            if args.train_images:
                data = Subset(data, range(args.train_images))
            # validation: the calibration split, scored after every epoch for the curves only
            val = load_split(data_spec, "calib", base.model.image_size, channels=base.model.channels)
            cfg = replace(base, out_dir=str(Path(args.out) / name), seed=seed)
            if args.epochs:
                cfg = replace(cfg, epochs=args.epochs)
            if args.train_images:  # a smoke run of a few steps: no warm-up to speak of
                cfg = replace(cfg, warmup_steps=min(cfg.warmup_steps, 1))
            if args.lr is not None:
                cfg = replace(cfg, lr=args.lr)
            # --resume continues the runs that OUT holds and starts the ones it does not
            resume = args.resume and (Path(cfg.out_dir) / "last.safetensors").is_file()
            path = train(cfg, data, resume=resume, overwrite=args.overwrite, val_data=val)
            print(f"{name}: {path}")
            trained.append(str(path))
            data_specs.append(data_spec)
            if args.json:
                rows.append(report(path.parent, recipe, seed))
    if args.json:
        record = dict(
            config=dict(recipes=sorted({r["recipe"] for r in rows})), machine=machine("cpu"), rows=rows
        )
        write_text_atomic(args.json, json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.json}")
    print("frontier: python benchmarks/frontier.py " + " ".join(trained) + " --data " + " ".join(data_specs))


if __name__ == "__main__":
    main()
