"""Benchmarks behind ``ats-vit bench`` and ``benchmarks/``: speed against the FLOP ideal
(:mod:`~ats_vit.bench.speed`), accuracy against GFLOPs (:mod:`~ats_vit.bench.frontier`) and
training speed (:mod:`~ats_vit.bench.train`). Every speed number is a ratio measured in one
run; nothing here is asserted as a timing in tests."""

from ats_vit.bench.common import peak_memory
from ats_vit.bench.frontier import FrontierConfig, frontier, pool_seeds
from ats_vit.bench.speed import SpeedConfig, speed
from ats_vit.bench.train import TrainSpeedConfig, train_speed

__all__ = [
    "FrontierConfig",
    "SpeedConfig",
    "TrainSpeedConfig",
    "frontier",
    "peak_memory",
    "pool_seeds",
    "speed",
    "train_speed",
]
