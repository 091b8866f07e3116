"""Images as the model sees them, for `dymu analyze`'s pictures: the processor's normalisation undone, a
focus region run through the processor, and the merge map (every token's patches filled with their mean
colour)."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from ...families import vlm_family_of
from ...families.base import first_view


def merge_map(
    image: Image.Image,
    group_of_patch,
    grid: tuple[int, int],
    *,
    cell: int | None = None,
    border: tuple[int, int, int] = (0, 0, 0),
) -> Image.Image:
    """The merge map of one image: every token's patches filled with their mean colour.

    ``image``: the image as the model sees it (any size: it is resized to the patch grid).
    ``group_of_patch``: (rows·cols,) token index of every original patch, row-major (as returned
    by `dymu.encode` with the class token dropped). ``grid``: (rows, cols) of the patch grid.
    Each patch becomes a ``cell``×``cell`` square (default: the image's own patch size, at least
    8 px); a one-pixel ``border`` line separates neighbouring patches of different tokens.
    """
    rows, cols = grid
    groups = np.asarray(torch.as_tensor(group_of_patch).cpu(), dtype=np.int64).reshape(-1)
    if groups.size != rows * cols:
        raise ValueError(
            f"group_of_patch has {groups.size} entries but the grid {rows}x{cols} has {rows * cols} patches"
        )
    if cell is None:
        cell = max(8, math.ceil(max(image.width / cols, image.height / rows)))
    size = (cols * cell, rows * cell)
    rgb = image.convert("RGB")
    if rgb.size != size:
        rgb = rgb.resize(size, Image.BICUBIC)
    pixels = np.asarray(rgb, dtype=np.float64).reshape(-1, 3)
    _, token = np.unique(groups, return_inverse=True)  # 0..k-1 per patch
    labels = np.repeat(np.repeat(token.reshape(rows, cols), cell, axis=0), cell, axis=1)  # (H, W)
    flat = labels.reshape(-1)
    counts = np.bincount(flat)
    means = np.stack([np.bincount(flat, weights=pixels[:, c]) for c in range(3)], axis=1) / counts[:, None]
    out = np.rint(means[labels]).clip(0, 255).astype(np.uint8)  # (H, W, 3)
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, :-1] |= labels[:, 1:] != labels[:, :-1]
    edge[:-1, :] |= labels[1:, :] != labels[:-1, :]
    out[edge] = border
    return Image.fromarray(out)


def model_view(pixel_values: torch.Tensor, processor=None) -> Image.Image:
    """Undo the processor's normalisation: (3, H, W) pixel values -> the RGB image the model sees."""
    x = pixel_values.detach().cpu().float().numpy()
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"expected (3, H, W) pixel values, not {tuple(x.shape)}")
    if getattr(processor, "do_normalize", True):
        mean = getattr(processor, "image_mean", None) or (0.5, 0.5, 0.5)
        std = getattr(processor, "image_std", None) or (0.5, 0.5, 0.5)
        x = x * np.asarray(std, dtype=np.float32).reshape(3, 1, 1) + np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    if getattr(processor, "do_rescale", True):
        x = x * 255.0  # the processor divided by 255 (rescale_factor); values now 0..255
    array = np.rint(x).clip(0, 255).astype(np.uint8).transpose(1, 2, 0)
    return Image.fromarray(array)


def processed_pixels(model, processor, image: Image.Image) -> torch.Tensor:
    """(3, H, W) pixel values of one image as ``processor`` prepares it for ``model``: its family's
    `analyze_view` (default: the processor's first view), or the only view of a bare vision tower."""
    family = vlm_family_of(model)
    return first_view(processor, image) if family is None else family.analyze_view(model, processor, image)


def region_view(mask, processor, size: tuple[int, int]) -> np.ndarray:
    """The focus region as the model sees it: (H', W') bool, the mask run through the processor's
    resize and crop (as a white-on-black image), so it lines up with `model_view` exactly."""
    picture = Image.fromarray(np.where(np.asarray(mask, dtype=bool), 255, 0).astype(np.uint8)).convert("RGB")
    if picture.size != size:
        raise ValueError(f"focus mask is {picture.width}x{picture.height} but the image is {size[0]}x{size[1]}")
    pixels = processor(images=[picture], return_tensors="pt")["pixel_values"][0]
    return np.asarray(model_view(pixels, processor).convert("L")) > 127
