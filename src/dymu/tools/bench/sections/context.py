"""What the `dymu bench` driver hands every section: the plan, the device, the shared models and the
result being filled (each section writes its own key and notes)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..plan import Plan


@dataclass
class Context:
    plan: Plan
    device: torch.device
    dtype: torch.dtype
    sync: Callable[[], None]
    log: Callable[[str], None]
    quick: bool
    runs: int | None  # --runs as given (None: the plan's)
    sections: tuple[str, ...]  # the sections asked for
    result: dict  # what --json writes; a section fills result[its key]
    tower: torch.nn.Module | None = None  # the CLIP tower, built by the driver when a section needs it
    thresholds: dict = field(default_factory=dict)  # encoder preset -> calibrated Thresholds (--thresholds)
    shared: dict = field(default_factory=dict)  # what one section leaves for a later one (group maps, a model)

    @property
    def notes(self) -> list[str]:
        return self.result["notes"]

    @contextmanager
    def timed(self, name: str):
        """Adds the block's seconds to result["section_s"][name]."""
        start = time.perf_counter()
        try:
            yield
        finally:
            times = self.result["section_s"]
            times[name] = times.get(name, 0.0) + time.perf_counter() - start
