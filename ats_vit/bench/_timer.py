"""One timing process of :func:`ats_vit.bench.frontier.time_in_processes` (private): loads the
checkpoint and the images, times the budgets against dense in shuffled interleaved rounds,
and prints each budget's median speed-up over the first (dense) as one JSON line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from ats_vit.budget import Budget
from ats_vit.checkpoint import load_model
from ats_vit.evaluate import time_budgets
from ats_vit.timing import speedup


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    model, _ = load_model(spec["checkpoint"])
    model.eval()
    images = torch.load(spec["images"], weights_only=True)
    budgets = [None if b is None else Budget.from_dict(b) for b in spec["budgets"]]
    timings = time_budgets(model, budgets, images, repeats=spec["repeats"], shuffle=spec["shuffle"])
    print(json.dumps([speedup(timings[0], t).median for t in timings]))


if __name__ == "__main__":
    main(sys.argv[1])
