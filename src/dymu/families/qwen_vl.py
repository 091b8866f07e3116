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
from .base import PreparedInputs, VLMFamily, register_vlm_family, timed
from .prompting import video_frames, viewed
from .qwen_processors import load_qwen_processor, qwen_inputs

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


# ---------------------------------------------------------------------------------------------
# The family adapter.

NOT_TOWER_R = "Qwen VLs merge by thresholds per ViT block or merge round, not a fixed r or a merge order"


class QwenVLFamily(VLMFamily):
    name, title = "qwen_vl", "Qwen2-VL / Qwen2.5-VL / Qwen3-VL"
    model_types = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
    calibration, merge_points, post_rounds = "units", MERGE_POINTS, 3  # rounds after the PatchMerger
    modes = {"full": None, "dymu": None,
             "dtome": "would feed merged tokens without VTU, which needs every kept token at its own 3-D "
                      "M-RoPE position; use mode 'dymu'",
             "tome": NOT_TOWER_R, "downsample": "runs at native resolution: fewer tokens means smaller images, "
                                               "which the processor's min_pixels / max_pixels set"}
    options = {"r": NOT_TOWER_R, "order": NOT_TOWER_R, "tome_vtu": NOT_TOWER_R, "merge_point": None,
               "cross_frame": None, "video": None,
               "budget": "token budgets are for the CLIP / SigLIP towers of the LLaVA models",
               "focus": "focus regions are for the LLaVA models",
               "raw_prompt": "prompts are questions, wrapped in the chat template"}

    def model_classes(self):
        return SUPPORTED_QWEN_VLMS

    def vision_tower(self, model):
        return model.model.visual

    def unit_thresholds(self, model, thresholds) -> tuple[list[float], str]:
        """(threshold values, merge point) of a thresholds file or values, checked against the tower."""
        return qwen_thresholds(self.vision_tower(model), thresholds)

    def apply(self, model, settings):
        self.check(model, settings)
        apply_qwen_vl(model, settings.thresholds, mode=settings.mode, merge_point=settings.merge_point,
                      vtu_attention=settings.vtu_attention, kv_cache=settings.kv_cache,
                      cross_frame=settings.cross_frame)

    def remove(self, model):
        remove_qwen_vl(model)

    def encode(self, model, pixel_values, *, feature_layer=None, drop_class_token=None, grid_thw=None, focus=None,
               fill=None, processor=None):
        if feature_layer is not None or drop_class_token is not None:
            raise ValueError("a Qwen VL's features are the PatchMerger's output: feature_layer and drop_class_token "
                             "are for CLIP / SigLIP towers")
        if focus is not None or fill is not None:
            self.refuse_unsupported("focus", model)
        if grid_thw is None:
            raise ValueError("encoding with a Qwen VL needs grid_thw (the processor's image_grid_thw)")
        return encode_qwen_vl(model, pixel_values, grid_thw)

    @torch.no_grad()
    def encode_records(self, model, processor, opened, skipped):
        """Per image: LLM tokens kept of the stock units and the group of every unit."""
        if not opened:
            return [], skipped
        device = next(model.parameters()).device
        paths, images = zip(*opened)
        inputs = processor(images=list(images), return_tensors="pt")
        grid = inputs["image_grid_thw"]
        encoded = encode_qwen_vl(model, inputs["pixel_values"].to(device, model.dtype), grid.to(device))
        groups = encoded.groups_per_item(grid, model.model.visual.spatial_merge_size)
        settings = getattr(model.model, "_dymu", None)
        in_tower = settings is not None and settings.merge_point == "vit"  # "post": the tower keeps every unit
        return [{"path": str(p), "tokens": kept, "full_tokens": units, "grid_thw": thw,
                 "encoder_tokens": kept if in_tower else units, "llm_rows": kept, "stock_positions": units,
                 "group_of_unit": g.tolist()}
                for p, (kept, units), g, thw in zip(paths, encoded.per_item(grid), groups, grid.tolist())], skipped

    def load_processor(self, model_ref, config):
        return load_qwen_processor(model_ref, config.model_type)

    def prepare(self, model, processor, request):
        if not request.chat_template:
            self.refuse_unsupported("raw_prompt", model)
        if request.max_tokens is not None or request.min_tokens is not None:
            self.refuse_unsupported("budget", model)
        if request.focus is not None or request.fill is not None:
            self.refuse_unsupported("focus", model)
        # One list per prompt in the prompt's order: images (a list of frames among them is a video), then videos.
        media = [[video_frames(m, i, k, 0) if isinstance(m, (list, tuple)) else viewed(m, i, k)
                  for k, m in enumerate(ims)] + vs for i, (ims, vs) in enumerate(zip(request.images, request.videos))]
        return qwen_prepare(model, processor, request.prompts, media)


@torch.no_grad()
def qwen_prepare(model, processor, prompts, media) -> PreparedInputs:
    """The stock prompt in every mode (virtual unmerge): images and videos encoded first (timed), then
    handed to generate as `mm_encoder_outputs`, with the processor's grids for M-RoPE."""
    device = next(model.parameters()).device
    texts = []
    for prompt, items in zip(prompts, media):
        content = [{"type": "video" if isinstance(m, (list, tuple)) else "image"} for m in items]
        texts.append(processor.apply_chat_template(
            [{"role": "user", "content": content + [{"type": "text", "text": prompt}]}],
            add_generation_prompt=True, tokenize=False))
    processor.tokenizer.padding_side = "left"
    inputs = qwen_inputs(processor, texts, media).to(device)
    inner = model.model
    encoded, full = {}, {}

    def encode():
        for modality, pixels in (("image", "pixel_values"), ("video", "pixel_values_videos")):
            if pixels in inputs:
                grid = inputs[f"{modality}_grid_thw"]
                encoded[modality] = getattr(inner, f"get_{modality}_features")(inputs.pop(pixels).to(model.dtype), grid)
                full[modality] = (grid.prod(-1) // inner.visual.spatial_merge_size**2).tolist()

    _, encoder_s = timed(device, encode)
    settings = getattr(inner, "_dymu", None)
    counts = {m: ([k for k, _ in settings.last_encoded[m].per_item(inputs[f"{m}_grid_thw"])]
                  if settings is not None else full[m]) for m in encoded}
    # The tower keeps every unit when it does not merge (stock, or merge_point "post").
    in_tower = counts if settings is not None and settings.merge_point == "vit" else full
    # per prompt, per image/video in the prompt's order (images are encoded before videos)
    taken = {"image": 0, "video": 0}
    rows, stock, encoder = [], [], []
    for items in media:
        row, row_stock, row_encoder = [], [], []
        for m in items:
            modality = "video" if isinstance(m, (list, tuple)) else "image"
            row.append(counts[modality][taken[modality]])
            row_stock.append(full[modality][taken[modality]])
            row_encoder.append(in_tower[modality][taken[modality]])
            taken[modality] += 1
        rows.append(row)
        stock.append(row_stock)
        encoder.append(row_encoder)
    per_patch = None
    if "video" in encoded:
        grid = inputs["video_grid_thw"]
        segments = (settings.last_encoded["video"].kept_per_segment.tolist() if settings is not None else
                    [int(h * w) // 4 for t, h, w in grid.tolist() for _ in range(t)])
        per_patch, s = [], 0
        for t in grid[:, 0].tolist():
            per_patch.append(segments[s : s + t])
            s += t
    return PreparedInputs({**inputs, "mm_encoder_outputs": encoded or None}, llm_rows=rows, stock_positions=stock,
                          encoder_tokens=encoder, full_tokens=stock, encoder_s=encoder_s,
                          report_extras={"video_tokens_per_temporal_patch": per_patch})


register_vlm_family(QwenVLFamily())
