"""Unit-level DToMe for the SmolVLM / Idefics3 vision side: a SigLIP-style tower on image tiles and
a pixel-shuffle connector that fuses every s x s block of patches into one LLM token.

A tile (each of an image's tiles, and its global view) is one tower input. Its patch grid is cut into
s x s *units* (s = ``config.scale_factor``), the patches the connector fuses into one LLM token, and
DToMe merges whole units (`towers/unit_vit.py`), each tile on its own: a tile's tokens depend on that
tile alone. The connector then runs on the merged units only: the pixel shuffle lays a unit's s²
patch rows side by side in raster order within the unit, which is the unit-major row order
`encode_units` keeps them in, so ``modality_projection(unit rows flattened)`` is the stock connector's
token for that unit (tests check it against the stock connector).

What the stock `get_image_features` does around the tower is kept: padding tiles (all-zero pixels,
the processor's padding to the most tiles of a prompt) are dropped, and the pixel attention mask
becomes a patch mask. Real tiles are square and unpadded (the processor resizes every tile and the
global view to ``max_image_size``); a padded patch is masked as a key and its unit never merges.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers.models.idefics3.modeling_idefics3 import Idefics3EncoderLayer
from transformers.models.smolvlm.modeling_smolvlm import SmolVLMEncoderLayer

from .registry import tower_identity
from .. import compat
from ..encoded import Encoded
from .unit_vit import BlockDescription, UnitEncoded, blocks_of, encode_units, unit_order

# The stock blocks: pre-norm SigLIP layers (layer_norm1, self_attn q/k/v/out_proj, layer_norm2, mlp), post_layernorm.
DESCRIPTION = BlockDescription(layer_classes=(SmolVLMEncoderLayer, Idefics3EncoderLayer))


@dataclass(repr=False)
class TilesEncoded(Encoded):
    """One call's tiles (every tower input of every image of the batch, in the processor's order): an
    item is a tile."""

    encoded: UnitEncoded  # the tower's: group of every unit, units kept per tile and per block
    tokens: Tensor  # (K, D_llm) the connector's token of every merged unit, tile after tile
    units_per_tile: int  # stock LLM tokens of a tile (the processor's image_seq_len)

    @property
    def kept_per_tile(self) -> list[int]:
        return self.encoded.kept_per_image.tolist()

    def features(self) -> Tensor:
        """(tiles · units, D_llm): the stock connector output's shape, every unit its merged token's row."""
        return self.tokens[self.encoded.group_of_unit]

    def groups_per_item(self) -> list[Tensor]:
        return self.encoded.groups_per_item()

    def per_item(self) -> list[tuple[int, int]]:
        return self.encoded.per_item()


def check_smolvlm_tower(inner: nn.Module) -> None:
    """Refuse (one line) an inner SmolVLM / Idefics3 model whose vision side is not what this module runs."""
    compat.require_attributes(inner, ("vision_model.embeddings", "vision_model.encoder.layers",
                                      "vision_model.post_layernorm", "connector.scale_factor",
                                      "connector.modality_projection", "connector.pixel_shuffle"),
                              type(inner).__name__)
    embeddings = inner.vision_model.embeddings
    compat.require_forward(type(embeddings), ("pixel_values", "patch_attention_mask"), var_keyword=False)
    check_pixel_shuffle(inner.connector)


def check_pixel_shuffle(connector: nn.Module) -> None:
    """Refuse (one line) a connector whose pixel shuffle does not lay each s x s unit's patches side by side
    in raster order, the layout `encode_tiles` projects merged units in: checked on patch indices."""
    side = int(connector.scale_factor)
    grid = 2 * side  # a 2x2-unit grid of patch indices
    index = torch.arange(grid * grid, dtype=torch.float32).view(1, -1, 1)
    shuffled = connector.pixel_shuffle(index, side).view(-1, side * side)  # (units, s²)
    if not torch.equal(shuffled.long(), unit_order(grid, grid, side).view(-1, side * side)):
        raise compat.refuse(f"{type(connector).__name__}.pixel_shuffle lays out units differently")


def real_tiles(pixel_values: Tensor, pixel_attention_mask: Tensor | None, patch_size: int):
    """The stock `get_image_features`' input handling: (tiles (T, 3, H, W), patch mask (T, h, w) bool,
    real tiles per prompt). ``pixel_values`` (B, max tiles, 3, H, W); padding tiles (all zeros) dropped
    (if no tile is real, the first is kept, as the stock model does)."""
    batch, slots = pixel_values.shape[:2]
    flat = pixel_values.view(batch * slots, *pixel_values.shape[2:])
    real = (flat == 0.0).sum(dim=(-1, -2, -3)) != flat.shape[1:].numel()
    real[0] |= ~torch.any(real)
    per_prompt = real.view(batch, slots).sum(dim=1).tolist()
    tiles = flat[real].contiguous()
    if pixel_attention_mask is None:
        pixel_mask = torch.ones((tiles.shape[0], *tiles.shape[2:]), dtype=torch.bool, device=tiles.device)
    else:
        pixel_mask = pixel_attention_mask.view(batch * slots, *pixel_attention_mask.shape[2:])[real]
    patches = pixel_mask.unfold(1, patch_size, patch_size).unfold(2, patch_size, patch_size)
    return tiles, patches.sum(dim=(-1, -2)) > 0, per_prompt


@torch.no_grad()
def encode_tiles(inner: nn.Module, tiles: Tensor, patch_mask: Tensor, thresholds=None, r=None, budget=None,
                 edge_chooser=None) -> TilesEncoded:
    """Tower + connector on ``tiles`` (T, 3, H, W) with unit-level DToMe: ``thresholds`` (one per block,
    +inf never merges) or ``r`` (ToMe), ``budget`` (LLM tokens per tile), ``edge_chooser`` (calibration)."""
    tower, connector = inner.vision_model, inner.connector
    side = int(connector.scale_factor)
    tiles = tiles.to(dtype=tower.dtype)
    hidden = tower.embeddings(pixel_values=tiles, patch_attention_mask=patch_mask)  # (T, h·w, D) raster order
    height, width = patch_mask.shape[1:]
    if height != width:  # the stock pixel shuffle takes square grids only
        raise ValueError(f"a {height}x{width} patch grid is not square: SmolVLM's pixel shuffle needs square tiles")
    mask = None if bool(patch_mask.all()) else patch_mask.reshape(len(tiles), -1)
    if edge_chooser is None and thresholds is None and r is None:
        thresholds = [float("inf")] * len(blocks_of(tower, DESCRIPTION))
    encoded = encode_units(tower, DESCRIPTION, hidden, (height, width), side, thresholds=thresholds, r=r,
                           edge_chooser=edge_chooser, budget=budget, patch_mask=mask)
    # The connector on merged units: a unit's s² rows side by side is the pixel shuffle's token (module docstring).
    tokens = connector.modality_projection(encoded.units.reshape(len(encoded.units), -1))
    return TilesEncoded(encoded=encoded, tokens=tokens, units_per_tile=height * width // side**2)


def tower_depth(inner: nn.Module) -> int:
    return len(blocks_of(inner.vision_model, DESCRIPTION))


def check_thresholds(inner: nn.Module, thresholds) -> list[float]:
    """One threshold per vision block (one number = all blocks); +inf (or None) never merges, NaN refused."""
    from .encoder import _threshold_floats  # None = +inf, NaN refused: the same rule as CLIP / SigLIP

    depth = tower_depth(inner)
    if isinstance(thresholds, numbers.Number):
        return _threshold_floats([thresholds] * depth)
    values = _threshold_floats(thresholds.tolist() if isinstance(thresholds, Tensor) else list(thresholds))
    if len(values) != depth:
        raise ValueError(f"this vision tower has {depth} blocks: it needs one threshold per block, got {len(values)}")
    return values


def unit_identity(inner: nn.Module, family: str, model_ref: str | None = None) -> dict:
    """What a thresholds file records about the tower it was calibrated on: the VLM family, the tower's
    shape and the unit side (units per tile are fixed, but presets and r are fractions of them)."""
    config = inner.vision_model.config
    arch = {k: getattr(config, k, None) for k in ("model_type", "num_hidden_layers", "hidden_size",
                                                   "num_attention_heads", "patch_size", "image_size")}
    arch["scale_factor"] = int(inner.connector.scale_factor)
    return tower_identity(arch, family=family, num_layers=tower_depth(inner), class_token=False, model_ref=model_ref,
                          named=inner.config, merge_point="vit", unit_side=arch["scale_factor"])


def check_thresholds_file(thresholds, inner: nn.Module, family: str) -> None:
    """One-sentence errors when a `Thresholds` object was calibrated for another family or tower shape."""
    want = getattr(thresholds, "encoder", None)
    if not want:
        return
    where = f"thresholds for {want.get('model') or 'an unnamed encoder'}"
    found = unit_identity(inner, family)
    if want.get("family") != family:
        raise ValueError(f"{where} are for a {want.get('family')} model, not a {family} model")
    if want.get("config_hash") != found["config_hash"]:
        raise ValueError(f"{where} were calibrated on a differently shaped vision tower "
                         f"({want.get('config_hash')} vs {found['config_hash']})")
