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

import copy
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLForConditionalGeneration
from transformers.models.qwen3_vl.modeling_qwen3_vl import (
    BaseModelOutputWithDeepstackFeatures,
    Qwen3VLForConditionalGeneration,
    Qwen3VLModel as _QWEN3_INNER,
)

from .. import compat, vtu
from ..patching import PatchedClasses
from ..decoders.llama import apply_vtu, check_kv_cache, remove_vtu, vtu_groups
from ..towers.qwen_rules import QwenBudget, check_r, make_qwen_budget
from ..towers.qwen_vit import MERGE_POINTS, QwenEncoded, check_thresholds, check_thresholds_file, encode_qwen
from .qwen_positions import direct_rope_index, kept_units

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
        groups = encoded.groups_per_item(grid_thw, self.visual.spatial_merge_size)
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
                                 split_temporal=isinstance(self, _QWEN3_INNER),
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


# ---------------------------------------------------------------------------------------------
# Prompts with images and videos (the stock video processor needs torchvision; this does its job).


def video_pixels(image_processor, frames: list, fps: float = 2.0) -> dict:
    """pixel_values_videos (T·h·w, C·2·p·p), video_grid_thw (1, 3) and second_per_grid_ts for one video,
    laid out as the stock Qwen2-VL video processor does: frames resized like images, the last frame
    repeated to an even count, two consecutive frames fused per temporal patch, 2x2-unit-major rows."""
    if len(frames) % 2:
        frames = list(frames) + [frames[-1]]
    out = image_processor(images=frames, return_tensors="pt")
    grid = out["image_grid_thw"]  # (F, 3): every frame (1, h, w)
    if not bool((grid == grid[:1]).all()):
        raise ValueError("the frames of a video must all have the same size")
    _, h, w = grid[0].tolist()
    p = image_processor.patch_size
    per_frame = out["pixel_values"].view(len(frames), h * w, 3, 2, p, p)  # an image's 2 temporal copies are equal
    fused = torch.stack([per_frame[0::2, :, :, 0], per_frame[1::2, :, :, 0]], dim=3)  # (T, hw, 3, 2, p, p)
    return {"pixel_values_videos": fused.reshape(len(frames) // 2 * h * w, -1),
            "video_grid_thw": torch.tensor([[len(frames) // 2, h, w]]),
            "second_per_grid_ts": torch.tensor([2.0 / fps])}


def _video_placeholder(processor, grid_thw: torch.Tensor, fps: float) -> str:
    """What the stock processor puts in place of one video token (Qwen3-VL: a timestamp per temporal patch)."""
    t, h, w = grid_thw.tolist()
    pads = processor.video_token * (h * w // 4)
    if not hasattr(processor, "vision_start_token"):  # Qwen2-VL / Qwen2.5-VL: all temporal patches in a row
        return pads * t
    return "".join(f"<{(2 * k + 0.5) / fps:.1f} seconds>{processor.vision_start_token}{pads}{processor.vision_end_token}"
                   for k in range(t))


_NO_VIDEO_TOKEN = "<|dymu:videos-expanded|>"


def qwen_inputs(processor, texts: list[str], media: list[list], fps: float = 2.0):
    """A left-padded batch from chat texts with one image/video token per item of ``media[i]`` (a PIL
    image, or a list of PIL frames for a video), images and videos in the order of the text."""
    from transformers import BatchFeature

    images = [m for items in media for m in items if not isinstance(m, (list, tuple))]
    videos = [video_pixels(processor.image_processor, list(m), fps) for items in media for m in items
              if isinstance(m, (list, tuple))]
    k = 0
    expanded = []
    for text in texts:
        parts = text.split(processor.video_token)
        out = parts[0]
        for part in parts[1:]:
            out += _video_placeholder(processor, videos[k]["video_grid_thw"][0], fps) + part
            k += 1
        expanded.append(out)
    if k != len(videos):
        raise ValueError(f"the texts hold {k} video tokens but {len(videos)} videos were given")
    # The video placeholders are already expanded here; a shallow copy whose video token no text contains
    # keeps the stock processor from looking for videos it has no processor for, and without a video token
    # id from counting the expanded pads against it. A string, not None: some processors build patterns
    # from it even without videos (Qwen3-VL, transformers 5.25). The pads' token types are set below.
    text_and_images = copy.copy(processor)
    text_and_images.video_token, text_and_images.video_token_id = _NO_VIDEO_TOKEN, None
    inputs = dict(text_and_images(images=images or None, text=expanded, return_tensors="pt", padding=True))
    if "mm_token_type_ids" in inputs:  # 0 text, 1 image, 2 video: what get_rope_index reads
        inputs["mm_token_type_ids"][inputs["input_ids"] == processor.video_token_id] = 2
    if videos:
        for key in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
            inputs[key] = torch.cat([v[key] for v in videos])
    if "second_per_grid_ts" not in processor.model_input_names:  # only Qwen2.5-VL takes it
        inputs.pop("second_per_grid_ts", None)
    return BatchFeature(inputs)


_NO_VIDEO_CLASSES: dict[type, type] = {}


def processor_class(model_type: str) -> type:
    """The family's stock processor class without its video processor (which needs torchvision).

    The subclass only narrows ``__init__`` to (image_processor, tokenizer): transformers reads a
    processor's parts from its ``__init__`` signature. Text, images and chat templates are stock.
    """
    from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor, Qwen3VLProcessor

    stocks = {"qwen2_vl": Qwen2VLProcessor, "qwen2_5_vl": Qwen2_5_VLProcessor, "qwen3_vl": Qwen3VLProcessor}
    if model_type not in stocks:
        raise ValueError(f"{model_type!r} is not a Qwen VL model type ({', '.join(stocks)})")
    stock = stocks[model_type]
    if stock not in _NO_VIDEO_CLASSES:
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            stock.__init__(self, image_processor, tokenizer, None, chat_template=chat_template)

        _NO_VIDEO_CLASSES[stock] = type(f"{stock.__name__}NoVideo", (stock,), {"__init__": __init__})
    return _NO_VIDEO_CLASSES[stock]


def load_qwen_processor(model_ref: str, model_type: str):
    """The stock processor of a Qwen VL folder/hub id, or, where its video processor cannot load
    (no torchvision, or a folder saved by the demo), the same processor without video processor."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(model_ref)
        if hasattr(processor, "image_processor"):  # (an unknown processor class loads as a bare tokenizer)
            return processor
    except (ImportError, AttributeError, ValueError, OSError, TypeError):
        pass
    return processor_class(model_type).from_pretrained(model_ref)


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


def qwen_budget(thresholds, max_tokens=None, min_tokens=None) -> QwenBudget | None:
    """The token budget: the arguments where given, else the `Thresholds` file's defaults."""
    if max_tokens is None:
        max_tokens = getattr(thresholds, "max_tokens", None)
    if min_tokens is None:
        min_tokens = getattr(thresholds, "min_tokens", None)
    return make_qwen_budget(max_tokens, min_tokens)


def _check_mode(mode: str, thresholds, r, merge_point: str | None, tome_vtu: bool, cross_frame: bool) -> None:
    if mode not in QWEN_MODES:
        raise ValueError(f"unknown mode {mode!r} for a Qwen VL; choose one of {', '.join(QWEN_MODES)}")
    if merge_point is not None and merge_point not in MERGE_POINTS:
        raise ValueError(f"merge_point must be one of {', '.join(MERGE_POINTS)}, got {merge_point!r}")
    if mode == "full" and cross_frame:
        raise ValueError("cross_frame merges video frames: it needs a merging mode, not 'full'")
    if mode == "tome" and r is None:
        raise ValueError("mode 'tome' needs r (unit merges per ViT block: one number or one per block)")
    if mode == "tome" and merge_point == "post":
        raise ValueError("mode 'tome' merges r units in every ViT block: it needs merge_point='vit', not 'post'")
    if mode != "tome" and r is not None:
        raise ValueError(f"r is for mode 'tome'; mode {mode!r} takes thresholds")
    if mode in ("dymu", "dtome") and thresholds is None:
        raise ValueError(f"mode {mode!r} needs thresholds (dymu calibrate makes them)")
    if not tome_vtu and mode != "tome":
        raise ValueError(f"tome_vtu=False is a setting of mode 'tome', not {mode!r}")


def apply_qwen_vl(model: nn.Module, thresholds=None, mode: str = "dymu", merge_point: str | None = None,
                  vtu_attention: str = "fast", kv_cache: str = "compact", cross_frame: bool = False, *,
                  r=None, budget: QwenBudget | None = None, tome_vtu: bool = True) -> None:
    """Patch a Qwen2-VL / Qwen2.5-VL / Qwen3-VL model in place (modes: see the module docstring).
    ``thresholds``: one per vision block (merge_point="vit"), or one per merge round after the
    PatchMerger (merge_point="post"); ``merge_point`` default: the thresholds file's, else "vit".
    ``r`` (mode tome): unit merges per ViT block and segment. ``budget``: a `QwenBudget` (`qwen_budget`)."""
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
    remove_qwen_vl(model)
    model._dymu_mode = mode
    if mode == "full":
        return
    if not direct:
        apply_vtu(inner.language_model, vtu_attention=vtu_attention, kv_cache=kv_cache)
    inner._dymu = QwenSettings(mode=mode, merge_point=merge_point, thresholds=values, cross_frame=bool(cross_frame),
                               r=r, budget=budget, direct=direct)
    inner._dymu_stock_class = type(inner)
    inner.__class__ = _swapped_class(type(inner))


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
    inner = model.model
    if hasattr(inner, "_dymu_stock_class"):
        inner.__class__ = inner._dymu_stock_class
        del inner._dymu_stock_class, inner._dymu
        inner.__dict__.pop("_dymu_running", None)
    remove_vtu(inner.language_model)
    if hasattr(model, "_dymu_mode"):
        del model._dymu_mode


# The names api.py's registry looks up (apply goes through `apply_qwen_vl`: Qwen thresholds are per
# ViT block or merge round, with a merge point instead of r / order).
SUPPORTED_VLMS = SUPPORTED_QWEN_VLMS
remove_vlm = remove_qwen_vl
