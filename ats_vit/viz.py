"""Pictures: which patches each sampling layer kept, and accuracy against GFLOPs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from einops import rearrange
from torch import Tensor

from ats_vit.flops import TokenTrace

__all__ = ["kept_patch_masks", "plot_accuracy_vs_gflops", "plot_frontier", "save_kept_tokens_grid"]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover
        raise ImportError("pictures need matplotlib: pip install 'ats-vit[viz]'") from exc
    return plt


def _save(fig, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    _pyplot().close(fig)
    return path


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
    """A PNG grid: one row per image, the input and then each sampling layer's patches (kept
    ones outlined in green, dropped ones dimmed and tinted), under ``title`` (say which model
    and budget). images: (b, c, H, W)."""
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
    if title:
        fig.suptitle(title, fontsize=8, wrap=True)
    return _save(fig, path, dpi=110)


def plot_accuracy_vs_gflops(rows: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """rows: dicts with 'gflops', 'accuracy' and 'label' (one point per budget, as from
    :func:`ats_vit.evaluate.evaluate_budgets`)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    xs = [r["gflops"] for r in rows]
    ys = [100 * r["accuracy"] for r in rows]
    ax.plot(xs, ys, "o")
    # short labels, alternating above / below in GFLOPs order, so close budgets stay legible
    order = sorted(range(len(rows)), key=lambda i: xs[i])
    for rank, i in enumerate(order):
        offset = (3, 6 if rank % 2 else -12)
        ax.annotate(rows[i]["label"], (xs[i], ys[i]), textcoords="offset points", xytext=offset, fontsize=7)
    ax.set_xlabel("GFLOPs per image (tokens actually kept)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title or "accuracy vs GFLOPs without fine-tuning", fontsize=9)
    ax.grid(alpha=0.3)
    return _save(fig, path, dpi=120)


def plot_frontier(rows: Sequence[dict], path: str | Path) -> Path:
    """One panel per checkpoint, one curve per method: test accuracy against GFLOPs (as a
    fraction of dense) with the 95% interval of the test split (``ats-vit bench frontier``)."""
    plt = _pyplot()
    checkpoints = list(dict.fromkeys(r["checkpoint"] for r in rows))
    fig, axes = plt.subplots(1, len(checkpoints), figsize=(5.2 * len(checkpoints), 4.0), squeeze=False)
    for ax, name in zip(axes[0], checkpoints, strict=True):
        mine = [r for r in rows if r["checkpoint"] == name]
        for method in dict.fromkeys(r["method"] for r in mine):
            points = sorted((r for r in mine if r["method"] == method), key=lambda r: r["gflops_ratio"])
            xs = [r["gflops_ratio"] for r in points]
            ys = [100 * r["accuracy"] for r in points]
            errs = [100 * r["ci95"] for r in points]
            if method == "dense":
                ax.axhline(ys[0], color="grey", linewidth=0.8, linestyle="--", label="dense")
                continue
            ax.errorbar(xs, ys, yerr=errs, marker="o", markersize=3, capsize=2, linewidth=1, label=method)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("GFLOPs / dense GFLOPs (test split)")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    return _save(fig, path, dpi=120)
