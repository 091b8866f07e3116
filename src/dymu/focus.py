"""Focus regions (paper §4.3, Fig. 6): flatten what the task does not need, before the processor.

Outside the focus region every pixel is replaced by one flat colour (the image's mean colour, or
one the user gives). Flat patches are near-duplicates, so DToMe merges them into very few tokens,
while the image keeps its size, layout and patch positions: the processor, the placeholder count
and the positions the LLM sees stay stock. The region comes from anything: boxes in pixel
coordinates (a detector, an OCR engine, a hand-drawn box) or a mask (a segmentation model, a
background remover) as a black-and-white image or a boolean array, True/white = keep.

torch-free (PIL + numpy), so the CLI can parse ``--focus`` without loading a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import numpy as np
from PIL import Image, ImageColor

# The default fill. Not the image mean: a colour near the processor's normalisation mean (CLIP's
# is a mid grey) becomes pixel values near 0, so every flat patch embeds to ~0 and the patches differ
# only by their position embeddings, and they merge badly (demo model, a quarter box on
# darknet_dog_bicycle_truck.jpg: 207 -> 172 tokens with the mean, 93 with white). White or black
# patches embed far from 0 and merge like a blank image does. README, "Cost control".
DEFAULT_FILL = "white"

Box = Sequence[float]  # (x0, y0, x1, y1) in pixels of the original image, x1/y1 exclusive
Focus = Union[Box, Sequence[Box], Image.Image, np.ndarray, str, Path, None]


def parse_box(text: str, where: str = "--focus") -> tuple[float, float, float, float]:
    """``"x0,y0,x1,y1"`` -> a box; one clear error otherwise."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        box = tuple(float(p) for p in parts)
    except ValueError:
        box = ()
    if len(box) != 4:
        raise ValueError(f"{where} expects x0,y0,x1,y1 in pixels (four numbers), not {text!r}")
    return box  # type: ignore[return-value]


def parse_fill(fill) -> str | tuple[int, int, int]:
    """``"mean"``, an (r, g, b) triple of 0..255 or a colour PIL knows ("#808080", "gray")."""
    if fill is None or (isinstance(fill, str) and fill.strip().lower() == "mean"):
        return "mean"
    if isinstance(fill, str):
        try:
            return tuple(ImageColor.getrgb(fill.strip()))[:3]  # type: ignore[return-value]
        except ValueError:
            raise ValueError(f"focus fill {fill!r} is not 'mean', r,g,b or a colour name/#rrggbb") from None
    rgb = tuple(int(c) for c in fill)
    if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
        raise ValueError(f"focus fill {fill!r} must be three values in 0..255 (r, g, b)")
    return rgb  # type: ignore[return-value]


def _is_box(value) -> bool:
    return (isinstance(value, (tuple, list)) and len(value) == 4
            and all(isinstance(v, (int, float, np.integer, np.floating)) for v in value))


def focus_mask(size: tuple[int, int], focus: Focus) -> np.ndarray:
    """(H, W) bool array, True inside the focus region of an image of ``size`` = (W, H).

    ``focus``: a box (x0, y0, x1, y1), a list of boxes (their union), a mask image or its path
    (white = inside: grey level > 127), or a (H, W) boolean (or 0/1) array. Boxes are clipped to the image.
    """
    width, height = size
    if isinstance(focus, (str, Path)):
        from .images import open_image

        focus = open_image(focus).convert("L")
    if isinstance(focus, Image.Image):
        focus = np.asarray(focus.convert("L")) > 127  # white = inside (robust to JPEG noise)
    if hasattr(focus, "detach"):  # a torch tensor, without importing torch here
        focus = focus.detach().cpu().numpy()
    if isinstance(focus, np.ndarray):
        if focus.ndim == 3 and focus.shape[-1] in (1, 3, 4):
            focus = focus.any(axis=-1)
        if focus.shape != (height, width):
            raise ValueError(f"focus mask is {focus.shape[1] if focus.ndim > 1 else '?'}x{focus.shape[0]} but the "
                             f"image is {width}x{height} pixels; resize the mask to the image first")
        return focus.astype(bool)
    boxes = [focus] if _is_box(focus) else list(focus) if focus is not None else []
    if not boxes or not all(_is_box(b) for b in boxes):
        raise ValueError(f"focus must be a box (x0, y0, x1, y1), a list of boxes, a mask image or a boolean "
                         f"array, not {focus!r}")
    mask = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        if not (x1 > x0 and y1 > y0):
            raise ValueError(f"focus box {(x0, y0, x1, y1)} is empty: it needs x0 < x1 and y0 < y1")
        if all(0 <= v <= 1 for v in (x0, y0, x1, y1)) and min(width, height) > 1:
            raise ValueError(f"focus box {(x0, y0, x1, y1)} is under one pixel: boxes are in pixels of the "
                             f"{width}x{height} image, not fractions (e.g. {x0 * width:g},{y0 * height:g},"
                             f"{x1 * width:g},{y1 * height:g})")
        c0, c1 = max(0, int(round(x0))), min(width, int(round(x1)))
        r0, r1 = max(0, int(round(y0))), min(height, int(round(y1)))
        if c0 >= c1 or r0 >= r1:
            raise ValueError(f"focus box {(x0, y0, x1, y1)} lies outside the {width}x{height} image")
        mask[r0:r1, c0:c1] = True
    return mask


def apply_focus(image: Image.Image, focus: Focus, fill=DEFAULT_FILL) -> Image.Image:
    """A copy of ``image`` (RGB) with every pixel outside ``focus`` set to ``fill``.

    ``fill``: a colour (see `parse_fill`; default white) or "mean" (the image's mean colour). ``focus``
    None returns the image unchanged. Pixels inside the region are copied bit for bit.
    """
    if focus is None:
        return image
    return _fill_outside(image, focus_mask(image.size, focus), fill)


def _fill_outside(image: Image.Image, inside: np.ndarray, fill) -> Image.Image:
    rgb = np.array(image.convert("RGB"))  # (H, W, 3) uint8, a copy
    fill = parse_fill(fill)
    colour = np.rint(rgb.reshape(-1, 3).mean(axis=0)) if fill == "mean" else np.asarray(fill)
    rgb[~inside] = colour.astype(np.uint8)
    return Image.fromarray(rgb)


def check_focus_survives(image_processor, images: Sequence[Image.Image], filled: Sequence[Image.Image], focus,
                         fill=DEFAULT_FILL) -> None:
    """Refuse (one line) a focus region that the processor cuts away: LLaVA-1.5's processor keeps a
    centre crop, so a box in a wide image's margin would leave the model a flat image of the fill
    colour. Checked by processing each filled image (``filled``, from `apply_focus_all`) and an image of
    the fill alone: equal pixels mean nothing of the region reached the model."""
    if focus is None:
        return
    for k, (image, focused, region) in enumerate(zip(images, filled, focus)):
        if region is None:
            continue
        blank = _fill_outside(image, np.zeros((image.height, image.width), dtype=bool), fill)
        pixels = [image_processor(images=[im], return_tensors="np")["pixel_values"] for im in (focused, blank)]
        if np.array_equal(*pixels):
            raise ValueError(f"focus region of image {k} ({_describe(region)}) lies outside the part of the "
                             f"{image.width}x{image.height} image that the processor keeps (e.g. LLaVA-1.5's centre "
                             "crop): the model would see only the fill colour")


def _describe(region) -> str:
    if _is_box(region):
        return "box " + ",".join(f"{v:g}" for v in region)
    return "mask" if not isinstance(region, (list, tuple)) else f"{len(region)} boxes"


def apply_focus_all(images: Sequence[Image.Image], focus, fill=DEFAULT_FILL) -> list[Image.Image]:
    """`apply_focus` per image; ``focus`` is None or one entry (possibly None) per image."""
    if focus is None:
        return list(images)
    focus = list(focus)
    if len(focus) != len(images):
        raise ValueError(f"focus has {len(focus)} entries but there are {len(images)} images; give one per image "
                         "(None where an image has no focus region)")
    return [apply_focus(im, f, fill) for im, f in zip(images, focus)]
