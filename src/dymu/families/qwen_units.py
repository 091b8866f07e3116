"""What calibration and `dymu analyze` run on a Qwen VL's unit-merging tower (the `QwenVLFamily` hooks
`unit_calibration`, `unit_calibration_batch`, `analyze_units` and `analyze_view`, see families/base.py)."""

from __future__ import annotations

import torch

from ..towers.qwen_vit import encode_qwen, qwen_identity
from .qwen_processors import unpatchify


def unit_calibration(visual, merge_point: str, rounds: int | None, model_ref: str | None) -> tuple[int, dict]:
    """(merge steps: the ViT blocks for "vit", the rounds for "post"; the identity a thresholds file records)."""
    steps = len(visual.blocks) if merge_point == "vit" else int(rounds)
    return steps, qwen_identity(visual, merge_point, steps, model_ref)


def unit_calibration_batch(visual, image_processor, images: list, merge_point: str, steps: int, chooser) -> torch.Tensor:
    """(images, steps) units alive after every step, with ``chooser(units of the batch)`` choosing the edges."""
    device = next(visual.parameters()).device
    inputs = image_processor(images=images, return_tensors="pt")
    grid = inputs["image_grid_thw"]
    units = int(grid.prod(-1).sum()) // visual.spatial_merge_size**2
    encoded = encode_qwen(visual, inputs["pixel_values"].to(device), grid.to(device), [float("inf")] * steps,
                          merge_point, edge_chooser=chooser(units))
    return encoded.kept_per_step


def analyze_units(visual, image_processor, values: list[float], merge_point: str):
    """`dymu analyze`'s (prepare, encode) for a Qwen VL: images at native resolution packed into one call of
    the tower; merge maps on the unit grid (h/2, w/2) over the processor's pixels un-patchified."""
    merge = visual.spatial_merge_size
    device = next(visual.parameters()).device

    def prepare(image, path):  # extra: the image's (1, 3) image_grid_thw
        out = image_processor(images=[image], return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]

    def encode(pending):
        grid = torch.cat([g for _, _, g in pending])
        pixels = torch.cat([p for _, p, _ in pending])
        encoded = encode_qwen(visual, pixels.to(device), grid.to(device), values, merge_point)
        out = []
        for (_, rows, thw), (kept, units), group in zip(pending, encoded.per_item(),
                                                         encoded.groups_per_item()):
            # "post": the ViT keeps every unit; the LLM runs the merged ones (as dymu encode --json says)
            fields = dict(tokens=int(kept), full_tokens=int(units), llm_rows=int(kept), stock_positions=int(units),
                          encoder_tokens=int(kept) if merge_point == "vit" else int(units))
            _, h, w = thw[0].tolist()
            out.append((fields, unpatchify(rows, thw[0], image_processor.patch_size, merge), group,
                         (h // merge, w // merge)))
        return out
    return prepare, encode


def analyze_view(image_processor, image) -> torch.Tensor:
    """One PIL image's (3, H, W) pixels as the model sees them: the processor's patches un-patchified (exactly
    the pixels after its own smart_resize)."""
    out = image_processor(images=[image], return_tensors="pt")
    return unpatchify(out["pixel_values"], out["image_grid_thw"][0], image_processor.patch_size,
                      image_processor.merge_size)
