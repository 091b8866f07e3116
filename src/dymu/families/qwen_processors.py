"""Qwen VL prompts with images and videos without torchvision: the stock video processor needs it,
so `video_pixels` does its job and `qwen_inputs` expands the video placeholders the stock way."""

from __future__ import annotations

import copy

import torch

from .base import stock_processor


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

    stocks = {"qwen2_vl": Qwen2VLProcessor, "qwen2_5_vl": Qwen2_5_VLProcessor, "qwen3_vl": Qwen3VLProcessor,
              "qwen3_5": Qwen3VLProcessor}  # Qwen3.5 uses Qwen3-VL's processor
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
    processor = stock_processor(model_ref)
    return processor if processor is not None else processor_class(model_type).from_pretrained(model_ref)


def unpatchify(rows: torch.Tensor, grid_thw, patch_size: int, merge_size: int = 2) -> torch.Tensor:
    """A Qwen VL image processor's flat patches of one image -> its (3, H, W) pixel values (first frame).

    The processor lays out (t, h/m, w/m, m, m) rows of (C, T, p, p) values (m = merge_size, T =
    temporal copies); undoing that layout gives back exactly the pixels the model sees, after the
    processor's own smart_resize, whatever its backend or resampling (H = h·p, W = w·p).
    """
    t, h, w = (int(v) for v in grid_thw)
    m, p = merge_size, patch_size
    x = rows.reshape(t, h // m, w // m, m, m, 3, -1, p, p)[0, :, :, :, :, :, 0]  # (h/m, w/m, m, m, 3, p, p)
    return x.permute(4, 0, 2, 5, 1, 3, 6).reshape(3, h * p, w * p)
