"""Speed against the FLOP ideal: timm dense vs ATS-patched, ats_vit.ViT, and vit-pytorch's ATS ViT.

The same as `ats-vit bench speed` (see `--help`); the code lives in `ats_vit.bench`.

    python benchmarks/speed.py --json speed.json                    # deit_small, batch 1, 16, 64
    python benchmarks/speed.py --batch-sizes 64 --repeats 9 --device cuda
"""

import sys

from ats_vit.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", "speed", *sys.argv[1:]]))
