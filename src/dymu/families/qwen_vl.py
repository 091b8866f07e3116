"""DyMU in Qwen2-VL, Qwen2.5-VL and Qwen3-VL: unit-level DToMe in the vision tower (towers/qwen_vit.py),
virtual unmerge back to the stock placeholder count, VTU with M-RoPE in the text decoder.

The inner `*VLModel` is class-swapped per instance. Its `get_image_features` / `get_video_features`
encode with merging and return, per image / video, the (t·h·w/4, D) features of the stock model's
shape: every unit gets its merged token's row (and, for Qwen3-VL, its deepstack rows). So the
processor's placeholders, `get_rope_index` (every position keeps its own (t, h, w)) and `generate`
stay stock. Each feature tensor carries the group of every unit (`dymu_group_of_unit`, like
families/llava.py: generate re-lists the same tensor objects for num_return_sequences / beams). The
class-swapped `forward` builds the prompt's group map in `masked_scatter` order (images, then
videos; row-major over batch and sequence) and hands it to the VTU decoder layers for that prefill.
Decode steps carry no pixels and take the stock path.

Modes: ``dymu`` (thresholds, VTU), ``tome`` (a fixed r unit merges per ViT block, VTU unless
``tome_vtu=False``), ``dtome`` (thresholds, merged tokens fed straight to the LLM, no VTU) and ``full``.
Without VTU (``dtome``, ``tome`` with ``tome_vtu=False``) every image / video gives one feature row per
kept token, at its group's representative unit (the group's first unit in raster order), and the
prompt holds one placeholder per kept token (`dymu.prompt_inputs` builds it); the swapped
`get_rope_index` gives each kept token that unit's stock (t, h, w) position and the text its stock
positions (families/qwen_positions.py), and sets the rope deltas that decode steps add. The stock
`generate` calls it (with the prompt's `mm_encoder_outputs`) for the prefill positions.

Token budget (``max_tokens`` / ``min_tokens`` per image and per video, in LLM tokens = units): on top
of the thresholds or r, over the merge steps: every ViT block (merge_point "vit"), or the rounds after
the PatchMerger (merge_point "post": the stock tower keeps every unit, and the budget is met by the
rounds; each halves at best, so add +inf rounds to make room for a small budget). See
towers/qwen_rules.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.modeling_qwen2_vl import (
    Qwen2VLForConditionalGeneration,
)
from transformers.models.qwen3_vl.modeling_qwen3_vl import (
    BaseModelOutputWithDeepstackFeatures,
    Qwen3VLForConditionalGeneration,
)
from transformers.models.qwen3_vl.modeling_qwen3_vl import (
    Qwen3VLModel as _QWEN3_INNER,
)

from .. import compat, vtu
from ..decoders.llama import (
    check_kv_cache,
    check_vtu,
    vtu_groups,
)
from ..patching import PatchedClasses
from ..towers.qwen_rules import QwenBudget, check_r, override_budget
from ..towers.qwen_vit import (
    MERGE_POINTS,
    QwenEncoded,
    check_thresholds,
    check_thresholds_file,
    encode_qwen,
)
from .base import PreparedInputs, VLMFamily, check_mode_arguments, register_vlm_family, install_inner_patch, remove_inner_patch
from .prompting import video_frames, viewed
from .qwen_positions import direct_rope_index, kept_units
from .qwen_processors import load_qwen_processor

SUPPORTED_QWEN_VLMS = (Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration,
                       Qwen3VLForConditionalGeneration)
QWEN_MODES = ("full", "dymu", "dtome", "tome")


@dataclass
class QwenSettings:
    mode: str
    merge_point: str
    thresholds: list[float] | None
    cross_frame: bool = False  # videos: merge steps alternate across frames and within frames
    last_encoded: dict[str, QwenEncoded] = field(default_factory=dict)  # "image" / "video" of the last call
    r: list[int] | None = None  # mode tome: unit merges per ViT block (instead of thresholds)
    budget: QwenBudget | None = None  # per image / video, in LLM tokens
    direct: bool = False  # merged tokens fed straight to the LLM (no VTU): dtome, tome without VTU

    def encode(self, visual: nn.Module, pixels: torch.Tensor, grid_thw: torch.Tensor, video: bool) -> QwenEncoded:
        return encode_qwen(visual, pixels, grid_thw, self.thresholds, self.merge_point,
                           cross_frame=self.cross_frame and video, budget=self.budget, r=self.r)


class DyMUQwenVLModel:
    """Mixed in before the stock Qwen2VLModel / Qwen2_5_VLModel / Qwen3VLModel of one instance."""

    _dymu: QwenSettings
    _dymu_stock_class: type
    _dymu_split_temporal = False  # the stock get_rope_index positions a video per temporal patch (Qwen3-VL, Qwen3.5)

    def get_image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.LongTensor | None = None,
                           **kwargs):
        return self._dymu_encode("image", pixel_values, image_grid_thw)

    def get_video_features(self, pixel_values_videos: torch.Tensor, video_grid_thw: torch.LongTensor | None = None,
                           **kwargs):
        return self._dymu_encode("video", pixel_values_videos, video_grid_thw)

    def _dymu_encode(self, modality: str, pixels: torch.Tensor, grid_thw: torch.Tensor):
        if grid_thw is None:
            raise ValueError(f"DyMU needs {modality}_grid_thw with the {modality} pixels")
        settings = self._dymu
        encoded = settings.encode(self.visual, pixels, grid_thw, modality == "video")
        settings.last_encoded[modality] = encoded
        split = (grid_thw.prod(-1) // self.visual.spatial_merge_size**2).tolist()
        groups = encoded.groups_per_item()
        offsets = torch.tensor([0] + split[:-1], device=encoded.features.device).cumsum(0).tolist()
        # Without VTU: one row per kept token, at its representative unit (qwen_positions.py).
        rows_of = [kept_units(g) + o for g, o in zip(groups, offsets)] if settings.direct else None

        def items(level: torch.Tensor) -> tuple:
            return level.split(split) if rows_of is None else tuple(level[rows] for rows in rows_of)

        features = items(encoded.features)
        for k, (rows, item_groups) in enumerate(zip(features, groups)):
            rows.dymu_group_of_unit = item_groups  # local to the image / video
            rows.dymu_kept_units = kept_units(item_groups)
        if encoded.deepstack:
            return BaseModelOutputWithDeepstackFeatures(
                last_hidden_state=encoded.tokens, pooler_output=features,
                deepstack_features=[items(level) for level in encoded.deepstack])
        return BaseModelOutputWithPooling(last_hidden_state=encoded.tokens, pooler_output=features)

    def get_rope_index(self, input_ids, mm_token_type_ids=None, image_grid_thw=None, video_grid_thw=None,
                       attention_mask=None, **kwargs):
        """Stock, except without VTU: every kept token at its representative unit's stock position."""
        stock = super().get_rope_index
        grids = {m: g for m, g in ((1, image_grid_thw), (2, video_grid_thw)) if g is not None}
        if not self._dymu.direct or not grids:
            return stock(input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=image_grid_thw,
                         video_grid_thw=video_grid_thw, attention_mask=attention_mask, **kwargs)
        outputs = self._dymu_direct_outputs(kwargs, image_grid_thw, video_grid_thw)
        kept = {m: [getattr(rows, "dymu_kept_units", None) for rows in outputs[name].pooler_output]
                for m, name in ((1, "image"), (2, "video")) if m in grids}
        for m, units in kept.items():  # rows not made by DyMU: every unit kept
            kept[m] = [torch.arange(int(g.prod()) // 4) if u is None else u.cpu() for u, g in zip(units, grids[m])]
        extra = {k: v for k, v in kwargs.items() if k == "second_per_grid_ts"}
        return direct_rope_index(stock, input_ids, mm_token_type_ids, attention_mask, grids, kept,
                                 {1: self.config.image_token_id, 2: self.config.video_token_id},
                                 split_temporal=isinstance(self, _QWEN3_INNER) or self._dymu_split_temporal,
                                 vision_start=getattr(self.config, "vision_start_token_id", None), **extra)

    def _dymu_direct_outputs(self, kwargs: dict, image_grid_thw, video_grid_thw) -> dict:
        """The encoder outputs of the prompt being positioned: generate's ``mm_encoder_outputs``, the
        running forward's, or (pixels given to generate) encoded here."""
        outputs = dict(kwargs.get("mm_encoder_outputs") or getattr(self, "_dymu_running", None) or {})
        for modality, key, grid in (("image", "pixel_values", image_grid_thw),
                                    ("video", "pixel_values_videos", video_grid_thw)):
            if grid is None or outputs.get(modality) is not None:
                continue
            if kwargs.get(key) is None:
                raise ValueError(f"without VTU the {modality} positions need the {modality}s' pixels or "
                                 "mm_encoder_outputs (dymu.prompt_inputs makes them)")
            outputs[modality] = self._dymu_encode(modality, kwargs[key], grid)
        return outputs

    def forward(self, input_ids=None, pixel_values=None, pixel_values_videos=None, image_grid_thw=None,
                video_grid_thw=None, mm_encoder_outputs=None, **kwargs):
        outputs = dict(mm_encoder_outputs or {})
        if pixel_values is not None and outputs.get("image") is None:
            outputs["image"] = self.get_image_features(pixel_values, image_grid_thw)
        if pixel_values_videos is not None and outputs.get("video") is None:
            outputs["video"] = self.get_video_features(pixel_values_videos, video_grid_thw)
        stock = super().forward
        call = dict(input_ids=input_ids, image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw, **kwargs)
        if not outputs:  # text only, or a decode step
            return stock(mm_encoder_outputs=mm_encoder_outputs, **call)
        if self._dymu.direct:  # no VTU; get_rope_index reads the outputs while the stock forward runs
            self._dymu_running = outputs
            try:
                return stock(mm_encoder_outputs=outputs, **call)
            finally:
                self._dymu_running = None
        with vtu_groups(self.language_model, self.prompt_group_map(input_ids, outputs)):
            return stock(mm_encoder_outputs=outputs, **call)

    def prompt_group_map(self, input_ids: torch.Tensor | None, outputs: dict) -> torch.Tensor:
        """(B, N) group map of the prompt: each image/video position joins its merged token's group."""
        if input_ids is None:
            raise ValueError("DyMU with VTU needs input_ids to find the image/video placeholders (got inputs_embeds)")
        labels = torch.full_like(input_ids, -1)  # -1: a group of its own (text, padding)
        offset = 0
        for modality in ("image", "video"):  # the stock forward scatters images first, then videos
            output = outputs.get(modality)
            if output is None:
                continue
            positions = input_ids == getattr(self.config, f"{modality}_token_id")
            parts = []
            for rows in output.pooler_output:
                groups = getattr(rows, "dymu_group_of_unit", None)
                if groups is None:  # features not made by DyMU: every position its own group
                    groups = torch.arange(len(rows), device=rows.device)
                parts.append(groups.to(input_ids.device) + offset)
                offset += len(rows)
            have, need = int(positions.sum()), sum(len(p) for p in parts)
            if have != need:
                raise ValueError(f"the prompt has {have} {modality} placeholders but the {modality}s make {need} "
                                 "tokens: DyMU keeps the processor's stock placeholder count, build the prompt with it")
            labels[positions] = torch.cat(parts)  # masked_scatter fills them in this (row-major) order
        return vtu.group_map_from_labels(labels)


def _inner_model_classes() -> list[type]:
    """The stock inner *VLModel class of each supported Qwen VL (what `apply_qwen_vl` swaps)."""
    import sys

    return [getattr(sys.modules[vlm.__module__], vlm.__name__.replace("ForConditionalGeneration", "Model"))
            for vlm in SUPPORTED_QWEN_VLMS]


_swapped_class = PatchedClasses(__name__, "DyMU", DyMUQwenVLModel, _inner_model_classes)


def __getattr__(name: str):  # pickle finds the swapped model classes here (dymu/patching.py)
    return _swapped_class.resolve(name)


def qwen_thresholds(visual: nn.Module, thresholds, merge_point: str | None = None) -> tuple[list[float], str]:
    """(threshold values, merge point) for ``visual``: ``merge_point`` if given, else the one the
    `Thresholds` file was calibrated at, else "vit"; checked against the tower (one-line errors)."""
    merge_point = merge_point or (getattr(thresholds, "encoder", None) or {}).get("merge_point") or "vit"
    check_thresholds_file(thresholds, visual, merge_point)
    return check_thresholds(visual, getattr(thresholds, "thresholds", thresholds), merge_point), merge_point


def _check_mode(mode: str, thresholds, r, merge_point: str | None, tome_vtu: bool, cross_frame: bool) -> None:
    if merge_point is not None and merge_point not in MERGE_POINTS:
        raise ValueError(f"merge_point must be one of {', '.join(MERGE_POINTS)}, got {merge_point!r}")
    if mode == "full" and cross_frame:
        raise ValueError("cross_frame merges video frames: it needs a merging mode, not 'full'")
    check_mode_arguments("a Qwen VL", QWEN_MODES, mode, thresholds, r, tome_vtu, r_means="unit merges per ViT block")
    if mode == "tome" and merge_point == "post":
        raise ValueError("mode 'tome' merges r units in every ViT block: it needs merge_point='vit', not 'post'")


def apply_qwen_vl(model: nn.Module, thresholds=None, mode: str = "dymu", merge_point: str | None = None,
                  vtu_attention: str = "fast", kv_cache: str = "compact", cross_frame: bool = False, *,
                  r=None, budget: QwenBudget | None = None, tome_vtu: bool = True, swapped=None) -> None:
    """Patch a Qwen2-VL / Qwen2.5-VL / Qwen3-VL model in place (modes: see the module docstring).
    ``thresholds``: one per vision block (merge_point="vit"), or one per merge round after the
    PatchMerger (merge_point="post"); ``merge_point`` default: the thresholds file's, else "vit".
    ``r`` (mode tome): unit merges per ViT block and segment. ``budget``: a `QwenBudget` (`override_budget`).
    ``swapped``: the `PatchedClasses` that makes the inner model's class (another family reusing this one)."""
    _check_mode(mode, thresholds, r, merge_point, tome_vtu, cross_frame)
    check_kv_cache(kv_cache)
    # What the swapped inner model overrides and calls of the stock one.
    stock = getattr(model.model, "_dymu_stock_class", type(model.model))
    compat.require_forward(stock, ("input_ids", "mm_encoder_outputs", "image_grid_thw", "video_grid_thw"))
    compat.require_forward(stock, ("pixel_values", "image_grid_thw"), "get_image_features")
    compat.require_forward(stock, ("pixel_values_videos", "video_grid_thw"), "get_video_features")
    direct = mode == "dtome" or (mode == "tome" and not tome_vtu)
    if direct:  # the stock positions of the re-expanded prompt (qwen_positions.py)
        compat.require_forward(stock, ("input_ids", "mm_token_type_ids", "image_grid_thw", "video_grid_thw",
                                       "attention_mask"), "get_rope_index")
    inner = model.model
    if mode == "tome":
        values, merge_point, r = None, "vit", check_r(r, len(inner.visual.blocks))
    elif mode != "full":
        values, merge_point = qwen_thresholds(inner.visual, thresholds, merge_point)
    if mode != "full" and not direct:  # refuse before anything changes (all or nothing)
        check_vtu(inner.language_model, vtu_attention, kv_cache)
    if mode == "full":
        remove_qwen_vl(model)
        return
    install_inner_patch(inner, inner.language_model, swapped or _swapped_class,
                        QwenSettings(mode=mode, merge_point=merge_point, thresholds=values,
                                     cross_frame=bool(cross_frame), r=r, budget=budget, direct=direct),
                        vtu=not direct, vtu_attention=vtu_attention, kv_cache=kv_cache)


@torch.no_grad()
def encode_qwen_vl(model: nn.Module, pixel_values, grid_thw: torch.Tensor | None = None, *, focus=None, fill=None,
                   processor=None) -> QwenEncoded:
    """The vision side only, with the model's DyMU settings (none: stock, every unit its own token).
    ``pixel_values``: the processor's, with ``grid_thw``; or PIL images, which ``processor`` (the
    model's processor or image processor) turns into them, after filling outside ``focus`` (`dymu.focus`)."""
    visual = model.model.visual
    if not isinstance(pixel_values, torch.Tensor):
        pixel_values, grid_thw = focused_pixels(processor, list(pixel_values), focus, fill)
    elif focus is not None:
        raise ValueError("focus is applied to the images before the processor: pass PIL images (with processor=) "
                         "instead of pixel values")
    if grid_thw is None:
        raise ValueError("encoding with a Qwen VL needs grid_thw (the processor's image_grid_thw)")
    pixel_values = pixel_values.to(visual.device)
    settings = getattr(model.model, "_dymu", None)
    if settings is None:
        return encode_qwen(visual, pixel_values, grid_thw, [float("inf")], "post")
    return settings.encode(visual, pixel_values, grid_thw, video=False)


def focused_pixels(processor, images: list, focus, fill) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values, image_grid_thw) of PIL ``images`` with the pixels outside ``focus`` filled."""
    from ..focus import DEFAULT_FILL, apply_focus_all, check_focus_survives

    if processor is None:
        raise ValueError("encoding PIL images with a Qwen VL needs processor= (its processor or image processor)")
    image_processor = getattr(processor, "image_processor", processor)
    fill = DEFAULT_FILL if fill is None else fill
    filled = apply_focus_all(images, focus, fill)
    check_focus_survives(image_processor, images, filled, focus, fill)
    out = image_processor(images=filled, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def remove_qwen_vl(model: nn.Module) -> None:
    remove_inner_patch(model.model, model.model.language_model)


# ---------------------------------------------------------------------------------------------
# The family adapter.

class QwenVLFamily(VLMFamily):
    name, title = "qwen_vl", "Qwen2-VL / Qwen2.5-VL / Qwen3-VL"
    model_types = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
    calibration, merge_points, post_rounds = "units", MERGE_POINTS, 3  # rounds after the PatchMerger
    modes = {"full": None, "dymu": None, "dtome": None, "tome": None,
             "downsample": "runs at native resolution: fewer tokens means smaller images, which the processor's "
                           "min_pixels / max_pixels set"}
    options = {"r": None, "tome_vtu": None, "merge_point": None, "cross_frame": None, "budget": None, "focus": None,
               "video": None, "order": "it merges whole 2x2 units in the stock unit order",
               "raw_prompt": "prompts are questions, wrapped in the chat template"}
    swapped = None  # the PatchedClasses of the inner model (None: this module's); a family reusing this one sets its own

    def model_classes(self):
        return SUPPORTED_QWEN_VLMS

    def vision_tower(self, model):
        return model.model.visual

    def unit_thresholds(self, model, thresholds) -> tuple[list[float], str]:
        """(threshold values, merge point) of a thresholds file or values, checked against the tower."""
        return qwen_thresholds(self.vision_tower(model), thresholds)

    def unit_calibration(self, model, merge_point, rounds, model_ref):
        from .qwen_units import unit_calibration

        return unit_calibration(self.vision_tower(model), merge_point, rounds, model_ref)

    def unit_calibration_batch(self, model, image_processor, images, merge_point, steps, chooser):
        from .qwen_units import unit_calibration_batch

        return unit_calibration_batch(self.vision_tower(model), image_processor, images, merge_point, steps, chooser)

    def analyze_units(self, model, image_processor, thresholds):
        from .qwen_units import analyze_units

        return analyze_units(self.vision_tower(model), image_processor, *self.unit_thresholds(model, thresholds))

    def analyze_view(self, model, image_processor, image):
        from .qwen_units import analyze_view

        return analyze_view(image_processor, image)

    def apply(self, model, settings):
        self.check(model, settings)
        apply_qwen_vl(model, settings.thresholds, mode=settings.mode, merge_point=settings.merge_point,
                      vtu_attention=settings.vtu_attention, kv_cache=settings.kv_cache,
                      cross_frame=settings.cross_frame, r=settings.r, tome_vtu=settings.tome_vtu,
                      budget=override_budget(settings.thresholds, settings.max_tokens, settings.min_tokens),
                      swapped=self.swapped)

    def remove(self, model):
        remove_qwen_vl(model)

    def encode(self, model, pixel_values, *, feature_layer=None, drop_class_token=None, grid_thw=None, focus=None,
               fill=None, processor=None):
        if feature_layer is not None or drop_class_token is not None:
            raise ValueError("a Qwen VL's features are the PatchMerger's output: feature_layer and drop_class_token "
                             "are for CLIP / SigLIP towers")
        return encode_qwen_vl(model, pixel_values, grid_thw, focus=focus, fill=fill, processor=processor)

    @torch.no_grad()
    def encode_records(self, model, processor, opened, skipped):
        """Per image: LLM tokens kept of the stock units and the group of every unit."""
        if not opened:
            return [], skipped
        paths, images = zip(*opened)
        inputs = processor(images=list(images), return_tensors="pt")
        grid = inputs["image_grid_thw"]
        encoded = encode_qwen_vl(model, inputs["pixel_values"].to(model.dtype), grid)
        groups = encoded.groups_per_item()
        settings = getattr(model.model, "_dymu", None)
        in_tower = settings is not None and settings.merge_point == "vit"  # "post": the tower keeps every unit
        return [{"path": str(p), "tokens": kept, "full_tokens": units, "grid_thw": thw,
                 "encoder_tokens": kept if in_tower else units, "llm_rows": kept, "stock_positions": units,
                 "group_of_unit": g.tolist()}
                for p, (kept, units), g, thw in zip(paths, encoded.per_item(), groups, grid.tolist())], skipped

    def load_processor(self, model_ref, config):
        return load_qwen_processor(model_ref, config.model_type)

    def prepare(self, model, processor, request):
        from .qwen_prompts import qwen_prompt_inputs

        if not request.chat_template:
            self.refuse_unsupported("raw_prompt", model)
        # One list per prompt in the prompt's order: images (a list of frames among them is a video), then videos.
        media = [[video_frames(m, i, k, 0) if isinstance(m, (list, tuple)) else viewed(m, i, k)
                  for k, m in enumerate(ims)] + vs for i, (ims, vs) in enumerate(zip(request.images, request.videos))]
        prepared = qwen_prompt_inputs(model, processor, request.prompts, media, max_tokens=request.max_tokens,
                                      min_tokens=request.min_tokens, focus=request.focus, fill=request.fill)
        return PreparedInputs(prepared.inputs, llm_rows=prepared.kept, stock_positions=prepared.stock,
                              encoder_tokens=prepared.encoder, full_tokens=prepared.stock,
                              encoder_s=prepared.encoder_s, without=prepared.without,
                              report_extras={"video_tokens_per_temporal_patch": prepared.per_patch})


register_vlm_family(QwenVLFamily())
