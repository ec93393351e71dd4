"""Accuracy vs GFLOPs without fine-tuning: ATS (both samplers) against top-k and random selection
at matched GFLOPs, on a checkpoint of `ats-vit train` (e.g. the demo's).

The same as `ats-vit bench peers` (see `--help`); the code lives in `ats_vit.bench`.

    python benchmarks/peers.py runs/demo/final.safetensors --json peers.json --plot peers.png
"""

import sys

from ats_vit.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", "peers", *sys.argv[1:]]))
