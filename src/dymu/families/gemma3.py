"""DyMU in Gemma 3 (`Gemma3ForConditionalGeneration`): unit-level DToMe in the SigLIP tower
(towers/unit_vit.py), the stock connector on the virtually unmerged patches, VTU in the text decoder
(decoders/gemma3.py).

The connector (`Gemma3MultiModalProjector`) average-pools k x k patches into each of the
``mm_tokens_per_image`` LLM tokens (k = patches per side / tokens per side: 64 / 16 = 4 at 896 px),
then RMSNorm and a projection. A *unit* is such a k x k block; DToMe merges whole units, so every
LLM token comes from one merged unit and the tokens of a group are copies of one row, which VTU
computes once per layer. k is read from the config, never assumed.

The inner `Gemma3Model` is class-swapped per instance. Its `get_image_features` encodes with merging
and returns the stock shape: the patch rows virtually unmerged back to the stock raster order go
through the stock connector, and every LLM token then takes the row of its group's first token (the
same row, computed once), so the processor's 256 placeholders, the bidirectional image mask
(token_type_ids) and `generate` stay stock. The group of every token rides on the feature tensor
(``dymu_group_of_unit``, (images, tokens)); generate's re-stacked copies for beams and
num_return_sequences are recognised by value against the last encode. The swapped `forward` builds
the prompt's group map and hands it to the VTU layers for the prefill; decode steps take the stock path.

Modes: ``dymu`` (thresholds, VTU), ``tome`` (r unit merges per ViT block, VTU) and ``full``. The
merged tokens cannot be fed straight to the LLM (``dtome``, ``tome_vtu=False``): see `NO_DIRECT`.
Token budget (``max_tokens`` / ``min_tokens``, LLM tokens per image) and focus regions as for the Qwen VLs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.gemma3.modeling_gemma3 import Gemma3ForConditionalGeneration, Gemma3Model
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

from .. import compat, vtu
from ..compat import unwrap_compiled
from ..decoders.gemma3 import NO_COMPACT
from ..decoders.llama import check_kv_cache, check_vtu, vtu_groups
from ..patching import PatchedClasses
from ..towers.qwen_rules import QwenBudget, check_r, override_budget
from ..towers.registry import tower_identity
from ..towers.unit_vit import BlockDescription, UnitEncoded, check_tower, encode_units
from .base import VLMFamily, check_mode_arguments, register_vlm_family, install_inner_patch, remove_inner_patch

SIGLIP_BLOCKS = BlockDescription(layer_classes=(SiglipEncoderLayer,))  # embeddings, encoder.layers, post_layernorm
MODES = ("full", "dymu", "tome")
NO_DIRECT = ("Gemma 3 reads each image as one bidirectional block of mm_tokens_per_image placeholders at stock "
             "positions; merged tokens fed straight to the LLM would change that block: use VTU (mode 'dymu', or "
             "'tome' with tome_vtu=True)")


def unit_grid(config) -> tuple[int, int]:
    """(patches per side, unit side k) of a Gemma 3 config: k x k patches pool into one LLM token."""
    vision = config.vision_config
    patches = vision.image_size // vision.patch_size
    tokens = int(config.mm_tokens_per_image)
    side = math.isqrt(tokens)
    if side * side != tokens or patches % side:
        raise compat.refuse(f"mm_tokens_per_image={tokens} does not tile a {patches}x{patches} patch grid "
                            "into square pooling blocks")
    return patches, patches // side


@dataclass
class Gemma3Settings:
    mode: str
    thresholds: list[float] | None
    r: list[int] | None = None
    budget: QwenBudget | None = None
    last_encoded: UnitEncoded | None = None  # of the last get_image_features call (reports)
    last_features: tuple | None = None  # (features, groups) of the last call: generate's re-stacked copies


def encode_gemma3(model: nn.Module, pixel_values: torch.Tensor, thresholds=None, r=None, budget=None,
                  edge_chooser=None) -> UnitEncoded:
    """The tower on ``pixel_values`` (B, 3, S, S) with unit-level DToMe (+inf thresholds: the stock tower)."""
    inner = model.model if isinstance(model, Gemma3ForConditionalGeneration) else model
    tower = unwrap_compiled(inner.vision_tower)
    patches, side = unit_grid(inner.config)
    with torch.no_grad():
        embeddings = tower.embeddings(pixel_values.to(tower.dtype))
    if thresholds is None and r is None and edge_chooser is None:
        thresholds = [math.inf] * len(tower.encoder.layers)
    return encode_units(tower, SIGLIP_BLOCKS, embeddings, (patches, patches), side, thresholds=thresholds, r=r,
                        edge_chooser=edge_chooser, budget=budget)


class DyMUGemma3Model:
    """Mixed in before the stock Gemma3Model of one instance."""

    _dymu: Gemma3Settings
    _dymu_stock_class: type

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs):
        settings = self._dymu
        encoded = encode_gemma3(self, pixel_values, settings.thresholds, settings.r, settings.budget)
        settings.last_encoded = encoded
        stock = self.multi_modal_projector(encoded.features)  # (B, T, D_llm): rows of a group equal in value
        groups = torch.stack(encoded.groups_per_item())  # (B, T)
        # One row per group, copied: the VTU layers take a group's first row for all of them.
        first = torch.zeros_like(groups).scatter_reduce(1, groups, torch.arange(groups.shape[1], device=groups.device)
                                                        .expand_as(groups), "amin", include_self=False)
        features = torch.gather(stock, 1, torch.gather(first, 1, groups)[..., None].expand_as(stock))
        features.dymu_group_of_unit = groups
        settings.last_features = (features, groups)
        return BaseModelOutputWithPooling(last_hidden_state=encoded.features, pooler_output=features)

    def forward(self, input_ids=None, pixel_values=None, mm_encoder_outputs=None, **kwargs):
        outputs = dict(mm_encoder_outputs or {})
        if pixel_values is not None and outputs.get("image") is None:
            outputs["image"] = self.get_image_features(pixel_values)
        if outputs.get("image") is None:  # text only, or a decode step
            return super().forward(input_ids=input_ids, mm_encoder_outputs=mm_encoder_outputs, **kwargs)
        with vtu_groups(self.language_model, self.prompt_group_map(input_ids, outputs["image"].pooler_output)):
            return super().forward(input_ids=input_ids, mm_encoder_outputs=outputs, **kwargs)

    def _groups_of(self, features: torch.Tensor) -> torch.Tensor:
        groups = getattr(features, "dymu_group_of_unit", None)
        if groups is not None:
            return groups
        last = self._dymu.last_features
        if last is not None and len(features) % max(len(last[0]), 1) == 0:
            copies = len(features) // len(last[0])
            if torch.equal(features, last[0].repeat(copies, 1, 1)):  # generate's expansion ([A, B] -> [A, B, A, B])
                return last[1].repeat(copies, 1)
        # Features not made here: every token its own group.
        return torch.arange(features.shape[1], device=features.device).expand(features.shape[:2])

    def prompt_group_map(self, input_ids: torch.Tensor | None, features: torch.Tensor) -> torch.Tensor:
        """(B, N) group map of the prompt: each image placeholder joins its merged token's group."""
        if input_ids is None:
            raise ValueError("DyMU with VTU needs input_ids to find the image placeholders (got inputs_embeds)")
        positions = input_ids == self.config.image_token_id
        groups = self._groups_of(features)
        if int(positions.sum()) != groups.numel():
            raise ValueError(f"the prompt has {int(positions.sum())} image placeholders but the images make "
                             f"{groups.numel()} tokens: DyMU keeps the processor's stock placeholder count")
        offsets = torch.arange(len(groups), device=groups.device)[:, None] * groups.shape[1]
        labels = torch.full_like(input_ids, -1)  # -1: a group of its own (text, padding)
        labels[positions] = (groups + offsets).flatten().to(input_ids.device)  # masked_scatter's (row-major) order
        return vtu.group_map_from_labels(labels)


_swapped_class = PatchedClasses(__name__, "DyMU", DyMUGemma3Model, lambda: [Gemma3Model])


def __getattr__(name: str):  # pickle finds the swapped model class here (dymu/patching.py)
    return _swapped_class.resolve(name)


def gemma3_identity(model: nn.Module, model_ref: str | None = None) -> dict:
    """What a thresholds file records about the Gemma 3 tower it was calibrated on."""
    config = model.config
    vision = config.vision_config
    arch = {k: getattr(vision, k, None) for k in ("model_type", "num_hidden_layers", "hidden_size",
                                                  "num_attention_heads", "image_size", "patch_size")}
    arch["mm_tokens_per_image"] = config.mm_tokens_per_image
    return tower_identity(arch, family="gemma3", num_layers=vision.num_hidden_layers, class_token=False,
                          model_ref=model_ref, named=config, merge_point="vit")


def gemma3_thresholds(model: nn.Module, thresholds) -> list[float]:
    """Threshold values for the model's tower (one per block, or one number), checked against a file's identity."""
    from ..towers.budget import _threshold_floats

    want = getattr(thresholds, "encoder", None)
    if want:
        found = gemma3_identity(model)
        where = f"thresholds for {want.get('model') or 'an unnamed encoder'}"
        if want.get("family") != "gemma3":
            raise ValueError(f"{where} are for a {want.get('family')} encoder, not a Gemma 3 vision tower")
        if want.get("config_hash") != found["config_hash"]:
            raise ValueError(f"{where} were calibrated on a differently shaped Gemma 3 tower "
                             f"({want.get('config_hash')} vs {found['config_hash']})")
    values = getattr(thresholds, "thresholds", thresholds)
    depth = model.config.vision_config.num_hidden_layers
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = [values] * depth
    values = _threshold_floats(values.tolist() if isinstance(values, torch.Tensor) else list(values))
    if len(values) != depth:
        raise ValueError(f"a Gemma 3 tower of {depth} blocks needs one threshold per block, got {len(values)}")
    return values


def apply_gemma3(model: nn.Module, thresholds=None, mode: str = "dymu", vtu_attention: str = "fast",
                 kv_cache: str = "full", *, r=None, budget: QwenBudget | None = None) -> None:
    """Patch a Gemma3ForConditionalGeneration in place, all or nothing (modes: module docstring)."""
    check_mode_arguments("Gemma 3", MODES, mode, thresholds, r, needs_thresholds=("dymu",),
                         r_means="unit merges per ViT block")
    check_kv_cache(kv_cache)
    inner = model.model
    stock = getattr(inner, "_dymu_stock_class", type(inner))
    compat.require_forward(stock, ("input_ids", "pixel_values", "mm_encoder_outputs"))
    compat.require_forward(stock, ("pixel_values",), "get_image_features")
    compat.require_attributes(inner, ("vision_tower", "multi_modal_projector", "language_model"), stock.__name__)
    check_tower(unwrap_compiled(inner.vision_tower), SIGLIP_BLOCKS)
    compat.require_attributes(unwrap_compiled(inner.vision_tower), ("embeddings",), "the Gemma 3 vision tower")
    unit_grid(inner.config)
    values = None
    if mode == "tome":
        r = check_r(r, model.config.vision_config.num_hidden_layers)
    elif mode == "dymu":
        values = gemma3_thresholds(model, thresholds)
    if mode != "full":
        check_vtu(inner.language_model, vtu_attention, kv_cache)
    if mode == "full":
        remove_gemma3(model)
        return
    install_inner_patch(inner, inner.language_model, _swapped_class,
                        Gemma3Settings(mode=mode, thresholds=values, r=r, budget=budget),
                        vtu=True, vtu_attention=vtu_attention, kv_cache=kv_cache)


def remove_gemma3(model: nn.Module) -> None:
    remove_inner_patch(model.model, model.model.language_model)


class Gemma3Family(VLMFamily):
    name, title = "gemma3", "Gemma 3"
    model_types = ("gemma3",)
    calibration, merge_points = "units", ("vit",)
    kv_caches = {"full": None, "compact": NO_COMPACT}
    modes = {"full": None, "dymu": None, "tome": None, "dtome": NO_DIRECT,
             "downsample": "the processor resizes every image to the tower's size and the connector pools it to "
                           "a fixed mm_tokens_per_image: there is no smaller image to give it"}
    options = {"r": None, "budget": None, "focus": None, "merge_point": None, "tome_vtu": NO_DIRECT,
               "order": "it merges whole pooling blocks in the stock unit order",
               "cross_frame": "Gemma 3 takes no video", "video": "Gemma 3 takes no video",
               "raw_prompt": "prompts are questions, wrapped in the chat template (its image marker expands into "
                             "the image block)"}

    def model_classes(self):
        return (Gemma3ForConditionalGeneration,)

    def vision_tower(self, model):
        return unwrap_compiled(model.model.vision_tower)

    def apply(self, model, settings):
        self.check(model, settings)
        if settings.merge_point not in (None, "vit"):
            raise ValueError(f"merge_point must be 'vit' for Gemma 3 (DToMe in the tower), got {settings.merge_point!r}")
        apply_gemma3(model, settings.thresholds, mode=settings.mode, vtu_attention=settings.vtu_attention,
                     kv_cache=settings.kv_cache, r=settings.r,
                     budget=override_budget(settings.thresholds, settings.max_tokens, settings.min_tokens))

    def remove(self, model):
        remove_gemma3(model)

    def unit_thresholds(self, model, thresholds):
        return gemma3_thresholds(model, thresholds), "vit"

    def unit_calibration(self, model, merge_point, rounds, model_ref):
        return model.config.vision_config.num_hidden_layers, gemma3_identity(model, model_ref)

    def unit_calibration_batch(self, model, image_processor, images, merge_point, steps, chooser):
        pixels = image_processor(images=images, return_tensors="pt")["pixel_values"]
        patches, side = unit_grid(model.config)
        encoded = encode_gemma3(model, pixels.to(model.device), edge_chooser=chooser(len(images) * (patches // side) ** 2))
        return encoded.kept_per_block

    def analyze_units(self, model, image_processor, thresholds):
        values = gemma3_thresholds(model, thresholds)
        patches, side = unit_grid(model.config)

        def prepare(image, path):
            return image_processor(images=[image], return_tensors="pt")["pixel_values"], None

        def encode(pending):
            pixels = torch.cat([p for _, p, _ in pending])
            encoded = encode_gemma3(model, pixels.to(model.device), values)
            return [(dict(tokens=kept, full_tokens=units, llm_rows=kept, stock_positions=units,
                          encoder_tokens=kept * side * side), view, group, (patches // side, patches // side))
                    for (kept, units), view, group in zip(encoded.per_item(), pixels, encoded.groups_per_item())]
        return prepare, encode

    def load_processor(self, model_ref, config):
        from .gemma3_inputs import load_gemma3_processor

        return load_gemma3_processor(model_ref)

    def encode(self, model, pixel_values, *, feature_layer=None, drop_class_token=None, grid_thw=None, focus=None,
               fill=None, processor=None):
        if feature_layer is not None or drop_class_token is not None or grid_thw is not None:
            raise ValueError("a Gemma 3's features are its last tower block's, pooled: feature_layer, drop_class_token "
                             "and grid_thw do not apply")
        from .gemma3_inputs import gemma3_pixels

        pixels = gemma3_pixels(processor, pixel_values, focus, fill)
        settings = getattr(model.model, "_dymu", None)
        if settings is None:
            return encode_gemma3(model, pixels.to(model.device))
        return encode_gemma3(model, pixels.to(model.device), settings.thresholds, settings.r, settings.budget)

    @torch.no_grad()
    def encode_records(self, model, processor, opened, skipped):
        """Per image: LLM tokens kept of the stock ones, tower rows, and the group of every LLM token."""
        if not opened:
            return [], skipped
        paths, images = zip(*opened)
        encoded = self.encode(model, list(images), processor=processor)
        unit = unit_grid(model.config)[1] ** 2
        return [{"path": str(p), "tokens": kept, "full_tokens": units, "encoder_tokens": kept * unit,
                 "llm_rows": kept, "stock_positions": units, "group_of_unit": g.tolist()}
                for p, (kept, units), g in zip(paths, encoded.per_item(), encoded.groups_per_item())], skipped

    def prepare(self, model, processor, request):
        from .gemma3_inputs import gemma3_prompt_inputs

        if not request.chat_template:
            self.refuse_unsupported("raw_prompt", model)
        return gemma3_prompt_inputs(model, processor, request)


register_vlm_family(Gemma3Family())

