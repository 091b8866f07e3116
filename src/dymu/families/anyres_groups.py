"""The group map of LLaVA-NeXT / OneVision through the stock packing steps (see `dymu.families.llava_next`,
steps 3-5), and the merge rounds after them (merge_point "post" / "both")."""

from __future__ import annotations

import torch

from ..merge_segments import merge_rounds

_ROUNDING = 2.0 ** 32  # group weights are compared after rounding to this grid (float64 sums of 4 products)


def _probe(num_crops: int, side: int, grid_width: int, dtype=torch.float64) -> torch.Tensor:
    """(num_crops, side², 3) probe: (plane, row, column) of every token.

    Crop 0 is the base crop (plane 0, its own side x side grid), crops 1.. tile the AnyRes canvas in
    row-major order, ``grid_width`` crops per row (plane 1, canvas coordinates). With one crop only,
    it is the base crop.
    """
    r = torch.arange(side, dtype=dtype).repeat_interleave(side)  # (side²,) row of each token in its crop
    c = torch.arange(side, dtype=dtype).repeat(side)
    probe = torch.zeros(num_crops, side * side, 3, dtype=dtype)
    probe[0, :, 1], probe[0, :, 2] = r, c
    for k in range(1, num_crops):
        i, j = divmod(k - 1, grid_width)
        probe[k, :, 0] = 1.0
        probe[k, :, 1], probe[k, :, 2] = i * side + r, j * side + c
    return probe


NEWLINE_PROBE = torch.tensor([-1.0, 0.0, 0.0], dtype=torch.float64)


def _tap(coord: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear coordinate y0 + λ -> (the two source indices (L, 2), their weights (L, 2))."""
    low = coord.floor()
    frac = coord - low
    # A coordinate that landed a rounding error below an integer is that integer (weight 1).
    up = frac > 1 - 1e-9
    low, frac = torch.where(up, low + 1, low), torch.where(up | (frac < 1e-9), torch.zeros_like(frac), frac)
    index = torch.stack([low, low + 1], dim=-1).long().clamp(0, size - 1)
    return index, torch.stack([1 - frac, frac], dim=-1)


def position_keys(probe_out: torch.Tensor, base_labels: torch.Tensor | None, canvas_labels: torch.Tensor | None,
                  newline_start: int) -> torch.Tensor:
    """What every packed position is a weighted sum of: (L, 8) int64 keys, equal rows = one group.

    probe_out (L, 3): the probe after the stock packing; base_labels (side, side) and canvas_labels
    (H, W): the merged-token label of every token of the base crop and of the AnyRes canvas. A key
    row holds up to 4 (label, rounded weight) pairs sorted by label (same labels summed); a newline
    gets the label ``newline_start`` + its index, a group of its own.
    """
    n = probe_out.shape[0]
    plane, y, x = probe_out.unbind(-1)
    labels = torch.full((n, 4), -1, dtype=torch.long)
    weights = torch.zeros(n, 4, dtype=torch.float64)
    newline = plane < -0.5
    labels[newline, 0] = newline_start + torch.arange(int(newline.sum()))
    weights[newline, 0] = 1.0
    base = (plane > -0.5) & (plane < 0.5)
    if base.any():
        labels[base, 0] = base_labels[y[base].round().long(), x[base].round().long()]
        weights[base, 0] = 1.0
    grid = plane >= 0.5
    if grid.any():
        rows, wy = _tap(y[grid], canvas_labels.shape[0])  # (G, 2) each
        cols, wx = _tap(x[grid], canvas_labels.shape[1])
        labels[grid] = canvas_labels[rows[:, :, None], cols[:, None, :]].flatten(1)  # (G, 4) the 2x2 taps
        weights[grid] = (wy[:, :, None] * wx[:, None, :]).flatten(1)
    labels = torch.where(weights > 0, labels, -1)
    order = labels.argsort(dim=1, stable=True)
    labels, weights = labels.gather(1, order), weights.gather(1, order)
    for k in range(1, 4):  # sum the weights of equal labels into the last of each run
        same = (labels[:, k] == labels[:, k - 1]) & (labels[:, k] >= 0)
        weights[:, k] += torch.where(same, weights[:, k - 1], 0.0)
        weights[:, k - 1] = torch.where(same, 0.0, weights[:, k - 1])
        labels[:, k - 1] = torch.where(same, -1, labels[:, k - 1])
    quantised = (weights * _ROUNDING).round().long()
    labels = torch.where(quantised > 0, labels, -1)
    order = labels.argsort(dim=1, stable=True)
    return torch.cat([labels.gather(1, order), quantised.gather(1, order)], dim=1)


def groups_from_keys(keys: torch.Tensor) -> torch.Tensor:
    """(L, 8) keys -> (L,) group label per position: equal keys, equal labels."""
    return torch.unique(keys, dim=0, return_inverse=True)[1]


def snap_to_groups(features: torch.Tensor, group: torch.Tensor, what: str) -> torch.Tensor:
    """Give every position of a group the row of the group's first position, after checking that
    the rows differ at most by rounding (else the group map is wrong: raise)."""
    positions = torch.arange(len(group), device=group.device)
    first = torch.full((int(group.max()) + 1,), len(group), dtype=torch.long, device=group.device)
    first = first.scatter_reduce(0, group, positions, reduce="amin")
    snapped = features[first[group].to(features.device)]
    if not torch.equal(snapped, features):
        scale = features.abs().amax().clamp(min=1e-30)
        worst = float((snapped - features).abs().amax().detach() / scale.detach())
        if worst > 1e-5:
            raise RuntimeError(f"DyMU group map for {what} is wrong: rows of one group differ by {worst:.2e} (relative)")
    return snapped


def post_merge(items: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], thresholds, calibrate=None):
    """Thresholded bipartite rounds on the packed LLM-level tokens of several images / videos.

    ``items``: per image / video, its packed rows (L, D), their VTU group (L,), and the merge segment of
    every position within the item (L,): 0 for an image, the frame for a video, -1 for a newline (never
    merged). A unit is a group (its rows are equal), taken in reading order; its size is its positions.
    ``calibrate(units entering the rounds)``: the calibration's edge chooser instead of ``thresholds``.
    Returns per item the new rows (carrying their ``dymu_group_of_patch``), and the units kept per
    segment after every round.
    """
    rows_u, sizes_u, segment_u, parts, offset = [], [], [], [], 0
    for rows, group, segment in items:
        positions = torch.arange(len(group), device=group.device)
        first = torch.full((int(group.max()) + 1,), len(group), dtype=torch.long, device=group.device)
        first = first.scatter_reduce(0, group, positions, reduce="amin")  # (G,) first position of every group
        order = first.argsort()  # groups in reading order, so units sit sorted by segment
        units = order[segment[first[order]] >= 0]
        rows_u.append(rows[first[units]])
        sizes_u.append(torch.bincount(group, minlength=len(first))[units])
        segment_u.append(segment[first[units]] + offset)
        parts.append((units, first, len(units)))
        offset += int(segment.max()) + 1
    payload = torch.cat(rows_u)
    metric = payload / payload.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    rounds = merge_rounds(payload, metric, torch.cat(sizes_u), torch.cat(segment_u), offset, thresholds,
                            None if calibrate is None else calibrate(len(payload)))
    out, start = [], 0
    for (rows, group, _), (units, first, n) in zip(items, parts):
        # A group's new label: its merged unit, or (newlines) a label of its own past every unit.
        label = torch.arange(len(first), device=group.device) + len(rounds.payload)
        label[units] = rounds.group[start:start + n]
        row_of_group = rows[first].clone()
        row_of_group[units] = rounds.payload[rounds.group[start:start + n]].to(rows.dtype)
        start += n
        new_group = torch.unique(label[group], return_inverse=True)[1]
        new_rows = row_of_group[group]
        new_rows.dymu_group_of_patch = new_group
        out.append(new_rows)
    return out, rounds.kept


def _label_grid(labels: torch.Tensor, side: int) -> torch.Tensor:
    """(side²,) labels of one crop -> (side, side)."""
    return labels.view(side, side)


def _canvas_labels(crop_labels: torch.Tensor, side: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """(grid_h·grid_w, side²) labels of the grid crops -> (grid_h·side, grid_w·side) canvas."""
    return crop_labels.view(grid_h, grid_w, side, side).permute(0, 2, 1, 3).reshape(grid_h * side, grid_w * side)


