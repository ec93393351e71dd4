"""Timing that machine noise hits alike: interleaved rounds, medians and their spread.

Every function runs once per round, round after round, so a burst of load on a shared
machine slows all of them in the same rounds. A :class:`Timing` keeps every round's seconds;
speed-ups are taken round by round (:func:`speedup`), so their spread shows how steady the
comparison was, not only the medians.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

__all__ = ["Timing", "speedup", "time_round_robin"]

# an interquartile range above this fraction of the median marks a timing as unsteady
WIDE_SPREAD = 0.15


class _Progress(Protocol):
    total: float | None

    def update(self, n: float = 1) -> object: ...


@dataclass(frozen=True)
class Timing:
    """Seconds of each round (or a per-round ratio), with robust summaries."""

    samples: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.samples:
            raise ValueError("a timing needs at least one sample")

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def quartiles(self) -> tuple[float, float]:
        """(first, third) quartile; both the sample itself when there is one."""
        if len(self.samples) == 1:
            return self.samples[0], self.samples[0]
        q = statistics.quantiles(self.samples, n=4, method="inclusive")
        return q[0], q[2]

    @property
    def spread(self) -> float:
        """Interquartile range as a fraction of the median."""
        q1, q3 = self.quartiles()
        return (q3 - q1) / abs(self.median) if self.median else float("inf")

    @property
    def wide(self) -> bool:
        return self.spread > WIDE_SPREAD

    def per_second(self, items: int) -> Timing:
        """Items per second of each round (e.g. images per second of a batch of ``items``)."""
        return Timing(tuple(items / s for s in self.samples))


def speedup(base: Timing, other: Timing) -> Timing:
    """How many times faster ``other`` ran than ``base``, round by round (interleaved
    timings of the same rounds)."""
    if len(base.samples) != len(other.samples):
        raise ValueError(f"speed-ups pair rounds: {len(base.samples)} vs {len(other.samples)} samples")
    return Timing(tuple(b / o for b, o in zip(base.samples, other.samples, strict=True)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_round_robin(
    fns: Mapping[str, Callable[[], object]],
    warmup: int,
    repeats: int,
    device: torch.device | None = None,
    progress: _Progress | None = None,
    min_seconds: float = 0.0,
    clock: Callable[[], float] = time.perf_counter,
    setup: Mapping[str, Callable[[], object]] | None = None,
    shuffle: int | None = None,
) -> dict[str, Timing]:
    """Seconds per call of each function, the calls interleaved across functions round by
    round. Rounds go on past ``repeats`` until every function has run ``min_seconds`` in
    all, so short calls get enough samples. ``device`` is synchronised around each call;
    ``progress`` (a bar counting calls, ``warmup + repeats`` per function) is advanced and
    grown by extra rounds. ``setup[name]``, when given, runs before each call of ``name``,
    untimed (e.g. setting a shared model to what that call times). ``clock`` is the timer
    (a fake one in tests). ``shuffle``: each round runs the functions in an order drawn from
    this seed (None: as listed), so no function always follows the same one (a cache, a
    clock boost or an allocator state left by its neighbour)."""
    device = device or torch.device("cpu")
    setup = setup or {}
    for name, fn in fns.items():
        for _ in range(warmup):
            if name in setup:
                setup[name]()
            fn()
            if progress is not None:
                progress.update()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = None if shuffle is None else torch.Generator().manual_seed(shuffle)
    rounds = 0
    while rounds < repeats or min(map(sum, samples.values())) < min_seconds:
        rounds += 1
        if rounds > repeats and progress is not None and progress.total is not None:
            progress.total += len(fns)
        names = list(fns)
        if order is not None:
            names = [names[i] for i in torch.randperm(len(names), generator=order).tolist()]
        for name in names:
            fn = fns[name]
            if name in setup:
                setup[name]()
            _sync(device)
            start = clock()
            fn()
            _sync(device)
            samples[name].append(clock() - start)
            if progress is not None:
                progress.update()
    return {name: Timing(tuple(s)) for name, s in samples.items()}


def describe(timing: Timing, fmt: str = ".1f") -> str:
    """``median (q1-q3)``: a value with its interquartile range."""
    q1, q3 = timing.quartiles()
    return f"{timing.median:{fmt}} ({q1:{fmt}}-{q3:{fmt}})"


def medians(timings: dict[str, Timing]) -> dict[str, float]:
    return {name: t.median for name, t in timings.items()}


def spread_warning(timings: Sequence[tuple[str, Timing]]) -> str | None:
    """A line naming the timings whose spread is wide, or None."""
    wide = [f"{name} ±{100 * t.spread / 2:.0f}%" for name, t in timings if t.wide]
    if not wide:
        return None
    return (
        "warning: unsteady timings (interquartile range above "
        f"{100 * WIDE_SPREAD:.0f}% of the median: {', '.join(wide)}); the machine was busy or the "
        "calls are too short: rerun, or time more repeats"
    )
