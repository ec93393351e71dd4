"""The ImageNet reproduction: a pretrained timm ViT, dense against ToMe, PiToMe, DCT, the paper's ATS
setting, the authors' ATS (`official`) and `auto`, at fixed GFLOP fractions and in time, with
the published numbers beside.

    python benchmarks/imagenet.py --data /data/imagenet --model deit_small_patch16_224 \\
        --device cuda --json imagenet_deit_s.json
    torchrun --nproc-per-node 8 benchmarks/imagenet.py --data /data/imagenet ...   # several GPUs

``--data`` is an ImageFolder root: budgets are calibrated on ``--calib-images`` images of
``train/`` (never on the reported ones) and every row is measured on all of ``val/`` (50,000
images, one class folder each, as ``torchvision``'s ImageNet layout or the ATS repository's
``utils/valdirs.sh`` leaves them). Rows:

- ``dense``; ``tome r=8``, ``tome r=13``: ToMe's constant schedules (``Budget.tome``);
- ``paper``: the ATS paper's DeiT-S setting as ats-vit states it (``Budget.paper(0.55, 3)``);
- ``official``, ``pitome``, ``dct`` and ``auto`` calibrated to each ``--targets`` fraction of
  the dense GFLOPs;
- ``auto time T``: ``auto`` calibrated to T of the dense *time* at ``--timing-batch`` images on
  ``--device`` (one process only: under torchrun the time rows are left out).

Each row has its accuracy with a 95% interval over the images, the exact paired test against
dense, GFLOPs, and its speed-up over dense (one interleaved run, ``--timing-repeats`` rounds, on
``--device``; not under torchrun). ``published`` gives the number its authors state for the same
model and setting, with the source, where one is known (:data:`PUBLISHED`); the rest are blank.

Nothing here was run on ImageNet by the ats-vit developers (no copy was available); the script
is tested end to end on a small fake ImageNet folder with random weights
(``tests/test_benchmarks.py``), with ``--random-weights``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ats_vit._io import write_text_atomic
from ats_vit.bench.common import machine
from ats_vit.budget import Budget, BudgetError
from ats_vit.calibrate import Calibration
from ats_vit.data import load_split, take
from ats_vit.distributed import finish, init_distributed, is_lead, rank_world
from ats_vit.evaluate import evaluate_budgets
from ats_vit.sources import timm_source

# (timm model, row) -> (top-1 %, GFLOPs, source). Only numbers whose source states the model,
# the setting and whether it was trained are listed; blank cells mean "no such source known".
PUBLISHED: dict[tuple[str, str], tuple[float, float | None, str]] = {
    ("vit_small_patch16_224", "dense"): (
        81.41,
        None,
        "ToMe README (facebookresearch/ToMe), timm ViT-S/16, off-the-shelf, ImageNet-1k val",
    ),
    ("vit_small_patch16_224", "tome r=13"): (
        79.30,
        None,
        "ToMe README (facebookresearch/ToMe), timm ViT-S/16, off-the-shelf, ImageNet-1k val",
    ),
}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="ImageFolder root with train/<class>/ and val/<class>/")
    parser.add_argument("--model", default="deit_small_patch16_224", help="a timm ViT name")
    parser.add_argument("--img-size", type=int, help="input side (default: the model's own)")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--weights", help="a local weights file instead of timm's download")
    weights.add_argument("--random-weights", action="store_true", help="untrained (tests only)")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.6, 0.7, 0.8], help="GFLOP fractions")
    parser.add_argument(
        "--time-targets", type=float, nargs="*", default=[0.6, 0.7, 0.8], help="fractions of dense time"
    )
    parser.add_argument("--calib-images", type=int, default=1024, help="train/ images to calibrate on")
    parser.add_argument("--val-images", type=int, help="evaluate on this many val/ images (default: all)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    parser.add_argument("--workers", type=int, default=8, help="data loading processes")
    parser.add_argument("--timing-batch", type=int, default=64, help="images per timed forward pass")
    parser.add_argument("--timing-repeats", type=int, default=20, help="interleaved timed rounds (0: none)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: torchrun's, else cuda if any)")
    parser.add_argument("--seed", type=int, default=0, help="which calibration images")
    parser.add_argument("--json", required=True, help="where the rows go (refuses an existing file)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json")
    args = parser.parse_args(argv)
    bad = [t for t in [*args.targets, *args.time_targets] if not 0.0 < t < 1.0]
    if bad:
        parser.error(f"--targets and --time-targets are fractions in (0, 1), got {bad}")
    for name in ("calib_images", "batch_size", "timing_batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.val_images is not None and args.val_images < 1:
        parser.error(f"--val-images must be >= 1, got {args.val_images}")
    if Path(args.json).exists() and not args.overwrite:
        parser.error(f"{args.json} already exists; pass --overwrite to replace it, or choose another --json")
    if not (Path(args.data) / "train").is_dir() or not (Path(args.data) / "val").is_dir():
        parser.error(f"--data {args.data!r} must hold train/<class>/... and val/<class>/... (ImageFolder)")
    return args


Rows = list[tuple[str, Budget | None]]
LeftOut = list[dict[str, str]]


def budgets_for(args: argparse.Namespace, model: torch.nn.Module, calib: Any) -> tuple[Rows, LeftOut]:
    """The rows' budgets, calibrated on this process (rank 0 under torchrun), and the targets
    that could not be calibrated, with the reason (written to the JSON)."""
    depth, patches = len(model.blocks), model.patch_embed.num_patches
    rows: Rows = [
        ("dense", None),
        ("tome r=8", Budget.tome(8, depth, patches)),
        ("tome r=13", Budget.tome(13, depth, patches)),
        ("paper", Budget.paper(0.55, 3, depth, patches)),
    ]
    images, labels = calib
    search = Calibration(model, images, labels, batch_size=args.batch_size)
    wanted = [
        (f"{m} {t:g}", search, t, m) for m in ("official", "pitome", "dct", "auto") for t in args.targets
    ]
    if args.time_targets and rank_world()[1] == 1 and args.timing_repeats > 0:
        timed = Calibration(
            model, images, labels, cost="latency", timing_batch=args.timing_batch, batch_size=args.batch_size
        )
        wanted += [(f"auto time {t:g}", timed, t, "auto") for t in args.time_targets]
    left_out: LeftOut = []
    for label, calibration, target, method in wanted:
        try:
            rows.append((label, calibration(target, method)))
        except BudgetError as exc:  # e.g. a time the model cannot reach at this batch: said, not fatal
            print(f"{label}: left out ({exc})", file=sys.stderr)
            left_out.append(dict(label=label, reason=str(exc)))
    return rows, left_out


def shared_budgets(args: argparse.Namespace, model: torch.nn.Module, calib: Any) -> tuple[Rows, LeftOut]:
    """Rank 0 calibrates and every process gets its budgets (one process: calibrate here)."""
    if rank_world()[1] == 1:
        return budgets_for(args, model, calib)
    box: list[Any] = [None]
    if rank_world()[0] == 0:
        rows, left_out = budgets_for(args, model, calib)
        box[0] = ([(label, None if b is None else b.to_dict()) for label, b in rows], left_out)
    dist.broadcast_object_list(box, src=0)
    rows_raw, left_out = box[0]
    return [(label, None if b is None else Budget.from_dict(b)) for label, b in rows_raw], left_out


def table(record: dict[str, Any]) -> str:
    """The Markdown table of a run (the same text docs/results.md would show)."""
    lines = [
        "| row | GFLOPs (ratio) | top-1 % | ± | vs dense (p) | speed-up | published top-1 (source) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        tested = r["label"] != "dense" and not math.isnan(r["vs_dense_p"])  # not tested under torchrun
        versus = f"{100 * r['vs_dense_diff']:+.2f} ({r['vs_dense_p']:.2g})" if tested else ""
        speed = (
            ""
            if math.isnan(r["speedup"])
            else f"{r['speedup']:.2f}x ({r['speedup_q1']:.2f}-{r['speedup_q3']:.2f})"
        )
        published = r.get("published")
        quoted = "" if published is None else f"{published['top1']:.2f} ({published['source']})"
        lines.append(
            f"| {r['label']} | {r['gflops']:.2f} ({r['gflops_ratio']:.2f}) | {100 * r['accuracy']:.2f} | "
            f"{100 * r['ci95']:.2f} | {versus} | {speed} | {quoted} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    joined = init_distributed()  # always: under torchrun --device must not split the ranks apart
    device = joined if args.device is None else torch.device(args.device)
    source = timm_source(
        args.model,
        pretrained=not (args.random_weights or args.weights),
        weights=args.weights,
        img_size=args.img_size,
    )
    model = source.model.to(device).eval()
    size = source.image_size
    calib = take(
        load_split(args.data, "calib", size, transform=source.transform), args.calib_images, args.seed
    )
    calib = (calib[0].to(device), calib[1].to(device))
    budgets, left_out = shared_budgets(args, model, calib)
    test = load_split(args.data, "test", size, transform=source.transform)
    if args.val_images is not None and args.val_images < len(test):
        test = torch.utils.data.Subset(test, range(args.val_images))
    rows = evaluate_budgets(
        model,
        test,
        budgets,
        batch_size=args.batch_size,
        workers=args.workers,
        timing_repeats=args.timing_repeats,
        timing_batch=args.timing_batch,
    )
    finish()
    if not is_lead():
        return 0
    name = args.model.split(".")[0]
    for row in rows:
        quoted = PUBLISHED.get((name, row["label"]))
        row["published"] = (
            None if quoted is None else dict(top1=quoted[0], gflops=quoted[1], source=quoted[2])
        )
    record = dict(
        config={k: v for k, v in vars(args).items() if k != "overwrite"},
        machine=machine(device),
        weights="random (a test run)" if args.random_weights else args.weights or "timm pretrained",
        rows=rows,
        left_out=left_out,
    )
    print(table(record))
    write_text_atomic(args.json, json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
