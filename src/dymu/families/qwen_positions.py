"""M-RoPE positions for merged tokens fed straight to a Qwen VL's LLM (modes ``dtome`` and ``tome``
without VTU), as vLLM's EVS keeps retained video tokens at their original positions.

The prompt holds one placeholder per kept token. A kept token stands for a group of units (the 2x2
patch units the PatchMerger fuses); it sits at its group's *representative unit*: the group's first
unit in the stock raster order of its image / video (t-major, then rows, then columns), i.e. the
smallest unit index of the group. Kept tokens are listed (and their features laid out) in the order
of their representative units.

`kept_units` gives those units; `shorten_prompt` drops the other placeholders of a stock prompt;
`direct_rope_index` gives the shortened prompt the stock positions of what it keeps: it re-expands the
prompt to the stock layout (every unit's placeholder back in place), runs the stock `get_rope_index`
there, and keeps the positions of the text and of the representative units (`kept_position_ids`). Text
positions are therefore the stock ones (text after an image continues from the stock position), and
so is every row's rope delta (stock max position + 1 - shortened length), which decode steps add.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
from torch import Tensor


def kept_units(group_of_unit: Tensor) -> Tensor:
    """(K,) sorted: the first unit (smallest index) of every group of one image / video."""
    first = torch.full((int(group_of_unit.max()) + 1,), len(group_of_unit), dtype=torch.long,
                       device=group_of_unit.device)
    first.scatter_reduce_(0, group_of_unit, torch.arange(len(group_of_unit), device=group_of_unit.device), "amin")
    return first.sort().values


@dataclass
class Run:
    """One stock placeholder run: ``units`` placeholders, of which ``kept`` (sorted indices) remain."""

    units: int
    kept: Tensor


def item_runs(grid_thw: Tensor, kept: list[Tensor], split_temporal: bool, merge_size: int = 2) -> deque[Run]:
    """The placeholder runs of every image / video of one modality, in order: one run per item, or
    (Qwen3-VL videos, ``split_temporal``) one per temporal patch."""
    runs: deque[Run] = deque()
    for (t, h, w), units in zip(grid_thw.tolist(), kept):
        per = h * w // merge_size**2
        if not split_temporal:
            runs.append(Run(t * per, units))
            continue
        for k in range(t):
            inside = (units >= k * per) & (units < (k + 1) * per)
            runs.append(Run(per, units[inside] - k * per))
    return runs


def keep_mask(input_ids: Tensor, attention_mask: Tensor | None, token_ids: dict[int, int],
              kept: dict[int, list[Tensor]], grids: dict[int, Tensor]) -> Tensor:
    """(B, N) bool over a stock prompt: text, padding and the kept units' placeholders (placeholders are
    matched to units in the order the stock forward fills them: row-major, item after item)."""
    keep = torch.ones_like(input_ids, dtype=torch.bool)
    live = torch.ones_like(keep) if attention_mask is None else attention_mask.bool()
    for modality, token in token_ids.items():
        if modality not in kept:
            continue
        masks = []
        for (t, h, w), units in zip(grids[modality].tolist(), kept[modality]):
            mask = torch.zeros(t * h * w // 4, dtype=torch.bool, device=input_ids.device)
            mask[units.to(input_ids.device)] = True
            masks.append(mask)
        positions = (input_ids == token) & live
        want = sum(len(m) for m in masks)
        if int(positions.sum()) != want:
            raise ValueError(f"the prompt has {int(positions.sum())} placeholders for {want} stock units")
        keep[positions] = torch.cat(masks)
    return keep


def shorten_prompt(tensors: dict[str, Tensor], keep: Tensor, pad_token_id: int) -> dict[str, Tensor]:
    """Left-padded per-token tensors (input_ids, attention_mask, mm_token_type_ids) without the
    positions where ``keep`` is False."""
    mask = tensors["attention_mask"].bool()
    rows = [(keep[b] & mask[b]) for b in range(keep.shape[0])]
    width = max(int(r.sum()) for r in rows)
    out = {}
    for name, values in tensors.items():
        fill = pad_token_id if name == "input_ids" else 0
        new = values.new_full((values.shape[0], width), fill)
        for b, r in enumerate(rows):
            n = int(r.sum())
            if n:
                new[b, width - n:] = values[b][r]
        out[name] = new
    return out


def _expand_row(ids: list[int], types: list[int], runs: dict[int, deque[Run]], tokens: dict[int, int],
                vision_start: int | None) -> tuple[list[int], list[int], list[bool]]:
    """One unpadded shortened row back to the stock layout: (ids, types, kept?) per stock position."""
    out_ids, out_types, keep = [], [], []

    def put(modality: int, run: Run) -> None:
        mask = [False] * run.units
        for u in run.kept.tolist():
            mask[u] = True
        out_ids.extend([tokens[modality]] * run.units)
        out_types.extend([modality] * run.units)
        keep.extend(mask)

    i, n = 0, len(ids)
    while i < n:
        if types[i] == 0:
            out_ids.append(ids[i]), out_types.append(0), keep.append(True)
            queue = runs.get(2)
            # A temporal patch that keeps no token (Qwen3-VL, cross_frame) leaves "<vision_start><vision_end>".
            if (ids[i] == vision_start and (i + 1 == n or types[i + 1] == 0) and queue and len(queue[0].kept) == 0):
                put(2, queue.popleft())
            i += 1
            continue
        j = i
        while j < n and types[j] == types[i]:
            j += 1
        queue = runs.get(types[i])
        if not queue or len(queue[0].kept) != j - i:
            raise ValueError(f"a run of {j - i} placeholders does not match the kept tokens of the next "
                             f"{'image' if types[i] == 1 else 'video'}: build the prompt with dymu.prompt_inputs")
        put(types[i], queue.popleft())
        i = j
    return out_ids, out_types, keep


def kept_position_ids(stock_positions: Tensor, stock_mask: Tensor, keep: Tensor,
                      short_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Positions (3, B, N) of the shortened prompt: the stock positions (3, B, N_stock) of the kept
    stock positions (``keep`` (B, N_stock), within ``stock_mask``), left-padded like ``short_mask``;
    and the rope deltas (B, 1): the stock max position + 1 - the shortened row's length."""
    out = stock_positions.new_zeros(3, *short_mask.shape)
    deltas = []
    for b in range(short_mask.shape[0]):
        live = stock_mask[b].bool()
        row = short_mask[b].bool()
        chosen = stock_positions[:, b, keep[b] & live]
        if chosen.shape[1] != int(row.sum()):
            raise ValueError("the shortened prompt does not match the kept stock positions")
        out[:, b, row] = chosen
        deltas.append(stock_positions[:, b, live].max() + 1 - int(row.sum()))
    return out, torch.stack(deltas).view(-1, 1).to(stock_positions.device)


def direct_rope_index(stock_rope_index, input_ids: Tensor, mm_token_type_ids: Tensor, attention_mask: Tensor | None,
                      grids: dict[int, Tensor], kept: dict[int, list[Tensor]], tokens: dict[int, int],
                      split_temporal: bool, vision_start: int | None, **kwargs) -> tuple[Tensor, Tensor]:
    """(position_ids (3, B, N), rope_deltas (B, 1)) of a shortened prompt (see the module docstring).
    ``grids`` / ``kept``: per modality (1 image, 2 video) the items' grid_thw and kept units;
    ``stock_rope_index``: the stock `get_rope_index` of the model."""
    runs = {m: item_runs(grids[m], kept[m], split_temporal and m == 2) for m in kept}
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    rows = []
    for b in range(input_ids.shape[0]):
        live = mask[b].bool()
        rows.append(_expand_row(input_ids[b][live].tolist(), mm_token_type_ids[b][live].tolist(), runs, tokens,
                                vision_start))
    if any(runs.values()):
        raise ValueError("the prompt has fewer image/video placeholder runs than images/videos were encoded")
    width = max(len(r[0]) for r in rows)
    device = input_ids.device

    def padded(k: int, fill, dtype) -> Tensor:
        return torch.tensor([[fill] * (width - len(r[k])) + r[k] for r in rows], dtype=dtype, device=device)

    stock_ids, stock_types = padded(0, 0, input_ids.dtype), padded(1, 0, mm_token_type_ids.dtype)
    keep = padded(2, False, torch.bool)
    stock_mask = torch.tensor([[0] * (width - len(r[0])) + [1] * len(r[0]) for r in rows], device=device)
    positions, _ = stock_rope_index(stock_ids, mm_token_type_ids=stock_types, image_grid_thw=grids.get(1),
                                    video_grid_thw=grids.get(2), attention_mask=stock_mask, **kwargs)
    return kept_position_ids(positions, stock_mask, keep, mask)
