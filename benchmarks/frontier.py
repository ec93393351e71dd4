"""Accuracy vs GFLOPs without fine-tuning: every method (auto, the paper's ATS, the authors',
ats-fuse, top-k, EViT, random, ToMe) calibrated to each GFLOP target on the calibration split,
then measured on the test split, per checkpoint.

The same as `ats-vit bench frontier` (see `--help`); the code lives in `ats_vit.bench`.

    python benchmarks/frontier_checkpoints.py runs/frontier          # the three checkpoints
    python benchmarks/frontier.py runs/frontier/*/final.safetensors --json frontier.json  # + frontier.png
"""

import sys

from ats_vit.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", "frontier", *sys.argv[1:]]))
