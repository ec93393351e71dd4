"""Train the checkpoints that `ats-vit bench frontier` is reported on (docs/results.md).

All dense (ATS is applied afterwards, without fine-tuning), each reproducible from its seed:

- ``demo``: the demo's own model and recipe (`ats-vit demo` trains the same), 36 tokens;
- ``timm``: timm's ``VisionTransformer`` of the same sizes (``--arch timm``);
- ``p6``: a shallower, wider ViT on a finer grid (6x6-pixel patches: 64 tokens, which no
  longer line up with where the digits sit; depth 6, dim 128), trained longer at a lower rate;
- ``gap`` and ``map``: timm's ``VisionTransformer`` of the demo's sizes with no class token,
  average-pooled (``--arch timm-gap``) or with SigLIP's attention-pool head (``--arch
  timm-map``): the CLS-free families, scored by received attention;
- ``glyphs196``: the harder task at DeiT's token count (``ats_vit.glyphs``: a distorted digit
  among letters, 56 x 56 pixels in 4 x 4 patches, 196 tokens; 10,000 independent test images).
  A 6-layer, 64-wide ViT, 3 epochs of 32,000 images at batch 32: about 17 minutes on 2 CPU
  cores (3 steps/s); the loss stays near chance for ~500 steps, then falls. Dense accuracy
  82.4% on the 10,000 test images (the issue's window: 80-92%);

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

It ends by printing the `benchmarks/frontier.py` command for the checkpoints it trained, with
each one's own data.
"""

import argparse
from dataclasses import replace
from pathlib import Path

from torch.utils.data import Subset

from ats_vit.data import load_split
from ats_vit.models import ModelConfig
from ats_vit.train import TrainConfig, train

# small enough to learn on 2 CPU cores (about 0.5 s a step at batch 32); the loss stays near
# chance for ~500 steps, then falls
GLYPHS = ModelConfig(
    image_size=56,
    patch_size=4,
    num_classes=10,
    channels=1,
    dim=64,
    depth=6,
    heads=4,
    dim_head=16,
    mlp_dim=128,
)
RECIPES = {
    "demo": ("demo", TrainConfig()),
    "timm": ("demo", TrainConfig(model=ModelConfig(arch="timm"))),
    "gap": ("demo", TrainConfig(model=ModelConfig(arch="timm-gap"))),
    "map": ("demo", TrainConfig(model=ModelConfig(arch="timm-map"))),
    "p6": (
        "demo",
        TrainConfig(
            model=ModelConfig(patch_size=6, depth=6, dim=128, heads=4, dim_head=32, mlp_dim=256),
            epochs=12,
            lr=1.5e-3,
        ),
    ),
    "glyphs196": ("glyphs", TrainConfig(model=GLYPHS, epochs=3, batch_size=32, lr=1e-3, warmup_steps=100)),
}
# the seeds reported (docs/results.md) and the seeds every choice is made on, never reported
REPORTED_SEEDS = {name: (1, 2, 3) if name == "glyphs196" else (1, 2, 3, 4, 5) for name in RECIPES}
HELD_OUT_SEEDS = (100, 101)


def checkpoint_name(recipe: str, seed: int) -> str:
    """``demo`` for seed 0, ``demo-s3`` for seed 3: what `bench frontier` pools by."""
    return recipe if seed == 0 else f"{recipe}-s{seed}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="runs/frontier", help="one sub-folder per checkpoint")
    parser.add_argument("--only", nargs="+", choices=sorted(RECIPES), help="train only these")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", type=int, nargs="+", help="these seeds (default: the reported ones)")
    seeds.add_argument("--held-out", action="store_true", help=f"the selection seeds {HELD_OUT_SEEDS}")
    parser.add_argument("--epochs", type=int, help="override every recipe's epochs (smoke tests)")
    parser.add_argument("--train-images", type=int, help="train on the first N images only (smoke tests)")
    parser.add_argument("--resume", action="store_true", help="continue runs in OUT")
    parser.add_argument("--overwrite", action="store_true", help="replace runs already in OUT")
    args = parser.parse_args()
    if args.seeds and min(args.seeds) < 0:
        parser.error(f"--seeds must be non-negative integers, got {args.seeds}")
    trained, data_specs = [], []
    for recipe in args.only or RECIPES:
        spec, base = RECIPES[recipe]
        for seed in args.seeds or (HELD_OUT_SEEDS if args.held_out else REPORTED_SEEDS[recipe]):
            name, data_spec = checkpoint_name(recipe, seed), f"{spec}@{seed}"
            data = load_split(data_spec, "train", base.model.image_size, channels=base.model.channels)
            if args.train_images:
                data = Subset(data, range(args.train_images))
            cfg = replace(base, out_dir=str(Path(args.out) / name), seed=seed)
            if args.epochs:
                cfg = replace(cfg, epochs=args.epochs, warmup_steps=min(cfg.warmup_steps, 1))
            path = train(cfg, data, resume=args.resume, overwrite=args.overwrite)
            print(f"{name}: {path}")
            trained.append(str(path))
            data_specs.append(data_spec)
    print("frontier: python benchmarks/frontier.py " + " ".join(trained) + " --data " + " ".join(data_specs))


if __name__ == "__main__":
    main()
