"""The rules every tower's merge settings follow: thresholds per layer (None = +inf, NaN refused) and
the per-image token budget (cost control, paper §4.3)."""

from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass

import torch

from .. import merge as M


@dataclass
class TokenBudget:
    """Cost control (paper §4.3): at most ``max_tokens`` / at least ``min_tokens`` per image at the
    feature layer, class token not counted, on top of the thresholds (merge.budget_merge_count).

    ``layers`` = the layers up to the feature layer (set per forward by `encode_with_tower`); only
    they take budget merges.
    """

    max_tokens: int | None = None
    min_tokens: int | None = None
    layers: int = 0

    def forces_merges(self, layer_index: int, mergeable: torch.Tensor) -> bool:
        if self.max_tokens is None or layer_index >= self.layers:
            return False
        most_left = self.max_tokens * 2 ** min(self.layers - 1 - layer_index, 62)
        return bool((mergeable > most_left).any())

    def adjust(self, layer_index: int, matches: M.Matches, chosen: torch.Tensor,
               mergeable: torch.Tensor) -> torch.Tensor:
        if layer_index >= self.layers:
            return chosen
        count = chosen.sum(dim=1)
        wanted = M.budget_merge_count(count, mergeable, self.max_tokens, self.min_tokens,
                                      layers_after=self.layers - 1 - layer_index)
        return chosen if torch.equal(wanted, count) else M.top_ranked_edges(matches, wanted)

    def check(self, patches: int, layers: int, where: str = "") -> None:
        """Raise a one-line ValueError when the budget is malformed or cannot be reached."""
        for name, value in (("max_tokens", self.max_tokens), ("min_tokens", self.min_tokens)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}{where} must be a whole number >= 1, not {value!r}")
        if self.max_tokens is not None and self.min_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens={self.min_tokens}{where} is above max_tokens={self.max_tokens}")
        if self.min_tokens is not None and self.min_tokens >= patches:
            raise ValueError(f"min_tokens={self.min_tokens}{where} is not below the {patches} patches per image: no "
                             "image would ever merge; give a smaller min_tokens (or none)")
        if self.max_tokens is None:
            return
        fewest = M.reachable_tokens(patches, layers)
        if self.max_tokens < fewest:
            raise ValueError(
                f"max_tokens={self.max_tokens}{where} cannot be reached: the {layers} layers up to the feature layer "
                f"merge at most half of the tokens each, which leaves at least {fewest} of {patches}; raise "
                f"max_tokens to {fewest} or more (or read a later feature layer)")


def make_budget(max_tokens=None, min_tokens=None) -> TokenBudget | None:
    """A `TokenBudget`, or None when neither bound is set. max_tokens=inf and min_tokens=0 mean "none"
    (to switch off a thresholds file's default budget)."""
    if max_tokens is not None and isinstance(max_tokens, float) and math.isinf(max_tokens) and max_tokens > 0:
        max_tokens = None
    if min_tokens == 0 and not isinstance(min_tokens, bool):
        min_tokens = None
    if isinstance(max_tokens, float) and max_tokens.is_integer():
        max_tokens = int(max_tokens)
    if isinstance(min_tokens, float) and min_tokens.is_integer():
        min_tokens = int(min_tokens)
    if max_tokens is None and min_tokens is None:
        return None
    return TokenBudget(max_tokens=max_tokens, min_tokens=min_tokens)


def _per_layer(value, num_layers: int, what: str) -> list | None:
    if value is None:
        return None
    if isinstance(value, numbers.Number):  # one value for every layer (checked by _threshold_floats)
        return [value] * num_layers
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    value = list(value)
    if len(value) != num_layers:
        raise ValueError(f"{what} has {len(value)} entries but the vision tower has {num_layers} layers.")
    return value


def _threshold_floats(values: list) -> list[float]:
    """Per-layer thresholds as floats, by the thresholds file's rule: None (as in JSON) = +inf = never
    merge, -inf = merge every edge, otherwise a real number >= 0 (a cosine similarity; calibration
    clamps at 0). NaN, negatives, booleans, complex numbers and strings are refused, never cast."""
    out = []
    for layer, t in enumerate(values):
        if t is None:
            out.append(math.inf)
            continue
        if isinstance(t, (bool, str, bytes)) or not isinstance(t, numbers.Real):
            raise ValueError(f"threshold of layer {layer} must be a real number, None (never merge) or -inf, "
                             f"not {t!r}")
        t = float(t)
        if math.isnan(t) or (math.isfinite(t) and t < 0):
            raise ValueError(f"threshold of layer {layer} is {'NaN' if math.isnan(t) else t}; thresholds are >= 0 "
                             "(cosine similarities), +inf (or None) for 'never merge' and -inf for 'merge every edge'")
        out.append(t)
    return out


# One call's budget (`dymu.generate(..., max_tokens=...)`, `dymu encode --max-tokens`) on top of the one
# `dymu.apply` set. ``state`` is whatever patch state holds the apply-time budget as ``state.budget`` (a
# tower's, a unit family's; None on a stock model); ``make`` checks and builds the family's budget type.


def call_budget(state, max_tokens, min_tokens, make):
    """The budget for one call: each bound given here replaces the one `dymu.apply` set."""
    if max_tokens is None and min_tokens is None:
        return None if state is None else state.budget
    if state is None:
        raise ValueError("max_tokens/min_tokens need a merging mode, not the stock model")
    return replaced_budget(state.budget, max_tokens, min_tokens, make)


def replaced_budget(current, max_tokens, min_tokens, make):
    """A checked budget (``make``): ``max_tokens`` / ``min_tokens`` where given, else ``current``'s (a budget
    `dymu.apply` set, a `Thresholds` file's defaults, or None for none)."""
    return make(max_tokens if max_tokens is not None else getattr(current, "max_tokens", None),
                min_tokens if min_tokens is not None else getattr(current, "min_tokens", None))


@contextlib.contextmanager
def holding_budget(state, budget):
    """``state.budget`` is ``budget`` inside the block, and what it was after it (a stock model's None
    state holds no budget: nothing to do)."""
    if state is None:
        if budget is not None:
            raise ValueError("max_tokens/min_tokens need a merging mode, not the stock model")
        yield state
        return
    previous, state.budget = state.budget, budget
    try:
        yield state
    finally:
        state.budget = previous
