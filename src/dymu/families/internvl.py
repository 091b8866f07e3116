"""DyMU in InternVL 3 / 3.5 (`InternVLForConditionalGeneration`, transformers' own implementation).

Vision: every tower input is one 448-px tile (the processor cuts an image into up to ``max_patches``
tiles plus a thumbnail; a video frame is one tile). InternViT runs unit-level DToMe
(towers/internvit.py on towers/unit_vit.py): the unit is the 2x2 patch block that the pixel-shuffle
connector fuses into one LLM token, each tile merges on its own (a tile's tokens depend on that tile
alone), the class token never merges. The projector runs on the merged units only; with VTU each
tile's features are gathered back to its stock unit count, so the processor's ``<IMG_CONTEXT>``
placeholders, 1-D positions and `generate` stay stock.

The inner `InternVLModel` is class-swapped per instance. Its `get_image_features` returns one feature
tensor per tile (``pooler_output`` a list: `generate` re-lists it for beams / num_return_sequences, and
each tensor carries the group of every unit, ``dymu_group_of_unit``); its `forward` builds the prompt's
group map (tiles in `masked_scatter` order), hands it to the VTU decoder layers (Qwen2 for InternVL 3,
Qwen3 for InternVL 3.5) for that prefill, and gives the stock forward the tiles' features as one tensor.
Without VTU (``dtome``, ``tome`` with ``tome_vtu=False``) each tile gives one row per kept unit (in
group order) and `dymu.prompt_inputs` shortens every tile's placeholders to match; InternVL's positions
are 1-D, so the kept tokens simply sit one after the other.

Budgets (``max_tokens`` / ``min_tokens``) count LLM tokens per tile (a tower input), as calibration does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.internvl.modeling_internvl import InternVLForConditionalGeneration, InternVLModel

from .. import compat
from ..decoders.llama import check_kv_cache, check_vtu, vtu_groups
from ..patching import PatchedClasses
from ..towers import internvit
from ..towers.qwen_rules import QwenBudget, check_r, make_qwen_budget
from ..towers.unit_vit import UnitEncoded
from .base import VLMFamily, check_mode_arguments, register_vlm_family, install_inner_patch, remove_inner_patch
from .internvl_processor import tile_images
from .llava import labels_to_group_map

INTERNVL_MODES = ("full", "dymu", "dtome", "tome")


@dataclass
class InternVLSettings:
    mode: str
    thresholds: list[float] | None  # one per block run up to the feature layer
    r: list[int] | None = None  # mode tome: unit merges per block and tile
    budget: QwenBudget | None = None  # LLM tokens per tile
    direct: bool = False  # merged tokens fed straight to the LLM (no VTU): dtome, tome without VTU
    last_encoded: UnitEncoded | None = field(default=None, repr=False)  # of the last get_image_features call


def _feature_layer(config, given=None) -> int:
    layer = config.vision_feature_layer if given is None else given
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise ValueError(f"DyMU reads one vision feature layer, not {layer!r}")
    return layer


def encode_internvl(inner: nn.Module, pixel_values: torch.Tensor, settings: InternVLSettings | None,
                    feature_layer: int | None = None, edge_chooser=None) -> tuple[UnitEncoded, torch.Tensor]:
    """Tiles (T, 3, S, S) through the merging tower and the projector on the merged units:
    (the tower's `UnitEncoded`, (K, D_llm) projected merged units, tile after tile). ``settings`` None:
    nothing merges (the stock tokens, every unit its own group)."""
    layer = _feature_layer(inner.config, feature_layer)
    tower = inner.vision_tower
    side = internvit.unit_side(inner.config)
    thresholds = internvit.never(tower, layer) if settings is None else settings.thresholds
    encoded = internvit.encode_tiles(tower, pixel_values, layer, side, thresholds=thresholds,
                                     r=None if settings is None else settings.r, edge_chooser=edge_chooser,
                                     budget=None if settings is None else settings.budget)
    # A merged unit's k² rows, concatenated in raster order, are its pixel-shuffled token (check_connector).
    projected = inner.multi_modal_projector(encoded.units.reshape(len(encoded.units), -1))
    return encoded, projected


def tile_features(encoded: UnitEncoded, projected: torch.Tensor, direct: bool):
    """With VTU: (T, U, D_llm), every unit its group's row, with ``dymu_group_of_unit`` (T, U) (groups local
    to each tile): the stock model's shape, so the stock forward takes it as is. ``direct``: a list of the
    (K_t, D_llm) kept tokens of each tile (`generate` re-lists a list's tensors as they are)."""
    groups = encoded.groups_per_item()
    rows = projected.split(encoded.kept_per_image.tolist())
    if direct:
        return list(rows)
    features = torch.stack([tile_rows[group] for tile_rows, group in zip(rows, groups)])
    features.dymu_group_of_unit = torch.stack(groups)
    return features


def tile_groups(image) -> torch.Tensor:
    """(T, U) group of every unit of every tile of an image output (features not made by DyMU: every unit its
    own group, which is the stock computation). `generate` with beams / num_return_sequences restacks the
    tiles into a new tensor, without the attribute: each of its tiles is then a copy of one tile DyMU made
    (``dymu_tiles``), found by value; merging is a function of the tile alone, so equal tiles have equal groups."""
    features = image.pooler_output
    groups = getattr(features, "dymu_group_of_unit", None)
    if groups is not None:
        return groups
    made = getattr(image, "dymu_tiles", None)
    units = torch.arange(features.shape[1], device=features.device)
    if made is None:
        return units.expand(features.shape[0], -1)
    original, original_groups = made
    found = []
    for tile in features:
        match = next((k for k, known in enumerate(original) if torch.equal(known, tile)), None)
        found.append(units if match is None else original_groups[match])
    return torch.stack(found)


class DyMUInternVLModel:
    """Mixed in before the stock InternVLModel of one instance."""

    _dymu: InternVLSettings
    _dymu_stock_class: type

    def get_image_features(self, pixel_values: torch.Tensor, vision_feature_layer=None,
                           vision_feature_select_strategy=None, **kwargs):
        strategy = vision_feature_select_strategy or self.config.vision_feature_select_strategy
        if strategy != "default":
            raise ValueError(f"InternVL's pixel shuffle needs the patches without the class token "
                             f"(vision_feature_select_strategy 'default'), not {strategy!r}")
        settings = self._dymu
        encoded, projected = encode_internvl(self, pixel_values, settings, vision_feature_layer)
        settings.last_encoded = encoded
        features = tile_features(encoded, projected, settings.direct)
        out = BaseModelOutputWithPooling(last_hidden_state=encoded.features, pooler_output=features)
        if not settings.direct:
            out.dymu_tiles = (features, features.dymu_group_of_unit)  # survives generate's re-stacking
        return out

    def forward(self, input_ids=None, pixel_values=None, mm_encoder_outputs=None, vision_feature_layer=None,
                vision_feature_select_strategy=None, **kwargs):
        outputs = dict(mm_encoder_outputs or {})
        if pixel_values is not None and outputs.get("image") is None:
            outputs["image"] = self.get_image_features(pixel_values, vision_feature_layer,
                                                       vision_feature_select_strategy)
        image = outputs.get("image")
        stock = super().forward
        if image is None:  # text only, or a decode step
            return stock(input_ids=input_ids, mm_encoder_outputs=mm_encoder_outputs, **kwargs)
        if input_ids is None:
            raise ValueError("DyMU needs input_ids to find the image placeholders (got inputs_embeds)")
        features = image.pooler_output
        have, need = int((input_ids == self.config.image_token_id).sum()), sum(len(t) for t in features)
        if have != need:
            raise ValueError(f"the prompt has {have} image placeholders but the tiles make {need} tokens: "
                             + ("without VTU the prompt needs one placeholder per kept token; use "
                                "dymu.prompt_inputs" if self._dymu.direct else
                                "DyMU keeps the processor's stock placeholder count, build the prompt with it"))
        if self._dymu.direct:  # the stock forward scatters one (N, D) tensor into the placeholders in reading order
            flat = BaseModelOutputWithPooling(last_hidden_state=image.last_hidden_state,
                                              pooler_output=torch.cat(list(features)))
            return stock(input_ids=input_ids, mm_encoder_outputs={**outputs, "image": flat}, **kwargs)
        group_map = labels_to_group_map(input_ids, [(self.config.image_token_id, list(tile_groups(image)))])
        with vtu_groups(self.language_model, group_map):
            return stock(input_ids=input_ids, mm_encoder_outputs=outputs, **kwargs)


_swapped_class = PatchedClasses(__name__, "DyMU", DyMUInternVLModel, lambda: [InternVLModel])


def __getattr__(name: str):  # pickle finds the swapped model class here (dymu/patching.py)
    return _swapped_class.resolve(name)


def internvl_thresholds(model: nn.Module, thresholds) -> list[float]:
    """Threshold values for the model's tower up to its feature layer (a `Thresholds` file is checked first)."""
    tower, layer = model.model.vision_tower, _feature_layer(model.config)
    internvit.check_thresholds_file(thresholds, tower, layer)
    return internvit.check_thresholds(tower, getattr(thresholds, "thresholds", thresholds), layer)


def apply_internvl(model: nn.Module, thresholds=None, mode: str = "dymu", vtu_attention: str = "fast",
                   kv_cache: str = "compact", *, r=None, budget: QwenBudget | None = None,
                   tome_vtu: bool = True) -> None:
    """Patch an InternVL model in place, all or nothing (modes: see the module docstring). ``thresholds``:
    one per InternViT block up to the feature layer; ``r`` (mode tome): unit merges per block and tile."""
    check_mode_arguments("InternVL", INTERNVL_MODES, mode, thresholds, r, tome_vtu, r_means="unit merges per ViT block")
    check_kv_cache(kv_cache)
    stock = getattr(model.model, "_dymu_stock_class", type(model.model))
    compat.require_forward(stock, ("input_ids", "pixel_values", "mm_encoder_outputs", "vision_feature_layer",
                                   "vision_feature_select_strategy"))
    compat.require_forward(stock, ("pixel_values", "vision_feature_layer", "vision_feature_select_strategy"),
                           "get_image_features")
    internvit.check_connector(model)
    inner = model.model
    layer = _feature_layer(model.config)
    values = None
    if mode == "tome":
        r = check_r(r, internvit.layers_run(inner.vision_tower, layer))
    elif mode != "full":
        values = internvl_thresholds(model, thresholds)
    direct = mode == "dtome" or (mode == "tome" and not tome_vtu)
    if mode != "full" and not direct:  # refuse before anything changes
        check_vtu(inner.language_model, vtu_attention, kv_cache)
    if mode == "full":
        remove_internvl(model)
        return
    install_inner_patch(inner, inner.language_model, _swapped_class,
                        InternVLSettings(mode=mode, thresholds=values, budget=budget, r=r if mode == "tome" else None,
                                         direct=direct),
                        vtu=not direct, vtu_attention=vtu_attention, kv_cache=kv_cache)


def remove_internvl(model: nn.Module) -> None:
    remove_inner_patch(model.model, model.model.language_model)


# ---------------------------------------------------------------------------------------------
# The family adapter.

class InternVLFamily(VLMFamily):
    name, title = "internvl", "InternVL 3 / 3.5"
    model_types = ("internvl",)
    calibration, crops_images = "units", True
    modes = {"full": None, "dymu": None, "dtome": None, "tome": None,
             "downsample": "its tiles have a fixed size: fewer tokens means fewer tiles, which the image processor's "
                           "max_patches sets"}
    options = {"r": None, "tome_vtu": None, "budget": None, "focus": None, "video": None, "raw_prompt": None,
               "order": "it merges whole 2x2 units in the stock unit order",
               "merge_point": "it merges in the vision tower only (the pixel shuffle and projector after it are "
                              "row-wise per unit)",
               "cross_frame": "every video frame is a tile of its own, encoded alone"}

    def model_classes(self):
        return (InternVLForConditionalGeneration,)

    def vision_tower(self, model):
        return model.model.vision_tower

    def unit_thresholds(self, model, thresholds) -> tuple[list[float], str]:
        return internvl_thresholds(model, thresholds), "vit"

    def apply(self, model, settings):
        self.check(model, settings)
        apply_internvl(model, settings.thresholds, mode=settings.mode, vtu_attention=settings.vtu_attention,
                       kv_cache=settings.kv_cache, r=settings.r, tome_vtu=settings.tome_vtu,
                       budget=make_qwen_budget(settings.file_default("max_tokens"), settings.file_default("min_tokens")))

    def remove(self, model):
        remove_internvl(model)

    def load_processor(self, model_ref, config):
        from .internvl_processor import load_internvl_processor

        return load_internvl_processor(model_ref)

    def encoder_pixels(self, model, processed):
        pixels = processed["pixel_values"]
        tiles = processed.get("num_patches")
        return pixels, [1] * len(pixels) if tiles is None else [int(n) for n in tiles]

    def encode(self, model, pixel_values, *, feature_layer=None, drop_class_token=None, grid_thw=None, focus=None,
               fill=None, processor=None):
        """The tiles' `UnitEncoded` with the model's settings (none: stock, every unit its own token).
        ``pixel_values``: tiles (T, 3, S, S), or PIL images that ``processor`` tiles (after ``focus``)."""
        if drop_class_token is not None or grid_thw is not None:
            raise ValueError("InternVL drops the class token and tiles images itself: drop_class_token and grid_thw "
                             "do not apply")
        if not isinstance(pixel_values, torch.Tensor):
            from .prompting import focused_images

            if processor is None:
                raise ValueError("encoding PIL images with InternVL needs processor= (its processor or image processor)")
            image_processor = getattr(processor, "image_processor", processor)
            _, filled = focused_images(image_processor, [list(pixel_values)], None if focus is None else [focus], fill)
            pixel_values = tile_images(image_processor, filled[0])["pixel_values"]
        elif focus is not None:
            raise ValueError("focus is applied to the images before the processor: pass PIL images (with processor=)")
        return encode_internvl(model.model, pixel_values.to(model.device), getattr(model.model, "_dymu", None),
                               feature_layer)[0]

    @torch.no_grad()
    def encode_records(self, model, processor, opened, skipped):
        """Per image: LLM tokens kept of its tiles' stock units, and per tile the group of every unit."""
        if not opened:
            return [], skipped
        image_processor = getattr(processor, "image_processor", processor)
        paths, images = zip(*opened)
        pixels, tiles = self.encoder_pixels(model, tile_images(image_processor, list(images)))
        encoded = self.encode(model, pixels.to(model.dtype))
        per_tile, groups, records, first = encoded.per_item(), encoded.groups_per_item(), [], 0
        for path, n in zip(paths, tiles):
            kept = sum(k for k, _ in per_tile[first:first + n])
            units = sum(u for _, u in per_tile[first:first + n])
            records.append({"path": str(path), "tokens": kept, "full_tokens": units, "encoder_tokens": kept,
                            "llm_rows": kept, "stock_positions": units, "tiles": n,
                            "group_of_unit": [g.tolist() for g in groups[first:first + n]]})
            first += n
        return records, skipped

    def unit_calibration(self, model, merge_point, rounds, model_ref):
        """(blocks run up to the feature layer, the tower identity a thresholds file records)."""
        if merge_point != "vit":
            self.refuse_unsupported("merge_point", model)
        tower, layer = self.vision_tower(model), _feature_layer(model.config)
        return internvit.layers_run(tower, layer), internvit.internvit_identity(tower, layer, model_ref)

    def unit_calibration_batch(self, model, image_processor, images, merge_point, steps, chooser):
        """Every tile of every image is one merge segment; edges of all tiles of the batch are ranked together
        (``chooser(units of the batch)``). Returns (images, steps) units alive, summed over each image's tiles.
        Runs the tower itself, so a model patched by `dymu.apply` calibrates as the stock one."""
        inner = model.model
        processed = tile_images(image_processor, images)
        pixels = processed["pixel_values"].to(model.device, model.dtype)
        patch = inner.vision_tower.embeddings.patch_size
        units = len(pixels) * (pixels.shape[-2] // patch[0]) * (pixels.shape[-1] // patch[1]) // \
            internvit.unit_side(inner.config) ** 2
        encoded, _ = encode_internvl(inner, pixels, None, edge_chooser=chooser(units))
        image_of_tile = torch.repeat_interleave(torch.arange(len(images)), processed["num_patches"].long())
        kept = encoded.kept_per_block
        return torch.zeros(len(images), kept.shape[1], dtype=kept.dtype).index_add_(0, image_of_tile, kept.cpu())

    def analyze_units(self, model, image_processor, thresholds):
        """`dymu analyze`: every image's tiles through the tower with ``thresholds``; per image the LLM rows
        (= encoder tokens: units kept over its tiles) and stock positions; the merge map drawn on its last
        tile (the thumbnail; the only tile of a small image), one cell per 2x2 unit."""
        values, _ = self.unit_thresholds(model, thresholds)
        settings = InternVLSettings(mode="dymu", thresholds=values)
        side = internvit.unit_side(model.config)

        def prepare(image, path):  # extra: the image's tile count
            out = tile_images(image_processor, [image])
            return out["pixel_values"], int(out["num_patches"][0])

        def encode(pending):
            tiles = torch.cat([p for _, p, _ in pending]).to(model.device, model.dtype)
            encoded = encode_internvl(model.model, tiles, settings)[0]
            kept, units, groups = encoded.kept_per_image.tolist(), encoded.units_per_image.tolist(), \
                encoded.groups_per_item()
            out, first = [], 0
            for _, pixels, n in pending:
                rows, stock = sum(kept[first:first + n]), sum(units[first:first + n])
                fields = dict(tokens=rows, full_tokens=stock, encoder_tokens=rows, llm_rows=rows, stock_positions=stock)
                grid = pixels.shape[-1] // model.config.vision_config.patch_size[1] // side
                out.append((fields, pixels[n - 1], groups[first + n - 1], (grid, grid)))
                first += n
            return out
        return prepare, encode

    def prepare(self, model, processor, request):
        from .internvl_inputs import internvl_inputs

        return internvl_inputs(model, processor, request)


register_vlm_family(InternVLFamily())
