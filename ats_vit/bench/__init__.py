"""Benchmarks behind ``ats-vit bench`` and ``benchmarks/``: speed against the FLOP ideal
(:mod:`~ats_vit.bench.speed`), accuracy against GFLOPs (:mod:`~ats_vit.bench.frontier`) and
training speed (:mod:`~ats_vit.bench.train`). Every speed number is a ratio measured in one
run; nothing here is asserted as a timing in tests."""

from ats_vit.bench.common import (
    binomial_ci95,
    checkpoint_batch,
    checkpoint_budget_arguments,
    json_arguments,
    machine,
    peak_memory,
    print_table,
    use_threads,
    write_json,
)
from ats_vit.bench.frontier import FRONTIER_COLUMNS, FrontierConfig, frontier
from ats_vit.bench.speed import FAMILIES, SPEED_COLUMNS, SpeedConfig, speed
from ats_vit.bench.train import TRAIN_SPEED_COLUMNS, TrainSpeedConfig, train_speed

__all__ = [
    "FAMILIES",
    "FRONTIER_COLUMNS",
    "SPEED_COLUMNS",
    "TRAIN_SPEED_COLUMNS",
    "FrontierConfig",
    "SpeedConfig",
    "TrainSpeedConfig",
    "binomial_ci95",
    "checkpoint_batch",
    "checkpoint_budget_arguments",
    "frontier",
    "json_arguments",
    "machine",
    "peak_memory",
    "print_table",
    "speed",
    "train_speed",
    "use_threads",
    "write_json",
]
