"""A harder benchmark task at DeiT's token count: digits among letters on a 14 x 14 grid.

Every image is its own random draw, so the items of a test set are independent (unlike the demo
splits, which place each held-out digit several times): a digit, rendered from the font that
Pillow bundles and distorted by a random scale, rotation and shear, sits at a random place on a
56 x 56 canvas among smaller, dimmer letters, with noise. With 4 x 4 patches that is 196 tokens,
as DeiT at 224/16, of which the digit covers a few dozen. Generation is vectorised (one
``grid_sample`` per batch of glyphs) and seeded per split, so every split is the same on every
machine and a 10,000-image test split takes seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import TensorDataset

__all__ = ["GlyphConfig", "glyph_split"]

DIGITS = "0123456789"
LETTERS = "ACEFHKLMNPRTUVWXY"  # letters that do not look like digits
TEMPLATE = 64  # side of the pre-rendered glyphs, pixels
SPLIT_SEEDS = {"train": 1, "val": 2, "test": 3}


@dataclass(frozen=True)
class GlyphConfig:
    canvas: int = 56  # image side, pixels (4 x 4 patches: 196 tokens)
    digit_size: tuple[int, int] = (20, 28)  # the digit's height, pixels
    letter_size: tuple[int, int] = (9, 16)  # the letters' height, pixels
    letters: int = 4  # letters per image
    letter_intensity: tuple[float, float] = (0.35, 0.8)
    rotation: float = 15.0  # degrees, either way
    shear: float = 0.15
    noise: float = 0.08
    train: int = 32_000
    val: int = 4_000
    test: int = 10_000
    seed: int = 0


@lru_cache(maxsize=1)
def glyph_templates() -> Tensor:
    """(len(DIGITS + LETTERS), TEMPLATE, TEMPLATE) glyphs in [0, 1], rendered once from the
    font Pillow bundles, centred."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=int(TEMPLATE * 0.8))
    glyphs = []
    for char in DIGITS + LETTERS:
        image = Image.new("L", (TEMPLATE, TEMPLATE))
        ImageDraw.Draw(image).text((TEMPLATE / 2, TEMPLATE / 2), char, fill=255, font=font, anchor="mm")
        glyphs.append(
            torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(TEMPLATE, TEMPLATE)
        )
    return torch.stack(glyphs).float() / 255.0


def _place(templates: Tensor, canvas: int, height: Tensor, gen: torch.Generator, cfg: GlyphConfig) -> Tensor:
    """templates: (n, T, T) drawn at ``height`` pixels (n,), a random rotation, shear and
    place (fully on the canvas) -> (n, canvas, canvas)."""
    n = templates.shape[0]
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(cfg.rotation)
    shear = (torch.rand(n, generator=gen) * 2 - 1) * cfg.shear
    cos, sin = angle.cos(), angle.sin()
    # canvas offsets -> template offsets: undo the shear, then the rotation, then the scale
    rot_inv = torch.stack((torch.stack((cos, sin), -1), torch.stack((-sin, cos), -1)), -2)  # (n, 2, 2)
    shear_inv = torch.zeros(n, 2, 2)
    shear_inv[:, 0, 0] = shear_inv[:, 1, 1] = 1.0
    shear_inv[:, 0, 1] = -shear
    scale = (canvas * 0.8) / height  # the template's glyph is about 0.8 of its side
    linear = scale[:, None, None] * (rot_inv @ shear_inv)
    half = (height / canvas).clamp(max=0.9)  # keep the glyph's centre away from the border
    centre = (torch.rand(n, 2, generator=gen) * 2 - 1) * (1 - half[:, None])
    theta = torch.cat((linear, -(linear @ centre[:, :, None])), dim=2)
    grid = F.affine_grid(theta, [n, 1, canvas, canvas], align_corners=False)
    return F.grid_sample(templates[:, None], grid, align_corners=False)[:, 0]


def _render(count: int, cfg: GlyphConfig, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    templates = glyph_templates()
    labels = torch.randint(0, len(DIGITS), (count,), generator=gen)
    low, high = cfg.digit_size
    height = low + torch.rand(count, generator=gen) * (high - low)
    image = _place(templates[labels], cfg.canvas, height, gen, cfg)
    for _ in range(cfg.letters):
        which = len(DIGITS) + torch.randint(0, len(LETTERS), (count,), generator=gen)
        low, high = cfg.letter_size
        size = low + torch.rand(count, generator=gen) * (high - low)
        dim = cfg.letter_intensity[0] + torch.rand(count, 1, 1, generator=gen) * (
            cfg.letter_intensity[1] - cfg.letter_intensity[0]
        )
        image = torch.maximum(image, dim * _place(templates[which], cfg.canvas, size, gen, cfg))
    image = image + cfg.noise * torch.randn(image.shape, generator=gen)
    return image.clamp(0, 1)[:, None], labels


def glyph_split(split: str, cfg: GlyphConfig = GlyphConfig(), chunk: int = 4096) -> TensorDataset:
    """(image (1, canvas, canvas) in [0, 1], digit label) of one split ("train", "val" or
    "test"), each from its own generator seeded by ``cfg.seed`` and the split."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {tuple(SPLIT_SEEDS)}, got {split!r}")
    count = getattr(cfg, split)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + SPLIT_SEEDS[split])
    parts = [_render(min(chunk, count - start), cfg, gen) for start in range(0, count, chunk)]
    images = torch.cat([p[0] for p in parts])
    labels = torch.cat([p[1] for p in parts])
    return TensorDataset(images, labels)
