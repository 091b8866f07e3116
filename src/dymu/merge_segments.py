"""Thresholded merge rounds on packed *segments*: the unit-level merging of the towers that merge whole
units (towers/qwen_vit.py, towers/unit_vit.py) and of the merge rounds after the stock steps
(families/anyres_groups.py). Pure torch, on top of the matching and merging of `dymu.merge`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .merge import EdgeChooser, Matches, edges_above, match, merge

# Thresholded rounds on packed *segments* (a segment: the tokens allowed to merge with each other,
# e.g. one image, one video frame). Units are rows (U, ...) sorted by segment; each round pads them
# into one batch row per segment, so the edge choice (thresholds, the calibration's batch ranking)
# is the padded path's, and a segment's merges depend on that segment alone.


@dataclass
class Layout:
    """Where every unit sits in merge.py's padded batch: its batch row (a *merge segment*) and its slot
    there (even slots are A, odd slots B). Units are listed in packed order, sorted by segment."""

    row: Tensor  # (U,) batch row of every unit
    slot: Tensor  # (U,) slot of every unit in its row
    rows: int  # batch rows
    width: int  # slots per row


def within_segments(segment_of_unit: Tensor, segments: int) -> Layout:
    """The stock split: one batch row per segment (an image or one temporal patch), its units at
    consecutive slots, so A and B alternate in reading order."""
    lengths = torch.bincount(segment_of_unit, minlength=segments)
    start = F.pad(lengths.cumsum(0), (1, 0))[:-1]
    slot = torch.arange(len(segment_of_unit), device=segment_of_unit.device) - start[segment_of_unit]
    return Layout(segment_of_unit, slot, segments, int(lengths.max()) if len(segment_of_unit) else 0)


@dataclass
class Step:
    payload: Tensor  # (U', F) merged rows, in the packed order of their destinations
    sizes: Tensor  # (U',) units each merged row stands for
    new_index: Tensor  # (U,) where every old row went
    survivors: Tensor  # (U',) old row index of every new row (its destination): for per-unit ids / rotary


def merge_segments(payload: Tensor, metric: Tensor, sizes: Tensor, layout: Layout,
                   choose: Callable[[Matches], Tensor]) -> Step:
    """Bipartite matching within every batch row of ``layout`` (A = even, B = odd slots), merge the
    chosen edges (size-weighted means of ``payload``), and compact: every merged row takes its
    destination's place, so survivors keep their packed order (sorted by segment and window)."""
    device = payload.device

    def pad(x: Tensor) -> Tensor:  # (U, ...) -> (rows, width, ...), zeros on padding
        out = x.new_zeros((layout.rows, layout.width, *x.shape[1:]))
        out[layout.row, layout.slot] = x
        return out

    sizes_p = pad(sizes)
    matches = match(pad(metric), sizes_p, protect_first=False)
    chosen = choose(matches)
    identity = torch.arange(payload.shape[0], device=device)
    if not bool(chosen.any()):
        return Step(payload, sizes, identity, identity)
    slots = torch.arange(layout.width, device=device).expand(layout.rows, layout.width).clone()
    merged, new_sizes, new_slot = merge(pad(payload), sizes_p, slots, matches, chosen)
    live = new_sizes > 0  # (rows, width'): the merged rows are merged[live], in (row, slot) order
    new_offsets = F.pad(live.sum(1).cumsum(0), (1, 0))[:-1]
    at = new_slot[layout.row, layout.slot] + new_offsets[layout.row]  # (U,) every old row's place in merged[live]
    gone = torch.zeros_like(sizes_p, dtype=torch.bool)
    gone[:, 0::2] = chosen  # merged-away A slots
    survivors = torch.nonzero(~gone[layout.row, layout.slot]).flatten()  # destinations, in packed order
    place = at[survivors]  # where each of them is in merged[live]
    rank = torch.empty_like(place)
    rank[place] = torch.arange(len(place), device=device)
    return Step(payload=merged[live][place], sizes=new_sizes[live][place], new_index=rank[at], survivors=survivors)


# Calibration hook: (round index, matches over the segments of the batch) -> merged edges.


def round_chooser(thresholds: Sequence[float], edge_chooser: EdgeChooser | None, step: int):
    """The edge rule of round ``step``: the calibration's hook if given, else its threshold."""
    if edge_chooser is not None:
        return lambda matches: edge_chooser(step, matches)
    return lambda matches: edges_above(matches, thresholds[step])


def merges_at(thresholds: Sequence[float], edge_chooser: EdgeChooser | None, step: int) -> bool:
    return edge_chooser is not None or thresholds[step] != math.inf  # -inf merges every edge (up to the cap)


@dataclass
class Rounds:
    payload: Tensor  # (U', F) the merged rows, sorted by segment
    sizes: Tensor  # (U',) units each merged row stands for
    group: Tensor  # (U,) the merged row every input unit ended in
    kept: Tensor  # (S, rounds) units of every segment after every round


def merge_rounds(payload: Tensor, metric: Tensor, sizes: Tensor, segment_of_unit: Tensor, segments: int,
                 thresholds: Sequence[float], edge_chooser: EdgeChooser | None = None,
                 layout: Callable[[int, Tensor], Layout] | None = None) -> Rounds:
    """One thresholded bipartite round per entry of ``thresholds`` on packed units (sorted by segment):
    matching on ``metric`` (L2-normalised; carried through merges as a size-weighted mean and
    re-normalised), merged rows the size-weighted means of ``payload``. ``layout(step, segment_of_unit)``
    chooses the matching rows of a round (default: one per segment, `within_segments`)."""
    layout = layout or (lambda step, segment_of_unit: within_segments(segment_of_unit, segments))
    group = torch.arange(len(payload), device=payload.device)
    width, kept = payload.shape[1], []
    for step in range(len(thresholds)):
        if merges_at(thresholds, edge_chooser, step):
            merged = merge_segments(torch.cat([payload, metric], -1), metric, sizes, layout(step, segment_of_unit),
                                    round_chooser(thresholds, edge_chooser, step))
            payload, metric = merged.payload[:, :width], merged.payload[:, width:]
            metric = metric / metric.norm(dim=-1, keepdim=True).clamp(min=1e-12)
            sizes, group = merged.sizes, merged.new_index[group]
            segment_of_unit = segment_of_unit[merged.survivors]
        kept.append(torch.bincount(segment_of_unit, minlength=segments))
    kept = torch.stack(kept, 1) if kept else torch.bincount(segment_of_unit, minlength=segments)[:, None]
    return Rounds(payload, sizes, group, kept)

