"""What the benchmarks share: machine facts, tables, JSON records, peak memory, intervals.

Every speed number in ``ats-vit bench`` is a ratio measured in one run (variants interleaved
round-robin, :mod:`ats_vit.timing`); nothing here is asserted as a timing in tests.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ats_vit import __version__
from ats_vit._io import write_text_atomic
from ats_vit.timing import _sync

__all__ = ["machine", "peak_memory", "print_table", "write_json"]


class _LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of tensor storages that ops create while active, and their peak.

    CPU PyTorch has no allocator statistics, so storages are followed from creation to
    garbage collection. An output that shares a storage with an input (a view, an in-place
    result) is no new memory; scratch memory that a kernel allocates internally (e.g. inside
    fused attention) is not seen.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages: set[int] = set()

    def _freed(self, ptr: int, nbytes: int) -> None:
        self._storages.discard(ptr)
        self.live -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {
            t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)
        }
        for t in tree_leaves(out):
            if not isinstance(t, Tensor):
                continue
            storage = t.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or ptr in self._storages or ptr in inputs:
                continue
            self._storages.add(ptr)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, ptr, nbytes)
        return out


def peak_memory(fn: Callable[[], object], device: torch.device | None = None) -> int:
    """Peak bytes of the tensors ``fn`` allocates on ``device`` (activations: weights and
    inputs that exist before the call are not counted)."""
    device = device or torch.device("cpu")
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    tracker = _LiveTensorBytes()
    with tracker:
        fn()
    return tracker.peak


def machine(device: torch.device | str = "cpu") -> dict[str, object]:
    """Where a benchmark ran and with what code: what its numbers depend on."""
    device = torch.device(device)
    info = dict(
        torch=torch.__version__,
        python=platform.python_version(),
        cpu=platform.processor() or platform.machine(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        threads=torch.get_num_threads(),
        device=str(device),
        ats_vit=__version__,
        commit=_commit(),
    )
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _commit() -> str | None:
    """The git commit of the ats-vit checkout that runs (``+dirty`` with local changes), or
    None for an installed package."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    git = ["git", "-C", str(root)]
    try:
        head = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        status = [*git, "status", "--porcelain", "--untracked-files=no", "--", "ats_vit"]
        dirty = subprocess.run(status, capture_output=True, text=True, check=True)
    except OSError:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def print_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> None:
    """columns: (key, header, format spec) per column; a spec starting with '<' aligns left."""
    cells = [[format(r[key], spec) for key, _, spec in columns] for r in rows]
    widths = [max(len(header), *(len(row[i]) for row in cells)) for i, (_, header, _) in enumerate(columns)]
    left = [spec.startswith("<") for _, _, spec in columns]

    def line(items: Sequence[str]) -> str:
        return "  ".join(
            s.ljust(w) if is_left else s.rjust(w) for s, w, is_left in zip(items, widths, left, strict=True)
        )

    print(line([header for _, header, _ in columns]))
    print(line(["-" * w for w in widths]))
    for row in cells:
        print(line(row))


def checkpoint_batch(
    checkpoint: str, data: str, split: str, count: int
) -> tuple[torch.nn.Module, Any, Tensor]:
    """An ats-vit checkpoint's model (in eval mode), its config, and ``count`` images of a split
    of ``data`` at the model's size: the batch the checkpoint benchmarks time."""
    from ats_vit import data as datasets  # looked up when called (tests put tiny data in its place)
    from ats_vit.checkpoint import load_model

    model, cfg = load_model(checkpoint)
    images = datasets.take(datasets.load_split(data, split, cfg.image_size, channels=cfg.channels), count)[0]
    return model.eval(), cfg, images


@dataclass
class CheckpointSplits:
    """A checkpoint's model (in eval mode), a draw of its data's calibration split and the whole
    test split, each with the independent item every image comes from (None: each its own)."""

    name: str  # the checkpoint's folder name (seeds of a recipe are told apart by it)
    model: torch.nn.Module
    calib_x: Tensor
    calib_y: Tensor
    calib_items: Tensor | None
    test_x: Tensor
    test_y: Tensor
    test_items: Tensor


def checkpoint_splits(checkpoint: str, data: str, calib_images: int | None, seed: int) -> CheckpointSplits:
    """What a benchmark that calibrates on one split and reports on another loads per
    checkpoint: ``calib_images`` calibration images drawn by ``seed`` (all when None)."""
    from ats_vit import data as datasets  # looked up when called (tests put tiny data in its place)
    from ats_vit.checkpoint import load_model

    model, cfg = load_model(checkpoint)
    size, channels = cfg.image_size, cfg.channels
    calib = datasets.load_split(data, "calib", size, channels=channels)
    calib_x, calib_y = datasets.take(calib, calib_images, seed)
    calib_items = datasets.calibration_items(data, "calib", len(calib), calib_images, seed)  # type: ignore[arg-type]
    test_x, test_y = datasets.take(datasets.load_split(data, "test", size, channels=channels))
    return CheckpointSplits(
        Path(checkpoint).parent.name or str(checkpoint),
        model.eval(),
        calib_x,
        calib_y,
        calib_items,
        test_x,
        test_y,
        datasets.source_items(data, "test", len(test_y)),
    )


def use_threads(threads: int) -> None:
    """Run torch on ``threads`` intra-op threads, touching the setting only when it differs:
    calling ``torch.set_num_threads`` at all, even with the count already in use, makes
    PyTorch's fused CPU attention 1.4-1.8x slower at small sizes (torch 2.14.1, 2 cores: 0.80
    -> 1.38-1.45 ms at batch 64, 4 heads, 37 tokens), which a benchmark must not add to what it
    measures."""
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)


def json_arguments(
    parser: argparse.ArgumentParser, what: str = "config, machine and rows"
) -> Callable[[], Any]:
    """Add ``--json FILE`` and ``--overwrite`` to a benchmark script's parser; returns the parse
    function, which refuses an existing FILE without ``--overwrite`` before any work is done
    (a finished run is never written over by accident)."""
    parser.add_argument("--json", help=f"also write {what} here")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")

    def parse() -> Any:
        args = parser.parse_args()
        if args.json and Path(args.json).exists() and not args.overwrite:
            parser.error(
                f"{args.json} already exists: pass --overwrite to replace it, or choose another --json"
            )
        return args

    return parse


def variant_names(paths: tuple[str, ...]) -> dict[str, str]:
    """A row name per budget file: its stem, or the path as given where stems collide (two
    budgets named alike in different folders must not share, and overwrite, one row)."""
    if len(set(paths)) != len(paths):
        twice = sorted({p for p in paths if paths.count(p) > 1})
        raise ValueError(f"budgets lists {', '.join(twice)} more than once")
    stems = [Path(p).stem for p in paths]
    clash = {s for s in stems if stems.count(s) > 1 or s == "dense"}
    return {(p if s in clash else s): p for p, s in zip(paths, stems, strict=True)}


def checkpoint_budget_arguments(
    parser: argparse.ArgumentParser, defaults: Any, budget_help: str = "budget files from `ats-vit calibrate`"
) -> Callable[[], Any]:
    """Add what a benchmark timing a checkpoint's budgets takes (the checkpoint, ``--budget``,
    ``--data``, ``--batch-size``, ``--repeats``, ``--min-seconds``, with ``defaults``' values,
    and :func:`json_arguments`); returns the parse function, which also refuses non-positive
    counts, a negative time and a budget list that names a file twice."""
    parser.add_argument("checkpoint", help="an ats-vit checkpoint (e.g. the demo's final.safetensors)")
    parser.add_argument("--budget", nargs="+", required=True, help=budget_help)
    parser.add_argument(
        "--data", default=defaults.data, help="demo, glyphs or an image folder (its test split)"
    )
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--repeats", type=int, default=defaults.repeats)
    parser.add_argument("--min-seconds", type=float, default=defaults.min_seconds)
    parse_json = json_arguments(parser)

    def parse() -> Any:
        args = parse_json()
        if min(args.batch_size, args.repeats) < 1 or args.min_seconds < 0:
            parser.error("--batch-size and --repeats must be positive, --min-seconds >= 0")
        try:
            variant_names(tuple(args.budget))
        except ValueError as error:
            parser.error(str(error))
        return args

    return parse


def write_json(
    path: str | Path | None, config: Any, rows: Sequence[dict], device: torch.device | str = "cpu"
) -> None:
    """Config, machine and rows, so every number can be reproduced."""
    if path:
        record = dict(config=asdict(config), machine=machine(device), rows=list(rows))
        write_text_atomic(path, json.dumps(record, indent=2) + "\n")
        print(f"wrote {path}")
