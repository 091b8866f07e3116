"""Timing side by side: warm-up, then the compared sides interleaved round-robin (A B C A B C ...).

Used by `dymu bench` and by the demo, so that every time a user reads comes from the same method:
drift (thermal, other processes) hits all sides alike, and medians hide one-off stalls.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


def device_sync(device: torch.device) -> Callable[[], None]:
    """What to call before reading the clock: waits for queued GPU work (nothing to wait for on CPU)."""
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


@dataclass
class Side:
    """One thing being timed: `setup` (untimed: patch / unpatch the model) then `run` (timed)."""

    name: str
    run: Callable[[], object]
    setup: Callable[[], None] = lambda: None
    runs: int | None = None  # fewer timed runs than the others (a very slow side); None: all
    warmup: bool = True  # take part in the warm-up rounds


def interleaved(sides: list[Side], runs: int, warmup: int, sync: Callable[[], None]) -> dict[str, list[float]]:
    """Round-robin timing: warm-up rounds, then `runs` rounds of every side in turn. Seconds per run."""
    times: dict[str, list[float]] = {s.name: [] for s in sides}
    for round_index in range(warmup + runs):
        for side in sides:
            if round_index < warmup and not side.warmup:
                continue
            if round_index >= warmup and side.runs is not None and round_index - warmup >= side.runs:
                continue
            side.setup()
            sync()
            start = time.perf_counter()
            side.run()
            sync()
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                times[side.name].append(elapsed)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def paired_ratio(base: list[float], other: list[float]) -> float:
    """Median over rounds of base/other: robust to drift between rounds (each round is adjacent in time)."""
    return median([b / o for b, o in zip(base, other)]) if base and other else math.nan
