"""The ``ats-vit`` command line: demo, train, calibrate, eval, viz, bench."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from ats_vit import __version__
from ats_vit.bench import FAMILIES
from ats_vit.budget import METHODS, RECOMMENDED
from ats_vit.sampling import DROPPED, SAMPLERS

# ---------------------------------------------------------------- argument types


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def _fraction(what: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} in (0, 1], got {text!r}") from None
        if not 0.0 < value <= 1.0:
            raise argparse.ArgumentTypeError(f"expected {what} in (0, 1], got {value}")
        return value

    return parse


_keep_ratio = _fraction("a keep ratio")
_target = _fraction("a GFLOPs fraction of dense")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, but not the noise of 'default: None'."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, argparse.SUPPRESS) or action.help is None:
            return action.help or ""
        return super()._get_help_string(action)


# ---------------------------------------------------------------- models and data


def _add_model_source(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint", nargs="?", help="a checkpoint written by `ats-vit train` (.safetensors)"
    )
    group = parser.add_argument_group("or a pretrained model (instead of CHECKPOINT)")
    group.add_argument("--timm", metavar="NAME", help="a timm ViT by name, e.g. deit_small_patch16_224")
    group.add_argument("--pretrained", action="store_true", help="with --timm: timm's weights (a download)")
    group.add_argument(
        "--weights", metavar="FILE", help="with --timm: a local .safetensors or .pth state dict"
    )
    group.add_argument(
        "--img-size", type=_positive_int, help="with --timm: build the model at this image size"
    )
    group.add_argument(
        "--hf", metavar="NAME_OR_DIR", help="a Hugging Face ViT/DeiT classifier (hub name or local dir)"
    )


def _load(args: argparse.Namespace):
    """(Pretrained, our ModelConfig or None) from CHECKPOINT, --timm or --hf."""
    from ats_vit.checkpoint import load_model
    from ats_vit.models import Pretrained, hf_model, timm_model

    sources = [s for s in (args.checkpoint, args.timm, args.hf) if s]
    if len(sources) != 1:
        raise ValueError("give exactly one model: CHECKPOINT, --timm NAME or --hf NAME_OR_DIR")
    if (args.pretrained or args.weights or args.img_size) and not args.timm:
        raise ValueError("--pretrained, --weights and --img-size go with --timm")
    if args.timm:
        return timm_model(
            args.timm, pretrained=args.pretrained, weights=args.weights, img_size=args.img_size
        ), None
    if args.hf:
        return hf_model(args.hf), None
    model, cfg = load_model(args.checkpoint)
    return Pretrained(model.eval(), Path(args.checkpoint).name, cfg.image_size, cfg.channels), cfg


def _patch_size(model) -> int:
    from ats_vit.vit import ViT

    if isinstance(model, ViT):
        return model.patch_embed.patch_size[0]
    if hasattr(model, "patch_embed"):  # timm
        return model.patch_embed.patch_size[0]
    return model.config.patch_size  # Hugging Face


def _split(args: argparse.Namespace, loaded, split: str):
    """One split of --data for the loaded model (its own preprocessing for pretrained ones)."""
    from ats_vit.data import load_split

    if args.data == "demo" and (loaded.channels, loaded.image_size) != (1, 48):
        raise ValueError(
            f"the demo data (1 x 48 x 48 digits) does not fit {loaded.name} "
            f"({loaded.channels} x {loaded.image_size} x {loaded.image_size}); give --data ROOT, an "
            "ImageFolder with val/<class>/... (and train/<class>/... for calibration)"
        )
    skip = getattr(args, "skip_bad_images", False)
    return load_split(args.data, split, loaded.image_size, transform=loaded.transform, skip_bad=skip)


def _budgets(args: argparse.Namespace, model, cfg) -> list:
    """(label, Budget or None) rows of eval: dense, the budget a checkpoint was trained with,
    each --budget file, each --keep ratio."""
    from ats_vit.budget import Budget
    from ats_vit.evaluate import keep_budget

    rows = [("dense", None)]
    if cfg is not None and cfg.budget is not None:
        rows.append(("trained budget", Budget.from_dict(cfg.budget)))
    for path in args.budget or []:
        budget = Budget.load(path)
        target = f" @ {budget.target:g}" if budget.target is not None else ""
        rows.append((f"{Path(path).stem}{target}", budget))
    keeps = args.keep if args.keep is not None else ([] if len(rows) > 1 else [0.75, 0.5, 0.35, 0.25])
    for keep in keeps:
        if keep != 1.0:
            rows.append((f"keep {keep:g}", keep_budget(model, keep, args.start_layer, args.sampler)))
    return rows


def _describe(budget) -> str:
    if budget is None:
        return "dense"
    knob = "" if budget.temperature == 1.0 else f", temperature {budget.temperature:.3g}"
    kept = "" if budget.dropped == "discard" else f", dropped tokens {budget.dropped}d"
    caps = list(budget.max_tokens)
    return f"{budget.method or budget.sampler}: from layer {budget.start_layer}, caps {caps}{knob}{kept}"


def _print_eval(rows: list[dict]) -> None:
    print(
        f"{'budget':<22} {'accuracy':>9} {'GFLOPs':>9} {'vs dense':>8} {'kept (last)':>11} "
        f"{'img/s':>8} {'speed-up':>8}"
    )
    for r in rows:
        ratio = "" if math.isnan(r["gflops_ratio"]) else f"{r['gflops_ratio']:.0%}"
        speed = "" if math.isnan(r["img_per_s"]) else f"{r['img_per_s']:.1f}"
        up = "" if math.isnan(r["speedup"]) else f"{r['speedup']:.2f}x"
        print(
            f"{r['label']:<22} {100 * r['accuracy']:>8.2f}% {r['gflops']:>9.4f} {ratio:>8} "
            f"{r['kept_per_layer'][-1]:>11.1f} {speed:>8} {up:>8}"
        )


# ---------------------------------------------------------------- commands


def _train_budget(args: argparse.Namespace, cfg) -> dict | None:
    """The budget to train with: --budget FILE, or the paper's --keep R from --start-layer."""
    from ats_vit.budget import Budget

    if args.budget and args.keep is not None:
        raise ValueError("give --budget FILE or --keep RATIO, not both")
    if args.budget:
        budget = Budget.load(args.budget)
    elif args.keep is not None and args.keep < 1.0:
        if not 0 <= args.start_layer < cfg.depth:
            raise ValueError(f"--start-layer must be in [0, {cfg.depth}), got {args.start_layer}")
        cap = max(1, round(args.keep * cfg.num_patches))
        budget = Budget(args.start_layer, (cap,) * (cfg.depth - args.start_layer), method="paper")
    else:
        return None
    budget.schedule(cfg.depth, cfg.num_patches)  # refuses a budget made for another depth
    return budget.to_dict()


def _run_training(args: argparse.Namespace, cfg) -> int:
    from ats_vit.data import load_split
    from ats_vit.distributed import finish, is_lead
    from ats_vit.train import train

    train_data = load_split(args.data, "train", cfg.model.image_size)
    if is_lead():
        print(f"config: {json.dumps(asdict(cfg))}", file=sys.stderr)
    final = train(cfg, train_data, resume=args.resume)
    finish()
    if is_lead():
        print(f"checkpoint: {final}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from ats_vit.data import load_split
    from ats_vit.models import ModelConfig
    from ats_vit.train import TrainConfig

    if args.data == "demo":
        model = ModelConfig(arch=args.arch)
    else:
        # an ImageFolder: RGB at the requested size, one class per sub-folder
        classes = load_split(args.data, "train", args.image_size).classes
        model = ModelConfig(
            arch=args.arch,
            image_size=args.image_size,
            patch_size=args.patch_size,
            channels=3,
            num_classes=len(classes),
        )
    model = replace(model, budget=_train_budget(args, model))
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
    return _run_training(args, cfg)


def cmd_finetune(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from ats_vit.checkpoint import load_checkpoint
    from ats_vit.train import TrainConfig

    model, _, _, _ = load_checkpoint(args.checkpoint)
    budget = _train_budget(args, model)
    if budget is None:
        raise ValueError("fine-tuning needs a budget: --budget FILE or --keep RATIO below 1")
    cfg = TrainConfig(
        model=replace(model, budget=budget),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        seed=args.seed,
        ckpt_every=args.ckpt_every,
        amp=not args.no_amp,
        out_dir=args.out,
        init_from=str(args.checkpoint),
    )
    return _run_training(args, cfg)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from ats_vit.budget import Calibration
    from ats_vit.data import take

    targets = args.target
    if len(targets) > 1 and "{target}" not in args.out:
        raise ValueError(f"several targets need an --out with a {{target}} placeholder, got {args.out!r}")
    loaded, _ = _load(args)
    images, labels = take(_split(args, loaded, "calib"), args.images, args.seed)
    search = Calibration(
        loaded.model,
        images,
        None if args.no_labels else labels,
        method=args.method,
        start_layers=args.start_layers,
        batch_size=args.batch_size,
    )
    objective = search.objective
    print(f"calibrating {args.method} on {len(images)} images of the calibration split ({objective})")
    print(f"{'target':>6} {'GFLOPs':>7} {objective:>9} {'budget'}")
    for target in targets:
        budget = search(target)
        path = budget.save(args.out.format(target=f"{target:g}"))
        cal = budget.calibration
        print(f"{target:>6.2f} {cal['gflops_ratio']:>7.3f} {100 * cal[objective]:>8.2f}% {_describe(budget)}")
        print(f"{'':>6} wrote {path}")
    print(f"dense {objective} on these images: {100 * search.dense_score:.2f}%")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ats_vit.distributed import finish, init_distributed, is_lead
    from ats_vit.evaluate import evaluate_budgets

    device = init_distributed()
    loaded, cfg = _load(args)
    model = loaded.model.to(device)
    data = _split(args, loaded, "test")
    budgets = _budgets(args, model, cfg)
    rows = evaluate_budgets(
        model,
        data,
        budgets,
        batch_size=args.batch_size,
        workers=args.workers,
        timing_repeats=args.timing_repeats,
        timing_batch=args.timing_batch,
    )
    finish()
    if not is_lead():
        return 0
    trained = "" if cfg is None or cfg.budget is None else " (trained with a budget)"
    print(f"{loaded.name}{trained} on {rows[0]['images']} images:")
    _print_eval(rows)
    if rows[0]["skipped"]:
        print(f"skipped {rows[0]['skipped']} unreadable images (--skip-bad-images)")
    if not math.isnan(rows[0]["img_per_s"]):
        print(f"img/s: median of {args.timing_repeats} interleaved passes over {args.timing_batch} images")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = dict(model=loaded.name, data=args.data, rows=rows)
    (out / "eval.json").write_text(json.dumps(record, indent=2))
    from ats_vit.viz import plot_accuracy_vs_gflops

    plot_accuracy_vs_gflops(rows, out / "accuracy_vs_gflops.png", title=f"{loaded.name}{trained}")
    print(f"wrote {out / 'eval.json'} and {out / 'accuracy_vs_gflops.png'}")
    return 0


def cmd_viz(args: argparse.Namespace) -> int:
    import torch

    from ats_vit.budget import Budget
    from ats_vit.data import take
    from ats_vit.evaluate import keep_budget
    from ats_vit.models import forward_traced
    from ats_vit.viz import save_kept_tokens_grid

    loaded, _ = _load(args)
    model = loaded.model
    budget = Budget.load(args.budget) if args.budget else keep_budget(model, args.keep, args.start_layer)
    if budget is None:
        raise ValueError("a dense model keeps every token: give --budget FILE or --keep below 1")
    budget.apply(model)
    images, _ = take(_split(args, loaded, "test"), args.images)
    with torch.inference_mode():
        _, trace, _ = forward_traced(model.eval(), images)
    title = f"{loaded.name}, {_describe(budget)}"
    path = save_kept_tokens_grid(images, trace, _patch_size(model), args.output, title=title)
    print(f"wrote {path}")
    return 0


def _run_bench(run, cfg, columns, json_path: str | None, device: str = "cpu") -> list[dict]:
    """Print the config and machine, run the benchmark, print its table and write its JSON."""
    from ats_vit.bench import machine, print_table, write_json

    print(f"config: {json.dumps(asdict(cfg))}\nmachine: {json.dumps(machine(device))}")
    rows = run(cfg)
    print_table(rows, columns)
    write_json(json_path, cfg, rows, device)
    return rows


def cmd_bench_speed(args: argparse.Namespace) -> int:
    import torch

    from ats_vit.bench import SPEED_COLUMNS, SpeedConfig, speed

    cfg = SpeedConfig(
        model=args.model,
        img_size=args.img_size,
        pretrained=args.pretrained,
        start_layer=args.start_layer,
        max_tokens=args.max_tokens,
        samplers=tuple(args.samplers),
        dropped=tuple(args.dropped),
        families=tuple(args.families),
        batch_sizes=tuple(args.batch_sizes),
        warmup=args.warmup,
        repeats=args.repeats,
        min_seconds=args.min_seconds,
        seed=args.seed,
        device=args.device,
        threads=args.threads or torch.get_num_threads(),
        static=args.static,
        compile=args.compile,
        dtype=args.dtype,
    )
    _run_bench(speed, cfg, SPEED_COLUMNS, args.json, cfg.device)
    return 0


def cmd_bench_frontier(args: argparse.Namespace) -> int:
    from ats_vit.bench import FRONTIER_COLUMNS, FrontierConfig, frontier
    from ats_vit.viz import plot_frontier

    cfg = FrontierConfig(
        checkpoints=tuple(args.checkpoints),
        data=args.data,
        methods=tuple(args.methods),
        targets=tuple(args.targets),
        calib_images=args.calib_images,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    rows = _run_bench(frontier, cfg, FRONTIER_COLUMNS, args.json)
    print("±: 95% interval from the test-split size; settings were chosen on the calibration split")
    if args.plot:
        print(f"wrote {plot_frontier(rows, args.plot)}")
    return 0


def cmd_bench_train(args: argparse.Namespace) -> int:
    from ats_vit.bench import (
        TRAIN_SPEED_COLUMNS,
        TrainSpeedConfig,
        train_speed,
    )

    cfg = TrainSpeedConfig(
        checkpoint=args.checkpoint,
        budgets=tuple(args.budget),
        batch_size=args.batch_size,
        repeats=args.repeats,
        min_seconds=args.min_seconds,
    )
    _run_bench(train_speed, cfg, TRAIN_SPEED_COLUMNS, args.json)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """train -> calibrate -> eval -> viz on the bundled demo task."""
    out = Path(args.out)
    ckpt = str(out / "final.safetensors")
    budget = str(out / "budget-{target}.json")
    targets = [f"{t:g}" for t in args.targets]
    steps = [
        ["train", "--out", str(out), "--epochs", str(args.epochs), "--seed", str(args.seed)]
        + (["--resume"] if args.resume else []),
        ["calibrate", ckpt, "--target", *targets, "--out", budget],
        ["eval", ckpt, "--out", str(out), "--keep", "0.5", "--budget"]
        + [budget.format(target=t) for t in targets],
        ["viz", ckpt, "--budget", budget.format(target=targets[0]), "--output", str(out / "kept_tokens.png")],
    ]
    parser = build_parser()
    for argv in steps:
        print(f"\n$ ats-vit {' '.join(argv)}", flush=True)
        step = parser.parse_args(argv)
        step.fn(step)
    outputs = (
        "final.safetensors, metrics.csv, budget-*.json, eval.json, accuracy_vs_gflops.png, kept_tokens.png"
    )
    print(f"\noutputs in {out}/: {outputs}")
    return 0


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ats-vit",
        description="Adaptive Token Sampling for Vision Transformers.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, formatter_class=_Formatter)

    demo = command(
        "demo", "train on the bundled demo task, calibrate budgets, evaluate them and draw the kept tokens"
    )
    demo.add_argument("--out", default="runs/demo", help="output folder")
    demo.add_argument("--epochs", type=_positive_int, default=10, help="training epochs")
    demo.add_argument("--seed", type=int, default=0, help="training seed")
    demo.add_argument(
        "--targets", type=_target, nargs="+", default=[0.5, 0.7], help="GFLOPs fractions to calibrate"
    )
    demo.add_argument("--resume", action="store_true", help="continue training from OUT/last.safetensors")
    demo.set_defaults(fn=cmd_demo)

    def training_options(p: argparse.ArgumentParser, epochs: int, lr: float, out: str) -> None:
        p.add_argument("--data", default="demo", help="'demo' or an ImageFolder root with train/<class>/...")
        p.add_argument("--out", default=out, help="output folder (checkpoints, metrics.csv)")
        p.add_argument("--epochs", type=_positive_int, default=epochs, help="training epochs")
        p.add_argument("--budget", metavar="FILE", help="train with this budget active (`ats-vit calibrate`)")
        p.add_argument("--keep", type=_keep_ratio, help="or with the paper's budget: this keep ratio ...")
        p.add_argument("--start-layer", type=int, default=3, help="... from this layer on")
        p.add_argument("--batch-size", type=_positive_int, default=64, help="per process")
        p.add_argument("--lr", type=float, default=lr, help="peak learning rate (AdamW, cosine)")
        p.add_argument("--seed", type=int, default=0, help="initialisation and data order")
        p.add_argument("--ckpt-every", type=_positive_int, default=200, help="steps between checkpoints")
        p.add_argument("--no-amp", action="store_true", help="train in float32 on GPUs too")
        p.add_argument("--resume", action="store_true", help="continue from OUT/last.safetensors")

    train = command("train", "train a ViT, dense or with a budget active (single process or torchrun)")
    training_options(train, epochs=10, lr=2e-3, out="runs/train")
    train.add_argument(
        "--arch",
        choices=["ats_vit", "timm"],
        default="ats_vit",
        help="ats_vit.ViT or timm's VisionTransformer",
    )
    train.add_argument("--image-size", type=_positive_int, default=224, help="for --data FOLDER (demo: 48)")
    train.add_argument("--patch-size", type=_positive_int, default=16, help="for --data FOLDER (demo: 8)")
    train.set_defaults(fn=cmd_train)

    ft = command("finetune", "fine-tune a checkpoint with a budget active (single process or torchrun)")
    ft.add_argument("checkpoint", help="a checkpoint of `ats-vit train` (.safetensors)")
    training_options(ft, epochs=3, lr=5e-4, out="runs/finetune")
    ft.add_argument("--warmup-steps", type=_count, default=20, help="linear warm-up steps")
    ft.set_defaults(fn=cmd_finetune)

    cal = command("calibrate", "choose the budget that costs a GFLOPs target with the best accuracy")
    _add_model_source(cal)
    cal.add_argument("--target", type=_target, nargs="+", required=True, help="GFLOPs as a fraction of dense")
    cal.add_argument(
        "--method", choices=("auto", *METHODS), default=RECOMMENDED, help="how tokens are selected"
    )
    cal.add_argument("--data", default="demo", help="'demo' (its val split) or an ImageFolder root (train/)")
    cal.add_argument("--images", type=_positive_int, default=512, help="calibration images")
    cal.add_argument(
        "--no-labels", action="store_true", help="maximise agreement with the dense top-1 instead"
    )
    cal.add_argument(
        "--start-layers", type=int, nargs="+", help="layers where selection may start (default: all)"
    )
    cal.add_argument("--batch-size", type=_positive_int, default=256, help="images per forward pass")
    cal.add_argument("--seed", type=int, default=0, help="which calibration images")
    cal.add_argument("--out", default="budget.json", help="budget file; with several targets use {target}")
    cal.set_defaults(fn=cmd_calibrate)

    ev = command("eval", "accuracy / GFLOPs / throughput at several budgets (torchrun: split across ranks)")
    _add_model_source(ev)
    ev.add_argument("--data", default="demo", help="'demo' (its test split) or an ImageFolder root (val/)")
    ev.add_argument("--budget", nargs="+", metavar="FILE", help="budget files from `ats-vit calibrate`")
    ev.add_argument(
        "--keep",
        type=_keep_ratio,
        nargs="+",
        help="the paper's budgets: patch tokens per layer as a fraction of all patches "
        "(default without --budget: 0.75 0.5 0.35 0.25)",
    )
    ev.add_argument("--start-layer", type=int, default=3, help="first layer that samples, for --keep")
    ev.add_argument("--sampler", choices=SAMPLERS, default="inverse_transform", help="for --keep")
    ev.add_argument("--batch-size", type=_positive_int, default=256, help="images per forward pass")
    ev.add_argument("--workers", type=_count, default=0, help="data loading processes")
    ev.add_argument("--timing-repeats", type=_count, default=5, help="timed passes per budget (0: no timing)")
    ev.add_argument("--timing-batch", type=_positive_int, default=64, help="images per timed pass")
    ev.add_argument("--skip-bad-images", action="store_true", help="leave unreadable images out (counted)")
    ev.add_argument("--out", default="runs/eval", help="folder for eval.json and accuracy_vs_gflops.png")
    ev.set_defaults(fn=cmd_eval)

    viz = command("viz", "PNG grid of the patches each sampling layer kept")
    _add_model_source(viz)
    viz.add_argument("--data", default="demo", help="'demo' (its test split) or an ImageFolder root (val/)")
    viz.add_argument("--budget", metavar="FILE", help="a budget file from `ats-vit calibrate`")
    viz.add_argument(
        "--keep", type=_keep_ratio, default=0.75, help="without --budget: the paper's keep ratio"
    )
    viz.add_argument("--start-layer", type=int, default=3, help="without --budget: first layer that samples")
    viz.add_argument("--images", type=_positive_int, default=6, help="images (rows) to draw")
    viz.add_argument("--output", default="runs/kept_tokens.png", help="PNG path")
    viz.set_defaults(fn=cmd_viz)

    bench = command("bench", "benchmarks: speed vs the FLOP ideal; accuracy vs GFLOPs of every method")
    kinds = bench.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    sp = kinds.add_parser(
        "speed",
        help="throughput, peak memory and efficiency: timm dense vs ATS, ats_vit.ViT, the seed",
        formatter_class=_Formatter,
    )
    sp.add_argument("--model", default="deit_small_patch16_224", help="a timm ViT name (sets all sizes)")
    sp.add_argument("--img-size", type=_positive_int, default=None, help="image size (default: the model's)")
    sp.add_argument("--pretrained", action="store_true", help="timm weights (needs a download)")
    sp.add_argument("--start-layer", type=int, default=3, help="first layer that samples (0-based)")
    sp.add_argument("--max-tokens", type=_positive_int, default=108, help="patch tokens kept per layer")
    sp.add_argument("--samplers", nargs="+", choices=SAMPLERS, default=["inverse_transform", "gumbel"])
    sp.add_argument("--dropped", nargs="+", choices=DROPPED, default=["discard"], help="with each sampler")
    sp.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    sp.add_argument("--batch-sizes", type=_positive_int, nargs="+", default=[1, 16, 64])
    sp.add_argument("--warmup", type=int, default=1, help="untimed calls per variant")
    sp.add_argument("--repeats", type=_positive_int, default=5, help="timed calls per variant, at least")
    sp.add_argument(
        "--min-seconds", type=float, default=3.0, help="repeat until each variant ran this long in all"
    )
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    sp.add_argument("--threads", type=_positive_int, default=None, help="CPU threads (default: torch's)")
    sp.add_argument("--static", action="store_true", help="also ATS with static_shape=True (no host sync)")
    sp.add_argument("--compile", action="store_true", help="also torch.compile'd timm and our models")
    sp.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="bfloat16: autocast")
    sp.add_argument("--json", help="also write config, machine and rows here")
    sp.set_defaults(fn=cmd_bench_speed)

    fr = kinds.add_parser(
        "frontier",
        help="accuracy vs GFLOPs: every method calibrated to each target, measured on the test split",
        formatter_class=_Formatter,
    )
    fr.add_argument("checkpoints", nargs="+", help="checkpoints of `ats-vit train`")
    fr.add_argument("--data", default="demo", help="'demo' or an ImageFolder root")
    fr.add_argument("--methods", nargs="+", choices=("auto", *METHODS), default=["auto", *METHODS])
    fr.add_argument("--targets", type=_target, nargs="+", default=[0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    fr.add_argument(
        "--calib-images", type=_positive_int, help="calibration images (default: the whole split)"
    )
    fr.add_argument("--batch-size", type=_positive_int, default=256)
    fr.add_argument("--seed", type=int, default=0)
    fr.add_argument("--json", help="also write config, machine and rows here")
    fr.add_argument("--plot", default="runs/bench/frontier.png", help="accuracy-vs-GFLOPs PNG ('' for none)")
    fr.set_defaults(fn=cmd_bench_frontier)

    tr = kinds.add_parser(
        "train",
        help="training steps per second: dense against budgets, on a demo checkpoint",
        formatter_class=_Formatter,
    )
    tr.add_argument("checkpoint", help="a checkpoint of `ats-vit train` on the demo data")
    tr.add_argument("--budget", nargs="+", required=True, metavar="FILE", help="budget files to train with")
    tr.add_argument("--batch-size", type=_positive_int, default=64)
    tr.add_argument("--repeats", type=_positive_int, default=10, help="timed steps per variant, at least")
    tr.add_argument("--min-seconds", type=float, default=5.0, help="repeat until each variant ran this long")
    tr.add_argument("--json", help="also write config, machine and rows here")
    tr.set_defaults(fn=cmd_bench_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from ats_vit.checkpoint import CheckpointError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.fn(args)
    except (CheckpointError, ValueError, TypeError, ImportError) as exc:
        print(f"ats-vit {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
