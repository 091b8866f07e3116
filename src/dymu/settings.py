"""`Settings`: everything `dymu.apply` takes, validated once, used alike by the API, the CLI and the
lmms-eval plugin. Checks here are family-agnostic; each family adapter then checks the settings
against what it declares (`dymu.families.VLMFamily.check`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import Any, Sequence

MODES = ("full", "dymu", "dtome", "tome", "downsample")
VTU_ATTENTION = ("fast", "exact")
KV_CACHE = ("compact", "full")
MERGE_POINTS = ("vit", "post", "both")

# The options a family declares support for (None) or refuses (a reason), and when a setting uses one.
OPTIONS = {
    "r": lambda s: s.r is not None,
    "order": lambda s: s.order is not None,
    "tome_vtu": lambda s: not s.tome_vtu,
    "merge_point": lambda s: s.merge_point is not None,
    "cross_frame": lambda s: s.cross_frame,
    "budget": lambda s: s.max_tokens is not None or s.min_tokens is not None,
}


@dataclass(frozen=True)
class Settings:
    """What to patch a model with (see `dymu.apply` for the meaning of every field).

    ``thresholds``: a `dymu.Thresholds`, plain values (one number, a list, a tensor), a path / Hub repo
    of a thresholds file (loaded here), or None."""

    mode: str = "dymu"
    thresholds: Any = None
    r: int | Sequence[int] | None = None
    order: str | None = None
    vtu_attention: str = "fast"
    kv_cache: str | None = None  # None: the family's default (the first it supports: "compact", else "full")
    tome_vtu: bool = True
    merge_point: str | None = None
    max_tokens: int | float | None = None
    min_tokens: int | None = None
    cross_frame: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.vtu_attention not in VTU_ATTENTION:
            raise ValueError(f"vtu_attention must be 'fast' or 'exact', got {self.vtu_attention!r}")
        if self.kv_cache is not None and self.kv_cache not in KV_CACHE:
            raise ValueError(f"kv_cache must be 'compact' or 'full', got {self.kv_cache!r}")
        if self.merge_point is not None and self.merge_point not in MERGE_POINTS:
            raise ValueError(f"merge_point must be one of {', '.join(MERGE_POINTS)}, got {self.merge_point!r}")
        for name in ("tome_vtu", "cross_frame"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, not {getattr(self, name)!r}")
        if isinstance(self.thresholds, (str, os.PathLike)):  # a file, a folder with thresholds.json, a Hub repo
            from .thresholds import Thresholds

            object.__setattr__(self, "thresholds", Thresholds.from_ref(self.thresholds))

    def used_options(self) -> list[str]:
        """The options (keys of `OPTIONS`) these settings use."""
        return [name for name, used in OPTIONS.items() if used(self)]

    def replace(self, **changes) -> "Settings":
        return replace(self, **changes)

    @property
    def uses_vtu(self) -> bool:
        """The LLM runs virtually unmerged (stock prompt, VTU decoder layers)."""
        return self.mode == "dymu" or (self.mode == "tome" and self.tome_vtu)

    # Settings stored in a `Thresholds` file are the defaults for those left unset here.
    def file_default(self, name: str):
        value = getattr(self, name)
        return value if value is not None else getattr(self.thresholds, name, None)


SETTING_NAMES = tuple(f.name for f in fields(Settings))
