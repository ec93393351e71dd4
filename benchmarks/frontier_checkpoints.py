"""Train the checkpoints that `ats-vit bench frontier` is reported on (benchmarks/README.md).

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
  **Not yet a usable checkpoint**: on 2 CPU cores this recipe runs at about 1.5 s a step
  (about 65 minutes for its 2,500 steps), and a first run still had a training loss of 1.89
  (chance: 2.30) at step 1,180, when it was stopped. It needs a GPU, or a recipe that learns
  faster (benchmarks/README.md).

    python benchmarks/frontier_checkpoints.py runs/frontier                    # all of them
    python benchmarks/frontier_checkpoints.py runs/frontier --only gap map     # about 3 min each, 2 CPU cores
"""

import argparse
from dataclasses import replace
from pathlib import Path

from torch.utils.data import Subset

from ats_vit.data import load_split
from ats_vit.models import ModelConfig
from ats_vit.train import TrainConfig, train

GLYPHS = ModelConfig(image_size=56, patch_size=4, num_classes=10, channels=1, dim=96, depth=8, mlp_dim=192)
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
    "glyphs196": ("glyphs", TrainConfig(model=GLYPHS, epochs=5, batch_size=64, lr=1.5e-3, warmup_steps=200)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="runs/frontier", help="one sub-folder per checkpoint")
    parser.add_argument("--only", nargs="+", choices=sorted(RECIPES), help="train only these")
    parser.add_argument("--epochs", type=int, help="override every recipe's epochs (smoke tests)")
    parser.add_argument("--train-images", type=int, help="train on the first N images only (smoke tests)")
    parser.add_argument("--resume", action="store_true", help="continue runs in OUT")
    parser.add_argument("--overwrite", action="store_true", help="replace runs already in OUT")
    args = parser.parse_args()
    for name in args.only or RECIPES:
        spec, cfg = RECIPES[name]
        data = load_split(spec, "train", cfg.model.image_size, channels=cfg.model.channels)
        if args.train_images:
            data = Subset(data, range(args.train_images))
        cfg = replace(cfg, out_dir=str(Path(args.out) / name))
        if args.epochs:
            cfg = replace(cfg, epochs=args.epochs, warmup_steps=min(cfg.warmup_steps, 1))
        print(f"{name}: {train(cfg, data, resume=args.resume, overwrite=args.overwrite)}")


if __name__ == "__main__":
    main()
