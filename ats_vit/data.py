"""Datasets: a bundled demo task where most patches are background, and ImageFolder.

The demo task ("cluttered digits") takes scikit-learn's bundled 8x8 handwritten digits (real
data, no download), upsamples each to 16x16, and places it at a random position on a larger
canvas strewn with small fragments of other digits, like Cluttered MNIST. Only a few patches
matter, which is where adaptive token sampling pays off. Everything is generated once, from
a seed, so the data set is identical on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from ats_vit import _validate

__all__ = ["DemoConfig", "DemoSplits", "cluttered_digits", "image_folder"]


@dataclass(frozen=True)
class DemoConfig:
    canvas: int = 48  # image side, pixels
    digit: int = 16  # side of a placed digit, pixels
    fragments: int = 6  # clutter pieces per image
    fragment: int = 5  # side of a clutter piece, pixels
    align: int = 8  # digits start on multiples of this (the patch size: one cell of the grid)
    train_copies: int = 4  # placements of each training digit
    test_copies: int = 3  # placements of each validation and test digit (steadier estimates)
    val_fraction: float = 0.1  # digits held out for choosing settings (calibration, recipes)
    test_fraction: float = 0.2  # digits held out for reporting
    seed: int = 0


class DemoSplits(NamedTuple):
    """Disjoint handwritten digits in each split: ``val`` is for choosing settings (budgets,
    recipes), ``test`` only for reporting."""

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset


def _load_digits() -> tuple[Tensor, Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError("the demo data set needs scikit-learn: pip install 'ats-vit[demo]'") from exc
    digits = load_digits()
    images = torch.from_numpy(digits.images).float() / 16.0  # (n, 8, 8) in [0, 1]
    return images, torch.from_numpy(digits.target).long()


def _paste(canvas: Tensor, pieces: Tensor, y: Tensor, x: Tensor) -> None:
    """canvas: (n, c, c) <- max with pieces: (n, f, f) whose top-left corners are y, x: (n,)."""
    n, f = pieces.shape[0], pieces.shape[-1]
    offsets = torch.arange(f)
    rows = (y[:, None] + offsets)[:, :, None]  # (n, f, 1)
    cols = (x[:, None] + offsets)[:, None, :]  # (n, 1, f)
    image = torch.arange(n)[:, None, None]
    canvas[image, rows, cols] = torch.maximum(canvas[image, rows, cols], pieces)


def _render(digits: Tensor, sources: Tensor, cfg: DemoConfig, gen: torch.Generator) -> Tensor:
    """digits: (n, s, s) placed once each; sources: (m, s, s) to cut clutter from -> (n, 1, c, c)."""
    n, s, c, f = digits.shape[0], cfg.digit, cfg.canvas, cfg.fragment
    canvas = torch.zeros(n, c, c)
    windows = sources.unfold(1, f, 1).unfold(2, f, 1)  # (m, s-f+1, s-f+1, f, f): every clutter piece
    for _ in range(cfg.fragments):
        pick = torch.randint(0, sources.shape[0], (n,), generator=gen)
        top, left = (torch.randint(0, s - f + 1, (n,), generator=gen) for _ in range(2))
        y, x = (torch.randint(0, c - f + 1, (n,), generator=gen) for _ in range(2))
        _paste(canvas, windows[pick, top, left], y, x)
    # a random cell of the alignment grid: a small ViT learns aligned digits in minutes, while
    # fragments land anywhere, so most patches are clutter or background
    cells = (c - s) // cfg.align + 1
    y, x = (cfg.align * torch.randint(0, cells, (n,), generator=gen) for _ in range(2))
    _paste(canvas, digits, y, x)
    return canvas.unsqueeze(1)


def cluttered_digits(cfg: DemoConfig = DemoConfig()) -> DemoSplits:
    """(train, val, test) of (image (1, canvas, canvas) in [0, 1], label) built from ``cfg.seed``.

    The splits hold disjoint handwritten digits; clutter for each split is cut from that
    split's digits only. Each split renders from its own generator, so changing how the
    training split is made (``train_copies``) leaves the validation and test images as they are.
    """
    if cfg.digit > cfg.canvas or cfg.fragment > cfg.digit:
        raise ValueError(f"need fragment <= digit <= canvas, got {cfg}")
    _validate.positive_int("align", cfg.align)
    _validate.positive_int("train_copies", cfg.train_copies)
    _validate.positive_int("test_copies", cfg.test_copies)
    for name in ("val_fraction", "test_fraction"):
        if not 0.0 < getattr(cfg, name) < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {getattr(cfg, name)}")
    if cfg.val_fraction + cfg.test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction + test_fraction must be < 1 (training needs digits), got "
            f"{cfg.val_fraction} + {cfg.test_fraction}"
        )
    images, labels = _load_digits()
    images = F.interpolate(images.unsqueeze(1), size=cfg.digit, mode="bilinear", align_corners=False)
    images = images.squeeze(1).clamp(0, 1)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(cfg.seed))
    n_test, n_val = round(cfg.test_fraction * len(labels)), round(cfg.val_fraction * len(labels))
    parts = dict(
        test=(order[:n_test], cfg.test_copies),
        val=(order[n_test : n_test + n_val], cfg.test_copies),
        train=(order[n_test + n_val :], cfg.train_copies),
    )
    splits = {}
    for i, (name, (idx, copies)) in enumerate(parts.items()):
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + i + 1)
        rendered = _render(images[idx].repeat(copies, 1, 1), images[idx], cfg, gen)
        splits[name] = TensorDataset(rendered, labels[idx].repeat(copies))
    return DemoSplits(**splits)


def image_folder(root: str | Path, image_size: int, *, train: bool = False) -> Dataset:
    """torchvision ImageFolder resized to ``image_size``, normalised as ImageNet models expect.

    Raises ValueError for a missing or empty folder (torchvision's own message is about
    file extensions, which hides the usual mistake: a wrong path).
    """
    try:
        from torchvision import datasets, transforms
    except ImportError as exc:  # pragma: no cover
        raise ImportError("ImageFolder data needs torchvision: pip install 'ats-vit[timm]'") from exc
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"data folder {str(root)!r} does not exist or is not a directory")
    if not any(p.is_dir() for p in root.iterdir()):
        raise ValueError(
            f"data folder {str(root)!r} has no class sub-folders (expected root/<class>/<image>)"
        )
    resize = [transforms.Resize(int(image_size * 1.14)), transforms.CenterCrop(image_size)]
    if train:
        resize = [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip()]
    tf = transforms.Compose(
        [*resize, transforms.ToTensor(), transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    )
    try:
        return datasets.ImageFolder(str(root), transform=tf)
    except (FileNotFoundError, RuntimeError) as exc:
        raise ValueError(f"data folder {str(root)!r} holds no readable images: {exc}") from exc
