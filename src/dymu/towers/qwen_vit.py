"""DToMe for the Qwen VL vision towers (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) on 2x2 units.

A *unit* is the 4 consecutive ViT rows that the PatchMerger turns into one LLM token (the processor
lays patches out 2x2-block-major). The PatchMerger needs all 4 rows of a unit, so DToMe merges whole
units: the metric of a unit is the head-mean of its 4 rows' pre-rotary keys, averaged over the 4
rows and L2-normalised; a merged unit is the slot-wise size-weighted mean of its 4 rows (merge.py
on (4·D)-wide rows). Merging never leaves a *segment*, the stock attention segment: one image, or
one temporal patch (2 frames) of a video. Segments act as the batch rows of merge.py, which makes
merging a function of the segment alone (batch invariance), and lets calibration (paper Eq. 4)
rank unit edges across the batch exactly as for CLIP.

Two merge points:
- ``"vit"`` (the paper): `encode_vit` replaces the tower forward. It merges at every block whose
  threshold is finite, between the attention residual and the MLP, and uses proportional attention
  (log size per key) in every block; attention runs on the packed segments (images / temporal
  patches, or Qwen2.5-VL windows) padded into one batch with a float mask. The packed layout is
  recomputed from the survivors after each merge: survivors keep their order, so they stay sorted
  by (segment, window) and the segment / window lengths are run lengths of their ids. A merged unit
  keeps the destination unit's segment, window and rotary (cos/sin): the destination's rotation is a
  real rotation of a real position of the group, while a size-weighted mean of cos/sin is not a
  rotation at all, and a centroid position would place the unit where no patch of it is (differences
  between the two are below what random weights can show). Qwen3-VL's deepstack
  features are computed on the units alive at their block and then carried through later merges as
  extra payload, so they end up constant within each final group.
- ``"post"`` (cheap): `encode_post` runs the stock tower (flash-attention varlen intact), then merges
  the LLM-sized tokens after the PatchMerger in a few thresholded bipartite rounds, with the last
  block's keys as the metric. Saves LLM compute only.

Videos, ``cross_frame=True``: a video is one merge segment, and blocks (rounds) 0, 2, 4, ... match
across its frames with a frame-parity split (`across_frames`: A = units of its even-ranked temporal
patches, B = odd-ranked), blocks 1, 3, 5, ... within each temporal patch (`within_segments`). A
merged unit keeps its destination's patch, so attention segments stay per temporal patch.

Both return a `QwenEncoded`: the features virtually unmerged back to the stock unit count (so the
processor's placeholders, `get_rope_index` and `generate` stay stock) and the group of every unit.
"""

from __future__ import annotations

import numbers
import sys
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

from .registry import tower_identity
from .. import merge as M
from ..compat import unwrap_compiled
from ..encoded import Encoded
from ..merge_segments import Layout, merge_segments, within_segments
from .qwen_rules import MergeRule, QwenBudget, check_reachable
from .. import vtu

QWEN_TOWERS = (Qwen2VisionTransformerPretrainedModel, Qwen2_5_VisionTransformerPretrainedModel, Qwen3VLVisionModel)
MERGE_POINTS = ("vit", "post")
UNIT = 4  # rows per unit: spatial_merge_size ** 2 (2 in every released Qwen VL)

EdgeChooser = M.EdgeChooser  # (block or round index, matches over the segments of the batch) -> merged edges


@dataclass(repr=False)
class QwenEncoded(Encoded):
    """What one call of the tower produced, for all images (or all videos) of the call: an item is an
    image or a video (its temporal patches are segments that merge on their own, unless cross_frame)."""

    features: Tensor  # (U, D_llm) in stock unit order, virtually unmerged: rows of one group are equal
    group_of_unit: Tensor  # (U,) long: index in [0, K) of the merged token each unit belongs to
    tokens: Tensor  # (K, D_llm) the merged tokens, segment after segment
    units_per_segment: Tensor  # (S,) units of every segment (an image, or one temporal patch of a video)
    kept_per_segment: Tensor  # (S,) merged tokens of every segment
    kept_per_step: Tensor  # (S, steps) units alive after every block ("vit") or round ("post")
    deepstack: list[Tensor] = field(default_factory=list)  # Qwen3-VL: (U, D_llm) per level, group-constant
    segments_per_item: Tensor | None = None  # (I,) temporal patches of every image / video (grid_thw[:, 0])

    def _segments(self, grid_thw: Tensor | None) -> list[int]:
        # ``grid_thw`` is accepted for callers of the first API; the call's own grid is recorded.
        source = self.segments_per_item if grid_thw is None else grid_thw[:, 0]
        return source.tolist()

    def per_item(self, grid_thw: Tensor | None = None) -> list[tuple[int, int]]:
        """(merged tokens, stock tokens) of every image / video of the call."""
        kept, units, out, s = self.kept_per_segment.tolist(), self.units_per_segment.tolist(), [], 0
        for t in self._segments(grid_thw):
            out.append((sum(kept[s : s + t]), sum(units[s : s + t])))
            s += t
        return out

    def groups_per_item(self, grid_thw: Tensor | None = None) -> list[Tensor]:
        """The group of every unit of each image / video of the call, numbered from 0 within it."""
        groups = self.group_of_unit.split([units for _, units in self.per_item(grid_thw)])
        return [g - g.min() for g in groups]


def is_qwen_tower(module: nn.Module) -> bool:
    return isinstance(module, QWEN_TOWERS)


def segment_units(grid_thw: Tensor, merge_size: int = 2) -> Tensor:
    """(S,) units per segment: every temporal patch of every image/video is one segment."""
    return torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2] // merge_size**2, grid_thw[:, 0])


def unit_metric(keys: Tensor, num_heads: int) -> Tensor:
    """(R, H·d) pre-rotary keys of R = 4·U rows -> (U, d): head-mean, mean over the unit's rows, L2-normalised."""
    metric = keys.view(keys.shape[0] // UNIT, UNIT, num_heads, -1).mean(dim=(1, 2))
    return metric / metric.norm(dim=-1, keepdim=True).clamp(min=1e-12)


# ---------------------------------------------------------------------------------------------
# One thresholded merge step on packed segments (merge.py does the math on a padded batch).


def across_frames(segment_of_unit: Tensor, item_of_segment: Tensor, items: int) -> Layout:
    """The frame-parity split: one batch row per image / video; A = the units of its even-ranked
    temporal patches, B = those of its odd-ranked ones, ranked among the patches that still hold
    units (so a merged-away patch does not leave two patches of one parity side by side). A unit can
    then pair with its twin in the neighbouring patch, which plain slot alternation never offers
    (a twin is h·w/4 slots away: the same parity whenever that is even). An item with one patch
    left (an image) keeps the stock alternation."""
    device = segment_of_unit.device
    n = len(segment_of_unit)
    item = item_of_segment[segment_of_unit]
    patches, patch = torch.unique_consecutive(segment_of_unit, return_inverse=True)  # patches present
    item_of_patch = item_of_segment[patches]
    patches_per_item = torch.bincount(item_of_patch, minlength=items)
    first = F.pad(patches_per_item.cumsum(0), (1, 0))[:-1]
    rank = torch.arange(len(patches), device=device) - first[item_of_patch]  # rank within the item
    several = patches_per_item > 1  # items with more than one patch left
    index_in_item = torch.arange(n, device=device) - F.pad(torch.bincount(item, minlength=items).cumsum(0),
                                                           (1, 0))[:-1][item]
    parity = rank[patch] % 2
    key = item * 2 + parity  # (item, parity) classes, in packed order within each
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=2 * items)
    position = torch.empty_like(key)
    position[order] = torch.arange(n, device=device) - F.pad(counts.cumsum(0), (1, 0))[:-1][key[order]]
    slot = torch.where(several[item], 2 * position + parity, index_in_item)
    return Layout(item, slot, items, int(slot.max()) + 1 if n else 0)


def _layout(step: int, cross_frame: bool, segment_of_unit: Tensor, item_of_segment: Tensor) -> Layout:
    """The matching layout of block (or round) ``step``: within segments; with ``cross_frame``, blocks
    0, 2, 4, ... match across the frames of each video and blocks 1, 3, 5, ... within frames."""
    if cross_frame and step % 2 == 0:
        return across_frames(segment_of_unit, item_of_segment, int(item_of_segment.max()) + 1)
    return within_segments(segment_of_unit, len(item_of_segment))


def _finish(tokens, group, lengths, units, kept_steps, deepstack, reverse=None) -> QwenEncoded:
    if reverse is not None:  # Qwen2.5-VL: units were in window order; back to the stock order, and
        group = group[reverse]  # tokens renumbered in order of their first unit (reading order)
        renumbered = vtu.group_map_from_labels(group[None])[0]
        old_of_new = torch.empty_like(group[: len(tokens)]).scatter_(0, renumbered, group)
        tokens, deepstack, group = tokens[old_of_new], [d[old_of_new] for d in deepstack], renumbered
    return QwenEncoded(features=tokens[group], group_of_unit=group, tokens=tokens, units_per_segment=units,
                       kept_per_segment=lengths, kept_per_step=torch.stack(kept_steps, 1) if kept_steps
                       else lengths[:, None], deepstack=[d[group] for d in deepstack])


# ---------------------------------------------------------------------------------------------
# merge_point="post": stock tower, merge after the PatchMerger.


def _window_index(visual, grid_thw: Tensor):
    if not hasattr(visual, "fullatt_block_indexes"):
        return None, None
    return get_vision_window_index(grid_thw, spatial_merge_size=visual.spatial_merge_size,
                                   window_size=visual.window_size, patch_size=visual.patch_size)


@torch.no_grad()
def encode_post(visual: nn.Module, pixel_values: Tensor, grid_thw: Tensor, thresholds: Sequence[float],
                edge_chooser: EdgeChooser | None = None, cross_frame: bool = False,
                budget: QwenBudget | None = None) -> QwenEncoded:
    """Stock tower, then one thresholded bipartite round per entry of ``thresholds`` on its output
    tokens (per segment; with ``cross_frame``, rounds alternate across and within frames), with the
    last block's pre-rotary keys as the metric. ``budget``: per image / video, over these rounds."""
    captured = []
    handle = visual.blocks[-1].attn.qkv.register_forward_hook(lambda m, a, out: captured.append(out))
    try:
        out = visual(pixel_values.to(visual.dtype), grid_thw=grid_thw, return_dict=True)
    finally:
        handle.remove()
    qkv = captured[-1]
    dim = qkv.shape[-1] // 3
    metric = unit_metric(qkv[:, dim : 2 * dim], visual.blocks[-1].attn.num_heads)  # (U, d) in tower row order
    window_index, _ = _window_index(visual, grid_thw)
    if window_index is not None:
        metric = metric[torch.argsort(window_index.to(metric.device))]  # to stock order, like pooler_output
    features = out.pooler_output
    deepstack = list(getattr(out, "deepstack_features", None) or [])
    widths = [features.shape[-1]] + [d.shape[-1] for d in deepstack]
    payload = torch.cat([features, *deepstack], dim=-1)
    units = segment_units(grid_thw, visual.spatial_merge_size).to(features.device)
    segment_of_unit, item_of_segment = _run_ids(units), _run_ids(grid_thw[:, 0].to(features.device))
    rule = MergeRule(len(thresholds), thresholds=thresholds, budget=budget, edge_chooser=edge_chooser,
                     cross_frame=cross_frame)
    check_reachable(budget, *_item_units(units, item_of_segment, segment_of_unit), rule.budget_steps_after(-1))
    sizes = torch.ones(len(features), dtype=torch.long, device=features.device)
    group, kept = torch.arange(len(payload), device=payload.device), []
    for step in range(rule.steps):  # merge.merge_rounds, with the rule's edge choice
        alive, rows = _item_units(units, item_of_segment, segment_of_unit)
        if rule.merges_at(step, alive, rows):
            layout = _layout(step, cross_frame, segment_of_unit, item_of_segment)
            merged = merge_segments(torch.cat([payload, metric], -1), metric, sizes, layout,
                                    rule.chooser(step, _item_of_row(layout, item_of_segment[segment_of_unit]),
                                                 alive, rows))
            payload, metric = merged.payload[:, : payload.shape[1]], merged.payload[:, payload.shape[1]:]
            metric = metric / metric.norm(dim=-1, keepdim=True).clamp(min=1e-12)
            sizes, group = merged.sizes, merged.new_index[group]
            segment_of_unit = segment_of_unit[merged.survivors]
        kept.append(torch.bincount(segment_of_unit, minlength=len(units)))
    parts = payload.split(widths, dim=-1)
    return _finish(parts[0], group, kept[-1], units, kept, list(parts[1:]))


def _item_units(units: Tensor, item_of_segment: Tensor, segment_of_unit: Tensor) -> tuple[Tensor, Tensor]:
    """(I,) units alive and (I,) segments holding units, per image / video."""
    items = int(item_of_segment.max()) + 1 if len(item_of_segment) else 0
    alive = torch.bincount(item_of_segment[segment_of_unit], minlength=items)
    present = torch.bincount(segment_of_unit, minlength=len(units)) > 0
    return alive, torch.bincount(item_of_segment, weights=present.to(torch.float64), minlength=items).long()


def _item_of_row(layout: Layout, item_of_unit: Tensor) -> Tensor:
    return torch.zeros(layout.rows, dtype=torch.long, device=item_of_unit.device).scatter_(0, layout.row, item_of_unit)



# ---------------------------------------------------------------------------------------------
# merge_point="vit": unit-level DToMe inside the blocks (the paper's placement).


def _rope_vision(visual):
    return sys.modules[type(visual).__module__].apply_rotary_pos_emb_vision


def proportional_attention(attn: nn.Module, rows: Tensor, cos: Tensor, sin: Tensor, lengths: Tensor,
                           log_size: Tensor, rope) -> tuple[Tensor, Tensor]:
    """Vision attention with the stock weights over packed segments, plus log(size) on every key.

    rows (R, D) packed segment after segment, ``lengths`` (S,) rows per segment, cos/sin (R, d),
    log_size (R,). The segments are padded into one batch with a float mask (-inf on padding), so
    one SDPA call does what the stock non-flash path does in a Python loop. Returns the projected
    output (R, D) and the pre-rotary keys (R, H·d) (the DToMe metric).
    """
    n = rows.shape[0]
    q, k, v = attn.qkv(rows).reshape(n, 3, attn.num_heads, -1).unbind(1)  # (R, H, d) each
    keys = k.reshape(n, -1)
    q, k = rope(q, k, cos, sin)
    n_max = int(lengths.max())
    valid = torch.arange(n_max, device=rows.device) < lengths[:, None]  # (S, L)

    def pad(x):  # (R, H, d) -> (S, H, L, d)
        out = x.new_zeros(len(lengths), n_max, *x.shape[1:])
        out[valid] = x
        return out.transpose(1, 2)

    bias = torch.full(valid.shape, float("-inf"), dtype=q.dtype, device=rows.device)
    bias[valid] = log_size.to(q.dtype)
    out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=bias[:, None, None, :],
                                         scale=attn.scaling)  # (S, H, L, d)
    out = out.transpose(1, 2)[valid].reshape(n, -1)
    return attn.proj(out), keys


def _embed(visual, pixel_values: Tensor, grid_thw: Tensor) -> Tensor:
    hidden = visual.patch_embed(pixel_values.to(visual.dtype))
    if hasattr(visual, "pos_embed"):  # Qwen3-VL: learned position table, resampled to the grid, added
        from transformers.vision_utils import get_vision_interpolation_indices_and_weights

        index, weight = get_vision_interpolation_indices_and_weights(
            grid_thw, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
            align_corners=visual.interpolation_align_corners, spatial_merge_size=visual.config.spatial_merge_size)
        hidden = hidden + (visual.pos_embed(index) * weight[:, :, None]).sum(1).to(hidden.dtype)
    return hidden


def _run_ids(lengths: Tensor) -> Tensor:
    return torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)


@torch.no_grad()
def encode_vit(visual: nn.Module, pixel_values: Tensor, grid_thw: Tensor, thresholds: Sequence[float] | None,
               edge_chooser: EdgeChooser | None = None, cross_frame: bool = False, budget: QwenBudget | None = None,
               r: Sequence[int] | None = None) -> QwenEncoded:
    """The tower forward with unit-level DToMe after the attention of every block with a finite
    threshold (one per block), proportional attention, packed layout recomputed from survivors.
    ``cross_frame``: a video's merging blocks alternate across frames (frame parity) and within frames.
    ``r`` (instead of thresholds): ToMe, r unit merges per block and matching row. ``budget``: per
    image / video, over all blocks (towers/qwen_rules.py)."""
    if len(thresholds if r is None else r) != len(visual.blocks):
        raise ValueError(f"{len(thresholds if r is None else r)} {'thresholds' if r is None else 'r values'} for a "
                         f"vision tower of {len(visual.blocks)} blocks")
    rule = MergeRule(len(visual.blocks), thresholds=thresholds if r is None else None, r=r, budget=budget,
                     edge_chooser=edge_chooser, cross_frame=cross_frame)
    rope = _rope_vision(visual)
    hidden = _embed(visual, pixel_values, grid_thw)  # (R, D), R = 4·U rows
    dim = hidden.shape[-1]
    device = hidden.device
    cos, sin = visual.rotary_pos_emb(hidden, get_vision_position_ids(grid_thw, visual.spatial_merge_size))
    units = segment_units(grid_thw, visual.spatial_merge_size).to(device)
    segment_of_unit, item_of_segment = _run_ids(units), _run_ids(grid_thw[:, 0].to(device))
    check_reachable(budget, *_item_units(units, item_of_segment, segment_of_unit), rule.budget_steps_after(-1))
    window_index, cu_windows = _window_index(visual, grid_thw)
    reverse = None
    if window_index is not None:  # Qwen2.5-VL: units in window order, as the stock forward does
        window_index = window_index.to(device)
        reverse = torch.argsort(window_index)

        def to_windows(x):
            return x.view(-1, UNIT, x.shape[-1])[window_index].reshape(-1, x.shape[-1])

        hidden, cos, sin = to_windows(hidden), to_windows(cos), to_windows(sin)
        window_of_unit = _run_ids((cu_windows[1:] - cu_windows[:-1]).to(device) // UNIT)
    n_units = hidden.shape[0] // UNIT
    sizes = torch.ones(n_units, dtype=torch.long, device=device)
    group = torch.arange(n_units, device=device)
    full_blocks = set(getattr(visual, "fullatt_block_indexes", range(len(visual.blocks))))
    deepstack_at = list(getattr(visual, "deepstack_visual_indexes", []) or [])
    deepstack: list[Tensor] = []
    lengths, kept = units, []  # tokens per temporal patch (a merged unit counts in its destination's)
    for index, block in enumerate(visual.blocks):
        # Attention segments: the segment (image / temporal patch), or its windows (Qwen2.5-VL).
        ids = segment_of_unit if index in full_blocks else window_of_unit
        seg_lengths = torch.unique_consecutive(ids, return_counts=True)[1] * UNIT
        log_size = sizes.to(hidden.dtype).log().repeat_interleave(UNIT)
        out, keys = proportional_attention(block.attn, block.norm1(hidden), cos, sin, seg_lengths, log_size, rope)
        hidden = hidden + out
        alive, rows = _item_units(units, item_of_segment, segment_of_unit)
        if rule.merges_at(index, alive, rows):
            widths = [UNIT * dim] + [d.shape[-1] for d in deepstack]
            payload = torch.cat([hidden.view(-1, UNIT * dim), *deepstack], dim=-1)
            layout = _layout(index, cross_frame, segment_of_unit, item_of_segment)
            step = merge_segments(payload, unit_metric(keys, block.attn.num_heads), sizes, layout,
                                  rule.chooser(index, _item_of_row(layout, item_of_segment[segment_of_unit]),
                                               alive, rows))
            parts = step.payload.split(widths, dim=-1)
            hidden, deepstack = parts[0].reshape(-1, dim), list(parts[1:])
            sizes, group = step.sizes, step.new_index[group]
            rows = (step.survivors[:, None] * UNIT + torch.arange(UNIT, device=device)).flatten()
            cos, sin = cos[rows], sin[rows]  # the destination unit's rotary (see module docstring)
            segment_of_unit = segment_of_unit[step.survivors]
            lengths = torch.bincount(segment_of_unit, minlength=len(units))
            if window_index is not None:
                window_of_unit = window_of_unit[step.survivors]
        kept.append(lengths)
        hidden = hidden + block.mlp(block.norm2(hidden))
        if index in deepstack_at:
            deepstack.append(visual.deepstack_merger_list[deepstack_at.index(index)](hidden))
    return _finish(visual.merger(hidden), group, lengths, units, kept, deepstack, reverse)


def check_thresholds(visual: nn.Module, thresholds, merge_point: str) -> list[float]:
    """One threshold per block ("vit") or per round ("post", any count >= 1); one number = all blocks.
    +inf (or None) never merges, -inf merges every edge of a segment, NaN is refused."""
    if merge_point not in MERGE_POINTS:
        raise ValueError(f"merge_point must be one of {', '.join(MERGE_POINTS)}, got {merge_point!r}")
    from .encoder import _threshold_floats  # None = +inf, NaN refused: the same rule as CLIP / SigLIP

    depth = len(visual.blocks)
    if isinstance(thresholds, numbers.Number):
        return _threshold_floats([thresholds] * (depth if merge_point == "vit" else 1))
    values = _threshold_floats(thresholds.tolist() if isinstance(thresholds, Tensor) else list(thresholds))
    if merge_point == "vit" and len(values) != depth:
        raise ValueError(f"merge_point='vit' needs one threshold per vision block ({depth}), got {len(values)}")
    if not values:
        raise ValueError("merge_point='post' needs at least one threshold (one per merge round)")
    return values


def encode_qwen(visual: nn.Module, pixel_values: Tensor, grid_thw: Tensor, thresholds: Sequence[float] | None,
                merge_point: str = "vit", edge_chooser: EdgeChooser | None = None,
                cross_frame: bool = False, *, budget: QwenBudget | None = None,
                r: Sequence[int] | None = None) -> QwenEncoded:
    """Encode with merging: ``thresholds`` (DToMe) or ``r`` (ToMe, merge_point "vit" only), and an
    optional token ``budget`` per image / video (towers/qwen_rules.py)."""
    visual = unwrap_compiled(visual)  # runs the tower's own blocks (torch.compile's wrapper: see compat)
    grid_thw = grid_thw.to(pixel_values.device)
    encoded = _encode_qwen(visual, pixel_values, grid_thw, thresholds, edge_chooser, cross_frame, budget, r, merge_point)
    encoded.segments_per_item = grid_thw[:, 0]  # read (tolist) only when per_item is asked
    return encoded


def _encode_qwen(visual, pixel_values, grid_thw, thresholds, edge_chooser, cross_frame, budget, r, merge_point):
    if merge_point == "vit":
        return encode_vit(visual, pixel_values, grid_thw, thresholds, edge_chooser, cross_frame, budget, r)
    if r is not None:
        raise ValueError("r (ToMe) merges in the ViT blocks: it needs merge_point='vit'")
    return encode_post(visual, pixel_values, grid_thw, thresholds, edge_chooser, cross_frame, budget)


def qwen_identity(visual: nn.Module, merge_point: str, steps: int, model_ref: str | None = None) -> dict:
    """What a thresholds file records about the Qwen tower it was calibrated on (units vary per image,
    so there is no fixed patch count: presets and r are fractions of each segment's units)."""
    config = visual.config
    arch = {k: getattr(config, k, None) for k in ("model_type", "depth", "hidden_size", "embed_dim", "num_heads",
                                                   "patch_size", "spatial_merge_size", "window_size")}
    return tower_identity(arch, family=config.model_type, num_layers=steps, class_token=False, model_ref=model_ref,
                          named=config, merge_point=merge_point)


def check_thresholds_file(thresholds, visual: nn.Module, merge_point: str) -> None:
    """One-sentence errors when a `Thresholds` object was calibrated for another tower or merge point."""
    want = getattr(thresholds, "encoder", None)
    if not want:
        return
    where = f"thresholds for {want.get('model') or 'an unnamed encoder'}"
    found = qwen_identity(visual, merge_point, len(thresholds.thresholds))
    if want.get("merge_point") is None:
        raise ValueError(f"{where} are for a {want.get('family')} encoder, not a Qwen VL vision tower")
    if want["merge_point"] != merge_point:
        raise ValueError(f"{where} were calibrated with merge_point={want['merge_point']!r}, not {merge_point!r}")
    if want["family"] != found["family"] or want["config_hash"] != found["config_hash"]:
        raise ValueError(f"{where} were calibrated on a differently shaped vision tower "
                         f"({want['family']} {want['config_hash']} vs {found['family']} {found['config_hash']})")
