"""Training speed: steps per second of a checkpoint's model, dense and with budgets active."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from ats_vit._progress import bar as progress_bar
from ats_vit.bench.common import variant_names
from ats_vit.budget import Budget
from ats_vit.checkpoint import load_model
from ats_vit.data import load_split, take
from ats_vit.evaluate import measure
from ats_vit.timing import speedup, time_round_robin

__all__ = ["TrainSpeedConfig", "train_speed"]


@dataclass
class TrainSpeedConfig:
    """Training steps (forward, backward, AdamW) per second of a checkpoint's model, dense and
    with each budget active, timed interleaved on one batch of the demo data."""

    checkpoint: str
    budgets: tuple[str, ...]  # budget files
    batch_size: int = 64
    warmup: int = 2
    repeats: int = 10
    min_seconds: float = 5.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.budgets:
            raise ValueError("budgets must name at least one budget file")
        if self.batch_size < 1 or self.repeats < 1 or self.warmup < 0:
            raise ValueError(
                f"batch_size and repeats must be >= 1 and warmup >= 0, got {self.batch_size}, "
                f"{self.repeats}, {self.warmup}"
            )


TRAIN_SPEED_COLUMNS = (
    ("variant", "variant", "<28"),
    ("gflops_ratio", "GFLOPs (fwd)", ".3f"),
    ("steps_per_s", "steps/s", ".2f"),
    ("speedup", "speed-up", ".2f"),
    ("speedup_iqr", "(IQR)", "<11"),
    ("ideal", "ideal", ".2f"),
    ("efficiency", "efficiency", ".2f"),
)


def _step(
    model: torch.nn.Module, opt: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor
) -> None:
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(images), labels).backward()
    opt.step()


def train_speed(cfg: TrainSpeedConfig) -> list[dict[str, Any]]:
    """steps/s of each variant; speed-up over dense measured in the same run, ideal = dense
    forward GFLOPs / the variant's (training costs about three forward passes in both)."""

    base, model_cfg = load_model(cfg.checkpoint)
    images, labels = take(load_split("demo", "train", model_cfg.image_size), cfg.batch_size, cfg.seed)
    variants = {"dense": None, **{name: Budget.load(p) for name, p in variant_names(cfg.budgets).items()}}
    models: dict[str, torch.nn.Module] = {}
    steps: dict[str, Callable[[], object]] = {}
    costs: dict[str, float] = {}
    for name, budget in variants.items():
        model = copy.deepcopy(base)
        _, cost = measure(model, images, budget)  # configures the model with the budget too
        costs[name] = cost.double().mean().item()
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

        models[name], steps[name] = model, partial(_step, model, opt, images, labels)
    torch.manual_seed(cfg.seed)
    bar = progress_bar(total=len(steps) * (cfg.warmup + cfg.repeats), desc="train speed", unit="step")
    timings = time_round_robin(steps, cfg.warmup, cfg.repeats, progress=bar, min_seconds=cfg.min_seconds)
    bar.close()
    rows = []
    for name in variants:
        up, ideal = speedup(timings["dense"], timings[name]), costs["dense"] / costs[name]
        q1, q3 = up.quartiles()
        rows.append(
            dict(
                variant=name,
                gflops_ratio=costs[name] / costs["dense"],
                steps_per_s=1 / timings[name].median,
                speedup=up.median,
                speedup_iqr=f"{q1:.2f}-{q3:.2f}",
                ideal=ideal,
                efficiency=up.median / ideal,
            )
        )
    return rows
