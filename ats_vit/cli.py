"""The ``ats-vit`` command line: demo, train, eval, viz, bench."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from ats_vit import __version__
from ats_vit.bench import FAMILIES
from ats_vit.sampling import SAMPLERS


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _keep_ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a keep ratio in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a keep ratio in (0, 1], got {value}")
    return value


def _datasets(spec: str, image_size: int):
    """(train, calibration, test): 'demo' -> the bundled cluttered digits (train, val, test);
    otherwise an ImageFolder root: train/ for training, its images without augmentation for
    calibration, val/ for evaluation."""
    from ats_vit.data import cluttered_digits, image_folder

    if spec == "demo":
        return cluttered_digits()
    root = Path(spec)
    return (
        image_folder(root / "train", image_size, train=True),
        image_folder(root / "train", image_size),
        image_folder(root / "val", image_size),
    )


def _print_rows(rows: list[dict]) -> None:
    start = rows[-1]["start_layer"]
    print(f"ATS budgets from layer {start} on, no fine-tuning ({rows[0]['sampler']} sampler):")
    print(f"{'budget':<12} {'accuracy':>8} {'GFLOPs':>8} {'vs dense':>8} {'kept (last)':>11} {'img/s':>8}")
    dense = rows[0]["gflops"]
    for r in rows:
        print(
            f"{r['label']:<12} {100 * r['accuracy']:>7.2f}% {r['gflops']:>8.4f} "
            f"{r['gflops'] / dense:>7.0%} {r['kept_per_layer'][-1]:>11.1f} {r['img_per_s']:>8.1f}"
        )


def cmd_train(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from ats_vit.train import ModelConfig, TrainConfig, train

    if args.data == "demo":
        model = ModelConfig(arch=args.arch)
        train_data, *_ = _datasets(args.data, model.image_size)
    else:
        # an ImageFolder: RGB at the requested size, one class per sub-folder
        train_data, *_ = _datasets(args.data, args.image_size)
        model = ModelConfig(
            arch=args.arch,
            image_size=args.image_size,
            patch_size=args.patch_size,
            channels=3,
            num_classes=len(train_data.classes),
        )
    cfg = TrainConfig(
        model=model,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        ckpt_every=args.ckpt_every,
        amp=not args.no_amp,
        out_dir=args.out,
    )
    lead = int(os.environ.get("RANK", "0")) == 0  # under torchrun, only rank 0 reports
    if lead:
        print(f"config: {json.dumps(asdict(cfg))}", file=sys.stderr)
    final = train(cfg, train_data, resume=args.resume)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    if lead:
        print(f"checkpoint: {final}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ats_vit.train import evaluate_budgets, load_checkpoint
    from ats_vit.viz import plot_accuracy_vs_gflops

    cfg, _, _, _ = load_checkpoint(args.checkpoint)
    *_, test_data = _datasets(args.data, cfg.image_size)
    rows = evaluate_budgets(
        args.checkpoint, test_data, tuple(args.keep), args.start_layer, args.sampler, args.batch_size
    )
    _print_rows(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(dict(checkpoint=str(args.checkpoint), rows=rows), indent=2))
    plot_accuracy_vs_gflops(rows, out / "accuracy_vs_gflops.png")
    print(f"wrote {out / 'eval.json'} and {out / 'accuracy_vs_gflops.png'}")
    return 0


def cmd_viz(args: argparse.Namespace) -> int:
    import torch

    from ats_vit.train import budget_schedule, forward_traced, load_checkpoint, load_model
    from ats_vit.viz import save_kept_tokens_grid

    cfg, _, _, _ = load_checkpoint(args.checkpoint)
    model, cfg = load_model(
        args.checkpoint, max_tokens_per_depth=budget_schedule(cfg, args.keep, args.start_layer)
    )
    *_, test_data = _datasets(args.data, cfg.image_size)
    images = torch.stack([test_data[i][0] for i in range(min(args.images, len(test_data)))])
    with torch.inference_mode():
        _, trace, _ = forward_traced(model.eval(), images)
    path = save_kept_tokens_grid(images, trace, cfg.patch_size, args.output)
    print(f"wrote {path}")
    return 0


def cmd_bench_speed(args: argparse.Namespace) -> int:
    import torch

    from ats_vit.bench import SPEED_COLUMNS, SpeedConfig, machine, print_table, speed, write_json

    cfg = SpeedConfig(
        model=args.model,
        img_size=args.img_size,
        pretrained=args.pretrained,
        start_layer=args.start_layer,
        max_tokens=args.max_tokens,
        samplers=tuple(args.samplers),
        families=tuple(args.families),
        batch_sizes=tuple(args.batch_sizes),
        warmup=args.warmup,
        repeats=args.repeats,
        min_seconds=args.min_seconds,
        seed=args.seed,
        device=args.device,
        threads=args.threads or torch.get_num_threads(),
    )
    print(f"config: {json.dumps(asdict(cfg))}\nmachine: {json.dumps(machine(cfg.device))}")
    rows = speed(cfg)
    print_table(rows, SPEED_COLUMNS)
    write_json(args.json, cfg, rows, cfg.device)
    return 0


def cmd_bench_peers(args: argparse.Namespace) -> int:
    from ats_vit.bench import PEERS_COLUMNS, PeersConfig, machine, peers, print_table, write_json
    from ats_vit.train import load_checkpoint
    from ats_vit.viz import plot_methods

    cfg = PeersConfig(
        checkpoint=args.checkpoint,
        data=args.data,
        keeps=tuple(args.keep),
        start_layer=args.start_layer,
        seeds=args.seeds,
        batch_size=args.batch_size,
    )
    print(f"config: {json.dumps(asdict(cfg))}\nmachine: {json.dumps(machine())}")
    model_cfg, _, _, _ = load_checkpoint(cfg.checkpoint)
    *_, test_data = _datasets(cfg.data, model_cfg.image_size)
    rows = peers(cfg, test_data)
    print_table(rows, PEERS_COLUMNS)
    write_json(args.json, cfg, rows)
    if args.plot:
        title = f"no fine-tuning, selection from layer {cfg.start_layer}"
        print(f"wrote {plot_methods(rows, args.plot, title)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """train -> eval -> viz on the bundled demo task, each with its own command's defaults."""
    out = Path(args.out)
    ckpt = str(out / "final.safetensors")
    steps = [
        ["train", "--out", str(out), "--epochs", str(args.epochs), "--seed", str(args.seed)]
        + (["--resume"] if args.resume else []),
        ["eval", ckpt, "--out", str(out)],
        ["viz", ckpt, "--output", str(out / "kept_tokens.png")],
    ]
    parser = build_parser()
    for argv in steps:
        step = parser.parse_args(argv)
        step.fn(step)
    outputs = "final.safetensors, metrics.csv, eval.json, accuracy_vs_gflops.png, kept_tokens.png"
    print(f"\noutputs in {out}/: {outputs}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ats-vit", description="Adaptive Token Sampling for Vision Transformers."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo", help="train on the bundled demo task, then eval and viz")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--epochs", type=_positive_int, default=15)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--resume", action="store_true", help="continue from OUT/last.safetensors")
    demo.set_defaults(fn=cmd_demo)

    train = sub.add_parser("train", help="train a dense ViT (single process or under torchrun)")
    train.add_argument("--data", default="demo", help="'demo' or an ImageFolder root with train/ and val/")
    train.add_argument("--out", default="runs/train")
    train.add_argument(
        "--arch",
        choices=["ats_vit", "timm"],
        default="ats_vit",
        help="ats_vit.ViT, or timm's VisionTransformer of the same sizes",
    )
    train.add_argument("--epochs", type=_positive_int, default=15)
    train.add_argument("--image-size", type=_positive_int, default=224, help="for --data FOLDER (demo: 48)")
    train.add_argument("--patch-size", type=_positive_int, default=16, help="for --data FOLDER (demo: 8)")
    train.add_argument("--batch-size", type=_positive_int, default=64)
    train.add_argument("--lr", type=float, default=2e-3)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--ckpt-every", type=_positive_int, default=200, help="steps between checkpoints")
    train.add_argument("--no-amp", action="store_true", help="train in float32")
    train.add_argument("--resume", action="store_true", help="continue from OUT/last.safetensors")
    train.set_defaults(fn=cmd_train)

    ev = sub.add_parser("eval", help="accuracy / GFLOPs / throughput at several ATS budgets")
    ev.add_argument("checkpoint")
    ev.add_argument("--data", default="demo")
    ev.add_argument(
        "--keep",
        type=_keep_ratio,
        nargs="+",
        default=[1.0, 0.75, 0.5, 0.35, 0.25],
        help="patch tokens kept per sampling layer, as a fraction of all patches",
    )
    ev.add_argument("--start-layer", type=int, default=3, help="first layer that samples (0-based)")
    ev.add_argument("--sampler", choices=SAMPLERS, default="inverse_transform")
    ev.add_argument("--batch-size", type=_positive_int, default=256)
    ev.add_argument("--out", default="runs/eval")
    ev.set_defaults(fn=cmd_eval)

    viz = sub.add_parser("viz", help="PNG grid of the patches each sampling layer kept")
    viz.add_argument("checkpoint")
    viz.add_argument("--data", default="demo")
    viz.add_argument("--keep", type=_keep_ratio, default=0.75)
    viz.add_argument("--start-layer", type=int, default=3)
    viz.add_argument("--images", type=_positive_int, default=6)
    viz.add_argument("--output", default="runs/kept_tokens.png")
    viz.set_defaults(fn=cmd_viz)

    bench = sub.add_parser("bench", help="benchmarks: speed vs the FLOP ideal; accuracy vs GFLOPs vs peers")
    kinds = bench.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    sp = kinds.add_parser(
        "speed",
        help="throughput, peak memory and efficiency: timm dense vs ATS, ats_vit.ViT, the seed",
    )
    sp.add_argument("--model", default="deit_small_patch16_224", help="a timm ViT name (sets all sizes)")
    sp.add_argument("--img-size", type=_positive_int, default=None)
    sp.add_argument("--pretrained", action="store_true", help="timm weights (needs a download)")
    sp.add_argument("--start-layer", type=int, default=3, help="first layer that samples (0-based)")
    sp.add_argument("--max-tokens", type=_positive_int, default=108, help="patch tokens kept per layer")
    sp.add_argument("--samplers", nargs="+", choices=SAMPLERS, default=["inverse_transform", "gumbel"])
    sp.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    sp.add_argument("--batch-sizes", type=_positive_int, nargs="+", default=[1, 16, 64])
    sp.add_argument("--warmup", type=int, default=1)
    sp.add_argument("--repeats", type=_positive_int, default=5, help="timed calls per variant, at least")
    sp.add_argument(
        "--min-seconds", type=float, default=3.0, help="repeat until each variant ran this long in all"
    )
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    sp.add_argument("--threads", type=_positive_int, default=None, help="CPU threads (default: torch's)")
    sp.add_argument("--json", help="also write config, machine and rows here")
    sp.set_defaults(fn=cmd_bench_speed)

    pe = kinds.add_parser("peers", help="accuracy vs GFLOPs: ATS against top-k and random at matched GFLOPs")
    pe.add_argument("checkpoint")
    pe.add_argument("--data", default="demo")
    pe.add_argument("--keep", type=_keep_ratio, nargs="+", default=[0.75, 0.5, 0.35, 0.25])
    pe.add_argument("--start-layer", type=int, default=3)
    pe.add_argument("--seeds", type=_positive_int, default=3, help="runs averaged for random samplers")
    pe.add_argument("--batch-size", type=_positive_int, default=256)
    pe.add_argument("--json", help="also write config, machine and rows here")
    pe.add_argument("--plot", default="runs/bench/peers.png", help="accuracy-vs-GFLOPs PNG ('' for none)")
    pe.set_defaults(fn=cmd_bench_peers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from ats_vit.train import CheckpointError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.fn(args)
    except (CheckpointError, ValueError, ImportError) as exc:
        print(f"ats-vit {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
