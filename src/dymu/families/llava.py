"""DyMU in `LlavaForConditionalGeneration` (LLaVA-1.5): DToMe encoder, projector on merged tokens,
virtual unmerge to the stock placeholders, VTU in the language model.

The inner `LlavaModel` is class-swapped per instance. Its `get_image_features` encodes with the
merging tower up to the feature layer and runs the projector on the n_i merged tokens only. With
VTU each image's features are then gathered back to its P patch
positions, so the prompt keeps the processor's stock placeholder count and `generate` stays stock.
Its `forward` turns the group map of every image into a group map over the whole prompt and hands
it to the VTU decoder layers for that (prefill) forward only; decode steps carry no image and take
the stock path.

The group map rides on the feature tensors themselves (`features.dymu_group_of_patch`): generate
drops unknown kwargs and re-lists `pooler_output` for beam search / num_return_sequences, but a
re-listed tensor is the same object, so its map goes with it.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava.modeling_llava import (
    LlavaForConditionalGeneration,
    LlavaModel,
)

from .. import compat, vtu
from ..decoders.llama import (
    apply_vtu,
    check_kv_cache,
    check_vtu,
    vtu_groups,
)
from ..settings import MODES
from ..towers.encoder import (
    EncodedImages,
    apply_dtome,
    dtome_settings,
    encode_with_tower,
    family_of,
    remove_dtome,
)
from ..patching import swap_class
from .base import PreparedInputs, register_vlm_family, remove_inner_patch, timed
from .prompting import (
    call_budget,
    downsample_side,
    focused_images,
    per_prompt,
    prompt_texts,
    set_placeholder_counts,
)
from .tower_vlm import TowerVLMFamily, encode_tower_images

# Names only public functions (tests check that each named dymu.X exists).
USE_PROMPT_INPUTS = ("use dymu.generate(model, processor, prompts, images), or "
                     "model.generate(**dymu.prompt_inputs(model, processor, prompts, images)).")
SUPPORTED_VLMS = (LlavaForConditionalGeneration,)


@dataclass
class LlavaSettings:
    mode: str
    vtu: bool  # virtual unmerge to the stock placeholders + VTU decoder
    downsample_tokens: float | None = None  # mode "downsample": the image's tokens after resizing
    last_encoded: EncodedImages | None = None  # of the last get_image_features call (for reports)


def project_merged(encoded: EncodedImages, projector: nn.Module, unmerge: bool) -> list[torch.Tensor]:
    """Projector on the merged tokens only (it is row-wise), then optionally the virtual unmerge.

    Returns one tensor per image: (P, D_llm) gathered by group_of_patch when ``unmerge``, else the
    (n_i, D_llm) merged tokens themselves.
    """
    live = encoded.sizes > 0  # (B, n_max)
    projected = projector(encoded.tokens[live])  # (sum n_i, D_llm)
    per_image = projected.split(encoded.num_tokens.tolist())
    if not unmerge:
        return list(per_image)
    features = []
    for rows, group_of_patch in zip(per_image, encoded.group_of_patch):
        full = rows[group_of_patch]  # (P, D_llm): every patch position gets its token's row
        full.dymu_group_of_patch = group_of_patch
        features.append(full)
    return features


class DyMULlavaModel(LlavaModel):
    _dymu: LlavaSettings

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        if self._dymu.mode == "downsample":  # the stock encoder on images dymu resized
            if pixel_values.shape[-1] >= self.vision_tower.config.image_size:
                # full-size pixels (stock processor, stock generate) would run the full model, labelled downsample
                raise ValueError(f"DyMU mode 'downsample' resizes the images and gives the prompt fewer image "
                                 f"placeholders: {USE_PROMPT_INPUTS}")
            return super().get_image_features(pixel_values, vision_feature_layer=vision_feature_layer,
                                              vision_feature_select_strategy=vision_feature_select_strategy,
                                              image_sizes=image_sizes, **kwargs)
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = vision_feature_select_strategy or self.config.vision_feature_select_strategy
        if not isinstance(layer, int):
            raise ValueError(f"DyMU reads one vision feature layer, not {layer!r}")
        tower = self.vision_tower
        encoded = encode_with_tower(tower, family_of(tower), pixel_values, layer, strategy == "default")
        self._dymu.last_encoded = encoded
        features = project_merged(encoded, self.multi_modal_projector, unmerge=self._dymu.vtu)
        return BaseModelOutputWithPooling(last_hidden_state=encoded.tokens, pooler_output=features)

    def forward(self, input_ids=None, pixel_values=None, mm_encoder_outputs=None, **kwargs):
        if pixel_values is not None and mm_encoder_outputs is None:
            mm_encoder_outputs = {"image": self.get_image_features(
                pixel_values,
                vision_feature_layer=kwargs.pop("vision_feature_layer", None),
                vision_feature_select_strategy=kwargs.pop("vision_feature_select_strategy", None),
            )}
            pixel_values = None
        image = (mm_encoder_outputs or {}).get("image")
        if image is None or not self._dymu.vtu:
            if image is not None and input_ids is not None:
                self._check_placeholders(input_ids, image.pooler_output)
            return super().forward(input_ids=input_ids, pixel_values=pixel_values,
                                   mm_encoder_outputs=mm_encoder_outputs, **kwargs)
        group_map = self.prompt_group_map(input_ids, image.pooler_output)
        with vtu_groups(self.language_model, group_map):
            return super().forward(input_ids=input_ids, mm_encoder_outputs=mm_encoder_outputs, **kwargs)

    def _check_placeholders(self, input_ids: torch.Tensor, features) -> None:
        have = int((input_ids == self.config.image_token_id).sum())
        need = sum(len(f) for f in features)
        if have != need:
            raise ValueError(
                f"the prompt has {have} image placeholders but DyMU mode {self._dymu.mode!r} made {need} image "
                f"tokens: in modes without VTU the prompt needs one placeholder per kept token; {USE_PROMPT_INPUTS}"
            )

    def prompt_group_map(self, input_ids: torch.Tensor | None, features: list[torch.Tensor]) -> torch.Tensor:
        """(B, N) group map of the whole prompt: each image position joins its merged token's group."""
        if input_ids is None:
            raise ValueError("DyMU with VTU needs input_ids to find the image placeholders (got inputs_embeds)")
        self._check_placeholders(input_ids, features)
        labels = []
        for f in features:
            group_of_patch = getattr(f, "dymu_group_of_patch", None)
            # Features not made by DyMU: every position its own token.
            labels.append(torch.arange(len(f), device=f.device) if group_of_patch is None else group_of_patch)
        return labels_to_group_map(input_ids, [(self.config.image_token_id, labels)])


def labels_to_group_map(input_ids: torch.Tensor, placeholders: list[tuple[int, list[torch.Tensor]]]) -> torch.Tensor:
    """(B, N) group map of a batch of prompts from the group labels of its images (and videos).

    ``placeholders``: per placeholder token id, one label tensor per image in reading order over the
    batch (the order `masked_scatter` fills them in); positions of one image with equal labels are
    one group. Text and padding are groups of their own.
    """
    labels = torch.full_like(input_ids, -1)  # -1: a group of its own (text, padding)
    offset = 0
    for token_id, per_item in placeholders:
        parts = []
        for item in per_item:
            parts.append(item.to(input_ids.device) + offset)
            offset += len(item)  # labels unique across images (a label is < its image's length)
        if parts:
            labels[input_ids == token_id] = torch.cat(parts)
    return vtu.group_map_from_labels(labels)


def apply_llava(model: nn.Module, thresholds=None, r=None, mode: str = "dymu", vtu_attention: str = "fast",
                kv_cache: str = "compact", tome_vtu: bool = True, downsample_tokens: float | None = None, order: str | None = None,
                budget=None) -> None:
    # All or nothing: every argument is checked before the model changes, so a refused call leaves
    # the previous patch (and mode) in place.
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if vtu_attention not in ("fast", "exact"):
        raise ValueError(f"vtu_attention must be 'fast' or 'exact', got {vtu_attention!r}")
    check_kv_cache(kv_cache)
    inner = model.model
    # What DyMULlavaModel overrides and calls of the stock LlavaModel.
    stock = getattr(inner, "_dymu_stock_class", type(inner))
    compat.require_forward(stock, ("input_ids", "pixel_values", "mm_encoder_outputs"))
    compat.require_forward(stock, ("pixel_values", "vision_feature_layer", "vision_feature_select_strategy"),
                           "get_image_features")
    tower = inner.vision_tower
    family = family_of(tower)
    if family is None:
        raise ValueError(f"the vision tower of this LLaVA is a {type(tower).__name__}, which DyMU does not support")
    if mode == "downsample":
        if downsample_tokens is None:
            raise ValueError("mode 'downsample' needs a thresholds file (its mean tokens kept sets the image size)")
        if not 1 <= float(downsample_tokens) <= inner.config.image_seq_length:
            raise ValueError(f"mode 'downsample' needs a mean of tokens kept between 1 and "
                             f"{inner.config.image_seq_length}, not {downsample_tokens}")
    if mode == "tome" and r is None:
        raise ValueError("mode 'tome' needs r (merges per layer)")
    if mode in ("dymu", "dtome") and thresholds is None:
        raise ValueError(f"mode {mode!r} needs thresholds")
    feature_layer = model.config.vision_feature_layer
    feature_layer = feature_layer if isinstance(feature_layer, int) else -1
    if mode in ("dymu", "dtome", "tome"):
        dtome_settings(tower, family, thresholds=None if mode == "tome" else thresholds,
                       r=r if mode == "tome" else None, order=order, budget=budget, feature_layer=feature_layer)
    use_vtu = mode == "dymu" or (mode == "tome" and tome_vtu)
    if use_vtu:
        check_vtu(inner.language_model, vtu_attention, kv_cache)

    remove_llava(model)
    if mode == "full":
        return
    if mode == "tome":
        apply_dtome(tower, family, r=r, order=order, budget=budget, feature_layer=feature_layer)
    elif mode == "downsample":
        pass  # stock encoder and LLM; the swapped class only refuses full-size pixels (see forward)
    else:
        apply_dtome(tower, family, thresholds=thresholds, order=order, budget=budget, feature_layer=feature_layer)
    if use_vtu:
        apply_vtu(inner.language_model, vtu_attention=vtu_attention, kv_cache=kv_cache)
    swap_class(inner, DyMULlavaModel, LlavaSettings(mode=mode, vtu=use_vtu, downsample_tokens=downsample_tokens))


def remove_llava(model: nn.Module) -> None:
    inner = model.model
    remove_inner_patch(inner, inner.language_model)
    remove_dtome(inner.vision_tower)



# ---------------------------------------------------------------------------------------------
# The family adapter.


class LlavaFamily(TowerVLMFamily):
    name, title = "llava", "LLaVA-1.5"
    model_types = ("llava",)
    modes = dict.fromkeys(MODES)
    options = {"r": None, "order": None, "tome_vtu": None, "budget": None, "focus": None, "raw_prompt": None,
               "merge_point": "merges in the vision tower only (no stock step follows it that mixes tokens)",
               "cross_frame": "takes no video",
               "video": "takes no video (LLaVA-NeXT-Video, LLaVA-OneVision and the Qwen VLs do)"}

    def model_classes(self):
        return SUPPORTED_VLMS

    def apply(self, model, settings):
        self.check(model, settings)
        thresholds, kept = settings.thresholds, getattr(settings.thresholds, "tokens_kept_mean", None)
        if settings.mode == "downsample" and thresholds is not None and not kept:
            raise ValueError(
                "mode 'downsample' sizes the images by the mean visual tokens these thresholds kept during "
                f"calibration, but this thresholds file has no calibration statistics (schedule "
                f"{getattr(thresholds, 'schedule', '?')!r}); make one with `dymu calibrate` (Python: dymu.calibrate) "
                "on the same model and a few hundred images")
        apply_llava(model, self.tower_thresholds(model, settings), r=settings.r, mode=settings.mode,
                    vtu_attention=settings.vtu_attention, kv_cache=settings.kv_cache, tome_vtu=settings.tome_vtu,
                    downsample_tokens=kept[-1] if kept else None, order=settings.file_default("order"),
                    budget=self.budget(settings))

    def remove(self, model):
        remove_llava(model)

    def encode_counted(self, model, processed, pixels):
        tower = self.vision_tower(model)
        encoded = encode_tower_images(model, tower, family_of(tower), pixels, None, None, None, None, None)
        # the LLM runs one row per kept token (VTU groups, or placeholders without VTU)
        return encoded, (encoded.num_tokens.tolist(), [model.config.image_seq_length] * len(encoded.num_tokens))

    def prepare(self, model, processor, request):
        return llava_inputs(model, processor, request)


@torch.no_grad()
def llava_inputs(model, processor, request) -> PreparedInputs:
    """The processor's prompt with one placeholder per token the LLM sees (fewer in modes without VTU),
    the images encoded once (timed), and the counts for the report."""
    from ..towers.encoder import budget_set

    mode, inner, config = LlavaFamily().mode_of(model), model.model, model.config
    original, images = focused_images(processor.image_processor, request.images, request.focus, request.fill)
    tower = inner.vision_tower
    budget = call_budget(tower, request.max_tokens, request.min_tokens)
    merging = hasattr(tower, "_dymu_state")
    device = next(model.parameters()).device
    flat = [im for ims in images for im in ims]
    texts = prompt_texts(processor, request.prompts, images, request.chat_template)
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=flat or None, text=texts, return_tensors="pt", padding=True)
    input_ids, attention_mask = inputs["input_ids"].to(device), inputs["attention_mask"].to(device)
    stock = config.image_seq_length if flat else 0
    mm_encoder_outputs, counts, side, encoder_s = None, [], None, 0.0
    if flat:
        pixel_values, kwargs = inputs["pixel_values"], {}
        if mode == "downsample":
            side = downsample_side(inner._dymu.downsample_tokens) * tower.config.patch_size
            small = copy.deepcopy(processor.image_processor)
            small.size, small.crop_size = {"shortest_edge": side}, {"height": side, "width": side}
            pixel_values = small(images=flat, return_tensors="pt")["pixel_values"]
            kwargs["interpolate_pos_encoding"] = True

        def encode():
            with budget_set(tower, budget) if merging else contextlib.nullcontext():
                return inner.get_image_features(pixel_values.to(device, model.dtype), **kwargs)

        features, encoder_s = timed(device, encode)
        mm_encoder_outputs = {"image": features}
        placeholders = [len(f) for f in features.pooler_output]  # per image, as the LLM will see it
        encoded = getattr(getattr(inner, "_dymu", None), "last_encoded", None)
        counts = encoded.num_tokens.tolist() if encoded is not None else placeholders
        if any(n != stock for n in placeholders):
            input_ids, attention_mask = set_placeholder_counts(
                input_ids, attention_mask, config.image_token_id, processor.tokenizer.pad_token_id, stock,
                placeholders)
    without = None
    if flat and merging and (budget is not None or request.focus is not None):  # the same images, whole, no budget
        plain = processor.image_processor(images=[im for ims in original for im in ims],
                                          return_tensors="pt")["pixel_values"]
        layer, strategy = config.vision_feature_layer, config.vision_feature_select_strategy
        with budget_set(tower, None):
            without = per_prompt(encode_with_tower(tower, family_of(tower), plain.to(device, model.dtype), layer,
                                                   strategy == "default").num_tokens.tolist(), images)
    # LLaVA-1.5: the LLM runs one row per kept token (VTU groups, or placeholders without VTU).
    rows = per_prompt(counts, images)
    stock_positions = [[config.image_seq_length] * len(ims) for ims in images]
    return PreparedInputs({"input_ids": input_ids, "attention_mask": attention_mask,
                           "mm_encoder_outputs": mm_encoder_outputs}, llm_rows=rows, stock_positions=stock_positions,
                          encoder_tokens=rows, full_tokens=stock_positions, encoder_s=encoder_s, image_size=side,
                          without=without)


register_vlm_family(LlavaFamily())
