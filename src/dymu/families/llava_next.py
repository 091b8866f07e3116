"""DyMU in LLaVA-NeXT and LLaVA-OneVision (AnyRes crops, multi-image prompts, OneVision video).

Data flow, per forward:
1. All crops of all images of the batch (and all video frames) go through the DToMe tower as one
   batch; each crop merges on its own (merge.py keeps a crop's tokens a function of that crop).
2. The projector runs on the merged tokens only; every crop is virtually unmerged back to its full
   token grid (`llava.project_merged`).
3. The stock `pack_image_features` (view, permute, unpad, OneVision's anyres_max bilinear downsample,
   `image_newline` after every row, base crop first) and, for video, the stock `apply_pooling`
   (bilinear 2x2) run unchanged on those full grids, so the LLM sees exactly the stock layout.
4. The group map follows every one of those steps. All of them are linear in the features, so a
   packed position is a fixed weighted sum of merged tokens, and two positions are one VTU group
   exactly when those weights are equal. The weights are read off by running the same stock
   function on a 3-channel *probe* instead of the features: (plane, row, column) of every token in
   the crop canvas. Gathers (view, permute, crop) move the probe rows; bilinear interpolation, whose
   two taps per axis are adjacent canvas rows/columns, turns the coordinates into y0 + λ and x0 + μ,
   from which the (at most 4) source tokens and their weights follow. Newlines get plane -1 and a
   group of their own. Nothing (positions x groups) is ever materialised.
5. Rows of one group must be bitwise equal for VTU (it keeps one row per group): gathers copy rows,
   but bilinear sums of the same weights over the same token may differ in the last bit between
   positions (w1·f + w2·f is not always f in floating point), so each group takes the row of its
   first position (checked to be within rounding of the others).

Merge points (``dymu.apply(..., merge_point=...)``, the names the Qwen VLs use):
- ``"vit"`` (default): DToMe in the tower, steps 1-5 above.
- ``"post"``: the stock tower (step 1 without merging), then after step 3-5 a few thresholded bipartite
  rounds (`merge.merge_rounds`) on the packed LLM-level tokens: one VTU group is one unit, merged
  units are size-weighted means (size = packed positions), and a segment (the units allowed to merge
  with each other) is one image or one video frame, newline positions excluded (they stay groups of
  their own). The bilinear steps make almost every position a mix of its own, so merging before them
  saves the LLM little; merging after them sees the mixes, and near-identical ones merge away.
- ``"both"``: DToMe in the tower (saves encoder compute) and the post rounds (saves LLM rows).
The post metric is the cosine of the projected features themselves (the rows VTU keeps), chosen by
measurement over the last tower layer's keys (head-mean) carried through the same stock steps: on the
tiny demo OneVision, 37 test images at one downsampled layout, thresholds calibrated at mid on half of
them, both rank LLM rows against JPEG complexity alike (Spearman +0.70), but features keep fewer rows
(170.7 vs 179.7 of 396) with a smaller last-token logit error against the stock model (relative L2
0.0031 vs 0.0047); keys would also need every stock step run a second time on a second tensor.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_next import modeling_llava_next as stock_next
from transformers.models.llava_next.modeling_llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextModel,
)
from transformers.models.llava_onevision import modeling_llava_onevision as stock_ov
from transformers.models.llava_onevision.modeling_llava_onevision import (
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionModel,
)

from .. import merge as M
from ..decoders.llama import apply_vtu, check_kv_cache, check_vtu, vtu_groups
from ..towers.encoder import (
    EncodedImages,
    apply_dtome,
    budget_set,
    dtome_settings,
    encode_with_tower,
    family_of,
)
from ..patching import swap_class
from . import anyres_measure
from .anyres_groups import (
    NEWLINE_PROBE,
    _canvas_labels,
    _label_grid,
    _probe,
    groups_from_keys,
    position_keys,
    post_merge,
    snap_to_groups,
)
from .anyres_inputs import (  # noqa: F401  (imported from here too)
    anyres_inputs,
    crops_per_image,
    encoder_pixels,
    encoder_tokens_per_item,
    stock_tokens_per_item,
    unique_rows_per_item,
)
from .anyres_merge_points import MERGE_POINTS, POST_ROUNDS, resolve_merge_point
from .base import register_vlm_family
from .llava import labels_to_group_map, project_merged, remove_llava
from .onevision_processor import frames_to_pixels, load_onevision_processor
from .prompting import call_budget, focused_images
from .tower_vlm import TowerVLMFamily

SUPPORTED_VLMS = (LlavaNextForConditionalGeneration, LlavaOnevisionForConditionalGeneration)
MODES = ("full", "dymu", "tome")
REFUSED_MODES = {
    "dtome": "feeds merged tokens without VTU, but the AnyRes layout needs every crop's full token grid "
             "(unpadding, newlines, downsampling)",
    "downsample": "shrinks every crop's token grid, which the AnyRes packing cannot lay out",
}


@dataclass
class AnyResSettings:
    mode: str
    last_encoded: EncodedImages | None = None  # crops/frames of the last encode (for reports)
    last_crops: list[int] | None = None  # crops (or frames) per image / video of that encode
    last_videos: torch.Tensor | None = None  # (B, L, D) video features of the last encode, with their maps
    merge_point: str = "vit"
    post_thresholds: list[float] | None = None  # one per post round ("post", "both")
    # Calibration of the post rounds (batch-level Eq. 4): units entering the rounds -> their edge chooser.
    calibrate_post: Callable[[int], M.EdgeChooser] | None = None
    last_post_kept: torch.Tensor | None = None  # (segments, rounds) units kept after every post round

    @property
    def post(self) -> bool:
        return self.merge_point in ("post", "both")


# ---------------------------------------------------------------------------------------------
# The patched inner models.


class _DyMUAnyResModel:
    """Mixed in before LlavaNextModel / LlavaOnevisionModel (per-instance class swap)."""

    _dymu: AnyResSettings
    _dymu_stock_class: type

    # -- features ---------------------------------------------------------------------------------
    def _feature_choice(self, layer, strategy) -> tuple[int, bool]:
        layer = self.config.vision_feature_layer if layer is None else layer
        strategy = strategy or self.config.vision_feature_select_strategy
        if not isinstance(layer, int):
            raise ValueError(f"DyMU reads one vision feature layer, not {layer!r}")
        return layer, strategy == "default"

    def _encode_crops(self, crops: torch.Tensor, layer, strategy, counts: list[int]) -> list[torch.Tensor]:
        """(C, 3, S, S) crops -> per crop (side², D) projected features, virtually unmerged, each
        carrying ``dymu_group_of_patch`` (side²,): the merged token of every token of its grid."""
        tower = self.vision_tower
        layer, drop_cls = self._feature_choice(layer, strategy)
        encoded = encode_with_tower(tower, family_of(tower), crops, layer, drop_cls)
        self._dymu.last_encoded, self._dymu.last_crops = encoded, counts
        return project_merged(encoded, self.multi_modal_projector, unmerge=True)

    def _stock_pack(self, features, image_sizes, strategy, newline, aspect):
        if isinstance(self, LlavaOnevisionModel):
            return self.pack_image_features(features, image_sizes, image_newline=newline,
                                            vision_aspect_ratio=aspect or self.config.vision_aspect_ratio)[0]
        return self.pack_image_features(features, image_sizes, vision_feature_select_strategy=strategy,
                                        image_newline=newline)[0]

    def get_image_features(self, pixel_values, image_sizes, vision_feature_layer=None,
                           vision_feature_select_strategy=None, vision_aspect_ratio=None, batch_num_images=None,
                           **kwargs) -> BaseModelOutputWithPooling:
        stock = stock_ov if isinstance(self, LlavaOnevisionModel) else stock_next
        crop_px = self.config.vision_config.image_size
        side = crop_px // self.config.vision_config.patch_size
        counts = crops_per_image(self, image_sizes, batch_num_images)
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([pv[:n] for pv, n in zip(pixel_values, counts)])
        elif pixel_values.dim() != 4:
            raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)}: expected 4 or 5 dimensions")
        per_crop = self._encode_crops(pixel_values, vision_feature_layer, vision_feature_select_strategy, counts)

        strategy = vision_feature_select_strategy or self.config.vision_feature_select_strategy
        features, probes, crop_labels, start = [], [], [], 0
        for n, size in zip(counts, image_sizes):
            crops = per_crop[start:start + n]
            start += n
            features.append(torch.stack(crops))  # (n, side², D)
            # Labels unique within the image: crop k's tokens are k·side² + their merged-token index.
            crop_labels.append(torch.stack([c.dymu_group_of_patch.cpu() + k * side * side for k, c in enumerate(crops)]))
            grid_w = stock.get_anyres_image_grid_shape(size, self.config.image_grid_pinpoints, crop_px)[1] if n > 1 else 1
            probes.append(_probe(n, side, grid_w))
        packed = self._stock_pack(features, image_sizes, strategy, self.image_newline, vision_aspect_ratio)
        packed_probes = self._stock_pack(probes, image_sizes.cpu(), strategy, NEWLINE_PROBE, vision_aspect_ratio)
        items = []
        for i, (rows, probe_out, labels, n) in enumerate(zip(packed, packed_probes, crop_labels, counts)):
            canvas = None
            if n > 1:
                grid_h, grid_w = stock.get_anyres_image_grid_shape(image_sizes[i], self.config.image_grid_pinpoints,
                                                                   crop_px)
                canvas = _canvas_labels(labels[1:], side, grid_h, grid_w)
            keys = position_keys(probe_out, _label_grid(labels[0], side), canvas, newline_start=n * side * side)
            group = groups_from_keys(keys).to(rows.device)
            segment = torch.where(probe_out[:, 0] < -0.5, -1, 0).to(rows.device)  # one segment, newlines apart
            items.append((snap_to_groups(rows, group, f"image {i}"), group, segment))
        return BaseModelOutputWithPooling(pooler_output=self._groups_or_post_merge(items))

    def _groups_or_post_merge(self, items) -> list[torch.Tensor]:
        """Per item (rows, group, segment) -> rows carrying their group map, after the post rounds if any."""
        settings = self._dymu
        if not settings.post:
            for rows, group, _ in items:
                rows.dymu_group_of_patch = group
            return [rows for rows, _, _ in items]
        out, settings.last_post_kept = post_merge(items, settings.post_thresholds, settings.calibrate_post)
        return out

    def get_video_features(self, pixel_values_videos, vision_feature_layer=None, vision_feature_select_strategy=None,
                           **kwargs) -> BaseModelOutputWithPooling:
        """OneVision video: per-frame DToMe, stock 2x2 bilinear pooling, one trailing newline."""
        batch, frames = pixel_values_videos.shape[:2]
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        per_frame = self._encode_crops(pixel_values_videos.flatten(0, 1), vision_feature_layer,
                                       vision_feature_select_strategy, [frames] * batch)
        pooled = self.apply_pooling(torch.stack(per_frame))  # (B·F, p², D), stock
        probe = _probe(1, side, 1).expand(batch * frames, -1, -1).clone()
        probe[..., 0] = 1.0  # a frame is a canvas of its own: bilinear taps inside it
        pooled_probe = self.apply_pooling(probe)  # (B·F, p², 3)
        per_frame_positions = pooled.shape[1]
        items = []
        for v in range(batch):
            keys = []
            for f in range(frames):
                k = v * frames + f
                labels = per_frame[k].dymu_group_of_patch.cpu() + f * side * side
                keys.append(position_keys(pooled_probe[k], None, _label_grid(labels, side), newline_start=0))
            newline = position_keys(NEWLINE_PROBE[None], None, None, newline_start=frames * side * side)
            group = groups_from_keys(torch.cat(keys + [newline])).to(pooled.device)
            rows = torch.cat([pooled[v * frames:(v + 1) * frames].flatten(0, 1), self.image_newline[None].to(pooled)])
            segment = torch.arange(len(rows), device=rows.device) // per_frame_positions  # the frame
            segment[-1] = -1  # the trailing newline
            items.append((snap_to_groups(rows, group, f"video {v}"), group, segment))
        out = self._groups_or_post_merge(items)
        features = torch.stack(out)  # (B, F·p² + 1, D), the stock layout
        features.dymu_group_of_patch = torch.stack([rows.dymu_group_of_patch for rows in out])
        self._dymu.last_videos = features
        return BaseModelOutputWithPooling(pooler_output=features)

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, input_ids=None, pixel_values=None, image_sizes=None, pixel_values_videos=None,
                mm_encoder_outputs=None, **kwargs):
        choice = {k: kwargs.pop(k, None) for k in ("vision_feature_layer", "vision_feature_select_strategy")}
        aspect, per_sample = kwargs.pop("vision_aspect_ratio", None), kwargs.pop("batch_num_images", None)
        kwargs.pop("image_sizes_videos", None)
        mm_encoder_outputs = dict(mm_encoder_outputs or {})
        if pixel_values is not None and pixel_values.size(0) > 0 and mm_encoder_outputs.get("image") is None:
            mm_encoder_outputs["image"] = self.get_image_features(pixel_values, image_sizes, vision_aspect_ratio=aspect,
                                                                  batch_num_images=per_sample, **choice)
        if pixel_values_videos is not None and mm_encoder_outputs.get("video") is None:
            mm_encoder_outputs["video"] = self.get_video_features(pixel_values_videos, **choice)
        if not mm_encoder_outputs:
            return super().forward(input_ids=input_ids, **kwargs)
        if input_ids is None:
            raise ValueError("DyMU with VTU needs input_ids to find the image placeholders (got inputs_embeds)")
        placeholders = []
        if (image := mm_encoder_outputs.get("image")) is not None:
            placeholders.append((self.config.image_token_id, _labels_of(image.pooler_output)))
        if (video := mm_encoder_outputs.get("video")) is not None:
            placeholders.append((self.config.video_token_id, self._video_labels(video.pooler_output)))
        group_map = labels_to_group_map(input_ids, placeholders)
        with vtu_groups(self.language_model, group_map):
            return super().forward(input_ids=input_ids, mm_encoder_outputs=mm_encoder_outputs, **kwargs)


    def _video_labels(self, features: torch.Tensor) -> list[torch.Tensor]:
        """Per video (B, L, D): its (L,) group labels. generate() re-stacks video features for beam
        search / num_return_sequences (a new tensor, without the map): each row is then found among
        the videos of the last encode, which it equals bit for bit."""
        groups = getattr(features, "dymu_group_of_patch", None)
        if groups is not None:
            return list(groups)
        known = self._dymu.last_videos
        labels = []
        for video in features:
            match = None if known is None else next(
                (g for f, g in zip(known, known.dymu_group_of_patch) if f.shape == video.shape and torch.equal(f, video)),
                None)
            if match is None:
                raise ValueError("DyMU video features carry no group map and match no video of the last encode: "
                                 "pass videos as pixel_values_videos or through dymu.generate")
            labels.append(match)
        return labels


def _labels_of(features) -> list[torch.Tensor]:
    """Per image: the group label of every placeholder position."""
    labels = []
    for f in features:
        group = getattr(f, "dymu_group_of_patch", None)
        labels.append(torch.arange(len(f), device=f.device) if group is None else group)
    return labels


class DyMULlavaNextModel(_DyMUAnyResModel, LlavaNextModel):
    pass


class DyMULlavaOnevisionModel(_DyMUAnyResModel, LlavaOnevisionModel):
    pass


_PATCHED = {LlavaNextModel: DyMULlavaNextModel, LlavaOnevisionModel: DyMULlavaOnevisionModel}


# ---------------------------------------------------------------------------------------------
# apply / remove (the wiring registered in api.py).


def apply_vlm(model: nn.Module, thresholds=None, r=None, mode: str = "dymu", vtu_attention: str = "fast",
              kv_cache: str = "compact", tome_vtu: bool = True, downsample_tokens: float | None = None,
              order: str | None = None, budget=None, merge_point: str = "vit",
              post_thresholds: list[float] | None = None) -> None:
    """Patch a LLaVA-NeXT / OneVision in place; ``thresholds``: the tower's (None with merge_point
    "post": the stock tower), ``post_thresholds``: one per post round (merge_point "post" / "both")."""
    # All or nothing (as for LLaVA-1.5): every argument is checked before the model changes.
    name = type(model).__name__
    if mode in REFUSED_MODES:
        raise ValueError(f"mode {mode!r} is not available for {name}: it {REFUSED_MODES[mode]}; "
                         f"use one of {', '.join(MODES)}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    check_kv_cache(kv_cache)
    if mode == "tome" and not tome_vtu:
        raise ValueError(f"mode 'tome' without VTU is not available for {name}: {REFUSED_MODES['dtome']}")
    inner = model.model
    tower = inner.vision_tower
    family = family_of(tower)
    if family is None:
        raise ValueError(f"the vision tower of this {name} is a {type(tower).__name__}, which DyMU does not support")
    if mode == "tome" and r is None:
        raise ValueError("mode 'tome' needs r (merges per layer)")
    if mode == "dymu" and thresholds is None and merge_point != "post":
        raise ValueError(f"mode {mode!r} needs thresholds")
    feature_layer = model.config.vision_feature_layer
    feature_layer = feature_layer if isinstance(feature_layer, int) else -1
    merge_in_tower = mode == "tome" or (mode == "dymu" and merge_point != "post")
    if merge_point == "post" and budget is not None:
        raise ValueError("a token budget (max_tokens / min_tokens) applies in the tower: merge_point 'post' runs "
                         "the stock tower")
    if mode != "full":  # a token budget applies per crop, at the feature layer
        if merge_in_tower:
            dtome_settings(tower, family, thresholds=None if mode == "tome" else thresholds,
                           r=r if mode == "tome" else None, order=order, budget=budget, feature_layer=feature_layer)
        check_vtu(inner.language_model, vtu_attention, kv_cache)

    remove_llava(model)
    if mode == "full":
        return
    if mode == "tome":
        apply_dtome(tower, family, r=r, order=order, budget=budget, feature_layer=feature_layer)
    elif merge_in_tower:
        apply_dtome(tower, family, thresholds=thresholds, order=order, budget=budget, feature_layer=feature_layer)
    apply_vtu(inner.language_model, vtu_attention=vtu_attention, kv_cache=kv_cache)
    swap_class(inner, _PATCHED[type(inner)], AnyResSettings(mode=mode, merge_point=merge_point,
                                                              post_thresholds=post_thresholds))


# ---------------------------------------------------------------------------------------------
# The family adapters: LLaVA-NeXT and LLaVA-OneVision (which also takes video).


class AnyResFamily(TowerVLMFamily):
    merge_points, post_rounds, calibration_unit, crops_images = MERGE_POINTS, POST_ROUNDS, "AnyRes crops", True

    def __init__(self, name: str, title: str, model_class: type, model_types: tuple[str, ...], video: str | None):
        self.name, self.title, self.model_types, self._class = name, title, model_types, model_class
        self.modes = {"full": None, "dymu": None, "tome": None, **{m: f"it {why}" for m, why in REFUSED_MODES.items()}}
        self.options = {"r": None, "order": None, "merge_point": None, "budget": None, "focus": None, "raw_prompt": None,
                        "tome_vtu": f"it {REFUSED_MODES['dtome']}",
                        "cross_frame": "pools every video frame on its own before the LLM, so frames merge within "
                                       "themselves (merge_point 'post' segments are frames)",
                        "video": video}

    def model_classes(self):
        return (self._class,)

    def apply(self, model, settings):
        self.check(model, settings)
        thresholds = settings.thresholds
        if hasattr(thresholds, "check_compatible"):
            thresholds.check_compatible(self.vision_tower(model))
        order, budget = settings.file_default("order"), self.budget(settings)
        tower, post, merge_point = resolve_merge_point(thresholds, settings.merge_point, settings.mode)
        tower = self.tower_thresholds(model, settings.replace(thresholds=tower))
        apply_vlm(model, tower, r=settings.r, mode=settings.mode, vtu_attention=settings.vtu_attention,
                  kv_cache=settings.kv_cache, tome_vtu=settings.tome_vtu, order=order, budget=budget,
                  merge_point=merge_point, post_thresholds=post)

    def remove(self, model):
        remove_llava(model)  # the same undo: stock inner class, no VTU layers, no DToMe

    def load_processor(self, model_ref, config):
        if self.supports("video"):
            return load_onevision_processor(model_ref)
        return super().load_processor(model_ref, config)

    def check_videos(self, model, frames):
        counts = {len(f): (i, k) for i, vs in enumerate(frames) for k, f in enumerate(vs)}
        if len(counts) > 1:
            seen = ", ".join(f"{n} (prompt {i}, video {k})" for n, (i, k) in sorted(counts.items()))
            raise ValueError(f"{self.title} stacks every video of one call into one tensor, so they need one frame "
                             f"count, not {seen}: call generate once per frame count")

    def prepare(self, model, processor, request):
        _, images = focused_images(processor.image_processor, request.images, request.focus, request.fill)
        tower = self.vision_tower(model)
        budget = call_budget(tower, request.max_tokens, request.min_tokens)
        device = next(model.parameters()).device
        with budget_set(tower, budget) if hasattr(tower, "_dymu_state") else contextlib.nullcontext():
            return anyres_inputs(model, processor, request, images, device, self.supports("video"))

    def encoder_pixels(self, model, processed):
        return encoder_pixels(model, processed)

    def encode_counted(self, model, processed, pixels):
        return anyres_measure.encode_counted(model, processed)

    def post_round_rows(self, model, processed, chooser, device):
        return anyres_measure.post_round_rows(model, processed, chooser, device)

    def analyze_crops(self, model, image_processor):
        return anyres_measure.analyze_crops(model, image_processor)

    def video_pixels(self, model, image_processor, frames) -> torch.Tensor:
        """(F, 3, S, S) pixels of a list of PIL frames as the family's video processor makes them."""
        self.refuse_unsupported("video", model)
        return frames_to_pixels(frames, model.config.vision_config.image_size)  # OneVision's

    def encode_packed(self, model, image_processor, item):
        return anyres_measure.encode_packed(model, image_processor, item,
                                            lambda frames: self.video_pixels(model, image_processor, frames))


register_vlm_family(AnyResFamily("llava_next", "LLaVA-NeXT", LlavaNextForConditionalGeneration, ("llava_next",),
                                 video="takes no video (LLaVA-NeXT-Video, LLaVA-OneVision and the Qwen VLs do)"))
register_vlm_family(AnyResFamily("llava_onevision", "LLaVA-OneVision", LlavaOnevisionForConditionalGeneration,
                                 ("llava_onevision",), video=None))
