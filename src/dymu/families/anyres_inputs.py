"""LLaVA-NeXT / OneVision (AnyRes) inputs and counts: the crops the tower sees, the prompt inputs of a
`dymu.generate` call with the encoder run once, and the three counts a report shows per image / video
(encoder tokens, LLM rows, stock positions)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llava_next import modeling_llava_next as stock_next
from transformers.models.llava_onevision import modeling_llava_onevision as stock_ov
from transformers.models.llava_onevision.modeling_llava_onevision import (
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionModel,
)

from .base import PreparedInputs, timed
from .prompting import prompt_texts


def crops_per_image(inner: nn.Module, image_sizes, batch_num_images=None) -> list[int]:
    """Crops the tower sees per image, as the stock model counts them (OneVision: the images of a
    multi-image prompt get their base crop only)."""
    stock = stock_ov if isinstance(inner, LlavaOnevisionModel) else stock_next
    crop_px = inner.config.vision_config.image_size
    patched = [True] * len(image_sizes) if batch_num_images is None else \
        [int(n) == 1 for n in batch_num_images for _ in range(int(n))]
    return [stock.image_size_to_num_patches(size, inner.config.image_grid_pinpoints, crop_px) if p else 1
            for size, p in zip(image_sizes, patched)]


def unique_rows_per_item(features) -> list[int]:
    """Distinct VTU rows per image / video (groups), as the LLM runs them."""
    if isinstance(features, torch.Tensor):
        maps = getattr(features, "dymu_group_of_patch", None)
        return [int(g.unique().numel()) for g in maps] if maps is not None else [features.shape[1]] * len(features)
    return [int(f.dymu_group_of_patch.unique().numel()) if hasattr(f, "dymu_group_of_patch") else len(f)
            for f in features]


def encoder_tokens_per_item(inner: nn.Module, counts: list[int]) -> list[int]:
    """Tokens the vision tower kept per image / video in the last encode, summed over its ``counts``
    crops / frames (the stock tower: every token of every crop)."""
    encoded = getattr(getattr(inner, "_dymu", None), "last_encoded", None)
    if encoded is None:
        return stock_tokens_per_item(inner, counts)
    per_crop = encoded.num_tokens.tolist()
    out, start = [], 0
    for n in counts:
        out.append(sum(per_crop[start:start + n]))
        start += n
    return out


@torch.no_grad()
def anyres_inputs(model, processor, request, images, device, per_prompt_images: bool) -> PreparedInputs:
    """The stock processor's inputs, then the encoder run on its own (timed). Items in reading order:
    every prompt's images, then its videos. ``per_prompt_images``: the processor takes images per
    prompt (OneVision's multi-image rule), else one flat list."""
    videos = request.videos
    texts = prompt_texts(processor, request.prompts, images, request.chat_template, videos)
    kwargs = {}
    if any(images):
        kwargs["images"] = [list(i) for i in images] if per_prompt_images else [im for ims in images for im in ims]
    if any(videos):
        kwargs["videos"] = [v for vs in videos for v in vs]
    processor.tokenizer.padding_side = "left"
    inputs = processor(text=texts, return_tensors="pt", padding=True, **kwargs)
    inner, dtype = model.model, model.dtype
    mm, counts, full = {}, {"llm_rows": {}, "stock_positions": {}, "encoder_tokens": {}}, {}

    def encode():
        if "pixel_values" in inputs:
            extra = {"batch_num_images": inputs["batch_num_images"]} if "batch_num_images" in inputs else {}
            mm["image"] = inner.get_image_features(inputs["pixel_values"].to(device, dtype),
                                                   inputs["image_sizes"].to(device), **extra)
            crops = crops_per_image(inner, inputs["image_sizes"], inputs.get("batch_num_images"))
            counts["encoder_tokens"]["image"] = encoder_tokens_per_item(inner, crops)  # before a video encode
            full["image"] = stock_tokens_per_item(inner, crops)
        if "pixel_values_videos" in inputs:
            mm["video"] = inner.get_video_features(inputs["pixel_values_videos"].to(device, dtype))
            videos_in, frames = inputs["pixel_values_videos"].shape[:2]
            counts["encoder_tokens"]["video"] = encoder_tokens_per_item(inner, [frames] * videos_in)
            full["video"] = stock_tokens_per_item(inner, [frames] * videos_in)

    _, encoder_s = timed(device, encode)
    for kind, out in mm.items():
        counts["llm_rows"][kind] = unique_rows_per_item(out.pooler_output)
        counts["stock_positions"][kind] = [len(f) for f in out.pooler_output]
    counts["full_tokens"] = full
    nested = {name: [] for name in counts}
    cursor = {"image": 0, "video": 0}
    for ims, vs in zip(images, videos):
        row = {name: [] for name in counts}
        for kind, n in (("image", len(ims)), ("video", len(vs))):
            for name, by_kind in counts.items():
                row[name] += by_kind.get(kind, [])[cursor[kind]:cursor[kind] + n]
            cursor[kind] += n
        for name in counts:
            nested[name].append(row[name])
    return PreparedInputs({"input_ids": inputs["input_ids"].to(device),
                           "attention_mask": inputs["attention_mask"].to(device), "mm_encoder_outputs": mm or None},
                          encoder_s=encoder_s, **nested)


def encoder_pixels(model: nn.Module, processed) -> tuple[torch.Tensor, list[int]]:
    """The crops the tower sees at inference for one image-processor output (each image on its own,
    all AnyRes crops): (C, 3, S, S) every image's valid crops in order, and the crops per image (the
    processor pads ``pixel_values`` to the largest crop count)."""
    stock = stock_ov if isinstance(model, LlavaOnevisionForConditionalGeneration) else stock_next
    pixel_values, sizes = processed["pixel_values"], processed["image_sizes"]
    crop_px = model.config.vision_config.image_size
    counts = [stock.image_size_to_num_patches(s, model.config.image_grid_pinpoints, crop_px) for s in sizes]
    return torch.cat([pv[:n] for pv, n in zip(pixel_values, counts)]), counts


def stock_tokens_per_item(inner: nn.Module, counts: list[int]) -> list[int]:
    """Tokens the stock tower makes per image / video of ``counts`` crops / frames."""
    side = inner.config.vision_config.image_size // inner.config.vision_config.patch_size
    return [n * side * side for n in counts]
