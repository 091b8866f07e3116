"""The public entry points: `apply`, `remove`, `encode`."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import torch
from torch import nn

from . import towers as _towers  # noqa: F401  (registers the CLIP and SigLIP families)
from .families.tower_vlm import (
    default_feature_layer,
    encode_tower_images,
    settings_budget,
    threshold_values,
)
from .encoded import Encoded
from .locks import model_lock
from .patching import forget_settings, record_settings, recorded_settings
from .settings import Settings
from .towers.encoder import (
    FAMILIES,
    TowerFamily,
    apply_dtome,
    find_towers,
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


def _family_or_none(model: nn.Module):
    from .families import vlm_family_of

    return vlm_family_of(model)


def encoder_pixels(model: nn.Module, processed) -> tuple[torch.Tensor, list[int]]:
    """What the vision tower sees for one image-processor output: (crops (C, 3, S, S), crops per image):
    one crop per image, except for families that cut images into crops."""
    family = _family_or_none(model)
    if family is not None:
        return family.encoder_pixels(model, processed)
    pixels = processed["pixel_values"]
    return pixels, [1] * len(pixels)


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
    kv_cache: str | None = None,
    tome_vtu: bool = True,
    merge_point: str | None = None,
    max_tokens: int | None = None,
    min_tokens: int | None = None,
    cross_frame: bool = False,
) -> nn.Module:
    """Patch ``model`` in place with DyMU and return it. Undo with `remove`.

    ``model``: a VLM of a registered family (`dymu.families`); a bare vision model of a registered tower family
    (`dymu.towers`), which takes ``thresholds`` or ``r``, ``order`` and the token budget; or a causal LM whose
    decoder layers VTU supports (`dymu.decoders.registry`), which takes ``vtu_attention`` and ``kv_cache`` (give
    it group maps with `dymu.decoders.llama.vtu_groups`).

    Each family declares every mode and option below as offered, or refused with a one-line reason; a call
    that uses one its family refuses raises that reason before anything changes. What each family offers:
    `dymu.families.base.feature_matrix()` (the README's families table); whether each family runs on your
    device and versions: `dymu env --check`.

    ``thresholds``: the DToMe thresholds: a `Thresholds` object (`dymu.calibrate`, a file), one number or one
    per layer (+inf or None: no merge at that layer, -inf: merge every edge); a layer merges at most half
    of an image's tokens.
    ``r``: a fixed number of merges per layer or step (ToMe), instead of thresholds.
    ``mode``: ``full`` (stock), ``dymu`` (merges in the vision encoder, VTU in the LLM: the default), ``dtome``
    (merged tokens fed straight to the LLM, no VTU), ``tome`` (``r`` merges, VTU unless ``tome_vtu=False``) or
    ``downsample`` (the stock model on smaller images: see `dymu.generate`).
    ``order``: where tokens go after a merge: "interleaved", "ab" or "ab-score" (`dymu.token_order`); default:
    the order a `Thresholds` object was calibrated in, else "ab".
    ``vtu_attention``: "fast" (gather + stock attention) or "exact" (paper Eq. 10, eager only).
    ``kv_cache``: with VTU, "compact" (one key and value per merged token in every layer's KV cache, exact;
    `dymu.kv_cache`) or "full" (the stock full-length cache); default: the family's.
    ``merge_point``: where the merges run: "vit" (in the vision tower), "post" (on the LLM-level tokens after
    the stock steps that follow the tower) or "both", those its family offers; default: the thresholds
    file's, else "vit".
    ``max_tokens`` / ``min_tokens``: a token budget per image (per video) on top of the thresholds (or ``r``):
    an image over ``max_tokens`` merges its best remaining edges in the last merges, within the per-layer cap;
    one stops merging before it would drop under ``min_tokens``. Default: the `Thresholds` file's;
    ``max_tokens=math.inf`` / ``min_tokens=0`` switch them off. A ``max_tokens`` the merges cannot reach is
    refused (here, or at the call for images whose size decides it).
    ``cross_frame``: a video's merges also join tokens across its frames (default: within each frame).
    """
    settings = Settings(mode=mode, thresholds=thresholds, r=r, order=order, vtu_attention=vtu_attention,
                        kv_cache=kv_cache, tome_vtu=tome_vtu, merge_point=merge_point, max_tokens=max_tokens,
                        min_tokens=min_tokens, cross_frame=cross_frame)
    return apply_settings(model, settings)


def apply_settings(model: nn.Module, settings: Settings) -> nn.Module:
    """`apply` with a `dymu.settings.Settings` (what the CLI and the lmms-eval plugin build)."""
    family = _family_or_none(model)
    if family is not None:
        with model_lock(model):
            family.apply(model, family.with_defaults(settings))
            record_settings(model, settings)  # what `settings_of` returns, and `applied` restores
        return model
    if _is_vlm(model):
        from .families import supported_vlm_names

        raise ValueError(f"{type(model).__name__} is not a supported VLM (supported: {', '.join(supported_vlm_names())}).")
    if find_towers(model):
        return _apply_to_tower(model, settings)
    from .decoders.llama import apply_vtu

    if settings.used_options() or settings.mode != "dymu":
        raise ValueError(f"a causal LM takes only vtu_attention and kv_cache (VTU decoder layers), not "
                         f"{', '.join(settings.used_options()) or 'mode ' + repr(settings.mode)}")
    try:
        apply_vtu(model, vtu_attention=settings.vtu_attention, kv_cache=settings.kv_cache or "compact")
    except ValueError:
        from .decoders.registry import SUPPORTED_MODELS
        from .families import supported_vlm_names

        names = ", ".join(f.tower_class.__name__ for f in FAMILIES)
        raise ValueError(
            f"{type(model).__name__} is not supported: dymu.apply takes a VLM ({', '.join(supported_vlm_names())}), a vision "
            f"model ({names}) or a causal LM ({', '.join(m for m in SUPPORTED_MODELS if m.endswith('ForCausalLM'))})."
        ) from None
    return model


def _apply_to_tower(model: nn.Module, settings: Settings) -> nn.Module:
    """A bare vision model of a registered tower family: DToMe with thresholds, or ToMe with r."""
    if settings.kv_cache not in (None, "compact"):
        raise ValueError("kv_cache is a setting of VTU in a language model; a vision model has no KV cache")
    wrong = [name for name in ("merge_point", "cross_frame", "tome_vtu") if name in settings.used_options()]
    if wrong or settings.mode not in ("dymu", "tome"):
        raise ValueError(f"a vision model takes thresholds or r, order and a token budget, not "
                         f"{', '.join(wrong) or 'mode ' + repr(settings.mode)}")
    tower, family = vision_tower_of(model)
    thresholds = settings.thresholds
    if thresholds is not None:
        thresholds = threshold_values(thresholds, tower)
    apply_dtome(tower, family, thresholds=thresholds, r=settings.r, order=settings.file_default("order"),
                budget=settings_budget(settings), feature_layer=default_feature_layer(model, family)[0])
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo `apply`: stock classes, no hooks, no DyMU state. Weights were never touched."""
    from .decoders.llama import remove_vtu

    family = _family_or_none(model)
    if family is not None:
        family.remove(model)
        forget_settings(model)
    for tower, _ in find_towers(model):
        remove_dtome(tower)
    remove_vtu(model)
    return model


def settings_of(model: nn.Module) -> Settings | None:
    """The `Settings` a supported VLM was last patched with by `apply` (None: stock)."""
    return recorded_settings(model)


@contextmanager
def applied(model: nn.Module, settings: Settings):
    """``model`` patched with ``settings`` inside the block, and as it was before after it (stock, or
    the settings it had), also when the block raises."""
    before = settings_of(model)
    apply_settings(model, settings)
    try:
        yield model
    finally:
        if before is None:
            remove(model)
        else:
            apply_settings(model, before)


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
) -> Encoded:
    """Encode images with the (patched or stock) vision side of ``model``; layers after the feature
    layer are not computed.

    Returns a `dymu.Encoded` for every family: ``per_item()`` gives (merged tokens kept, stock
    positions) of every item and ``groups_per_item()`` the merged token every stock position became.
    An item is what merges on its own: an image, or a crop / tile of one (AnyRes crops, InternVL and
    SmolVLM tiles), or a video. The subclass carries the tower's own tensors: `EncodedImages` for
    CLIP / SigLIP towers (padded tokens, sizes, tokens kept per layer), `QwenEncoded` for the Qwen
    ViTs, `UnitEncoded` for towers that merge whole LLM-token units.

    ``pixel_values``: what the model's processor makes, or a list of PIL images, which ``processor``
    (default: the family's stock one) turns into it; ``grid_thw``: the processor's grid where the family
    takes one. ``feature_layer`` / ``drop_class_token``: default to the VLM's config
    (``vision_feature_layer`` / ``vision_feature_select_strategy``), else -2 without the class token
    for CLIP and -1 for SigLIP. ``focus``: one entry per image (None: the whole image): a box (x0, y0,
    x1, y1) in pixels, a list of boxes, a mask image or a boolean (H, W) array; outside it the pixels
    are set to ``fill`` (default white, "mean", or a colour) before the processor (`dymu.focus`), so it
    needs PIL images. The token budget set by `apply` applies. A family refuses an argument it does not
    take with a one-line reason.
    """
    with model_lock(model):  # the patched tower keeps the running forward's state on the model
        return _encode(model, pixel_values, feature_layer, drop_class_token, grid_thw, focus, fill, processor)


def _encode(model, pixel_values, feature_layer, drop_class_token, grid_thw, focus, fill, processor):
    family = _family_or_none(model)
    if family is not None:
        return family.encode(model, pixel_values, feature_layer=feature_layer, drop_class_token=drop_class_token,
                             grid_thw=grid_thw, focus=focus, fill=fill, processor=processor)
    if grid_thw is not None:
        raise ValueError(f"grid_thw is for VLMs with native-resolution towers, not {type(model).__name__}")
    tower, tower_family = vision_tower_of(model)
    return encode_tower_images(model, tower, tower_family, pixel_values, feature_layer, drop_class_token, focus, fill,
                               processor)
