"""What dymu's tools measure on a LLaVA-NeXT / OneVision (AnyRes) model through the model's own image and
video paths (the `AnyResFamily` hooks, see families/base.py): `dymu encode`'s counts, calibration's LLM
rows after every post round, `dymu analyze`'s rows and base-crop merge maps, and the group map the LLM
sees for one image or video (the bench)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..towers.encoder import budget_set
from .anyres_inputs import crops_per_image, encoder_tokens_per_item, unique_rows_per_item


@torch.no_grad()
def encode_counted(model: nn.Module, processed) -> tuple:
    """The model's own image path, once: every crop through the tower (kept as last_encoded, in the order of
    `encoder_pixels`), then the packing (and post rounds) the LLM sees. (that `EncodedImages`, (LLM rows,
    stock positions) per image)."""
    device, dtype = next(model.parameters()).device, model.dtype
    features = model.model.get_image_features(processed["pixel_values"].to(device, dtype),
                                              processed["image_sizes"].to(device)).pooler_output
    return model.model._dymu.last_encoded, (unique_rows_per_item(features), [len(f) for f in features])


@torch.no_grad()
def post_round_rows(model: nn.Module, processed, chooser, device) -> torch.Tensor:
    """(images, rounds) LLM rows of every image after every post round, the rounds' edges chosen by
    ``chooser(units entering the rounds)`` (calibration, batch-level Eq. 4)."""
    inner = model.model
    inner._dymu.calibrate_post = chooser
    try:
        features = inner.get_image_features(processed["pixel_values"].to(device, model.dtype),
                                            processed["image_sizes"].to(device)).pooler_output
    finally:
        inner._dymu.calibrate_post = None
    # an image's rows: its units kept, plus its newlines (never merged)
    kept = inner._dymu.last_post_kept.cpu()
    newlines = torch.tensor([int(f.dymu_group_of_patch.unique().numel()) for f in features]) - kept[:, -1]
    return kept + newlines[:, None]


def analyze_crops(model: nn.Module, image_processor):
    """`dymu analyze`'s (prepare, check, encode) for the patched ``model`` (see `VLMFamily.analyze_crops`).

    Every image goes through what the model runs at inference, as `dymu generate` and `dymu encode` do: all
    its crops through the tower (DToMe with merge points "vit" / "both"), the stock packing (unpad,
    OneVision's anyres_max downsampling, newlines) and, with "post" / "both", the merge rounds on the
    packed tokens. As for the Qwen VLs, ``tokens`` is what the LLM runs (= llm_rows) and ``full_tokens``
    the image's own stock count (= stock_positions: it follows the image's size and shape). The merge map
    is drawn on the base crop (the whole image at the crop size, the first positions of the packed layout)
    with the groups the LLM sees there."""
    inner = model.model
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype

    def prepare(image, path):  # extra: the image's (1, 2) image_sizes
        out = image_processor(images=[image], return_tensors="pt")
        return out["pixel_values"], out["image_sizes"]

    def check(pixels):
        if pixels.ndim != 5:
            raise ValueError(f"the image processor makes pixel values of shape {tuple(pixels.shape)}; analyze of an "
                             "AnyRes model needs its AnyRes image processor (batch, crops, 3, H, W)")

    def encode(pending, budget: bool = True):
        sizes = torch.cat([s for _, _, s in pending])
        counts = crops_per_image(inner, sizes)
        crops = torch.cat([p[0, :n] for (_, p, _), n in zip(pending, counts)])
        with torch.no_grad(), contextlib.nullcontext() if budget else budget_set(inner.vision_tower, None):
            features = inner.get_image_features(crops.to(device, dtype), sizes.to(device)).pooler_output
        encoder, rows = encoder_tokens_per_item(inner, counts), unique_rows_per_item(features)
        out, first = [], 0
        for k, f in enumerate(features):
            fields = dict(tokens=int(rows[k]), full_tokens=len(f), encoder_tokens=int(encoder[k]),
                          llm_rows=int(rows[k]), stock_positions=len(f))
            base = getattr(f, "dymu_group_of_patch", torch.arange(len(f)))[:side * side]
            out.append((fields, crops[first].cpu(), base.cpu(), (side, side)))
            first += counts[k]
        return out

    return prepare, check, encode


@torch.no_grad()
def encode_packed(model: nn.Module, image_processor, item, video_pixels) -> tuple[torch.Tensor, object]:
    """One PIL image, or one video (a list of PIL frames, made pixels by ``video_pixels(frames)``), through
    the patched model's own image / video path: (the group of every position the LLM sees, the tower's
    `EncodedImages` of its crops / frames)."""
    inner = model.model
    if getattr(inner, "_dymu", None) is None:
        raise ValueError(f"the packed group map of a {type(model).__name__} needs it patched by dymu.apply")
    device, dtype = next(model.parameters()).device, model.dtype
    if isinstance(item, (list, tuple)):
        pixels = video_pixels(list(item))[None].to(device, dtype)  # (1, F, 3, S, S)
        group = inner.get_video_features(pixels).pooler_output.dymu_group_of_patch[0]
    else:
        processed = image_processor(images=[item], return_tensors="pt")
        features = inner.get_image_features(processed["pixel_values"].to(device, dtype),
                                            processed["image_sizes"].to(device)).pooler_output
        group = features[0].dymu_group_of_patch
    return group, inner._dymu.last_encoded
