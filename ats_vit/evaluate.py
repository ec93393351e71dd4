"""Evaluation: accuracy, kept tokens and GFLOPs of a model on a data set, and of one model
under several budgets (no fine-tuning), single process or split across ``torchrun`` ranks.

Under ``torchrun`` each rank takes every ``world``-th image and the sums are all-reduced:
counts are integers and FLOPs exact integers in float64, so the result equals one process's
exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from ats_vit import _validate
from ats_vit._progress import bar as progress_bar
from ats_vit.budget import Budget, configure
from ats_vit.data import collate_skipping
from ats_vit.distributed import rank_world
from ats_vit.families import family_of
from ats_vit.flops import flops
from ats_vit.stats import binomial_ci95, bootstrap_ci95, paired_test
from ats_vit.timing import Timing, speedup, time_round_robin

__all__ = ["attention_entropy", "evaluate", "evaluate_budgets", "measure", "time_budgets"]


def _classifier(model: nn.Module) -> Any:
    """The family of a model with a classifier (accuracy needs one)."""
    family = family_of(model)
    if family.num_classes == 0:
        raise TypeError(
            f"{family.name} has no classification head, so it has no accuracy to evaluate; "
            "calibrate scores it by the cosine similarity of its features to the dense ones"
        )
    return family


def evaluate(
    model: nn.Module,
    data: Dataset,
    batch_size: int = 256,
    *,
    workers: int = 0,
    progress: bool = False,
    items: Tensor | None = None,
) -> dict[str, Any]:
    """Accuracy, mean kept patch tokens per layer and mean GFLOPs per image of ``model`` as it
    is configured (our ViT, or a timm / Hugging Face model), and the accuracy's 95% interval.

    ``items``: (len(data),) the independent item each image comes from
    (:func:`ats_vit.data.source_items`; None: every image is its own). The interval
    (``ci95``, a half-width) counts items, not images: a cluster bootstrap over them in one
    process, the binomial interval of the item count (wider, as if an item's images always
    agreed) under ``torchrun`` or when images were skipped. Images that a folder data set
    could not read (``image_folder(skip_bad=True)``) are counted in ``skipped`` and left out.
    """
    return _evaluate(model, data, batch_size, workers, progress, items)[0]


@torch.inference_mode()
def _evaluate(
    model: nn.Module,
    data: Dataset,
    batch_size: int,
    workers: int,
    progress: bool,
    items: Tensor | None,
    reference: Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[dict[str, Any], Tensor | None, Tensor]:
    """:func:`evaluate`, which images were classified right (None when the images are split
    across processes or some were skipped: then they do not line up with ``items``), and this
    process's top-1 predictions in order. ``reference``: predictions to agree with instead of
    the labels (this process's images, in order); ``dtype``: autocast to it."""
    size = len(data)  # type: ignore[arg-type]
    if items is not None and items.shape != (size,):
        raise ValueError(f"items must be ({size},), one per image, got {tuple(items.shape)}")
    family = _classifier(model)
    model.eval()
    device = next(model.parameters()).device
    rank, world = rank_world()
    mine = Subset(data, range(rank, size, world))
    loader = DataLoader(mine, batch_size=batch_size, num_workers=workers, collate_fn=collate_skipping)
    # integer sums on the device; one sync at the end instead of several per batch
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = torch.zeros((), dtype=torch.long, device=device)
    skipped = torch.zeros((), dtype=torch.long, device=device)
    kept = torch.zeros(family.depth, dtype=torch.long, device=device)
    total_flops = torch.zeros((), dtype=torch.float64, device=device)
    hits: list[Tensor] = []
    predictions: list[Tensor] = []
    autocast = torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
    bar = progress_bar(total=len(loader), desc="eval", unit="batch", disable=not progress or rank != 0)
    for images, labels, bad in loader:
        skipped += bad
        bar.update()
        if images is None:
            continue
        _validate.finite_images(images, "images of this batch")
        if reference is not None:  # agreement with the dense model's top-1, not the labels
            labels = reference[int(seen) : int(seen) + len(images)]
        elif family.num_classes:
            _validate.class_labels(labels, family.num_classes, "labels of this batch")
        images, labels = images.to(device), labels.to(device)
        with autocast:
            logits, state = family.run(images)
        predicted = logits.argmax(-1)
        predictions.append(predicted.cpu())
        hit = predicted == labels
        hits.append(hit)
        correct += hit.sum()
        seen += len(labels)
        kept += state.trace.kept_per_layer().sum(0).to(device)
        total_flops += flops(family.cost, state.trace).to(device).sum()
    bar.close()
    sums = [correct, seen, skipped, kept, total_flops]
    if world > 1:
        for t in sums:
            dist.all_reduce(t)
    if not int(seen):
        raise ValueError(
            f"no readable images to evaluate: all {int(skipped)} were unreadable and left out"
            if int(skipped)
            else "no images to evaluate: the data set is empty"
        )
    n = int(seen)
    accuracy = int(correct) / n
    independent = n if items is None else int(items.unique().numel())
    aligned = world == 1 and not int(skipped) and bool(hits)
    correct_each = torch.cat(hits).cpu() if aligned else None
    if items is not None and independent < n and correct_each is not None:
        ci95 = bootstrap_ci95(correct_each, items)  # images share items: resample items
    else:
        ci95 = binomial_ci95(accuracy, max(independent, 1))
    result = dict(
        accuracy=accuracy,
        kept_per_layer=(kept.double() / n).tolist(),
        gflops=float(total_flops) / n / 1e9,
        images=int(seen),
        skipped=int(skipped),
        items=independent,
        ci95=ci95,
    )
    return result, correct_each, torch.cat(predictions)


@torch.inference_mode()
def measure(
    model: nn.Module, images: Tensor, budget: Budget | None, *, batch_size: int = 256
) -> tuple[Tensor, Tensor]:
    """Top-1 predictions (N,) and GFLOPs per image (N,) of ``model`` under ``budget`` (``None``:
    dense), in eval mode, batch by batch. The model is left configured with the budget."""
    family = _classifier(model)
    _validate.finite_images(images)
    configure(family, budget)
    was_training = model.training
    model.eval()
    preds, costs = [], []
    for batch in images.split(batch_size):
        logits, cost = family.forward(batch)
        preds.append(logits.argmax(dim=-1))
        costs.append(cost)
    model.train(was_training)
    return torch.cat(preds), torch.cat(costs)


class _Scored(Exception):
    """Stops a probe pass once the layer it reads has scored its tokens."""


@torch.inference_mode()
def attention_entropy(model: nn.Module, images: Tensor, *, batch_size: int = 256) -> list[float]:
    """Per layer, how spread the attention is that ATS scores tokens by, in a dense pass: the
    entropy of the CLS query's attention over the patch tokens (a model without a class token:
    of the attention each patch receives), per head, divided by log(patches) (0: all on one
    patch, 1: uniform), mean over heads and images.

    Sampling by significance only pays where this falls below 1: a checkpoint whose scores are
    near uniform gives ATS nothing to choose by, however many tokens it keeps. Each layer is
    read from its dense input (the model's own pass up to it); the model's schedule is kept.
    """
    family = family_of(model)
    _validate.finite_images(images)
    caps, layer_options = family.caps(), family.layer_options()
    was_training = model.training
    model.eval()
    p, n, depth = family.num_prefix_tokens, family.num_patches, family.depth
    if n < 2:
        raise ValueError(f"attention entropy needs at least 2 patch tokens, the model has {n}")
    sums = torch.zeros(depth, dtype=torch.float64)
    read_images = [0] * depth

    def read(layer: int) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            scores = args[0][..., p:].double()  # (b, h, n) over the patch tokens
            share = scores / scores.sum(-1, keepdim=True).clamp_min(1e-300)
            entropy = -(share * share.clamp_min(1e-300).log()).sum(-1) / math.log(n)  # (b, h)
            sums[layer] += entropy.mean(-1).sum().cpu()
            read_images[layer] += len(entropy)
            raise _Scored

        return hook

    try:
        configure(family, None)
        paper = family.options()
        for batch in images.split(batch_size):
            _, _, inputs = family.capture(batch)
            for layer in range(depth):
                # only this layer samples (one token fewer than it has): it scores, then stops
                family.set_schedule([n - 1 if i == layer else n for i in range(depth)], paper)
                handle = family.sampling_layers()[layer].register_forward_pre_hook(read(layer))
                try:
                    family.run(batch, start=layer, hidden=inputs[layer])
                except _Scored:
                    pass
                finally:
                    handle.remove()
    finally:
        family.set_schedule(caps, list(layer_options))
        model.train(was_training)
    if read_images != [len(images)] * depth:
        raise RuntimeError(f"{family.name} scored {read_images} of {len(images)} images per layer")
    return (sums / len(images)).tolist()


def time_budgets(
    model: nn.Module,
    budgets: Sequence[Budget | None],
    images: Tensor,
    *,
    repeats: int = 5,
    warmup: int = 1,
    dtype: torch.dtype | None = None,
    shuffle: int | None = None,
) -> list[Timing]:
    """Seconds per forward pass over ``images`` under each budget: the budgets run interleaved
    round-robin (:func:`ats_vit.timing.time_round_robin`), so machine load hits them alike;
    ``shuffle``: in an order drawn from this seed each round. Setting the model to a budget
    before each pass is not timed."""
    family = family_of(model)
    for budget in budgets:
        if budget is not None:
            budget.check(family)

    autocast = torch.autocast(images.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    @torch.inference_mode()
    def run() -> None:
        with autocast:
            family.run(images)

    def setting(budget: Budget | None) -> Any:
        # sets numbers on the sampling modules (nothing is rebuilt), ~0.1 ms of Python: untimed
        return lambda: configure(family, budget)

    fns = {str(i): run for i in range(len(budgets))}
    setup = {str(i): setting(b) for i, b in enumerate(budgets)}
    times = time_round_robin(fns, warmup, repeats, images.device, setup=setup, shuffle=shuffle)
    return [times[str(i)] for i in range(len(budgets))]


def _timing_images(data: Dataset, count: int, device: torch.device) -> Tensor | None:
    """Up to ``count`` readable images of ``data``, stacked (fewer when the split is smaller)."""
    loader = DataLoader(data, batch_size=count, collate_fn=collate_skipping)
    for images, _, _ in loader:
        if images is not None:
            return images.to(device)
    return None


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
    items: Tensor | None = None,
    agreement: bool = False,
    dtype: torch.dtype | None = None,
) -> list[dict[str, Any]]:
    """One row per ``(label, budget)`` (``None``: dense): accuracy with its 95% interval over
    the independent ``items`` (as in :func:`evaluate`), kept tokens, GFLOPs, and
    throughput measured in one interleaved run over one batch of up to ``timing_batch`` images
    (the whole split when it is smaller: ``timing_images`` says how many were timed). Each
    row has the median images/s and speed-up over the first row (when it is dense) with their
    interquartile ranges over the interleaved rounds, and (when the first row is dense, in
    one process) its accuracy minus dense's with the exact paired test's two-sided p over the
    items (``vs_dense_diff``, ``vs_dense_p``). ``agreement``: score agreement with the dense
    model's top-1 instead of the labels (unlabelled data; the first row must be dense, and
    ``accuracy`` is then that agreement). ``dtype``: evaluate and time under autocast to it.
    ``timing_repeats=0``, or several processes: no timing (NaN). Every budget is checked
    against the model before any work."""
    family = _classifier(model)
    for _, budget in budgets:
        if budget is not None:
            budget.check(family)
    rank, world = rank_world()
    rows = []
    quiet = not progress or rank != 0
    if agreement and (not budgets or budgets[0][1] is not None):
        raise ValueError(
            "agreement with the dense model needs the dense row first: budgets[0] = ('dense', None)"
        )
    correct: list[Tensor | None] = []
    reference: Tensor | None = None
    for label, budget in progress_bar(iterable=budgets, desc="budgets", unit="budget", disable=quiet):
        configure(family, budget)
        result, correct_each, predicted = _evaluate(
            model, data, batch_size, workers, False, items, reference, dtype
        )
        if agreement and reference is None:  # the dense row: its predictions are the reference
            reference = predicted
            result, correct_each, _ = _evaluate(
                model, data, batch_size, workers, False, items, reference, dtype
            )
        correct.append(correct_each)
        rows.append(dict(label=label, budget=None if budget is None else budget.to_dict(), **result))
    dense_first = bool(budgets) and budgets[0][1] is None
    for row, correct_each in zip(rows, correct, strict=True):
        row["vs_dense_diff"], row["vs_dense_p"] = math.nan, math.nan
        dense_each = correct[0]
        if dense_first and correct_each is not None and dense_each is not None:
            pairs = torch.arange(len(correct_each)) if items is None else items
            row["vs_dense_diff"], row["vs_dense_p"] = paired_test(correct_each, dense_each, pairs)
    images = None
    if timing_repeats > 0 and world == 1 and rows:
        images = _timing_images(data, timing_batch, next(model.parameters()).device)
    timings = (
        []
        if images is None
        else time_budgets(model, [b for _, b in budgets], images, repeats=timing_repeats, dtype=dtype)
    )
    nan = math.nan
    for i, row in enumerate(rows):
        row["gflops_ratio"] = row["gflops"] / rows[0]["gflops"] if dense_first else nan
        row["timing_images"] = 0 if images is None else len(images)
        row.update(
            img_per_s=nan, img_per_s_q1=nan, img_per_s_q3=nan, speedup=nan, speedup_q1=nan, speedup_q3=nan
        )
        if timings and images is not None:
            rate = timings[i].per_second(len(images))
            row["img_per_s"], (row["img_per_s_q1"], row["img_per_s_q3"]) = rate.median, rate.quartiles()
            row["img_per_s_spread"] = rate.spread
            if dense_first:
                up = speedup(timings[0], timings[i])
                row["speedup"], (row["speedup_q1"], row["speedup_q3"]) = up.median, up.quartiles()
                row["speedup_spread"] = up.spread
    configure(family, None)
    return rows
