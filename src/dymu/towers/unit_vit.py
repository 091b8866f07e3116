"""Unit-level DToMe for plain pre-norm ViT towers whose connector fuses fixed k x k blocks of patches.

A *unit* is the k x k block of patches that the connector turns into one LLM token: Gemma 3's 4 x 4
average pool, SmolVLM / Idefics3's and InternVL's pixel shuffle. Merging single patches would leave
every LLM token a mix of several merged tokens, each LLM token a group of its own, and nothing for
VTU to save in the decoder; so DToMe merges whole units, exactly as the Qwen towers do for their
2 x 2 units (towers/qwen_vit.py), with the same rules:

- rows are *unit-major*: the stock embeddings (absolute position embeddings added there, so the
  order of rows after them changes nothing) are reordered so that units come in raster order and
  the k² patches of a unit in raster order within it;
- the metric of a unit is the head-mean of its rows' keys (after the attention's key norm, if
  any), averaged over the unit's rows and L2-normalised;
- a merged unit is the slot-wise size-weighted mean of its rows (`merge.merge_segments` on
  (k²·D)-wide rows), merging never leaves its image (an image is a merge segment: batch
  invariance), thresholds / r / budgets / the calibration's edge chooser are `MergeRule`'s;
- every block runs attention per image with log(size) added to every key (proportional
  attention), and merges between the attention residual and the MLP when its rule says so.

Attention runs on the images padded into one batch with a float mask (one SDPA call per block):
-inf on padding and on masked patches, log(size) elsewhere. A *patch mask* (SmolVLM's patch
attention mask for padded images) is supported: masked patches are masked as keys, as the stock
bidirectional mask does, and a unit holding a masked patch never merges (an edge to or from it is
dropped, so an image with masked units may merge less than it could, never wrongly). A class token
(InternViT) is its own row ahead of the image's units, attends and is attended with size 1, and
never merges.

`encode_units` returns a `UnitEncoded`: the patch rows virtually unmerged back to the stock patch
order (so the stock connector runs on them, and processors' placeholders and `generate` stay
stock), the merged units, and the group of every unit, as `QwenEncoded` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import compat
from .. import merge as M
from ..encoded import Encoded
from ..merge_segments import Layout, merge_segments, within_segments
from .qwen_rules import MergeRule, QwenBudget, check_reachable

EdgeChooser = M.EdgeChooser  # (block index, matches over the images of the batch) -> merged edges


@dataclass(frozen=True)
class BlockDescription:
    """Where a pre-norm ViT block keeps its parts (attribute names, dotted from the module named).

    The block computed is ``h = h + ls1 * o(attn(q_norm(q(n1(h))), k_norm(k(n1(h))), v(n1(h))))``
    then (merge) then ``h = h + ls2 * mlp(n2(h))``; ``ls1`` / ``ls2`` are optional per-channel
    layer-scale parameters (InternViT's lambda_1 / lambda_2), ``q_norm`` / ``k_norm`` optional norms
    on the flattened projections (InternViT's qk normalisation).
    """

    layer_classes: tuple[type, ...]  # the stock block classes this description was written for
    blocks: str = "encoder.layers"  # on the tower
    attn_norm: str = "layer_norm1"  # on the block
    attention: str = "self_attn"  # on the block
    mlp_norm: str = "layer_norm2"
    mlp: str = "mlp"
    q: str = "q_proj"  # on the attention module
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "out_proj"
    heads: str = "num_heads"  # attribute of the attention module: number of heads
    scale: str = "scale"  # attribute of the attention module: the softmax scale
    q_norm: str | None = None
    k_norm: str | None = None
    attn_scale: str | None = None  # on the block: layer scale of the attention output
    mlp_scale: str | None = None  # on the block: layer scale of the MLP output
    final_norm: str | None = "post_layernorm"  # on the tower, after the last block (None: none)
    class_token: bool = False  # the embeddings put a class token ahead of the patches


def _get(module, name: str):
    for part in name.split("."):
        module = getattr(module, part)
    return module


def blocks_of(tower: nn.Module, description: BlockDescription) -> nn.ModuleList:
    return _get(tower, description.blocks)


def check_tower(tower: nn.Module, description: BlockDescription) -> None:
    """Refuse (one line) a tower whose blocks are not the classes, or lack the parts, ``description`` names."""
    owner = type(tower).__name__
    compat.require_attributes(tower, (description.blocks,), owner)
    if description.final_norm:
        compat.require_attributes(tower, (description.final_norm,), owner)
    block_parts = [description.attn_norm, description.attention, description.mlp_norm, description.mlp]
    block_parts += [p for p in (description.attn_scale, description.mlp_scale) if p]
    attn_parts = [description.q, description.k, description.v, description.o, description.heads, description.scale]
    attn_parts += [p for p in (description.q_norm, description.k_norm) if p]
    for index, block in enumerate(blocks_of(tower, description)):
        stock = getattr(block, "_dymu_stock_class", type(block))
        if not issubclass(stock, description.layer_classes):
            names = " / ".join(c.__name__ for c in description.layer_classes)
            raise compat.refuse(f"block {index} of {owner} is a {stock.__name__}, not a {names}")
        compat.require_attributes(block, tuple(block_parts), stock.__name__)
        compat.require_attributes(_get(block, description.attention), tuple(attn_parts),
                                  f"{stock.__name__}.{description.attention}")


def unit_order(height: int, width: int, side: int, device=None) -> Tensor:
    """(h·w,) the raster patch index of every unit-major row: units in raster order, the side² patches
    of a unit in raster order within it. ``rows[order]`` goes from raster to unit-major order."""
    if height % side or width % side:
        raise ValueError(f"a {height}x{width} patch grid does not split into {side}x{side} units")
    grid = torch.arange(height * width, device=device).view(height // side, side, width // side, side)
    return grid.permute(0, 2, 1, 3).reshape(-1)


@dataclass(repr=False)
class UnitEncoded(Encoded):
    """What one call of `encode_units` produced for a batch of B images (or tiles: an item each) of U
    units of k² patches."""

    features: Tensor  # (B, h·w, D) patch rows in stock raster order, virtually unmerged (a unit's rows = its group's)
    units: Tensor  # (K, k², D) the merged units, image after image (rows unit-major within a unit)
    group_of_unit: Tensor  # (B·U,) index in [0, K) of the merged unit every unit belongs to (units in raster order)
    units_per_image: Tensor  # (B,) units of every image (U)
    kept_per_image: Tensor  # (B,) merged units every image keeps
    kept_per_block: Tensor  # (B, blocks run) units alive after every block
    class_tokens: Tensor | None = None  # (B, D) the class token's row after the last block (never merged)

    def groups_per_item(self) -> list[Tensor]:
        """The group of every unit of each image (raster order), numbered from 0 within the image."""
        groups = self.group_of_unit.split(self.units_per_image.tolist())
        return [g - g.min() for g in groups]

    def per_item(self) -> list[tuple[int, int]]:
        """(merged units, stock units) of every image: LLM rows against stock positions."""
        return list(zip(self.kept_per_image.tolist(), self.units_per_image.tolist()))


def unit_metric(keys: Tensor, num_heads: int, unit: int) -> Tensor:
    """(R, H·d) keys of R = unit·U rows -> (U, d): head-mean, mean over the unit's rows, L2-normalised."""
    metric = keys.view(keys.shape[0] // unit, unit, num_heads, -1).mean(dim=(1, 2))
    return metric / metric.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def unit_attention(attn: nn.Module, description: BlockDescription, rows: Tensor, lengths: Tensor,
                   bias: Tensor) -> tuple[Tensor, Tensor]:
    """The stock attention weights on packed images: ``rows`` (R, D) image after image, ``lengths``
    (B,) rows per image, ``bias`` (R,) added to every key's logit (log size; -inf masks a key).

    The images are padded into one batch with a float mask (-inf on padding), one SDPA call. Returns
    the projected output (R, D) and the keys (R, H·d) the attention used (the DToMe metric)."""
    d = description
    q, k, v = _get(attn, d.q)(rows), _get(attn, d.k)(rows), _get(attn, d.v)(rows)
    if d.q_norm:
        q = _get(attn, d.q_norm)(q)
    if d.k_norm:
        k = _get(attn, d.k_norm)(k)
    heads = int(_get(attn, d.heads))
    n_max = int(lengths.max())
    valid = torch.arange(n_max, device=rows.device) < lengths[:, None]  # (B, L)

    def pad(x):  # (R, H·d) -> (B, H, L, d)
        out = x.new_zeros(len(lengths), n_max, x.shape[-1])
        out[valid] = x
        return out.view(len(lengths), n_max, heads, -1).transpose(1, 2)

    mask = torch.full(valid.shape, float("-inf"), dtype=q.dtype, device=rows.device)
    mask[valid] = bias.to(q.dtype)
    out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask[:, None, None, :],
                                         scale=float(_get(attn, d.scale)))  # (B, H, L, d)
    out = out.transpose(1, 2).reshape(len(lengths), n_max, -1)[valid]
    return _get(attn, d.o)(out), k


def _blocked_chooser(choose, blocked: Tensor, layout: Layout):
    """Drop every edge from or to a unit in ``blocked`` (U,) before ``choose`` sees the matches, so a
    batch-level top-k (calibration) still takes exactly its k among the allowed edges."""
    pad = torch.zeros(layout.rows, layout.width, dtype=torch.bool, device=blocked.device)
    pad[layout.row, layout.slot] = blocked
    a, b = pad[:, 0::2], pad[:, 1::2]

    def wrapped(matches: M.Matches) -> Tensor:
        if b.shape[1] == 0:
            return choose(matches)
        edge = a | b.gather(1, matches.partner.clamp(max=b.shape[1] - 1))
        return choose(M.Matches(score=matches.score.masked_fill(edge, float("-inf")), partner=matches.partner,
                                cap=matches.cap, protect_first=matches.protect_first))
    return wrapped


@torch.no_grad()
def encode_units(tower: nn.Module, description: BlockDescription, embeddings: Tensor, grid: tuple[int, int],
                 unit_side: int, thresholds: Sequence[float] | None = None, r: Sequence[int] | None = None,
                 edge_chooser: EdgeChooser | None = None, budget: QwenBudget | None = None,
                 patch_mask: Tensor | None = None, layers: int | None = None) -> UnitEncoded:
    """The tower's blocks on ``embeddings`` (B, [1 +] h·w, D) (the stock embeddings' output: patches in
    raster order of the ``grid`` (h, w), after the class token when the description has one) with
    unit-level DToMe: ``thresholds`` (one per block; +inf never merges) or ``r`` (ToMe, unit merges
    per image and block), ``edge_chooser`` (calibration: replaces both), ``budget`` (LLM tokens per
    image, towers/qwen_rules.py). ``patch_mask`` (B, h·w) bool: False = a padded patch (see module
    docstring). ``layers``: blocks to run (default all; the final norm runs only after all of them)."""
    check_tower(tower, description)
    blocks = blocks_of(tower, description)
    run = len(blocks) if layers is None else int(layers)
    if not 0 <= run <= len(blocks):
        raise ValueError(f"layers={layers} is out of range for a tower of {len(blocks)} blocks")
    rule_values = thresholds if r is None else r
    if edge_chooser is None and (rule_values is None or len(rule_values) != run):
        raise ValueError(f"{'thresholds' if r is None else 'r'} must have one entry per block run ({run})")
    rule = MergeRule(run, thresholds=thresholds if r is None else None, r=r, budget=budget, edge_chooser=edge_chooser)
    bsz, _, dim = embeddings.shape
    height, width = grid
    unit = unit_side * unit_side
    device = embeddings.device
    order = unit_order(height, width, unit_side, device)  # (N,) raster index of every unit-major row
    cls = embeddings[:, 0] if description.class_token else None
    patches = embeddings[:, int(description.class_token):]
    if patches.shape[1] != height * width:
        raise ValueError(f"{patches.shape[1]} patch rows for a {height}x{width} grid")
    hidden = patches[:, order].reshape(-1, dim)  # (B·N, D) unit-major, image after image
    n_units = height * width // unit
    units = torch.full((bsz,), n_units, dtype=torch.long, device=device)
    image_of_unit = torch.arange(bsz, device=device).repeat_interleave(n_units)
    key_ok = torch.ones(hidden.shape[0], dtype=torch.bool, device=device)
    blocked = None
    if patch_mask is not None:
        if tuple(patch_mask.shape) not in ((bsz, height * width), (bsz, height, width)):
            raise ValueError(f"patch_mask must be (images, {height * width}) or (images, {height}, {width}), "
                             f"not {tuple(patch_mask.shape)}")
        patch_mask = patch_mask.reshape(bsz, -1)
        key_ok = patch_mask.to(device=device, dtype=torch.bool)[:, order].reshape(-1)
        if not bool(patch_mask.view(bsz, -1).any(1).all()):
            raise ValueError("patch_mask masks every patch of an image: there is nothing to attend to")
        blocked = ~key_ok.view(-1, unit).all(1)
        if not bool(blocked.any()):
            blocked = None
    check_reachable(budget, units, torch.ones_like(units), rule.budget_steps_after(-1))
    sizes = torch.ones(bsz * n_units, dtype=torch.long, device=device)
    group = torch.arange(bsz * n_units, device=device)
    kept: list[Tensor] = []
    for index, block in enumerate(blocks[:run]):
        attn = _get(block, description.attention)
        bias = torch.where(key_ok, sizes.to(hidden.dtype).log().repeat_interleave(unit), float("-inf"))
        lengths = torch.bincount(image_of_unit, minlength=bsz) * unit
        rows = hidden
        if cls is not None:  # each image's class token row goes ahead of its units
            rows, bias, lengths, where = _with_class(hidden, bias, lengths, cls)
        out, keys = unit_attention(attn, description, _get(block, description.attn_norm)(rows), lengths, bias)
        if description.attn_scale:
            out = out * _get(block, description.attn_scale)
        if cls is not None:
            cls, out, keys = cls + out[where], out[~where], keys[~where]
        hidden = hidden + out
        alive = torch.bincount(image_of_unit, minlength=bsz)
        if rule.merges_at(index, alive, torch.ones_like(alive)):
            layout = within_segments(image_of_unit, bsz)
            choose = rule.chooser(index, torch.arange(bsz, device=device), alive, torch.ones_like(alive))
            if blocked is not None:
                choose = _blocked_chooser(choose, blocked, layout)
            step = merge_segments(hidden.view(-1, unit * dim), unit_metric(keys, int(_get(attn, description.heads)), unit), sizes,
                                  layout, choose)
            hidden = step.payload.reshape(-1, dim)
            key_ok = key_ok.view(-1, unit)[step.survivors].reshape(-1)  # only fully valid units ever merge
            if blocked is not None:
                blocked = blocked[step.survivors]
            sizes, group = step.sizes, step.new_index[group]
            image_of_unit = image_of_unit[step.survivors]
        kept.append(torch.bincount(image_of_unit, minlength=bsz))
        out = _get(block, description.mlp)(_get(block, description.mlp_norm)(hidden))
        if description.mlp_scale:
            out = out * _get(block, description.mlp_scale)
        hidden = hidden + out
        if cls is not None:
            cls_out = _get(block, description.mlp)(_get(block, description.mlp_norm)(cls))
            cls = cls + (cls_out * _get(block, description.mlp_scale) if description.mlp_scale else cls_out)
    if run == len(blocks) and description.final_norm:
        final = _get(tower, description.final_norm)
        hidden = final(hidden)
        cls = None if cls is None else final(cls)
    merged = hidden.view(-1, unit, dim)  # (K, k², D)
    stock = torch.empty(bsz * n_units * unit, dim, dtype=hidden.dtype, device=device)
    stock.view(bsz, -1, dim)[:, order] = merged[group].view(bsz, -1, dim)  # unit-major -> raster order
    kept_now = torch.bincount(image_of_unit, minlength=bsz)
    return UnitEncoded(features=stock.view(bsz, -1, dim), units=merged, group_of_unit=group, units_per_image=units,
                       kept_per_image=kept_now, kept_per_block=torch.stack(kept, 1) if kept else kept_now[:, None],
                       class_tokens=cls)


def _with_class(hidden: Tensor, bias: Tensor, lengths: Tensor, cls: Tensor):
    """Rows with each image's class token ahead of its unit rows: (rows, bias, lengths, where), with
    ``where`` (R + B,) True on the class rows."""
    total = lengths + 1
    starts = F.pad(total.cumsum(0), (1, 0))[:-1]
    where = torch.zeros(int(total.sum()), dtype=torch.bool, device=hidden.device)
    where[starts] = True
    rows = hidden.new_empty(len(where), hidden.shape[-1])
    rows[where], rows[~where] = cls, hidden
    full_bias = bias.new_zeros(len(where))  # the class token: size 1, log 1 = 0
    full_bias[~where] = bias
    return rows, full_bias, total, where
