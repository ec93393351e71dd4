"""The ``ats-vit`` command line: argument parsing and thin commands over the library.

Commands never write over what exists: a run folder that holds a run is refused unless
``--resume`` continues it or ``--overwrite`` replaces it, output files likewise, and a
checkpoint being fine-tuned is never an output. Errors a user can cause are one line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import string
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, NoReturn

from ats_vit import __version__
from ats_vit._io import write_text_atomic
from ats_vit.bench.speed import FAMILIES
from ats_vit.calibrate import METHOD_CHOICES, RECOMMENDED
from ats_vit.families import SUPPORTED
from ats_vit.options import SAMPLERS

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


def _fraction(what: str) -> Callable[[str], float]:
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
_target = _fraction("a fraction of the dense cost")


class _Renamed(argparse.Action):
    """An option's 0.x name, hidden from --help: sets the new option and says it is deprecated."""

    def __init__(self, option_strings: Sequence[str], dest: str, new: str, **kwargs: Any) -> None:
        self.new = new
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: Any = None
    ) -> None:
        print(
            f"warning: {option} is deprecated since ats-vit 1.0 and will be removed in 2.0; use {self.new}",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, values)


def _renamed(parser: argparse.ArgumentParser, old: str, new: str, **kwargs: Any) -> None:
    """Accept ``old`` (0.x's name) for the option ``new``, with a deprecation warning."""
    dest = new.lstrip("-").replace("-", "_")
    parser.add_argument(old, dest=dest, action=_Renamed, new=new, **kwargs)


class _Parser(argparse.ArgumentParser):
    """Bad arguments are one line (and where to read more), not the usage dump before it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults (0 included), but not the noise of 'default: None' or of flags."""

    def _get_help_string(self, action: argparse.Action) -> str:
        default = action.default
        if default is None or default is False or default is argparse.SUPPRESS or action.help is None:
            return action.help or ""
        return super()._get_help_string(action) or ""


# ---------------------------------------------------------------- outputs


def _writable(paths: Sequence[str | Path], overwrite: bool) -> None:
    """Refuse, before any work, to replace existing files unless ``--overwrite`` was given, and
    any output that is a folder (or lies in a path that is a file)."""
    for p in map(Path, paths):
        if p.is_dir():
            raise ValueError(f"{p} is a folder; --out must name a file there, e.g. {p / p.name}.json")
        if any(parent.is_file() for parent in p.parents):
            raise ValueError(
                f"cannot write {p}: {next(q for q in p.parents if q.is_file())} is a file, not a folder"
            )
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing and not overwrite:
        raise ValueError(
            f"{', '.join(existing)} already exist(s); pass --overwrite to replace, or choose --out"
        )


def _print_config(cfg: object) -> None:
    """The config of a run, one field per line (nested ones indented), on stderr."""

    def lines(value: dict[str, Any], indent: str) -> list[str]:
        out = []
        for key, item in value.items():
            if isinstance(item, dict) and item:
                out += [f"{indent}{key}:", *lines(item, indent + "  ")]
            else:
                out.append(f"{indent}{key}: {json.dumps(item)}")
        return out

    print("\n".join(["config:", *lines(asdict(cfg), "  ")]), file=sys.stderr)  # type: ignore[call-overload]


# ---------------------------------------------------------------- models and data


def _add_model_source(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint", nargs="?", help="a checkpoint written by `ats-vit train` (.safetensors)"
    )
    group = parser.add_argument_group("or a pretrained model (instead of CHECKPOINT)")
    group.add_argument(
        "--timm", metavar="NAME", help="a timm ViT, EVA or BEiT by name, e.g. deit_small_patch16_224"
    )
    group.add_argument("--pretrained", action="store_true", help="with --timm: timm's weights (a download)")
    group.add_argument(
        "--weights", metavar="FILE", help="with --timm: a local .safetensors or .pth state dict"
    )
    group.add_argument(
        "--img-size", type=_positive_int, help="with --timm: build the model at this image size"
    )
    group.add_argument(
        "--hf",
        metavar="NAME_OR_DIR",
        help="a Hugging Face ViT, DeiT, CLIP, SigLIP or DINOv2 (hub name or local dir): a classifier, "
        "or a feature tower (calibrated for the fidelity of its features; eval needs a classifier)",
    )


def _add_data(parser: argparse.ArgumentParser, split: str) -> None:
    folder = "train/" if split == "val" else "val/"
    parser.add_argument(
        "--data",
        default="demo",
        help=f"'demo' or 'glyphs' (its {split} split; NAME@SEED: another draw of it) or an ImageFolder "
        f"root ({folder}<class>/...)",
    )
    parser.add_argument(
        "--skip-bad-images", action="store_true", help="leave unreadable images out (counted)"
    )


def _load(args: argparse.Namespace) -> Any:
    """The :class:`ats_vit.sources.Source` of CHECKPOINT, --timm or --hf."""
    from ats_vit.sources import checkpoint_source, hf_source, timm_source

    sources = [s for s in (args.checkpoint, args.timm, args.hf) if s]
    if len(sources) != 1:
        raise ValueError("give exactly one model: CHECKPOINT, --timm NAME or --hf NAME_OR_DIR")
    if (args.pretrained or args.weights or args.img_size) and not args.timm:
        raise ValueError("--pretrained, --weights and --img-size go with --timm")
    if args.timm:
        return timm_source(
            args.timm, pretrained=args.pretrained, weights=args.weights, img_size=args.img_size
        )
    if args.hf:
        return hf_source(args.hf)
    return checkpoint_source(args.checkpoint)


def _bundled_side(name: str) -> int:
    """The image side of a bundled data set (one channel): the demo's or the glyphs' canvas."""
    from ats_vit.data import DemoConfig
    from ats_vit.glyphs import GlyphConfig

    return {"demo": DemoConfig.canvas, "glyphs": GlyphConfig.canvas}[name]


def _split(args: argparse.Namespace, source: Any, split: str) -> Any:
    """One split of --data for the loaded model (its own preprocessing for pretrained ones)."""
    from ats_vit.data import bundled, load_split

    family = source.family
    known = bundled(args.data)
    name, side = (None, None) if known is None else (known[0], _bundled_side(known[0]))
    if side is not None and (family.channels, family.image_size) != (1, (side, side)):
        raise ValueError(
            f"the {name} data (1 x {side} x {side} images) does not fit {source.name} "
            f"({family.channels} x {family.image_size[0]} x {family.image_size[1]}); give --data ROOT, an "
            "ImageFolder with val/<class>/... (and train/<class>/... for calibration)"
        )
    data = load_split(
        args.data,
        split,
        family.image_size[0],
        channels=family.channels,
        transform=source.transform,
        skip_bad=args.skip_bad_images,
    )
    classes = getattr(data, "classes", None)
    no_labels = getattr(args, "no_labels", False)
    if classes is not None and family.num_classes and len(classes) != family.num_classes and not no_labels:
        _warn(
            f"{args.data} has {len(classes)} classes and {source.name} scores {family.num_classes}; "
            f"accuracy compares folder order (0..{len(classes) - 1}) with the model's classes, which is "
            "meaningful only if they are the same classes. Otherwise pass --no-labels (agreement with the "
            "dense model's top-1) and read GFLOPs and speed"
        )
    return data


def _warn(message: str) -> None:
    """A warning line on stderr, once: from the lead process only under torchrun."""
    from ats_vit.distributed import is_lead

    if is_lead():
        print(f"warning: {message}", file=sys.stderr)


# the paper's first sampling layer on DeiT-S (12 layers)
PAPER_START = 3


def _start_layer(args: argparse.Namespace, depth: int) -> int:
    """--start-layer, or the paper's layer 3 (the last layer of shallower models)."""
    return min(PAPER_START, depth - 1) if args.start_layer is None else int(args.start_layer)


def _describe(budget: Any) -> str:
    if budget is None:
        return "dense"
    knob = "" if budget.temperature == 1.0 else f", temperature {budget.temperature:.3g}"
    kept = "" if budget.dropped == "discard" else f", dropped tokens {budget.dropped}d"
    name = budget.method or budget.sampler
    return f"{name}: from layer {budget.start_layer}, caps {list(budget.caps)}{knob}{kept}"


def _eval_budgets(args: argparse.Namespace, source: Any) -> list[tuple[str, Any]]:
    """(label, Budget or None) rows of eval: dense, the budget a checkpoint was trained with,
    each --budget file, each --keep ratio; every one checked against the model up front."""
    from ats_vit.budget import Budget

    family = source.family
    rows: list[tuple[str, Any]] = [("dense", None)]
    if source.config is not None and source.config.budget is not None:
        rows.append(
            ("trained budget", Budget.from_dict(source.config.budget, source=f"{source.name}'s config"))
        )
    for path in args.budget or []:
        budget = Budget.load(path)
        target = f" @ {budget.target:g}" if budget.target is not None else ""
        rows.append((f"{Path(path).stem}{target}", budget))
    keeps = args.keep if args.keep is not None else ([] if len(rows) > 1 else [0.75, 0.5, 0.35, 0.25])
    for keep in keeps:
        if keep != 1.0:
            start = _start_layer(args, family.depth)
            budget = Budget.paper(keep, start, family.depth, family.num_patches)
            rows.append((f"keep {keep:g}", budget))
    for _, budget in rows:
        if budget is not None:
            budget.check(family)  # before any work, naming the file
    return rows


def _cell(value: float, q1: float, q3: float, fmt: str, suffix: str = "") -> str:
    if math.isnan(value):
        return ""
    return f"{value:{fmt}}{suffix} ({q1:{fmt}}-{q3:{fmt}})"


def _vs_dense(row: dict[str, Any]) -> str:
    """Accuracy minus dense's, in points, with the paired test's p."""
    return f"{100 * row['vs_dense_diff']:+.2f} (p={row['vs_dense_p']:.2g})"


def _print_eval(rows: list[dict[str, Any]]) -> None:
    cells = [
        (
            r["label"],
            (r["budget"] or {}).get("method") or ("dense" if r["budget"] is None else "custom"),
            f"{100 * r['accuracy']:.2f}% ± {100 * r['ci95']:.1f}",
            "" if math.isnan(r["vs_dense_p"]) or r["budget"] is None else _vs_dense(r),
            f"{r['gflops']:.4f}",
            "" if math.isnan(r["gflops_ratio"]) else f"{r['gflops_ratio']:.0%}",
            f"{r['kept_per_layer'][-1]:.1f}",
            _cell(r["img_per_s"], r["img_per_s_q1"], r["img_per_s_q3"], ".1f"),
            _cell(r["speedup"], r["speedup_q1"], r["speedup_q3"], ".2f", "x"),
        )
        for r in rows
    ]
    header = (
        "budget",
        "method",
        "accuracy",
        "vs dense (p)",
        "GFLOPs",
        "vs dense",
        "kept (last)",
        "img/s (IQR)",
        "speed-up (IQR)",
    )
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    for line in (header, *cells):
        print(
            "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))
            )
        )


# ---------------------------------------------------------------- commands


def _train_budget(args: argparse.Namespace, model_cfg: Any) -> dict[str, Any] | None:
    """The budget to train with: --budget FILE, or the paper's --keep R from --start-layer."""
    from ats_vit.budget import Budget

    if args.budget and args.keep is not None:
        raise ValueError("give --budget FILE or --keep RATIO, not both")
    if args.budget:
        budget = Budget.load(args.budget)
    elif args.keep is not None and args.keep < 1.0:
        start = _start_layer(args, model_cfg.depth)
        budget = Budget.paper(args.keep, start, model_cfg.depth, model_cfg.num_patches)
    else:
        return None
    name = "ats_vit.ViT" if model_cfg.arch == "ats_vit" else "VisionTransformer"
    budget.check_sizes(model_cfg.depth, model_cfg.num_patches, name)
    return budget.to_dict()


def _run_training(args: argparse.Namespace, cfg: Any) -> int:
    from ats_vit.data import load_split
    from ats_vit.distributed import finish, is_lead
    from ats_vit.train import RunExistsError, TrainingInterrupted, train

    train_data = load_split(cfg.data or args.data, "train", cfg.model.image_size, channels=cfg.model.channels)
    if is_lead():
        _print_config(cfg)
    try:
        final = train(cfg, train_data, resume=args.resume, overwrite=args.overwrite)
    except RunExistsError as exc:
        raise ValueError(
            str(exc) if args.resume else f"{exc}: --resume continues it, --overwrite replaces it"
        ) from None
    except TrainingInterrupted as exc:
        command = "finetune CHECKPOINT" if args.command == "finetune" else args.command
        advice = getattr(args, "resume_advice", None) or f"ats-vit {command} --out {cfg.out_dir} --resume"
        raise TrainingInterrupted(f"{exc}; continue with `{advice}`") from None
    finish()
    if is_lead():
        print(f"checkpoint: {final}")
    return 0


# which options set which field of a TrainConfig (a resume takes the run's own value of every
# field whose options were not given)
_TRAIN_OPTIONS = {
    "model": ("budget", "keep", "start_layer", "arch", "img_size", "patch_size"),
    "epochs": ("epochs",),
    "batch_size": ("batch_size",),
    "lr": ("lr",),
    "seed": ("seed",),
    "ckpt_every": ("ckpt_every",),
    "amp": ("no_amp",),
    "data": ("data",),
    "warmup_steps": ("warmup_steps",),
    "init_from": ("checkpoint",),
}


def _train_config(args: argparse.Namespace, model: Any, **extra: Any) -> Any:
    """The run's config from the options; with ``--resume``, the run's own config, with only
    the options given on this command line in its place (the training refuses those that
    contradict it)."""
    from ats_vit.train import TrainConfig, saved_config

    cfg = TrainConfig(
        model=replace(model, budget=_train_budget(args, model)),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        ckpt_every=args.ckpt_every,
        amp=not args.no_amp,
        out_dir=args.out,
        data=args.data,
        **extra,
    )
    saved = saved_config(Path(args.out)) if args.resume else None
    if saved is None:
        return cfg
    given: set[str] = getattr(args, "explicit", set())
    kept = {f: getattr(cfg, f) for f, options in _TRAIN_OPTIONS.items() if given & set(options)}
    return replace(saved, **kept, out_dir=args.out)


def cmd_train(args: argparse.Namespace) -> int:
    from ats_vit.data import bundled, load_split
    from ats_vit.models import ModelConfig

    known = bundled(args.data)
    if known is not None and known[0] == "demo":
        model = ModelConfig(arch=args.arch)
    elif known is not None:  # glyphs: 4 x 4 patches of 56 x 56, DeiT's 196 tokens
        model = ModelConfig(arch=args.arch, image_size=_bundled_side("glyphs"), patch_size=4)
    else:
        # an ImageFolder: RGB at the requested size, one class per sub-folder
        classes = getattr(load_split(args.data, "train", args.img_size), "classes", [])
        model = ModelConfig(
            arch=args.arch,
            image_size=args.img_size,
            patch_size=args.patch_size,
            channels=3,
            num_classes=len(classes),
        )
    return _run_training(args, _train_config(args, model))


def cmd_finetune(args: argparse.Namespace) -> int:
    from ats_vit.checkpoint import load_checkpoint

    model, _, _, _ = load_checkpoint(args.checkpoint)
    cfg = _train_config(args, model, warmup_steps=args.warmup_steps, init_from=str(args.checkpoint))
    if cfg.model.budget is None:
        raise ValueError("fine-tuning needs a budget: --budget FILE or --keep RATIO below 1")
    return _run_training(args, cfg)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from ats_vit.calibrate import Calibration
    from ats_vit.data import calibration_items, take

    targets = args.target
    paths = _target_paths(args.out, targets)
    _writable(paths, args.overwrite)
    source = _load(args)
    model = source.model.to(_device(args.device))
    calib = _split(args, source, "calib")
    images, labels = take(calib, args.calib_images, args.seed)
    search = Calibration(
        model,
        images,
        None if args.no_labels or source.family.num_classes == 0 else labels,  # towers: fidelity
        method=args.method,
        cost=args.cost,
        timing_batch=args.timing_batch,
        dtype=_dtype(args.dtype),
        start_layers=args.start_layers,
        batch_size=args.batch_size,
        items=calibration_items(args.data, "calib", len(calib), args.calib_images, args.seed),
        holdout=args.holdout,
    )
    objective = search.objective
    where = f" at batch {search.timing_batch} on {search.latency.key['device']}" if search.latency else ""
    held = "" if search.check is None else f", {search.check.images} of them held out of the search"
    print(
        f"calibrating {args.method} for {args.cost}{where} on {len(images)} calibration images{held} "
        f"({objective}; the search keeps {search.search.memory_gib:.2f} GiB of dense block inputs)"
    )
    timed = search.latency is not None
    header = f"{'target':>6} {'GFLOPs':>7} {'time':>6} {'timed':>6} {objective + ' (vs dense)':>18} budget"
    print(header if timed else f"{'target':>6} {'GFLOPs':>7} {objective + ' (vs dense)':>18} budget")
    for target, path in zip(targets, paths, strict=True):
        budget = search(target)
        budget.save(path)
        cal = budget.calibration
        drop = 100 * (cal[f"dense_{objective}"] - cal[objective])
        score = f"{100 * cal[objective]:>8.2f}% ({-drop:+.2f})"
        if timed:
            measured = cal.get("measured_latency_ratio")
            timing = "" if measured is None else f"{measured:.3f}"
            costs = f"{cal['gflops_ratio']:>7.3f} {cal['latency_ratio']:>6.3f} {timing:>6}"
            print(f"{target:>6.2f} {costs} {score} {_describe(budget)}")
        else:
            print(f"{target:>6.2f} {cal['gflops_ratio']:>7.3f} {score} {_describe(budget)}")
        if "holdout_images" in cal:
            held_score = cal[f"holdout_{objective}"]
            held_drop = 100 * (cal[f"holdout_dense_{objective}"] - held_score)
            print(
                f"{'':>6} held out ({cal['holdout_images']} images): {100 * held_score:.2f}% "
                f"({-held_drop:+.2f} vs dense; the search's images: {-drop:+.2f})"
            )
        print(f"{'':>6} wrote {path}  ({cal['passes']:.0f} forward passes' worth of work so far)")
    print(f"dense {objective} on these images: {100 * search.dense_score:.2f}%")
    if timed:
        print(
            "time: predicted from measured block times, as a fraction of dense; timed: measured against dense"
        )
    return 0


def _device(name: str | None) -> Any:
    import torch

    if name is None:
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available here")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {name!r}")
    return device


def _dtype(name: str | None) -> Any:
    import torch

    return None if name in (None, "float32") else torch.bfloat16


class _Target(float):
    """A target in a file name: as short as it is exact (0.5, 0.5000001), or as a format asks."""

    def __format__(self, spec: str) -> str:
        return float.__format__(self, spec or ".10g")


def _target_paths(out: str, targets: Sequence[float]) -> list[str]:
    """One output file per target from ``--out`` and its ``{target}`` placeholder; two targets
    that would write one file, or another placeholder, are refused before any work."""
    problem = f"--out may hold the placeholder {{target}} and no other braces, got {out!r}"
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(out) if name is not None}
    except ValueError as exc:
        raise ValueError(f"{problem} ({exc})") from None
    if len(targets) > 1 and "target" not in fields:
        raise ValueError(f"several targets need an --out with a {{target}} placeholder, got {out!r}")
    try:
        paths = [out.format(target=_Target(t)) for t in targets]
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"{problem} ({type(exc).__name__}: {exc})") from None
    for i, path in enumerate(paths):
        if path in paths[:i]:
            raise ValueError(f"targets {targets[paths.index(path)]} and {targets[i]} would both write {path}")
    return paths


def cmd_eval(args: argparse.Namespace) -> int:
    from ats_vit.data import source_items
    from ats_vit.distributed import finish, init_distributed, is_lead
    from ats_vit.evaluate import evaluate_budgets
    from ats_vit.timing import WIDE_SPREAD

    out = Path(args.out)
    _writable([out / "eval.json", out / "accuracy_vs_gflops.png"], args.overwrite)
    joined = init_distributed()  # always: under torchrun, --device must not split the ranks apart
    device = joined if args.device is None else _device(args.device)
    source = _load(args)
    model = source.model.to(device)
    budgets = _eval_budgets(args, source)
    data = _split(args, source, "test")
    rows = evaluate_budgets(
        model,
        data,
        budgets,
        items=source_items(args.data, "test", len(data)),
        batch_size=args.batch_size,
        workers=args.workers,
        timing_repeats=args.timing_repeats,
        timing_batch=args.timing_batch,
        agreement=args.no_labels,
        dtype=_dtype(args.dtype),
    )
    finish()
    if not is_lead():
        return 0
    trained = "" if source.config is None or source.config.budget is None else " (trained with a budget)"
    shared = "" if rows[0]["items"] == rows[0]["images"] else f" of {rows[0]['items']} independent items"
    scored = "; accuracy = agreement with the dense top-1 (--no-labels)" if args.no_labels else ""
    interval = f"±: 95% interval over the items{scored}"
    print(f"{source.name}{trained} on {rows[0]['images']} images{shared} ({interval}):")
    _print_eval(rows)
    if rows[0]["skipped"]:
        print(f"skipped {rows[0]['skipped']} unreadable images (--skip-bad-images)")
    timed = rows[0]["timing_images"]
    if timed:
        whole = (
            ""
            if timed == args.timing_batch
            else f" (the whole split: fewer than --timing-batch {args.timing_batch})"
        )
        print(
            f"img/s and speed-up: median (interquartile range) of {args.timing_repeats} interleaved rounds, "
            f"each one forward pass over a batch of {timed} images{whole}"
        )
        wide = [r["label"] for r in rows if r.get("img_per_s_spread", 0) > WIDE_SPREAD]
        if wide:
            print(
                f"warning: unsteady timings for {', '.join(wide)} (interquartile range above "
                f"{100 * WIDE_SPREAD:.0f}% of the median): the machine was busy; rerun with more "
                "--timing-repeats before trusting the speed-ups",
                file=sys.stderr,
            )
    out.mkdir(parents=True, exist_ok=True)
    record = dict(model=source.name, data=args.data, rows=rows)
    write_text_atomic(out / "eval.json", json.dumps(record, indent=2) + "\n")
    from ats_vit.viz import plot_accuracy_vs_cost

    plot_accuracy_vs_cost(
        rows, out / "accuracy_vs_gflops.png", title=f"{source.name}{trained} on {args.data}"
    )
    print(f"wrote {out / 'eval.json'} and {out / 'accuracy_vs_gflops.png'}")
    return 0


def cmd_viz(args: argparse.Namespace) -> int:
    import torch

    from ats_vit.budget import Budget, configure
    from ats_vit.data import take
    from ats_vit.viz import save_kept_tokens_grid

    if Path(args.out).suffix.lower() != ".png":
        raise ValueError(f"--out must name a .png file, got {args.out!r}")
    _writable([args.out], args.overwrite)
    source = _load(args)
    family = source.family
    if args.budget:
        budget = Budget.load(args.budget)
    else:
        budget = Budget.paper(args.keep, _start_layer(args, family.depth), family.depth, family.num_patches)
    configure(family, budget)
    images, _ = take(_split(args, source, "test"), args.images)
    with torch.inference_mode():
        source.model.eval()
        _, state = family.run(images)
    title = f"{source.name}, {_describe(budget)}"
    path = save_kept_tokens_grid(images, state.trace, family.patch_size[0], args.out, title=title)
    print(f"wrote {path}")
    return 0


def _run_bench(
    run: Callable[[Any], list[dict[str, Any]]], cfg: Any, columns: Any, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Print the config and machine, run the benchmark, print its table and write its JSON."""
    from ats_vit.bench.common import machine, print_table, write_json

    outputs = [args.json] if args.json else []
    if args.json and args.bench == "frontier":  # and its picture
        outputs.append(str(Path(args.json).with_suffix(".png")))
    _writable(outputs, args.overwrite)
    device = getattr(cfg, "device", "cpu")
    _print_config(cfg)
    print(f"machine: {json.dumps(machine(device))}", file=sys.stderr)
    rows = run(cfg)
    print_table(rows, columns)
    write_json(args.json, cfg, rows, device)
    return rows


def cmd_bench_speed(args: argparse.Namespace) -> int:
    import torch

    from ats_vit.bench.speed import SPEED_COLUMNS, SpeedConfig, speed

    cfg = SpeedConfig(
        model=args.model,
        img_size=args.img_size,
        pretrained=args.pretrained,
        start_layer=args.start_layer,
        cap=args.cap,
        samplers=tuple(args.samplers),
        dropped=tuple(args.dropped),
        families=tuple(args.families),
        batch_sizes=tuple(args.batch_sizes),
        warmup=1,
        min_seconds=args.min_seconds,
        seed=args.seed,
        device=args.device,
        threads=torch.get_num_threads(),
        static=args.static,
        compile=args.compile,
        dtype=args.dtype,
    )
    _run_bench(speed, cfg, SPEED_COLUMNS, args)
    return 0


def cmd_bench_frontier(args: argparse.Namespace) -> int:
    from ats_vit.bench.common import print_table
    from ats_vit.bench.frontier import (
        FRONTIER_COLUMNS,
        POOLED_COLUMNS,
        FrontierConfig,
        frontier,
        pool_seeds,
        recipe_of,
    )
    from ats_vit.viz import plot_frontier

    cfg = FrontierConfig(
        checkpoints=tuple(args.checkpoints),
        data=tuple(args.data),
        methods=tuple(args.methods) if args.methods else FrontierConfig.methods,
        targets=tuple(args.targets),
        calib_images=args.calib_images,
        batch_size=args.batch_size,
        timing_batch=args.timing_batch,
        timing_repeats=args.timing_repeats,
        timing_processes=args.timing_processes,
        seed=args.seed,
    )
    rows = _run_bench(frontier, cfg, FRONTIER_COLUMNS, args)
    print(
        "±: 95% interval, bootstrap over the test split's independent items; vs auto: accuracy "
        "difference with the recommended method at the same target, the exact paired test's p and its "
        "Benjamini-Hochberg adjustment over the table (▲/▼: adjusted p < 0.05); speed-up: over dense, "
        "median over separate processes (range; 'not faster' when it reaches 1.0); settings were "
        "chosen on the calibration split"
    )
    if len({recipe_of(r["checkpoint"]) for r in rows}) < len({r["checkpoint"] for r in rows}):
        print("\nseeds of one recipe (NAME, NAME-s1, ...) pooled:")
        print_table(pool_seeds(rows), POOLED_COLUMNS)
        print(
            "± seeds: standard deviation across seeds; ± items: mean 95% interval within a checkpoint; "
            "vs auto: exact paired test over seeds x test items, Benjamini-Hochberg adjusted"
        )
    if args.json:  # the picture beside the numbers
        print(f"wrote {plot_frontier(rows, Path(args.json).with_suffix('.png'))}")
    return 0


def cmd_bench_train(args: argparse.Namespace) -> int:
    from ats_vit.bench.train import TRAIN_SPEED_COLUMNS, TrainSpeedConfig, train_speed

    cfg = TrainSpeedConfig(
        checkpoint=args.checkpoint,
        budgets=tuple(args.budget),
        batch_size=args.batch_size,
        min_seconds=args.min_seconds,
    )
    _run_bench(train_speed, cfg, TRAIN_SPEED_COLUMNS, args)
    return 0


# the batch the demo times its budgets at; its calibration ranks equally accurate budgets by
# their predicted time at this batch (on the 50% target of the AVX-512 demo checkpoint: ToMe
# from layer 1 instead of layer 0, one calibration image less accurate, 1.48x instead of 1.42x)
DEMO_TIMING_BATCH = 64
DEMO_OUTPUTS = (
    "budget-*.json",
    "eval.json",
    "accuracy_vs_gflops.png",
    "kept_tokens.png",
    "kept_tokens_paper.png",
)


def cmd_demo(args: argparse.Namespace) -> int:
    """train -> calibrate -> eval -> viz on the bundled demo task."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(
            "run the demo in one process, not under torchrun (train and eval split across ranks)"
        )
    from ats_vit.train import RUN_FILES

    out = Path(args.out)
    existing = [p.name for p in out.glob("*") if p.name in RUN_FILES or any(p.match(g) for g in DEMO_OUTPUTS)]
    if existing and not (args.resume or args.overwrite):
        raise ValueError(
            f"{out} already holds a demo run ({', '.join(sorted(existing))}): --resume continues it "
            "(and redoes the steps after training), --overwrite starts afresh, or choose --out"
        )
    ckpt = str(out / "final.safetensors")
    budget = str(out / "budget-{target}.json")
    targets = [f"{t:g}" for t in args.targets]
    again = ["--overwrite"] if existing else []  # the steps after training redo their outputs
    timing = str(DEMO_TIMING_BATCH)
    train = ["train", "--out", str(out), "--epochs", str(args.epochs), "--seed", str(args.seed)]
    steps = [
        train + (["--resume"] if args.resume else ["--overwrite"] if args.overwrite else []),
        ["calibrate", ckpt, "--target", *targets, "--timing-batch", timing, "--out", budget, *again],
        [
            "eval",
            ckpt,
            "--timing-batch",
            timing,
            "--out",
            str(out),
            "--keep",
            "0.5",
            "--budget",
            *(budget.format(target=t) for t in targets),
            *again,
        ],
        [
            "viz",
            ckpt,
            "--budget",
            budget.format(target=targets[0]),
            "--out",
            str(out / "kept_tokens.png"),
            *again,
        ],
        # the paper's ATS: every image keeps its own number of tokens
        [
            "viz",
            ckpt,
            "--keep",
            "0.5",
            "--start-layer",
            "3",
            "--out",
            str(out / "kept_tokens_paper.png"),
            *again,
        ],
    ]
    parser = build_parser()
    for argv in steps:
        print(f"\n$ ats-vit {' '.join(argv)}", flush=True)
        step = parser.parse_args(argv)
        step.explicit = _explicit(parser, step, argv)
        step.resume_advice = f"ats-vit demo --out {out} --resume"  # the demo's steps, not train's alone
        step.fn(step)
    print(f"\noutputs in {out}/: final.safetensors, metrics.csv, {', '.join(DEMO_OUTPUTS)}")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    """List or clear the latency tables cached on this machine."""
    from ats_vit.latency import cache_dir, cached_tables, clear_cache

    if args.action == "clear":
        print(f"removed {clear_cache()} latency tables from {cache_dir()}")
        return 0
    tables = cached_tables()
    print(f"{len(tables)} latency tables in {cache_dir()} (ATS_VIT_CACHE sets the folder)")
    for t in tables:
        if "error" in t:
            print(f"  {t['path']}: unreadable ({t['error']})")
            continue
        busy = ", timed on a busy machine: not reused" if t["disturbed"] else ""
        rules = ", ".join(t["rules"]) or "-"
        print(
            f"  {Path(t['path']).name}: {t['model']} at batch {t['batch_size']} on {t['device']} "
            f"({t['dtype']}, {t['threads']} threads, torch {t['torch']}), rules {rules}{busy}"
        )
    return 0


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ats-vit",
        description="Adaptive Token Sampling for Vision Transformers: budgets in GFLOPs or time, "
        "without or with fine-tuning.",
        epilog=f"Model families served: {SUPPORTED}. eval scores accuracy and needs a classifier; "
        "calibrate scores a classifier by accuracy and a feature tower (--hf) by the cosine "
        "similarity of its features to the dense ones; video models and dense outputs are served "
        "from Python (ats_vit.hf.apply / restore).",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, help: str, parent: Any = sub) -> argparse.ArgumentParser:
        return parent.add_parser(name, help=help, description=help, formatter_class=_Formatter)

    demo = command(
        "demo", "train on the bundled demo task, calibrate budgets, evaluate them and draw the kept tokens"
    )
    demo.add_argument("--out", default="runs/demo", help="output folder")
    demo.add_argument("--epochs", type=_positive_int, default=10, help="training epochs")
    demo.add_argument("--seed", type=int, default=0, help="training seed")
    demo.add_argument(
        "--targets", type=_target, nargs="+", default=[0.5, 0.7], help="GFLOPs fractions to calibrate"
    )
    demo.add_argument(
        "--resume", action="store_true", help="continue training in OUT, then redo the later steps"
    )
    demo.add_argument("--overwrite", action="store_true", help="replace a demo run already in OUT")
    demo.set_defaults(fn=cmd_demo)

    def training_options(p: argparse.ArgumentParser, epochs: int, lr: float, out: str) -> None:
        p.add_argument(
            "--data",
            default="demo",
            help="'demo', 'glyphs' (NAME@SEED: another draw) or an ImageFolder root with train/<class>/...",
        )
        p.add_argument("--out", default=out, help="output folder (checkpoints, metrics.csv, config.json)")
        p.add_argument("--epochs", type=_positive_int, default=epochs, help="training epochs")
        p.add_argument(
            "--budget",
            metavar="FILE",
            help="train with this budget active (`ats-vit calibrate`; to fine-tune, its --method ats-fuse)",
        )
        p.add_argument("--keep", type=_keep_ratio, help="or with the paper's budget: this keep ratio ...")
        p.add_argument("--start-layer", type=_count, help="... from this layer on (default: 3, or the last)")
        p.add_argument("--batch-size", type=_positive_int, default=64, help="per process")
        p.add_argument("--lr", type=float, default=lr, help="peak learning rate (AdamW, cosine)")
        p.add_argument("--seed", type=int, default=0, help="initialisation and data order")
        p.add_argument("--ckpt-every", type=_positive_int, default=200, help="steps between checkpoints")
        p.add_argument("--no-amp", action="store_true", help="train in float32 on GPUs too")
        p.add_argument(
            "--resume", action="store_true", help="continue the run in OUT from its last.safetensors"
        )
        p.add_argument("--overwrite", action="store_true", help="replace a run already in OUT")

    train = command("train", "train a ViT, dense or with a budget active (single process or torchrun)")
    training_options(train, epochs=10, lr=2e-3, out="runs/train")
    train.add_argument(
        "--arch",
        choices=["ats_vit", "timm", "timm-gap", "timm-map"],  # models.ARCHS (tested equal)
        default="ats_vit",
        help="ats_vit.ViT, or timm's VisionTransformer reading out the class token (timm), "
        "average-pooled without one (timm-gap) or with a SigLIP-style attention-pool head (timm-map)",
    )
    train.add_argument("--img-size", type=_positive_int, default=224, help="for --data FOLDER (demo: 48)")
    _renamed(train, "--image-size", "--img-size", type=_positive_int)
    train.add_argument("--patch-size", type=_positive_int, default=16, help="for --data FOLDER (demo: 8)")
    train.set_defaults(fn=cmd_train)

    ft = command("finetune", "fine-tune a checkpoint with a budget active (single process or torchrun)")
    ft.add_argument("checkpoint", help="a checkpoint of `ats-vit train` (.safetensors); never written over")
    training_options(ft, epochs=3, lr=5e-4, out="runs/finetune")
    ft.add_argument("--warmup-steps", type=_count, default=20, help="linear warm-up steps")
    ft.set_defaults(fn=cmd_finetune)

    cal = command(
        "calibrate",
        "choose the budget that meets a cost (GFLOPs, or time on this device) with the best accuracy",
    )
    _add_model_source(cal)
    cal.add_argument(
        "--target", type=_target, nargs="+", required=True, help="the cost as a fraction of the dense model's"
    )
    cal.add_argument(
        "--cost",
        choices=("gflops", "latency"),
        default="gflops",
        help="what the target is a fraction of: counted GFLOPs, or the time of a forward pass of "
        "--timing-batch images on --device",
    )
    cal.add_argument(
        "--timing-batch",
        type=_positive_int,
        help="images per timed forward pass (--cost latency: default 64; with --cost gflops, "
        "equally accurate budgets are ranked by their time at this batch)",
    )
    cal.add_argument("--device", help="cpu, cuda, cuda:N (default: cpu)")
    cal.add_argument("--dtype", choices=("float32", "bfloat16"), help="time under bfloat16 autocast")
    cal.add_argument(
        "--method",
        choices=METHOD_CHOICES,
        default=RECOMMENDED,
        help="how tokens are selected (docs: Methods)",
    )
    _add_data(cal, "val")
    cal.add_argument("--calib-images", type=_positive_int, default=512, help="calibration images")
    _renamed(cal, "--images", "--calib-images", type=_positive_int)
    cal.add_argument(
        "--no-labels", action="store_true", help="maximise agreement with the dense top-1 instead"
    )
    cal.add_argument(
        "--start-layers", type=int, nargs="+", help="layers where selection may start (default: all)"
    )
    cal.add_argument("--batch-size", type=_positive_int, default=256, help="images per forward pass")
    cal.add_argument("--seed", type=int, default=0, help="which calibration images")
    cal.add_argument(
        "--holdout",
        type=float,
        default=0.0,
        help="fraction of the calibration images kept from the search, to check each chosen budget on "
        "(default 0: all are searched)",
    )
    cal.add_argument("--out", default="budget.json", help="budget file; with several targets use {target}")
    cal.add_argument("--overwrite", action="store_true", help="replace existing budget files")
    cal.set_defaults(fn=cmd_calibrate)

    ev = command("eval", "accuracy / GFLOPs / throughput at several budgets (torchrun: split across ranks)")
    _add_model_source(ev)
    _add_data(ev, "test")
    ev.add_argument("--budget", nargs="+", metavar="FILE", help="budget files from `ats-vit calibrate`")
    ev.add_argument(
        "--keep",
        type=_keep_ratio,
        nargs="+",
        help="the paper's budgets: patch tokens per layer as a fraction of all patches "
        "(default without --budget: 0.75 0.5 0.35 0.25)",
    )
    ev.add_argument(
        "--start-layer", type=_count, help="first layer that samples, for --keep (default: 3, or the last)"
    )
    ev.add_argument("--batch-size", type=_positive_int, default=256, help="images per forward pass")
    ev.add_argument("--workers", type=_count, default=0, help="data loading processes")
    ev.add_argument("--timing-repeats", type=_count, default=5, help="timed rounds per budget (0: no timing)")
    ev.add_argument("--timing-batch", type=_positive_int, default=64, help="images per timed pass")
    ev.add_argument(
        "--no-labels",
        action="store_true",
        help="score agreement with the dense model's top-1 instead of the labels (unlabelled folders)",
    )
    ev.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda under torchrun with GPUs, else cpu)")
    ev.add_argument(
        "--dtype", choices=("float32", "bfloat16"), help="evaluate and time under bfloat16 autocast"
    )
    ev.add_argument("--out", default="runs/eval", help="folder for eval.json and accuracy_vs_gflops.png")
    ev.add_argument("--overwrite", action="store_true", help="replace eval.json and the plot in OUT")
    ev.set_defaults(fn=cmd_eval)

    viz = command("viz", "PNG grid of the patches each sampling layer kept")
    _add_model_source(viz)
    _add_data(viz, "test")
    viz.add_argument("--budget", metavar="FILE", help="a budget file from `ats-vit calibrate`")
    viz.add_argument(
        "--keep", type=_keep_ratio, default=0.75, help="without --budget: the paper's keep ratio"
    )
    viz.add_argument(
        "--start-layer",
        type=_count,
        help="without --budget: first layer that samples (default: 3, or the last)",
    )
    viz.add_argument("--images", type=_positive_int, default=6, help="images (rows) to draw")
    viz.add_argument("--out", default="runs/kept_tokens.png", help="PNG path")
    _renamed(viz, "--output", "--out")
    viz.add_argument("--overwrite", action="store_true", help="replace an existing PNG")
    viz.set_defaults(fn=cmd_viz)

    cache = command("cache", "list or clear the latency tables cached on this machine ($ATS_VIT_CACHE)")
    cache.add_argument("action", choices=("list", "clear"), help="list the tables, or remove them all")
    cache.set_defaults(fn=cmd_cache)

    bench = command(
        "bench", "benchmarks: speed vs the FLOP ideal; accuracy vs GFLOPs of every method; training speed"
    )
    kinds = bench.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)

    def outputs(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", help="also write config, machine and rows to this file")
        p.add_argument("--overwrite", action="store_true", help="replace existing output files")

    sp = command(
        "speed", "throughput, peak memory and efficiency: timm dense vs ATS, ats_vit.ViT, the seed", kinds
    )
    sp.add_argument("--model", default="deit_small_patch16_224", help="a timm ViT name (sets all sizes)")
    sp.add_argument("--img-size", type=_positive_int, help="image size (default: the model's)")
    sp.add_argument("--pretrained", action="store_true", help="timm weights (needs a download)")
    sp.add_argument("--start-layer", type=_count, default=3, help="first layer that samples (0-based)")
    sp.add_argument("--cap", type=_positive_int, default=108, help="patch tokens kept per sampling layer")
    _renamed(sp, "--max-tokens", "--cap", type=_positive_int)
    sp.add_argument(
        "--samplers",
        nargs="+",
        choices=SAMPLERS,
        default=["inverse_transform", "gumbel"],
        help="selection rules",
    )
    sp.add_argument(
        "--dropped", nargs="+", choices=("discard", "fuse"), default=["discard"], help="with each sampler"
    )
    sp.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES), help="implementations")
    sp.add_argument("--batch-sizes", type=_positive_int, nargs="+", default=[1, 16, 64], help="batch sizes")
    sp.add_argument(
        "--min-seconds", type=float, default=3.0, help="more rounds until each variant ran this long"
    )
    sp.add_argument("--seed", type=int, default=0, help="weights and images")
    sp.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    sp.add_argument("--static", action="store_true", help="also ATS with static shapes (no host sync)")
    sp.add_argument("--compile", action="store_true", help="also torch.compile'd timm and our models")
    sp.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="bfloat16: autocast")
    outputs(sp)
    sp.set_defaults(fn=cmd_bench_speed)

    fr = command(
        "frontier",
        "accuracy vs GFLOPs: every method calibrated to each target, measured on the test split",
        kinds,
    )
    fr.add_argument("checkpoints", nargs="+", help="checkpoints of `ats-vit train`")
    fr.add_argument(
        "--data",
        nargs="+",
        default=["demo"],
        help="'demo', 'glyphs' (NAME@SEED: another draw) or an ImageFolder root; one, or one per checkpoint",
    )
    fr.add_argument(
        "--methods",
        nargs="+",
        choices=METHOD_CHOICES,
        help="methods to compare (default: all)",
    )
    fr.add_argument(
        "--targets",
        type=_target,
        nargs="+",
        default=[0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95],
        help="GFLOPs fractions",
    )
    fr.add_argument(
        "--calib-images", type=_positive_int, help="calibration images (default: the whole split)"
    )
    fr.add_argument("--batch-size", type=_positive_int, default=256, help="images per forward pass")
    fr.add_argument("--timing-batch", type=_positive_int, default=64, help="test images per timed pass")
    fr.add_argument(
        "--timing-repeats", type=_count, default=7, help="interleaved timed rounds (0: no timing)"
    )
    fr.add_argument(
        "--timing-processes",
        type=_count,
        default=5,
        help="separate processes that each time every budget (0: time in this process)",
    )
    fr.add_argument("--seed", type=int, default=0, help="which calibration images; random peers' draws")
    outputs(fr)
    fr.set_defaults(fn=cmd_bench_frontier)

    tr = command("train", "training steps per second: dense against budgets, on a demo checkpoint", kinds)
    tr.add_argument("checkpoint", help="a checkpoint of `ats-vit train` on the demo data")
    tr.add_argument("--budget", nargs="+", required=True, metavar="FILE", help="budget files to train with")
    tr.add_argument("--batch-size", type=_positive_int, default=64, help="images per step")
    tr.add_argument("--min-seconds", type=float, default=5.0, help="repeat until each variant ran this long")
    outputs(tr)
    tr.set_defaults(fn=cmd_bench_train)
    return parser


def _explicit(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]) -> set[str]:
    """The destinations of the options given on the command line (not left at their defaults)."""
    actions: list[argparse.Action] = []
    current: argparse.ArgumentParser | None = parser
    for name in (args.command, getattr(args, "bench", None)):
        sub = next(
            (a for a in (current._actions if current else []) if isinstance(a, argparse._SubParsersAction)),
            None,
        )
        current = sub.choices.get(name) if sub is not None and name else None
        if current is not None:
            actions += current._actions
    dests = {option: a.dest for a in actions for option in a.option_strings}
    given = {dests[token.split("=", 1)[0]] for token in argv if token.split("=", 1)[0] in dests}
    positional = {a.dest for a in actions if not a.option_strings and getattr(args, a.dest, None) is not None}
    return given | positional


# commands that split their work across torchrun's processes; the others run on rank 0 alone
SPLIT_COMMANDS = ("train", "finetune", "eval")


def main(argv: Sequence[str] | None = None) -> int:
    from ats_vit.checkpoint import CheckpointError
    from ats_vit.data import BadImageError

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    args.explicit = _explicit(parser, args, argv)
    name = args.command if args.command != "bench" else f"bench {args.bench}"
    from ats_vit.distributed import is_lead

    if not is_lead():  # under torchrun: every rank runs, one speaks
        warnings.simplefilter("ignore")
        if args.command not in SPLIT_COMMANDS:
            return 0  # what writes files runs on rank 0 alone (torchrun waits for it)
    try:
        return int(args.fn(args))
    except BadImageError as exc:
        print(f"ats-vit {name}: error: {exc} (--skip-bad-images leaves such files out)", file=sys.stderr)
        return 2
    except (CheckpointError, ValueError, TypeError, ImportError) as exc:
        print(f"ats-vit {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"\nats-vit {name}: interrupted{f': {exc}' if str(exc) else ''}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
