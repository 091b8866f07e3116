"""DyMU in SmolVLM / SmolVLM2 (`SmolVLMForConditionalGeneration`) and Idefics3
(`Idefics3ForConditionalGeneration`): unit-level DToMe on every image tile (towers/smolvlm_vit.py),
the connector on the merged units, virtual unmerge to the stock placeholder count, VTU in the Llama
decoder.

The processor cuts an image into rows x cols tiles plus a global view, each a tower input, and
writes per tile a marker (``<row_i_col_j>`` or ``<global-img>``) and ``image_seq_len`` placeholders.
The inner `SmolVLMModel` / `Idefics3Model` is class-swapped per instance. Its `get_image_features`
encodes every tile with merging (a tile merges on its own) and returns, per prompt, the stock
connector output's shape (tiles x ``image_seq_len`` rows): every unit gets its merged token's row,
and the tensor carries the group of every position (``dymu_group_of_unit``, as families/llava.py:
generate re-lists the same tensor objects for beams / num_return_sequences). So the processor's
placeholders, positions and `generate` stay stock; the swapped `forward` builds the prompt's group
map (placeholders in `masked_scatter` order) and hands it to the VTU decoder layers for the prefill.

Modes: ``dymu`` (thresholds, VTU), ``tome`` (r unit merges per block and tile; VTU unless
``tome_vtu=False``), ``dtome`` (thresholds, merged tokens fed straight to the LLM) and ``full``. Without
VTU every tile gives one row per kept unit and its run of placeholders shrinks to that count (the
decoder's 1-D RoPE positions are those of the shorter prompt, as in LLaVA's ``dtome``). The token
budget (``max_tokens`` / ``min_tokens``) counts LLM tokens per tile (every tile and the global view),
as LLaVA-NeXT's counts per crop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.idefics3.modeling_idefics3 import Idefics3ForConditionalGeneration, Idefics3Model
from transformers.models.smolvlm.modeling_smolvlm import SmolVLMForConditionalGeneration, SmolVLMModel

from .. import compat
from ..decoders.llama import check_kv_cache, check_vtu, vtu_groups
from ..patching import PatchedClasses
from ..towers.budget import holding_budget
from ..towers.qwen_rules import QwenBudget, check_r, make_qwen_budget, override_budget
from ..towers.smolvlm_vit import (
    TilesEncoded,
    check_smolvlm_tower,
    check_thresholds,
    check_thresholds_file,
    encode_tiles,
    real_tiles,
    tower_depth,
    unit_identity,
)
from .base import PreparedInputs, VLMFamily, check_mode_arguments, register_vlm_family, timed, install_inner_patch, remove_inner_patch
from .llava import labels_to_group_map
from .prompting import focused_images, per_prompt, prompt_texts, set_placeholder_counts
from .smolvlm_processor import check_processor_parts, load_smolvlm_processor

SUPPORTED_VLMS = (SmolVLMForConditionalGeneration, Idefics3ForConditionalGeneration)
SMOLVLM_MODES = ("full", "dymu", "dtome", "tome")


@dataclass
class SmolVLMSettings:
    mode: str
    thresholds: list[float] | None
    r: list[int] | None = None  # mode tome: unit merges per block and tile
    budget: QwenBudget | None = None  # LLM tokens per tile
    direct: bool = False  # merged tokens fed straight to the LLM (no VTU): dtome, tome without VTU
    last_encoded: TilesEncoded | None = None  # of the last get_image_features call (for reports)


class DyMUSmolVLMModel:
    """Mixed in before the stock SmolVLMModel / Idefics3Model of one instance."""

    _dymu: SmolVLMSettings
    _dymu_stock_class: type

    def get_image_features(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None,
                           **kwargs):
        settings = self._dymu
        tiles, patch_mask, tiles_per_prompt = real_tiles(pixel_values, pixel_attention_mask,
                                                          self.config.vision_config.patch_size)
        encoded = encode_tiles(self, tiles, patch_mask, settings.thresholds, settings.r, settings.budget)
        settings.last_encoded = encoded
        groups = encoded.groups_per_item()
        if settings.direct:  # one row per kept unit, tile after tile
            rows = list(encoded.tokens.split(encoded.kept_per_tile))
        else:
            rows = list(encoded.features().split(encoded.units_per_tile))
        pooled, first = [], 0
        for n in tiles_per_prompt:  # the stock output: one tensor per prompt, its tiles in order
            prompt_rows = torch.cat(rows[first : first + n]) if n else rows[0][:0]
            offsets = torch.tensor([0] + encoded.kept_per_tile[first : first + n]).cumsum(0).tolist()  # groups per tile
            prompt_rows.dymu_group_of_unit = torch.cat([g + o for g, o in zip(groups[first : first + n], offsets)]) \
                if n else torch.zeros(0, dtype=torch.long)
            pooled.append(prompt_rows)
            first += n
        return BaseModelOutputWithPooling(last_hidden_state=encoded.encoded.units, pooler_output=pooled)

    def forward(self, input_ids=None, pixel_values=None, pixel_attention_mask=None, mm_encoder_outputs=None,
                **kwargs):
        outputs = dict(mm_encoder_outputs or {})
        if pixel_values is not None and outputs.get("image") is None:
            outputs["image"] = self.get_image_features(pixel_values, pixel_attention_mask)
        stock = super().forward
        image = outputs.get("image")
        if image is None or self._dymu.direct:  # text only, a decode step, or no VTU
            return stock(input_ids=input_ids, mm_encoder_outputs=outputs or mm_encoder_outputs, **kwargs)
        with vtu_groups(self.text_model, self.prompt_group_map(input_ids, image.pooler_output)):
            return stock(input_ids=input_ids, mm_encoder_outputs=outputs, **kwargs)

    def prompt_group_map(self, input_ids: torch.Tensor | None, features) -> torch.Tensor:
        """(B, N) group map of the prompt: each placeholder joins its merged token's group."""
        if input_ids is None:
            raise ValueError("DyMU with VTU needs input_ids to find the image placeholders (got inputs_embeds)")
        labels = [getattr(f, "dymu_group_of_unit", None) for f in features]
        labels = [torch.arange(len(f), device=f.device) if g is None else g for f, g in zip(features, labels)]
        have, need = int((input_ids == self.config.image_token_id).sum()), sum(len(g) for g in labels)
        if have != need:
            raise ValueError(f"the prompt has {have} image placeholders but the images make {need} tokens: DyMU keeps "
                             "the processor's stock placeholder count, build the prompt with it")
        return labels_to_group_map(input_ids, [(self.config.image_token_id, labels)])


_swapped_class = PatchedClasses(__name__, "DyMU", DyMUSmolVLMModel, lambda: [SmolVLMModel, Idefics3Model])


def __getattr__(name: str):  # pickle finds the swapped model classes here (dymu/patching.py)
    return _swapped_class.resolve(name)


def family_name(model: nn.Module) -> str:
    return model.config.model_type  # "smolvlm" or "idefics3": what thresholds files record


def smolvlm_thresholds(model: nn.Module, thresholds) -> list[float]:
    """Threshold values for ``model``'s tower from a `Thresholds` file (checked: family, tower shape) or values."""
    check_thresholds_file(thresholds, model.model, family_name(model))
    return check_thresholds(model.model, getattr(thresholds, "thresholds", thresholds))


def apply_smolvlm(model: nn.Module, thresholds=None, mode: str = "dymu", vtu_attention: str = "fast",
                  kv_cache: str = "compact", *, r=None, budget: QwenBudget | None = None, tome_vtu: bool = True) -> None:
    """Patch a SmolVLM / Idefics3 model in place (modes: see the module docstring), all or nothing.
    ``thresholds``: one per vision block; ``r`` (mode tome): unit merges per block and tile;
    ``budget``: a `QwenBudget` of LLM tokens per tile."""
    check_mode_arguments("SmolVLM / Idefics3", SMOLVLM_MODES, mode, thresholds, r, tome_vtu,
                         r_means="unit merges per vision block")
    check_kv_cache(kv_cache)
    inner = model.model
    stock = getattr(inner, "_dymu_stock_class", type(inner))
    # What the swapped inner model overrides and calls of the stock one.
    compat.require_forward(stock, ("input_ids", "pixel_values", "pixel_attention_mask", "mm_encoder_outputs"))
    compat.require_forward(stock, ("pixel_values", "pixel_attention_mask"), "get_image_features")
    check_smolvlm_tower(inner)
    direct = mode == "dtome" or (mode == "tome" and not tome_vtu)
    values = r_values = None
    if mode == "tome":
        r_values = check_r(r, tower_depth(inner))
    elif mode != "full":
        values = smolvlm_thresholds(model, thresholds)
    if mode != "full" and not direct:  # refuse before anything changes
        check_vtu(inner.text_model, vtu_attention, kv_cache)
    if mode == "full":
        remove_smolvlm(model)
        return
    install_inner_patch(inner, inner.text_model, _swapped_class,
                        SmolVLMSettings(mode=mode, thresholds=values, r=r_values, budget=budget, direct=direct),
                        vtu=not direct, vtu_attention=vtu_attention, kv_cache=kv_cache)


def remove_smolvlm(model: nn.Module) -> None:
    """Undo `apply_smolvlm` (the stock model again)."""
    remove_inner_patch(model.model, model.model.text_model)


@torch.no_grad()
def encode_smolvlm(model: nn.Module, pixel_values, pixel_attention_mask=None, *, processor=None, focus=None,
                   fill=None) -> TilesEncoded:
    """The vision side only (tower + connector on every tile), with the model's DyMU settings (none:
    stock, every unit its own token). ``pixel_values``: the processor's (B, tiles, 3, H, W); or PIL
    images, which ``processor`` turns into tiles, after filling outside ``focus`` (`dymu.focus`)."""
    inner = model.model
    if not isinstance(pixel_values, torch.Tensor):
        if processor is None:
            raise ValueError("encoding PIL images with SmolVLM / Idefics3 needs processor= (its processor or image "
                             "processor)")
        image_processor = getattr(processor, "image_processor", processor)
        _, filled = focused_images(image_processor, [list(pixel_values)], None if focus is None else [focus], fill)
        out = image_processor(images=[[im] for im in filled[0]], return_tensors="pt")
        pixel_values, pixel_attention_mask = out["pixel_values"], out.get("pixel_attention_mask")
    elif focus is not None:
        raise ValueError("focus is applied to the images before the processor: pass PIL images (with processor=) "
                         "instead of pixel values")
    device = next(inner.parameters()).device
    tiles, patch_mask, _ = real_tiles(pixel_values.to(device), None if pixel_attention_mask is None else
                                      pixel_attention_mask.to(device), inner.config.vision_config.patch_size)
    settings = getattr(inner, "_dymu", None)
    if settings is None:
        return encode_tiles(inner, tiles, patch_mask)
    return encode_tiles(inner, tiles, patch_mask, settings.thresholds, settings.r, settings.budget)


# ---------------------------------------------------------------------------------------------
# The family adapter.

class SmolVLMFamily(VLMFamily):
    name, title = "smolvlm", "SmolVLM / Idefics3"
    model_types = ("smolvlm", "idefics3")
    calibration, crops_images = "units", True
    modes = {"full": None, "dymu": None, "dtome": None, "tome": None,
             "downsample": "its tiles have a fixed size: fewer tokens means fewer tiles, which the processor's size "
                           "(longest_edge) sets"}
    options = {"r": None, "tome_vtu": None, "budget": None, "focus": None, "raw_prompt": None,
               "order": "it merges whole pixel-shuffle units in the stock unit order",
               "merge_point": "it merges whole pixel-shuffle units in the vision tower, so every LLM token is one "
                              "merged unit; no stock step after the connector mixes tokens",
               "cross_frame": "dymu takes no SmolVLM video",
               "video": "dymu builds no SmolVLM2 video prompts: the stock video path needs torchvision (its video "
                        "processor) and num2words, and is not tested here; give frames as images"}

    def model_classes(self):
        return SUPPORTED_VLMS

    def vision_tower(self, model):
        return model.model.vision_model

    def unit_thresholds(self, model, thresholds) -> tuple[list[float], str]:
        return smolvlm_thresholds(model, thresholds), "vit"

    def unit_calibration(self, model, merge_point, rounds, model_ref):
        return tower_depth(model.model), unit_identity(model.model, family_name(model), model_ref)

    def unit_calibration_batch(self, model, image_processor, images, merge_point, steps, chooser):
        """Every tile of the batch merges on its own; the edges of all of them are ranked together.
        Returns the units alive after every block per image (summed over its tiles)."""
        processed = image_processor(images=[[im] for im in images], return_tensors="pt")
        tiles, patch_mask, tiles_of = _real_tiles(model, [processed])
        units = len(tiles) * int(patch_mask[0].numel()) // int(model.model.connector.scale_factor) ** 2
        kept = encode_tiles(model.model, tiles, patch_mask, edge_chooser=chooser(units)).encoded.kept_per_block
        return torch.stack([part.sum(0) for part in kept.split(tiles_of)])

    def analyze_units(self, model, image_processor, thresholds):
        """`dymu analyze`: the tiles of a batch of images in one tower call; the merge map is drawn on each
        image's global view (its last tile: the whole image)."""
        values, _ = self.unit_thresholds(model, thresholds)
        side = int(model.model.connector.scale_factor)

        def prepare(image, path):  # an image's pixels: its processor output (tiles), no extra
            return image_processor(images=[[image]], return_tensors="pt"), None

        @torch.no_grad()
        def encode(pending):
            tiles, patch_mask, tiles_of = _real_tiles(model, [processed for _, processed, _ in pending])
            encoded = encode_tiles(model.model, tiles, patch_mask, values)
            kept, groups, out, first = encoded.kept_per_tile, encoded.groups_per_item(), [], 0
            grid = tuple(n // side for n in patch_mask.shape[1:])
            for n in tiles_of:
                rows, stock = sum(kept[first : first + n]), n * encoded.units_per_tile
                fields = dict(tokens=rows, full_tokens=stock, encoder_tokens=rows, llm_rows=rows, stock_positions=stock)
                out.append((fields, tiles[first + n - 1].float().cpu(), groups[first + n - 1], grid))
                first += n
            return out
        return prepare, encode

    def apply(self, model, settings):
        self.check(model, settings)
        budget = make_qwen_budget(settings.file_default("max_tokens"), settings.file_default("min_tokens"))
        apply_smolvlm(model, settings.thresholds, mode=settings.mode, vtu_attention=settings.vtu_attention,
                      kv_cache=settings.kv_cache, r=settings.r, budget=budget, tome_vtu=settings.tome_vtu)

    def remove(self, model):
        remove_smolvlm(model)

    def load_processor(self, model_ref, config):
        return load_smolvlm_processor(model_ref, config.model_type)

    def encoder_pixels(self, model, processed):
        """Every real tile of every image (what the tower sees), and the tiles of each image."""
        tiles, _, per_prompt_tiles = real_tiles(processed["pixel_values"], processed.get("pixel_attention_mask"),
                                                model.config.vision_config.patch_size)
        return tiles, per_prompt_tiles

    def encode(self, model, pixel_values, *, feature_layer=None, drop_class_token=None, grid_thw=None, focus=None,
               fill=None, processor=None):
        if feature_layer is not None or drop_class_token is not None or grid_thw is not None:
            raise ValueError("SmolVLM / Idefics3 features are the connector's output on every tile: feature_layer, "
                             "drop_class_token and grid_thw do not apply")
        return encode_smolvlm(model, pixel_values, processor=processor, focus=focus, fill=fill)

    @torch.no_grad()
    def encode_records(self, model, processor, opened, skipped):
        """Per image: LLM rows kept of the stock positions, and per tile the group of every unit."""
        if not opened:
            return [], skipped
        paths, images = zip(*opened)
        image_processor = getattr(processor, "image_processor", processor)
        out = image_processor(images=[[im] for im in images], return_tensors="pt")
        tiles_of = self.encoder_pixels(model, out)[1]
        encoded = encode_smolvlm(model, out["pixel_values"], out.get("pixel_attention_mask"))
        kept, groups = encoded.kept_per_tile, encoded.groups_per_item()
        records, first = [], 0
        for path, n in zip(paths, tiles_of):
            rows = sum(kept[first : first + n])
            stock = n * encoded.units_per_tile
            records.append({"path": str(path), "tokens": rows, "full_tokens": stock, "encoder_tokens": rows,
                            "llm_rows": rows, "stock_positions": stock, "tiles": n,
                            "kept_per_tile": kept[first : first + n],
                            "group_of_unit": [g.tolist() for g in groups[first : first + n]]})
            first += n
        return records, skipped

    def prepare(self, model, processor, request):
        return smolvlm_inputs(model, processor, request)


@torch.no_grad()
def smolvlm_inputs(model, processor, request) -> PreparedInputs:
    """The processor's prompt (placeholders per kept unit without VTU), the tiles encoded once (timed)
    with the call's budget, and the counts per image: LLM rows, stock positions, encoder tokens (units kept)."""
    check_processor_parts(processor)
    inner = model.model
    settings = getattr(inner, "_dymu", None)
    if settings is None and (request.max_tokens is not None or request.min_tokens is not None):
        raise ValueError("max_tokens/min_tokens need a merging mode (dymu, dtome or tome), not the stock model")
    original, images = focused_images(processor.image_processor, request.images, request.focus, request.fill)
    texts = prompt_texts(processor, request.prompts, images, request.chat_template)
    processor.tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    flat = [im for ims in images for im in ims]
    inputs = processor(images=images if flat else None, text=texts, return_tensors="pt", padding=True)
    input_ids, attention_mask = inputs["input_ids"].to(device), inputs["attention_mask"].to(device)
    if not flat:
        empty = [[] for _ in images]
        return PreparedInputs({"input_ids": input_ids, "attention_mask": attention_mask}, llm_rows=empty,
                              stock_positions=empty, encoder_tokens=empty, full_tokens=empty, encoder_s=0.0)
    seq = processor.image_seq_len
    tiles_of = tiles_per_image(input_ids, inner.config.image_token_id, global_token_id(processor))
    stock = per_prompt([n * seq for n in tiles_of], images)

    def pixels_of(processed):
        mask = processed.get("pixel_attention_mask")
        return processed["pixel_values"].to(device, model.dtype), None if mask is None else mask.to(device)

    if settings is None:  # the stock model
        features, encoder_s = timed(device, lambda: inner.get_image_features(*pixels_of(inputs)))
        return PreparedInputs({"input_ids": input_ids, "attention_mask": attention_mask,
                               "mm_encoder_outputs": {"image": features}}, llm_rows=stock, stock_positions=stock,
                              encoder_tokens=stock, full_tokens=stock, encoder_s=encoder_s)
    budget = override_budget(settings.budget, request.max_tokens, request.min_tokens)
    without = None
    if budget is not None or request.focus is not None:  # the same images, whole, without the budget
        plain = processor.image_processor(images=original, return_tensors="pt")
        with holding_budget(settings, None):
            inner.get_image_features(*pixels_of(plain))
        without = per_prompt(_per_image(settings.last_encoded.kept_per_tile, tiles_of), images)
    with holding_budget(settings, budget):
        features, encoder_s = timed(device, lambda: inner.get_image_features(*pixels_of(inputs)))
    per_tile = settings.last_encoded.kept_per_tile
    if settings.direct:  # each tile's run of placeholders shrinks to its kept units
        input_ids, attention_mask = set_placeholder_counts(input_ids, attention_mask, inner.config.image_token_id,
                                                           processor.tokenizer.pad_token_id, seq, per_tile)
    rows = per_prompt(_per_image(per_tile, tiles_of), images)
    return PreparedInputs({"input_ids": input_ids, "attention_mask": attention_mask,
                           "mm_encoder_outputs": {"image": features}}, llm_rows=rows, stock_positions=stock,
                          encoder_tokens=rows, full_tokens=stock, encoder_s=encoder_s, without=without)


def global_token_id(processor) -> int:
    """The id of the token that marks an image's global view (the last tile of every image)."""
    token = getattr(processor, "global_image_token", None) or getattr(processor, "global_image_tag", "<global-img>")
    return processor.tokenizer.convert_tokens_to_ids(token)


def tiles_per_image(input_ids: torch.Tensor, image_token_id: int, global_id: int) -> list[int]:
    """Tower inputs of every image of a stock prompt batch, in reading order: its runs of placeholders
    (one per tile), an image ending with the run after its ``<global-img>`` marker."""
    out = []
    for ids in input_ids.tolist():
        tiles = 0
        for k, t in enumerate(ids):
            if t == image_token_id and (k == 0 or ids[k - 1] != image_token_id):  # a run starts
                tiles += 1
                if k > 0 and ids[k - 1] == global_id:
                    out.append(tiles)
                    tiles = 0
    return out


def _real_tiles(model, processed: list) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(tiles, patch mask, tiles per image) of image-processor outputs, each of one prompt's images, in order."""
    device, patch = next(model.parameters()).device, model.config.vision_config.patch_size
    parts = []
    for out in processed:
        mask = out.get("pixel_attention_mask")
        parts.append(real_tiles(out["pixel_values"].to(device), None if mask is None else mask.to(device), patch))
    tiles_of = [n for *_, per_prompt in parts for n in per_prompt]
    return torch.cat([t for t, _, _ in parts]), torch.cat([m for _, m, _ in parts]), tiles_of


def _per_image(per_tile: list[int], tiles_of: list[int]) -> list[int]:
    out, first = [], 0
    for n in tiles_of:
        out.append(sum(per_tile[first : first + n]))
        first += n
    return out


register_vlm_family(SmolVLMFamily())
