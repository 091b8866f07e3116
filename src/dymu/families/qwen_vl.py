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

Mode ``dtome`` (merged tokens fed straight to the LLM, no VTU) is refused: it would need its own
`get_rope_index` giving every kept token one 3-D position.
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
)

from .. import compat, vtu
from ..patching import PatchedClasses
from ..decoders.llama import apply_vtu, check_kv_cache, remove_vtu, vtu_groups
from ..towers.qwen_vit import MERGE_POINTS, QwenEncoded, check_thresholds, check_thresholds_file, encode_qwen

SUPPORTED_QWEN_VLMS = (Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration,
                       Qwen3VLForConditionalGeneration)
QWEN_MODES = ("full", "dymu")


@dataclass
class QwenSettings:
    mode: str
    merge_point: str
    thresholds: list[float]
    cross_frame: bool = False  # videos: merge steps alternate across frames and within frames
    last_encoded: dict[str, QwenEncoded] = field(default_factory=dict)  # "image" / "video" of the last call


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
        encoded = encode_qwen(self.visual, pixels, grid_thw, settings.thresholds, settings.merge_point,
                              cross_frame=settings.cross_frame and modality == "video")
        settings.last_encoded[modality] = encoded
        split = (grid_thw.prod(-1) // self.visual.spatial_merge_size**2).tolist()
        features = encoded.features.split(split)
        for rows, groups in zip(features, encoded.groups_per_item(grid_thw, self.visual.spatial_merge_size)):
            rows.dymu_group_of_unit = groups  # local to the image / video
        if encoded.deepstack:
            return BaseModelOutputWithDeepstackFeatures(
                last_hidden_state=encoded.tokens, pooler_output=features,
                deepstack_features=[level.split(split) for level in encoded.deepstack])
        return BaseModelOutputWithPooling(last_hidden_state=encoded.tokens, pooler_output=features)

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


def apply_qwen_vl(model: nn.Module, thresholds=None, mode: str = "dymu", merge_point: str | None = None,
                  vtu_attention: str = "fast", kv_cache: str = "compact", cross_frame: bool = False) -> None:
    """Patch a Qwen2-VL / Qwen2.5-VL / Qwen3-VL model in place. ``thresholds``: one per vision block
    (merge_point="vit"), or one per merge round after the PatchMerger (merge_point="post");
    ``merge_point`` default: the thresholds file's, else "vit"."""
    if mode == "dtome":
        raise ValueError("mode 'dtome' (merged tokens fed to the LLM without VTU) is not supported for Qwen VLs: it "
                         "needs a get_rope_index giving every kept token one 3-D position; use mode='dymu'")
    if mode not in QWEN_MODES:
        raise ValueError(f"unknown mode {mode!r} for a Qwen VL; choose one of {', '.join(QWEN_MODES)}")
    if merge_point is not None and merge_point not in MERGE_POINTS:
        raise ValueError(f"merge_point must be one of {', '.join(MERGE_POINTS)}, got {merge_point!r}")
    if mode == "full" and cross_frame:
        raise ValueError("cross_frame merges video frames: it needs mode 'dymu', not 'full'")
    check_kv_cache(kv_cache)
    # What the swapped inner model overrides and calls of the stock one.
    stock = getattr(model.model, "_dymu_stock_class", type(model.model))
    compat.require_forward(stock, ("input_ids", "mm_encoder_outputs", "image_grid_thw", "video_grid_thw"))
    compat.require_forward(stock, ("pixel_values", "image_grid_thw"), "get_image_features")
    compat.require_forward(stock, ("pixel_values_videos", "video_grid_thw"), "get_video_features")
    remove_qwen_vl(model)
    model._dymu_mode = mode
    if mode == "full":
        return
    inner = model.model
    if thresholds is None:
        raise ValueError("mode 'dymu' needs thresholds (dymu calibrate makes them)")
    values, merge_point = qwen_thresholds(inner.visual, thresholds, merge_point)
    apply_vtu(inner.language_model, vtu_attention=vtu_attention, kv_cache=kv_cache)
    inner._dymu = QwenSettings(mode=mode, merge_point=merge_point, thresholds=values, cross_frame=bool(cross_frame))
    inner._dymu_stock_class = type(inner)
    inner.__class__ = _swapped_class(type(inner))


@torch.no_grad()
def encode_qwen_vl(model: nn.Module, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> QwenEncoded:
    """The vision side only, with the model's DyMU settings (none: stock, every unit its own token)."""
    visual = model.model.visual
    settings = getattr(model.model, "_dymu", None)
    if settings is None:
        return encode_qwen(visual, pixel_values, grid_thw, [float("inf")], "post")
    return encode_qwen(visual, pixel_values, grid_thw, settings.thresholds, settings.merge_point,
                       cross_frame=settings.cross_frame)


def remove_qwen_vl(model: nn.Module) -> None:
    inner = model.model
    if hasattr(inner, "_dymu_stock_class"):
        inner.__class__ = inner._dymu_stock_class
        del inner._dymu_stock_class, inner._dymu
    remove_vtu(inner.language_model)
    if hasattr(model, "_dymu_mode"):
        del model._dymu_mode


# The names api.py's registry looks up (apply goes through `apply_qwen_vl`: Qwen thresholds are per
# ViT block or merge round, with a merge point instead of r / order).
SUPPORTED_VLMS = SUPPORTED_QWEN_VLMS
remove_vlm = remove_qwen_vl
