"""A tiny video task for video ViTs with ATS: which way does the digit move?

Each clip is ``frames`` frames of a ``canvas`` x ``canvas`` image: one 8 x 8 digit (scikit-learn's
bundled digits) moves by ``step`` pixels per frame in one of four directions (the label: right,
left, down, up) over noise. A single frame cannot tell the direction, so a model must compare
frames; the digit covers a handful of space-time patches, so a model that samples tokens has
something to find. Clips are drawn from a seed, vectorised, and each is its own draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ats_vit import _validate
from ats_vit.data import _load_digits, _paste

__all__ = ["VideoConfig", "moving_digits"]

DIRECTIONS = ("right", "left", "down", "up")
_VELOCITY = torch.tensor([[0, 1], [0, -1], [1, 0], [-1, 0]])  # (dy, dx) per direction


@dataclass(frozen=True)
class VideoConfig:
    frames: int = 4
    canvas: int = 32
    step: int = 4  # pixels the digit moves per frame
    noise: float = 0.1
    channels: int = 3  # VideoMAE's default input; the digit is grey


def moving_digits(count: int, cfg: VideoConfig = VideoConfig(), seed: int = 0) -> tuple[Tensor, Tensor]:
    """``count`` clips (count, frames, channels, canvas, canvas) in [0, 1] and their labels
    (count,): the index of the digit's direction in :data:`DIRECTIONS`."""
    count = _validate.positive_int("count", count)
    travel = cfg.step * (cfg.frames - 1)
    if cfg.canvas < 8 + travel:
        raise ValueError(
            f"canvas={cfg.canvas} cannot hold an 8-pixel digit that moves {travel} pixels; "
            f"use canvas >= {8 + travel} or a smaller step/frames"
        )
    gen = torch.Generator().manual_seed(seed)
    digits, _ = _load_digits()
    pick = torch.randint(0, digits.shape[0], (count,), generator=gen)
    labels = torch.randint(0, len(DIRECTIONS), (count,), generator=gen)
    velocity = _VELOCITY[labels] * cfg.step  # (count, 2)
    # a start from which the whole path stays on the canvas
    low = (-velocity * (cfg.frames - 1)).clamp_min(0)
    span = cfg.canvas - 8 - travel + 1
    start = low + torch.randint(0, span, (count, 2), generator=gen)
    clips = torch.rand(count, cfg.frames, cfg.canvas, cfg.canvas, generator=gen) * cfg.noise
    for t in range(cfg.frames):
        where = start + t * velocity
        frame = clips[:, t]
        _paste(frame, digits[pick], where[:, 0], where[:, 1])
    return clips[:, :, None].expand(-1, -1, cfg.channels, -1, -1).contiguous(), labels
