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

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from ats_vit import _validate

__all__ = ["DemoConfig", "cluttered_digits", "image_folder"]


@dataclass(frozen=True)
class DemoConfig:
    canvas: int = 48  # image side, pixels
    digit: int = 16  # side of a placed digit, pixels
    fragments: int = 6  # clutter pieces per image
    fragment: int = 5  # side of a clutter piece, pixels
    align: int = 8  # digits start on multiples of this (the patch size: one cell of the grid)
    train_copies: int = 4  # placements of each training digit
    test_copies: int = 3  # placements of each test digit (a steadier accuracy estimate)
    test_fraction: float = 0.2
    seed: int = 0


def _load_digits() -> tuple[Tensor, Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError("the demo data set needs scikit-learn: pip install 'ats-vit[demo]'") from exc
    digits = load_digits()
    images = torch.from_numpy(digits.images).float() / 16.0  # (n, 8, 8) in [0, 1]
    return images, torch.from_numpy(digits.target).long()


def _render(digits: Tensor, sources: Tensor, cfg: DemoConfig, gen: torch.Generator) -> Tensor:
    """digits: (n, s, s) placed once each; sources: (m, s, s) to cut clutter from -> (n, 1, c, c)."""
    n, s, c, f = digits.shape[0], cfg.digit, cfg.canvas, cfg.fragment
    canvas = torch.zeros(n, c, c)
    for _ in range(cfg.fragments):
        pick = torch.randint(0, sources.shape[0], (n,), generator=gen)
        top, left = (torch.randint(0, s - f + 1, (n,), generator=gen) for _ in range(2))
        y, x = (torch.randint(0, c - f + 1, (n,), generator=gen) for _ in range(2))
        for i in range(n):  # data generation runs once, off the model's path
            piece = sources[pick[i], top[i] : top[i] + f, left[i] : left[i] + f]
            region = canvas[i, y[i] : y[i] + f, x[i] : x[i] + f]
            torch.maximum(region, piece, out=region)
    # a random cell of the alignment grid: a small ViT learns aligned digits in minutes, while
    # fragments land anywhere, so most patches are clutter or background
    cells = (c - s) // cfg.align + 1
    y, x = (cfg.align * torch.randint(0, cells, (n,), generator=gen) for _ in range(2))
    for i in range(n):
        region = canvas[i, y[i] : y[i] + s, x[i] : x[i] + s]
        torch.maximum(region, digits[i], out=region)
    return canvas.unsqueeze(1)


def cluttered_digits(cfg: DemoConfig = DemoConfig()) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) of (image (1, canvas, canvas) in [0, 1], label) built from ``cfg.seed``.

    Train and test use disjoint handwritten digits; clutter for each split is cut from that
    split's digits only.
    """
    if cfg.digit > cfg.canvas or cfg.fragment > cfg.digit:
        raise ValueError(f"need fragment <= digit <= canvas, got {cfg}")
    _validate.positive_int("align", cfg.align)
    _validate.positive_int("train_copies", cfg.train_copies)
    _validate.positive_int("test_copies", cfg.test_copies)
    if not 0.0 < cfg.test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {cfg.test_fraction}")
    images, labels = _load_digits()
    images = F.interpolate(images.unsqueeze(1), size=cfg.digit, mode="bilinear", align_corners=False)
    images = images.squeeze(1).clamp(0, 1)
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(labels), generator=gen)
    n_test = round(cfg.test_fraction * len(labels))
    test_idx, train_idx = order[:n_test], order[n_test:]
    train_digits = images[train_idx].repeat(cfg.train_copies, 1, 1)
    train = TensorDataset(
        _render(train_digits, images[train_idx], cfg, gen), labels[train_idx].repeat(cfg.train_copies)
    )
    test_digits = images[test_idx].repeat(cfg.test_copies, 1, 1)
    test = TensorDataset(
        _render(test_digits, images[test_idx], cfg, gen), labels[test_idx].repeat(cfg.test_copies)
    )
    return train, test


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
