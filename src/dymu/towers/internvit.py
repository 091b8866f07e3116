"""InternViT (InternVL 3 / 3.5's vision tower) as a unit-level DToMe tower (towers/unit_vit.py).

InternViT is a plain pre-norm ViT: a class token and a learned position table (interpolated for
other tile sizes) in its embeddings, then blocks ``h += lambda_1 * attn(norm(h))``, ``h += lambda_2 *
mlp(norm(h))`` (per-channel layer scale; optional RMS q/k norms on the flattened projections, InternViT-6B),
then a final norm (the identity in every released InternVL 3 / 3.5, which pools by mean). InternVL's
connector pixel-shuffles the tile's patch grid with ratio 0.5: every 2x2 block of patches becomes one
LLM token (its 4 rows concatenated channel-wise, in raster order), so the unit is that 2x2 block
(side = 1 / downsample_ratio). Each tile (and the thumbnail, and each video frame) is one tower input
and one merge segment: a tile's tokens depend on that tile alone. The class token is never merged
(the VLM drops it: ``vision_feature_select_strategy`` "default").

`encode_tiles` runs the stock embeddings, then `unit_vit.encode_units` up to the feature layer the VLM
reads (``vision_feature_layer``: -1 is every block and the final norm, as the stock
``last_hidden_state``; another index is that entry of the stock ``hidden_states``, without the norm).
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch
from torch import Tensor, nn
from transformers.models.internvl.modeling_internvl import InternVLVisionLayer, InternVLVisionModel

from .registry import tower_identity
from .. import compat
from .qwen_rules import QwenBudget
from .unit_vit import BlockDescription, EdgeChooser, UnitEncoded, encode_units, unit_order

INTERNVIT = BlockDescription(
    layer_classes=(InternVLVisionLayer,), blocks="encoder.layer", attn_norm="layernorm_before", attention="attention",
    mlp_norm="layernorm_after", mlp="mlp", q="q_proj", k="k_proj", v="v_proj", o="projection_layer",
    heads="num_heads", scale="scale", q_norm="q_norm", k_norm="k_norm",  # nn.Identity without use_qk_norm
    attn_scale="lambda_1", mlp_scale="lambda_2",
    final_norm=None,  # the stock final norm applies to feature layer -1 only: encode_tiles runs it there
    class_token=True)


def unit_side(config) -> int:
    """Patches per unit side: 1 / downsample_ratio (2 in every released InternVL)."""
    side = 1 / float(config.downsample_ratio)
    if abs(side - round(side)) > 1e-6 or round(side) < 1:
        raise ValueError(f"downsample_ratio {config.downsample_ratio} does not fuse whole k x k patch blocks")
    return int(round(side))


def layers_run(tower: nn.Module, feature_layer: int) -> int:
    """Blocks the stock tower runs before the features at ``feature_layer`` (an index into the stock
    ``hidden_states``, which start with the embeddings' output)."""
    depth = len(tower.encoder.layer)
    if isinstance(feature_layer, bool) or not isinstance(feature_layer, int) or not -depth - 1 <= feature_layer <= depth:
        raise ValueError(f"vision_feature_layer must be one index in [-{depth + 1}, {depth}] for this "
                         f"{depth}-block InternViT, not {feature_layer!r}")
    return feature_layer % (depth + 1)


def check_connector(model: nn.Module) -> None:
    """Refuse (one line) an InternVL whose tower or pixel shuffle is not what the unit merging assumes:
    the stock InternViT blocks, and a pixel shuffle that makes each LLM token of the 2x2 block of
    patches in raster order (units in raster order), checked on an index grid through the stock method."""
    inner = model.model
    if not isinstance(inner.vision_tower, InternVLVisionModel):
        raise compat.refuse(f"the vision tower is a {type(inner.vision_tower).__name__}, not an InternVLVisionModel")
    compat.require_attributes(inner.vision_tower, ("embeddings", "encoder.layer", "layernorm"))
    compat.require_attributes(inner, ("pixel_shuffle", "multi_modal_projector"))
    side = unit_side(inner.config)
    grid = 2 * side
    index = torch.arange(float(grid * grid)).view(1, grid, grid, 1)
    shuffled = inner.pixel_shuffle(index, scale_factor=inner.config.downsample_ratio).reshape(-1)
    if not torch.equal(shuffled.long(), unit_order(grid, grid, side)):
        raise compat.refuse("InternVLModel.pixel_shuffle no longer fuses each raster k x k patch block into one "
                            "token in raster order")


@torch.no_grad()
def encode_tiles(tower: nn.Module, pixel_values: Tensor, feature_layer: int, side: int,
                 thresholds: Sequence[float] | None = None, r: Sequence[int] | None = None,
                 edge_chooser: EdgeChooser | None = None, budget: QwenBudget | None = None) -> UnitEncoded:
    """Tiles (T, 3, S, S) through InternViT with unit-level DToMe up to ``feature_layer``; one threshold
    (or r) per block run. Returns the patch rows virtually unmerged (T, h·w, D) without the class token."""
    pixel_values = pixel_values.to(next(tower.parameters()).dtype)
    embeddings = tower.embeddings(pixel_values)  # (T, 1 + h·w, D): class token, positions added
    patch = tower.embeddings.patch_size
    grid = (pixel_values.shape[-2] // patch[0], pixel_values.shape[-1] // patch[1])
    run = layers_run(tower, feature_layer)
    encoded = encode_units(tower, INTERNVIT, embeddings, grid, side, thresholds=thresholds, r=r,
                           edge_chooser=edge_chooser, budget=budget, layers=run)
    if feature_layer == -1:  # the stock last_hidden_state: every block, then the final norm (row-wise)
        encoded.units = tower.layernorm(encoded.units)
        encoded.features = tower.layernorm(encoded.features)
    return encoded


def check_thresholds(tower: nn.Module, thresholds, feature_layer: int) -> list[float]:
    """One threshold per block run up to the feature layer (one number: all of them); +inf / None never
    merges, NaN is refused."""
    from .encoder import _threshold_floats  # None = +inf, NaN refused: the rule every tower uses

    run = layers_run(tower, feature_layer)
    if isinstance(thresholds, numbers.Number):
        return _threshold_floats([thresholds] * run)
    values = _threshold_floats(thresholds.tolist() if isinstance(thresholds, Tensor) else list(thresholds))
    if len(values) != run:
        raise ValueError(f"this InternViT runs {run} blocks up to its feature layer {feature_layer}: it needs "
                         f"{run} thresholds (one per block), got {len(values)}")
    return values


def internvit_identity(tower: nn.Module, feature_layer: int, model_ref: str | None = None) -> dict:
    """What a thresholds file records about the InternViT it was calibrated on."""
    config = tower.config
    arch = {k: getattr(config, k, None) for k in ("model_type", "num_hidden_layers", "hidden_size",
                                                   "num_attention_heads", "patch_size", "image_size",
                                                   "use_qk_norm", "norm_type")}
    return tower_identity(arch, family="internvl", num_layers=layers_run(tower, feature_layer), class_token=True,
                          model_ref=model_ref, named=config, merge_point="vit")


def check_thresholds_file(thresholds, tower: nn.Module, feature_layer: int) -> None:
    """One-sentence errors when a `Thresholds` object was calibrated for another tower or feature layer."""
    want = getattr(thresholds, "encoder", None)
    if not want:
        return
    where = f"thresholds for {want.get('model') or 'an unnamed encoder'}"
    found = internvit_identity(tower, feature_layer)
    if want.get("family") != "internvl":
        raise ValueError(f"{where} are for a {want.get('family')} encoder, not an InternVL vision tower")
    if want.get("config_hash") != found["config_hash"]:
        raise ValueError(f"{where} were calibrated on a differently shaped InternViT "
                         f"({want.get('config_hash')} vs {found['config_hash']})")
    if want.get("num_layers") != found["num_layers"]:
        raise ValueError(f"{where} merge in {want.get('num_layers')} blocks, but this InternVL reads its tower after "
                         f"{found['num_layers']} (vision_feature_layer {feature_layer})")


def never(tower: nn.Module, feature_layer: int) -> list[float]:
    return [math.inf] * layers_run(tower, feature_layer)
