"""Train the three checkpoints that `ats-vit bench frontier` is reported on (benchmarks/README.md).

Three recipes on the demo data, all dense (ATS is applied afterwards, without fine-tuning):

- ``demo``: the demo's own model and recipe (`ats-vit demo` trains the same);
- ``timm``: timm's ``VisionTransformer`` of the same sizes (``--arch timm``);
- ``p6``: a shallower, wider ViT on a finer grid (6x6-pixel patches: 64 tokens, which no
  longer line up with where the digits sit; depth 6, dim 128), trained longer at a lower rate.

    python benchmarks/frontier_checkpoints.py runs/frontier      # about 12 minutes on 2 CPU cores
"""

import argparse
from dataclasses import replace
from pathlib import Path

from torch.utils.data import Subset

from ats_vit.data import load_split
from ats_vit.models import ModelConfig
from ats_vit.train import TrainConfig, train

RECIPES = {
    "demo": TrainConfig(),
    "timm": TrainConfig(model=ModelConfig(arch="timm")),
    "p6": TrainConfig(
        model=ModelConfig(patch_size=6, depth=6, dim=128, heads=4, dim_head=32, mlp_dim=256),
        epochs=12,
        lr=1.5e-3,
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="runs/frontier", help="one sub-folder per checkpoint")
    parser.add_argument("--only", nargs="+", choices=sorted(RECIPES), help="train only these")
    parser.add_argument("--epochs", type=int, help="override every recipe's epochs (smoke tests)")
    parser.add_argument("--train-images", type=int, help="train on the first N images only (smoke tests)")
    parser.add_argument("--overwrite", action="store_true", help="replace runs already in OUT")
    args = parser.parse_args()
    data = load_split("demo", "train", 48)
    if args.train_images:
        data = Subset(data, range(args.train_images))
    for name in args.only or RECIPES:
        cfg = replace(RECIPES[name], out_dir=str(Path(args.out) / name))
        if args.epochs:
            cfg = replace(cfg, epochs=args.epochs, warmup_steps=min(cfg.warmup_steps, 1))
        print(f"{name}: {train(cfg, data, overwrite=args.overwrite)}")


if __name__ == "__main__":
    main()
