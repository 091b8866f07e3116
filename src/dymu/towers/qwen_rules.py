"""Which unit edges a Qwen VL merge step takes: thresholds (DToMe) or a fixed r (ToMe), and a token
budget per image / video on top (towers/qwen_vit.py runs the steps).

A *step* is a ViT block (merge_point "vit") or a merge round after the PatchMerger ("post"). Matching
runs in *rows* (merge.py's batch rows): a segment (an image, or one temporal patch of a video), or with
``cross_frame`` at its across-frame steps a whole video. Thresholds and r act per row, within the
per-row cap (at most half of a row's units merge in one step).

The budget (`QwenBudget`) counts an item's tokens: units alive, i.e. the LLM tokens it keeps. It acts
per item (an image or a whole video) like the CLIP towers' budget (towers/encoder.py): an item over
``max_tokens`` merges its best remaining edges (ranked over all of its rows, each row within its cap)
as late as possible: at a step with j budget steps after it, an item of R rows keeps at most
``(max_tokens - R + 1) · 2**j + R - 1`` units, which the later steps (each row halving at best) can
always bring down to ``max_tokens``; an item in budget merges exactly as without it. ``min_tokens``:
an item drops its worst chosen edges before it would go under it. Every step takes budget merges (the
last ones get them first). Whether ``max_tokens`` is reachable depends on each item's units (native
resolution), so `check_reachable` refuses, per call and before the tower runs, an item it cannot bring
within budget.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from .. import merge as M

EdgeChooser = Callable[[int, M.Matches], Tensor]


@dataclass(frozen=True)
class QwenBudget:
    """At most ``max_tokens`` / at least ``min_tokens`` LLM tokens (units) per image and per video."""

    max_tokens: int | None = None
    min_tokens: int | None = None

    def most_left(self, steps_after: int, rows: Tensor) -> Tensor | None:
        """(I,) the most units an item of ``rows`` rows may keep now, with ``steps_after`` steps to go."""
        if self.max_tokens is None:
            return None
        scale = 2 ** min(steps_after, 40)
        return (self.max_tokens - rows + 1) * scale + rows - 1

    def forces(self, steps_after: int, alive: Tensor, rows: Tensor) -> bool:
        most = self.most_left(steps_after, rows)
        return most is not None and bool((alive > most).any())


def make_qwen_budget(max_tokens=None, min_tokens=None) -> QwenBudget | None:
    """A checked `QwenBudget`, or None for none. max_tokens=inf / min_tokens=0 mean "none" (to switch a
    thresholds file's default off). One-line ValueErrors."""
    from .encoder import make_budget

    plain = make_budget(max_tokens, min_tokens)  # the same spelling rules as CLIP / SigLIP
    if plain is None:
        return None
    for name in ("max_tokens", "min_tokens"):
        value = getattr(plain, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
            raise ValueError(f"{name} must be a whole number >= 1 (LLM tokens per image / video), not {value!r}")
    if plain.max_tokens is not None and plain.min_tokens is not None and plain.min_tokens > plain.max_tokens:
        raise ValueError(f"min_tokens={plain.min_tokens} is above max_tokens={plain.max_tokens}")
    return QwenBudget(max_tokens=plain.max_tokens, min_tokens=plain.min_tokens)


def override_budget(current, max_tokens=None, min_tokens=None) -> QwenBudget | None:
    """`replaced_budget` for unit budgets (`QwenBudget`)."""
    from .budget import replaced_budget

    return replaced_budget(current, max_tokens, min_tokens, make_qwen_budget)


def fewest_guaranteed(units: int, rows: int, steps: int) -> int:
    """The smallest max_tokens the budget rule guarantees for an item of ``units`` units in ``rows`` rows
    with ``steps`` budget steps: ceil((units - rows + 1) / 2**steps) + rows - 1 (exact for one row,
    at most rows - 1 above the fewest reachable for several)."""
    return -(-(units - rows + 1) // 2 ** min(steps, 40)) + rows - 1


def check_reachable(budget: QwenBudget | None, units: Tensor, rows: Tensor, steps: int) -> None:
    """Refuse (one line) an item (image / video of the call) whose ``units`` in ``rows`` rows the
    ``steps`` budget steps cannot be sure to bring to max_tokens (each row halves at best per step)."""
    if budget is None or budget.max_tokens is None:
        return
    for k, (n, r) in enumerate(zip(units.tolist(), rows.tolist())):
        need = fewest_guaranteed(n, r, steps)
        if budget.max_tokens < need:
            raise ValueError(
                f"max_tokens={budget.max_tokens} cannot be reached for image/video {k} of the call: its {n} units"
                + (f" in {r} temporal patches" if r > 1 else "")
                + f" need max_tokens >= {need} with the {steps} steps that take budget merges (each halves a row at "
                "best); raise max_tokens or, with merge_point='post', add rounds (+inf rounds take budget merges only)")


@dataclass
class MergeRule:
    """The edge rule of every step: ``thresholds`` (one per step) or ``r`` (merges per row and step),
    with an optional budget; ``edge_chooser`` (calibration) replaces all of it."""

    steps: int
    thresholds: Sequence[float] | None = None
    r: Sequence[int] | None = None
    budget: QwenBudget | None = None
    edge_chooser: EdgeChooser | None = None
    cross_frame: bool = False  # steps 0, 2, 4, ... match across frames: they take no forced budget merges

    def budget_step(self, step: int) -> bool:
        """Whether ``step`` takes forced budget merges: a within-segment step, which can halve every row
        (an across-frame step pairs a video's patches, so a patch nearly merged away leaves few edges)."""
        return not self.cross_frame or step % 2 == 1

    def budget_steps_after(self, step: int) -> int:
        return sum(self.budget_step(s) for s in range(step + 1, self.steps))

    def merges_at(self, step: int, alive: Tensor, rows: Tensor) -> bool:
        """Whether step ``step`` may merge anything (``alive``, ``rows``: (I,) units and rows per item)."""
        if self.edge_chooser is not None:
            return True
        if self.r is not None and self.r[step] > 0:
            return True
        if self.thresholds is not None and self.thresholds[step] != math.inf:
            return True
        return (self.budget is not None and self.budget_step(step)
                and self.budget.forces(self.budget_steps_after(step), alive, rows))

    def chooser(self, step: int, item_of_row: Tensor, alive: Tensor, rows: Tensor) -> Callable[[M.Matches], Tensor]:
        """The (rows, Na) edge choice of step ``step``; ``item_of_row`` (rows,) the item of every matching row."""
        def choose(matches: M.Matches) -> Tensor:
            if self.edge_chooser is not None:  # calibration: its batch-level rule alone, no budget
                return self.edge_chooser(step, matches)
            if self.r is not None:
                chosen = M.top_r_edges(matches, self.r[step])
            elif self.thresholds is not None:
                chosen = M.edges_above(matches, self.thresholds[step])
            else:
                chosen = torch.zeros_like(matches.score, dtype=torch.bool)
            if self.budget is None:
                return chosen
            return budget_edges(self.budget, self.budget_steps_after(step) if self.budget_step(step) else None,
                                matches, chosen, item_of_row, alive, rows)
        return choose


def budget_edges(budget: QwenBudget, steps_after: int | None, matches: M.Matches, chosen: Tensor,
                 item_of_row: Tensor, alive: Tensor, rows: Tensor) -> Tensor:
    """``chosen`` (rows, Na) with the budget applied per item: the item's edges ranked together (chosen
    first, then by score; ties by row and slot), each row within its cap, and the first ``wanted`` taken.
    ``steps_after``: budget steps after this one; None: this step takes no forced merges (min_tokens only)."""
    items = len(alive)
    n_rows, na = matches.score.shape
    item_of_edge = item_of_row[:, None].expand(n_rows, na).reshape(-1)
    valid = (torch.isfinite(matches.score) & (matches.rank < matches.cap[:, None])).reshape(-1)
    flat_chosen = chosen.reshape(-1) & valid
    count = torch.bincount(item_of_edge, weights=flat_chosen.to(torch.float64), minlength=items).long()
    capacity = torch.bincount(item_of_edge, weights=valid.to(torch.float64), minlength=items).long()
    wanted = count
    if budget.min_tokens is not None:
        wanted = torch.minimum(wanted, (alive - budget.min_tokens).clamp(min=0))
    most = None if steps_after is None else budget.most_left(steps_after, rows)
    if most is not None:
        wanted = torch.maximum(wanted, alive - most)
    wanted = wanted.clamp(min=0).minimum(capacity)
    if torch.equal(wanted, count):
        return chosen
    order = torch.sort(matches.score.reshape(-1), descending=True, stable=True).indices
    for key in (flat_chosen, valid):  # stable sorts: the last key is the first criterion
        order = order[torch.sort(key[order].to(torch.int8), descending=True, stable=True).indices]
    order = order[torch.sort(item_of_edge[order], stable=True).indices]
    start = torch.nn.functional.pad(torch.bincount(item_of_edge, minlength=items).cumsum(0), (1, 0))[:-1]
    place = torch.arange(len(order), device=order.device) - start[item_of_edge[order]]
    take = torch.zeros_like(valid)
    take[order] = (place < wanted[item_of_edge[order]]) & valid[order]
    return take.view_as(chosen)


def per_step(value, steps: int, what: str) -> list:
    """One value per step from one number or a list (checked length)."""
    if isinstance(value, numbers.Number):
        return [value] * steps
    values = value.tolist() if isinstance(value, Tensor) else list(value)
    if len(values) != steps:
        raise ValueError(f"{what} has {len(values)} entries but there are {steps} merge steps (vision blocks)")
    return values


def check_r(r, steps: int) -> list[int]:
    """r per ViT block (one whole number = every block): merges per row (segment) and block."""
    values = per_step(r, steps, "r")
    if any(isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0 or v != int(v)
           for v in values):
        raise ValueError(f"r must be whole numbers >= 0 (unit merges per block), not {values}")
    return [int(v) for v in values]
