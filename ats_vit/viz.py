"""Pictures: which patches each sampling layer kept, and accuracy against GFLOPs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import Tensor

from ats_vit._io import write_atomic
from ats_vit.flops import TokenTrace
from ats_vit.stats import binomial_ci95

__all__ = ["kept_patch_masks", "plot_accuracy_vs_cost", "plot_frontier", "save_kept_tokens_grid"]


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover
        raise ImportError("pictures need matplotlib: pip install 'ats-vit[viz]'") from exc
    return plt


def _save(fig: Any, path: str | Path, dpi: int) -> Path:
    """The figure as a PNG at ``path``, written whole or not at all."""
    fig.tight_layout()
    try:
        return write_atomic(path, lambda file: fig.savefig(file, dpi=dpi, format="png"), binary=True)
    finally:
        _pyplot().close(fig)


def kept_patch_masks(trace: TokenTrace, grid: tuple[int, int]) -> dict[int, Tensor]:
    """Per sampling layer, (b, gh, gw) bool: True where the patch was still alive after it."""
    gh, gw = grid
    p = trace.num_prefix_tokens
    masks = {}
    for layer, positions in trace.positions.items():
        b = positions.shape[0]
        alive = torch.zeros(b, gh * gw + 1, dtype=torch.bool, device=positions.device)
        patch = torch.where(positions >= p, positions - p, gh * gw)  # prefix and padding -> spare slot
        alive.scatter_(1, patch, True)
        masks[layer] = alive[:, :-1].reshape(b, gh, gw).cpu()
    return masks


def save_kept_tokens_grid(
    images: Tensor, trace: TokenTrace, patch_size: int, path: str | Path, title: str = ""
) -> Path:
    """A PNG grid: one row per image, the input and then the patches of each layer that
    sampled (kept ones outlined in green, the others dimmed and tinted: dropped, or, under a
    merging rule, merged into a kept token), under ``title`` (say which model and budget) and
    a key that says which layers sampled. images: (b, c, H, W)."""
    plt = _pyplot()
    b, c, h, w = images.shape
    masks = kept_patch_masks(trace, (h // patch_size, w // patch_size))
    if not masks:
        raise ValueError("no layer sampled tokens in this forward pass; nothing to show")
    pics = images.detach().float().cpu()
    pics = (pics - pics.amin(dim=(1, 2, 3), keepdim=True)) / (
        pics.amax(dim=(1, 2, 3), keepdim=True) - pics.amin(dim=(1, 2, 3), keepdim=True)
    ).clamp_min(1e-6)
    pics = pics.expand(-1, 3, -1, -1) if c == 1 else pics[:, :3]
    cols = 1 + len(masks)
    fig, axes = plt.subplots(b, cols, figsize=(1.8 * cols, 1.8 * b), squeeze=False)
    tint = torch.tensor([0.20, 0.05, 0.30]).view(3, 1, 1)
    for i in range(b):
        axes[i, 0].imshow(rearrange(pics[i], "c h w -> h w c").numpy())
        axes[i, 0].set_title("input" if i == 0 else "", fontsize=8)
        for j, (layer, mask) in enumerate(masks.items(), start=1):
            keep = mask[i].repeat_interleave(patch_size, 0).repeat_interleave(patch_size, 1)
            shown = torch.where(keep, pics[i], 0.25 * pics[i] + tint)  # dropped: dimmed, tinted
            axes[i, j].imshow(rearrange(shown, "c h w -> h w c").clamp(0, 1).numpy())
            for r, c_ in mask[i].nonzero().tolist():  # kept: outlined, so kept background shows too
                axes[i, j].add_patch(
                    plt.Rectangle(
                        (c_ * patch_size - 0.5, r * patch_size - 0.5),
                        patch_size,
                        patch_size,
                        fill=False,
                        edgecolor="lime",
                        linewidth=0.8,
                    )
                )
            kept = int(mask[i].sum())
            axes[i, j].set_title(
                f"after layer {layer}: {kept} kept" if i == 0 else f"{kept} kept", fontsize=8
            )
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    merging = any(rule is not None and rule.merges for rule in trace.rules)
    others = "dimmed: dropped, or merged into a kept token" if merging else "dimmed: dropped"
    sampled = ", ".join(str(layer) for layer in masks)
    quiet = sum(rule is None for rule in trace.rules[min(masks) :])
    note = f"; {quiet} later layers kept all they got" if quiet else ""
    key = f"outlined: kept; {others}. Layers that sampled: {sampled}{note}."
    fig.suptitle(f"{title}\n{key}" if title else key, fontsize=8, wrap=True)
    return _save(fig, path, dpi=110)


def _accuracy_axis(ax: Any, values: Sequence[float], errors: Sequence[float], min_span: float = 4.0) -> None:
    """y-limits that hold every point with its interval and span at least ``min_span`` points,
    so a spread within noise does not fill the whole figure."""
    low = min(v - e for v, e in zip(values, errors, strict=True))
    high = max(v + e for v, e in zip(values, errors, strict=True))
    pad = max(0.0, min_span - (high - low)) / 2 + 0.3
    ax.set_ylim(max(0.0, low - pad), min(100.0, high + pad))
    ax.set_ylabel("top-1 accuracy (%), 95% interval")
    ax.grid(alpha=0.3)


def plot_accuracy_vs_cost(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Accuracy against GFLOPs and, when timed, against the measured speed-up: one marker per
    budget (named in the legend), with the accuracy's 95% interval (``ci95``) as error bars.

    rows: as from :func:`ats_vit.evaluate.evaluate_budgets` ('label', 'accuracy', 'images',
    'gflops_ratio' or 'gflops', and optionally 'speedup')."""
    plt = _pyplot()
    timed = any(not math.isnan(r.get("speedup", math.nan)) for r in rows)
    fig, axes = plt.subplots(1, 2 if timed else 1, figsize=(10.5 if timed else 5.8, 4.0), squeeze=False)
    ys = [100 * r["accuracy"] for r in rows]
    # rows of older eval.json files have no interval: every image counted as independent
    errs = [100 * r.get("ci95", binomial_ci95(r["accuracy"], max(int(r["images"]), 1))) for r in rows]
    use_ratio = not any(math.isnan(r.get("gflops_ratio", math.nan)) for r in rows)
    panels = [
        ("gflops_ratio" if use_ratio else "gflops", "GFLOPs / dense" if use_ratio else "GFLOPs per image")
    ]
    if timed:
        panels.append(("speedup", "speed-up over dense (median, IQR of timed rounds)"))
    markers = "osD^v<>phX*"
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        for i, r in enumerate(rows):
            x = r.get(key, math.nan)
            if math.isnan(x):
                continue
            method = (r.get("budget") or {}).get("method") or ("dense" if r.get("budget") is None else "")
            name = f"{r['label']} ({method})" if method and method != r["label"] else r["label"]
            # the speed-up's interquartile range over the timed rounds, where eval measured it
            low, high = r.get(f"{key}_q1", math.nan), r.get(f"{key}_q3", math.nan)
            xerr = (
                None if math.isnan(low) or math.isnan(high) else [[max(x - low, 0.0)], [max(high - x, 0.0)]]
            )
            ax.errorbar(
                [x],
                [ys[i]],
                yerr=[errs[i]],
                xerr=xerr,
                marker=markers[i % len(markers)],
                capsize=3,
                linestyle="",
                label=name,
            )
        ax.set_xlabel(label)
        _accuracy_axis(ax, ys, errs)
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle(title or "accuracy vs cost without fine-tuning", fontsize=9)
    return _save(fig, path, dpi=120)


def plot_frontier(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Per checkpoint, two panels: test accuracy against GFLOPs (as a fraction of dense) and
    against the measured speed-up, one curve per method, with 95% intervals over the test
    split's independent items (``ats-vit bench frontier``)."""
    plt = _pyplot()
    checkpoints = list(dict.fromkeys(r["checkpoint"] for r in rows))
    timed = any(not math.isnan(r.get("speedup", math.nan)) for r in rows)
    panels = [("gflops_ratio", "GFLOPs / dense GFLOPs (test split)")]
    if timed:
        panels.append(("speedup", "measured speed-up over dense"))
    fig, axes = plt.subplots(
        len(panels), len(checkpoints), figsize=(5.2 * len(checkpoints), 4.0 * len(panels)), squeeze=False
    )
    for column, name in enumerate(checkpoints):
        mine = [r for r in rows if r["checkpoint"] == name]
        values = [100 * r["accuracy"] for r in mine if r["method"] != "random"]
        errors = [100 * r["ci95"] for r in mine if r["method"] != "random"]
        for row_index, (key, label) in enumerate(panels):
            ax = axes[row_index][column]
            for method in dict.fromkeys(r["method"] for r in mine):
                points = sorted((r for r in mine if r["method"] == method), key=lambda r: r[key])
                xs = [r[key] for r in points]
                ys = [100 * r["accuracy"] for r in points]
                errs = [100 * r["ci95"] for r in points]
                if method == "dense":
                    ax.axhline(ys[0], color="grey", linewidth=0.8, linestyle="--", label="dense")
                    continue
                style = dict(linewidth=2.0) if method == "auto" else dict(linewidth=0.9)
                ax.errorbar(xs, ys, yerr=errs, marker="o", markersize=3, capsize=2, label=method, **style)
            ax.set_title(name, fontsize=9)
            ax.set_xlabel(label)
            _accuracy_axis(ax, values, errors)
            ax.legend(fontsize=6, ncol=2)
    return _save(fig, path, dpi=120)
