"""The public entry points: `apply`, `remove`, `encode`."""

from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import nn

from . import towers as _towers  # noqa: F401  (registers the CLIP and SigLIP families)
from .locks import model_lock
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


# The VLM wirings, one module per family under dymu.families (imported on first use, they import
# transformers model code). Each exports SUPPORTED_VLMS (the model classes it patches),
# apply_vlm(model, thresholds, r=, mode=, vtu_attention=, kv_cache=, tome_vtu=, downsample_tokens=) and
# remove_vlm(model). A new family adds its module name here.
VLM_WIRINGS = ("llava", "llava_next", "qwen_vl")


def vlm_wiring(model: nn.Module):
    """The wiring module for ``model``'s class, or None."""
    import importlib

    for name in VLM_WIRINGS:
        module = importlib.import_module(f"{__package__}.families.{name}")
        if isinstance(model, module.SUPPORTED_VLMS):
            return module
    return None


def supported_vlm_names() -> list[str]:
    import importlib

    return [c.__name__ for name in VLM_WIRINGS for c in importlib.import_module(f"{__package__}.families.{name}").SUPPORTED_VLMS]


def encoder_pixels(model: nn.Module, processed) -> tuple[torch.Tensor, list[int]]:
    """What the vision tower sees for one image-processor output: (crops (C, 3, S, S), crops per image).

    One crop per image, except for AnyRes VLMs (LLaVA-NeXT / OneVision), whose wiring lists every
    image's valid crops (``encoder_pixels`` in its module)."""
    wiring = vlm_wiring(model)
    if wiring is not None and hasattr(wiring, "encoder_pixels"):
        return wiring.encoder_pixels(model, processed)
    pixels = processed["pixel_values"]
    return pixels, [1] * len(pixels)


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
    kv_cache: str = "compact",
    tome_vtu: bool = True,
    merge_point: str | None = None,
    max_tokens: int | None = None,
    min_tokens: int | None = None,
    cross_frame: bool = False,
) -> nn.Module:
    """Patch ``model`` in place with DyMU and return it. Undo with `remove`.

    - a supported VLM (``LlavaForConditionalGeneration``; ``LlavaNextForConditionalGeneration`` and
      ``LlavaOnevisionForConditionalGeneration`` take full / dymu / tome only): ``mode`` is one of ``full`` (stock), ``dymu`` (DToMe +
      VTU, default), ``dtome`` (merged tokens fed directly, no VTU), ``tome`` (fixed ``r`` merges
      per layer, with VTU unless ``tome_vtu=False``), ``downsample`` (stock model, smaller images:
      see `dymu.generate`).
    - a CLIP or SigLIP vision model: DToMe with ``thresholds`` (one number, one per layer, or a
      `Thresholds` object; +inf or None = no merge at that layer, -inf = merge every edge) or plain
      ToMe with ``r``. Every layer merges at most (t - protected) // 2 of an image's t tokens.
    - ``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``,
      ``Qwen3VLForConditionalGeneration``: ``mode`` ``full``, ``dymu``, ``dtome`` (merged tokens fed
      straight to the LLM, each at its group's first unit's stock (t, h, w) M-RoPE position; the prompt
      holds one placeholder per kept token: `dymu.prompt_inputs`) or ``tome`` (``r`` unit merges per ViT
      block, VTU unless ``tome_vtu=False``); ``merge_point`` ``"vit"`` (unit-level DToMe in every ViT
      block, one threshold per block) or ``"post"`` (stock ViT, merge rounds after the PatchMerger, one
      threshold per round); default: the thresholds file's, else ``"vit"``. ``cross_frame=True``: a
      video's merge steps alternate between merging across its frames (a unit can join its twin in the
      next temporal patch) and within them (default: within each temporal patch only). The token budget
      counts LLM tokens (2x2 units) per image and per video, over every ViT block ("vit") or over the
      post rounds ("post": add +inf rounds to make room); whether ``max_tokens`` is reachable depends on
      each image's size, so every call checks it before the tower runs. See `dymu.families.qwen_vl`.
    - a Llama / Mistral / Qwen2 causal LM: VTU decoder layers (group maps: `dymu.decoders.llama`).

    ``order``: where tokens go after a merge: "interleaved", "ab" or "ab-score" (`dymu.token_order`);
    default: the order a `Thresholds` object was calibrated in, else "ab".
    ``vtu_attention``: "fast" (gather + stock attention) or "exact" (paper Eq. 10, eager only).
    ``kv_cache``: with VTU, "compact" (one key and value per merged token in every layer's KV cache,
    exact; `dymu.kv_cache`) or "full" (the stock full-length cache).
    ``max_tokens`` / ``min_tokens``: a per-image token budget at the feature layer (class token not
    counted), on top of the thresholds (or r): an image over ``max_tokens`` merges its best remaining
    edges in the last layers before the feature layer, within the per-layer cap; an image stops
    merging before it would drop under ``min_tokens``. Default: the `Thresholds` file's
    ``max_tokens`` / ``min_tokens``; ``max_tokens=math.inf`` / ``min_tokens=0`` switch them off.
    Checked here: a ``max_tokens`` the layers cannot reach is refused.
    """
    from .decoders.llama import check_kv_cache
    from .families.qwen_vl import SUPPORTED_QWEN_VLMS, apply_qwen_vl

    check_kv_cache(kv_cache)
    if isinstance(thresholds, (str, os.PathLike)):  # a file, a folder holding thresholds.json, or a Hub repo
        from .thresholds import Thresholds

        thresholds = Thresholds.from_ref(thresholds)
    if isinstance(model, SUPPORTED_QWEN_VLMS):
        # Qwen VLs hold their own thresholds (per ViT block or per merge round) and merge 2x2 units: no order.
        from .families.qwen_vl import qwen_budget

        if order is not None:
            raise ValueError(f"{type(model).__name__} merges in the stock unit order: order is for CLIP/SigLIP towers")
        apply_qwen_vl(model, thresholds, mode=mode, merge_point=merge_point, vtu_attention=vtu_attention,
                      kv_cache=kv_cache, cross_frame=cross_frame, r=r, tome_vtu=tome_vtu,
                      budget=qwen_budget(thresholds, max_tokens, min_tokens))
        return model
    if cross_frame:
        raise ValueError(f"cross_frame is for the Qwen VLs, not {type(model).__name__}")
    wiring = vlm_wiring(model)
    takes_merge_point = wiring is not None and hasattr(wiring, "resolve_merge_point")
    if merge_point is not None and not takes_merge_point:
        raise ValueError(f"merge_point is for the Qwen VLs, LLaVA-NeXT and LLaVA-OneVision, not {type(model).__name__}")
    if wiring is not None:
        extra = {}
        if takes_merge_point:  # LLaVA-NeXT / OneVision: the tower's thresholds and the post rounds'
            if hasattr(thresholds, "check_compatible"):
                thresholds.check_compatible(model.model.vision_tower)
            kept = getattr(thresholds, "tokens_kept_mean", None)
            order = _merge_order(thresholds, order)
            budget = _budget(thresholds, max_tokens, min_tokens)
            thresholds, post, merge_point = wiring.resolve_merge_point(thresholds, merge_point, mode)
            extra = {"merge_point": merge_point, "post_thresholds": post}
        else:
            # downsample sizes its images by the average tokens DToMe keeps with these thresholds.
            kept = getattr(thresholds, "tokens_kept_mean", None)
            order = _merge_order(thresholds, order)
            budget = _budget(thresholds, max_tokens, min_tokens)
        if mode == "downsample" and thresholds is not None and not kept:
            raise ValueError(
                "mode 'downsample' sizes the images by the mean visual tokens these thresholds kept during "
                f"calibration, but this thresholds file has no calibration statistics (schedule "
                f"{getattr(thresholds, 'schedule', '?')!r}); make one with `dymu calibrate` (Python: dymu.calibrate) "
                "on the same model and a few hundred images")
        if thresholds is not None and mode != "tome":
            thresholds = _threshold_values(thresholds, model.model.vision_tower)
        wiring.apply_vlm(model, thresholds, r=r, mode=mode, vtu_attention=vtu_attention, kv_cache=kv_cache,
                         tome_vtu=tome_vtu, downsample_tokens=kept[-1] if kept else None, order=order, budget=budget,
                         **extra)
        return model
    if _is_vlm(model):
        raise ValueError(f"{type(model).__name__} is not a supported VLM (supported: {', '.join(supported_vlm_names())}).")
    if find_towers(model):
        if kv_cache != "compact":
            raise ValueError("kv_cache is a setting of VTU in a language model; a vision model has no KV cache")
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
        apply_vtu(model, vtu_attention=vtu_attention, kv_cache=kv_cache)
    except ValueError:
        names = ", ".join(f.tower_class.__name__ for f in FAMILIES)
        raise ValueError(
            f"{type(model).__name__} is not supported: dymu.apply takes a VLM ({', '.join(supported_vlm_names())}), a vision "
            f"model ({names}) or a Llama/Mistral/Qwen2 causal LM."
        ) from None
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo `apply`: stock classes, no hooks, no DyMU state. Weights were never touched."""
    from .decoders.llama import remove_vtu

    wiring = vlm_wiring(model)
    if wiring is not None:
        wiring.remove_vlm(model)
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
    grid_thw: torch.Tensor | None = None,
    *,
    focus=None,
    fill=None,
    processor=None,
) -> EncodedImages:
    """Encode images with the (patched or stock) vision tower of ``model``.

    Returns per image the tokens at ``feature_layer`` (``hidden_states[feature_layer]`` in HF
    terms), their sizes, the group map of the original patches and the tokens kept after every
    layer. Layers after the feature layer are not computed. Defaults follow the VLM's config
    (``vision_feature_layer`` / ``vision_feature_select_strategy``) when ``model`` is a VLM, else
    -2 without the class token for CLIP (LLaVA-1.5) and -1 for SigLIP (LLaVA-OneVision).

    ``pixel_values``: the processor's (B, 3, H, W) tensor, or a list of PIL images, which
    ``processor`` (default: the tower family's stock one) turns into it. ``focus``: one entry per
    image (None: the whole image): a box (x0, y0, x1, y1) in pixels of the image, a list of boxes, a
    mask image or a boolean (H, W) array. Outside it the pixels are set to ``fill`` (default white,
    or "mean", or a colour) before the processor (`dymu.focus`), so needs PIL images. The budget set
    by `apply` applies at ``feature_layer``.

    A Qwen VL (patched by `apply`, or stock: no merging) takes the processor's ``pixel_values`` and
    ``grid_thw`` (``image_grid_thw``), or PIL images with ``processor`` (and ``focus`` / ``fill``), and
    returns a `dymu.towers.qwen_vit.QwenEncoded` (with the budget set by `apply`).
    """
    with model_lock(model):  # the patched tower keeps the running forward's state on the model
        return _encode(model, pixel_values, feature_layer, drop_class_token, grid_thw, focus, fill, processor)


def _encode(model, pixel_values, feature_layer, drop_class_token, grid_thw, focus, fill, processor):
    from .families.qwen_vl import SUPPORTED_QWEN_VLMS, encode_qwen_vl

    if isinstance(model, SUPPORTED_QWEN_VLMS):
        return encode_qwen_vl(model, pixel_values, grid_thw, focus=focus, fill=fill, processor=processor)
    tower, family = vision_tower_of(model)
    default_layer, default_drop = default_feature_layer(model, family)
    feature_layer = default_layer if feature_layer is None else feature_layer
    drop_class_token = default_drop if drop_class_token is None else drop_class_token
    if not isinstance(pixel_values, torch.Tensor):
        from .focus import DEFAULT_FILL, apply_focus_all, check_focus_survives

        fill = DEFAULT_FILL if fill is None else fill
        images = apply_focus_all(list(pixel_values), focus, fill)
        processor = processor or family.default_processor(tower.config)
        check_focus_survives(processor, list(pixel_values), images, focus, fill)
        pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    elif focus is not None:
        raise ValueError("focus is applied to the images before the processor: pass PIL images (with processor=) "
                         "instead of pixel values, or fill them yourself with dymu.focus.apply_focus")
    param = next(tower.parameters())
    pixel_values = pixel_values.to(param.device)
    return encode_with_tower(tower, family, pixel_values, feature_layer, drop_class_token)
