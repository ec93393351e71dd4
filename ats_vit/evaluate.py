"""Evaluation: accuracy, kept tokens and GFLOPs of a model on a data set, and of one model
under several budgets (no fine-tuning), single process or split across ``torchrun`` ranks.

Under ``torchrun`` each rank takes every ``world``-th image and the sums are all-reduced:
counts are integers and FLOPs exact integers in float64, so the result equals one process's
exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from ats_vit._progress import bar as progress_bar
from ats_vit.budget import Budget, adapt
from ats_vit.data import collate_skipping
from ats_vit.distributed import rank_world
from ats_vit.flops import flops

__all__ = ["evaluate", "evaluate_budgets", "keep_budget", "time_budgets"]


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    data: Dataset,
    batch_size: int = 256,
    *,
    workers: int = 0,
    progress: bool = False,
) -> dict[str, object]:
    """Accuracy, mean kept patch tokens per layer and mean GFLOPs per image of ``model`` as it
    is configured (our ViT, or a timm / Hugging Face model, patched or not).

    Images that a folder data set could not read (``--skip-bad-images``) are counted in
    ``skipped`` and left out.
    """
    adapter = adapt(model)
    model.eval()
    device = next(model.parameters()).device
    rank, world = rank_world()
    mine = Subset(data, range(rank, len(data), world))
    loader = DataLoader(mine, batch_size=batch_size, num_workers=workers, collate_fn=collate_skipping)
    # integer sums on the device; one sync at the end instead of several per batch
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = torch.zeros((), dtype=torch.long, device=device)
    skipped = torch.zeros((), dtype=torch.long, device=device)
    kept = torch.zeros(adapter.depth, dtype=torch.long, device=device)
    total_flops = torch.zeros((), dtype=torch.float64, device=device)
    bar = progress_bar(total=len(loader), desc="eval", unit="batch", disable=not progress or rank != 0)
    for images, labels, bad in loader:
        skipped += bad
        bar.update()
        if images is None:
            continue
        images, labels = images.to(device), labels.to(device)
        logits, trace = adapter.run(images)
        correct += (logits.argmax(-1) == labels).sum()
        seen += len(labels)
        kept += trace.kept_per_layer().sum(0).to(device)
        total_flops += flops(adapter.cost, trace).to(device).sum()
    bar.close()
    sums = [correct, seen, skipped, kept, total_flops]
    if world > 1:
        for t in sums:
            dist.all_reduce(t)
    n = max(int(seen), 1)
    return dict(
        accuracy=int(correct) / n,
        kept_per_layer=(kept.double() / n).tolist(),
        gflops=float(total_flops) / n / 1e9,
        images=int(seen),
        skipped=int(skipped),
    )


def keep_budget(
    model: nn.Module, keep: float, start_layer: int, sampler: str = "inverse_transform"
) -> Budget | None:
    """The paper's budget: ``round(keep * num_patches)`` patch tokens per layer from
    ``start_layer`` on (``keep=1``: dense, None)."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep ratios must be in (0, 1], got {keep}")
    adapter = adapt(model)
    if not 0 <= start_layer < adapter.depth:
        raise ValueError(f"start_layer must be in [0, {adapter.depth}), got {start_layer}")
    if keep == 1.0:
        return None
    cap = max(1, round(keep * adapter.num_patches))
    return Budget(start_layer, (cap,) * (adapter.depth - start_layer), sampler=sampler, method="paper")


def time_budgets(
    model: nn.Module,
    budgets: Sequence[Budget | None],
    images: Tensor,
    *,
    repeats: int = 5,
    warmup: int = 1,
) -> list[float]:
    """Seconds per forward pass over ``images`` under each budget: the budgets run interleaved
    round-robin and each time is a median, so machine load hits them alike
    (:func:`ats_vit.bench.time_round_robin`)."""
    from ats_vit.bench import time_round_robin

    adapter = adapt(model)

    def call(budget: Budget | None):
        @torch.inference_mode()
        def run() -> None:
            adapter.configure(budget)  # switching budgets builds a few parameter-free modules
            adapter.run(images)

        return run

    fns = {str(i): call(b) for i, b in enumerate(budgets)}
    times = time_round_robin(fns, warmup, repeats, images.device)
    return [times[str(i)] for i in range(len(budgets))]


def evaluate_budgets(
    model: nn.Module,
    data: Dataset,
    budgets: Sequence[tuple[str, Budget | None]],
    *,
    batch_size: int = 256,
    workers: int = 0,
    timing_repeats: int = 5,
    timing_batch: int = 64,
    progress: bool = True,
) -> list[dict[str, object]]:
    """One row per ``(label, budget)`` (``None``: dense): accuracy, kept tokens, GFLOPs, and
    throughput measured in one interleaved run over one batch of ``timing_batch`` images
    (``timing_repeats=0``, or several processes: no timing, NaN), with the speed-up over the
    first row when it is the dense model."""
    rank, world = rank_world()
    adapter = adapt(model)
    rows = []
    quiet = not progress or rank != 0
    for label, budget in progress_bar(iterable=budgets, desc="budgets", unit="budget", disable=quiet):
        adapter.configure(budget)
        result = evaluate(model, data, batch_size, workers=workers)
        rows.append(dict(label=label, budget=None if budget is None else budget.to_dict(), **result))
    seconds = [math.nan] * len(rows)
    if timing_repeats > 0 and world == 1 and rows:
        images = next(iter(DataLoader(data, batch_size=timing_batch, collate_fn=collate_skipping)))[0]
        images = images.to(next(model.parameters()).device)
        seconds = time_budgets(model, [b for _, b in budgets], images, repeats=timing_repeats)
    dense_first = bool(budgets) and budgets[0][1] is None
    for row, t in zip(rows, seconds, strict=True):
        row["img_per_s"] = timing_batch / t
        row["speedup"] = seconds[0] / t if dense_first else math.nan
        row["gflops_ratio"] = row["gflops"] / rows[0]["gflops"] if dense_first else math.nan
    adapter.configure(None)
    return rows
