"""Datasets: a bundled demo task where most patches are background, and ImageFolder.

The demo task ("cluttered digits") takes scikit-learn's bundled 8x8 handwritten digits (real
data, no download), upsamples each to 16x16, and places it at a random position on a larger
canvas strewn with small fragments of other digits, like Cluttered MNIST. Only a few patches
matter, which is where adaptive token sampling pays off. Everything is generated once, from
a seed, so the data set is identical on every machine.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from ats_vit import _validate

__all__ = [
    "BadImageError",
    "DemoConfig",
    "bundled",
    "calibration_items",
    "cluttered_digits",
    "image_folder",
    "load_split",
    "take",
]


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


class BadImageError(ValueError):
    """An image file that cannot be read; the message names the file."""


def _reader(mode: str, image_size: int | None = None) -> Callable[[str], Any]:
    """A loader giving PIL's image of a path in ``mode`` ("RGB" or "L"), or
    :class:`BadImageError` naming the file. The first image far from ``image_size`` (a side
    below half of it or above four times it), which resizing changes beyond recognition, is
    named in a warning (once per data set and process)."""
    warned = False

    def read(path: str) -> Any:
        nonlocal warned
        from PIL import Image, UnidentifiedImageError

        try:
            with open(path, "rb") as f:
                image = Image.open(f).convert(mode)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
            raise BadImageError(
                f"cannot read image {path!r} ({type(exc).__name__}: {exc}); fix or remove it, or "
                "leave unreadable images out (skip_bad=True; they are counted)"
            ) from exc
        if image_size is not None and not warned:
            w, h = image.size
            if min(w, h) < image_size / 2 or max(w, h) > 4 * image_size:
                warned = True
                warnings.warn(
                    f"{path} is {w}x{h} pixels and is resized to the model's {image_size}: far from it, the "
                    "image loses or invents most of its detail (said once per data set)",
                    UserWarning,
                    stacklevel=2,
                )
        return image

    return read


class _SkipBad(Dataset):
    """An ImageFolder whose unreadable images come back as None (see :func:`collate_skipping`)."""

    def __init__(self, folder: Any) -> None:
        self.folder = folder
        self.classes: list[str] = folder.classes

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int) -> Any:
        try:
            return self.folder[i]
        except BadImageError:
            return None


def collate_skipping(items: list) -> tuple[Tensor | None, Tensor | None, int]:
    """Default collation that drops the ``None`` items of unreadable images:
    (images or None, labels or None, how many were dropped)."""
    from torch.utils.data import default_collate

    good = [item for item in items if item is not None]
    if not good:
        return None, None, len(items)
    images, labels = default_collate(good)
    return images, labels, len(items) - len(good)


def image_folder(
    root: str | Path,
    image_size: int,
    *,
    channels: int = 3,
    train: bool = False,
    transform: Callable[[Any], Tensor] | None = None,
    skip_bad: bool = False,
) -> Dataset:
    """torchvision ImageFolder resized to ``image_size`` (or preprocessed by ``transform``, e.g.
    a pretrained model's own). ``channels=3``: RGB, normalised as ImageNet models expect;
    ``channels=1``: grayscale in [0, 1], as the demo data (so a 1-channel demo checkpoint can
    read a folder of images).

    An unreadable image raises :class:`BadImageError` naming the file when it is loaded; with
    ``skip_bad`` it is returned as None instead, for :func:`collate_skipping` to drop and count.

    Raises ValueError for a missing or empty folder (torchvision's own message is about
    file extensions, which hides the usual mistake: a wrong path).
    """
    try:
        from torchvision import datasets, transforms
    except ImportError as exc:  # pragma: no cover
        raise ImportError("ImageFolder data needs torchvision: pip install 'ats-vit[timm]'") from exc
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
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
    normalise = [transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))] if channels == 3 else []
    tf = transform or transforms.Compose([*resize, transforms.ToTensor(), *normalise])
    try:
        folder = datasets.ImageFolder(
            str(root), transform=tf, loader=_reader("RGB" if channels == 3 else "L", image_size)
        )
    except (FileNotFoundError, RuntimeError) as exc:
        raise ValueError(f"data folder {str(root)!r} holds no readable images: {exc}") from exc
    return _SkipBad(folder) if skip_bad else folder


# what each split is for: training, choosing settings (calibration), reporting
SPLITS = ("train", "calib", "test")
# the data sets ats-vit generates; "NAME@SEED" draws all of a data set's splits from another seed
BUNDLED = ("demo", "glyphs")


def bundled(spec: str) -> tuple[str, int] | None:
    """``(name, seed)`` of a bundled data set's spec (``"demo"``, ``"glyphs@3"``), or None for
    a folder. Each seed is its own draw of every split. ``glyphs@SEED`` renders new images
    for every split, so checkpoints of different seeds share no image. ``demo@SEED`` draws
    another partition of the same 1,797 handwritten digits into train/calibration/test and
    places them anew: a seed's test digits were another seed's training digits, so demo seeds
    repeat the weights' and the split's randomness but not the digits themselves."""
    name, at, seed = spec.partition("@")
    if name not in BUNDLED:
        return None
    if not at:
        return name, 0
    if not seed.isdigit():
        raise ValueError(
            f"data {spec!r}: after '@' comes the data seed, a non-negative integer (e.g. {name}@3)"
        )
    return name, int(seed)


def load_split(
    spec: str,
    split: str,
    image_size: int,
    *,
    channels: int = 3,
    transform: Callable[[Any], Tensor] | None = None,
    skip_bad: bool = False,
) -> Dataset:
    """One split of the data named by ``spec``.

    ``spec="demo"``: the bundled cluttered digits (``calib`` is their validation split).
    ``spec="glyphs"``: the 196-token benchmark task (:mod:`ats_vit.glyphs`). ``"demo@SEED"``,
    ``"glyphs@SEED"``: the same task drawn from another seed (``@0`` is the plain name). A
    folder root: ``train`` is ``ROOT/train`` with training augmentation, ``calib`` the same
    images without it (settings are chosen on training images, never on the reported ones),
    ``test`` is ``ROOT/val``. ``transform`` replaces the evaluation preprocessing of a folder
    (for pretrained models, their own); only the folders a split needs must exist.
    """
    _validate.choice("split", split, SPLITS)
    known = bundled(spec)
    if known is not None and known[0] == "demo":
        splits = cluttered_digits(DemoConfig(seed=known[1]))
        return {"train": splits.train, "calib": splits.val, "test": splits.test}[split]
    if known is not None:
        from ats_vit.glyphs import GlyphConfig, glyph_split

        which = {"train": "train", "calib": "val", "test": "test"}[split]
        return glyph_split(which, GlyphConfig(seed=known[1]))
    root = Path(spec)
    if not root.is_dir():
        raise ValueError(
            f"data folder {spec!r} does not exist or is not a directory (the bundled data sets: "
            f"{', '.join(BUNDLED)}, or NAME@SEED)"
        )
    folder = root / ("val" if split == "test" else "train")
    if not folder.is_dir():
        raise ValueError(
            f"data folder {str(root)!r} has no {folder.name}/ sub-folder, which the {split!r} split "
            f"reads (expected ROOT/train/<class>/... for training and calibration, ROOT/val/<class>/... "
            f"for evaluation)"
        )
    return image_folder(
        folder, image_size, channels=channels, train=split == "train", transform=transform, skip_bad=skip_bad
    )


def source_items(spec: str, split: str, count: int) -> Tensor:
    """(count,) the independent item each image of a split comes from, for intervals and
    paired tests that count items, not images: the demo places each held-out digit
    ``test_copies`` times (image i shows digit i mod the split's digits); every glyph image and
    every folder image is its own item."""
    known = bundled(spec)
    if known is None or known[0] != "demo" or split == "train":
        return torch.arange(count)
    cfg = DemoConfig()
    total = len(_load_digits()[1])
    digits = round((cfg.test_fraction if split == "test" else cfg.val_fraction) * total)
    if count % digits:
        raise ValueError(
            f"a demo {split} split of {count} images is not {cfg.test_copies} copies of {digits} digits"
        )
    return torch.arange(count) % digits


def take_index(size: int, count: int | None = None, seed: int = 0) -> Tensor:
    """Which of ``size`` images :func:`take` takes: ``count`` drawn without replacement by
    ``seed``, or all in order when ``count`` is None or at least ``size``."""
    if count is None or count >= size:
        return torch.arange(size)
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed))[
        : _validate.positive_int("count", count)
    ]


def calibration_items(
    spec: str, split: str, size: int, count: int | None = None, seed: int = 0
) -> Tensor | None:
    """The independent source item of each image that ``take(split, count, seed)`` takes from
    a split of ``size`` images of ``spec`` (:func:`source_items`): what `auto`'s switch rule
    counts (the demo's calibration split places each digit several times). None where every
    image is its own item (glyphs, folders: also when unreadable images were skipped)."""
    known = bundled(spec)
    if known is None or known[0] != "demo":
        return None
    return source_items(spec, split, size)[take_index(size, count, seed)]


def take(data: Any, count: int | None = None, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(images, labels) of ``count`` items drawn without replacement by ``seed`` (all, in
    order, when ``count`` is None or at least the data set's size), stacked into tensors."""
    index = take_index(len(data), count, seed)
    if isinstance(data, TensorDataset):
        images, labels = data.tensors[:2]
        return images[index], labels[index]
    items = [item for item in (data[i] for i in index.tolist()) if item is not None]
    if not items:
        raise ValueError("no readable images to take")
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])
