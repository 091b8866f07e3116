"""The public entry points: `apply`, `remove`, `encode`."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from . import towers as _towers  # noqa: F401  (registers the CLIP and SigLIP families)
from .towers.encoder import (
    FAMILIES,
    EncodedImages,
    TowerFamily,
    apply_dtome,
    encode_with_tower,
    find_towers,
    make_budget,
    remove_dtome,
)


def vision_tower_of(model: nn.Module) -> tuple[nn.Module, TowerFamily]:
    towers = find_towers(model)
    if not towers:
        names = ", ".join(f.tower_class.__name__ for f in FAMILIES)
        raise ValueError(f"{type(model).__name__} has no supported vision tower (supported: {names}).")
    if len(towers) > 1:
        raise ValueError(f"{type(model).__name__} has {len(towers)} vision towers; pass the one to use.")
    return towers[0]


def _threshold_values(thresholds, tower: nn.Module):
    """Accept a Thresholds object (validated against the tower), a list, a tensor or one number."""
    if hasattr(thresholds, "check_compatible"):
        thresholds.check_compatible(tower)
        return thresholds.thresholds
    return thresholds


def _merge_order(thresholds, order: str | None) -> str | None:
    """``order`` if given, else the order a `Thresholds` file was calibrated in (None: the default)."""
    return order if order is not None else getattr(thresholds, "order", None)


def _budget(thresholds, max_tokens, min_tokens):
    """The token budget: the arguments where given, else the `Thresholds` file's defaults."""
    if max_tokens is None:
        max_tokens = getattr(thresholds, "max_tokens", None)
    if min_tokens is None:
        min_tokens = getattr(thresholds, "min_tokens", None)
    return make_budget(max_tokens, min_tokens)


def _is_vlm(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return hasattr(config, "vision_config") and hasattr(config, "text_config")


def apply(
    model: nn.Module,
    thresholds=None,
    *,
    r: int | Sequence[int] | None = None,
    order: str | None = None,
    mode: str = "dymu",
    vtu_attention: str = "fast",
    tome_vtu: bool = True,
    max_tokens: int | None = None,
    min_tokens: int | None = None,
) -> nn.Module:
    """Patch ``model`` in place with DyMU and return it. Undo with `remove`.

    - ``LlavaForConditionalGeneration``: ``mode`` is one of ``full`` (stock), ``dymu`` (DToMe +
      VTU, default), ``dtome`` (merged tokens fed directly, no VTU), ``tome`` (fixed ``r`` merges
      per layer, with VTU unless ``tome_vtu=False``), ``downsample`` (stock model, smaller images:
      see `dymu.generate`).
    - a CLIP or SigLIP vision model: DToMe with ``thresholds`` (one number, one per layer, or a
      `Thresholds` object; +inf or None = no merge at that layer, -inf = merge every edge) or plain
      ToMe with ``r``. Every layer merges at most (t - protected) // 2 of an image's t tokens.
    - a Llama / Mistral / Qwen2 causal LM: VTU decoder layers (group maps: `dymu.decoders.llama`).

    ``order``: where tokens go after a merge: "interleaved", "ab" or "ab-score" (`dymu.token_order`);
    default: the order a `Thresholds` object was calibrated in, else "ab".
    ``vtu_attention``: "fast" (gather + stock attention) or "exact" (paper Eq. 10, eager only).
    ``max_tokens`` / ``min_tokens``: a per-image token budget at the feature layer (class token not
    counted), on top of the thresholds (or r): an image over ``max_tokens`` merges its best remaining
    edges in the last layers before the feature layer, within the per-layer cap; an image stops
    merging before it would drop under ``min_tokens``. Default: the `Thresholds` file's
    ``max_tokens`` / ``min_tokens``; ``max_tokens=math.inf`` / ``min_tokens=0`` switch them off.
    Checked here: a ``max_tokens`` the layers cannot reach is refused.
    """
    from .vlms.llava import SUPPORTED_VLMS, apply_llava

    if isinstance(model, SUPPORTED_VLMS):
        # downsample sizes its images by the average tokens DToMe keeps with these thresholds.
        kept = getattr(thresholds, "tokens_kept_mean", None)
        order = _merge_order(thresholds, order)
        budget = _budget(thresholds, max_tokens, min_tokens)
        if thresholds is not None and mode != "tome":
            thresholds = _threshold_values(thresholds, model.model.vision_tower)
        apply_llava(model, thresholds, r=r, order=order, mode=mode, vtu_attention=vtu_attention, tome_vtu=tome_vtu,
                    downsample_tokens=kept[-1] if kept else None, budget=budget)
        return model
    if _is_vlm(model):
        raise ValueError(f"{type(model).__name__} is not a supported VLM "
                         f"(supported: {', '.join(c.__name__ for c in SUPPORTED_VLMS)}).")
    if find_towers(model):
        tower, family = vision_tower_of(model)
        order = _merge_order(thresholds, order)
        budget = _budget(thresholds, max_tokens, min_tokens)
        if thresholds is not None:
            thresholds = _threshold_values(thresholds, tower)
        apply_dtome(tower, family, thresholds=thresholds, r=r, order=order, budget=budget,
                    feature_layer=default_feature_layer(model, family)[0])
        return model
    from .decoders.llama import apply_vtu

    try:
        apply_vtu(model, vtu_attention=vtu_attention)
    except ValueError:
        names = ", ".join(f.tower_class.__name__ for f in FAMILIES)
        raise ValueError(
            f"{type(model).__name__} is not supported: dymu.apply takes LlavaForConditionalGeneration, a vision "
            f"model ({names}) or a Llama/Mistral/Qwen2 causal LM."
        ) from None
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo `apply`: stock classes, no hooks, no DyMU state. Weights were never touched."""
    from .decoders.llama import remove_vtu
    from .vlms.llava import SUPPORTED_VLMS, remove_llava

    if isinstance(model, SUPPORTED_VLMS):
        remove_llava(model)
    for tower, _ in find_towers(model):
        remove_dtome(tower)
    remove_vtu(model)
    return model


def default_feature_layer(model: nn.Module, family: TowerFamily) -> tuple[int, bool]:
    """(feature layer, drop class token) as the VLM reads them, else LLaVA-1.5 / LLaVA-OV defaults."""
    config = getattr(model, "config", None)
    layer = getattr(config, "vision_feature_layer", None)
    strategy = getattr(config, "vision_feature_select_strategy", None)
    if isinstance(layer, int) and strategy in ("default", "full"):
        return layer, strategy == "default"
    return (-2, True) if family.has_class_token else (-1, False)


@torch.no_grad()
def encode(
    model: nn.Module,
    pixel_values,
    feature_layer: int | None = None,
    drop_class_token: bool | None = None,
    *,
    focus=None,
    fill=None,
    processor=None,
) -> EncodedImages:
    """Encode images with the (patched or stock) vision tower of ``model``.

    ``pixel_values``: the processor's (B, 3, H, W) tensor, or a list of PIL images, which
    ``processor`` (default: the tower family's stock one) turns into it. Returns per image the
    tokens at ``feature_layer`` (``hidden_states[feature_layer]`` in HF terms), their sizes, the
    group map of the original patches and the tokens kept after every layer. Layers after the
    feature layer are not computed. Defaults follow the VLM's config (``vision_feature_layer`` /
    ``vision_feature_select_strategy``) when ``model`` is a VLM, else -2 without the class token for
    CLIP (LLaVA-1.5) and -1 for SigLIP (LLaVA-OneVision).

    ``focus``: one entry per image (None: the whole image): a box (x0, y0, x1, y1) in pixels of
    the image, a list of boxes, a mask image or a boolean (H, W) array. Outside it the pixels are
    set to ``fill`` (default white, or "mean", or a colour) before the processor (`dymu.focus`),
    so needs PIL images. The budget set by `apply` applies at ``feature_layer``.
    """
    tower, family = vision_tower_of(model)
    default_layer, default_drop = default_feature_layer(model, family)
    feature_layer = default_layer if feature_layer is None else feature_layer
    drop_class_token = default_drop if drop_class_token is None else drop_class_token
    if not isinstance(pixel_values, torch.Tensor):
        from .focus import DEFAULT_FILL, apply_focus_all

        images = apply_focus_all(list(pixel_values), focus, DEFAULT_FILL if fill is None else fill)
        processor = processor or family.default_processor(tower.config)
        pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    elif focus is not None:
        raise ValueError("focus is applied to the images before the processor: pass PIL images (with processor=) "
                         "instead of pixel values, or fill them yourself with dymu.focus.apply_focus")
    param = next(tower.parameters())
    pixel_values = pixel_values.to(param.device)
    return encode_with_tower(tower, family, pixel_values, feature_layer, drop_class_token)
